//! A training session: one run of a compiled plan, from its first
//! parameters to its last step.
//!
//! Input: a [`Compiled`] plan (one device's program, or every device's),
//! the plan file's text (evaluation recompiles its forward pass at the
//! evaluation batch size), the directory its data paths are relative to,
//! and a [`Config`] (threads, backends, where the parameters come from,
//! metrics file, fault injection). Output: per step a [`StepReport`] (to a
//! callback and the metrics file), at the end a [`Summary`], the trained
//! parameters, an evaluation of the test split, and a checkpoint.
//!
//! What it owns: the training data and its per-epoch order, the initial
//! parameters (seeded init, `--init` or `--resume`), the per-step
//! hyper-parameters, the step loop on one device or a cluster (one
//! [`Runner`] for both), evaluation, metrics and checkpoints.
//!
//! Invariants: a step's rows, hyper-parameters and initial parameters are
//! functions of the plan, the seed and the step number only, so any
//! placement of the same plan (and a resumed run) trains on the same
//! numbers; files (metrics, checkpoints) are written atomically, and
//! nothing is written when the run fails.

pub mod schedule;

use crate::atomic::AtomicFile;
use crate::backend::cpu::exec::Executor;
use crate::checkpoint::{self, CheckpointError, Tensor};
use crate::cluster::{Cluster, ClusterError, DeviceStats, Hypers, Rank, Tensors};
use crate::data::{self, Batch, DataError, Dataset, Sampler};
use crate::engine::{Backend, Data, Engine, EngineError};
use shardplan_compiler::check::{DeviceKind, Length, Prim};
use shardplan_compiler::graph::{Graph, Hyper};
use shardplan_compiler::kernel::{BufKind, Program};
use shardplan_compiler::partition::Plan;
use shardplan_compiler::{Checked, Compiled, Diagnostics, Target};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a session cannot start or go on.
#[derive(Debug)]
pub enum SessionError {
    /// The training data cannot be read or does not fit the model.
    Data(Box<DataError>),
    /// The plan does not compile (evaluation's forward pass).
    Plan(Diagnostics),
    /// A checkpoint or initial-parameters file cannot be used.
    Checkpoint(CheckpointError),
    /// Anything else, with a stable code and a help line.
    Failed { code: &'static str, message: String, help: String },
}

impl SessionError {
    pub fn failed(code: &'static str, message: impl Into<String>, help: impl Into<String>) -> SessionError {
        SessionError::Failed { code, message: message.into(), help: help.into() }
    }

    /// The stable code of the error (`run::…`, `data::…`, `checkpoint::…`).
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::Data(e) => e.code,
            SessionError::Plan(d) => d.iter().find(|d| d.is_error()).map(|d| d.code).unwrap_or("run::internal"),
            SessionError::Checkpoint(e) => e.code(),
            SessionError::Failed { code, .. } => code,
        }
    }

    /// How to fix it.
    pub fn help(&self) -> String {
        match self {
            SessionError::Data(e) => e.help.clone(),
            SessionError::Plan(d) => d.iter().find(|d| d.is_error()).and_then(|d| d.help.clone()).unwrap_or_default(),
            SessionError::Checkpoint(e) => e.help(),
            SessionError::Failed { help, .. } => help.clone(),
        }
    }
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Data(e) => write!(f, "{}", e.message),
            SessionError::Plan(d) => write!(f, "{}", d.iter().map(|d| d.message.as_str()).collect::<Vec<_>>().join("; ")),
            SessionError::Checkpoint(e) => write!(f, "{e}"),
            SessionError::Failed { message, .. } => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<CheckpointError> for SessionError {
    fn from(e: CheckpointError) -> SessionError {
        SessionError::Checkpoint(e)
    }
}

impl From<DataError> for SessionError {
    fn from(e: DataError) -> SessionError {
        SessionError::Data(Box::new(e))
    }
}

const BUG: &str = "this is a bug in shardplan; please report it with the plan";
const GPU_HELP: &str = "`shardplan selftest --backend cuda` checks every kernel on this GPU against the CPU";

/// An engine's failure during training; when the GPU itself failed (its
/// driver, a library, its memory) it is `run::gpu`, whatever the step was doing.
fn kernel_error(e: EngineError) -> SessionError {
    if e.is_device() {
        SessionError::failed("run::gpu", e.to_string(), GPU_HELP)
    } else {
        SessionError::failed("run::kernel", e.to_string(), "check the data: an index or label is outside the model's range")
    }
}

fn device_error(e: ClusterError) -> SessionError {
    SessionError::failed("run::device", e.to_string(), "the other devices were stopped; nothing was saved")
}

/// The backend asked for on the command line: every device on the CPU, on
/// CUDA, or each on its kind in the plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    #[default]
    Plan,
    Cpu,
    Cuda,
}

/// Where each device runs. Checks, when built, that CUDA can be used when a
/// device needs it.
#[derive(Clone, Debug)]
pub struct Backends {
    choice: BackendChoice,
    kinds: Vec<(bool, Option<u64>)>,
    gpus: usize,
}

impl Backends {
    pub fn new(choice: BackendChoice, c: &Checked) -> Result<Backends, SessionError> {
        let kinds: Vec<(bool, Option<u64>)> = c.devices.iter().map(|d| (d.kind == DeviceKind::Gpu, d.memory)).collect();
        let wants = match choice {
            BackendChoice::Cpu => false,
            BackendChoice::Cuda => true,
            BackendChoice::Plan => kinds.iter().any(|k| k.0),
        };
        let gpus = if wants { cuda_ready()?.len() } else { 0 };
        Ok(Backends { choice, kinds, gpus })
    }

