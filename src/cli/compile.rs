//! `shardplan compile FILE -o OUT.json`: the partitioned plan (every device's
//! kernel program and schedule) written as one JSON document, and [`load`],
//! which reads such a document back for `shardplan run OUT.json`.
//!
//! The document is `{"format": "shardplan-plan-1", "source": …, "base": …,
//! "plan": …}`: the plan file's text (the model, the data and the training
//! settings are taken from it again), the directory its data paths are
//! relative to, and the [`Plan`]. Numbers JSON has no notation for (the
//! causal mask's −∞) are written as the strings `"inf"`, `"-inf"` and `"NaN"`.
//!
//! Reading trusts nothing in the file. In order: the JSON and its types
//! (`plan::json`, with line and column), the format, the hash of the device
//! programs against the one recorded at compile time (`plan::hash`), the
//! embedded source (the checker's diagnostics), the programs' structure and
//! their agreement with the source (`plan::invalid`), and the communication
//! verifier (`run::verify`).

use super::check;
use super::render::{self, Sources};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shardplan_compiler::check::Placement;
use shardplan_compiler::graph::Op;
use shardplan_compiler::kernel::{lower, BufKind, Elem, Fused, Inst, StepKind, Unary};
use shardplan_compiler::partition::{self, Plan};
use shardplan_compiler::planner;
use shardplan_compiler::{autodiff, graph, Checked, Diagnostic, SourceId, Span};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The `format` of compiled plans this build reads and writes.
pub const FORMAT: &str = "shardplan-plan-1";

/// A compiled plan read back and checked.
pub struct Compiled {
    pub checked: Checked,
    /// The plan file's text.
    pub source: String,
    /// What diagnostics call the source.
    pub source_name: String,
    /// The directory data paths are relative to.
    pub base: PathBuf,
    pub plan: Plan,
}

/// The document as written.
#[derive(Serialize)]
struct DocOut<'a> {
    format: &'a str,
    source: &'a str,
    base: &'a str,
    plan: Value,
}

/// The document as read.
#[derive(Deserialize)]
struct Doc {
    source: String,
    base: String,
    plan: Plan,
}

/// Why a compiled plan cannot be read or written, as one diagnostic.
struct Problem {
    code: &'static str,
    message: String,
    help: String,
    /// Line and column (1-based) in the JSON text.
    at: Option<(usize, usize)>,
}

fn problem(code: &'static str, message: impl Into<String>, help: impl Into<String>) -> Problem {
    Problem { code, message: message.into(), help: help.into(), at: None }
}

/// Prints a problem, pointing at its line and column of `text` when it has them.
fn report(p: &Problem, name: &str, text: &str, color: bool) {
    let sources = Sources::new(name, text.to_string());
    let mut d = Diagnostic::error(p.code, p.message.clone()).help(p.help.clone());
    if let Some((line, column)) = p.at {
        let start = text.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum::<usize>();
        let rest = text.get(start..).unwrap_or_default();
        let width = rest.find('\n').unwrap_or(rest.len());
        let at = (start + column.saturating_sub(1).min(width)).min(text.len());
        d = d.label(Span::new(SourceId::USER, at, (at + 1).min(start + width).max(at)), "here");
    }
    eprint!("{}", render::human(&d, &sources, color));
}

