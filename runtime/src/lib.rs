//! The shardplan runtime: what runs a compiled plan.
//!
//! Layout, from the leaves up (no module imports one that imports it back):
//! - `engine`: the backend-neutral interface of an executor: the `Engine`
//!   and `Comm` traits, `Data`, `Backend`, and `EngineError`, the one error
//!   type of every engine (a bug, bad data, a failed code generation, a
//!   device's failure, a failed transfer);
//! - `backend::cpu`: kernels (cranelift-compiled fused kernels, library
//!   kernels, GEMM) and the CPU executor (`backend::cpu::exec`);
//! - `backend::cuda`: CUDA C generation, NVRTC, the GPU executor
//!   (`backend::cuda::exec`) and NCCL (`backend::cuda::nccl`, which imports
//!   no executor, so `engine` may name its communicators);
//! - `backend::engine`: builds the engine of a device, CPU or GPU;
//! - `transport` and `collectives`: messages and ring collectives between
//!   devices' threads; `cluster`: one thread and one engine per device of a
//!   partitioned plan, joined by them, with its own `ClusterError`;
//! - `session`: a training run (data, init, hyper-parameters, the step loop
//!   on one device or a cluster, metrics, evaluation, checkpoints);
//!   `atomic`: files written atomically;
//! - `data` loads training data; `checkpoint` reads and writes safetensors
//!   files; `calibrate` measures the machine for the cost model;
//!   `selftest` runs every kernel of a plan's programs alone on a backend
//!   against the CPU.

pub mod atomic;
pub mod backend;
pub mod calibrate;
pub mod checkpoint;
pub mod cluster;
pub mod collectives;
pub mod data;
pub mod engine;
pub mod process;
pub mod selftest;
pub mod session;
pub mod transport;