    /// Every device on the CPU.
    pub fn cpu() -> Backends {
        Backends { choice: BackendChoice::Cpu, kinds: Vec::new(), gpus: 0 }
    }

    /// The backend of device `d`.
    pub fn of(&self, d: usize) -> Backend {
        let gpu = |d: usize| match self.choice {
            BackendChoice::Cpu => false,
            BackendChoice::Cuda => true,
            BackendChoice::Plan => self.kinds.get(d).is_some_and(|k| k.0),
        };
        if !gpu(d) || self.gpus == 0 {
            return Backend::Cpu;
        }
        // GPU devices are dealt out over the GPUs present, in device order.
        let rank = (0..d).filter(|&i| gpu(i)).count();
        Backend::Cuda { ordinal: rank % self.gpus, memory: self.kinds.get(d).and_then(|k| k.1) }
    }

    /// The backend of device `d` when it runs in a process of its own, the
    /// `local_rank`-th on its host: GPUs are dealt out by local rank.
    pub fn of_rank(&self, d: usize, local_rank: usize) -> Backend {
        match self.of(d) {
            Backend::Cuda { memory, .. } => Backend::Cuda { ordinal: local_rank % self.gpus.max(1), memory },
            cpu => cpu,
        }
    }

    /// The backends of devices `0..n`.
    pub fn all(&self, n: usize) -> Vec<Backend> {
        (0..n).map(|d| self.of(d)).collect()
    }
}

/// The GPUs present when CUDA can be used (driver, NVRTC, cuBLAS), else why not.
pub fn cuda_ready() -> Result<Vec<crate::backend::cuda::driver::Gpu>, SessionError> {
    crate::backend::cuda::exec::ready().map_err(|e| {
        SessionError::failed(
            "run::no_cuda",
            e.message(),
            "docs/cuda.md lists what a GPU run needs; `shardplan selftest --backend cuda` checks a machine's setup",
        )
    })
}

/// Where the first parameters come from.
#[derive(Clone, Debug, Default)]
pub enum Start {
    /// Seeded initialisation, as each parameter's `init` says.
    #[default]
    Fresh,
    /// Parameters from a safetensors file (names are the model's dotted
    /// paths). A checkpoint's optimizer state, if present, is left out.
    Init(PathBuf),
    /// A checkpoint written by [`Session::save`]: parameters, optimizer
    /// state and step. `seed_given`: the seed was set on purpose, so a
    /// checkpoint of another seed is accepted.
    Resume { path: PathBuf, seed_given: bool },
}

/// How to run a session.
#[derive(Clone, Debug)]
pub struct Config {
    /// Kernel threads per device.
    pub threads: usize,
    pub backends: Backends,
    pub start: Start,
    /// Stop after this global step (the schedule still spans the whole run).
    pub stop_after: Option<u64>,
    /// Time every kernel (for [`Session::profiles`]).
    pub profile: bool,
    /// Make device `.0` fail at step `.1` (from 1), to test how a run stops.
    pub fault: Option<(usize, u64)>,
    /// One line per step, JSON lines (CSV when the name ends in `.csv`).
    pub metrics: Option<PathBuf>,
    /// How long a device waits for a peer before the run stops.
    pub timeout: Duration,
}

