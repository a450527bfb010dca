//! Every example checks clean, and its summary says what the plan holds.

use std::process::Command;

fn check(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .arg("check")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the shardplan binary runs");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn examples() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("examples/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".plan"))
        .map(|n| format!("examples/{n}"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_example_checks_clean() {
    let all = examples();
    for required in
        ["digits_mlp", "tiny_gpt", "tensor_parallel", "pipeline_1f1b", "data_tensor_pipeline", "parameter_server", "auto", "llama", "llama_3d", "cnn_digits"]
    {
        assert!(all.contains(&format!("examples/{required}.plan")), "missing example {required}");
    }
    for ex in &all {
        let (status, stdout, stderr) = check(&[ex]);
        assert_eq!(status, Some(0), "{ex} does not check clean:\n{stderr}");
        assert!(stderr.is_empty(), "{ex} prints diagnostics (warnings?):\n{stderr}");
        assert!(stdout.starts_with(&format!("{ex}: ok")), "{ex}: {stdout}");
    }
}

#[test]
fn digits_summary_counts_parameters() {
    let (status, stdout, _) = check(&["examples/digits_mlp.plan"]);
    assert_eq!(status, Some(0));
    let count = 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10;
    assert_eq!(count, 17_226);
    assert!(stdout.contains("17,226 parameters"), "{stdout}");
    assert!(stdout.contains("x: f32[batch=64, 64], label: i32[batch=64]"), "{stdout}");
    assert!(stdout.contains("single device"), "{stdout}");
}

#[test]
fn summaries_are_stable() {
    for ex in [
        "examples/digits_mlp.plan",
        "examples/data_tensor_pipeline.plan",
        "examples/pipeline_1f1b.plan",
        "examples/parameter_server.plan",
        "examples/auto.plan",
        "examples/fsdp.plan",
        "examples/mixed_precision.plan",
    ] {
        let (status, stdout, _) = check(&[ex]);
        assert_eq!(status, Some(0));
        insta::assert_snapshot!(ex.trim_start_matches("examples/").trim_end_matches(".plan"), stdout);
    }
}

#[test]
fn json_summary_and_diagnostics() {
    let (status, stdout, _) = check(&["--format", "json", "examples/tensor_parallel.plan"]);
    assert_eq!(status, Some(0));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert_eq!(v[0]["ok"], true);
    assert_eq!(v[0]["diagnostics"].as_array().map(Vec::len), Some(0));

    let dir = tempdir();
    let bad = dir.join("bad.plan");
    let src = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/digits_mlp.plan")).expect("example");
    std::fs::write(&bad, src.replace("Linear(128, 64)", "Linear(100, 64)")).expect("write");
    let (status, stdout, _) = check(&["--format", "json", bad.to_str().expect("utf-8 path")]);
    assert_eq!(status, Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    let d = &v[0]["diagnostics"][0];
    assert_eq!(d["code"], "shape::matmul_inner", "{stdout}");
    assert_eq!(d["severity"], "error");
    assert!(d["line"].as_u64().is_some_and(|l| l > 1), "{stdout}");
    assert!(d["column"].as_u64().is_some_and(|c| c >= 1), "{stdout}");
    assert!(d["span"]["end"].as_u64() > d["span"]["start"].as_u64(), "{stdout}");
    assert!(d["help"].is_string(), "{stdout}");
}

#[test]
fn exit_codes() {
    let (status, _, _) = check(&[]);
    assert_eq!(status, Some(2), "no file is a usage error");
    let (status, _, _) = check(&["--format", "yaml", "examples/digits_mlp.plan"]);
    assert_eq!(status, Some(2), "a bad flag is a usage error");
    let (status, _, stderr) = check(&["no/such/file.plan"]);
    assert_eq!(status, Some(1), "an unreadable file is an input error");
    assert!(stderr.contains("io::read"), "{stderr}");
    let (status, stdout, _) = check(&["examples/digits_mlp.plan", "examples/tiny_gpt.plan"]);
    assert_eq!(status, Some(0));
    assert!(stdout.contains("digits_mlp.plan: ok") && stdout.contains("tiny_gpt.plan: ok"));
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("shardplan-test-{}-{}", std::process::id(), line!()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn inspect_prints_graph_and_kernels() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["inspect", "examples/digits_mlp.plan", "--graph", "dot"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("runs");
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(dot.starts_with("digraph \"DigitsMlp\"") && dot.contains("param fc1.w") && dot.contains("assign fc1.w"), "{dot}");
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["inspect", "examples/digits_mlp.plan", "--kernels", "clif"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("fused [") && text.contains("function %fused") && text.contains("f32x4"), "{text}");
}

/// examples/data/make_tokens.py remakes the committed token file and merges
/// byte for byte (skipped, with a message, where no `python3` runs).
#[test]
fn the_token_file_is_what_its_script_makes() {
    let out = tempdir().join("tokens");
    std::fs::create_dir_all(&out).expect("folder");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/make_tokens.py");
    let run = std::process::Command::new("python3").arg(&script).arg("--out").arg(&out).output();
    let Ok(run) = run else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "python3 is needed under CI");
        eprintln!("skipped: python3 is not installed");
        return;
    };
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for name in ["tiny_tokens.bin", "tiny_bpe.json"] {
        let made = std::fs::read(out.join(name)).expect("made");
        let kept = std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data").join(name)).expect("committed");
        assert!(made == kept, "{name} differs from what make_tokens.py makes");
    }
}
