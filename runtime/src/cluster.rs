//! The multi-device runtime: one worker thread per device of a partitioned
//! plan, each driving its own engine: the CPU executor, or a GPU executor
//! (a logical device: its own stream and buffers on a physical GPU, which
//! several logical devices may share). Collectives and transfers between
//! GPU devices on distinct physical GPUs go through NCCL
//! (`backend::cuda::nccl`); all others are staged through host memory and
//! go over the same fabric as the CPU's.
//!
//! Input: a verified [`Plan`], global parameters, and per step the rows of
//! the batch. Output: the step's loss (summed over the devices that hold a
//! part of it, in device order) and, on request, the global parameters and
//! optimizer states gathered from the devices' pieces.
//!
//! Each device owns its executor, buffers and endpoint; transfers and
//! collectives move real bytes between the threads, tagged with (plan hash,
//! instruction, sequence number). When any device fails (an error, a panic,
//! or an injected fault), it aborts the fabric and the NCCL communicators,
//! every other device stops at its next transfer (or within a poll when it
//! waits in NCCL), and [`Cluster::step`] returns one [`ClusterError`] naming
//! the device and the step: the device that failed on its own, not one that
//! stopped because of it. Its variant tells a device's engine failure (and,
//! through [`EngineError`], a GPU's failure from a bug or bad data) from a
//! failed transfer, a panic or an injected fault.
//!
//! Invariants: the devices' engines are built by `backend::engine` and
//! driven only through [`Engine`]; tensors and batches are split with the
//! partitioner's `chunk_range`, so each device gets the piece its program
//! was compiled for.

use crate::backend::cuda::nccl::{self, Abort, Nccl, Setup};
use crate::collectives::{self, Tag};
use crate::data::Batch;
use crate::engine::{Backend, Comm, Data, Engine, EngineError};
use crate::transport::{Fabric, Header, Message, Transport, TransportError};
use shardplan_compiler::graph::{Hyper, Op, Role};
use shardplan_compiler::kernel::{BufKind, StepKind};
use shardplan_compiler::partition::{chunk_range, DeviceProgram, Phase, Piece, Plan};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Global parameters and optimizer states, in index order.
pub type Tensors = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// What a device was doing when it failed, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum During {
    /// Taking its pieces of the parameters and states.
    Load,
    /// Running step `n` (counted from 1).
    Step(u64),
    /// Handing its pieces back.
    Read,
}

impl std::fmt::Display for During {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            During::Load => write!(f, " while loading parameters"),
            During::Step(n) => write!(f, " at step {n}"),
            During::Read => write!(f, " while reading parameters back"),
        }
    }
}

/// Why a command of the cluster failed. Each variant names the device at
/// the root of the failure; its `Display` is the one line a runner prints.
#[derive(Clone, Debug)]
pub enum ClusterError {
    /// Device `device` could not build its engine on `backend` (compile its
    /// program on the CPU, or set it up on its GPU).
    Setup { device: usize, backend: Backend, error: EngineError },
    /// Device `device`'s engine failed: while running a pass of step `step`
    /// (counted from 1), or, `step` None, outside a pass (setting a
    /// parameter or the batch, starting or ending a step, reading back).
    Engine { device: usize, step: Option<u64>, error: EngineError },
    /// A transfer or collective failed at step `step` (counted from 1): a
    /// peer ran another instruction, sent malformed data, vanished or timed out.
    Transport { step: u64, error: TransportError },
    /// Device `device` stopped because another device failed (`error` names
    /// it); reported only when no device says it failed on its own.
    Stopped { device: usize, error: EngineError },
    /// Device `device` was told to fail at step `step` (a fault injected for tests).
    Injected { device: usize, step: u64 },
    /// Device `device` panicked (an internal error).
    Panicked { device: usize, during: During, what: String },
    /// Device `device`'s thread is gone.
    Lost { device: usize },
    /// Device `device`, in another process of the run, failed as `message`
    /// says (`secondary`: it only stopped because another device failed).
    Remote { device: usize, secondary: bool, message: String },
}

impl ClusterError {
    /// The device the error names.
    pub fn device(&self) -> usize {
        match self {
            ClusterError::Setup { device, .. }
            | ClusterError::Engine { device, .. }
            | ClusterError::Stopped { device, .. }
            | ClusterError::Injected { device, .. }
            | ClusterError::Panicked { device, .. }
            | ClusterError::Lost { device }
            | ClusterError::Remote { device, .. } => *device,
            ClusterError::Transport { error, .. } => error.device(),
        }
    }

    /// The engine's error behind it, if an engine failed.
    pub fn engine(&self) -> Option<&EngineError> {
        match self {
            ClusterError::Setup { error, .. } | ClusterError::Engine { error, .. } | ClusterError::Stopped { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether shardplan is at fault: an engine's bug, or a panic.
    pub fn is_bug(&self) -> bool {
        matches!(self, ClusterError::Panicked { .. }) || self.engine().is_some_and(EngineError::is_bug)
    }

    /// Whether a device itself (a GPU, its driver or libraries) failed.
    pub fn is_device(&self) -> bool {
        self.engine().is_some_and(EngineError::is_device)
    }

    /// Whether the device only stopped because another one failed.
    fn is_secondary(&self) -> bool {
        matches!(self, ClusterError::Stopped { .. } | ClusterError::Remote { secondary: true, .. })
    }
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterError::Setup { device, backend: Backend::Cuda { ordinal, .. }, error } => {
                write!(f, "device {device} cannot set up its program on GPU {ordinal}: {error}")
            }
            ClusterError::Setup { device, backend: Backend::Cpu, error } => write!(f, "device {device} cannot compile its program: {error}"),
            ClusterError::Engine { device, step: Some(step), error } => write!(f, "device {device} failed at step {step}: {error}"),
            ClusterError::Engine { device, step: None, error } => write!(f, "device {device}: {error}"),
            ClusterError::Transport { step, error } => write!(f, "{error} (step {step})"),
            ClusterError::Stopped { error, .. } => write!(f, "{error}"),
            ClusterError::Injected { device, step } => write!(f, "device {device} failed at step {step}: injected fault"),
            ClusterError::Panicked { device, during, what } => write!(f, "device {device} failed{during}: internal error ({what})"),
            ClusterError::Lost { device } => write!(f, "device {device} stopped unexpectedly"),
            ClusterError::Remote { device, message, .. } => write!(f, "{message} (rank {device})"),
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClusterError::Transport { error, .. } => Some(error),
            _ => self.engine().map(|e| e as _),
        }
    }
}

/// Per-step scalars.
#[derive(Clone, Copy, Debug)]
pub struct Hypers {
    pub lr: f64,
    pub bias_correction1: f64,
    pub bias_correction2: f64,
    /// The step, from 0.
    pub step: u64,
}

impl Hypers {
    /// The value of one hyper.
    pub fn get(&self, h: Hyper) -> f64 {
        match h {
            Hyper::Lr => self.lr,
            Hyper::BiasCorrection1 => self.bias_correction1,
            Hyper::BiasCorrection2 => self.bias_correction2,
            Hyper::Step => self.step as f64,
        }
    }
}

enum Cmd {
    Load {
        params: Vec<(usize, Vec<f32>)>,
        states: Vec<(usize, Vec<f32>)>,
    },
    Step {
        step: u64,
        hyper: Hypers,
        /// Each microbatch's samples, and their indices in the data set.
        batches: Vec<(Batch, Vec<usize>)>,
        fault: bool,
    },
    Read,
    /// Start timing every kernel.
    EnableProfile,
    /// The seconds spent in each kernel so far.
    Profile,
}

enum Reply {
    Done,
    Loss(Option<f64>, DeviceStats),
    Tensors { params: Vec<(usize, Vec<f32>)>, states: Vec<(usize, Vec<f32>)> },
    Profile(Vec<f64>),
    Failed(ClusterError),
}

struct Worker {
    tx: Sender<Cmd>,
    rx: Receiver<Reply>,
    handle: Option<JoinHandle<()>>,
}

/// What one device did during one step.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceStats {
    /// Seconds in forward and backward passes, transfers and collectives excluded.
    pub busy_s: f64,
    /// Seconds in transfers and collectives (waiting included).
    pub comm_s: f64,
    /// Seconds of the whole step.
    pub step_s: f64,
    /// Bytes of the device's buffers (parameters, states, gradients, activations).
    pub bytes: u64,
}

