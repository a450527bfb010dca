//! `placement auto`: the search is deterministic, never picks a plan that
//! does not fit, and moves from data parallelism to sharded or pipelined
//! plans as the memory budget shrinks.

mod common;

use shardplan_compiler::planner::{self, search, Profile};
use shardplan_compiler::{compile, Checked, Options};

fn plan(budget: &str) -> String {
    std::fs::read_to_string("../examples/auto.plan").unwrap().replace("memory 512 MiB per device", &format!("memory {budget} per device"))
}

/// A machine with a core per device, so devices do not take turns.
fn profile() -> Profile {
    Profile { cores: 4, ..Profile::default() }
}

/// The planner's search as the driver runs it for `c`, with `profile`.
fn searched(c: &Checked, profile: Profile) -> planner::Search {
    common::compiled(c, &Options { profile: Some(profile), ..Default::default() }).search.expect("placement auto is searched")
}

fn chosen(budget: &str) -> (usize, usize, usize, u64) {
    let c = common::checked(&plan(budget));
    let s = searched(&c, profile());
    let i = s.chosen.unwrap_or_else(|| panic!("nothing fits {budget}"));
    let best = &s.candidates[i];
    (best.data, best.model, best.pipe, best.exact_memory.expect("checked exactly"))
}

#[test]
fn a_shrinking_budget_moves_from_data_parallel_to_sharded_or_pipelined() {
    let (d, t, p, _) = chosen("512 MiB");
    assert_eq!((d, t, p), (4, 1, 1), "with memory to spare, pure data parallelism");
    let (d, t, p, mem) = chosen("9 MiB");
    assert!(t > 1 || p > 1, "at 9 MiB: data {d} tensor {t} pipe {p}");
    assert!(mem <= 9 << 20, "{mem}");
}

/// The order an expert would take as memory runs short, on a machine whose
/// collectives cost little (1 µs a message): shard the optimizer state
/// (ZeRO-1, which also splits the update's work), then the gradients too
/// (ZeRO-2), then the blocks' parameters (FSDP per layer group), then
/// recompute activations as well, and only then cut the model into a
/// pipeline. Every
/// choice fits by its exact memory plan.
#[test]
fn zero_and_recompute_come_before_a_pipeline_when_they_are_faster() {
    let fast = Profile { link_latency: 1e-6, ..profile() };
    let pick = |budget: &str| {
        let s = searched(&common::checked(&plan(budget)), fast.clone());
        let best = s.candidates[s.chosen.unwrap_or_else(|| panic!("nothing fits {budget}"))].clone();
        let limit: u64 = budget.trim_end_matches(" MiB").parse::<u64>().expect("MiB") << 20;
        assert!(best.exact_memory.expect("checked") <= limit, "{budget}: {}", best.name());
        (best.data, best.model, best.pipe, (best.zero, best.zero_rest), best.recompute)
    };
    assert_eq!(pick("512 MiB"), (4, 1, 1, (0, 0), false), "data parallelism");
    assert_eq!(pick("13 MiB"), (4, 1, 1, (1, 1), false), "ZeRO-1");
    assert_eq!(pick("10 MiB"), (4, 1, 1, (2, 2), false), "ZeRO-2");
    assert_eq!(pick("9 MiB"), (4, 1, 1, (3, 1), false), "FSDP for the blocks, ZeRO-1 for the embeddings and head");
    assert_eq!(pick("7 MiB"), (4, 1, 1, (1, 1), true), "ZeRO-1 and recompute");
    assert_eq!(pick("5 MiB"), (4, 1, 1, (3, 1), true), "FSDP for the blocks and recompute");
    let (_, _, p, _, _) = pick("3 MiB");
    assert!(p > 1, "below what sharding and recompute save, a pipeline");
}

#[test]
fn the_choice_always_fits_and_is_deterministic() {
    for budget in ["512 MiB", "40 MiB", "30 MiB", "20 MiB", "16 MiB", "12 MiB"] {
        let a = chosen(budget);
        let b = chosen(budget);
        assert_eq!(a, b, "{budget}");
        let limit: u64 = budget.trim_end_matches(" MiB").parse::<u64>().unwrap() << 20;
        assert!(a.3 <= limit, "{budget}: chose {a:?}");
    }
}

