//! Reductions: `Sum`, `Mean`, `Max` over axes, `SumTo` (the gradient of a
//! broadcast) and `MaxGrad`.
//!
//! After simplification (see [`Pairing`]) nearly every reduction is either
//! over contiguous rows (`[kept, reduced]`: each output is one row folded in
//! lanes) or over columns (`[kept, reduced, kept]`: rows added element-wise
//! into a block of accumulators). Both split their output across threads
//! and fold each output element in the same order whatever the split. Sums
//! accumulate in f64; other layouts take a serial path with the same
//! per-element order.

use super::layout::{odometer, Pairing};
use super::{expect_shape, invalid, lanes, par_each, par_rows, EngineError, F32Arg, Name, BLOCKS_PER_THREAD, PARALLEL_MIN};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Kind {
    Sum,
    Mean,
    Max,
}

/// `Sum`, `Mean` or `Max` of `x` over `axes`.
#[allow(clippy::too_many_arguments)]
pub(super) fn reduce(
    name: Name<'_>,
    kind: Kind,
    (x, xs): F32Arg<'_>,
    axes: &[usize],
    keepdims: bool,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    if let Some(a) = axes.iter().find(|&&a| a >= xs.len()) {
        return Err(invalid(name, format!("axis {a} is out of range for {xs:?}")));
    }
    let want: Vec<usize> = if keepdims {
        xs.iter().enumerate().map(|(d, &s)| if axes.contains(&d) { 1 } else { s }).collect()
    } else {
        xs.iter().enumerate().filter(|(d, _)| !axes.contains(d)).map(|(_, &s)| s).collect()
    };
    expect_shape(name, out_shape, &want)?;
    // As the interpreter: the count multiplies the listed axes' sizes.
    let n: usize = axes.iter().map(|&a| xs[a]).product();
    reduce_pairing(kind, x, &Pairing::new(xs, |d| axes.contains(&d)), n, out, threads);
    Ok(())
}

/// Sums `x` over the dims that broadcasting added, down to `out_shape`.
pub(super) fn sum_to(name: Name<'_>, (x, xs): F32Arg<'_>, out: &mut [f32], out_shape: &[usize], threads: usize) -> Result<(), EngineError> {
    let lead = out_shape.len().saturating_sub(xs.len());
    let os = &out_shape[lead..];
    let pad = xs.len() - os.len();
    let small = |d: usize| if d < pad { 1 } else { os[d - pad] };
    if out_shape[..lead].iter().any(|&d| d != 1) || (0..xs.len()).any(|d| small(d) != xs[d] && small(d) != 1) {
        return Err(invalid(name, format!("{out_shape:?} does not broadcast to {xs:?}")));
    }
    reduce_pairing(Kind::Sum, x, &Pairing::new(xs, |d| small(d) == 1), 1, out, threads);
    Ok(())
}

/// The reduction proper; `out` holds the small side of `p` (its size is
/// checked by the callers), `n` is the count a mean divides by.
fn reduce_pairing(kind: Kind, x: &[f32], p: &Pairing, n: usize, out: &mut [f32], threads: usize) {
    let scale = 1.0 / n.max(1) as f64;
    if x.is_empty() {
        out.fill(finish(kind, scale, if kind == Kind::Max { f64::NEG_INFINITY } else { 0.0 }));
        return;
    }
    match p.dims.as_slice() {
        // Rows: each output folds one contiguous run.
        [] | [(_, true)] | [(_, false), (_, true)] => {
            let r = p.dims.last().map_or(1, |d| d.0);
            par_rows(
                out,
                1,
                threads,
                x.len(),
                #[inline(always)]
                |i0, block| {
                    for (i, o) in block.iter_mut().enumerate() {
                        let s = (i0 + i) * r;
                        *o = finish(kind, scale, fold_row(kind, x.get(s..s + r).unwrap_or(&[])));
                    }
                },
            );
        }
        // Columns: whole rows of a slab added into a block of outputs.
        [(r, true), (k2, false)] => columns(kind, scale, x, 1, *r, *k2, out, threads),
        [(k1, false), (r, true), (k2, false)] => columns(kind, scale, x, *k1, *r, *k2, out, threads),
        _ => {
            let (len, collapsed, outer) = p.rows();
            let init = if kind == Kind::Max { f64::NEG_INFINITY } else { 0.0 };
            let mut acc = vec![init; out.len()];
            let combine = |a: f64, v: f64| if kind == Kind::Max { a.max(v) } else { a + v };
            odometer(&outer, |xo, so| {
                let Some(row) = x.get(xo..xo + len) else { return };
                if collapsed {
                    if let Some(a) = acc.get_mut(so) {
                        *a = combine(*a, fold_row(kind, row));
                    }
                } else if let Some(a) = acc.get_mut(so..so + len) {
                    for (a, &v) in a.iter_mut().zip(row) {
                        *a = combine(*a, v as f64);
                    }
                }
            });
            for (o, a) in out.iter_mut().zip(acc) {
                *o = finish(kind, scale, a);
            }
        }
    }
}

