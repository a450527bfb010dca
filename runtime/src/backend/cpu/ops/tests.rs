//! Every library kernel against the reference interpreter on random
//! inputs, with shapes that are not multiples of the lane width, plus
//! thread-count independence and the error paths.

use super::*;
use shardplan_compiler::interp::{self, Env, Tensor};

/// Test data from the runtime's own seeded generator.
struct Rng(crate::data::rng::SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    /// Values on a coarse grid, so maxima tie.
    fn coarse(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| (self.f32() * 4.0).round() / 4.0).collect()
    }

    fn ids(&mut self, n: usize, hi: usize) -> Vec<i32> {
        (0..n).map(|_| (self.next() % hi as u64) as i32).collect()
    }
}

/// A test operand.
#[derive(Clone, Debug)]
enum In {
    F(Vec<f32>, Vec<usize>),
    I(Vec<i32>, Vec<usize>),
}

fn f(data: Vec<f32>, shape: &[usize]) -> In {
    In::F(data, shape.to_vec())
}

fn i(data: Vec<i32>, shape: &[usize]) -> In {
    In::I(data, shape.to_vec())
}

fn operands(ins: &[In]) -> Vec<Operand<'_>> {
    ins.iter()
        .map(|x| match x {
            In::F(d, s) => Operand::f32(d, s),
            In::I(d, s) => Operand::i32(d, s),
        })
        .collect()
}

fn tensor(x: &In) -> Tensor {
    match x {
        In::F(d, s) => Tensor::new(s.clone(), d.iter().map(|&v| v as f64).collect()),
        In::I(d, s) => Tensor::new(s.clone(), d.iter().map(|&v| v as f64).collect()),
    }
}

fn reference(op: &Op, ins: &[In], out_shape: &[usize]) -> Result<Tensor, interp::InterpError> {
    let hyper = |_| 0.0;
    let env = Env { inputs: &[], params: &[], states: &[], hyper: &hyper };
    let ts: Vec<Tensor> = ins.iter().map(tensor).collect();
    let refs: Vec<&Tensor> = ts.iter().collect();
    interp::apply(op, &refs, out_shape, &env)
}

fn ours(op: &Op, ins: &[In], out_shape: &[usize], threads: usize) -> Result<Vec<f32>, EngineError> {
    // NaN-filled, so a kernel that skips an element shows.
    let mut out = vec![f32::NAN; out_shape.iter().product()];
    run(op, &operands(ins), &mut out, out_shape, threads)?;
    Ok(out)
}

/// |got − want| ≤ tol·max(1, |want|); non-finite values must match exactly.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        let ok = if w.is_finite() { (g - w).abs() <= tol * w.abs().max(1.0) } else { g == w || (g.is_nan() && w.is_nan()) };
        assert!(ok, "{what}: element {j}: got {g}, want {w} (tol {tol})");
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Checks `op` against the interpreter, and that 1, 2 and 3 threads agree
/// bit for bit. Returns the single-threaded result.
fn check_tol(op: &Op, ins: &[In], out_shape: &[usize], tol: f64) -> Vec<f32> {
    let want = reference(op, ins, out_shape).unwrap_or_else(|e| panic!("{op:?}: reference failed: {e}"));
    assert_eq!(want.shape, out_shape, "{op:?}: reference shape");
    let got = ours(op, ins, out_shape, 1).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    assert_close(&format!("{op:?} on {:?}", shapes(ins)), &got, &want.data, tol);
    for t in [2, 3] {
        let other = ours(op, ins, out_shape, t).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        if *op == Op::MatMul {
            assert_close(&format!("{op:?} on {t} threads"), &other, &want.data, tol);
        } else {
            assert!(bits(&got) == bits(&other), "{op:?} on {:?}: {t} threads differ from 1", shapes(ins));
        }
    }
    got
}

fn check(op: &Op, ins: &[In], out_shape: &[usize]) -> Vec<f32> {
    check_tol(op, ins, out_shape, 1e-5)
}

