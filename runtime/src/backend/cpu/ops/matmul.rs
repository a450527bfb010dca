//! Batched matrix products through the `gemm` crate.
//!
//! `[..., m, k] @ [..., k, n] → [..., m, n]` with the batch dims broadcast
//! numpy-style. `gemm` takes arbitrary row and column strides, so an operand
//! stored transposed in its last two dims is read in place: [`matmul`]'s
//! `trans_a` / `trans_b` let an executor skip the copy of a `Transpose`
//! that only feeds a matmul.
//!
//! Threads: one large product uses gemm's own rayon split; a batch of
//! products (attention heads) is split across threads by batch, each
//! product on one thread, when that balances.

use super::{expect_shape, invalid, layout::odometer, par_each, Arg, KernelError, Name, Operand};
use gemm::Parallelism;

/// m·n·k above which one product is worth gemm's threads (its own cut-off).
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
pub fn matmul(a: &Operand<'_>, trans_a: bool, b: &Operand<'_>, trans_b: bool, out: &mut [f32], out_shape: &[usize], threads: usize) -> Result<(), KernelError> {
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
        if threads > 1 && !trans_b && n >= 256 * threads && rows * n * k >= COLUMN_SPLIT_MIN {
            columns(rows, n, k, lhs(ad), rhs(bd), out, threads);
            return Ok(());
        }
        let par = if threads > 1 && rows * n * k >= GEMM_PARALLEL_MIN { Parallelism::Rayon(threads) } else { Parallelism::None };
        product(rows, n, k, lhs(ad), rhs(bd), out, par);
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
    let split =
        threads > 1 && nb > 1 && work.saturating_mul(nb) >= BATCH_PARALLEL_MIN && (work < GEMM_PARALLEL_MIN || nb.is_multiple_of(threads) || nb >= 4 * threads);
    let par = if !split && threads > 1 && work >= GEMM_PARALLEL_MIN { Parallelism::Rayon(threads) } else { Parallelism::None };
    let t = if split { threads.min(nb) } else { 1 };
    // One product per item: a helper that starts late still takes a share.
    let per = if split { 1 } else { nb };
    let items: Vec<(usize, &mut [f32])> = out.chunks_mut(per * m * n).enumerate().map(|(i, c)| (i * per, c)).collect();
    par_each(items, t, |(b0, block)| {
        for (i, o) in block.chunks_exact_mut(m * n).enumerate() {
            let Some(&(oa, ob)) = offsets.get(b0 + i) else { return };
            let (Some(a), Some(b)) = (ad.get(oa..oa + a_len), bd.get(ob..ob + b_len)) else { return };
            product(m, n, k, lhs(a), rhs(b), o, par);
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

/// Products at least this large (m·n·k) split their columns over threads.
const COLUMN_SPLIT_MIN: usize = 1 << 26;

/// A raw output pointer shared by threads writing disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each thread writes only its own column block of the output (see
// `columns`), so no element is written by two threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not
    /// the raw pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// out = lhs · rhs with rhs (k × n, row-major) split into one column block per
/// thread, each a single-threaded product: every thread reads the whole
/// (small) left operand once and its own share of the right one, which packs
/// better than splitting one product's inner loops.
fn columns(m: usize, n: usize, k: usize, lhs: Mat<'_>, rhs: Mat<'_>, out: &mut [f32], threads: usize) {
    let fits = |x: &Mat<'_>, r: usize, c: usize| (r - 1) * x.rs + (c - 1) * x.cs < x.data.len();
    if m == 0 || n == 0 || k == 0 || out.len() < m * n || !fits(&lhs, m, k) || !fits(&rhs, k, n) || rhs.cs != 1 {
        return;
    }
    let per = n.div_ceil(threads).next_multiple_of(16).min(n);
    let blocks: Vec<(usize, usize)> = (0..n).step_by(per).map(|j| (j, per.min(n - j))).collect();
    let dst = OutPtr(out.as_mut_ptr());
    par_each(blocks, threads, |(j, w)| {
        // SAFETY: lhs is read at i·rs + p·cs (i < m, p < k), in bounds by
        // `fits`; rhs at p·rs + (j + q) for p < k, q < w, with j + w ≤ n, in
        // bounds by `fits`; the output is written at i·n + j + q for i < m,
        // q < w, inside `out` (m·n elements checked above). Blocks have
        // disjoint column ranges, so threads never write the same element,
        // and `out` is borrowed mutably for the whole call.
        unsafe {
            gemm::gemm(
                m,
                w,
                k,
                dst.get().add(j),
                1,
                n as isize,
                false,
                lhs.data.as_ptr(),
                lhs.cs as isize,
                lhs.rs as isize,
                rhs.data.as_ptr().add(j),
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
fn product(m: usize, n: usize, k: usize, lhs: Mat<'_>, rhs: Mat<'_>, out: &mut [f32], par: Parallelism) {
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
            par,
        );
    }
}
