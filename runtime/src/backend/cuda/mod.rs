//! The CUDA backend: every step of a kernel [`Program`] becomes a
//! [`Launch`]: a generated CUDA C kernel (compiled with NVRTC when the plan
//! is loaded, cached by the hash of its source), a matrix product through
//! cuBLAS, or a transfer/collective that the executor hands to its `Comm`.
//!
//! `codegen` needs no GPU and no CUDA library: it is pure text generation,
//! so `inspect --kernels cuda` and the PTX compile test run anywhere.
//! Everything that touches the driver checks that the library is present
//! first (cudarc's loader panics otherwise).
//!
//! Input: a kernel program. Output: its launches, and (in `exec`) an
//! engine that runs them on one GPU.
//!
//! [`Program`]: shardplan_compiler::kernel::Program

use shardplan_compiler::kernel::BufId;

pub mod codegen;
pub mod driver;
pub mod exec;
pub mod nccl;
pub mod nvrtc;

/// What one step of a program becomes on a GPU (a step may need several).
#[derive(Clone, Debug, PartialEq)]
pub enum Launch {
    Kernel(Kernel),
    Gemm(Gemm),
    /// A transfer or collective (the step's op `is_comm`): the executor
    /// stages it through the host and its `Comm`.
    Comm,
}

/// A generated kernel. `source` defines
/// `extern "C" __global__ void <name>(...)` whose parameters are the device
/// pointers of `args`, in order (`float*` or `int*` by the buffer's element
/// type); every size is a constant of the source. Launched on a 1-D grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub source: String,
    pub grid: u32,
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
    pub args: Vec<BufId>,
}

/// A batch of row-major products `out[i] = op(a)[i] · op(b)[i]`, each
/// `[m, k] · [k, n] → [m, n]`, product `i` reading `a` at element
/// `a_offsets[i]` and `b` at `b_offsets[i]` and writing `out` at `i·m·n`.
/// `trans_a` says `a` is stored `[k, m]` (likewise `trans_b`: `[n, k]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    pub a: BufId,
    pub b: BufId,
    pub out: BufId,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub a_offsets: Vec<usize>,
    pub b_offsets: Vec<usize>,
}

impl Gemm {
    /// The strides of `a` and `b` between products when the offsets are
    /// arithmetic progressions (one strided-batched cuBLAS call), else None.
    pub fn strides(&self) -> Option<(usize, usize)> {
        fn stride(o: &[usize]) -> Option<usize> {
            let s = if o.len() > 1 { o[1].checked_sub(o[0])? } else { 0 };
            o.windows(2).all(|w| w[1].checked_sub(w[0]) == Some(s)).then_some(s)
        }
        Some((stride(&self.a_offsets)?, stride(&self.b_offsets)?))
    }
}