fn shapes(ins: &[In]) -> Vec<Vec<usize>> {
    ins.iter()
        .map(|x| match x {
            In::F(_, s) | In::I(_, s) => s.clone(),
        })
        .collect()
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// Big enough that every kernel splits its work across threads.
const BIG: [usize; 2] = [300, 257];

#[test]
fn matmul_matches_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(1));
    let cases: &[(&[usize], &[usize], &[usize])] = &[
        (&[1, 1], &[1, 1], &[1, 1]),
        (&[3, 7], &[7, 17], &[3, 17]),
        (&[33, 17], &[17, 5], &[33, 5]),
        (&[2, 3, 4], &[4, 5], &[2, 3, 5]),
        (&[1, 3, 4], &[2, 4, 5], &[2, 3, 5]),
        (&[3, 4], &[2, 4, 5], &[2, 3, 5]),
        (&[2, 1, 3, 4], &[3, 4, 5], &[2, 3, 3, 5]),
        (&[2, 3, 0], &[0, 5], &[2, 3, 5]),
        (&[0, 3], &[3, 5], &[0, 5]),
        // One large product (gemm's threads), many small ones (batch split).
        (&[200, 100], &[100, 300], &[200, 300]),
        (&[2, 3, 100, 33], &[2, 3, 33, 97], &[2, 3, 100, 97]),
        (&[64, 40, 40], &[64, 40, 40], &[64, 40, 40]),
    ];
    for &(sa, sb, so) in cases {
        let k = sa[sa.len() - 1];
        let ins = [f(rng.vec(numel(sa)), sa), f(rng.vec(numel(sb)), sb)];
        check_tol(&Op::MatMul, &ins, so, 1e-5 * (k.max(1) as f64).sqrt());
    }
}

#[test]
fn matmul_reads_transposed_operands_in_place() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(2));
    let cases: &[(&[usize], &[usize])] = &[(&[7, 17], &[17, 5]), (&[2, 3, 33, 17], &[3, 17, 9]), (&[1, 9, 4], &[2, 4, 3]), (&[130, 70], &[70, 150])];
    // Large enough to split over threads: by columns, by rows, and each
    // product of a batch that does not divide over the threads.
    let cases = [cases, &[(&[150, 70], &[70, 130]), (&[3, 140, 70], &[70, 130])]].concat();
    let cases = cases.as_slice();
    for &(sa, sb) in cases {
        let (a, b) = (rng.vec(numel(sa)), rng.vec(numel(sb)));
        let swap = |s: &[usize]| -> (Vec<usize>, Vec<usize>) {
            let r = s.len();
            let perm: Vec<usize> = (0..r - 2).chain([r - 1, r - 2]).collect();
            (perm.iter().map(|&p| s[p]).collect(), perm)
        };
        let transposed = |x: &[f32], s: &[usize]| -> Vec<f32> {
            let (ts, perm) = swap(s);
            ours(&Op::Transpose { perm }, &[f(x.to_vec(), s)], &ts, 1).expect("transpose")
        };
        let ins = [f(a.clone(), sa), f(b.clone(), sb)];
        let r = sa.len().max(sb.len());
        let mut out_shape: Vec<usize> = (0..r - 2)
            .map(|d| {
                let at = |s: &[usize]| if d + s.len() < r { 1 } else { s[d + s.len() - r] };
                at(sa).max(at(sb))
            })
            .collect();
        out_shape.extend([sa[sa.len() - 2], sb[sb.len() - 1]]);
        let plain = ours(&Op::MatMul, &ins, &out_shape, 2).expect("matmul");
        let (at, bt) = (transposed(&a, sa), transposed(&b, sb));
        let (sat, sbt) = (swap(sa).0, swap(sb).0);
        for (ta, tb) in [(false, true), (true, false), (true, true)] {
            let (xa, xsa) = if ta { (&at, &sat) } else { (&a, &sa.to_vec()) };
            let (xb, xsb) = if tb { (&bt, &sbt) } else { (&b, &sb.to_vec()) };
            let mut out = vec![f32::NAN; plain.len()];
            matmul(&Operand::f32(xa, xsa), ta, &Operand::f32(xb, xsb), tb, &mut out, &out_shape, 2).expect("transposed matmul");
            let want: Vec<f64> = plain.iter().map(|&v| v as f64).collect();
            assert_close(
                &format!("matmul {sa:?}{} @ {sb:?}{}", if ta { "ᵀ" } else { "" }, if tb { "ᵀ" } else { "" }),
                &out,
                &want,
                1e-5 * (sa[sa.len() - 1] as f64).sqrt(),
            );
        }
    }
}

