//! Per-step hyper-parameters and initial parameters.
//!
//! Input: the train section of a checked plan, a step number and the run's
//! length. Output: the step's learning rate and Adam's bias corrections
//! ([`hypers`]); and each parameter's initial values ([`init`]).
//!
//! Invariants: both are pure functions of their arguments, so every device
//! of a placement, and a resumed run, computes the same values; each
//! parameter draws from its own seeded stream, so adding a parameter does
//! not change the others.

use crate::cluster::Hypers;
use crate::data::rng::Xoshiro256;
use shardplan_compiler::check::{Init, LrSchedule, Optimizer};
use shardplan_compiler::Checked;

/// The learning rate of `step` (0-based) out of `total`.
pub fn learning_rate(c: &Checked, step: u64, total: u64) -> f64 {
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

/// The learning rate and Adam's bias corrections of step `step` (from 0).
pub fn hypers(c: &Checked, step: u64, total: u64) -> Hypers {
    let (b1, b2) = match c.train.optimizer {
        Optimizer::Adam { beta1, beta2, .. } => (beta1, beta2),
        Optimizer::Sgd { .. } => (0.0, 0.0),
    };
    let t = (step + 1) as i32;
    Hypers { lr: learning_rate(c, step, total), bias_correction1: 1.0 / (1.0 - b1.powi(t)), bias_correction2: 1.0 / (1.0 - b2.powi(t)).sqrt(), step }
}

/// Initial values of parameter `index` (of `shape`), from its own seeded stream.
pub fn init(init: &Init, shape: &[usize], seed: u64, index: u64) -> Vec<f32> {
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
