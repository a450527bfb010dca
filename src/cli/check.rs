//! `shardplan check FILE...`: diagnostics, or a one-screen summary per file.

use super::render::{self, Sources};
use super::Format;
use serde::Serialize;
use shardplan_compiler::check::{Child, DataSource, DeviceKind, Explicit, Length, LrSchedule, Objective, Placement};
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
            let base = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => std::path::Path::new("."),
            };
            if let Some(Err(e)) = checked.as_ref().filter(|_| !diags.iter().any(Diagnostic::is_error)).map(|c| shardplan_runtime::session::check_data(c, base))
            {
                let c = checked.as_ref().expect("checked above");
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
fn report(name: &str, sources: &Sources, diags: &[Diagnostic], color: bool) -> usize {
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

/// The summary lines of a checked plan, as (heading, text).
pub fn summary(c: &Checked) -> Vec<(String, String)> {
    let m = &c.model;
    let mut out = Vec::new();
    let layers = m.top.iter().map(|t| match &t.child {
        Child::One(_) => 1,
        Child::Repeat(v) => v.len(),
    });
    out.push((
        "model".into(),
        format!(
            "{}: {} layers, {} parameter tensors, {} parameters ({})",
            m.name,
            layers.sum::<usize>(),
            thousands(m.params.len() as i64),
            thousands(m.param_count()),
            bytes(m.param_bytes())
        ),
    ));
    out.push(("inputs".into(), m.inputs.iter().map(|i| format!("{}: {}", i.name, i.ty.bound())).collect::<Vec<_>>().join(", ")));
    if let Some(loss) = &m.loss {
        out.push(("loss".into(), loss.to_string()));
    }
    let d = &c.data;
    let rows = |r: &shardplan_compiler::check::RowRange| format!("{}..{}", r.start, r.end.map(|e| e.to_string()).unwrap_or_default());
    out.push((
        "data".into(),
        match &d.source {
            DataSource::Csv { path, label, scale, train, test } => format!(
                "{}: csv {path:?}, label {label:?}, scale {scale}, train rows {}{}",
                d.name,
                rows(train),
                test.as_ref().map(|t| format!(", test rows {}", rows(t))).unwrap_or_default()
            ),
            DataSource::Text { path, train, test } => format!(
                "{}: byte-level text {path:?}, train bytes {}{}",
                d.name,
                rows(train),
                test.as_ref().map(|t| format!(", test bytes {}", rows(t))).unwrap_or_default()
            ),
            DataSource::Synthetic { rows, features, classes, seed } => {
                format!("{}: synthetic, {rows} rows × {features} features, {classes} classes, seed {seed}", d.name)
            }
        },
    ));
    let t = &c.train;
    let length = match t.length {
        Length::Epochs(e) => format!("{e} epoch{}", if e == 1 { "" } else { "s" }),
        Length::Steps(s) => format!("{s} steps"),
    };
    let mut train = format!("batch {}, {length}, {}", t.batch, t.optimizer.describe());
    match t.lr_schedule {
        LrSchedule::Constant => {}
        LrSchedule::Warmup { steps } => train += &format!(", warmup {steps} steps"),
        LrSchedule::Cosine { warmup, min_lr } => train += &format!(", cosine (warmup {warmup}, min lr {min_lr})"),
    }
    if let Some(c) = t.clip_grad_norm {
        train += &format!(", clip grad norm {c}");
    }
    train += &format!(", seed {}{}", t.seed, if t.shuffle { "" } else { ", no shuffle" });
    out.push(("train".into(), train));
    out.push(("devices".into(), devices(c)));
    match &c.placement {
        Placement::Single => {
            out.push(("mesh".into(), "none".into()));
            out.push(("placement".into(), "single device".into()));
        }
        Placement::Auto { memory_per_device, objective } => {
            out.push(("mesh".into(), "chosen by auto".into()));
            let mem = memory_per_device.map(|m| format!("memory {} per device, ", bytes(m))).unwrap_or_default();
            let obj = match objective {
                Objective::StepTime => "step_time",
                Objective::Memory => "memory",
            };
            out.push(("placement".into(), format!("auto: {mem}optimize {obj}")));
        }
        Placement::Explicit(e) => {
            out.push(("mesh".into(), e.mesh.iter().map(|(a, s)| format!("{a} {s}")).collect::<Vec<_>>().join(" × ")));
            for line in explicit(c, e) {
                out.push(("placement".into(), line));
            }
        }
    }
    out
}

fn devices(c: &Checked) -> String {
    let mut groups: Vec<(DeviceKind, usize, Option<u64>)> = Vec::new();
    for d in &c.devices {
        match groups.last_mut() {
            Some((k, n, m)) if *k == d.kind && *m == d.memory => *n += 1,
            _ => groups.push((d.kind, 1, d.memory)),
        }
    }
    let first = c.devices.first().map(|d| d.name.as_str()).unwrap_or("");
    let last = c.devices.last().map(|d| d.name.as_str()).unwrap_or("");
    let names = if c.devices.len() > 1 { format!("{first}..{last}") } else { first.to_string() };
    let parts: Vec<String> = groups
        .iter()
        .map(|(k, n, m)| {
            let kind = if *k == DeviceKind::Cpu { "cpu" } else { "gpu" };
            format!("{n} × {kind}{}", m.map(|m| format!(" with {} each", bytes(m))).unwrap_or_default())
        })
        .collect();
    format!("{}: {names}", parts.join(" + "))
}

fn explicit(c: &Checked, e: &Explicit) -> Vec<String> {
    let m = &c.model;
    let mut lines = Vec::new();
    if let Some(a) = e.data_axis {
        let (name, size) = &e.mesh[a];
        lines.push(format!("data parallel over `{name}`: {size} replicas, {} samples each", split(c.train.batch, *size)));
    }
    // Shards of the elements of a `repeat` read as one line: `blocks[*].mlp.up.w`.
    let mut shard_lines: Vec<(String, usize)> = Vec::new();
    for s in &e.shards {
        let p = &m.params[s.param];
        let spec: Vec<&str> = s.spec.iter().map(|a| a.map(|a| e.mesh[a].0.as_str()).unwrap_or("_")).collect();
        let local: Vec<String> = p.ty.shape.iter().zip(&s.spec).map(|(d, a)| (d.size / a.map(|a| e.mesh[a].1).unwrap_or(1)).to_string()).collect();
        let path: Vec<String> =
            p.path.split('.').map(|seg| if seg.chars().all(|c| c.is_ascii_digit()) { "[*]".to_string() } else { format!(".{seg}") }).collect();
        let path = path.concat().trim_start_matches('.').replace(".[*]", "[*]");
        let line = format!("shard {path} ({}): {} → {}[{}] per device", spec.join(", "), p.ty, p.ty.dtype, local.join(", "));
        match shard_lines.iter_mut().find(|(l, _)| *l == line) {
            Some((_, n)) => *n += 1,
            None => shard_lines.push((line, 1)),
        }
    }
    for (line, n) in shard_lines {
        lines.push(if n > 1 { format!("{line} (×{n})") } else { line });
    }
    if let Some(p) = &e.pipeline {
        lines.push(format!("pipeline over `{}`: {} stages, {} microbatches, {}", e.mesh[p.axis].0, p.stages.len(), p.microbatches, p.schedule.name()));
        for (i, st) in p.stages.iter().enumerate() {
            lines.push(format!("  stage {i}: {}", st.iter().map(|u| m.unit_name(*u)).collect::<Vec<_>>().join(", ")));
        }
    }
    if let Some(d) = e.parameter_server {
        lines.push(format!("parameter server on {}", c.devices[d].name));
    }
    if lines.is_empty() {
        lines.push("replicated on every device".into());
    }
    lines
}

/// `64 / 3` as "21–22".
fn split(n: i64, k: i64) -> String {
    let (lo, hi) = (n / k, (n + k - 1) / k);
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}–{hi}")
    }
}

fn thousands(n: i64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn bytes(b: u64) -> String {
    shardplan_compiler::units::Bytes(b).to_string()
}
