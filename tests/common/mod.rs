//! Helpers shared by the command-line tests.

#![allow(dead_code)]

use std::path::Path;

/// (step, loss as bits) of each line of a JSON-lines metrics file.
pub fn losses(path: &Path) -> Vec<(u64, u32)> {
    std::fs::read_to_string(path)
        .expect("metrics written")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            let loss = v["loss"].as_f64().expect("loss") as f32;
            (v["step"].as_u64().expect("step"), loss.to_bits())
        })
        .collect()
}

/// The placed plan `text` (data paths relative to `base`, with the dims of
/// `set` reduced as `verify --set` does) against one CPU device for 10
/// steps, through the library as `shardplan verify` runs it.
pub fn verify_text(text: &str, base: &Path, set: &[(&str, i64)]) -> shardplan_runtime::session::Comparison {
    use shardplan_runtime::session::{self, Backends};
    let overrides: std::collections::BTreeMap<String, i64> = set.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let (c, diags) = shardplan_compiler::check_source_resized(text.as_bytes(), &overrides);
    let c = c.unwrap_or_else(|| panic!("the plan does not check: {:?}", diags.iter().map(|d| &d.message).collect::<Vec<_>>()));
    let (mut one, mut placed) = session::side_by_side(&c, text.as_bytes(), base, 10, 2, Backends::cpu(), None).unwrap_or_else(|e| panic!("{}: {e}", e.code()));
    session::compare(&mut one, &mut placed, &mut |_, _, _| {}).unwrap_or_else(|e| panic!("{}: {e}", e.code()))
}

/// A training session of the plan `text` (data paths relative to `base`),
/// compiled through the driver as `shardplan run` compiles it, with `edit`
/// applied to the checked plan first (as `run --steps` and `--seed` change
/// it) and `configure` to the session's settings (2 kernel threads, CPU).
pub fn session(
    text: &str,
    base: &Path,
    edit: impl FnOnce(&mut shardplan_compiler::Checked),
    configure: impl FnOnce(&mut shardplan_runtime::session::Config),
) -> shardplan_runtime::session::Session {
    use shardplan_runtime::session::{Backends, Config, Session};
    let (c, diags) = shardplan_compiler::check_source(text.as_bytes());
    let mut c = c.unwrap_or_else(|| panic!("the plan does not check: {:?}", diags.iter().map(|d| &d.message).collect::<Vec<_>>()));
    edit(&mut c);
    let compiled = shardplan_compiler::compile(&c, &Default::default()).unwrap_or_else(|d| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
    let mut cfg = Config::new(2, Backends::cpu());
    configure(&mut cfg);
    Session::new(compiled, text.as_bytes(), base, cfg).unwrap_or_else(|e| panic!("{}: {e}", e.code()))
}

/// The losses of training `s` to its end; then saves it to `save`, when given.
pub fn train(s: &mut shardplan_runtime::session::Session, save: Option<&Path>) -> Vec<f32> {
    let mut losses = Vec::new();
    s.train(&mut |r| losses.push(r.loss)).unwrap_or_else(|e| panic!("{}: {e}", e.code()));
    if let Some(p) = save {
        s.save(p).unwrap_or_else(|e| panic!("{}: {e}", e.code()));
    }
    losses
}

/// The losses of training the plan `text` (data paths relative to `base`)
/// through the library, with `configure` applied to the session's settings.
pub fn train_text(text: &str, base: &Path, configure: impl FnOnce(&mut shardplan_runtime::session::Config), save: Option<&Path>) -> Vec<f32> {
    train(&mut session(text, base, |_| {}, configure), save)
}
