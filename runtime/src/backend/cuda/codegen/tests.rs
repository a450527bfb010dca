//! Code generation for every example's programs (no GPU needed): every step
//! lowers, names are stable, arguments are buffers of the right type, and
//! matrix products agree with their buffers.

use super::super::{Kernel, Launch};
use super::{lower, lower_program};
use shardplan_compiler::check_source;
use shardplan_compiler::kernel::{BufId, Elem, Program, StepKind};

/// (name, program) of every example, as `selftest` compiles them: the
/// single-device program, and each device program of the placed ones.
fn programs() -> Vec<(String, Program)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut files: Vec<_> = std::fs::read_dir(dir).expect("examples").filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.retain(|p| p.extension().and_then(|x| x.to_str()) == Some("plan"));
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let src = std::fs::read(&path).expect("read");
        let (c, d) = check_source(&src);
        let c = c.unwrap_or_else(|| panic!("{name}: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        let found = crate::selftest::programs(&name, &c).unwrap_or_else(|d| panic!("{name}: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
        if let Some(crate::selftest::SingleOnly::NotCompiled(d)) = &found.single_only {
            panic!("{name}: {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>());
        }
        out.extend(found.programs);
    }
    assert!(out.len() >= 8, "only {} programs", out.len());
    out
}

#[test]
fn every_example_lowers() {
    let mut kernels = 0;
    let mut gemms = 0;
    let mut comms = 0;
    for (name, p) in programs() {
        let launches = lower_program(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (si, (step, ls)) in p.steps.iter().zip(&launches).enumerate() {
            let at = format!("{name} step {si} ({:?})", step.kind);
            for l in ls {
                match l {
                    Launch::Kernel(k) => {
                        kernels += 1;
                        check_kernel(&p, k, &at);
                    }
                    Launch::Gemm(g) => {
                        gemms += 1;
                        let len = |b: BufId| p.buffers[b.0 as usize].len();
                        for (&oa, &ob) in g.a_offsets.iter().zip(&g.b_offsets) {
                            assert!(oa + g.m * g.k <= len(g.a), "{at}: a read past its end");
                            assert!(ob + g.k * g.n <= len(g.b), "{at}: b read past its end");
                        }
                        assert_eq!(g.a_offsets.len(), g.b_offsets.len(), "{at}");
                        assert_eq!(g.a_offsets.len() * g.m * g.n, len(g.out), "{at}: products fill the output");
                        assert!(matches!(step.kind, StepKind::MatMul { .. }), "{at}");
                    }
                    Launch::Comm => {
                        comms += 1;
                        assert!(matches!(&step.kind, StepKind::Op(op) if op.is_comm()), "{at}");
                    }
                }
            }
            match &step.kind {
                StepKind::Reduce { .. } => assert_eq!(ls.len(), 2, "{at}: a reduction and its epilogue"),
                _ => assert!(ls.len() <= 1, "{at}"),
            }
        }
    }
    assert!(kernels > 100 && gemms > 10 && comms > 10, "{kernels} kernels, {gemms} gemms, {comms} transfers");
}

/// Arguments name buffers of the parameters' types; no two arguments share
/// memory with a written one; the name is the hash of the source.
fn check_kernel(p: &Program, k: &Kernel, at: &str) {
    let head = k.source.lines().find(|l| l.starts_with("extern \"C\" __global__ void ")).unwrap_or_else(|| panic!("{at}: no kernel\n{}", k.source));
    assert!(head.contains(&format!("void __launch_bounds__({}) {}(", k.block, k.name)), "{at}: {head}");
    assert!(k.name.starts_with("sp_") && k.name.len() == 19, "{at}: {}", k.name);
    assert_eq!(k.name, format!("sp_{:016x}", super::content_hash(&k.source.replacen(&k.name, "KERNEL_NAME", 1))), "{at}");
    let params: Vec<&str> =
        head.split_once(&format!("{}(", k.name)).and_then(|(_, r)| r.rsplit_once(')')).map(|(ps, _)| ps.split(", ").collect()).unwrap_or_default();
    assert_eq!(params.len(), k.args.len(), "{at}: {head}");
    for (param, b) in params.iter().zip(&k.args) {
        let buf = &p.buffers[b.0 as usize];
        let want = match buf.elem {
            Elem::F32 => "float*",
            Elem::I32 => "int*",
            Elem::Bf16 => "unsigned short*",
        };
        assert!(param.contains(want), "{at}: {param} for {:?} buffer {}", buf.elem, b.0);
    }
    let written: Vec<BufId> = params.iter().zip(&k.args).filter(|(param, _)| !param.starts_with("const ")).map(|(_, b)| p.storage(*b)).collect();
    assert!(!written.is_empty(), "{at}: writes nothing");
    for (i, a) in k.args.iter().enumerate() {
        for (j, b) in k.args.iter().enumerate() {
            if i != j && written.contains(&p.storage(*a)) {
                assert_ne!(p.storage(*a), p.storage(*b), "{at}: arguments {i} and {j} share memory\n{}", k.source);
            }
        }
    }
    assert!(k.grid >= 1 && k.block >= 32 && k.block <= 1024 && k.block.is_power_of_two(), "{at}");
}

#[test]
fn lowering_is_stable() {
    for (name, p) in programs().into_iter().take(3) {
        let a = lower_program(&p).expect("lowers");
        let b = lower_program(&p.clone()).expect("lowers");
        assert_eq!(a, b, "{name}");
    }
}

/// A small fused kernel, as golden text.
#[test]
fn fused_source() {
    use shardplan_compiler::graph::{NodeId, Role};
    use shardplan_compiler::kernel::{Binary, BufKind, Buffer, Fused, Inst, Step, Unary};
    let buf = |kind, shape: &[usize]| Buffer { kind, elem: Elem::F32, shape: shape.to_vec(), node: NodeId(0) };
    let f = Fused {
        rows: 4,
        cols: 8,
        row_strides: vec![8, 0],
        col_strides: vec![1, 1],
        body: vec![Inst::Load(0), Inst::Load(1), Inst::Binary(Binary::Add, 0, 1), Inst::Unary(Unary::Relu, 2)],
    };
    let p = Program {
        buffers: vec![buf(BufKind::Input(0), &[4, 8]), buf(BufKind::Param(0), &[8]), buf(BufKind::Temp, &[4, 8])],
        steps: vec![Step { kind: StepKind::Fused(f), role: Role::Forward, inputs: vec![BufId(0), BufId(1)], output: BufId(2) }],
        loss: BufId(2),
        assigns: vec![],
    };
    let l = lower(&p.steps[0], &p).expect("lowers");
    let [Launch::Kernel(k)] = l.as_slice() else { panic!("{l:?}") };
    assert_eq!((k.grid, k.block, k.args.clone()), (1, 256, vec![BufId(0), BufId(1), BufId(2)]));
    let want = "// fused [4 × 8]
typedef unsigned int I;
extern \"C\" __global__ void __launch_bounds__(256) NAME(const float* __restrict__ in0, const float* __restrict__ in1, float* __restrict__ out) {
  for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < 32u; i += (I)gridDim.x * blockDim.x) {
    const I c = i % 8u;
    const float v0 = in0[i];
    const float v1 = in1[c];
    const float v2 = v0 + v1;
    const float v3 = (v2 > 0.0f ? v2 : 0.0f);
    out[i] = v3;
  }
}
";
    assert_eq!(k.source, want.replace("NAME", &k.name));
}