#[test]
fn nothing_fits_a_tiny_budget() {
    let c = common::checked(&plan("1 MiB"));
    let e = compile(&c, &Options { profile: Some(profile()), ..Default::default() }).expect_err("nothing fits");
    assert!(e.iter().any(|d| d.code == "placement::no_fit"), "{e:?}");
    // The search itself, on the training graph the driver builds.
    let s = search(&c, &common::training_graph(&c), &profile());
    assert_eq!(s.chosen, None);
    assert!(!s.candidates.is_empty());
}

/// The tiny GPT with a 16384-entry token table (4 MiB, 16 MiB with its
/// gradient and Adam's moments).
fn big_vocab(budget: &str) -> planner::Search {
    let src = plan(budget).replace("Embedding(256, 64)", "Embedding(16384, 64)");
    searched(&common::checked(&src), profile())
}

#[test]
fn a_large_embedding_table_is_sharded_when_memory_is_short() {
    let s = big_vocab("512 MiB");
    let best = &s.candidates[s.chosen.expect("fits")];
    assert!(!best.sharded_embeddings, "with memory to spare the table stays whole: {}", best.name());
    assert_eq!((best.zero, best.recompute), (0, false), "{}", best.name());
    // Short of memory, the table is divided: its optimizer state over the
    // data axis, then its width over the tensor axis too.
    let s = big_vocab("40 MiB");
    let best = &s.candidates[s.chosen.expect("fits")];
    assert!(best.zero > 0 || best.sharded_embeddings, "at 40 MiB: {}", best.name());
    let s = big_vocab("30 MiB");
    let best = &s.candidates[s.chosen.expect("fits")];
    assert!(best.sharded_embeddings && best.model > 1, "at 30 MiB: {}", best.name());
    assert!(best.exact_memory.expect("checked") <= 30 << 20);
    assert!(s.placement.contains("shard embed.table (_, model)"), "{}", s.placement);
}

#[test]
fn pipelines_weigh_gpipe_against_1f1b() {
    let c = common::checked(&plan("512 MiB"));
    // With instant transfers the two schedules differ in memory only.
    let instant = Profile { link_latency: 0.0, link_bytes: 1e30, ..profile() };
    let twins = |s: &planner::Search| {
        let piped: Vec<planner::Candidate> = s.candidates.iter().filter(|c| c.pipe > 1).cloned().collect();
        assert!(!piped.is_empty());
        piped
            .iter()
            .filter(|c| c.schedule == "1f1b")
            .map(|a| {
                let twin = piped
                    .iter()
                    .find(|b| {
                        b.schedule == "gpipe"
                            && (b.data, b.model, b.pipe, b.microbatches, b.sharded_embeddings, b.zero, b.zero_rest, b.recompute)
                                == (a.data, a.model, a.pipe, a.microbatches, a.sharded_embeddings, a.zero, a.zero_rest, a.recompute)
                    })
                    .unwrap_or_else(|| panic!("no gpipe twin of {}", a.name()));
                (a.clone(), twin.clone())
            })
            .collect::<Vec<_>>()
    };
    let s = searched(&c, instant);
    for (a, twin) in twins(&s) {
        // The same bubble; 1F1B keeps at most p − s microbatches in flight, GPipe all m.
        assert_eq!(a.step_s(), twin.step_s(), "{}", a.name());
        assert!(a.memory <= twin.memory, "{}: {} > {}", a.name(), a.memory, twin.memory);
        if a.microbatches > a.pipe {
            assert!(a.memory < twin.memory, "{}", a.name());
        }
    }
    // At equal time, the one that needs less memory ranks first.
    let first = |s: &planner::Search, sched: &str| s.candidates.iter().position(|c| c.pipe > 1 && c.schedule == sched);
    assert!(first(&s, "1f1b") < first(&s, "gpipe"));
    // With a latency per message, GPipe's forwards run ahead and hide their
    // transfers, while each 1F1B backward waits for its gradient's round trip.
    let s = searched(&c, profile());
    for (a, twin) in twins(&s) {
        assert!(a.comm_s > twin.comm_s, "{}: {} against {}", a.name(), a.comm_s, twin.comm_s);
        assert!(a.memory <= twin.memory, "{}", a.name());
    }
}

