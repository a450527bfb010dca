//! The GPU executor: runs a kernel [`Program`] on one GPU, step after step,
//! with the public interface of the CPU executor (`backend::cpu::exec`); both
//! are [`Engine`]s.
//!
//! Input: a program, the GPU's ordinal, the number of buffer sets (one per
//! microbatch in flight) and an optional memory limit. Output: the loss of
//! each step, with parameters and optimizer states updated in device memory
//! by the program's assignments at the end of the step.
//!
//! Memory: one device allocation per storage buffer (reshapes share their
//! operand's), made when the executor is built; the buffers
//! [`Program::banked`] names (inputs, what forward and backward steps write)
//! get one copy per buffer set, as on the CPU. The whole allocation is
//! checked against the memory limit before any of it is made.
//!
//! Work: every step is lowered by `codegen` once, at build time; generated
//! kernels are compiled with NVRTC for this GPU's architecture and loaded.
//! Everything runs in order on one stream owned by the executor, so several
//! executors (logical devices) can share one GPU. The host waits for the
//! stream only where it needs a value: reading the loss or a tensor, and
//! transfers, which are staged through host memory and the executor's
//! `Comm`. `SHARDPLAN_CUDA_SYNC=1` waits after every launch, so that an
//! asynchronous failure is reported with the step and kernel that caused it.
//!
//! Ids and labels are checked on the host when they are set, against the
//! table or the classes of the ops that read them, with the CPU kernels'
//! error ([`EngineError::BadData`]): the GPU kernels can then trust them.
//!
//! Errors: a failure of the driver, cuBLAS, NCCL or device memory (a memory
//! limit too small included) is an [`EngineError::Device`] naming the GPU;
//! a kernel NVRTC cannot compile is an [`EngineError::Codegen`]; a program
//! or a launch that does not fit together is an [`EngineError::Bug`]. The
//! errors of `driver` and `nvrtc` become engine errors here, by `From`: a
//! missing library or a failed driver call is the device's, any other NVRTC
//! failure a failed code generation.

use super::nccl::Nccl;
use super::nvrtc::NvrtcError;
use super::{codegen, driver, Gemm, Launch};
use crate::engine::{Alone, Comm, Data, Engine, EngineError};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use shardplan_compiler::graph::{Hyper, Op, Role, Target};
use shardplan_compiler::kernel::{BufId, BufKind, Elem, Program, StepKind};
use shardplan_compiler::units::{Bytes, Unit};
use std::sync::Arc;

/// The memory of one storage buffer.
enum Mem {
    F32(CudaSlice<f32>),
    I32(CudaSlice<i32>),
    /// bfloat16 bits (`autocast bf16`), written and read by the conversion kernels only.
    Bf16(CudaSlice<u16>),
}

impl Mem {
    fn ptr(&self, stream: &CudaStream) -> u64 {
        // Event tracking is off for this executor's slices, so the guard
        // returned with the pointer does nothing when dropped.
        match self {
            Mem::F32(s) => s.device_ptr(stream).0,
            Mem::I32(s) => s.device_ptr(stream).0,
            Mem::Bf16(s) => s.device_ptr(stream).0,
        }
    }
}

/// One launch of a step, ready to run.
enum Ready {
    Kernel { name: String, func: CudaFunction, grid: u32, block: u32, shared_bytes: u32, args: Vec<BufId> },
    Gemm(Gemm),
    Comm,
}

