//! Subcommands, argument parsing and exit codes.
//!
//! Exit codes: 0 success, 1 the input has errors (diagnostics printed),
//! 2 the command line is wrong.

mod auto;
mod check;
mod compile;
mod inspect;
mod placed;
mod ranks;
mod run;
mod selftest;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "shardplan", version, about = "Check, compile and run parallel training plans")]
pub struct Cli {
    /// When to colour output.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    pub color: Color,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check plan files and print a summary of each.
    Check {
        /// Plan files to check.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
        /// Output format: a summary for people, or JSON for editors and tools.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Partition a plan and write its device programs as JSON, for `shardplan run OUT.json`.
    Compile {
        /// The plan file.
        file: std::path::PathBuf,
        /// Where to write the compiled plan.
        #[arg(short, long, value_name = "OUT.json")]
        output: std::path::PathBuf,
    },
    /// Train a plan.
    Run(run::RunArgs),
    /// Measure this machine's CPU devices (matmul rate, element-wise bandwidth, transfer
    /// bandwidth and latency) and write the device profile `placement auto` plans with.
    Calibrate {
        /// Where to write the profile.
        #[arg(short, long, default_value = "shardplan-profile.json")]
        output: std::path::PathBuf,
    },
    /// Train a few steps of the placed plan and of one device side by side; fail when they differ.
    Verify(run::VerifyArgs),
    /// Run every kernel of the example programs (or of FILES) on random operands on a
    /// backend and on the CPU, and compare: `selftest --backend cuda` checks a GPU setup.
    Selftest(selftest::SelftestArgs),
    /// Show what the compiler makes of a plan.
    Inspect {
        /// The plan file.
        file: std::path::PathBuf,
        /// Print the training graph (forward, backward and update) in this format.
        #[arg(long, value_enum)]
        graph: Option<GraphFormat>,
        /// Print the generated kernels in this form.
        #[arg(long, value_enum)]
        kernels: Option<KernelFormat>,
        /// Output format of the summary: for people, or JSON for tools.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
        /// For `placement auto`: the chosen plan, its predicted step time and
        /// memory, and the next best candidates with why each lost. For a
        /// placement written out: the cost model's prediction for it.
        #[arg(long)]
        explain: bool,
        /// Device profile written by `shardplan calibrate` (for `--explain` and `placement auto`).
        #[arg(long, value_name = "FILE")]
        device_profile: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelFormat {
    /// The kernel program and, for each fused kernel, its cranelift IR.
    Clif,
    /// The kernel program as the CUDA backend runs it: each kernel's CUDA C
    /// source and launch shape, and each cuBLAS product's dimensions.
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    /// Graphviz DOT.
    Dot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

pub fn run(cli: Cli) -> ExitCode {
    let color = match cli.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::env::var_os("NO_COLOR").is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    // Only `run` knows how to share a plan among the processes a launcher starts.
    let launched = shardplan_runtime::process::detect().filter(|l| l.size > 1);
    if let (Some(l), false) = (&launched, matches!(cli.command, Command::Run(_))) {
        eprintln!("error: {} started {} processes, but only `shardplan run` runs as one process per device", l.launcher, l.size);
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Check { files, format } => check::run(&files, format, color),
        Command::Inspect { file, graph, kernels, format, explain, device_profile } => {
            inspect::run(&file, graph, kernels, format, inspect::Auto { explain, profile: device_profile }, color)
        }
        Command::Compile { file, output } => compile::run(&file, &output, color),
        Command::Run(args) => run::run(&args, color),
        Command::Calibrate { output } => auto::calibrate(&output),
        Command::Verify(args) => run::verify(&args, color),
        Command::Selftest(args) => selftest::run(&args, color),
    }
}
