//! Reductions: `Sum`, `Mean`, `Max` over axes, `SumTo`, the gradient of
//! `Max`, and the embedding gradient (a deterministic scatter-add).
//!
//! The operand's dims are split into kept and reduced ones (size-1 dims
//! dropped, neighbours merged). A reduction over one contiguous run of at
//! least 32 elements takes one block per output element (threads stride
//! over the run, then a shared-memory tree); one strided run of at least 64
//! (the columns of a `[k1, r, k2]` tensor) takes 8 threads per output, each
//! folding every 8th element, their partials folded in order; any other
//! takes one thread per output element looping over the reduced dims in
//! order. Neighbouring threads read neighbouring columns. Sums accumulate in
//! double.
//!
//! Input: a step's operands and output (`Io`) and the op's attributes.
//! Output: the kernel, None when it has nothing to compute, or a `CodegenError`
//! when the operands or output do not fit the kernel (checked before any
//! source is written).

use super::elementwise::{index_map, simplify};
use super::writer::{f32_lit, f64_lit, pow2_block, Gen, Mode};
use super::{CodegenError, Io, Kernel};
use shardplan_compiler::kernel::Elem;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Sum,
    Mean,
    Max,
}

/// `Sum`, `Mean` or `Max` of the operand over `axes`.
pub fn reduce(io: &Io<'_>, kind: Kind, axes: &[usize], name: &str) -> Result<Option<Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    if let Some(a) = axes.iter().find(|&&a| a >= xs.len()) {
        return Err(CodegenError::Axis { axis: *a, shape: xs.clone() });
    }
    // As the interpreter: a mean divides by the listed axes' sizes.
    let n: usize = axes.iter().map(|&a| xs[a]).product();
    reduction(io, kind, &xs, &|d| axes.contains(&d), n, name)
}

/// Sums the operand over the dims broadcasting added, down to the output's shape.
pub fn sum_to(io: &Io<'_>) -> Result<Option<Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    let os = io.out_shape().to_vec();
    let lead = os.len().saturating_sub(xs.len());
    let small_shape = &os[lead..];
    let pad = xs.len() - small_shape.len();
    let small = |d: usize| if d < pad { 1 } else { small_shape[d - pad] };
    if os[..lead].iter().any(|&d| d != 1) || (0..xs.len()).any(|d| small(d) != xs[d] && small(d) != 1) {
        return Err(CodegenError::Broadcast { from: os.to_vec(), to: xs.to_vec() });
    }
    reduction(io, Kind::Sum, &xs, &|d| small(d) == 1, 1, "sum_to")
}

/// Dims as (size, stride), outermost first.
type Dims = Vec<(usize, usize)>;

/// (kept dims, reduced dims) of a tensor of shape `xs`.
fn split(xs: &[usize], collapsed: &dyn Fn(usize) -> bool) -> (Dims, Dims) {
    let mut st = vec![1usize; xs.len()];
    for d in (0..xs.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * xs[d + 1];
    }
    let (mut kept, mut red) = (Vec::new(), Vec::new());
    for d in 0..xs.len() {
        if collapsed(d) {
            red.push((xs[d], st[d]));
        } else {
            kept.push((xs[d], st[d]));
        }
    }
    (simplify(&kept), simplify(&red))
}

/// Lines (at `indent`) that run `body` (at `indent + 1` plus the loop depth)
/// for every reduced element, with `at` its index; returns the closing lines.
fn loops(g: &mut Gen, red: &[(usize, usize)], base: &str, indent: usize) -> (String, usize) {
    let mut terms = vec![base.to_string()];
    for (d, &(size, stride)) in red.iter().enumerate() {
        let sz = g.n(size);
        g.line(indent + d, format!("for (I j{d} = 0; j{d} < {sz}; ++j{d}) {{"));
        terms.push(if stride == 1 { format!("j{d}") } else { format!("j{d} * {}", g.n(stride)) });
    }
    (terms.join(" + "), indent + red.len())
}

fn close_loops(g: &mut Gen, depth: usize, indent: usize) {
    for d in (0..depth).rev() {
        g.line(indent + d, "}");
    }
}

