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

mod elementwise;
mod reduce;
mod rowwise;
#[cfg(test)]
mod tests;
mod writer;

use super::{Gemm, Kernel, Launch};
use crate::backend::cpu::ops::{batch_dims, broadcast_batch};
use shardplan_compiler::graph::Op;
use shardplan_compiler::kernel::{BufId, BufKind, Buffer, Elem, Program, Step, StepKind};

/// What `step` becomes on a GPU.
pub fn lower(step: &Step, program: &Program) -> Result<Vec<Launch>, String> {
    let io = Io { p: program, ins: &step.inputs, out: step.output };
    io.check()?;
    let kernel = |k: Option<Kernel>| k.map(Launch::Kernel).into_iter().collect::<Vec<_>>();
    match &step.kind {
        StepKind::Fused(f) => Ok(kernel(elementwise::fused(f, &io)?)),
        StepKind::Reduce { op, epilogue } => {
            let n = op.arity();
            if step.inputs.len() < n {
                return Err(format!("{} with an epilogue has {} operands, takes at least {n}", op.name(), step.inputs.len()));
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
pub fn lower_program(program: &Program) -> Result<Vec<Vec<Launch>>, String> {
    program.steps.iter().enumerate().map(|(i, s)| lower(s, program).map_err(|e| format!("step {i}: {e}"))).collect()
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
    fn check(&self) -> Result<(), String> {
        for b in self.ins.iter().chain([&self.out]) {
            if self.p.buffers.get(b.0 as usize).is_none() {
                return Err(format!("buffer {} does not exist ({} buffers)", b.0, self.p.buffers.len()));
            }
        }
        Ok(())
    }

    fn buf(&self, b: BufId) -> &Buffer {
        &self.p.buffers[b.0 as usize]
    }

    fn input(&self, i: usize) -> Result<&Buffer, String> {
        self.ins.get(i).map(|b| self.buf(*b)).ok_or_else(|| format!("operand {i} is missing"))
    }

    /// Operand `i`, which must hold `elem`.
    fn typed(&self, i: usize, elem: Elem) -> Result<&Buffer, String> {
        let b = self.input(i)?;
        if b.elem != elem {
            return Err(format!("operand {i} holds {:?}, expected {elem:?}", b.elem));
        }
        Ok(b)
    }

    fn shape(&self, i: usize) -> Result<&[usize], String> {
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

    fn arity(&self, n: usize, what: &str) -> Result<(), String> {
        if self.ins.len() == n {
            Ok(())
        } else {
            Err(format!("{what} takes {n} operands, got {}", self.ins.len()))
        }
    }

    fn expect_out(&self, want: &[usize]) -> Result<(), String> {
        if self.out_shape() == want {
            Ok(())
        } else {
            Err(format!("output shape {:?}, expected {want:?}", self.out_shape()))
        }
    }

    fn out_f32(&self) -> Result<(), String> {
        if self.out_buf().elem == Elem::F32 {
            Ok(())
        } else {
            Err("the output is not f32".into())
        }
    }
}

/// A library op (or a reduction without its epilogue).
fn op_launches(op: &Op, io: &Io<'_>) -> Result<Vec<Launch>, String> {
    if op.is_comm() {
        return Ok(vec![Launch::Comm]);
    }
    let name = op.name();
    let with = |e: String| format!("{name}: {e}");
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
        Op::LayerNorm { eps } => rowwise::layer_norm(io, *eps),
        Op::LayerNormGradX { eps } => rowwise::layer_norm_grad_x(io, *eps),
        Op::LayerNormGradGamma { eps } => rowwise::layer_norm_grad_gamma(io, *eps),
        Op::CausalMask { fill } => elementwise::causal_mask(io, *fill),
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
                return Err(format!("accumulator {k} does not exist"));
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
        | Op::Assign(_) => return Err(format!("{name} is not a library op")),
    }
    .map_err(with)?;
    Ok(k.map(Launch::Kernel).into_iter().collect())
}

/// `a @ b` with numpy batch broadcasting, `a` (`b`) stored with its last
/// two dims swapped when `trans_a` (`trans_b`).
fn gemm(io: &Io<'_>, trans_a: bool, trans_b: bool) -> Result<Vec<Launch>, String> {
    io.arity(2, "matmul")?;
    let (a, b) = (io.typed(0, Elem::F32)?, io.typed(1, Elem::F32)?);
    io.out_f32()?;
    let (sa, sb) = (a.shape.as_slice(), b.shape.as_slice());
    let (&[ref a_batch @ .., a0, a1], &[ref b_batch @ .., b0, b1]) = (sa, sb) else {
        return Err(format!("matmul operands must have rank ≥ 2, got {sa:?} and {sb:?}"));
    };
    let (m, k) = if trans_a { (a1, a0) } else { (a0, a1) };
    let (kb, n) = if trans_b { (b1, b0) } else { (b0, b1) };
    if k != kb {
        return Err(format!("matmul inner dims differ: {sa:?} @ {sb:?}"));
    }
    let Some(batch) = broadcast_batch(a_batch, b_batch) else {
        return Err(format!("matmul batch dims of {sa:?} and {sb:?} do not broadcast"));
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