impl Config {
    pub fn new(threads: usize, backends: Backends) -> Config {
        Config {
            threads: threads.max(1),
            backends,
            start: Start::Fresh,
            stop_after: None,
            profile: false,
            fault: None,
            metrics: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// What runs the steps: one device's engine, or a cluster of devices.
pub enum Runner {
    One(Box<dyn Engine>),
    Cluster(Box<Cluster>),
}

impl Runner {
    /// Starts the devices of `target`.
    pub fn start(target: Target, threads: usize, backends: &Backends, profile: bool, timeout: Duration) -> Result<Runner, SessionError> {
        Runner::start_in(target, threads, backends, profile, timeout, None)
    }

    /// Starts the devices of `target`: all of them, or with `rank` (one
    /// process per device) this process's one.
    pub fn start_in(target: Target, threads: usize, backends: &Backends, profile: bool, timeout: Duration, rank: Option<Rank>) -> Result<Runner, SessionError> {
        let devices = match &target {
            Target::One(_) => 1,
            Target::Placed(plan) => plan.devices.len(),
        };
        if let Some(r) = &rank {
            let n = r.peers.size();
            if n != devices {
                return Err(SessionError::failed(
                    "run::rank_count",
                    format!("the plan has {devices} device(s), but the launcher started {n} process(es)"),
                    format!("start one process per device: `mpirun -np {devices} shardplan run FILE`"),
                ));
            }
        }
        match (target, rank) {
            (Target::Placed(plan), Some(rank)) => {
                let me = rank.peers.rank();
                let backend = backends.of_rank(me, rank.local_rank);
                let mut cl = Cluster::start_rank(plan, threads, timeout, backend, rank);
                if profile {
                    cl.enable_profile().map_err(device_error)?;
                }
                Ok(Runner::Cluster(Box::new(cl)))
            }
            (target, _) => Runner::start_all(target, threads, backends, profile, timeout),
        }
    }

    fn start_all(target: Target, threads: usize, backends: &Backends, profile: bool, timeout: Duration) -> Result<Runner, SessionError> {
        match target {
            Target::One(program) => {
                let backend = backends.of(0);
                let mut e = crate::backend::engine(&backend, program, threads, 1).map_err(|e| match backend {
                    Backend::Cpu => SessionError::failed("run::compile", format!("cannot compile the training step: {e}"), BUG),
                    Backend::Cuda { ordinal, .. } => {
                        SessionError::failed("run::gpu", format!("cannot set up the training step on GPU {ordinal}: {e}"), GPU_HELP)
                    }
                })?;
                if profile {
                    e.enable_profile();
                }
                Ok(Runner::One(e))
            }
            Target::Placed(plan) => {
                let on = backends.all(plan.devices.len());
                let mut cl = Cluster::start_on(plan, threads, timeout, on);
                if profile {
                    cl.enable_profile().map_err(device_error)?;
                }
                Ok(Runner::Cluster(Box::new(cl)))
            }
        }
    }

    /// The number of devices.
    pub fn devices(&self) -> usize {
        match self {
            Runner::One(_) => 1,
            Runner::Cluster(cl) => cl.plan().devices.len(),
        }
    }

    /// The devices' programs, when there are several.
    pub fn plan(&self) -> Option<&Plan> {
        match self {
            Runner::One(_) => None,
            Runner::Cluster(cl) => Some(cl.plan()),
        }
    }

    /// Sets every parameter and optimizer state (global tensors).
    pub fn load(&mut self, params: &[Vec<f32>], states: &[Vec<f32>]) -> Result<(), SessionError> {
        match self {
            Runner::Cluster(cl) => cl.load(params, states).map_err(device_error),
            Runner::One(e) => {
                for (i, p) in params.iter().enumerate() {
                    e.set(&BufKind::Param(i), Data::F32(p)).map_err(kernel_error)?;
                }
                for (i, s) in states.iter().enumerate() {
                    e.set(&BufKind::State(i), Data::F32(s)).map_err(kernel_error)?;
                }
                Ok(())
            }
        }
    }

    /// Runs step `step` (from 0) on the rows `rows` of the training split.
    pub fn step(&mut self, step: u64, h: Hypers, rows: &[usize], batch: &dyn Fn(&[usize]) -> Batch, fault: Option<usize>) -> Result<f64, SessionError> {
        match self {
            Runner::Cluster(cl) => cl.step(step, h, rows, batch, fault).map_err(device_error),
            Runner::One(e) => {
                batch(rows).load_into(e.as_mut(), None, rows).map_err(kernel_error)?;
                e.step(&move |x: Hyper| h.get(x)).map(f64::from).map_err(kernel_error)
            }
        }
    }

    /// The global parameters and optimizer states.
    pub fn read(&mut self, params: &[Vec<usize>], states: &[Vec<usize>]) -> Result<Tensors, SessionError> {
        match self {
            Runner::Cluster(cl) => cl.read(params, states).map_err(device_error),
            Runner::One(e) => {
                let read = |k: BufKind| e.get(&k).map(Option::unwrap_or_default).map_err(kernel_error);
                let p = (0..params.len()).map(|i| read(BufKind::Param(i))).collect::<Result<_, _>>()?;
                let s = (0..states.len()).map(|i| read(BufKind::State(i))).collect::<Result<_, _>>()?;
                Ok((p, s))
            }
        }
    }

    /// What each device did in the last step (empty on one device).
    pub fn stats(&self) -> &[DeviceStats] {
        match self {
            Runner::One(_) => &[],
            Runner::Cluster(cl) => cl.stats(),
        }
    }
}

/// What one step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The step, from 1.
    pub step: u64,
    /// The epoch, from 1.
    pub epoch: u64,
    pub loss: f32,
    pub lr: f64,
    /// Samples per second since the session's first step.
    pub samples_per_s: f64,
    /// Seconds since the session started.
    pub wall_s: f64,
    /// Seconds of this step.
    pub step_s: f64,
    /// On several devices: the fraction of device time idle, and spent in
    /// transfers and collectives, in this step.
    pub idle_fraction: Option<f64>,
    pub comm_fraction: Option<f64>,
}

impl StepReport {
    /// The metrics line: JSON, or CSV (`step,epoch,loss,lr,samples_per_s,wall_s`).
    pub fn line(&self, csv: bool, batch: usize) -> String {
        if csv {
            return format!("{},{},{},{},{},{}", self.step, self.epoch, self.loss, self.lr, self.samples_per_s, self.wall_s);
        }
        let mut v = serde_json::json!({
            "step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr, "samples_per_s": self.samples_per_s, "wall_s": self.wall_s,
            "step_s": self.step_s, "samples_per_step_s": batch as f64 / self.step_s.max(1e-12),
        });
        if let (Some(idle), Some(comm)) = (self.idle_fraction, self.comm_fraction) {
            v["idle_fraction"] = serde_json::json!(idle);
            v["comm_fraction"] = serde_json::json!(comm);
        }
        v.to_string()
    }
}

/// One device over the whole run.
#[derive(Clone, Debug)]
pub struct DeviceSummary {
    pub backend: Backend,
    /// Bytes of its buffers.
    pub bytes: u64,
    /// Bytes its memory plan gave.
    pub planned: u64,
    /// Seconds computing, and in transfers and collectives.
    pub busy_s: f64,
    pub comm_s: f64,
}

/// The run, at its end.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Steps trained in this session (after a resumed start).
    pub trained: u64,
    pub per_epoch: u64,
    pub batch: usize,
    /// Seconds of the step loop.
    pub secs: f64,
    /// Mean loss of the last steps (at most an epoch's, at most 50), and how many.
    pub mean_recent: f32,
    pub recent: usize,
    /// The median step time (the first steps' page faults do not weigh on it).
    pub median_step_s: f64,
    /// Per device, on several devices.
    pub devices: Vec<DeviceSummary>,
}

/// Loss and accuracy on the test split.
#[derive(Clone, Copy, Debug)]
pub struct Evaluation {
    pub loss: f32,
    /// For classifiers.
    pub accuracy: Option<f64>,
    pub samples: usize,
}

/// Per device, the kernels it ran and the seconds each took (with [`Config::profile`]).
pub struct KernelProfile {
    pub device: usize,
    pub program: Program,
    pub seconds: Vec<f64>,
}

/// A kernel profile summed up per step: the total, the totals by kind of
/// kernel, and every kernel, each slowest first.
#[derive(Clone, Debug)]
pub struct ProfileSummary {
    /// Seconds per step over all kernels, and the number of kernels.
    pub per_step_s: f64,
    pub kernels: usize,
    /// (kind, seconds per step, share of the total, kernels of the kind).
    pub by_kind: Vec<(String, f64, f64, usize)>,
    /// (seconds per step, share of the total, the kernel and its shapes).
    pub slowest: Vec<(f64, f64, String)>,
}

impl KernelProfile {
    /// The profile of `steps` steps, per step.
    pub fn summary(&self, steps: u64) -> ProfileSummary {
        use shardplan_compiler::kernel::StepKind;
        let p = &self.program;
        let total: f64 = self.seconds.iter().sum();
        let n = steps.max(1) as f64;
        let share = |t: f64| 100.0 * t / total.max(1e-12);
        let mut rows: Vec<(f64, String)> = p
            .steps
            .iter()
            .zip(&self.seconds)
            .map(|(s, t)| {
                let what = match &s.kind {
                    StepKind::Fused(f) => format!("fused {} ops [{} × {}]", f.body.len(), f.rows, f.cols),
                    StepKind::Reduce { op, epilogue } => format!("{} + {} ops", op.name(), epilogue.body.len()),
                    _ => s.kind.name(),
                };
                let ins: Vec<String> = s.inputs.iter().map(|b| format!("{:?}", p.buffers[b.0 as usize].shape)).collect();
                (*t, format!("{what} {} → {:?}", ins.join(" "), p.buffers[s.output.0 as usize].shape))
            })
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        // Totals by kind of kernel (the text before the shapes).
        let mut kinds: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for (t, what) in &rows {
            let kind = what.split(" [").next().unwrap_or(what).split(" ops").next().unwrap_or(what).to_string();
            let e = kinds.entry(kind).or_default();
            e.0 += t;
            e.1 += 1;
        }
        let mut by_kind: Vec<(String, f64, f64, usize)> = kinds.into_iter().map(|(k, (t, c))| (k, t / n, share(t), c)).collect();
        by_kind.sort_by(|a, b| b.1.total_cmp(&a.1));
        let slowest = rows.into_iter().map(|(t, what)| (t / n, share(t), what)).collect();
        ProfileSummary { per_step_s: total / n, kernels: p.steps.len(), by_kind, slowest }
    }
}

/// A run of a compiled plan.
pub struct Session {
    checked: Checked,
    graph: Graph,
    search: Option<shardplan_compiler::planner::Search>,
    source: Vec<u8>,
    threads: usize,
    backends: Backends,
    runner: Runner,
    fault: Option<(usize, u64)>,
    metrics: Option<(AtomicFile, bool)>,
    /// Whether this process writes files and evaluates: true unless it is
    /// a rank other than 0 of a run with one process per device.
    root: bool,
    // The data and the length of the run.
    splits: data::Splits,
    sampler: Sampler,
    batch: usize,
    per_epoch: u64,
    total: u64,
    start: u64,
    end: u64,
    next: u64,
    order: Option<(u64, Vec<Vec<usize>>)>,
    // What the steps did.
    created: Instant,
    first_step: Option<Instant>,
    recent: Vec<f32>,
    last_loss: f32,
    step_times: Vec<f64>,
    device_totals: Vec<(f64, f64, u64)>,
    notes: Vec<String>,
    /// The parameters the loss does not use, by index, as they started.
    untrained: Vec<(usize, Vec<f32>)>,
}

/// The number of classes of the model's cross-entropy, if it has one.
fn classes(c: &Checked) -> Option<usize> {
    c.model.trace.iter().find_map(|t| match t.prim {
        Prim::CrossEntropy => t.args.first().and_then(|a| c.model.trace[a.0 as usize].ty.shape.last()).map(|d| d.size as usize),
        _ => None,
    })
}

fn shape(ty: &shardplan_compiler::check::Ty) -> Vec<usize> {
    ty.shape.iter().map(|d| d.size.max(0) as usize).collect()
}

/// Checks, before loading, that the data fits the model's first input: a
/// table gives each sample as many features as the input takes (from the
/// csv header). `check` runs it when the data file is readable; every
/// session runs it.
pub fn check_data(c: &Checked, base: &Path) -> Result<(), DataError> {
    let Some(input) = c.model.inputs.first() else { return Ok(()) };
    let expected: i64 = input.ty.shape.iter().skip(1).map(|d| d.size).product();
    data::check_width(&c.data.source, base, expected.max(0) as usize, &input.name, &input.ty.to_string())
}

impl Session {
    /// Loads the data (paths relative to `base`), starts the devices and
    /// sets the first parameters. `source` is the plan file's text.
    pub fn new(compiled: Compiled, source: &[u8], base: &Path, cfg: Config) -> Result<Session, SessionError> {
        Session::new_in(compiled, source, base, cfg, None)
    }