/// The other processes of a run launched with one process per device
/// (`mpirun`, `srun`): how the processes agree on each command's outcome.
pub trait Peers {
    /// This process's rank, which is also the device it runs.
    fn rank(&self) -> usize;
    /// How many processes the run has.
    fn size(&self) -> usize;
    /// Every process's `mine`, in rank order. Every process calls it, in the same order.
    fn all_gather(&self, mine: Vec<u8>) -> Vec<Vec<u8>>;
    /// Another handle on the same processes, for the device's thread.
    fn boxed(&self) -> Box<dyn Peers + Send>;
}

/// An identity per physical GPU of the run, for each rank: ranks on one
/// host and one GPU ordinal share it, ranks on other hosts never do; None
/// for a rank on the CPU. Every rank calls it (one all-gather) with its host
/// name and its GPU ordinal, and all get the same answer.
pub fn gpu_identities(peers: &dyn Peers, host: &str, ordinal: Option<usize>) -> Vec<Option<usize>> {
    let mine = match ordinal {
        Some(o) => format!("{o}\n{host}"),
        None => String::new(),
    };
    let mut seen: Vec<String> = Vec::new();
    peers
        .all_gather(mine.into_bytes())
        .into_iter()
        .map(|b| {
            let key = String::from_utf8_lossy(&b).into_owned();
            if key.is_empty() {
                return None;
            }
            Some(seen.iter().position(|k| *k == key).unwrap_or_else(|| {
                seen.push(key);
                seen.len() - 1
            }))
        })
        .collect()
}

/// This process's share of a run with one process per device: its device's
/// transport to the others, and the processes' agreement on each command.
pub struct Rank {
    pub transport: Box<dyn Transport + Send>,
    pub peers: Box<dyn Peers>,
    /// The rank among the processes on this host: a GPU device runs on GPU
    /// `local_rank` mod the host's GPU count.
    pub local_rank: usize,
    /// A fingerprint of the build this process runs; the ranks compare them.
    pub build: u64,
    /// The name of this process's host (ranks on one host may share a GPU).
    pub host: String,
}

/// A running set of devices: all of them in this process, or (with
/// [`Cluster::start_rank`]) this process's one device, the others in
/// processes of their own.
pub struct Cluster {
    plan: Plan,
    /// The devices that run in this process; `workers[i]` runs `local[i]`.
    local: Vec<usize>,
    workers: Vec<Worker>,
    peers: Option<Box<dyn Peers>>,
    failed: Option<ClusterError>,
    stats: Vec<DeviceStats>,
}

/// Which rows of a batch of `rows` device `d` trains on, per microbatch.
pub fn device_rows(plan: &Plan, d: &DeviceProgram, rows: &[usize]) -> Vec<Vec<usize>> {
    let (k, r) = match (plan.mesh.data, d.data_rank) {
        (Some(a), Some(r)) => (plan.mesh.axes[a].1, r),
        _ => (1, 0),
    };
    let mine = &rows[chunk_range(rows.len(), k, r)];
    let m = plan.microbatches.max(1);
    (0..m).map(|i| mine[chunk_range(mine.len(), m, i)].to_vec()).collect()
}

/// The part `piece` of a global tensor.
pub fn extract(global: &[f32], piece: &Piece) -> Vec<f32> {
    let mut out = Vec::with_capacity(piece.len.iter().product());
    walk(piece, |src, len| out.extend_from_slice(&global[src..src + len]));
    out
}

/// Writes `local` (the part `piece`) into its place in a global tensor.
pub fn insert(global: &mut [f32], piece: &Piece, local: &[f32]) {
    let mut at = 0;
    walk(piece, |dst, len| {
        global[dst..dst + len].copy_from_slice(&local[at..at + len]);
        at += len;
    });
}

/// Calls `f(global offset, run length)` for each contiguous run of the piece, in order.
fn walk(piece: &Piece, mut f: impl FnMut(usize, usize)) {
    let r = piece.global.len();
    if r == 0 {
        f(0, 1);
        return;
    }
    if piece.len.contains(&0) {
        return;
    }
    let mut strides = vec![1usize; r];
    for i in (0..r - 1).rev() {
        strides[i] = strides[i + 1] * piece.global[i + 1];
    }
    let last = piece.len[r - 1];
    let mut idx = vec![0usize; r - 1];
    loop {
        let off: usize = (0..r - 1).map(|i| (piece.start[i] + idx[i]) * strides[i]).sum::<usize>() + piece.start[r - 1];
        f(off, last);
        let mut i = r - 1;
        loop {
            if i == 0 {
                return;
            }
            i -= 1;
            idx[i] += 1;
            if idx[i] < piece.len[i] {
                break;
            }
            idx[i] = 0;
        }
    }
}

impl Cluster {
    /// Starts one CPU thread per device; `threads` kernel threads are shared out among them.
    pub fn start(plan: Plan, threads: usize, timeout: Duration) -> Cluster {
        let n = plan.devices.len();
        Cluster::start_on(plan, threads, timeout, vec![Backend::Cpu; n])
    }

    /// Starts one thread per device, device `i` running on `backends[i]`
    /// (the CPU where none is given); the CPU devices share out `threads`
    /// kernel threads.
    pub fn start_on(plan: Plan, threads: usize, timeout: Duration, backends: Vec<Backend>) -> Cluster {
        let n = plan.devices.len();
        let cpus = (0..n).filter(|&i| backends.get(i).is_none_or(|b| *b == Backend::Cpu)).count();
        let per = (threads / cpus.max(1)).max(1);
        let endpoints = Fabric::with_timeout(n, timeout);
        // Collectives and transfers between devices on distinct physical GPUs go through NCCL.
        let gpu: Vec<Option<usize>> = (0..n)
            .map(|i| match backends.get(i) {
                Some(Backend::Cuda { ordinal, .. }) => Some(*ordinal),
                _ => None,
            })
            .collect();
        let ops = plan.devices.iter().enumerate().flat_map(|(i, d)| {
            d.program.steps.iter().filter_map(move |st| match &st.kind {
                StepKind::Op(op) => Some((i, op)),
                _ => None,
            })
        });
        let routes = nccl::routes(ops, &gpu);
        let abort = Arc::new(Abort::default());
        let setup = Setup::new(routes, gpu, abort.clone(), timeout);
        let mut workers = Vec::with_capacity(n);
        for (i, (dp, ep)) in plan.devices.iter().cloned().zip(endpoints).enumerate() {
            let (tx, crx) = mpsc::channel::<Cmd>();
            let (rtx, rx) = mpsc::channel::<Reply>();
            let hash = plan.hash;
            let backend = backends.get(i).cloned().unwrap_or(Backend::Cpu);
            let net = Net { setup: setup.clone(), abort: abort.clone(), ranks: None };
            let handle = std::thread::Builder::new()
                .name(format!("device {}", dp.device))
                .spawn(move || device_main(dp, Box::new(ep), net, hash, per, backend, crx, rtx))
                .ok();
            workers.push(Worker { tx, rx, handle });
        }
        Cluster { plan, local: (0..n).collect(), workers, peers: None, failed: None, stats: Vec::new() }
    }

