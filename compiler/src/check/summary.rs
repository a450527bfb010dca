//! The one-screen summary of a checked plan: what `shardplan check` prints
//! for a plan without errors.
//!
//! Input: a [`Checked`] plan. Output: its summary as lines of (heading,
//! text): the model, its inputs and loss, the data, the train settings, the
//! devices, the mesh and the placement (a heading may repeat, one line per
//! part of the placement).
//!
//! Invariants: the lines depend only on the plan; sizes print through
//! [`Bytes`], counts with thousands separators; the shards of the elements
//! of a `repeat` read as one line (`blocks[*].mlp.up.w`, with their count).

use super::{Checked, Child, DataSource, DeviceKind, Explicit, Length, LrSchedule, Objective, Placement, RowRange};
use crate::units::Bytes;

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
            Bytes(m.param_bytes())
        ),
    ));
    out.push(("inputs".into(), m.inputs.iter().map(|i| format!("{}: {}", i.name, i.ty.bound())).collect::<Vec<_>>().join(", ")));
    if let Some(loss) = &m.loss {
        out.push(("loss".into(), loss.to_string()));
    }
    let d = &c.data;
    let rows = |r: &RowRange| format!("{}..{}", r.start, r.end.map(|e| e.to_string()).unwrap_or_default());
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
            DataSource::Tokens { path, bytes, train, test } => format!(
                "{}: token ids (uint{}) {path:?}, train tokens {}{}",
                d.name,
                *bytes as u32 * 8,
                rows(train),
                test.as_ref().map(|t| format!(", test tokens {}", rows(t))).unwrap_or_default()
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
            let mem = memory_per_device.map(|m| format!("memory {} per device, ", Bytes(m))).unwrap_or_default();
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
            format!("{n} × {kind}{}", m.map(|m| format!(" with {} each", Bytes(m))).unwrap_or_default())
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
    // ZeRO stages, by how many parameters take each.
    let data = e.data_axis.map(|a| e.mesh[a].0.clone()).unwrap_or_default();
    for z in 1..=3u8 {
        let n = e.zero.iter().filter(|x| **x == z).count();
        if n > 0 {
            let what = ["", "optimizer state", "optimizer state and gradients", "parameters, gradients and optimizer state"][z as usize];
            let fsdp = if z == 3 { " (FSDP)" } else { "" };
            lines.push(format!("zero {z}{fsdp}: the {what} of {n} of {} parameter tensors sharded over `{data}`", m.params.len()));
        }
    }
    let units = |us: &[crate::check::Unit]| super::placement::index_ranges(&us.iter().map(|u| m.unit_name(*u)).collect::<Vec<_>>()).join(", ");
    if !e.recompute.is_empty() {
        lines.push(format!("recompute: {}", units(&e.recompute)));
    }
    if !e.autocast.is_empty() {
        lines.push(format!("autocast bf16: {}", units(&e.autocast)));
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