    /// [`Session::new`] in one process of a run with one process per
    /// device, `rank` being this process's share. The processes first agree
    /// that they run the same plan, settings and build; then rank 0 writes
    /// the metrics and checkpoints and evaluates.
    pub fn new_in(compiled: Compiled, source: &[u8], base: &Path, cfg: Config, rank: Option<Rank>) -> Result<Session, SessionError> {
        let created = Instant::now();
        let Compiled { checked: c, graph, target, search, .. } = compiled;
        check_data(&c, base)?;
        let seq = c.train.dims.get("seq").map(|&s| s as usize);
        let splits = data::load(&c.data.source, base, seq, classes(&c))?;
        let batch = c.train.batch.max(1) as usize;
        let sampler = Sampler::new(splits.train.len(), batch, c.train.shuffle, c.train.seed);
        let per_epoch = sampler.batches_per_epoch() as u64;
        if per_epoch == 0 {
            return Err(SessionError::failed(
                "run::batch_too_large",
                format!("the training split has {} samples, fewer than one batch of {batch}", splits.train.len()),
                "lower `batch` in the train section, or train on more data",
            ));
        }
        let total = match c.train.length {
            Length::Epochs(e) => e.max(0) as u64 * per_epoch,
            Length::Steps(s) => s.max(0) as u64,
        };
        let end = cfg.stop_after.map(|s| s.min(total)).unwrap_or(total);

        let root = rank.as_ref().is_none_or(|r| r.peers.rank() == 0);
        if let Some(r) = &rank {
            let plan = match &target {
                Target::Placed(p) => p.hash,
                Target::One(_) => 0,
            };
            let start = format!("{:?}", cfg.start);
            use shardplan_compiler::hash::{fnv1a, fnv1a_from};
            let mut fp = fnv1a(source);
            for x in [plan, c.train.seed, total, end, batch as u64] {
                fp = fnv1a_from(fp, &x.to_le_bytes());
            }
            fp = fnv1a_from(fp, start.as_bytes());
            agree(r, fp)?;
        }
        let runner = Runner::start_in(target, cfg.threads, &cfg.backends, cfg.profile, cfg.timeout, rank)?;
        if let Some((d, _)) = cfg.fault {
            let n = runner.devices();
            if d >= n {
                return Err(SessionError::failed(
                    "run::inject_fault",
                    format!("--inject-fault names device {d}, but the run has {n} device(s)"),
                    format!("name a device from 0 to {}", n - 1),
                ));
            }
        }
        let mut s = Session {
            checked: c,
            graph,
            search,
            source: source.to_vec(),
            threads: cfg.threads,
            backends: cfg.backends,
            runner,
            fault: cfg.fault,
            metrics: None,
            root,
            splits,
            sampler,
            batch,
            per_epoch,
            total,
            start: 0,
            end,
            next: 0,
            order: None,
            created,
            first_step: None,
            recent: Vec::new(),
            last_loss: f32::NAN,
            step_times: Vec::new(),
            device_totals: Vec::new(),
            notes: Vec::new(),
            untrained: Vec::new(),
        };
        s.load_start(&cfg.start)?;
        if let Some(path) = cfg.metrics.as_ref().filter(|_| s.root) {
            let csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
            let mut f = AtomicFile::create(path).map_err(|e| {
                SessionError::failed("run::metrics", format!("cannot write `{}`: {e}", path.display()), "check the directory exists and is writable")
            })?;
            if csv {
                f.line("step,epoch,loss,lr,samples_per_s,wall_s").map_err(metrics_error)?;
            }
            s.metrics = Some((f, csv));
        }
        Ok(s)
    }

    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.checked.model.params.iter().map(|p| (p.path.clone(), shape(&p.ty))).collect()
    }

