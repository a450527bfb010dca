//! Library kernels: every graph op that is neither element-wise nor free.
//!
//! Input: a graph [`Op`], its operands (row-major, dense, with shapes) and an
//! output buffer of the node's shape. Output: the op's value in f32, with the
//! semantics of the reference interpreter (`shardplan_compiler::interp`).
//!
//! Invariants: no kernel panics; malformed calls (a compiler bug) return
//! [`EngineError::Bug`], out-of-range ids and labels (bad data) return
//! [`EngineError::BadData`]. Every kernel except MatMul gives bit-identical
//! results for any `threads`: work is split so that each output element is
//! computed by one thread in a fixed order, and reductions that span the
//! split combine fixed-size partials in a fixed order.
//!
//! One deliberate departure from the interpreter: a softmax row whose
//! entries are all −∞ gives zeros (log-softmax: −∞) rather than 0/0 = NaN.

mod gather;
mod image;
mod isa;
mod lanes;
mod layout;
mod loss;
mod matmul;
mod pool;
mod reduce;
mod rowwise;
#[cfg(test)]
mod tests;

pub use matmul::matmul;
pub(crate) use matmul::{batch_dims, broadcast_batch};

use super::{Arg, Operand};
use crate::engine::EngineError;
use shardplan_compiler::graph::Op;
use std::sync::{Mutex, PoisonError};

/// Below this many elements of work a kernel runs on the calling thread:
/// starting threads costs more than it saves.
const PARALLEL_MIN: usize = 1 << 16;
/// Blocks of rows per thread in [`par_rows`].
const BLOCKS_PER_THREAD: usize = 4;

