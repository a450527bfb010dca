//! The shardplan compiler, read top to bottom as its pipeline:
//!
//! ```text
//! bytes ─► syntax::parse ─► check::check          (check_source: a Checked plan or diagnostics)
//!       ─► graph::build ─► autodiff::differentiate (the training graph)
//!       ─► planner::search                        (placement auto only)
//!       ─► partition::partition | kernel::lower    (device programs, or one program)
//!       ─► partition::verify, partition::memory    (the plan fits together and fits its devices)
//! ```
//!
//! [`check_source`] runs the front end; [`compile`] (the driver, `driver.rs`)
//! runs every later stage in order with the verifiers between them. No other
//! code chains the stages. Each stage is one module with one public entry
//! point taking the previous stage's product. The compiler does no IO:
//! sources come in as text, diagnostics go out as values, and the CLI
//! renders them. `interp` is the reference interpreter kernels are tested
//! against.

/// Diagnostics: what every stage reports to the user.
pub mod diag;

/// 1. Bytes → syntax tree.
pub mod syntax;

/// 2. Syntax tree → checked plan (names, layers, shapes, sections, placement).
pub mod check;

/// 3. Checked plan → forward graph.
pub mod graph;

/// 4. Forward graph → training graph (backward pass and optimizer update).
pub mod autodiff;

/// 5. Training graph and `placement auto` → an explicit placement (the
///    planner: the search over placements by the cost model, and its
///    explanation).
pub mod planner;

/// 6. Training graph and placement → device programs (with the verifiers
///    and the memory plan).
pub mod partition;

/// 7. A graph → a kernel program (fused element-wise kernels, reductions,
///    matmuls), backend-neutral.
pub mod kernel;

/// The driver: stages 3 to 7 in order, with the verifiers between them.
pub mod driver;

/// Compiled plan files: the driver's output as a JSON document, and a
/// document read back, decoded and validated field by field.
pub mod plan;

/// The reference interpreter every backend's kernels are tested against.
pub mod interp;

/// Byte counts as people read them: the one formatter of sizes.
pub mod units;

/// The project's hash (FNV-1a).
pub mod hash;

pub use check::Checked;
pub use diag::{Diagnostic, Diagnostics, Severity, SourceId, Span};
pub use driver::{compile, Compiled, Options, Target};

use std::sync::OnceLock;

/// The standard prelude, written in the plan language.
pub const PRELUDE: &str = include_str!("prelude.plan");

/// The parsed prelude. It is part of the compiler, so a failure to parse it
/// is reported as an internal diagnostic rather than a panic.
pub fn prelude() -> Result<&'static syntax::ast::File, Diagnostics> {
    static PARSED: OnceLock<Result<syntax::ast::File, Diagnostics>> = OnceLock::new();
    PARSED.get_or_init(|| syntax::parse(SourceId::PRELUDE, PRELUDE)).as_ref().map_err(Clone::clone)
}

/// Parses and checks one plan given as bytes. Returns what was established
/// (None when there are errors) and every diagnostic, warnings included.
pub fn check_source(bytes: &[u8]) -> (Option<Checked>, Diagnostics) {
    check_source_with(bytes, &std::collections::BTreeMap::new())
}

/// As [`check_source`], binding some symbolic dims to other sizes.
pub fn check_source_with(bytes: &[u8], overrides: &std::collections::BTreeMap<String, i64>) -> (Option<Checked>, Diagnostics) {
    check_source_placed(bytes, overrides, true)
}

/// As [`check_source_with`], and the run uses the reduced sizes too: the
/// train section's batch and dims take the overrides (`verify --set`).
pub fn check_source_resized(bytes: &[u8], overrides: &std::collections::BTreeMap<String, i64>) -> (Option<Checked>, Diagnostics) {
    let (checked, diags) = check_source_with(bytes, overrides);
    let checked = checked.map(|mut c| {
        for (k, v) in overrides {
            if k == "batch" {
                c.train.batch = *v;
            }
            c.train.dims.insert(k.clone(), *v);
        }
        c
    });
    (checked, diags)
}

/// As [`check_source_with`], optionally dropping the placement (the plan
/// then runs on one device): evaluation and single-device baselines.
pub fn check_source_placed(bytes: &[u8], overrides: &std::collections::BTreeMap<String, i64>, placed: bool) -> (Option<Checked>, Diagnostics) {
    let text = match syntax::decode(SourceId::USER, bytes) {
        Ok(t) => t,
        Err(d) => return (None, d.into()),
    };
    let mut file = match syntax::parse(SourceId::USER, text) {
        Ok(f) => f,
        Err(d) => return (None, d),
    };
    if !placed {
        file.placements.clear();
        file.devices.clear();
    }
    let prelude = match prelude() {
        Ok(p) => p,
        Err(d) => return (None, d),
    };
    check::check_with(&file, prelude, overrides)
}

#[cfg(test)]
mod tests {
    #[test]
    fn prelude_parses() {
        assert!(super::prelude().is_ok(), "{:?}", super::prelude().err());
    }
}
