//! Differential tests: every compiled kernel against `Fused::reference`
//! (f64, rounded once) on fresh random inputs, with and without `fma`.

use super::*;
use shardplan_compiler::kernel::{Binary as B, Inst as I, Unary as U};

/// |got - want| ≤ TOL · max(1, |want|): a few f32 ulps relative above 1,
/// absolute below (where the transcendental approximations are accurate to
/// an ulp of their inputs' scale, not of a result near 0).
const TOL: f64 = 4e-6;

/// Test data from the runtime's own seeded generator.
struct Rng(crate::data::rng::SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f32 {
        (lo + (hi - lo) * self.unit()) as f32
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A distribution of test inputs.
#[derive(Clone, Copy, Debug)]
enum Dist {
    Uniform(f64, f64),
    /// Half from the first range, half from the second (dense near 0, wide tails).
    Mixed(f64, f64, f64, f64),
    /// e^t for t uniform in the range: positive numbers over many decades.
    LogUniform(f64, f64),
    /// ± LogUniform.
    Signed(f64, f64),
}

impl Dist {
    fn sample(self, rng: &mut Rng) -> f32 {
        match self {
            Dist::Uniform(lo, hi) => rng.uniform(lo, hi),
            Dist::Mixed(a, b, c, d) => {
                if rng.next() & 1 == 0 {
                    rng.uniform(a, b)
                } else {
                    rng.uniform(c, d)
                }
            }
            Dist::LogUniform(lo, hi) => (rng.uniform(lo, hi) as f64).exp() as f32,
            Dist::Signed(lo, hi) => {
                let v = (rng.uniform(lo, hi) as f64).exp() as f32;
                if rng.next() & 1 == 0 {
                    v
                } else {
                    -v
                }
            }
        }
    }
}

fn jits() -> Vec<Jit> {
    // The host's own choice, and multiply-add forced off.
    vec![Jit::new().expect("native JIT"), Jit::with_fma(Some(false)).expect("JIT without fma")]
}

fn fused(rows: usize, cols: usize, strides: &[(usize, usize)], body: Vec<Inst>) -> Fused {
    Fused { rows, cols, row_strides: strides.iter().map(|s| s.0).collect(), col_strides: strides.iter().map(|s| s.1).collect(), body }
}

/// Random inputs of exactly the lengths `k` reads.
fn inputs(k: &Fused, dists: &[Dist], rng: &mut Rng) -> Vec<Vec<f32>> {
    let lens = required_lens(k).expect("well-formed kernel");
    lens.iter().zip(dists.iter().cycle()).map(|(&n, &d)| (0..n).map(|_| d.sample(rng)).collect()).collect()
}

fn close(got: f32, want: f32, tol: f64) -> bool {
    if want.is_nan() || got.is_nan() {
        return want.is_nan() && got.is_nan();
    }
    if want.is_infinite() && got.is_infinite() {
        return want == got;
    }
    // Near overflow the reference may round to inf where the kernel gives
    // f32::MAX (or the reverse); compare inf as 2^128, the next power of two.
    let widen = |v: f32| if v.is_infinite() { v.signum() as f64 * 2f64.powi(128) } else { v as f64 };
    let (g, w) = (widen(got), widen(want));
    (g - w).abs() <= tol * w.abs().max(1.0)
}

/// Runs `k` on `ins` with every JIT and compares with the reference.
fn check_with(jits: &mut [Jit], k: &Fused, ins: &[Vec<f32>], tol: f64) -> Result<(), String> {
    let refs: Vec<&[f32]> = ins.iter().map(Vec::as_slice).collect();
    let mut want = vec![0.0f32; k.rows * k.cols];
    k.reference(&refs, &mut want);
    for (which, jit) in jits.iter_mut().enumerate() {
        let kernel = jit.compile(k).map_err(|e| format!("compile: {e}"))?;
        let mut got = vec![f32::from_bits(0x7fa0_0001); k.rows * k.cols]; // a signalling NaN: unwritten shows
        kernel.run(&refs, &mut got).map_err(|e| format!("run: {e}"))?;
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if !close(g, w, tol) {
                let (r, c) = (i / k.cols.max(1), i % k.cols.max(1));
                let args: Vec<f32> = (0..ins.len()).map(|j| ins[j][r * k.row_strides[j] + c * k.col_strides[j]]).collect();
                return Err(format!(
                    "jit #{which} (fma {}), element [{r}, {c}] of {}×{}: got {g:e}, want {w:e}, inputs {args:?}\n{}",
                    jit.target.fma,
                    k.rows,
                    k.cols,
                    k.display()
                ));
            }
        }
    }
    Ok(())
}

fn check(k: &Fused, dists: &[Dist], seed: u64) {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(seed));
    let ins = inputs(k, dists, &mut rng);
    if let Err(e) = check_with(&mut jits(), k, &ins, TOL) {
        panic!("{e}");
    }
}

