//! 64-bit FNV-1a, the one hash of the project: plan hashes, CUDA kernel
//! names, and the fingerprints the processes of a run compare.
//!
//! Input: bytes (and, to continue a hash, the value so far). Output: a u64.
//! Invariant: stable across runs, platforms and compiler versions.

/// Where a fresh hash starts (the FNV offset basis).
pub const START: u64 = 0xcbf2_9ce4_8422_2325;

/// `h` continued over `bytes`.
pub fn fnv1a_from(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The hash of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(START, bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_values() {
        // The published FNV-1a test vectors.
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::fnv1a_from(super::fnv1a(b"foo"), b"bar"), super::fnv1a(b"foobar"));
    }
}
