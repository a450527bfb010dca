//! Collectives and transfers between GPU devices on distinct physical GPUs,
//! through NCCL.
//!
//! Input: the transfer ops of a plan and each device's physical GPU; at run
//! time, one op with the device addresses of its operand and result, on the
//! executor's stream. Output: the result in device memory, or an
//! [`NcclError`] that names the device that failed. Parts of all-gathers and reduce-scatters are
//! laid out by the partitioner's `chunk_range`, as on the host path. This
//! module knows no executor: it imports only the driver checks.
//!
//! Which ops go through NCCL ([`route`]): an all-reduce (sum), all-gather or
//! reduce-scatter whose group members all sit on distinct physical GPUs, and
//! a send/recv between two devices on distinct GPUs. Everything else keeps
//! the host path (the executor's `Comm`): all-to-all, groups or pairs that
//! share a GPU (NCCL cannot hold two ranks of one communicator on one GPU),
//! and every op of a device on the CPU.
//!
//! Communicators: one per distinct collective group (rank = position in the
//! group, as on the host path) and one per direction of a device pair that
//! sends (rank 0 sends, rank 1 receives), so that two devices sending to each
//! other at the same time never wait on each other's queue. [`Setup::new`]
//! makes their ids on the main thread; each device thread [`Setup::join`]s:
//! it opens its GPU, meets the others, initialises its ranks in one global
//! order, and meets them again. Every member decides the same way: if
//! anything failed, no device uses NCCL and the run takes the host path.
//!
//! Waiting: collectives and receives run on the executor's stream and the
//! host waits for them (as it does on the host path), polling the stream,
//! NCCL's asynchronous error, the cluster's abort flag and the timeout.
//! Sends are copied into a scratch buffer and sent on a side stream without
//! waiting: the host path's sends do not wait for the receiver either.
//!
//! Failure: a device that fails raises the shared [`Abort`] flag; every
//! device waiting in NCCL sees it within a poll, aborts its communicators
//! (`ncclCommAbort`) and returns an error naming the device that failed. A
//! wait longer than the timeout aborts likewise.

use super::driver;
use cudarc::driver::{sys as dsys, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::{result as nres, sys as nsys};
use shardplan_compiler::graph::Op;
use shardplan_compiler::partition::chunk_range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What one communicator joins.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Route {
    /// A collective among these devices; a device's rank is its position.
    Group(Vec<usize>),
    /// Transfers from the first device to the second.
    Pair(usize, usize),
}

impl Route {
    /// The devices of the communicator, in rank order.
    pub fn members(&self) -> Vec<usize> {
        match self {
            Route::Group(g) => g.clone(),
            Route::Pair(a, b) => vec![*a, *b],
        }
    }
}

/// The communicator op `op` of device `me` goes through, when it goes through
/// NCCL: `gpu[d]` is the physical GPU of device `d` (None for a CPU device).
pub fn route(me: usize, op: &Op, gpu: &[Option<usize>]) -> Option<Route> {
    let distinct = |m: &[usize]| {
        let ords: Option<Vec<usize>> = m.iter().map(|&d| gpu.get(d).copied().flatten()).collect();
        let Some(mut ords) = ords else { return false };
        let mut devs = m.to_vec();
        ords.sort_unstable();
        ords.dedup();
        devs.sort_unstable();
        devs.dedup();
        m.len() >= 2 && ords.len() == m.len() && devs.len() == m.len()
    };
    match op {
        Op::AllReduce { group, .. } | Op::AllGather { group, .. } | Op::ReduceScatter { group, .. } => {
            let m: Vec<usize> = group.iter().map(|&d| d as usize).collect();
            (m.contains(&me) && distinct(&m)).then_some(Route::Group(m))
        }
        Op::Send { to, .. } => distinct(&[me, *to as usize]).then_some(Route::Pair(me, *to as usize)),
        Op::Recv { from, .. } => distinct(&[*from as usize, me]).then_some(Route::Pair(*from as usize, me)),
        _ => None,
    }
}

/// Every communicator the ops `(device, op)` of a plan need, in the one
/// order in which every device initialises its ranks.
pub fn routes<'a>(ops: impl IntoIterator<Item = (usize, &'a Op)>, gpu: &[Option<usize>]) -> Vec<Route> {
    let set: std::collections::BTreeSet<Route> = ops.into_iter().filter_map(|(d, op)| route(d, op, gpu)).collect();
    set.into_iter().collect()
}

/// Whether `SHARDPLAN_NCCL` asks for the host path.
fn disabled() -> bool {
    std::env::var("SHARDPLAN_NCCL").is_ok_and(|v| v.trim() == "0")
}

