//! On a machine with a GPU (and NVRTC and cuBLAS on the library path):
//! every kernel of the examples against the CPU, and training on GPU
//! devices against one CPU device. Elsewhere each test says why it skipped
//! and passes; `SHARDPLAN_REQUIRE_GPU=1` turns a skip into a failure.

use std::process::Command;

fn shardplan(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(args)
        .args(["--color", "never"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run shardplan");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// Whether CUDA can be used here; prints why not.
fn gpu() -> bool {
    let (code, out) = shardplan(&["selftest", "--backend", "cuda", "tests/plans/none.plan"]);
    // With CUDA the command gets as far as the (missing) file; without, it stops at `run::no_cuda`'s message.
    let missing = code == 1 && ["could not be loaded", "sees no GPU", "(libnvrtc.so.13) not found", "could not be initialised"].iter().any(|m| out.contains(m));
    if missing && std::env::var_os("SHARDPLAN_REQUIRE_GPU").is_some() {
        panic!("SHARDPLAN_REQUIRE_GPU is set, but CUDA cannot be used: {out}");
    }
    if missing {
        eprintln!("skipped: no usable GPU ({})", out.lines().next().unwrap_or(""));
    }
    !missing
}

#[test]
fn every_example_kernel_matches_the_cpu() {
    if !gpu() {
        return;
    }
    let (code, out) = shardplan(&["selftest", "--backend", "cuda", "--seed", "1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("selftest: ok"), "{out}");
}

#[test]
fn gpu_devices_train_like_one_cpu_device() {
    if !gpu() {
        return;
    }
    for args in [
        &["verify", "examples/digits_mlp.plan", "--backend", "cuda", "--steps", "5"][..],
        &["verify", "bench/gpu_data_parallel.plan", "--steps", "5"],
        &["verify", "bench/gpu_pipeline.plan", "--steps", "3"],
        &["verify", "examples/tensor_parallel.plan", "--backend", "cuda", "--steps", "5"],
    ] {
        let (code, out) = shardplan(args);
        assert_eq!(code, 0, "{args:?}: {out}");
        assert!(out.contains("ok: the placement matches one device"), "{args:?}: {out}");
    }
}

#[test]
fn a_memory_limit_too_small_is_refused() {
    if !gpu() {
        return;
    }
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/digits_mlp.plan")).expect("example");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits.csv");
    let plan = src.replace("devices cpu x 1", "devices gpu x 1 { memory 64 KiB }").replace("data/digits.csv", data);
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda_gpu");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("small.plan");
    std::fs::write(&path, plan).expect("write plan");
    let (code, out) = shardplan(&["run", path.to_str().expect("utf-8 path"), "--steps", "1", "--quiet"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("run::gpu") && out.contains("memory limit"), "{out}");
}
