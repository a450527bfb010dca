//! Fitting the cost model to reference steps measured on this machine.
//!
//! Input: a profile holding the raw rates (from [`super::Measured`]). Output:
//! the profile with its fitted figures (per class of kernel an efficiency
//! and a cost per call; the threads' speedup and cost per split kernel;
//! devices side by side; devices taking turns), and each reference step
//! measured beside the fitted model's prediction ([`ReferenceStep`]).
//!
//! Invariants: every fitted figure is finite and in range (efficiencies in
//! 0.2 to 20, costs zero or more, speedups between 1 and the cores), as
//! [`Profile::validate`] asks of them; where least squares is
//! singular or out of bounds, a figure is held at its bound and the others
//! fitted alone.

use super::reference::{cluster_step, crowded_plan, kernel_classes, measure_step, one_device, placed, side_by_side, NAMES, REFERENCES};
use super::{CalibrateError, ReferenceStep};
use shardplan_compiler::check::Checked;
use shardplan_compiler::graph::Graph;
use shardplan_compiler::planner::{self, KernelClass, Profile};

/// What the model and the machine say of one reference step.
struct Reference {
    plan: Checked,
    graph: Graph,
    program: shardplan_compiler::kernel::Program,
    /// The model's seconds on one core and its kernel calls, by class of
    /// kernel ([`KernelClass::index`]): matmuls, fused element-wise kernels
    /// (with the update) and the library's other kernels.
    model: [(f64, f64); 3],
    /// Measured on one thread: the step's seconds in each of those classes
    /// of kernel (the time between kernels shared out among them).
    one: [f64; 3],
    /// Measured on every core: the step's seconds.
    all: f64,
}

/// `p` with only the class of kernel `k` taking time, and no fixed cost
/// per kernel.
fn only(p: &Profile, k: KernelClass) -> Profile {
    const FREE: f64 = 1e30;
    let (e_mm, e_fused, e_kernel) = p.efficiencies();
    let p = Profile {
        op_overhead: 0.0,
        matmul_overhead: Some(0.0),
        kernel_overhead: Some(0.0),
        efficiency: e_mm,
        bytes_efficiency: Some(e_fused),
        kernel_efficiency: Some(e_kernel),
        ..p.clone()
    };
    match k {
        KernelClass::MatMul => Profile { elementwise_bytes: FREE, elementwise_by_size: Vec::new(), ..p },
        KernelClass::Fused => Profile { matmul_flops: FREE, matmul_by_size: Vec::new(), kernel_efficiency: Some(0.0), ..p },
        KernelClass::Library => Profile { matmul_flops: FREE, matmul_by_size: Vec::new(), bytes_efficiency: Some(0.0), ..p },
    }
}