pub struct GpuExecutor {
    program: Program,
    ordinal: usize,
    /// Kept for the life of the buffers, stream and modules.
    _ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// Per buffer: its device memory (None for aliases and, in banks, for
    /// buffers that are not banked).
    storage: Vec<Option<Mem>>,
    /// Buffer sets of microbatches 1.. in flight.
    banks: Vec<Vec<Option<Mem>>>,
    banked: Vec<bool>,
    /// Per step: its launches.
    launches: Vec<Vec<Ready>>,
    /// Per storage buffer of i32 data: the bound its values must be below,
    /// and what they are ("embedding id", "label").
    bounds: Vec<Option<(usize, &'static str)>>,
    bytes: u64,
    /// Wait after every launch (SHARDPLAN_CUDA_SYNC=1).
    sync_each: bool,
    profile: Option<Vec<f64>>,
}

/// A failure of the GPU, its driver or its libraries.
fn device(m: impl Into<String>) -> EngineError {
    EngineError::Device(m.into())
}

/// A program or launch that does not fit together: a bug in shardplan.
fn bug(m: impl Into<String>) -> EngineError {
    EngineError::Bug(m.into())
}

/// A CUDA library that cannot be loaded, or a driver that sees no GPU or
/// fails: the device's fault.
impl From<driver::DriverError> for EngineError {
    fn from(e: driver::DriverError) -> EngineError {
        EngineError::Device(e.to_string())
    }
}

/// NVRTC that cannot be loaded is the device's fault (its setup); any other
/// NVRTC failure is a failed code generation.
impl From<NvrtcError> for EngineError {
    fn from(e: NvrtcError) -> EngineError {
        match e {
            NvrtcError::Missing => EngineError::Device(e.to_string()),
            _ => EngineError::Codegen(e.to_string()),
        }
    }
}

/// Everything a GPU run needs: the driver with at least one GPU, NVRTC and
/// cuBLAS. Returns the GPUs, or an [`EngineError::Device`] whose message says
/// what is missing.
pub fn ready() -> Result<Vec<driver::Gpu>, EngineError> {
    let gpus = driver::gpus()?;
    super::nvrtc::available()?;
    driver::cublas_available()?;
    Ok(gpus)
}

impl GpuExecutor {
    /// Allocates every buffer on GPU `ordinal` and compiles every kernel.
    pub fn new(program: Program, ordinal: usize) -> Result<GpuExecutor, EngineError> {
        GpuExecutor::with_slots(program, ordinal, 1, None)
    }

    /// As [`GpuExecutor::new`], with `slots` sets of forward/backward
    /// buffers, one per microbatch in flight, and at most `limit` bytes of
    /// buffers.
    pub fn with_slots(program: Program, ordinal: usize, slots: usize, limit: Option<u64>) -> Result<GpuExecutor, EngineError> {
        driver::available()?;
        super::nvrtc::available()?;
        driver::cublas_available()?;
        program.validate().map_err(|e| bug(format!("the program is malformed: {e}")))?;
        let gpu = format!("GPU {ordinal}");
        let cuda = |what: &str, e: cudarc::driver::DriverError| device(format!("{gpu}: {what} failed ({e:?})"));
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda("opening the device", e))?;
        // SAFETY: every slice of this executor is used on its own stream
        // only, and freed after the stream has finished with it (the
        // executor synchronizes its stream when dropped), so no event needs
        // to order streams.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda("creating a stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| device(format!("{gpu}: creating a cuBLAS handle failed ({e:?})")))?;
        let capability = ctx.compute_capability().map_err(|e| cuda("reading the compute capability", e))?;
        let arch = driver::arch(capability);

        // Which buffers have a copy per buffer set: the same rule as on the CPU.
        let n = program.buffers.len();
        let banked = program.banked();
        let owned = |i: usize| !matches!(program.buffers[i].kind, BufKind::Alias(_));
        let size = |i: usize| (program.buffers[i].elem.bytes() * program.buffers[i].len().max(1)) as u64;
        let slots = slots.max(1);
        let total: u64 = (0..n).filter(|&i| owned(i)).map(|i| size(i) * if banked[i] { slots as u64 } else { 1 }).sum();
        if let Some(limit) = limit {
            if total > limit {
                return Err(device(format!(
                    "{gpu}: the program needs {} of device buffers ({} buffer set(s)), more than the device's memory limit of {}",
                    mib(total),
                    slots,
                    mib(limit)
                )));
            }
        }
        let alloc = |i: usize| -> Result<Option<Mem>, EngineError> {
            if !owned(i) {
                return Ok(None);
            }
            let b = &program.buffers[i];
            let len = b.len().max(1);
            let failed = |e: cudarc::driver::DriverError| device(format!("{gpu}: allocating {} for buffer {i} {:?} failed ({e:?})", mib(size(i)), b.shape));
            Ok(Some(match (&b.kind, b.elem) {
                (BufKind::Const(c), Elem::F32) => Mem::F32(stream.clone_htod(&vec![*c as f32; len]).map_err(failed)?),
                (BufKind::Const(c), Elem::I32) => Mem::I32(stream.clone_htod(&vec![*c as i32; len]).map_err(failed)?),
                (_, Elem::F32) => Mem::F32(stream.alloc_zeros::<f32>(len).map_err(failed)?),
                (_, Elem::I32) => Mem::I32(stream.alloc_zeros::<i32>(len).map_err(failed)?),
                (_, Elem::Bf16) => Mem::Bf16(stream.alloc_zeros::<u16>(len).map_err(failed)?),
            }))
        };
        let storage: Vec<Option<Mem>> = (0..n).map(alloc).collect::<Result<_, _>>()?;
        let mut banks = Vec::new();
        for _ in 1..slots {
            banks.push((0..n).map(|i| if banked[i] { alloc(i) } else { Ok(None) }).collect::<Result<Vec<_>, _>>()?);
        }

