//! The kernel self-test: every step of a plan's programs run alone on random
//! operands, on a backend and on the CPU, and the two results compared.
//!
//! Input: a checked plan, whose programs [`programs`] compiles through the
//! driver (the single-device training step and, for an explicit
//! placement, every device's program), and [`Options`]: the backend, the
//! seed of the operands, the CPU reference's threads. Output: per program
//! a [`ProgramReport`]: for each step tested, the norm-wise difference
//! ‖x − ref‖ / ‖ref‖ of its result from the CPU's, or the engine's error
//! ([`StepError`]); [`Counts`] sums reports against a tolerance.
//!
//! Each step runs alone: a program holding only the step and the buffers it
//! touches, its operands random (f32 in −1..1, or 0.5..1.5 when the step
//! takes logarithms, roots or quotients; ids and labels within the table or
//! the classes of the op reading them). The CPU executor on `threads`
//! threads is the reference; the backend runs on one thread, so
//! `Backend::Cpu` compares the CPU on one thread against itself on all.
//! Transfers and collectives are not kernels and are skipped.
//!
//! Invariants: both sides are built by `backend::engine` from the same
//! one-step program and the same operands; a step's operands depend only on
//! the seed and the step's index in its program; a step computing the same
//! thing on the same shapes as one a [`Selftest`] tested before (in any
//! program) is not run again.

use crate::data::rng::Xoshiro256;
use crate::engine::{Backend, Data, Engine, EngineError};
use shardplan_compiler::check::Placement;
use shardplan_compiler::graph::{Op, Role};
use shardplan_compiler::kernel::{Binary, BufId, BufKind, Buffer, Elem, Inst, Program, Step, StepKind, Unary};
use shardplan_compiler::{Checked, Diagnostics, Target};
use std::collections::HashSet;

/// The programs of one plan to test.
#[derive(Clone, Debug)]
pub struct Programs {
    /// (name, program): the single-device training step, named
    /// `NAME (one device)`, then each device's program, `NAME device D`.
    pub programs: Vec<(String, Program)>,
    /// Why only the single-device program is there, for a plan with a placement.
    pub single_only: Option<SingleOnly>,
}

/// Why the self-test leaves a placed plan's device programs out.
#[derive(Clone, Debug)]
pub enum SingleOnly {
    /// `placement auto`: the placement chosen depends on the machine's
    /// device profile.
    Auto,
    /// The placed plan does not compile (the driver's diagnostics).
    NotCompiled(Diagnostics),
}

/// The programs of the checked plan `c`, named after `name`, compiled by
/// the driver; the driver's diagnostics when the single-device training
/// step does not compile.
pub fn programs(name: &str, c: &Checked) -> Result<Programs, Diagnostics> {
    let one = shardplan_compiler::compile(c, &shardplan_compiler::Options { single_device: true, ..Default::default() })?;
    let mut programs = named(name, one.target);
    let single_only = match &c.placement {
        Placement::Explicit(_) => match shardplan_compiler::compile(c, &Default::default()) {
            Ok(placed) => {
                programs.extend(named(name, placed.target));
                None
            }
            Err(d) => Some(SingleOnly::NotCompiled(d)),
        },
        Placement::Auto { .. } => Some(SingleOnly::Auto),
        Placement::Single => None,
    };
    Ok(Programs { programs, single_only })
}

fn named(name: &str, target: Target) -> Vec<(String, Program)> {
    match target {
        Target::One(p) => vec![(format!("{name} (one device)"), p)],
        Target::Placed(plan) => plan.devices.into_iter().map(|d| (format!("{name} device {}", d.device), d.program)).collect(),
    }
}

/// How to test.
#[derive(Clone, Debug)]
pub struct Options {
    /// The backend tested against the CPU.
    pub backend: Backend,
    /// The seed of the random operands.
    pub seed: u64,
    /// Kernel threads of the CPU reference.
    pub threads: usize,
}

