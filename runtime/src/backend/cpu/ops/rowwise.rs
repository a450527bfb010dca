//! Row-wise kernels: softmax, log-softmax and their gradients along an
//! axis, layer norm and its gradients along the last axis, and rotary
//! position embeddings.
//!
//! Each row is contiguous and processed by one thread with the lane
//! primitives of [`lanes`]; rows are split across threads in contiguous
//! blocks. A softmax along another axis moves that axis last with two
//! transposes (rare in real models, so the copies are acceptable).
//!
//! Input: a tensor, its shape and the axis. Output: the row-wise result.
//! Invariant: one row is always computed by one thread.

use super::lanes::BLOCK;
use super::{expect_shape, invalid, lanes, layout, par_rows, EngineError, F32Arg, I32Arg, Name};

/// Softmax or log-softmax along `axis`.
pub(super) fn softmax(
    name: Name<'_>,
    (x, xs): F32Arg<'_>,
    axis: usize,
    log: bool,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    expect_shape(name, out_shape, xs)?;
    along_last(name, &[x], xs, axis, out, threads, |ins, d, out| {
        let x = ins[0];
        par_rows(
            out,
            d,
            threads,
            x.len(),
            #[inline(always)]
            |r0, block| {
                for (i, o) in block.chunks_exact_mut(d).enumerate() {
                    let s = (r0 + i) * d;
                    softmax_row(x.get(s..s + d).unwrap_or(&[]), log, o);
                }
            },
        );
    })
}