const SPECIALS: [f32; 16] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    0.0,
    -0.0,
    1e-45,
    -1e-45,
    1e-40,
    f32::MIN_POSITIVE,
    f32::MAX,
    -f32::MAX,
    88.722_83,
    88.72,
    -87.3,
    -103.9,
    -1.0,
];

fn unary_cases() -> Vec<(U, Dist)> {
    vec![
        (U::Neg, Dist::Uniform(-10.0, 10.0)),
        (U::Relu, Dist::Uniform(-10.0, 10.0)),
        (U::Exp, Dist::Uniform(-104.0, 89.0)),
        (U::Exp, Dist::Uniform(-1.0, 1.0)),
        (U::Log, Dist::LogUniform(-103.0, 88.0)),
        (U::Log, Dist::Uniform(0.5, 2.0)),
        (U::Sqrt, Dist::LogUniform(-103.0, 88.0)),
        (U::Tanh, Dist::Mixed(-1.0, 1.0, -30.0, 30.0)),
        (U::Sigmoid, Dist::Mixed(-4.0, 4.0, -100.0, 100.0)),
        (U::Gelu, Dist::Mixed(-4.0, 4.0, -30.0, 30.0)),
        (U::ClipScale(1.0), Dist::Uniform(0.0, 4.0)),
        (U::ClipScale(0.25), Dist::LogUniform(-20.0, 5.0)),
    ]
}

#[test]
fn every_unary_op_matches_the_reference() {
    let mut jits = jits();
    for (seed, (op, dist)) in unary_cases().into_iter().enumerate() {
        // 4103 = 256 × 16 + 4 + 3: the unrolled loop, one more vector and a 3-lane tail.
        let k = fused(4, 4103, &[(4103, 1)], vec![I::Load(0), I::Unary(op, 0)]);
        let mut rng = Rng(crate::data::rng::SplitMix64::new(seed as u64));
        let mut ins = inputs(&k, &[dist], &mut rng);
        // Special values at the start, in the middle of a vector and in the tail.
        for (i, &s) in SPECIALS.iter().enumerate() {
            for at in [i, 2000 + i, ins[0].len() - 1 - i] {
                ins[0][at] = s;
            }
        }
        if let Err(e) = check_with(&mut jits, &k, &ins, TOL) {
            panic!("{op:?} on {dist:?}: {e}");
        }
    }
}

fn binary_cases() -> Vec<(B, Dist, Dist)> {
    vec![
        (B::Add, Dist::Uniform(-100.0, 100.0), Dist::Uniform(-100.0, 100.0)),
        (B::Sub, Dist::Uniform(-100.0, 100.0), Dist::Uniform(-100.0, 100.0)),
        (B::Mul, Dist::Signed(-40.0, 40.0), Dist::Signed(-40.0, 40.0)),
        (B::Div, Dist::Signed(-40.0, 40.0), Dist::Signed(-40.0, 40.0)),
        (B::ReluGrad, Dist::Uniform(-1.0, 1.0), Dist::Uniform(-10.0, 10.0)),
        (B::GeluGrad, Dist::Mixed(-4.0, 4.0, -30.0, 30.0), Dist::Uniform(-10.0, 10.0)),
    ]
}

#[test]
fn every_binary_op_matches_the_reference() {
    let mut jits = jits();
    for (seed, (op, dx, dy)) in binary_cases().into_iter().enumerate() {
        let k = fused(3, 1001, &[(1001, 1), (1001, 1)], vec![I::Load(0), I::Load(1), I::Binary(op, 0, 1)]);
        let mut rng = Rng(crate::data::rng::SplitMix64::new(100 + seed as u64));
        let mut ins = inputs(&k, &[dx, dy], &mut rng);
        // Infinities give NaN in the reference's gelu'(x) formula (∞·0) but
        // the limits 0 and 1 here; leave them out for that op.
        let specials: Vec<f32> = SPECIALS.iter().copied().filter(|s| op != B::GeluGrad || s.is_finite() || s.is_nan()).collect();
        for (i, &s) in specials.iter().enumerate() {
            ins[0][10 + i] = s;
            ins[1][40 + i] = s;
            ins[0][3000 - i] = s;
        }
        if let Err(e) = check_with(&mut jits, &k, &ins, TOL) {
            panic!("{op:?}: {e}");
        }
    }
}

