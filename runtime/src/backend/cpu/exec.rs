//! The CPU executor: runs a kernel [`Program`] on the CPU backend, step after
//! step. It is one of the two [`Engine`]s (the other is the CUDA backend's
//! GPU executor); `backend::engine` chooses one per device.
//!
//! Input: a program, the number of kernel threads and of buffer sets (one
//! per microbatch in flight), then the values of its sources. Output: the
//! loss (and any kept buffers) of each step, with parameters and optimizer
//! states updated in place by the program's assignments at the end of the
//! step; every failure is an [`EngineError`].
//!
//! Memory: every buffer is allocated once, when the executor is built, and
//! reused by every step; reshapes share their operand's memory; the buffers
//! [`Program::banked`] names get one copy per buffer set. Fused kernels are
//! compiled once, at build time. Work is split over threads in fixed
//! contiguous blocks, so results do not depend on timing.

use super::jit::{CompiledKernel, Jit};
use super::{ops, Arg, Operand};
use crate::engine::{Alone, Comm, Data, Engine, EngineError};
use shardplan_compiler::graph::{Hyper, Op, Role};
use shardplan_compiler::kernel::{BufId, BufKind, Elem, Program, StepKind};

/// The memory of one buffer.
#[derive(Clone, Debug)]
enum Storage {
    F32(Vec<f32>),
    I32(Vec<i32>),
    /// bfloat16 bits (`autocast bf16`).
    Bf16(Vec<u16>),
    /// Uses another buffer's memory (a reshape).
    Alias,
}

pub struct Executor {
    /// Seconds spent in each step, summed over runs (when profiling).
    profile: Option<Vec<f64>>,
    program: Program,
    storage: Vec<Storage>,
    /// Buffer sets of microbatches 1.. in flight (only banked buffers are used).
    banks: Vec<Vec<Storage>>,
    /// Per buffer: one copy per microbatch in flight ([`Program::banked`]).
    banked: Vec<bool>,
    kernels: Vec<Option<CompiledKernel>>,
    threads: usize,
    /// Kept alive as long as the compiled kernels are used.
    _jit: Jit,
}

/// Elements below which a fused kernel runs on one thread.
const PARALLEL_MIN: usize = 1 << 16;

impl Executor {
    /// Allocates every buffer and compiles every fused kernel.
    pub fn new(program: Program, threads: usize) -> Result<Executor, EngineError> {
        Executor::with_slots(program, threads, 1)
    }

    /// As [`Executor::new`], with `slots` sets of forward/backward buffers,
    /// one per microbatch in flight.
    pub fn with_slots(program: Program, threads: usize, slots: usize) -> Result<Executor, EngineError> {
        let mut jit = Jit::new()?;
        let storage: Vec<Storage> = program
            .buffers
            .iter()
            .map(|b| match (&b.kind, b.elem) {
                (BufKind::Alias(_), _) => Storage::Alias,
                (BufKind::Const(c), Elem::F32) => Storage::F32(vec![*c as f32; b.len()]),
                (BufKind::Const(c), Elem::I32) => Storage::I32(vec![*c as i32; b.len()]),
                (_, Elem::F32) => Storage::F32(vec![0.0; b.len()]),
                (_, Elem::I32) => Storage::I32(vec![0; b.len()]),
                (_, Elem::Bf16) => Storage::Bf16(vec![0; b.len()]),
            })
            .collect();
        let mut kernels = Vec::with_capacity(program.steps.len());
        for s in &program.steps {
            kernels.push(match &s.kind {
                StepKind::Fused(f) | StepKind::Reduce { epilogue: f, .. } => Some(jit.compile(f)?),
                _ => None,
            });
        }
        let banked = program.banked();
        let banks = (1..slots.max(1)).map(|_| storage.iter().enumerate().map(|(i, s)| if banked[i] { s.clone() } else { Storage::Alias }).collect()).collect();
        Ok(Executor { profile: None, program, storage, banks, banked, kernels, threads: threads.max(1), _jit: jit })
    }

    /// The storage index and bank of buffer `b` in `slot`.
    fn loc(&self, b: BufId, slot: usize) -> (usize, usize) {
        let i = self.program.storage(b).0 as usize;
        (if slot == 0 || !self.banked[i] { 0 } else { slot }, i)
    }

