//! Measures what the CPU devices of this machine can do, for the planner's
//! cost model: the matmul rate of one core, the element-wise bandwidth of one
//! core, and the bandwidth and latency of a transfer between two devices.
//!
//! Input: nothing but the machine. Output: the raw rates ([`Measured`]),
//! before any fit. Invariants: each figure is the best (or, for latency,
//! the mean) of several timed runs of fixed work, so a slow run does not
//! count against the machine; the rates are per second, the costs in
//! seconds. A kernel or a transfer that fails is a [`MeasureError`].

use crate::backend::cpu::jit::Jit;
use crate::backend::cpu::{ops, Arg, Operand};
use crate::engine::EngineError;
use crate::transport::{Fabric, Header, Message, TransportError};
use shardplan_compiler::kernel::{Binary, Fused, Inst};
use std::time::Instant;

/// What was measured (rates per second, latency in seconds).
#[derive(Clone, Debug)]
pub struct Measured {
    /// (matrix size, FLOP/s) for square matmuls on one thread.
    pub matmul: Vec<(usize, f64)>,
    pub elementwise_bytes: f64,
    /// (working set in bytes, bytes/s) of an element-wise kernel on one
    /// thread: small working sets stay in the caches.
    pub elementwise: Vec<(usize, f64)>,
    pub link_bytes: f64,
    pub link_latency: f64,
    pub cores: usize,
    /// Seconds per call of a tiny kernel.
    pub op_overhead: f64,
}

/// Why the measurements failed: a kernel or executor run, or a transfer
/// between the two devices.
#[derive(Clone, Debug, thiserror::Error)]
pub enum MeasureError {
    /// A kernel, the JIT or the executor failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A transfer between the two measuring devices failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The fabric of two devices has fewer than two.
    #[error("no fabric")]
    NoFabric,
    /// The device answering the transfers stopped.
    #[error("the echo device stopped")]
    EchoStopped,
}