/// One row of softmax (numerically stable: the row max is subtracted).
/// A row with no finite maximum (all −∞) gives 0, or −∞ for log-softmax.
#[inline(always)]
fn softmax_row(x: &[f32], log: bool, out: &mut [f32]) {
    let m = lanes::max(x);
    if m == f32::NEG_INFINITY {
        out.fill(if log { f32::NEG_INFINITY } else { 0.0 });
        return;
    }
    if log {
        // (x − m) − ln Σ: adding m back first would round at m's scale.
        let ln_s = lanes::sum_exp_shifted(x, m).ln();
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (v - m) - ln_s;
        }
    } else {
        let inv = 1.0 / lanes::exp_shifted(x, m, out);
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

/// (y, dy) → dx for y = softmax(x): y·(dy − Σ dy·y); for y = log_softmax(x):
/// dy − exp(y)·Σ dy.
#[allow(clippy::too_many_arguments)]
pub(super) fn softmax_grad(
    name: Name<'_>,
    (y, ys): F32Arg<'_>,
    (dy, dys): F32Arg<'_>,
    axis: usize,
    log: bool,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    expect_shape(name, out_shape, ys)?;
    if dys != ys {
        return Err(invalid(name, format!("dy has shape {dys:?}, y has {ys:?}")));
    }
    along_last(name, &[y, dy], ys, axis, out, threads, |ins, d, out| {
        let (y, dy) = (ins[0], ins[1]);
        par_rows(
            out,
            d,
            threads,
            2 * y.len(),
            #[inline(always)]
            |r0, block| {
                for (i, o) in block.chunks_exact_mut(d).enumerate() {
                    let s = (r0 + i) * d;
                    let (Some(y), Some(dy)) = (y.get(s..s + d), dy.get(s..s + d)) else { return };
                    if log {
                        let sum = lanes::sum(dy);
                        for ((o, &y), &g) in o.iter_mut().zip(y).zip(dy) {
                            *o = g - lanes::exp(y) * sum;
                        }
                    } else {
                        let sum = lanes::dot(dy, y);
                        for ((o, &y), &g) in o.iter_mut().zip(y).zip(dy) {
                            *o = y * (g - sum);
                        }
                    }
                }
            },
        );
    })
}

/// Runs `rows(inputs, d, out)` on the inputs viewed as rows of `d` along
/// `axis`: directly when `axis` is the last one, else between transposes.
fn along_last(
    name: Name<'_>,
    ins: &[&[f32]],
    shape: &[usize],
    axis: usize,
    out: &mut [f32],
    threads: usize,
    rows: impl Fn(&[&[f32]], usize, &mut [f32]),
) -> Result<(), EngineError> {
    let rank = shape.len();
    if axis >= rank {
        return Err(invalid(name, format!("axis {axis} is out of range for {shape:?}")));
    }
    let d = shape[axis];
    if d == 0 || out.is_empty() {
        return Ok(());
    }
    if axis == rank - 1 {
        rows(ins, d, out);
        return Ok(());
    }
    let perm: Vec<usize> = (0..rank).filter(|&a| a != axis).chain([axis]).collect();
    let moved: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut inverse = vec![0; rank];
    for (i, &p) in perm.iter().enumerate() {
        inverse[p] = i;
    }
    let mut t_ins = Vec::with_capacity(ins.len());
    for x in ins {
        let mut t = vec![0.0f32; x.len()];
        layout::transpose(name, (x, shape), &perm, &mut t, &moved, threads)?;
        t_ins.push(t);
    }
    let t_refs: Vec<&[f32]> = t_ins.iter().map(Vec::as_slice).collect();
    let mut t_out = vec![0.0f32; out.len()];
    rows(&t_refs, d, &mut t_out);
    layout::transpose(name, (&t_out, &moved), &inverse, out, shape, threads)
}

/// Row statistics of layer norm: (mean, 1/√(var + eps)), accumulated in f64.
#[inline(always)]
fn stats(row: &[f32], eps: f64, rms: bool) -> (f32, f32) {
    let n = row.len().max(1) as f64;
    let mu = if rms { 0.0 } else { (lanes::sum_f64(row) / n) as f32 };
    let var = lanes::sq_dev_f64(row, mu) / n;
    (mu, (1.0 / (var + eps).sqrt()) as f32)
}

/// The last dim of `shape` (1 for a scalar) and the number of rows.
fn last_dim(shape: &[usize], len: usize) -> (usize, usize) {
    let d = shape.last().copied().unwrap_or(1);
    (d, len.checked_div(d).unwrap_or(0))
}

fn expect_len(name: Name<'_>, what: &str, got: usize, want: usize) -> Result<(), EngineError> {
    if got == want {
        Ok(())
    } else {
        Err(invalid(name, format!("{what} has {got} elements, expected {want}")))
    }
}

/// (x, gamma, beta) → (x − mean)/√(var + eps)·gamma + beta over the last axis;
/// without beta, RMS norm: x/√(mean(x²) + eps)·gamma.
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm(
    name: Name<'_>,
    (x, xs): F32Arg<'_>,
    (gamma, _): F32Arg<'_>,
    beta: Option<F32Arg<'_>>,
    eps: f64,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    expect_shape(name, out_shape, xs)?;
    let (d, _) = last_dim(xs, x.len());
    expect_len(name, "gamma", gamma.len(), d)?;
    if let Some((beta, _)) = beta {
        expect_len(name, "beta", beta.len(), d)?;
    }
    if d == 0 {
        return Ok(());
    }
    par_rows(
        out,
        d,
        threads,
        x.len(),
        #[inline(always)]
        |r0, block| {
            for (i, o) in block.chunks_exact_mut(d).enumerate() {
                let s = (r0 + i) * d;
                let Some(row) = x.get(s..s + d) else { return };
                match beta {
                    Some((beta, _)) => {
                        let (mu, rstd) = stats(row, eps, false);
                        for (((o, &v), &g), &b) in o.iter_mut().zip(row).zip(gamma).zip(beta) {
                            *o = (v - mu) * rstd * g + b;
                        }
                    }
                    None => {
                        let (_, rstd) = stats(row, eps, true);
                        for ((o, &v), &g) in o.iter_mut().zip(row).zip(gamma) {
                            *o = v * rstd * g;
                        }
                    }
                }
            }
        },
    );
    Ok(())
}

/// (x, gamma, dy) → dx of layer norm (of RMS norm when `rms`).
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_norm_grad_x(
    name: Name<'_>,
    (x, xs): F32Arg<'_>,
    (gamma, _): F32Arg<'_>,
    (dy, _): F32Arg<'_>,
    eps: f64,
    rms: bool,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    expect_shape(name, out_shape, xs)?;
    let (d, _) = last_dim(xs, x.len());
    expect_len(name, "gamma", gamma.len(), d)?;
    expect_len(name, "dy", dy.len(), x.len())?;
    if d == 0 {
        return Ok(());
    }
    let n = d as f32;
    par_rows(
        out,
        d,
        threads,
        2 * x.len(),
        #[inline(always)]
        |r0, block| {
            for (i, o) in block.chunks_exact_mut(d).enumerate() {
                let s = (r0 + i) * d;
                let (Some(row), Some(dy)) = (x.get(s..s + d), dy.get(s..s + d)) else { return };
                let (mu, rstd) = stats(row, eps, rms);
                // With g = dy·gamma and x̂ = (x − mu)·rstd:
                // dx = rstd/n · (n·g − Σg − x̂·Σ g·x̂), without Σg for RMS norm
                // (its mu is 0 whatever x is).
                let (sg, sgd) = grad_sums(row, dy, gamma, mu);
                let (sg, sgx) = (if rms { 0.0 } else { sg as f32 }, (sgd * rstd as f64) as f32);
                let a = rstd / n;
                for (((o, &v), &dy), &g) in o.iter_mut().zip(row).zip(dy).zip(gamma) {
                    let xhat = (v - mu) * rstd;
                    *o = a * (n * (dy * g) - sg - xhat * sgx);
                }
            }
        },
    );
    Ok(())
}

/// (Σ dy·gamma, Σ dy·gamma·(x − mu)), accumulated as [`lanes::sum_f64`]:
/// per block, the products go to a buffer (an element-wise loop LLVM
/// vectorises) that [`lanes::sum`] then folds.
#[inline(always)]
fn grad_sums(x: &[f32], dy: &[f32], gamma: &[f32], mu: f32) -> (f64, f64) {
    let (mut sg, mut sgx) = (0.0f64, 0.0f64);
    let mut g = [0.0f32; BLOCK];
    let mut gx = [0.0f32; BLOCK];
    for ((x, dy), gamma) in x.chunks(BLOCK).zip(dy.chunks(BLOCK)).zip(gamma.chunks(BLOCK)) {
        let n = x.len().min(dy.len()).min(gamma.len());
        for ((((g, gx), &x), &dy), &gamma) in g.iter_mut().zip(gx.iter_mut()).zip(x).zip(dy).zip(gamma) {
            *g = dy * gamma;
            *gx = *g * (x - mu);
        }
        sg += lanes::sum(&g[..n]) as f64;
        sgx += lanes::sum(&gx[..n]) as f64;
    }
    (sg, sgx)
}

/// (x, dy) → dgamma = Σ over rows of dy·x̂, one output per column of x
/// (x̂ of RMS norm when `rms`).
pub(super) fn layer_norm_grad_gamma(
    name: Name<'_>,
    (x, xs): F32Arg<'_>,
    (dy, _): F32Arg<'_>,
    eps: f64,
    rms: bool,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    let (d, r) = last_dim(xs, x.len());
    expect_shape(name, out_shape, &[d])?;
    expect_len(name, "dy", dy.len(), x.len())?;
    if d == 0 {
        return Ok(());
    }
    // Row statistics first (rows split across threads), then columns
    // (columns split), each column summed over rows in order.
    let mut st = vec![(0.0f32, 0.0f32); r];
    par_rows(
        &mut st,
        1,
        threads,
        x.len(),
        #[inline(always)]
        |r0, block| {
            for (i, s) in block.iter_mut().enumerate() {
                let o = (r0 + i) * d;
                *s = stats(x.get(o..o + d).unwrap_or(&[]), eps, rms);
            }
        },
    );
    par_rows(
        out,
        1,
        threads,
        x.len(),
        #[inline(always)]
        |c0, block| {
            let w = block.len();
            let mut acc = vec![0.0f64; w];
            for (i, &(mu, rstd)) in st.iter().enumerate() {
                let o = i * d + c0;
                let (Some(x), Some(dy)) = (x.get(o..o + w), dy.get(o..o + w)) else { return };
                for ((a, &v), &g) in acc.iter_mut().zip(x).zip(dy) {
                    *a += (g * ((v - mu) * rstd)) as f64;
                }
            }
            for (o, a) in block.iter_mut().zip(acc) {
                *o = a as f32;
            }
        },
    );
    Ok(())
}

/// Rotary position embedding over [.., seq, heads · head_dim]: pair (2i, 2i+1)
/// of each head at position p turns by `rope_angle(p, i)` (back by it when
/// `inverse`). The angles' cosines and sines are tabulated once per call, in
/// f64 and rounded to f32, so every row of a position turns alike.
pub(super) fn rope(
    name: Name<'_>,
    (x, xs): F32Arg<'_>,
    head_dim: usize,
    base: f64,
    inverse: bool,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    expect_shape(name, out_shape, xs)?;
    let &[.., seq, d] = xs else {
        return Err(invalid(name, format!("needs rank ≥ 2, got {xs:?}")));
    };
    if head_dim == 0 || head_dim % 2 != 0 || d % head_dim != 0 {
        return Err(invalid(name, format!("head dim {head_dim} does not split the last dim of {xs:?} into pairs")));
    }
    if seq == 0 || d == 0 {
        return Ok(());
    }
    let half = head_dim / 2;
    let mut table = Vec::with_capacity(seq * half);
    for p in 0..seq {
        for i in 0..half {
            let a = shardplan_compiler::graph::rope_angle(p, i, head_dim, base);
            let sin = if inverse { -a.sin() } else { a.sin() };
            table.push((a.cos() as f32, sin as f32));
        }
    }
    par_rows(
        out,
        d,
        threads,
        x.len(),
        #[inline(always)]
        |r0, block| {
            for (k, row) in block.chunks_exact_mut(d).enumerate() {
                let r = r0 + k;
                let turns = &table[(r % seq) * half..(r % seq + 1) * half];
                let Some(src) = x.get(r * d..(r + 1) * d) else { continue };
                for (o, s) in row.chunks_exact_mut(head_dim).zip(src.chunks_exact(head_dim)) {
                    for ((o, s), &(cos, sin)) in o.chunks_exact_mut(2).zip(s.chunks_exact(2)).zip(turns) {
                        o[0] = s[0] * cos - s[1] * sin;
                        o[1] = s[0] * sin + s[1] * cos;
                    }
                }
            }
        },
    );
    Ok(())
}

/// Dropout of x [rows, …] whose row r is the sample with data-set index
/// ids[r]: element j of the row is zeroed where `dropout_drops(seed, step,
/// ids[r], j, p)`, else scaled by 1 / (1 − p).
#[allow(clippy::too_many_arguments)]
pub(super) fn dropout(
    name: Name<'_>,
    (x, xs): F32Arg<'_>,
    (ids, _): I32Arg<'_>,
    (step, _): F32Arg<'_>,
    (p, seed): (f64, u64),
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    expect_shape(name, out_shape, xs)?;
    if ids.is_empty() || x.len() % ids.len() != 0 {
        return Err(invalid(name, format!("{} sample indices for {xs:?}", ids.len())));
    }
    let step = step.first().copied().unwrap_or(0.0) as u64;
    let row = x.len() / ids.len();
    let scale = (1.0 / (1.0 - p)) as f32;
    if row == 0 {
        return Ok(());
    }
    par_rows(
        out,
        row,
        threads,
        4 * x.len(),
        #[inline(always)]
        |r0, block| {
            for (k, o) in block.chunks_exact_mut(row).enumerate() {
                let r = r0 + k;
                let id = ids[r] as u32 as u64;
                for (j, (o, &v)) in o.iter_mut().zip(&x[r * row..(r + 1) * row]).enumerate() {
                    *o = if shardplan_compiler::graph::dropout_drops(seed, step, id, j as u64, p) { 0.0 } else { v * scale };
                }
            }
        },
    );
    Ok(())
}
