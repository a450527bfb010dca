//! Row primitives written so that LLVM vectorises them: fixed-width chunks
//! (`as_chunks`) with one accumulator per lane, folded in a fixed order at
//! the end. The result depends only on the data, never on alignment or on
//! how rows were split across threads. All are `#[inline(always)]` so they
//! take the instruction set of the kernel that calls them (see `isa`).
//!
//! Input: rows of f32. Output: sums, maxima and element-wise results.
//! Invariant: as above, bit-identical whatever the alignment and split.

/// Lanes per chunk: one AVX-512 register of f32.
pub const L: usize = 16;
/// Elements per f32 partial sum of the f64-accurate sums: each lane adds
/// 16 values before its block total is widened.
pub const BLOCK: usize = 256;

/// Folds the lanes in order with `f`. (A pairwise tree would be more
/// accurate, but LLVM's SLP vectoriser then splits the lane loops into
/// 2-wide pieces; loops here are plain `for` loops for a similar reason:
/// iterator adaptors such as `fold` over `chunks` are not always inlined,
/// and code outside the kernel loses its instruction set.)
#[inline(always)]
fn fold<T: Copy>(acc: [T; L], f: impl Fn(T, T) -> T) -> T {
    let mut s = acc[0];
    for &a in &acc[1..] {
        s = f(s, a);
    }
    s
}

/// Σ x in f32 lanes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let (chunks, rest) = x.as_chunks::<L>();
    let mut acc = [0.0f32; L];
    for c in chunks {
        for i in 0..L {
            acc[i] += c[i];
        }
    }
    let mut s = fold(acc, |a, b| a + b);
    for v in rest {
        s += v;
    }
    s
}

/// Σ x, accurate to about f64: f32 lanes over blocks of [`BLOCK`], each
/// block's total added in f64 (LLVM vectorises f32 lanes far better than
/// widening to f64 lanes).
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut s = 0.0;
    for b in x.chunks(BLOCK) {
        s += sum(b) as f64;
    }
    s
}

/// Σ (x − mu)², accumulated as [`sum_f64`].
#[inline(always)]
pub fn sq_dev_f64(x: &[f32], mu: f32) -> f64 {
    let mut s = 0.0;
    for b in x.chunks(BLOCK) {
        let (chunks, rest) = b.as_chunks::<L>();
        let mut acc = [0.0f32; L];
        for c in chunks {
            for i in 0..L {
                let d = c[i] - mu;
                acc[i] += d * d;
            }
        }
        let mut t = fold(acc, |a, b| a + b);
        for &v in rest {
            t += (v - mu) * (v - mu);
        }
        s += t as f64;
    }
    s
}

/// Σ a·b in f32 lanes (over the shorter of the two).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ca, ra) = a.as_chunks::<L>();
    let (cb, rb) = b.as_chunks::<L>();
    let mut acc = [0.0f32; L];
    for (x, y) in ca.iter().zip(cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = fold(acc, |a, b| a + b);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The largest element, ignoring NaN (as `f32::max`); −∞ for an empty row.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let (chunks, rest) = x.as_chunks::<L>();
    let mut acc = [f32::NEG_INFINITY; L];
    for c in chunks {
        for i in 0..L {
            acc[i] = max2(acc[i], c[i]);
        }
    }
    let mut m = fold(acc, max2);
    for &v in rest {
        m = max2(m, v);
    }
    m
}

/// `a.max(v)` for an `a` that is never NaN: one `maxps`, where `f32::max`
/// needs three instructions to treat NaN in either operand.
#[inline(always)]
pub fn max2(a: f32, v: f32) -> f32 {
    if v > a {
        v
    } else {
        a
    }
}

/// out = exp(x − m), returning Σ out (as [`sum_f64`]). Two passes: an
/// element-wise loop (a running sum in the same loop kept LLVM from holding
/// the lanes in registers), then the sum over `out`, still in L1.
#[inline(always)]
pub fn exp_shifted(x: &[f32], m: f32, out: &mut [f32]) -> f32 {
    let n = x.len().min(out.len());
    let out = &mut out[..n];
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp(v - m);
    }
    sum_f64(out) as f32
}

/// Σ exp(x − m) (as [`sum_f64`]), through a buffer of one block.
#[inline(always)]
pub fn sum_exp_shifted(x: &[f32], m: f32) -> f32 {
    let mut buf = [0.0f32; BLOCK];
    let mut s = 0.0f64;
    for b in x.chunks(BLOCK) {
        let e = &mut buf[..b.len()];
        for (o, &v) in e.iter_mut().zip(b) {
            *o = exp(v - m);
        }
        s += sum(e) as f64;
    }
    s as f32
}

/// eˣ in f32, within 2 ulp for normal results, branch-free so loops over
/// it vectorise (the libm call does not). Range reduction x = n·ln2 + r with
/// |r| ≤ ln2/2, a degree-6 polynomial for eʳ (Cephes `expf`), then a scale
/// by 2ⁿ built in the exponent bits. exp(−∞) = 0, exp(+∞) = +∞,
/// exp(NaN) = NaN; results below 2⁻¹²⁵ (x < −86.6) flush to 0.
///
/// `mul_add` is a fused multiply-add: one instruction in the `isa`
/// wrappers, a (correctly rounded, so identical) libm call elsewhere.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const LOW: f32 = -86.6;
    // Above the upper bound eˣ overflows to +∞ anyway. (NaN passes `clamp`.)
    let xc = x.clamp(LOW, 88.8);
    let t = xc.mul_add(LOG2E, SHIFTER);
    let nf = t - SHIFTER;
    let r = nf.mul_add(-LN2_LO, nf.mul_add(-LN2_HI, xc));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    // 2ⁿ⁻¹ (n ∈ [−125, 128], so the biased exponent n + 126 is in range),
    // then ·2: 2¹²⁸ itself is not an f32.
    let n = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let scale = f32::from_bits(((n.wrapping_add(126) as u32) & 0xff) << 23);
    let e = y * scale * 2.0;
    if x < LOW {
        0.0
    } else {
        e
    }
}
