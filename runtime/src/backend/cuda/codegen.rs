//! CUDA C source for every step of a kernel program.
//!
//! Input: one [`Step`] of a [`Program`]. Output: the [`Launch`]es that do it
//! on a GPU, in order: generated kernels (CUDA C, compiled by NVRTC), matrix
//! products for cuBLAS, or `Comm` for transfers and collectives.
//!
//! Semantics are the CPU backend's (`backend::cpu::ops`, the fused-kernel
//! JIT, `exec`), which follow the reference interpreter; results agree to
//! within f32 rounding. Sums the CPU accumulates in f64 are accumulated in
//! `double` here; everything else is `float`. Reductions run in a fixed
//! order (per-thread loops, then a fixed tree in shared memory or across a
//! warp), so a kernel gives bit-identical results run after run. No atomics.
//!
//! Conventions every launch follows (the executor relies on them):
//! - A kernel's `args` are buffer ids of the program as the step names them
//!   (follow aliases with `Program::storage`), in parameter order: the
//!   step's operands, then its output. Exceptions: a reduction's epilogue
//!   takes `[output (read and written in place), remaining operands…]`;
//!   `Accumulate(k)` takes `[accumulator k, operand]`.
//! - Grids are 1-D; `shared_bytes` is 0 (shared memory is static).
//! - A step whose output is empty has no launch.
//! - Ids and labels (i32) are never read out of bounds: an id outside its
//!   table reads zeros (and a gradient for it goes nowhere), a label outside
//!   its classes contributes nothing.
//!
//! A step whose operands or output do not fit its kernel (a malformed
//! program: a bug in shardplan) is a [`CodegenError`] naming the op and what
//! does not fit; nothing here panics on a malformed program.

mod elementwise;
mod reduce;
mod rowwise;
#[cfg(test)]
mod tests;
mod writer;

use super::{Gemm, Kernel, Launch};
use crate::backend::cpu::ops::{batch_dims, broadcast_batch};
use shardplan_compiler::graph::Op;
use shardplan_compiler::kernel::{BufId, BufKind, Buffer, Elem, FusedError, Program, Step, StepKind};