/// The largest relative error of each transcendental op over |x| ≤ 30 (and
/// exp up to overflow, log over all positive floats), against f64.
#[test]
fn transcendental_accuracy_is_a_few_ulps() {
    let mut jits = jits();
    let cases = [
        (U::Exp, -30.0f64, 30.0f64, 2e-6),
        (U::Exp, -87.0, 88.7, 2e-6),
        (U::Log, 1e-30, 30.0, 2e-6),
        (U::Tanh, -30.0, 30.0, 2e-6),
        (U::Sigmoid, -30.0, 30.0, 2e-6),
        // gelu is ill-conditioned for x ≪ 0 (see `math::gelu`): the relative
        // error grows like |x|³·ulp, the absolute error stays below 1e-12.
        (U::Gelu, -4.0, 30.0, 2e-6),
    ];
    for (op, lo, hi, bound) in cases {
        let n = 20_000;
        let xs: Vec<f32> = (0..n)
            .map(|i| {
                let t = i as f64 / (n - 1) as f64;
                if op == U::Log {
                    (lo.ln() + (hi.ln() - lo.ln()) * t).exp() as f32
                } else {
                    (lo + (hi - lo) * t) as f32
                }
            })
            .collect();
        let k = fused(1, n, &[(0, 1)], vec![I::Load(0), I::Unary(op, 0)]);
        for jit in &mut jits {
            let kernel = jit.compile(&k).expect("compile");
            let mut got = vec![0.0; n];
            kernel.run(&[&xs], &mut got).expect("run");
            let (mut worst, mut at) = (0.0f64, 0.0f32);
            for (&x, &g) in xs.iter().zip(&got) {
                let w = match op {
                    // 0.5·x·(1 + tanh u) cancels in f64 too for x < -5
                    // (1 + tanh u < 1e-6); x·σ(2u) does not.
                    U::Gelu => {
                        let x = x as f64;
                        x / (1.0 + (-1.595_769_121_605_730_8 * (x + 0.044_715 * x * x * x)).exp())
                    }
                    _ => shardplan_compiler::kernel::unary(op, x as f64),
                };
                let rel = if w == 0.0 { (g as f64).abs() } else { ((g as f64 - w) / w).abs() };
                if rel > worst {
                    (worst, at) = (rel, x);
                }
            }
            println!("{op:?} on [{lo:e}, {hi:e}] (fma {}): worst relative error {worst:.2e} at x = {at:e}", jit.target.fma);
            assert!(worst <= bound, "{op:?} (fma {}): relative error {worst:e} at x = {at:e}", jit.target.fma);
        }
    }
}

#[test]
fn gelu_grad_accuracy() {
    // gelu'(x) lies in [0.5, 1.13] for x > 0: a few ulps relative. For x ≤ 0
    // it is below 0.13 in magnitude and crosses 0 near x = -0.75, so the
    // bound is absolute there (as `TOL` is below 1).
    let n = 20_000;
    let xs: Vec<f32> = (0..n).map(|i| (-30.0 + 60.0 * i as f64 / (n - 1) as f64) as f32).collect();
    let ones = vec![1.0f32; n];
    let k = fused(1, n, &[(0, 1), (0, 1)], vec![I::Load(0), I::Load(1), I::Binary(B::GeluGrad, 0, 1)]);
    for mut jit in jits() {
        let kernel = jit.compile(&k).expect("compile");
        let mut got = vec![0.0; n];
        kernel.run(&[&xs, &ones], &mut got).expect("run");
        for (&x, &g) in xs.iter().zip(&got) {
            let w = shardplan_compiler::interp::gelu_grad(x as f64);
            let err = (g as f64 - w).abs();
            let ok = if x > 0.0 { err <= 2e-6 * w.abs() } else { err <= 1e-6 };
            assert!(ok, "gelu'({x:e}) (fma {}) = {g:e}, want {w:e}", jit.target.fma);
        }
    }
}

