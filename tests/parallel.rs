//! Every placement against one device: for each strategy and combination, on
//! 2, 4 and 8 CPU devices, the training session (as `shardplan verify` runs
//! it) trains 10 steps of the placed
//! plan and of one device side by side and fails unless every step's loss
//! agrees within 1e-5 relative and every final parameter within 1e-4
//! (‖a − b‖ / ‖a‖). Also: placed runs are bit-identical, a run resumes under
//! another placement, and an injected fault stops the run quickly.

mod common;

use shardplan_runtime::session::{Config, Start};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{example_data as data, root, tiny_gpt as gpt, TP_GPT, TP_MLP};

fn tmp(name: &str) -> PathBuf {
    common::scratch("parallel", name)
}

/// The digits MLP (64 → 128 → 64 → 10) with `batch`, `devices` and `placement`.
fn mlp(batch: usize, devices: usize, placement: &str) -> String {
    common::digits_mlp(batch, "sgd(lr: 0.1, momentum: 0.9)", devices, placement)
}

/// `plan` placed against one device, for ten steps: losses within 1e-5,
/// parameters within 1e-4 (`shardplan verify`'s defaults).
fn verify(name: &str, plan: &str) {
    verify_set(name, plan, root(), &[]);
}

fn verify_set(name: &str, plan: &str, base: &Path, set: &[(&str, i64)]) {
    let cmp = common::verify_text(plan, base, set);
    assert_eq!(cmp.losses.len(), 10, "{name}: {cmp:?}");
    assert!(cmp.within(1e-5, 1e-4), "{name}: the placement does not match one device: {cmp:?}");
}