/// A step that does not fit its kernel is an error naming the op, the step
/// and what does not fit.
#[test]
fn malformed_steps_are_named() {
    use super::CodegenError;
    use shardplan_compiler::graph::{NodeId, Op, Role};
    use shardplan_compiler::kernel::{BufKind, Buffer, Step};
    let buf = |shape: &[usize]| Buffer { kind: BufKind::Temp, elem: Elem::F32, shape: shape.to_vec(), node: NodeId(0) };
    let step = |kind, inputs: Vec<u32>, output| Step { kind, role: Role::Forward, inputs: inputs.into_iter().map(BufId).collect(), output: BufId(output) };
    let mut p = Program {
        buffers: vec![buf(&[2, 3]), buf(&[2, 3])],
        steps: vec![step(StepKind::Op(Op::Softmax { axis: 5 }), vec![0], 1)],
        loss: BufId(1),
        assigns: vec![],
    };
    let e = lower_program(&p).unwrap_err();
    let axis = CodegenError::Axis { axis: 5, shape: vec![2, 3] };
    let op = CodegenError::Op { op: "softmax 5".into(), error: Box::new(axis) };
    assert_eq!(e, CodegenError::Step { step: 0, error: Box::new(op) });
    assert_eq!(e.to_string(), "step 0: softmax 5: axis 5 is out of range for [2, 3]");
    p.steps[0].output = BufId(7);
    let e = lower(&p.steps[0], &p).unwrap_err();
    assert_eq!(e, CodegenError::NoBuffer { buffer: BufId(7), buffers: 2 });
    assert_eq!(e.to_string(), "buffer 7 does not exist (2 buffers)");
}
