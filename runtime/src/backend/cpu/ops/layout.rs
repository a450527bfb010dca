//! Data movement: transposes, broadcasts (`Expand`, the `Broadcast` step)
//! and the causal mask, plus the index arithmetic the reductions share.
//!
//! Shapes are first simplified: size-1 dims dropped and neighbouring dims
//! that move together merged. Most real cases then reduce to a handful of
//! contiguous runs, copied with `copy_from_slice`.
//!
//! Input: a tensor, its shape and a permutation or target shape. Output:
//! the moved data. Invariant: pure copies, no arithmetic.

use super::{expect_shape, invalid, par_each, EngineError, F32Arg, Name, BLOCKS_PER_THREAD, PARALLEL_MIN};

/// Calls `f(offset_a, offset_b)` for every multi-index of `dims` in
/// row-major order; each dim is (size, stride in a, stride in b).
#[inline(always)]
pub(super) fn odometer(dims: &[(usize, usize, usize)], mut f: impl FnMut(usize, usize)) {
    if dims.iter().any(|d| d.0 == 0) {
        return;
    }
    let mut idx = vec![0usize; dims.len()];
    let (mut a, mut b) = (0usize, 0usize);
    loop {
        f(a, b);
        let mut d = dims.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            let (size, sa, sb) = dims[d];
            idx[d] += 1;
            a += sa;
            b += sb;
            if idx[d] < size {
                break;
            }
            idx[d] = 0;
            a -= sa * size;
            b -= sb * size;
        }
    }
}

/// A dense tensor (`big`) paired with a smaller one that has size 1 on some
/// of its dims (a reduction result, or a broadcast source), simplified.
pub(super) struct Pairing {
    /// Merged dims of `big`, outermost first: (size, whether the small
    /// tensor has size 1 there). No size-1 dims; neighbours differ in kind.
    pub dims: Vec<(usize, bool)>,
}

impl Pairing {
    /// `collapsed(d)` says whether dim `d` of `big` is size 1 in the small tensor.
    pub fn new(big: &[usize], collapsed: impl Fn(usize) -> bool) -> Pairing {
        let mut dims: Vec<(usize, bool)> = Vec::new();
        for (d, &size) in big.iter().enumerate() {
            if size == 1 {
                continue;
            }
            let c = collapsed(d);
            match dims.last_mut() {
                Some(last) if last.1 == c => last.0 *= size,
                _ => dims.push((size, c)),
            }
        }
        Pairing { dims }
    }

    /// The innermost run: (length, collapsed), and the outer dims as
    /// (size, stride in big, stride in small) for [`odometer`].
    pub fn rows(&self) -> (usize, bool, Vec<(usize, usize, usize)>) {
        let Some((&(len, collapsed), outer)) = self.dims.split_last() else {
            return (1, false, Vec::new());
        };
        let mut big_stride = len;
        let mut small_stride = if collapsed { 1 } else { len };
        let mut dims = Vec::with_capacity(outer.len());
        for &(size, c) in outer.iter().rev() {
            dims.push((size, big_stride, if c { 0 } else { small_stride }));
            big_stride *= size;
            if !c {
                small_stride *= size;
            }
        }
        dims.reverse();
        (len, collapsed, dims)
    }
}

