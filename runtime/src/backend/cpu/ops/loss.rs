//! Losses: mean cross-entropy over rows of logits with integer labels, mean
//! squared error, and their gradients. Labels come from data and are checked
//! first; one out of range is a [`EngineError::BadData`] naming it.
//!
//! The scalar losses sum fixed pieces (per row, or per block of
//! [`BLOCK`] elements) in f64 and add the pieces in order, so the result does
//! not depend on how many threads computed them.
//!
//! Input: logits or predictions and labels or targets. Output: the mean
//! loss, or its gradient.

use super::{expect_shape, invalid, lanes, par_rows, EngineError, F32Arg, I32Arg, Name};

/// Elements per partial sum of [`mse`].
const BLOCK: usize = 1 << 14;

/// (logits, labels) → mean cross-entropy; with `dloss`, (logits, labels,
/// dloss) → d logits.
pub(super) fn cross_entropy(
    name: Name<'_>,
    (x, xs): F32Arg<'_>,
    (labels, _): I32Arg<'_>,
    dloss: Option<F32Arg<'_>>,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    let c = xs.last().copied().unwrap_or(1);
    let r = x.len().checked_div(c).unwrap_or(0);
    if labels.len() != r {
        return Err(invalid(name, format!("{} labels for {r} rows of logits", labels.len())));
    }
    if let Some((p, l)) = labels.iter().enumerate().find(|(_, &l)| usize::try_from(l).map_or(true, |l| l >= c)) {
        return Err(EngineError::BadData(format!("label {l} at position {p} is outside 0..{c}")));
    }
    let n = r.max(1) as f64;
    let Some((dl, _)) = dloss else {
        if out.len() != 1 {
            return Err(invalid(name, format!("output shape {out_shape:?} is not a scalar")));
        }
        let mut losses = vec![0.0f64; r];
        par_rows(
            &mut losses,
            1,
            threads,
            x.len(),
            #[inline(always)]
            |r0, block| {
                for (i, loss) in block.iter_mut().enumerate() {
                    let s = (r0 + i) * c;
                    let (Some(row), Some(&l)) = (x.get(s..s + c), labels.get(r0 + i)) else { return };
                    let m = lanes::max(row);
                    let lse = m as f64 + (lanes::sum_exp_shifted(row, m) as f64).ln();
                    *loss = lse - row.get(l as usize).map_or(f64::NAN, |&v| v as f64);
                }
            },
        );
        out[0] = (losses.iter().sum::<f64>() / n) as f32;
        return Ok(());
    };
    expect_shape(name, out_shape, xs)?;
    let &[dl] = dl else {
        return Err(invalid(name, format!("dloss has {} elements, expected 1", dl.len())));
    };
    if c == 0 {
        return Ok(());
    }
    // softmax(x)·dl/n, minus dl/n at the label.
    let scale = (dl as f64 / n) as f32;
    par_rows(
        out,
        c,
        threads,
        x.len(),
        #[inline(always)]
        |r0, block| {
            for (i, o) in block.chunks_exact_mut(c).enumerate() {
                let s = (r0 + i) * c;
                let (Some(row), Some(&l)) = (x.get(s..s + c), labels.get(r0 + i)) else { return };
                let m = lanes::max(row);
                let f = scale / lanes::exp_shifted(row, m, o);
                for v in o.iter_mut() {
                    *v *= f;
                }
                if let Some(v) = o.get_mut(l as usize) {
                    *v -= scale;
                }
            }
        },
    );
    Ok(())
}

fn same_len(name: Name<'_>, pred: &[f32], target: &[f32]) -> Result<(), EngineError> {
    if pred.len() == target.len() {
        Ok(())
    } else {
        Err(invalid(name, format!("pred has {} elements, target {}", pred.len(), target.len())))
    }
}

/// (pred, target) → mean of squared differences.
pub(super) fn mse(name: Name<'_>, (p, _): F32Arg<'_>, (t, _): F32Arg<'_>, out: &mut [f32], out_shape: &[usize], threads: usize) -> Result<(), EngineError> {
    same_len(name, p, t)?;
    if out.len() != 1 {
        return Err(invalid(name, format!("output shape {out_shape:?} is not a scalar")));
    }
    let mut partials = vec![0.0f64; p.len().div_ceil(BLOCK)];
    par_rows(
        &mut partials,
        1,
        threads,
        p.len(),
        #[inline(always)]
        |b0, block| {
            for (i, s) in block.iter_mut().enumerate() {
                let lo = (b0 + i) * BLOCK;
                let hi = (lo + BLOCK).min(p.len());
                let (Some(p), Some(t)) = (p.get(lo..hi), t.get(lo..hi)) else { return };
                *s = sq_diff(p, t);
            }
        },
    );
    out[0] = (partials.iter().sum::<f64>() / p.len().max(1) as f64) as f32;
    Ok(())
}

/// Σ (p − t)², accumulated as [`lanes::sum_f64`].
#[inline(always)]
fn sq_diff(p: &[f32], t: &[f32]) -> f64 {
    use lanes::{BLOCK, L};
    let mut s = 0.0f64;
    for (p, t) in p.chunks(BLOCK).zip(t.chunks(BLOCK)) {
        let (cp, rp) = p.as_chunks::<L>();
        let (ct, rt) = t.as_chunks::<L>();
        let mut acc = [0.0f32; L];
        for (p, t) in cp.iter().zip(ct) {
            for i in 0..L {
                let d = p[i] - t[i];
                acc[i] += d * d;
            }
        }
        let mut b = lanes::sum(&acc);
        for (&p, &t) in rp.iter().zip(rt) {
            b += (p - t) * (p - t);
        }
        s += b as f64;
    }
    s
}

/// (pred, target, dloss) → d pred = 2·(pred − target)/n·dloss.
pub(super) fn mse_grad(
    name: Name<'_>,
    (p, ps): F32Arg<'_>,
    (t, _): F32Arg<'_>,
    (dl, _): F32Arg<'_>,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    same_len(name, p, t)?;
    expect_shape(name, out_shape, ps)?;
    let &[dl] = dl else {
        return Err(invalid(name, format!("dloss has {} elements, expected 1", dl.len())));
    };
    let k = (2.0 * dl as f64 / p.len().max(1) as f64) as f32;
    let row = 4096;
    par_rows(
        out,
        row,
        threads,
        p.len(),
        #[inline(always)]
        |r0, block| {
            let lo = r0 * row;
            let (Some(p), Some(t)) = (p.get(lo..lo + block.len()), t.get(lo..lo + block.len())) else { return };
            for ((o, &p), &t) in block.iter_mut().zip(p).zip(t) {
                *o = (p - t) * k;
            }
        },
    );
    Ok(())
}