/// Why a step cannot be lowered: its operands or output do not fit its
/// kernel. Every variant is a bug in whatever made the program.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CodegenError {
    /// Lowering step `step` of a program failed.
    #[error("step {step}: {error}")]
    Step { step: usize, error: Box<CodegenError> },
    /// Lowering library op `op` failed.
    #[error("{op}: {error}")]
    Op { op: String, error: Box<CodegenError> },
    /// The step names a buffer the program does not have.
    #[error("buffer {} does not exist ({buffers} buffers)", .buffer.0)]
    NoBuffer { buffer: BufId, buffers: usize },
    /// A kernel reads operand `index`, which the step does not have.
    #[error("operand {index} is missing")]
    MissingOperand { index: usize },
    /// Operand `index` holds another element type than the kernel reads.
    #[error("operand {index} holds {got:?}, expected {want:?}")]
    Elem { index: usize, got: Elem, want: Elem },
    /// `what` given another number of operands than it takes.
    #[error("{what} takes {want} operands, got {got}")]
    Arity { what: String, want: usize, got: usize },
    /// A reduction with an epilogue has fewer operands than the reduction takes.
    #[error("{op} with an epilogue has {got} operands, takes at least {want}")]
    EpilogueOperands { op: String, got: usize, want: usize },
    /// The output has another shape than the kernel makes.
    #[error("output shape {got:?}, expected {want:?}")]
    OutShape { got: Vec<usize>, want: Vec<usize> },
    /// The output of a kernel that writes f32 holds another element type.
    #[error("the output is not f32")]
    OutNotF32,
    /// The output of a loss is not a scalar.
    #[error("output shape {shape:?} is not a scalar")]
    NotScalar { shape: Vec<usize> },
    /// An axis outside the operand's (or the output's) dims.
    #[error("axis {axis} is out of range for {shape:?}")]
    Axis { axis: usize, shape: Vec<usize> },
    /// A shape that does not broadcast to the one the kernel makes.
    #[error("{from:?} does not broadcast to {to:?}")]
    Broadcast { from: Vec<usize>, to: Vec<usize> },
    /// A copy between buffers of different element types.
    #[error("copies {from:?} into {to:?}")]
    Copy { from: Elem, to: Elem },
    /// Operand `what` has another number of elements than the kernel reads.
    #[error("{what} has {got} elements, expected {want}")]
    Len { what: &'static str, got: usize, want: usize },
    /// A fused kernel (or an epilogue) that does not read its step's operands.
    #[error(transparent)]
    Fused(#[from] FusedError),
    /// The op has no library kernel (element-wise ops are fused, sources
    /// and assignments are the executor's).
    #[error("{op} is not a library op")]
    NotLibrary { op: String },
    /// `Accumulated(index)` names an accumulator the program does not have.
    #[error("accumulator {index} does not exist")]
    NoAccumulator { index: usize },
    /// The operands or output do not fit the kernel in another way; the
    /// message says how.
    #[error("{0}")]
    Operands(String),
}

/// What `step` becomes on a GPU.
pub fn lower(step: &Step, program: &Program) -> Result<Vec<Launch>, CodegenError> {
    let io = Io { p: program, ins: &step.inputs, out: step.output };
    io.check()?;
    let kernel = |k: Option<Kernel>| k.map(Launch::Kernel).into_iter().collect::<Vec<_>>();
    match &step.kind {
        // An update in place: input 0 is the output's own memory.
        StepKind::Fused(f) if step.inputs.first().is_some_and(|b| program.storage(*b) == program.storage(step.output)) => {
            Ok(kernel(elementwise::epilogue(f, &Io { p: program, ins: &step.inputs[1..], out: step.output })?))
        }
        StepKind::Fused(f) => Ok(kernel(elementwise::fused(f, &io)?)),
        StepKind::Reduce { op, epilogue } => {
            let n = op.arity();
            if step.inputs.len() < n {
                return Err(CodegenError::EpilogueOperands { op: op.name(), got: step.inputs.len(), want: n });
            }
            let head = Io { p: program, ins: &step.inputs[..n], out: step.output };
            let mut launches = op_launches(op, &head)?;
            launches.extend(kernel(elementwise::epilogue(epilogue, &Io { p: program, ins: &step.inputs[n..], out: step.output })?));
            Ok(launches)
        }
        StepKind::Broadcast => Ok(kernel(elementwise::broadcast(&io)?)),
        StepKind::MatMul { trans_a, trans_b } => gemm(&io, *trans_a, *trans_b),
        StepKind::Op(op) => op_launches(op, &io),
    }
}

/// Every step of `program` lowered, in order.
pub fn lower_program(program: &Program) -> Result<Vec<Vec<Launch>>, CodegenError> {
    program.steps.iter().enumerate().map(|(i, s)| lower(s, program).map_err(|e| CodegenError::Step { step: i, error: Box::new(e) })).collect()
}

/// The stable 64-bit hash kernel names and module caches use (FNV-1a).
pub fn content_hash(text: &str) -> u64 {
    writer::fnv1a(text.as_bytes())
}

/// A launch as `inspect --kernels cuda` shows it: the launch shape and
/// arguments, then the source (or the product's dimensions).
pub fn describe(launch: &Launch, program: &Program) -> String {
    let name = |b: &BufId| {
        let buf = program.buffers.get(b.0 as usize);
        format!("b{}{:?}", b.0, buf.map(|x| x.shape.clone()).unwrap_or_default())
    };
    match launch {
        Launch::Kernel(k) => {
            let args: Vec<String> = k.args.iter().map(name).collect();
            format!("kernel {}: grid {} × block {}, args {}\n{}", k.name, k.grid, k.block, args.join(" "), k.source)
        }
        Launch::Gemm(g) => {
            let strides = match g.strides() {
                Some((sa, sb)) => format!("strides a {sa}, b {sb}"),
                None => format!("offsets a {:?}, b {:?}", g.a_offsets, g.b_offsets),
            };
            format!(
                "gemm {}{} · {}{} → {}: {} × [{} × {}] · [{} × {}], {strides}\n",
                name(&g.a),
                if g.trans_a { "ᵀ" } else { "" },
                name(&g.b),
                if g.trans_b { "ᵀ" } else { "" },
                name(&g.out),
                g.a_offsets.len(),
                g.m,
                g.k,
                g.k,
                g.n
            )
        }
        Launch::Comm => "transfer or collective (through the executor's Comm)\n".into(),
    }
}

/// The operands and output of a step (or of part of one).
pub(crate) struct Io<'a> {
    p: &'a Program,
    ins: &'a [BufId],
    out: BufId,
}