/// Copies `x` transposed by `perm` into `out`.
pub(super) fn transpose(name: Name<'_>, (x, xs): F32Arg<'_>, perm: &[usize], out: &mut [f32], out_shape: &[usize], threads: usize) -> Result<(), EngineError> {
    let rank = xs.len();
    let mut seen = vec![false; rank];
    for &p in perm {
        match seen.get_mut(p) {
            Some(s) if !*s => *s = true,
            _ => return Err(invalid(name, format!("{perm:?} is not a permutation of {rank} dims"))),
        }
    }
    if perm.len() != rank {
        return Err(invalid(name, format!("{perm:?} is not a permutation of {rank} dims")));
    }
    let want: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
    expect_shape(name, out_shape, &want)?;
    let mut xstride = vec![1usize; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        xstride[d] = xstride[d + 1] * xs[d + 1];
    }
    // Output dims with their source strides, size-1 dims dropped, neighbours
    // that are also neighbours in the source merged.
    let mut dims: Vec<(usize, usize)> = Vec::new();
    for &p in perm {
        let (size, stride) = (xs[p], xstride[p]);
        if size == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == stride * size => *last = (last.0 * size, stride),
            _ => dims.push((size, stride)),
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    let Some(&(d0, s0)) = dims.first() else {
        // Every dim has size 1: one element.
        if let (Some(o), Some(&v)) = (out.first_mut(), x.first()) {
            *o = v;
        }
        return Ok(());
    };
    // Split the outermost output dim across threads; each block is a
    // transpose of its own.
    let inner: usize = dims[1..].iter().map(|d| d.0).product();
    let t = if threads > 1 && out.len() >= PARALLEL_MIN { threads.min(d0) } else { 1 };
    let per = d0.div_ceil((BLOCKS_PER_THREAD * t).min(d0));
    let items: Vec<(usize, &mut [f32])> = out.chunks_mut(per * inner).enumerate().map(|(i, c)| (i * per, c)).collect();
    par_each(
        items,
        t,
        #[inline(always)]
        |(r0, block)| {
            let mut sub = dims.clone();
            sub[0].0 = block.len() / inner.max(1);
            transpose_block(x.get(r0 * s0..).unwrap_or(&[]), &sub, block);
        },
    );
    Ok(())
}

/// `out` (dense, dims' sizes) gets `x[Σ iₖ·strideₖ]`; `dims` as simplified
/// by [`transpose`], so the source-contiguous dim has stride 1.
#[inline(always)]
fn transpose_block(x: &[f32], dims: &[(usize, usize)], out: &mut [f32]) {
    let rank = dims.len();
    let Some(&(nq, sq)) = dims.last() else { return };
    let mut ostride = vec![1usize; rank];
    for d in (0..rank - 1).rev() {
        ostride[d] = ostride[d + 1] * dims[d + 1].0;
    }
    if sq == 1 {
        // The innermost output dim is contiguous in the source: row copies.
        let outer: Vec<(usize, usize, usize)> = (0..rank - 1).map(|d| (dims[d].0, dims[d].1, ostride[d])).collect();
        odometer(
            &outer,
            #[inline(always)]
            |xo, oo| {
                if let (Some(src), Some(dst)) = (x.get(xo..xo + nq), out.get_mut(oo..oo + nq)) {
                    dst.copy_from_slice(src);
                }
            },
        );
        return;
    }
    // Otherwise some other output dim p is the source's contiguous one:
    // transpose (p, last) planes.
    let Some(p) = dims.iter().position(|d| d.1 == 1) else { return };
    let (np, op) = (dims[p].0, ostride[p]);
    let outer: Vec<(usize, usize, usize)> = (0..rank - 1).filter(|&d| d != p).map(|d| (dims[d].0, dims[d].1, ostride[d])).collect();
    odometer(
        &outer,
        #[inline(always)]
        |xo, oo| {
            if let (Some(x), Some(out)) = (x.get(xo..), out.get_mut(oo..)) {
                transpose_plane(x, sq, np, nq, out, op);
            }
        },
    );
}

/// Side of the square tiles moved through registers.
const TILE: usize = 8;

/// out[i·op + j] = x[i + j·sq] for i < np, j < nq: one plane of a
/// transpose, in 8×8 tiles (eight contiguous loads, eight contiguous
/// stores), the ragged edges element by element.
#[inline(always)]
fn transpose_plane(x: &[f32], sq: usize, np: usize, nq: usize, out: &mut [f32], op: usize) {
    let (np8, nq8) = (np - np % TILE, nq - nq % TILE);
    #[cfg(target_arch = "x86_64")]
    let avx = super::isa::has_avx();
    // Eight output rows at a time, front to back. (Taller bands reuse source
    // lines better, but their output rows can share cache sets: rows 12 KiB
    // apart all land in one set of an 8-way L1.)
    for i0 in (0..np8).step_by(TILE) {
        for j0 in (0..nq8).step_by(TILE) {
            let (s, o) = (i0 + j0 * sq, i0 * op + j0);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `has_avx` checked that the CPU has AVX.
            if avx && unsafe { tile_avx(x, s, sq, out, o, op) } {
                continue;
            }
            tile(x, s, sq, out, o, op);
        }
    }
    // Ragged edges: the last np % 8 rows (all columns), the last nq % 8
    // columns (the other rows).
    for i in 0..np {
        let js = if i < np8 { nq8..nq } else { 0..nq };
        if let Some(dst) = out.get_mut(i * op + js.start..i * op + js.end) {
            for (d, j) in dst.iter_mut().zip(js) {
                *d = x.get(i + j * sq).copied().unwrap_or(0.0);
            }
        }
    }
}

/// One 8×8 tile: out[o + i·op + j] = x[s + i + j·sq], through an array.
#[inline(always)]
fn tile(x: &[f32], s: usize, sq: usize, out: &mut [f32], o: usize, op: usize) {
    let mut t = [[0.0f32; TILE]; TILE];
    for (j, row) in t.iter_mut().enumerate() {
        if let Some(src) = x.get(s + j * sq..s + j * sq + TILE) {
            row.copy_from_slice(src);
        }
    }
    let t: [[f32; TILE]; TILE] = std::array::from_fn(|i| std::array::from_fn(|j| t[j][i]));
    for (i, row) in t.iter().enumerate() {
        if let Some(dst) = out.get_mut(o + i * op..o + i * op + TILE) {
            dst.copy_from_slice(row);
        }
    }
}

/// [`tile`] in AVX registers (LLVM leaves the array version scalar):
/// eight loads, the classic unpack / shuffle / lane-permute network, eight
/// stores. Returns false, touching nothing, if the tile is not in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn tile_avx(x: &[f32], s: usize, sq: usize, out: &mut [f32], o: usize, op: usize) -> bool {
    use std::arch::x86_64::*;
    if s + 7 * sq + TILE > x.len() || o + 7 * op + TILE > out.len() {
        return false;
    }
    let src = x.as_ptr();
    // SAFETY: row j reads x[s + j·sq ..][..8]; the check above puts the
    // last of them, j = 7, within `x`.
    let r = unsafe {
        [
            _mm256_loadu_ps(src.add(s)),
            _mm256_loadu_ps(src.add(s + sq)),
            _mm256_loadu_ps(src.add(s + 2 * sq)),
            _mm256_loadu_ps(src.add(s + 3 * sq)),
            _mm256_loadu_ps(src.add(s + 4 * sq)),
            _mm256_loadu_ps(src.add(s + 5 * sq)),
            _mm256_loadu_ps(src.add(s + 6 * sq)),
            _mm256_loadu_ps(src.add(s + 7 * sq)),
        ]
    };
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xee>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xee>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xee>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xee>(t[5], t[7]),
    ];
    let rows = [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ];
    let dst = out.as_mut_ptr();
    for (i, row) in rows.into_iter().enumerate() {
        // SAFETY: row i writes out[o + i·op ..][..8]; the check above puts
        // the last of them, i = 7, within `out`, borrowed mutably here.
        unsafe { _mm256_storeu_ps(dst.add(o + i * op), row) };
    }
    true
}

