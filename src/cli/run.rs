//! `shardplan run FILE` and `shardplan verify FILE`: the command line of a
//! training session (`shardplan_runtime::session`).
//!
//! `run` checks the plan (or reads back a plan compiled by `shardplan
//! compile`), compiles it through the driver, starts a session, shows its
//! progress, and prints the summary, the evaluation and the step time the
//! cost model predicted. `verify` runs the placed plan and one CPU device
//! side by side and compares their losses and parameters.

use super::{check, compile, ranks};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shardplan_compiler::check::{Length, Placement};
use shardplan_compiler::diag::render::{self, Sources};
use shardplan_compiler::planner::ms;
use shardplan_compiler::units::{Bytes, Unit};
use shardplan_compiler::{Checked, Compiled, Diagnostic, Diagnostics, Options, SourceId, Span};
use shardplan_runtime::cluster::Rank;
use shardplan_runtime::data::DataError;
use shardplan_runtime::engine::Backend;
use shardplan_runtime::process::{self, Launch};
use shardplan_runtime::session::{BackendChoice, Backends, Config, KernelProfile, Session, SessionError, Start};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Options of `shardplan run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The plan file, or a plan compiled by `shardplan compile` (a `.json` file).
    pub file: PathBuf,
    /// Train for this many steps (overrides the plan).
    #[arg(long, conflicts_with = "epochs", value_parser = at_least_one)]
    pub steps: Option<u64>,
    /// Train for this many epochs (overrides the plan).
    #[arg(long, value_parser = at_least_one)]
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
    /// Skip the evaluation on the test split at the end.
    #[arg(long)]
    pub no_eval: bool,
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
    /// How this process was started: `auto` looks for the variables mpirun
    /// or srun set (one process per device), `mpi` requires MPI, `none`
    /// runs every device in this process.
    #[arg(long, value_enum, default_value = "auto")]
    pub launcher: LauncherArg,
}

/// The launcher named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LauncherArg {
    Auto,
    Mpi,
    None,
}

/// The backend named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Cpu,
    Cuda,
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

/// Options of `shardplan verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// The plan file.
    pub file: PathBuf,
    /// Training steps to compare.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    pub steps: u64,
    /// Largest relative difference of a step's loss [default: 1e-5; 1e-4 for
    /// a plan with `autocast bf16`, whose roundings to bfloat16 turn the
    /// placements' different summation orders into bfloat16-sized steps]
    #[arg(long)]
    pub loss_tolerance: Option<f64>,
    /// Largest difference of a parameter tensor, ‖a − b‖ / ‖a‖ [default:
    /// 1e-4; 2e-3 with `autocast bf16`]
    #[arg(long)]
    pub param_tolerance: Option<f64>,
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

/// A count that starts at 1 (`--steps 0` would compare or train nothing).
fn at_least_one(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn choice(b: Option<BackendArg>) -> BackendChoice {
    match b {
        None => BackendChoice::Plan,
        Some(BackendArg::Cpu) => BackendChoice::Cpu,
        Some(BackendArg::Cuda) => BackendChoice::Cuda,
    }
}

fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1)
}

/// The directory a plan file's data paths are relative to.
pub(super) fn base_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What failed, for rendering: a session's error or the compiler's diagnostics.
pub(super) enum Error {
    Session(SessionError),
    Diags(Diagnostics),
}

impl From<SessionError> for Error {
    fn from(e: SessionError) -> Error {
        Error::Session(e)
    }
}

impl From<Diagnostics> for Error {
    fn from(d: Diagnostics) -> Error {
        Error::Diags(d)
    }
}

