//! `shardplan run FILE`: train a plan on one CPU device.
//!
//! Loads and checks the plan, loads its data, compiles the training step
//! (graph → autodiff → kernels), initialises or loads the parameters, runs
//! the steps with a progress bar, evaluates the held-out split, and writes
//! metrics and checkpoints atomically.
//!
//! `shardplan run OUT.json` runs a plan compiled by `shardplan compile`: its
//! device programs as compiled, once read back and checked (`compile::load`).

use super::auto::ms;
use super::render::{self, Sources};
use super::{check, compile};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shardplan_compiler::check::Placement;
use shardplan_compiler::check::{Init, Length, LrSchedule, Optimizer, Prim};
use shardplan_compiler::graph::{Hyper, NodeId, Op};
use shardplan_compiler::kernel::{lower, lower_keeping, BufKind};
use shardplan_compiler::partition;
use shardplan_compiler::{autodiff, graph, Checked, Diagnostic, SourceId, Span};
use shardplan_runtime::checkpoint::{self, Tensor};
use shardplan_runtime::cluster::{Cluster, Hypers};
use shardplan_runtime::data::{self, rng::Xoshiro256, Batch, DataError, Dataset, Sampler};
use shardplan_runtime::exec::{self, Backend, Data, Engine, Executor};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

/// Options of `shardplan run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The plan file, or a plan compiled by `shardplan compile` (a `.json` file).
    pub file: PathBuf,
    /// Train for this many steps (overrides the plan).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Train for this many epochs (overrides the plan).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Seed for initialisation and data order (overrides the plan).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write one line per step: step, epoch, loss, lr, samples/s, wall time
    /// (JSON lines; CSV when FILE ends in .csv).
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Initial parameters (safetensors; names are the model's dotted paths).
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    pub init: Option<PathBuf>,
    /// Save parameters, optimizer state and step at the end (safetensors).
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
    /// Continue a run saved with --save.
    #[arg(long, value_name = "FILE")]
    pub resume: Option<PathBuf>,
    /// Stop after this global step (the schedule still spans the whole run);
    /// with --save, a checkpoint to --resume from later.
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<u64>,
    /// Threads for kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Time every kernel and print where a step spends its time.
    #[arg(long)]
    pub profile: bool,
    /// Run on one device, ignoring the plan's placement (the reference a placement must match).
    #[arg(long)]
    pub single_device: bool,
    /// Device profile written by `shardplan calibrate`, for `placement auto`
    /// (default: shardplan-profile.json when present, else built-in figures).
    #[arg(long, value_name = "FILE")]
    pub device_profile: Option<PathBuf>,
    /// Make device D fail at step S (for testing how a run stops), e.g. `device=1,step=3`.
    #[arg(long, value_name = "device=D,step=S", value_parser = parse_fault)]
    pub inject_fault: Option<(usize, u64)>,
    /// Run every device on this backend (default: each device on its kind in
    /// the plan, `cpu` or `gpu`). With `cuda`, the plan's devices become
    /// logical devices on the GPUs present (device i on GPU i mod count).
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
}

/// The backend named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Cpu,
    Cuda,
}

/// Where each device runs: `backend` when given, else the device's kind in
/// the plan. Checks, before anything runs, that CUDA can be used when a
/// device needs it.
pub struct Backends {
    backend: Option<BackendArg>,
    kinds: Vec<(bool, Option<u64>)>,
    gpus: usize,
}

impl Backends {
    pub fn new(backend: Option<BackendArg>, c: &Checked) -> Result<Backends, Failure> {
        use shardplan_compiler::check::config::DeviceKind;
        let kinds: Vec<(bool, Option<u64>)> = c.devices.iter().map(|d| (d.kind == DeviceKind::Gpu, d.memory)).collect();
        let wants = match backend {
            Some(BackendArg::Cpu) => false,
            Some(BackendArg::Cuda) => true,
            None => kinds.iter().any(|k| k.0),
        };
        let gpus = if wants { cuda_ready()?.len() } else { 0 };
        Ok(Backends { backend, kinds, gpus })
    }

    /// The backend of device `d`.
    pub fn of(&self, d: usize) -> Backend {
        let gpu = |d: usize| match self.backend {
            Some(BackendArg::Cpu) => false,
            Some(BackendArg::Cuda) => true,
            None => self.kinds.get(d).is_some_and(|k| k.0),
        };
        if !gpu(d) || self.gpus == 0 {
            return Backend::Cpu;
        }
        // GPU devices are dealt out over the GPUs present, in device order.
        let rank = (0..d).filter(|&i| gpu(i)).count();
        Backend::Cuda { ordinal: rank % self.gpus, memory: self.kinds.get(d).and_then(|k| k.1) }
    }

    /// The backends of devices `0..n`.
    pub fn all(&self, n: usize) -> Vec<Backend> {
        (0..n).map(|d| self.of(d)).collect()
    }
}

/// The GPUs present when CUDA can be used (driver, NVRTC, cuBLAS), else why not.
pub fn cuda_ready() -> Result<Vec<shardplan_runtime::backend::cuda::driver::Gpu>, Failure> {
    shardplan_runtime::backend::cuda::exec::ready()
        .map_err(|e| fail("run::no_cuda", e, "docs/cuda.md lists what a GPU run needs; `shardplan selftest --backend cuda` checks a machine's setup"))
}

fn parse_fault(s: &str) -> Result<(usize, u64), String> {
    let mut device = None;
    let mut step = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("device", v)) => device = Some(v.trim().trim_start_matches("cpu").parse::<usize>().map_err(|e| format!("device `{v}`: {e}"))?),
            Some(("step", v)) => step = Some(v.trim().parse::<u64>().map_err(|e| format!("step `{v}`: {e}"))?),
            _ => return Err(format!("`{part}` is not `device=D` or `step=S`")),
        }
    }
    match (device, step) {
        (Some(d), Some(s)) if s >= 1 => Ok((d, s)),
        (Some(_), Some(_)) => Err("steps count from 1".into()),
        _ => Err("give both `device=D` and `step=S`".into()),
    }
}

/// One device, or a cluster of devices running a partitioned plan.
enum Trainer {
    Single(Box<dyn Engine>),
    Multi(Box<Cluster>),
}

