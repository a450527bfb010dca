//! The shardplan compiler, read top to bottom as its pipeline:
//! `parse → check → (graph → differentiate → partition → schedule → plan)`.
//!
//! Each stage is one module with one public entry point taking the previous
//! stage's product. The compiler does no IO: sources come in as text,
//! diagnostics go out as values, and the CLI renders them.

pub mod autodiff;
pub mod check;
pub mod diag;
pub mod graph;
pub mod interp;
pub mod kernel;
pub mod partition;
pub mod syntax;

pub use check::Checked;
pub use diag::{Diagnostic, Diagnostics, Severity, SourceId, Span};

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