fn reduction(io: &Io<'_>, kind: Kind, xs: &[usize], collapsed: &dyn Fn(usize) -> bool, n: usize, name: &str) -> Result<Option<Kernel>, CodegenError> {
    io.out_f32()?;
    let (kept, red) = split(xs, collapsed);
    let outs: usize = kept.iter().map(|k| k.0).product();
    if io.out_len() != outs {
        return Err(CodegenError::Operands(format!("output of {} elements for {outs} kept", io.out_len())));
    }
    if outs == 0 {
        return Ok(None);
    }
    let r: usize = red.iter().map(|k| k.0).product();
    let scale = 1.0 / n.max(1) as f64;
    let finish = |acc: &str| match kind {
        Kind::Sum => format!("(float){acc}"),
        Kind::Mean => format!("(float)({acc} * {})", f64_lit(scale)),
        Kind::Max => acc.to_string(),
    };
    let (acc_t, init) = match kind {
        Kind::Max => ("float", f32_lit(f32::NEG_INFINITY)),
        _ => ("double", "0.0".to_string()),
    };
    let add = |v: &str| match kind {
        Kind::Max => format!("acc = sp_max2(acc, {v});"),
        _ => format!("acc += (double){v};"),
    };
    let mut g = Gen::new(format!("{name}: {xs:?} → {} over {r} each", outs), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    if let ([(_, 1)], true) = (red.as_slice(), r >= 32) {
        // One block per output: a contiguous run.
        let b = pow2_block(r, 32, 256);
        g.block_reduce(b);
        g.rows(outs, b);
        index_map(&mut g, &kept, "row", "base", 2);
        g.line(2, format!("{acc_t} acc = {init};"));
        let rr = g.n(r);
        g.line(2, format!("for (I j = threadIdx.x; j < {rr}; j += {b}u) {{"));
        g.line(3, add("x[base + j]"));
        g.line(2, "}");
        g.line(2, if kind == Kind::Max { "acc = sp_block_max(acc, sh_f);" } else { "acc = sp_block_sum(acc, sh_d);" });
        g.line(2, format!("if (threadIdx.x == 0) out[row] = {};", finish("acc")));
        g.close();
    } else if let ([(_, stride)], true) = (red.as_slice(), r >= 64) {
        // One strided run per output (columns of a [k1, r, k2] tensor):
        // blocks of 32 outputs × 8 lanes; lane y folds every 8th element of
        // the run, then lane 0 folds the 8 partials in order.
        g.helper(super::writer::MAX2);
        g.block = 256;
        g.grid = outs.div_ceil(32).clamp(1, super::writer::MAX_GRID) as u32;
        let (oo, rr, st) = (g.n(outs), g.n(r), g.n(*stride));
        g.line(1, format!("__shared__ {acc_t} part[8][32];"));
        g.line(1, "const unsigned tx = threadIdx.x % 32u, ty = threadIdx.x / 32u;");
        g.line(1, format!("for (I first = blockIdx.x * 32u; first < {oo}; first += gridDim.x * 32u) {{"));
        g.line(2, "const I o = first + tx;");
        g.line(2, format!("{acc_t} acc = {init};"));
        g.line(2, format!("if (o < {oo}) {{"));
        index_map(&mut g, &kept, "o", "base", 3);
        g.line(3, format!("for (I j = ty; j < {rr}; j += 8u) {{"));
        g.line(4, add(&format!("x[base + j * {st}]")));
        g.line(3, "}");
        g.line(2, "}");
        g.line(2, "part[ty][tx] = acc;");
        g.line(2, "__syncthreads();");
        g.line(2, format!("if (ty == 0 && o < {oo}) {{"));
        g.line(3, "for (unsigned y = 1; y < 8u; ++y) {");
        g.line(4, add("part[y][tx]"));
        g.line(3, "}");
        g.line(3, format!("out[o] = {};", finish("acc")));
        g.line(2, "}");
        g.line(2, "__syncthreads();");
        g.close();
    } else {
        g.helper(super::writer::MAX2);
        g.each(outs);
        index_map(&mut g, &kept, "i", "base", 2);
        g.line(2, format!("{acc_t} acc = {init};"));
        let (at, depth) = loops(&mut g, &red, "base", 2);
        g.line(depth, add(&format!("x[{at}]")));
        close_loops(&mut g, red.len(), 2);
        g.line(2, format!("out[i] = {};", finish("acc")));
        g.close();
    }
    Ok(Some(g.finish()))
}

/// (x, y, dy) → dx: dy shared equally among the elements equal to the max.
/// One thread per reduced group: count the maxima, then write the group.
pub fn max_grad(io: &Io<'_>, axes: &[usize]) -> Result<Option<Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    let (y, dy) = (io.typed(1, Elem::F32)?.len(), io.typed(2, Elem::F32)?.len());
    io.out_f32()?;
    io.expect_out(&xs)?;
    if let Some(a) = axes.iter().find(|&&a| a >= xs.len()) {
        return Err(CodegenError::Axis { axis: *a, shape: xs.clone() });
    }
    let (kept, red) = split(&xs, &|d| axes.contains(&d));
    let outs: usize = kept.iter().map(|k| k.0).product();
    if y != outs || dy != outs {
        return Err(CodegenError::Operands(format!("y and dy have {y} and {dy} elements, expected {outs}")));
    }
    if outs == 0 || io.out_len() == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("max gradient {xs:?} over {axes:?}"), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.ins[1], Elem::F32, Mode::In, "y");
    g.param(io.ins[2], Elem::F32, Mode::In, "dy");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(outs);
    index_map(&mut g, &kept, "i", "base", 2);
    g.line(2, "const float m = y[i], d = dy[i];");
    g.line(2, "float c = 0.0f;");
    let (at, depth) = loops(&mut g, &red, "base", 2);
    g.line(depth, format!("if (x[{at}] == m) c += 1.0f;"));
    close_loops(&mut g, red.len(), 2);
    g.line(2, "const float share = d / fmaxf(c, 1.0f);");
    let (at, depth) = loops(&mut g, &red, "base", 2);
    g.line(depth, format!("out[{at}] = x[{at}] == m ? share : 0.0f * d;"));
    close_loops(&mut g, red.len(), 2);
    g.close();
    Ok(Some(g.finish()))
}