/// The failure flag every device of one cluster shares.
#[derive(Default)]
pub struct Abort {
    failed: AtomicBool,
    cause: Mutex<Option<(usize, String)>>,
}

impl Abort {
    /// Device `device` failed: every device waiting in NCCL stops.
    pub fn raise(&self, device: usize, reason: &str) {
        let mut cause = self.cause.lock().unwrap_or_else(|p| p.into_inner());
        if cause.is_none() {
            *cause = Some((device, reason.to_string()));
        }
        self.failed.store(true, Ordering::Release);
    }

    /// The device that failed first, and why.
    pub fn cause(&self) -> Option<(usize, String)> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A meeting of `n` threads that all learn the same verdict: true when all
/// came, each with `ok`, before the first of them waited `timeout`.
struct Rendezvous {
    n: usize,
    /// (arrived, all ok so far, verdict)
    state: Mutex<(usize, bool, Option<bool>)>,
    cv: Condvar,
}

impl Rendezvous {
    fn new(n: usize) -> Rendezvous {
        Rendezvous { n, state: Mutex::new((0, true, None)), cv: Condvar::new() }
    }

    fn meet(&self, ok: bool, timeout: Duration) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += 1;
        s.1 &= ok;
        if s.2.is_none() && s.0 >= self.n {
            s.2 = Some(s.1);
            self.cv.notify_all();
        }
        let deadline = Instant::now() + timeout;
        while s.2.is_none() {
            let now = Instant::now();
            if now >= deadline {
                s.2 = Some(false);
                self.cv.notify_all();
                break;
            }
            s = self.cv.wait_timeout(s, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        s.2 == Some(true)
    }
}

/// The communicators of one cluster, before the device threads join them.
pub struct Setup {
    routes: Vec<(Route, nsys::ncclUniqueId)>,
    gpu: Vec<Option<usize>>,
    ready: Rendezvous,
    joined: Rendezvous,
    abort: Arc<Abort>,
    timeout: Duration,
    noted: AtomicBool,
}

/// Calls `f` (a call into a CUDA library), turning a loader panic into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let m = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        Err(format!("the library panicked ({m})"))
    })
}

impl Setup {
    /// The communicators of `routes` (see [`routes`]) with ids made here, or
    /// None when the plan needs none, `SHARDPLAN_NCCL=0`, or NCCL cannot be
    /// loaded (then one note says so and the host path is used).
    pub fn new(routes: Vec<Route>, gpu: Vec<Option<usize>>, abort: Arc<Abort>, timeout: Duration) -> Option<Arc<Setup>> {
        if routes.is_empty() || disabled() || driver::available().is_err() {
            return None;
        }
        let fallback = "transfers between GPUs go through host memory";
        if let Err(m) = driver::nccl_available() {
            eprintln!("note: {m}; {fallback}");
            return None;
        }
        let ids = guarded(|| routes.iter().map(|_| nres::get_uniqueid().map_err(|e| format!("ncclGetUniqueId failed ({e:?})"))).collect::<Result<Vec<_>, _>>());
        let ids = match ids {
            Ok(ids) => ids,
            Err(m) => {
                eprintln!("note: NCCL could not be used ({m}); {fallback}");
                return None;
            }
        };
        let mut members: Vec<usize> = routes.iter().flat_map(Route::members).collect();
        members.sort_unstable();
        members.dedup();
        let n = members.len();
        Some(Arc::new(Setup {
            routes: routes.into_iter().zip(ids).collect(),
            gpu,
            ready: Rendezvous::new(n),
            joined: Rendezvous::new(n),
            abort,
            timeout,
            noted: AtomicBool::new(false),
        }))
    }

    fn note(&self, m: &str) {
        if !self.noted.swap(true, Ordering::AcqRel) {
            eprintln!("note: NCCL could not be set up ({m}); transfers between GPUs go through host memory");
        }
    }

