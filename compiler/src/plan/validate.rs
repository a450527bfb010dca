//! Validation of a compiled plan read back from a file: a verifier of every
//! field of the [`Plan`], against the plan's source and against itself.
//!
//! Input: a decoded [`Plan`] (whose values have their types and nothing
//! more) and the [`Checked`] plan of its embedded source. Output: `Ok`, or
//! the first problem found: `plan::invalid`, naming the value at fault by
//! its JSON pointer in the document, or `run::verify` when the programs do
//! not fit together.
//!
//! What is checked, in order:
//! - the mesh: the data and pipeline axes are axes of the mesh; the axes, the data and pipeline axes and the parameter server
//!   are the ones the source's placement declares (for `placement auto`,
//!   the planner's: axes `data`, `model` and `pipe` in that order, each of
//!   more than one device, on exactly the devices the source declares, the
//!   data and pipeline axes the ones so named);
//! - the microbatches (those of the source's pipeline, at most the rows of
//!   a batch, dividing every data-parallel rank's rows), the pipeline
//!   schedule, the number of devices, the layout axes (the mesh's axes but
//!   the pipeline's, then the microbatches) and every parameter's stage and
//!   layout;
//! - every device: its number, mesh coordinates, stage, data-parallel rank,
//!   buffer sets and schedule (exactly those its place in the mesh gives),
//!   whether it reports the loss (one device per data-parallel rank), its
//!   program's structure ([`Program::validate`]) and the ids its buffers
//!   hold, its memory (within [`MEMORY_FACTOR`] times the whole step's on
//!   one device), and its pieces of the parameters and optimizer states
//!   (within their tensors, held by buffers of their size, one per buffer);
//! - then the communication verifier over every program.
//!
//! Invariants: no value of the plan is used as an index, a size or a loop
//! bound before it is checked, and arithmetic on them is checked, so that
//! no plan, however hostile, makes validation panic; a plan that passes
//! can be run without indexing out of bounds. Every plan the partitioner
//! makes passes.

use super::{PlanFileError, AGAIN, BUG};
use crate::check::{Checked, Placement, Schedule};
use crate::driver::{self, Options, Target};
use crate::graph::Graph;
use crate::kernel::{BufKind, Elem, Program};
use crate::partition::schedule::passes;
use crate::partition::{self, chunk_range, Layout, Phase, Plan};
use crate::units::Bytes;

/// A device's buffers may need up to this many times the bytes of the whole
/// training step on one device per buffer set (plus one), plus
/// [`MEMORY_SLACK`]: far more than any partition needs (at most about 1.5
/// times per set in the examples and tests), far less than a size that
/// cannot be allocated.
pub const MEMORY_FACTOR: u64 = 4;
const MEMORY_SLACK: u64 = 1 << 28;

/// A problem: the JSON pointer of the value at fault within the plan, and
/// what is wrong with it.
type Invalid = (String, String);

fn bad<T>(pointer: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err((pointer.into(), message.into()))
}

/// Checks every field of `plan` against its source `c` and itself, then
/// runs the communication verifier.
pub fn validate(plan: &Plan, c: &Checked) -> Result<(), PlanFileError> {
    // The whole training step on one device: the graph the plan partitions,
    // and the memory the plan's devices are measured against.
    let reference = driver::compile(c, &Options { single_device: true, ..Options::default() }).map_err(|d| {
        let why = d.iter().next().map(|d| d.message.clone()).unwrap_or_default();
        PlanFileError::new("compile::internal", format!("the plan's source does not compile for one device: {why}"), BUG)
    })?;
    let Target::One(whole) = &reference.target else {
        return Err(PlanFileError::new("compile::internal", "the plan's source does not compile to one device's program", BUG));
    };
    fields(plan, c, &reference.graph, whole)
        .map_err(|(pointer, m)| PlanFileError::new("plan::invalid", format!("the compiled plan is invalid: {m}"), AGAIN).at(format!("/plan{pointer}")))?;
    partition::verify::verify(plan).map_err(|e| PlanFileError::new("run::verify", format!("the device programs do not fit together: {e}"), AGAIN))
}

/// What the source (and, for `placement auto`, the planner's conventions)
/// gives the plan.
struct Expected {
    axes: Vec<(String, usize)>,
    data: Option<usize>,
    pipe: Option<usize>,
    server: Option<usize>,
    microbatches: usize,
    schedule: Option<Schedule>,
    stages: usize,
}