/// Prints `e` against the plan `name` (whose text is `text`) and returns exit code 1.
fn report(e: Error, name: &str, text: &[u8], c: &Checked, color: bool) -> ExitCode {
    let sources = Sources::new(name, String::from_utf8_lossy(text).into_owned());
    match e {
        Error::Session(SessionError::Data(e)) => report_data_error(&e, name, text, c, color),
        Error::Session(SessionError::Plan(d)) | Error::Diags(d) => {
            for d in d.iter().filter(|d| d.is_error()) {
                eprint!("{}", render::human(d, &sources, color));
            }
        }
        Error::Session(SessionError::Checkpoint(e)) => {
            let d = Diagnostic::error(e.code(), e.to_string()).help(e.help());
            eprint!("{}", render::human(&d, &sources, color));
        }
        Error::Session(SessionError::Failed { code, message, help }) => {
            eprint!("{}", render::human(&Diagnostic::error(code, message).help(help), &sources, color));
        }
    }
    ExitCode::from(1)
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

/// The device profile `placement auto` plans with, as compiler options.
fn options(c: &Checked, profile: Option<&Path>, single_device: bool) -> Result<Options, Error> {
    let mut o = Options { single_device, ..Default::default() };
    if matches!(c.placement, Placement::Auto { .. }) && !single_device {
        let p = super::auto::profile(profile).map_err(|e| SessionError::failed("run::device_profile", e, "write one with `shardplan calibrate -o FILE`"))?;
        o.profile = Some(p);
    }
    Ok(o)
}

pub fn run(args: &RunArgs, color: bool) -> ExitCode {
    // A compiled plan (`shardplan compile`) brings its source, the directory
    // its data paths are relative to, and its device programs.
    let compiled = args.file.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let (mut c, text, name, base, plan) = if compiled {
        let Some(p) = compile::load(&args.file, color) else { return ExitCode::from(1) };
        (p.checked, p.source.into_bytes(), p.source_name, p.base, Some(p.plan))
    } else {
        let Some(c) = check::load(&args.file, color) else { return ExitCode::from(1) };
        let text = std::fs::read(&args.file).unwrap_or_default();
        (c, text, args.file.display().to_string(), base_of(&args.file), None)
    };
    if let Some(s) = args.seed {
        c.train.seed = s;
    }
    match (args.steps, args.epochs) {
        (Some(s), _) => c.train.length = Length::Steps(s as i64),
        (_, Some(e)) => c.train.length = Length::Epochs(e as i64),
        _ => {}
    }
    let launch = match args.launcher {
        LauncherArg::None => None,
        LauncherArg::Auto => process::detect().filter(|l| l.size > 1),
        LauncherArg::Mpi => Some(process::detect().unwrap_or(Launch { launcher: "MPI", rank: 0, size: 1, local_rank: 0 })),
    };
    let ranks = match launch.map(ranks::start).transpose() {
        Ok(r) => r,
        Err(e) => return report(Error::Session(e), &name, &text, &c, color),
    };
    let rank = ranks.as_ref().map(ranks::Ranks::share);
    let result = train(args, &c, &text, &base, plan, rank);
    if let (Err(_), Some(r)) = (&result, &ranks) {
        r.quiet();
    }
    let code = match result {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Error::Session(SessionError::Data(mut e))) if compiled && e.code == "data::missing_file" => {
            e.help = compile::missing_data_help(&base);
            Error::Session(SessionError::Data(e))
        }
        Err(e) => e,
    };
    match &ranks {
        Some(r) if r.rank() > 0 => r.fail(&code),
        Some(r) => r.exit_after(report(code, &name, &text, &c, color)),
        None => report(code, &name, &text, &c, color),
    }
}

