//! `shardplan inspect FILE` for a placed plan: prints the compiler's report
//! ([`report::report`]) of what every device holds, computes and exchanges
//! per step, how every parameter is sharded, which stage runs every layer,
//! and the pipeline schedule as a timeline; as tables, or as JSON.

use shardplan_compiler::partition::report::{self, Pass, Report};
use shardplan_compiler::partition::Plan;
use shardplan_compiler::units::{Bytes, Unit};
use shardplan_compiler::Checked;

/// Sizes in the tables: two decimals in MiB (the largest unit), one in KiB.
fn size(b: u64) -> String {
    let b = Bytes(b).within(Unit::B, Unit::MiB);
    match b.unit() {
        Unit::B => format!("{b}"),
        Unit::KiB => format!("{b:.1}"),
        _ => format!("{b:.2}"),
    }
}

fn flops(f: f64) -> String {
    if f >= 1e9 {
        format!("{:.2} GFLOP", f / 1e9)
    } else {
        format!("{:.2} MFLOP", f / 1e6)
    }
}

/// What `zero`, `recompute` and `autocast` save on each device: its memory plan against
/// that of the same placement without them.
fn saved(c: &Checked, plan: &Plan) {
    let Some(saved) = shardplan_compiler::driver::savings(c, plan) else { return };
    println!("\nmemory saved by {} (against the same placement without them):", saved.modes.join(" and "));
    println!("  {:>6}  {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}", "device", "params", "grads", "optimizer", "temporaries", "transfers", "total");
    let signed = |a: u64, b: u64| if b >= a { size(b - a) } else { format!("−{}", size(a - b)) };
    for (device, m, b) in &saved.devices {
        println!(
            "  {:>6}  {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
            format!("cpu{device}"),
            signed(m.params, b.params),
            signed(m.grads, b.grads),
            signed(m.optimizer, b.optimizer),
            signed(m.activations + m.workspace, b.activations + b.workspace),
            signed(m.comm, b.comm),
            signed(m.total(), b.total())
        );
    }
}

/// A timeline cell: `F0`, `B0`, or `idle` for an idle slot.
fn cell(x: &Option<Pass>, idle: &str) -> String {
    x.map(|p| p.to_string()).unwrap_or_else(|| idle.to_string())
}

pub fn print(file: &str, c: &Checked, plan: &Plan) {
    let Report { devices, parameters, stages, timeline } = report::report(c, plan);
    let mesh: Vec<String> = plan.mesh.axes.iter().map(|(n, s)| format!("{n}: {s}")).collect();
    println!("{file}: {} devices, mesh ({}), plan {:016x}", plan.devices.len(), mesh.join(", "), plan.hash);
    println!("\nper device, one training step:");
    println!(
        "  {:>6} {:>5}  {:>11} {:>11} {:>11} {:>11}  {:>12}  {:>11} {:>11}",
        "device", "stage", "params", "grads", "optimizer", "activations", "compute", "sent", "received"
    );
    for r in &devices {
        println!(
            "  {:>6} {:>5}  {:>11} {:>11} {:>11} {:>11}  {:>12}  {:>11} {:>11}",
            format!("cpu{}", r.device),
            r.stage,
            size(r.param_bytes),
            size(r.grad_bytes),
            size(r.optimizer_bytes),
            size(r.activation_bytes),
            flops(r.flops),
            size(r.sent_bytes),
            size(r.received_bytes)
        );
    }
    saved(c, plan);
    println!("\ncollectives per step:");
    for r in &devices {
        if r.collectives.is_empty() {
            continue;
        }
        let items: Vec<String> = r.collective_counts().iter().map(|(k, b, n)| format!("{n} × {k} of {}", size(*b))).collect();
        println!("  cpu{}: {}", r.device, items.join(", "));
    }
    println!("\nparameters:");
    for p in &parameters {
        let copies = match p.copies.as_slice() {
            [] => String::new(),
            c => format!(", tied: a copy on stage{} {}", if c.len() == 1 { "" } else { "s" }, c.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")),
        };
        println!("  {:<28} {:<16} stage {}  {}{copies}", p.path, p.ty, p.stage, p.sharding);
    }
    println!("\nstages:");
    for (s, units) in stages.iter().enumerate() {
        println!("  stage {s}: {}", units.join(", "));
    }
    if let Some(t) = timeline {
        println!(
            "\nschedule ({}, {} microbatches; one column per pass; idle {:.0}%, (p−1)/(m+p−1) = {:.0}%):",
            plan.schedule.as_deref().unwrap_or(""),
            plan.microbatches,
            t.idle * 100.0,
            t.ideal_idle * 100.0
        );
        for (s, row) in t.rows.iter().enumerate() {
            let cells: Vec<String> = row.iter().map(|x| format!("{:>3}", cell(x, ".."))).collect();
            println!("  stage {s} |{}", cells.join(""));
        }
    }
}

pub fn json(file: &str, c: &Checked, plan: &Plan) -> serde_json::Value {
    let Report { devices, parameters, stages, timeline } = report::report(c, plan);
    let (rows, idle) = timeline.map(|t| (t.rows, t.idle)).unwrap_or_default();
    serde_json::json!({
        "file": file,
        "plan_hash": format!("{:016x}", plan.hash),
        "mesh": plan.mesh.axes,
        "devices": devices,
        "parameters": parameters,
        "stages": stages,
        "schedule": plan.schedule,
        "microbatches": plan.microbatches,
        "timeline": rows.iter().map(|r| r.iter().map(|x| cell(x, "")).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "idle_fraction": idle,
    })
}
