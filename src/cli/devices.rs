//! `shardplan inspect FILE` for a placed plan: what every device holds,
//! computes and exchanges per step, how every parameter is sharded, which
//! stage runs every layer, and the pipeline schedule as a timeline.

use shardplan_compiler::check::{Placement, Unit};
use shardplan_compiler::graph::{Op, Role};
use shardplan_compiler::kernel::{BufKind, Program, StepKind};
use shardplan_compiler::partition::verify::{events, Event};
use shardplan_compiler::partition::{Layout, Phase, Plan};
use shardplan_compiler::Checked;

/// Per-device figures of one training step.
#[derive(Debug, Clone, serde::Serialize)]
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
    pub collectives: Vec<(String, u64)>,
}

fn bytes(p: &Program, i: usize) -> u64 {
    4 * p.buffers[i].len() as u64
}

pub fn reports(plan: &Plan) -> Vec<DeviceReport> {
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
            let mut written_by_pass = vec![false; p.buffers.len()];
            for s in &p.steps {
                if s.role != Role::Update {
                    written_by_pass[p.storage(s.output).0 as usize] = true;
                }
            }
            // Gradients: accumulators, or backward values the update reads.
            let mut grad = vec![false; p.buffers.len()];
            for s in p.steps.iter().filter(|s| s.role == Role::Update) {
                for b in &s.inputs {
                    let i = p.storage(*b).0 as usize;
                    if written_by_pass[i] && matches!(p.buffers[i].kind, BufKind::Temp) {
                        grad[i] = true;
                    }
                }
            }
            for (i, b) in p.buffers.iter().enumerate() {
                match b.kind {
                    BufKind::Temp if grad[i] => r.grad_bytes += bytes(p, i),
                    BufKind::Param(_) => r.param_bytes += bytes(p, i),
                    BufKind::State(_) => r.optimizer_bytes += bytes(p, i),
                    BufKind::Accum(_) => r.grad_bytes += bytes(p, i),
                    BufKind::Input(_) => r.activation_bytes += bytes(p, i) * d.slots as u64,
                    BufKind::Temp if written_by_pass[i] => r.activation_bytes += bytes(p, i) * d.slots as u64,
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

/// One stage's passes by time slot (None: idle).
pub type Row = Vec<Option<(Phase, usize)>>;

/// Time slots of each stage's passes, with unit-time forward and backward
/// passes; and the idle fraction of the stages over the whole step.
pub fn timeline(plan: &Plan) -> (Vec<Row>, f64) {
    let stages: Vec<&shardplan_compiler::partition::DeviceProgram> = {
        let mut v: Vec<&_> = Vec::new();
        for d in &plan.devices {
            if !v.iter().any(|x: &&shardplan_compiler::partition::DeviceProgram| x.stage == d.stage) {
                v.push(d);
            }
        }
        v.sort_by_key(|d| d.stage);
        v
    };
    let p = stages.len();
    let m = plan.microbatches;
    let mut f_end = vec![vec![0usize; m]; p];
    let mut b_end = vec![vec![0usize; m]; p];
    let mut next = vec![0usize; p];
    let mut clock = vec![0usize; p];
    let mut rows: Vec<Vec<Option<(Phase, usize)>>> = vec![Vec::new(); p];
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
                rows[s].push(Some((ins.phase, ins.mb)));
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
    (rows, idle)
}

fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn fmt_flops(f: f64) -> String {
    if f >= 1e9 {
        format!("{:.2} GFLOP", f / 1e9)
    } else {
        format!("{:.2} MFLOP", f / 1e6)
    }
}

fn layout_text(plan: &Plan, l: &[Layout]) -> String {
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

pub fn stage_units(c: &Checked) -> Vec<Vec<String>> {
    match &c.placement {
        Placement::Explicit(e) => match &e.pipeline {
            Some(p) => p.stages.iter().map(|s| s.iter().map(|u: &Unit| c.model.unit_name(*u)).collect()).collect(),
            None => vec![c.model.units().into_iter().map(|u| c.model.unit_name(u)).collect()],
        },
        _ => vec![c.model.units().into_iter().map(|u| c.model.unit_name(u)).collect()],
    }
}

pub fn print(file: &str, c: &Checked, plan: &Plan) {
    let reps = reports(plan);
    let mesh: Vec<String> = plan.mesh.axes.iter().map(|(n, s)| format!("{n}: {s}")).collect();
    println!("{file}: {} devices, mesh ({}), plan {:016x}", plan.devices.len(), mesh.join(", "), plan.hash);
    println!("\nper device, one training step:");
    println!(
        "  {:>6} {:>5}  {:>11} {:>11} {:>11} {:>11}  {:>12}  {:>11} {:>11}",
        "device", "stage", "params", "grads", "optimizer", "activations", "compute", "sent", "received"
    );
    for r in &reps {
        println!(
            "  {:>6} {:>5}  {:>11} {:>11} {:>11} {:>11}  {:>12}  {:>11} {:>11}",
            format!("cpu{}", r.device),
            r.stage,
            fmt_bytes(r.param_bytes),
            fmt_bytes(r.grad_bytes),
            fmt_bytes(r.optimizer_bytes),
            fmt_bytes(r.activation_bytes),
            fmt_flops(r.flops),
            fmt_bytes(r.sent_bytes),
            fmt_bytes(r.received_bytes)
        );
    }
    println!("\ncollectives per step:");
    for r in &reps {
        if r.collectives.is_empty() {
            continue;
        }
        let mut counted: Vec<(String, u64, usize)> = Vec::new();
        for (k, b) in &r.collectives {
            match counted.iter_mut().find(|x| &x.0 == k && x.1 == *b) {
                Some(x) => x.2 += 1,
                None => counted.push((k.clone(), *b, 1)),
            }
        }
        let items: Vec<String> = counted.iter().map(|(k, b, n)| format!("{n} × {k} of {}", fmt_bytes(*b))).collect();
        println!("  cpu{}: {}", r.device, items.join(", "));
    }
    println!("\nparameters:");
    for (i, p) in c.model.params.iter().enumerate() {
        let (stage, l) = &plan.param_layouts[i];
        println!("  {:<28} {:<16} stage {stage}  {}", p.path, p.ty.to_string(), layout_text(plan, l));
    }
    println!("\nstages:");
    for (s, units) in stage_units(c).iter().enumerate() {
        println!("  stage {s}: {}", units.join(", "));
    }
    if plan.schedule.is_some() {
        let (rows, idle) = timeline(plan);
        let p = rows.len() as f64;
        let m = plan.microbatches as f64;
        println!(
            "\nschedule ({}, {} microbatches; one column per pass; idle {:.0}%, (p−1)/(m+p−1) = {:.0}%):",
            plan.schedule.as_deref().unwrap_or(""),
            plan.microbatches,
            idle * 100.0,
            (p - 1.0) / (m + p - 1.0) * 100.0
        );
        for (s, row) in rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .map(|x| match x {
                    Some((Phase::Forward, mb)) => format!("F{mb}"),
                    Some((Phase::Backward, mb)) => format!("B{mb}"),
                    _ => "..".to_string(),
                })
                .map(|c| format!("{c:>3}"))
                .collect();
            println!("  stage {s} |{}", cells.join(""));
        }
    }
}

pub fn json(file: &str, c: &Checked, plan: &Plan) -> serde_json::Value {
    let reps = reports(plan);
    let (rows, idle) = if plan.schedule.is_some() { timeline(plan) } else { (Vec::new(), 0.0) };
    serde_json::json!({
        "file": file,
        "plan_hash": format!("{:016x}", plan.hash),
        "mesh": plan.mesh.axes,
        "devices": reps,
        "parameters": c.model.params.iter().enumerate().map(|(i, p)| serde_json::json!({
            "path": p.path,
            "type": p.ty.to_string(),
            "stage": plan.param_layouts[i].0,
            "sharding": layout_text(plan, &plan.param_layouts[i].1),
        })).collect::<Vec<_>>(),
        "stages": stage_units(c),
        "schedule": plan.schedule,
        "microbatches": plan.microbatches,
        "timeline": rows.iter().map(|r| r.iter().map(|x| match x {
            Some((Phase::Forward, mb)) => format!("F{mb}"),
            Some((Phase::Backward, mb)) => format!("B{mb}"),
            _ => String::new(),
        }).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "idle_fraction": idle,
    })
}
