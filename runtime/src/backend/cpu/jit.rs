//! Fused element-wise kernels compiled with cranelift for the host ISA.
//!
//! Input: a [`Fused`] kernel (a `rows × cols` iteration and an SSA body).
//! Output: a [`CompiledKernel`], a native function
//! `extern "C" fn(inputs: *const *const f32, out_rows: *mut f32, row_begin: usize, row_end: usize)`
//! that computes rows `[row_begin, row_end)`. Input `k` is indexed from its
//! own start, at `r * row_strides[k] + c * col_strides[k]`; `out_rows`
//! points at the first element of row `row_begin`, so callers can hand each
//! thread its own part of the output (see [`CompiledKernel::run_block`]).
//!
//! Invariants:
//! - The generated code reads input `k` only at the indices above and writes
//!   only `out_rows[.. (row_end - row_begin) * cols]`. The safe wrappers check
//!   every length before calling it, so no call reads or writes out of bounds.
//! - Code memory is never freed: the module sits in a `ManuallyDrop`, so a
//!   `CompiledKernel` stays callable for the life of the process, whether or
//!   not its `Jit` is still alive. Each distinct kernel is compiled once
//!   (cached by content), so the memory kept is bounded by the number of
//!   distinct kernels.
//! - Finalising a new kernel only changes the protection of pages allocated
//!   for it, so kernels compiled earlier can run on other threads while the
//!   `Jit` compiles.
//!
//! `codegen` lays out the loops; `math` lowers each op on groups of `f32x4`
//! vectors, including the polynomial approximations of exp, log, tanh,
//! sigmoid and gelu.

mod codegen;
mod math;
#[cfg(test)]
mod tests;

use crate::engine::EngineError;
use codegen::Target;
use cranelift_codegen::ir::{Function, UserFuncName};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::{print_errors, Context};
use cranelift_frontend::FunctionBuilderContext;
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Module, ModuleError};
use shardplan_compiler::kernel::{Binary, Fused, Inst, Unary};
use std::collections::HashMap;
use std::mem::ManuallyDrop;

/// The machine code of one kernel (see the module documentation).
type KernelFn = unsafe extern "C" fn(*const *const f32, *mut f32, usize, usize);

/// Compiles fused kernels for the host and caches them by content.
pub struct Jit {
    /// Never dropped: it owns the code pages every `CompiledKernel` points into.
    module: ManuallyDrop<JITModule>,
    /// Reused between compilations.
    ctx: Context,
    fctx: FunctionBuilderContext,
    target: Target,
    cache: HashMap<Key, CompiledKernel>,
}

/// A compiled kernel: a pointer to its code and the shapes a call must match.
#[derive(Clone, Copy, Debug)]
pub struct CompiledKernel {
    entry: KernelFn,
    rows: usize,
    cols: usize,
    /// The least length of each input slice (its largest index plus one).
    /// Leaked once per distinct kernel, like the code itself.
    input_lens: &'static [usize],
}

impl Jit {
    /// A JIT for the host ISA at `opt_level=speed`, using `fma` where the host has it.
    pub fn new() -> Result<Jit, EngineError> {
        Jit::with_fma(None)
    }