#[test]
fn transpose_matches_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(3));
    let cases: &[(&[usize], &[usize])] = &[
        (&[3, 7], &[1, 0]),
        (&[7], &[0]),
        (&[], &[]),
        (&[1, 5, 1, 7], &[3, 2, 1, 0]),
        (&[2, 17, 3, 33], &[0, 2, 1, 3]),
        (&[2, 17, 3, 33], &[0, 1, 3, 2]),
        (&[2, 17, 3, 33], &[3, 1, 0, 2]),
        (&[33, 65], &[1, 0]),
        (&[70, 1030], &[1, 0]),
        (&[5, 130, 111], &[2, 0, 1]),
        (&[0, 3], &[1, 0]),
    ];
    for &(s, perm) in cases {
        let out: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
        check(&Op::Transpose { perm: perm.to_vec() }, &[f(rng.vec(numel(s)), s)], &out);
    }
    for perm in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
        let s = [3, 4, 17];
        let out: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
        check(&Op::Transpose { perm: perm.to_vec() }, &[f(rng.vec(numel(&s)), &s)], &out);
    }
}

fn reduced_shape(s: &[usize], axes: &[usize], keep: bool) -> Vec<usize> {
    if keep {
        s.iter().enumerate().map(|(d, &x)| if axes.contains(&d) { 1 } else { x }).collect()
    } else {
        s.iter().enumerate().filter(|(d, _)| !axes.contains(d)).map(|(_, &x)| x).collect()
    }
}

#[test]
fn reductions_match_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(4));
    let cases: &[(&[usize], &[usize])] = &[
        (&[7], &[0]),
        (&[7], &[]),
        (&[3, 17], &[1]),
        (&[3, 17], &[0]),
        (&[3, 17], &[0, 1]),
        (&[2, 3, 4, 5], &[1, 3]),
        (&[2, 3, 4, 5], &[0, 2]),
        (&[2, 3, 4, 5], &[1, 2]),
        (&[2, 3, 4, 5], &[0, 1, 2, 3]),
        (&[2, 1, 33], &[1]),
        (&[2, 1, 33], &[0, 1]),
        (&[3, 0, 5], &[1]),
        (&BIG, &[1]),
        (&BIG, &[0]),
        (&[3, 100, 257], &[1]),
        (&[1000, 70], &[0]),
        (&[40, 30, 70], &[0, 2]),
    ];
    for &(s, axes) in cases {
        let x = rng.coarse(numel(s));
        for keepdims in [false, true] {
            let out = reduced_shape(s, axes, keepdims);
            let ax = axes.to_vec();
            check(&Op::Sum { axes: ax.clone(), keepdims }, &[f(x.clone(), s)], &out);
            check(&Op::Mean { axes: ax.clone(), keepdims }, &[f(x.clone(), s)], &out);
            check(&Op::Max { axes: ax.clone(), keepdims }, &[f(x.clone(), s)], &out);
        }
    }
    // Sums of many random values.
    let x = rng.vec(numel(&BIG));
    check(&Op::Sum { axes: vec![0, 1], keepdims: false }, &[f(x.clone(), &BIG)], &[]);
    check(&Op::Mean { axes: vec![0], keepdims: false }, &[f(x, &BIG)], &[257]);
}

#[test]
fn max_grad_matches_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(5));
    let cases: &[(&[usize], &[usize])] =
        &[(&[7], &[0]), (&[3, 17], &[1]), (&[3, 17], &[0]), (&[2, 3, 4, 5], &[1, 3]), (&[2, 3, 4, 5], &[0, 1, 2, 3]), (&[33, 7], &[])];
    for &(s, axes) in cases {
        let x = rng.coarse(numel(s));
        for keepdims in [false, true] {
            let ys = reduced_shape(s, axes, keepdims);
            let y = ours(&Op::Max { axes: axes.to_vec(), keepdims }, &[f(x.clone(), s)], &ys, 1).expect("max");
            let dy = rng.vec(numel(&ys));
            let op = Op::MaxGrad { axes: axes.to_vec(), keepdims };
            check(&op, &[f(x.clone(), s), f(y, &ys), f(dy, &ys)], s);
        }
    }
}