/// `shardplan compile FILE -o OUT`.
pub fn run(file: &Path, out: &Path, color: bool) -> ExitCode {
    let Some(c) = check::load(file, color) else { return ExitCode::from(1) };
    let source = String::from_utf8_lossy(&std::fs::read(file).unwrap_or_default()).into_owned();
    let name = file.display().to_string();
    let fail = |p: Problem| {
        report(&p, &name, &source, color);
        ExitCode::from(1)
    };
    let bug = "this is a bug in shardplan; please report it with the plan";
    let g = autodiff::differentiate(graph::build(&c), &c);
    if let Err(e) = g.verify() {
        return fail(problem("run::internal", format!("the training graph is malformed: {e}"), bug));
    }
    // `placement auto` compiles to the plan the search chooses.
    let placed = match &c.placement {
        Placement::Auto { .. } => {
            let prof = match super::auto::profile(None) {
                Ok(p) => p,
                Err(e) => return fail(problem("run::device_profile", e, "write one with `shardplan calibrate -o FILE`")),
            };
            let found = planner::search(&c, &g, &prof);
            let Some(i) = found.chosen else {
                return fail(problem(
                    "placement::no_fit",
                    "no placement of the model over these devices fits the memory budget",
                    "`shardplan inspect FILE --explain` lists the closest candidates",
                ));
            };
            let mut placed = c.clone();
            placed.placement = Placement::Explicit(planner::explicit(&c, &found.candidates[i]));
            placed
        }
        _ => c.clone(),
    };
    let plan = match partition::partition(&placed, &g) {
        Ok(p) => p,
        Err(e) => {
            return fail(problem("run::placement", format!("cannot partition the plan: {e}"), "change the placement; `shardplan check` shows what it holds"))
        }
    };
    if let Err(e) = partition::verify::verify(&plan) {
        return fail(problem("run::verify", format!("the device programs do not fit together: {e}"), bug));
    }
    if let Some(d) = partition::memory::check(&c, &plan) {
        eprint!("{}", super::render::human(&d, &super::render::Sources::new(&name, source.clone()), color));
        return ExitCode::from(1);
    }
    let base = match file.parent().map(|p| p.to_string_lossy().into_owned()) {
        Some(p) if !p.is_empty() => p,
        _ => ".".to_string(),
    };
    let text = match encode(&source, &base, &plan) {
        Ok(t) => t,
        Err(e) => return fail(problem("run::internal", format!("cannot write the plan as JSON: {e}"), bug)),
    };
    // What is written must read back as the same programs.
    match parse(text.as_bytes()) {
        Ok(doc) if partition::plan_hash(&doc.plan) == plan.hash && doc.plan.hash == plan.hash => {}
        Ok(_) => return fail(problem("run::internal", "the compiled plan does not read back as the same programs", bug)),
        Err(p) => return fail(problem("run::internal", format!("the compiled plan does not read back: {}", p.message), bug)),
    }
    if let Err(e) = write_atomically(out, text.as_bytes()) {
        return fail(problem("compile::write", format!("cannot write `{}`: {e}", out.display()), "check that the output's directory exists and is writable"));
    }
    let n = plan.devices.len();
    println!("{}: {n} device{}, {:016x}", out.display(), if n == 1 { "" } else { "s" }, plan.hash);
    ExitCode::SUCCESS
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames
/// it into place: `path` holds the old contents or all of the new ones.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let Some(name) = path.file_name() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"));
    };
    let tmp = path.with_file_name(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // Make the rename itself durable where directories can be synced.
    if let Some(dir) = path.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The document's text.
fn encode(source: &str, base: &str, plan: &Plan) -> Result<String, serde_json::Error> {
    let mut value = serde_json::to_value(plan)?;
    for (pointer, x) in nonfinite(plan) {
        if let Some(slot) = value.pointer_mut(&pointer) {
            *slot = Value::String(float_name(x).to_string());
        }
    }
    let mut text = serde_json::to_string_pretty(&DocOut { format: FORMAT, source, base, plan: value })?;
    text.push('\n');
    Ok(text)
}

fn float_name(x: f64) -> &'static str {
    if x.is_nan() {
        "NaN"
    } else if x > 0.0 {
        "inf"
    } else {
        "-inf"
    }
}

/// Where the plan's JSON holds numbers that are not finite (serde_json
/// writes them as `null`), as JSON pointers, with their values.
fn nonfinite(plan: &Plan) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut add = |at: String, x: f64| {
        if !x.is_finite() {
            out.push((at, x));
        }
    };
    for (i, d) in plan.devices.iter().enumerate() {
        let p = format!("/devices/{i}/program");
        for (k, b) in d.program.buffers.iter().enumerate() {
            if let BufKind::Const(x) = b.kind {
                add(format!("{p}/buffers/{k}/kind/Const"), x);
            }
        }
        for (j, s) in d.program.steps.iter().enumerate() {
            let at = format!("{p}/steps/{j}/kind");
            match &s.kind {
                StepKind::Op(op) => op_floats(op, &format!("{at}/Op"), &mut add),
                StepKind::Fused(f) => fused_floats(f, &format!("{at}/Fused"), &mut add),
                StepKind::Reduce { op, epilogue } => {
                    op_floats(op, &format!("{at}/Reduce/op"), &mut add);
                    fused_floats(epilogue, &format!("{at}/Reduce/epilogue"), &mut add);
                }
                StepKind::Broadcast | StepKind::MatMul { .. } => {}
            }
        }
    }
    out
}