    fn state_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.graph.states.iter().map(|s| (s.name.clone(), shape(&s.ty))).collect()
    }

    /// Sets the first parameters and optimizer state, and the first step.
    fn load_start(&mut self, start: &Start) -> Result<(), SessionError> {
        let shapes = self.param_shapes();
        let states = self.state_shapes();
        let c = &self.checked;
        let mut params: Vec<Vec<f32>> = c.model.params.iter().enumerate().map(|(i, p)| schedule::init(&p.init, &shapes[i].1, c.train.seed, i as u64)).collect();
        let mut state_vals: Vec<Vec<f32>> = states.iter().map(|(_, s)| vec![0.0; s.iter().product()]).collect();
        match start {
            Start::Fresh => {}
            Start::Init(path) => {
                let (mut found, meta) = checkpoint::load(path)?;
                // A checkpoint of this model brings its optimizer state too:
                // the parameters are taken, the state is left out.
                let state_names: std::collections::HashSet<&str> = states.iter().map(|s| s.0.as_str()).collect();
                let is_checkpoint = meta.get("format").is_some_and(|f| f.starts_with("shardplan-checkpoint"));
                let before = found.len();
                if is_checkpoint {
                    found.retain(|t| !state_names.contains(t.name.as_str()));
                }
                let left_out = before - found.len();
                let found = checkpoint::select(path, found, &shapes)?;
                params = found.into_iter().map(|t| t.data).collect();
                if left_out > 0 {
                    self.notes.push(format!(
                        "{}: took the parameters of this checkpoint; its optimizer state ({left_out} tensors) is left out (use --resume to continue its run)",
                        path.display()
                    ));
                }
            }
            Start::Resume { path, seed_given } => {
                let (found, meta) = checkpoint::load(path)?;
                let mut expected = shapes.clone();
                expected.extend(states.iter().cloned());
                let found = checkpoint::select(path, found, &expected)?;
                let mut it = found.into_iter();
                params = it.by_ref().take(shapes.len()).map(|t| t.data).collect();
                state_vals = it.map(|t| t.data).collect();
                self.start = checkpoint::meta_parse(path, &meta, "step")?;
                let seed: u64 = checkpoint::meta_parse(path, &meta, "seed")?;
                if !seed_given && seed != c.train.seed {
                    return Err(SessionError::failed(
                        "run::resume_seed",
                        format!("the checkpoint was trained with seed {seed}, the plan says {}", c.train.seed),
                        format!("resume with `--seed {seed}` to continue the same run"),
                    ));
                }
            }
        }
        self.next = self.start;
        // Parameters the loss does not use get no gradient and never change
        // (as PyTorch's optimizers skip them); no device program holds them,
        // so the session keeps them for checkpoints and comparisons.
        self.untrained = params.iter().enumerate().filter(|(i, _)| !self.graph.grads.contains_key(i)).map(|(i, p)| (i, p.clone())).collect();
        self.runner.load(&params, &state_vals)
    }

    /// Lines to tell the user about how the session started (e.g. what an
    /// `--init` checkpoint's optimizer state became).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The checked plan as it runs (`placement auto` resolved).
    pub fn checked(&self) -> &Checked {
        &self.checked
    }

    /// The training graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The planner's search, for `placement auto`.
    pub fn search(&self) -> Option<&shardplan_compiler::planner::Search> {
        self.search.as_ref()
    }

    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// The backend of device `d`.
    pub fn backend(&self, d: usize) -> Backend {
        self.backends.of(d)
    }

    /// The first step of this session (from 0), the step it stops before,
    /// and the run's whole length (what the schedules span).
    pub fn steps(&self) -> (u64, u64, u64) {
        (self.start, self.end, self.total)
    }

    /// Batches per epoch.
    pub fn per_epoch(&self) -> u64 {
        self.per_epoch
    }

    /// The test split, when the data source declares one.
    pub fn test_split(&self) -> Option<&Dataset> {
        self.splits.test.as_ref()
    }

    /// Runs the next step; None when the run is over.
    pub fn step(&mut self) -> Result<Option<StepReport>, SessionError> {
        if self.next >= self.end {
            return Ok(None);
        }
        let step = self.next;
        crate::process::set_step(step + 1);
        let loop_start = *self.first_step.get_or_insert_with(Instant::now);
        let epoch = step / self.per_epoch;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, self.sampler.epoch(epoch)));
        }
        let rows = self.order.as_ref().map(|(_, o)| o[(step % self.per_epoch) as usize].clone()).unwrap_or_default();
        let h = schedule::hypers(&self.checked, step, self.total);
        let step_start = Instant::now();
        let fault = self.fault.filter(|f| f.1 == step + 1).map(|f| f.0);
        let train = &self.splits.train;
        let loss = self.runner.step(step, h, &rows, &|r| train.gather(r), fault)? as f32;
        if !loss.is_finite() {
            return Err(SessionError::failed(
                "run::diverged",
                format!("the loss became {loss} at step {}", step + 1),
                "lower the learning rate, or clip gradients with `clip_grad_norm: 1.0`",
            ));
        }
        self.next += 1;
        let step_s = step_start.elapsed().as_secs_f64();
        self.step_times.push(step_s);
        self.last_loss = loss;
        self.recent.push(loss);
        if self.recent.len() > self.per_epoch.min(50) as usize {
            self.recent.remove(0);
        }
        let elapsed = loop_start.elapsed().as_secs_f64();
        let stats = self.runner.stats();
        self.device_totals.resize(stats.len(), (0.0, 0.0, 0));
        for (acc, st) in self.device_totals.iter_mut().zip(stats) {
            acc.0 += st.busy_s;
            acc.1 += st.comm_s;
            acc.2 = st.bytes;
        }
        let (idle, comm) = if stats.is_empty() {
            (None, None)
        } else {
            // Stages idle: 1 − (compute of all devices) / (devices × step time).
            let busy: f64 = stats.iter().map(|s| s.busy_s).sum();
            let comm: f64 = stats.iter().map(|s| s.comm_s).sum();
            let n = stats.len() as f64;
            (Some(1.0 - busy / (n * step_s.max(1e-12))), Some(comm / (n * step_s.max(1e-12))))
        };
        let report = StepReport {
            step: step + 1,
            epoch: epoch + 1,
            loss,
            lr: h.lr,
            samples_per_s: ((step + 1 - self.start) as f64 * self.batch as f64) / elapsed.max(1e-9),
            wall_s: self.created.elapsed().as_secs_f64(),
            step_s,
            idle_fraction: idle,
            comm_fraction: comm,
        };
        if let Some((f, csv)) = self.metrics.as_mut() {
            f.line(&report.line(*csv, self.batch)).map_err(metrics_error)?;
        }
        Ok(Some(report))
    }

    /// Runs every remaining step, calling `on_step` after each; writes the
    /// metrics file at the end.
    pub fn train(&mut self, on_step: &mut dyn FnMut(&StepReport)) -> Result<Summary, SessionError> {
        while let Some(r) = self.step()? {
            on_step(&r);
        }
        self.finish()
    }

    /// Ends the step loop: commits the metrics file and sums the run up.
    pub fn finish(&mut self) -> Result<Summary, SessionError> {
        if let Some((f, _)) = self.metrics.take() {
            f.commit().map_err(metrics_error)?;
        }
        let trained = self.next.saturating_sub(self.start);
        let secs = self.first_step.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        let mean_recent = if self.recent.is_empty() { self.last_loss } else { self.recent.iter().sum::<f32>() / self.recent.len() as f32 };
        let mut times = self.step_times.clone();
        times.sort_by(f64::total_cmp);
        let median_step_s = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
        let devices = match self.runner.plan() {
            None => Vec::new(),
            Some(plan) => self
                .device_totals
                .iter()
                .enumerate()
                .map(|(i, (busy, comm, bytes))| DeviceSummary {
                    backend: self.backends.of(i),
                    bytes: *bytes,
                    planned: plan.devices.get(i).map(|d| shardplan_compiler::partition::memory::device(d).total()).unwrap_or(0),
                    busy_s: *busy,
                    comm_s: *comm,
                })
                .collect(),
        };
        Ok(Summary { trained, per_epoch: self.per_epoch, batch: self.batch, secs, mean_recent, recent: self.recent.len(), median_step_s, devices })
    }

    /// The global parameters and optimizer states as they are now.
    pub fn parameters(&mut self) -> Result<Tensors, SessionError> {
        let p: Vec<Vec<usize>> = self.param_shapes().into_iter().map(|s| s.1).collect();
        let s: Vec<Vec<usize>> = self.state_shapes().into_iter().map(|s| s.1).collect();
        let (mut params, states) = self.runner.read(&p, &s)?;
        for (i, value) in &self.untrained {
            if let Some(slot) = params.get_mut(*i) {
                slot.clone_from(value);
            }
        }
        Ok((params, states))
    }

    /// Writes a checkpoint (parameters, optimizer state, step and seed) to
    /// `path`, atomically: `--resume` continues from it, `--init` takes its
    /// parameters.
    pub fn save(&mut self, path: &Path) -> Result<(), SessionError> {
        // Every process hands its pieces over; rank 0 writes the file.
        let (params, states) = self.parameters()?;
        if !self.root {
            return Ok(());
        }
        let mut tensors: Vec<Tensor> = self.param_shapes().into_iter().zip(params).map(|((name, shape), data)| Tensor { name, shape, data }).collect();
        tensors.extend(self.state_shapes().into_iter().zip(states).map(|((name, shape), data)| Tensor { name, shape, data }));
        let meta: BTreeMap<String, String> = [
            ("format".to_string(), "shardplan-checkpoint-1".to_string()),
            ("model".to_string(), self.checked.model.name.clone()),
            ("step".to_string(), self.next.max(self.start).to_string()),
            ("seed".to_string(), self.checked.train.seed.to_string()),
        ]
        .into_iter()
        .collect();
        checkpoint::save(path, &tensors, &meta)?;
        Ok(())
    }

    /// Mean loss and (for classifiers) accuracy over the whole test split,
    /// on one CPU device with the current parameters; None without a test split.
    pub fn evaluate(&mut self) -> Result<Option<Evaluation>, SessionError> {
        if self.splits.test.is_none() {
            return Ok(None);
        }
        let (params, _) = self.parameters()?;
        let Some(test) = self.splits.test.as_ref().filter(|_| self.root) else { return Ok(None) };
        evaluate(&self.source, test, &params, self.threads).map(Some)
    }

    /// Per device, its kernels and the seconds each took (with [`Config::profile`]).
    pub fn profiles(&mut self) -> Result<Vec<KernelProfile>, SessionError> {
        Ok(match &mut self.runner {
            Runner::One(e) if !e.profile().is_empty() => vec![KernelProfile { device: 0, program: e.program().clone(), seconds: e.profile().to_vec() }],
            Runner::One(_) => Vec::new(),
            Runner::Cluster(cl) => {
                let times = cl.profiles().map_err(device_error)?;
                cl.plan()
                    .devices
                    .iter()
                    .zip(times)
                    .filter(|(_, t)| !t.is_empty())
                    .map(|(d, seconds)| KernelProfile { device: d.device, program: d.program.clone(), seconds })
                    .collect()
            }
        })
    }
}

