//! The text of one kernel: its parameters, helpers and body, assembled into
//! a CUDA C source whose kernel is named after the hash of its content.
//!
//! Every size is written into the source as a constant, so two steps with
//! the same shapes and the same expression give the same source, the same
//! name, and one NVRTC module between them.
//!
//! Input: a kernel's parameters and body. Output: the CUDA C text and its
//! name. Invariant: equal text, equal name.

use super::super::Kernel;
use shardplan_compiler::kernel::{BufId, Elem};
use std::fmt::Write;

/// Threads per block of element-wise kernels.
pub const BLOCK: u32 = 256;
/// The most blocks of a grid-stride kernel; more work loops in each thread.
pub const MAX_GRID: usize = 65_535;

/// How a kernel uses a parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Read only: `const T* __restrict__`.
    In,
    /// Written only.
    Out,
    /// Read and written at the same index (an accumulator, an epilogue in place).
    InOut,
}

/// A kernel being written.
pub struct Gen {
    /// One line saying what the kernel computes (the first line of the source).
    what: String,
    params: Vec<(BufId, Elem, Mode, String)>,
    /// Indices are 64-bit (some buffer has 2³¹ elements or more).
    pub wide: bool,
    /// Helper functions, each included once.
    helpers: Vec<&'static str>,
    pub body: String,
    pub grid: u32,
    pub block: u32,
}

impl Gen {
    /// `largest` is the largest element count the kernel indexes.
    pub fn new(what: impl Into<String>, largest: usize) -> Gen {
        Gen { what: what.into(), params: Vec::new(), wide: largest > i32::MAX as usize, helpers: Vec::new(), body: String::new(), grid: 1, block: BLOCK }
    }

    /// Adds parameter `name` for buffer `b`.
    pub fn param(&mut self, b: BufId, elem: Elem, mode: Mode, name: &str) {
        self.params.push((b, elem, mode, name.to_string()));
    }

    /// Includes helper `text` (once).
    pub fn helper(&mut self, text: &'static str) {
        if !self.helpers.contains(&text) {
            self.helpers.push(text);
        }
    }

    /// An index constant of the kernel's index type.
    pub fn n(&self, v: usize) -> String {
        if self.wide {
            format!("{v}ull")
        } else {
            format!("{v}u")
        }
    }

    /// Appends a line of the body.
    pub fn line(&mut self, indent: usize, text: impl AsRef<str>) {
        for _ in 0..indent {
            self.body.push_str("  ");
        }
        self.body.push_str(text.as_ref());
        self.body.push('\n');
    }

    /// A grid-stride loop of `i` over `0..total`, one element per thread;
    /// the body goes at indent 2, then [`Gen::close`]. Launch: enough blocks
    /// of [`BLOCK`] threads for one element each, at most [`MAX_GRID`].
    pub fn each(&mut self, total: usize) {
        self.block = BLOCK;
        self.grid = total.div_ceil(BLOCK as usize).clamp(1, MAX_GRID) as u32;
        let t = self.n(total);
        self.line(1, format!("for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < {t}; i += (I)gridDim.x * blockDim.x) {{"));
    }

    /// A loop of `row` over `0..rows`, one block per row (grid-stride over
    /// blocks), `block` threads each; the body goes at indent 2.
    pub fn rows(&mut self, rows: usize, block: u32) {
        self.block = block;
        self.grid = rows.clamp(1, MAX_GRID) as u32;
        let r = self.n(rows);
        self.line(1, format!("for (I row = blockIdx.x; row < {r}; row += gridDim.x) {{"));
    }

    /// Includes the block reductions and declares their shared memory
    /// (`sh_d`, `sh_f`, one element per thread of a block of `b`) at the
    /// top of the body, before the loop.
    pub fn block_reduce(&mut self, b: u32) {
        self.helper(MAX2);
        self.helper(BLOCK_REDUCE);
        self.block = b;
        self.line(1, format!("__shared__ double sh_d[{b}];"));
        self.line(1, format!("__shared__ float sh_f[{b}];"));
    }

    pub fn close(&mut self) {
        self.line(1, "}");
    }