fn op_floats(op: &Op, at: &str, add: &mut impl FnMut(String, f64)) {
    match op {
        Op::Const(x) => add(format!("{at}/Const"), *x),
        Op::ClipScale { max_norm } => add(format!("{at}/ClipScale/max_norm"), *max_norm),
        Op::LayerNorm { eps } => add(format!("{at}/LayerNorm/eps"), *eps),
        Op::LayerNormGradX { eps } => add(format!("{at}/LayerNormGradX/eps"), *eps),
        Op::LayerNormGradGamma { eps } => add(format!("{at}/LayerNormGradGamma/eps"), *eps),
        Op::CausalMask { fill } => add(format!("{at}/CausalMask/fill"), *fill),
        _ => {}
    }
}

fn fused_floats(f: &Fused, at: &str, add: &mut impl FnMut(String, f64)) {
    for (m, inst) in f.body.iter().enumerate() {
        match inst {
            Inst::Const(x) => add(format!("{at}/body/{m}/Const"), *x),
            Inst::Unary(Unary::ClipScale(x), _) => add(format!("{at}/body/{m}/Unary/0/ClipScale"), *x),
            _ => {}
        }
    }
}

/// A serde_json error as a `plan::json` problem at its line and column.
fn json_problem(e: serde_json::Error, what: &str) -> Problem {
    let text = e.to_string();
    let message = match text.rsplit_once(" at line ") {
        Some((m, _)) if e.line() > 0 => m.to_string(),
        _ => text,
    };
    let at = (e.line() > 0).then(|| (e.line(), e.column()));
    let place = at.map(|(l, c)| format!(" at line {l}, column {c}")).unwrap_or_default();
    Problem {
        code: "plan::json",
        message: format!("{what}: {message}{place}"),
        help: "compile the plan again with `shardplan compile PLAN -o OUT.json`".into(),
        at,
    }
}