    /// Starts this process's device, the rank's, on `backend`, with
    /// `threads` kernel threads; the plan's other devices run in the other
    /// processes, reached through `rank`.
    pub fn start_rank(plan: Plan, threads: usize, timeout: Duration, backend: Backend, rank: Rank) -> Cluster {
        let me = rank.peers.rank();
        let (tx, crx) = mpsc::channel::<Cmd>();
        let (rtx, rx) = mpsc::channel::<Reply>();
        let hash = plan.hash;
        let dp = plan.devices[me].clone();
        // Collectives and transfers between GPU ranks on distinct physical
        // GPUs go through NCCL, set up by the device's thread with the other
        // ranks (`nccl::join_ranks`); the rest are staged through host memory.
        let ordinal = match backend {
            Backend::Cuda { ordinal, .. } => Some(ordinal),
            Backend::Cpu => None,
        };
        let gpu = gpu_identities(rank.peers.as_ref(), &rank.host, ordinal);
        let ops = plan.devices.iter().enumerate().flat_map(|(i, d)| {
            d.program.steps.iter().filter_map(move |st| match &st.kind {
                StepKind::Op(op) => Some((i, op)),
                _ => None,
            })
        });
        let routes = nccl::routes(ops, &gpu);
        let ranks = (!routes.is_empty()).then(|| RankNet { routes, gpu, ordinal, peers: rank.peers.boxed(), timeout });
        let net = Net { setup: None, abort: Arc::new(Abort::default()), ranks };
        let ep = rank.transport;
        let handle = std::thread::Builder::new()
            .name(format!("device {}", dp.device))
            .spawn(move || device_main(dp, ep, net, hash, threads.max(1), backend, crx, rtx))
            .ok();
        Cluster { plan, local: vec![me], workers: vec![Worker { tx, rx, handle }], peers: Some(rank.peers), failed: None, stats: Vec::new() }
    }

    /// Whether this process runs device `d`.
    pub fn is_local(&self, d: usize) -> bool {
        self.local.contains(&d)
    }

    /// Per device, what it did in the last step.
    pub fn stats(&self) -> &[DeviceStats] {
        &self.stats
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Sends one command to every device of this process, waits for every
    /// reply, and (with peers) exchanges the replies with the other
    /// processes, so that every process sees every device's reply.
    fn all(&mut self, mut cmd: impl FnMut(usize) -> Cmd) -> Result<Vec<Reply>, ClusterError> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        let n = self.plan.devices.len();
        let mut replies: Vec<Option<Reply>> = (0..n).map(|_| None).collect();
        let mut sent = Vec::with_capacity(self.workers.len());
        for (w, &d) in self.workers.iter().zip(&self.local) {
            sent.push(w.tx.send(cmd(d)).is_ok());
        }
        for ((w, &d), ok) in self.workers.iter().zip(&self.local).zip(sent) {
            let lost = Reply::Failed(ClusterError::Lost { device: d });
            replies[d] = Some(if ok { w.rx.recv().unwrap_or(lost) } else { lost });
        }
        if let Some(peers) = &self.peers {
            let mine: Vec<(usize, &Reply)> = self.local.iter().filter_map(|&d| replies[d].as_ref().map(|r| (d, r))).collect();
            let gathered = peers.all_gather(wire::encode(&mine));
            for (rank, bytes) in gathered.iter().enumerate() {
                if rank == peers.rank() {
                    continue;
                }
                for (d, r) in wire::decode(bytes).unwrap_or_else(|| vec![(rank, Reply::Failed(ClusterError::Lost { device: rank }))]) {
                    if let Some(slot) = replies.get_mut(d) {
                        *slot = Some(r);
                    }
                }
            }
        }
        let replies: Vec<Reply> = replies.into_iter().enumerate().map(|(d, r)| r.unwrap_or(Reply::Failed(ClusterError::Lost { device: d }))).collect();
        // The first device that failed on its own is the cause; the others stopped because of it.
        let root = replies.iter().find_map(|r| match r {
            Reply::Failed(e) if !e.is_secondary() => Some(e.clone()),
            _ => None,
        });
        let any = replies.iter().find_map(|r| match r {
            Reply::Failed(e) => Some(e.clone()),
            _ => None,
        });
        if let Some(e) = root.or(any) {
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(replies)
    }

    /// Gives every device its pieces of the global parameters and states.
    pub fn load(&mut self, params: &[Vec<f32>], states: &[Vec<f32>]) -> Result<(), ClusterError> {
        let devices = self.plan.devices.clone();
        self.all(|i| {
            let d = &devices[i];
            Cmd::Load {
                params: d.params.iter().filter_map(|p| params.get(p.index).map(|g| (p.index, extract(g, p)))).collect(),
                states: d.states.iter().filter_map(|p| states.get(p.index).map(|g| (p.index, extract(g, p)))).collect(),
            }
        })
        .map(|_| ())
    }

    /// One training step on the batch `batch(rows)` of `rows`. `fault`: a device told to fail at this step.
    pub fn step(&mut self, step: u64, hyper: Hypers, rows: &[usize], batch: &dyn Fn(&[usize]) -> Batch, fault: Option<usize>) -> Result<f64, ClusterError> {
        let plan = &self.plan;
        // Each process reads only its own devices' rows of the batch.
        let local = &self.local;
        let batches: Vec<Vec<(Batch, Vec<usize>)>> =
            plan.devices
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    if d.coords.is_empty() || !local.contains(&i) {
                        Vec::new()
                    } else {
                        device_rows(plan, d, rows).into_iter().map(|r| (batch(&r), r)).collect()
                    }
                })
                .collect();
        let mut batches: Vec<Option<Vec<(Batch, Vec<usize>)>>> = batches.into_iter().map(Some).collect();
        let replies = self.all(|i| Cmd::Step { step, hyper, batches: batches[i].take().unwrap_or_default(), fault: fault == Some(i) })?;
        let mut loss = 0.0;
        let mut any = false;
        self.stats.clear();
        for r in replies {
            if let Reply::Loss(l, st) = r {
                self.stats.push(st);
                if let Some(l) = l {
                    loss += l;
                    any = true;
                }
            }
        }
        Ok(if any { loss } else { f64::NAN })
    }

    /// Makes every device time each of its kernels.
    pub fn enable_profile(&mut self) -> Result<(), ClusterError> {
        self.all(|_| Cmd::EnableProfile).map(|_| ())
    }

    /// Per device, the seconds spent in each kernel of its program so far
    /// (empty unless profiling).
    pub fn profiles(&mut self) -> Result<Vec<Vec<f64>>, ClusterError> {
        let replies = self.all(|_| Cmd::Profile)?;
        Ok(replies.into_iter().map(|r| if let Reply::Profile(p) = r { p } else { Vec::new() }).collect())
    }

    /// The global parameters and optimizer states, assembled from the devices' pieces.
    pub fn read(&mut self, param_shapes: &[Vec<usize>], state_shapes: &[Vec<usize>]) -> Result<Tensors, ClusterError> {
        let replies = self.all(|_| Cmd::Read)?;
        let mut params: Vec<Vec<f32>> = param_shapes.iter().map(|s| vec![0.0; s.iter().product()]).collect();
        let mut states: Vec<Vec<f32>> = state_shapes.iter().map(|s| vec![0.0; s.iter().product()]).collect();
        for (d, r) in self.plan.devices.iter().zip(replies) {
            if let Reply::Tensors { params: ps, states: ss } = r {
                for (i, data) in ps {
                    if let (Some(piece), Some(g)) = (d.params.iter().find(|p| p.index == i), params.get_mut(i)) {
                        insert(g, piece, &data);
                    }
                }
                for (i, data) in ss {
                    if let (Some(piece), Some(g)) = (d.states.iter().find(|p| p.index == i), states.get_mut(i)) {
                        insert(g, piece, &data);
                    }
                }
            }
        }
        Ok((params, states))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            // Closing the command channel ends the device's loop.
            let (tx, _) = mpsc::channel();
            drop(std::mem::replace(&mut w.tx, tx));
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// Connects an executor to the other devices for one pass.
struct Link<'a> {
    ep: &'a dyn Transport,
    /// This device's NCCL communicators, if it has any.
    nccl: Option<&'a mut Nccl>,
    plan: u64,
    seq: u64,
    /// Seconds spent communicating.
    spent: f64,
    /// The transport error behind a failed op, if any.
    error: Option<TransportError>,
}