/// A few chains as the compiler emits them: an Adam update, a bias + gelu
/// + residual, softplus and a layer of squashing functions.
#[test]
fn hand_written_chains_match_the_reference() {
    let adam = vec![
        I::Load(0),                // v0 p
        I::Load(1),                // v1 g
        I::Load(2),                // v2 m
        I::Load(3),                // v3 v
        I::Load(4),                // v4 lr (scalar)
        I::Const(0.9),             // v5
        I::Const(0.1),             // v6
        I::Binary(B::Mul, 5, 2),   // v7
        I::Binary(B::Mul, 6, 1),   // v8
        I::Binary(B::Add, 7, 8),   // v9 m'
        I::Const(0.999),           // v10
        I::Const(0.001),           // v11
        I::Binary(B::Mul, 10, 3),  // v12
        I::Binary(B::Mul, 1, 1),   // v13
        I::Binary(B::Mul, 11, 13), // v14
        I::Binary(B::Add, 12, 14), // v15 v'
        I::Unary(U::Sqrt, 15),     // v16
        I::Const(1e-8),            // v17
        I::Binary(B::Add, 16, 17), // v18
        I::Binary(B::Div, 9, 18),  // v19
        I::Binary(B::Mul, 4, 19),  // v20
        I::Binary(B::Sub, 0, 20),  // v21 p'
    ];
    let k = fused(5, 67, &[(67, 1), (67, 1), (67, 1), (67, 1), (0, 0)], adam);
    let pos = Dist::LogUniform(-10.0, 0.0);
    check(&k, &[Dist::Uniform(-1.0, 1.0), Dist::Uniform(-1.0, 1.0), Dist::Uniform(-0.1, 0.1), pos, Dist::Uniform(1e-3, 1e-2)], 1);

    let mlp = vec![
        I::Load(0),              // x
        I::Load(1),              // bias (row broadcast)
        I::Binary(B::Add, 0, 1), // v2
        I::Unary(U::Gelu, 2),    // v3
        I::Load(2),              // residual
        I::Binary(B::Add, 3, 4), // v5
        I::Unary(U::Tanh, 5),    // v6
        I::Unary(U::Sigmoid, 6), // v7
        I::Unary(U::Exp, 7),     // v8
        I::Unary(U::Log, 8),     // v9 = v7
        I::Binary(B::Mul, 9, 6), // v10
        I::Unary(U::Relu, 10),   // v11
        I::Unary(U::Neg, 11),    // v12
        I::Binary(B::GeluGrad, 2, 12),
    ];
    check(&fused(7, 130, &[(130, 1), (0, 1), (130, 1)], mlp), &[Dist::Uniform(-3.0, 3.0)], 2);

    // log(1 + e^x), clipped by a norm held in a kept-dim column.
    let softplus = vec![
        I::Load(0),
        I::Unary(U::Exp, 0),
        I::Const(1.0),
        I::Binary(B::Add, 1, 2),
        I::Unary(U::Log, 3),
        I::Load(1),
        I::Unary(U::ClipScale(1.0), 5),
        I::Binary(B::Mul, 4, 6),
        I::Load(0),
        I::Binary(B::ReluGrad, 8, 7),
    ];
    check(&fused(2, 1000, &[(1000, 1), (1, 0)], softplus), &[Dist::Uniform(-20.0, 20.0), Dist::Uniform(0.0, 3.0)], 3);
}

/// A random chain over `n_in` inputs, built from steps that keep every
/// step's result within about [-4, 4] so that f32 rounding (and range) do
/// not grow along the chain. Steps read only earlier steps' results, never
/// their intermediates (an `exp` of `e^x + 1` would overflow f32 but not f64).
fn random_chain(rng: &mut Rng, n_in: usize, len: usize) -> Vec<Inst> {
    let mut body: Vec<Inst> = (0..n_in).map(I::Load).collect();
    let mut results: Vec<usize> = (0..n_in).collect();
    let push = |body: &mut Vec<Inst>, inst: Inst| {
        body.push(inst);
        body.len() - 1
    };
    while body.len() < n_in + len {
        // Prefer recent results so the chain is deep, not wide.
        let pick = |rng: &mut Rng| results[results.len() - 1 - rng.below(results.len().min(4))];
        let a = pick(rng);
        let b = pick(rng);
        let r = match rng.below(14) {
            0 => push(&mut body, I::Unary(U::Neg, a)),
            1 => push(&mut body, I::Unary(U::Relu, a)),
            2 => push(&mut body, I::Unary(U::Tanh, a)),
            3 => push(&mut body, I::Unary(U::Sigmoid, a)),
            4 => push(&mut body, I::Unary(U::Gelu, a)),
            5 => {
                let m = push(&mut body, I::Binary(B::Mul, a, b));
                push(&mut body, I::Unary(U::Tanh, m))
            }
            6 | 7 => {
                let op = if rng.next() & 1 == 0 { B::Add } else { B::Sub };
                let s = push(&mut body, I::Binary(op, a, b));
                let h = push(&mut body, I::Const(0.5));
                push(&mut body, I::Binary(B::Mul, s, h))
            }
            8 => {
                // softplus
                let e = push(&mut body, I::Unary(U::Exp, a));
                let one = push(&mut body, I::Const(1.0));
                let s = push(&mut body, I::Binary(B::Add, e, one));
                push(&mut body, I::Unary(U::Log, s))
            }
            9 => {
                let s = push(&mut body, I::Unary(U::Sigmoid, b));
                let one = push(&mut body, I::Const(1.0));
                let d = push(&mut body, I::Binary(B::Add, s, one));
                push(&mut body, I::Binary(B::Div, a, d))
            }
            10 => {
                let s = push(&mut body, I::Unary(U::Sigmoid, a));
                push(&mut body, I::Unary(U::Sqrt, s))
            }
            11 => push(&mut body, I::Binary(B::ReluGrad, a, b)),
            12 => {
                let g = push(&mut body, I::Binary(B::GeluGrad, a, b));
                push(&mut body, I::Unary(U::Tanh, g))
            }
            _ => {
                let s = push(&mut body, I::Unary(U::Sigmoid, a));
                let t = push(&mut body, I::Const(0.1));
                let d = push(&mut body, I::Binary(B::Add, s, t));
                push(&mut body, I::Unary(U::ClipScale(0.5), d))
            }
        };
        results.push(r);
    }
    body
}

