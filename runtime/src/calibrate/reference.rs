//! The reference steps calibration runs, and how it times them.
//!
//! Input: the reference plans (fixed source text) and this machine. Output:
//! measured seconds: a reference step on one executor (split between the
//! classes of kernel in the proportions a profiled run finds), several
//! single-threaded executors side by side, and a partitioned plan run over
//! more devices than cores.
//!
//! Invariants: every step runs on fixed pseudo-random data (the same on
//! every run), after warm-up steps, and the figure reported is the median
//! of many steps, so one slow step does not move it.

use super::CalibrateError;
use crate::backend::cpu::exec::Executor;
use shardplan_compiler::check::Checked;
use shardplan_compiler::graph::Graph;
use shardplan_compiler::kernel::Program;
use shardplan_compiler::partition::Plan;
use shardplan_compiler::planner::KernelClass;
use shardplan_compiler::{Compiled, Diagnostics, Options, Target};

/// Reference steps: one compute-bound, one dominated by fixed costs, and a
/// small transformer (attention's transposes, softmax and norms).
/// Each with the bound of its integer inputs (classes, vocabulary).
pub(super) const REFERENCES: [(&str, i32); 3] = [
    (
        "model Big { input x: f32[batch, 512]  input y: i32[batch]  layer a = Linear(512, 1024)  layer b = Linear(1024, 512)  layer c = Linear(512, 16)  loss cross_entropy(c(relu(b(relu(a(x))))), y) }
data d = synthetic(rows: 512, features: 512, classes: 16)
train { model: Big, data: d, batch: 256, steps: 1, optimizer: adam(lr: 0.001) }",
        16,
    ),
    (
        "model Small { input x: f32[batch, 16]  input y: i32[batch]  layer a = Linear(16, 16)  layer b = Linear(16, 16)  layer c = Linear(16, 4)  loss cross_entropy(c(relu(b(relu(a(x))))), y) }
data d = synthetic(rows: 64, features: 16, classes: 4)
train { model: Small, data: d, batch: 8, steps: 1, optimizer: adam(lr: 0.001) }",
        4,
    ),
    (
        "model G { input tokens: i32[batch, seq]  input targets: i32[batch, seq]  layer embed = Embedding(256, 64)  layer pos = PositionalEmbedding(seq, 64)  layer blocks = repeat 2 Block(64, 4)  layer ln = LayerNorm(64)  layer head = Linear(64, 256)  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets) }
data d = text(\"reference.txt\")
train { model: G, data: d, batch: 8, seq: 64, steps: 1, optimizer: adam(lr: 0.001) }",
        256,
    ),
];

/// The references by name, in the order of [`REFERENCES`].
pub(super) const NAMES: [&str; 3] = ["compute-bound MLP", "tiny MLP", "small transformer"];

/// A reference plan through the compiler driver with `o`; `what` names it
/// in the error when it does not check or compile.
fn compiled(src: &str, what: &'static str, o: &Options) -> Result<Compiled, CalibrateError> {
    let messages = |d: Diagnostics| d.iter().map(|d| d.message.clone()).collect();
    let (c, d) = shardplan_compiler::check_source(src.as_bytes());
    let c = c.ok_or_else(|| CalibrateError::Check { what, messages: messages(d) })?;
    shardplan_compiler::compile(&c, o).map_err(|d| CalibrateError::Compile { what, messages: messages(d) })
}

/// A reference's checked plan, training graph and one device's program.
pub(super) fn one_device(src: &str, what: &'static str) -> Result<(Checked, Graph, Program), CalibrateError> {
    let c = compiled(src, what, &Options { single_device: true, ..Default::default() })?;
    match c.target {
        Target::One(p) => Ok((c.checked, c.graph, p)),
        Target::Placed(_) => Err(CalibrateError::Compile { what, messages: vec!["compiled for one device, it was partitioned".into()] }),
    }
}

/// A placed reference's checked plan, training graph and device programs.
pub(super) fn placed(src: &str, what: &'static str) -> Result<(Checked, Graph, Plan), CalibrateError> {
    let c = compiled(src, what, &Options::default())?;
    match c.target {
        Target::Placed(plan) => Ok((c.checked, c.graph, plan)),
        Target::One(_) => Err(CalibrateError::Compile { what, messages: vec!["it has no placement".into()] }),
    }
}

/// The class of each step of `program`.
pub(super) fn kernel_classes(program: &Program) -> Vec<KernelClass> {
    program.steps.iter().map(KernelClass::of).collect()
}

/// A reference step of `program` on `threads` threads, on fixed
/// pseudo-random data (integer inputs below `bound`): the median step's
/// seconds, split between the classes of kernel (by
/// [`KernelClass::index`]) in the proportions a profiled run finds.
pub(super) fn measure_step(program: &Program, threads: usize, bound: i32) -> Result<[f64; 3], CalibrateError> {
    let mut exec = prepared(program, threads, bound)?;
    let mut times = run_steps(&mut exec, 25)?;
    times.sort_by(f64::total_cmp);
    let total = times[times.len() / 2];
    exec.enable_profile();
    run_steps(&mut exec, 10)?;
    let mut by_class = [0.0; 3];
    for (k, t) in kernel_classes(program).into_iter().zip(exec.profile()) {
        by_class[k.index()] += t;
    }
    let all: f64 = by_class.iter().sum();
    Ok(if all > 0.0 { by_class.map(|t| total * t / all) } else { [0.0, 0.0, total] })
}

/// The small transformer reference over `n` devices, `n / 4` data-parallel
/// replicas of two rows each (per microbatch), each either split in
/// Megatron pairs over two devices and again over two (`pipelined` false),
/// or a pipeline of four stages over four microbatches: synchronous
/// collectives or streaming transfers, the two ways devices wait on each
/// other.
pub(super) fn crowded_plan(n: usize, pipelined: bool) -> String {
    let data = (n / 4).max(1);
    let (batch, layout) = if pipelined {
        (
            8 * data,
            format!(
                "mesh (data: {data}, pipe: 4)
  data_parallel over data
  pipeline over pipe {{
    stage embed, pos
    stage blocks[0]
    stage blocks[1]
    stage ln, head
    microbatches 4
    schedule 1f1b
  }}"
            ),
        )
    } else {
        (
            2 * data,
            format!(
                "mesh (data: {data}, model: 2, pipe: 2)
  data_parallel over data
  shard blocks[*].attn.wq (_, model)
  shard blocks[*].attn.wk (_, model)
  shard blocks[*].attn.wv (_, model)
  shard blocks[*].attn.wo (model, _)
  shard blocks[*].mlp.up.w (_, model)
  shard blocks[*].mlp.up.b (model)
  shard blocks[*].mlp.down.w (model, _)
  pipeline over pipe {{
    stage embed, pos, blocks[0]
    stage blocks[1], ln, head
    microbatches 1
  }}"
            ),
        )
    };
    format!(
        "model G {{ input tokens: i32[batch, seq]  input targets: i32[batch, seq]  layer embed = Embedding(256, 64)  layer pos = PositionalEmbedding(seq, 64)  layer blocks = repeat 2 Block(64, 4)  layer ln = LayerNorm(64)  layer head = Linear(64, 256)  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets) }}
data d = text(\"reference.txt\")
train {{ model: G, data: d, batch: {batch}, seq: 64, steps: 1, optimizer: adam(lr: 0.001) }}
devices cpu x {n}
placement {{
  {layout}
}}"
    )
}

/// The median step of a partitioned plan run over its devices (`threads`
/// kernel threads shared out among them), on pseudo-random tokens.
pub(super) fn cluster_step(plan: shardplan_compiler::partition::Plan, n: usize, threads: usize) -> Result<f64, CalibrateError> {
    use crate::cluster::Hypers;
    use crate::data::Batch;
    use crate::session::{Backends, Runner};
    // The training session's runner, as `run` drives it.
    let mut cl = Runner::start(shardplan_compiler::Target::Placed(plan), threads, &Backends::cpu(), false, std::time::Duration::from_secs(60))
        .map_err(|e| CalibrateError::Run(e.to_string()))?;
    let seq = 64;
    let batch = |rows: &[usize]| {
        let tokens: Vec<i32> = rows.iter().flat_map(|&r| (0..seq).map(move |i| ((r * 131 + i * 7919) % 256) as i32)).collect();
        let targets = tokens.iter().map(|t| (t + 1) % 256).collect();
        Batch::Text { tokens, targets }
    };
    let rows: Vec<usize> = (0..n).collect();
    let hyper = Hypers { lr: 0.001, bias_correction1: 1.0, bias_correction2: 1.0, step: 0 };
    let mut times = Vec::new();
    for step in 0..25 {
        let t = std::time::Instant::now();
        cl.step(step, hyper, &rows, &batch, None).map_err(|e| CalibrateError::Run(e.to_string()))?;
        if step >= 5 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The median step of `program` when `k` single-threaded executors run it
/// at once, each on its own thread.
pub(super) fn side_by_side(program: &Program, bound: i32, k: usize) -> Result<f64, CalibrateError> {
    let mut execs = (0..k).map(|_| prepared(program, 1, bound)).collect::<Result<Vec<_>, _>>()?;
    let results: Vec<Result<Vec<f64>, CalibrateError>> = std::thread::scope(|s| {
        let handles: Vec<_> = execs.iter_mut().map(|e| s.spawn(move || run_steps(e, 25))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or(Err(CalibrateError::Panicked))).collect()
    });
    let mut times = Vec::new();
    for r in results {
        times.extend(r?);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// An executor of `program` on `threads` threads, its parameters, state and
/// inputs filled with fixed pseudo-random data.
fn prepared(program: &Program, threads: usize, bound: i32) -> Result<Executor, CalibrateError> {
    use crate::engine::Data;
    use shardplan_compiler::kernel::BufKind;
    let mut exec = Executor::new(program.clone(), threads).map_err(|e| CalibrateError::Run(e.to_string()))?;
    for b in &program.buffers {
        let n = b.len();
        let r = match (&b.kind, b.elem) {
            (BufKind::Param(_) | BufKind::Input(_) | BufKind::State(_), shardplan_compiler::kernel::Elem::F32) => {
                let v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
                exec.set(&b.kind, Data::F32(&v))
            }
            (BufKind::Input(_), _) => exec.set(&b.kind, Data::I32(&(0..n).map(|i| (i * 7919 % 65521) as i32 % bound).collect::<Vec<_>>())),
            _ => Ok(()),
        };
        r.map_err(|e| CalibrateError::Run(e.to_string()))?;
    }
    Ok(exec)
}

/// Runs `n` steps; the seconds of each.
fn run_steps(exec: &mut Executor, n: usize) -> Result<Vec<f64>, CalibrateError> {
    let hyper = |_| 0.001;
    let mut times = Vec::new();
    for _ in 0..n {
        let t = std::time::Instant::now();
        exec.step(&hyper).map_err(|e| CalibrateError::Run(e.to_string()))?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}
