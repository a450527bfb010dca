//! The CPU backend: fused element-wise kernels compiled by cranelift for the
//! host ISA (`jit`), library kernels for everything else (`ops`), and
//! matmuls through the `gemm` crate.

pub mod jit;
pub mod ops;

/// The data of a kernel operand.
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
}

/// An operand: data and its shape (row-major, dense).
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    pub data: Arg<'a>,
    pub shape: &'a [usize],
}

impl<'a> Operand<'a> {
    pub fn f32(data: &'a [f32], shape: &'a [usize]) -> Operand<'a> {
        Operand { data: Arg::F32(data), shape }
    }

    pub fn i32(data: &'a [i32], shape: &'a [usize]) -> Operand<'a> {
        Operand { data: Arg::I32(data), shape }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// An index read from data is out of range (an embedding id, a label).
    #[error("{0}")]
    Index(String),
    /// Code generation failed; carries cranelift's message.
    #[error("code generation failed: {0}")]
    Codegen(String),
    /// The kernel was given operands it does not accept (a compiler bug).
    #[error("invalid kernel call: {0}")]
    Invalid(String),
}