#[test]
fn random_long_chains_match_the_reference() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(7));
    let mut jits = jits();
    for case in 0..24 {
        let n_in = 1 + rng.below(4);
        let len = 20 + rng.below(40);
        let body = random_chain(&mut rng, n_in, len);
        let (rows, cols) = [(1, 1000), (2, 65), (7, 17), (3, 5)][case % 4];
        // Mix broadcast patterns among the inputs.
        let strides: Vec<(usize, usize)> = (0..n_in).map(|j| [(cols, 1), (0, 1), (1, 0), (0, 0), (cols + 3, 1)][(j + case) % 5]).collect();
        let k = fused(rows, cols, &strides, body);
        let ins = inputs(&k, &[Dist::Uniform(-3.0, 3.0)], &mut rng);
        if let Err(e) = check_with(&mut jits, &k, &ins, TOL) {
            panic!("chain {case}: {e}");
        }
    }
}

const COLS: [usize; 11] = [1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 1000];
const ROWS: [usize; 3] = [1, 2, 7];

#[test]
fn every_broadcast_pattern_and_shape() {
    let mut jits = jits();
    let mut rng = Rng(crate::data::rng::SplitMix64::new(11));
    for rows in ROWS {
        for cols in COLS {
            // full, bias (row stride 0), kept-dim column (col stride 0),
            // scalar, and a full input whose rows are padded.
            let strides = [(cols, 1), (0, 1), (1, 0), (0, 0), (cols + 5, 1)];
            let all = vec![
                I::Load(0),
                I::Load(1),
                I::Binary(B::Mul, 0, 1),
                I::Load(2),
                I::Binary(B::Add, 2, 3),
                I::Load(3),
                I::Binary(B::Sub, 4, 5),
                I::Load(4),
                I::Binary(B::Div, 6, 7),
                I::Unary(U::Tanh, 8),
            ];
            let k = fused(rows, cols, &strides, all);
            let ins = inputs(
                &k,
                &[Dist::Uniform(-2.0, 2.0), Dist::Uniform(-2.0, 2.0), Dist::Uniform(-2.0, 2.0), Dist::Uniform(-2.0, 2.0), Dist::Uniform(1.0, 2.0)],
                &mut rng,
            );
            if let Err(e) = check_with(&mut jits, &k, &ins, TOL) {
                panic!("all patterns: {e}");
            }
            // Each pattern alone (the kernels with no strided input at all
            // write one value per row, or one per call).
            for s in strides {
                let k = fused(rows, cols, &[s], vec![I::Load(0), I::Unary(U::Sigmoid, 0), I::Const(3.0), I::Binary(B::Mul, 1, 2)]);
                let ins = inputs(&k, &[Dist::Uniform(-5.0, 5.0)], &mut rng);
                if let Err(e) = check_with(&mut jits[..1], &k, &ins, TOL) {
                    panic!("pattern {s:?}: {e}");
                }
            }
        }
    }
}

#[test]
fn odd_bodies() {
    let mut rng = Rng(crate::data::rng::SplitMix64::new(5));
    // Only a constant; an unused input; one input read twice; dead code.
    let bodies = [
        (vec![I::Const(2.5)], 1),
        (vec![I::Load(1), I::Unary(U::Exp, 0)], 2),
        (vec![I::Load(0), I::Load(0), I::Binary(B::Mul, 0, 1)], 1),
        (vec![I::Load(0), I::Unary(U::Log, 0), I::Unary(U::Neg, 0)], 1),
    ];
    for (body, n_in) in bodies {
        let strides = vec![(17, 1); n_in];
        let k = fused(3, 17, &strides, body);
        let ins = inputs(&k, &[Dist::Uniform(-2.0, 2.0)], &mut rng);
        if let Err(e) = check_with(&mut jits(), &k, &ins, TOL) {
            panic!("{e}");
        }
    }
    // Empty kernels run and write nothing.
    let mut jit = Jit::new().expect("jit");
    for (rows, cols) in [(0, 5), (5, 0), (0, 0)] {
        let k = fused(rows, cols, &[(cols, 1)], vec![I::Load(0), I::Unary(U::Exp, 0)]);
        let kernel = jit.compile(&k).expect("compile");
        kernel.run(&[&[]], &mut []).expect("run");
    }
}

fn sample_kernel(rows: usize, cols: usize) -> Fused {
    fused(rows, cols, &[(cols, 1), (0, 1)], vec![I::Load(0), I::Load(1), I::Binary(B::Add, 0, 1), I::Unary(U::Gelu, 2)])
}