    /// Device `me`'s communicators, made on its own thread; None when it has
    /// none or when any member failed to set up (every member then decides
    /// the same way and the run takes the host path).
    pub fn join(&self, me: usize) -> Option<Nccl> {
        let mine: Vec<&(Route, nsys::ncclUniqueId)> = self.routes.iter().filter(|(r, _)| r.members().contains(&me)).collect();
        if mine.is_empty() {
            return None;
        }
        let opened = guarded(|| {
            let ordinal = self.gpu.get(me).copied().flatten().ok_or_else(|| format!("device {me} is not on a GPU"))?;
            let ctx = CudaContext::new(ordinal).map_err(|e| format!("opening GPU {ordinal} failed ({e:?})"))?;
            ctx.bind_to_thread().map_err(|e| format!("binding GPU {ordinal} failed ({e:?})"))?;
            Ok(ctx)
        });
        let ok = self.ready.meet(opened.is_ok(), self.timeout);
        let ctx = match (ok, opened) {
            (true, Ok(ctx)) => ctx,
            (_, Err(m)) => {
                self.note(&format!("device {me}: {m}"));
                return None;
            }
            (false, Ok(_)) => {
                self.note("a device did not open its GPU in time");
                return None;
            }
        };
        let mine: Vec<(Route, nsys::ncclUniqueId)> = mine.into_iter().cloned().collect();
        let (comms, failed) = init_comms(&mine, me, &ctx);
        let ok = self.joined.meet(failed.is_none(), self.timeout);
        let mut nccl =
            Nccl { me, gpu: self.gpu.clone(), comms, pending: Vec::new(), abort: self.abort.clone(), timeout: self.timeout, peer_failure: None, _ctx: ctx };
        if !ok {
            nccl.abort_all();
            self.note(&failed.unwrap_or_else(|| "another device failed to set up its communicators".into()));
            return None;
        }
        Some(nccl)
    }
}

/// Device `me`'s communicators of `mine` (its routes and their ids), on
/// `ctx`, and the first failure. Every member initialises its ranks in the
/// same global order, and goes on after a failure so that no peer is left
/// waiting for it.
fn init_comms(mine: &[(Route, nsys::ncclUniqueId)], me: usize, ctx: &Arc<CudaContext>) -> (Vec<Communicator>, Option<String>) {
    let mut comms = Vec::with_capacity(mine.len());
    let mut failed = None;
    for (route, id) in mine {
        let members = route.members();
        let rank = members.iter().position(|&d| d == me).unwrap_or(0);
        let side = match route {
            Route::Pair(from, _) if *from == me => match ctx.new_stream() {
                Ok(s) => Some(s),
                Err(e) => {
                    failed.get_or_insert(format!("creating a stream failed ({e:?})"));
                    continue;
                }
            },
            _ => None,
        };
        let mut comm: nsys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is written by NCCL; the id was made by ncclGetUniqueId
        // and is shared by exactly `members.len()` ranks, each joining once.
        let r = guarded(|| unsafe { nres::comm_init_rank(&mut comm, members.len() as i32, *id, rank as i32) }.map_err(|e| format!("{e:?}")));
        match r {
            Ok(_) if !comm.is_null() => comms.push(Communicator { route: route.clone(), comm, side }),
            Ok(_) => {
                failed.get_or_insert(format!("ncclCommInitRank for {route:?} gave no communicator"));
            }
            Err(e) => {
                failed.get_or_insert(format!("ncclCommInitRank for {route:?} failed ({e})"));
            }
        }
    }
    (comms, failed)
}

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

