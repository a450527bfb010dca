//! `shardplan selftest --backend cuda [FILES…]`: every kernel of every
//! program, on fresh random operands, against the CPU backend.
//!
//! Programs: for each plan file (default: every `examples/*.plan`), its
//! single-device training step and, when it has an explicit placement,
//! every device's program. Each step runs alone: a program holding only
//! the step and the buffers it touches, its operands random (f32 in
//! −1..1, or 0.5..1.5 when the step takes logarithms, roots or quotients;
//! ids and labels within the table or the classes of the op reading them).
//! The CPU executor's result is the reference; the other backend's is
//! compared norm-wise, ‖x − ref‖ / ‖ref‖, per step. Transfers are not
//! kernels and are skipped. `--backend cpu` compares the CPU executor on
//! one thread against itself on all threads, so the command runs anywhere.
//!
//! Input: plan files and a backend. Output: one line per program, one per
//! step over the tolerance or failed (the engine's error, as the backend
//! reports it), and exit code 1 when there is any. Invariant: both sides are
//! built by `backend::engine` from the same program and operands.

use super::check;
use super::run::BackendArg;
use shardplan_compiler::check::Placement;
use shardplan_compiler::graph::{Op, Role};
use shardplan_compiler::kernel::{lower, BufId, BufKind, Buffer, Elem, Inst, Program, Step, StepKind, Unary};
use shardplan_compiler::{autodiff, graph, partition};
use shardplan_runtime::data::rng::Xoshiro256;
use shardplan_runtime::engine::{Backend, Data, Engine, EngineError};
use shardplan_runtime::session::cuda_ready;
use std::collections::BTreeMap;
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
                    println!(
                        "GPU {}: {}, compute capability {}.{} ({}), {:.1} GiB",
                        g.ordinal,
                        g.name,
                        g.capability.0,
                        g.capability.1,
                        g.arch(),
                        g.memory as f64 / (1u64 << 30) as f64
                    );
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
    let other = match backend {
        Backend::Cpu => "cpu, 1 thread".to_string(),
        Backend::Cuda { .. } => "gpu".to_string(),
    };
    println!("selftest: {other} against cpu ({threads} threads), seed {seed}, tolerance {:.0e}", args.tolerance);
    let mut totals = Totals::default();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    for file in &files {
        let Some(programs) = programs(file, color) else {
            totals.failed += 1;
            continue;
        };
        for (name, program) in programs {
            let t = test_program(&name, &program, &backend, threads, seed, args, &mut seen);
            totals.add(&t);
        }
    }
    println!(
        "selftest: {} distinct steps in {} programs: {} within {:.0e}, {} over, {} failed to run, {} transfers skipped; largest difference {:.2e}",
        totals.steps, totals.programs, totals.ok, args.tolerance, totals.over, totals.failed, totals.skipped, totals.worst
    );
    if totals.over + totals.failed > 0 {
        println!("selftest: FAILED");
        ExitCode::from(1)
    } else {
        println!("selftest: ok");
        ExitCode::SUCCESS
    }
}

#[derive(Default)]
struct Totals {
    programs: usize,
    steps: usize,
    ok: usize,
    over: usize,
    failed: usize,
    skipped: usize,
    worst: f64,
}

