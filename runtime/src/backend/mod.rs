//! Backends: where kernels run. `cpu` JIT-compiles fused kernels with
//! cranelift and runs matmuls through a tuned GEMM.

pub mod cpu;
pub mod cuda;
