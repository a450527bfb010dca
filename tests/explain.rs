//! `inspect --explain` with a fixed device profile. On examples/auto.plan:
//! the choice, its predicted step broken down, its memory, the runners-up
//! with why each lost, and the placement text. The search time (the only
//! figure that depends on the machine) is masked.

use std::process::Command;

/// `inspect PLAN --explain` under the fixed profile; its standard output.
fn explain(plan: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["inspect", plan, "--explain", "--device-profile", "tests/plans/profile_2core.json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_explanation_is_stable() {
    let text = explain("examples/auto.plan");
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

/// A plan that places itself: the cost model's prediction for its placement,
/// broken down the same way, beside each device's exact memory plan.
#[test]
fn an_explicit_placement_is_explained_too() {
    let text = explain("examples/data_tensor_pipeline.plan");
    assert!(text.contains("as placed") && text.contains("pipeline bubble"), "{text}");
    insta::assert_snapshot!(text);
}