/// Copies `x` broadcast (numpy rules, right-aligned) to `out_shape`.
pub(super) fn broadcast(x: &[f32], xs: &[usize], out: &mut [f32], out_shape: &[usize]) -> Result<(), EngineError> {
    // Leading size-1 dims beyond the output's rank are harmless.
    let lead = xs.len().saturating_sub(out_shape.len());
    if xs[..lead].iter().any(|&d| d != 1) {
        return Err(invalid(Name::Step("broadcast"), format!("{xs:?} does not broadcast to {out_shape:?}")));
    }
    let xs = &xs[lead..];
    let pad = out_shape.len() - xs.len();
    let src = |d: usize| if d < pad { 1 } else { xs[d - pad] };
    if (0..out_shape.len()).any(|d| src(d) != out_shape[d] && src(d) != 1) {
        return Err(invalid(Name::Step("broadcast"), format!("{xs:?} does not broadcast to {out_shape:?}")));
    }
    spread(x, &Pairing::new(out_shape, |d| src(d) == 1), out);
    Ok(())
}

/// Broadcasts a reduction result over `axes` back to the output's shape.
pub(super) fn expand(name: Name<'_>, (y, _): F32Arg<'_>, axes: &[usize], out: &mut [f32], out_shape: &[usize]) -> Result<(), EngineError> {
    if let Some(a) = axes.iter().find(|&&a| a >= out_shape.len()) {
        return Err(invalid(name, format!("axis {a} is out of range for {out_shape:?}")));
    }
    let kept: usize = out_shape.iter().enumerate().filter(|(d, _)| !axes.contains(d)).map(|(_, s)| s).product();
    if y.len() != kept {
        return Err(invalid(name, format!("operand has {} elements, expected {kept}", y.len())));
    }
    spread(y, &Pairing::new(out_shape, |d| axes.contains(&d)), out);
    Ok(())
}