/// A failure that is not a diagnostic of the plan itself.
pub struct Failure {
    code: &'static str,
    pub message: String,
    pub help: String,
}

pub fn fail(code: &'static str, message: impl Into<String>, help: impl Into<String>) -> Failure {
    Failure { code, message: message.into(), help: help.into() }
}

pub fn run(args: &RunArgs, color: bool) -> ExitCode {
    // A compiled plan (`shardplan compile`) brings its source, the directory
    // its data paths are relative to, and its device programs.
    let compiled = args.file.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let (mut c, plan_text, name, base, plan) = if compiled {
        let Some(p) = compile::load(&args.file, color) else { return ExitCode::from(1) };
        (p.checked, p.source.into_bytes(), p.source_name, p.base, Some(p.plan))
    } else {
        let Some(c) = check::load(&args.file, color) else { return ExitCode::from(1) };
        let plan_text = std::fs::read(&args.file).unwrap_or_default();
        let base = args.file.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        (c, plan_text, args.file.display().to_string(), base, None)
    };
    if let Some(s) = args.seed {
        c.train.seed = s;
    }
    match (args.steps, args.epochs) {
        (Some(s), _) => c.train.length = Length::Steps(s as i64),
        (_, Some(e)) => c.train.length = Length::Epochs(e as i64),
        _ => {}
    }
    match train(args, &c, &plan_text, &base, plan) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Data(mut e)) => {
            if compiled && e.code == "data::missing_file" {
                e.help = compile::missing_data_help(&base);
            }
            report_data_error(&e, &name, &plan_text, &c, color);
            ExitCode::from(1)
        }
        Err(Error::Diag(d)) => {
            let sources = Sources::new(&name, String::from_utf8_lossy(&plan_text).into_owned());
            eprint!("{}", render::human(&d, &sources, color));
            ExitCode::from(1)
        }
        Err(Error::Other(f)) => {
            let sources = Sources::new(&name, String::from_utf8_lossy(&plan_text).into_owned());
            let d = Diagnostic::error(f.code, f.message).help(f.help);
            eprint!("{}", render::human(&d, &sources, color));
            ExitCode::from(1)
        }
    }
}

enum Error {
    Data(Box<DataError>),
    Other(Failure),
    /// A diagnostic of the plan (with its locations).
    Diag(Box<Diagnostic>),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        Error::Other(f)
    }
}

/// Renders a data error with the data file's line when there is one.
fn report_data_error(e: &DataError, plan: &str, plan_text: &[u8], c: &Checked, color: bool) {
    let mut sources = Sources::new(plan, String::from_utf8_lossy(plan_text).into_owned());
    let mut d = Diagnostic::error(e.code, e.message.clone()).help(e.help.clone());
    let text = e.span.and_then(|_| std::fs::read(&e.path).ok()).map(|b| String::from_utf8_lossy(&b).into_owned());
    match (e.span, text) {
        (Some((a, b)), Some(text)) if b <= text.len() => {
            let id = sources.add(&e.path.display().to_string(), text);
            let what = match (&e.line, &e.column) {
                (Some(l), Some(col)) => format!("line {l}, column `{col}`"),
                (Some(l), None) => format!("line {l}"),
                _ => "here".to_string(),
            };
            d = d.label(Span::new(id, a, b.max(a)), what);
        }
        _ => {}
    }
    // Also point at the data source in the plan.
    d = d.label(c.data.span, "the data source");
    let shown = e.path.display().to_string();
    if d.labels.first().is_some_and(|l| l.span.src == SourceId::USER) && !shown.is_empty() && !d.message.contains(&shown) {
        d.message = format!("{} ({})", d.message, e.path.display());
    }
    eprint!("{}", render::human(&d, &sources, color));
}

/// The number of classes of the model's cross-entropy, if it has one.
fn classes(c: &Checked) -> Option<usize> {
    c.model.trace.iter().find_map(|t| match t.prim {
        Prim::CrossEntropy => t.args.first().and_then(|a| c.model.trace[a.0 as usize].ty.shape.last()).map(|d| d.size as usize),
        _ => None,
    })
}

/// The logits node of a forward graph (the cross-entropy's first operand).
fn logits(g: &graph::Graph) -> Option<NodeId> {
    g.ids().find(|&id| g.node(id).op == Op::CrossEntropy).and_then(|id| g.args(id).first().copied())
}

/// The training split, its sampler and the run's length in steps.
struct TrainingData {
    splits: data::Splits,
    sampler: Sampler,
    batch: usize,
    per_epoch: u64,
    total: u64,
}

/// Loads the plan's data (paths relative to `base`) and sizes the run.
fn training_data(c: &Checked, base: &Path) -> Result<TrainingData, Error> {
    let seq = c.train.dims.get("seq").map(|&s| s as usize);
    let splits = data::load(&c.data.source, base, seq, classes(c)).map_err(|e| Error::Data(Box::new(e)))?;
    let batch = c.train.batch as usize;
    let sampler = Sampler::new(splits.train.len(), batch, c.train.shuffle, c.train.seed);
    let per_epoch = sampler.batches_per_epoch() as u64;
    if per_epoch == 0 {
        return Err(fail(
            "run::batch_too_large",
            format!("the training split has {} samples, fewer than one batch of {batch}", splits.train.len()),
            "lower `batch` in the train section, or train on more data",
        )
        .into());
    }
    let total = match c.train.length {
        Length::Epochs(e) => e as u64 * per_epoch,
        Length::Steps(s) => s as u64,
    };
    Ok(TrainingData { splits, sampler, batch, per_epoch, total })
}

/// The learning rate and Adam's bias corrections of step `step` (from 0).
fn hypers(c: &Checked, step: u64, total: u64) -> Hypers {
    let (b1, b2) = match c.train.optimizer {
        Optimizer::Adam { beta1, beta2, .. } => (beta1, beta2),
        Optimizer::Sgd { .. } => (0.0, 0.0),
    };
    let t = (step + 1) as i32;
    Hypers { lr: learning_rate(c, step, total), bias_correction1: 1.0 / (1.0 - b1.powi(t)), bias_correction2: 1.0 / (1.0 - b2.powi(t)).sqrt() }
}

