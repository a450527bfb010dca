//! Byte-level text: every byte is a token, and the target of each token is
//! the byte after it.
//!
//! Input: the raw bytes of the file (any bytes; no encoding is assumed), the
//! `train` and `test` byte ranges, and the window length `seq`.
//! Output: one [`Dataset`] per range holding that range's bytes. Sample `i`
//! of a split of `n` bytes is the window starting at byte `i`: tokens are
//! bytes `i..i+seq`, targets bytes `i+1..i+seq+1`; there are `n - seq`.
//! Invariants: `seq >= 1` and every split holds at least `seq + 1` bytes, so
//! it has at least one sample and every window lies inside its range (a test
//! window never reads a training byte, nor the reverse).

use super::{resolve, DataError, Dataset, Splits};
use shardplan_compiler::check::RowRange;
use std::path::Path;

pub(super) fn split(bytes: &[u8], path: &Path, train: &RowRange, test: Option<&RowRange>, seq: Option<usize>) -> Result<Splits, DataError> {
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
        let r = resolve(range, bytes.len(), name, "bytes", path)?;
        let n = r.len();
        let need = seq.saturating_add(1);
        if n < need {
            return Err(DataError::new("data::too_short", format!("the `{name}` range holds {n} bytes, but one window needs seq + 1 = {need}"), path)
                .span(r.start, r.end)
                .help("lower `seq` or widen the range"));
        }
        Ok(Dataset::text(bytes[r].to_vec(), seq))
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
