//! Asking for GPUs where CUDA cannot be used ends with one clear error and
//! exit code 1, never a panic. `CUDA_VISIBLE_DEVICES=` hides every GPU, so
//! this holds on machines with a GPU too (there the driver loads and sees
//! none).

use std::path::PathBuf;
use std::process::Command;

fn shardplan(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(args)
        .args(["--color", "never"])
        .env("CUDA_VISIBLE_DEVICES", "")
        .env("LD_LIBRARY_PATH", "")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run shardplan");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

fn assert_no_gpu((code, out): (i32, String)) {
    assert_eq!(code, 1, "{out}");
    // The rendered diagnostic wraps long lines behind a gutter.
    let out = out.replace('│', " ").split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(!out.contains("panicked") && !out.contains("RUST_BACKTRACE"), "{out}");
    let clear = out.contains("no CUDA driver found (libcuda.so could not be loaded)") || out.contains("sees no GPU");
    assert!(clear, "{out}");
    assert!(out.contains("this plan asks for gpu devices; use cpu devices"), "{out}");
}

/// The digits data-parallel plan on `devices gpu x 2`, written where the test
/// can, under a name of the caller's own: tests run in parallel, and one
/// writing the file while another reads it would hand the reader a half file.
fn gpu_plan(name: &str) -> PathBuf {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data_parallel.plan")).expect("example");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits.csv");
    let plan = src.replace("devices cpu x 4", "devices gpu x 2").replace("mesh (data: 4)", "mesh (data: 2)").replace("data/digits.csv", data);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda_missing");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join(format!("{name}.plan"));
    std::fs::write(&path, plan).expect("write plan");
    path
}

#[test]
fn a_plan_on_gpu_devices_says_cuda_is_missing() {
    let plan = gpu_plan("refused");
    let plan = plan.to_str().expect("utf-8 path");
    assert_no_gpu(shardplan(&["run", plan, "--steps", "1", "--quiet"]));
    assert_no_gpu(shardplan(&["verify", plan, "--steps", "1"]));
}

#[test]
fn backend_cuda_says_cuda_is_missing() {
    assert_no_gpu(shardplan(&["run", "examples/digits_mlp.plan", "--steps", "1", "--quiet", "--backend", "cuda"]));
}

#[test]
fn gpu_devices_still_train_with_backend_cpu() {
    let plan = gpu_plan("on_cpu");
    let (code, out) = shardplan(&["run", plan.to_str().expect("utf-8 path"), "--steps", "2", "--quiet", "--backend", "cpu"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("trained 2 steps"), "{out}");
}

#[test]
fn selftest_on_cuda_says_cuda_is_missing() {
    let (code, out) = shardplan(&["selftest", "--backend", "cuda", "examples/digits_mlp.plan"]);
    assert_eq!(code, 1, "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(out.contains("no CUDA driver found") || out.contains("sees no GPU"), "{out}");
}

#[test]
fn selftest_on_the_cpu_runs_every_step() {
    let (code, out) = shardplan(&["selftest", "--backend", "cpu", "--seed", "1", "examples/digits_mlp.plan", "examples/tensor_parallel.plan"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("selftest: ok"), "{out}");
    assert!(out.contains("examples/tensor_parallel.plan device 1"), "{out}");
}
