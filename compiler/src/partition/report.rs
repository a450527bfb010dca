//! What a placed plan does, device by device: the figures `inspect` shows
//! for a partitioned plan.
//!
//! Input: a [`Plan`] and the [`Checked`] plan it was partitioned from.
//! Output: a [`Report`]: per device its bytes by what they hold, its FLOPs
//! and the bytes it sends and receives in one training step, with every
//! collective it takes part in ([`DeviceReport`]); how every parameter is
//! sharded and on which stage ([`Parameter`]); the units of every pipeline
//! stage; and, for a pipelined plan, the schedule as a [`Timeline`].
//!
//! Invariants: the figures depend only on the plan. Buffers are classed by
//! the memory plan's rules ([`Program::banked`], [`memory::gradients`]):
//! inputs and the temporaries the forward and backward passes write count
//! once per buffer set as activations (transfer results included),
//! gradient temporaries and accumulators once as gradients; constants,
//! scalars and the update's temporaries are not counted. Collectives move
//! what a ring moves: an all-reduce 2(n − 1)/n of its bytes each way, the
//! others (n − 1)/n. The timeline gives every forward and backward pass one
//! unit of time and starts each as soon as its inputs are ready, in each
//! device's schedule order.
//!
//! [`Program::banked`]: crate::kernel::Program::banked

use super::verify::{events, Event};
use super::{memory, DeviceProgram, Layout, Phase, Plan};
use crate::check::{Checked, Placement};
use crate::graph::{Op, Role};
use crate::kernel::{BufKind, StepKind};
use serde::Serialize;

/// Per-device figures of one training step.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub device: usize,
    pub stage: usize,
    pub param_bytes: u64,
    pub grad_bytes: u64,
    pub optimizer_bytes: u64,
    pub activation_bytes: u64,
    pub flops: f64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// Every collective the device takes part in, in order: its kind
    /// (`all-reduce(data)`) and its bytes.
    pub collectives: Vec<(String, u64)>,
}

impl DeviceReport {
    /// The collectives grouped by kind and size, in order of first use:
    /// (kind, bytes, how many).
    pub fn collective_counts(&self) -> Vec<(String, u64, usize)> {
        let mut counted: Vec<(String, u64, usize)> = Vec::new();
        for (k, b) in &self.collectives {
            match counted.iter_mut().find(|x| &x.0 == k && x.1 == *b) {
                Some(x) => x.2 += 1,
                None => counted.push((k.clone(), *b, 1)),
            }
        }
        counted
    }
}

/// How one parameter is placed.
#[derive(Debug, Clone, Serialize)]
pub struct Parameter {
    pub path: String,
    /// Its global type (`f32[64, 256]`).
    #[serde(rename = "type")]
    pub ty: String,
    pub stage: usize,
    /// `replicated`, or the dims split and the mesh axes they are split over.
    pub sharding: String,
    /// Other stages that hold a copy of it, kept equal by summing the
    /// gradients of every copy (a tied parameter, such as an output head
    /// reusing the embedding table).
    pub copies: Vec<usize>,
}

/// One pass of a pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pass {
    pub phase: Phase,
    pub microbatch: usize,
}

impl std::fmt::Display for Pass {
    /// `F0` for the forward pass of microbatch 0, `B0` for its backward pass.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.phase {
            Phase::Forward => "F",
            Phase::Backward => "B",
            Phase::Update => "U",
        };
        write!(f, "{p}{}", self.microbatch)
    }
}

/// The pipeline schedule in unit time slots.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    /// Per stage, its passes by time slot (None: idle).
    pub rows: Vec<Vec<Option<Pass>>>,
    /// The fraction of the stages' slots, over the whole step, spent idle.
    pub idle: f64,
    /// The idle fraction of an ideal pipeline of as many stages and
    /// microbatches: (p − 1)/(m + p − 1).
    pub ideal_idle: f64,
}

/// Everything `inspect` shows of a placed plan.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub devices: Vec<DeviceReport>,
    pub parameters: Vec<Parameter>,
    /// Per pipeline stage, the names of its units (one stage without a pipeline).
    pub stages: Vec<Vec<String>>,
    /// The schedule, for a pipelined plan.
    pub timeline: Option<Timeline>,
}

/// The report of `plan`, partitioned from `c`.
pub fn report(c: &Checked, plan: &Plan) -> Report {
    Report { devices: devices(plan), parameters: parameters(c, plan), stages: stages(c), timeline: plan.schedule.is_some().then(|| timeline(plan)) }
}

fn bytes(d: &DeviceProgram, i: usize) -> u64 {
    let b = &d.program.buffers[i];
    (b.elem.bytes() * b.len()) as u64
}

