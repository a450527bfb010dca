//! What every backend's executor is to the runners: the [`Engine`] trait (one
//! device's kernel program, run step after step), the [`Comm`] trait (the
//! transfers and collectives a runner does for it), the data handed in
//! ([`Data`]), where a device runs ([`Backend`]), and the one error type of
//! every engine ([`EngineError`]).
//!
//! Input: nothing but the compiler's program types. Output: the interface the
//! CPU executor (`backend::cpu::exec`) and the GPU executor
//! (`backend::cuda::exec`) implement, and that `backend::engine` builds.
//!
//! Invariants: this module is a leaf of the runtime: it names no executor
//! and no other runtime module but `backend::cuda::nccl` (for the type of a
//! device's NCCL communicators, which [`Comm::on_gpus`] hands over), and
//! `nccl` in turn imports no engine or executor. Every failure of an engine
//! is one [`EngineError`], whose variant says whose fault it is: shardplan's
//! (a malformed program or kernel call, a failed code generation), the
//! data's (an index or label out of range), a device's (a CUDA driver or
//! library call, device memory), or a transfer's (another device stopped).

use crate::backend::cuda::nccl::Nccl;
use shardplan_compiler::graph::{Hyper, Op, Role};
use shardplan_compiler::kernel::{BufId, BufKind, Program};

/// Where a device's program runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Backend {
    /// The CPU executor, with the kernel threads the runner gives it.
    Cpu,
    /// A logical device on GPU `ordinal`: its own stream and buffers, and at
    /// most `memory` bytes of them when a limit is given. Several logical
    /// devices may share one GPU.
    Cuda { ordinal: usize, memory: Option<u64> },
}

impl Backend {
    pub fn is_cuda(&self) -> bool {
        matches!(self, Backend::Cuda { .. })
    }
}

/// Why an engine (or one of its kernels) failed. The message of each
/// variant says what happened and where; the variant says whose fault it is.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// A kernel was given operands it does not accept, or the program is
    /// malformed: a bug in shardplan.
    #[error("invalid kernel call: {0}")]
    Bug(String),
    /// An index read from the data is out of range (an embedding id, a label).
    #[error("{0}")]
    BadData(String),
    /// Code generation failed; carries cranelift's message or NVRTC's log.
    #[error("code generation failed: {0}")]
    Codegen(String),
    /// The device failed: a CUDA library that cannot be loaded, a driver,
    /// cuBLAS or NCCL call that failed, device memory that ran out or a
    /// device's memory limit that is too small. The message names the GPU.
    #[error("{0}")]
    Device(String),
    /// A transfer or collective with other devices failed: a peer stopped,
    /// timed out, or sent something else than the program expects.
    #[error("{0}")]
    Transfer(String),
}

impl EngineError {
    /// What happened, without the prefix that names the kind.
    pub fn message(&self) -> &str {
        match self {
            EngineError::Bug(m) | EngineError::BadData(m) | EngineError::Codegen(m) | EngineError::Device(m) | EngineError::Transfer(m) => m,
        }
    }

    /// Whether shardplan is at fault: a malformed program or kernel call, or
    /// code that could not be generated.
    pub fn is_bug(&self) -> bool {
        matches!(self, EngineError::Bug(_) | EngineError::Codegen(_))
    }

    /// Whether the device (a GPU, its driver or libraries) failed.
    pub fn is_device(&self) -> bool {
        matches!(self, EngineError::Device(_))
    }
}