#[test]
fn sum_to_matches_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(6));
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 3, 4], &[4]),
        (&[2, 3, 4], &[3, 1]),
        (&[2, 3, 4], &[1, 3, 4]),
        (&[2, 3, 4], &[2, 1, 4]),
        (&[2, 3, 4], &[2, 3, 4]),
        (&[3, 4], &[]),
        (&[7, 1, 17], &[1, 17]),
        (&BIG, &[257]),
        (&BIG, &[300, 1]),
        (&[3, 100, 257], &[3, 1, 257]),
    ];
    for &(s, out) in cases {
        check(&Op::SumTo, &[f(rng.vec(numel(s)), s)], out);
    }
}

#[test]
fn expand_and_broadcast_match_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(7));
    let cases: &[(&[usize], &[usize])] = &[(&[3, 7, 5], &[1]), (&[3, 7, 5], &[0, 2]), (&[3, 7, 5], &[0, 1, 2]), (&[17], &[0]), (&[3, 7, 5], &[])];
    for &(s, axes) in cases {
        for keepdims in [false, true] {
            let ys = reduced_shape(s, axes, keepdims);
            check(&Op::Expand { axes: axes.to_vec(), keepdims }, &[f(rng.vec(numel(&ys)), &ys)], s);
        }
    }
    let cases: &[(&[usize], &[usize])] = &[
        (&[5], &[3, 5]),
        (&[3, 1], &[3, 5]),
        (&[], &[2, 3]),
        (&[2, 1, 4], &[2, 3, 4]),
        (&[1, 3, 1], &[2, 3, 4]),
        (&[3, 1, 5], &[4, 3, 7, 5]),
        (&[1, 1, 17], &[17]),
        (&[7], &[7]),
    ];
    for &(s, to) in cases {
        let x = rng.vec(numel(s));
        let stripped: Vec<usize> = s[s.len().saturating_sub(to.len())..].to_vec();
        let want = interp::broadcast(&Tensor::new(stripped, x.iter().map(|&v| v as f64).collect()), to);
        let mut out = vec![f32::NAN; numel(to)];
        broadcast(&Operand::f32(&x, s), &mut out, to).expect("broadcast");
        assert_close(&format!("broadcast {s:?} → {to:?}"), &out, &want.data, 0.0);
    }
    let mut out = vec![0.0; 6];
    assert!(matches!(broadcast(&Operand::f32(&[1.0, 2.0], &[2]), &mut out, &[2, 3]), Err(EngineError::Bug(_))));
}

/// x with entries above the diagonal of its last two axes set to −∞.
fn masked(x: Vec<f32>, s: &[usize]) -> Vec<f32> {
    ours(&Op::CausalMask { fill: f64::NEG_INFINITY }, &[f(x, s)], s, 1).expect("mask")
}

#[test]
fn softmax_matches_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(8));
    let cases: &[(&[usize], usize)] =
        &[(&[1], 0), (&[3, 7], 1), (&[3, 7], 0), (&[2, 17, 33], 2), (&[2, 17, 33], 1), (&[2, 17, 33], 0), (&BIG, 1), (&[BIG[1], BIG[0]], 0)];
    for &(s, axis) in cases {
        let x: Vec<f32> = rng.vec(numel(s)).iter().map(|v| v * 8.0).collect();
        check(&Op::Softmax { axis }, &[f(x.clone(), s)], s);
        check(&Op::LogSoftmax { axis }, &[f(x, s)], s);
    }
    // After a causal mask: every row has a finite entry, no NaN appears.
    let s = [2, 3, 17, 17];
    let x = masked(rng.vec(numel(&s)), &s);
    let y = check(&Op::Softmax { axis: 3 }, &[f(x.clone(), &s)], &s);
    assert!(y.iter().all(|v| v.is_finite()));
    check(&Op::LogSoftmax { axis: 3 }, &[f(x, &s)], &s);
    // Large offsets: the max is subtracted.
    let x = vec![1000.0, 1001.0, -1000.0, 999.0];
    check(&Op::Softmax { axis: 0 }, &[f(x.clone(), &[4])], &[4]);
    check(&Op::LogSoftmax { axis: 0 }, &[f(x, &[4])], &[4]);
}

