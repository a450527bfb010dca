//! `shardplan check FILE...`: diagnostics, or a one-screen summary per file.

use super::Format;
use serde::Serialize;
use shardplan_compiler::check::summary;
use shardplan_compiler::diag::render::{self, Sources};
use shardplan_compiler::{Checked, Diagnostic, SourceId, Span};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Serialize)]
struct JsonFile {
    file: String,
    ok: bool,
    diagnostics: Vec<render::JsonDiagnostic>,
    summary: Option<Vec<(String, String)>>,
}

/// Reads and checks one plan file: its text (for rendering), what was
/// established, and every diagnostic (an unreadable file is `io::read`).
fn read_and_check(path: &std::path::Path) -> (Sources, Option<Checked>, Vec<Diagnostic>) {
    let name = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => {
            let (checked, diags) = shardplan_compiler::check_source(&bytes);
            let mut diags = diags.into_vec();
            // The data against the model, when its file is readable.
            let base = super::run::base_of(path);
            let clean = !diags.iter().any(Diagnostic::is_error);
            if let Some((c, Err(e))) = checked.as_ref().filter(|_| clean).map(|c| (c, shardplan_runtime::session::check_data(c, &base))) {
                let shown = e.path.display().to_string();
                let message = if shown.is_empty() { e.message.clone() } else { format!("{} ({shown})", e.message) };
                diags.push(Diagnostic::error(e.code, message).label(c.data.span, "the data source").help(e.help.clone()));
            }
            (Sources::new(&name, String::from_utf8_lossy(&bytes).into_owned()), checked, diags)
        }
        Err(e) => {
            let d = Diagnostic::error("io::read", format!("cannot read `{name}`: {e}"))
                .label(Span::new(SourceId::USER, 0, 0), "could not be read")
                .help("check the path and its permissions");
            (Sources::new(&name, String::new()), None, vec![d])
        }
    }
}

/// Prints diagnostics (warnings included) to stderr, and the error count
/// when there are errors. Returns that count.
pub fn report(name: &str, sources: &Sources, diags: &[Diagnostic], color: bool) -> usize {
    for d in diags {
        eprint!("{}", render::human(d, sources, color));
        eprintln!();
    }
    let errors = diags.iter().filter(|d| d.is_error()).count();
    if errors > 0 {
        eprintln!("{name}: {errors} error{}", if errors == 1 { "" } else { "s" });
    }
    errors
}

/// Reads and checks one plan file, printing its diagnostics. Returns the
/// checked plan when it has no errors.
pub fn load(path: &std::path::Path, color: bool) -> Option<Checked> {
    let (sources, checked, diags) = read_and_check(path);
    let errors = report(&path.display().to_string(), &sources, &diags, color);
    checked.filter(|_| errors == 0)
}

pub fn run(files: &[PathBuf], format: Format, color: bool) -> ExitCode {
    let mut failed = false;
    let mut json_out = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let name = path.display().to_string();
        let (sources, checked, diags) = read_and_check(path);
        let ok = checked.is_some() && !diags.iter().any(Diagnostic::is_error);
        failed |= !ok;
        match format {
            Format::Json => json_out.push(JsonFile {
                file: name.clone(),
                ok,
                diagnostics: diags.iter().map(|d| render::json(d, &sources)).collect(),
                summary: checked.as_ref().filter(|_| ok).map(summary),
            }),
            Format::Human => {
                report(&name, &sources, &diags, color);
                if i > 0 {
                    println!();
                }
                if let (Some(c), true) = (&checked, ok) {
                    println!("{name}: ok");
                    let mut last = String::new();
                    for (k, v) in summary(c) {
                        let shown = if k == last { "" } else { k.as_str() };
                        println!("  {shown:<10} {v}");
                        last = k;
                    }
                }
            }
        }
    }
    if format == Format::Json {
        match serde_json::to_string_pretty(&json_out) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: cannot write JSON: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::from(u8::from(failed))
}