impl Io<'_> {
    /// Every buffer named exists.
    fn check(&self) -> Result<(), CodegenError> {
        for b in self.ins.iter().chain([&self.out]) {
            if self.p.buffers.get(b.0 as usize).is_none() {
                return Err(CodegenError::NoBuffer { buffer: *b, buffers: self.p.buffers.len() });
            }
        }
        Ok(())
    }

    fn buf(&self, b: BufId) -> &Buffer {
        &self.p.buffers[b.0 as usize]
    }

    fn input(&self, i: usize) -> Result<&Buffer, CodegenError> {
        self.ins.get(i).map(|b| self.buf(*b)).ok_or(CodegenError::MissingOperand { index: i })
    }

    /// Operand `i`, which must hold `elem`.
    fn typed(&self, i: usize, elem: Elem) -> Result<&Buffer, CodegenError> {
        let b = self.input(i)?;
        if b.elem != elem {
            return Err(CodegenError::Elem { index: i, got: b.elem, want: elem });
        }
        Ok(b)
    }

    fn shape(&self, i: usize) -> Result<&[usize], CodegenError> {
        Ok(&self.input(i)?.shape)
    }

    fn out_buf(&self) -> &Buffer {
        self.buf(self.out)
    }

    fn out_shape(&self) -> &[usize] {
        &self.out_buf().shape
    }

    fn out_len(&self) -> usize {
        self.out_buf().len()
    }

    /// The largest element count among the operands and the output.
    fn largest(&self) -> usize {
        self.ins.iter().chain([&self.out]).map(|b| self.buf(*b).len()).max().unwrap_or(0)
    }

    fn arity(&self, n: usize, what: &str) -> Result<(), CodegenError> {
        if self.ins.len() == n {
            Ok(())
        } else {
            Err(CodegenError::Arity { what: what.to_string(), want: n, got: self.ins.len() })
        }
    }

    fn expect_out(&self, want: &[usize]) -> Result<(), CodegenError> {
        if self.out_shape() == want {
            Ok(())
        } else {
            Err(CodegenError::OutShape { got: self.out_shape().to_vec(), want: want.to_vec() })
        }
    }

    fn out_f32(&self) -> Result<(), CodegenError> {
        if self.out_buf().elem == Elem::F32 {
            Ok(())
        } else {
            Err(CodegenError::OutNotF32)
        }
    }
}

/// A library op (or a reduction without its epilogue).
fn op_launches(op: &Op, io: &Io<'_>) -> Result<Vec<Launch>, CodegenError> {
    if op.is_comm() {
        return Ok(vec![Launch::Comm]);
    }
    let name = op.name();
    let with = |e: CodegenError| CodegenError::Op { op: name.clone(), error: Box::new(e) };
    if !matches!(op, Op::Pack { .. }) {
        io.arity(op.arity(), &name)?;
    }
    let k: Option<Kernel> = match op {
        Op::MatMul => return gemm(io, false, false).map_err(with),
        Op::Transpose { perm } => elementwise::transpose(io, perm),
        Op::Sum { axes, .. } => reduce::reduce(io, reduce::Kind::Sum, axes, &name),
        Op::Mean { axes, .. } => reduce::reduce(io, reduce::Kind::Mean, axes, &name),
        Op::Max { axes, .. } => reduce::reduce(io, reduce::Kind::Max, axes, &name),
        Op::SumTo => reduce::sum_to(io),
        Op::MaxGrad { axes, .. } => reduce::max_grad(io, axes),
        Op::Expand { axes, .. } => elementwise::expand(io, axes),
        Op::Softmax { axis } => rowwise::softmax(io, *axis, false),
        Op::LogSoftmax { axis } => rowwise::softmax(io, *axis, true),
        Op::SoftmaxGrad { axis } => rowwise::softmax_grad(io, *axis, false),
        Op::LogSoftmaxGrad { axis } => rowwise::softmax_grad(io, *axis, true),
        Op::LayerNorm { eps } => rowwise::layer_norm(io, *eps, false),
        Op::LayerNormGradX { eps } => rowwise::layer_norm_grad_x(io, *eps, false),
        Op::LayerNormGradGamma { eps } => rowwise::layer_norm_grad_gamma(io, *eps, false),
        Op::RmsNorm { eps } => rowwise::layer_norm(io, *eps, true),
        Op::RmsNormGradX { eps } => rowwise::layer_norm_grad_x(io, *eps, true),
        Op::RmsNormGradGamma { eps } => rowwise::layer_norm_grad_gamma(io, *eps, true),
        Op::CausalMask { fill } => elementwise::causal_mask(io, *fill),
        Op::Dropout { p, seed } => elementwise::dropout(io, *p, *seed),
        Op::ToBf16 => elementwise::to_bf16(io),
        Op::FromBf16 => elementwise::from_bf16(io),
        Op::Im2Col { kh, kw, stride, padding, fill } => elementwise::im2col(io, (*kh, *kw, *stride, *padding), *fill),
        Op::Col2Im { kh, kw, stride, padding } => elementwise::col2im(io, (*kh, *kw, *stride, *padding)),
        Op::Rope { head_dim, base, inverse } => elementwise::rope(io, *head_dim, *base, *inverse),
        Op::Embedding => elementwise::embedding(io),
        Op::EmbeddingGrad => reduce::embedding_grad(io),
        Op::CrossEntropy => rowwise::cross_entropy(io),
        Op::CrossEntropyGrad => rowwise::cross_entropy_grad(io),
        Op::Mse => rowwise::mse(io),
        Op::MseGrad => elementwise::mse_grad(io),
        Op::Slice { dim, start } => elementwise::slice(io, *dim, *start),
        Op::Pack { n } => {
            io.arity(*n, &name)?;
            elementwise::pack(io)
        }
        Op::Unpack { offset } => elementwise::unpack(io, *offset),
        Op::Accumulate(k) => {
            // Adds into the accumulator (zeroed by the executor at the start of a step).
            let Some(acc) = io.p.buffers.iter().position(|b| b.kind == BufKind::Accum(*k)) else {
                return Ok(vec![]);
            };
            elementwise::accumulate(io, BufId(acc as u32), *k)
        }
        Op::Accumulated(k) => {
            let Some(acc) = io.p.buffers.iter().position(|b| b.kind == BufKind::Accum(*k)) else {
                return Err(CodegenError::NoAccumulator { index: *k });
            };
            elementwise::copy_from(io, BufId(acc as u32))
        }
        Op::AllReduce { .. } | Op::AllGather { .. } | Op::ReduceScatter { .. } | Op::AllToAll { .. } | Op::Send { .. } | Op::Recv { .. } => {
            return Ok(vec![Launch::Comm]);
        }
        Op::Input(_)
        | Op::Param(_)
        | Op::State(_)
        | Op::Hyper(_)
        | Op::Const(_)
        | Op::Add
        | Op::Sub
        | Op::Mul
        | Op::Div
        | Op::Neg
        | Op::Relu
        | Op::Gelu
        | Op::Tanh
        | Op::Sigmoid
        | Op::Exp
        | Op::Log
        | Op::Sqrt
        | Op::ReluGrad
        | Op::GeluGrad
        | Op::ClipScale { .. }
        | Op::Reshape
        | Op::Assign(_) => return Err(CodegenError::NotLibrary { op: name.clone() }),
    }
    .map_err(with)?;
    Ok(k.map(Launch::Kernel).into_iter().collect())
}