    /// `fma: Some(false)` turns fused multiply-add off even where the host
    /// has it, so that tests cover both code paths.
    fn with_fma(fma: Option<bool>) -> Result<Jit, EngineError> {
        let isa = native_isa(fma)?;
        let target = Target::of(&*isa);
        let module = JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()));
        let ctx = module.make_context();
        Ok(Jit { module: ManuallyDrop::new(module), ctx, fctx: FunctionBuilderContext::new(), target, cache: HashMap::new() })
    }

    /// Compiles `k`, or returns the kernel compiled earlier for an identical `Fused`.
    pub fn compile(&mut self, k: &Fused) -> Result<CompiledKernel, EngineError> {
        let input_lens = required_lens(k)?;
        let key = Key::of(k);
        if let Some(kernel) = self.cache.get(&key) {
            return Ok(*kernel);
        }

        self.module.clear_context(&mut self.ctx);
        self.ctx.func.signature = codegen::signature(self.target);
        if let Err(e) = codegen::build(k, &mut self.ctx.func, &mut self.fctx, self.target) {
            // A build that stopped half way leaves the builder context dirty.
            self.fctx = FunctionBuilderContext::new();
            return Err(e);
        }
        let id = self.module.declare_anonymous_function(&self.ctx.func.signature).map_err(module_error)?;
        self.ctx.func.name = UserFuncName::user(0, id.as_u32());
        if let Err(e) = self.module.define_function(id, &mut self.ctx) {
            return Err(match e {
                ModuleError::Compilation(err) => EngineError::Codegen(print_errors::pretty_error(&self.ctx.func, err)),
                other => module_error(other),
            });
        }
        self.module.finalize_definitions().map_err(module_error)?;
        let code = self.module.get_finalized_function(id);
        if code.is_null() {
            return Err(EngineError::Codegen("the JIT returned no code for the kernel".into()));
        }
        // SAFETY: `code` is the entry of the function just finalised, whose
        // signature (`codegen::signature`: four pointer-sized parameters, the
        // ISA's default calling convention, no results) is the C ABI of
        // `KernelFn` on this host. The memory stays mapped and executable
        // forever (the module is never dropped and never frees).
        let entry = unsafe { std::mem::transmute::<*const u8, KernelFn>(code) };
        let kernel = CompiledKernel { entry, rows: k.rows, cols: k.cols, input_lens: Box::leak(input_lens.into_boxed_slice()) };
        self.cache.insert(key, kernel);
        Ok(kernel)
    }
}

impl CompiledKernel {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn n_inputs(&self) -> usize {
        self.input_lens.len()
    }

    /// Runs every row. `out.len()` must be `rows * cols`.
    pub fn run(&self, inputs: &[&[f32]], out: &mut [f32]) -> Result<(), EngineError> {
        self.run_rows(inputs, out, 0, self.rows)
    }

    /// Runs rows `[row_begin, row_end)` of the whole output `out`
    /// (`out.len() == rows * cols`); other rows are left untouched.
    pub fn run_rows(&self, inputs: &[&[f32]], out: &mut [f32], row_begin: usize, row_end: usize) -> Result<(), EngineError> {
        let total = self.rows * self.cols; // checked against overflow at compile time
        if out.len() != total {
            return Err(EngineError::Bug(format!("output has {} elements, the kernel writes {} × {}", out.len(), self.rows, self.cols)));
        }
        self.check_range(row_begin, row_end)?;
        let part = &mut out[row_begin * self.cols..row_end * self.cols];
        self.run_block(inputs, part, row_begin, row_end)
    }

