//! The shardplan runtime: what runs a compiled plan.
//!
//! `backend::cpu` runs kernels (cranelift-compiled fused kernels, library
//! kernels, GEMM); `exec` runs a kernel program step after step; `data`
//! loads training data; `checkpoint` reads and writes safetensors files.
//! Transport and collectives between devices join them with the partitioner.

pub mod atomic;
pub mod backend;
pub mod calibrate;
pub mod checkpoint;
pub mod cluster;
pub mod collectives;
pub mod data;
pub mod exec;
pub mod session;
pub mod transport;
