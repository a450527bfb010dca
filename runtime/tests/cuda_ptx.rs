//! Every kernel every example generates compiles: CUDA C → PTX with NVRTC,
//! then PTX → sm_90 machine code with `ptxas`. No GPU is needed.
//!
//! NVRTC is found on the library path, `ptxas` on PATH or through
//! `SHARDPLAN_PTXAS`. Without them the test is skipped with a message,
//! except under CI (`CI=true`), where their absence is a failure.
//!
//! Where a GPU can be used, a second test runs every distinct kernel on
//! random operands and compares it with the CPU backend.

use shardplan_compiler::check_source;
use shardplan_compiler::kernel::Program;
use shardplan_runtime::backend::cuda::{codegen, nvrtc, Kernel, Launch};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCH: &str = "sm_90";

/// (name, program) of every example, as `selftest` compiles them: the
/// single-device program, and each device program of the placed ones.
/// RMSNorm, grouped-query attention (causal, and non-causal without
/// projections), a SwiGLU MLP and dropout.
const LLAMA_LAYERS: &str = r#"
model Llamaish {
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(256, 32)
  layer norm = RMSNorm(32)
  layer attn = GroupedAttention(32, 4, 2)
  layer mlp = SwiGLU(32, 64)
  layer head = Linear(32, 256)
  loss cross_entropy(head(dropout(mlp(norm(embed(tokens) + attn(norm(embed(tokens))) + attention(embed(tokens), embed(tokens), embed(tokens), heads: 4))), p: 0.1)), targets)
}
data corpus = text("data/tiny.txt")
train { batch: 4, seq: 16, steps: 1, optimizer: adamw(lr: 0.001) }
"#;