/// Per-device figures of one training step, in device order.
pub fn devices(plan: &Plan) -> Vec<DeviceReport> {
    let ev = events(plan);
    plan.devices
        .iter()
        .zip(&ev)
        .map(|(d, ev)| {
            let p = &d.program;
            let mut r = DeviceReport {
                device: d.device,
                stage: d.stage,
                param_bytes: 0,
                grad_bytes: 0,
                optimizer_bytes: 0,
                activation_bytes: 0,
                flops: 0.0,
                sent_bytes: 0,
                received_bytes: 0,
                collectives: Vec::new(),
            };
            let banked = p.banked();
            let grad = memory::gradients(p, &banked);
            let sets = d.slots as u64;
            // Temporaries of the passes that die in their pass: one copy for every buffer set.
            let mut pass = vec![false; p.buffers.len()];
            for s in p.steps.iter().filter(|s| s.role != Role::Update) {
                pass[p.storage(s.output).0 as usize] = true;
            }
            for (i, b) in p.buffers.iter().enumerate() {
                match b.kind {
                    BufKind::Temp if grad[i] => r.grad_bytes += bytes(d, i),
                    BufKind::Param(_) => r.param_bytes += bytes(d, i),
                    BufKind::State(_) => r.optimizer_bytes += bytes(d, i),
                    BufKind::Accum(_) => r.grad_bytes += bytes(d, i),
                    BufKind::Input(_) => r.activation_bytes += bytes(d, i) * sets,
                    BufKind::Temp if banked[i] => r.activation_bytes += bytes(d, i) * sets,
                    BufKind::Temp if pass[i] => r.activation_bytes += bytes(d, i),
                    _ => {}
                }
            }
            let passes = |role: Role| {
                d.schedule
                    .iter()
                    .filter(|x| matches!((x.phase, role), (Phase::Forward, Role::Forward) | (Phase::Backward, Role::Backward) | (Phase::Update, Role::Update)))
                    .count() as f64
            };
            for s in &p.steps {
                let out = p.buffers[s.output.0 as usize].shape.clone();
                let n: f64 = out.iter().product::<usize>() as f64;
                let f = match &s.kind {
                    StepKind::MatMul { trans_a, .. } => {
                        let a = &p.buffers[s.inputs[0].0 as usize].shape;
                        let k = if *trans_a { a[a.len().saturating_sub(2)] } else { a[a.len() - 1] };
                        2.0 * n * k as f64
                    }
                    StepKind::Op(Op::Send { .. } | Op::Recv { .. } | Op::AllGather { .. } | Op::AllToAll { .. }) => 0.0,
                    _ => n,
                };
                r.flops += f * passes(s.role);
            }
            for e in ev {
                match e {
                    Event::Send { len, .. } => r.sent_bytes += 4 * *len as u64,
                    Event::Recv { len, .. } => r.received_bytes += 4 * *len as u64,
                    Event::Collective { kind, group, len, .. } => {
                        let n = group.len() as f64;
                        let moved = if kind.starts_with("all-reduce") { 2.0 * (n - 1.0) / n } else { (n - 1.0) / n };
                        let b = (4.0 * *len as f64 * moved) as u64;
                        r.sent_bytes += b;
                        r.received_bytes += b;
                        r.collectives.push((kind.clone(), 4 * *len as u64));
                    }
                }
            }
            r
        })
        .collect()
}

/// How every parameter of `c` is placed by `plan`, in the model's order.
pub fn parameters(c: &Checked, plan: &Plan) -> Vec<Parameter> {
    c.model
        .params
        .iter()
        .zip(&plan.param_layouts)
        .enumerate()
        .map(|(i, (p, (stage, l)))| {
            let mut copies: Vec<usize> =
                plan.holders(i).iter().filter_map(|&d| plan.devices.iter().find(|x| x.device == d)).map(|d| d.stage).filter(|s| s != stage).collect();
            copies.sort();
            copies.dedup();
            let mut sharding = sharding(plan, l);
            if let Placement::Explicit(e) = &c.placement {
                let data = e.data_axis.and_then(|d| e.mesh.get(d)).filter(|a| a.1 > 1).map(|a| a.0.clone());
                if let (Some(&z), Some(data)) = (e.zero.get(i), data) {
                    let what = match z {
                        1 => "optimizer state",
                        2 => "gradient and optimizer state",
                        _ => "gradient and optimizer state",
                    };
                    if z >= 1 {
                        sharding = format!("{sharding}; zero {z}: {what} sharded over `{data}`");
                    }
                }
            }
            Parameter { path: p.path.clone(), ty: p.ty.to_string(), stage: *stage, sharding, copies }
        })
        .collect()
}

/// A parameter's layout as text: the dims split over mesh axes, or `replicated`.
fn sharding(plan: &Plan, l: &[Layout]) -> String {
    let parts: Vec<String> = l
        .iter()
        .enumerate()
        .filter(|(a, _)| plan.layout_axes[*a].mesh.is_some())
        .filter_map(|(a, x)| match x {
            Layout::Split(d, _) => Some(format!("dim {d} split over `{}`", plan.layout_axes[a].name)),
            _ => None,
        })
        .collect();
    if parts.is_empty() {
        "replicated".into()
    } else {
        parts.join(", ")
    }
}

