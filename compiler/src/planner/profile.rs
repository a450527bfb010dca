//! The device profile: what the devices can do, as the cost model reads it.
//!
//! Input: the text of a profile file (JSON, as `shardplan calibrate` writes
//! it; the compiler does no IO, so the caller reads the file). Output: a
//! [`Profile`], or a [`ProfileError`]: the text is not JSON of a profile
//! (with the line and column), or it holds figures no machine has.
//!
//! Invariants: a profile from [`Profile::from_json`] has at least one core,
//! every rate, efficiency and speedup positive and finite, and every cost
//! and latency finite and zero or more, so the search never ranks on NaN.
//! Figures missing from the file take the built-in defaults
//! ([`Profile::default`], measured on a 2-core AVX-512 machine).

use serde::{Deserialize, Serialize};

/// What the devices can do, from `shardplan calibrate` (defaults: measured on
/// a 2-core AVX-512 machine).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Matmul FLOP/s of one core.
    pub matmul_flops: f64,
    /// Bytes/s of element-wise kernels on one core (large ones, from memory).
    pub elementwise_bytes: f64,
    /// Bytes/s of one core's element-wise kernels by the working set of the
    /// device (a small one stays in the caches), ascending.
    #[serde(default)]
    pub elementwise_by_size: Vec<(usize, f64)>,
    /// Bytes/s between two devices.
    pub link_bytes: f64,
    /// Seconds per message between two devices.
    pub link_latency: f64,
    /// Cores the devices share.
    pub cores: usize,
    /// Seconds of fixed cost per kernel (dispatch, buffer lookup).
    #[serde(default = "default_overhead")]
    pub op_overhead: f64,
    /// The same for a matmul (packing its operands), then for the library's
    /// other kernels, fitted by `calibrate` (None: `op_overhead`).
    #[serde(default)]
    pub matmul_overhead: Option<f64>,
    #[serde(default)]
    pub kernel_overhead: Option<f64>,
    /// Matmul FLOP/s of one core by the smallest of the product's dims
    /// (small products run far below the peak), ascending.
    #[serde(default)]
    pub matmul_by_size: Vec<(usize, f64)>,
    /// Measured matmul time over the model's, fitted by `calibrate` on
    /// reference steps (the products' shapes, transposes and batches cost
    /// more, or less, than the square products measured above).
    #[serde(default = "one")]
    pub efficiency: f64,
    /// The same for fused element-wise kernels and the optimizer's update
    /// (None: as `efficiency`).
    #[serde(default)]
    pub bytes_efficiency: Option<f64>,
    /// The same for the library's other memory-bound kernels: reductions,
    /// softmax, norms, losses, gathers, transposes (None: as
    /// `bytes_efficiency`).
    #[serde(default)]
    pub kernel_efficiency: Option<f64>,
    /// How much faster a device with all `cores` threads runs the kernels
    /// large enough to split than one thread does, before `split_cost`,
    /// fitted by `calibrate` (None: as many times as there are cores).
    #[serde(default)]
    pub thread_speedup: Option<f64>,
    /// The same for memory-bound kernels alone (None: as `thread_speedup`,
    /// which is what `calibrate` writes).
    #[serde(default)]
    pub bytes_speedup: Option<f64>,
    /// The work of how many lone cores the machine does when `cores`
    /// single-threaded devices run at once, as `calibrate` measures it
    /// (None: as `thread_speedup`).
    #[serde(default)]
    pub devices_speedup: Option<f64>,
    /// When devices outnumber the cores they take turns, and the turns cost
    /// (a thread switch at every message, caches warmed by another device):
    /// the machine then does `1 / (1 + crowding)` of the work of as many
    /// devices as cores, fitted by `calibrate` on a reference plan run over
    /// 2 and 4 devices per core.
    #[serde(default)]
    pub crowding: Option<f64>,
    /// Seconds a kernel split over a device's threads costs beyond its
    /// share of the work (waking the helpers, waiting for the last one),
    /// fitted by `calibrate`.
    #[serde(default)]
    pub split_cost: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl Profile {
    /// How many times faster than one core a device runs its matmuls (and,
    /// second, its memory-bound kernels) while it computes, when `n` devices
    /// share the machine: with every core busy the machine does the work of
    /// `throughput()` cores, split evenly between the devices that run at
    /// once (at most one per core; devices beyond the cores take turns, which
    /// the bound on total work accounts for).
    pub fn device_speed(&self, n: usize) -> (f64, f64) {
        let (mm, bytes) = self.throughput_for(n);
        let running = n.clamp(1, self.cores.max(1)) as f64;
        (mm / running, bytes / running)
    }

    /// [`Profile::throughput`] for `n` devices: memory-bound kernels split
    /// over one device's threads gain less than the cores' throughput (the
    /// threads meet after every kernel), devices of their own do not.
    pub fn throughput_for(&self, n: usize) -> (f64, f64) {
        let (mm, bytes) = self.throughput();
        let cores = self.cores.max(1);
        if n >= cores {
            let all = self.devices_speedup.unwrap_or(mm).clamp(1.0, cores as f64);
            let crowded = 1.0 + if n > cores { self.crowding.unwrap_or(0.0).max(0.0) } else { 0.0 };
            (all / crowded, all / crowded)
        } else {
            (mm, bytes)
        }
    }

    /// The work of how many lone cores the machine does with every core busy
    /// (below the core count where cores share caches, memory bandwidth or a
    /// physical core), as `calibrate` measures it; else the core count. For
    /// matmuls, then for memory-bound kernels.
    pub fn throughput(&self) -> (f64, f64) {
        let cores = self.cores.max(1) as f64;
        let mm = self.thread_speedup.unwrap_or(cores).clamp(1.0, cores);
        // Below 1 where splitting small kernels over threads costs more than it gains.
        (mm, self.bytes_speedup.unwrap_or(mm).clamp(0.5, cores))
    }

    /// Seconds of fixed cost per call of a matmul, a fused element-wise
    /// kernel (or the update), and the other kernels: by
    /// [`KernelClass::index`](super::KernelClass::index).
    pub fn call_costs(&self) -> [f64; 3] {
        let o = self.op_overhead.max(0.0);
        [self.matmul_overhead.unwrap_or(o).max(0.0), o, self.kernel_overhead.unwrap_or(o).max(0.0)]
    }

    /// Bytes/s of one core for a device whose working set is `bytes`.
    /// Between measured sizes the rate is interpolated in log(size);
    /// beyond them it is the nearest one's.
    pub fn elementwise_rate(&self, bytes: f64) -> f64 {
        let pts = &self.elementwise_by_size;
        let rate = match pts.iter().position(|&(size, _)| size as f64 >= bytes) {
            None => pts.last().map(|x| x.1).unwrap_or(self.elementwise_bytes),
            Some(0) => pts[0].1,
            Some(i) => {
                let ((s0, r0), (s1, r1)) = (pts[i - 1], pts[i]);
                let f = (bytes.max(1.0).ln() - (s0.max(1) as f64).ln()) / ((s1.max(1) as f64).ln() - (s0.max(1) as f64).ln()).max(1e-9);
                r0 + (r1 - r0) * f.clamp(0.0, 1.0)
            }
        };
        if rate.is_finite() {
            rate.max(1.0)
        } else {
            self.elementwise_bytes
        }
    }

    /// Measured over modelled time of matmuls, of fused element-wise
    /// kernels, and of the other memory-bound kernels.
    pub fn efficiencies(&self) -> (f64, f64, f64) {
        let bytes = self.bytes_efficiency.unwrap_or(self.efficiency);
        (self.efficiency, bytes, self.kernel_efficiency.unwrap_or(bytes))
    }

    /// FLOP/s of one core for a product whose smallest dim is `k`.
    pub fn matmul_rate(&self, k: usize) -> f64 {
        let mut rate = self.matmul_by_size.first().map(|x| x.1).unwrap_or(self.matmul_flops);
        for &(size, r) in &self.matmul_by_size {
            if size <= k {
                rate = r;
            }
        }
        rate.max(1.0)
    }
}