fn best_of(runs: usize, mut f: impl FnMut() -> Result<(), EngineError>) -> Result<f64, EngineError> {
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

pub fn measure() -> Result<Measured, MeasureError> {
    // [256, n] · [n, n], the shape of a layer applied to a batch of rows.
    let mut matmul = Vec::new();
    for n in [16usize, 32, 64, 128, 256, 512, 1024] {
        let rows = 256;
        let a = vec![0.5f32; rows * n];
        let b = vec![0.25f32; n * n];
        let mut c = vec![0.0f32; rows * n];
        let (sa, sb) = ([rows, n], [n, n]);
        let reps = (1 << 24) / (rows * n * n).max(1) + 1;
        let secs = best_of(3, || {
            for _ in 0..reps {
                let (x, y) = (Operand { data: Arg::F32(&a), shape: &sa }, Operand { data: Arg::F32(&b), shape: &sb });
                ops::matmul(&x, false, &y, false, &mut c, &sa, 1)?;
            }
            Ok(())
        })?;
        matmul.push((n, 2.0 * (rows * n * n * reps) as f64 / secs));
    }
    // out = x + y: 12 bytes moved per element, over 8K elements to 4M, the
    // same buffers again and again: the rate of a device whose whole
    // working set is that large (small ones stay in the caches).
    let mut jit = Jit::new()?;
    let mut elementwise = Vec::new();
    for len in [1usize << 13, 1 << 16, 1 << 19, 1 << 22] {
        let k = jit.compile(&Fused {
            rows: 1,
            cols: len,
            row_strides: vec![0, 0],
            col_strides: vec![1, 1],
            body: vec![Inst::Load(0), Inst::Load(1), Inst::Binary(Binary::Add, 0, 1)],
        })?;
        let (x, y) = (vec![1.0f32; len], vec![2.0f32; len]);
        let mut out = vec![0.0f32; len];
        let reps = (1 << 22) / len;
        let secs = best_of(5, || {
            for _ in 0..reps {
                k.run(&[&x, &y], &mut out)?;
            }
            Ok(())
        })?;
        elementwise.push((12 * len, 12.0 * (len * reps) as f64 / secs));
    }
    let elementwise_bytes = elementwise.last().map(|x| x.1).unwrap_or(1.0);
    // What a kernel costs beyond its work: a program of 400 steps on
    // 64-element buffers, run by the executor.
    let op_overhead = {
        use shardplan_compiler::graph::{NodeId, Op, Role};
        use shardplan_compiler::kernel::{BufId, BufKind, Buffer, Elem, Program, Step, StepKind};
        let steps = 400;
        let buf = |kind| Buffer { kind, elem: Elem::F32, shape: vec![64], node: NodeId(0) };
        let mut buffers = vec![buf(BufKind::Const(1.0))];
        let mut prog_steps = Vec::new();
        for i in 0..steps {
            buffers.push(buf(BufKind::Temp));
            let kind = if i % 2 == 0 {
                StepKind::Op(Op::Softmax { axis: 0 })
            } else {
                StepKind::Fused(Fused {
                    rows: 1,
                    cols: 64,
                    row_strides: vec![0],
                    col_strides: vec![1],
                    body: vec![Inst::Load(0), Inst::Unary(shardplan_compiler::kernel::Unary::Exp, 0)],
                })
            };
            prog_steps.push(Step { kind, role: Role::Forward, inputs: vec![BufId(i as u32)], output: BufId(i as u32 + 1) });
        }
        let program = Program { buffers, steps: prog_steps, loss: BufId(0), assigns: Vec::new() };
        let mut exec = crate::backend::cpu::exec::Executor::new(program, 1)?;
        let secs = best_of(5, || exec.step(&|_| 0.0).map(|_| ()))?;
        secs / steps as f64
    };
    // Two devices: ping-pong of 4 bytes (latency) and one-way 16 MiB messages (bandwidth).
    let mut eps = Fabric::new(2).into_iter();
    let (Some(a), Some(b)) = (eps.next(), eps.next()) else { return Err(MeasureError::NoFabric) };
    let rounds = 200u64;
    let big = 1usize << 22;
    let echo = std::thread::spawn(move || -> Result<(), TransportError> {
        for i in 0..rounds {
            let h = Header { plan: 0, instr: 1, seq: i, kind: "ping".into() };
            let d = b.recv(0, &h)?;
            b.send(0, Message { header: Header { kind: "pong".into(), ..h }, data: d })?;
        }
        for i in 0..4 {
            let h = Header { plan: 0, instr: 2, seq: i, kind: "bulk".into() };
            b.recv(0, &h)?;
            b.send(0, Message { header: Header { kind: "ack".into(), ..h }, data: vec![] })?;
        }
        Ok(())
    });
    let t = Instant::now();
    for i in 0..rounds {
        let h = Header { plan: 0, instr: 1, seq: i, kind: "ping".into() };
        a.send(1, Message { header: h.clone(), data: vec![1.0] })?;
        a.recv(1, &Header { kind: "pong".into(), ..h })?;
    }
    let link_latency = t.elapsed().as_secs_f64() / (2 * rounds) as f64;
    let mut best = f64::INFINITY;
    let payload = vec![1.0f32; big];
    for i in 0..4 {
        let h = Header { plan: 0, instr: 2, seq: i, kind: "bulk".into() };
        let t = Instant::now();
        // A transfer is a copy into a message and a copy out of it.
        let data = payload.clone();
        a.send(1, Message { header: h.clone(), data })?;
        a.recv(1, &Header { kind: "ack".into(), ..h })?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    echo.join().map_err(|_| MeasureError::EchoStopped)??;
    let link_bytes = 4.0 * big as f64 / best;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Ok(Measured { matmul, elementwise_bytes, elementwise, link_bytes, link_latency, cores, op_overhead })
}