/// An accumulator's final value; `scale` is 1/n for a mean.
#[inline(always)]
fn finish(kind: Kind, scale: f64, acc: f64) -> f32 {
    match kind {
        Kind::Sum | Kind::Max => acc as f32,
        Kind::Mean => (acc * scale) as f32,
    }
}

/// One contiguous run folded: sums in f64, maxima exact.
#[inline(always)]
fn fold_row(kind: Kind, row: &[f32]) -> f64 {
    match kind {
        Kind::Sum | Kind::Mean => lanes::sum_f64(row),
        Kind::Max => lanes::max(row) as f64,
    }
}

/// x is `[k1, r, k2]`; out is `[k1, k2]`, each element folded over `r` in order.
#[allow(clippy::too_many_arguments)]
fn columns(kind: Kind, scale: f64, x: &[f32], k1: usize, r: usize, k2: usize, out: &mut [f32], threads: usize) {
    let t = if threads > 1 && x.len() >= PARALLEL_MIN { threads } else { 1 };
    // A few blocks per thread; column blocks a multiple of 16 wide.
    let blocks = BLOCKS_PER_THREAD * t;
    let width = if k1 >= blocks { k2 } else { k2.div_ceil(blocks.div_ceil(k1.max(1))).next_multiple_of(16).min(k2) };
    let mut items: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (s, slab) in out.chunks_mut(k2).enumerate().take(k1) {
        for (b, block) in slab.chunks_mut(width.max(1)).enumerate() {
            items.push((s, b * width, block));
        }
    }
    par_each(
        items,
        t,
        #[inline(always)]
        |(s, c0, block)| {
            let w = block.len();
            let base = s * r * k2 + c0;
            if kind == Kind::Max {
                block.fill(f32::NEG_INFINITY);
                for i in 0..r {
                    let Some(row) = x.get(base + i * k2..base + i * k2 + w) else { return };
                    for (o, &v) in block.iter_mut().zip(row) {
                        *o = lanes::max2(*o, v);
                    }
                }
            } else {
                let mut acc = vec![0.0f64; w];
                for i in 0..r {
                    let Some(row) = x.get(base + i * k2..base + i * k2 + w) else { return };
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v as f64;
                    }
                }
                for (o, a) in block.iter_mut().zip(acc) {
                    *o = finish(kind, scale, a);
                }
            }
        },
    );
}

/// (x, y, dy) → dx: dy shared equally among the elements equal to the max.
pub(super) fn max_grad(
    name: Name<'_>,
    (x, xs): F32Arg<'_>,
    (y, _): F32Arg<'_>,
    (dy, _): F32Arg<'_>,
    axes: &[usize],
    out: &mut [f32],
    out_shape: &[usize],
) -> Result<(), EngineError> {
    expect_shape(name, out_shape, xs)?;
    if let Some(a) = axes.iter().find(|&&a| a >= xs.len()) {
        return Err(invalid(name, format!("axis {a} is out of range for {xs:?}")));
    }
    let kept: usize = xs.iter().enumerate().filter(|(d, _)| !axes.contains(d)).map(|(_, s)| s).product();
    if y.len() != kept || dy.len() != kept {
        return Err(invalid(name, format!("y and dy have {} and {} elements, expected {kept}", y.len(), dy.len())));
    }
    let (len, collapsed, outer) = Pairing::new(xs, |d| axes.contains(&d)).rows();
    let mut count = vec![0.0f32; kept];
    odometer(&outer, |xo, so| {
        let Some(row) = x.get(xo..xo + len) else { return };
        if collapsed {
            if let (Some(c), Some(&m)) = (count.get_mut(so), y.get(so)) {
                *c += row.iter().filter(|&&v| v == m).count() as f32;
            }
        } else if let (Some(c), Some(m)) = (count.get_mut(so..so + len), y.get(so..so + len)) {
            for ((c, &v), &m) in c.iter_mut().zip(row).zip(m) {
                *c += f32::from(u8::from(v == m));
            }
        }
    });
    odometer(&outer, |xo, so| {
        let (Some(row), Some(o)) = (x.get(xo..xo + len), out.get_mut(xo..xo + len)) else { return };
        if collapsed {
            if let (Some(&m), Some(&d), Some(&c)) = (y.get(so), dy.get(so), count.get(so)) {
                let share = d / c.max(1.0);
                for (o, &v) in o.iter_mut().zip(row) {
                    *o = if v == m { share } else { 0.0 * d };
                }
            }
        } else if let (Some(m), Some(d), Some(c)) = (y.get(so..so + len), dy.get(so..so + len), count.get(so..so + len)) {
            for ((((o, &v), &m), &d), &c) in o.iter_mut().zip(row).zip(m).zip(d).zip(c) {
                *o = if v == m { d / c.max(1.0) } else { 0.0 * d };
            }
        }
    });
    Ok(())
}