/// Why a step could not be compared.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum StepError {
    /// The CPU reference failed.
    #[error("on the CPU: {0}")]
    Reference(EngineError),
    /// The backend tested failed, as it reports it.
    #[error("{0}")]
    Backend(EngineError),
    /// The backend's result has another length than the CPU's.
    #[error("{got} values against the CPU's {want}")]
    Length { got: usize, want: usize },
}

/// One step tested.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// The step's index in its program.
    pub index: usize,
    /// What it computes, as the executors name kernels in messages.
    pub what: String,
    /// The shapes of its operands and of its result.
    pub inputs: Vec<Vec<usize>>,
    pub output: Vec<usize>,
    /// ‖x − ref‖ / ‖ref‖ of the backend's result x against the CPU's.
    pub result: Result<f64, StepError>,
}

impl StepReport {
    /// Whether the step ran on both sides and differs by at most `tolerance`.
    pub fn within(&self, tolerance: f64) -> bool {
        matches!(self.result, Ok(d) if d <= tolerance)
    }
}

/// One program tested.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramReport {
    pub name: String,
    /// Its steps, in all.
    pub steps: usize,
    /// Steps the self-test had tested before, in this or another program.
    pub repeated: usize,
    /// Transfers and collectives, skipped.
    pub transfers: usize,
    /// The steps tested, in program order.
    pub tested: Vec<StepReport>,
}

impl ProgramReport {
    /// This program's counts against `tolerance`.
    pub fn counts(&self, tolerance: f64) -> Counts {
        let mut c = Counts { programs: 1, steps: self.tested.len(), transfers: self.transfers, ..Counts::default() };
        for s in &self.tested {
            match s.result {
                Ok(d) => {
                    c.worst = c.worst.max(d);
                    if s.within(tolerance) {
                        c.ok += 1;
                    } else {
                        c.over += 1;
                    }
                }
                Err(_) => c.failed += 1,
            }
        }
        c
    }
}

/// Programs and steps counted against a tolerance.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub programs: usize,
    /// Steps tested.
    pub steps: usize,
    /// Steps within the tolerance, over it, and failed to run.
    pub ok: usize,
    pub over: usize,
    pub failed: usize,
    /// Transfers and collectives skipped.
    pub transfers: usize,
    /// The largest difference of a step that ran.
    pub worst: f64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.programs += other.programs;
        self.steps += other.steps;
        self.ok += other.ok;
        self.over += other.over;
        self.failed += other.failed;
        self.transfers += other.transfers;
        self.worst = self.worst.max(other.worst);
    }
}

/// A self-test: remembers the steps tested, so that a step repeated in
/// several programs runs once.
pub struct Selftest {
    options: Options,
    seen: HashSet<String>,
}

impl Selftest {
    pub fn new(options: Options) -> Selftest {
        Selftest { options, seen: HashSet::new() }
    }