/// Checks that every process of the run has the same fingerprint (plan,
/// settings) and build as rank 0; else names the ranks that differ.
fn agree(r: &Rank, fingerprint: u64) -> Result<(), SessionError> {
    let mut mine = fingerprint.to_le_bytes().to_vec();
    mine.extend_from_slice(&r.build.to_le_bytes());
    let all = r.peers.all_gather(mine);
    let at = |b: &[u8], i: usize| b.get(i..i + 8).and_then(|x| x.try_into().ok()).map(u64::from_le_bytes);
    let of = |i: usize| all.first().and_then(|b| at(b, i));
    let differ = |i: usize| -> Vec<usize> { all.iter().enumerate().filter(|(_, b)| at(b, i) != of(i)).map(|(r, _)| r).collect() };
    let list = |v: &[usize]| v.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
    let builds = differ(8);
    if !builds.is_empty() {
        return Err(SessionError::failed(
            "run::ranks_differ",
            format!("rank(s) {} run a different build of shardplan than rank 0", list(&builds)),
            "start every rank from the same shardplan executable",
        ));
    }
    let plans = differ(0);
    if !plans.is_empty() {
        return Err(SessionError::failed(
            "run::ranks_differ",
            format!("rank(s) {} run a different plan or settings than rank 0", list(&plans)),
            "give every rank the same plan file and the same options (on several hosts, the same file at the same path)",
        ));
    }
    Ok(())
}