#[test]
fn softmax_of_fully_masked_rows_is_zero() {
    let inf = f32::NEG_INFINITY;
    let x = [inf, inf, inf, 0.5, inf, inf];
    let y = ours(&Op::Softmax { axis: 1 }, &[f(x.to_vec(), &[2, 3])], &[2, 3], 1).expect("softmax");
    assert_eq!(y, [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    let y = ours(&Op::LogSoftmax { axis: 1 }, &[f(x.to_vec(), &[2, 3])], &[2, 3], 1).expect("log_softmax");
    assert_eq!(y, [inf, inf, inf, 0.0, inf, inf]);
}

#[test]
fn softmax_grads_match_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(9));
    let cases: &[(&[usize], usize)] = &[(&[7], 0), (&[3, 17], 1), (&[2, 17, 33], 2), (&[2, 17, 33], 1), (&BIG, 1)];
    for &(s, axis) in cases {
        let x = rng.vec(numel(s));
        let dy = rng.vec(numel(s));
        let y = ours(&Op::Softmax { axis }, &[f(x.clone(), s)], s, 1).expect("softmax");
        check(&Op::SoftmaxGrad { axis }, &[f(y, s), f(dy.clone(), s)], s);
        let ly = ours(&Op::LogSoftmax { axis }, &[f(x, s)], s, 1).expect("log_softmax");
        check(&Op::LogSoftmaxGrad { axis }, &[f(ly, s), f(dy, s)], s);
    }
}

#[test]
fn layer_norm_rms_norm_and_grads_match_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(10));
    for s in [&[17][..], &[3, 7], &[2, 5, 33], &[1, 1], &BIG] {
        let d = s[s.len() - 1];
        let n = numel(s);
        let x: Vec<f32> = rng.vec(n).iter().map(|v| 3.0 * v + 0.5).collect();
        let (gamma, beta, dy) = (rng.vec(d), rng.vec(d), rng.vec(n));
        let eps = 1e-5;
        check(&Op::LayerNorm { eps }, &[f(x.clone(), s), f(gamma.clone(), &[d]), f(beta, &[d])], s);
        check(&Op::LayerNormGradX { eps }, &[f(x.clone(), s), f(gamma.clone(), &[d]), f(dy.clone(), s)], s);
        check(&Op::LayerNormGradGamma { eps }, &[f(x.clone(), s), f(dy.clone(), s)], &[d]);
        check(&Op::RmsNorm { eps }, &[f(x.clone(), s), f(gamma.clone(), &[d])], s);
        check(&Op::RmsNormGradX { eps }, &[f(x.clone(), s), f(gamma, &[d]), f(dy.clone(), s)], s);
        check(&Op::RmsNormGradGamma { eps }, &[f(x, s), f(dy, s)], &[d]);
    }
}

#[test]
fn causal_mask_matches_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(11));
    for s in [&[3, 3][..], &[2, 5, 7], &[2, 7, 5], &[1, 1], &[4, 130, 130]] {
        for fill in [f64::NEG_INFINITY, -1e9] {
            check(&Op::CausalMask { fill }, &[f(rng.vec(numel(s)), s)], s);
        }
    }
}

#[test]
fn rope_and_its_inverse_match_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(13));
    // [seq, dim], [batch, seq, heads · head_dim], and enough rows to split across threads.
    for (s, head_dim) in [(&[5, 8][..], 8), (&[2, 7, 12], 4), (&[3, 1, 2], 2), (&[4, 300, 64], 16)] {
        for (base, inverse) in [(10000.0, false), (10000.0, true), (500000.0, false)] {
            check(&Op::Rope { head_dim, base, inverse }, &[f(rng.vec(numel(s)), s)], s);
        }
    }
    // An odd head dim, or one that does not divide the last dim, is refused.
    for (s, head_dim) in [(&[2, 6][..], 3), (&[2, 6], 4), (&[2, 6], 0)] {
        assert!(ours(&Op::Rope { head_dim, base: 10000.0, inverse: false }, &[f(rng.vec(numel(s)), s)], s, 1).is_err());
    }
}