    /// The finished kernel: its name is `sp_` and the FNV-1a hash of the
    /// source written with a placeholder name.
    pub fn finish(self) -> Kernel {
        const PLACEHOLDER: &str = "KERNEL_NAME";
        let mut src = String::new();
        let _ = writeln!(src, "// {}", self.what);
        let _ = writeln!(src, "typedef {} I;", if self.wide { "unsigned long long" } else { "unsigned int" });
        for h in &self.helpers {
            src.push_str(h);
        }
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(_, elem, mode, name)| {
                let t = match elem {
                    Elem::F32 => "float",
                    Elem::I32 => "int",
                    Elem::Bf16 => "unsigned short",
                };
                match mode {
                    Mode::In => format!("const {t}* __restrict__ {name}"),
                    Mode::Out | Mode::InOut => format!("{t}* __restrict__ {name}"),
                }
            })
            .collect();
        // The bound lets ptxas keep registers within what a block of this size may use.
        let _ = writeln!(src, "extern \"C\" __global__ void __launch_bounds__({}) {PLACEHOLDER}({}) {{", self.block, params.join(", "));
        src.push_str(&self.body);
        src.push_str("}\n");
        let name = format!("sp_{:016x}", fnv1a(src.as_bytes()));
        Kernel {
            source: src.replacen(PLACEHOLDER, &name, 1),
            name,
            grid: self.grid,
            block: self.block,
            shared_bytes: 0,
            args: self.params.iter().map(|p| p.0).collect(),
        }
    }
}

pub use shardplan_compiler::hash::fnv1a;

/// An f32 constant as CUDA C reads it back exactly.
pub fn f32_lit(v: f32) -> String {
    if v.is_nan() {
        "__int_as_float(0x7fc00000)".into()
    } else if v == f32::INFINITY {
        "__int_as_float(0x7f800000)".into()
    } else if v == f32::NEG_INFINITY {
        "__int_as_float(0xff800000)".into()
    } else {
        // Rust prints the shortest digits that read back as the same f32,
        // always with a '.' or an exponent, which C reads the same way.
        format!("({v:?}f)")
    }
}

/// An f64 constant as CUDA C reads it back exactly.
pub fn f64_lit(v: f64) -> String {
    if v.is_nan() {
        "__longlong_as_double(0x7ff8000000000000ll)".into()
    } else if v == f64::INFINITY {
        "__longlong_as_double(0x7ff0000000000000ll)".into()
    } else if v == f64::NEG_INFINITY {
        "__longlong_as_double(0xfff0000000000000ll)".into()
    } else {
        format!("({v:?})")
    }
}

/// The smallest power of two ≥ `n`, within `lo..=hi`.
pub fn pow2_block(n: usize, lo: u32, hi: u32) -> u32 {
    (n.max(1).next_power_of_two().min(hi as usize) as u32).max(lo)
}

/// Block-wide reductions over the threads of a block of `blockDim.x`
/// threads (a power of two), through shared memory, in a fixed tree order:
/// the same inputs give the same result on every run. Every thread gets the
/// result. Every thread of the block must call them.
pub const BLOCK_REDUCE: &str = r#"__device__ double sp_block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  double r = sh[0];
  __syncthreads();
  return r;
}
__device__ float sp_block_max(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] = sp_max2(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  float r = sh[0];
  __syncthreads();
  return r;
}
"#;

/// Warp-wide reductions (butterfly: every lane gets the same result, in a
/// fixed order).
pub const WARP_REDUCE: &str = r#"__device__ __forceinline__ double sp_warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float sp_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = sp_max2(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
"#;

/// `a.max(v)` ignoring a NaN `v`, as the CPU kernels take maxima.
pub const MAX2: &str = "__device__ __forceinline__ float sp_max2(float a, float v) { return v > a ? v : a; }\n";

/// gelu and its derivative (the tanh form of the reference interpreter).
pub const GELU: &str = r#"__device__ __forceinline__ float sp_gelu(float x) {
  return 0.5f * x * (1.0f + tanhf(0.7978846f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float sp_gelu_grad(float x0) {
  // Beyond ±9 the derivative is 0 or 1 in f32; clamping keeps x³ finite.
  float x = x0 > 9.0f ? 9.0f : (x0 < -9.0f ? -9.0f : x0);
  float t = tanhf(0.7978846f * (x + 0.044715f * x * x * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * 0.7978846f * (1.0f + 0.134145f * x * x);
}
"#;