/// Device `me`'s communicators when every device runs in a process of its
/// own (`me` is also the rank, on GPU `ordinal` of its host). `routes` and `gpu` (an identity per physical
/// GPU, across hosts) are the same on every rank; `exchange` is an
/// all-gather over the ranks. Every rank calls it, and it makes the same
/// exchanges on every rank (none when there are no routes):
/// 1. whether NCCL can be used here, and rank 0's unique ids (one per route),
///    which every rank takes: the ids cross only MPI, no other channel;
/// 2. whether each rank opened its GPU;
/// 3. whether each rank initialised its communicators.
///
/// A failure anywhere leaves every rank on the host path (None). Built for
/// GPU ranks under mpirun; not yet run on a machine with several GPUs.
pub fn join_ranks(
    routes: &[Route],
    gpu: &[Option<usize>],
    me: usize,
    ordinal: Option<usize>,
    exchange: &dyn Fn(Vec<u8>) -> Vec<Vec<u8>>,
    abort: Arc<Abort>,
    timeout: Duration,
) -> Option<Nccl> {
    if routes.is_empty() {
        return None;
    }
    let note = |m: &str| {
        if me == 0 {
            eprintln!("note: NCCL could not be set up ({m}); transfers between GPU ranks go through host memory");
        }
    };
    let usable = !disabled() && driver::available().is_ok() && driver::nccl_available().is_ok();
    let mut mine = vec![usable as u8];
    if me == 0 && usable {
        match guarded(|| routes.iter().map(|_| nres::get_uniqueid().map_err(|e| format!("ncclGetUniqueId failed ({e:?})"))).collect::<Result<Vec<_>, _>>()) {
            Ok(ids) => ids.iter().for_each(|id| mine.extend(id.internal.iter().map(|&c| c as u8))),
            Err(_) => mine[0] = 0,
        }
    }
    let all = exchange(mine);
    let ids = match all.first() {
        Some(root) if all.iter().all(|b| b.first() == Some(&1)) && root.len() == 1 + ID_BYTES * routes.len() => decode_ids(&root[1..]),
        _ => {
            note("NCCL cannot be used on every rank");
            return None;
        }
    };
    let mine: Vec<(Route, nsys::ncclUniqueId)> = routes.iter().cloned().zip(ids).filter(|(r, _)| r.members().contains(&me)).collect();
    let opened: Result<Option<Arc<CudaContext>>, String> = if mine.is_empty() {
        Ok(None)
    } else {
        guarded(|| {
            let ordinal = ordinal.ok_or_else(|| format!("rank {me} is not on a GPU"))?;
            let ctx = CudaContext::new(ordinal).map_err(|e| format!("opening GPU {ordinal} failed ({e:?})"))?;
            ctx.bind_to_thread().map_err(|e| format!("binding GPU {ordinal} failed ({e:?})"))?;
            Ok(Some(ctx))
        })
    };
    let everyone = |ok: bool| exchange(vec![ok as u8]).iter().all(|b| b.as_slice() == [1]);
    let opened_everywhere = everyone(opened.is_ok());
    let ctx = match (opened_everywhere, opened) {
        (true, Ok(ctx)) => ctx,
        (_, Err(m)) => {
            eprintln!("note: rank {me}: {m}");
            return None;
        }
        (false, Ok(_)) => {
            note("a rank did not open its GPU");
            return None;
        }
    };
    let (comms, failed) = match &ctx {
        Some(ctx) => init_comms(&mine, me, ctx),
        None => (Vec::new(), None),
    };
    let joined = everyone(failed.is_none());
    let ctx = ctx?;
    let mut nccl = Nccl { me, gpu: gpu.to_vec(), comms, pending: Vec::new(), abort, timeout, peer_failure: None, _ctx: ctx };
    if !joined {
        nccl.abort_all();
        note(&failed.unwrap_or_else(|| "another rank failed to set up its communicators".into()));
        return None;
    }
    Some(nccl)
}

/// NCCL unique ids from their bytes, [`ID_BYTES`] each.
fn decode_ids(bytes: &[u8]) -> Vec<nsys::ncclUniqueId> {
    bytes
        .chunks_exact(ID_BYTES)
        .map(|c| {
            let mut id = nsys::ncclUniqueId { internal: [0; ID_BYTES] };
            for (d, s) in id.internal.iter_mut().zip(c) {
                *d = *s as std::ffi::c_char;
            }
            id
        })
        .collect()
}

/// One communicator of a device.
struct Communicator {
    route: Route,
    comm: nsys::ncclComm_t,
    /// The stream this device sends on (a pair it sends over).
    side: Option<Arc<CudaStream>>,
}

/// One device's NCCL communicators.
pub struct Nccl {
    me: usize,
    gpu: Vec<Option<usize>>,
    /// Null communicators have been aborted.
    comms: Vec<Communicator>,
    /// Sends in flight: done when the event completes; the scratch copy lives until then.
    pending: Vec<(CudaEvent, CudaSlice<f32>)>,
    abort: Arc<Abort>,
    timeout: Duration,
    /// Set when an op stopped because another device failed.
    peer_failure: Option<(usize, String)>,
    _ctx: Arc<CudaContext>,
}

/// Why an op through NCCL failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum NcclError {
    /// The op has no communicator of this device.
    #[error("{op} does not go through NCCL")]
    NotRouted { op: String },
    /// The op's communicator was aborted by an earlier failure.
    #[error("the NCCL communicator of {route:?} was aborted by an earlier failure")]
    Aborted { route: Route },
    /// The op's operands or result do not fit it (a bug in the program);
    /// the message says how.
    #[error("{0}")]
    Operands(String),
    /// An NCCL call failed.
    #[error("{what} failed in NCCL ({error:?})")]
    Call { what: String, error: nres::NcclError },
    /// A CUDA call around the op failed (scratch memory, an event, a copy,
    /// the stream); the message says which.
    #[error("{0}")]
    Cuda(String),
    /// NCCL reported an asynchronous error while `what` ran.
    #[error("{what}: NCCL reported {state:?}")]
    Async { what: String, state: nsys::ncclResult_t },
    /// Another device (`by`) failed while this one waited in `what`.
    #[error("device {device} stopped in {what} because device {by} failed: {reason}")]
    PeerFailed { device: usize, what: String, by: usize, reason: String },
    /// This device's own failure cancelled the op.
    #[error("{what} was cancelled by this device's failure")]
    Cancelled { what: String },
    /// The peers did not reach the op within the timeout.
    #[error("device {device} waited {secs:.1} s in {what} for its peers")]
    Timeout { device: usize, what: String, secs: f64 },
}

