//! Data loading: what feeds the model's inputs during `shardplan run`.
//!
//! Input: a checked data source (`csv`, `text` or `synthetic`), the directory
//! of the plan file that names it, the `seq` of the train section (text only)
//! and the model's class count when it is known.
//! Output: the train split and, when the source declares one, the test split,
//! each a [`Dataset`] from which [`Dataset::gather`] builds batches; and a
//! [`Sampler`] that fixes the order of the rows in each epoch.
//! Invariants: every sample of a dataset has the same width; every label is
//! in `0..classes`; loading is deterministic; no input file, however
//! malformed, makes loading panic: it gets a [`DataError`] that names the
//! line, column and byte span to show.

// A `DataError` carries every field the CLI renders, by value, so it is
// larger than clippy likes an `Err` to be; it is built at most once per load,
// never on a path that runs per row.
#![allow(clippy::result_large_err)]

mod csv;
pub mod rng;
mod sampler;
mod synthetic;
mod text;

pub use sampler::Sampler;

use crate::engine::{Data, Engine, EngineError};
use shardplan_compiler::check::{DataSource, RowRange};
use shardplan_compiler::kernel::BufKind;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A data error, rendered by the CLI as a diagnostic with a location in the
/// data file.
#[derive(Clone, Debug, PartialEq)]
pub struct DataError {
    /// A stable `data::kind` code, e.g. `data::ragged_row`.
    pub code: &'static str,
    pub message: String,
    /// The data file; empty for `synthetic`, which has none.
    pub path: PathBuf,
    /// The 1-based line in the file (the header is line 1), when one is at
    /// fault.
    pub line: Option<usize>,
    /// The csv column at fault, by name.
    pub column: Option<String>,
    /// The byte range in the file of the offending cell or row.
    pub span: Option<(usize, usize)>,
    /// How to fix it; may be empty.
    pub help: String,
}

impl DataError {
    fn new(code: &'static str, message: impl Into<String>, path: &Path) -> DataError {
        DataError { code, message: message.into(), path: path.to_path_buf(), line: None, column: None, span: None, help: String::new() }
    }

    fn line(mut self, line: usize) -> DataError {
        self.line = Some(line);
        self
    }

    fn column(mut self, column: &str) -> DataError {
        self.column = Some(column.to_string());
        self
    }

    fn span(mut self, start: usize, end: usize) -> DataError {
        self.span = Some((start, end));
        self
    }

    fn help(mut self, help: impl Into<String>) -> DataError {
        self.help = help.into();
        self
    }
}

impl fmt::Display for DataError {
    /// `path:line: code: message`, the shape compilers use, so the error is
    /// readable wherever it ends up without the CLI's renderer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.as_os_str().is_empty() {
            write!(f, "{}", self.path.display())?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for DataError {}

/// One batch of samples, laid out as the model's two inputs expect them.
#[derive(Clone, Debug, PartialEq)]
pub enum Batch {
    /// `features` is `[rows, width]` row-major; `labels` is `[rows]`.
    Table { features: Vec<f32>, labels: Vec<i32> },
    /// `tokens` and `targets` are each `[rows, seq]` row-major, byte values
    /// `0..256`; `targets` is `tokens` shifted one byte ahead.
    Text { tokens: Vec<i32>, targets: Vec<i32> },
}

impl Batch {
    /// Puts the batch into an engine's two inputs: into buffer set `slot`
    /// (a microbatch in flight), or, with None, where a one-device step reads
    /// them. `rows` are the samples' indices in the data set (the batch was
    /// gathered from them); a program with dropout reads them as a third
    /// input, so that each sample's mask does not depend on where it runs.
    pub fn load_into(&self, exec: &mut dyn Engine, slot: Option<usize>, rows: &[usize]) -> Result<(), EngineError> {
        let (x, y) = match self {
            Batch::Table { features, labels } => (Data::F32(features), Data::I32(labels)),
            Batch::Text { tokens, targets } => (Data::I32(tokens), Data::I32(targets)),
        };
        let ids: Vec<i32> = if exec.program().buffers.iter().any(|b| b.kind == BufKind::Input(2)) {
            rows.iter().map(|&r| i32::try_from(r).unwrap_or(i32::MAX)).collect()
        } else {
            Vec::new()
        };
        let mut inputs = vec![(BufKind::Input(0), x), (BufKind::Input(1), y)];
        if !ids.is_empty() {
            inputs.push((BufKind::Input(2), Data::I32(&ids)));
        }
        for (kind, data) in inputs {
            match slot {
                Some(s) => exec.set_in(s, &kind, data)?,
                None => exec.set(&kind, data)?,
            }
        }
        Ok(())
    }
}

/// One split (train or test) of a data source.
#[derive(Clone)]
pub struct Dataset {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    /// `features` holds `labels.len()` rows of `width` values.
    Table { features: Vec<f32>, labels: Vec<i32>, width: usize },
    /// The tokens of the split's range; at least `seq + 1` of them.
    Text { tokens: text::Tokens, seq: usize },
}

impl Dataset {
    fn table(features: Vec<f32>, labels: Vec<i32>, width: usize) -> Dataset {
        Dataset { inner: Inner::Table { features, labels, width } }
    }

