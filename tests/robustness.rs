//! Thousands of mutations of the examples — deleted, duplicated and swapped
//! tokens, changed numbers, truncations and random bytes — must each be
//! accepted or rejected with located diagnostics, never panic.

use shardplan_compiler::check_source;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Splits into tokens: words, numbers, single punctuation, whitespace runs.
fn tokens(src: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < src.len() {
        let c = src[i];
        let class = |b: u8| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' {
                0
            } else if b.is_ascii_whitespace() {
                1
            } else {
                2
            }
        };
        let k = class(c);
        let mut j = i + 1;
        if k != 2 {
            while j < src.len() && class(src[j]) == k {
                j += 1;
            }
        }
        out.push(&src[i..j]);
        i = j;
    }
    out
}

fn mutate(src: &[u8], rng: &mut Rng) -> Vec<u8> {
    let toks = tokens(src);
    let n = toks.len();
    let mut t: Vec<Vec<u8>> = toks.iter().map(|t| t.to_vec()).collect();
    match rng.below(8) {
        0 => {
            t.remove(rng.below(n));
        }
        1 => {
            let i = rng.below(n);
            let dup = t[i].clone();
            t.insert(i, dup);
        }
        2 => {
            let (i, j) = (rng.below(n), rng.below(n));
            t.swap(i, j);
        }
        3 => {
            // Change a number to an edge value.
            let nums: Vec<usize> = (0..n).filter(|&i| t[i].first().is_some_and(u8::is_ascii_digit)).collect();
            if let Some(&i) = nums.get(rng.below(nums.len())) {
                let vals: [&[u8]; 10] = [b"0", b"1", b"3", b"7", b"100", b"99999999999999999999", b"9223372036854775807", b"0.5", b"1e308", b"4096"];
                t[i] = vals[rng.below(vals.len())].to_vec();
            }
        }
        4 => {
            let cut = rng.below(src.len());
            return src[..cut].to_vec();
        }
        5 => {
            let mut v = src.to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(v.len());
                v[at] = (rng.next() & 0xff) as u8;
            }
            return v;
        }
        6 => {
            // Replace a word with another word of the file.
            let words: Vec<usize> = (0..n).filter(|&i| t[i].first().is_some_and(u8::is_ascii_alphabetic)).collect();
            if !words.is_empty() {
                let (i, j) = (words[rng.below(words.len())], words[rng.below(words.len())]);
                t[i] = t[j].clone();
            }
        }
        _ => {
            let junk: [&[u8]; 12] = [b"(", b")", b"{", b"}", b"[", b"]", b"@", b"-", b"..", b"\"", b"/*", b"*"];
            t.insert(rng.below(n), junk[rng.below(junk.len())].to_vec());
        }
    }
    t.concat()
}

#[test]
fn mutated_examples_never_panic_and_errors_are_located() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).expect("examples").filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "plan")).collect();
    files.sort();
    assert!(files.len() >= 7);
    let seed = std::env::var("SHARDPLAN_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_2026_u64);
    let per_file = 500;
    let mut rng = Rng(seed);
    let (mut accepted, mut rejected) = (0, 0);
    for f in &files {
        let src = std::fs::read(f).expect("readable");
        for k in 0..per_file {
            let m = mutate(&src, &mut rng);
            let res = catch_unwind(AssertUnwindSafe(|| check_source(&m)));
            let (checked, diags) = match res {
                Ok(r) => r,
                Err(_) => panic!("panic on mutation {k} of {} (seed {seed}):\n{}", f.display(), String::from_utf8_lossy(&m)),
            };
            if diags.has_errors() {
                rejected += 1;
                assert!(checked.is_none());
                for d in diags.iter() {
                    let span = d.primary_span().unwrap_or_else(|| panic!("{} has no location: mutation {k} of {}", d.code, f.display()));
                    let len = if span.src == shardplan_compiler::SourceId::USER { m.len() } else { shardplan_compiler::PRELUDE.len() };
                    assert!(span.start <= span.end && span.end as usize <= len, "{}: span {span:?} outside the source", d.code);
                }
            } else {
                accepted += 1;
                assert!(checked.is_some(), "no errors but nothing checked: mutation {k} of {}", f.display());
            }
        }
    }
    assert!(rejected > 1000, "the mutations should mostly be rejected ({rejected} rejected, {accepted} accepted)");
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(42);
    for len in [0usize, 1, 2, 7, 64, 512, 4096] {
        for _ in 0..50 {
            let bytes: Vec<u8> = (0..len).map(|_| (rng.next() & 0xff) as u8).collect();
            let (_, diags) = catch_unwind(AssertUnwindSafe(|| check_source(&bytes))).expect("no panic on random bytes");
            assert!(diags.iter().all(|d| d.primary_span().is_some()));
        }
    }
}

#[test]
fn pathological_nesting_is_rejected_cleanly() {
    for src in [
        format!("model M {{ loss {}x{} }}", "(".repeat(100_000), ")".repeat(100_000)),
        format!("model M {{ loss {}x }}", "-".repeat(100_000)),
        format!("model M {{ loss x{} }}", " + x".repeat(20_000)),
        format!("model M {{ loss {}", "f(".repeat(50_000)),
    ] {
        let (checked, diags) = catch_unwind(AssertUnwindSafe(|| check_source(src.as_bytes()))).expect("no panic");
        assert!(checked.is_none());
        assert!(diags.has_errors());
    }
}