#[test]
fn data_parallel_matches_one_device() {
    for n in [2, 4, 8] {
        verify(&format!("mlp_dp{n}"), &mlp(64, n, &format!("placement {{\n  mesh (data: {n})\n  data_parallel over data\n}}")));
    }
    // 63 rows over 4 replicas: 16, 16, 16, 15.
    verify("mlp_dp4_uneven", &mlp(63, 4, "placement {\n  mesh (data: 4)\n  data_parallel over data\n}"));
    verify("gpt_dp2", &gpt(8, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}"));
}

#[test]
fn tensor_parallel_matches_one_device() {
    verify("mlp_tp2", &mlp(64, 2, &format!("placement {{\n  mesh (model: 2)\n  {TP_MLP}\n}}")));
    verify("mlp_tp4", &mlp(64, 4, &format!("placement {{\n  mesh (model: 4)\n  {TP_MLP}\n}}")));
    verify("mlp_tp8", &mlp(64, 8, &format!("placement {{\n  mesh (model: 8)\n  {TP_MLP}\n}}")));
    verify("gpt_tp2", &gpt(4, 2, &format!("placement {{\n  mesh (model: 2)\n  {TP_GPT}\n}}")));
    verify("gpt_tp4", &gpt(4, 4, &format!("placement {{\n  mesh (model: 4)\n  {TP_GPT}\n}}")));
    // Embedding tables split along their width: the lookups come out split and are all-gathered.
    let tables = "shard embed.table (_, model)\n  shard pos.table (_, model)";
    verify("gpt_tp2_tables", &gpt(4, 2, &format!("placement {{\n  mesh (model: 2)\n  {TP_GPT}\n  {tables}\n}}")));
}

#[test]
fn pipelines_match_one_device() {
    // Uneven stages: two layers, then one.
    verify(
        "mlp_pp2_gpipe",
        &mlp(64, 2, "placement {\n  mesh (pipe: 2)\n  pipeline over pipe {\n    stage fc1, fc2\n    stage out\n    microbatches 4\n    schedule gpipe\n  }\n}"),
    );
    verify(
        "mlp_pp3_1f1b",
        &mlp(
            64,
            3,
            "placement {\n  mesh (pipe: 3)\n  pipeline over pipe {\n    stage fc1\n    stage fc2\n    stage out\n    microbatches 8\n    schedule 1f1b\n  }\n}",
        ),
    );
    verify(
        "gpt_pp2_1f1b",
        &gpt(8, 2, "placement {\n  mesh (pipe: 2)\n  pipeline over pipe {\n    stage embed, pos, blocks[0]\n    stage blocks[1], ln, head\n    microbatches 4\n    schedule 1f1b\n  }\n}"),
    );
    verify(
        "gpt_pp4_gpipe",
        &gpt(8, 4, "placement {\n  mesh (pipe: 4)\n  pipeline over pipe {\n    stage embed, pos\n    stage blocks[0]\n    stage blocks[1]\n    stage ln, head\n    microbatches 2\n    schedule gpipe\n  }\n}"),
    );
}

#[test]
fn parameter_servers_match_one_device() {
    verify("mlp_ps8", &mlp(64, 8, "placement {\n  mesh (data: 8)\n  data_parallel over data\n  parameter_server on cpu3\n}"));
    verify("mlp_ps4", &mlp(64, 4, "placement {\n  mesh (data: 4)\n  data_parallel over data\n  parameter_server on cpu0\n}"));
    // The server need not be the first worker.
    verify("mlp_ps2_last", &mlp(63, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n  parameter_server on cpu1\n}"));
}

#[test]
fn combinations_match_one_device() {
    verify("mlp_dp2_tp2", &mlp(64, 4, &format!("placement {{\n  mesh (data: 2, model: 2)\n  data_parallel over data\n  {TP_MLP}\n}}")));
    verify(
        "mlp_dp2_pp2",
        &mlp(64, 4, "placement {\n  mesh (data: 2, pipe: 2)\n  data_parallel over data\n  pipeline over pipe {\n    stage fc1\n    stage fc2, out\n    microbatches 4\n    schedule 1f1b\n  }\n}"),
    );
    verify(
        "gpt_dp2_tp2_pp2",
        &gpt(
            8,
            8,
            &format!("placement {{\n  mesh (data: 2, model: 2, pipe: 2)\n  data_parallel over data\n  {TP_GPT}\n  pipeline over pipe {{\n    stage embed, pos, blocks[0]\n    stage blocks[1], ln, head\n    microbatches 2\n    schedule gpipe\n  }}\n}}"),
        ),
    );
}

#[test]
fn examples_match_one_device() {
    // The tiny GPT examples at a reduced size (`--set`), the others whole.
    for (e, set) in [
        ("data_parallel", vec![]),
        ("tensor_parallel", vec![]),
        ("parameter_server", vec![]),
        ("pipeline_1f1b", vec![("batch", 8), ("seq", 16)]),
        ("data_tensor_pipeline", vec![("batch", 8), ("seq", 16)]),
        ("llama_3d", vec![("batch", 8), ("seq", 16)]),
        ("cnn_digits", vec![]),
    ] {
        let text = std::fs::read_to_string(root().join(format!("examples/{e}.plan"))).expect("example");
        verify_set(e, &text, &root().join("examples"), &set);
    }
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan")).arg("run").arg("--quiet").args(args).current_dir(root()).output().expect("runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn placed_runs_are_bit_identical() {
    let plan = gpt(8, 8, &format!("placement {{\n  mesh (data: 2, model: 2, pipe: 2)\n  data_parallel over data\n  {TP_GPT}\n  pipeline over pipe {{\n    stage embed, pos, blocks[0]\n    stage blocks[1], ln, head\n    microbatches 2\n    schedule 1f1b\n  }}\n}}"));
    let six = |c: &mut Config| c.stop_after = Some(6);
    let (la, lb) = (common::train_text(&plan, root(), six, None), common::train_text(&plan, root(), six, None));
    assert_eq!(la.len(), 6);
    assert_eq!(la.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), lb.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
}

#[test]
fn a_run_resumes_under_another_placement() {
    // Uninterrupted on one device; stopped after 5 steps under data
    // parallelism; resumed for the last 5 under tensor parallelism.
    let one = mlp(64, 1, "");
    let dp = mlp(64, 4, "placement {\n  mesh (data: 4)\n  data_parallel over data\n}");
    let tp = mlp(64, 2, &format!("placement {{\n  mesh (model: 2)\n  {TP_MLP}\n}}"));
    let ck = tmp("mid.safetensors");
    let full = common::train_text(&one, root(), |_| {}, None);
    let mut pieced = common::train_text(&dp, root(), |c| c.stop_after = Some(5), Some(&ck));
    pieced.extend(common::train_text(&tp, root(), |c| c.start = Start::Resume { path: ck.clone(), seed_given: false }, None));
    assert_eq!(full.len(), 10);
    assert_eq!(pieced.len(), 10);
    for (i, (a, b)) in full.iter().zip(&pieced).enumerate() {
        assert!(((a - b) / a).abs() < 1e-5, "step {}: {a} uninterrupted, {b} resumed under another placement", i + 1);
    }
}

#[test]
fn an_injected_fault_stops_every_device_quickly() {
    let start = Instant::now();
    let (ok, _, err) = run(&["examples/data_tensor_pipeline.plan", "--steps", "20", "--inject-fault", "device=5,step=3"]);
    let took = start.elapsed().as_secs_f64();
    assert!(!ok);
    assert!(err.contains("device 5 failed at step 3: injected fault"), "{err}");
    assert!(err.contains("run::device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(took < 10.0, "took {took:.1} s");
}

fn inspect_json(path: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan")).args(["inspect", "--format", "json"]).arg(path).current_dir(root()).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn megatron_pairs_need_one_all_reduce_each_way() {
    // Two blocks, each with an attention pair and an MLP pair: 2 × 2 pairs,
    // one all-reduce of the activations [4, 16, 32] forward and one backward.
    let path = tmp("gpt_tp2_count.plan");
    std::fs::write(&path, gpt(4, 2, &format!("placement {{\n  mesh (model: 2)\n  {TP_GPT}\n}}"))).expect("write");
    let v = inspect_json(&path);
    for d in v["devices"].as_array().expect("devices") {
        let colls = d["collectives"].as_array().expect("collectives");
        let activation = colls.iter().filter(|c| c[0] == "all-reduce(model)" && c[1] == 4 * 16 * 32 * 4).count();
        assert_eq!(activation, 8, "{d}");
        // Besides those, only the gradient norm's partial sum (one scalar).
        assert_eq!(colls.len(), 9, "{d}");
    }
}

#[test]
fn data_parallel_gradients_travel_in_buckets() {
    let path = tmp("gpt_dp2_buckets.plan");
    std::fs::write(&path, gpt(8, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}")).expect("write");
    let v = inspect_json(&path);
    for d in v["devices"].as_array().expect("devices") {
        let colls = d["collectives"].as_array().expect("collectives");
        // Every gradient (all 30 tensors) in one all-reduce.
        assert_eq!(colls.len(), 1, "{d}");
        assert_eq!(colls[0][1], d["param_bytes"], "{d}");
        assert_eq!(d["grad_bytes"], d["param_bytes"], "{d}");
    }
}

#[test]
fn the_pipeline_timeline_is_stable() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan")).args(["inspect", "examples/pipeline_1f1b.plan"]).current_dir(root()).output().expect("runs");
    assert!(out.status.success());
    insta::assert_snapshot!(String::from_utf8_lossy(&out.stdout));
}

/// A model where a row-parallel result meets a column-parallel one (a
/// reduce-scatter), and one where a value split by rows meets its transpose
/// (an all-to-all).
fn custom(model: &str, shards: &str) -> String {
    format!(
        r#"layer Proj(i, o) {{
  param w: f32[i, o] = glorot_uniform
  forward(x) = x @ w
}}
{model}
data digits = csv("{}", label: "label", scale: 1/16, train: 0..1500, test: 1500..)
train {{
  model: Net
  data: digits
  batch: 32
  steps: 10
  optimizer: adam(lr: 0.01)
  seed: 5
}}
devices cpu x 2
placement {{
  mesh (model: 2)
  {shards}
}}
"#,
        data("digits.csv")
    )
}

#[test]
fn reduce_scatter_and_all_to_all_match_one_device() {
    let rs = custom(
        "model Net {\n  input x: f32[batch, 64]\n  input label: i32[batch]\n  layer a = Proj(64, 128)\n  layer b = Proj(64, 128)\n  layer c = Proj(128, 128)\n  layer out = Linear(128, 10)\n  loss cross_entropy(out(relu(a(x) + c(relu(b(x))))), label)\n}",
        "shard a.w (_, model)\n  shard b.w (_, model)\n  shard c.w (model, _)",
    );
    let a2a = custom(
        "model Net {\n  input x: f32[batch, 64]\n  input label: i32[batch]\n  layer a = Proj(64, 128)\n  layer b = Proj(64, 128)\n  layer out = Linear(128, 10)\n  loss cross_entropy(out(relu(a(x) @ ((transpose(a(x)) @ b(x)) / 64 + transpose((transpose(a(x)) @ b(x)) / 64)))), label)\n}",
        "shard a.w (_, model)\n  shard b.w (_, model)",
    );
    for (name, plan, kind) in [("rs", rs, "reduce-scatter(model)"), ("a2a", a2a, "all-to-all(model)")] {
        verify(name, &plan);
        let path = tmp(&format!("{name}.plan"));
        std::fs::write(&path, &plan).expect("write plan");
        let v = inspect_json(&path);
        let used = v["devices"][0]["collectives"].as_array().expect("collectives").iter().any(|c| c[0] == kind);
        assert!(used, "{name}: no {kind} in {}", v["devices"][0]["collectives"]);
    }
}

#[test]
fn a_plan_that_does_not_fit_is_rejected_before_running() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["--color", "never", "run", "--quiet", "tests/plans/too_small.plan"])
        .current_dir(root())
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "it trained: {}", String::from_utf8_lossy(&out.stdout));
    insta::assert_snapshot!(String::from_utf8_lossy(&out.stderr));
}