#[test]
fn run_rows_writes_only_its_rows() {
    let mut jit = Jit::new().expect("jit");
    let mut rng = Rng(crate::data::rng::SplitMix64::new(3));
    for cols in [1, 5, 33] {
        let k = sample_kernel(7, cols);
        let kernel = jit.compile(&k).expect("compile");
        let ins = inputs(&k, &[Dist::Uniform(-3.0, 3.0)], &mut rng);
        let refs: Vec<&[f32]> = ins.iter().map(Vec::as_slice).collect();
        let mut want = vec![0.0; 7 * cols];
        k.reference(&refs, &mut want);
        for (b, e) in [(0, 7), (2, 5), (6, 7), (3, 3), (0, 1)] {
            let sentinel = -12345.0;
            let mut out = vec![sentinel; 7 * cols];
            kernel.run_rows(&refs, &mut out, b, e).expect("run_rows");
            for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                let r = i / cols;
                if (b..e).contains(&r) {
                    assert!(close(g, w, TOL), "rows {b}..{e}, [{r}, {}]: {g} vs {w}", i % cols);
                } else {
                    assert_eq!(g, sentinel, "rows {b}..{e} wrote row {r}");
                }
            }
            // The same rows into a buffer holding only them.
            let mut part = vec![sentinel; (e - b) * cols];
            kernel.run_block(&refs, &mut part, b, e).expect("run_block");
            assert_eq!(part, out[b * cols..e * cols]);
        }
    }
}

#[test]
fn threads_share_a_kernel_over_disjoint_rows() {
    let (rows, cols) = (64, 257);
    let k = sample_kernel(rows, cols);
    let kernel = Jit::new().expect("jit").compile(&k).expect("compile");
    let ins = inputs(&k, &[Dist::Uniform(-3.0, 3.0)], &mut Rng(crate::data::rng::SplitMix64::new(9)));
    let refs: Vec<&[f32]> = ins.iter().map(Vec::as_slice).collect();
    let mut want = vec![0.0; rows * cols];
    kernel.run(&refs, &mut want).expect("run");
    let mut got = vec![0.0; rows * cols];
    let per = 9; // rows per chunk; the last chunk is shorter
    std::thread::scope(|s| {
        for (i, chunk) in got.chunks_mut(per * cols).enumerate() {
            let refs = &refs;
            s.spawn(move || {
                let b = i * per;
                kernel.run_block(refs, chunk, b, b + chunk.len() / cols).expect("run_block");
            });
        }
    });
    assert_eq!(got, want);
}

#[test]
fn bad_calls_are_errors() {
    let mut jit = Jit::new().expect("jit");
    let k = sample_kernel(4, 10);
    let kernel = jit.compile(&k).expect("compile");
    let x = vec![1.0f32; 40];
    let bias = vec![1.0f32; 10];
    let mut out = vec![0.0f32; 40];
    let invalid = |r: Result<(), EngineError>| matches!(r, Err(EngineError::Bug(_)));
    assert!(invalid(kernel.run(&[&x[..39], &bias], &mut out)), "input too short");
    assert!(invalid(kernel.run(&[&x, &bias[..9]], &mut out)), "bias too short");
    assert!(invalid(kernel.run(&[&x], &mut out)), "too few inputs");
    assert!(invalid(kernel.run(&[&x, &bias, &bias], &mut out)), "too many inputs");
    assert!(invalid(kernel.run(&[&x, &bias], &mut out[..39])), "output too short");
    assert!(invalid(kernel.run_rows(&[&x, &bias], &mut out, 3, 2)), "reversed range");
    assert!(invalid(kernel.run_rows(&[&x, &bias], &mut out, 0, 5)), "past the last row");
    assert!(invalid(kernel.run_block(&[&x, &bias], &mut out[..19], 0, 2)), "part of the wrong length");
    assert!(kernel.run(&[&x, &bias], &mut out).is_ok());
    // Longer inputs are fine: the kernel reads a prefix.
    let long = vec![1.0f32; 50];
    assert!(kernel.run(&[&long, &long], &mut out).is_ok());

    let bad_kernels = [
        fused(2, 2, &[(2, 2)], vec![I::Load(0)]),                          // col stride 2
        fused(2, 2, &[(2, 1)], vec![I::Load(1)]),                          // missing input
        fused(2, 2, &[(2, 1)], vec![I::Unary(U::Exp, 0)]),                 // reads itself
        fused(2, 2, &[(2, 1)], vec![I::Load(0), I::Binary(B::Add, 0, 2)]), // reads a later value
        fused(2, 2, &[(2, 1)], vec![]),                                    // empty body
        fused(usize::MAX / 2, 4, &[(4, 1)], vec![I::Load(0)]),             // too large
        fused(3, 4, &[(usize::MAX / 2, 1)], vec![I::Load(0)]),             // stride overflows
    ];
    for k in bad_kernels {
        assert!(matches!(jit.compile(&k), Err(EngineError::Bug(_))), "{}", k.display());
        assert!(matches!(clif(&k), Err(EngineError::Bug(_))));
    }
    let mut k = sample_kernel(2, 2);
    k.col_strides.pop();
    assert!(matches!(jit.compile(&k), Err(EngineError::Bug(_))), "stride lists of different lengths");
}