fn programs() -> Vec<(String, Program)> {
    // The examples beside this crate, or (a test binary run elsewhere) under the current folder.
    let built = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let dir = if std::path::Path::new(built).is_dir() { built } else { "examples" };
    let mut files: Vec<_> = std::fs::read_dir(dir).expect("examples").filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.retain(|p| p.extension().and_then(|x| x.to_str()) == Some("plan"));
    files.sort();
    let mut out = Vec::new();
    let mut sources: Vec<(String, Vec<u8>)> = files
        .into_iter()
        .map(|path| (path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string(), std::fs::read(&path).expect("read")))
        .collect();
    // Layers no example uses: grouped attention without rope, non-causal attention, dropout.
    sources.push(("llama layers".into(), LLAMA_LAYERS.as_bytes().to_vec()));
    for (name, src) in sources {
        let (c, d) = check_source(&src);
        let c = c.unwrap_or_else(|| panic!("{name}: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        let found =
            shardplan_runtime::selftest::programs(&name, &c).unwrap_or_else(|d| panic!("{name}: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        if let Some(shardplan_runtime::selftest::SingleOnly::NotCompiled(d)) = &found.single_only {
            panic!("{name}: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>());
        }
        out.extend(found.programs);
    }
    out
}

/// A program over tensors of more than 2³¹ elements (never run, only
/// compiled): its kernels index with 64-bit integers.
fn huge() -> Program {
    use shardplan_compiler::graph::{NodeId, Op, Role};
    use shardplan_compiler::kernel::{Binary, BufId, BufKind, Buffer, Elem, Fused, Inst, Step, StepKind, Unary};
    let (rows, cols) = (65_536, 40_000);
    let buf = |kind, elem, shape: &[usize]| Buffer { kind, elem, shape: shape.to_vec(), node: NodeId(0) };
    let buffers = vec![
        buf(BufKind::Input(0), Elem::F32, &[rows, cols]),
        buf(BufKind::Param(0), Elem::F32, &[cols]),
        buf(BufKind::Temp, Elem::F32, &[rows, cols]),
        buf(BufKind::Temp, Elem::F32, &[cols]),
        buf(BufKind::Temp, Elem::F32, &[rows, cols]),
        buf(BufKind::Input(1), Elem::I32, &[rows]),
        buf(BufKind::Temp, Elem::F32, &[]),
        buf(BufKind::Temp, Elem::F32, &[cols, rows]),
        buf(BufKind::Temp, Elem::F32, &[rows]),
    ];
    let fused = Fused {
        rows,
        cols,
        row_strides: vec![cols, 0],
        col_strides: vec![1, 1],
        body: vec![Inst::Load(0), Inst::Load(1), Inst::Binary(Binary::Add, 0, 1), Inst::Unary(Unary::Gelu, 2)],
    };
    let step = |kind, inputs: &[u32], output| Step { kind, role: Role::Forward, inputs: inputs.iter().map(|&b| BufId(b)).collect(), output: BufId(output) };
    let steps = vec![
        step(StepKind::Fused(fused), &[0, 1], 2),
        step(StepKind::Op(Op::Sum { axes: vec![0], keepdims: false }), &[2], 3),
        step(StepKind::Op(Op::Max { axes: vec![1], keepdims: false }), &[2], 8),
        step(StepKind::Op(Op::Softmax { axis: 1 }), &[2], 4),
        step(StepKind::Op(Op::CrossEntropy), &[2, 5], 6),
        step(StepKind::Op(Op::Transpose { perm: vec![1, 0] }), &[2], 7),
        step(StepKind::Op(Op::EmbeddingGrad), &[5, 2], 4),
    ];
    Program { buffers, steps, loss: BufId(6), assigns: vec![] }
}

/// Every distinct kernel, with where it was first seen.
fn kernels() -> Vec<(String, Kernel)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut all = programs();
    all.push(("a program of 2.6e9-element tensors".into(), huge()));
    for (name, p) in all {
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

/// Compiles kernel `k` (number `i`, first seen at `at`) to PTX with NVRTC and assembles
/// it with ptxas in `dir`; says what failed, if anything.
fn check_kernel(i: usize, at: &str, k: &Kernel, ptxas: &Path, dir: &Path) -> Option<String> {
    let ptx = match nvrtc::compile(&k.source, ARCH) {
        Ok(p) => p,
        Err(e) => return Some(format!("{at}: kernel {} does not compile:\n{}\n{e}", k.name, k.source)),
    };
    if !ptx.contains(&format!(".entry {}(", k.name)) {
        return Some(format!("{at}: the PTX has no entry {}", k.name));
    }
    let file = dir.join(format!("{i}-{}.ptx", k.name));
    std::fs::write(&file, &ptx).expect("write PTX");
    match Command::new(ptxas).args(["--gpu-name", ARCH, "-o"]).arg(dir.join(format!("{i}-{}.cubin", k.name))).arg(&file).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => {
            Some(format!("{at}: ptxas rejects kernel {}:\n{}\n{}{}", k.name, k.source, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        }
        Err(e) => Some(format!("{at}: cannot run {}: {e}", ptxas.display())),
    }
}

#[test]
fn every_generated_kernel_compiles_for_sm_90() {
    if let Err(e) = nvrtc::available() {
        return missing(&e.to_string());
    }
    let Some(ptxas) = ptxas() else {
        return missing("ptxas not found on PATH (or set SHARDPLAN_PTXAS); `pip install nvidia-cuda-nvcc==13.0.88` provides it");
    };
    let dir = std::env::temp_dir().join(format!("shardplan-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary folder");
    let all = kernels();
    assert!(all.len() > 30, "only {} distinct kernels", all.len());
    // One kernel at a time per core: NVRTC and ptxas take most of the time.
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let numbered: Vec<(usize, &(String, Kernel))> = all.iter().enumerate().collect();
    let chunk = numbered.len().div_ceil(workers);
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = numbered
            .chunks(chunk)
            .map(|part| s.spawn(|| part.iter().filter_map(|(i, (at, k))| check_kernel(*i, at, k, &ptxas, &dir)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a checking thread panicked")).collect()
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{} of {} kernels fail:\n\n{}", failures.len(), all.len(), failures.join("\n\n"));
    println!("{} distinct kernels compile for {ARCH}", all.len());
}

/// Deterministic pseudo-random numbers (a 64-bit LCG).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Host data of one buffer.
#[derive(Clone, Debug)]
enum Host {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

/// On a GPU: every distinct kernel of every example, run on random
/// operands, against the CPU backend on the same operands. Skipped where no
/// GPU can be used (the PTX test above covers compilation everywhere).
#[test]
fn generated_kernels_match_the_cpu_on_a_gpu() {
    use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
    use shardplan_compiler::graph::Op;
    use shardplan_compiler::kernel::{BufId, BufKind, Elem, StepKind};
    use shardplan_runtime::backend::cpu::{jit::Jit, ops, Arg, Operand};
    use shardplan_runtime::backend::cuda::driver;

    if let Err(e) = driver::available().map_err(|e| e.to_string()).and_then(|_| nvrtc::available().map_err(|e| e.to_string())) {
        eprintln!("skipped: no GPU to run kernels on ({e})");
        return;
    }
    let ctx = CudaContext::new(0).expect("device 0");
    let arch = driver::arch(ctx.compute_capability().expect("compute capability"));
    let stream = ctx.default_stream();
    let mut jit = Jit::new().expect("jit");
    let mut seen = HashSet::new();
    let mut rng = Lcg(7);
    let (mut checked, mut failures) = (0, Vec::new());
    for (name, p) in programs() {
        for (si, step) in p.steps.iter().enumerate() {
            let launches = codegen::lower(step, &p).expect("lowers");
            let kernels: Vec<Kernel> = launches.into_iter().filter_map(|l| if let Launch::Kernel(k) = l { Some(k) } else { None }).collect();
            if kernels.is_empty() || !seen.insert(kernels.iter().map(|k| k.source.clone()).collect::<Vec<_>>()) {
                continue;
            }
            let at = format!("{name} step {si} ({:?})", step.kind);
            // Random operands; ids and labels within their tables.
            let buf = |b: BufId| &p.buffers[b.0 as usize];
            let bound = match &step.kind {
                StepKind::Op(Op::Embedding) => buf(step.inputs[0]).shape[0],
                StepKind::Op(Op::EmbeddingGrad) => buf(step.output).shape[0],
                StepKind::Op(Op::CrossEntropy | Op::CrossEntropyGrad) => *buf(step.inputs[0]).shape.last().unwrap_or(&1),
                _ => 1,
            };
            // bfloat16 conversions are compared as their f32 round trip by `shardplan selftest`.
            if matches!(step.kind, StepKind::Op(Op::ToBf16 | Op::FromBf16)) {
                continue;
            }
            let mut data: BTreeMap<BufId, Host> = BTreeMap::new();
            let mut fill = |b: BufId, data: &mut BTreeMap<BufId, Host>| {
                let n = buf(b).len();
                let h = match buf(b).elem {
                    Elem::F32 => Host::F32((0..n).map(|_| (rng.next() * 4.0 - 2.0) as f32).collect()),
                    Elem::I32 => Host::I32((0..n).map(|_| (rng.next() * bound as f64) as i32).collect()),
                    // Only the conversions read or write bfloat16 (skipped above).
                    Elem::Bf16 => Host::I32(Vec::new()),
                };
                data.insert(b, h);
            };
            for &b in &step.inputs {
                fill(b, &mut data);
            }
            if let StepKind::Op(Op::MaxGrad { axes, keepdims }) = &step.kind {
                // y is the maximum of x, so that ties and shares are exercised.
                let Some(Host::F32(x)) = data.get(&step.inputs[0]).cloned() else { panic!() };
                let mut y = vec![0.0f32; buf(step.inputs[1]).len()];
                let xs = &buf(step.inputs[0]).shape;
                ops::run(&Op::Max { axes: axes.clone(), keepdims: *keepdims }, &[Operand::f32(&x, xs)], &mut y, &buf(step.inputs[1]).shape, 1).expect("max");
                data.insert(step.inputs[1], Host::F32(y));
            }
            let acc = match &step.kind {
                StepKind::Op(Op::Accumulate(k)) => p.buffers.iter().position(|b| b.kind == BufKind::Accum(*k)).map(|i| BufId(i as u32)),
                _ => None,
            };
            let target = acc.unwrap_or(step.output);
            if let Some(a) = acc {
                fill(a, &mut data);
            } else if matches!(step.kind, StepKind::Fused(_)) && step.inputs.first().is_some_and(|b| p.storage(*b) == p.storage(step.output)) {
                // An update in place starts from input 0's values.
                let start = data[&step.inputs[0]].clone();
                data.insert(step.output, start);
            } else {
                data.insert(step.output, Host::F32(vec![0.0; buf(step.output).len()]));
            }

            // The CPU's result.
            let mut want = match data.get(&target) {
                Some(Host::F32(v)) => v.clone(),
                _ => panic!("{at}: the output is not f32"),
            };
            let operand = |b: &BufId| -> Operand<'_> {
                let shape = buf(*b).shape.as_slice();
                match &data[b] {
                    Host::F32(v) => Operand { data: Arg::F32(v), shape },
                    Host::I32(v) => Operand { data: Arg::I32(v), shape },
                }
            };
            let f32s = |bs: &[BufId]| -> Vec<&[f32]> {
                bs.iter()
                    .map(|b| match &data[b] {
                        Host::F32(v) => v.as_slice(),
                        Host::I32(_) => &[][..],
                    })
                    .collect()
            };
            let out_shape = buf(step.output).shape.clone();
            let cpu = match &step.kind {
                StepKind::Fused(f) => jit.compile(f).and_then(|k| k.run(&f32s(&step.inputs), &mut want)),
                StepKind::Reduce { op, epilogue } => {
                    let n = op.arity();
                    let args: Vec<Operand<'_>> = step.inputs[..n].iter().map(operand).collect();
                    ops::run(op, &args, &mut want, &out_shape, 1).and_then(|()| jit.compile(epilogue)?.run_in_place(&f32s(&step.inputs[n..]), &mut want))
                }
                StepKind::Broadcast => ops::broadcast(&operand(&step.inputs[0]), &mut want, &out_shape),
                StepKind::Op(Op::Accumulate(_)) => {
                    for (w, x) in want.iter_mut().zip(f32s(&step.inputs)[0]) {
                        *w += x;
                    }
                    Ok(())
                }
                StepKind::Op(op) => ops::run(op, &step.inputs.iter().map(operand).collect::<Vec<_>>(), &mut want, &out_shape, 1),
                StepKind::MatMul { .. } => continue,
            };
            if let Err(e) = cpu {
                failures.push(format!("{at}: the CPU fails: {e}"));
                continue;
            }

            // The GPU's result.
            let mut dev_f = BTreeMap::new();
            let mut dev_i = BTreeMap::new();
            for (b, h) in &data {
                match h {
                    Host::F32(v) => {
                        dev_f.insert(*b, stream.clone_htod(&if v.is_empty() { vec![0.0] } else { v.clone() }).expect("upload"));
                    }
                    Host::I32(v) => {
                        dev_i.insert(*b, stream.clone_htod(&if v.is_empty() { vec![0] } else { v.clone() }).expect("upload"));
                    }
                }
            }
            for k in &kernels {
                let ptx = nvrtc::compile(&k.source, &arch).unwrap_or_else(|e| panic!("{at}: {e}"));
                let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).expect("module");
                let func = module.load_function(&k.name).expect("function");
                let mut launch = stream.launch_builder(&func);
                for b in &k.args {
                    match (dev_f.get(b), dev_i.get(b)) {
                        (Some(s), _) => launch.arg(s),
                        (_, Some(s)) => launch.arg(s),
                        _ => panic!("{at}: argument {b:?} has no data"),
                    };
                }
                let cfg = LaunchConfig { grid_dim: (k.grid, 1, 1), block_dim: (k.block, 1, 1), shared_mem_bytes: k.shared_bytes };
                // SAFETY: each argument is a device allocation of its buffer's
                // length (one element for an empty buffer), of the element type
                // the kernel declares; the test checks the kernels stay in bounds.
                unsafe { launch.launch(cfg) }.unwrap_or_else(|e| panic!("{at}: launch: {e:?}"));
            }
            let got: Vec<f32> = stream.clone_dtoh(&dev_f[&target]).expect("download");
            stream.synchronize().unwrap_or_else(|e| panic!("{at}: {e:?}\n{}", kernels[0].source));
            let scale = want.iter().filter(|v| v.is_finite()).fold(1.0f32, |m, v| m.max(v.abs()));
            let bad = want.iter().zip(&got).enumerate().find(|(_, (w, g))| {
                let same = w.to_bits() == g.to_bits() || (w.is_nan() && g.is_nan());
                // NaN on one side only is never close.
                let close = (*w - *g).abs() <= 1e-5 * w.abs() + 2e-6 * scale;
                !same && !close
            });
            checked += 1;
            if let Some((i, (w, g))) = bad {
                failures
                    .push(format!("{at}: element {i}: CPU {w}, GPU {g} (scale {scale})\n{}", kernels.iter().map(|k| k.source.as_str()).collect::<String>()));
            }
        }
    }
    println!("{checked} steps agree with the CPU");
    assert!(failures.is_empty(), "{} of {checked} steps differ:\n\n{}", failures.len(), failures.join("\n\n"));
}
