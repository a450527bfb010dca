//! Rendering diagnostics: rustc-style text through miette, or the JSON form
//! editors read. The stages only build diagnostics; front ends (the command
//! line, an editor, a report) render them here, against the texts they
//! point into.
//!
//! Labels that point into another source than the primary label's (the
//! prelude, say) are shown as a related note with that source's snippet.
//!
//! Input: diagnostics and the sources they point into. Output: the text or
//! JSON printed. Invariant: rendering never fails: a span outside its source
//! is clamped.

use super::{Diagnostic, Severity, SourceId, Span};
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource, SourceSpan};
use serde::Serialize;
use std::fmt;
use std::sync::Arc;

/// The texts diagnostics point into.
pub struct Sources {
    files: Vec<(String, Arc<String>)>,
}

impl Sources {
    /// The user's file (`SourceId::USER`) and the prelude (`SourceId::PRELUDE`).
    pub fn new(user_name: &str, user_text: String) -> Sources {
        Sources { files: vec![(user_name.to_string(), Arc::new(user_text)), ("<prelude>".to_string(), Arc::new(crate::PRELUDE.to_string()))] }
    }

    /// Adds another text (a data file) that diagnostics may point into.
    pub fn add(&mut self, name: &str, text: String) -> SourceId {
        self.files.push((name.to_string(), Arc::new(text)));
        SourceId(self.files.len() as u32 - 1)
    }

    fn get(&self, id: SourceId) -> (&str, &Arc<String>) {
        let (n, t) = &self.files[(id.0 as usize).min(self.files.len() - 1)];
        (n, t)
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, span: Span) -> (usize, usize) {
        let (_, text) = self.get(span.src);
        let at = (span.start as usize).min(text.len());
        let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        (line, col)
    }
}

struct Report {
    code: &'static str,
    message: String,
    severity: miette::Severity,
    help: Option<String>,
    labels: Vec<LabeledSpan>,
    source: NamedSource<Arc<String>>,
    related: Vec<Report>,
}

impl fmt::Debug for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for Report {}

impl miette::Diagnostic for Report {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        (!self.code.is_empty()).then(|| Box::new(self.code) as Box<dyn fmt::Display>)
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(self.severity)
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help.as_ref().map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(self.labels.iter().cloned()))
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn miette::Diagnostic> + 'a>> {
        if self.related.is_empty() {
            return None;
        }
        Some(Box::new(self.related.iter().map(|r| r as &dyn miette::Diagnostic)))
    }
}

fn source_span(s: Span, text: &str) -> SourceSpan {
    let start = (s.start as usize).min(text.len());
    let end = (s.end as usize).clamp(start, text.len());
    SourceSpan::new(start.into(), end - start)
}

fn report(d: &Diagnostic, sources: &Sources) -> Report {
    let primary = d.primary_span().map(|s| s.src).unwrap_or(SourceId::USER);
    let (name, text) = sources.get(primary);
    let mut labels = Vec::new();
    let mut others: Vec<(SourceId, Vec<LabeledSpan>, usize)> = Vec::new();
    for (i, l) in d.labels.iter().enumerate() {
        let (_, t) = sources.get(l.span.src);
        let ls = if i == 0 {
            LabeledSpan::new_primary_with_span(Some(l.message.clone()), source_span(l.span, t))
        } else {
            LabeledSpan::new_with_span(Some(l.message.clone()), source_span(l.span, t))
        };
        if l.span.src == primary {
            labels.push(ls);
            continue;
        }
        // Notes in another source: one snippet per group of nearby lines,
        // so two labels far apart do not print everything between them.
        let line = sources.line_col(l.span).0;
        let near = |(s, v, last): &&mut (SourceId, Vec<LabeledSpan>, usize)| *s == l.span.src && v.len() < 4 && line.abs_diff(*last) <= 2;
        match others.iter_mut().find(|g| near(g)) {
            Some((_, v, last)) => {
                v.push(ls);
                *last = line;
            }
            None => others.push((l.span.src, vec![ls], line)),
        }
    }
    let related = others
        .into_iter()
        .map(|(src, labels, _)| {
            let (n, t) = sources.get(src);
            Report {
                code: "",
                message: format!("note: in {n}"),
                severity: miette::Severity::Advice,
                help: None,
                labels,
                source: NamedSource::new(n, t.clone()),
                related: Vec::new(),
            }
        })
        .collect();
    Report {
        code: d.code,
        message: d.message.clone(),
        severity: match d.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        },
        help: d.help.clone(),
        labels,
        source: NamedSource::new(name, text.clone()),
        related,
    }
}