    fn text(tokens: text::Tokens, seq: usize) -> Dataset {
        Dataset { inner: Inner::Text { tokens, seq } }
    }

    /// The number of samples: rows for a table, windows for text.
    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Table { labels, .. } => labels.len(),
            // A window needs `seq + 1` bytes, so the last one starts at
            // `len - seq - 1`.
            Inner::Text { tokens, seq } => tokens.len().saturating_sub(*seq),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Features per row (csv, synthetic) or tokens per window (text).
    pub fn width(&self) -> usize {
        match &self.inner {
            Inner::Table { width, .. } => *width,
            Inner::Text { seq, .. } => *seq,
        }
    }

    /// The samples `rows`, in that order, as one batch.
    ///
    /// Allocates the two output vectors once, at their final size; rows are
    /// copied straight into them.
    ///
    /// # Panics
    ///
    /// If a row index is not below [`Dataset::len`]. The indices come from a
    /// [`Sampler`] built with this dataset's length, never from user input.
    pub fn gather(&self, rows: &[usize]) -> Batch {
        match &self.inner {
            Inner::Table { features, labels, width } => {
                let mut xs = Vec::with_capacity(rows.len() * width);
                let mut ys = Vec::with_capacity(rows.len());
                for &r in rows {
                    xs.extend_from_slice(&features[r * width..(r + 1) * width]);
                    ys.push(labels[r]);
                }
                Batch::Table { features: xs, labels: ys }
            }
            Inner::Text { tokens: ids, seq } => {
                let mut tokens = Vec::with_capacity(rows.len() * seq);
                let mut targets = Vec::with_capacity(rows.len() * seq);
                for &r in rows {
                    ids.window(r, *seq, &mut tokens, &mut targets);
                }
                Batch::Text { tokens, targets }
            }
        }
    }
}

impl fmt::Debug for Dataset {
    /// The shape only: the contents can be megabytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            Inner::Table { .. } => "table",
            Inner::Text { .. } => "text",
        };
        f.debug_struct("Dataset").field("kind", &kind).field("len", &self.len()).field("width", &self.width()).finish()
    }
}

/// The splits of a data source.
#[derive(Clone, Debug)]
pub struct Splits {
    pub train: Dataset,
    /// Present when the source declares a `test` range.
    pub test: Option<Dataset>,
}