impl Link<'_> {
    fn fail(&mut self, e: TransportError) -> EngineError {
        let m = e.to_string();
        self.error = Some(e);
        EngineError::Transfer(m)
    }
}

impl Comm for Link<'_> {
    fn run(&mut self, op: &Op, input: Option<(&[f32], &[usize])>, out: &mut [f32], out_shape: &[usize]) -> Result<(), EngineError> {
        let t = std::time::Instant::now();
        let r = self.transfer(op, input, out, out_shape);
        self.spent += t.elapsed().as_secs_f64();
        r
    }

    fn on_gpus(&mut self, op: &Op, f: &mut dyn FnMut(&mut Nccl) -> Result<(), EngineError>) -> Option<Result<(), EngineError>> {
        let n = self.nccl.as_deref_mut()?;
        n.route(op)?;
        let t = std::time::Instant::now();
        let r = f(n);
        self.spent += t.elapsed().as_secs_f64();
        if r.is_err() {
            if let Some((by, reason)) = n.peer_failure() {
                self.error = Some(TransportError::Aborted { device: self.ep.rank(), by, reason });
            }
        }
        Some(r)
    }
}

impl Link<'_> {
    fn transfer(&mut self, op: &Op, input: Option<(&[f32], &[usize])>, out: &mut [f32], out_shape: &[usize]) -> Result<(), EngineError> {
        let group = |g: &[u32]| g.iter().map(|&x| x as usize).collect::<Vec<usize>>();
        match op {
            Op::AllReduce { group: g, id, axis } => {
                let Some((x, _)) = input else { return Err(EngineError::Bug("all-reduce without an operand".into())) };
                out.copy_from_slice(x);
                let tag = Tag { plan: self.plan, instr: *id, seq: self.seq, name: format!("all-reduce({axis})") };
                collectives::all_reduce(self.ep, &group(g), &tag, out).map_err(|e| self.fail(e))
            }
            Op::AllGather { group: g, id, axis, dim, granule } => {
                let Some((x, _)) = input else { return Err(EngineError::Bug("all-gather without an operand".into())) };
                let members = group(g);
                let n = members.len();
                let Some(pos) = members.iter().position(|&m| m == self.ep.rank()) else {
                    return Err(EngineError::Bug(format!("device {} is not in all-gather group {members:?}", self.ep.rank())));
                };
                let outer: usize = out_shape[..*dim].iter().product();
                let inner: usize = out_shape[dim + 1..].iter().product();
                let full = out_shape[*dim];
                let u = (*granule).max(1);
                let parts: Vec<std::ops::Range<usize>> = (0..n)
                    .map(|i| {
                        let r = chunk_range(full / u, n, i);
                        r.start * u..r.end * u
                    })
                    .collect();
                let widest = parts.iter().map(|r| r.len()).max().unwrap_or(0) * outer * inner;
                if x.len() != parts[pos].len() * outer * inner {
                    return Err(EngineError::Bug(format!("all-gather part of {} elements, expected {}", x.len(), parts[pos].len() * outer * inner)));
                }
                let mut mine = x.to_vec();
                mine.resize(widest, 0.0);
                let mut staging = vec![0.0f32; widest * n];
                let tag = Tag { plan: self.plan, instr: *id, seq: self.seq, name: format!("all-gather({axis})") };
                collectives::all_gather(self.ep, &members, &tag, &mine, widest * n, &mut staging).map_err(|e| self.fail(e))?;
                for (i, part) in parts.iter().enumerate() {
                    let len = part.len() * inner;
                    for o in 0..outer {
                        let src = i * widest + o * len;
                        let dst = (o * full + part.start) * inner;
                        out[dst..dst + len].copy_from_slice(&staging[src..src + len]);
                    }
                }
                Ok(())
            }
            Op::ReduceScatter { group: g, id, axis, dim, granule } => {
                let Some((x, in_shape)) = input else { return Err(EngineError::Bug("reduce-scatter without an operand".into())) };
                let members = group(g);
                let n = members.len();
                let Some(pos) = members.iter().position(|&m| m == self.ep.rank()) else {
                    return Err(EngineError::Bug(format!("device {} is not in reduce-scatter group {members:?}", self.ep.rank())));
                };
                if *dim >= in_shape.len() || in_shape.len() != out_shape.len() {
                    return Err(EngineError::Bug(format!("reduce-scatter along dim {dim} of {in_shape:?}")));
                }
                let full = in_shape[*dim];
                let parts = parts(full, n, *granule);
                let outer: usize = in_shape[..*dim].iter().product();
                let inner: usize = in_shape[dim + 1..].iter().product();
                if out.len() != parts[pos].len() * outer * inner {
                    return Err(EngineError::Bug(format!("reduce-scatter part of {} elements, expected {}", out.len(), parts[pos].len() * outer * inner)));
                }
                let widest = parts.iter().map(|r| r.len()).max().unwrap_or(0) * outer * inner;
                let mut staging = vec![0.0f32; widest * n];
                for (i, part) in parts.iter().enumerate() {
                    let len = part.len() * inner;
                    for o in 0..outer {
                        let src = (o * full + part.start) * inner;
                        staging[i * widest + o * len..i * widest + (o + 1) * len].copy_from_slice(&x[src..src + len]);
                    }
                }
                let tag = Tag { plan: self.plan, instr: *id, seq: self.seq, name: format!("reduce-scatter({axis})") };
                let mut own = Vec::new();
                collectives::reduce_scatter(self.ep, &members, &tag, &staging, &mut own).map_err(|e| self.fail(e))?;
                out.copy_from_slice(&own[..out.len()]);
                Ok(())
            }
            Op::AllToAll { group: g, id, axis, from, from_granule, to, to_granule } => {
                let Some((x, in_shape)) = input else { return Err(EngineError::Bug("all-to-all without an operand".into())) };
                let members = group(g);
                let n = members.len();
                let me = self.ep.rank();
                let Some(pos) = members.iter().position(|&m| m == me) else {
                    return Err(EngineError::Bug(format!("device {me} is not in all-to-all group {members:?}")));
                };
                let r = in_shape.len();
                if *from >= r || *to >= r || from == to || out_shape.len() != r {
                    return Err(EngineError::Bug(format!("all-to-all from dim {from} to dim {to} of {in_shape:?}")));
                }
                let from_parts = parts(out_shape[*from], n, *from_granule);
                let to_parts = parts(in_shape[*to], n, *to_granule);
                let kind = format!("all-to-all({axis})");
                // Send each member its columns of my rows.
                for (j, &m) in members.iter().enumerate() {
                    let mut shape = in_shape.to_vec();
                    shape[*to] = to_parts[j].len();
                    let mut start = vec![0; r];
                    start[*to] = to_parts[j].start;
                    let block = copy_out(x, in_shape, &start, &shape);
                    if j == pos {
                        let mut dst = vec![0; r];
                        dst[*from] = from_parts[pos].start;
                        copy_in(out, out_shape, &dst, &block, &shape);
                    } else {
                        let header = Header { plan: self.plan, instr: *id, seq: self.seq, kind: kind.clone() };
                        self.ep.send(m, Message { header, data: block }).map_err(|e| self.fail(e))?;
                    }
                }
                for (j, &m) in members.iter().enumerate() {
                    if j == pos {
                        continue;
                    }
                    let header = Header { plan: self.plan, instr: *id, seq: self.seq, kind: kind.clone() };
                    let block = self.ep.recv(m, &header).map_err(|e| self.fail(e))?;
                    let mut shape = out_shape.to_vec();
                    shape[*from] = from_parts[j].len();
                    if block.len() != shape.iter().product::<usize>() {
                        return Err(self.fail(TransportError::Malformed {
                            device: me,
                            instr: *id,
                            reason: format!("all-to-all block of {} values from device {m}, expected {}", block.len(), shape.iter().product::<usize>()),
                        }));
                    }
                    let mut dst = vec![0; r];
                    dst[*from] = from_parts[j].start;
                    copy_in(out, out_shape, &dst, &block, &shape);
                }
                Ok(())
            }
            Op::Send { to, id } => {
                let Some((x, _)) = input else { return Err(EngineError::Bug("send without an operand".into())) };
                let header = Header { plan: self.plan, instr: *id, seq: self.seq, kind: "send".into() };
                self.ep.send(*to as usize, Message { header, data: x.to_vec() }).map_err(|e| self.fail(e))
            }
            Op::Recv { from, id } => {
                let header = Header { plan: self.plan, instr: *id, seq: self.seq, kind: "send".into() };
                let data = self.ep.recv(*from as usize, &header).map_err(|e| self.fail(e))?;
                if data.len() != out.len() {
                    return Err(self.fail(TransportError::Malformed {
                        device: self.ep.rank(),
                        instr: *id,
                        reason: format!("instruction {id} received {} values from device {from}, expected {}", data.len(), out.len()),
                    }));
                }
                out.copy_from_slice(&data);
                Ok(())
            }
            other => Err(EngineError::Bug(format!("{} is not a transfer", other.name()))),
        }
    }
}