/// The units of every pipeline stage of `c`, by name (every unit in one
/// stage without a pipeline).
pub fn stages(c: &Checked) -> Vec<Vec<String>> {
    let all = || vec![c.model.units().into_iter().map(|u| c.model.unit_name(u)).collect()];
    match &c.placement {
        Placement::Explicit(e) => match &e.pipeline {
            Some(p) => p.stages.iter().map(|s| s.iter().map(|u| c.model.unit_name(*u)).collect()).collect(),
            None => all(),
        },
        _ => all(),
    }
}

/// The time slots of each stage's passes, with unit-time forward and
/// backward passes, and the idle fraction of the stages over the whole step.
pub fn timeline(plan: &Plan) -> Timeline {
    // One device per stage, in stage order.
    let mut stages: Vec<&DeviceProgram> = Vec::new();
    for d in &plan.devices {
        if !stages.iter().any(|x| x.stage == d.stage) {
            stages.push(d);
        }
    }
    stages.sort_by_key(|d| d.stage);
    let p = stages.len();
    let m = plan.microbatches;
    let mut f_end = vec![vec![0usize; m]; p];
    let mut b_end = vec![vec![0usize; m]; p];
    let mut next = vec![0usize; p];
    let mut clock = vec![0usize; p];
    let mut rows: Vec<Vec<Option<Pass>>> = vec![Vec::new(); p];
    // Repeatedly run whichever stage's next pass has its inputs ready.
    loop {
        let mut progressed = false;
        for s in 0..p {
            while let Some(ins) = stages[s].schedule.get(next[s]) {
                let ready = match ins.phase {
                    Phase::Forward if s > 0 => (f_end[s - 1][ins.mb] > 0).then(|| f_end[s - 1][ins.mb]),
                    Phase::Forward => Some(0),
                    Phase::Backward if s + 1 < p => (b_end[s + 1][ins.mb] > 0).then(|| b_end[s + 1][ins.mb]),
                    Phase::Backward => Some(f_end[s][ins.mb]),
                    Phase::Update => Some(0),
                };
                let Some(ready) = ready else { break };
                if ins.phase == Phase::Update {
                    next[s] += 1;
                    continue;
                }
                let start = clock[s].max(ready);
                while rows[s].len() < start {
                    rows[s].push(None);
                }
                rows[s].push(Some(Pass { phase: ins.phase, microbatch: ins.mb }));
                clock[s] = start + 1;
                if ins.phase == Phase::Forward {
                    f_end[s][ins.mb] = clock[s];
                } else {
                    b_end[s][ins.mb] = clock[s];
                }
                next[s] += 1;
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    let total = rows.iter().map(Vec::len).max().unwrap_or(0);
    let busy: usize = rows.iter().map(|r| r.iter().filter(|x| x.is_some()).count()).sum();
    let idle = if total == 0 || p == 0 { 0.0 } else { 1.0 - busy as f64 / (total * p) as f64 };
    let (p, m) = (p as f64, m as f64);
    Timeline { rows, idle, ideal_idle: (p - 1.0) / (m + p - 1.0) }
}

#[cfg(test)]
mod tests {
    use super::{devices, report, timeline};
    use crate::partition::{memory, Plan};
    use crate::Checked;

    fn placed(example: &str) -> (Checked, Plan) {
        let text = std::fs::read(format!("{}/../examples/{example}", env!("CARGO_MANIFEST_DIR"))).expect("the example");
        let c = crate::check_source(&text).0.expect("the example checks");
        let compiled = crate::compile(&c, &crate::Options::default()).expect("the example compiles");
        let plan = compiled.plan().expect("the example is placed").clone();
        (compiled.checked, plan)
    }

    #[test]
    fn the_1f1b_timeline_interleaves_forward_and_backward_passes() {
        let (_, plan) = placed("pipeline_1f1b.plan");
        let t = timeline(&plan);
        let row = |s: usize| t.rows[s].iter().map(|x| x.map(|p| p.to_string()).unwrap_or_else(|| "..".into())).collect::<Vec<_>>().join(" ");
        assert_eq!(row(0), "F0 F1 .. B0 F2 B1 F3 B2 .. B3");
        assert_eq!(row(1), ".. F0 B0 F1 B1 F2 B2 F3 B3");
        assert!((t.idle - 0.2).abs() < 1e-9 && (t.ideal_idle - 0.2).abs() < 1e-9, "{} {}", t.idle, t.ideal_idle);
    }

    #[test]
    fn data_parallel_devices_hold_the_memory_plans_parameters_and_gradients() {
        let (c, plan) = placed("data_parallel.plan");
        let r = report(&c, &plan);
        assert!(r.timeline.is_none());
        assert_eq!(r.stages.len(), 1);
        assert!(r.parameters.iter().all(|p| p.sharding == "replicated" && p.stage == 0));
        for (d, m) in devices(&plan).iter().zip(memory::plan(&plan)) {
            assert_eq!((d.param_bytes, d.optimizer_bytes, d.grad_bytes), (m.params, m.optimizer, m.grads));
            assert_eq!(d.collective_counts(), vec![("all-reduce(data)".to_string(), d.param_bytes, 1)]);
        }
    }
}