/// (ids, dy) → d table [v, d]: each dy row added to its id's row, in id
/// order. Thread (column c, block of table rows) zeroes its column of those
/// rows, then scans every id in order, adding the rows that land in its
/// block: every element is summed by one thread, in id order, as on CPUs.
/// Ids outside the table add nothing.
pub fn embedding_grad(io: &Io<'_>) -> Result<Option<Kernel>, CodegenError> {
    let ids = io.typed(0, Elem::I32)?.len();
    let dy = io.typed(1, Elem::F32)?.len();
    io.out_f32()?;
    let os = io.out_shape().to_vec();
    let &[v, d] = os.as_slice() else {
        return Err(CodegenError::Operands(format!("output must be [vocab, dim], got {os:?}")));
    };
    if dy != ids * d {
        return Err(CodegenError::Operands(format!("dy has {dy} elements for {ids} ids of dim {d}")));
    }
    if v == 0 || d == 0 {
        return Ok(None);
    }
    // About 64K threads in all.
    let blocks = (65_536 / d).clamp(1, v);
    let per = v.div_ceil(blocks);
    let blocks = v.div_ceil(per);
    let mut g = Gen::new(format!("embedding gradient [{v} × {d}] from {ids} ids"), io.largest());
    g.param(io.ins[0], Elem::I32, Mode::In, "ids");
    g.param(io.ins[1], Elem::F32, Mode::In, "dy");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(d * blocks);
    let (dd, pp, vv, nn) = (g.n(d), g.n(per), g.n(v), g.n(ids));
    g.line(2, format!("const I c = i % {dd}, r0 = (i / {dd}) * {pp};"));
    g.line(2, format!("const I r1 = r0 + {pp} < {vv} ? r0 + {pp} : {vv};"));
    g.line(2, format!("for (I r = r0; r < r1; ++r) out[r * {dd} + c] = 0.0f;"));
    g.line(2, format!("for (I k = 0; k < {nn}; ++k) {{"));
    g.line(3, "const int id = ids[k];");
    g.line(3, format!("if (id >= 0 && (I)id >= r0 && (I)id < r1) out[(I)id * {dd} + c] += dy[k * {dd} + c];"));
    g.line(2, "}");
    g.close();
    Ok(Some(g.finish()))
}
