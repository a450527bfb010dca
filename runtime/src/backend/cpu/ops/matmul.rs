//! Batched matrix products through the `gemm` crate.
//!
//! `[..., m, k] @ [..., k, n] → [..., m, n]` with the batch dims broadcast
//! numpy-style. `gemm` takes arbitrary row and column strides, so an operand
//! stored transposed in its last two dims is read in place: [`matmul`]'s
//! `trans_a` / `trans_b` let an executor skip the copy of a `Transpose`
//! that only feeds a matmul.
//!
//! Threads: one large product is split into blocks of rows or columns, one
//! per kernel thread; a batch of products (attention heads) is split across
//! threads by batch, each product on one thread, when that balances.
//!
//! Input: two operands with shapes and transposition flags. Output: their
//! product. Invariant: each output element is computed by one thread in a
//! fixed order, so the result does not depend on the thread count.

use super::{expect_shape, invalid, layout::odometer, par_each, Arg, EngineError, Name, Operand};
use gemm::Parallelism;

/// m·n·k above which one product is worth splitting over threads (gemm's own cut-off).
const GEMM_PARALLEL_MIN: usize = gemm::DEFAULT_THREADING_THRESHOLD;
/// Total m·n·k of a batch above which products are split across threads.
const BATCH_PARALLEL_MIN: usize = 1 << 21;