/// Predicted times within the model's margin count as even, and the
/// simplest of those plans is chosen: the choice is never more complex than
/// a fitting candidate predicted within `NEAR_TIE` of the fastest, and
/// never slower than the fastest by more than that.
#[test]
fn near_ties_go_to_the_simpler_plan() {
    for budget in ["512 MiB", "128 MiB", "96 MiB"] {
        let s = searched(&common::checked(&plan(budget)), profile());
        let i = s.chosen.unwrap_or_else(|| panic!("nothing fits {budget}"));
        let choice = &s.candidates[i];
        let fastest = s.candidates.iter().filter(|c| c.fits).map(|c| c.step_s()).fold(f64::INFINITY, f64::min);
        assert!(choice.step_s() <= fastest * (1.0 + planner::NEAR_TIE) + 1e-12, "{budget}: {} against {fastest}", choice.step_s());
        for other in s.candidates.iter().filter(|c| c.fits && c.exact_memory.is_some() && c.step_s() <= fastest * (1.0 + planner::NEAR_TIE)) {
            assert!(choice.complexity() <= other.complexity(), "{budget}: chose {} over the simpler {}", choice.name(), other.name());
        }
    }
}

/// The Llama example's layers are Megatron pairs too: a tensor-parallel
/// candidate shards each block's q, k, v and output projections and its
/// SwiGLU (whole key/value heads per device), and that placement compiles.
#[test]
fn llama_layers_are_tensor_parallel_candidates() {
    let src = std::fs::read_to_string("../examples/llama.plan")
        .unwrap()
        .replace("devices cpu x 1", "devices cpu x 2\nplacement auto {\n  optimize step_time\n}")
        .replace("\"data/tiny_tokens.bin\"", "\"../examples/data/tiny_tokens.bin\"");
    let mut c = common::checked(&src);
    let s = searched(&c, profile());
    let tp = s.candidates.iter().find(|x| x.model == 2 && !x.sharded_embeddings).expect("a tensor-parallel candidate");
    let e = planner::explicit(&c, tp);
    let mut sharded: Vec<String> = e.shards.iter().map(|sh| c.model.params[sh.param].path.clone()).collect();
    sharded.sort();
    let mut want: Vec<String> =
        (0..2).flat_map(|b| ["attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.gate", "mlp.up", "mlp.down"].map(|p| format!("blocks.{b}.{p}"))).collect();
    want.sort();
    assert_eq!(sharded, want);
    // It compiles, and so does the candidate that also splits the (tied) table.
    let split = s.candidates.iter().find(|x| x.model == 2 && x.sharded_embeddings).map(|x| planner::explicit(&c, x));
    for e in std::iter::once(e).chain(split) {
        c.placement = shardplan_compiler::check::Placement::Explicit(e);
        compile(&c, &Options::default()).unwrap_or_else(|d| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
    }
}

/// A CNN whose pooling layers have no parameters: candidates whose stage cuts
/// leave a stage without parameters are refused with the reason (never a
/// panic), and a placement that fits is still chosen.
#[test]
fn stages_without_parameters_are_refused_not_chosen() {
    let src = std::fs::read_to_string("../examples/cnn_digits.plan").unwrap().replace("\"data/digits.csv\"", "\"../examples/data/digits.csv\"");
    let head = src.split("placement {").next().unwrap_or_default().to_string();
    let c = common::checked(&(head + "placement auto {\n  memory 1 MiB per device\n  optimize step_time\n}\n"));
    let s = searched(&c, profile());
    let chosen = s.chosen.map(|i| &s.candidates[i]).expect("a placement fits");
    assert!(chosen.refused.is_none() && chosen.fits);
    // Partition every pipelined candidate as the planner would: each is
    // placed or says why not, and the four-stage cuts that leave a pooling
    // layer alone are among the refused.
    let mut refused = 0;
    for cand in s.candidates.iter().filter(|x| x.pipe > 1) {
        let mut placed = c.clone();
        placed.placement = shardplan_compiler::check::Placement::Explicit(planner::explicit(&c, cand));
        if let Err(e) =
            shardplan_compiler::partition::partition(&placed, &shardplan_compiler::autodiff::differentiate(shardplan_compiler::graph::build(&placed), &placed))
        {
            assert!(e.0.contains("holds no parameters"), "{}: {}", cand.name(), e.0);
            refused += 1;
        }
    }
    assert!(refused > 0, "no candidate left a stage without parameters");
}