/// `axes` as the placement syntax writes a mesh: `(data: 2, pipe: 2)`.
fn show(axes: &[(String, usize)]) -> String {
    let parts: Vec<String> = axes.iter().map(|(n, s)| format!("{n}: {s}")).collect();
    format!("({})", parts.join(", "))
}

/// Axis `a` of `axes`, by index and name.
fn axis(axes: &[(String, usize)], a: Option<usize>) -> String {
    match a {
        None => "none".into(),
        Some(a) => match axes.get(a) {
            Some((name, _)) => format!("axis {a} (`{name}`)"),
            None => format!("axis {a}"),
        },
    }
}

fn expected(plan: &Plan, c: &Checked, devices: usize) -> Result<Expected, Invalid> {
    Ok(match &c.placement {
        Placement::Single => Expected { axes: Vec::new(), data: None, pipe: None, server: None, microbatches: 1, schedule: None, stages: 1 },
        Placement::Explicit(e) => Expected {
            axes: e.mesh.iter().map(|(n, s)| (n.clone(), (*s).max(1) as usize)).collect(),
            data: e.data_axis,
            pipe: e.pipeline.as_ref().map(|p| p.axis),
            server: e.parameter_server,
            microbatches: e.pipeline.as_ref().map_or(1, |p| p.microbatches.max(1) as usize),
            schedule: e.pipeline.as_ref().map(|p| p.schedule),
            stages: e.pipeline.as_ref().map_or(1, |p| p.stages.len().max(1)),
        },
        Placement::Auto { .. } => planned(plan, devices)?,
    })
}

/// The mesh of `placement auto` is the plan's own; it must be one the
/// planner makes (see `planner::explicit`) on all `devices`.
fn planned(plan: &Plan, devices: usize) -> Result<Expected, Invalid> {
    const NAMES: [&str; 3] = ["data", "model", "pipe"];
    let axes = &plan.mesh.axes;
    let order: Option<Vec<usize>> = axes.iter().map(|(n, _)| NAMES.iter().position(|x| x == n)).collect();
    let ordered = order.is_some_and(|o| o.windows(2).all(|w| w[0] < w[1]));
    let sizes = axes.iter().all(|a| a.1 > 1) || (axes.len() == 1 && axes[0] == ("data".to_string(), 1));
    if axes.is_empty() || !ordered || !sizes {
        return bad(
            "/mesh/axes",
            format!(
                "its mesh {} is not one `placement auto` chooses: axes `data`, `model` and `pipe`, in that order, each of more than one device",
                show(axes)
            ),
        );
    }
    let size = axes.iter().try_fold(1usize, |n, a| n.checked_mul(a.1));
    if size != Some(devices) {
        let size = size.map(|s| s.to_string()).unwrap_or_else(|| "too many".into());
        return bad("/mesh/axes", format!("its mesh {} has {size} devices, but its source declares {devices}", show(axes)));
    }
    let named = |name: &str| axes.iter().position(|a| a.0 == name && a.1 > 1);
    let pipe = named("pipe");
    let (microbatches, schedule, stages) = match pipe {
        None => (1, None, 1),
        Some(p) => {
            let schedule = match plan.schedule.as_deref() {
                Some("gpipe") => Schedule::GPipe,
                Some("1f1b") => Schedule::OneFOneB,
                other => return bad("/schedule", format!("its pipeline schedule is {other:?}, not `gpipe` or `1f1b`")),
            };
            (plan.microbatches, Some(schedule), axes[p].1)
        }
    };
    Ok(Expected { axes: axes.clone(), data: named("data"), pipe, server: None, microbatches, schedule, stages })
}

/// The mesh coordinates of device `dev` (row-major; every size at least 1).
fn coords(axes: &[(String, usize)], dev: usize) -> Vec<usize> {
    let mut c = vec![0; axes.len()];
    let mut rest = dev;
    for (i, (_, n)) in axes.iter().enumerate().rev() {
        let n = (*n).max(1);
        c[i] = rest % n;
        rest /= n;
    }
    c
}

fn shape(ty: &crate::check::Ty) -> Vec<usize> {
    ty.shape.iter().map(|d| d.size.max(0) as usize).collect()
}

