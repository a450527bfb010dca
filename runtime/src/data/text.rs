//! Token streams: byte-level text (every byte is a token) and token files
//! (flat little-endian uint16 or uint32 ids, as nanoGPT and Megatron keep
//! them). The target of each token is the token after it.
//!
//! Input: the tokens of the file (any bytes for text; for a token file, a
//! whole number of ids, each below the model's class count), the `train`
//! and `test` ranges (in tokens), and the window length `seq`.
//! Output: one [`Dataset`] per range holding that range's tokens. Sample `i`
//! of a split of `n` tokens is the window starting at token `i`: tokens
//! `i..i+seq`, targets `i+1..i+seq+1`; there are `n - seq`.
//! Invariants: `seq >= 1` and every split holds at least `seq + 1` tokens, so
//! it has at least one sample and every window lies inside its range (a test
//! window never reads a training token, nor the reverse).

use super::{resolve, DataError, Dataset, Splits};
use shardplan_compiler::check::RowRange;
use std::path::Path;

/// A stream of tokens: bytes (text) or ids (a token file).
#[derive(Clone)]
pub(super) enum Tokens {
    Bytes(Vec<u8>),
    Ids(Vec<u32>),
}

impl Tokens {
    pub(super) fn len(&self) -> usize {
        match self {
            Tokens::Bytes(b) => b.len(),
            Tokens::Ids(i) => i.len(),
        }
    }

    fn range(&self, r: std::ops::Range<usize>) -> Tokens {
        match self {
            Tokens::Bytes(b) => Tokens::Bytes(b[r].to_vec()),
            Tokens::Ids(i) => Tokens::Ids(i[r].to_vec()),
        }
    }

    /// Appends the `seq` tokens from `at` to `tokens`, and the `seq` after each to `targets`.
    pub(super) fn window(&self, at: usize, seq: usize, tokens: &mut Vec<i32>, targets: &mut Vec<i32>) {
        match self {
            Tokens::Bytes(b) => {
                tokens.extend(b[at..at + seq].iter().map(|&x| i32::from(x)));
                targets.extend(b[at + 1..at + seq + 1].iter().map(|&x| i32::from(x)));
            }
            // Ids are below the class count, which fits an i32 (checked when loaded).
            Tokens::Ids(i) => {
                tokens.extend(i[at..at + seq].iter().map(|&x| x as i32));
                targets.extend(i[at + 1..at + seq + 1].iter().map(|&x| x as i32));
            }
        }
    }
}

/// The ids of a token file of `width`-byte little-endian ids; each must be
/// below `classes` (the model's class count, when it has one) and fit an i32.
pub(super) fn ids(bytes: &[u8], width: u8, path: &Path, classes: Option<usize>) -> Result<Vec<u32>, DataError> {
    let w = usize::from(width.max(1));
    if !bytes.len().is_multiple_of(w) {
        return Err(DataError::new("data::token_file", format!("the token file holds {} bytes, not a whole number of {}-byte ids", bytes.len(), w), path)
            .help(format!("check `dtype` (uint{} here) and that the file was written whole", w * 8)));
    }
    let limit = classes.unwrap_or(i32::MAX as usize).min(i32::MAX as usize) as u64;
    let mut out = Vec::with_capacity(bytes.len() / w);
    for (i, c) in bytes.chunks_exact(w).enumerate() {
        let id = if w == 2 { u32::from(u16::from_le_bytes([c[0], c[1]])) } else { u32::from_le_bytes([c[0], c[1], c[2], c[3]]) };
        if u64::from(id) >= limit {
            // No span: the file is binary, not text to point into.
            return Err(DataError::new("data::token_out_of_range", format!("token {i} of the file is id {id}, but the model has {limit} classes"), path)
                .help("the model's vocabulary (its embedding and output head) must cover every id of the file"));
        }
        out.push(id);
    }
    Ok(out)
}

