//! Sharded model states (`zero 1`, `zero 2`, `zero 3`) and activation
//! recompute against one device: on 2, 4 and 8 CPU devices, alone and
//! combined with tensor and pipeline parallelism, 10 steps of the placed plan
//! and of one device side by side, every loss within 1e-5 relative and every
//! final parameter within 1e-4. Recompute is also checked to change nothing
//! at all: the same placement with and without it gives bit-identical losses,
//! parameters and optimizer states. And the memory each saves is what the
//! placement's memory plan says and what the executors allocate.

mod common;

use common::{root, tiny_gpt as gpt, TP_GPT};
use shardplan_compiler::partition::memory;
use shardplan_runtime::session::Config;

fn verify(name: &str, plan: &str) {
    let cmp = common::verify_text(plan, root(), &[]);
    assert_eq!(cmp.losses.len(), 10, "{name}: {cmp:?}");
    assert!(cmp.within(1e-5, 1e-4), "{name}: the placement does not match one device: {cmp:?}");
}

fn dp(k: usize, extra: &str) -> String {
    format!("placement {{\n  mesh (data: {k})\n  data_parallel over data\n  {extra}\n}}")
}

#[test]
fn zero_stages_match_one_device() {
    for k in [2, 4, 8] {
        for z in 1..=3 {
            verify(&format!("gpt_dp{k}_zero{z}"), &gpt(8, k, &dp(k, &format!("zero {z}"))));
        }
    }
    // Per layer path: FSDP for the blocks, ZeRO-1 for the embeddings and head.
    verify("gpt_dp4_zero1_fsdp_blocks", &gpt(8, 4, &dp(4, "zero 1\n  zero 3 blocks[*]")));
    // A batch that does not divide evenly, and parameters whose rows do not
    // divide evenly over 3 ranks either (64 rows, 256 columns).
    verify("gpt_dp3_zero3_uneven", &gpt(7, 3, &dp(3, "zero 3")));
}

#[test]
fn zero_combines_with_tensor_and_pipeline_parallelism() {
    // FSDP × TP, as torchtitan runs it.
    verify("gpt_dp2_tp2_zero3", &gpt(8, 4, &format!("placement {{\n  mesh (data: 2, model: 2)\n  data_parallel over data\n  {TP_GPT}\n  zero 3\n}}")));
    verify("gpt_dp4_tp2_zero3", &gpt(8, 8, &format!("placement {{\n  mesh (data: 4, model: 2)\n  data_parallel over data\n  {TP_GPT}\n  zero 3\n}}")));
    // ZeRO-1 × PP, as Megatron runs it; and ZeRO-2 and FSDP under a pipeline,
    // where each microbatch's gradient is scattered and summed into a slice.
    let stages = "pipeline over pipe {\n    stage embed, pos, blocks[0]\n    stage blocks[1], ln, head\n    microbatches 2\n    schedule 1f1b\n  }";
    for z in 1..=3 {
        verify(
            &format!("gpt_dp2_pp2_zero{z}"),
            &gpt(8, 4, &format!("placement {{\n  mesh (data: 2, pipe: 2)\n  data_parallel over data\n  zero {z}\n  {stages}\n}}")),
        );
    }
    verify(
        "gpt_dp2_tp2_pp2_zero1",
        &gpt(8, 8, &format!("placement {{\n  mesh (data: 2, model: 2, pipe: 2)\n  data_parallel over data\n  {TP_GPT}\n  zero 1\n  {stages}\n}}")),
    );
}

#[test]
fn zero_handles_tied_and_four_dimensional_parameters() {
    // The Llama example's embedding table is tied to its head: gathered for
    // both uses, its two gradients summed before they are scattered.
    let llama = std::fs::read_to_string(root().join("examples/llama.plan")).expect("example");
    let llama = llama.replace("batch: 16", "batch: 8").replace("seq: 64", "seq: 16");
    let llama = llama.replace("\"data/tiny_tokens.bin\"", &format!("{:?}", common::example_data("tiny_tokens.bin")));
    verify("llama_dp2_zero3", &llama.replace("devices cpu x 1", &format!("devices cpu x 2\n{}", dp(2, "zero 3"))));
    // Convolution kernels [out, in, kh, kw].
    let cnn = std::fs::read_to_string(root().join("examples/cnn_digits.plan")).expect("example");
    let cnn = cnn.replace("\"data/digits.csv\"", &format!("{:?}", common::example_data("digits.csv")));
    let head = cnn.split("devices cpu x 4").next().expect("devices line");
    verify("cnn_dp4_zero2", &format!("{head}devices cpu x 4\n{}", dp(4, "zero 2")));
}

/// Losses, parameters and optimizer states after 10 steps, as bits.
fn trained_bits(plan: &str) -> (Vec<u32>, Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut s = common::session(plan, root(), |_| {}, |_: &mut Config| {});
    let losses = common::train(&mut s, None);
    let (params, states) = s.parameters().unwrap_or_else(|e| panic!("{}: {e}", e.code()));
    let bits = |v: Vec<Vec<f32>>| v.into_iter().map(|t| t.into_iter().map(f32::to_bits).collect()).collect();
    (losses.into_iter().map(f32::to_bits).collect(), bits(params), bits(states))
}