/// Writes the small tensor `y` of a pairing, broadcast, over all of `out`.
fn spread(y: &[f32], pairing: &Pairing, out: &mut [f32]) {
    let (len, collapsed, outer) = pairing.rows();
    odometer(&outer, |oo, yo| {
        let Some(dst) = out.get_mut(oo..oo + len) else { return };
        if collapsed {
            if let Some(&v) = y.get(yo) {
                dst.fill(v);
            }
        } else if let Some(src) = y.get(yo..yo + len) {
            dst.copy_from_slice(src);
        }
    });
}

/// Entries with key index (last axis) > query index (second to last) become `fill`.
pub(super) fn causal_mask(name: Name<'_>, (x, xs): F32Arg<'_>, fill: f32, out: &mut [f32], out_shape: &[usize], threads: usize) -> Result<(), EngineError> {
    expect_shape(name, out_shape, xs)?;
    let &[.., sq, sk] = xs else {
        return Err(invalid(name, format!("needs rank ≥ 2, got {xs:?}")));
    };
    if sk == 0 || sq == 0 {
        return Ok(());
    }
    super::par_rows(
        out,
        sk,
        threads,
        x.len(),
        #[inline(always)]
        |r0, block| {
            for (i, row) in block.chunks_exact_mut(sk).enumerate() {
                let r = r0 + i;
                let keep = (r % sq + 1).min(sk);
                if let Some(src) = x.get(r * sk..r * sk + keep) {
                    row[..keep].copy_from_slice(src);
                }
                row[keep..].fill(fill);
            }
        },
    );
    Ok(())
}

/// The part of `x` starting at `start` along `dim`, of shape `out_shape`.
pub(crate) fn slice(name: Name<'_>, (x, shape): (&[f32], &[usize]), dim: usize, start: usize, out: &mut [f32], out_shape: &[usize]) -> Result<(), EngineError> {
    if dim >= shape.len() || shape.len() != out_shape.len() || start + out_shape[dim] > shape[dim] {
        return Err(invalid(name, format!("cannot take {out_shape:?} at {start} along dim {dim} of {shape:?}")));
    }
    let outer: usize = out_shape[..dim].iter().product();
    let inner: usize = out_shape[dim + 1..].iter().product();
    let (len, full) = (out_shape[dim], shape[dim]);
    for o in 0..outer {
        let src = (o * full + start) * inner;
        out[o * len * inner..(o + 1) * len * inner].copy_from_slice(&x[src..src + len * inner]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Both tile kernels agree with the definition (the plain one is only
    /// used on CPUs without AVX).
    #[test]
    fn tiles_transpose() {
        let (sq, op) = (13, 11);
        let x: Vec<f32> = (0..8 * sq + 8).map(|v| v as f32).collect();
        let mut want = vec![0.0; 8 * op + 8];
        for i in 0..8 {
            for j in 0..8 {
                want[2 + i * op + j] = x[1 + i + j * sq];
            }
        }
        let mut out = vec![0.0; want.len()];
        super::tile(&x, 1, sq, &mut out, 2, op);
        assert_eq!(out, want);
        #[cfg(target_arch = "x86_64")]
        if super::super::isa::has_avx() {
            let mut out = vec![0.0; want.len()];
            // SAFETY: the CPU has AVX.
            assert!(unsafe { super::tile_avx(&x, 1, sq, &mut out, 2, op) });
            assert_eq!(out, want);
            // Out of bounds: refused, nothing written.
            let mut short = vec![0.0; 7 * op + 9];
            // SAFETY: as above.
            assert!(!unsafe { super::tile_avx(&x, 1, sq, &mut short, 2, op) });
            assert!(short.iter().all(|&v| v == 0.0));
        }
    }
}