/// Member `i`'s range of a dim of `full` elements split `n` ways in whole granules.
fn parts(full: usize, n: usize, granule: usize) -> Vec<std::ops::Range<usize>> {
    let u = granule.max(1);
    (0..n)
        .map(|i| {
            let r = chunk_range(full / u, n, i);
            r.start * u..r.end * u
        })
        .collect()
}

/// Calls `f(src offset, dst offset, run)` for each row of a `block` at `at` in a tensor of `shape`
/// (the destination is the block itself, row-major).
fn block_rows(shape: &[usize], at: &[usize], block: &[usize], mut f: impl FnMut(usize, usize, usize)) {
    let r = shape.len();
    if r == 0 {
        f(0, 0, 1);
        return;
    }
    if block.contains(&0) {
        return;
    }
    let mut strides = vec![1usize; r];
    for i in (0..r - 1).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let run = block[r - 1];
    let mut idx = vec![0usize; r - 1];
    let mut dst = 0;
    loop {
        let src: usize = (0..r - 1).map(|i| (at[i] + idx[i]) * strides[i]).sum::<usize>() + at[r - 1];
        f(src, dst, run);
        dst += run;
        let mut i = r - 1;
        loop {
            if i == 0 {
                return;
            }
            i -= 1;
            idx[i] += 1;
            if idx[i] < block[i] {
                break;
            }
            idx[i] = 0;
        }
    }
}

/// The block of `x` (of `shape`) at `at`, of `block`'s shape.
fn copy_out(x: &[f32], shape: &[usize], at: &[usize], block: &[usize]) -> Vec<f32> {
    let mut out = vec![0.0; block.iter().product()];
    block_rows(shape, at, block, |s, d, n| out[d..d + n].copy_from_slice(&x[s..s + n]));
    out
}

/// Writes `data` (of `block`'s shape) into `out` (of `shape`) at `at`.
fn copy_in(out: &mut [f32], shape: &[usize], at: &[usize], data: &[f32], block: &[usize]) {
    block_rows(shape, at, block, |s, d, n| out[s..s + n].copy_from_slice(&data[d..d + n]));
}

/// A device's share of the cluster's NCCL set-up, and the flag that stops
/// every device waiting in NCCL when one fails.
struct Net {
    setup: Option<Arc<Setup>>,
    abort: Arc<Abort>,
    /// With one process per device: what NCCL's set-up across the ranks needs.
    ranks: Option<RankNet>,
}

/// NCCL's set-up across the ranks of a run with one process per device.
struct RankNet {
    routes: Vec<nccl::Route>,
    gpu: Vec<Option<usize>>,
    ordinal: Option<usize>,
    peers: Box<dyn Peers + Send>,
    timeout: Duration,
}

/// Ends the run for every device: the fabric, the NCCL waits, and this device's communicators.
fn abort_all(ep: &dyn Transport, abort: &Abort, nccl: Option<&mut Nccl>, m: &str) {
    ep.abort(m);
    abort.raise(ep.rank(), m);
    if let Some(n) = nccl {
        n.abort_all();
    }
}

