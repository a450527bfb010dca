//! The compile-time memory plan of every device against what its executor
//! actually allocates, for every example.

use shardplan_compiler::partition::memory;
use shardplan_compiler::{check_source, compile, Target};
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
        let compiled =
            compile(&c, &Default::default()).unwrap_or_else(|d| panic!("{}: {:?}", path.display(), d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        // (device, program, buffer sets) of what runs.
        let devices: Vec<_> = match compiled.target {
            Target::One(p) => vec![(0, p, 1)],
            Target::Placed(plan) => plan.devices.into_iter().map(|d| (d.device, d.program, d.slots)).collect(),
        };
        for (device, program, slots) in devices {
            let planned = memory::program(&program, slots).total();
            let exec = Executor::with_slots(program, 1, slots).expect("compiles");
            let measured = exec.bytes();
            let off = (planned as f64 - measured as f64).abs() / measured as f64;
            assert!(off <= 0.10, "{} device {device}: planned {planned} B, allocated {measured} B", path.display());
            assert_eq!(planned, measured, "{} device {device}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 7, "only {seen} examples");
}