/// Fits the model to steps of the reference plans. On one thread: the
/// efficiencies of matmuls, of fused element-wise kernels and of the other
/// kernels, and the cost per kernel call, by least squares in relative
/// error over the time each reference spends in each class of kernel
/// (profiled kernel by kernel), so that every reference and every kind of
/// work counts alike. Then, on every core: the speedups of matmuls and of
/// memory-bound kernels that bring the model's steps closest to the
/// measured ones (least squares in relative error again; a step's
/// predicted time is linear in the inverse speedups). Then the devices
/// side by side, and the cost of devices taking turns. `emit` receives
/// each reference step beside its fit as soon as it is known.
pub(super) fn fit(base: &Profile, emit: &mut dyn FnMut(ReferenceStep)) -> Result<Profile, CalibrateError> {
    let cores = base.cores.max(1);
    let one_core =
        Profile { cores: 1, efficiency: 1.0, bytes_efficiency: None, kernel_efficiency: None, thread_speedup: None, bytes_speedup: None, ..base.clone() };
    let mut refs = Vec::new();
    for (src, bound) in REFERENCES {
        let (c, g, program) = one_device(src, "a reference plan")?;
        let step = |p: &Profile| planner::predict(&c, &g, p).map(|x| x.step_s()).unwrap_or(0.0);
        let calls = kernel_classes(&program).iter().fold([0.0; 3], |mut n, &k| {
            n[k.index()] += 1.0;
            n
        });
        let model = KernelClass::ALL.map(|k| (step(&only(&one_core, k)), calls[k.index()]));
        let one = measure_step(&program, 1, bound)?;
        let all = measure_step(&program, cores, bound)?.iter().sum();
        refs.push(Reference { plan: c, graph: g, program, model, one, all });
    }
    // For each class of kernel, two unknowns: its efficiency and its cost
    // per call. Each reference that spends time in that class gives a row,
    // scaled by that time, against 1.
    let mut e = [1.0; 3];
    let mut o = [0.0; 3];
    for k in 0..3 {
        let rows: Vec<(Vec<f64>, f64)> =
            refs.iter().filter(|r| r.one[k] > 1e-7 && r.model[k].0 > 0.0).map(|r| (vec![r.model[k].0 / r.one[k], r.model[k].1 / r.one[k]], 1.0)).collect();
        let x = match least_squares(&rows, 2) {
            Some(x) if x[1] >= 0.0 => x,
            // Fixed costs cannot be negative: the efficiency alone.
            _ => {
                let (num, den) = rows.iter().fold((0.0, 0.0), |(n, d), (r, _)| (n + r[0], d + r[0] * r[0]));
                vec![if den > 0.0 { num / den } else { 1.0 }, 0.0]
            }
        };
        e[k] = x[0].clamp(0.2, 20.0);
        o[k] = x[1].min(1e-4);
    }
    let fitted = Profile {
        efficiency: e[0],
        bytes_efficiency: Some(e[1]),
        kernel_efficiency: Some(e[2]),
        op_overhead: o[1],
        matmul_overhead: Some(o[0]),
        kernel_overhead: Some(o[2]),
        ..base.clone()
    };
    for (name, r) in NAMES.into_iter().zip(&refs) {
        let fit = [0, 1, 2].map(|k| e[k] * r.model[k].0 + o[k] * r.model[k].1);
        emit(ReferenceStep::OneThread { name, measured: r.one, fitted: fit });
    }
    if cores == 1 {
        return Ok(Profile { thread_speedup: Some(1.0), bytes_speedup: Some(1.0), devices_speedup: Some(1.0), ..fitted });
    }
    // Devices of one thread each, as many as there are cores, all at once:
    // how much of the machine's work they get done (cores share caches and
    // memory bandwidth, or are threads of one physical core).
    let mut shares = Vec::new();
    for (r, (_, bound)) in refs.iter().zip(REFERENCES) {
        if r.all < 1e-4 {
            continue; // too short to time side by side
        }
        let alone: f64 = r.one.iter().sum();
        shares.push(alone / side_by_side(&r.program, bound, cores)?);
    }
    let devices = if shares.is_empty() { None } else { Some((cores as f64 * shares.iter().sum::<f64>() / shares.len() as f64).clamp(1.0, cores as f64)) };
    let fitted = Profile { devices_speedup: devices, ..fitted };
    // Devices beyond the cores: the reference transformer over 2 and 4
    // devices per core (data parallel, Megatron pairs over two), against
    // the model, for how much throughput each further device per core costs.
    let mut crowded = Vec::new();
    for (k, pipelined) in [(2, false), (2, true), (4, false), (4, true)] {
        let n = k * cores;
        if n > 16 || !n.is_multiple_of(4) {
            continue;
        }
        let (c, g, plan) = placed(&crowded_plan(n, pipelined), "the crowded reference")?;
        let t = cluster_step(plan, c.train.batch as usize, cores)?;
        crowded.push((c, g, t, if pipelined { "pipelined" } else { "tensor parallel" }));
    }
    // The turns' cost: `crowding` such that the model's steps over the
    // measured ones average 1.
    let mean_ratio = |kappa: f64| {
        let p = Profile { crowding: Some(kappa), ..fitted.clone() };
        crowded.iter().map(|(c, g, t, _)| planner::predict(c, g, &p).map(|x| x.step_s()).unwrap_or(*t) / t).sum::<f64>() / crowded.len().max(1) as f64
    };
    let crowding = if crowded.is_empty() || mean_ratio(0.0) >= 1.0 {
        0.0
    } else if mean_ratio(4.0) <= 1.0 {
        4.0
    } else {
        let (mut lo, mut hi) = (0.0, 4.0);
        for _ in 0..40 {
            let mid = 0.5 * (lo + hi);
            if mean_ratio(mid) < 1.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let fitted = Profile { crowding: Some(crowding), ..fitted };
    for (c, g, t, how) in &crowded {
        let fit = planner::predict(c, g, &fitted).map(|x| x.step_s()).unwrap_or(0.0);
        emit(ReferenceStep::Crowded { name: "small transformer", devices: c.devices.len(), how, measured: *t, fitted: fit });
    }
    // On every core a step takes a + b / s + c · k: its kernels too small to
    // split (a), the others' work shared out (b, over the speedup s) and
    // the meetings of the threads (k, at c each). Read a, b and k off the
    // model, then fit 1 / s and c by least squares in relative error.
    let at = |r: &Reference, s: f64, c: f64| {
        let p = Profile { thread_speedup: Some(s), bytes_speedup: Some(s), split_cost: Some(c), ..fitted.clone() };
        planner::predict(&r.plan, &r.graph, &p).map(|x| x.step_s()).unwrap_or(0.0)
    };
    let rows: Vec<(Vec<f64>, f64)> = refs
        .iter()
        .map(|r| {
            let base = at(r, 1.0, 0.0);
            let b = 2.0 * (base - at(r, 2.0, 0.0));
            let k = at(r, 1.0, 1.0) - base;
            (vec![b / r.all, k / r.all], 1.0 - (base - b) / r.all)
        })
        .collect();
    let top = cores as f64;
    let (x, c) = match least_squares(&rows, 2) {
        Some(v) if v[0] >= 1.0 / top && v[0] <= 1.0 && v[1] >= 0.0 => (v[0], v[1]),
        // Out of bounds: hold the split cost at zero, or the speedup at a
        // bound, and fit the other alone.
        _ => {
            let one = |col: usize, held: f64| {
                let (num, den) = rows.iter().fold((0.0, 0.0), |(n, d), (r, y)| (n + r[col] * (y - r[1 - col] * held), d + r[col] * r[col]));
                if den > 0.0 {
                    num / den
                } else {
                    0.0
                }
            };
            let tries = [(one(0, 0.0).clamp(1.0 / top, 1.0), 0.0), (1.0 / top, one(1, 1.0 / top).max(0.0)), (1.0, one(1, 1.0).max(0.0))];
            let err = |(x, c): (f64, f64)| rows.iter().map(|(r, y)| (r[0] * x + r[1] * c - y).powi(2)).sum::<f64>();
            tries.into_iter().min_by(|a, b| err(*a).total_cmp(&err(*b))).unwrap_or((1.0, 0.0))
        }
    };
    let (s_mm, s_bytes) = (1.0 / x, 1.0 / x);
    let split_cost = c.min(1e-3);
    for (name, r) in NAMES.into_iter().zip(&refs) {
        emit(ReferenceStep::Threads { name, threads: cores, measured: r.all, fitted: at(r, s_mm, split_cost) });
    }
    Ok(Profile { thread_speedup: Some(s_mm), bytes_speedup: Some(s_bytes), split_cost: Some(split_cost), ..fitted.clone() })
}

/// Least squares for rows · x ≈ y in `n` unknowns (None when singular).
fn least_squares(rows: &[(Vec<f64>, f64)], n: usize) -> Option<Vec<f64>> {
    // Columns scaled to unit length (the unknowns differ by orders of
    // magnitude), the normal equations, then Gauss-Jordan elimination with
    // partial pivoting.
    let norm: Vec<f64> = (0..n).map(|j| rows.iter().map(|(r, _)| r[j] * r[j]).sum::<f64>().sqrt()).collect();
    if norm.iter().any(|&c| c == 0.0 || !c.is_finite()) {
        return None;
    }
    let mut a = vec![vec![0.0; n + 1]; n];
    for (r, y) in rows {
        for i in 0..n {
            for j in 0..n {
                a[i][j] += r[i] / norm[i] * r[j] / norm[j];
            }
            a[i][n] += r[i] / norm[i] * y;
        }
    }
    let scale = (0..n).map(|i| a[i][i].abs()).fold(0.0, f64::max);
    for col in 0..n {
        let piv = (col..n).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[piv][col].abs() <= 1e-12 * scale {
            return None;
        }
        a.swap(col, piv);
        let pivot = a[col].clone();
        for (row, r) in a.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot[col];
                for (x, p) in r.iter_mut().zip(&pivot).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let x: Vec<f64> = (0..n).map(|i| a[i][n] / a[i][i] / norm[i]).collect();
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[cfg(test)]
mod tests {
    use super::least_squares;

    /// A tiny deterministic generator, so each run draws fresh but
    /// reproducible problems from its seed.
    fn draws(seed: u64) -> impl FnMut() -> f64 {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn least_squares_recovers_coefficients_of_very_different_sizes() {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        let mut r = draws(seed);
        for _ in 0..20 {
            // Unknowns like the fit's: efficiencies near 1, costs per call near 1e-7 s.
            let want = [0.5 + r(), 0.5 + r(), 1e-7 * (0.5 + r())];
            let rows: Vec<(Vec<f64>, f64)> = (0..9)
                .map(|_| {
                    let row = vec![r(), r(), 1e6 * r()];
                    let y = row.iter().zip(&want).map(|(a, b)| a * b).sum();
                    (row, y)
                })
                .collect();
            let got = least_squares(&rows, 3).unwrap_or_else(|| panic!("seed {seed}: singular"));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * w.abs(), "seed {seed}: got {got:?}, want {want:?}");
            }
        }
    }

    #[test]
    fn least_squares_refuses_what_the_rows_cannot_separate() {
        // Two identical columns, and a column of zeros.
        let same: Vec<(Vec<f64>, f64)> = (1..5).map(|i| (vec![i as f64, i as f64], 1.0)).collect();
        assert!(least_squares(&same, 2).is_none());
        let zero: Vec<(Vec<f64>, f64)> = (1..5).map(|i| (vec![i as f64, 0.0], 1.0)).collect();
        assert!(least_squares(&zero, 2).is_none());
    }
}