/// The document in `bytes`: JSON, of this format, of the right types.
fn parse(bytes: &[u8]) -> Result<Doc, Problem> {
    let again = "compile the plan again with `shardplan compile PLAN -o OUT.json`";
    let value: Value = serde_json::from_slice(bytes).map_err(|e| json_problem(e, "the compiled plan is not valid JSON"))?;
    let Value::Object(fields) = &value else {
        return Err(problem("plan::json", "the file is not a compiled plan: it holds no JSON object", again));
    };
    match fields.get("format") {
        Some(Value::String(f)) if f == FORMAT => {}
        Some(Value::String(f)) => {
            return Err(problem(
                "plan::json",
                format!("the file's format is `{f}`, not `{FORMAT}`"),
                format!("this build reads `{FORMAT}`; compile the plan again with `shardplan compile PLAN -o OUT.json`"),
            ))
        }
        Some(other) => return Err(problem("plan::json", format!("the file's `format` is {other}, not the string `{FORMAT}`"), again)),
        None => return Err(problem("plan::json", format!("the file has no `format`, so it is not a compiled plan (`{FORMAT}`)"), again)),
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let doc = Doc::deserialize(floats::De(&mut de)).and_then(|d| de.end().map(|()| d));
    doc.map_err(|e| json_problem(e, "the compiled plan is malformed"))
}

/// Reads, checks and prints the diagnostics of the compiled plan at `path`.
/// Returns it when it can be run.
pub fn load(path: &Path, color: bool) -> Option<Compiled> {
    let name = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            let d = Diagnostic::error("io::read", format!("cannot read `{name}`: {e}"))
                .label(Span::new(SourceId::USER, 0, 0), "could not be read")
                .help("check the path and its permissions");
            eprint!("{}", render::human(&d, &Sources::new(&name, String::new()), color));
            return None;
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    let fail = |p: Problem| {
        report(&p, &name, &text, color);
        None
    };
    let doc = match parse(&bytes) {
        Ok(d) => d,
        Err(p) => return fail(p),
    };
    let again = "compile the plan again with `shardplan compile PLAN -o OUT.json`";
    let hash = partition::plan_hash(&doc.plan);
    if hash != doc.plan.hash {
        return fail(problem(
            "plan::hash",
            format!("the plan file was changed after it was compiled: its programs hash to {hash:016x}, not {:016x}", doc.plan.hash),
            again,
        ));
    }

    // The model, data and training settings, from the embedded source.
    let source_name = format!("{name} (source)");
    let (checked, diags) = shardplan_compiler::check_source(doc.source.as_bytes());
    let sources = Sources::new(&source_name, doc.source.clone());
    for d in diags.iter() {
        eprint!("{}", render::human(d, &sources, color));
        eprintln!();
    }
    let errors = diags.error_count();
    let c = match checked {
        Some(c) if errors == 0 => c,
        _ => {
            let errors = errors.max(1);
            eprintln!("{source_name}: {errors} error{}", if errors == 1 { "" } else { "s" });
            return None;
        }
    };

    let g = autodiff::differentiate(graph::build(&c), &c);
    if let Err(e) = check_plan(&doc.plan, &c, &g) {
        return fail(problem("plan::invalid", format!("the compiled plan is invalid: {e}"), again));
    }
    if let Err(e) = partition::verify::verify(&doc.plan) {
        return fail(problem("run::verify", format!("the device programs do not fit together: {e}"), again));
    }
    let base = if doc.base.is_empty() { PathBuf::from(".") } else { PathBuf::from(&doc.base) };
    Some(Compiled { checked: c, source: doc.source, source_name, base, plan: doc.plan })
}

fn shape(ty: &shardplan_compiler::check::Ty) -> Vec<usize> {
    ty.shape.iter().map(|d| d.size.max(0) as usize).collect()
}

/// What the runtime relies on beyond each program's own structure: the mesh,
/// microbatches and devices the source's placement gives, schedules within
/// their buffer sets, parameter pieces within their tensors and held by
/// buffers of their size, and memory in proportion to the model's.
fn check_plan(plan: &Plan, c: &Checked, g: &graph::Graph) -> Result<(), String> {
    let (axes, data, pipe, server, microbatches): (Vec<(String, usize)>, _, _, _, usize) = match &c.placement {
        Placement::Single => (Vec::new(), None, None, None, 1),
        Placement::Explicit(e) => (
            e.mesh.iter().map(|(n, s)| (n.clone(), (*s).max(1) as usize)).collect(),
            e.data_axis,
            e.pipeline.as_ref().map(|p| p.axis),
            e.parameter_server,
            e.pipeline.as_ref().map(|p| p.microbatches.max(1) as usize).unwrap_or(1),
        ),
        // The search chose the mesh: take the plan's, on as many devices as the source declares.
        Placement::Auto { .. } => (plan.mesh.axes.clone(), plan.mesh.data, plan.mesh.pipe, None, plan.microbatches),
    };
    let m = &plan.mesh;
    if m.axes != axes || m.data != data || m.pipe != pipe || plan.server != server {
        return Err(format!("its mesh {:?} is not the one its source's placement declares, {axes:?}", m.axes));
    }
    if plan.microbatches != microbatches {
        return Err(format!("it has {} microbatches, its source {microbatches}", plan.microbatches));
    }
    let mesh_size = axes.iter().try_fold(1usize, |n, a| n.checked_mul(a.1)).ok_or("its mesh is too large")?;
    let devices = c.devices.len().max(1).max(mesh_size);
    if plan.devices.len() != devices {
        return Err(format!("it has programs for {} devices, its source {devices}", plan.devices.len()));
    }
    let params: Vec<Vec<usize>> = c.model.params.iter().map(|p| shape(&p.ty)).collect();
    let states: Vec<Vec<usize>> = g.states.iter().map(|s| shape(&s.ty)).collect();
    // Memory: a device's part of the step (each buffer set of microbatches in
    // flight included) never needs many times what the whole step needs on one device.
    let whole = bytes(&lower(g), 1).unwrap_or(u64::MAX);
    for (i, d) in plan.devices.iter().enumerate() {
        let at = |m: String| format!("device {i}: {m}");
        if d.device != i {
            return Err(at(format!("its program is numbered {}", d.device)));
        }
        if !d.coords.is_empty() && (d.coords.len() != axes.len() || d.coords.iter().zip(&axes).any(|(x, a)| *x >= a.1)) {
            return Err(at(format!("its mesh coordinates {:?} lie outside the mesh", d.coords)));
        }
        if let (Some(a), Some(r)) = (data, d.data_rank) {
            if r >= axes[a].1 {
                return Err(at(format!("it is data-parallel rank {r} of {}", axes[a].1)));
            }
        }
        if d.slots == 0 || d.slots > microbatches {
            return Err(at(format!("it has {} buffer sets for {microbatches} microbatches", d.slots)));
        }
        for (k, ins) in d.schedule.iter().enumerate() {
            if ins.slot >= d.slots || ins.mb >= microbatches {
                return Err(at(format!(
                    "pass {k} of its schedule runs microbatch {} in buffer set {}, of {microbatches} microbatches and {} buffer sets",
                    ins.mb, ins.slot, d.slots
                )));
            }
        }
        d.program.validate().map_err(|e| at(e.to_string()))?;
        let limit = whole.saturating_mul(MEMORY_FACTOR.saturating_mul(d.slots as u64 + 1)).saturating_add(MEMORY_SLACK);
        match bytes(&d.program, d.slots) {
            Some(b) if b <= limit => {}
            b => {
                let need = b.map(check::bytes).unwrap_or_else(|| "more memory than can be counted".into());
                return Err(at(format!("its buffers need {need}, far more than its part of a step that needs {} on one device", check::bytes(whole))));
            }
        }
        for (what, pieces, shapes) in [("parameter", &d.params, &params), ("optimizer state", &d.states, &states)] {
            for p in pieces.iter() {
                let Some(global) = shapes.get(p.index) else {
                    return Err(at(format!("it holds {what} {}, of {}", p.index, shapes.len())));
                };
                let inside = p.start.len() == global.len()
                    && p.len.len() == global.len()
                    && (0..global.len()).all(|k| p.start[k].checked_add(p.len[k]).is_some_and(|end| end <= global[k]));
                if p.global != *global || !inside {
                    return Err(at(format!(
                        "its piece of {what} {} (from {:?}, {:?} long, of {:?}) does not lie within the tensor, {global:?}",
                        p.index, p.start, p.len, p.global
                    )));
                }
                let kind = if what == "parameter" { BufKind::Param(p.index) } else { BufKind::State(p.index) };
                let values: usize = p.len.iter().product();
                match d.program.buffers.iter().find(|b| b.kind == kind) {
                    Some(b) if b.elem == Elem::F32 && b.len() == values => {}
                    _ => return Err(at(format!("its piece of {what} {} has {values} values, but no buffer of its program holds them", p.index))),
                }
            }
        }
    }
    Ok(())
}

/// The bytes of a (valid) program's buffers with `sets` sets of the buffers
/// that microbatches in flight keep apart, as the executor allocates them.
fn bytes(p: &shardplan_compiler::kernel::Program, sets: usize) -> Option<u64> {
    let mut banked: Vec<bool> = p.buffers.iter().map(|b| matches!(b.kind, BufKind::Input(_))).collect();
    for s in &p.steps {
        let o = p.storage(s.output).0 as usize;
        if s.role != shardplan_compiler::graph::Role::Update && p.buffers[o].kind == BufKind::Temp {
            banked[o] = true;
        }
    }
    p.buffers.iter().zip(&banked).filter(|(b, _)| !matches!(b.kind, BufKind::Alias(_))).try_fold(0u64, |acc, (b, &k)| {
        let copies = if k { sets.max(1) as u64 } else { 1 };
        acc.checked_add((b.len() as u64).checked_mul(4)?.checked_mul(copies)?)
    })
}

/// A device's buffers may need up to this many times the bytes of the whole
/// training step on one device per buffer set (plus one), plus
/// [`MEMORY_SLACK`]: far more than any partition needs (at most about 1.5
/// times per set in the examples and tests), far less than a size that
/// cannot be allocated.
const MEMORY_FACTOR: u64 = 4;
const MEMORY_SLACK: u64 = 1 << 28;

/// A deserializer that also takes the strings `"inf"`, `"-inf"` and `"NaN"`
/// where a float is expected, and is otherwise the one it wraps (errors keep
/// their line and column).
mod floats {
    use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
    use std::fmt;

    pub struct De<D>(pub D);
    struct Vis<V>(V);
    struct FloatVis<V>(V);
    struct Seed<S>(S);
    struct Seq<A>(A);
    struct Map<A>(A);
    struct Enum<A>(A);
    struct Variant<A>(A);

    macro_rules! forward_deserialize {
        ($($method:ident),*) => {$(
            fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
                self.0.$method(Vis(v))
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for De<D> {
        type Error = D::Error;

        forward_deserialize!(
            deserialize_any,
            deserialize_bool,
            deserialize_i8,
            deserialize_i16,
            deserialize_i32,
            deserialize_i64,
            deserialize_i128,
            deserialize_u8,
            deserialize_u16,
            deserialize_u32,
            deserialize_u64,
            deserialize_u128,
            deserialize_char,
            deserialize_str,
            deserialize_string,
            deserialize_bytes,
            deserialize_byte_buf,
            deserialize_option,
            deserialize_unit,
            deserialize_seq,
            deserialize_map,
            deserialize_identifier,
            deserialize_ignored_any
        );

        fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_any(FloatVis(v))
        }

        fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_any(FloatVis(v))
        }

        fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_unit_struct(name, Vis(v))
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(self, name: &'static str, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_newtype_struct(name, Vis(v))
        }

        fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_tuple(len, Vis(v))
        }

        fn deserialize_tuple_struct<V: Visitor<'de>>(self, name: &'static str, len: usize, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_tuple_struct(name, len, Vis(v))
        }

        fn deserialize_struct<V: Visitor<'de>>(self, name: &'static str, fields: &'static [&'static str], v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_struct(name, fields, Vis(v))
        }

        fn deserialize_enum<V: Visitor<'de>>(self, name: &'static str, variants: &'static [&'static str], v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_enum(name, variants, Vis(v))
        }

        fn is_human_readable(&self) -> bool {
            self.0.is_human_readable()
        }
    }

    macro_rules! forward_visit {
        ($($method:ident: $ty:ty),*) => {$(
            fn $method<E: de::Error>(self, x: $ty) -> Result<V::Value, E> {
                self.0.$method(x)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Vis<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.expecting(f)
        }

        forward_visit!(
            visit_bool: bool,
            visit_i8: i8,
            visit_i16: i16,
            visit_i32: i32,
            visit_i64: i64,
            visit_i128: i128,
            visit_u8: u8,
            visit_u16: u16,
            visit_u32: u32,
            visit_u64: u64,
            visit_u128: u128,
            visit_f32: f32,
            visit_f64: f64,
            visit_char: char,
            visit_str: &str,
            visit_borrowed_str: &'de str,
            visit_string: String,
            visit_bytes: &[u8],
            visit_borrowed_bytes: &'de [u8],
            visit_byte_buf: Vec<u8>
        );

        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.0.visit_none()
        }

        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.0.visit_unit()
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.0.visit_some(De(d))
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.0.visit_newtype_struct(De(d))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
            self.0.visit_seq(Seq(a))
        }

        fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
            self.0.visit_map(Map(a))
        }

        fn visit_enum<A: EnumAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
            self.0.visit_enum(Enum(a))
        }
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for FloatVis<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.expecting(f)
        }

        forward_visit!(visit_i64: i64, visit_u64: u64, visit_f64: f64);

        fn visit_str<E: de::Error>(self, s: &str) -> Result<V::Value, E> {
            match s {
                "inf" => self.0.visit_f64(f64::INFINITY),
                "-inf" => self.0.visit_f64(f64::NEG_INFINITY),
                "NaN" => self.0.visit_f64(f64::NAN),
                _ => Err(E::invalid_type(de::Unexpected::Str(s), &self)),
            }
        }
    }

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
        type Value = S::Value;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
            self.0.deserialize(De(d))
        }
    }

    impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<A> {
        type Error = A::Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
            self.0.next_element_seed(Seed(seed))
        }

        fn size_hint(&self) -> Option<usize> {
            self.0.size_hint()
        }
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
            self.0.next_key_seed(Seed(seed))
        }

        fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
            self.0.next_value_seed(Seed(seed))
        }

        fn size_hint(&self) -> Option<usize> {
            self.0.size_hint()
        }
    }

    impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
        type Error = A::Error;
        type Variant = Variant<A::Variant>;

        fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
            self.0.variant_seed(Seed(seed)).map(|(v, a)| (v, Variant(a)))
        }
    }

    impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<A> {
        type Error = A::Error;

        fn unit_variant(self) -> Result<(), A::Error> {
            self.0.unit_variant()
        }

        fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
            self.0.newtype_variant_seed(Seed(seed))
        }

        fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, A::Error> {
            self.0.tuple_variant(len, Vis(v))
        }

        fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], v: V) -> Result<V::Value, A::Error> {
            self.0.struct_variant(fields, Vis(v))
        }
    }
}