/// Loads a source. `base` is the directory of the plan file (paths are
/// relative to it). `seq` is the window length for text (required there).
/// `classes` (when `Some`) bounds labels: `0 <= label < classes`.
pub fn load(source: &DataSource, base: &Path, seq: Option<usize>, classes: Option<usize>) -> Result<Splits, DataError> {
    match source {
        DataSource::Csv { path, label, scale, train, test } => {
            let path = base.join(path);
            let bytes = read(&path)?;
            let table = csv::parse(&bytes, &path, label, *scale, classes)?;
            let split = |range: &RowRange, name: &str| -> Result<Dataset, DataError> {
                let rows = resolve(range, table.labels.len(), name, "data rows", &path)?;
                let w = table.width;
                Ok(Dataset::table(table.features[rows.start * w..rows.end * w].to_vec(), table.labels[rows].to_vec(), w))
            };
            let train = split(train, "train")?;
            let test = test.as_ref().map(|r| split(r, "test")).transpose()?;
            Ok(Splits { train, test })
        }
        DataSource::Text { path, train, test } => {
            let path = base.join(path);
            let bytes = read(&path)?;
            text::split(text::Tokens::Bytes(bytes), &path, train, test.as_ref(), seq)
        }
        DataSource::Tokens { path, bytes: width, train, test } => {
            let path = base.join(path);
            let bytes = read(&path)?;
            let ids = text::ids(&bytes, *width, &path, classes)?;
            text::split(text::Tokens::Ids(ids), &path, train, test.as_ref(), seq)
        }
        DataSource::Synthetic { rows, features, classes: own, seed } => synthetic::generate(*rows, *features, *own, *seed, classes),
    }
}

/// Checks that a table source gives each sample the `expected` feature
/// values the model's input `input` (of type `ty`) takes, from the csv
/// header alone (or a synthetic source's declared width). Text sources, and
/// a csv file that cannot be read (which [`load`] reports), pass.
pub fn check_width(source: &DataSource, base: &Path, expected: usize, input: &str, ty: &str) -> Result<(), DataError> {
    let mismatch = |found: usize, path: &Path, what: &str| {
        let more = if found < expected { "add the missing feature columns to the data" } else { "drop the extra feature columns from the data" };
        DataError::new("data::width_mismatch", format!("the data has {found} {what} per sample, but input `{input}: {ty}` takes {expected}"), path)
            .help(format!("declare the input with {found} features per sample, or {more}"))
    };
    match source {
        DataSource::Csv { path, .. } => {
            let path = base.join(path);
            let Ok(f) = std::fs::File::open(&path) else { return Ok(()) };
            let mut header = String::new();
            if std::io::BufRead::read_line(&mut std::io::BufReader::new(f), &mut header).is_err() {
                return Ok(());
            }
            let line = header.trim_end_matches(['\n', '\r']);
            let columns = line.split(',').count();
            // One column is the label (its absence is `load`'s error).
            match columns.checked_sub(1) {
                Some(found) if found != expected && found > 0 => Err(mismatch(found, &path, "feature columns").line(1).span(0, line.len())),
                _ => Ok(()),
            }
        }
        DataSource::Synthetic { features, .. } if *features as usize != expected => Err(mismatch(*features as usize, Path::new(""), "features")),
        _ => Ok(()),
    }
}

/// Reads a whole data file; the OS error goes into the message, because "not
/// found" and "permission denied" call for different fixes.
fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| {
        let (code, help) = match e.kind() {
            std::io::ErrorKind::NotFound => ("data::missing_file", "data paths are relative to the directory of the plan file"),
            _ => ("data::unreadable", "check that the path names a readable file"),
        };
        DataError::new(code, format!("cannot read `{}`: {e}", path.display()), path).help(help)
    })
}