/// A failed NCCL op.
type R<T> = Result<T, NcclError>;

impl Nccl {
    /// The communicator `op` goes through, if it goes through NCCL.
    pub fn route(&self, op: &Op) -> Option<Route> {
        let r = route(self.me, op, &self.gpu)?;
        self.comms.iter().any(|c| c.route == r).then_some(r)
    }

    /// When the last failed op stopped because another device failed: that device and its error.
    pub fn peer_failure(&self) -> Option<(usize, String)> {
        self.peer_failure.clone()
    }

    /// Aborts every communicator of this device (ncclCommAbort): peers
    /// waiting on them return, and none of them is used again.
    pub fn abort_all(&mut self) {
        for c in &mut self.comms {
            if !c.comm.is_null() {
                // SAFETY: a live communicator of this device, aborted once.
                let _ = guarded(|| unsafe { nres::comm_abort(c.comm) }.map(|_| ()).map_err(|e| format!("{e:?}")));
                c.comm = std::ptr::null_mut();
            }
        }
        self.pending.clear();
    }

    fn comm(&self, r: &Route) -> R<&Communicator> {
        match self.comms.iter().find(|c| &c.route == r) {
            Some(c) if !c.comm.is_null() => Ok(c),
            _ => Err(NcclError::Aborted { route: r.clone() }),
        }
    }

    /// Fails an op: aborts the communicators and says why.
    fn fail(&mut self, e: NcclError) -> NcclError {
        self.abort_all();
        e
    }

    /// Waits until `stream` has finished (every NCCL op on it included),
    /// giving up when NCCL reports an error, another device failed, or the
    /// timeout passes; each of those aborts the communicators.
    fn wait(&mut self, stream: &CudaStream, comm: nsys::ncclComm_t, what: &str) -> R<()> {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            // SAFETY: a live stream of this device.
            match unsafe { dsys::cuStreamQuery(stream.cu_stream()) } {
                dsys::CUresult::CUDA_SUCCESS => return Ok(()),
                dsys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.fail(NcclError::Cuda(format!("{what} failed on the GPU ({e:?})")))),
            }
            let mut state = nsys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; `state` is written by NCCL.
            unsafe { nsys::ncclCommGetAsyncError(comm, &mut state) };
            if state != nsys::ncclResult_t::ncclSuccess && state != nsys::ncclResult_t::ncclInProgress {
                return Err(self.fail(NcclError::Async { what: what.to_string(), state }));
            }
            if let Some((by, reason)) = self.abort.cause() {
                if by != self.me {
                    self.peer_failure = Some((by, reason.clone()));
                    return Err(self.fail(NcclError::PeerFailed { device: self.me, what: what.to_string(), by, reason }));
                }
                return Err(self.fail(NcclError::Cancelled { what: what.to_string() }));
            }
            if start.elapsed() > self.timeout {
                let e = NcclError::Timeout { device: self.me, what: what.to_string(), secs: start.elapsed().as_secs_f64() };
                self.abort.raise(self.me, &e.to_string());
                return Err(self.fail(e));
            }
            polls += 1;
            if polls < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Frees the scratch copies of sends that have arrived.
    fn reap(&mut self) -> R<()> {
        let mut i = 0;
        while i < self.pending.len() {
            match self.pending[i].0.try_is_complete() {
                Ok(true) => drop(self.pending.swap_remove(i)),
                Ok(false) => i += 1,
                Err(e) => return Err(self.fail(NcclError::Cuda(format!("a send to another GPU failed ({e:?})")))),
            }
        }
        Ok(())
    }