    /// Runs rows `[row_begin, row_end)` into `out_rows`, which holds exactly
    /// those rows (`out_rows.len() == (row_end - row_begin) * cols`). This is
    /// the form for several threads: split the output with `chunks_mut` and
    /// give each thread its chunk and row range; the inputs are shared.
    pub fn run_block(&self, inputs: &[&[f32]], out_rows: &mut [f32], row_begin: usize, row_end: usize) -> Result<(), EngineError> {
        self.check_range(row_begin, row_end)?;
        let want = (row_end - row_begin) * self.cols;
        if out_rows.len() != want {
            return Err(EngineError::Bug(format!(
                "output part has {} elements, rows {row_begin}..{row_end} of {} columns need {want}",
                out_rows.len(),
                self.cols
            )));
        }
        if inputs.len() != self.input_lens.len() {
            return Err(EngineError::Bug(format!("kernel takes {} inputs, got {}", self.input_lens.len(), inputs.len())));
        }
        for (k, (x, &need)) in inputs.iter().zip(self.input_lens).enumerate() {
            if x.len() < need {
                return Err(EngineError::Bug(format!("input {k} has {} elements, the kernel reads {need}", x.len())));
            }
        }
        if want == 0 {
            return Ok(());
        }

        const INLINE: usize = 16;
        let mut inline = [std::ptr::null::<f32>(); INLINE];
        let heap: Vec<*const f32>;
        let ptrs: &[*const f32] = if inputs.len() <= INLINE {
            for (p, x) in inline.iter_mut().zip(inputs) {
                *p = x.as_ptr();
            }
            &inline[..inputs.len()]
        } else {
            heap = inputs.iter().map(|x| x.as_ptr()).collect();
            &heap
        };
        // SAFETY: the code reads input `k` at indices below
        // `(rows - 1) * row_stride + (cols - 1) * col_stride + 1 = input_lens[k]`,
        // which each slice was checked to cover; it writes only
        // `out_rows[..(row_end - row_begin) * cols]`, checked just above, and
        // `row_begin < row_end <= rows`. `ptrs` outlives the call. The input
        // slices are shared borrows and `out_rows` a unique one, so nothing
        // the code reads is written during the call. The code itself is never
        // freed (see `Jit::module`).
        unsafe { (self.entry)(ptrs.as_ptr(), out_rows.as_mut_ptr(), row_begin, row_end) };
        Ok(())
    }

    /// Runs every row with `io` as both input 0 and the output: an
    /// epilogue applied where a reduction left its result. Input 0 must be
    /// read at the output's own index (row stride `cols`, column stride 1),
    /// so each element is loaded before the store that replaces it and no
    /// other element's store touches it. `rest` are inputs 1.. .
    pub fn run_in_place(&self, rest: &[&[f32]], io: &mut [f32]) -> Result<(), EngineError> {
        let total = self.rows * self.cols;
        if io.len() != total || self.input_lens.first() != Some(&total) {
            return Err(EngineError::Bug(format!(
                "in place: the buffer has {} elements and input 0 is read over {:?}; both must be the {} × {} output",
                io.len(),
                self.input_lens.first(),
                self.rows,
                self.cols
            )));
        }
        if rest.len() + 1 != self.input_lens.len() {
            return Err(EngineError::Bug(format!("kernel takes {} inputs, got {}", self.input_lens.len(), rest.len() + 1)));
        }
        for (k, (x, &need)) in rest.iter().zip(&self.input_lens[1..]).enumerate() {
            if x.len() < need {
                return Err(EngineError::Bug(format!("input {} has {} elements, the kernel reads {need}", k + 1, x.len())));
            }
        }
        if total == 0 {
            return Ok(());
        }
        let mut ptrs: Vec<*const f32> = Vec::with_capacity(rest.len() + 1);
        ptrs.push(io.as_ptr());
        ptrs.extend(rest.iter().map(|x| x.as_ptr()));
        // SAFETY: as in `run_block`, every input is read within its checked
        // length and the output is written within `io`. Input 0 and the
        // output are the same memory, read and written at the same index
        // (its length is the whole output, which with column stride 0 or 1
        // only the output's own layout gives), and the code loads an element
        // before it stores that element, so every element is read before it
        // is replaced. `io` is borrowed uniquely for the call.
        unsafe { (self.entry)(ptrs.as_ptr(), io.as_mut_ptr(), 0, self.rows) };
        Ok(())
    }