fn fields(plan: &Plan, c: &Checked, g: &Graph, whole: &Program) -> Result<(), Invalid> {
    let m = &plan.mesh;
    let n = m.axes.len();
    // The plan's own mesh first, so that nothing below indexes it out of range.
    for (what, field, a) in [("data", "/mesh/data", m.data), ("pipeline", "/mesh/pipe", m.pipe)] {
        if let Some(a) = a.filter(|&a| a >= n) {
            return bad(field, format!("its {what} axis is axis {a}, but its mesh {} has {n} ax{}", show(&m.axes), if n == 1 { "is" } else { "es" }));
        }
    }
    let declared = c.devices.len().max(1);
    let want = expected(plan, c, declared)?;
    if m.axes != want.axes {
        return bad("/mesh/axes", format!("its mesh {:?} is not the one its source's placement declares, {:?}", m.axes, want.axes));
    }
    for (what, field, have, should) in [("data", "/mesh/data", m.data, want.data), ("pipeline", "/mesh/pipe", m.pipe, want.pipe)] {
        if have != should {
            return bad(field, format!("its {what} axis is {}, but its source's placement's is {}", axis(&m.axes, have), axis(&m.axes, should)));
        }
    }
    if plan.server != want.server {
        return bad("/server", format!("its parameter server is device {:?}, its source's {:?}", plan.server, want.server));
    }
    if plan.microbatches != want.microbatches {
        return bad("/microbatches", format!("it has {} microbatches, its source {}", plan.microbatches, want.microbatches));
    }
    let batch = c.train.batch.max(1) as usize;
    if plan.microbatches == 0 || plan.microbatches > batch {
        return bad("/microbatches", format!("it has {} microbatches, for a batch of {batch} rows", plan.microbatches));
    }
    let microbatches = plan.microbatches;
    if plan.schedule.as_deref() != want.schedule.map(Schedule::name) {
        return bad("/schedule", format!("its pipeline schedule is {:?}, its source's {:?}", plan.schedule, want.schedule.map(Schedule::name)));
    }
    let mesh_size = m.axes.iter().try_fold(1usize, |k, a| k.checked_mul(a.1)).ok_or_else(|| ("/mesh/axes".to_string(), "its mesh is too large".to_string()))?;
    if mesh_size > declared {
        return bad("/mesh/axes", format!("its mesh {} has {mesh_size} devices, but its source declares {declared}", show(&m.axes)));
    }
    let devices = declared;
    if plan.devices.len() != devices {
        return bad("/devices", format!("it has programs for {} devices, its source {devices}", plan.devices.len()));
    }
    if let Some(s) = plan.server.filter(|&s| s >= devices) {
        return bad("/server", format!("its parameter server is device {s}, of {devices}"));
    }

    // Layouts are given along the mesh's axes but the pipeline's, then the microbatches.
    let mut layout: Vec<(String, usize, Option<usize>)> =
        m.axes.iter().enumerate().filter(|(i, _)| Some(*i) != m.pipe).map(|(i, (name, size))| (name.clone(), *size, Some(i))).collect();
    layout.push(("microbatch".into(), microbatches, None));
    let have: Vec<(String, usize, Option<usize>)> = plan.layout_axes.iter().map(|a| (a.name.clone(), a.size, a.mesh)).collect();
    if have != layout {
        let list = |l: &[(String, usize, Option<usize>)]| l.iter().map(|(n, s, _)| format!("{n} {s}")).collect::<Vec<_>>().join(", ");
        return bad("/layout_axes", format!("its layout axes ({}) are not its mesh's and microbatches' ({})", list(&have), list(&layout)));
    }
    let mb_axis = layout.len() - 1;
    let data_axis = m.data.and_then(|d| layout.iter().position(|a| a.2 == Some(d)));
    let ranks = data_axis.map_or(1, |d| layout[d].1);
    if data_axis.is_some() {
        for r in 0..ranks {
            let rows = chunk_range(batch, ranks, r).len();
            if !rows.is_multiple_of(microbatches) {
                return bad(
                    "/microbatches",
                    format!("data-parallel rank {r} gets {rows} of the batch's {batch} rows, which {microbatches} microbatches do not divide"),
                );
            }
        }
    }

    let params: Vec<Vec<usize>> = c.model.params.iter().map(|p| shape(&p.ty)).collect();
    let states: Vec<Vec<usize>> = g.states.iter().map(|s| shape(&s.ty)).collect();
    if plan.param_layouts.len() != params.len() {
        return bad("/param_layouts", format!("it lays out {} parameters, its source has {}", plan.param_layouts.len(), params.len()));
    }
    for (i, ((stage, ls), global)) in plan.param_layouts.iter().zip(&params).enumerate() {
        if *stage >= want.stages {
            return bad(format!("/param_layouts/{i}/0"), format!("parameter {i} is on stage {stage}, of {}", want.stages));
        }
        if ls.len() != layout.len() {
            return bad(format!("/param_layouts/{i}/1"), format!("parameter {i} has layouts along {} axes, not {}", ls.len(), layout.len()));
        }
        for (a, l) in ls.iter().enumerate() {
            let fits = match *l {
                Layout::Replicated => true,
                Layout::Split(d, u) => a != mb_axis && d < global.len() && u >= 1,
                Layout::Partial => false,
            };
            if !fits {
                return bad(format!("/param_layouts/{i}/1/{a}"), format!("parameter {i}, of shape {global:?}, is {l} along `{}`", layout[a].0));
            }
        }
    }

    // Memory: a device's part of the step (each buffer set of microbatches in
    // flight included) never needs many times what the whole step needs on one device.
    let whole = bytes(whole, 1).unwrap_or(u64::MAX);
    let inputs = c.model.inputs.len();
    let mut reporters = vec![0usize; ranks];
    for (i, d) in plan.devices.iter().enumerate() {
        let field = |f: &str| format!("/devices/{i}{f}");
        let at = |m: String| format!("device {i}: {m}");
        if d.device != i {
            return bad(field("/device"), at(format!("its program is numbered {}", d.device)));
        }
        // Devices past the mesh are parameter servers outside it.
        let worker = i < mesh_size;
        let place = if worker { coords(&m.axes, i) } else { Vec::new() };
        if d.coords != place {
            return bad(field("/coords"), at(format!("its mesh coordinates are {:?}, not {place:?}", d.coords)));
        }
        let stage = m.pipe.and_then(|p| place.get(p).copied()).unwrap_or(0);
        if d.stage != stage {
            return bad(field("/stage"), at(format!("it is on stage {}, not {stage}", d.stage)));
        }
        if stage >= want.stages {
            return bad(field("/stage"), at(format!("it is on stage {stage}, of {}", want.stages)));
        }
        let rank = if worker { data_axis.and(m.data).and_then(|a| place.get(a).copied()) } else { None };
        if d.data_rank != rank {
            return bad(field("/data_rank"), at(format!("it is data-parallel rank {:?}, not {rank:?}", d.data_rank)));
        }
        if d.slots == 0 || d.slots > microbatches {
            return bad(field("/slots"), at(format!("it has {} buffer sets for {microbatches} microbatches", d.slots)));
        }
        for (k, ins) in d.schedule.iter().enumerate() {
            if ins.slot >= d.slots || ins.mb >= microbatches {
                return bad(
                    field(&format!("/schedule/{k}")),
                    at(format!(
                        "pass {k} of its schedule runs microbatch {} in buffer set {}, of {microbatches} microbatches and {} buffer sets",
                        ins.mb, ins.slot, d.slots
                    )),
                );
            }
        }
        let (schedule, slots) = if worker {
            passes(want.schedule, stage, want.stages, microbatches)
        } else {
            let (s, k) = passes(None, 0, 1, 0);
            (s.into_iter().filter(|x| x.phase == Phase::Update).collect(), k)
        };
        if d.schedule != schedule {
            return bad(
                field("/schedule"),
                at(format!("its schedule of {} passes is not the {} its place in the pipeline gives", d.schedule.len(), schedule.len())),
            );
        }
        if d.slots != slots {
            return bad(field("/slots"), at(format!("it has {} buffer sets, its schedule needs {slots}", d.slots)));
        }
        // The loss is reported by devices at 0 along every layout axis but the data axis.
        if d.reports_loss {
            let first = place.iter().enumerate().all(|(a, &x)| x == 0 || Some(a) == m.data || Some(a) == m.pipe);
            if !worker || !first {
                return bad(field("/reports_loss"), at("it reports the loss, but another device of its data-parallel rank does".into()));
            }
            reporters[rank.unwrap_or(0)] += 1;
        }

        let p = &d.program;
        p.validate().map_err(|e| (field("/program"), at(e.to_string())))?;
        for (k, b) in p.buffers.iter().enumerate() {
            let (what, index, count) = match b.kind {
                BufKind::Param(x) => ("parameter", x, params.len()),
                BufKind::State(x) => ("optimizer state", x, states.len()),
                BufKind::Input(x) => ("input", x, inputs),
                _ => continue,
            };
            if index >= count {
                return bad(field(&format!("/program/buffers/{k}/kind")), at(format!("buffer {k} holds {what} {index}, of {count}")));
            }
        }
        let limit = whole.saturating_mul(MEMORY_FACTOR.saturating_mul(d.slots as u64 + 1)).saturating_add(MEMORY_SLACK);
        match bytes(p, d.slots) {
            Some(b) if b <= limit => {}
            b => {
                let need = b.map(|b| Bytes(b).to_string()).unwrap_or_else(|| "more memory than can be counted".into());
                return bad(
                    field("/program"),
                    at(format!("its buffers need {need}, far more than its part of a step that needs {} on one device", Bytes(whole))),
                );
            }
        }
        for (what, list, pieces, shapes) in [("parameter", "/params", &d.params, &params), ("optimizer state", "/states", &d.states, &states)] {
            for (k, piece) in pieces.iter().enumerate() {
                let here = field(&format!("{list}/{k}"));
                let Some(global) = shapes.get(piece.index) else {
                    return bad(here, at(format!("it holds {what} {}, of {}", piece.index, shapes.len())));
                };
                if pieces[..k].iter().any(|q| q.index == piece.index) {
                    return bad(here, at(format!("it holds two pieces of {what} {}", piece.index)));
                }
                let inside = piece.start.len() == global.len()
                    && piece.len.len() == global.len()
                    && (0..global.len()).all(|x| piece.start[x].checked_add(piece.len[x]).is_some_and(|end| end <= global[x]));
                if piece.global != *global || !inside {
                    return bad(
                        here,
                        at(format!(
                            "its piece of {what} {} (from {:?}, {:?} long, of {:?}) does not lie within the tensor, {global:?}",
                            piece.index, piece.start, piece.len, piece.global
                        )),
                    );
                }
                let kind = if what == "parameter" { BufKind::Param(piece.index) } else { BufKind::State(piece.index) };
                let values: usize = piece.len.iter().product();
                match p.buffers.iter().find(|b| b.kind == kind) {
                    Some(b) if b.elem == Elem::F32 && b.len() == values => {}
                    _ => return bad(here, at(format!("its piece of {what} {} has {values} values, but no buffer of its program holds them", piece.index))),
                }
            }
        }
        // Every parameter and state its program holds is loaded from its piece.
        for (k, b) in p.buffers.iter().enumerate() {
            let (what, list, index, pieces) = match b.kind {
                BufKind::Param(x) => ("parameter", "/params", x, &d.params),
                BufKind::State(x) => ("optimizer state", "/states", x, &d.states),
                _ => continue,
            };
            if !pieces.iter().any(|q| q.index == index) {
                return bad(field(list), at(format!("its buffer {k} holds {what} {index}, but it holds no piece of it")));
            }
        }
    }
    if let Some((r, &k)) = reporters.iter().enumerate().find(|(_, &k)| k != 1) {
        let whose = if data_axis.is_some() { format!("of data-parallel rank {r} ") } else { String::new() };
        return bad("/devices", format!("{k} devices {whose}report the loss, not one"));
    }
    Ok(())
}

/// The bytes of a (valid) program's buffers with `sets` sets of the buffers
/// that microbatches in flight keep apart, as the executor allocates them.
/// Unlike the memory plan, every product is checked: the sizes come from a file.
fn bytes(p: &Program, sets: usize) -> Option<u64> {
    let banked = p.banked();
    p.buffers.iter().zip(&banked).filter(|(b, _)| !matches!(b.kind, BufKind::Alias(_))).try_fold(0u64, |acc, (b, &k)| {
        let copies = if k { sets.max(1) as u64 } else { 1 };
        acc.checked_add((b.len() as u64).checked_mul(4)?.checked_mul(copies)?)
    })
}
