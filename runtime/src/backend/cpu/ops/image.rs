//! Image windows: `Im2Col` (the windows of an NCHW batch, for convolution
//! as a matmul and for pooling) and its adjoint `Col2Im`.
//!
//! Input: x [n, c, h, w] or windows [n, oh, ow, c, kh, kw]. Output: the
//! other. Invariant: each output element is written by one thread, in a
//! fixed order, so results do not depend on the thread count.

use super::{invalid, par_rows, EngineError, F32Arg, Name};

/// The window geometry both kernels check: (n, c, h, w, oh, ow).
fn geometry(name: Name<'_>, image: &[usize], cols: &[usize], kh: usize, kw: usize, stride: usize, padding: usize) -> Result<[usize; 6], EngineError> {
    shardplan_compiler::graph::window_geometry(image, cols, (kh, kw), stride, padding)
        .ok_or_else(|| invalid(name, format!("windows {cols:?} are not the {kh}×{kw} windows (stride {stride}, padding {padding}) of {image:?}")))
}

/// The offsets `a` of a window at position `i` (stride, padding) that fall
/// inside an image of `size` rows: a in lo..hi, reading rows i·stride + a − padding.
#[inline(always)]
fn inside(i: usize, k: usize, stride: usize, padding: usize, size: usize) -> (usize, usize) {
    let first = i * stride;
    let lo = padding.saturating_sub(first).min(k);
    let hi = (size + padding).saturating_sub(first).min(k).max(lo);
    (lo, hi)
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
    // One row per (image, window row i); each window row a run of kw,
    // copied where it lies inside the image and filled where it does not.
    par_rows(
        out,
        row,
        threads,
        out.len(),
        #[inline(always)]
        |r0, block| {
            for (k, o) in block.chunks_exact_mut(row).enumerate() {
                let (b, i) = ((r0 + k) / oh, (r0 + k) % oh);
                let (alo, ahi) = inside(i, kh, stride, padding, h);
                for (j, win) in o.chunks_exact_mut(c * kh * kw).enumerate() {
                    let (elo, ehi) = inside(j, kw, stride, padding, w);
                    let z0 = (j * stride + elo).saturating_sub(padding);
                    for (ch, plane) in win.chunks_exact_mut(kh * kw).enumerate() {
                        let base = (b * c + ch) * h;
                        for (a, run) in plane.chunks_exact_mut(kw).enumerate() {
                            if a < alo || a >= ahi {
                                run.fill(fill);
                                continue;
                            }
                            let y = i * stride + a - padding;
                            let src = &x[(base + y) * w + z0..(base + y) * w + z0 + (ehi - elo)];
                            run[..elo].fill(fill);
                            run[elo..ehi].copy_from_slice(src);
                            run[ehi..].fill(fill);
                        }
                    }
                }
            }
        },
    );
    Ok(())
}

/// Windows [n, oh, ow, c, kh, kw] → the image [n, c, h, w] that sums them:
/// each image plane is one thread's, which adds the window entries into it
/// in window order (as the reference interpreter does).
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
    if h * w == 0 {
        return Ok(());
    }
    par_rows(
        out,
        h * w,
        threads,
        cols.len(),
        #[inline(always)]
        |r0, block| {
            for (k, plane) in block.chunks_exact_mut(h * w).enumerate() {
                let (b, ch) = ((r0 + k) / c, (r0 + k) % c);
                plane.fill(0.0);
                for i in 0..oh {
                    let (alo, ahi) = inside(i, kh, stride, padding, h);
                    for j in 0..ow {
                        let (elo, ehi) = inside(j, kw, stride, padding, w);
                        let z0 = (j * stride + elo).saturating_sub(padding);
                        let win = &cols[(((b * oh + i) * ow + j) * c + ch) * kh * kw..][..kh * kw];
                        for a in alo..ahi {
                            let y = i * stride + a - padding;
                            let dst = &mut plane[y * w + z0..y * w + z0 + (ehi - elo)];
                            for (d, v) in dst.iter_mut().zip(&win[a * kw + elo..a * kw + ehi]) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        },
    );
    Ok(())
}