    /// As [`CompiledKernel::run_in_place`] for rows `[row_begin, row_end)`
    /// only, `block` holding exactly those rows of the in-place buffer: the
    /// form for several threads, each with its own block (see `run_block`).
    pub fn run_in_place_block(&self, rest: &[&[f32]], block: &mut [f32], row_begin: usize, row_end: usize) -> Result<(), EngineError> {
        self.check_range(row_begin, row_end)?;
        let total = self.rows * self.cols;
        let want = (row_end - row_begin) * self.cols;
        if block.len() != want || self.input_lens.first() != Some(&total) {
            return Err(EngineError::Bug(format!(
                "in place: rows {row_begin}..{row_end} of {} columns need {want} elements, the block has {}, and input 0 must be read over the whole output",
                self.cols,
                block.len()
            )));
        }
        if rest.len() + 1 != self.input_lens.len() {
            return Err(EngineError::Bug(format!("kernel takes {} inputs, got {}", self.input_lens.len(), rest.len() + 1)));
        }
        for (k, (x, &need)) in rest.iter().zip(&self.input_lens[1..]).enumerate() {
            if x.len() < need {
                return Err(EngineError::Bug(format!("input {} has {} elements, the kernel reads {need}", k + 1, x.len())));
            }
        }
        if want == 0 {
            return Ok(());
        }
        let out = block.as_mut_ptr();
        let mut ptrs: Vec<*const f32> = Vec::with_capacity(rest.len() + 1);
        // Input 0 is read at absolute rows: its base lies `row_begin` rows
        // before the block, and the code reads it only at rows
        // `row_begin..row_end`, inside the block.
        ptrs.push(out.wrapping_sub(row_begin * self.cols) as *const f32);
        ptrs.extend(rest.iter().map(|x| x.as_ptr()));
        // SAFETY: as in `run_in_place`, restricted to the block: input 0 is
        // read at row r, column c, as `base + r * cols + c` with
        // `row_begin <= r < row_end`, which is inside `block` (derived from
        // it), at the element the code stores next, after loading it; the
        // other inputs are read within their checked lengths; the output is
        // written within `block`, borrowed uniquely for the call.
        unsafe { (self.entry)(ptrs.as_ptr(), out, row_begin, row_end) };
        Ok(())
    }

    fn check_range(&self, row_begin: usize, row_end: usize) -> Result<(), EngineError> {
        if row_begin > row_end || row_end > self.rows {
            return Err(EngineError::Bug(format!("row range {row_begin}..{row_end} is not within 0..{}", self.rows)));
        }
        Ok(())
    }
}

/// The CLIF of `k`'s function as built, before optimisation, for the host
/// ISA (it differs between hosts with and without `fma`).
pub fn clif(k: &Fused) -> Result<String, EngineError> {
    required_lens(k)?;
    let isa = native_isa(None)?;
    let target = Target::of(&*isa);
    let mut func = Function::with_name_signature(UserFuncName::testcase("fused"), codegen::signature(target));
    codegen::build(k, &mut func, &mut FunctionBuilderContext::new(), target)?;
    Ok(func.display().to_string())
}

fn native_isa(fma: Option<bool>) -> Result<OwnedTargetIsa, EngineError> {
    let setting = |e: settings::SetError| EngineError::Codegen(format!("cranelift setting: {e}"));
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").map_err(setting)?;
    flags.set("use_colocated_libcalls", "false").map_err(setting)?;
    flags.set("is_pic", "false").map_err(setting)?;
    let mut isa = cranelift_native::builder().map_err(|e| EngineError::Codegen(format!("host ISA not supported: {e}")))?;
    if let Some(on) = fma {
        // Only x86-64 has the flag; elsewhere `fma` is native or absent.
        if cfg!(target_arch = "x86_64") {
            isa.set("has_fma", if on { "true" } else { "false" }).map_err(setting)?;
        }
    }
    isa.finish(settings::Flags::new(flags)).map_err(|e| EngineError::Codegen(e.to_string()))
}

fn module_error(e: ModuleError) -> EngineError {
    EngineError::Codegen(e.to_string())
}

