//! Image windows: `Im2Col` (the windows of an NCHW batch, for convolution
//! as a matmul and for pooling) and its adjoint `Col2Im`.
//!
//! Input: x [n, c, h, w] or windows [n, oh, ow, c, kh, kw]. Output: the
//! other. Invariant: each output element is written by one thread, in a
//! fixed order, so results do not depend on the thread count.

use super::{invalid, par_rows, EngineError, F32Arg, Name};
use shardplan_compiler::graph::window_source;

/// The window geometry both kernels check: (n, c, h, w, oh, ow).
fn geometry(name: Name<'_>, image: &[usize], cols: &[usize], kh: usize, kw: usize, stride: usize, padding: usize) -> Result<[usize; 6], EngineError> {
    let (&[n, c, h, w], &[n2, oh, ow, c2, kh2, kw2]) = (image, cols) else {
        return Err(invalid(name, format!("needs an image [n, c, h, w] and windows [n, oh, ow, c, kh, kw], got {image:?} and {cols:?}")));
    };
    let fits = |size: usize, k: usize, o: usize| stride > 0 && size + 2 * padding >= k && (size + 2 * padding - k) / stride + 1 == o;
    if n != n2 || c != c2 || kh != kh2 || kw != kw2 || !fits(h, kh, oh) || !fits(w, kw, ow) {
        return Err(invalid(name, format!("windows {cols:?} are not the {kh}×{kw} windows (stride {stride}, padding {padding}) of {image:?}")));
    }
    Ok([n, c, h, w, oh, ow])
}

/// x [n, c, h, w] → [n, oh, ow, c, kh, kw], `fill` in the padding.
#[allow(clippy::too_many_arguments)]
pub(super) fn im2col(
    name: Name<'_>,
    (x, xs): F32Arg<'_>,
    (kh, kw, stride, padding): (usize, usize, usize, usize),
    fill: f32,
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    let [_, c, h, w, oh, ow] = geometry(name, xs, out_shape, kh, kw, stride, padding)?;
    if x.len() != xs.iter().product::<usize>() {
        return Err(invalid(name, format!("{} elements for shape {xs:?}", x.len())));
    }
    let row = ow * c * kh * kw;
    if row == 0 {
        return Ok(());
    }
    // One row per (image, window row i).
    par_rows(
        out,
        row,
        threads,
        out.len(),
        #[inline(always)]
        |r0, block| {
            for (k, o) in block.chunks_exact_mut(row).enumerate() {
                let (b, i) = ((r0 + k) / oh, (r0 + k) % oh);
                let mut at = 0;
                for j in 0..ow {
                    for ch in 0..c {
                        let plane = (b * c + ch) * h;
                        for a in 0..kh {
                            let run = &mut o[at..at + kw];
                            match window_source(i, a, stride, padding, h) {
                                None => run.fill(fill),
                                Some(y) => {
                                    let src = &x[(plane + y) * w..(plane + y + 1) * w];
                                    for (e, v) in run.iter_mut().enumerate() {
                                        *v = window_source(j, e, stride, padding, w).map_or(fill, |z| src[z]);
                                    }
                                }
                            }
                            at += kw;
                        }
                    }
                }
            }
        },
    );
    Ok(())
}

/// Windows [n, oh, ow, c, kh, kw] → the image [n, c, h, w] that sums them:
/// each pixel gathers the window entries that read it (offsets in order).
pub(super) fn col2im(
    name: Name<'_>,
    (cols, cs): F32Arg<'_>,
    (kh, kw, stride, padding): (usize, usize, usize, usize),
    out: &mut [f32],
    out_shape: &[usize],
    threads: usize,
) -> Result<(), EngineError> {
    let [_, c, h, w, oh, ow] = geometry(name, out_shape, cs, kh, kw, stride, padding)?;
    if cols.len() != cs.iter().product::<usize>() {
        return Err(invalid(name, format!("{} elements for shape {cs:?}", cols.len())));
    }
    if w == 0 {
        return Ok(());
    }
    // The window positions i (and offsets a) that read image row y.
    let readers = |y: usize, k: usize, o: usize| {
        (0..k).filter_map(move |a| {
            let t = (y + padding).checked_sub(a)?;
            (t % stride == 0 && t / stride < o).then_some((t / stride, a))
        })
    };
    // One row per (image, channel, pixel row y).
    par_rows(
        out,
        w,
        threads,
        cols.len(),
        #[inline(always)]
        |r0, block| {
            for (k, o) in block.chunks_exact_mut(w).enumerate() {
                let r = r0 + k;
                let (b, ch, y) = (r / (c * h), (r / h) % c, r % h);
                for (z, v) in o.iter_mut().enumerate() {
                    let mut s = 0.0f32;
                    for (i, a) in readers(y, kh, oh) {
                        for (j, e) in readers(z, kw, ow) {
                            s += cols[((((b * oh + i) * ow + j) * c + ch) * kh + a) * kw + e];
                        }
                    }
                    *v = s;
                }
            }
        },
    );
    Ok(())
}
