//! Calibration: the device profile the planner's cost model reads, measured
//! and fitted on this machine.
//!
//! Input: the machine. Output: a [`Profile`] (the raw rates of `measure`,
//! then the cost model fitted to reference steps by `fit`) and a
//! [`Report`]: the raw measurements and each reference step measured
//! beside the fitted model's prediction. [`calibrate`] is the entry point;
//! it hands each line of the report to its caller as it is reached (the
//! measurements take tens of seconds).
//!
//! Invariants: the fitted figures are finite and within their bounds (see
//! `fit`); when the reference steps cannot be run the calibration still
//! succeeds, with the raw rates only and the reason in
//! [`Report::unfitted`]; only the raw measurements failing is an error.
//! Calibration does no file IO: writing the profile is the caller's.

mod fit;
mod measure;
mod reference;

pub use measure::{measure, MeasureError, Measured};

use shardplan_compiler::planner::{ms, Profile};
use shardplan_compiler::units::{Bytes, Unit};

/// Why calibration, or one of its reference steps, failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CalibrateError {
    /// The raw measurements failed.
    #[error(transparent)]
    Measure(#[from] MeasureError),
    /// A reference plan does not check (a bug in the references).
    #[error("{what} does not check: {messages:?}")]
    Check { what: &'static str, messages: Vec<String> },
    /// A reference plan does not compile (a bug in the references or the
    /// compiler).
    #[error("{what} does not compile: {messages:?}")]
    Compile { what: &'static str, messages: Vec<String> },
    /// A reference step failed to run.
    #[error("{0}")]
    Run(String),
    /// A reference step run beside others panicked.
    #[error("a reference step panicked")]
    Panicked,
}

/// One reference step measured beside the fitted model's prediction
/// (seconds). Displays as the line `shardplan calibrate` prints for it.
#[derive(Clone, Debug, PartialEq)]
pub enum ReferenceStep {
    /// On one thread: the step's seconds in each class of kernel (by
    /// [`shardplan_compiler::planner::KernelClass::index`]).
    OneThread { name: &'static str, measured: [f64; 3], fitted: [f64; 3] },
    /// Over more devices than cores, taking turns.
    Crowded { name: &'static str, devices: usize, how: &'static str, measured: f64, fitted: f64 },
    /// On one device with a thread per core.
    Threads { name: &'static str, threads: usize, measured: f64, fitted: f64 },
}

impl std::fmt::Display for ReferenceStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReferenceStep::OneThread { name, measured: m, fitted: x } => write!(
                f,
                "  reference {name:<18} one thread: matmuls {} (fitted {}), element-wise {} (fitted {}), other kernels {} (fitted {})",
                ms(m[0]),
                ms(x[0]),
                ms(m[1]),
                ms(x[1]),
                ms(m[2]),
                ms(x[2])
            ),
            ReferenceStep::Crowded { name, devices, how, measured, fitted } => {
                write!(f, "  reference {name:<18} {devices} devices, {how}: {} (fitted {})", ms(*measured), ms(*fitted))
            }
            ReferenceStep::Threads { name, threads, measured, fitted } => {
                write!(f, "  reference {name:<18} {threads} threads: {} (fitted {})", ms(*measured), ms(*fitted))
            }
        }
    }
}

/// What calibration found, beside the profile.
#[derive(Clone, Debug)]
pub struct Report {
    /// The raw measurements the profile starts from.
    pub measured: Measured,
    /// Each reference step beside the fitted model's prediction, in the
    /// order measured.
    pub references: Vec<ReferenceStep>,
    /// Why the reference steps could not be run, when they could not: the
    /// profile then holds the raw rates and the model's own figures.
    pub unfitted: Option<CalibrateError>,
}

/// The lines describing the raw measurements.
fn measured_lines(m: &Measured) -> Vec<String> {
    let mut out = vec!["matmul, one core:".to_string()];
    for (n, f) in &m.matmul {
        out.push(format!("  [256, {n}] · [{n}, {n}] {:>8.1} GFLOP/s", f / 1e9));
    }
    out.push("element-wise, one core:".into());
    for (bytes, r) in &m.elementwise {
        out.push(format!("  {:>12.0} per call {:>8.1} GB/s", Bytes(*bytes as u64).in_unit(Unit::KiB), r / 1e9));
    }
    out.push(format!("between two devices: {:.1} GB/s, {:.1} µs per message", m.link_bytes / 1e9, m.link_latency * 1e6));
    out.push(format!("cores: {}", m.cores));
    out.push(format!("a tiny kernel call: {:.2} µs", m.op_overhead * 1e6));
    out
}

/// Measures this machine's CPU devices and fits the cost model to
/// reference steps run on them. `progress` receives each line of the report
/// as it is reached: the raw measurements, then each reference step beside
/// its fit. Fails only when the raw measurements do.
pub fn calibrate(progress: &mut dyn FnMut(&str)) -> Result<(Profile, Report), CalibrateError> {
    let m = measure()?;
    for line in measured_lines(&m) {
        progress(&line);
    }
    // The planner's layers are mostly mid-sized matmuls: take the median size's rate.
    let mut rates: Vec<f64> = m.matmul.iter().map(|x| x.1).collect();
    rates.sort_by(f64::total_cmp);
    let matmul_flops = rates.get(rates.len() / 2).copied().unwrap_or(Profile::default().matmul_flops);
    let raw = Profile {
        matmul_flops,
        elementwise_bytes: m.elementwise_bytes,
        elementwise_by_size: m.elementwise.clone(),
        link_bytes: m.link_bytes,
        link_latency: m.link_latency,
        cores: m.cores,
        op_overhead: m.op_overhead,
        matmul_by_size: m.matmul.clone(),
        // The fitted figures start from the model's own (efficiency 1, no speedups).
        ..Profile::default()
    };
    let mut references = Vec::new();
    let fitted = fit::fit(&raw, &mut |step| {
        progress(&step.to_string());
        references.push(step);
    });
    let (profile, unfitted) = match fitted {
        Ok(p) => (p, None),
        Err(e) => (raw, Some(e)),
    };
    Ok((profile, Report { measured: m, references, unfitted }))
}
