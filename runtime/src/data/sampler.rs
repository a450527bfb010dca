//! The order in which an epoch visits the samples.
//!
//! Input: the number of samples, the (global) batch size, whether to shuffle
//! and the train seed.
//! Output: for each epoch, the sample indices of each of its batches.
//! Invariants: every batch has exactly `batch` indices (the last partial
//! batch is dropped, so every step runs the compiled batch size); an index
//! appears at most once per epoch; the order of epoch `e` depends only on
//! `(seed, e)`, not on which epochs came before, so a run resumed from a
//! checkpoint at epoch `e` sees the same data as one that never stopped.

use super::rng::Xoshiro256;

/// Names the sampler's stream, so that it is unrelated to the synthetic
/// data's stream under the same seed.
const DOMAIN: u64 = 0x7361_6d70_6c65_7200; // "sampler\0"

/// Seeded, deterministic epoch order: the same (seed, epoch) always gives
/// the same permutation.
#[derive(Clone, Debug)]
pub struct Sampler {
    len: usize,
    batch: usize,
    shuffle: bool,
    seed: u64,
}

impl Sampler {
    pub fn new(len: usize, batch: usize, shuffle: bool, seed: u64) -> Sampler {
        Sampler { len, batch, shuffle, seed }
    }

    /// `len / batch`: the last partial batch is dropped. Zero when the batch
    /// is larger than the data (or zero), which the caller must treat as an
    /// error rather than loop over empty epochs.
    pub fn batches_per_epoch(&self) -> usize {
        self.len.checked_div(self.batch).unwrap_or(0)
    }

    /// The row indices of each batch of `epoch`.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            // Fisher–Yates, drawing from a generator of its own for each
            // epoch.
            let mut rng = Xoshiro256::stream(self.seed, DOMAIN, epoch);
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        if self.batch == 0 {
            return Vec::new();
        }
        order.chunks_exact(self.batch).map(<[usize]>::to_vec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_epoch_same_order() {
        let s = Sampler::new(100, 8, true, 7);
        assert_eq!(s.epoch(3), s.epoch(3));
        assert_eq!(s.epoch(3), Sampler::new(100, 8, true, 7).epoch(3));
        assert_ne!(s.epoch(0), s.epoch(1));
        assert_ne!(s.epoch(0), Sampler::new(100, 8, true, 8).epoch(0));
    }

    #[test]
    fn batches_are_full_and_indices_unique() {
        let s = Sampler::new(100, 8, true, 1);
        assert_eq!(s.batches_per_epoch(), 12);
        for e in 0..5 {
            let batches = s.epoch(e);
            assert_eq!(batches.len(), 12);
            assert!(batches.iter().all(|b| b.len() == 8));
            let mut seen = [false; 100];
            for &i in batches.iter().flatten() {
                assert!(i < 100);
                assert!(!seen[i], "index {i} twice in epoch {e}");
                seen[i] = true;
            }
        }
    }

    #[test]
    fn a_full_epoch_is_a_permutation() {
        let s = Sampler::new(64, 16, true, 9);
        let mut all: Vec<usize> = s.epoch(2).concat();
        assert_ne!(all, (0..64).collect::<Vec<_>>());
        all.sort_unstable();
        assert_eq!(all, (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn no_shuffle_keeps_row_order() {
        let s = Sampler::new(10, 3, false, 5);
        let expected = vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]];
        assert_eq!(s.epoch(0), expected);
        assert_eq!(s.epoch(4), expected);
    }

    #[test]
    fn degenerate_sizes_give_no_batches() {
        assert_eq!(Sampler::new(10, 0, true, 0).batches_per_epoch(), 0);
        assert!(Sampler::new(10, 0, true, 0).epoch(0).is_empty());
        assert_eq!(Sampler::new(3, 4, true, 0).batches_per_epoch(), 0);
        assert!(Sampler::new(3, 4, true, 0).epoch(0).is_empty());
        assert!(Sampler::new(0, 4, true, 0).epoch(0).is_empty());
    }
}