    /// Runs `op` on `stream`: `input` is the device address and shape of
    /// the operand (none for a receive), `out` those of the result (f32).
    pub fn run(&mut self, stream: &Arc<CudaStream>, op: &Op, input: Option<(u64, &[usize])>, out: (u64, &[usize])) -> R<()> {
        self.peer_failure = None;
        self.reap()?;
        let route = self.route(op).ok_or_else(|| NcclError::NotRouted { op: op.name() })?;
        let comm = self.comm(&route)?.comm;
        let cu = stream.cu_stream() as nsys::cudaStream_t;
        let f32t = nsys::ncclDataType_t::ncclFloat32;
        let sum = nsys::ncclRedOp_t::ncclSum;
        let (dst, out_shape) = out;
        let out_len: usize = out_shape.iter().product();
        let need = |what: &str| NcclError::Operands(format!("{what} without an operand"));
        let nccl = |what: &str, error: nres::NcclError| NcclError::Call { what: what.to_string(), error };
        let what = op.name();
        match op {
            Op::AllReduce { .. } => {
                let (src, shape) = input.ok_or_else(|| need(&what))?;
                if shape.iter().product::<usize>() != out_len {
                    return Err(NcclError::Operands(format!("{what} of {shape:?} into {out_shape:?}")));
                }
                // SAFETY: both addresses hold `out_len` f32 on this GPU; the host waits below.
                unsafe { nres::all_reduce(src as _, dst as _, out_len, f32t, sum, comm, cu) }.map_err(|e| nccl(&what, e))?;
            }
            Op::AllGather { group, dim, granule, .. } => {
                let (src, shape) = input.ok_or_else(|| need(&what))?;
                let n = group.len();
                let pos =
                    group.iter().position(|&d| d as usize == self.me).ok_or_else(|| NcclError::Operands(format!("device {} is not in {what}", self.me)))?;
                let l = Layout::new(out_shape, *dim, n, *granule)?;
                if shape.iter().product::<usize>() != l.part(pos) {
                    return Err(NcclError::Operands(format!("{what} part of {} values, expected {}", shape.iter().product::<usize>(), l.part(pos))));
                }
                if l.flat() {
                    // SAFETY: the parts are equal and contiguous: `dst` holds n·widest values.
                    unsafe { nres::all_gather(src as _, dst as _, l.widest, f32t, comm, cu) }.map_err(|e| nccl(&what, e))?;
                } else {
                    let alloc =
                        |len: usize| stream.alloc_zeros::<f32>(len.max(1)).map_err(|e| NcclError::Cuda(format!("{what}: allocating scratch failed ({e:?})")));
                    let send = alloc(l.widest)?;
                    let recv = alloc(l.widest * n)?;
                    let (s, r) = (send.device_ptr(stream).0, recv.device_ptr(stream).0);
                    copy2d(stream, s, 0, src, 0, l.part(pos), 1)?;
                    // SAFETY: `send` holds widest values, `recv` n·widest.
                    unsafe { nres::all_gather(s as _, r as _, l.widest, f32t, comm, cu) }.map_err(|e| nccl(&what, e))?;
                    for i in 0..n {
                        let run = l.run(i);
                        copy2d(stream, dst + 4 * (l.parts[i].start * l.inner) as u64, l.full * l.inner, r + 4 * (i * l.widest) as u64, run, run, l.outer)?;
                    }
                    self.wait(stream, comm, &what)?;
                    return Ok(());
                }
            }
            Op::ReduceScatter { group, dim, granule, .. } => {
                let (src, shape) = input.ok_or_else(|| need(&what))?;
                let n = group.len();
                let pos =
                    group.iter().position(|&d| d as usize == self.me).ok_or_else(|| NcclError::Operands(format!("device {} is not in {what}", self.me)))?;
                let l = Layout::new(shape, *dim, n, *granule)?;
                if out_len != l.part(pos) {
                    return Err(NcclError::Operands(format!("{what} part of {out_len} values, expected {}", l.part(pos))));
                }
                if l.flat() {
                    // SAFETY: `src` holds n·widest values, `dst` widest.
                    unsafe { nres::reduce_scatter(src as _, dst as _, l.widest, f32t, sum, comm, cu) }.map_err(|e| nccl(&what, e))?;
                } else {
                    let alloc =
                        |len: usize| stream.alloc_zeros::<f32>(len.max(1)).map_err(|e| NcclError::Cuda(format!("{what}: allocating scratch failed ({e:?})")));
                    let staging = alloc(l.widest * n)?;
                    let own = alloc(l.widest)?;
                    let (s, o) = (staging.device_ptr(stream).0, own.device_ptr(stream).0);
                    for i in 0..n {
                        let run = l.run(i);
                        copy2d(stream, s + 4 * (i * l.widest) as u64, run, src + 4 * (l.parts[i].start * l.inner) as u64, l.full * l.inner, run, l.outer)?;
                    }
                    // SAFETY: `staging` holds n·widest values, `own` widest.
                    unsafe { nres::reduce_scatter(s as _, o as _, l.widest, f32t, sum, comm, cu) }.map_err(|e| nccl(&what, e))?;
                    copy2d(stream, dst, 0, o, 0, out_len, 1)?;
                    self.wait(stream, comm, &what)?;
                    return Ok(());
                }
            }
            Op::Send { .. } => {
                let (src, shape) = input.ok_or_else(|| need(&what))?;
                let len: usize = shape.iter().product();
                let side = self.comm(&route)?.side.clone().ok_or_else(|| NcclError::Operands(format!("{what}: no stream to send on")))?;
                // The copy frees the operand for later kernels; the side stream
                // sends it once the copy is done, without holding the host.
                let copy = stream.alloc_zeros::<f32>(len.max(1)).map_err(|e| NcclError::Cuda(format!("{what}: allocating scratch failed ({e:?})")))?;
                let c = copy.device_ptr(stream).0;
                copy2d(stream, c, 0, src, 0, len, 1)?;
                let event = |s: &CudaStream| s.record_event(None).map_err(|e| NcclError::Cuda(format!("{what}: recording an event failed ({e:?})")));
                side.wait(&event(stream)?).map_err(|e| NcclError::Cuda(format!("{what}: ordering the send failed ({e:?})")))?;
                // SAFETY: `copy` holds `len` values and lives in `pending` until the send completes.
                unsafe { nres::send(c as _, len, f32t, 1, comm, side.cu_stream() as _) }.map_err(|e| nccl(&what, e))?;
                let done = event(&side)?;
                self.pending.push((done, copy));
                return Ok(());
            }
            Op::Recv { .. } => {
                // SAFETY: `dst` holds `out_len` values; the host waits below.
                unsafe { nres::recv(dst as _, out_len, f32t, 0, comm, cu) }.map_err(|e| nccl(&what, e))?;
            }
            _ => return Err(NcclError::NotRouted { op: what }),
        }
        self.wait(stream, comm, &what)
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Sends still in flight have a live receiver unless a device failed
        // (then the communicators are aborted already): let them arrive.
        let start = Instant::now();
        while !self.pending.is_empty() && start.elapsed() < self.timeout && self.abort.cause().is_none() {
            if self.reap().is_err() {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        self.abort_all();
    }
}

/// How a tensor splits along `dim` into `n` parts of whole granules.
struct Layout {
    parts: Vec<std::ops::Range<usize>>,
    outer: usize,
    inner: usize,
    full: usize,
    /// Values of the widest part: every rank sends this many.
    widest: usize,
}

impl Layout {
    fn new(shape: &[usize], dim: usize, n: usize, granule: usize) -> R<Layout> {
        if dim >= shape.len() || n == 0 {
            return Err(NcclError::Operands(format!("splitting dim {dim} of {shape:?} {n} ways")));
        }
        let u = granule.max(1);
        let full = shape[dim];
        let parts: Vec<_> = (0..n)
            .map(|i| {
                let r = chunk_range(full / u, n, i);
                r.start * u..r.end * u
            })
            .collect();
        let outer = shape[..dim].iter().product();
        let inner = shape[dim + 1..].iter().product();
        let widest = parts.iter().map(|r| r.len()).max().unwrap_or(0) * outer * inner;
        Ok(Layout { parts, outer, inner, full, widest })
    }

    /// Contiguous values of part `i` in one of the `outer` rows.
    fn run(&self, i: usize) -> usize {
        self.parts[i].len() * self.inner
    }

    /// Values of part `i`.
    fn part(&self, i: usize) -> usize {
        self.run(i) * self.outer
    }

    /// The parts are equal and each is one contiguous run: NCCL's own layout.
    fn flat(&self) -> bool {
        self.outer == 1 && self.parts.iter().all(|p| p.len() * self.inner == self.widest)
    }
}

/// Copies `rows` rows of `width` f32 on the device, from `src` (rows
/// `src_pitch` values apart) to `dst` (`dst_pitch` apart; 0: packed).
fn copy2d(stream: &CudaStream, dst: u64, dst_pitch: usize, src: u64, src_pitch: usize, width: usize, rows: usize) -> R<()> {
    if width == 0 || rows == 0 {
        return Ok(());
    }
    let pitch = |p: usize| 4 * if p == 0 { width } else { p };
    let desc = dsys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: dsys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        srcHost: std::ptr::null(),
        srcDevice: src,
        srcArray: std::ptr::null_mut(),
        srcPitch: pitch(src_pitch),
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: dsys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: pitch(dst_pitch),
        WidthInBytes: 4 * width,
        Height: rows,
    };
    // SAFETY: both regions lie inside live allocations of this GPU (the
    // callers size them from the same layout).
    match unsafe { dsys::cuMemcpy2DAsync_v2(&desc, stream.cu_stream()) } {
        dsys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(NcclError::Cuda(format!("a copy on the device failed ({e:?})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_reduce(group: &[u32]) -> Op {
        Op::AllReduce { group: group.to_vec(), id: 1, axis: "data".into() }
    }

    #[test]
    fn groups_on_distinct_gpus_go_through_nccl() {
        // Four devices on two GPUs (i mod 2): {0, 1} and {2, 3} span both GPUs; {0, 2} shares GPU 0.
        let gpu = [Some(0), Some(1), Some(0), Some(1)];
        assert_eq!(route(0, &all_reduce(&[0, 1]), &gpu), Some(Route::Group(vec![0, 1])));
        assert_eq!(route(3, &all_reduce(&[2, 3]), &gpu), Some(Route::Group(vec![2, 3])));
        assert_eq!(route(0, &all_reduce(&[0, 2]), &gpu), None);
        assert_eq!(route(0, &all_reduce(&[0, 1, 2, 3]), &gpu), None);
        // A device outside the group, or alone, never uses it.
        assert_eq!(route(2, &all_reduce(&[0, 1]), &gpu), None);
        assert_eq!(route(0, &all_reduce(&[0]), &gpu), None);
    }

    #[test]
    fn one_gpu_or_a_cpu_member_keeps_the_host_path() {
        let one = [Some(0), Some(0), Some(0)];
        assert_eq!(route(0, &all_reduce(&[0, 1, 2]), &one), None);
        assert_eq!(route(0, &Op::Send { to: 1, id: 4 }, &one), None);
        let mixed = [Some(0), None, Some(1)];
        assert_eq!(route(0, &all_reduce(&[0, 1]), &mixed), None);
        assert_eq!(route(0, &Op::Send { to: 1, id: 4 }, &mixed), None);
        assert_eq!(route(0, &all_reduce(&[0, 2]), &mixed), Some(Route::Group(vec![0, 2])));
    }

    #[test]
    fn transfers_use_one_communicator_per_direction() {
        let gpu = [Some(0), Some(1)];
        assert_eq!(route(0, &Op::Send { to: 1, id: 4 }, &gpu), Some(Route::Pair(0, 1)));
        assert_eq!(route(1, &Op::Recv { from: 0, id: 4 }, &gpu), Some(Route::Pair(0, 1)));
        assert_eq!(route(1, &Op::Send { to: 0, id: 5 }, &gpu), Some(Route::Pair(1, 0)));
        let a2a = Op::AllToAll { group: vec![0, 1], id: 6, axis: "model".into(), from: 0, from_granule: 1, to: 1, to_granule: 1 };
        assert_eq!(route(0, &a2a, &gpu), None, "all-to-all keeps the host path");
    }

    #[test]
    fn routes_are_deduplicated_in_one_order() {
        let gpu = [Some(0), Some(1), Some(2)];
        let (ar, s, r) = (all_reduce(&[0, 1, 2]), Op::Send { to: 2, id: 1 }, Op::Recv { from: 1, id: 1 });
        let ops = [(0, &ar), (1, &ar), (2, &ar), (1, &s), (2, &r)];
        assert_eq!(routes(ops, &gpu), vec![Route::Group(vec![0, 1, 2]), Route::Pair(1, 2)]);
    }

    #[test]
    fn layouts_pad_unequal_parts_and_know_nccl_s_own() {
        // [2, 10] along dim 1 in granules of 2 over 3: 4 + 4 + 2 columns.
        let l = Layout::new(&[2, 10], 1, 3, 2).expect("layout");
        assert_eq!((l.outer, l.inner, l.widest), (2, 1, 8));
        assert_eq!((l.part(0), l.part(2)), (8, 4));
        assert!(!l.flat());
        assert!(Layout::new(&[6, 4], 0, 3, 1).expect("layout").flat());
        assert!(!Layout::new(&[7, 4], 0, 3, 1).expect("layout").flat());
        assert!(Layout::new(&[1, 6, 4], 1, 2, 1).expect("layout").flat());
    }

    #[test]
    fn a_rendezvous_gives_every_member_one_verdict() {
        let r = Arc::new(Rendezvous::new(3));
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let r = r.clone();
                std::thread::spawn(move || r.meet(i != 1, Duration::from_secs(10)))
            })
            .collect();
        let got: Vec<bool> = hs.into_iter().map(|h| h.join().expect("thread")).collect();
        assert_eq!(got, vec![false; 3]);
        // A member that never comes fails the meeting after the timeout, for everyone.
        let r = Rendezvous::new(2);
        assert!(!r.meet(true, Duration::from_millis(20)));
        assert!(!r.meet(true, Duration::from_secs(10)), "a late member learns the same verdict");
    }
}
