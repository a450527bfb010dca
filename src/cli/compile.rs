//! `shardplan compile FILE -o OUT.json`: the partitioned plan (every device's
//! kernel program and schedule) written as one JSON document, and [`load`],
//! which reads such a document back for `shardplan run OUT.json`.
//!
//! The document's format, its encoding and decoding and its validation are
//! the compiler's (`shardplan_compiler::plan`); this module reads and
//! writes the files and renders the diagnostics.
//!
//! Reading trusts nothing in the file. In order: the JSON and its types
//! (`plan::json`, with line and column), the format, the hash of the whole
//! plan against the one recorded at compile time (`plan::hash`), the
//! embedded source (the checker's diagnostics), every field of the plan
//! against the source and itself (`plan::invalid`, pointing at the value),
//! and the communication verifier (`run::verify`).

use super::check;
use shardplan_compiler::check::Placement;
use shardplan_compiler::diag::render::{self, Sources};
use shardplan_compiler::partition::Plan;
use shardplan_compiler::plan::{self as planfile, Document, PlanFileError};
use shardplan_compiler::{Checked, Diagnostic, Options, SourceId, Span};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A compiled plan read back and checked.
pub struct Compiled {
    pub checked: Checked,
    /// The plan file's text.
    pub source: String,
    /// What diagnostics call the source.
    pub source_name: String,
    /// The directory data paths are relative to: the one the plan file was
    /// in when it was compiled.
    pub base: PathBuf,
    pub plan: Plan,
}

/// Prints a problem, pointing at its line and column of `text` when it has them.
fn report(p: &PlanFileError, name: &str, text: &str, color: bool) {
    let sources = Sources::new(name, text.to_string());
    eprint!("{}", render::human(&p.diagnostic(text), &sources, color));
}

const BUG: &str = "this is a bug in shardplan; please report it with the plan";

/// `shardplan compile FILE -o OUT`.
pub fn run(file: &Path, out: &Path, color: bool) -> ExitCode {
    let Some(c) = check::load(file, color) else { return ExitCode::from(1) };
    let source = String::from_utf8_lossy(&std::fs::read(file).unwrap_or_default()).into_owned();
    let name = file.display().to_string();
    let fail = |code: &'static str, message: String, help: &str| {
        let d = Diagnostic::error(code, message).help(help);
        eprint!("{}", render::human(&d, &Sources::new(&name, source.clone()), color));
        ExitCode::from(1)
    };
    // `placement auto` compiles to the plan the search chooses with this machine's profile.
    let profile = match &c.placement {
        Placement::Auto { .. } => match super::auto::profile(None) {
            Ok(p) => Some(p),
            Err(e) => return fail("run::device_profile", e, "write one with `shardplan calibrate -o FILE`"),
        },
        _ => None,
    };
    let compiled = match shardplan_compiler::compile(&c, &Options { profile, ..Options::default() }) {
        Ok(x) => x,
        Err(diags) => {
            let sources = Sources::new(&name, source.clone());
            for d in diags.iter() {
                eprint!("{}", render::human(d, &sources, color));
            }
            return ExitCode::from(1);
        }
    };
    // Data paths are relative to the plan file's directory, wherever the plan is run from.
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = match std::fs::canonicalize(dir) {
        Ok(b) => b.to_string_lossy().into_owned(),
        Err(e) => return fail("io::read", format!("cannot resolve the directory of `{name}`: {e}"), "check the path and its permissions"),
    };
    let doc = Document::new(source.clone(), base, &compiled);
    let text = match planfile::encode(&doc) {
        Ok(t) => t,
        Err(e) => return fail(e.code, e.message, &e.help),
    };
    // What is written must read back as the same plan, and pass the checks a run makes.
    match planfile::decode(text.as_bytes()).and_then(|d| planfile::validate(&d.plan, &c).map(|()| d)) {
        Ok(back) if back.plan.hash == doc.plan.hash => {}
        Ok(_) => return fail("compile::internal", "the compiled plan does not read back as the same plan".into(), BUG),
        Err(e) => return fail("compile::internal", format!("the compiled plan does not read back: {}", e.message), BUG),
    }
    if let Err(e) = shardplan_runtime::atomic::write(out, text.as_bytes()) {
        return fail("compile::write", format!("cannot write `{}`: {e}", out.display()), "check that the output's directory exists and is writable");
    }
    let n = doc.plan.devices.len();
    println!("{}: {n} device{}, {:016x}", out.display(), if n == 1 { "" } else { "s" }, doc.plan.hash);
    ExitCode::SUCCESS
}

/// Reads, checks and prints the diagnostics of the compiled plan at `path`.
/// Returns it when it can be run.
pub fn load(path: &Path, color: bool) -> Option<Compiled> {
    let name = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            let d = Diagnostic::error("io::read", format!("cannot read `{name}`: {e}"))
                .label(Span::new(SourceId::USER, 0, 0), "could not be read")
                .help("check the path and its permissions");
            eprint!("{}", render::human(&d, &Sources::new(&name, String::new()), color));
            return None;
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let fail = |p: PlanFileError| {
        report(&p, &name, &text, color);
        None
    };
    let doc = match planfile::decode(&bytes) {
        Ok(d) => d,
        Err(p) => return fail(p),
    };

    // The model, data and training settings, from the embedded source.
    let source_name = format!("{name} (source)");
    let (checked, diags) = shardplan_compiler::check_source(doc.source.as_bytes());
    let sources = Sources::new(&source_name, doc.source.clone());
    for d in diags.iter() {
        eprint!("{}", render::human(d, &sources, color));
        eprintln!();
    }
    let errors = diags.error_count();
    let c = match checked {
        Some(c) if errors == 0 => c,
        _ => {
            let errors = errors.max(1);
            eprintln!("{source_name}: {errors} error{}", if errors == 1 { "" } else { "s" });
            return None;
        }
    };

    if let Err(p) = planfile::validate(&doc.plan, &c) {
        return fail(p.located(&bytes));
    }
    let base = if doc.base.is_empty() { PathBuf::from(".") } else { PathBuf::from(&doc.base) };
    Some(Compiled { checked: c, source: doc.source, source_name, base, plan: doc.plan })
}

/// The help line of a data file a compiled plan names but that is missing.
pub fn missing_data_help(base: &Path) -> String {
    format!("a compiled plan's data paths are relative to `{}`, the directory of the plan file it was compiled from", base.display())
}
