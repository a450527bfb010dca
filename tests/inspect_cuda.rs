//! `inspect --kernels cuda` prints the CUDA program of a plan: every
//! generated kernel's source and launch shape, every cuBLAS product. The
//! golden output keeps kernel names (hashes of the sources) from churning
//! unnoticed.

use std::process::Command;

#[test]
fn inspect_prints_cuda_kernels() {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["inspect", "examples/digits_mlp.plan", "--kernels", "cuda"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("extern \"C\" __global__ void __launch_bounds__(256) sp_") && text.contains("gemm b0[64, 64] · b2[64, 128]"), "{text}");
    insta::assert_snapshot!(text);
}