/// Checks that `k` is well formed and returns the least length of each input.
fn required_lens(k: &Fused) -> Result<Vec<usize>, EngineError> {
    let bad = |m: String| Err(EngineError::Bug(m));
    let n = k.row_strides.len();
    if k.col_strides.len() != n {
        return bad(format!("{} row strides but {} col strides", n, k.col_strides.len()));
    }
    if k.body.is_empty() {
        return bad("kernel body is empty".into());
    }
    for (i, inst) in k.body.iter().enumerate() {
        let ok = match *inst {
            Inst::Load(j) => j < n,
            Inst::Const(_) => true,
            Inst::Unary(_, a) => a < i,
            Inst::Binary(_, a, b) => a < i && b < i,
        };
        if !ok {
            return bad(format!("instruction v{i} ({inst:?}) refers to a later value or a missing input"));
        }
    }
    let fits = |n: usize| n.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize);
    let elems = k.rows.checked_mul(k.cols).filter(|&e| fits(e));
    if elems.is_none() || !fits(k.rows) || !fits(k.cols) {
        return bad(format!("kernel of {} × {} elements is too large", k.rows, k.cols));
    }
    let mut lens = Vec::with_capacity(n);
    for (j, (&rs, &cs)) in k.row_strides.iter().zip(&k.col_strides).enumerate() {
        if cs > 1 {
            return bad(format!("input {j} has col stride {cs}; only 0 and 1 are supported"));
        }
        let len = if k.rows == 0 || k.cols == 0 {
            Some(0)
        } else {
            (k.rows - 1).checked_mul(rs).and_then(|a| a.checked_add((k.cols - 1) * cs)).and_then(|a| a.checked_add(1))
        };
        // Byte offsets of every read, and the row stride in bytes, must fit an i64.
        match len.filter(|&l| fits(l.max(rs))) {
            Some(l) => lens.push(l),
            None => return bad(format!("input {j}: row stride {rs} over {} rows is too large", k.rows)),
        }
    }
    Ok(lens)
}

/// The content of a `Fused`, hashable (constants by their bits).
#[derive(PartialEq, Eq, Hash)]
struct Key {
    rows: usize,
    cols: usize,
    row_strides: Vec<usize>,
    col_strides: Vec<usize>,
    body: Vec<KeyInst>,
}

#[derive(PartialEq, Eq, Hash)]
enum KeyInst {
    Load(usize),
    Const(u64),
    /// The op's name, its parameter's bits (0 if none) and its operand.
    Unary(&'static str, u64, usize),
    Binary(&'static str, usize, usize),
}

impl Key {
    fn of(k: &Fused) -> Key {
        let body = k
            .body
            .iter()
            .map(|inst| match *inst {
                Inst::Load(j) => KeyInst::Load(j),
                Inst::Const(c) => KeyInst::Const(c.to_bits()),
                Inst::Unary(u, a) => {
                    let (name, param) = unary_key(u);
                    KeyInst::Unary(name, param, a)
                }
                Inst::Binary(b, x, y) => KeyInst::Binary(binary_key(b), x, y),
            })
            .collect();
        Key { rows: k.rows, cols: k.cols, row_strides: k.row_strides.clone(), col_strides: k.col_strides.clone(), body }
    }
}

fn unary_key(u: Unary) -> (&'static str, u64) {
    match u {
        Unary::Neg => ("neg", 0),
        Unary::Relu => ("relu", 0),
        Unary::Gelu => ("gelu", 0),
        Unary::Tanh => ("tanh", 0),
        Unary::Sigmoid => ("sigmoid", 0),
        Unary::Exp => ("exp", 0),
        Unary::Log => ("log", 0),
        Unary::Sqrt => ("sqrt", 0),
        Unary::ClipScale(m) => ("clip_scale", m.to_bits()),
    }
}

fn binary_key(b: Binary) -> &'static str {
    match b {
        Binary::Add => "add",
        Binary::Sub => "sub",
        Binary::Mul => "mul",
        Binary::Div => "div",
        Binary::ReluGrad => "relu_grad",
        Binary::GeluGrad => "gelu_grad",
    }
}
