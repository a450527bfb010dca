//! `placement auto` at the command line: the device profile, and
//! `shardplan calibrate`, which writes one.

use shardplan_compiler::graph::Graph;
use shardplan_compiler::planner::{self as auto, ms, KernelClass, Profile};
use shardplan_compiler::Checked;
use std::path::Path;

/// The device profile: the file given, else `shardplan-profile.json` in the
/// current directory when there is one, else the built-in defaults.
pub fn profile(path: Option<&Path>) -> Result<Profile, String> {
    let default = Path::new("shardplan-profile.json");
    let path = match path {
        Some(p) => p,
        None if default.exists() => default,
        None => return Ok(Profile::default()),
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the device profile `{}`: {e}", path.display()))?;
    Profile::from_json(&text).map_err(|e| format!("`{}` {e}", path.display()))
}

/// `shardplan calibrate -o FILE`: measures this machine's CPU devices and
/// writes the device profile later compiles read.
pub fn calibrate(out: &Path) -> std::process::ExitCode {
    use std::io::Write;
    let m = match shardplan_runtime::calibrate::measure() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error[calibrate::measure]: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    println!("matmul, one core:");
    for (n, f) in &m.matmul {
        println!("  [256, {n}] · [{n}, {n}] {:>8.1} GFLOP/s", f / 1e9);
    }
    // The planner's layers are mostly mid-sized matmuls: take the median size's rate.
    let mut rates: Vec<f64> = m.matmul.iter().map(|x| x.1).collect();
    rates.sort_by(f64::total_cmp);
    let matmul_flops = rates.get(rates.len() / 2).copied().unwrap_or(Profile::default().matmul_flops);
    println!("element-wise, one core:");
    for (bytes, r) in &m.elementwise {
        println!("  {:>8.0} KiB per call {:>8.1} GB/s", *bytes as f64 / 1024.0, r / 1e9);
    }
    println!("between two devices: {:.1} GB/s, {:.1} µs per message", m.link_bytes / 1e9, m.link_latency * 1e6);
    println!("cores: {}", m.cores);
    println!("a tiny kernel call: {:.2} µs", m.op_overhead * 1e6);
    let p = Profile {
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
    let p = match fit(&p) {
        Ok(f) => {
            let (e_mm, e_fused, e_kernel) = f.efficiencies();
            let [o_mm, o_fused, o_kernel] = f.call_costs().map(|o| o * 1e6);
            println!(
                "fitted on three reference steps: matmuls take {e_mm:.2}× the model's time and {o_mm:.2} µs per call, element-wise kernels {e_fused:.2}× and {o_fused:.2} µs, other kernels {e_kernel:.2}× and {o_kernel:.2} µs"
            );
            let (s, _) = f.throughput();
            println!(
                "on {} threads, kernels large enough to split run {s:.2}× as fast as on one, plus {:.1} µs each for the threads to meet",
                f.cores,
                f.split_cost.unwrap_or(0.0) * 1e6
            );
            if let Some(s) = f.devices_speedup {
                println!("{} single-threaded devices at once do the work of {s:.2} alone", f.cores);
            }
            if let Some(k) = f.crowding {
                println!("more devices than cores take turns, at {:.2}× the work", 1.0 + k);
            }
            f
        }
        Err(e) => {
            eprintln!("warning: the reference steps could not be run ({e}); the profile keeps the raw rates");
            p
        }
    };
    let text = match serde_json::to_string_pretty(&p) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error[calibrate::write]: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    // Atomically: a temporary file beside the target, then a rename.
    let tmp = out.with_extension("json.tmp");
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, out)) {
        let _ = std::fs::remove_file(&tmp);
        eprintln!("error[calibrate::write]: cannot write `{}`: {e}", out.display());
        return std::process::ExitCode::from(1);
    }
    println!("wrote {}", out.display());
    std::process::ExitCode::SUCCESS
}

