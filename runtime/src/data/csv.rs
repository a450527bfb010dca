//! CSV tables: a header line, then one sample per line.
//!
//! Input: the raw bytes of the file, the name of the label column, the
//! feature scale and, when known, the class count.
//! Output: a [`Table`] of every data row: the features row-major (all columns
//! but the label, in file order, each multiplied by `scale`) and the labels.
//! Invariants: every row has exactly one cell per header column; every
//! feature is a finite `f32`; every label is an integer in `0..classes`
//! (`0..=i32::MAX` when the class count is not known). Lines are counted in
//! the file as it is (the header is line 1, blank lines count), and spans are
//! byte offsets into the raw bytes, so the CLI can point into the file.
//!
//! Blank lines are skipped, `\r\n` is accepted and a leading UTF-8 byte order
//! mark is ignored. Cells may be wrapped in double quotes, and a quoted cell
//! may hold commas; a quoted cell cannot span lines.

use super::{line_of, DataError};
use shardplan_compiler::diag::did_you_mean;
use std::path::Path;

/// Every data row of a csv file.
#[derive(Debug)]
pub(super) struct Table {
    pub features: Vec<f32>,
    pub labels: Vec<i32>,
    pub width: usize,
}

/// Parses the whole file; see the module doc.
pub(super) fn parse(bytes: &[u8], path: &Path, label: &str, scale: f64, classes: Option<usize>) -> Result<Table, DataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let line = line_of(bytes, at);
        DataError::new("data::not_utf8", format!("line {line} is not valid UTF-8"), path)
            .line(line)
            .span(at, at + e.error_len().unwrap_or(1))
            .help("save the file as UTF-8 text")
    })?;
    // Offsets stay relative to the raw file, BOM included.
    let bom = if text.starts_with('\u{feff}') { '\u{feff}'.len_utf8() } else { 0 };
    let mut lines = Lines { text, pos: bom, line: 0 };

    let Some(header) = lines.by_ref().find(|l| !is_blank(l.text)) else {
        return Err(DataError::new("data::empty", "the file is empty: it has no header line", path)
            .help("start the file with a header line naming the columns, e.g. `x0,x1,label`"));
    };
    let mut cells = Vec::new();
    split_cells(header.text, &mut cells);
    let names: Vec<String> = cells.iter().map(|&(s, e)| unquote(cell(&header.text[s..e]))).collect();
    let header_span = (header.offset, header.offset + header.text.len());

    let mut found = names.iter().enumerate().filter(|(_, n)| n.as_str() == label).map(|(i, _)| i);
    let Some(label_col) = found.next() else {
        let mut help = match did_you_mean(label, names.iter().map(String::as_str)) {
            Some(s) => format!("did you mean `{s}`? "),
            None => String::new(),
        };
        help.push_str(&format!("the columns are {}; name the label column with `label: \"…\"`", list(&names)));
        return Err(DataError::new("data::no_label_column", format!("the header has no column named `{label}`"), path)
            .line(header.line)
            .column(label)
            .span(header_span.0, header_span.1)
            .help(help));
    };
    if found.next().is_some() {
        return Err(DataError::new("data::duplicate_column", format!("the header has more than one column named `{label}`"), path)
            .line(header.line)
            .column(label)
            .span(header_span.0, header_span.1)
            .help("rename the columns so that the label column is named once"));
    }
    let columns = names.len();
    let width = columns - 1;
    if width == 0 {
        return Err(DataError::new("data::no_features", "the header names only the label column", path)
            .line(header.line)
            .span(header_span.0, header_span.1)
            .help("add at least one feature column"));
    }
    let classes = classes.map(|c| i64::try_from(c).unwrap_or(i64::MAX));

    // One line of the file is one row; this guess sizes the buffers so that
    // a large file is not copied over and over as they grow.
    let guess = text.len() / header.text.len().max(1);
    let mut features = Vec::with_capacity(guess.saturating_mul(width));
    let mut labels = Vec::with_capacity(guess);
    for row in lines {
        if is_blank(row.text) {
            continue;
        }
        split_cells(row.text, &mut cells);
        if cells.len() != columns {
            return Err(DataError::new(
                "data::ragged_row",
                format!("line {} has {} cell{} but the header has {columns} columns", row.line, cells.len(), if cells.len() == 1 { "" } else { "s" }),
                path,
            )
            .line(row.line)
            .span(row.offset, row.offset + row.text.len())
            .help("give every row one cell per header column; look for a missing or extra comma"));
        }
        for (col, &(s, e)) in cells.iter().enumerate() {
            let raw = &row.text[s..e];
            let value = unquote_number(cell(raw));
            let at = |err: DataError| {
                // Point at the cell without the blanks around it.
                let lead = raw.len() - raw.trim_start().len();
                let start = row.offset + s + lead;
                err.line(row.line).column(&names[col]).span(start, start + raw.trim().len())
            };
            if col == label_col {
                labels.push(parse_label(value, classes, &names[col], path).map_err(at)?);
            } else {
                features.push(parse_feature(value, scale, &names[col], path).map_err(at)?);
            }
        }
    }
    Ok(Table { features, labels, width })
}