/// Longest source line (in bytes) shown as a snippet: a label further along
/// a line, as in a compiled plan written as one line of JSON, is named by
/// line and column instead (the snippet would be unreadable, and miette
/// cannot pad past 65,535 columns).
const SNIPPET_LINE_MAX: usize = 2000;

/// Whether a label of `d` sits on a source line too long to show.
fn on_long_line(d: &Diagnostic, sources: &Sources) -> bool {
    d.labels.iter().any(|l| {
        let (_, text) = sources.get(l.span.src);
        let at = (l.span.start as usize).min(text.len());
        let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        end - start > SNIPPET_LINE_MAX
    })
}

/// Renders one diagnostic as text, rustc style.
pub fn human(d: &Diagnostic, sources: &Sources, color: bool) -> String {
    if on_long_line(d, sources) {
        let mut out = format!("{}\n\n  × {}\n", d.code, d.message);
        for l in &d.labels {
            let (name, _) = sources.get(l.span.src);
            let (line, col) = sources.line_col(l.span);
            out.push_str(&format!("   at {name}:{line}:{col}: {}\n", l.message));
        }
        if let Some(h) = &d.help {
            out.push_str(&format!("  help: {h}\n"));
        }
        return out;
    }
    let theme = if color { GraphicalTheme::unicode() } else { GraphicalTheme::unicode_nocolor() };
    let handler = GraphicalReportHandler::new_themed(theme).with_width(100).with_links(false);
    let mut out = String::new();
    if handler.render_report(&mut out, &report(d, sources)).is_err() {
        out = format!("{}: {}\n", d.code, d.message);
    }
    // Related notes are advice-level reports; show them as plain notes.
    out.replace("\nAdvice: \n  ☞ ", "\n  ")
}

#[derive(Serialize)]
pub struct JsonLabel {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub start: u32,
    pub end: u32,
    pub message: String,
}

#[derive(Serialize)]
pub struct JsonDiagnostic {
    pub code: &'static str,
    pub severity: Severity,
    pub message: String,
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub span: JsonSpan,
    pub labels: Vec<JsonLabel>,
    pub help: Option<String>,
}

#[derive(Serialize)]
pub struct JsonSpan {
    pub start: u32,
    pub end: u32,
}

/// One diagnostic in the JSON form editors read.
pub fn json(d: &Diagnostic, sources: &Sources) -> JsonDiagnostic {
    let labels: Vec<JsonLabel> = d
        .labels
        .iter()
        .map(|l| {
            let (line, column) = sources.line_col(l.span);
            JsonLabel { file: sources.get(l.span.src).0.to_string(), line, column, start: l.span.start, end: l.span.end, message: l.message.clone() }
        })
        .collect();
    let primary = d.primary_span().unwrap_or(Span::new(SourceId::USER, 0, 0));
    let (line, column) = sources.line_col(primary);
    JsonDiagnostic {
        code: d.code,
        severity: d.severity,
        message: d.message.clone(),
        file: sources.get(primary.src).0.to_string(),
        line,
        column,
        span: JsonSpan { start: primary.start, end: primary.end },
        labels,
        help: d.help.clone(),
    }
}
