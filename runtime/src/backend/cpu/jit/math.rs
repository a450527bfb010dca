//! The element-wise ops of a fused body on groups of `f32x4` vectors.
//!
//! Semantics follow `Fused::reference` (computed in f64, rounded once), to
//! within a few f32 ulps: the transcendental functions are branch-free
//! approximations with the Cephes single-precision coefficients, accurate to
//! about 2 ulps over their whole range. NaN inputs give NaN, except where the
//! reference maps them elsewhere: `relu(NaN) = 0` and `relu_grad(NaN, dy) = 0`
//! (the reference's `f64::max` and `x > 0` test), `clip_scale(NaN) = 1`.

use super::codegen::{Emit, G};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::Value;
use shardplan_compiler::kernel::{Binary, Unary};

/// 1.5·2²³: adding it to a float of magnitude below 2²² rounds it to an
/// integer, which then sits in the low bits of the sum's mantissa.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// ln 2 = LN2_HI + LN2_LO, with LN2_HI short enough that `n · LN2_HI` is exact
/// for the |n| ≤ 150 that occur.
const LN2_HI: f32 = 355.0 / 512.0;
const LN2_LO: f32 = -2.1219444e-4;
/// e^r ≈ 1 + r + r²·P(r) on |r| ≤ ln2/2 (Cephes `expf`).
const EXP_P: [f32; 6] = [1.9875691e-4, 1.3981999e-3, 8.333452e-3, 4.1665796e-2, 1.6666666e-1, 0.5];
/// ln(1+f) ≈ f - f²/2 + f³·P(f) on √½-1 ≤ f ≤ √2-1 (Cephes `logf`).
const LOG_P: [f32; 9] = [7.0376836e-2, -1.151461e-1, 1.16769984e-1, -1.2420141e-1, 1.4249323e-1, -1.6668057e-1, 2.0000714e-1, -2.4999994e-1, 3.333333e-1];
/// tanh(x) ≈ x + x·z·P(z), z = x², on |x| < 0.625 (Cephes `tanhf`).
const TANH_P: [f32; 5] = [-5.7049887e-3, 2.0639088e-2, -5.3739715e-2, 1.3331442e-1, -3.333328e-1];
const TANH_SMALL: f32 = 0.625;
/// gelu(x) = x·σ(v(x)) with v(x) = x·(GELU_K1 + GELU_K2·x²), since
/// 0.5·(1 + tanh(u)) = σ(2u) for u = √(2/π)·(x + 0.044715·x³).
const GELU_K1: f32 = (2.0 * 0.797_884_560_802_865_4) as f32;
const GELU_K2: f32 = (2.0 * 0.797_884_560_802_865_4 * 0.044_715) as f32;
/// Beyond ±9, gelu'(x) rounds to 0 or 1 in f32; clamping keeps e^{-v} finite.
const GELU_GRAD_CLAMP: f32 = 9.0;