#[test]
fn recompute_changes_no_bit() {
    let pp = "pipeline over pipe {\n    stage embed, pos, blocks[0]\n    stage blocks[1], ln, head\n    microbatches 2\n    schedule 1f1b\n  }";
    for (name, devices, placement) in [
        ("one", 1, "placement {\n  mesh (one: 1)\n  RECOMPUTE\n}".to_string()),
        ("dp2", 2, dp(2, "RECOMPUTE")),
        ("dp2_zero1", 2, dp(2, "zero 1\n  RECOMPUTE")),
        ("dp4_zero2", 4, dp(4, "zero 2\n  RECOMPUTE")),
        ("dp8_zero3", 8, dp(8, "zero 3\n  RECOMPUTE")),
        ("tp2", 2, format!("placement {{\n  mesh (model: 2)\n  {TP_GPT}\n  RECOMPUTE\n}}")),
        ("pp2", 2, format!("placement {{\n  mesh (pipe: 2)\n  {pp}\n  RECOMPUTE\n}}")),
        ("dp2_tp2_zero3", 4, format!("placement {{\n  mesh (data: 2, model: 2)\n  data_parallel over data\n  {TP_GPT}\n  zero 3\n  RECOMPUTE\n}}")),
    ] {
        let with = gpt(8, devices, &placement.replace("RECOMPUTE", "recompute blocks[*]"));
        let without = gpt(8, devices, &placement.replace("RECOMPUTE", ""));
        let (a, b) = (trained_bits(&with), trained_bits(&without));
        assert_eq!(a.0.len(), 10, "{name}");
        assert!(a == b, "{name}: recompute changed the run\nwith:    {:?}\nwithout: {:?}", a.0, b.0);
        if devices > 1 {
            verify(&format!("gpt_{name}_recompute"), &with);
        }
    }
}

/// A layer that draws a dropout mask inside a recomputed layer draws the
/// same mask again when it is recomputed.
#[test]
fn recompute_redraws_the_same_dropout_mask() {
    let plan = |recompute: &str| {
        common::digits_mlp(32, "adamw(lr: 0.01)", 2, &format!("placement {{\n  mesh (data: 2)\n  data_parallel over data\n  {recompute}\n}}"))
            .replace("model DigitsMlp {", "layer Dropped(a, b) {\n  layer fc = Linear(a, b)\n  forward(x) = dropout(relu(fc(x)), p: 0.3)\n}\nmodel DigitsMlp {")
            .replace("layer fc1 = Linear(64, 128)", "layer fc1 = Dropped(64, 128)")
            .replace("out(relu(fc2(relu(fc1(x)))))", "out(relu(fc2(fc1(x))))")
    };
    let (with, without) = (plan("recompute fc1"), plan(""));
    assert_ne!(with, without);
    assert!(trained_bits(&with) == trained_bits(&without), "recompute changed a run with dropout");
    verify("mlp_dropout_recompute", &with);
}