fn metrics_error(e: std::io::Error) -> SessionError {
    SessionError::failed("run::metrics", format!("cannot write metrics: {e}"), "check the disk")
}

/// Mean loss and (for classifiers) accuracy over `test`, in chunks of at
/// most 512 rows, each size's forward pass compiled once.
fn evaluate(source: &[u8], test: &Dataset, params: &[Vec<f32>], threads: usize) -> Result<Evaluation, SessionError> {
    let n = test.len();
    let chunk = n.clamp(1, 512);
    let mut total_loss = 0.0f64;
    let mut correct = 0usize;
    let mut counted = 0usize;
    let mut classifier = false;
    let mut programs: BTreeMap<usize, (Executor, Option<shardplan_compiler::kernel::BufId>)> = BTreeMap::new();
    let mut start = 0;
    while start < n {
        let size = chunk.min(n - start);
        if let std::collections::btree_map::Entry::Vacant(slot) = programs.entry(size) {
            let overrides: BTreeMap<String, i64> = [("batch".to_string(), size as i64)].into_iter().collect();
            let (ce, diags) = shardplan_compiler::check_source_placed(source, &overrides, false);
            let ce = ce.ok_or(SessionError::Plan(diags))?;
            let compiled =
                shardplan_compiler::compile(&ce, &shardplan_compiler::Options { forward_only: true, ..Default::default() }).map_err(SessionError::Plan)?;
            let Target::One(p) = compiled.target else {
                return Err(SessionError::failed("run::internal", "the evaluation pass was partitioned", BUG));
            };
            let mut exec = Executor::new(p, threads).map_err(|e| SessionError::failed("run::compile", e.to_string(), BUG))?;
            for (i, v) in params.iter().enumerate() {
                exec.set(&BufKind::Param(i), Data::F32(v)).map_err(|e| SessionError::failed("run::kernel", e.to_string(), BUG))?;
            }
            slot.insert((exec, compiled.logits));
        }
        let Some((exec, logits_buf)) = programs.get_mut(&size) else { break };
        let rows: Vec<usize> = (start..start + size).collect();
        let b = test.gather(&rows);
        b.load_into(exec, None, &rows).map_err(|e| SessionError::failed("run::kernel", e.to_string(), "check the data"))?;
        let loss = exec.step(&|_| 0.0).map_err(kernel_error)?;
        total_loss += loss as f64 * size as f64;
        if let (Some(lb), Batch::Table { labels, .. }) = (logits_buf, &b) {
            classifier = true;
            let logits = Executor::buffer(exec, *lb);
            let k = logits.len() / size.max(1);
            for (i, &label) in labels.iter().enumerate() {
                let row = &logits[i * k..(i + 1) * k];
                let best = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |acc, (j, &v)| if v > acc.1 { (j, v) } else { acc }).0;
                correct += usize::from(best as i32 == label);
                counted += 1;
            }
        }
        start += size;
    }
    let accuracy = (classifier && counted > 0).then(|| correct as f64 / counted as f64);
    Ok(Evaluation { loss: (total_loss / n.max(1) as f64) as f32, accuracy, samples: n })
}