fn default_overhead() -> f64 {
    0.5e-6
}

impl Default for Profile {
    fn default() -> Profile {
        Profile {
            matmul_flops: 200e9,
            elementwise_bytes: 25e9,
            elementwise_by_size: Vec::new(),
            link_bytes: 10e9,
            link_latency: 30e-6,
            cores: 2,
            op_overhead: default_overhead(),
            matmul_overhead: None,
            kernel_overhead: None,
            matmul_by_size: Vec::new(),
            efficiency: 1.0,
            bytes_efficiency: None,
            kernel_efficiency: None,
            thread_speedup: None,
            bytes_speedup: None,
            devices_speedup: None,
            crowding: None,
            split_cost: None,
        }
    }
}

/// Why a device profile's text was refused.
#[derive(Clone, Debug, PartialEq)]
pub enum ProfileError {
    /// Not JSON of a profile: where the reader stopped, and why.
    Malformed { line: usize, column: usize, message: String },
    /// A figure no machine has: no cores, a rate, efficiency or speedup
    /// that is not positive and finite, or a cost or latency that is
    /// negative or not finite.
    Figures,
}

/// Reads as a predicate of the profile's name: `` format!("`{name}` {e}") ``.
impl std::fmt::Display for ProfileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProfileError::Malformed { line, column, message } => write!(f, "is not a device profile (line {line}, column {column}): {message}"),
            ProfileError::Figures => {
                write!(f, "holds figures that are not finite: rates, efficiencies and speedups must be positive, costs and latencies zero or more")
            }
        }
    }
}

