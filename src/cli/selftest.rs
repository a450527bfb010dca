//! `shardplan selftest --backend cuda [FILES…]`: every kernel of every
//! program, on fresh random operands, against the CPU backend
//! (`shardplan_runtime::selftest`).
//!
//! Input: plan files (default: every `examples/*.plan`), a backend, a seed
//! and a tolerance. Output: one line per program, one per step over the
//! tolerance or failed (the engine's error, as the backend reports it), or
//! every step with `--verbose`; a total; and exit code 1 when any step is
//! over or failed, or a file does not check. This file reads and checks the
//! plans, finds the GPUs and prints; the runtime compiles the programs,
//! runs the steps and compares them.

use super::check;
use super::run::BackendArg;
use shardplan_runtime::engine::Backend;
use shardplan_runtime::selftest::{self, Counts, Options, ProgramReport, Selftest, SingleOnly};
use shardplan_runtime::session::cuda_ready;
use std::path::PathBuf;
use std::process::ExitCode;

/// Options of `shardplan selftest`.
#[derive(Debug, Clone, clap::Args)]
pub struct SelftestArgs {
    /// Plan files whose programs to test (default: every examples/*.plan).
    pub files: Vec<PathBuf>,
    /// The backend to check against the CPU.
    #[arg(long, value_enum, default_value_t = BackendArg::Cuda)]
    pub backend: BackendArg,
    /// Seed of the random operands (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Largest norm-wise relative difference of a step's result.
    #[arg(long, default_value_t = 1e-5)]
    pub tolerance: f64,
    /// Print every step, not only those that fail.
    #[arg(long, short)]
    pub verbose: bool,
}

pub fn run(args: &SelftestArgs, color: bool) -> ExitCode {
    let files = if args.files.is_empty() { examples() } else { args.files.clone() };
    if files.is_empty() {
        eprintln!("error: no plan files given and no examples/*.plan here; name the plan files to test");
        return ExitCode::from(1);
    }
    let backend = match args.backend {
        BackendArg::Cpu => Backend::Cpu,
        BackendArg::Cuda => match cuda_ready() {
            Ok(gpus) => {
                for g in &gpus {
                    let memory = shardplan_compiler::units::Bytes(g.memory).in_unit(shardplan_compiler::units::Unit::GiB);
                    println!("GPU {}: {}, compute capability {}.{} ({}), {memory:.1}", g.ordinal, g.name, g.capability.0, g.capability.1, g.arch());
                }
                Backend::Cuda { ordinal: 0, memory: None }
            }
            Err(f) => {
                eprintln!("error: {f}\n  help: {}", f.help());
                return ExitCode::from(1);
            }
        },
    };
    let seed = args.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let other = if backend == Backend::Cpu { "cpu, 1 thread" } else { "gpu" };
    println!("selftest: {other} against cpu ({threads} threads), seed {seed}, tolerance {:.0e}", args.tolerance);
    let mut test = Selftest::new(Options { backend, seed, threads });
    let mut totals = Counts::default();
    for file in &files {
        let Some(c) = check::load(file, color) else {
            totals.failed += 1;
            continue;
        };
        let name = file.display().to_string();
        let errors = |d: &shardplan_compiler::Diagnostics| d.iter().filter(|d| d.is_error()).map(|d| d.message.as_str()).collect::<Vec<_>>().join("; ");
        let programs = match selftest::programs(&name, &c) {
            Ok(p) => p,
            Err(d) => {
                eprintln!("{name}: the plan does not compile for one device: {}", errors(&d));
                totals.failed += 1;
                continue;
            }
        };
        match &programs.single_only {
            Some(SingleOnly::Auto) => println!("{name}: placement auto: testing the single-device program only"),
            Some(SingleOnly::NotCompiled(d)) => eprintln!("{name}: {}; testing the single-device program only", errors(d)),
            None => {}
        }
        for (name, program) in &programs.programs {
            totals.add(&print(&test.program(name, program), args));
        }
    }
    println!(
        "selftest: {} distinct steps in {} programs: {} within {:.0e}, {} over, {} failed to run, {} transfers skipped; largest difference {:.2e}",
        totals.steps, totals.programs, totals.ok, args.tolerance, totals.over, totals.failed, totals.transfers, totals.worst
    );
    if totals.over + totals.failed > 0 {
        println!("selftest: FAILED");
        ExitCode::from(1)
    } else {
        println!("selftest: ok");
        ExitCode::SUCCESS
    }
}

/// Every examples/*.plan under the current directory, sorted.
fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("examples")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "plan")).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Prints the steps of `r` over the tolerance or failed (every step with
/// `--verbose`), then its line; returns its counts.
fn print(r: &ProgramReport, args: &SelftestArgs) -> Counts {
    for s in &r.tested {
        let ins: Vec<String> = s.inputs.iter().map(|shape| format!("{shape:?}")).collect();
        let label = format!("step {:>4} {} {} → {:?}", s.index, s.what, ins.join(" "), s.output);
        match &s.result {
            Ok(d) if args.verbose || !s.within(args.tolerance) => {
                println!("  {label}: {d:.2e}{}", if s.within(args.tolerance) { "" } else { "  OVER" })
            }
            Ok(_) => {}
            Err(e) => println!("  {label}: FAILED: {e}"),
        }
    }
    let t = r.counts(args.tolerance);
    println!(
        "{}: {} steps ({} tested, {} tested before, {} transfers): {} within {:.0e}, {} over, {} failed, largest {:.2e}",
        r.name, r.steps, t.steps, r.repeated, t.transfers, t.ok, args.tolerance, t.over, t.failed, t.worst
    );
    t
}