/// Trains `c` (whose file's text is `plan_text`, with data paths relative to
/// `base`) on the devices of `plan` when one is given (a compiled plan),
/// else on those its placement partitions into, or on one device.
fn train(args: &RunArgs, c: &Checked, plan_text: &[u8], base: &Path, plan: Option<partition::Plan>) -> Result<(), Error> {
    let t0 = Instant::now();
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
    let backends = Backends::new(args.backend, c)?;
    let TrainingData { splits, sampler, batch, per_epoch, total } = training_data(c, base)?;
    let end = args.stop_after.map(|s| s.min(total)).unwrap_or(total);

    // Compile the training step.
    let g = autodiff::differentiate(graph::build(c), c);
    g.verify()
        .map_err(|e| fail("run::internal", format!("the training graph is malformed: {e}"), "this is a bug in shardplan; please report it with the plan"))?;
    let states: Vec<(String, Vec<usize>)> = g.states.iter().map(|s| (s.name.clone(), s.ty.shape.iter().map(|d| d.size as usize).collect())).collect();
    let single = |program| {
        let backend = backends.of(0);
        let mut exec = exec::engine(&backend, program, threads, 1).map_err(|e| match backend {
            Backend::Cpu => {
                fail("run::compile", format!("cannot compile the training step: {e}"), "this is a bug in shardplan; please report it with the plan")
            }
            Backend::Cuda { ordinal, .. } => fail(
                "run::gpu",
                format!("cannot set up the training step on GPU {ordinal}: {}", gpu_message(e)),
                "`shardplan selftest --backend cuda` checks every kernel on this GPU against the CPU",
            ),
        })?;
        if args.profile {
            exec.enable_profile();
        }
        Ok::<Trainer, Failure>(Trainer::Single(exec))
    };
    let start_cluster = |plan: partition::Plan| {
        let on = backends.all(plan.devices.len());
        Cluster::start_on(plan, threads, std::time::Duration::from_secs(60), on)
    };
    let mut auto_choice: Option<partition::auto::Candidate> = None;
    let mut trainer = match (plan, &c.placement) {
        // A compiled plan without a mesh (no placement) is one device's step.
        (Some(plan), _) if !args.single_device && plan.mesh.axes.is_empty() => match plan.devices.into_iter().next() {
            Some(d) => single(d.program)?,
            None => single(lower(&g))?,
        },
        (Some(plan), _) if !args.single_device => {
            if let Some(d) = partition::memory::check(c, &plan) {
                return Err(Error::Diag(Box::new(d)));
            }
            Trainer::Multi(Box::new(start_cluster(plan)))
        }
        (None, Placement::Auto { .. }) if !args.single_device => {
            let prof = super::auto::profile(args.device_profile.as_deref())
                .map_err(|e| fail("run::device_profile", e, "write one with `shardplan calibrate -o FILE`"))?;
            let (found, _) = super::auto::search(c, &g, &prof);
            let Some(best) = found.chosen.map(|i| found.candidates[i].clone()) else {
                return Err(fail(
                    "placement::no_fit",
                    "no placement of the model over these devices fits the memory budget",
                    "`shardplan inspect FILE --explain` lists the closest candidates; raise the budget or add devices",
                )
                .into());
            };
            let mut placed = c.clone();
            placed.placement = Placement::Explicit(partition::auto::explicit(c, &best));
            let plan = partition::partition(&placed, &g)
                .map_err(|e| fail("run::placement", format!("cannot partition the chosen plan: {e}"), "this is a bug in shardplan"))?;
            partition::verify::verify(&plan)
                .map_err(|e| fail("run::verify", format!("the device programs do not fit together: {e}"), "this is a bug in shardplan"))?;
            auto_choice = Some(best);
            Trainer::Multi(Box::new(start_cluster(plan)))
        }
        (None, Placement::Explicit(_)) if !args.single_device => {
            let plan = partition::partition(c, &g).map_err(|e| {
                fail("run::placement", format!("cannot partition the plan: {e}"), "change the placement; `shardplan check` shows what it holds")
            })?;
            partition::verify::verify(&plan).map_err(|e| {
                fail("run::verify", format!("the device programs do not fit together: {e}"), "this is a bug in shardplan; please report it with the plan")
            })?;
            if let Some(d) = partition::memory::check(c, &plan) {
                return Err(Error::Diag(Box::new(d)));
            }
            Trainer::Multi(Box::new(start_cluster(plan)))
        }
        _ => single(lower(&g))?,
    };

    // Parameters: initialised, loaded, or resumed.
    let shapes: Vec<(String, Vec<usize>)> = c.model.params.iter().map(|p| (p.path.clone(), p.ty.shape.iter().map(|d| d.size as usize).collect())).collect();
    let mut params: Vec<Vec<f32>> = c.model.params.iter().enumerate().map(|(i, p)| init(&p.init, &shapes[i].1, c.train.seed, i as u64)).collect();
    let mut state_vals: Vec<Vec<f32>> = states.iter().map(|(_, s)| vec![0.0; s.iter().product()]).collect();
    let mut start = 0u64;
    let ck = |e: checkpoint::CheckpointError| fail(e.code(), e.to_string(), e.help());
    if let Some(path) = &args.init {
        let (found, _) = checkpoint::load(path).map_err(ck)?;
        let found = checkpoint::select(path, found, &shapes).map_err(ck)?;
        params = found.into_iter().map(|t| t.data).collect();
    }
    if let Some(path) = &args.resume {
        let (found, meta) = checkpoint::load(path).map_err(ck)?;
        let mut expected = shapes.clone();
        expected.extend(states.iter().cloned());
        let found = checkpoint::select(path, found, &expected).map_err(ck)?;
        let mut it = found.into_iter();
        params = it.by_ref().take(shapes.len()).map(|t| t.data).collect();
        state_vals = it.map(|t| t.data).collect();
        start = checkpoint::meta_parse(path, &meta, "step").map_err(ck)?;
        let seed: u64 = checkpoint::meta_parse(path, &meta, "seed").map_err(ck)?;
        if args.seed.is_none() && seed != c.train.seed {
            return Err(fail(
                "run::resume_seed",
                format!("the checkpoint was trained with seed {seed}, the plan says {}", c.train.seed),
                format!("resume with `--seed {seed}` to continue the same run"),
            )
            .into());
        }
    }
    let kernel_err =
        |e: shardplan_runtime::backend::cpu::KernelError| fail("run::kernel", e.to_string(), "check the data: an index or label is outside the model's range");
    let device_err = |e: String| fail("run::device", e, "the other devices were stopped; nothing was saved");
    if let Some((d, _)) = args.inject_fault {
        let n = match &trainer {
            Trainer::Multi(cl) => cl.plan().devices.len(),
            Trainer::Single(_) => 1,
        };
        if d >= n {
            return Err(fail(
                "run::inject_fault",
                format!("--inject-fault names device {d}, but the run has {n} device(s)"),
                format!("name a device from 0 to {}", n - 1),
            )
            .into());
        }
    }
    match &mut trainer {
        Trainer::Single(exec) => {
            for (i, p) in params.iter().enumerate() {
                exec.set(&BufKind::Param(i), Data::F32(p)).map_err(kernel_err)?;
            }
            for (i, s) in state_vals.iter().enumerate() {
                exec.set(&BufKind::State(i), Data::F32(s)).map_err(kernel_err)?;
            }
        }
        Trainer::Multi(cl) => cl.load(&params, &state_vals).map_err(device_err)?,
    }

    // The loop.
    let pb = if args.quiet { ProgressBar::hidden() } else { ProgressBar::with_draw_target(Some(end), ProgressDrawTarget::stderr()) };
    pb.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb.set_position(start);
    // Metrics are JSON lines, or CSV when the file is named `*.csv`.
    let csv = args.metrics.as_ref().and_then(|p| p.extension()).is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let mut metrics = match &args.metrics {
        Some(p) => Some(
            AtomicFile::create(p)
                .map_err(|e| fail("run::metrics", format!("cannot write `{}`: {e}", p.display()), "check the directory exists and is writable"))?,
        ),
        None => None,
    };
    if let (true, Some(m)) = (csv, metrics.as_mut()) {
        m.line("step,epoch,loss,lr,samples_per_s,wall_s").map_err(|e| fail("run::metrics", format!("cannot write metrics: {e}"), "check the disk"))?;
    }
    let loop_start = Instant::now();
    // Per device: seconds computing, seconds communicating, buffer bytes.
    let mut device_totals: Vec<(f64, f64, u64)> = Vec::new();
    let mut last_loss = f32::NAN;
    let mut recent: Vec<f32> = Vec::new();
    let mut epoch_order: Option<(u64, Vec<Vec<usize>>)> = None;
    // Each step's wall time: the reported step time is their median, so the
    // first steps (page faults, threads starting) do not weigh on it.
    let mut step_times: Vec<f64> = Vec::new();
    for step in start..end {
        let epoch = step / per_epoch;
        if epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            epoch_order = Some((epoch, sampler.epoch(epoch)));
        }
        let rows = &epoch_order.as_ref().map(|(_, o)| o[(step % per_epoch) as usize].clone()).unwrap_or_default();
        let h = hypers(c, step, total);
        let lr = h.lr;
        let hyper = move |x: Hyper| h.get(x);
        let step_start = Instant::now();
        let loss = match &mut trainer {
            Trainer::Single(exec) => {
                set_batch(exec.as_mut(), &splits.train.gather(rows)).map_err(kernel_err)?;
                exec.step(&hyper).map_err(kernel_err)?
            }
            Trainer::Multi(cl) => {
                let fault = args.inject_fault.filter(|f| f.1 == step + 1).map(|f| f.0);
                match cl.step(step, h, rows, &|r| splits.train.gather(r), fault) {
                    Ok(l) => l as f32,
                    Err(e) => {
                        pb.abandon();
                        return Err(device_err(e).into());
                    }
                }
            }
        };
        if !loss.is_finite() {
            pb.abandon();
            return Err(fail(
                "run::diverged",
                format!("the loss became {loss} at step {}", step + 1),
                "lower the learning rate, or clip gradients with `clip_grad_norm: 1.0`",
            )
            .into());
        }
        last_loss = loss;
        recent.push(loss);
        if recent.len() > per_epoch.min(50) as usize {
            recent.remove(0);
        }
        let elapsed = loop_start.elapsed().as_secs_f64();
        let sps = ((step + 1 - start) as f64 * batch as f64) / elapsed.max(1e-9);
        let step_s = step_start.elapsed().as_secs_f64();
        step_times.push(step_s);
        if let Trainer::Multi(cl) = &trainer {
            device_totals.resize(cl.stats().len(), (0.0, 0.0, 0));
            for (acc, st) in device_totals.iter_mut().zip(cl.stats()) {
                acc.0 += st.busy_s;
                acc.1 += st.comm_s;
                acc.2 = st.bytes;
            }
        }
        if let Some(m) = metrics.as_mut() {
            let wall = t0.elapsed().as_secs_f64();
            let line = if csv {
                format!("{},{},{loss},{lr},{sps},{wall}", step + 1, epoch + 1)
            } else {
                let mut v = serde_json::json!({
                    "step": step + 1, "epoch": epoch + 1, "loss": loss, "lr": lr, "samples_per_s": sps, "wall_s": wall,
                    "step_s": step_s, "samples_per_step_s": batch as f64 / step_s.max(1e-12),
                });
                if let Trainer::Multi(cl) = &trainer {
                    // Stages idle: 1 − (compute of all devices) / (devices × step time).
                    let st = cl.stats();
                    let busy: f64 = st.iter().map(|s| s.busy_s).sum();
                    let comm: f64 = st.iter().map(|s| s.comm_s).sum();
                    let n = st.len().max(1) as f64;
                    v["idle_fraction"] = serde_json::json!(1.0 - busy / (n * step_s.max(1e-12)));
                    v["comm_fraction"] = serde_json::json!(comm / (n * step_s.max(1e-12)));
                }
                v.to_string()
            };
            m.line(&line).map_err(|e| fail("run::metrics", format!("cannot write metrics: {e}"), "check the disk"))?;
        }
        pb.set_message(format!("epoch {} | loss {loss:.4} | {sps:.0} samples/s", epoch + 1));
        pb.inc(1);
    }
    pb.finish_and_clear();
    if let Some(m) = metrics {
        m.commit().map_err(|e| fail("run::metrics", format!("cannot write metrics: {e}"), "check the disk"))?;
    }

    // Read back the trained parameters.
    let (params, states_now): (Vec<Vec<f32>>, Vec<Vec<f32>>) = match &mut trainer {
        Trainer::Single(exec) => {
            let read = |k: BufKind| exec.get(&k).map(Option::unwrap_or_default).map_err(kernel_err);
            (
                (0..c.model.params.len()).map(|i| read(BufKind::Param(i))).collect::<Result<_, _>>()?,
                (0..states.len()).map(|i| read(BufKind::State(i))).collect::<Result<_, _>>()?,
            )
        }
        Trainer::Multi(cl) => {
            let ps: Vec<Vec<usize>> = shapes.iter().map(|s| s.1.clone()).collect();
            let ss: Vec<Vec<usize>> = states.iter().map(|s| s.1.clone()).collect();
            cl.read(&ps, &ss).map_err(device_err)?
        }
    };
    if let Some(path) = &args.save {
        let mut tensors: Vec<Tensor> = shapes.iter().zip(&params).map(|((n, s), d)| Tensor { name: n.clone(), shape: s.clone(), data: d.clone() }).collect();
        tensors.extend(states.iter().zip(&states_now).map(|((n, s), d)| Tensor { name: n.clone(), shape: s.clone(), data: d.clone() }));
        let meta: BTreeMap<String, String> = [
            ("format".to_string(), "shardplan-checkpoint-1".to_string()),
            ("model".to_string(), c.model.name.clone()),
            ("step".to_string(), end.max(start).to_string()),
            ("seed".to_string(), c.train.seed.to_string()),
        ]
        .into_iter()
        .collect();
        checkpoint::save(path, &tensors, &meta).map_err(ck)?;
    }

    // Report.
    let trained = end.saturating_sub(start);
    let secs = loop_start.elapsed().as_secs_f64();
    let mean_recent = if recent.is_empty() { last_loss } else { recent.iter().sum::<f32>() / recent.len() as f32 };
    println!(
        "{}: trained {} steps ({} epochs of {} batches) in {:.3}s, {:.0} samples/s",
        args.file.display(),
        trained,
        fmt_epochs(trained, per_epoch),
        per_epoch,
        secs,
        trained as f64 * batch as f64 / secs.max(1e-9)
    );
    println!("  train loss {mean_recent:.4} (mean of the last {} steps)", recent.len());
    if let Some(test) = &splits.test {
        let (loss, acc) = evaluate(plan_text, test, &params, threads)?;
        match acc {
            Some(a) => println!("  test  loss {loss:.4}, accuracy {:.2}% ({} samples)", a * 100.0, test.len()),
            None => println!("  test  loss {loss:.4} ({} samples)", test.len()),
        }
    }
    if let Some(p) = &args.save {
        println!("  saved {}", p.display());
    }
    if let (true, Trainer::Single(exec)) = (args.profile, &trainer) {
        print_profile(exec.as_ref(), trained);
    }
    step_times.sort_by(f64::total_cmp);
    let measured = step_times.get(step_times.len() / 2).copied().unwrap_or(f64::NAN);
    match &auto_choice {
        Some(best) => println!("  placement auto chose {}: predicted {} per step, measured {}", best.name(), ms(best.step_s()), ms(measured)),
        None => {
            let mut placed = c.clone();
            if args.single_device {
                placed.placement = Placement::Single;
            }
            let prof = super::auto::profile(args.device_profile.as_deref()).unwrap_or_else(|e| {
                eprintln!("warning[run::device_profile]: {e}; the predicted step time below uses built-in figures");
                Default::default()
            });
            // The cost model knows CPU devices only.
            let on_gpu = backends.of(0).is_cuda() || matches!(&trainer, Trainer::Multi(cl) if (0..cl.plan().devices.len()).any(|d| backends.of(d).is_cuda()));
            match partition::auto::predict(&placed, &g, &prof) {
                Some(p) if !on_gpu => println!("  step time: predicted {}, measured {}", ms(p.step_s()), ms(measured)),
                _ if on_gpu => println!("  step time: measured {}", ms(measured)),
                _ => {}
            }
        }
    }
    if let Trainer::Multi(cl) = &trainer {
        let devs: Vec<String> = device_totals
            .iter()
            .enumerate()
            .map(|(i, (busy, comm, bytes))| {
                let w = secs.max(1e-9);
                let planned = cl.plan().devices.get(i).map(|d| partition::memory::device(d).total()).unwrap_or(0);
                let dev = match backends.of(i) {
                    Backend::Cpu => format!("cpu{i}"),
                    Backend::Cuda { ordinal, .. } => format!("gpu{i} (GPU {ordinal})"),
                };
                format!(
                    "{dev} {:.1} MiB (planned {:.1} MiB), {:.0}% compute, {:.0}% transfers",
                    *bytes as f64 / (1 << 20) as f64,
                    planned as f64 / (1 << 20) as f64,
                    busy / w * 100.0,
                    comm / w * 100.0
                )
            })
            .collect();
        println!("  {} devices: {}", cl.plan().devices.len(), devs.join("; "));
    }
    Ok(())
}