#[allow(clippy::too_many_arguments)]
fn device_main(dp: DeviceProgram, ep: Box<dyn Transport + Send>, net: Net, plan: u64, threads: usize, backend: Backend, rx: Receiver<Cmd>, tx: Sender<Reply>) {
    let dev = dp.device;
    // Joins the NCCL communicators before anything can fail, so that no peer waits for this device.
    let mut nccl = match &net.ranks {
        Some(r) => nccl::join_ranks(&r.routes, &r.gpu, ep.rank(), r.ordinal, &|b| r.peers.all_gather(b), net.abort.clone(), r.timeout),
        None => net.setup.as_ref().and_then(|s| s.join(ep.rank())),
    };
    let built = std::panic::catch_unwind(AssertUnwindSafe(|| crate::backend::engine(&backend, dp.program.clone(), threads, dp.slots)))
        .unwrap_or_else(|_| Err(EngineError::Bug("building the executor panicked".into())));
    let mut exec = match built {
        Ok(e) => e,
        Err(error) => {
            let e = ClusterError::Setup { device: dev, backend, error };
            abort_all(ep.as_ref(), &net.abort, nccl.as_mut(), &e.to_string());
            // Answer every command with the failure.
            while rx.recv().is_ok() {
                let _ = tx.send(Reply::Failed(e.clone()));
            }
            return;
        }
    };
    while let Ok(cmd) = rx.recv() {
        let during = match &cmd {
            Cmd::Step { step, .. } => During::Step(step + 1),
            Cmd::Load { .. } => During::Load,
            Cmd::Read | Cmd::EnableProfile | Cmd::Profile => During::Read,
        };
        let reply = std::panic::catch_unwind(AssertUnwindSafe(|| run_cmd(&dp, ep.as_ref(), nccl.as_mut(), plan, exec.as_mut(), cmd))).unwrap_or_else(|p| {
            let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
            Err(ClusterError::Panicked { device: dev, during, what })
        });
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                abort_all(ep.as_ref(), &net.abort, nccl.as_mut(), &e.to_string());
                Reply::Failed(e)
            }
        };
        if tx.send(reply).is_err() {
            return;
        }
    }
}

type CmdResult = Result<Reply, ClusterError>;

fn run_cmd(dp: &DeviceProgram, ep: &dyn Transport, mut nccl: Option<&mut Nccl>, plan: u64, exec: &mut dyn Engine, cmd: Cmd) -> CmdResult {
    let dev = dp.device;
    let kerr = |error: EngineError| ClusterError::Engine { device: dev, step: None, error };
    match cmd {
        Cmd::Load { params, states } => {
            for (i, v) in params {
                exec.set(&BufKind::Param(i), Data::F32(&v)).map_err(kerr)?;
            }
            for (i, v) in states {
                exec.set(&BufKind::State(i), Data::F32(&v)).map_err(kerr)?;
            }
            Ok(Reply::Done)
        }
        Cmd::EnableProfile => {
            exec.enable_profile();
            Ok(Reply::Done)
        }
        Cmd::Profile => Ok(Reply::Profile(exec.profile().to_vec())),
        Cmd::Read => {
            let mut params = Vec::with_capacity(dp.params.len());
            for p in &dp.params {
                params.push((p.index, exec.get(&BufKind::Param(p.index)).map_err(kerr)?.unwrap_or_default()));
            }
            let mut states = Vec::with_capacity(dp.states.len());
            for p in &dp.states {
                states.push((p.index, exec.get(&BufKind::State(p.index)).map_err(kerr)?.unwrap_or_default()));
            }
            Ok(Reply::Tensors { params, states })
        }
        Cmd::Step { step, hyper, batches, fault } => {
            if fault {
                return Err(ClusterError::Injected { device: dev, step: step + 1 });
            }
            let h = move |x: Hyper| hyper.get(x);
            let t0 = std::time::Instant::now();
            let mut st = DeviceStats { bytes: exec.bytes(), ..DeviceStats::default() };
            exec.begin_step(&h).map_err(kerr)?;
            let mut loss = 0.0f64;
            for instr in &dp.schedule {
                let (role, code) = match instr.phase {
                    Phase::Forward => (Role::Forward, 1u64),
                    Phase::Backward => (Role::Backward, 2),
                    Phase::Update => (Role::Update, 3),
                };
                let mut link =
                    Link { ep, nccl: nccl.as_deref_mut(), plan, seq: (step << 32) | (code << 28) | ((instr.mb as u64) << 8), spent: 0.0, error: None };
                let tp = std::time::Instant::now();
                if instr.phase == Phase::Forward {
                    if let Some((b, rows)) = batches.get(instr.mb) {
                        b.load_into(exec, Some(instr.slot), rows).map_err(kerr)?;
                    }
                }
                if let Err(error) = exec.run_phase(role, instr.slot, &mut link) {
                    return Err(match link.error {
                        Some(TransportError::Aborted { .. }) => ClusterError::Stopped { device: dev, error },
                        Some(t) => ClusterError::Transport { step: step + 1, error: t },
                        None => ClusterError::Engine { device: dev, step: Some(step + 1), error },
                    });
                }
                if instr.phase != Phase::Update {
                    st.busy_s += tp.elapsed().as_secs_f64() - link.spent;
                }
                st.comm_s += link.spent;
                if instr.phase == Phase::Forward && dp.reports_loss {
                    loss += exec.loss_in(instr.slot).map_err(kerr)? as f64;
                }
            }
            exec.finish_step().map_err(kerr)?;
            st.step_s = t0.elapsed().as_secs_f64();
            Ok(Reply::Loss(dp.reports_loss.then_some(loss), st))
        }
    }
}

/// Replies as bytes, for the processes of a run to exchange: a count, then
/// per reply its device and a tagged body, little-endian. A failure travels
/// as its one-line message (and whether it is secondary).
mod wire {
    use super::{ClusterError, DeviceStats, Reply};

    struct Out(Vec<u8>);

    impl Out {
        fn u64(&mut self, x: u64) {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        fn f64(&mut self, x: f64) {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        fn f32s(&mut self, v: &[f32]) {
            self.u64(v.len() as u64);
            self.0.reserve(v.len() * 4);
            for x in v {
                self.0.extend_from_slice(&x.to_le_bytes());
            }
        }
        fn pieces(&mut self, v: &[(usize, Vec<f32>)]) {
            self.u64(v.len() as u64);
            for (i, data) in v {
                self.u64(*i as u64);
                self.f32s(data);
            }
        }
    }

    pub(super) fn encode(replies: &[(usize, &Reply)]) -> Vec<u8> {
        let mut o = Out(Vec::new());
        o.u64(replies.len() as u64);
        for (d, r) in replies {
            o.u64(*d as u64);
            match r {
                Reply::Done => o.0.push(0),
                Reply::Loss(loss, st) => {
                    o.0.push(1);
                    o.0.push(loss.is_some() as u8);
                    o.f64(loss.unwrap_or(0.0));
                    o.f64(st.busy_s);
                    o.f64(st.comm_s);
                    o.f64(st.step_s);
                    o.u64(st.bytes);
                }
                Reply::Tensors { params, states } => {
                    o.0.push(2);
                    o.pieces(params);
                    o.pieces(states);
                }
                Reply::Profile(p) => {
                    o.0.push(3);
                    o.u64(p.len() as u64);
                    p.iter().for_each(|x| o.f64(*x));
                }
                Reply::Failed(e) => {
                    o.0.push(4);
                    o.0.push(e.is_secondary() as u8);
                    let m = e.to_string();
                    o.u64(m.len() as u64);
                    o.0.extend_from_slice(m.as_bytes());
                }
            }
        }
        o.0
    }

    struct In<'a>(&'a [u8]);

