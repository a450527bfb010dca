//! Backends: where kernels run. `cpu` JIT-compiles fused kernels with
//! cranelift, runs matmuls through a tuned GEMM, and holds the CPU executor;
//! `cuda` generates CUDA C, compiles it with NVRTC, and holds the GPU
//! executor and the NCCL communicators.
//!
//! Input: a device's kernel [`Program`] and the [`Backend`] it runs on.
//! Output: the [`Engine`] that runs it ([`engine`]). Invariant: this is the
//! one module that knows both executors; the runners (one device, a cluster)
//! see only `Box<dyn Engine>` and [`EngineError`].

pub mod cpu;
pub mod cuda;

use crate::engine::{Backend, Engine, EngineError};
use shardplan_compiler::kernel::Program;

/// Builds the engine that runs `program` on `backend`, with `slots` buffer
/// sets (one per microbatch in flight) and, on CPUs, `threads` kernel threads.
pub fn engine(backend: &Backend, program: Program, threads: usize, slots: usize) -> Result<Box<dyn Engine>, EngineError> {
    Ok(match backend {
        Backend::Cpu => Box::new(cpu::exec::Executor::with_slots(program, threads, slots)?),
        Backend::Cuda { ordinal, memory } => Box::new(cuda::exec::GpuExecutor::with_slots(program, *ordinal, slots, *memory)?),
    })
}
