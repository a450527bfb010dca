//! Partitioning every example: programs verify, and the layouts hold.

mod common;

use shardplan_compiler::partition::{self, verify};
use shardplan_compiler::{Options, Target};

fn plan_of(src: &str) -> partition::Plan {
    common::placed(&common::checked(src))
}

#[test]
fn every_example_partitions_and_verifies() {
    for name in ["digits_mlp", "tiny_gpt", "data_parallel", "tensor_parallel", "pipeline_1f1b", "data_tensor_pipeline", "parameter_server"] {
        let src = std::fs::read_to_string(format!("../examples/{name}.plan")).unwrap();
        // The examples without a placement compile to one program (which the driver validates).
        let plan = match common::compiled(&common::checked(&src), &Options::default()).target {
            Target::Placed(plan) => plan,
            Target::One(p) => {
                eprintln!("{name}: one device, {} steps", p.steps.len());
                continue;
            }
        };
        verify::verify(&plan).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ev = verify::events(&plan);
        eprintln!("{name}: {} devices, events {:?}", plan.devices.len(), ev.iter().map(|e| e.len()).collect::<Vec<_>>());
    }
}

#[test]
fn a_shape_that_does_not_match_its_layout_is_rejected() {
    let src = std::fs::read_to_string("../examples/tensor_parallel.plan").unwrap();
    let mut plan = plan_of(&src);
    let dev = &mut plan.devices[1].program;
    let b = dev.buffers.iter_mut().find(|b| b.kind == shardplan_compiler::kernel::BufKind::Param(0)).expect("fc1.w");
    // fc1.w is split by columns: [64, 64] on each device; claim the whole.
    assert_eq!(b.shape, vec![64, 64]);
    b.shape = vec![64, 128];
    let e = verify::verify(&plan).unwrap_err();
    assert!(matches!(e, verify::VerifyError::PartShape { device: 1, .. }), "{e:?}");
    assert!(e.to_string().contains("device 1") && e.to_string().contains("[64, 128]"), "{e}");
}