/// Compiles and trains `c` (whose file's text is `text`, with data paths
/// relative to `base`) on the devices of `plan` when one is given (a
/// compiled plan), else on those its placement partitions into.
fn train(args: &RunArgs, c: &Checked, text: &[u8], base: &Path, plan: Option<shardplan_compiler::partition::Plan>, rank: Option<Rank>) -> Result<(), Error> {
    // With one process per device, rank 0 shows the progress and the report.
    let root = rank.as_ref().is_none_or(|r| r.peers.rank() == 0);
    let backends = Backends::new(choice(args.backend), c)?;
    let compiled: Compiled = match plan {
        Some(plan) if !args.single_device => shardplan_compiler::driver::from_plan(c, plan)?,
        _ => shardplan_compiler::compile(c, &options(c, args.device_profile.as_deref(), args.single_device)?)?,
    };
    let mut cfg = Config::new(threads(args.threads), backends);
    cfg.start = match (&args.init, &args.resume) {
        (Some(p), _) => Start::Init(p.clone()),
        (_, Some(p)) => Start::Resume { path: p.clone(), seed_given: args.seed.is_some() },
        _ => Start::Fresh,
    };
    cfg.stop_after = args.stop_after;
    cfg.profile = args.profile;
    cfg.fault = args.inject_fault;
    cfg.metrics = args.metrics.clone();
    let mut session = Session::new_in(compiled, text, base, cfg, rank)?;
    for note in session.notes().iter().filter(|_| root) {
        eprintln!("note: {note}");
    }
    let (start, end, _) = session.steps();
    let pb = if args.quiet || !root { ProgressBar::hidden() } else { ProgressBar::with_draw_target(Some(end), ProgressDrawTarget::stderr()) };
    pb.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps | {msg} | ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb.set_position(start);
    let summary = session.train(&mut |r| {
        pb.set_message(format!("epoch {} | loss {:.4} | {:.0} samples/s", r.epoch, r.loss, r.samples_per_s));
        pb.inc(1);
    });
    let summary = match summary {
        Ok(s) => s,
        Err(e) => {
            pb.abandon();
            return Err(e.into());
        }
    };
    pb.finish_and_clear();
    if let Some(path) = &args.save {
        session.save(path)?;
    }
    // Every process takes part in reading the parameters back and the profiles.
    let evaluation = if args.no_eval { None } else { session.evaluate()? };
    let profiles = session.profiles()?;
    if !root {
        return Ok(());
    }

    // Report.
    let trained = summary.trained;
    println!(
        "{}: trained {} steps ({} epochs of {} batches) in {:.3}s, {:.0} samples/s",
        args.file.display(),
        trained,
        fmt_epochs(trained, summary.per_epoch),
        summary.per_epoch,
        summary.secs,
        trained as f64 * summary.batch as f64 / summary.secs.max(1e-9)
    );
    println!("  train loss {:.4} (mean of the last {} steps)", summary.mean_recent, summary.recent);
    if let Some(e) = evaluation {
        match e.accuracy {
            Some(a) => println!("  test  loss {:.4}, accuracy {:.2}% ({} samples)", e.loss, a * 100.0, e.samples),
            None => println!("  test  loss {:.4} ({} samples)", e.loss, e.samples),
        }
    }
    if let Some(p) = &args.save {
        println!("  saved {}", p.display());
    }
    let several = session.runner().devices() > 1;
    for p in profiles {
        print_profile(&p, trained, several);
    }
    let measured = summary.median_step_s;
    let chosen = session.search().and_then(|s| s.chosen.map(|i| &s.candidates[i]));
    match chosen {
        Some(best) => println!("  placement auto chose {}: predicted {} per step, measured {}", best.name(), ms(best.step_s()), ms(measured)),
        None => {
            let prof = super::auto::profile(args.device_profile.as_deref()).unwrap_or_else(|e| {
                eprintln!("warning[run::device_profile]: {e}; the predicted step time below uses built-in figures");
                Default::default()
            });
            // The cost model knows CPU devices only.
            let on_gpu = (0..session.runner().devices()).any(|d| session.backend(d).is_cuda());
            match shardplan_compiler::planner::predict(session.checked(), session.graph(), &prof) {
                Some(p) if !on_gpu => println!("  step time: predicted {}, measured {}", ms(p.step_s()), ms(measured)),
                _ if on_gpu => println!("  step time: measured {}", ms(measured)),
                _ => {}
            }
        }
    }
    if !summary.devices.is_empty() {
        let w = summary.secs.max(1e-9);
        let devs: Vec<String> = summary
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let dev = match d.backend {
                    Backend::Cpu => format!("cpu{i}"),
                    Backend::Cuda { ordinal, .. } => format!("gpu{i} (GPU {ordinal})"),
                };
                format!(
                    "{dev} {:.1} (planned {:.1}), {:.0}% compute, {:.0}% transfers",
                    Bytes(d.bytes).in_unit(Unit::MiB),
                    Bytes(d.planned).in_unit(Unit::MiB),
                    d.busy_s / w * 100.0,
                    d.comm_s / w * 100.0
                )
            })
            .collect();
        println!("  {} devices: {}", summary.devices.len(), devs.join("; "));
    }
    Ok(())
}

