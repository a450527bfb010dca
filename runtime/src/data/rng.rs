//! The seeded pseudo-random generators behind data order and synthetic data.
//!
//! Input: a 64-bit seed, plus a domain and an index that name one stream.
//! Output: `u64` words, unbiased integers below a bound, uniform and
//! approximately normal `f64`s.
//! Invariants: a generator's output depends only on how it was seeded, never
//! on the platform, the process or the other streams; the arithmetic is
//! integer or exact IEEE addition, so a run is bit-identical everywhere.
//!
//! The generators are SplitMix64 (Steele, Lea and Flood, 2014), used to turn
//! seeds into states, and xoshiro256** (Blackman and Vigna, 2018), used for
//! the draws. They are small enough to keep here rather than pull in a crate
//! whose output might change between versions.

/// SplitMix64: a 64-bit counter passed through a bijective finalizer.
///
/// Good enough on its own for a few draws, and the recommended way to fill
/// the state of xoshiro from a single word.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

/// The SplitMix64 increment: the odd integer nearest 2^64 / golden ratio.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix64(self.state)
    }
}

/// The SplitMix64 finalizer: a bijection on `u64` whose output bits each
/// depend on every input bit, so nearby inputs give unrelated outputs.
pub fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256**: 256 bits of state, period 2^256 - 1, fast and with no known
/// statistical weakness in its output.
#[derive(Clone, Debug)]
pub struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    /// Fills the state from SplitMix64 seeded with `seed`. SplitMix64 outputs
    /// four distinct words in a row, so the state is never all zeros (the one
    /// state xoshiro must avoid).
    pub fn from_seed(seed: u64) -> Xoshiro256 {
        let mut sm = SplitMix64::new(seed);
        Xoshiro256 { s: [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()] }
    }

    /// The generator for stream `index` of `domain` under `seed`.
    ///
    /// Each part goes through the finalizer before it is combined, so epoch 1
    /// is not epoch 0 shifted by a few draws and the sampler's streams never
    /// coincide with the synthetic data's for the same seed. For a fixed seed
    /// and domain, distinct indices give distinct states (the finalizer is a
    /// bijection).
    pub fn stream(seed: u64, domain: u64, index: u64) -> Xoshiro256 {
        Xoshiro256::from_seed(mix64(mix64(mix64(seed) ^ domain) ^ index))
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform integer in `0..n`, without modulo bias (Lemire's
    /// multiply-and-reject method). Returns 0 when `n` is 0, so no caller can
    /// reach a division by zero.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let mut m = u128::from(self.next_u64()) * u128::from(n);
        // The low word below `2^64 mod n` marks the few products that would
        // make some results more likely than others; draw again for those.
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(n);
            }
        }
        (m >> 64) as u64
    }

    /// A uniform `f64` in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// An approximately standard normal `f64`: the sum of twelve uniforms,
    /// less six (mean 0, variance 1, bounded by ±6).
    ///
    /// Box–Muller would be exact but needs `ln` and `cos`, whose last bits
    /// differ between math libraries; sums are exact IEEE operations, so the
    /// synthetic data is the same on every machine.
    pub fn normal(&mut self) -> f64 {
        let mut sum = 0.0;
        for _ in 0..12 {
            sum += self.uniform();
        }
        sum - 6.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_output() {
        // First output of the reference implementation seeded with 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn xoshiro_matches_the_reference_step() {
        // The reference algorithm worked by hand on the state [1, 2, 3, 4]:
        // the first output is rotl(2 * 5, 7) * 9 = 11520; the step leaves
        // s[1] = 0, so the second is 0; then s[1] = 2^18 + 5, so the third
        // is rotl((2^18 + 5) * 5, 7) * 9.
        let mut g = Xoshiro256 { s: [1, 2, 3, 4] };
        assert_eq!(g.next_u64(), 11520);
        assert_eq!(g.next_u64(), 0);
        assert_eq!(g.next_u64(), 1_509_978_240);
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = {
            let mut g = Xoshiro256::stream(7, 1, 0);
            (0..4).map(|_| g.next_u64()).collect()
        };
        let again: Vec<u64> = {
            let mut g = Xoshiro256::stream(7, 1, 0);
            (0..4).map(|_| g.next_u64()).collect()
        };
        let other: Vec<u64> = {
            let mut g = Xoshiro256::stream(7, 1, 1);
            (0..4).map(|_| g.next_u64()).collect()
        };
        assert_eq!(a, again);
        assert_ne!(a, other);
    }

    #[test]
    fn below_stays_in_bounds_and_covers_the_range() {
        let mut g = Xoshiro256::from_seed(3);
        let mut seen = [0usize; 7];
        for _ in 0..7000 {
            let x = g.below(7);
            assert!(x < 7);
            seen[x as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
        assert_eq!(g.below(0), 0);
        assert_eq!(g.below(1), 0);
    }

    #[test]
    fn normal_has_mean_zero_and_unit_variance() {
        let mut g = Xoshiro256::from_seed(11);
        let n = 20_000;
        let xs: Vec<f64> = (0..n).map(|_| g.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        let u = g.uniform();
        assert!((0.0..1.0).contains(&u));
    }
}
