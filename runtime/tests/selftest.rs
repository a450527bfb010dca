//! The kernel self-test through the library: the programs of a placed
//! example, every step tested once, the CPU on one thread against itself on
//! two within the tolerance, and the same seed giving the same report.

use shardplan_compiler::check_source;
use shardplan_runtime::engine::Backend;
use shardplan_runtime::selftest::{self, Counts, Options, ProgramReport, Selftest, SingleOnly};

fn checked(example: &str) -> shardplan_compiler::Checked {
    let src = std::fs::read(format!("{}/../examples/{example}.plan", env!("CARGO_MANIFEST_DIR"))).expect("example");
    let (c, d) = check_source(&src);
    c.unwrap_or_else(|| panic!("{example}: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()))
}

/// Every program of `examples`, tested by one self-test with `seed`.
fn reports(examples: &[&str], seed: u64) -> Vec<ProgramReport> {
    let mut test = Selftest::new(Options { backend: Backend::Cpu, seed, threads: 2 });
    let mut out = Vec::new();
    for e in examples {
        let found = selftest::programs(e, &checked(e)).expect("compiles");
        assert!(found.single_only.is_none(), "{e}: {:?}", found.single_only);
        out.extend(found.programs.iter().map(|(name, p)| test.program(name, p)));
    }
    out
}

#[test]
fn every_step_of_a_placed_example_is_tested_once_and_agrees() {
    let r = reports(&["digits_mlp", "tensor_parallel"], 1);
    let names: Vec<&str> = r.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["digits_mlp (one device)", "tensor_parallel (one device)", "tensor_parallel device 0", "tensor_parallel device 1"]);
    let mut total = Counts::default();
    for p in &r {
        assert_eq!(p.steps, p.tested.len() + p.repeated + p.transfers, "{}", p.name);
        total.add(&p.counts(1e-5));
    }
    // The same model on one device twice: the second is all repeats.
    assert_eq!((r[1].tested.len(), r[1].repeated), (0, r[1].steps));
    // The devices' collectives are skipped, their split steps tested.
    assert!(r[2].transfers > 0 && !r[2].tested.is_empty(), "{:?}", r[2]);
    assert_eq!((total.programs, total.over, total.failed), (4, 0, 0), "{total:?}");
    assert_eq!(total.ok, total.steps);
    assert!(total.steps > 30, "{total:?}");
}

#[test]
fn the_same_seed_gives_the_same_report() {
    assert_eq!(reports(&["digits_mlp"], 7), reports(&["digits_mlp"], 7));
}

#[test]
fn placement_auto_is_tested_on_one_device() {
    let found = selftest::programs("auto", &checked("auto")).expect("compiles");
    assert!(matches!(found.single_only, Some(SingleOnly::Auto)), "{:?}", found.single_only);
    let names: Vec<&str> = found.programs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["auto (one device)"]);
}