impl Emit<'_> {
    pub(super) fn unary(&mut self, u: Unary, x: &[Value]) -> G {
        match u {
            Unary::Neg => self.neg(x),
            Unary::Relu => {
                let zero = self.k(0.0);
                self.greater(x, &zero)
            }
            Unary::Gelu => self.gelu(x),
            Unary::Tanh => self.tanh(x),
            Unary::Sigmoid => self.sigmoid(x),
            Unary::Exp => self.exp(x),
            Unary::Log => self.log(x),
            Unary::Sqrt => self.sqrt(x),
            Unary::ClipScale(max_norm) => {
                let eps = self.k(1e-6);
                let d = self.add(x, &eps);
                let m = self.k(max_norm as f32);
                let q = self.div(&m, &d);
                let one = self.k(1.0);
                self.lesser(&q, &one)
            }
        }
    }

    pub(super) fn binary(&mut self, op: Binary, x: &[Value], y: &[Value]) -> G {
        match op {
            Binary::Add => self.add(x, y),
            Binary::Sub => self.sub(x, y),
            Binary::Mul => self.mul(x, y),
            Binary::Div => self.div(x, y),
            Binary::ReluGrad => {
                let zero = self.k(0.0);
                let positive = self.cmp(FloatCC::LessThan, &zero, x);
                self.and(y, &positive)
            }
            Binary::GeluGrad => self.gelu_grad(x, y),
        }
    }

    /// e^x. Exact limits: +inf above ln(f32::MAX), 0 below the smallest
    /// subnormal, +inf → inf, -inf → 0, NaN → NaN.
    pub(super) fn exp(&mut self, x: &[Value]) -> G {
        // Outside [-104, 88.8] the result is 0 or inf in f32 anyway; the
        // clamp keeps n in [-150, 128] so that 2^n splits into two normal
        // factors below. NaN passes both clamps.
        let lo = self.k(-104.0);
        let x = self.greater(&lo, x);
        let hi = self.k(88.8);
        let x = self.lesser(&hi, &x);

        // n = round(x / ln 2), r = x - n·ln 2 (Cody–Waite, exact steps).
        let log2e = self.k(std::f32::consts::LOG2_E);
        let magic = self.k(ROUND_MAGIC);
        let t = self.mul_add(&x, &log2e, &magic);
        let n = self.sub(&t, &magic);
        let c1 = self.k(-LN2_HI);
        let r = self.mul_add(&n, &c1, &x);
        let c2 = self.k(-LN2_LO);
        let r = self.mul_add(&n, &c2, &r);

        let p = self.poly(&r, &EXP_P);
        let r2 = self.mul(&r, &r);
        let y = self.mul_add(&p, &r2, &r);
        let one = self.k(1.0);
        let y = self.add(&y, &one);

        // 2^n = 2^n1 · 2^n2 with n1 = n >> 1, each factor built from its
        // exponent bits; the last multiply rounds into subnormals or
        // overflows to inf exactly where f32 does.
        let t_bits = self.bits(&t);
        let magic_bits = self.ki(ROUND_MAGIC.to_bits() as i32);
        let n = self.isub(&t_bits, &magic_bits);
        let n1 = self.sshr(&n, 1);
        let n2 = self.isub(&n, &n1);
        let s1 = self.pow2(&n1);
        let s2 = self.pow2(&n2);
        let y = self.mul(&y, &s1);
        self.mul(&y, &s2)
    }

    /// 2^n for integer lanes -126 ≤ n ≤ 127.
    fn pow2(&mut self, n: &[Value]) -> G {
        let bias = self.ki(127);
        let e = self.iadd(n, &bias);
        let e = self.shl(&e, 23);
        self.float_bits(&e)
    }

    /// ln x. Subnormals are handled; 0 → -inf, x < 0 → NaN, inf → inf, NaN → NaN.
    pub(super) fn log(&mut self, x: &[Value]) -> G {
        // Subnormals: scale by 2^23 into the normal range, take 23 off the exponent.
        let min = self.k(f32::MIN_POSITIVE);
        let tiny = self.cmp(FloatCC::LessThan, x, &min);
        let scale = self.k(8_388_608.0);
        let scaled = self.mul(x, &scale);
        let xs = self.select(&tiny, &scaled, x);
        let t23 = self.k(23.0);
        let adjust = self.and(&tiny, &t23);

        // x = m · 2^e with m in [0.5, 1).
        let bits = self.bits(&xs);
        let biased = self.ushr(&bits, 23);
        let b126 = self.ki(126);
        let e = self.isub(&biased, &b126);
        let e = self.int_to_float(&e);
        let e = self.sub(&e, &adjust);
        let mantissa = self.ki(0x007f_ffff);
        let m = self.and(&bits, &mantissa);
        let half = self.ki(0x3f00_0000);
        let m = self.or(&m, &half);
        let m = self.float_bits(&m);

        // For m < √½ take 2m and e - 1, so that f = m - 1 (exact) lies in
        // [√½ - 1, √2 - 1].
        let sqrt_half = self.k(std::f32::consts::FRAC_1_SQRT_2);
        let small = self.cmp(FloatCC::LessThan, &m, &sqrt_half);
        let one = self.k(1.0);
        let dec = self.and(&small, &one);
        let e = self.sub(&e, &dec);
        let extra = self.and(&small, &m);
        let m = self.add(&m, &extra);
        let f = self.sub(&m, &one);

        let z = self.mul(&f, &f);
        let p = self.poly(&f, &LOG_P);
        let y = self.mul(&p, &f);
        let y = self.mul(&y, &z);
        let lo = self.k(LN2_LO);
        let y = self.mul_add(&e, &lo, &y);
        let minus_half = self.k(-0.5);
        let y = self.mul_add(&z, &minus_half, &y);
        let y = self.add(&f, &y);
        let hi = self.k(LN2_HI);
        let y = self.mul_add(&e, &hi, &y);

        let inf = self.k(f32::INFINITY);
        let is_inf = self.cmp(FloatCC::Equal, x, &inf);
        let y = self.select(&is_inf, &inf, &y);
        let zero = self.k(0.0);
        let is_zero = self.cmp(FloatCC::Equal, x, &zero);
        let neg_inf = self.k(f32::NEG_INFINITY);
        let y = self.select(&is_zero, &neg_inf, &y);
        let invalid = self.cmp(FloatCC::UnorderedOrLessThan, x, &zero);
        let nan = self.k(f32::NAN);
        self.select(&invalid, &nan, &y)
    }

    /// tanh x: a polynomial below |x| = 0.625 (where 1 - 2/(e^{2x}+1) would
    /// cancel), the exp form above it with the sign copied from x.
    pub(super) fn tanh(&mut self, x: &[Value]) -> G {
        let ax = self.abs(x);
        let two = self.k(2.0);
        let a2 = self.mul(&ax, &two);
        let e = self.exp(&a2);
        let one = self.k(1.0);
        let d = self.add(&e, &one);
        let q = self.div(&two, &d);
        let large = self.sub(&one, &q);
        let sign_bit = self.k(-0.0);
        let sign = self.and(x, &sign_bit);
        let large = self.or(&large, &sign);

        let z = self.mul(x, x);
        let p = self.poly(&z, &TANH_P);
        let p = self.mul(&p, &z);
        let small = self.mul_add(&p, x, x);

        let limit = self.k(TANH_SMALL);
        let is_small = self.cmp(FloatCC::LessThan, &ax, &limit);
        self.select(&is_small, &small, &large)
    }

    /// 1 / (1 + e^{-x}); no cancellation on either side.
    pub(super) fn sigmoid(&mut self, x: &[Value]) -> G {
        let nx = self.neg(x);
        let e = self.exp(&nx);
        let one = self.k(1.0);
        let d = self.add(&e, &one);
        self.div(&one, &d)
    }

    /// -v(x) = -x·(K1 + K2·x²) (see `GELU_K1`).
    fn gelu_minus_v(&mut self, x: &[Value], x2: &[Value]) -> G {
        let k2 = self.k(-GELU_K2);
        let k1 = self.k(-GELU_K1);
        let a = self.mul_add(x2, &k2, &k1);
        self.mul(x, &a)
    }

    /// x / (1 + e^{-v(x)}): equal to 0.5·x·(1 + tanh(u)) but without its
    /// cancellation for x ≪ 0. There gelu is tiny and ill-conditioned (the
    /// rounding of v, about 2 ulps of |v|, scales the result by e^{±ε|v|}),
    /// so the absolute error stays below 1e-7 while the relative error grows
    /// with |v|; for x > -1 the relative error is a few ulps.
    pub(super) fn gelu(&mut self, x: &[Value]) -> G {
        let x2 = self.mul(x, x);
        let mv = self.gelu_minus_v(x, &x2);
        let e = self.exp(&mv);
        let one = self.k(1.0);
        let d = self.add(&e, &one);
        self.div(x, &d)
    }

    /// dy · gelu'(x). With s = σ(v) = 1/(1 + e^{-v}) and 1 - s = e^{-v}·s,
    /// gelu'(x) = 0.5(1+t) + 0.5·x·(1-t²)·u'(x) becomes s + x·s·(1-s)·v'(x),
    /// v'(x) = K1 + 3·K2·x², with no cancellation except near gelu's minimum.
    pub(super) fn gelu_grad(&mut self, x: &[Value], dy: &[Value]) -> G {
        let lo = self.k(-GELU_GRAD_CLAMP);
        let x = self.greater(&lo, x);
        let hi = self.k(GELU_GRAD_CLAMP);
        let x = self.lesser(&hi, &x);

        let x2 = self.mul(&x, &x);
        let mv = self.gelu_minus_v(&x, &x2);
        let e = self.exp(&mv);
        let one = self.k(1.0);
        let d = self.add(&e, &one);
        let s = self.div(&one, &d);
        let one_minus_s = self.mul(&e, &s);
        let k2 = self.k(3.0 * GELU_K2);
        let k1 = self.k(GELU_K1);
        let dv = self.mul_add(&x2, &k2, &k1);
        let t = self.mul(&x, &one_minus_s);
        let t = self.mul(&t, &dv);
        let g = self.mul_add(&t, &s, &s);
        self.mul(dy, &g)
    }
}