/// Reference steps: one compute-bound, one dominated by fixed costs, and a
/// small transformer (attention's transposes, softmax and norms).
/// Each with the bound of its integer inputs (classes, vocabulary).
const REFERENCES: [(&str, i32); 3] = [
    (
        "model Big { input x: f32[batch, 512]  input y: i32[batch]  layer a = Linear(512, 1024)  layer b = Linear(1024, 512)  layer c = Linear(512, 16)  loss cross_entropy(c(relu(b(relu(a(x))))), y) }
data d = synthetic(rows: 512, features: 512, classes: 16)
train { model: Big, data: d, batch: 256, steps: 1, optimizer: adam(lr: 0.001) }",
        16,
    ),
    (
        "model Small { input x: f32[batch, 16]  input y: i32[batch]  layer a = Linear(16, 16)  layer b = Linear(16, 16)  layer c = Linear(16, 4)  loss cross_entropy(c(relu(b(relu(a(x))))), y) }
data d = synthetic(rows: 64, features: 16, classes: 4)
train { model: Small, data: d, batch: 8, steps: 1, optimizer: adam(lr: 0.001) }",
        4,
    ),
    (
        "model G { input tokens: i32[batch, seq]  input targets: i32[batch, seq]  layer embed = Embedding(256, 64)  layer pos = PositionalEmbedding(seq, 64)  layer blocks = repeat 2 Block(64, 4)  layer ln = LayerNorm(64)  layer head = Linear(64, 256)  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets) }
data d = text(\"reference.txt\")
train { model: G, data: d, batch: 8, seq: 64, steps: 1, optimizer: adam(lr: 0.001) }",
        256,
    ),
];

/// What the model and the machine say of one reference step.
struct Reference {
    plan: Checked,
    graph: Graph,
    program: shardplan_compiler::kernel::Program,
    /// The model's seconds on one core and its kernel calls, for matmuls,
    /// fused element-wise kernels (with the update) and the other kernels.
    model: [(f64, f64); 3],
    /// Measured on one thread: the step's seconds in each of those kinds of
    /// kernel (the time between kernels shared out among them).
    one: [f64; 3],
    /// Measured on every core: the step's seconds.
    all: f64,
}

/// `p` with only the kind of kernel `k` (as in [`Reference::model`])
/// taking time, and no fixed cost per kernel.
fn only(p: &Profile, k: usize) -> Profile {
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
        0 => Profile { elementwise_bytes: FREE, elementwise_by_size: Vec::new(), ..p },
        1 => Profile { matmul_flops: FREE, matmul_by_size: Vec::new(), kernel_efficiency: Some(0.0), ..p },
        _ => Profile { matmul_flops: FREE, matmul_by_size: Vec::new(), bytes_efficiency: Some(0.0), ..p },
    }
}

