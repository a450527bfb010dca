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

/// When no placement fits the budget, `--explain` still lists the closest
/// candidates, and the command fails with the diagnostic.
#[test]
fn no_fit_lists_the_closest_candidates_and_fails() {
    let root = env!("CARGO_MANIFEST_DIR");
    let plan = std::fs::read_to_string(format!("{root}/examples/auto.plan"))
        .expect("the example")
        .replace("memory 512 MiB per device", "memory 1 MiB per device")
        .replace("\"data/tiny.txt\"", &format!("{:?}", format!("{root}/examples/data/tiny.txt")));
    let dir = std::env::temp_dir().join(format!("shardplan-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("no_fit.plan");
    std::fs::write(&path, plan).expect("write the plan");
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["--color", "never", "inspect", "--explain", "--device-profile", "tests/plans/profile_2core.json"])
        .arg(&path)
        .current_dir(root)
        .output()
        .expect("runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("no candidate fits the memory budget; the closest:"), "{stdout}");
    assert!(stderr.contains("placement::no_fit"), "{stderr}");
}