/// What runs one device's program: the CPU executor or a GPU executor.
/// Values come back owned (a GPU's live in device memory) and every device
/// operation may fail.
pub trait Engine {
    fn program(&self) -> &Program;
    /// Sets a parameter, state or input. Values of the wrong length are refused.
    fn set(&mut self, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError>;
    /// Sets an input (or any buffer of `kind`) in buffer set `slot`.
    fn set_in(&mut self, slot: usize, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError>;
    /// The f32 data of the buffer holding `kind` (a parameter, a state), if the program has one.
    fn get(&self, kind: &BufKind) -> Result<Option<Vec<f32>>, EngineError>;
    /// The f32 data of buffer `b` in buffer set 0.
    fn buffer(&self, b: BufId) -> Result<Vec<f32>, EngineError>;
    /// Starts a step: fills the hypers and zeroes the gradient accumulators.
    fn begin_step(&mut self, hyper: &dyn Fn(Hyper) -> f64) -> Result<(), EngineError>;
    /// Runs the steps of one pass (`role`) in buffer set `slot`.
    fn run_phase(&mut self, role: Role, slot: usize, comm: &mut dyn Comm) -> Result<(), EngineError>;
    /// Ends a step: every parameter and state takes its new value.
    fn finish_step(&mut self) -> Result<(), EngineError>;
    /// The loss as computed in buffer set `slot`.
    fn loss_in(&self, slot: usize) -> Result<f32, EngineError>;
    /// Runs one step: every kernel, then the assignments. Returns the loss.
    fn step(&mut self, hyper: &dyn Fn(Hyper) -> f64) -> Result<f32, EngineError>;
    /// Bytes of every buffer this engine holds, buffer sets included.
    fn bytes(&self) -> u64;
    /// Starts timing every step.
    fn enable_profile(&mut self);
    /// Seconds spent in each step so far (empty unless profiling).
    fn profile(&self) -> &[f64];
}

/// Transfers and collectives of a device program, done for the executor by
/// whoever connects the device to the others.
pub trait Comm {
    /// Runs communication op `op` with operand `input` (none for a receive),
    /// writing its result to `out` (of shape `out_shape`).
    fn run(&mut self, op: &Op, input: Option<(&[f32], &[usize])>, out: &mut [f32], out_shape: &[usize]) -> Result<(), EngineError>;

    /// Runs `op` through `f` on this device's NCCL communicators when it
    /// goes between GPU devices on distinct physical GPUs; None when it takes
    /// the host path ([`Comm::run`]).
    fn on_gpus(&mut self, _op: &Op, _f: &mut dyn FnMut(&mut Nccl) -> Result<(), EngineError>) -> Option<Result<(), EngineError>> {
        None
    }
}

/// An engine's [`Comm`] when no other device exists: a program that moves
/// data to another device is malformed here.
pub struct Alone;

impl Comm for Alone {
    fn run(&mut self, op: &Op, _: Option<(&[f32], &[usize])>, _: &mut [f32], _: &[usize]) -> Result<(), EngineError> {
        Err(EngineError::Bug(format!("{} needs other devices", op.name())))
    }
}

/// Source data handed to [`Engine::set`].
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_prints_its_message_once() {
        // A device's or a transfer's failure is its message alone; a bug and
        // a failed code generation say what they are.
        assert_eq!(EngineError::Device("GPU 0: launching kernel k1 failed".into()).to_string(), "GPU 0: launching kernel k1 failed");
        assert_eq!(EngineError::Transfer("device 1 stopped".into()).to_string(), "device 1 stopped");
        assert_eq!(EngineError::BadData("label 7 at position 2 is outside 0..4".into()).to_string(), "label 7 at position 2 is outside 0..4");
        assert_eq!(EngineError::Bug("matmul without two operands".into()).to_string(), "invalid kernel call: matmul without two operands");
        assert_eq!(EngineError::Codegen("no ISA".into()).to_string(), "code generation failed: no ISA");
        let e = EngineError::Codegen("no ISA".into());
        assert!(e.is_bug() && !e.is_device() && e.message() == "no ISA");
        assert!(EngineError::Device(String::new()).is_device());
        assert!(!EngineError::BadData(String::new()).is_bug());
    }

    #[test]
    fn a_program_that_moves_data_alone_is_a_bug() {
        let op = Op::Send { to: 1, id: 3 };
        let mut out = [0.0f32; 1];
        assert!(matches!(Alone.run(&op, None, &mut out, &[1]), Err(EngineError::Bug(_))));
    }
}