/// A feature: any finite number, scaled in `f64`, then rounded to `f32`.
fn parse_feature(value: &str, scale: f64, column: &str, path: &Path) -> Result<f32, DataError> {
    let Ok(x) = value.parse::<f64>() else {
        return Err(not_numeric(value, column, path));
    };
    let y = (x * scale) as f32;
    if !y.is_finite() {
        let why = if x.is_finite() { format!("times the scale {scale} is outside the f32 range") } else { "is not a finite number".to_string() };
        return Err(DataError::new("data::not_finite", format!("`{value}` in column `{column}` {why}"), path)
            .help("features must be finite numbers within the f32 range (about ±3.4e38, after `scale`)"));
    }
    Ok(y)
}

fn not_numeric(value: &str, column: &str, path: &Path) -> DataError {
    let message = if value.is_empty() { format!("the cell in column `{column}` is empty") } else { format!("`{value}` in column `{column}` is not a number") };
    DataError::new("data::not_numeric", message, path).help("every cell must be a number, such as `3`, `0.25` or `-1e-3`")
}

/// A label: an integer, written as such or as a float with no fraction
/// (`3.0`, as exported by tools that store every column as floats).
fn parse_label(value: &str, classes: Option<i64>, column: &str, path: &Path) -> Result<i32, DataError> {
    let n = match value.parse::<i64>() {
        Ok(n) => n,
        Err(_) => {
            let Ok(x) = value.parse::<f64>() else {
                return Err(not_numeric(value, column, path));
            };
            if !x.is_finite() || x.fract() != 0.0 {
                return Err(DataError::new("data::label_not_integer", format!("the label `{value}` is not an integer"), path)
                    .help("labels are class indices: 0, 1, 2, …"));
            }
            // Saturating: a huge value is then caught as out of range below.
            x as i64
        }
    };
    let fits = match classes {
        Some(c) => (0..c).contains(&n),
        None => n >= 0,
    };
    let i = i32::try_from(n).ok().filter(|_| fits);
    i.ok_or_else(|| {
        let (message, help) = match classes {
            Some(c) => (format!("the label `{value}` is outside 0..{c}"), format!("the model has {c} classes, so labels must be from 0 to {}", c - 1)),
            None if n < 0 => (format!("the label `{value}` is negative"), "labels are class indices from 0".to_string()),
            None => (format!("the label `{value}` does not fit in i32"), "labels are class indices from 0".to_string()),
        };
        DataError::new("data::label_out_of_range", message, path).help(help)
    })
}

/// One line of the file, without its line ending.
struct Line<'a> {
    /// 1-based, counted in the file.
    line: usize,
    /// Byte offset of the line's first byte in the file.
    offset: usize,
    text: &'a str,
}

struct Lines<'a> {
    text: &'a str,
    pos: usize,
    line: usize,
}

impl<'a> Iterator for Lines<'a> {
    type Item = Line<'a>;

    fn next(&mut self) -> Option<Line<'a>> {
        if self.pos >= self.text.len() {
            return None;
        }
        let rest = &self.text[self.pos..];
        let len = rest.find('\n').unwrap_or(rest.len());
        let body = &rest[..len];
        let body = body.strip_suffix('\r').unwrap_or(body);
        self.line += 1;
        let line = Line { line: self.line, offset: self.pos, text: body };
        self.pos += len + 1;
        Some(line)
    }
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