impl std::error::Error for ProfileError {}

impl Profile {
    /// A profile from its JSON text, its figures checked (see [`Profile::validate`]).
    pub fn from_json(text: &str) -> Result<Profile, ProfileError> {
        let p: Profile = serde_json::from_str(text).map_err(|e| ProfileError::Malformed { line: e.line(), column: e.column(), message: e.to_string() })?;
        p.validate()?;
        Ok(p)
    }

    /// Checks every figure: at least one core, rates, efficiencies and
    /// speedups positive and finite, costs and latencies zero or more.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let p = self;
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let at_least_zero = |x: f64| x.is_finite() && x >= 0.0;
        let rates = [p.matmul_flops, p.elementwise_bytes, p.link_bytes, p.efficiency]
            .into_iter()
            .chain(p.matmul_by_size.iter().chain(&p.elementwise_by_size).map(|x| x.1))
            .chain([p.bytes_efficiency, p.kernel_efficiency, p.thread_speedup, p.bytes_speedup, p.devices_speedup].into_iter().flatten());
        let costs = [p.link_latency, p.op_overhead].into_iter().chain([p.matmul_overhead, p.kernel_overhead, p.split_cost, p.crowding].into_iter().flatten());
        if p.cores == 0 || !rates.into_iter().all(positive) || !costs.into_iter().all(at_least_zero) {
            return Err(ProfileError::Figures);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_read_back() {
        let text = serde_json::to_string(&Profile::default()).expect("serialises");
        assert_eq!(Profile::from_json(&text), Ok(Profile::default()));
        // Figures left out take the defaults.
        let p = Profile::from_json(r#"{"matmul_flops": 1e9, "elementwise_bytes": 1e9, "link_bytes": 1e9, "link_latency": 0, "cores": 1}"#);
        assert_eq!(p.map(|p| (p.op_overhead, p.efficiency)), Ok((Profile::default().op_overhead, 1.0)));
    }

    #[test]
    fn malformed_text_says_where() {
        match Profile::from_json("{\n  \"cores\": \"two\"\n}") {
            Err(ProfileError::Malformed { line, column, .. }) => assert_eq!((line, column), (2, 16)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn figures_no_machine_has_are_refused() {
        let bad = [
            Profile { cores: 0, ..Profile::default() },
            Profile { link_bytes: -1.0, ..Profile::default() },
            Profile { kernel_efficiency: Some(0.0), ..Profile::default() },
            Profile { split_cost: Some(-1e-5), ..Profile::default() },
            Profile { devices_speedup: Some(f64::INFINITY), ..Profile::default() },
            Profile { matmul_by_size: vec![(64, f64::NAN)], ..Profile::default() },
        ];
        for p in bad {
            assert_eq!(p.validate(), Err(ProfileError::Figures), "{p:?}");
        }
        assert_eq!(Profile::default().validate(), Ok(()));
    }
}