        // Lower and load every step.
        let mut launches = Vec::with_capacity(program.steps.len());
        for (si, step) in program.steps.iter().enumerate() {
            let what = describe(&step.kind);
            let lowered = codegen::lower(step, &program).map_err(|e| EngineError::Codegen(format!("step {si} ({what}): {e}")))?;
            let mut ready = Vec::with_capacity(lowered.len());
            for l in lowered {
                ready.push(match l {
                    Launch::Kernel(k) => {
                        let func = load(&ctx, &k.source, &k.name, &arch, &gpu).map_err(|e| match e {
                            EngineError::Codegen(m) => EngineError::Codegen(format!("step {si} ({what}): {m}")),
                            other => other,
                        })?;
                        if k.shared_bytes > 48 * 1024 {
                            // SAFETY: `func` was just loaded from its module, which it keeps alive.
                            unsafe {
                                cudarc::driver::result::function::set_function_attribute(
                                    func.cu_function(),
                                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    k.shared_bytes as i32,
                                )
                            }
                            .map_err(|e| device(format!("{gpu}: step {si}: kernel {} asks for {} bytes of shared memory ({e:?})", k.name, k.shared_bytes)))?;
                        }
                        if let Some(b) = k.args.iter().find(|b| b.0 as usize >= n) {
                            return Err(bug(format!("step {si}: kernel {} reads buffer {}, but the program has {n}", k.name, b.0)));
                        }
                        Ready::Kernel { name: k.name, func, grid: k.grid, block: k.block, shared_bytes: k.shared_bytes, args: k.args }
                    }
                    Launch::Gemm(g) => {
                        check_gemm(&g, &program).map_err(|m| bug(format!("step {si} ({what}): {m}")))?;
                        Ready::Gemm(g)
                    }
                    Launch::Comm => Ready::Comm,
                });
            }
            launches.push(ready);
        }

