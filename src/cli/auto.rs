//! `placement auto` at the command line: the device profile, the search,
//! and its explanation.

use shardplan_compiler::graph::Graph;
use shardplan_compiler::partition::auto::{self, Candidate, Profile, Search};
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
    let p: Profile =
        serde_json::from_str(&text).map_err(|e| format!("`{}` is not a device profile (line {}, column {}): {e}", path.display(), e.line(), e.column()))?;
    let finite =
        [p.matmul_flops, p.elementwise_bytes, p.link_bytes].iter().all(|x| x.is_finite() && *x > 0.0) && p.link_latency.is_finite() && p.link_latency >= 0.0;
    if !finite || p.cores == 0 {
        return Err(format!("`{}` holds rates that are not positive numbers", path.display()));
    }
    Ok(p)
}

/// Searches, timing the search.
pub fn search(c: &Checked, g: &Graph, p: &Profile) -> (Search, f64) {
    let t = std::time::Instant::now();
    let s = auto::search(c, g, p);
    (s, t.elapsed().as_secs_f64())
}

/// Milliseconds with three significant figures below 1 ms (steps of
/// small models take tens of microseconds), two decimals above.
pub fn ms(s: f64) -> String {
    let v = s * 1e3;
    match v.abs() {
        a if a >= 1.0 || a < 5e-5 => format!("{:.2} ms", if a < 5e-5 { 0.0 } else { v }),
        a if a >= 0.1 => format!("{v:.3} ms"),
        _ => format!("{v:.4} ms"),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Why `other` lost to `best`.
fn reason(best: &Candidate, other: &Candidate, budget: Option<u64>) -> String {
    if !other.fits {
        let m = other.exact_memory.unwrap_or(other.memory);
        return match budget {
            Some(b) => format!("does not fit: {} per device, the budget is {}", mib(m), mib(b)),
            None => "could not be partitioned".into(),
        };
    }
    let d = [
        ("compute", other.compute_s - best.compute_s, other.compute_s),
        ("communication", other.comm_s - best.comm_s, other.comm_s),
        ("pipeline bubble", other.bubble_s - best.bubble_s, other.bubble_s),
    ];
    if other.step_s() == best.step_s() {
        return format!("same predicted time, more memory: {} against {} per device", mib(other.memory), mib(best.memory));
    }
    let worst = d.iter().max_by(|a, b| a.1.total_cmp(&b.1)).copied().unwrap_or(("compute", 0.0, 0.0));
    let slower = (other.step_s() / best.step_s().max(1e-12) - 1.0) * 100.0;
    format!("{slower:+.0}%: more {} ({} against {})", worst.0, ms(worst.2), ms(worst.2 - worst.1))
}

/// The explanation `inspect --explain` prints.
pub fn explain(file: &str, s: &Search, secs: f64) -> String {
    let mut out = format!(
        "{file}: placement auto over {} devices{}; {} candidates searched in {:.1} ms\n",
        s.devices,
        s.budget.map(|b| format!(", memory {} per device", mib(b))).unwrap_or_default(),
        s.considered,
        secs * 1e3
    );
    let Some(i) = s.chosen else {
        out += "no candidate fits the memory budget; the closest:\n";
        for c in s.candidates.iter().take(3) {
            out += &format!("  {:<44} {} per device\n", c.name(), mib(c.exact_memory.unwrap_or(c.memory)));
        }
        return out;
    };
    let best = &s.candidates[i];
    out += &format!("chosen: {}\n", best.name());
    if best.pipe > 1 {
        out += &format!("  stages: {}\n", best.stages.iter().map(|s| s.join(", ")).collect::<Vec<_>>().join(" | "));
    }
    out += &format!(
        "  predicted step {} = compute {} + communication {} + pipeline bubble {}\n",
        ms(best.step_s()),
        ms(best.compute_s),
        ms(best.comm_s),
        ms(best.bubble_s)
    );
    if best.overlapped_s > 0.0 {
        out += &format!("  (a further {} of pipeline transfers hides behind compute)\n", ms(best.overlapped_s));
    }
    out += &format!("  memory per device {} (planned from its programs; estimate {})\n", mib(best.exact_memory.unwrap_or(best.memory)), mib(best.memory));
    let others: Vec<&Candidate> = s.candidates.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, c)| c).take(5).collect();
    if !others.is_empty() {
        out += "next best:\n";
        for o in others {
            out += &format!("  {:<60} {:>10}  {}\n", o.name(), ms(o.step_s()), reason(best, o, s.budget));
        }
    }
    out += "as placement text:\n";
    for line in s.placement.lines() {
        out += &format!("  {line}\n");
    }
    out
}