/// What each mode saves, from the memory plans of the representative devices.
fn planned(plan: &str) -> Vec<memory::Memory> {
    let (c, d) = shardplan_compiler::check_source(plan.as_bytes());
    let c = c.unwrap_or_else(|| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
    let compiled = shardplan_compiler::compile(&c, &Default::default()).unwrap_or_else(|d| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
    memory::plan(compiled.plan().expect("placed"))
}

#[test]
fn each_stage_shards_what_it_names() {
    let base = planned(&gpt(8, 4, &dp(4, "")));
    let z: Vec<Vec<memory::Memory>> = (1..=3).map(|z| planned(&gpt(8, 4, &dp(4, &format!("zero {z}"))))).collect();
    for d in 0..4 {
        let (b, z1, z2, z3) = (&base[d], &z[0][d], &z[1][d], &z[2][d]);
        // AdamW: two moments per parameter; every parameter of the tiny GPT
        // has a dim of at least 4 rows, so every state is sharded 4 ways.
        assert_eq!(b.optimizer, 2 * b.params);
        for m in [z1, z2, z3] {
            assert!(m.optimizer.abs_diff(b.optimizer / 4) <= 64, "device {d}: {} of {}", m.optimizer, b.optimizer);
        }
        assert_eq!((z1.params, z1.grads), (b.params, b.grads), "zero 1 keeps whole parameters and gradients");
        assert_eq!(z2.params, b.params, "zero 2 keeps whole parameters");
        assert!(z2.grads.abs_diff(b.grads / 4) <= 64, "zero 2 keeps a quarter of each gradient: {} of {}", z2.grads, b.grads);
        assert!(z3.params.abs_diff(b.params / 4) <= 64 && z3.grads.abs_diff(b.grads / 4) <= 64, "zero 3: {z3:?} against {b:?}");
        assert!(z3.total() < z2.total() && z2.total() < z1.total() && z1.total() < b.total(), "{b:?}\n{z1:?}\n{z2:?}\n{z3:?}");
    }
    // Recompute keeps fewer activations.
    let rc = planned(&gpt(8, 4, &dp(4, "zero 3\n  recompute blocks[*]")));
    assert!(rc[0].activations < z[2][0].activations, "{:?} against {:?}", rc[0], z[2][0]);
}

/// examples/fsdp.plan does not fit its devices without its `zero 3` line.
#[test]
fn the_fsdp_example_fits_only_when_sharded() {
    let text = std::fs::read_to_string(root().join("examples/fsdp.plan")).expect("example");
    let compile = |t: &str| {
        let (c, d) = shardplan_compiler::check_source(t.as_bytes());
        let c = c.unwrap_or_else(|| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        shardplan_compiler::compile(&c, &Default::default()).map(|_| ()).map_err(|d| d.iter().map(|d| d.code.to_string()).collect::<Vec<_>>())
    };
    assert_eq!(compile(&text), Ok(()));
    let line = text.lines().find(|l| l.trim_start().starts_with("zero 3")).expect("the sharding line");
    let unsharded = text.replace(line, "");
    assert_eq!(compile(&unsharded), Err(vec!["placement::out_of_memory".to_string()]));
    // And it trains as one device does (at a reduced size).
    let cmp = common::verify_text(&text, &root().join("examples"), &[("batch", 8), ("seq", 16)]);
    assert!(cmp.within(1e-5, 1e-4), "{cmp:?}");
}

/// A run saved under FSDP resumes under tensor parallelism, and the reverse:
/// checkpoints hold whole tensors whatever the placement.
#[test]
fn checkpoints_move_between_fsdp_and_tensor_parallelism() {
    use shardplan_runtime::session::Start;
    let one = gpt(8, 1, "");
    let fsdp = gpt(8, 4, &dp(4, "zero 3"));
    let zero1 = gpt(8, 2, &dp(2, "zero 1"));
    let tp = gpt(8, 2, &format!("placement {{\n  mesh (model: 2)\n  {TP_GPT}\n}}"));
    let full = common::train_text(&one, root(), |_| {}, None);
    assert_eq!(full.len(), 10);
    for (name, first, second) in [("fsdp_then_tp", &fsdp, &tp), ("tp_then_fsdp", &tp, &fsdp), ("zero1_then_fsdp", &zero1, &fsdp)] {
        let ck = common::scratch("sharded", &format!("{name}.safetensors"));
        let mut pieced = common::train_text(first, root(), |c| c.stop_after = Some(5), Some(&ck));
        pieced.extend(common::train_text(second, root(), |c| c.start = Start::Resume { path: ck.clone(), seed_given: false }, None));
        assert_eq!(pieced.len(), 10, "{name}");
        for (i, (a, b)) in full.iter().zip(&pieced).enumerate() {
            assert!(((a - b) / a).abs() < 1e-5, "{name}: step {}: {a} uninterrupted, {b} resumed under another placement", i + 1);
        }
    }
}

/// `placement auto` short of memory on a machine with cheap collectives
/// chooses FSDP for the blocks (ZeRO-1 for the rest), with recompute when
/// shorter still (see the planner's tests), and the plan it runs is that
/// placement, matching one device.
#[test]
fn automatic_fsdp_and_recompute_choices_run_as_one_device() {
    use shardplan_compiler::planner::Profile;
    use shardplan_runtime::session::{self, Backends};
    for (budget, recomputes) in [("9 MiB", false), ("5 MiB", true)] {
        let text = std::fs::read_to_string(root().join("examples/auto.plan")).expect("example").replace("memory 512 MiB per device", &format!("memory {budget} per device"));
        let (c, d) = shardplan_compiler::check_source(text.as_bytes());
        let c = c.unwrap_or_else(|| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        let fast = Profile { cores: 4, link_latency: 1e-6, ..Profile::default() };
        let compiled = shardplan_compiler::compile(&c, &shardplan_compiler::Options { profile: Some(fast.clone()), ..Default::default() }).expect("compiles");
        let shardplan_compiler::check::Placement::Explicit(e) = &compiled.checked.placement else { panic!("not placed") };
        let text_of = compiled.search.as_ref().map(|s| s.placement.clone()).unwrap_or_default();
        assert!(e.zero.contains(&3) && e.zero.contains(&1) && e.recompute.is_empty() != recomputes, "{text_of}");
        assert!(text_of.contains("zero 1\n") && text_of.contains("zero 3 blocks[*]"), "{text_of}");
        let limit: u64 = budget.trim_end_matches(" MiB").parse::<u64>().expect("MiB") << 20;
        let exact = memory::plan(compiled.plan().expect("placed")).iter().map(memory::Memory::total).max().unwrap_or(0);
        assert!(exact <= limit, "{exact}");
        let (mut one, mut placed) = session::side_by_side(&c, text.as_bytes(), &root().join("examples"), 10, 2, Backends::cpu(), Some(fast)).expect("sessions");
        let cmp = session::compare(&mut one, &mut placed, &mut |_, _, _| {}).expect("compare");
        assert!(cmp.within(1e-5, 1e-4), "{budget}: {cmp:?}");
    }
}
