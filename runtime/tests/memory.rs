//! The compile-time memory plan of every device against what its executor
//! actually allocates, for every example.

use shardplan_compiler::partition::{self, memory};
use shardplan_compiler::{autodiff, check_source, graph};
use shardplan_runtime::backend::cpu::exec::Executor;

#[test]
fn planned_memory_is_what_each_device_allocates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut seen = 0;
    for e in std::fs::read_dir(dir).expect("examples") {
        let path = e.expect("entry").path();
        if path.extension().and_then(|x| x.to_str()) != Some("plan") {
            continue;
        }
        let src = std::fs::read(&path).expect("read");
        let (c, d) = check_source(&src);
        let c = c.unwrap_or_else(|| panic!("{}: {:?}", path.display(), d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        if matches!(c.placement, shardplan_compiler::check::Placement::Auto { .. }) {
            continue;
        }
        let g = autodiff::differentiate(graph::build(&c), &c);
        let plan = partition::partition(&c, &g).expect("partitions");
        for d in &plan.devices {
            let planned = memory::device(d).total();
            let exec = Executor::with_slots(d.program.clone(), 1, d.slots).expect("compiles");
            let measured = exec.bytes();
            let off = (planned as f64 - measured as f64).abs() / measured as f64;
            assert!(off <= 0.10, "{} device {}: planned {planned} B, allocated {measured} B", path.display(), d.device);
            assert_eq!(planned, measured, "{} device {}", path.display(), d.device);
        }
        seen += 1;
    }
    assert!(seen >= 7, "only {seen} examples");
}