/// A placed run against one device, step by step.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    /// Per step (from 1): the loss on one device and placed.
    pub losses: Vec<(u64, f64, f64)>,
    /// The largest relative difference of a step's loss.
    pub worst_loss: f64,
    /// The largest difference of a parameter tensor, ‖a − b‖ / ‖a‖, and its name.
    pub worst_param: (f64, String),
}

impl Comparison {
    /// Whether both differences are within their tolerances.
    pub fn within(&self, loss_tolerance: f64, param_tolerance: f64) -> bool {
        self.worst_loss <= loss_tolerance && self.worst_param.0 <= param_tolerance
    }
}

/// The tolerances within which a placed run of `c` must match one device
/// ([`Comparison::within`]): (relative loss difference, parameter
/// difference ‖a − b‖ / ‖a‖). 1e-5 and 1e-4; under `autocast bf16`, whose
/// roundings turn the placements' different summation orders into
/// bfloat16-sized steps, 1e-4 and 2e-3.
pub fn tolerances(c: &Checked) -> (f64, f64) {
    if c.autocast.is_empty() {
        (1e-5, 1e-4)
    } else {
        (1e-4, 2e-3)
    }
}

/// The two sessions `verify` compares: `c` as placed (on `backends`;
/// `placement auto` as the planner chooses with `profile`), and on one CPU
/// device; both stop after `steps` steps.
pub fn side_by_side(
    c: &Checked,
    source: &[u8],
    base: &Path,
    steps: u64,
    threads: usize,
    backends: Backends,
    profile: Option<shardplan_compiler::planner::Profile>,
) -> Result<(Session, Session), SessionError> {
    let placed = shardplan_compiler::compile(c, &shardplan_compiler::Options { profile, ..Default::default() }).map_err(SessionError::Plan)?;
    let reference = shardplan_compiler::compile(c, &shardplan_compiler::Options { single_device: true, ..Default::default() }).map_err(SessionError::Plan)?;
    let mut cfg = Config::new(threads, Backends::cpu());
    cfg.stop_after = Some(steps);
    let one = Session::new(reference, source, base, cfg.clone())?;
    cfg.backends = backends;
    let placed = Session::new(placed, source, base, cfg)?;
    Ok((one, placed))
}

/// Steps `reference` (one device) and `placed` side by side until either
/// ends, calling `on_step` with each step's two losses; then compares their
/// parameters.
pub fn compare(reference: &mut Session, placed: &mut Session, on_step: &mut dyn FnMut(u64, f64, f64)) -> Result<Comparison, SessionError> {
    let mut out = Comparison::default();
    while let Some(a) = reference.step()? {
        let Some(b) = placed.step()? else { break };
        let (x, y) = (a.loss as f64, b.loss as f64);
        let rel = (x - y).abs() / x.abs().max(1e-12);
        out.worst_loss = out.worst_loss.max(if rel.is_nan() { f64::INFINITY } else { rel });
        out.losses.push((a.step, x, y));
        on_step(a.step, x, y);
    }
    let (pa, _) = reference.parameters()?;
    let (pb, _) = placed.parameters()?;
    for (i, p) in reference.checked.model.params.iter().enumerate() {
        let (a, b) = (&pa[i], &pb[i]);
        // Norm-wise: ‖a − b‖ / ‖a‖ (one near-zero gradient whose sign
        // reassociation flips moves one Adam update, not the tensor).
        let norm = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
        let diff = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt() / norm;
        let diff = if a.len() != b.len() || diff.is_nan() { f64::INFINITY } else { diff };
        if diff > out.worst_param.0 || out.worst_param.1.is_empty() {
            out.worst_param = (diff, p.path.clone());
        }
    }
    Ok(out)
}