    impl In<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u8(&mut self) -> Option<u8> {
            self.take(1).map(|b| b[0])
        }
        fn u64(&mut self) -> Option<u64> {
            self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
        }
        fn f64(&mut self) -> Option<f64> {
            self.u64().map(f64::from_bits)
        }
        fn len(&mut self, unit: usize) -> Option<usize> {
            let n = usize::try_from(self.u64()?).ok()?;
            (n.checked_mul(unit)? <= self.0.len()).then_some(n)
        }
        fn f32s(&mut self) -> Option<Vec<f32>> {
            let n = self.len(4)?;
            Some(self.take(n * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        fn pieces(&mut self) -> Option<Vec<(usize, Vec<f32>)>> {
            let n = self.len(16)?;
            (0..n).map(|_| Some((usize::try_from(self.u64()?).ok()?, self.f32s()?))).collect()
        }
    }

    /// The replies of `bytes`; None when they are not what [`encode`] writes.
    pub(super) fn decode(bytes: &[u8]) -> Option<Vec<(usize, Reply)>> {
        let mut i = In(bytes);
        let n = i.len(9)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let d = usize::try_from(i.u64()?).ok()?;
            let r = match i.u8()? {
                0 => Reply::Done,
                1 => {
                    let has = i.u8()? != 0;
                    let loss = i.f64()?;
                    let st = DeviceStats { busy_s: i.f64()?, comm_s: i.f64()?, step_s: i.f64()?, bytes: i.u64()? };
                    Reply::Loss(has.then_some(loss), st)
                }
                2 => Reply::Tensors { params: i.pieces()?, states: i.pieces()? },
                3 => {
                    let n = i.len(8)?;
                    Reply::Profile((0..n).map(|_| i.f64()).collect::<Option<Vec<f64>>>()?)
                }
                4 => {
                    let secondary = i.u8()? != 0;
                    let n = i.len(1)?;
                    let message = String::from_utf8_lossy(i.take(n)?).into_owned();
                    Reply::Failed(ClusterError::Remote { device: d, secondary, message })
                }
                _ => return None,
            };
            out.push((d, r));
        }
        i.0.is_empty().then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Peers that all answer what `answers` says, for functions of the whole run.
    struct Fixed(Vec<Vec<u8>>, usize);

    impl Peers for Fixed {
        fn rank(&self) -> usize {
            self.1
        }
        fn size(&self) -> usize {
            self.0.len()
        }
        fn all_gather(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
            assert_eq!(mine, self.0[self.1], "rank {} sent what the others did not expect", self.1);
            self.0.clone()
        }
        fn boxed(&self) -> Box<dyn Peers + Send> {
            Box::new(Fixed(self.0.clone(), self.1))
        }
    }

    #[test]
    fn gpus_are_told_apart_across_hosts() {
        // Ranks 0 and 1 on host a, GPUs 0 and 1; rank 2 on the CPU; ranks 3 and 4 on host b, both on GPU 0.
        let sent: Vec<Vec<u8>> = ["0\na", "1\na", "", "0\nb", "0\nb"].iter().map(|s| s.as_bytes().to_vec()).collect();
        let expected = vec![Some(0), Some(1), None, Some(2), Some(2)];
        for (rank, (host, ordinal)) in [("a", Some(0)), ("a", Some(1)), ("a", None), ("b", Some(0)), ("b", Some(0))].into_iter().enumerate() {
            assert_eq!(gpu_identities(&Fixed(sent.clone(), rank), host, ordinal), expected, "rank {rank}");
        }
        // Routes follow: the two ranks of host b share a GPU, so their all-reduce keeps the host path.
        let ar = Op::AllReduce { group: vec![3, 4], id: 1, axis: "data".into() };
        assert!(nccl::routes([(3, &ar), (4, &ar)], &expected).is_empty());
        let ar = Op::AllReduce { group: vec![0, 1, 3], id: 2, axis: "data".into() };
        assert_eq!(nccl::routes([(0, &ar), (1, &ar), (3, &ar)], &expected), vec![nccl::Route::Group(vec![0, 1, 3])]);
    }

    #[test]
    fn ranks_without_nccl_agree_on_the_host_path() {
        // On this machine NCCL (or the driver) cannot be loaded: every rank says so in the first
        // exchange and all take the host path after it, so no rank waits in a later one.
        let calls = std::cell::Cell::new(0);
        let routes = vec![nccl::Route::Group(vec![0, 1])];
        for me in 0..2 {
            calls.set(0);
            let exchange = |mine: Vec<u8>| {
                calls.set(calls.get() + 1);
                vec![mine.clone(), mine]
            };
            let got = nccl::join_ranks(&routes, &[Some(0), Some(1)], me, Some(me), &exchange, Arc::new(Abort::default()), Duration::from_secs(1));
            if crate::backend::cuda::driver::available().is_err() {
                assert!(got.is_none());
                assert_eq!(calls.get(), 1, "rank {me}");
            }
        }
        // No routes: no exchange at all.
        calls.set(0);
        let exchange = |_: Vec<u8>| {
            calls.set(calls.get() + 1);
            Vec::new()
        };
        assert!(nccl::join_ranks(&[], &[], 0, None, &exchange, Arc::new(Abort::default()), Duration::from_secs(1)).is_none());
        assert_eq!(calls.get(), 0);
    }

    #[test]
    fn replies_cross_processes_intact() {
        let st = DeviceStats { busy_s: 0.25, comm_s: 0.5, step_s: 1.0, bytes: 1 << 40 };
        let replies = [
            (0, Reply::Done),
            (1, Reply::Loss(Some(2.5), st)),
            (2, Reply::Loss(None, st)),
            (3, Reply::Tensors { params: vec![(0, vec![1.0, -0.0, f32::MIN_POSITIVE])], states: vec![(7, vec![]), (9, vec![3.5])] }),
            (4, Reply::Profile(vec![1e-6, 2.0])),
            (5, Reply::Failed(ClusterError::Injected { device: 5, step: 3 })),
            (6, Reply::Failed(ClusterError::Stopped { device: 6, error: EngineError::Transfer("peer gone".into()) })),
        ];
        let refs: Vec<(usize, &Reply)> = replies.iter().map(|(d, r)| (*d, r)).collect();
        let bytes = wire::encode(&refs);
        let back = wire::decode(&bytes).expect("decodes");
        assert_eq!(back.len(), replies.len());
        for ((d, a), (e, b)) in replies.iter().zip(&back) {
            assert_eq!(d, e);
            match (a, b) {
                (Reply::Done, Reply::Done) => {}
                (Reply::Loss(x, s), Reply::Loss(y, t)) => {
                    assert_eq!(x, y);
                    assert_eq!((s.busy_s, s.comm_s, s.step_s, s.bytes), (t.busy_s, t.comm_s, t.step_s, t.bytes));
                }
                (Reply::Tensors { params: p, states: s }, Reply::Tensors { params: q, states: t }) => {
                    let bits = |v: &Vec<(usize, Vec<f32>)>| v.iter().map(|(i, x)| (*i, x.iter().map(|f| f.to_bits()).collect::<Vec<_>>())).collect::<Vec<_>>();
                    assert_eq!((bits(p), bits(s)), (bits(q), bits(t)));
                }
                (Reply::Profile(x), Reply::Profile(y)) => assert_eq!(x, y),
                (Reply::Failed(x), Reply::Failed(ClusterError::Remote { device, secondary, message })) => {
                    assert_eq!((*device, *secondary, message.as_str()), (*d, x.is_secondary(), x.to_string().as_str()));
                }
                _ => panic!("reply of device {d} changed kind"),
            }
        }
        // Truncated or padded bytes are refused, never misread.
        for cut in [0, 1, 9, bytes.len() / 2, bytes.len() - 1] {
            assert!(wire::decode(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert!(wire::decode(&padded).is_none());
        // A length that claims more than the bytes hold is refused without allocating it.
        let mut huge = wire::encode(&[(0, &Reply::Profile(vec![1.0]))]);
        huge[17..25].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(wire::decode(&huge).is_none());
    }

    /// Runs `f(rank, link)` on `n` device threads connected by one fabric.
    fn on_devices<T: Send + 'static>(n: usize, f: impl Fn(usize, &mut Link<'_>) -> T + Send + Sync + Copy + 'static) -> Vec<T> {
        let eps = Fabric::with_timeout(n, Duration::from_secs(10));
        let handles: Vec<_> = eps
            .into_iter()
            .enumerate()
            .map(|(r, ep)| {
                std::thread::spawn(move || {
                    let mut link = Link { ep: &ep, nccl: None, plan: 7, seq: 0, spent: 0.0, error: None };
                    f(r, &mut link)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("device thread")).collect()
    }

    /// Distinct values for member `r`'s full tensor of `len` elements.
    fn value(r: usize, i: usize) -> f32 {
        ((r * 131 + i * 17) % 97) as f32 - 48.0
    }

    fn group(n: usize) -> Vec<u32> {
        (0..n as u32).collect()
    }

    #[test]
    fn cluster_errors_print_one_line_naming_the_device() {
        let gpu = Backend::Cuda { ordinal: 1, memory: None };
        let oom = EngineError::Device("GPU 1: the program needs 2.0 MiB of device buffers".into());
        let e = ClusterError::Setup { device: 3, backend: gpu, error: oom };
        assert_eq!(e.to_string(), "device 3 cannot set up its program on GPU 1: GPU 1: the program needs 2.0 MiB of device buffers");
        assert!(e.is_device() && !e.is_bug() && e.device() == 3);
        let e = ClusterError::Setup { device: 0, backend: Backend::Cpu, error: EngineError::Codegen("no ISA".into()) };
        assert_eq!(e.to_string(), "device 0 cannot compile its program: code generation failed: no ISA");
        assert!(e.is_bug());
        let label = EngineError::BadData("label 9 at position 0 is outside 0..4".into());
        let e = ClusterError::Engine { device: 1, step: None, error: label.clone() };
        assert_eq!(e.to_string(), "device 1: label 9 at position 0 is outside 0..4");
        assert!(!e.is_bug() && !e.is_device());
        let e = ClusterError::Engine { device: 1, step: Some(4), error: label };
        assert_eq!(e.to_string(), "device 1 failed at step 4: label 9 at position 0 is outside 0..4");
        let t = TransportError::Timeout { device: 2, from: 0, instr: 7, secs: 1.0 };
        let e = ClusterError::Transport { step: 2, error: t };
        assert_eq!(e.to_string(), "device 2 waited 1.0 s at instruction 7 for device 0 (step 2)");
        assert_eq!(e.device(), 2);
        assert_eq!(ClusterError::Injected { device: 1, step: 3 }.to_string(), "device 1 failed at step 3: injected fault");
        let e = ClusterError::Panicked { device: 0, during: During::Load, what: "oops".into() };
        assert_eq!(e.to_string(), "device 0 failed while loading parameters: internal error (oops)");
        assert!(e.is_bug());
        assert_eq!(ClusterError::Lost { device: 5 }.to_string(), "device 5 stopped unexpectedly");
        assert!(ClusterError::Stopped { device: 1, error: EngineError::Transfer("x".into()) }.is_secondary());
    }

    #[test]
    fn reduce_scatter_along_a_dim_matches_the_naive_sum() {
        // [2, 7, 3] over 3 members along dim 1 (7 = 3 + 2 + 2).
        let (n, shape) = (3, [2usize, 7, 3]);
        let outs = on_devices(n, move |r, link| {
            let x: Vec<f32> = (0..42).map(|i| value(r, i)).collect();
            let part = parts(7, n, 1)[r].len();
            let mut out = vec![0.0; 2 * part * 3];
            let op = Op::ReduceScatter { group: group(n), id: 1, axis: "model".into(), dim: 1, granule: 1 };
            link.run(&op, Some((&x, &shape)), &mut out, &[2, part, 3]).map(|_| out)
        });
        for (r, out) in outs.into_iter().enumerate() {
            let out = out.expect("reduce-scatter");
            let range = parts(7, n, 1)[r].clone();
            let mut want = Vec::new();
            for o in 0..2 {
                for j in range.clone() {
                    for k in 0..3 {
                        want.push((0..n).map(|m| value(m, (o * 7 + j) * 3 + k)).sum::<f32>());
                    }
                }
            }
            assert_eq!(out, want, "member {r}");
        }
    }

    #[test]
    fn all_to_all_moves_the_split_to_another_dim() {
        // A [5, 3, 4] tensor split along dim 0 (2, 2, 1) becomes split along dim 2 (2, 1, 1).
        let n = 3;
        let full = |i: usize| i as f32;
        let outs = on_devices(n, move |r, link| {
            let rows = parts(5, n, 1)[r].clone();
            let x: Vec<f32> = rows.clone().flat_map(|a| (0..12).map(move |b| full(a * 12 + b))).collect();
            let cols = parts(4, n, 1)[r].len();
            let mut out = vec![0.0; 5 * 3 * cols];
            let op = Op::AllToAll { group: group(n), id: 2, axis: "model".into(), from: 0, from_granule: 1, to: 2, to_granule: 1 };
            link.run(&op, Some((&x, &[rows.len(), 3, 4])), &mut out, &[5, 3, cols]).map(|_| out)
        });
        for (r, out) in outs.into_iter().enumerate() {
            let cols = parts(4, n, 1)[r].clone();
            let mut want = Vec::new();
            for a in 0..5 {
                for b in 0..3 {
                    for c in cols.clone() {
                        want.push(full((a * 3 + b) * 4 + c));
                    }
                }
            }
            assert_eq!(out.expect("all-to-all"), want, "member {r}");
        }
    }

    #[test]
    fn all_gather_along_a_dim_with_granules() {
        // [2, 10] split along dim 1 in granules of 2 over 3 members (units 5 = 2 + 2 + 1).
        let n = 3;
        let outs = on_devices(n, move |r, link| {
            let cols = parts(10, n, 2)[r].clone();
            let x: Vec<f32> = (0..2).flat_map(|a| cols.clone().map(move |c| (a * 10 + c) as f32)).collect();
            let mut out = vec![0.0; 20];
            let op = Op::AllGather { group: group(n), id: 3, axis: "data".into(), dim: 1, granule: 2 };
            link.run(&op, Some((&x, &[2, cols.len()])), &mut out, &[2, 10]).map(|_| out)
        });
        for out in outs {
            assert_eq!(out.expect("all-gather"), (0..20).map(|i| i as f32).collect::<Vec<_>>());
        }
    }
}
