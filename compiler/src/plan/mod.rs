//! Compiled plan files: the document `shardplan compile` writes and
//! `shardplan run OUT.json` reads back. The compiler does no IO: this
//! module takes and returns text and bytes.
//!
//! Input: a [`Document`] (made from the driver's output by
//! [`Document::new`]) to [`encode`]; the bytes of a file to [`parse`] or
//! [`decode`]; a decoded plan and its checked source to [`validate`].
//! Output: the document's JSON text; the [`Document`] read back; or a
//! [`PlanFileError`]: a code, a message, a help line, and where in the JSON
//! the problem lies (a JSON pointer, and its line and column once
//! [`PlanFileError::located`] in the text).
//!
//! The document is `{"format": "shardplan-plan-1", "source": …, "base": …,
//! "plan": …}`: the plan file's text (the model, the data and the training
//! settings are taken from it again), the absolute directory its data paths
//! are relative to (the plan file's, canonicalized when it was compiled), and
//! the partitioned [`Plan`]. Numbers JSON has no notation for (the causal
//! mask's −∞) are written as the strings `"inf"`, `"-inf"` and `"NaN"`
//! (`floats.rs`).
//!
//! Invariants: what [`encode`] writes, [`decode`] reads back as the same
//! plan with the same hash. Reading trusts nothing in the bytes, in order:
//! [`parse`] checks the JSON, the format and every value's type
//! (`plan::json`, with line and column); [`decode`] also the hash of the
//! whole plan against the one recorded when it was compiled (`plan::hash`);
//! [`validate`] every field of the plan against its source and against
//! itself, then the communication verifier (`plan::invalid`, `run::verify`),
//! so that a plan it passes can be run without indexing out of bounds. No
//! function here panics on any input.

mod floats;
mod locate;
mod validate;

pub use validate::validate;

use crate::driver::{Compiled, Target};
use crate::kernel::{BufKind, Program};
use crate::partition::{self, schedule, DeviceProgram, Layout, LayoutAxis, Mesh, Piece, Plan};
use crate::{Diagnostic, SourceId, Span};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `format` of compiled plans this build reads and writes.
pub const FORMAT: &str = "shardplan-plan-1";

/// The help line of a file that cannot be run as it is.
const AGAIN: &str = "compile the plan again with `shardplan compile PLAN -o OUT.json`";

/// The help line of a problem that is the compiler's own.
const BUG: &str = "this is a bug in shardplan; please report it with the plan";

/// A compiled plan file.
#[derive(Clone, Debug, Deserialize)]
pub struct Document {
    /// The plan file's text.
    pub source: String,
    /// The directory the plan's data paths are relative to: the plan file's,
    /// absolute (files written by earlier builds may hold a relative one).
    pub base: String,
    pub plan: Plan,
}

impl Document {
    /// The document of `compiled`, whose source is `source` and whose data
    /// paths are relative to `base`. A target of one device (a plan without
    /// a placement) is written as a plan of one device without a mesh.
    pub fn new(source: String, base: String, compiled: &Compiled) -> Document {
        let plan = match &compiled.target {
            Target::Placed(p) => p.clone(),
            Target::One(program) => one_device(program, compiled.checked.model.params.len()),
        };
        Document { source, base, plan }
    }
}

/// The plan of one device running `program` (no mesh, one microbatch), as
/// the partitioner writes a plan without a placement.
fn one_device(program: &Program, params: usize) -> Plan {
    let pieces = |kind: fn(&BufKind) -> Option<usize>| {
        let mut out: Vec<Piece> = program
            .buffers
            .iter()
            .filter_map(|b| kind(&b.kind).map(|index| Piece { index, global: b.shape.clone(), start: vec![0; b.shape.len()], len: b.shape.clone() }))
            .collect();
        out.sort_by_key(|p| p.index);
        out.dedup_by_key(|p| p.index);
        out
    };
    let device = DeviceProgram {
        device: 0,
        coords: Vec::new(),
        stage: 0,
        program: program.clone(),
        schedule: schedule::passes(None, 0, 1, 1).0,
        slots: 1,
        reports_loss: true,
        data_rank: None,
        params: pieces(|k| if let BufKind::Param(i) = k { Some(*i) } else { None }),
        states: pieces(|k| if let BufKind::State(i) = k { Some(*i) } else { None }),
    };
    let mut plan = Plan {
        mesh: Mesh { axes: Vec::new(), data: None, pipe: None },
        layout_axes: vec![LayoutAxis { name: "microbatch".into(), size: 1, mesh: None }],
        microbatches: 1,
        schedule: None,
        server: None,
        devices: vec![device],
        param_layouts: vec![(0, vec![Layout::Replicated]); params],
        hash: 0,
    };
    plan.hash = partition::plan_hash(&plan);
    plan
}

/// Why a compiled plan cannot be written, read or run.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanFileError {
    /// `plan::json`, `plan::hash`, `plan::invalid`, `run::verify`, or
    /// `compile::internal`.
    pub code: &'static str,
    pub message: String,
    pub help: String,
    /// The value at fault, as a JSON pointer into the document
    /// (`/plan/mesh/data`), when it is one value.
    pub pointer: Option<String>,
    /// Line and column (1-based) in the JSON text, when known.
    pub at: Option<(usize, usize)>,
}

