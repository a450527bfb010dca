//! `shardplan inspect FILE`: what the compiler makes of a plan.

use super::check;
use super::GraphFormat;
use shardplan_compiler::{autodiff, graph};
use std::path::Path;
use std::process::ExitCode;

pub fn run(file: &Path, graph_format: Option<GraphFormat>, color: bool) -> ExitCode {
    let Some(c) = check::load(file, color) else { return ExitCode::from(1) };
    let g = autodiff::differentiate(graph::build(&c), &c);
    if let Err(e) = g.verify() {
        eprintln!("error: internal: the training graph is malformed ({e}); please report this with the plan file");
        return ExitCode::from(1);
    }
    match graph_format {
        Some(GraphFormat::Dot) => print!("{}", graph::to_dot(&g, &c)),
        None => {
            let count = |r: graph::Role| g.ids().filter(|&id| g.node(id).role == r).count();
            println!("{}: training graph", file.display());
            println!("  nodes      {} forward, {} backward, {} update", count(graph::Role::Forward), count(graph::Role::Backward), count(graph::Role::Update));
            println!("  parameters {} with gradients", g.grads.len());
            println!("  optimizer  {} state tensors", g.states.len());
            println!("  (use --graph dot for the whole graph)");
        }
    }
    ExitCode::SUCCESS
}