/// The kernels that take the most time per step.
fn print_profile(exec: &dyn Engine, steps: u64) {
    use shardplan_compiler::kernel::StepKind;
    let p = exec.program();
    let times = exec.profile();
    let total: f64 = times.iter().sum();
    let mut rows: Vec<(f64, String)> = p
        .steps
        .iter()
        .zip(times)
        .map(|(s, t)| {
            let what = match &s.kind {
                StepKind::Fused(f) => format!("fused {} ops [{} × {}]", f.body.len(), f.rows, f.cols),
                StepKind::Op(op) => op.name(),
                StepKind::Broadcast => "broadcast".into(),
                StepKind::Reduce { op, epilogue } => format!("{} + {} ops", op.name(), epilogue.body.len()),
                StepKind::MatMul { trans_a, trans_b } => format!("matmul{}{}", if *trans_a { " Aᵀ" } else { "" }, if *trans_b { " Bᵀ" } else { "" }),
            };
            let ins: Vec<String> = s.inputs.iter().map(|b| format!("{:?}", p.buffers[b.0 as usize].shape)).collect();
            (*t, format!("{what} {} → {:?}", ins.join(" "), p.buffers[s.output.0 as usize].shape))
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let n = steps.max(1) as f64;
    // Totals by kind of kernel (the text before the shapes).
    let mut kinds: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (t, what) in &rows {
        let kind = what.split(" [").next().unwrap_or(what).split(" ops").next().unwrap_or(what).to_string();
        let e = kinds.entry(kind).or_default();
        e.0 += t;
        e.1 += 1;
    }
    let mut kinds: Vec<(String, (f64, usize))> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    println!("  profile: {:.2} ms per step in {} kernels", total / n * 1e3, p.steps.len());
    println!("  by kind:");
    for (kind, (t, count)) in kinds.iter().take(12) {
        println!("    {:7.3} ms {:5.1}%  {kind} (×{count})", t / n * 1e3, 100.0 * t / total.max(1e-12));
    }
    println!("  slowest kernels:");
    for (t, what) in rows.iter().take(15) {
        println!("    {:7.3} ms {:5.1}%  {what}", t / n * 1e3, 100.0 * t / total.max(1e-12));
    }
}

fn fmt_epochs(steps: u64, per_epoch: u64) -> String {
    let e = steps as f64 / per_epoch as f64;
    if e.fract() == 0.0 {
        format!("{e:.0}")
    } else {
        format!("{e:.2}")
    }
}

fn set_batch(exec: &mut dyn Engine, b: &Batch) -> Result<(), shardplan_runtime::backend::cpu::KernelError> {
    match b {
        Batch::Table { features, labels } => {
            exec.set(&BufKind::Input(0), Data::F32(features))?;
            exec.set(&BufKind::Input(1), Data::I32(labels))
        }
        Batch::Text { tokens, targets } => {
            exec.set(&BufKind::Input(0), Data::I32(tokens))?;
            exec.set(&BufKind::Input(1), Data::I32(targets))
        }
    }
}

/// Mean loss and (for classifiers) accuracy over the whole split.
fn evaluate(plan_text: &[u8], test: &Dataset, params: &[Vec<f32>], threads: usize) -> Result<(f32, Option<f64>), Error> {
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
            let (ce, _) = shardplan_compiler::check_source_placed(plan_text, &overrides, false);
            let ce = ce.ok_or_else(|| {
                fail("run::internal", "the plan does not check at the evaluation batch size", "this is a bug in shardplan; please report it with the plan")
            })?;
            let g = graph::build(&ce);
            let keep: Vec<NodeId> = logits(&g).into_iter().collect();
            let (p, kept) = lower_keeping(&g, &keep);
            let mut exec = Executor::new(p, threads).map_err(|e| fail("run::compile", e.to_string(), "this is a bug in shardplan"))?;
            for (i, v) in params.iter().enumerate() {
                exec.set(&BufKind::Param(i), Data::F32(v)).map_err(|e| fail("run::kernel", e.to_string(), "this is a bug in shardplan"))?;
            }
            slot.insert((exec, kept.first().copied()));
        }
        let Some((exec, logits_buf)) = programs.get_mut(&size) else { break };
        let rows: Vec<usize> = (start..start + size).collect();
        let b = test.gather(&rows);
        set_batch(exec, &b).map_err(|e| fail("run::kernel", e.to_string(), "check the data"))?;
        let loss = exec.step(&|_| 0.0).map_err(|e| fail("run::kernel", e.to_string(), "check the data: an index or label is outside the model's range"))?;
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
    let acc = (classifier && counted > 0).then(|| correct as f64 / counted as f64);
    Ok(((total_loss / n.max(1) as f64) as f32, acc))
}

/// The learning rate of `step` (0-based) out of `total`.
fn learning_rate(c: &Checked, step: u64, total: u64) -> f64 {
    let base = match c.train.optimizer {
        Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } => lr,
    };
    let t = step as f64;
    match c.train.lr_schedule {
        LrSchedule::Constant => base,
        LrSchedule::Warmup { steps } => base * ((t + 1.0) / steps as f64).min(1.0),
        LrSchedule::Cosine { warmup, min_lr } => {
            if (step as i64) < warmup {
                base * (t + 1.0) / warmup as f64
            } else {
                let span = (total as f64 - warmup as f64).max(1.0);
                let progress = ((t - warmup as f64) / span).clamp(0.0, 1.0);
                min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// Initial values of a parameter, from its own seeded stream (so adding a
/// parameter does not change the others).
fn init(init: &Init, shape: &[usize], seed: u64, index: u64) -> Vec<f32> {
    const DOMAIN_INIT: u64 = 0x1417;
    let n: usize = shape.iter().product();
    let mut rng = Xoshiro256::stream(seed, DOMAIN_INIT, index);
    let (fan_in, fan_out) = match shape {
        [] => (1.0, 1.0),
        [d] => (*d as f64, *d as f64),
        [.., i, o] => (*i as f64, *o as f64),
    };
    match *init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Constant(v) => vec![v as f32; n],
        Init::GlorotUniform => {
            let a = (6.0 / (fan_in + fan_out)).sqrt();
            (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * a) as f32).collect()
        }
        Init::GlorotNormal => {
            let s = (2.0 / (fan_in + fan_out)).sqrt();
            (0..n).map(|_| (rng.normal() * s) as f32).collect()
        }
        Init::Normal { mean, std } => (0..n).map(|_| (mean + rng.normal() * std) as f32).collect(),
        Init::Uniform { low, high } => (0..n).map(|_| (low + rng.uniform() * (high - low)) as f32).collect(),
    }
}

/// A file written to a temporary name and renamed into place when complete.
struct AtomicFile {
    tmp: PathBuf,
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl AtomicFile {
    fn create(path: &Path) -> std::io::Result<AtomicFile> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "metrics".into());
        let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
        let out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        Ok(AtomicFile { tmp, path: path.to_path_buf(), out })
    }

    fn line(&mut self, s: &str) -> std::io::Result<()> {
        writeln!(self.out, "{s}")
    }

    fn commit(mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // After a commit the temporary name no longer exists; otherwise the
        // partial file is removed and the destination is left untouched.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// A GPU executor's error as its message (its errors are not malformed kernel calls).
fn gpu_message(e: shardplan_runtime::backend::cpu::KernelError) -> String {
    match e {
        shardplan_runtime::backend::cpu::KernelError::Invalid(m) => m,
        other => other.to_string(),
    }
}

const GPU_HELP: &str = "`shardplan selftest --backend cuda` checks every kernel on this GPU against the CPU";

/// What verify runs against one CPU device: one engine, or a cluster.
enum Placed {
    One(Box<dyn Engine>),
    Many(Box<Cluster>),
}

impl Placed {
    fn load(&mut self, params: &[Vec<f32>], states: &[Vec<f32>]) -> Result<(), String> {
        match self {
            Placed::Many(cl) => cl.load(params, states),
            Placed::One(e) => {
                for (i, p) in params.iter().enumerate() {
                    e.set(&BufKind::Param(i), Data::F32(p)).map_err(|e| e.to_string())?;
                }
                for (i, s) in states.iter().enumerate() {
                    e.set(&BufKind::State(i), Data::F32(s)).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
        }
    }

    fn step(&mut self, step: u64, h: Hypers, rows: &[usize], batch: &dyn Fn(&[usize]) -> Batch) -> Result<f64, String> {
        match self {
            Placed::Many(cl) => cl.step(step, h, rows, batch, None),
            Placed::One(e) => {
                set_batch(e.as_mut(), &batch(rows)).map_err(|e| e.to_string())?;
                e.step(&move |x: Hyper| h.get(x)).map(f64::from).map_err(|e| e.to_string())
            }
        }
    }

    fn read(&mut self, shapes: &[Vec<usize>], state_shapes: &[Vec<usize>]) -> Result<shardplan_runtime::cluster::Tensors, String> {
        match self {
            Placed::Many(cl) => cl.read(shapes, state_shapes),
            Placed::One(e) => {
                let read = |k: BufKind| e.get(&k).map(Option::unwrap_or_default).map_err(|e| e.to_string());
                let params = (0..shapes.len()).map(|i| read(BufKind::Param(i))).collect::<Result<_, _>>()?;
                let states = (0..state_shapes.len()).map(|i| read(BufKind::State(i))).collect::<Result<_, _>>()?;
                Ok((params, states))
            }
        }
    }
}

/// Options of `shardplan verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The plan file.
    pub file: PathBuf,
    /// Training steps to compare.
    #[arg(long, default_value_t = 10)]
    pub steps: u64,
    /// Largest relative difference of a step's loss.
    #[arg(long, default_value_t = 1e-5)]
    pub loss_tolerance: f64,
    /// Largest difference of a parameter tensor, ‖a − b‖ / ‖a‖.
    #[arg(long, default_value_t = 1e-4)]
    pub param_tolerance: f64,
    /// Threads for kernels (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Verify at a reduced size: bind a symbolic dim of the plan (`batch`,
    /// `seq`, …) to another value, e.g. `--set batch=8 --set seq=16`.
    #[arg(long = "set", value_name = "DIM=N", value_parser = parse_set)]
    pub set: Vec<(String, i64)>,
    /// Run the placed plan's devices on this backend (default: each device on
    /// its kind in the plan); the reference is always one CPU device. With
    /// `cuda`, a plan without placement is compared on one GPU.
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
}

fn parse_set(s: &str) -> Result<(String, i64), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not DIM=N"))?;
    let n: i64 = v.trim().parse().map_err(|e| format!("`{v}`: {e}"))?;
    if n < 1 {
        return Err(format!("{k} must be at least 1"));
    }
    Ok((k.trim().to_string(), n))
}

/// `shardplan verify FILE`: the placed plan against one device, step by step.
pub fn verify(args: &VerifyArgs, color: bool) -> ExitCode {
    let Some(c) = check::load(&args.file, color) else { return ExitCode::from(1) };
    let plan_text = std::fs::read(&args.file).unwrap_or_default();
    let overrides: BTreeMap<String, i64> = args.set.iter().cloned().collect();
    let c = if overrides.is_empty() {
        c
    } else {
        let (reduced, diags) = shardplan_compiler::check_source_with(&plan_text, &overrides);
        let errors: Vec<&Diagnostic> = diags.iter().filter(|d| d.is_error()).collect();
        match reduced {
            Some(mut r) if errors.is_empty() => {
                // The train section keeps the sizes written; the run uses the reduced ones.
                for (k, v) in &overrides {
                    if k == "batch" {
                        r.train.batch = *v;
                    }
                    r.train.dims.insert(k.clone(), *v);
                }
                r
            }
            _ => {
                let sources = Sources::new(&args.file.display().to_string(), String::from_utf8_lossy(&plan_text).into_owned());
                for d in errors {
                    eprint!("{}", render::human(d, &sources, color));
                }
                eprintln!("the plan does not check at the reduced sizes given with --set");
                return ExitCode::from(1);
            }
        }
    };
    let base = args.file.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
    match compare(args, &c, &plan_text, &base) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Error::Data(e)) => {
            report_data_error(&e, &args.file.display().to_string(), &plan_text, &c, color);
            ExitCode::from(1)
        }
        Err(Error::Diag(d)) => {
            let sources = Sources::new(&args.file.display().to_string(), String::from_utf8_lossy(&plan_text).into_owned());
            eprint!("{}", render::human(&d, &sources, color));
            ExitCode::from(1)
        }
        Err(Error::Other(f)) => {
            let sources = Sources::new(&args.file.display().to_string(), String::from_utf8_lossy(&plan_text).into_owned());
            let d = Diagnostic::error(f.code, f.message).help(f.help);
            eprint!("{}", render::human(&d, &sources, color));
            ExitCode::from(1)
        }
    }
}

fn compare(args: &VerifyArgs, c: &Checked, plan_text: &[u8], base: &Path) -> Result<bool, Error> {
    let name = args.file.display().to_string();
    let backends = Backends::new(args.backend, c)?;
    let one_gpu = matches!(c.placement, Placement::Single) && backends.of(0).is_cuda();
    if matches!(c.placement, Placement::Single) && !one_gpu {
        println!("{name}: the plan runs on one device; there is nothing to compare");
        return Ok(true);
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
    let overrides: BTreeMap<String, i64> = args.set.iter().cloned().collect();
    let (single, _) = shardplan_compiler::check_source_placed(plan_text, &overrides, false);
    let single = single.ok_or_else(|| fail("run::internal", "the plan does not check without its placement", "this is a bug in shardplan"))?;
    let TrainingData { splits, sampler, per_epoch, total, .. } = training_data(c, base)?;
    let internal = |m: String| fail("run::internal", m, "this is a bug in shardplan; please report it with the plan");
    let g = autodiff::differentiate(graph::build(c), c);
    let g1 = autodiff::differentiate(graph::build(&single), &single);
    // `placement auto` is verified as the plan it chooses.
    let chosen;
    let c = match &c.placement {
        Placement::Auto { .. } => {
            let prof = super::auto::profile(None).map_err(|e| fail("run::device_profile", e, "write one with `shardplan calibrate -o FILE`"))?;
            let (found, _) = super::auto::search(c, &g, &prof);
            let best = found.chosen.map(|i| found.candidates[i].clone()).ok_or_else(|| {
                fail(
                    "placement::no_fit",
                    "no placement of the model over these devices fits the memory budget",
                    "`shardplan inspect FILE --explain` lists the closest candidates",
                )
            })?;
            let mut placed = c.clone();
            placed.placement = Placement::Explicit(partition::auto::explicit(c, &best));
            chosen = placed;
            &chosen
        }
        _ => c,
    };
    let (mut cluster, devices, mesh) = if one_gpu {
        let backend = backends.of(0);
        let engine = exec::engine(&backend, lower(&g), threads, 1)
            .map_err(|e| fail("run::gpu", format!("cannot set up the training step on the GPU: {}", gpu_message(e)), GPU_HELP))?;
        (Placed::One(engine), 1, vec!["gpu".to_string()])
    } else {
        let plan = partition::partition(c, &g).map_err(|e| fail("run::placement", format!("cannot partition the plan: {e}"), "change the placement"))?;
        partition::verify::verify(&plan)
            .map_err(|e| fail("run::verify", format!("the device programs do not fit together: {e}"), "this is a bug in shardplan"))?;
        if let Some(d) = partition::memory::check(c, &plan) {
            return Err(Error::Diag(Box::new(d)));
        }
        let devices = plan.devices.len();
        let mesh: Vec<String> = plan.mesh.axes.iter().map(|(n, s)| format!("{n} {s}")).collect();
        let on = backends.all(devices);
        (Placed::Many(Box::new(Cluster::start_on(plan, threads, std::time::Duration::from_secs(60), on))), devices, mesh)
    };
    let mut exec = Executor::new(lower(&g1), threads).map_err(|e| internal(e.to_string()))?;
    let kinds: Vec<&str> = (0..devices).map(|d| if backends.of(d).is_cuda() { "gpu" } else { "cpu" }).collect();
    let kinds = if kinds.iter().all(|k| *k == "cpu") { String::new() } else { format!(" [{}]", kinds.join(", ")) };
    let shapes: Vec<Vec<usize>> = c.model.params.iter().map(|p| p.ty.shape.iter().map(|d| d.size as usize).collect()).collect();
    let state_shapes: Vec<Vec<usize>> = g.states.iter().map(|s| s.ty.shape.iter().map(|d| d.size as usize).collect()).collect();
    let params: Vec<Vec<f32>> = c.model.params.iter().enumerate().map(|(i, p)| init(&p.init, &shapes[i], c.train.seed, i as u64)).collect();
    let states: Vec<Vec<f32>> = state_shapes.iter().map(|s| vec![0.0; s.iter().product()]).collect();
    let kernel_err = |e: shardplan_runtime::backend::cpu::KernelError| fail("run::kernel", e.to_string(), "check the data");
    let device_err = |e: String| fail("run::device", e, "the other devices were stopped");
    for (i, p) in params.iter().enumerate() {
        exec.set(&BufKind::Param(i), Data::F32(p)).map_err(kernel_err)?;
    }
    cluster.load(&params, &states).map_err(device_err)?;
    println!("{name}: {devices} devices{kinds} (mesh {}), {} steps against one CPU device", mesh.join(" × "), args.steps);
    println!("  {:>5}  {:>14}  {:>14}  {:>10}", "step", "loss, 1 device", "loss, placed", "rel. diff");
    let mut worst_loss = 0.0f64;
    let mut order: Option<(u64, Vec<Vec<usize>>)> = None;
    for step in 0..args.steps {
        let epoch = step / per_epoch;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((epoch, sampler.epoch(epoch)));
        }
        let rows = order.as_ref().map(|(_, o)| o[(step % per_epoch) as usize].clone()).unwrap_or_default();
        let h = hypers(c, step, total);
        let hyper = move |x: Hyper| h.get(x);
        set_batch(&mut exec, &splits.train.gather(&rows)).map_err(kernel_err)?;
        let one = exec.step(&hyper).map_err(kernel_err)? as f64;
        let placed = cluster.step(step, h, &rows, &|r| splits.train.gather(r)).map_err(device_err)?;
        let rel = (one - placed).abs() / one.abs().max(1e-12);
        worst_loss = worst_loss.max(if rel.is_nan() { f64::INFINITY } else { rel });
        println!("  {:>5}  {one:>14.7}  {placed:>14.7}  {rel:>10.2e}", step + 1);
    }
    let (placed_params, _) = cluster.read(&shapes, &state_shapes).map_err(device_err)?;
    let mut worst_param = (0.0f64, String::new());
    for (i, p) in c.model.params.iter().enumerate() {
        let a = exec.get(&BufKind::Param(i)).unwrap_or_default();
        let b = &placed_params[i];
        // Norm-wise: ‖a − b‖ / ‖a‖ (one near-zero gradient whose sign
        // reassociation flips moves one Adam update, not the tensor).
        let norm = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
        let diff = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt() / norm;
        let diff = if a.len() != b.len() { f64::INFINITY } else { diff };
        if diff > worst_param.0 || worst_param.1.is_empty() {
            worst_param = (diff, p.path.clone());
        }
    }
    println!("  largest loss difference: {worst_loss:.2e} relative (tolerance {:.0e})", args.loss_tolerance);
    println!("  largest parameter difference: {:.2e} relative, in {} (tolerance {:.0e})", worst_param.0, worst_param.1, args.param_tolerance);
    let ok = worst_loss <= args.loss_tolerance && worst_param.0 <= args.param_tolerance;
    println!("  {}", if ok { "ok: the placement matches one device" } else { "FAILED: the placement does not match one device" });
    Ok(ok)
}