impl PlanFileError {
    fn new(code: &'static str, message: impl Into<String>, help: impl Into<String>) -> PlanFileError {
        PlanFileError { code, message: message.into(), help: help.into(), pointer: None, at: None }
    }

    fn at(mut self, pointer: impl Into<String>) -> PlanFileError {
        self.pointer = Some(pointer.into());
        self
    }

    /// The error with the line and column of its pointer in `text`, the
    /// document's text (unchanged when the pointer names nothing there).
    pub fn located(mut self, text: &[u8]) -> PlanFileError {
        if self.at.is_none() {
            self.at = self.pointer.as_deref().and_then(|p| locate::line_column(text, p));
        }
        self
    }

    /// The error as a diagnostic, labelled at its line and column of `text`
    /// (the document's text, as [`SourceId::USER`]) when it has them.
    pub fn diagnostic(&self, text: &str) -> Diagnostic {
        let mut d = Diagnostic::error(self.code, self.message.clone()).help(self.help.clone());
        if let Some((line, column)) = self.at {
            let start = text.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum::<usize>();
            let rest = text.get(start..).unwrap_or_default();
            let width = rest.find('\n').unwrap_or(rest.len());
            let at = (start + column.saturating_sub(1).min(width)).min(text.len());
            d = d.label(Span::new(SourceId::USER, at, (at + 1).min(start + width).max(at)), "here");
        }
        d
    }
}

impl std::fmt::Display for PlanFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for PlanFileError {}

/// The document as written.
#[derive(Serialize)]
struct DocOut<'a> {
    format: &'a str,
    source: &'a str,
    base: &'a str,
    plan: Value,
}

/// The document's text (pretty-printed JSON, ending in a newline).
pub fn encode(doc: &Document) -> Result<String, PlanFileError> {
    let internal = |e: serde_json::Error| PlanFileError::new("compile::internal", format!("cannot write the plan as JSON: {e}"), BUG);
    let mut value = serde_json::to_value(&doc.plan).map_err(internal)?;
    for (pointer, x) in floats::nonfinite(&doc.plan) {
        if let Some(slot) = value.pointer_mut(&pointer) {
            *slot = Value::String(floats::name(x).to_string());
        }
    }
    let mut text = serde_json::to_string_pretty(&DocOut { format: FORMAT, source: &doc.source, base: &doc.base, plan: value }).map_err(internal)?;
    text.push('\n');
    Ok(text)
}

/// A serde_json error as a `plan::json` problem at its line and column.
fn json_problem(e: serde_json::Error, what: &str) -> PlanFileError {
    let text = e.to_string();
    let message = match text.rsplit_once(" at line ") {
        Some((m, _)) if e.line() > 0 => m.to_string(),
        _ => text,
    };
    let at = (e.line() > 0).then(|| (e.line(), e.column()));
    let place = at.map(|(l, c)| format!(" at line {l}, column {c}")).unwrap_or_default();
    PlanFileError { at, ..PlanFileError::new("plan::json", format!("{what}: {message}{place}"), AGAIN) }
}

/// The document in `bytes`: JSON, of this format, every value of the right
/// type. Its hash is not checked (see [`decode`]).
pub fn parse(bytes: &[u8]) -> Result<Document, PlanFileError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| json_problem(e, "the compiled plan is not valid JSON"))?;
    let Value::Object(fields) = &value else {
        return Err(PlanFileError::new("plan::json", "the file is not a compiled plan: it holds no JSON object", AGAIN));
    };
    match fields.get("format") {
        Some(Value::String(f)) if f == FORMAT => {}
        Some(Value::String(f)) => {
            return Err(PlanFileError::new(
                "plan::json",
                format!("the file's format is `{f}`, not `{FORMAT}`"),
                format!("this build reads `{FORMAT}`; compile the plan again with `shardplan compile PLAN -o OUT.json`"),
            ))
        }
        Some(other) => return Err(PlanFileError::new("plan::json", format!("the file's `format` is {other}, not the string `{FORMAT}`"), AGAIN)),
        None => return Err(PlanFileError::new("plan::json", format!("the file has no `format`, so it is not a compiled plan (`{FORMAT}`)"), AGAIN)),
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let doc = Document::deserialize(floats::De(&mut de)).and_then(|d| de.end().map(|()| d));
    doc.map_err(|e| json_problem(e, "the compiled plan is malformed"))
}

/// The document in `bytes`, as [`parse`] reads it, whose plan hashes to
/// the hash recorded when it was compiled.
pub fn decode(bytes: &[u8]) -> Result<Document, PlanFileError> {
    let doc = parse(bytes)?;
    let hash = partition::plan_hash(&doc.plan);
    if hash != doc.plan.hash {
        return Err(PlanFileError::new(
            "plan::hash",
            format!("the plan file was changed after it was compiled: its plan hashes to {hash:016x}, not {:016x}", doc.plan.hash),
            AGAIN,
        )
        .at("/plan/hash")
        .located(bytes));
    }
    Ok(doc)
}

#[cfg(test)]
mod tests;
