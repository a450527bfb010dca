//! `inspect --explain` on examples/auto.plan with a fixed device profile:
//! the choice, its predicted step broken down, its memory, the runners-up
//! with why each lost, and the placement text. The search time (the only
//! figure that depends on the machine) is masked.

use std::process::Command;

#[test]
fn the_explanation_is_stable() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["inspect", "examples/auto.plan", "--explain", "--device-profile", "tests/plans/profile_2core.json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let masked: String = text
        .lines()
        .map(|l| match l.find(" searched in ") {
            Some(i) => format!("{} searched in (time)", &l[..i]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(masked.contains("chosen: ") && masked.contains("as placement text:") && masked.contains("next best:"), "{masked}");
    insta::assert_snapshot!(masked);
}