/// `a @ b` with numpy batch broadcasting, `a` (`b`) stored with its last
/// two dims swapped when `trans_a` (`trans_b`).
fn gemm(io: &Io<'_>, trans_a: bool, trans_b: bool) -> Result<Vec<Launch>, CodegenError> {
    io.arity(2, "matmul")?;
    let (a, b) = (io.typed(0, Elem::F32)?, io.typed(1, Elem::F32)?);
    io.out_f32()?;
    let (sa, sb) = (a.shape.as_slice(), b.shape.as_slice());
    let (&[ref a_batch @ .., a0, a1], &[ref b_batch @ .., b0, b1]) = (sa, sb) else {
        return Err(CodegenError::Operands(format!("matmul operands must have rank ≥ 2, got {sa:?} and {sb:?}")));
    };
    let (m, k) = if trans_a { (a1, a0) } else { (a0, a1) };
    let (kb, n) = if trans_b { (b1, b0) } else { (b0, b1) };
    if k != kb {
        return Err(CodegenError::Operands(format!("matmul inner dims differ: {sa:?} @ {sb:?}")));
    }
    let Some(batch) = broadcast_batch(a_batch, b_batch) else {
        return Err(CodegenError::Operands(format!("matmul batch dims of {sa:?} and {sb:?} do not broadcast")));
    };
    let want: Vec<usize> = batch.iter().copied().chain([m, n]).collect();
    io.expect_out(&want)?;
    if io.out_len() == 0 {
        return Ok(vec![]);
    }
    let nb: usize = batch.iter().product();
    let (a_count, b_count): (usize, usize) = (a_batch.iter().product(), b_batch.iter().product());
    let (ia, ib) = (io.ins[0], io.ins[1]);
    // One shared right operand and a full, untransposed left one: the batch
    // folds into the rows of a single product (a linear layer).
    if b_count == 1 && ((a_count == nb && !trans_a) || nb == 1) {
        return Ok(vec![Launch::Gemm(Gemm { a: ia, b: ib, out: io.out, m: nb * m, n, k, trans_a, trans_b, a_offsets: vec![0], b_offsets: vec![0] })]);
    }
    // Each product's operand offsets: an odometer over the output's batch dims.
    let dims = batch_dims(&batch, a_batch, b_batch, m * k, k * n);
    let (mut a_offsets, mut b_offsets) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
    for i in 0..nb {
        let (mut rest, mut oa, mut ob) = (i, 0, 0);
        for &(size, sa, sb) in dims.iter().rev() {
            let digit = rest % size;
            rest /= size;
            oa += digit * sa;
            ob += digit * sb;
        }
        a_offsets.push(oa);
        b_offsets.push(ob);
    }
    Ok(vec![Launch::Gemm(Gemm { a: ia, b: ib, out: io.out, m, n, k, trans_a, trans_b, a_offsets, b_offsets })])
}