#[test]
fn identical_kernels_compile_once() {
    let mut jit = Jit::new().expect("jit");
    let a = jit.compile(&sample_kernel(3, 20)).expect("compile");
    let b = jit.compile(&sample_kernel(3, 20)).expect("compile");
    assert_eq!(a.entry as usize, b.entry as usize);
    assert_eq!(jit.cache.len(), 1);
    let c = jit.compile(&sample_kernel(3, 21)).expect("compile");
    assert_ne!(a.entry as usize, c.entry as usize);
    let mut k = sample_kernel(3, 20);
    k.body.push(I::Unary(U::ClipScale(2.0), 3));
    let d = jit.compile(&k).expect("compile");
    k.body[4] = I::Unary(U::ClipScale(3.0), 3);
    let e = jit.compile(&k).expect("compile");
    assert_ne!(d.entry as usize, e.entry as usize);
    assert_eq!(jit.cache.len(), 4);
}

#[test]
fn kernels_outlive_their_jit_and_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<CompiledKernel>();
    send::<Jit>();

    let k = sample_kernel(2, 9);
    let kernel = {
        let mut jit = Jit::new().expect("jit");
        jit.compile(&k).expect("compile")
    };
    let ins = inputs(&k, &[Dist::Uniform(-1.0, 1.0)], &mut Rng(crate::data::rng::SplitMix64::new(1)));
    let refs: Vec<&[f32]> = ins.iter().map(Vec::as_slice).collect();
    let mut got = vec![0.0; 18];
    std::thread::scope(|s| {
        s.spawn(|| kernel.run(&refs, &mut got).expect("run"));
    });
    let mut want = vec![0.0; 18];
    k.reference(&refs, &mut want);
    assert!(got.iter().zip(&want).all(|(&g, &w)| close(g, w, TOL)));
}

/// The CLIF of a small kernel: 2 rows of 21 floats (one unrolled iteration,
/// one more vector, a one-lane tail). Bless with
/// `INSTA_UPDATE=always cargo test -p shardplan-runtime jit` and review the diff.
#[test]
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn clif_golden() {
    let k = fused(
        2,
        21,
        &[(21, 1), (0, 1), (0, 0)],
        vec![I::Load(0), I::Load(1), I::Binary(B::Add, 0, 1), I::Load(2), I::Binary(B::Mul, 2, 3), I::Unary(U::Relu, 4)],
    );
    let got = clif(&k).expect("clif");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/backend/cpu/jit/golden/add_mul_relu.clif");
    if std::env::var("INSTA_UPDATE").is_ok_and(|v| v == "always") {
        std::fs::write(path, &got).expect("write golden file");
        return;
    }
    let want = include_str!("golden/add_mul_relu.clif");
    assert_eq!(got, want, "CLIF changed; bless with INSTA_UPDATE=always and review the diff");
}

#[test]
fn clif_shows_the_loop_structure() {
    let k = fused(2, 39, &[(39, 1), (1, 0)], vec![I::Load(0), I::Load(1), I::Binary(B::Sub, 0, 1), I::Unary(U::Exp, 2)]);
    let text = clif(&k).expect("clif");
    for needle in ["load.f32x4", "store", "splat.f32x4", "insertlane", "extractlane", "brif", "fsub", "ishl", "bitselect"] {
        assert!(text.contains(needle), "no `{needle}` in\n{text}");
    }
}