    fn at(&self, (bank, i): (usize, usize)) -> &Storage {
        if bank == 0 {
            &self.storage[i]
        } else {
            &self.banks[bank - 1][i]
        }
    }

    fn at_mut(&mut self, l: (usize, usize)) -> &mut Storage {
        slot_mut(&mut self.storage, &mut self.banks, l)
    }

    /// Sets an input (or any buffer of `kind`) in buffer set `slot`.
    pub fn set_in(&mut self, slot: usize, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError> {
        let Some(i) = self.find(kind) else { return Ok(()) };
        let l = self.loc(BufId(i as u32), slot);
        match (self.at_mut(l), data) {
            (Storage::F32(dst), Data::F32(src)) if dst.len() == src.len() => dst.copy_from_slice(src),
            (Storage::I32(dst), Data::I32(src)) if dst.len() == src.len() => dst.copy_from_slice(src),
            _ => return Err(EngineError::Bug(format!("{kind:?} in buffer set {slot} does not match the data given"))),
        }
        Ok(())
    }

    /// The loss as computed in buffer set `slot`.
    pub fn loss_in(&self, slot: usize) -> f32 {
        match self.at(self.loc(self.program.loss, slot)) {
            Storage::F32(v) => v.first().copied().unwrap_or(f32::NAN),
            _ => f32::NAN,
        }
    }

    /// Starts a step: fills the hypers and zeroes the gradient accumulators.
    pub fn begin_step(&mut self, hyper: &dyn Fn(Hyper) -> f64) {
        for (i, b) in self.program.buffers.iter().enumerate() {
            match (&b.kind, &mut self.storage[i]) {
                (BufKind::Hyper(h), Storage::F32(v)) => v.fill(hyper(*h) as f32),
                (BufKind::Accum(_), Storage::F32(v)) => v.fill(0.0),
                _ => {}
            }
        }
    }

    /// Runs the steps of one pass (`role`) in buffer set `slot`.
    pub fn run_phase(&mut self, role: Role, slot: usize, comm: &mut dyn Comm) -> Result<(), EngineError> {
        for si in 0..self.program.steps.len() {
            if self.program.steps[si].role != role {
                continue;
            }
            let t = self.profile.is_some().then(std::time::Instant::now);
            self.run_step_in(si, slot, comm)?;
            if let (Some(p), Some(t)) = (self.profile.as_mut(), t) {
                p[si] += t.elapsed().as_secs_f64();
            }
        }
        Ok(())
    }

    /// Bytes of every buffer this executor holds, buffer sets included.
    pub fn bytes(&self) -> u64 {
        let size = |s: &Storage| match s {
            Storage::F32(v) => 4 * v.len() as u64,
            Storage::I32(v) => 4 * v.len() as u64,
            Storage::Bf16(v) => 2 * v.len() as u64,
            Storage::Alias => 0,
        };
        self.storage.iter().chain(self.banks.iter().flatten()).map(size).sum()
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// Starts timing every step.
    pub fn enable_profile(&mut self) {
        self.profile = Some(vec![0.0; self.program.steps.len()]);
    }

    /// Seconds spent in each step so far (empty unless profiling).
    pub fn profile(&self) -> &[f64] {
        self.profile.as_deref().unwrap_or(&[])
    }

    fn find(&self, want: &BufKind) -> Option<usize> {
        self.program.buffers.iter().position(|b| &b.kind == want)
    }

    /// The f32 data of the buffer holding `kind` (a parameter, a state).
    pub fn get(&self, kind: &BufKind) -> Option<&[f32]> {
        let i = self.find(kind)?;
        match &self.storage[self.program.storage(BufId(i as u32)).0 as usize] {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Sets a parameter, state or input. Values of the wrong length are refused.
    pub fn set(&mut self, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError> {
        let Some(i) = self.find(kind) else {
            // The graph does not read it (a parameter the loss ignores): nothing to set.
            return Ok(());
        };
        let i = self.program.storage(BufId(i as u32)).0 as usize;
        match (&mut self.storage[i], data) {
            (Storage::F32(dst), Data::F32(src)) if dst.len() == src.len() => dst.copy_from_slice(src),
            (Storage::I32(dst), Data::I32(src)) if dst.len() == src.len() => dst.copy_from_slice(src),
            (dst, src) => {
                let have = match dst {
                    Storage::F32(v) => format!("f32 × {}", v.len()),
                    Storage::I32(v) => format!("i32 × {}", v.len()),
                    Storage::Bf16(v) => format!("bf16 × {}", v.len()),
                    Storage::Alias => "an alias".into(),
                };
                let got = match src {
                    Data::F32(v) => format!("f32 × {}", v.len()),
                    Data::I32(v) => format!("i32 × {}", v.len()),
                };
                return Err(EngineError::Bug(format!("{kind:?} holds {have}, was given {got}")));
            }
        }
        Ok(())
    }

    /// The f32 data of buffer `b`.
    pub fn buffer(&self, b: BufId) -> &[f32] {
        match &self.storage[self.program.storage(b).0 as usize] {
            Storage::F32(v) => v,
            _ => &[],
        }
    }

    /// Runs one step: every kernel, then the assignments. Returns the loss.
    pub fn step(&mut self, hyper: &dyn Fn(Hyper) -> f64) -> Result<f32, EngineError> {
        self.begin_step(hyper);
        for si in 0..self.program.steps.len() {
            let t = self.profile.is_some().then(std::time::Instant::now);
            self.run_step_in(si, 0, &mut Alone)?;
            if let (Some(p), Some(t)) = (self.profile.as_mut(), t) {
                p[si] += t.elapsed().as_secs_f64();
            }
        }
        self.finish_step();
        Ok(self.buffer(self.program.loss).first().copied().unwrap_or(f32::NAN))
    }

    /// Ends a step: every parameter and state takes its new value.
    pub fn finish_step(&mut self) {
        // A parameter takes its new value by trading memory with the
        // temporary that holds it (rewritten from scratch next step), so an
        // update costs no copy. Values held elsewhere are copied.
        let mut traded: Vec<usize> = Vec::new();
        for (t, src) in &self.program.assigns {
            let kind = match t {
                shardplan_compiler::graph::Target::Param(i) => BufKind::Param(*i),
                shardplan_compiler::graph::Target::State(i) => BufKind::State(*i),
            };
            let Some(dst) = self.find(&kind) else { continue };
            let dst = self.program.storage(BufId(dst as u32)).0 as usize;
            let src = self.program.storage(*src).0 as usize;
            if src == dst {
                // Updated in place.
                continue;
            }
            let is_temp = self.program.buffers[src].kind == BufKind::Temp;
            if is_temp && !traded.contains(&src) && src != dst {
                traded.push(src);
                let (lo, hi) = (dst.min(src), dst.max(src));
                let (a, b) = self.storage.split_at_mut(hi);
                std::mem::swap(&mut a[lo], &mut b[0]);
            } else if let Storage::F32(v) = &self.storage[src] {
                let v = v.clone();
                if let Storage::F32(d) = &mut self.storage[dst] {
                    d.copy_from_slice(&v);
                }
            }
        }
    }

    fn run_step_in(&mut self, si: usize, slot: usize, comm: &mut dyn Comm) -> Result<(), EngineError> {
        let step = &self.program.steps[si];
        if let StepKind::Op(op @ (Op::ToBf16 | Op::FromBf16)) = &step.kind {
            let (narrow, name) = (*op == Op::ToBf16, op.name());
            let (src, dst) = (step.inputs.first().copied().unwrap_or(BufId(0)), step.output);
            let (src_l, out_l) = (self.loc(src, slot), self.loc(dst, slot));
            let mut out = std::mem::replace(self.at_mut(out_l), Storage::Alias);
            let r = match (self.at(src_l), &mut out) {
                (Storage::F32(x), Storage::Bf16(y)) if narrow && x.len() == y.len() => {
                    ops::to_bf16(x, y, self.threads);
                    Ok(())
                }
                (Storage::Bf16(x), Storage::F32(y)) if !narrow && x.len() == y.len() => {
                    ops::from_bf16(x, y, self.threads);
                    Ok(())
                }
                _ => Err(EngineError::Bug(format!("step {si} ({name}) reads or writes a buffer of the wrong type"))),
            };
            *self.at_mut(out_l) = out;
            return r;
        }
        if let StepKind::Op(Op::Accumulate(k)) = &step.kind {
            let k = *k;
            let src = step.inputs.first().copied().unwrap_or(BufId(0));
            let Some(acc) = self.find(&BufKind::Accum(k)) else { return Ok(()) };
            let (acc_l, src_l) = (self.loc(BufId(acc as u32), 0), self.loc(src, slot));
            let mut dst = match std::mem::replace(self.at_mut(acc_l), Storage::Alias) {
                Storage::F32(v) => v,
                other => {
                    *self.at_mut(acc_l) = other;
                    return Err(EngineError::Bug(format!("accumulator {k} is not f32")));
                }
            };
            let r = match self.at(src_l) {
                Storage::F32(v) if v.len() == dst.len() => {
                    for (d, s) in dst.iter_mut().zip(v) {
                        *d += s;
                    }
                    Ok(())
                }
                _ => Err(EngineError::Bug(format!("accumulator {k} does not match its gradient"))),
            };
            *self.at_mut(acc_l) = Storage::F32(dst);
            return r;
        }
        let out_l = self.loc(step.output, slot);
        let in_place = matches!(step.kind, StepKind::Fused(_)) && step.inputs.first().is_some_and(|b| self.program.storage(*b) == self.program.storage(step.output));
        let mut out = match std::mem::replace(slot_mut(&mut self.storage, &mut self.banks, out_l), Storage::Alias) {
            Storage::F32(v) => v,
            other => {
                *slot_mut(&mut self.storage, &mut self.banks, out_l) = other;
                return Err(EngineError::Bug(format!("step {si} writes a buffer that is not f32")));
            }
        };
        let out_shape = self.program.buffers[step.output.0 as usize].shape.clone();
        let result = {
            let args: Vec<Operand<'_>> = step
                .inputs
                .iter()
                .map(|b| {
                    let shape = self.program.buffers[b.0 as usize].shape.as_slice();
                    match self.at(self.loc(*b, slot)) {
                        Storage::F32(v) => Operand { data: Arg::F32(v), shape },
                        Storage::I32(v) => Operand { data: Arg::I32(v), shape },
                        Storage::Bf16(_) | Storage::Alias => Operand { data: Arg::F32(&[]), shape },
                    }
                })
                .collect();
            match (&step.kind, &self.kernels[si]) {
                (StepKind::Op(op), _) if op.is_comm() => {
                    let input = args.first().and_then(|a| if let Arg::F32(v) = a.data { Some((v, a.shape)) } else { None });
                    comm.run(op, input, &mut out, &out_shape)
                }
                // An update in place: input 0 is the output's own memory.
                (StepKind::Fused(f), Some(k)) if in_place => {
                    let rest: Vec<&[f32]> = args[1..].iter().map(|a| if let Arg::F32(v) = a.data { v } else { &[][..] }).collect();
                    run_in_place(k, &rest, &mut out, f.rows, f.cols, self.threads)
                }
                (StepKind::Fused(f), Some(k)) => {
                    let ins: Vec<&[f32]> = args.iter().map(|a| if let Arg::F32(v) = a.data { v } else { &[][..] }).collect();
                    run_fused(k, &ins, &mut out, f.rows, f.cols, self.threads)
                }
                (StepKind::Op(op), _) => ops::run(op, &args, &mut out, &out_shape, self.threads),
                (StepKind::Reduce { op, .. }, Some(k)) => {
                    let n = op.arity().min(args.len());
                    let rest: Vec<&[f32]> = args[n..].iter().map(|a| if let Arg::F32(v) = a.data { v } else { &[][..] }).collect();
                    ops::run(op, &args[..n], &mut out, &out_shape, self.threads).and_then(|()| k.run_in_place(&rest, &mut out))
                }
                (StepKind::Reduce { .. }, None) => Err(EngineError::Bug(format!("step {si} was not compiled"))),
                (StepKind::MatMul { trans_a, trans_b }, _) => match args.as_slice() {
                    [a, b] => ops::matmul(a, *trans_a, b, *trans_b, &mut out, &out_shape, self.threads),
                    _ => Err(EngineError::Bug("matmul without two operands".into())),
                },
                (StepKind::Broadcast, _) => match args.first() {
                    Some(a) => ops::broadcast(a, &mut out, &out_shape),
                    None => Err(EngineError::Bug("broadcast without an operand".into())),
                },
                (StepKind::Fused(_), None) => Err(EngineError::Bug(format!("step {si} was not compiled"))),
            }
        };
        *self.at_mut(out_l) = Storage::F32(out);
        result
    }
}

fn slot_mut<'s>(storage: &'s mut [Storage], banks: &'s mut [Vec<Storage>], (bank, i): (usize, usize)) -> &'s mut Storage {
    if bank == 0 {
        &mut storage[i]
    } else {
        &mut banks[bank - 1][i]
    }
}

/// A fused kernel over all rows, split in blocks of whole rows over the
/// kernel worker threads (each row is computed the same way whatever the split).
/// A fused kernel in place over `io`, its rows shared out among `threads`
/// as [`run_fused`] shares them.
fn run_in_place(k: &CompiledKernel, rest: &[&[f32]], io: &mut [f32], rows: usize, cols: usize, threads: usize) -> Result<(), EngineError> {
    if threads <= 1 || rows < 2 || rows * cols < PARALLEL_MIN {
        return k.run_in_place(rest, io);
    }
    let failure: std::sync::Mutex<Option<EngineError>> = std::sync::Mutex::new(None);
    ops::par_rows(io, cols, threads, rows * cols, |first, block| {
        let n = block.len() / cols.max(1);
        if let Err(e) = k.run_in_place_block(rest, block, first, first + n) {
            if let Ok(mut f) = failure.lock() {
                f.get_or_insert(e);
            }
        }
    });
    match failure.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

fn run_fused(k: &CompiledKernel, ins: &[&[f32]], out: &mut [f32], rows: usize, cols: usize, threads: usize) -> Result<(), EngineError> {
    if threads <= 1 || rows < 2 || rows * cols < PARALLEL_MIN {
        return k.run(ins, out);
    }
    let failure: std::sync::Mutex<Option<EngineError>> = std::sync::Mutex::new(None);
    ops::par_rows(out, cols, threads, rows * cols, |first, block| {
        let n = block.len() / cols.max(1);
        if let Err(e) = k.run_block(ins, block, first, first + n) {
            if let Ok(mut f) = failure.lock() {
                f.get_or_insert(e);
            }
        }
    });
    match failure.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

impl Engine for Executor {
    fn program(&self) -> &Program {
        &self.program
    }
    fn set(&mut self, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError> {
        Executor::set(self, kind, data)
    }
    fn set_in(&mut self, slot: usize, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError> {
        Executor::set_in(self, slot, kind, data)
    }
    fn get(&self, kind: &BufKind) -> Result<Option<Vec<f32>>, EngineError> {
        Ok(Executor::get(self, kind).map(<[f32]>::to_vec))
    }
    fn buffer(&self, b: BufId) -> Result<Vec<f32>, EngineError> {
        Ok(Executor::buffer(self, b).to_vec())
    }
    fn begin_step(&mut self, hyper: &dyn Fn(Hyper) -> f64) -> Result<(), EngineError> {
        Executor::begin_step(self, hyper);
        Ok(())
    }
    fn run_phase(&mut self, role: Role, slot: usize, comm: &mut dyn Comm) -> Result<(), EngineError> {
        Executor::run_phase(self, role, slot, comm)
    }
    fn finish_step(&mut self) -> Result<(), EngineError> {
        Executor::finish_step(self);
        Ok(())
    }
    fn loss_in(&self, slot: usize) -> Result<f32, EngineError> {
        Ok(Executor::loss_in(self, slot))
    }
    fn step(&mut self, hyper: &dyn Fn(Hyper) -> f64) -> Result<f32, EngineError> {
        Executor::step(self, hyper)
    }
    fn bytes(&self) -> u64 {
        Executor::bytes(self)
    }
    fn enable_profile(&mut self) {
        Executor::enable_profile(self)
    }
    fn profile(&self) -> &[f64] {
        Executor::profile(self)
    }
}