#[test]
fn im2col_and_col2im_match_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(14));
    // (image [n, c, h, w], kernel (kh, kw), stride, padding)
    let cases: &[([usize; 4], (usize, usize), usize, usize)] = &[
        ([1, 1, 4, 4], (3, 3), 1, 0),
        ([2, 3, 5, 6], (3, 3), 1, 1),
        ([2, 2, 7, 7], (3, 2), 2, 1),
        ([3, 4, 8, 8], (2, 2), 2, 0),
        ([1, 2, 5, 5], (5, 5), 3, 2),
        ([64, 16, 8, 8], (3, 3), 1, 1),
    ];
    for &(img, (kh, kw), stride, padding) in cases {
        let (oh, ow) = ((img[2] + 2 * padding - kh) / stride + 1, (img[3] + 2 * padding - kw) / stride + 1);
        let cols = [img[0], oh, ow, img[1], kh, kw];
        let x = rng.vec(numel(&img));
        for fill in [0.0, f64::NEG_INFINITY] {
            check(&Op::Im2Col { kh, kw, stride, padding, fill }, &[f(x.clone(), &img)], &cols);
        }
        check(&Op::Col2Im { kh, kw, stride, padding }, &[f(rng.vec(numel(&cols)), &cols)], &img);
    }
    // Windows that are not the image's are refused, not read out of bounds.
    let bad = ours(&Op::Im2Col { kh: 3, kw: 3, stride: 1, padding: 0, fill: 0.0 }, &[f(rng.vec(16), &[1, 1, 4, 4])], &[1, 3, 3, 1, 3, 3], 1);
    assert!(bad.is_err(), "{bad:?}");
    let bad = ours(&Op::Col2Im { kh: 3, kw: 3, stride: 0, padding: 0 }, &[f(rng.vec(36), &[1, 2, 2, 1, 3, 3])], &[1, 1, 4, 4], 1);
    assert!(bad.is_err(), "{bad:?}");
}

#[test]
fn dropout_matches_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(15));
    for (s, p) in [(&[4, 5][..], 0.1), (&[3, 7, 9], 0.5), (&[1, 1], 0.9), (&[64, 300], 0.25)] {
        let ids: Vec<i32> = (0..s[0]).map(|r| (r * 37 + 11) as i32).collect();
        let x = rng.vec(numel(s));
        for step in [0.0f32, 7.0, 12345.0] {
            let out = check(&Op::Dropout { p, seed: 3 }, &[f(x.clone(), s), i(ids.clone(), &[s[0]]), f(vec![step], &[])], s);
            // About p of the elements are dropped, and the others scaled.
            let dropped = out.iter().filter(|v| **v == 0.0).count() as f64 / out.len() as f64;
            if out.len() > 1000 {
                assert!((dropped - p).abs() < 0.03, "p {p}: dropped {dropped}");
            }
        }
    }
    // Another seed, step or sample draws another mask.
    let s = [8, 64];
    let x = vec![1.0f32; 512];
    let ids: Vec<i32> = (0..8).collect();
    let mask = |seed: u64, step: f32, ids: &[i32]| {
        ours(&Op::Dropout { p: 0.5, seed }, &[f(x.clone(), &s), i(ids.to_vec(), &[8]), f(vec![step], &[])], &s, 1).expect("runs")
    };
    let base = mask(1, 0.0, &ids);
    assert_ne!(base, mask(2, 0.0, &ids));
    assert_ne!(base, mask(1, 1.0, &ids));
    let other: Vec<i32> = (8..16).collect();
    assert_ne!(base, mask(1, 0.0, &other));
    // A sample's row is the same wherever it sits in the batch.
    let swapped: Vec<i32> = ids.iter().rev().copied().collect();
    let back = mask(1, 0.0, &swapped);
    assert_eq!(&base[..64], &back[7 * 64..]);
}

#[test]
fn embedding_and_grad_match_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(12));
    for (v, d, ids_shape) in [(17, 33, &[3, 7][..]), (1, 1, &[5]), (5, 3, &[]), (65, 33, &[40, 100])] {
        let table = rng.vec(v * d);
        let ids = rng.ids(numel(ids_shape), v);
        let mut out: Vec<usize> = ids_shape.to_vec();
        out.push(d);
        check(&Op::Embedding, &[f(table, &[v, d]), i(ids.clone(), ids_shape)], &out);
        let dy = rng.vec(numel(&out));
        check(&Op::EmbeddingGrad, &[i(ids, ids_shape), f(dy, &out)], &[v, d]);
    }
}