/// Not a test: a timing check, run by hand with
/// `cargo test --release -p shardplan-runtime jit::tests::bandwidth -- --ignored --nocapture`.
/// Times relu((a + b) · c) over n floats (three streams in, one out) against a
/// plain Rust loop and a copy.
#[test]
#[ignore]
fn bandwidth() {
    use std::time::Instant;
    let mut jit = Jit::new().expect("jit");
    for (rows, cols) in [(1, 1 << 20), (1024, 1024), (1, 1 << 24)] {
        let n = rows * cols;
        let body = vec![I::Load(0), I::Load(1), I::Binary(B::Add, 0, 1), I::Load(2), I::Binary(B::Mul, 2, 3), I::Unary(U::Relu, 4)];
        let k = fused(rows, cols, &[(cols, 1), (cols, 1), (cols, 1)], body);
        let t0 = Instant::now();
        let kernel = jit.compile(&k).expect("compile");
        let compile = t0.elapsed();
        let mut rng = Rng(crate::data::rng::SplitMix64::new(1));
        let ins = inputs(&k, &[Dist::Uniform(-1.0, 1.0)], &mut rng);
        let refs: Vec<&[f32]> = ins.iter().map(Vec::as_slice).collect();
        let mut out = vec![0.0f32; n];
        let reps = (1 << 28) / n;
        let time = |f: &mut dyn FnMut()| {
            f();
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    f();
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            best
        };
        let jit_s = time(&mut || kernel.run(&refs, &mut out).expect("run"));
        let rust_s = time(&mut || {
            for (((o, a), b), c) in out.iter_mut().zip(&ins[0]).zip(&ins[1]).zip(&ins[2]) {
                *o = ((a + b) * c).max(0.0);
            }
            std::hint::black_box(&mut out);
        });
        let copy_s = time(&mut || {
            out.copy_from_slice(&ins[0]);
            std::hint::black_box(&mut out);
        });
        let gb = |bytes: usize, s: f64| bytes as f64 / s / 1e9;
        println!(
            "{rows}×{cols}: compile {:.2} ms; jit {:.1} GB/s ({:.0} µs), rust loop {:.1} GB/s, copy {:.1} GB/s",
            compile.as_secs_f64() * 1e3,
            gb(16 * n, jit_s),
            jit_s * 1e6,
            gb(16 * n, rust_s),
            gb(8 * n, copy_s)
        );
    }
    // A transcendental body is compute bound: elements per second instead.
    let n = 1 << 20;
    for (name, op) in [("exp", U::Exp), ("gelu", U::Gelu), ("tanh", U::Tanh)] {
        let k = fused(1, n, &[(n, 1)], vec![I::Load(0), I::Unary(op, 0)]);
        let kernel = jit.compile(&k).expect("compile");
        let xs = inputs(&k, &[Dist::Uniform(-5.0, 5.0)], &mut Rng(crate::data::rng::SplitMix64::new(2))).remove(0);
        let mut out = vec![0.0f32; n];
        let t = Instant::now();
        for _ in 0..20 {
            kernel.run(&[&xs], &mut out).expect("run");
        }
        let jit_s = t.elapsed().as_secs_f64() / 20.0;
        let t = Instant::now();
        for _ in 0..20 {
            for (o, &x) in out.iter_mut().zip(&xs) {
                *o = match op {
                    U::Exp => x.exp(),
                    U::Tanh => x.tanh(),
                    _ => 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh()),
                };
            }
            std::hint::black_box(&mut out);
        }
        let std_s = t.elapsed().as_secs_f64() / 20.0;
        println!("{name}: jit {:.2} ns/element, std (libm, scalar) {:.2} ns/element", jit_s * 1e9 / n as f64, std_s * 1e9 / n as f64);
    }
}

/// An epilogue run in place over its input 0 gives what it gives out of
/// place; a kernel whose input 0 is not read at the output's index is refused.
#[test]
fn in_place_epilogue_matches_out_of_place() {
    let mut jit = Jit::new().expect("jit");
    let mut rng = Rng(crate::data::rng::SplitMix64::new(21));
    for (rows, cols) in [(1, 1), (1, 17), (3, 5), (7, 64), (2, 1001)] {
        // y = sqrt(x0 · c + x1) with x1 a per-column vector.
        let body = vec![I::Load(0), I::Const(0.5), I::Binary(B::Mul, 0, 1), I::Load(1), I::Binary(B::Add, 2, 3), I::Unary(U::Sqrt, 4)];
        let k = fused(rows, cols, &[(cols, 1), (0, 1)], body);
        let x0: Vec<f32> = (0..rows * cols).map(|_| rng.uniform(0.0, 2.0)).collect();
        let x1: Vec<f32> = (0..cols).map(|_| rng.uniform(0.0, 2.0)).collect();
        let c = jit.compile(&k).expect("compiles");
        let mut want = vec![0.0; rows * cols];
        c.run(&[&x0, &x1], &mut want).expect("runs");
        let mut io = x0.clone();
        c.run_in_place(&[&x1], &mut io).expect("runs in place");
        assert_eq!(io.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{rows} × {cols}");
        // Row by row, in blocks (as several threads run it): the same.
        let mut io = x0.clone();
        let mut first = 0;
        for block in io.chunks_mut(2 * cols) {
            let n = block.len() / cols;
            c.run_in_place_block(&[&x1], block, first, first + n).expect("runs a block in place");
            first += n;
        }
        assert_eq!(io.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{rows} × {cols} in blocks");
    }
    // Input 0 broadcast along columns is not the output's layout.
    let k = fused(3, 4, &[(1, 0)], vec![I::Load(0), I::Unary(U::Neg, 0)]);
    let c = jit.compile(&k).expect("compiles");
    let mut io = vec![1.0; 12];
    assert!(matches!(c.run_in_place(&[], &mut io), Err(EngineError::Bug(_))));
}