pub(super) fn split(tokens: Tokens, path: &Path, train: &RowRange, test: Option<&RowRange>, seq: Option<usize>) -> Result<Splits, DataError> {
    let unit = if matches!(tokens, Tokens::Bytes(_)) { "bytes" } else { "tokens" };
    let seq = match seq {
        Some(s) if s >= 1 => s,
        Some(_) => {
            return Err(DataError::new("data::bad_seq", "`seq` is 0, but a text window needs at least one token", path)
                .help("set `seq` to a positive window length in the train section"))
        }
        None => {
            return Err(DataError::new("data::missing_seq", "a text source needs the window length `seq`", path)
                .help("add `seq: N` to the train section, e.g. `seq: 64`"))
        }
    };
    let one = |range: &RowRange, name: &str| -> Result<Dataset, DataError> {
        let r = resolve(range, tokens.len(), name, unit, path)?;
        let n = r.len();
        let need = seq.saturating_add(1);
        if n < need {
            let e = DataError::new("data::too_short", format!("the `{name}` range holds {n} {unit}, but one window needs seq + 1 = {need}"), path);
            // Spans point into the file's bytes; a token file's ids are wider than one.
            let e = if unit == "bytes" { e.span(r.start, r.end) } else { e };
            return Err(e.help("lower `seq` or widen the range"));
        }
        Ok(Dataset::text(tokens.range(r), seq))
    };
    Ok(Splits { train: one(train, "train")?, test: test.map(|r| one(r, "test")).transpose()? })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{range, TempDir};
    use super::super::{load, Batch, DataError, Splits};
    use shardplan_compiler::check::{DataSource, RowRange};

    fn load_text(contents: &[u8], train: RowRange, test: Option<RowRange>, seq: Option<usize>) -> Result<Splits, DataError> {
        let dir = TempDir::new("text");
        let f = dir.write("t.txt", contents);
        load(&DataSource::Text { path: f, train, test }, &dir.0, seq, None)
    }

    fn load_tokens(ids: &[u32], width: u8, train: RowRange, test: Option<RowRange>, seq: Option<usize>, classes: Option<usize>) -> Result<Splits, DataError> {
        let dir = TempDir::new("tokens");
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| if width == 2 { (i as u16).to_le_bytes().to_vec() } else { i.to_le_bytes().to_vec() }).collect();
        let f = dir.write("t.bin", &bytes);
        load(&DataSource::Tokens { path: f, bytes: width, train, test }, &dir.0, seq, classes)
    }

    #[test]
    fn token_files_are_windows_of_ids() {
        for width in [2u8, 4] {
            let ids: Vec<u32> = vec![5, 60000, 7, 8, 9, 10, 11, 12];
            let s = load_tokens(&ids, width, range(0, Some(5)), Some(range(5, None)), Some(2), Some(65536)).unwrap();
            // 5 tokens, windows of 2 and one more for the last target: 3 samples.
            assert_eq!(s.train.len(), 3);
            assert_eq!(s.train.gather(&[1, 0]), Batch::Text { tokens: vec![60000, 7, 5, 60000], targets: vec![7, 8, 60000, 7] });
            let test = s.test.unwrap();
            assert_eq!(test.len(), 1);
            assert_eq!(test.gather(&[0]), Batch::Text { tokens: vec![10, 11], targets: vec![11, 12] });
        }
        // uint32 ids beyond 65,535.
        let s = load_tokens(&[70000, 1, 2], 4, range(0, None), None, Some(2), Some(100000)).unwrap();
        assert_eq!(s.train.gather(&[0]), Batch::Text { tokens: vec![70000, 1], targets: vec![1, 2] });
    }

    #[test]
    fn bad_token_files_are_clear_errors() {
        // An id the model's classes do not cover.
        let e = load_tokens(&[1, 2, 300, 4], 2, range(0, None), None, Some(2), Some(256)).unwrap_err();
        assert_eq!(e.code, "data::token_out_of_range");
        assert!(e.message.contains("token 2") && e.message.contains("id 300") && e.message.contains("256 classes"), "{}", e.message);
        // A file cut in the middle of an id.
        let dir = TempDir::new("tokens-cut");
        let f = dir.write("t.bin", &[1, 0, 2, 0, 3]);
        let e = load(&DataSource::Tokens { path: f, bytes: 2, train: range(0, None), test: None }, &dir.0, Some(1), None).unwrap_err();
        assert_eq!(e.code, "data::token_file");
        assert!(e.message.contains("5 bytes") && e.message.contains("2-byte"), "{}", e.message);
        // Ranges count tokens.
        let e = load_tokens(&[1, 2, 3, 4], 4, range(0, Some(9)), None, Some(1), None).unwrap_err();
        assert_eq!(e.code, "data::range_out_of_bounds");
        assert!(e.message.contains("4 tokens"), "{}", e.message);
        let e = load_tokens(&[1, 2], 2, range(0, None), None, Some(2), None).unwrap_err();
        assert_eq!(e.code, "data::too_short");
        assert!(e.message.contains("2 tokens"), "{}", e.message);
    }

    #[test]
    fn windows_and_targets() {
        let s = load_text(b"abcdefghij", range(0, Some(6)), Some(range(6, None)), Some(3)).unwrap();
        // 6 bytes, windows of 3 tokens and 1 more byte for the last target:
        // 3 samples.
        assert_eq!(s.train.len(), 3);
        assert_eq!(s.train.width(), 3);
        let b = |t: &[u8]| t.iter().map(|&x| i32::from(x)).collect::<Vec<i32>>();
        assert_eq!(s.train.gather(&[2, 0]), Batch::Text { tokens: [b(b"cde"), b(b"abc")].concat(), targets: [b(b"def"), b(b"bcd")].concat() });
        // The test split sees only its own bytes.
        let test = s.test.unwrap();
        assert_eq!(test.len(), 1);
        assert_eq!(test.gather(&[0]), Batch::Text { tokens: b(b"ghi"), targets: b(b"hij") });

        // "gh" is 2 bytes; seq 3 needs 4.
        let e = load_text(b"abcdefgh", range(0, Some(4)), Some(range(6, None)), Some(3)).unwrap_err();
        assert_eq!(e.code, "data::too_short");
        assert!(e.message.contains("`test`") && e.message.contains("2 bytes"), "{}", e.message);
        assert_eq!(e.span, Some((6, 8)));
    }

    #[test]
    fn any_bytes_are_tokens() {
        let s = load_text(&[0, 255, 128, 10, 13], range(0, None), None, Some(2)).unwrap();
        assert_eq!(s.train.len(), 3);
        assert!(s.test.is_none());
        assert_eq!(s.train.gather(&[0]), Batch::Text { tokens: vec![0, 255], targets: vec![255, 128] });
        assert_eq!(s.train.gather(&[2]), Batch::Text { tokens: vec![128, 10], targets: vec![10, 13] });
    }

    #[test]
    fn exactly_seq_plus_one_bytes_is_one_sample() {
        let s = load_text(b"abcd", range(0, None), None, Some(3)).unwrap();
        assert_eq!(s.train.len(), 1);
        let e = load_text(b"abc", range(0, None), None, Some(3)).unwrap_err();
        assert_eq!(e.code, "data::too_short");
    }

    #[test]
    fn seq_and_ranges_are_checked() {
        assert_eq!(load_text(b"abcd", range(0, None), None, None).unwrap_err().code, "data::missing_seq");
        assert_eq!(load_text(b"abcd", range(0, None), None, Some(0)).unwrap_err().code, "data::bad_seq");
        let e = load_text(b"abcd", range(0, Some(9)), None, Some(1)).unwrap_err();
        assert_eq!(e.code, "data::range_out_of_bounds");
        assert!(e.message.contains("4 bytes"), "{}", e.message);
        assert_eq!(load_text(b"", range(0, None), None, Some(1)).unwrap_err().code, "data::empty");
    }

    #[test]
    fn loads_the_example_corpus() {
        let base = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
        let source = DataSource::Text { path: "data/tiny.txt".into(), train: range(0, Some(30000)), test: Some(range(30000, None)) };
        let s = load(&source, &base, Some(64), None).unwrap();
        assert_eq!(s.train.len(), 30000 - 64);
        let test = s.test.unwrap();
        assert_eq!(test.len(), std::fs::metadata(base.join("data/tiny.txt")).unwrap().len() as usize - 30000 - 64);
    }
}