/// One matrix operand as gemm reads it: data and the strides of its
/// logical (row, column).
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// out = a @ b, batched. `trans_a` says that `a`'s data holds the logical
/// operand with its last two dims swapped (stored `[..., k, m]`), likewise
/// `trans_b` (stored `[..., n, k]`); shapes are the stored ones.
pub fn matmul(a: &Operand<'_>, trans_a: bool, b: &Operand<'_>, trans_b: bool, out: &mut [f32], out_shape: &[usize], threads: usize) -> Result<(), EngineError> {
    const NAME: Name<'_> = Name::Step("mat_mul");
    let (Arg::F32(ad), Arg::F32(bd)) = (a.data, b.data) else {
        return Err(invalid(NAME, "operands must be f32".into()));
    };
    let (sa, sb) = (a.shape, b.shape);
    let (&[ref a_batch @ .., a0, a1], &[ref b_batch @ .., b0, b1]) = (sa, sb) else {
        return Err(invalid(NAME, format!("operands must have rank ≥ 2, got {sa:?} and {sb:?}")));
    };
    let (m, k) = if trans_a { (a1, a0) } else { (a0, a1) };
    let (kb, n) = if trans_b { (b1, b0) } else { (b0, b1) };
    if k != kb {
        return Err(invalid(NAME, format!("inner dims differ: {sa:?} @ {sb:?}")));
    }
    let Some(batch) = broadcast_batch(a_batch, b_batch) else {
        return Err(invalid(NAME, format!("batch dims of {sa:?} and {sb:?} do not broadcast")));
    };
    let want: Vec<usize> = batch.iter().copied().chain([m, n]).collect();
    expect_shape(NAME, out_shape, &want)?;
    if ad.len() != sa.iter().product::<usize>() || bd.len() != sb.iter().product::<usize>() || out.len() != want.iter().product::<usize>() {
        return Err(invalid(NAME, "data does not match the shapes".into()));
    }
    if out.is_empty() {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let lhs = |data| if trans_a { Mat { data, rs: 1, cs: m } } else { Mat { data, rs: k, cs: 1 } };
    let rhs = |data| if trans_b { Mat { data, rs: 1, cs: k } } else { Mat { data, rs: n, cs: 1 } };
    let nb: usize = batch.iter().product();
    let (a_len, b_len) = (m * k, k * n);
    let a_count: usize = a_batch.iter().product();
    let b_count: usize = b_batch.iter().product();

    // One shared right operand and a full, untransposed left one: the
    // batch folds into the rows of a single product (the linear layer).
    if b_count == 1 && ((a_count == nb && !trans_a) || nb == 1) {
        let rows = nb * m;
        if threads > 1 && rows * n * k >= GEMM_PARALLEL_MIN {
            split(rows, n, k, lhs(ad), rhs(bd), out, threads);
        } else {
            product(rows, n, k, lhs(ad), rhs(bd), out);
        }
        return Ok(());
    }

    // Operand offsets of each output batch entry.
    let mut offsets = Vec::with_capacity(nb);
    let dims = batch_dims(&batch, a_batch, b_batch, a_len, b_len);
    odometer(&dims, |oa, ob| offsets.push((oa, ob)));
    // Independent products need no synchronisation: split the batch when
    // it divides evenly or is long enough to balance; otherwise, split each
    // product (if it is big enough).
    let work = m * n * k;
    let by_batch =
        threads > 1 && nb > 1 && work.saturating_mul(nb) >= BATCH_PARALLEL_MIN && (work < GEMM_PARALLEL_MIN || nb.is_multiple_of(threads) || nb >= 4 * threads);
    let whole = !by_batch && threads > 1 && work >= GEMM_PARALLEL_MIN;
    let t = if by_batch { threads.min(nb) } else { 1 };
    // One product per item: a helper that starts late still takes a share.
    let per = if by_batch { 1 } else { nb };
    let items: Vec<(usize, &mut [f32])> = out.chunks_mut(per * m * n).enumerate().map(|(i, c)| (i * per, c)).collect();
    par_each(items, t, |(b0, block)| {
        for (i, o) in block.chunks_exact_mut(m * n).enumerate() {
            let Some(&(oa, ob)) = offsets.get(b0 + i) else { return };
            let (Some(a), Some(b)) = (ad.get(oa..oa + a_len), bd.get(ob..ob + b_len)) else { return };
            if whole {
                split(m, n, k, lhs(a), rhs(b), o, threads);
            } else {
                product(m, n, k, lhs(a), rhs(b), o);
            }
        }
    });
    Ok(())
}

/// The broadcast of two batch shapes (right-aligned), if they broadcast.
pub(crate) fn broadcast_batch(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let at = |s: &[usize], d: usize| if d + s.len() < r { 1 } else { s[d + s.len() - r] };
    (0..r)
        .map(|d| match (at(a, d), at(b, d)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
}

/// Odometer dims over the output batch: (size, a stride, b stride), with
/// stride 0 where an operand is broadcast.
pub(crate) fn batch_dims(batch: &[usize], a: &[usize], b: &[usize], a_len: usize, b_len: usize) -> Vec<(usize, usize, usize)> {
    let strides = |s: &[usize], unit: usize| -> Vec<usize> {
        let pad = batch.len() - s.len();
        let mut st = vec![0; batch.len()];
        let mut acc = unit;
        for d in (0..s.len()).rev() {
            st[pad + d] = if s[d] == 1 { 0 } else { acc };
            acc *= s[d];
        }
        st
    };
    let (sa, sb) = (strides(a, a_len), strides(b, b_len));
    (0..batch.len()).map(|d| (batch[d], sa[d], sb[d])).collect()
}

/// A raw output pointer shared by threads writing disjoint blocks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each thread writes only its own column block of the output (see
// `split`), so no element is written by two threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not
    /// the raw pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// out = lhs · rhs split into one block of rows per thread (of columns,
/// when the product is wider than tall), each a single-threaded product run
/// by the kernel threads. Every thread reads its own share of one operand
/// and the whole of the other, which packs better than splitting one
/// product's inner loops, and the kernel threads (unlike gemm's own pool)
/// are usually awake between a step's kernels.
fn split(m: usize, n: usize, k: usize, lhs: Mat<'_>, rhs: Mat<'_>, out: &mut [f32], threads: usize) {
    let fits = |x: &Mat<'_>, r: usize, c: usize| (r - 1) * x.rs + (c - 1) * x.cs < x.data.len();
    if m == 0 || n == 0 || k == 0 || out.len() < m * n || !fits(&lhs, m, k) || !fits(&rhs, k, n) {
        return;
    }
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let per = len.div_ceil(threads).next_multiple_of(16).min(len);
    let blocks: Vec<(usize, usize)> = (0..len).step_by(per).map(|j| (j, per.min(len - j))).collect();
    let dst = OutPtr(out.as_mut_ptr());
    par_each(blocks, threads, |(j, w)| {
        let (rows, cols, o, l, r) = if by_rows { (w, n, j * n, j * lhs.rs, 0) } else { (m, w, j, 0, j * rhs.cs) };
        // SAFETY: as in `product`, for the block: lhs is read at
        // l + i·rs + p·cs and rhs at r + p·rs + q·cs for i < rows, p < k,
        // q < cols, inside them by `fits` (the block lies within the whole
        // product); the output is written at o + i·n + q, inside `out`.
        // Blocks are disjoint row (or column) ranges, so no element is
        // written twice, and `out` is borrowed mutably for the whole call.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                dst.get().add(o),
                1,
                n as isize,
                false,
                lhs.data.as_ptr().add(l),
                lhs.cs as isize,
                lhs.rs as isize,
                rhs.data.as_ptr().add(r),
                rhs.cs as isize,
                rhs.rs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    });
}

/// out (m × n, row-major, dense) = lhs (m × k) · rhs (k × n).
fn product(m: usize, n: usize, k: usize, lhs: Mat<'_>, rhs: Mat<'_>, out: &mut [f32]) {
    let fits = |x: &Mat<'_>, r: usize, c: usize| (r - 1) * x.rs + (c - 1) * x.cs < x.data.len();
    if m == 0 || n == 0 || k == 0 || out.len() < m * n || !fits(&lhs, m, k) || !fits(&rhs, k, n) {
        return;
    }
    // SAFETY: gemm reads lhs at i·rs + p·cs for i < m, p < k, and rhs at
    // p·rs + j·cs for p < k, j < n: `fits` checked the largest of each is in
    // bounds. It writes out at i·n + j for i < m, j < n, within `out`
    // (checked above), and never reads it (read_dst is false). The three
    // slices do not overlap: `out` is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}