/// Turns a declared range into indices into `n` rows (or bytes), checking it
/// against what the file holds.
fn resolve(range: &RowRange, n: usize, split: &str, unit: &str, path: &Path) -> Result<Range<usize>, DataError> {
    let shown = match range.end {
        Some(end) => format!("{}..{end}", range.start),
        None => format!("{}..", range.start),
    };
    // The checker rejects these; they are checked again so that a source
    // built some other way cannot index out of bounds.
    let start = usize::try_from(range.start).ok();
    let end = match range.end {
        Some(e) => usize::try_from(e).ok().map(Some),
        None => Some(None),
    };
    let (Some(start), Some(end)) = (start, end) else {
        return Err(DataError::new("data::bad_range", format!("the `{split}` range {shown} is negative"), path)
            .help("write `start..end` with 0 <= start < end, or `start..`"));
    };
    if end.is_some_and(|e| e <= start) {
        return Err(DataError::new("data::bad_range", format!("the `{split}` range {shown} is empty"), path)
            .help("write `start..end` with 0 <= start < end, or `start..`"));
    }
    if n == 0 {
        return Err(DataError::new("data::empty", format!("the file has no {unit}"), path).help("add data to the file, or point the plan at another one"));
    }
    let past = start >= n || end.is_some_and(|e| e > n);
    if past {
        return Err(DataError::new(
            "data::range_out_of_bounds",
            format!("the `{split}` range {shown} goes past the end: the file has {n} {unit} (0..{n})"),
            path,
        )
        .help(format!("use a range within 0..{n}")));
    }
    Ok(start..end.unwrap_or(n))
}