#[test]
fn embedding_ids_out_of_range_are_index_errors() {
    let table = vec![0.0; 4 * 3];
    for bad in [4, -1, i32::MAX] {
        let ids = [0, bad, 1];
        let err = ours(&Op::Embedding, &[f(table.clone(), &[4, 3]), i(ids.to_vec(), &[3])], &[3, 3], 1);
        match err {
            Err(EngineError::BadData(m)) => assert!(m.contains(&bad.to_string()) && m.contains("embedding id"), "{m}"),
            other => panic!("expected an index error, got {other:?}"),
        }
        let err = ours(&Op::EmbeddingGrad, &[i(ids.to_vec(), &[3]), f(vec![0.0; 9], &[3, 3])], &[4, 3], 2);
        assert!(matches!(err, Err(EngineError::BadData(_))), "{err:?}");
    }
}

#[test]
fn cross_entropy_and_grad_match_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(13));
    for s in [&[7, 17][..], &[2, 3, 33], &[1, 1], &[5], &BIG] {
        let c = s[s.len() - 1];
        let rows = numel(s) / c;
        let x: Vec<f32> = rng.vec(numel(s)).iter().map(|v| 6.0 * v).collect();
        let ls = &s[..s.len() - 1];
        let labels = rng.ids(rows, c);
        check(&Op::CrossEntropy, &[f(x.clone(), s), i(labels.clone(), ls)], &[]);
        check(&Op::CrossEntropyGrad, &[f(x, s), i(labels, ls), f(vec![0.7], &[])], s);
    }
}

#[test]
fn labels_out_of_range_are_index_errors() {
    let x = vec![0.0; 2 * 5];
    for bad in [5, -1] {
        let labels = vec![1, bad];
        let err = ours(&Op::CrossEntropy, &[f(x.clone(), &[2, 5]), i(labels.clone(), &[2])], &[], 1);
        match err {
            Err(EngineError::BadData(m)) => assert!(m.contains("label") && m.contains(&bad.to_string()), "{m}"),
            other => panic!("expected an index error, got {other:?}"),
        }
        let err = ours(&Op::CrossEntropyGrad, &[f(x.clone(), &[2, 5]), i(labels, &[2]), f(vec![1.0], &[])], &[2, 5], 1);
        assert!(matches!(err, Err(EngineError::BadData(_))), "{err:?}");
    }
}

#[test]
fn mse_and_grad_match_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(14));
    for s in [&[17][..], &[3, 7], &[1], &BIG, &[70000]] {
        let (p, t) = (rng.vec(numel(s)), rng.vec(numel(s)));
        check(&Op::Mse, &[f(p.clone(), s), f(t.clone(), s)], &[]);
        check(&Op::MseGrad, &[f(p, s), f(t, s), f(vec![1.3], &[])], s);
    }
}