/// Fits the model to steps of the reference plans. On one thread: the
/// efficiencies of matmuls, of fused element-wise kernels and of the other
/// kernels, and the cost per kernel call, by least squares in relative
/// error over the time each reference spends in each kind of kernel
/// (profiled kernel by kernel), so that every reference and every kind of
/// work counts alike. Then, on every core: the speedups of matmuls and of
/// memory-bound kernels that bring the model's steps closest to the
/// measured ones (least squares in relative error again; a step's
/// predicted time is linear in the inverse speedups).
fn fit(base: &Profile) -> Result<Profile, String> {
    let cores = base.cores.max(1);
    let one_core =
        Profile { cores: 1, efficiency: 1.0, bytes_efficiency: None, kernel_efficiency: None, thread_speedup: None, bytes_speedup: None, ..base.clone() };
    let mut refs = Vec::new();
    for (src, bound) in REFERENCES {
        let (c, d) = shardplan_compiler::check_source(src.as_bytes());
        let c = c.ok_or_else(|| format!("a reference plan does not check: {:?}", d.iter().map(|d| d.message.clone()).collect::<Vec<_>>()))?;
        let g = shardplan_compiler::autodiff::differentiate(shardplan_compiler::graph::build(&c), &c);
        let step = |p: &Profile| auto::predict(&c, &g, p).map(|x| x.step_s()).unwrap_or(0.0);
        let program = shardplan_compiler::kernel::lower(&g);
        let calls = kernel_kinds(&program).iter().fold([0.0; 3], |mut n, &k| {
            n[k] += 1.0;
            n
        });
        let model = [0, 1, 2].map(|k| (step(&only(&one_core, k)), calls[k]));
        let one = measure_step(&program, 1, bound)?;
        let all = measure_step(&program, cores, bound)?.iter().sum();
        refs.push(Reference { plan: c, graph: g, program, model, one, all });
    }
    // For each kind of kernel, two unknowns: its efficiency and its cost
    // per call. Each reference that spends time in that kind gives a row,
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
    for (name, r) in NAMES.iter().zip(&refs) {
        let fit = |k: usize| ms(e[k] * r.model[k].0 + o[k] * r.model[k].1);
        println!(
            "  reference {name:<18} one thread: matmuls {} (fitted {}), element-wise {} (fitted {}), other kernels {} (fitted {})",
            ms(r.one[0]),
            fit(0),
            ms(r.one[1]),
            fit(1),
            ms(r.one[2]),
            fit(2)
        );
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
        let (c, d) = shardplan_compiler::check_source(crowded_plan(n, pipelined).as_bytes());
        let c = c.ok_or_else(|| format!("the crowded reference does not check: {:?}", d.iter().map(|d| d.message.clone()).collect::<Vec<_>>()))?;
        let g = shardplan_compiler::autodiff::differentiate(shardplan_compiler::graph::build(&c), &c);
        let plan = shardplan_compiler::partition::partition(&c, &g).map_err(|e| format!("the crowded reference does not partition: {e}"))?;
        let t = cluster_step(plan, c.train.batch as usize, cores)?;
        crowded.push((c, g, t, if pipelined { "pipelined" } else { "tensor parallel" }));
    }
    // The turns' cost: `crowding` such that the model's steps over the
    // measured ones average 1.
    let mean_ratio = |kappa: f64| {
        let p = Profile { crowding: Some(kappa), ..fitted.clone() };
        crowded.iter().map(|(c, g, t, _)| auto::predict(c, g, &p).map(|x| x.step_s()).unwrap_or(*t) / t).sum::<f64>() / crowded.len().max(1) as f64
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
        let fit = auto::predict(c, g, &fitted).map(|x| x.step_s()).unwrap_or(0.0);
        println!("  reference {:<18} {} devices, {how}: {} (fitted {})", "small transformer", c.devices.len(), ms(*t), ms(fit));
    }
    // On every core a step takes a + b / s + c · k: its kernels too small to
    // split (a), the others' work shared out (b, over the speedup s) and
    // the meetings of the threads (k, at c each). Read a, b and k off the
    // model, then fit 1 / s and c by least squares in relative error.
    let at = |r: &Reference, s: f64, c: f64| {
        let p = Profile { thread_speedup: Some(s), bytes_speedup: Some(s), split_cost: Some(c), ..fitted.clone() };
        auto::predict(&r.plan, &r.graph, &p).map(|x| x.step_s()).unwrap_or(0.0)
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
    for (name, r) in NAMES.iter().zip(&refs) {
        println!("  reference {name:<18} {cores} threads: {} (fitted {})", ms(r.all), ms(at(r, s_mm, split_cost)));
    }
    Ok(Profile { thread_speedup: Some(s_mm), bytes_speedup: Some(s_bytes), split_cost: Some(split_cost), ..fitted.clone() })
}

/// The kind of each step of `program`, as in [`Reference::model`].
fn kernel_kinds(program: &shardplan_compiler::kernel::Program) -> Vec<usize> {
    program.steps.iter().map(|s| KernelClass::of(s).index()).collect()
}

const NAMES: [&str; 3] = ["compute-bound MLP", "tiny MLP", "small transformer"];

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

/// A reference step of `program` on `threads` threads, on fixed
/// pseudo-random data (integer inputs below `bound`): the median step's
/// seconds, split between the kinds of kernel (as [`kernel_kinds`]) in
/// the proportions a profiled run finds.
fn measure_step(program: &shardplan_compiler::kernel::Program, threads: usize, bound: i32) -> Result<[f64; 3], String> {
    let mut exec = prepared(program, threads, bound)?;
    let mut times = run_steps(&mut exec, 25)?;
    times.sort_by(f64::total_cmp);
    let total = times[times.len() / 2];
    exec.enable_profile();
    run_steps(&mut exec, 10)?;
    let mut by_kind = [0.0; 3];
    for (k, t) in kernel_kinds(program).into_iter().zip(exec.profile()) {
        by_kind[k] += t;
    }
    let all: f64 = by_kind.iter().sum();
    Ok(if all > 0.0 { by_kind.map(|t| total * t / all) } else { [0.0, 0.0, total] })
}

/// The small transformer reference over `n` devices, `n / 4` data-parallel
/// replicas of two rows each (per microbatch), each either split in
/// Megatron pairs over two devices and again over two (`pipelined` false),
/// or a pipeline of four stages over four microbatches: synchronous
/// collectives or streaming transfers, the two ways devices wait on each
/// other.
fn crowded_plan(n: usize, pipelined: bool) -> String {
    let data = (n / 4).max(1);
    let (batch, layout) = if pipelined {
        (
            8 * data,
            format!(
                "mesh (data: {data}, pipe: 4)
  data_parallel over data
  pipeline over pipe {{
    stage embed, pos
    stage blocks[0]
    stage blocks[1]
    stage ln, head
    microbatches 4
    schedule 1f1b
  }}"
            ),
        )
    } else {
        (
            2 * data,
            format!(
                "mesh (data: {data}, model: 2, pipe: 2)
  data_parallel over data
  shard blocks[*].attn.wq (_, model)
  shard blocks[*].attn.wk (_, model)
  shard blocks[*].attn.wv (_, model)
  shard blocks[*].attn.wo (model, _)
  shard blocks[*].mlp.up.w (_, model)
  shard blocks[*].mlp.up.b (model)
  shard blocks[*].mlp.down.w (model, _)
  pipeline over pipe {{
    stage embed, pos, blocks[0]
    stage blocks[1], ln, head
    microbatches 1
  }}"
            ),
        )
    };
    format!(
        "model G {{ input tokens: i32[batch, seq]  input targets: i32[batch, seq]  layer embed = Embedding(256, 64)  layer pos = PositionalEmbedding(seq, 64)  layer blocks = repeat 2 Block(64, 4)  layer ln = LayerNorm(64)  layer head = Linear(64, 256)  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets) }}
data d = text(\"reference.txt\")
train {{ model: G, data: d, batch: {batch}, seq: 64, steps: 1, optimizer: adam(lr: 0.001) }}
devices cpu x {n}
placement {{
  {layout}
}}"
    )
}

/// The median step of a partitioned plan run over its devices (`threads`
/// kernel threads shared out among them), on pseudo-random tokens.
fn cluster_step(plan: shardplan_compiler::partition::Plan, n: usize, threads: usize) -> Result<f64, String> {
    use shardplan_runtime::cluster::{Cluster, Hypers};
    use shardplan_runtime::data::Batch;
    let mut cl = Cluster::start(plan, threads, std::time::Duration::from_secs(60));
    let seq = 64;
    let batch = |rows: &[usize]| {
        let tokens: Vec<i32> = rows.iter().flat_map(|&r| (0..seq).map(move |i| ((r * 131 + i * 7919) % 256) as i32)).collect();
        let targets = tokens.iter().map(|t| (t + 1) % 256).collect();
        Batch::Text { tokens, targets }
    };
    let rows: Vec<usize> = (0..n).collect();
    let hyper = Hypers { lr: 0.001, bias_correction1: 1.0, bias_correction2: 1.0 };
    let mut times = Vec::new();
    for step in 0..25 {
        let t = std::time::Instant::now();
        cl.step(step, hyper, &rows, &batch, None)?;
        if step >= 5 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The median step of `program` when `k` single-threaded executors run it
/// at once, each on its own thread.
fn side_by_side(program: &shardplan_compiler::kernel::Program, bound: i32, k: usize) -> Result<f64, String> {
    let mut execs = (0..k).map(|_| prepared(program, 1, bound)).collect::<Result<Vec<_>, _>>()?;
    let results: Vec<Result<Vec<f64>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = execs.iter_mut().map(|e| s.spawn(move || run_steps(e, 25))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a reference step panicked".into()))).collect()
    });
    let mut times = Vec::new();
    for r in results {
        times.extend(r?);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// An executor of `program` on `threads` threads, its parameters, state and
/// inputs filled with fixed pseudo-random data.
fn prepared(program: &shardplan_compiler::kernel::Program, threads: usize, bound: i32) -> Result<shardplan_runtime::exec::Executor, String> {
    use shardplan_compiler::kernel::BufKind;
    use shardplan_runtime::exec::{Data, Executor};
    let mut exec = Executor::new(program.clone(), threads).map_err(|e| e.to_string())?;
    for b in &program.buffers {
        let n = b.len();
        let r = match (&b.kind, b.elem) {
            (BufKind::Param(_) | BufKind::Input(_) | BufKind::State(_), shardplan_compiler::kernel::Elem::F32) => {
                let v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1).collect();
                exec.set(&b.kind, Data::F32(&v))
            }
            (BufKind::Input(_), _) => exec.set(&b.kind, Data::I32(&(0..n).map(|i| (i * 7919 % 65521) as i32 % bound).collect::<Vec<_>>())),
            _ => Ok(()),
        };
        r.map_err(|e| e.to_string())?;
    }
    Ok(exec)
}

/// Runs `n` steps; the seconds of each.
fn run_steps(exec: &mut shardplan_runtime::exec::Executor, n: usize) -> Result<Vec<f64>, String> {
    let hyper = |_| 0.001;
    let mut times = Vec::new();
    for _ in 0..n {
        let t = std::time::Instant::now();
        exec.step(&hyper).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
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