/// The 1-based line holding byte `offset` of `bytes`.
fn line_of(bytes: &[u8], offset: usize) -> usize {
    bytes[..offset.min(bytes.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(super) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(super) fn new(name: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("shardplan-data-{}-{name}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        pub(super) fn write(&self, name: &str, contents: &[u8]) -> String {
            std::fs::write(self.0.join(name), contents).unwrap();
            name.to_string()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(super) fn range(start: i64, end: Option<i64>) -> RowRange {
        RowRange { start, end }
    }

    fn csv(path: &str, label: &str, train: RowRange, test: Option<RowRange>) -> DataSource {
        DataSource::Csv { path: path.into(), label: label.into(), scale: 1.0, train, test }
    }

    fn examples() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"))
    }

    #[test]
    fn loads_digits() {
        let source = DataSource::Csv {
            path: "data/digits.csv".into(),
            label: "label".into(),
            scale: 1.0 / 16.0,
            train: range(0, Some(1500)),
            test: Some(range(1500, None)),
        };
        let t = std::time::Instant::now();
        let splits = load(&source, &examples(), None, Some(10)).unwrap();
        let elapsed = t.elapsed();
        assert_eq!(splits.train.len(), 1500);
        assert_eq!(splits.train.width(), 64);
        let test = splits.test.unwrap();
        assert_eq!(test.len(), 297);
        assert_eq!(test.width(), 64);

        // The first data row of the file: 0,0,5,13,9,1,0,0,…, label 0.
        let Batch::Table { features, labels } = splits.train.gather(&[0, 1]) else { panic!("not a table") };
        assert_eq!(features.len(), 128);
        assert_eq!(&features[..4], &[0.0, 0.0, 5.0 / 16.0, 13.0 / 16.0]);
        assert_eq!(labels, vec![0, 1]);

        let all: Vec<usize> = (0..splits.train.len()).collect();
        let Batch::Table { features, labels } = splits.train.gather(&all) else { panic!("not a table") };
        assert!(features.iter().all(|&x| (0.0..=1.0).contains(&x)));
        assert!(labels.iter().all(|&y| (0..10).contains(&y)));
        assert_eq!((0..10).filter(|c| labels.contains(c)).count(), 10);
        // Generous: a debug build on a slow machine still reads it well
        // within this; release takes a few milliseconds.
        assert!(elapsed.as_secs() < 5, "{elapsed:?}");
    }

    #[test]
    fn gather_keeps_the_given_order() {
        let dir = TempDir::new("order");
        let f = dir.write("t.csv", b"a,label,b\n1,0,2\n3,1,4\n5,2,6\n");
        let splits = load(&csv(&f, "label", range(0, None), None), &dir.0, None, None).unwrap();
        assert_eq!(splits.train.gather(&[2, 0, 2]), Batch::Table { features: vec![5.0, 6.0, 1.0, 2.0, 5.0, 6.0], labels: vec![2, 0, 2] });
        assert!(splits.test.is_none());
        assert_eq!(splits.train.gather(&[]), Batch::Table { features: vec![], labels: vec![] });
    }

    #[test]
    fn missing_file_names_the_os_error() {
        let dir = TempDir::new("missing");
        let e = load(&csv("nope.csv", "label", range(0, None), None), &dir.0, None, None).unwrap_err();
        assert_eq!(e.code, "data::missing_file");
        assert!(e.path.ends_with("nope.csv"));
        assert!(e.message.contains("No such file") || e.message.contains("cannot find"), "{}", e.message);
        let e = load(&DataSource::Text { path: "nope.txt".into(), train: range(0, None), test: None }, &dir.0, Some(4), None).unwrap_err();
        assert_eq!(e.code, "data::missing_file");
        // A directory is not a missing file, but it is not readable as one.
        std::fs::create_dir_all(dir.0.join("sub")).unwrap();
        let e = load(&csv("sub", "label", range(0, None), None), &dir.0, None, None).unwrap_err();
        assert_eq!(e.code, "data::unreadable");
    }

    #[test]
    fn ranges_are_checked_against_the_rows() {
        let dir = TempDir::new("ranges");
        let f = dir.write("t.csv", b"x,label\n1,0\n2,1\n3,0\n");
        let e = load(&csv(&f, "label", range(0, Some(5)), None), &dir.0, None, None).unwrap_err();
        assert_eq!(e.code, "data::range_out_of_bounds");
        assert!(e.message.contains("3 data rows"), "{}", e.message);
        assert!(e.message.contains("`train` range 0..5"), "{}", e.message);
        let e = load(&csv(&f, "label", range(0, Some(2)), Some(range(3, None))), &dir.0, None, None).unwrap_err();
        assert_eq!(e.code, "data::range_out_of_bounds");
        assert!(e.message.contains("`test` range 3.."), "{}", e.message);
        let e = load(&csv(&f, "label", range(-1, None), None), &dir.0, None, None).unwrap_err();
        assert_eq!(e.code, "data::bad_range");
        let e = load(&csv(&f, "label", range(2, Some(2)), None), &dir.0, None, None).unwrap_err();
        assert_eq!(e.code, "data::bad_range");
        let s = load(&csv(&f, "label", range(1, Some(3)), Some(range(0, Some(1)))), &dir.0, None, None).unwrap();
        assert_eq!(s.train.gather(&[0, 1]), Batch::Table { features: vec![2.0, 3.0], labels: vec![1, 0] });
        assert_eq!(s.test.map(|t| t.len()), Some(1));
    }

    #[test]
    fn header_only_is_empty() {
        let dir = TempDir::new("empty");
        let f = dir.write("t.csv", b"x,label\n\n");
        let e = load(&csv(&f, "label", range(0, None), None), &dir.0, None, None).unwrap_err();
        assert_eq!(e.code, "data::empty");
        let f = dir.write("u.csv", b"");
        let e = load(&csv(&f, "label", range(0, None), None), &dir.0, None, None).unwrap_err();
        assert_eq!(e.code, "data::empty");
    }

    #[test]
    fn display_shows_location_and_code() {
        let e = DataError::new("data::ragged_row", "line 3 has 2 cells", Path::new("d.csv")).line(3);
        assert_eq!(e.to_string(), "d.csv:3: data::ragged_row: line 3 has 2 cells");
        let e = DataError::new("data::bad_argument", "no rows", Path::new(""));
        assert_eq!(e.to_string(), "data::bad_argument: no rows");
    }
}
