//! Every kernel every example generates compiles: CUDA C → PTX with NVRTC,
//! then PTX → sm_90 machine code with `ptxas`. No GPU is needed.
//!
//! NVRTC is found on the library path, `ptxas` on PATH or through
//! `SHARDPLAN_PTXAS`. Without them the test is skipped with a message,
//! except under CI (`CI=true`), where their absence is a failure.

use shardplan_compiler::check::Placement;
use shardplan_compiler::kernel::{self, Program};
use shardplan_compiler::{autodiff, check_source_placed, graph, partition};
use shardplan_runtime::backend::cuda::{codegen, nvrtc, Kernel, Launch};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;

const ARCH: &str = "sm_90";

/// (name, program) of every example: the single-device program, and each
/// device program of the placed ones.
fn programs() -> Vec<(String, Program)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut files: Vec<_> = std::fs::read_dir(dir).expect("examples").filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.retain(|p| p.extension().and_then(|x| x.to_str()) == Some("plan"));
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let src = std::fs::read(&path).expect("read");
        let (single, d) = check_source_placed(&src, &BTreeMap::new(), false);
        let single = single.unwrap_or_else(|| panic!("{name}: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        let g = autodiff::differentiate(graph::build(&single), &single);
        out.push((format!("{name} (one device)"), kernel::lower(&g)));
        let (placed, _) = check_source_placed(&src, &BTreeMap::new(), true);
        let placed = placed.expect("checks");
        if matches!(placed.placement, Placement::Explicit(_)) {
            let g = autodiff::differentiate(graph::build(&placed), &placed);
            let plan = partition::partition(&placed, &g).expect("partitions");
            for d in plan.devices {
                out.push((format!("{name} device {}", d.device), d.program));
            }
        }
    }
    out
}

/// Every distinct kernel, with where it was first seen.
fn kernels() -> Vec<(String, Kernel)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (name, p) in programs() {
        for (si, step) in p.steps.iter().enumerate() {
            for l in codegen::lower(step, &p).unwrap_or_else(|e| panic!("{name} step {si}: {e}")) {
                if let Launch::Kernel(k) = l {
                    if seen.insert(k.source.clone()) {
                        out.push((format!("{name} step {si}"), k));
                    }
                }
            }
        }
    }
    out
}

fn ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHARDPLAN_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("ptxas")).find(|p| p.is_file())
}

/// Skips (or, under CI, fails) when a compiler is missing.
fn missing(what: &str) {
    let msg = format!("cuda_ptx: {what}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true: the CUDA compilers must be installed; see .ci/run)");
    }
    eprintln!("skipped: {msg}");
}

#[test]
fn every_generated_kernel_compiles_for_sm_90() {
    if let Err(e) = nvrtc::available() {
        return missing(&e);
    }
    let Some(ptxas) = ptxas() else {
        return missing("ptxas not found on PATH (or set SHARDPLAN_PTXAS); `pip install nvidia-cuda-nvcc==13.0.88` provides it");
    };
    let dir = std::env::temp_dir().join(format!("shardplan-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary folder");
    let all = kernels();
    assert!(all.len() > 30, "only {} distinct kernels", all.len());
    let mut failures = Vec::new();
    for (at, k) in &all {
        let ptx = match nvrtc::compile(&k.source, ARCH) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{at}: kernel {} does not compile:\n{}\n{e}", k.name, k.source));
                continue;
            }
        };
        assert!(ptx.contains(&format!(".entry {}(", k.name)), "{at}: the PTX has no entry {}", k.name);
        let file = dir.join(format!("{}.ptx", k.name));
        std::fs::write(&file, &ptx).expect("write PTX");
        let out = Command::new(&ptxas).args(["--gpu-name", ARCH, "-o"]).arg(dir.join(format!("{}.cubin", k.name))).arg(&file).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => failures.push(format!(
                "{at}: ptxas rejects kernel {}:\n{}\n{}{}",
                k.name,
                k.source,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => failures.push(format!("{at}: cannot run {}: {e}", ptxas.display())),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{} of {} kernels fail:\n\n{}", failures.len(), all.len(), failures.join("\n\n"));
    println!("{} distinct kernels compile for {ARCH}", all.len());
}