        // Bounds of ids and labels, by the ops that read them.
        let mut bounds: Vec<Option<(usize, &'static str)>> = vec![None; n];
        let shape = |b: BufId| program.buffers[b.0 as usize].shape.clone();
        for step in &program.steps {
            let found = match (&step.kind, step.inputs.as_slice()) {
                (StepKind::Op(Op::Embedding), [table, ids, ..]) => shape(*table).first().map(|&v| (*ids, v, "embedding id")),
                (StepKind::Op(Op::EmbeddingGrad), [ids, ..]) => shape(step.output).first().map(|&v| (*ids, v, "embedding id")),
                (StepKind::Op(Op::CrossEntropy | Op::CrossEntropyGrad), [logits, labels, ..]) => shape(*logits).last().map(|&c| (*labels, c, "label")),
                _ => None,
            };
            if let Some((b, bound, what)) = found {
                let s = program.storage(b).0 as usize;
                bounds[s] = Some(match bounds[s] {
                    Some((old, w)) if old <= bound => (old, w),
                    _ => (bound, what),
                });
            }
        }

        let sync_each = std::env::var("SHARDPLAN_CUDA_SYNC").is_ok_and(|v| !v.is_empty() && v != "0");
        Ok(GpuExecutor { program, ordinal, _ctx: ctx, stream, blas, storage, banks, banked, launches, bounds, bytes: total, sync_each, profile: None })
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The storage index and bank of buffer `b` in `slot`.
    fn loc(&self, b: BufId, slot: usize) -> (usize, usize) {
        let i = self.program.storage(b).0 as usize;
        (if slot == 0 || !self.banked[i] { 0 } else { slot }, i)
    }

    fn mem(&self, (bank, i): (usize, usize)) -> Result<&Mem, EngineError> {
        let m = if bank == 0 { self.storage.get(i) } else { self.banks.get(bank - 1).and_then(|b| b.get(i)) };
        m.and_then(Option::as_ref).ok_or_else(|| bug(format!("buffer {i} has no memory in buffer set {bank}")))
    }

    fn mem_mut(&mut self, (bank, i): (usize, usize)) -> Result<&mut Mem, EngineError> {
        let m = if bank == 0 { self.storage.get_mut(i) } else { self.banks.get_mut(bank - 1).and_then(|b| b.get_mut(i)) };
        m.and_then(Option::as_mut).ok_or_else(|| bug(format!("buffer {i} has no memory in buffer set {bank}")))
    }

    fn ptr(&self, b: BufId, slot: usize) -> Result<u64, EngineError> {
        Ok(self.mem(self.loc(b, slot))?.ptr(&self.stream))
    }

    fn driver(&self, what: &str, e: cudarc::driver::DriverError) -> EngineError {
        device(format!("GPU {}: {what} failed ({e:?})", self.ordinal))
    }

    /// Waits for every launch so far; an asynchronous failure of an
    /// earlier kernel surfaces here.
    fn sync(&self, before: &str) -> Result<(), EngineError> {
        self.stream.synchronize().map_err(|e| {
            let hint = if self.sync_each { "" } else { "; run with SHARDPLAN_CUDA_SYNC=1 to find the kernel" };
            device(format!("GPU {}: a launch failed before {before} ({e:?}){hint}", self.ordinal))
        })
    }

    fn find(&self, want: &BufKind) -> Option<usize> {
        self.program.buffers.iter().position(|b| &b.kind == want)
    }

    /// Checks ids or labels bound for storage buffer `i`.
    fn check_bounds(&self, i: usize, v: &[i32]) -> Result<(), EngineError> {
        if let Some((bound, what)) = self.bounds[i] {
            if let Some((p, id)) = v.iter().enumerate().find(|(_, &id)| usize::try_from(id).map_or(true, |r| r >= bound)) {
                return Err(EngineError::BadData(format!("{what} {id} at position {p} is outside 0..{bound}")));
            }
        }
        Ok(())
    }

    /// Copies `data` into the memory at `l` (buffer `kind`, for messages).
    fn upload(&mut self, l: (usize, usize), kind: &BufKind, data: Data<'_>) -> Result<(), EngineError> {
        if let Data::I32(v) = data {
            self.check_bounds(l.1, v)?;
        }
        let stream = self.stream.clone();
        let want = self.program.buffers[l.1].len();
        let mem = self.mem_mut(l)?;
        let r = match (mem, data) {
            (Mem::F32(dst), Data::F32(src)) if src.len() == want => stream.memcpy_htod(src, dst),
            (Mem::I32(dst), Data::I32(src)) if src.len() == want => stream.memcpy_htod(src, dst),
            (dst, src) => {
                let have = match dst {
                    Mem::F32(_) => format!("f32 × {want}"),
                    Mem::I32(_) => format!("i32 × {want}"),
                    Mem::Bf16(_) => format!("bf16 × {want}"),
                };
                let got = match src {
                    Data::F32(v) => format!("f32 × {}", v.len()),
                    Data::I32(v) => format!("i32 × {}", v.len()),
                };
                return Err(bug(format!("{kind:?} holds {have}, was given {got}")));
            }
        };
        r.map_err(|e| self.driver(&format!("copying {kind:?} to the device"), e))
    }

    /// Sets a parameter, state or input. Values of the wrong length are refused.
    pub fn set(&mut self, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError> {
        let Some(i) = self.find(kind) else { return Ok(()) };
        let l = (0, self.program.storage(BufId(i as u32)).0 as usize);
        self.upload(l, kind, data)
    }

    /// Sets an input (or any buffer of `kind`) in buffer set `slot`.
    pub fn set_in(&mut self, slot: usize, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError> {
        let Some(i) = self.find(kind) else { return Ok(()) };
        let l = self.loc(BufId(i as u32), slot);
        self.upload(l, kind, data)
    }

    /// Reads the f32 memory at `l` (`len` values from the start).
    fn download(&self, l: (usize, usize), len: usize) -> Result<Option<Vec<f32>>, EngineError> {
        let Mem::F32(src) = self.mem(l)? else { return Ok(None) };
        let mut out = vec![0.0f32; len.min(src.len())];
        self.stream.memcpy_dtoh(&src.slice(0..out.len()), &mut out).map_err(|e| self.driver("copying a buffer to the host", e))?;
        self.sync("a copy to the host")?;
        Ok(Some(out))
    }

    /// The f32 data of the buffer holding `kind` (a parameter, a state).
    pub fn get(&self, kind: &BufKind) -> Result<Option<Vec<f32>>, EngineError> {
        let Some(i) = self.find(kind) else { return Ok(None) };
        let s = self.program.storage(BufId(i as u32)).0 as usize;
        self.download((0, s), self.program.buffers[s].len())
    }

    /// The f32 data of buffer `b` (buffer set 0).
    pub fn buffer(&self, b: BufId) -> Result<Vec<f32>, EngineError> {
        let s = self.program.storage(b).0 as usize;
        Ok(self.download((0, s), self.program.buffers[b.0 as usize].len())?.unwrap_or_default())
    }

    /// The loss as computed in buffer set `slot`.
    pub fn loss_in(&self, slot: usize) -> Result<f32, EngineError> {
        let l = self.loc(self.program.loss, slot);
        Ok(self.download(l, 1)?.and_then(|v| v.first().copied()).unwrap_or(f32::NAN))
    }

    /// Starts a step: fills the hypers and zeroes the gradient accumulators.
    pub fn begin_step(&mut self, hyper: &dyn Fn(Hyper) -> f64) -> Result<(), EngineError> {
        let stream = self.stream.clone();
        for i in 0..self.program.buffers.len() {
            let (kind, len) = (self.program.buffers[i].kind.clone(), self.program.buffers[i].len());
            let r = match (&kind, self.storage[i].as_mut()) {
                (BufKind::Hyper(h), Some(Mem::F32(v))) => stream.memcpy_htod(&vec![hyper(*h) as f32; len.max(1)], v),
                (BufKind::Accum(_), Some(Mem::F32(v))) => stream.memset_zeros(v),
                _ => Ok(()),
            };
            r.map_err(|e| self.driver(&format!("setting {kind:?} at the start of a step"), e))?;
        }
        Ok(())
    }

    /// Runs the steps of one pass (`role`) in buffer set `slot`.
    pub fn run_phase(&mut self, role: Role, slot: usize, comm: &mut dyn Comm) -> Result<(), EngineError> {
        for si in 0..self.program.steps.len() {
            if self.program.steps[si].role == role {
                self.timed_step(si, slot, comm)?;
            }
        }
        Ok(())
    }

    fn timed_step(&mut self, si: usize, slot: usize, comm: &mut dyn Comm) -> Result<(), EngineError> {
        if self.profile.is_none() {
            return self.run_step(si, slot, comm);
        }
        let t = std::time::Instant::now();
        self.run_step(si, slot, comm)?;
        self.sync(&format!("the end of step {si}"))?;
        if let Some(p) = self.profile.as_mut() {
            p[si] += t.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// Runs one step: every kernel, then the assignments. Returns the loss.
    pub fn step(&mut self, hyper: &dyn Fn(Hyper) -> f64) -> Result<f32, EngineError> {
        self.begin_step(hyper)?;
        for si in 0..self.program.steps.len() {
            self.timed_step(si, 0, &mut Alone)?;
        }
        self.finish_step()?;
        self.loss_in(0)
    }

    /// Ends a step: every parameter and state takes its new value: a
    /// temporary's memory is traded with it (its device pointer; the
    /// temporary is rewritten from scratch next step), other values are
    /// copied on the device.
    pub fn finish_step(&mut self) -> Result<(), EngineError> {
        let mut traded: Vec<usize> = Vec::new();
        for (t, src) in self.program.assigns.clone() {
            let kind = match t {
                Target::Param(i) => BufKind::Param(i),
                Target::State(i) => BufKind::State(i),
            };
            let Some(dst) = self.find(&kind) else { continue };
            let dst = self.program.storage(BufId(dst as u32)).0 as usize;
            let src = self.program.storage(src).0 as usize;
            let is_temp = self.program.buffers[src].kind == BufKind::Temp;
            if is_temp && !traded.contains(&src) && src != dst {
                traded.push(src);
                self.storage.swap(src, dst);
            } else if src != dst {
                let stream = self.stream.clone();
                let (a, b) = if src < dst {
                    let (lo, hi) = self.storage.split_at_mut(dst);
                    (&lo[src], &mut hi[0])
                } else {
                    let (lo, hi) = self.storage.split_at_mut(src);
                    (&hi[0], &mut lo[dst])
                };
                if let (Some(Mem::F32(s)), Some(Mem::F32(d))) = (a, b) {
                    if s.len() == d.len() {
                        stream.memcpy_dtod(s, d).map_err(|e| self.driver(&format!("assigning {kind:?}"), e))?;
                    }
                }
            }
        }
        if self.sync_each {
            self.sync("the end of the step")?;
        }
        Ok(())
    }

    fn run_step(&mut self, si: usize, slot: usize, comm: &mut dyn Comm) -> Result<(), EngineError> {
        let what = describe(&self.program.steps[si].kind);
        for li in 0..self.launches[si].len() {
            if matches!(self.launches[si][li], Ready::Comm) {
                self.comm(si, slot, comm)?;
                continue;
            }
            match &self.launches[si][li] {
                Ready::Kernel { name, func, grid, block, shared_bytes, args } => {
                    let ptrs: Vec<u64> = args.iter().map(|&b| self.ptr(b, slot)).collect::<Result<_, _>>()?;
                    let mut launch = self.stream.launch_builder(func);
                    for p in &ptrs {
                        launch.arg(p);
                    }
                    let cfg = LaunchConfig { grid_dim: (*grid, 1, 1), block_dim: (*block, 1, 1), shared_mem_bytes: *shared_bytes };
                    // SAFETY: the kernel takes one pointer per argument, in
                    // order, each to a live allocation of its buffer's size
                    // (codegen's contract); the pointers outlive the call.
                    unsafe { launch.launch(cfg) }
                        .map_err(|e| device(format!("GPU {}: step {si} ({what}): launching kernel {name} failed ({e:?})", self.ordinal)))?;
                    if self.sync_each {
                        self.sync(&format!("the end of step {si} ({what}), kernel {name}"))?;
                    }
                }
                Ready::Gemm(g) => {
                    self.gemm(g, slot).map_err(|m| device(format!("GPU {}: step {si} ({what}): {m}", self.ordinal)))?;
                    if self.sync_each {
                        self.sync(&format!("the end of step {si} ({what}), cuBLAS"))?;
                    }
                }
                Ready::Comm => {}
            }
        }
        Ok(())
    }

    /// A row-major batched product through cuBLAS (column-major): C = A·B
    /// is computed as Cᵀ = Bᵀ·Aᵀ, which reads the row-major operands as they are.
    fn gemm(&self, g: &Gemm, slot: usize) -> Result<(), String> {
        let ptr = |b: BufId| self.ptr(b, slot).map_err(|e| e.to_string());
        let (a, b, c) = (ptr(g.a)?, ptr(g.b)?, ptr(g.out)?);
        let int = |x: usize, what: &str| i32::try_from(x).map_err(|_| format!("{what} = {x} is too large for cuBLAS"));
        let (m, n, k) = (int(g.m, "m")?, int(g.n, "n")?, int(g.k, "k")?);
        let batch = g.a_offsets.len();
        if batch == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        let op = |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
        // Leading dimensions of the row-major storage: B is [k, n] (or [n, k]), A is [m, k] (or [k, m]).
        let ldb = if g.trans_b { k } else { n };
        let lda = if g.trans_a { m } else { k };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let at = |base: u64, off: usize| base + 4 * off as u64;
        let h = *self.blas.handle();
        let status = match g.strides() {
            Some((sa, sb)) => {
                // SAFETY: the pointers address the buffers `check_gemm` sized
                // for every product; alpha and beta are host values (the
                // handle's default pointer mode).
                unsafe {
                    blas::sgemm_strided_batched(
                        h,
                        op(g.trans_b),
                        op(g.trans_a),
                        n,
                        m,
                        k,
                        &alpha,
                        at(b, g.b_offsets[0]) as *const f32,
                        ldb,
                        sb as i64,
                        at(a, g.a_offsets[0]) as *const f32,
                        lda,
                        sa as i64,
                        &beta,
                        c as *mut f32,
                        n,
                        (g.m * g.n) as i64,
                        int(batch, "the batch")?,
                    )
                }
            }
            None => (0..batch).try_for_each(|i| {
                // SAFETY: as above, one product at a time.
                unsafe {
                    blas::sgemm(
                        h,
                        op(g.trans_b),
                        op(g.trans_a),
                        n,
                        m,
                        k,
                        &alpha,
                        at(b, g.b_offsets[i]) as *const f32,
                        ldb,
                        at(a, g.a_offsets[i]) as *const f32,
                        lda,
                        &beta,
                        at(c, i * g.m * g.n) as *mut f32,
                        n,
                    )
                }
            }),
        };
        status.map_err(|e| format!("cuBLAS sgemm [{}×{}]·[{}×{}] × {batch} failed ({e:?})", g.m, g.k, g.k, g.n))
    }

    /// A transfer or collective: through NCCL when the `Comm` routes it
    /// there (devices on distinct physical GPUs), else staged through host memory.
    fn comm(&mut self, si: usize, slot: usize, comm: &mut dyn Comm) -> Result<(), EngineError> {
        let step = &self.program.steps[si];
        let StepKind::Op(op) = &step.kind else { return Err(bug(format!("step {si} is not a transfer"))) };
        let op = op.clone();
        if let Some(r) = comm.on_gpus(&op, &mut |n| self.comm_nccl(si, slot, &op, n)) {
            return r;
        }
        let step = &self.program.steps[si];
        let out_shape = self.program.buffers[step.output.0 as usize].shape.clone();
        let input = match step.inputs.first() {
            Some(&b) if !matches!(op, Op::Recv { .. }) => {
                let shape = self.program.buffers[b.0 as usize].shape.clone();
                let data = self.download(self.loc(b, slot), self.program.buffers[b.0 as usize].len())?.unwrap_or_default();
                Some((data, shape))
            }
            _ => None,
        };
        let mut out = vec![0.0f32; out_shape.iter().product()];
        comm.run(&op, input.as_ref().map(|(d, s)| (d.as_slice(), s.as_slice())), &mut out, &out_shape)?;
        if matches!(op, Op::Send { .. }) {
            return Ok(());
        }
        let l = self.loc(step.output, slot);
        let stream = self.stream.clone();
        let ordinal = self.ordinal;
        match self.mem_mut(l)? {
            Mem::F32(dst) if dst.len() >= out.len() => stream
                .memcpy_htod(&out, dst)
                .map_err(|e| device(format!("GPU {ordinal}: step {si}: copying the result of {} to the device failed ({e:?})", op.name()))),
            _ => Err(bug(format!("step {si}: {} writes a buffer that is not f32 of {} values", op.name(), out.len()))),
        }
    }

    /// A transfer or collective through NCCL, from and into device memory.
    fn comm_nccl(&mut self, si: usize, slot: usize, op: &Op, nccl: &mut Nccl) -> Result<(), EngineError> {
        let step = &self.program.steps[si];
        let f32_at = |b: BufId| -> Result<(u64, Vec<usize>), EngineError> {
            match self.mem(self.loc(b, slot))? {
                m @ Mem::F32(_) => Ok((m.ptr(&self.stream), self.program.buffers[b.0 as usize].shape.clone())),
                Mem::I32(_) | Mem::Bf16(_) => Err(bug(format!("step {si}: {} moves buffer {} that is not f32", op.name(), b.0))),
            }
        };
        let input = match step.inputs.first() {
            Some(&b) if !matches!(op, Op::Recv { .. }) => Some(f32_at(b)?),
            _ => None,
        };
        // A send writes nothing: its output buffer is not touched.
        let out = if matches!(op, Op::Send { .. }) { (0, self.program.buffers[step.output.0 as usize].shape.clone()) } else { f32_at(step.output)? };
        nccl.run(&self.stream, op, input.as_ref().map(|(p, s)| (*p, s.as_slice())), (out.0, &out.1)).map_err(|m| {
            // Stopped because another device failed: a failed transfer, not this GPU's failure.
            let m = format!("GPU {}: step {si}: {m}", self.ordinal);
            if nccl.peer_failure().is_some() {
                EngineError::Transfer(m)
            } else {
                device(m)
            }
        })?;
        if self.sync_each {
            self.sync(&format!("the end of step {si} ({})", op.name()))?;
        }
        Ok(())
    }

    /// Bytes of every buffer this executor holds, buffer sets included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for GpuExecutor {
    fn drop(&mut self) {
        // Buffers are freed on the stream; let it finish with them first.
        let _ = self.stream.synchronize();
    }
}

/// Loads kernel `name` compiled from `source` for `arch`.
fn load(ctx: &Arc<CudaContext>, source: &str, name: &str, arch: &str, gpu: &str) -> Result<CudaFunction, EngineError> {
    let ptx = super::nvrtc::compile(source, arch).map_err(|e| EngineError::Codegen(format!("compiling kernel {name} for {arch}: {e}")))?;
    if ptx.contains('\0') {
        return Err(EngineError::Codegen(format!("the PTX of kernel {name} contains a NUL byte")));
    }
    let module =
        ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(|e| device(format!("{gpu}: loading the module of kernel {name} failed ({e:?})")))?;
    if name.contains('\0') {
        return Err(EngineError::Codegen(format!("kernel name {name:?} contains a NUL byte")));
    }
    module.load_function(name).map_err(|e| device(format!("{gpu}: the module has no kernel {name} ({e:?})")))
}

/// Checks that every product of `g` stays inside its buffers.
fn check_gemm(g: &Gemm, p: &Program) -> Result<(), String> {
    let len = |b: BufId| p.buffers.get(b.0 as usize).map(|x| x.len()).ok_or_else(|| format!("buffer {} does not exist", b.0));
    let (a, b, c) = (len(g.a)?, len(g.b)?, len(g.out)?);
    if g.a_offsets.len() != g.b_offsets.len() {
        return Err(format!("{} offsets into a, {} into b", g.a_offsets.len(), g.b_offsets.len()));
    }
    if let Some(o) = g.a_offsets.iter().find(|&&o| o + g.m * g.k > a) {
        return Err(format!("a product reads a at {o}, past its {a} values"));
    }
    if let Some(o) = g.b_offsets.iter().find(|&&o| o + g.k * g.n > b) {
        return Err(format!("a product reads b at {o}, past its {b} values"));
    }
    if g.a_offsets.len() * g.m * g.n > c {
        return Err(format!("{} products of {}×{} do not fit the output's {c} values", g.a_offsets.len(), g.m, g.n));
    }
    Ok(())
}

/// A step's kind, for messages.
pub fn describe(kind: &StepKind) -> String {
    match kind {
        StepKind::Fused(f) => format!("fused {} ops [{} × {}]", f.body.len(), f.rows, f.cols),
        StepKind::Op(op) => op.name(),
        StepKind::Broadcast => "broadcast".into(),
        StepKind::Reduce { op, epilogue } => format!("{} + {} ops", op.name(), epilogue.body.len()),
        StepKind::MatMul { trans_a, trans_b } => format!("matmul{}{}", if *trans_a { " Aᵀ" } else { "" }, if *trans_b { " Bᵀ" } else { "" }),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", Bytes(bytes).in_unit(Unit::MiB))
}

impl Engine for GpuExecutor {
    fn program(&self) -> &Program {
        &self.program
    }
    fn set(&mut self, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError> {
        GpuExecutor::set(self, kind, data)
    }
    fn set_in(&mut self, slot: usize, kind: &BufKind, data: Data<'_>) -> Result<(), EngineError> {
        GpuExecutor::set_in(self, slot, kind, data)
    }
    fn get(&self, kind: &BufKind) -> Result<Option<Vec<f32>>, EngineError> {
        GpuExecutor::get(self, kind)
    }
    fn buffer(&self, b: BufId) -> Result<Vec<f32>, EngineError> {
        GpuExecutor::buffer(self, b)
    }
    fn begin_step(&mut self, hyper: &dyn Fn(Hyper) -> f64) -> Result<(), EngineError> {
        GpuExecutor::begin_step(self, hyper)
    }
    fn run_phase(&mut self, role: Role, slot: usize, comm: &mut dyn Comm) -> Result<(), EngineError> {
        GpuExecutor::run_phase(self, role, slot, comm)
    }
    fn finish_step(&mut self) -> Result<(), EngineError> {
        GpuExecutor::finish_step(self)
    }
    fn loss_in(&self, slot: usize) -> Result<f32, EngineError> {
        GpuExecutor::loss_in(self, slot)
    }
    fn step(&mut self, hyper: &dyn Fn(Hyper) -> f64) -> Result<f32, EngineError> {
        GpuExecutor::step(self, hyper)
    }
    fn bytes(&self) -> u64 {
        self.bytes
    }
    fn enable_profile(&mut self) {
        self.profile = Some(vec![0.0; self.program.steps.len()]);
    }
    fn profile(&self) -> &[f64] {
        self.profile.as_deref().unwrap_or(&[])
    }
}
