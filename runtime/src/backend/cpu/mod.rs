//! The CPU backend: fused element-wise kernels compiled by cranelift for the
//! host ISA (`jit`), library kernels for everything else (`ops`), matmuls
//! through the `gemm` crate, and the executor that runs a whole program with
//! them (`exec`).
//!
//! Input: kernels and programs of the compiler, operands as [`Operand`]s.
//! Output: their values in f32 buffers. Invariants: kernels never panic; a
//! malformed call is an [`EngineError::Bug`], an id or label out of range an
//! [`EngineError::BadData`], a kernel cranelift cannot compile an
//! [`EngineError::Codegen`] (the runtime's one error type, `crate::engine`).
//!
//! [`EngineError::Bug`]: crate::engine::EngineError::Bug
//! [`EngineError::BadData`]: crate::engine::EngineError::BadData
//! [`EngineError::Codegen`]: crate::engine::EngineError::Codegen

pub mod exec;
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