    /// Tests every step of `p` (named `name` in the report) not tested before.
    pub fn program(&mut self, name: &str, p: &Program) -> ProgramReport {
        let mut r = ProgramReport { name: name.to_string(), steps: p.steps.len(), repeated: 0, transfers: 0, tested: Vec::new() };
        let shape = |b: &BufId| p.buffers[b.0 as usize].shape.clone();
        for (si, step) in p.steps.iter().enumerate() {
            if matches!(&step.kind, StepKind::Op(op) if op.is_comm()) {
                r.transfers += 1;
                continue;
            }
            let buf = |b: &BufId| {
                let x = &p.buffers[b.0 as usize];
                (x.elem, x.shape.clone(), matches!(x.kind, BufKind::Const(_)).then(|| format!("{:?}", x.kind)))
            };
            let key = format!("{:?} {:?} {:?}", step.kind, step.inputs.iter().map(buf).collect::<Vec<_>>(), buf(&step.output));
            if !self.seen.insert(key) {
                r.repeated += 1;
                continue;
            }
            let o = &self.options;
            let result = compare(p, si, &o.backend, o.threads, o.seed ^ (si as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            r.tested.push(StepReport {
                index: si,
                what: crate::backend::cuda::exec::describe(&step.kind),
                inputs: step.inputs.iter().map(shape).collect(),
                output: shape(&step.output),
                result,
            });
        }
        r
    }
}

/// A program of step `si` of `p` alone: the buffers it touches (renumbered),
/// its operands turned into inputs, its result the loss. Holds the program,
/// the inputs' kinds and buffers, and where the result is read.
struct Alone {
    program: Program,
    inputs: Vec<(BufKind, BufId)>,
    result: Result<BufId, BufKind>,
}

fn alone(p: &Program, si: usize) -> Alone {
    let step = &p.steps[si];
    // A bfloat16 conversion is compared as the round trip f32 → bf16 → f32,
    // so that both sides read and write f32 only.
    if let StepKind::Op(Op::ToBf16 | Op::FromBf16) = &step.kind {
        let old = &p.buffers[step.output.0 as usize];
        let buf = |kind: BufKind, elem: Elem| Buffer { kind, elem, shape: old.shape.clone(), node: old.node };
        let buffers = vec![buf(BufKind::Input(0), Elem::F32), buf(BufKind::Temp, Elem::Bf16), buf(BufKind::Temp, Elem::F32)];
        let st = |op: Op, i: u32, o: u32| Step { kind: StepKind::Op(op), role: Role::Forward, inputs: vec![BufId(i)], output: BufId(o) };
        let steps = vec![st(Op::ToBf16, 0, 1), st(Op::FromBf16, 1, 2)];
        return Alone { program: Program { buffers, steps, loss: BufId(2), assigns: Vec::new() }, inputs: vec![(BufKind::Input(0), BufId(0))], result: Ok(BufId(2)) };
    }
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
    body.iter().any(|i| matches!(i, Inst::Unary(Unary::Log | Unary::Sqrt | Unary::ClipScale(_), _) | Inst::Binary(Binary::Div, _, _)))
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
fn compare(p: &Program, si: usize, backend: &Backend, threads: usize, seed: u64) -> Result<f64, StepError> {
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
            // (Conversions are compared through f32: see `alone`.)
            Elem::Bf16 => {}
            Elem::I32 => {
                let m = bound(&a.program, *b) as u64;
                let v = (0..n).map(|_| ((rng.uniform() * m as f64) as u64).min(m - 1) as i32).collect();
                data.push((kind.clone(), Values::I32(v)));
            }
        }
    }
    let run = |backend: &Backend, threads: usize| -> Result<Vec<f32>, EngineError> {
        let mut e: Box<dyn Engine> = crate::backend::engine(backend, a.program.clone(), threads, 1)?;
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
    let reference = run(&Backend::Cpu, threads).map_err(StepError::Reference)?;
    let other = run(backend, 1).map_err(StepError::Backend)?;
    if reference.len() != other.len() {
        return Err(StepError::Length { got: other.len(), want: reference.len() });
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

    #[test]
    fn counts_sort_steps_by_the_tolerance() {
        let step = |index, result| StepReport { index, what: "relu".into(), inputs: vec![vec![2]], output: vec![2], result };
        let r = ProgramReport {
            name: "p".into(),
            steps: 5,
            repeated: 1,
            transfers: 1,
            tested: vec![step(0, Ok(0.0)), step(1, Ok(1e-3)), step(2, Err(StepError::Length { got: 1, want: 2 }))],
        };
        let c = r.counts(1e-5);
        assert_eq!(c, Counts { programs: 1, steps: 3, ok: 1, over: 1, failed: 1, transfers: 1, worst: 1e-3 });
        let mut total = Counts::default();
        total.add(&c);
        total.add(&c);
        assert_eq!((total.programs, total.steps, total.failed, total.worst), (2, 6, 2, 1e-3));
        assert_eq!(r.tested[2].result.as_ref().unwrap_err().to_string(), "1 values against the CPU's 2");
    }
}
