//! Runs kernel bodies compiled for the best vector instructions the CPU has.
//!
//! The crate is built for baseline x86-64 (SSE2), so LLVM vectorises plain
//! loops 4 lanes wide. [`call`] instead runs a closure inside a function
//! compiled with AVX-512 or AVX2 enabled, chosen once at run time. For that
//! to reach the loops, the closure and every helper it calls must be
//! `#[inline(always)]`: they are then compiled as part of the wrapper.
//!
//! Results do not depend on the level: Rust neither reassociates nor fuses
//! float operations, and the kernels fix their lane structure in source.
//!
//! Input: a closure. Output: its result, computed with the widest vector
//! instructions available. Invariant: the level is chosen once per process.

/// Calls `f(arg)`, compiled for the best instruction set available.
#[inline(always)]
pub(super) fn call<A, R>(f: &impl Fn(A) -> R, arg: A) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: `level` checked at run time that the CPU has every
            // feature these wrappers are compiled with.
            Level::V4 => return unsafe { v4(f, arg) },
            // SAFETY: as above.
            Level::V3 => return unsafe { v3(f, arg) },
            Level::Base => {}
        }
    }
    f(arg)
}

/// Whether the CPU has AVX (for kernels written with its intrinsics).
pub(super) fn has_avx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level() != Level::Base
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    /// x86-64-v4: AVX-512 F/VL/BW/DQ.
    V4,
    /// x86-64-v3: AVX2 and FMA.
    V3,
    Base,
}

#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("bmi2");
        let v4 = v3
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq");
        if v4 {
            Level::V4
        } else if v3 {
            Level::V3
        } else {
            Level::Base
        }
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2")]
fn v4<A, R>(f: &impl Fn(A) -> R, arg: A) -> R {
    f(arg)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi2")]
fn v3<A, R>(f: &impl Fn(A) -> R, arg: A) -> R {
    f(arg)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::lanes;
    use super::{level, v3, v4, Level};

    /// Lane primitives on a row, as bits.
    #[inline(always)]
    fn probe(x: &[f32]) -> Vec<u32> {
        let m = lanes::max(x);
        let mut out = vec![0.0f32; x.len()];
        let s = lanes::exp_shifted(x, m, &mut out);
        out.extend([s, lanes::sum_f64(x) as f32, lanes::sq_dev_f64(x, 0.25) as f32, lanes::dot(x, &x[1..]), lanes::sum_exp_shifted(x, m)]);
        out.iter().map(|v| v.to_bits()).collect()
    }

    /// Every instruction-set level computes the same bits.
    #[test]
    fn levels_agree() {
        let x: Vec<f32> = (0..1013).map(|i| ((i * 7919) % 1000) as f32 / 97.0 - 5.0).collect();
        let base = probe(&x);
        let level = level();
        if level != Level::Base {
            // SAFETY: `level` detected every feature v3 is compiled for.
            assert_eq!(unsafe { v3(&probe, &x[..]) }, base);
        }
        if level == Level::V4 {
            // SAFETY: `level` detected every feature v4 is compiled for.
            assert_eq!(unsafe { v4(&probe, &x[..]) }, base);
        }
    }
}
