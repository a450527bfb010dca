//! Fused element-wise kernels compiled with cranelift (in progress).
