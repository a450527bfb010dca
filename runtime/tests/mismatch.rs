//! A deliberately mismatched pair of device programs: the verifier rejects
//! it before launch, and run anyway it stops at once with the mismatch named
//! (not a hang).

use shardplan_compiler::graph::Op;
use shardplan_compiler::kernel::StepKind;
use shardplan_compiler::partition::{self, verify};
use shardplan_compiler::{check_source, compile, Target};
use shardplan_runtime::cluster::{Cluster, ClusterError, Hypers};
use shardplan_runtime::data::Batch;
use std::time::{Duration, Instant};

const PLAN: &str = r#"
model Mlp {
  input x: f32[batch, 8]
  input label: i32[batch]
  layer fc1 = Linear(8, 16)
  layer fc2 = Linear(16, 4)
  loss cross_entropy(fc2(relu(fc1(x))), label)
}
data d = synthetic(rows: 64, features: 8, classes: 4)
train { model: Mlp  data: d  batch: 8  steps: 2  optimizer: sgd(lr: 0.1)  seed: 3 }
devices cpu x 2
placement {
  mesh (model: 2)
  shard fc1.w (_, model)
  shard fc1.b (model)
  shard fc2.w (model, _)
}
"#;

fn plan() -> partition::Plan {
    let (c, d) = check_source(PLAN.as_bytes());
    let c = c.unwrap_or_else(|| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
    match compile(&c, &Default::default()).unwrap_or_else(|d| panic!("{:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>())).target {
        Target::Placed(plan) => plan,
        Target::One(_) => panic!("the plan is placed"),
    }
}

/// Device 1 sends where device 0 all-reduces.
fn mismatched() -> partition::Plan {
    let mut p = plan();
    let dev = &mut p.devices[1].program;
    let step = dev.steps.iter_mut().find(|s| matches!(s.kind, StepKind::Op(Op::AllReduce { .. }))).expect("an all-reduce over `model`");
    if let StepKind::Op(Op::AllReduce { id, .. }) = step.kind.clone() {
        step.kind = StepKind::Op(Op::Send { to: 0, id });
    }
    p
}

#[test]
fn the_untouched_plan_verifies() {
    verify::verify(&plan()).expect("verifies");
}

#[test]
fn the_verifier_rejects_mismatched_programs() {
    let e = verify::verify(&mismatched()).expect_err("rejected");
    assert!(e.to_string().contains("device 0") && e.to_string().contains("all-reduce(model)"), "{e}");
}

#[test]
fn mismatched_programs_fail_at_once_with_the_mismatch_named() {
    let mut cl = Cluster::start(mismatched(), 2, Duration::from_secs(30));
    let params = vec![vec![0.1f32; 8 * 16], vec![0.0; 16], vec![0.1; 16 * 4], vec![0.0; 4]];
    cl.load(&params, &[]).expect("loads");
    let start = Instant::now();
    let batch = |rows: &[usize]| Batch::Table { features: vec![0.5; rows.len() * 8], labels: vec![1; rows.len()] };
    let h = Hypers { lr: 0.1, bias_correction1: 1.0, bias_correction2: 1.0, step: 0 };
    let e = cl.step(0, h, &(0..8).collect::<Vec<_>>(), &batch, None).expect_err("fails");
    assert!(matches!(e, ClusterError::Transport { step: 1, .. }), "{e:?}");
    assert!(!e.is_bug() && !e.is_device(), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("expected all-reduce(model) but received send"), "{e}");
    assert!(e.contains("device 0"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}