/// The kernels that take the most time per step, on one device.
fn print_profile(k: &KernelProfile, steps: u64, several: bool) {
    let p = k.summary(steps);
    let on = if several { format!(" on device {}", k.device) } else { String::new() };
    println!("  profile{on}: {:.2} ms per step in {} kernels", p.per_step_s * 1e3, p.kernels);
    println!("  by kind:");
    for (kind, t, share, count) in p.by_kind.iter().take(12) {
        println!("    {:7.3} ms {share:5.1}%  {kind} (×{count})", t * 1e3);
    }
    println!("  slowest kernels:");
    for (t, share, what) in p.slowest.iter().take(15) {
        println!("    {:7.3} ms {share:5.1}%  {what}", t * 1e3);
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

/// `shardplan verify FILE`: the placed plan against one device, step by step.
pub fn verify(args: &VerifyArgs, color: bool) -> ExitCode {
    let Some(c) = check::load(&args.file, color) else { return ExitCode::from(1) };
    let text = std::fs::read(&args.file).unwrap_or_default();
    let name = args.file.display().to_string();
    let overrides: BTreeMap<String, i64> = args.set.iter().cloned().collect();
    // A dimension the plan does not have would be ignored: a usage error.
    let unknown: Vec<&String> = overrides.keys().filter(|k| k.as_str() != "batch" && !c.train.dims.contains_key(k.as_str())).collect();
    if let Some(k) = unknown.first() {
        let mut dims: Vec<&str> = c.train.dims.keys().map(String::as_str).collect();
        if !dims.contains(&"batch") {
            dims.insert(0, "batch");
        }
        eprintln!(
            "error: --set {k}=…: the plan has no dimension `{k}`; its dimensions are {}",
            dims.iter().map(|d| format!("`{d}`")).collect::<Vec<_>>().join(", ")
        );
        return ExitCode::from(2);
    }
    let c = if overrides.is_empty() {
        c
    } else {
        let (reduced, diags) = shardplan_compiler::check_source_resized(&text, &overrides);
        let errors: Vec<&Diagnostic> = diags.iter().filter(|d| d.is_error()).collect();
        match reduced {
            Some(r) if errors.is_empty() => r,
            _ => {
                let sources = Sources::new(&name, String::from_utf8_lossy(&text).into_owned());
                for d in errors {
                    eprint!("{}", render::human(d, &sources, color));
                }
                eprintln!("the plan does not check at the reduced sizes given with --set");
                return ExitCode::from(1);
            }
        }
    };
    match compare(args, &c, &text, &base_of(&args.file)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => report(e, &name, &text, &c, color),
    }
}

fn compare(args: &VerifyArgs, c: &Checked, text: &[u8], base: &Path) -> Result<bool, Error> {
    let name = args.file.display().to_string();
    let backends = Backends::new(choice(args.backend), c)?;
    let one_gpu = matches!(c.placement, Placement::Single) && backends.of(0).is_cuda();
    if matches!(c.placement, Placement::Single) && !one_gpu {
        println!("{name}: the plan runs on one device; there is nothing to compare");
        return Ok(true);
    }
    let profile = options(c, None, false)?.profile;
    let (mut one, mut placed) = shardplan_runtime::session::side_by_side(c, text, base, args.steps, threads(args.threads), backends, profile)?;
    let devices = placed.runner().devices();
    let mesh: Vec<String> = match placed.runner().plan() {
        Some(p) => p.mesh.axes.iter().map(|(n, s)| format!("{n} {s}")).collect(),
        None => vec!["gpu".to_string()],
    };
    let kinds: Vec<&str> = (0..devices).map(|d| if placed.backend(d).is_cuda() { "gpu" } else { "cpu" }).collect();
    let kinds = if kinds.iter().all(|k| *k == "cpu") { String::new() } else { format!(" [{}]", kinds.join(", ")) };
    let (_, end, _) = one.steps();
    println!("{name}: {devices} devices{kinds} (mesh {}), {end} steps against one CPU device", mesh.join(" × "));
    println!("  {:>5}  {:>14}  {:>14}  {:>10}", "step", "loss, 1 device", "loss, placed", "rel. diff");
    let cmp = shardplan_runtime::session::compare(&mut one, &mut placed, &mut |step, x, y| {
        let rel = (x - y).abs() / x.abs().max(1e-12);
        println!("  {step:>5}  {x:>14.7}  {y:>14.7}  {rel:>10.2e}");
    })?;
    let (worst_loss, worst_param) = (cmp.worst_loss, &cmp.worst_param);
    let (loss_default, param_default) = shardplan_runtime::session::tolerances(c);
    let (loss_tol, param_tol) = (args.loss_tolerance.unwrap_or(loss_default), args.param_tolerance.unwrap_or(param_default));
    println!("  largest loss difference: {worst_loss:.2e} relative (tolerance {loss_tol:.0e})");
    println!("  largest parameter difference: {:.2e} relative, in {} (tolerance {param_tol:.0e})", worst_param.0, worst_param.1);
    let ok = cmp.within(loss_tol, param_tol);
    println!("  {}", if ok { "ok: the placement matches one device" } else { "FAILED: the placement does not match one device" });
    Ok(ok)
}
