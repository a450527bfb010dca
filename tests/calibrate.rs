//! `shardplan calibrate` on this machine: it writes a device profile that
//! later commands read, with every fitted figure present and in range, and
//! `inspect --explain` predicts with it.

use std::process::Command;

#[test]
fn calibrate_writes_a_profile_that_later_commands_read() {
    let dir = std::env::temp_dir().join(format!("shardplan-calibrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("profile.json");
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan")).args(["calibrate", "-o"]).arg(&path).output().expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("fitted on three reference steps"), "the fit did not run:\n{stdout}");
    assert!(!dir.join("profile.json.tmp").exists(), "the temporary file was left behind");
    let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("written")).expect("JSON");
    let num = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("`{k}` missing from {p}"));
    for k in ["efficiency", "bytes_efficiency", "kernel_efficiency"] {
        assert!((0.2..=20.0).contains(&num(k)), "{k} = {}", num(k));
    }
    for k in ["op_overhead", "matmul_overhead", "kernel_overhead", "split_cost", "crowding"] {
        assert!(num(k) >= 0.0 && num(k).is_finite(), "{k} = {}", num(k));
    }
    let cores = num("cores");
    for k in ["thread_speedup", "devices_speedup"] {
        assert!((1.0..=cores).contains(&num(k)), "{k} = {} on {cores} cores", num(k));
    }
    let sizes = p["elementwise_by_size"].as_array().expect("element-wise rates by size");
    assert!(sizes.len() >= 2 && sizes.iter().all(|x| x[1].as_f64().is_some_and(|r| r > 0.0)), "{sizes:?}");

    let explain = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["inspect", "examples/tiny_gpt.plan", "--explain", "--device-profile"])
        .arg(&path)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("runs");
    assert!(explain.status.success(), "{}", String::from_utf8_lossy(&explain.stderr));
    assert!(String::from_utf8_lossy(&explain.stdout).contains("predicted step"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device profile that is not one, or holds figures no machine has, is a
/// diagnostic naming the file and a non-zero exit, never a panic or a plan
/// ranked on NaN.
#[test]
fn hostile_device_profiles_are_refused() {
    let dir = std::env::temp_dir().join(format!("shardplan-hostile-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/plans/profile_2core.json")).expect("fixed profile");
    let cases = [
        ("not json", "{ this is not a profile".to_string()),
        ("wrong type", good.replace("\"cores\": 2", "\"cores\": \"two\"")),
        ("zero cores", good.replace("\"cores\": 2", "\"cores\": 0")),
        ("negative rate", good.replace("\"link_bytes\": 17000000000.0", "\"link_bytes\": -1.0")),
        ("zero efficiency", good.replace("\"kernel_efficiency\": 1.7", "\"kernel_efficiency\": 0.0")),
        ("negative cost", good.replace("\"split_cost\": 1.5e-05", "\"split_cost\": -1e-05")),
        ("huge speedup", good.replace("\"devices_speedup\": 1.95", "\"devices_speedup\": 1e400")),
        ("rate by size", good.replace("[98304, 159000000000.0]", "[98304, -5.0]")),
    ];
    for (what, text) in cases {
        assert_ne!(text, good, "{what}: the mutation did not apply");
        let path = dir.join("profile.json");
        std::fs::write(&path, &text).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
            .args(["inspect", "examples/auto.plan", "--explain", "--device-profile"])
            .arg(&path)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains("run::device_profile") && err.contains("profile.json"), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
