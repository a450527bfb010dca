//! `shardplan inspect FILE`: what the compiler makes of a plan.

use super::check;
use super::{Format, GraphFormat, KernelFormat};
use shardplan_compiler::graph::Graph;
use shardplan_compiler::kernel::{lower, StepKind};
use shardplan_compiler::planner::{self, Profile};
use shardplan_compiler::{autodiff, graph, Checked};
use shardplan_runtime::backend::cpu::jit;
use shardplan_runtime::backend::cuda;
use std::path::Path;
use std::process::ExitCode;

/// What `inspect` does for `placement auto`.
pub struct Auto {
    pub explain: bool,
    pub profile: Option<std::path::PathBuf>,
}

pub fn run(file: &Path, graph_format: Option<GraphFormat>, kernels: Option<KernelFormat>, format: Format, auto: Auto, color: bool) -> ExitCode {
    let Some(c) = check::load(file, color) else { return ExitCode::from(1) };
    let g = autodiff::differentiate(graph::build(&c), &c);
    if let Err(e) = g.verify() {
        eprintln!("error: internal: the training graph is malformed ({e}); please report this with the plan file");
        return ExitCode::from(1);
    }
    if let Some(format) = kernels {
        let p = lower(&g);
        println!("{}: {} kernels, {} buffers", file.display(), p.steps.len(), p.buffers.len());
        for (i, step) in p.steps.iter().enumerate() {
            let shape = |b: &shardplan_compiler::kernel::BufId| format!("{:?}", p.buffers[b.0 as usize].shape);
            let ins: Vec<String> = step.inputs.iter().map(shape).collect();
            let (name, fused) = match &step.kind {
                StepKind::Fused(f) => ("fused".to_string(), Some(f)),
                StepKind::Reduce { op, epilogue } => (format!("{} with epilogue", op.name()), Some(epilogue)),
                StepKind::Op(op) => (op.name(), None),
                StepKind::Broadcast => ("broadcast".to_string(), None),
                StepKind::MatMul { trans_a, trans_b } => (format!("matmul{}{}", if *trans_a { " Aᵀ" } else { "" }, if *trans_b { " Bᵀ" } else { "" }), None),
            };
            println!("\nk{i}: {name} {} → {}", ins.join(" "), shape(&step.output));
            match format {
                KernelFormat::Clif => {
                    if let Some(f) = fused {
                        print!("{}", f.display());
                        match jit::clif(f) {
                            Ok(text) => print!("{text}"),
                            Err(e) => println!("  (no CLIF: {e})"),
                        }
                    }
                }
                KernelFormat::Cuda => match cuda::codegen::lower(step, &p) {
                    Ok(launches) => {
                        for l in &launches {
                            print!("{}", cuda::codegen::describe(l, &p));
                        }
                    }
                    Err(e) => {
                        eprintln!("error: internal: CUDA code generation failed for kernel k{i} ({e}); please report this with the plan file");
                        return ExitCode::from(1);
                    }
                },
            }
        }
        return ExitCode::SUCCESS;
    }
    if graph_format.is_none() && (auto.explain || matches!(c.placement, shardplan_compiler::check::Placement::Auto { .. })) {
        let prof = match super::auto::profile(auto.profile.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error[run::device_profile]: {e}");
                return ExitCode::from(1);
            }
        };
        if !matches!(c.placement, shardplan_compiler::check::Placement::Auto { .. }) {
            return explain_placed(file, &c, &g, &prof, format);
        }
        let t = std::time::Instant::now();
        let found = planner::search(&c, &g, &prof);
        let secs = t.elapsed().as_secs_f64();
        let name = file.display().to_string();
        if format == Format::Json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"file": name, "search": found, "search_s": secs})).unwrap_or_default());
            return ExitCode::SUCCESS;
        }
        print!("{}", planner::explain(&name, &found, secs));
        if let (false, Some(i)) = (auto.explain, found.chosen) {
            let mut placed = c.clone();
            placed.placement = shardplan_compiler::check::Placement::Explicit(planner::explicit(&c, &found.candidates[i]));
            if let Ok(plan) = shardplan_compiler::partition::partition(&placed, &g) {
                println!();
                super::placed::print(&name, &placed, &plan);
            }
        }
        return if found.chosen.is_some() { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    match graph_format {
        Some(GraphFormat::Dot) => print!("{}", graph::to_dot(&g, &c)),
        None if matches!(c.placement, shardplan_compiler::check::Placement::Explicit(_)) => {
            let plan = match shardplan_compiler::partition::partition(&c, &g) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error[run::placement]: cannot partition the plan: {e}");
                    return ExitCode::from(1);
                }
            };
            let name = file.display().to_string();
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&super::placed::json(&name, &c, &plan)).unwrap_or_default()),
                Format::Human => super::placed::print(&name, &c, &plan),
            }
        }
        None => {
            let count = |r: graph::Role| g.ids().filter(|&id| g.node(id).role == r).count();
            println!("{}: training graph", file.display());
            println!("  nodes      {} forward, {} backward, {} update", count(graph::Role::Forward), count(graph::Role::Backward), count(graph::Role::Update));
            println!("  parameters {} with gradients", g.grads.len());
            println!("  optimizer  {} state tensors", g.states.len());
            println!("  kernels    {} after fusion", lower(&g).steps.len());
            println!("  (--graph dot prints the whole graph; --kernels clif or cuda the generated kernels)");
        }
    }
    ExitCode::SUCCESS
}

/// `inspect --explain` on a plan that places itself: the cost model's
/// prediction for its placement, with each device's exact memory plan.
fn explain_placed(file: &Path, c: &Checked, g: &Graph, prof: &Profile, format: Format) -> ExitCode {
    use shardplan_compiler::partition::{self, memory};
    let Some(mut pred) = planner::predict(c, g, prof) else {
        eprintln!("error: internal: no prediction for this placement; please report this with the plan file");
        return ExitCode::from(1);
    };
    let exact = match partition::partition(c, g) {
        Ok(plan) => plan.devices.iter().map(|d| memory::device(d).total()).max(),
        Err(e) => {
            eprintln!("error[run::placement]: cannot partition the plan: {e}");
            return ExitCode::from(1);
        }
    };
    pred.exact_memory = exact;
    let name = file.display().to_string();
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&serde_json::json!({"file": name, "predicted": pred})).unwrap_or_default()),
        Format::Human => print!("{}", planner::explain_placed(&name, &pred)),
    }
    ExitCode::SUCCESS
}
