//! `shardplan inspect FILE`: what the compiler makes of a plan.
//!
//! Every form compiles the plan through the compiler driver
//! (`shardplan_compiler::compile`) and prints what it produced: the kernels
//! or the graph of one device's training step, the planner's explanation,
//! the placed plan's report, or a summary of the training graph. Every
//! failure is a diagnostic and exit code 1.

use super::check;
use super::{Format, GraphFormat, KernelFormat};
use shardplan_compiler::check::Placement;
use shardplan_compiler::diag::render::Sources;
use shardplan_compiler::driver::{self, Failure};
use shardplan_compiler::kernel::{BufId, Program, StepKind};
use shardplan_compiler::partition::memory;
use shardplan_compiler::planner::{self, Profile, Search};
use shardplan_compiler::{graph, Checked, Compiled, Diagnostic, Diagnostics, Options, Target};
use shardplan_runtime::backend::cpu::jit;
use shardplan_runtime::backend::cuda;
use std::path::Path;
use std::process::ExitCode;

/// What `inspect` does for `placement auto`.
pub struct Auto {
    pub explain: bool,
    pub profile: Option<std::path::PathBuf>,
}

const BUG: &str = "this is a bug in shardplan; please report it with the plan";

pub fn run(file: &Path, graph_format: Option<GraphFormat>, kernels: Option<KernelFormat>, format: Format, auto: Auto, color: bool) -> ExitCode {
    let Some(c) = check::load(file, color) else { return ExitCode::from(1) };
    let name = file.display().to_string();
    let result = if let Some(k) = kernels {
        one_device(&c).and_then(|compiled| print_kernels(&name, &compiled, k))
    } else if graph_format.is_none() && (auto.explain || matches!(c.placement, Placement::Auto { .. })) {
        explain(&name, &c, &auto, format)
    } else {
        match graph_format {
            Some(GraphFormat::Dot) => one_device(&c).map(|compiled| print!("{}", graph::to_dot(&compiled.graph, &c))),
            None => shardplan_compiler::compile(&c, &Options::default()).map(|compiled| match &compiled.target {
                Target::Placed(plan) => match format {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&super::placed::json(&name, &compiled.checked, plan)).unwrap_or_default()),
                    Format::Human => super::placed::print(&name, &compiled.checked, plan),
                },
                Target::One(program) => summary(&name, &compiled, program),
            }),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(d) => report(file, d, color),
    }
}

/// Prints the diagnostics of a failed compile; exit code 1.
fn report(file: &Path, d: Diagnostics, color: bool) -> ExitCode {
    let name = file.display().to_string();
    let text = std::fs::read(file).unwrap_or_default();
    let sources = Sources::new(&name, String::from_utf8_lossy(&text).into_owned());
    check::report(&name, &sources, &d.into_vec(), color);
    ExitCode::from(1)
}

fn internal(message: String) -> Diagnostics {
    Diagnostic::error("compile::internal", message).help(BUG).into()
}

/// One device's training step, whatever the placement: what `--kernels`
/// and `--graph` show.
fn one_device(c: &Checked) -> Result<Compiled, Diagnostics> {
    shardplan_compiler::compile(c, &Options { single_device: true, ..Default::default() })
}

fn print_kernels(file: &str, compiled: &Compiled, format: KernelFormat) -> Result<(), Diagnostics> {
    let Target::One(p) = &compiled.target else { return Err(internal("a plan compiled for one device has several programs".into())) };
    println!("{file}: {} kernels, {} buffers", p.steps.len(), p.buffers.len());
    for (i, step) in p.steps.iter().enumerate() {
        let shape = |b: &BufId| format!("{:?}", p.buffers[b.0 as usize].shape);
        let ins: Vec<String> = step.inputs.iter().map(shape).collect();
        let name = step.kind.name();
        let fused = match &step.kind {
            StepKind::Fused(f) | StepKind::Reduce { epilogue: f, .. } => Some(f),
            _ => None,
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
            KernelFormat::Cuda => {
                let launches = cuda::codegen::lower(step, p).map_err(|e| internal(format!("CUDA code generation failed for kernel k{i} ({e})")))?;
                for l in &launches {
                    print!("{}", cuda::codegen::describe(l, p));
                }
            }
        }
    }
    Ok(())
}

/// The summary of a plan without a placement: its training graph and kernels.
fn summary(file: &str, compiled: &Compiled, program: &Program) {
    let g = &compiled.graph;
    let count = |r: graph::Role| g.ids().filter(|&id| g.node(id).role == r).count();
    println!("{file}: training graph");
    println!("  nodes      {} forward, {} backward, {} update", count(graph::Role::Forward), count(graph::Role::Backward), count(graph::Role::Update));
    println!("  parameters {} with gradients", g.grads.len());
    println!("  optimizer  {} state tensors", g.states.len());
    println!("  kernels    {} after fusion", program.steps.len());
    println!("  (--graph dot prints the whole graph; --kernels clif or cuda the generated kernels)");
}

/// `placement auto` (the planner's search and choice, then the chosen
/// plan's report unless `--explain`), or `--explain` on a plan that places
/// itself (the cost model's prediction for its placement).
fn explain(file: &str, c: &Checked, auto: &Auto, format: Format) -> Result<(), Diagnostics> {
    let profile = super::auto::profile(auto.profile.as_deref())
        .map_err(|e| Diagnostics::from(Diagnostic::error("run::device_profile", e).help("write one with `shardplan calibrate -o FILE`")))?;
    let options = Options { profile: Some(profile.clone()), ..Default::default() };
    if !matches!(c.placement, Placement::Auto { .. }) {
        return explain_placed(file, &shardplan_compiler::compile(c, &options)?, &profile, format);
    }
    match driver::compile_explained(c, &options) {
        Ok(compiled) => {
            let Some(found) = &compiled.search else { return Err(internal("`placement auto` compiled without a search".into())) };
            print_search(file, found, compiled.search_s, format);
            if let (false, Format::Human, Some(plan)) = (auto.explain, format, compiled.plan()) {
                println!();
                super::placed::print(file, &compiled.checked, plan);
            }
            Ok(())
        }
        // No placement fits: the search shows the closest candidates.
        Err(Failure { diagnostics, search: Some((found, secs)) }) => {
            print_search(file, &found, secs, format);
            Err(diagnostics)
        }
        Err(Failure { diagnostics, search: None }) => Err(diagnostics),
    }
}

fn print_search(file: &str, found: &Search, secs: f64, format: Format) {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&serde_json::json!({"file": file, "search": found, "search_s": secs})).unwrap_or_default()),
        Format::Human => print!("{}", planner::explain(file, found, secs)),
    }
}

/// `inspect --explain` on a plan that places itself: the cost model's
/// prediction for its placement, with each device's exact memory plan.
fn explain_placed(file: &str, compiled: &Compiled, profile: &Profile, format: Format) -> Result<(), Diagnostics> {
    let Some(mut pred) = planner::predict(&compiled.checked, &compiled.graph, profile) else {
        return Err(internal("no prediction for this placement".into()));
    };
    pred.exact_memory = match &compiled.target {
        Target::Placed(plan) => memory::plan(plan).iter().map(memory::Memory::total).max(),
        Target::One(program) => Some(memory::program(program, 1).total()),
    };
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&serde_json::json!({"file": file, "predicted": pred})).unwrap_or_default()),
        Format::Human => print!("{}", planner::explain_placed(file, &pred)),
    }
    Ok(())
}