/// What `inspect --explain` prints for a plan that places itself: the cost
/// model's predicted step, broken down as for a candidate of the search.
pub fn explain_placed(file: &str, c: &Candidate) -> String {
    let mut out = format!("{file}: {} as placed, by the cost model\n", c.name());
    if c.pipe > 1 {
        out += &format!("  stages: {}\n", c.stages.iter().map(|s| s.join(", ")).collect::<Vec<_>>().join(" | "));
    }
    out += &format!(
        "  predicted step {} = compute {} + communication {} + pipeline bubble {}\n",
        ms(c.step_s()),
        ms(c.compute_s),
        ms(c.comm_s),
        ms(c.bubble_s)
    );
    if c.overlapped_s > 0.0 {
        out += &format!("  (a further {} of pipeline transfers hides behind compute)\n", ms(c.overlapped_s));
    }
    out += &format!("  memory per device {} (planned from its programs; estimate {})\n", mib(c.exact_memory.unwrap_or(c.memory)), mib(c.memory));
    out
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
    println!("element-wise, one core: {:.1} GB/s", m.elementwise_bytes / 1e9);
    println!("between two devices: {:.1} GB/s, {:.1} µs per message", m.link_bytes / 1e9, m.link_latency * 1e6);
    println!("cores: {}", m.cores);
    println!("a tiny kernel call: {:.2} µs", m.op_overhead * 1e6);
    let mut p = Profile {
        matmul_flops,
        elementwise_bytes: m.elementwise_bytes,
        link_bytes: m.link_bytes,
        link_latency: m.link_latency,
        cores: m.cores,
        op_overhead: m.op_overhead,
        matmul_by_size: m.matmul.clone(),
        efficiency: 1.0,
        thread_speedup: None,
        bytes_speedup: None,
    };
    match fit(&p) {
        Ok((e, o, (mm, bytes))) => {
            println!("fitted on three reference steps: compute takes {e:.2}× the model's time, {:.2} µs per kernel", o * 1e6);
            println!("on {} threads, the compute-bound step runs {mm:.2}× as fast as on one, the transformer step {bytes:.2}×", p.cores);
            p.efficiency = e;
            p.op_overhead = o;
            p.thread_speedup = Some(mm);
            p.bytes_speedup = Some(bytes);
        }
        Err(e) => eprintln!("warning: the reference steps could not be run ({e}); the profile keeps the raw rates"),
    }
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
const REFERENCES: [&str; 3] = [
    "model Big { input x: f32[batch, 512]  input y: i32[batch]  layer a = Linear(512, 1024)  layer b = Linear(1024, 512)  layer c = Linear(512, 16)  loss cross_entropy(c(relu(b(relu(a(x))))), y) }
data d = synthetic(rows: 512, features: 512, classes: 16)
train { model: Big, data: d, batch: 256, steps: 1, optimizer: adam(lr: 0.001) }",
    "model Small { input x: f32[batch, 16]  input y: i32[batch]  layer a = Linear(16, 16)  layer b = Linear(16, 16)  layer c = Linear(16, 4)  loss cross_entropy(c(relu(b(relu(a(x))))), y) }
data d = synthetic(rows: 64, features: 16, classes: 4)
train { model: Small, data: d, batch: 8, steps: 1, optimizer: adam(lr: 0.001) }",
    "model G { input tokens: i32[batch, seq]  input targets: i32[batch, seq]  layer embed = Embedding(256, 64)  layer pos = PositionalEmbedding(seq, 64)  layer blocks = repeat 2 Block(64, 4)  layer ln = LayerNorm(64)  layer head = Linear(64, 256)  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets) }
data d = text(\"reference.txt\")
train { model: G, data: d, batch: 8, seq: 64, steps: 1, optimizer: adam(lr: 0.001) }",
];

/// Fits the compute efficiency and the cost per kernel from steps of the
/// reference plans run on one thread: T = e · compute + o · kernels, least
/// squares in relative error (each reference counts alike, whatever its
/// size). Then measures how much faster the compute-bound step and the
/// transformer step run on every core than on one.
fn fit(base: &Profile) -> Result<(f64, f64, (f64, f64)), String> {
    let mut rows = Vec::new();
    for src in REFERENCES {
        let (c, d) = shardplan_compiler::check_source(src.as_bytes());
        let c = c.ok_or_else(|| format!("a reference plan does not check: {:?}", d.iter().map(|d| d.message.clone()).collect::<Vec<_>>()))?;
        let g = shardplan_compiler::autodiff::differentiate(shardplan_compiler::graph::build(&c), &c);
        let one = Profile { cores: 1, ..base.clone() };
        let compute = auto::predict(&c, &g, &Profile { op_overhead: 0.0, ..one.clone() }).map(|x| x.step_s()).unwrap_or(0.0);
        let kernels = auto::predict(&c, &g, &Profile { op_overhead: 1.0, ..one.clone() }).map(|x| x.step_s()).unwrap_or(0.0) - compute;
        let program = shardplan_compiler::kernel::lower(&g);
        let mut times = [0.0; 2];
        for (slot, threads) in [(0, 1), (1, base.cores.max(1))] {
            times[slot] = median_step(&program, threads)?;
        }
        rows.push((compute, kernels, times[0], times[1]));
    }
    // Rows (c/t, k/t) against 1: the normal equations of a 2 × 2 system.
    let (mut aa, mut ab, mut bb, mut ay, mut by) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(c, k, t, _) in &rows {
        let (a, b) = (c / t, k / t);
        aa += a * a;
        ab += a * b;
        bb += b * b;
        ay += a;
        by += b;
    }
    let det = aa * bb - ab * ab;
    if det.abs() < 1e-18 {
        return Err("the reference steps do not separate compute from fixed costs".into());
    }
    let e = (ay * bb - by * ab) / det;
    let o = (aa * by - ab * ay) / det;
    let cores = base.cores.max(1) as f64;
    let speedup = |r: Option<&(f64, f64, f64, f64)>| r.map(|r| r.2 / r.3).unwrap_or(1.0).clamp(0.5, cores);
    let speedups = (speedup(rows.first()), speedup(rows.last()));
    for (name, &(c, k, t, _)) in ["compute-bound MLP", "tiny MLP", "small transformer"].iter().zip(&rows) {
        println!("  reference {name:<18} one thread: measured {:.3} ms, fitted {:.3} ms", t * 1e3, (e * c + o * k) * 1e3);
    }
    Ok((e.clamp(0.5, 20.0), o.clamp(0.0, 1e-3), speedups))
}

/// The median time of 25 steps of `program` on `threads` threads, on fixed pseudo-random data.
fn median_step(program: &shardplan_compiler::kernel::Program, threads: usize) -> Result<f64, String> {
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
            (BufKind::Input(_), _) => exec.set(&b.kind, Data::I32(&vec![1; n])),
            _ => Ok(()),
        };
        r.map_err(|e| e.to_string())?;
    }
    let hyper = |_| 0.001;
    let mut times = Vec::new();
    for _ in 0..25 {
        let t = std::time::Instant::now();
        exec.step(&hyper).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