/// Splits a line at the commas outside double quotes, into byte ranges of
/// the line. Reuses `out` so that rows do not allocate.
fn split_cells(line: &str, out: &mut Vec<(usize, usize)>) {
    out.clear();
    let mut start = 0;
    let mut quoted = false;
    for (i, &b) in line.as_bytes().iter().enumerate() {
        match b {
            // An escaped quote (`""`) toggles twice, which is what it should do.
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                out.push((start, i));
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push((start, line.len()));
}

/// A cell without the blanks around it.
fn cell(raw: &str) -> &str {
    raw.trim()
}

/// A numeric cell without its quotes; `""` escapes cannot occur in a number,
/// so nothing is unescaped.
fn unquote_number(s: &str) -> &str {
    match s.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) => inner.trim(),
        None => s,
    }
}

/// A header name without its quotes, `""` read as `"`.
fn unquote(s: &str) -> String {
    match s.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => s.to_string(),
    }
}

/// The column names for a help line: all of them when few, otherwise the
/// first and last few (a digits file has 65).
fn list(names: &[String]) -> String {
    let quoted = |ns: &[String]| ns.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() <= 10 {
        quoted(names)
    } else {
        format!("{}, …, {} ({} in all)", quoted(&names[..5]), quoted(&names[names.len() - 3..]), names.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{range, TempDir};
    use super::super::{load, Batch, DataError};
    use shardplan_compiler::check::DataSource;

    /// Loads `contents` as a csv file with label column `label`, all rows for
    /// training.
    fn load_csv(contents: &[u8], label: &str, classes: Option<usize>) -> Result<super::super::Splits, DataError> {
        let dir = TempDir::new("csv");
        let f = dir.write("t.csv", contents);
        let source = DataSource::Csv { path: f, label: label.into(), scale: 1.0, train: range(0, None), test: None };
        load(&source, &dir.0, None, classes)
    }

    fn err(contents: &[u8], label: &str, classes: Option<usize>) -> DataError {
        match load_csv(contents, label, classes) {
            Ok(s) => panic!("expected an error, got {s:?}"),
            Err(e) => e,
        }
    }

    fn spanned<'a>(contents: &'a [u8], e: &DataError) -> &'a [u8] {
        let (s, t) = e.span.unwrap();
        &contents[s..t]
    }

    #[test]
    fn accepts_crlf_blank_lines_quotes_and_bom() {
        let data = b"\xEF\xBB\xBF\"a\",b,\"label\"\r\n\r\n1, 2 ,0\r\n  \r\n\"3\",4e0,1.0\r\n\r\n";
        let s = load_csv(data, "label", Some(2)).unwrap();
        assert_eq!(s.train.len(), 2);
        assert_eq!(s.train.gather(&[0, 1]), Batch::Table { features: vec![1.0, 2.0, 3.0, 4.0], labels: vec![0, 1] });
    }

    #[test]
    fn scale_multiplies_every_feature() {
        let dir = TempDir::new("scale");
        let f = dir.write("t.csv", b"label,a,b\n1,2,-4\n");
        let source = DataSource::Csv { path: f, label: "label".into(), scale: 0.5, train: range(0, None), test: None };
        let s = load(&source, &dir.0, None, None).unwrap();
        assert_eq!(s.train.width(), 2);
        assert_eq!(s.train.gather(&[0]), Batch::Table { features: vec![1.0, -2.0], labels: vec![1] });
    }

    #[test]
    fn no_label_column_suggests_and_lists() {
        let data = b"x0,x1,lable\n1,2,0\n";
        let e = err(data, "label", None);
        assert_eq!(e.code, "data::no_label_column");
        assert_eq!(e.line, Some(1));
        assert_eq!(e.column.as_deref(), Some("label"));
        assert_eq!(spanned(data, &e), b"x0,x1,lable");
        assert!(e.help.contains("did you mean `lable`?"), "{}", e.help);
        assert!(e.help.contains("`x0`, `x1`, `lable`"), "{}", e.help);

        let e = err(b"a,b\n1,2\n", "target", None);
        assert!(!e.help.contains("did you mean"), "{}", e.help);
    }

    #[test]
    fn ragged_row_names_the_line() {
        let data = b"a,b,label\n1,2,0\n\n3,1\n";
        let e = err(data, "label", None);
        assert_eq!(e.code, "data::ragged_row");
        // Blank lines count: the short row is the file's fourth line.
        assert_eq!(e.line, Some(4));
        assert_eq!(e.column, None);
        assert_eq!(spanned(data, &e), b"3,1");
        assert!(e.message.contains("2 cells") && e.message.contains("3 columns"), "{}", e.message);
    }

    #[test]
    fn not_numeric_names_line_column_and_text() {
        let data = b"a,b,label\r\n1,2,0\r\n1, x7 ,1\r\n";
        let e = err(data, "label", None);
        assert_eq!(e.code, "data::not_numeric");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.column.as_deref(), Some("b"));
        assert_eq!(spanned(data, &e), b"x7");
        assert!(e.message.contains("`x7`"), "{}", e.message);

        let e = err(b"a,label\n,1\n", "label", None);
        assert_eq!(e.code, "data::not_numeric");
        assert_eq!((e.line, e.column.as_deref()), (Some(2), Some("a")));
        assert!(e.message.contains("empty"), "{}", e.message);

        let e = err(b"a,label\n1,cat\n", "label", None);
        assert_eq!(e.code, "data::not_numeric");
        assert_eq!((e.line, e.column.as_deref()), (Some(2), Some("label")));
    }

    #[test]
    fn non_finite_features_are_rejected() {
        let e = err(b"a,label\nnan,1\n", "label", None);
        assert_eq!(e.code, "data::not_finite");
        assert_eq!((e.line, e.column.as_deref()), (Some(2), Some("a")));
        let e = err(b"a,label\n1,1\n1e39,0\n", "label", None);
        assert_eq!(e.code, "data::not_finite");
        assert_eq!(e.line, Some(3));
    }

    #[test]
    fn labels_must_be_integers_in_range() {
        let data = b"a,label\n1,0\n2,3.5\n";
        let e = err(data, "label", Some(4));
        assert_eq!(e.code, "data::label_not_integer");
        assert_eq!((e.line, e.column.as_deref()), (Some(3), Some("label")));
        assert_eq!(spanned(data, &e), b"3.5");

        let e = err(b"a,label\n1,0\n2,10\n", "label", Some(10));
        assert_eq!(e.code, "data::label_out_of_range");
        assert_eq!((e.line, e.column.as_deref()), (Some(3), Some("label")));
        assert!(e.help.contains("0 to 9"), "{}", e.help);

        let e = err(b"a,label\n1,-1\n", "label", None);
        assert_eq!(e.code, "data::label_out_of_range");
        let e = err(b"a,label\n1,3000000000\n", "label", None);
        assert_eq!(e.code, "data::label_out_of_range");
        let e = err(b"a,label\n1,1e300\n", "label", Some(3));
        assert_eq!(e.code, "data::label_out_of_range");

        // Without a class count, any non-negative i32 is a label.
        assert!(load_csv(b"a,label\n1,12\n", "label", None).is_ok());
    }

    #[test]
    fn other_header_problems() {
        let e = err(b"a,label,label\n1,2,3\n", "label", None);
        assert_eq!(e.code, "data::duplicate_column");
        assert_eq!(e.line, Some(1));
        let e = err(b"\n\nlabel\n1\n", "label", None);
        assert_eq!(e.code, "data::no_features");
        assert_eq!(e.line, Some(3));
        let e = err(b"\n \r\n", "label", None);
        assert_eq!(e.code, "data::empty");
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let data = b"a,label\n1,0\n\xff,1\n";
        let e = err(data, "label", None);
        assert_eq!(e.code, "data::not_utf8");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.span, Some((12, 13)));
    }

    #[test]
    fn quoted_commas_stay_in_one_cell() {
        let e = err(b"a,label\n\"1,5\",0\n", "label", None);
        assert_eq!(e.code, "data::not_numeric");
        assert!(e.message.contains("`1,5`"), "{}", e.message);
    }
}