/// Runs library op `op` (any graph op that is not element-wise, not
/// `Reshape`, not a source and not `Assign`). `args` are the operands in
/// graph order with their shapes; `out` has `out_shape`.
pub fn run(op: &Op, args: &[Operand<'_>], out: &mut [f32], out_shape: &[usize], threads: usize) -> Result<(), EngineError> {
    let name = Name::Op(op);
    if args.len() != op.arity() {
        return Err(invalid(name, format!("takes {} operands, got {}", op.arity(), args.len())));
    }
    for (i, a) in args.iter().enumerate() {
        let len = match a.data {
            Arg::F32(d) => d.len(),
            Arg::I32(d) => d.len(),
        };
        if len != a.shape.iter().product::<usize>() {
            return Err(invalid(name, format!("operand {i} has {len} elements for shape {:?}", a.shape)));
        }
    }
    if out.len() != out_shape.iter().product::<usize>() {
        return Err(invalid(name, format!("output has {} elements for shape {out_shape:?}", out.len())));
    }
    let threads = threads.max(1);
    let f = |i: usize| f32_arg(name, args, i);
    let ids = |i: usize| i32_arg(name, args, i);
    match op {
        Op::MatMul => matmul(&args[0], false, &args[1], false, out, out_shape, threads),
        Op::Transpose { perm } => layout::transpose(name, f(0)?, perm, out, out_shape, threads),
        Op::Sum { axes, keepdims } => reduce::reduce(name, reduce::Kind::Sum, f(0)?, axes, *keepdims, out, out_shape, threads),
        Op::Mean { axes, keepdims } => reduce::reduce(name, reduce::Kind::Mean, f(0)?, axes, *keepdims, out, out_shape, threads),
        Op::Max { axes, keepdims } => reduce::reduce(name, reduce::Kind::Max, f(0)?, axes, *keepdims, out, out_shape, threads),
        Op::MaxGrad { axes, .. } => reduce::max_grad(name, f(0)?, f(1)?, f(2)?, axes, out, out_shape),
        Op::SumTo => reduce::sum_to(name, f(0)?, out, out_shape, threads),
        Op::Expand { axes, .. } => layout::expand(name, f(0)?, axes, out, out_shape),
        Op::Softmax { axis } => rowwise::softmax(name, f(0)?, *axis, false, out, out_shape, threads),
        Op::LogSoftmax { axis } => rowwise::softmax(name, f(0)?, *axis, true, out, out_shape, threads),
        Op::SoftmaxGrad { axis } => rowwise::softmax_grad(name, f(0)?, f(1)?, *axis, false, out, out_shape, threads),
        Op::LogSoftmaxGrad { axis } => rowwise::softmax_grad(name, f(0)?, f(1)?, *axis, true, out, out_shape, threads),
        Op::LayerNorm { eps } => rowwise::layer_norm(name, f(0)?, f(1)?, Some(f(2)?), *eps, out, out_shape, threads),
        Op::LayerNormGradX { eps } => rowwise::layer_norm_grad_x(name, f(0)?, f(1)?, f(2)?, *eps, false, out, out_shape, threads),
        Op::LayerNormGradGamma { eps } => rowwise::layer_norm_grad_gamma(name, f(0)?, f(1)?, *eps, false, out, out_shape, threads),
        Op::RmsNorm { eps } => rowwise::layer_norm(name, f(0)?, f(1)?, None, *eps, out, out_shape, threads),
        Op::RmsNormGradX { eps } => rowwise::layer_norm_grad_x(name, f(0)?, f(1)?, f(2)?, *eps, true, out, out_shape, threads),
        Op::RmsNormGradGamma { eps } => rowwise::layer_norm_grad_gamma(name, f(0)?, f(1)?, *eps, true, out, out_shape, threads),
        Op::CausalMask { fill } => layout::causal_mask(name, f(0)?, *fill as f32, out, out_shape, threads),
        Op::Dropout { p, seed } => rowwise::dropout(name, f(0)?, ids(1)?, f(2)?, (*p, *seed), out, out_shape, threads),
        Op::Im2Col { kh, kw, stride, padding, fill } => image::im2col(name, f(0)?, (*kh, *kw, *stride, *padding), *fill as f32, out, out_shape, threads),
        Op::Col2Im { kh, kw, stride, padding } => image::col2im(name, f(0)?, (*kh, *kw, *stride, *padding), out, out_shape, threads),
        Op::Rope { head_dim, base, inverse } => rowwise::rope(name, f(0)?, *head_dim, *base, *inverse, out, out_shape, threads),
        Op::Embedding => gather::embedding(name, f(0)?, ids(1)?, out, out_shape, threads),
        Op::EmbeddingGrad => gather::embedding_grad(name, ids(0)?, f(1)?, out, out_shape, threads),
        Op::CrossEntropy => loss::cross_entropy(name, f(0)?, ids(1)?, None, out, out_shape, threads),
        Op::CrossEntropyGrad => loss::cross_entropy(name, f(0)?, ids(1)?, Some(f(2)?), out, out_shape, threads),
        Op::Mse => loss::mse(name, f(0)?, f(1)?, out, out_shape, threads),
        Op::MseGrad => loss::mse_grad(name, f(0)?, f(1)?, f(2)?, out, out_shape, threads),
        Op::Slice { dim, start } => layout::slice(name, f(0)?, *dim, *start, out, out_shape),
        Op::Pack { .. } => {
            let mut at = 0;
            for i in 0..args.len() {
                let (d, _) = f(i)?;
                out[at..at + d.len()].copy_from_slice(d);
                at += d.len();
            }
            Ok(())
        }
        Op::Unpack { offset } => {
            let (d, _) = f(0)?;
            let src = d.get(*offset..offset + out.len()).ok_or_else(|| invalid(name, format!("reads {} elements at {offset} of {}", out.len(), d.len())))?;
            out.copy_from_slice(src);
            Ok(())
        }
        Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::Send { .. }
        | Op::Recv { .. }
        | Op::Accumulate(_)
        | Op::Accumulated(_) => Err(invalid(name, "runs only in a device program".into())),
        // Their bfloat16 side is not f32: the executor runs them (`to_bf16`, `from_bf16`).
        Op::ToBf16 | Op::FromBf16 => Err(invalid(name, "converts bfloat16 buffers, which the executor runs".into())),
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
        | Op::Assign(_) => Err(invalid(name, "is not a library op".into())),
    }
}

/// Copies `arg` broadcast (numpy rules, right-aligned) to `out_shape`.
/// Rounds `x` to bfloat16 (nearest, ties to even) into `y`.
pub fn to_bf16(x: &[f32], y: &mut [u16], threads: usize) {
    par_rows(y, 4096, threads, x.len(), |row, block| {
        for (v, x) in block.iter_mut().zip(&x[row * 4096..]) {
            *v = shardplan_compiler::graph::to_bf16(*x);
        }
    });
}

/// Widens bfloat16 `x` into `y` (exact).
pub fn from_bf16(x: &[u16], y: &mut [f32], threads: usize) {
    par_rows(y, 4096, threads, x.len(), |row, block| {
        for (v, x) in block.iter_mut().zip(&x[row * 4096..]) {
            *v = shardplan_compiler::graph::from_bf16(*x);
        }
    });
}

pub fn broadcast(arg: &Operand<'_>, out: &mut [f32], out_shape: &[usize]) -> Result<(), EngineError> {
    let Arg::F32(data) = arg.data else {
        return Err(invalid(Name::Step("broadcast"), "operand is not f32".into()));
    };
    if data.len() != arg.shape.iter().product::<usize>() || out.len() != out_shape.iter().product::<usize>() {
        return Err(invalid(Name::Step("broadcast"), format!("data does not match shapes {:?} → {out_shape:?}", arg.shape)));
    }
    layout::broadcast(data, arg.shape, out, out_shape)
}

/// An f32 operand: (data, shape).
type F32Arg<'a> = (&'a [f32], &'a [usize]);
/// An i32 operand: (data, shape).
type I32Arg<'a> = (&'a [i32], &'a [usize]);

fn f32_arg<'a>(name: Name<'_>, args: &[Operand<'a>], i: usize) -> Result<F32Arg<'a>, EngineError> {
    match args.get(i) {
        Some(Operand { data: Arg::F32(d), shape }) => Ok((d, shape)),
        Some(_) => Err(invalid(name, format!("operand {i} is not f32"))),
        None => Err(invalid(name, format!("operand {i} is missing"))),
    }
}

fn i32_arg<'a>(name: Name<'_>, args: &[Operand<'a>], i: usize) -> Result<I32Arg<'a>, EngineError> {
    match args.get(i) {
        Some(Operand { data: Arg::I32(d), shape }) => Ok((d, shape)),
        Some(_) => Err(invalid(name, format!("operand {i} is not i32"))),
        None => Err(invalid(name, format!("operand {i} is missing"))),
    }
}

/// What an error names: the op (rendered only when there is an error), or
/// a step that is not an op.
#[derive(Clone, Copy)]
enum Name<'a> {
    Op(&'a Op),
    Step(&'static str),
}

impl std::fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Name::Op(op) => f.write_str(&op.name()),
            Name::Step(s) => f.write_str(s),
        }
    }
}

fn invalid(name: Name<'_>, what: String) -> EngineError {
    EngineError::Bug(format!("{name}: {what}"))
}

/// Fails unless the output shape is `want`.
fn expect_shape(name: Name<'_>, out_shape: &[usize], want: &[usize]) -> Result<(), EngineError> {
    if out_shape == want {
        Ok(())
    } else {
        Err(invalid(name, format!("output shape {out_shape:?}, expected {want:?}")))
    }
}

/// Runs `f(item)` for every item, on up to `threads` threads (the caller's
/// and the [`pool`]'s), each call compiled for the best vector instructions
/// the CPU has ([`isa::call`]: pass closures marked `#[inline(always)]`).
/// Items are taken from a shared queue, so which thread runs an item never
/// matters to the result: items are disjoint pieces of the output.
fn par_each<T: Send>(items: Vec<T>, threads: usize, f: impl Fn(T) + Sync) {
    if threads <= 1 || items.len() <= 1 {
        for item in items {
            isa::call(&f, item);
        }
        return;
    }
    let helpers = threads.min(items.len()) - 1;
    let queue = Mutex::new(items.into_iter());
    let next = || queue.lock().unwrap_or_else(PoisonError::into_inner).next();
    pool::broadcast(helpers, &|| {
        while let Some(item) = next() {
            isa::call(&f, item);
        }
    });
}

/// Splits `out` into a few contiguous blocks per thread of whole rows of
/// `row` elements and runs `f(first_row, block)` on each through
/// [`par_each`]; one block when `work` (elements touched) is small. Each row
/// is computed the same way whatever the split, so results do not depend on
/// `threads`.
pub fn par_rows<T: Send>(out: &mut [T], row: usize, threads: usize, work: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len().checked_div(row).unwrap_or(0);
    let t = if threads <= 1 || rows < 2 || work < PARALLEL_MIN { 1 } else { threads.min(rows) };
    // A few blocks per thread, so that a helper that wakes late still finds work.
    let blocks = if t > 1 { (BLOCKS_PER_THREAD * t).min(rows) } else { 1 };
    let per = rows.div_ceil(blocks).max(1);
    let items: Vec<(usize, &mut [T])> = out.chunks_mut(per * row.max(1)).enumerate().map(|(i, c)| (i * per, c)).collect();
    par_each(
        items,
        t,
        #[inline(always)]
        |(r0, block)| f(r0, block),
    );
}