#[test]
fn malformed_calls_are_invalid() {
    let x = vec![0.0f32; 6];
    let invalid = |r: Result<Vec<f32>, EngineError>| matches!(r, Err(EngineError::Bug(_)));
    // Not a library op.
    assert!(invalid(ours(&Op::Add, &[f(x.clone(), &[6]), f(x.clone(), &[6])], &[6], 1)));
    assert!(invalid(ours(&Op::Reshape, &[f(x.clone(), &[6])], &[2, 3], 1)));
    // Wrong arity, wrong dtype, data not matching its shape.
    assert!(invalid(ours(&Op::MatMul, &[f(x.clone(), &[2, 3])], &[2, 3], 1)));
    assert!(invalid(ours(&Op::Softmax { axis: 0 }, &[i(vec![0; 6], &[6])], &[6], 1)));
    assert!(invalid(ours(&Op::Softmax { axis: 0 }, &[f(x.clone(), &[7])], &[7], 1)));
    // Shapes that do not fit the op.
    assert!(invalid(ours(&Op::MatMul, &[f(x.clone(), &[2, 3]), f(x.clone(), &[2, 3])], &[2, 3], 1)));
    assert!(invalid(ours(&Op::MatMul, &[f(x.clone(), &[6]), f(x.clone(), &[6])], &[], 1)));
    assert!(invalid(ours(&Op::MatMul, &[f(x.clone(), &[2, 1, 3]), f(vec![0.0; 9], &[3, 1, 3])], &[3, 1, 3], 1)));
    assert!(invalid(ours(&Op::Transpose { perm: vec![0, 0] }, &[f(x.clone(), &[2, 3])], &[2, 2], 1)));
    assert!(invalid(ours(&Op::Transpose { perm: vec![1, 0] }, &[f(x.clone(), &[2, 3])], &[2, 3], 1)));
    assert!(invalid(ours(&Op::Sum { axes: vec![2], keepdims: false }, &[f(x.clone(), &[2, 3])], &[2, 3], 1)));
    assert!(invalid(ours(&Op::Sum { axes: vec![1], keepdims: true }, &[f(x.clone(), &[2, 3])], &[2], 1)));
    assert!(invalid(ours(&Op::SumTo, &[f(x.clone(), &[2, 3])], &[2], 1)));
    assert!(invalid(ours(&Op::Softmax { axis: 2 }, &[f(x.clone(), &[2, 3])], &[2, 3], 1)));
    assert!(invalid(ours(&Op::LayerNorm { eps: 1e-5 }, &[f(x.clone(), &[2, 3]), f(vec![1.0; 2], &[2]), f(vec![0.0; 3], &[3])], &[2, 3], 1)));
    assert!(invalid(ours(&Op::CausalMask { fill: 0.0 }, &[f(x.clone(), &[6])], &[6], 1)));
    assert!(invalid(ours(&Op::Embedding, &[f(x.clone(), &[6]), i(vec![0], &[1])], &[1, 6], 1)));
    assert!(invalid(ours(&Op::CrossEntropy, &[f(x.clone(), &[2, 3]), i(vec![0; 3], &[3])], &[], 1)));
    assert!(invalid(ours(&Op::Mse, &[f(x.clone(), &[6]), f(vec![0.0; 5], &[5])], &[], 1)));
    // An output buffer of the wrong size.
    let mut out = vec![0.0; 5];
    assert!(matches!(run(&Op::Softmax { axis: 0 }, &operands(&[f(x, &[6])]), &mut out, &[6], 1), Err(EngineError::Bug(_))));
}

#[test]
fn exp_is_accurate_over_its_range() {
    let mut worst = 0.0f64;
    let mut x = -90.0f32;
    while x < 88.72 {
        let want = (x as f64).exp();
        let got = lanes::exp(x) as f64;
        if x >= -86.6 {
            worst = worst.max(((got - want) / want).abs());
        } else {
            assert!(got == 0.0, "exp({x}) = {got}, want a flush to 0");
        }
        x += 0.0137;
    }
    assert!(worst < 2.5e-7, "worst relative error {worst}");
    assert_eq!(lanes::exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(lanes::exp(-1000.0), 0.0);
    assert_eq!(lanes::exp(0.0), 1.0);
    assert!((lanes::exp(88.7) as f64 / (88.7f32 as f64).exp() - 1.0).abs() < 2.5e-7);
    assert_eq!(lanes::exp(f32::INFINITY), f32::INFINITY);
    assert_eq!(lanes::exp(89.0), f32::INFINITY);
    assert!(lanes::exp(f32::NAN).is_nan());
}

/// Products large enough to split over threads (by columns, or by rows when
/// taller than wide), with a count that does not divide evenly, against the
/// plain single-threaded one and the reference.
#[test]
fn large_products_split_over_threads_match() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(77));
    for (m, k, n) in [(64usize, 1024usize, 1030usize), (3 * 64, 512, 1024), (1030, 256, 64)] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.f32()).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.f32()).collect();
        let ins = [f(a, &[m, k]), f(b, &[k, n])];
        let split = ours(&Op::MatMul, &ins, &[m, n], 2).expect("split matmul");
        let plain = ours(&Op::MatMul, &ins, &[m, n], 1).expect("plain matmul");
        let want = reference(&Op::MatMul, &ins, &[m, n]).expect("reference");
        assert_close(&format!("matmul {m}×{k}×{n}"), &split, &want.data, 1e-5 * (k as f64).sqrt());
        assert_close(&format!("matmul {m}×{k}×{n} vs one thread"), &split, &plain.iter().map(|&v| v as f64).collect::<Vec<_>>(), 1e-5 * (k as f64).sqrt());
    }
}
