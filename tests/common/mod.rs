//! Helpers shared by the command-line tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root (the root crate's manifest directory).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `name` in this test binary's scratch folder `shardplan-GROUP-PID` under the temp dir.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shardplan-{group}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.join(name)
}

/// The absolute path of `examples/data/FILE`.
pub fn example_data(file: &str) -> String {
    root().join("examples/data").join(file).display().to_string()
}

/// Megatron tensor parallelism of the digits MLP's first two layers over `model`.
pub const TP_MLP: &str = "shard fc1.w (_, model)\n  shard fc1.b (model)\n  shard fc2.w (model, _)";

/// A small GPT (2 blocks of width 32, 4 heads) trained with AdamW.
pub fn tiny_gpt(batch: usize, devices: usize, placement: &str) -> String {
    format!(
        r#"model TinyGpt {{
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(256, 32)
  layer pos = PositionalEmbedding(seq, 32)
  layer blocks = repeat 2 Block(32, 4)
  layer ln = LayerNorm(32)
  layer head = Linear(32, 256)
  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets)
}}
data corpus = text("{}", train: 0..30000, test: 30000..31000)
train {{
  model: TinyGpt
  data: corpus
  batch: {batch}
  seq: 16
  steps: 10
  optimizer: adamw(lr: 0.003, weight_decay: 0.01)
  clip_grad_norm: 1.0
  seed: 1
}}
devices cpu x {devices}
{placement}
"#,
        example_data("tiny.txt")
    )
}

/// Megatron tensor parallelism of the tiny GPT's blocks over `model`.
pub const TP_GPT: &str = "shard blocks[*].attn.wq (_, model)\n  shard blocks[*].attn.wk (_, model)\n  shard blocks[*].attn.wv (_, model)\n  shard blocks[*].attn.wo (model, _)\n  shard blocks[*].mlp.up.w (_, model)\n  shard blocks[*].mlp.up.b (model)\n  shard blocks[*].mlp.down.w (model, _)";

/// The digits MLP (64 → 128 → 64 → 10) with `batch`, `optimizer`, `devices`
/// and `placement`; 10 steps, gradients clipped to 1, seed 7.
pub fn digits_mlp(batch: usize, optimizer: &str, devices: usize, placement: &str) -> String {
    format!(
        r#"model DigitsMlp {{
  input x: f32[batch, 64]
  input label: i32[batch]
  layer fc1 = Linear(64, 128)
  layer fc2 = Linear(128, 64)
  layer out = Linear(64, 10)
  loss cross_entropy(out(relu(fc2(relu(fc1(x))))), label)
}}
data digits = csv("{}", label: "label", scale: 1/16, train: 0..1500, test: 1500..)
train {{
  model: DigitsMlp
  data: digits
  batch: {batch}
  steps: 10
  optimizer: {optimizer}
  clip_grad_norm: 1.0
  seed: 7
}}
devices cpu x {devices}
{placement}
"#,
        example_data("digits.csv")
    )
}

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