#[test]
fn inspect_rejects_a_plan_that_does_not_fit() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["--color", "never", "inspect", "tests/plans/too_small.plan"])
        .current_dir(root())
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("placement::out_of_memory"), "{stderr}");
}

/// A byte-level model of RMSNorm, grouped-query attention (4 heads, 2 for
/// keys and values) and a SwiGLU MLP: the Llama layers built so far.
fn gated(batch: usize, devices: usize, placement: &str) -> String {
    format!(
        r#"model Gated {{
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(256, 32)
  layer norm = RMSNorm(32)
  layer attn = GroupedAttention(32, 4, 2)
  layer mlp = SwiGLU(32, 64)
  layer head = Linear(32, 256)
  loss cross_entropy(head(mlp(norm(embed(tokens) + attn(norm(embed(tokens)))))), targets)
}}
data corpus = text("{}", train: 0..30000, test: 30000..31000)
train {{
  model: Gated
  data: corpus
  batch: {batch}
  seq: 16
  steps: 10
  optimizer: adamw(lr: 0.003)
  seed: 5
}}
devices cpu x {devices}
{placement}
"#,
        data("tiny.txt")
    )
}

#[test]
fn llama_layers_placements_match_one_device() {
    verify("gated_dp2", &gated(8, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}"));
    // Megatron pairs: the attention's key/value heads split with their query groups.
    let tp = "shard attn.wq (_, model)\n  shard attn.wk (_, model)\n  shard attn.wv (_, model)\n  shard attn.wo (model, _)\n  shard mlp.gate (_, model)\n  shard mlp.up (_, model)\n  shard mlp.down (model, _)";
    verify("gated_tp2", &gated(8, 2, &format!("placement {{\n  mesh (model: 2)\n  {tp}\n}}")));
    verify("gated_pp2", &gated(8, 2, "placement {\n  mesh (pipe: 2)\n  pipeline over pipe {\n    stage embed, norm, attn\n    stage mlp, head\n    microbatches 2\n    schedule 1f1b\n  }\n}"));
    verify("gated_dp2_tp2", &gated(8, 4, &format!("placement {{\n  mesh (data: 2, model: 2)\n  data_parallel over data\n  {tp}\n}}")));
}

/// examples/llama.plan (rotary grouped-query attention, RMSNorm, SwiGLU, tied
/// embeddings) with four blocks, on `devices` under `placement`, batch 8 of
/// 16 tokens.
fn llama(devices: usize, placement: &str) -> String {
    let text = std::fs::read_to_string(root().join("examples/llama.plan")).expect("example");
    let text = text.replace("repeat 2 LlamaBlock", "repeat 4 LlamaBlock").replace("batch: 16", "batch: 8").replace("seq: 64", "seq: 16");
    let text = text.replace("\"data/tiny_tokens.bin\"", &format!("{:?}", common::example_data("tiny_tokens.bin")));
    text.replace("devices cpu x 1", &format!("devices cpu x {devices}\n{placement}"))
}

#[test]
fn llama_placements_match_one_device() {
    let tp = "shard blocks[*].attn.wq (_, model)\n  shard blocks[*].attn.wk (_, model)\n  shard blocks[*].attn.wv (_, model)\n  shard blocks[*].attn.wo (model, _)\n  shard blocks[*].mlp.gate (_, model)\n  shard blocks[*].mlp.up (_, model)\n  shard blocks[*].mlp.down (model, _)";
    verify("llama_dp2", &llama(2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}"));
    // 2 key/value heads over 2 devices: one each, with its two query heads.
    verify("llama_tp2", &llama(2, &format!("placement {{\n  mesh (model: 2)\n  {tp}\n}}")));
    // The tied table split along its width too: the lookup comes out split, the head reads it transposed.
    verify("llama_tp2_table", &llama(2, &format!("placement {{\n  mesh (model: 2)\n  {tp}\n  shard embed.table (_, model)\n}}")));
    // With data parallelism too: 2 × 2.
    verify("llama_dp2_tp2", &llama(4, &format!("placement {{\n  mesh (data: 2, model: 2)\n  data_parallel over data\n  {tp}\n}}")));
    // The tied embedding table serves stage 0's lookup and stage 1's head.
    verify(
        "llama_pp2_tied",
        &llama(2, "placement {\n  mesh (pipe: 2)\n  pipeline over pipe {\n    stage embed, blocks[0..2]\n    stage blocks[2..4], norm\n    microbatches 2\n    schedule 1f1b\n  }\n}"),
    );
}

/// examples/cnn_digits.plan (convolutions, a residual block, max and average
/// pooling) on `devices` under `placement`.
fn cnn(devices: usize, placement: &str) -> String {
    let text = std::fs::read_to_string(root().join("examples/cnn_digits.plan")).expect("example");
    let text = text.replace("\"data/digits.csv\"", &format!("{:?}", common::example_data("digits.csv")));
    let head = text.split("devices cpu x 4").next().expect("devices line");
    format!("{head}devices cpu x {devices}\n{placement}")
}

#[test]
fn cnn_placements_match_one_device() {
    verify("cnn_dp2", &cnn(2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}"));
    let stages = "pipeline over pipe {\n    stage conv1, pool1, res\n    stage conv2, pool2, out\n    microbatches 4\n    schedule 1f1b\n  }";
    verify("cnn_pp2", &cnn(2, &format!("placement {{\n  mesh (pipe: 2)\n  {stages}\n}}")));
    verify("cnn_dp2_pp2", &cnn(4, &format!("placement {{\n  mesh (data: 2, pipe: 2)\n  data_parallel over data\n  {stages}\n}}")));
}

#[test]
fn dropout_placements_match_one_device() {
    // Dropout after the embedding and before the head: each sample's mask
    // comes from its index in the data set, so every split draws the same.
    let with_dropout = |plan: String| {
        let out = plan.replace("norm(blocks(embed(tokens)))", "dropout(norm(blocks(dropout(embed(tokens), p: 0.2))), p: 0.1)");
        assert_ne!(out, plan, "the loss line changed");
        out
    };
    let tp =
        "shard blocks[*].attn.wq (_, model)\n  shard blocks[*].attn.wk (_, model)\n  shard blocks[*].attn.wv (_, model)\n  shard blocks[*].attn.wo (model, _)";
    verify("dropout_dp2", &with_dropout(llama(2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}")));
    verify("dropout_tp2", &with_dropout(llama(2, &format!("placement {{\n  mesh (model: 2)\n  {tp}\n}}"))));
    verify(
        "dropout_dp2_pp2",
        &with_dropout(llama(
            4,
            "placement {\n  mesh (data: 2, pipe: 2)\n  data_parallel over data\n  pipeline over pipe {\n    stage embed, blocks[0..2]\n    stage blocks[2..4], norm\n    microbatches 2\n    schedule gpipe\n  }\n}",
        )),
    );
    // And the training differs from the run without dropout.
    let plain = common::verify_text(&llama(1, ""), root(), &[]);
    let dropped = common::verify_text(&with_dropout(llama(1, "")), root(), &[]);
    assert!(plain.losses[1..].iter().zip(&dropped.losses[1..]).all(|(a, b)| a != b), "{plain:?}\n{dropped:?}");
}

/// Under a pipeline the tied embedding table has a copy on each stage that
/// reads it, kept equal by summing both stages' gradients (were the last
/// stage's copy to drift, its head would, and `llama_pp2_tied` above would
/// not match one device); a run saved under the pipeline resumes on one
/// device as if never split.
#[test]
fn tied_copies_stay_equal_and_resume_on_one_device() {
    let ten = |t: String| t.replace("steps: 300", "steps: 10");
    let pp = ten(llama(2, "placement {\n  mesh (pipe: 2)\n  pipeline over pipe {\n    stage embed, blocks[0..2]\n    stage blocks[2..4], norm\n    microbatches 2\n    schedule 1f1b\n  }\n}"));
    let one = ten(llama(1, ""));
    // Both stages hold embed.table (parameter 0).
    let (c, d) = shardplan_compiler::check_source(pp.as_bytes());
    let c = c.unwrap_or_else(|| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
    let compiled = shardplan_compiler::compile(&c, &Default::default()).expect("compiles");
    let shardplan_compiler::Target::Placed(plan) = &compiled.target else { panic!("not placed") };
    assert_eq!(plan.holders(0), vec![0, 1], "the table's copies");
    let ck = tmp("tied.safetensors");
    let full = common::train_text(&one, root(), |_| {}, None);
    let mut pieced = common::train_text(&pp, root(), |c| c.stop_after = Some(5), Some(&ck));
    pieced.extend(common::train_text(&one, root(), |c| c.start = Start::Resume { path: ck.clone(), seed_given: false }, None));
    assert_eq!((full.len(), pieced.len()), (10, 10));
    for (i, (a, b)) in full.iter().zip(&pieced).enumerate() {
        assert!(((a - b) / a).abs() < 1e-5, "step {}: {a} on one device, {b} resumed from the pipeline", i + 1);
    }
}