impl Totals {
    fn add(&mut self, t: &Totals) {
        self.programs += t.programs;
        self.steps += t.steps;
        self.ok += t.ok;
        self.over += t.over;
        self.failed += t.failed;
        self.skipped += t.skipped;
        self.worst = self.worst.max(t.worst);
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

/// The single-device program of `file` and, for an explicit placement,
/// every device's program, named for the report.
fn programs(file: &std::path::Path, color: bool) -> Option<Vec<(String, Program)>> {
    let c = check::load(file, color)?;
    let text = std::fs::read(file).ok()?;
    let name = file.display().to_string();
    let (single, _) = shardplan_compiler::check_source_placed(&text, &BTreeMap::new(), false);
    let Some(single) = single else {
        eprintln!("{name}: the plan does not check without its placement");
        return None;
    };
    let g1 = autodiff::differentiate(graph::build(&single), &single);
    let mut out = vec![(format!("{name} (one device)"), lower(&g1))];
    match &c.placement {
        Placement::Explicit(_) => {
            let g = autodiff::differentiate(graph::build(&c), &c);
            match partition::partition(&c, &g) {
                Ok(plan) => out.extend(plan.devices.into_iter().map(|d| (format!("{name} device {}", d.device), d.program))),
                Err(e) => eprintln!("{name}: cannot partition the plan ({e}); testing the single-device program only"),
            }
        }
        Placement::Auto { .. } => println!("{name}: placement auto: testing the single-device program only"),
        Placement::Single => {}
    }
    Some(out)
}

/// Tests every step of `p` not seen before (`seen`: what each step computes
/// on which shapes, so that a step repeated in several programs runs once).
fn test_program(
    name: &str,
    p: &Program,
    backend: &Backend,
    threads: usize,
    seed: u64,
    args: &SelftestArgs,
    seen: &mut std::collections::HashSet<String>,
) -> Totals {
    let mut t = Totals { programs: 1, ..Totals::default() };
    let mut repeated = 0;
    for (si, step) in p.steps.iter().enumerate() {
        let what = shardplan_runtime::backend::cuda::exec::describe(&step.kind);
        if matches!(&step.kind, StepKind::Op(op) if op.is_comm()) {
            t.skipped += 1;
            continue;
        }
        let buf = |b: &BufId| {
            let x = &p.buffers[b.0 as usize];
            (x.elem, x.shape.clone(), matches!(x.kind, BufKind::Const(_)).then(|| format!("{:?}", x.kind)))
        };
        let key = format!("{:?} {:?} {:?}", step.kind, step.inputs.iter().map(buf).collect::<Vec<_>>(), buf(&step.output));
        if !seen.insert(key) {
            repeated += 1;
            continue;
        }
        t.steps += 1;
        let ins: Vec<String> = step.inputs.iter().map(|b| format!("{:?}", p.buffers[b.0 as usize].shape)).collect();
        let label = format!("step {si:>4} {what} {} → {:?}", ins.join(" "), p.buffers[step.output.0 as usize].shape);
        match compare(p, si, backend, threads, seed ^ (si as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) {
            Ok(d) => {
                let ok = d <= args.tolerance;
                t.worst = t.worst.max(d);
                if ok {
                    t.ok += 1;
                } else {
                    t.over += 1;
                }
                if args.verbose || !ok {
                    println!("  {label}: {d:.2e}{}", if ok { "" } else { "  OVER" });
                }
            }
            Err(e) => {
                t.failed += 1;
                println!("  {label}: FAILED: {e}");
            }
        }
    }
    println!(
        "{name}: {} steps ({} tested, {repeated} tested before, {} transfers): {} within {:.0e}, {} over, {} failed, largest {:.2e}",
        p.steps.len(),
        t.steps,
        t.skipped,
        t.ok,
        args.tolerance,
        t.over,
        t.failed,
        t.worst
    );
    t
}

/// A program of step `si` of `p` alone: the buffers it touches (renumbered),
/// its operands turned into inputs, its result the loss. Returns the
/// program, the inputs' kinds and buffers, and where the result is read.
struct Alone {
    program: Program,
    inputs: Vec<(BufKind, BufId)>,
    result: Result<BufId, BufKind>,
}

fn alone(p: &Program, si: usize) -> Alone {
    let step = &p.steps[si];
    let mut keep: Vec<BufId> = Vec::new();
    let add = |b: BufId, keep: &mut Vec<BufId>| {
        let mut b = b;
        loop {
            if !keep.contains(&b) {
                keep.push(b);
            }
            match p.buffers[b.0 as usize].kind {
                BufKind::Alias(a) => b = a,
                _ => break,
            }
        }
    };
    for &b in step.inputs.iter().chain([&step.output]) {
        add(b, &mut keep);
    }
    let accum = match &step.kind {
        StepKind::Op(Op::Accumulate(k) | Op::Accumulated(k)) => p.buffers.iter().position(|b| b.kind == BufKind::Accum(*k)).map(|i| (BufId(i as u32), *k)),
        _ => None,
    };
    if let Some((b, _)) = accum {
        add(b, &mut keep);
    }
    keep.sort();
    let map = |b: BufId| BufId(keep.iter().position(|&k| k == b).unwrap_or(0) as u32);
    let out_storage = p.storage(step.output);
    let mut inputs = Vec::new();
    let buffers: Vec<Buffer> = keep
        .iter()
        .map(|&b| {
            let old = &p.buffers[b.0 as usize];
            let kind = match &old.kind {
                BufKind::Alias(a) => BufKind::Alias(map(*a)),
                BufKind::Const(c) => BufKind::Const(*c),
                BufKind::Accum(k) => BufKind::Accum(*k),
                // The output's memory is computed, unless the step also reads it.
                _ if b == out_storage && !step.inputs.iter().any(|&i| p.storage(i) == b) => BufKind::Temp,
                _ => {
                    let k = BufKind::Input(inputs.len());
                    inputs.push((k.clone(), map(b)));
                    k
                }
            };
            Buffer { kind, elem: old.elem, shape: old.shape.clone(), node: old.node }
        })
        .collect();
    let new_step = Step { kind: step.kind.clone(), role: Role::Forward, inputs: step.inputs.iter().map(|&b| map(b)).collect(), output: map(step.output) };
    let result = match (&step.kind, accum) {
        (StepKind::Op(Op::Accumulate(_)), Some((_, k))) => Err(BufKind::Accum(k)),
        _ => Ok(map(step.output)),
    };
    Alone { program: Program { buffers, steps: vec![new_step], loss: map(step.output), assigns: Vec::new() }, inputs, result }
}

/// Whether the step's f32 operands should be positive (it takes logs, roots or quotients).
fn positive(kind: &StepKind) -> bool {
    let body = match kind {
        StepKind::Fused(f) | StepKind::Reduce { epilogue: f, .. } => &f.body,
        _ => return false,
    };
    body.iter()
        .any(|i| matches!(i, Inst::Unary(Unary::Log | Unary::Sqrt | Unary::ClipScale(_), _) | Inst::Binary(shardplan_compiler::kernel::Binary::Div, _, _)))
}

/// The bound of i32 buffer `b` (of the one-step program): its ids or labels index this many rows or classes.
fn bound(p: &Program, b: BufId) -> usize {
    let shape = |b: BufId| p.buffers[b.0 as usize].shape.clone();
    let s = p.storage(b);
    for step in &p.steps {
        let found = match (&step.kind, step.inputs.as_slice()) {
            (StepKind::Op(Op::Embedding), [table, ids, ..]) if p.storage(*ids) == s => shape(*table).first().copied(),
            (StepKind::Op(Op::EmbeddingGrad), [ids, ..]) if p.storage(*ids) == s => shape(step.output).first().copied(),
            (StepKind::Op(Op::CrossEntropy | Op::CrossEntropyGrad), [logits, labels, ..]) if p.storage(*labels) == s => shape(*logits).last().copied(),
            _ => None,
        };
        if let Some(n) = found {
            return n.max(1);
        }
    }
    1
}

/// Random operand values.
enum Values {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

/// ‖x − ref‖ / ‖ref‖ of step `si` run on `backend` against the CPU.
fn compare(p: &Program, si: usize, backend: &Backend, threads: usize, seed: u64) -> Result<f64, String> {
    let a = alone(p, si);
    let pos = positive(&p.steps[si].kind);
    let mut rng = Xoshiro256::stream(seed, 0x5e1f, si as u64);
    let mut data: Vec<(BufKind, Values)> = Vec::new();
    for (kind, b) in &a.inputs {
        let buf = &a.program.buffers[b.0 as usize];
        let n = buf.len();
        match buf.elem {
            Elem::F32 => {
                let v = (0..n).map(|_| if pos { 0.5 + rng.uniform() } else { rng.uniform() * 2.0 - 1.0 } as f32).collect();
                data.push((kind.clone(), Values::F32(v)));
            }
            Elem::I32 => {
                let m = bound(&a.program, *b) as u64;
                let v = (0..n).map(|_| ((rng.uniform() * m as f64) as u64).min(m - 1) as i32).collect();
                data.push((kind.clone(), Values::I32(v)));
            }
        }
    }
    let run = |backend: &Backend, threads: usize| -> Result<Vec<f32>, EngineError> {
        let mut e: Box<dyn Engine> = shardplan_runtime::backend::engine(backend, a.program.clone(), threads, 1)?;
        for (kind, values) in &data {
            match values {
                Values::F32(f) => e.set(kind, Data::F32(f))?,
                Values::I32(i) => e.set(kind, Data::I32(i))?,
            }
        }
        e.step(&|_| 0.0)?;
        match &a.result {
            Ok(b) => e.buffer(*b),
            Err(kind) => Ok(e.get(kind)?.unwrap_or_default()),
        }
    };
    let reference = run(&Backend::Cpu, threads).map_err(|e| format!("on the CPU: {e}"))?;
    let other = run(backend, 1).map_err(|e| e.to_string())?;
    if reference.len() != other.len() {
        return Err(format!("{} values against the CPU's {}", other.len(), reference.len()));
    }
    Ok(difference(&reference, &other))
}

/// ‖x − ref‖ / ‖ref‖ in f64; a value non-finite on one side only counts as infinite.
fn difference(reference: &[f32], x: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&r, &v) in reference.iter().zip(x) {
        match (r.is_finite(), v.is_finite()) {
            (true, true) => {
                num += (v as f64 - r as f64).powi(2);
                den += (r as f64).powi(2);
            }
            (false, false) if r.is_nan() == v.is_nan() && (r.is_nan() || r == v) => {}
            _ => return f64::INFINITY,
        }
    }
    if num == 0.0 {
        0.0
    } else {
        num.sqrt() / den.sqrt().max(1e-30)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn difference_is_normwise_and_strict_on_non_finite_values() {
        assert_eq!(difference(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((difference(&[3.0, 4.0], &[3.0, 4.5]) - 0.1).abs() < 1e-12);
        assert_eq!(difference(&[1.0], &[f32::NAN]), f64::INFINITY);
        assert_eq!(difference(&[f32::NAN], &[f32::NAN]), 0.0);
        assert_eq!(difference(&[f32::INFINITY], &[f32::NEG_INFINITY]), f64::INFINITY);
    }
}
