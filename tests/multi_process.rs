//! One process per device under `mpirun` (built with `--features mpi`):
//! every placement on 2, 4 and 8 processes trains as the same plan does in
//! one process, loss for loss and bit for bit, and within 1e-6 (losses) and
//! 1e-5 (parameters) of one device; a killed rank stops every other rank
//! quickly with an error naming it; ranks with different plans, and a rank
//! count that is not the plan's device count, are refused before the first
//! step, and so are ranks started from different builds; a run saved under 4
//! processes resumes under 2 with another placement; rank 0 reports every
//! rank's devices.
//!
//! Without Open MPI's `mpirun` these tests are skipped, except under CI=true,
//! where they fail.
#![cfg(feature = "mpi")]

mod common;

use shardplan_runtime::checkpoint;
use shardplan_runtime::session::Start;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{root, TP_MLP};

fn tmp(name: &str) -> PathBuf {
    common::scratch("mpi", name)
}

/// The digits MLP (64 → 128 → 64 → 10) with `batch`, `devices` and `placement`, trained with AdamW.
fn mlp(batch: usize, devices: usize, placement: &str) -> String {
    common::digits_mlp(batch, "adamw(lr: 0.01)", devices, placement)
}

/// `mpirun`, if installed.
fn mpirun() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path).map(|d| d.join("mpirun")).find(|p| p.is_file());
    if found.is_none() {
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "mpirun not found (CI=true: .ci/run installs openmpi-bin)");
        eprintln!("skipped: mpirun not found; install Open MPI (openmpi-bin) to run the multi-process tests");
    }
    found
}

/// One multi-process run at a time: the machine has few cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `mpirun -np N shardplan ARGS…` (each element of `ranks` is one
/// (count, arguments) group of an MPMD launch), killing it after `limit`.
fn launch(ranks: &[(usize, Vec<String>)], limit: Duration, during: impl FnOnce(u32)) -> (Output, Duration) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut cmd = Command::new(mpirun().expect("mpirun"));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.arg("--allow-run-as-root");
    }
    cmd.arg("--oversubscribe");
    for (i, (n, args)) in ranks.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        // A group's first argument may name another executable: `exe=PATH`.
        let (exe, args) = match args.split_first() {
            Some((first, rest)) if first.starts_with("exe=") => (first["exe=".len()..].to_string(), rest),
            _ => (env!("CARGO_BIN_EXE_shardplan").to_string(), &args[..]),
        };
        cmd.args(["-np", &n.to_string(), &exe, "--color", "never", "run", "--quiet"]).args(args);
    }
    let start = Instant::now();
    let mut child = cmd.current_dir(root()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("mpirun starts");
    during(child.id());
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = start.elapsed();
    (child.wait_with_output().expect("output"), took)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn s(x: &str) -> String {
    x.to_string()
}

/// The checkpoint's tensors, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let (t, _) = checkpoint::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    t.into_iter().map(|t| (t.name, t.data)).collect()
}

/// ‖a − b‖ / ‖a‖ over every tensor, the worst one.
fn worst(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    a.iter()
        .map(|(name, x)| {
            let y = &b.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing")).1;
            let d: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
            let n: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            d / n.max(1e-30)
        })
        .fold(0.0, f64::max)
}

/// The plan `plan` on `n` processes, in one process, and on one device (`one`):
/// the multi-process run equals the in-process one bit for bit, and one device within tolerance.
fn check(name: &str, plan: &str, n: usize, one: &str) {
    let file = tmp(&format!("{name}.plan"));
    std::fs::write(&file, plan).expect("write plan");
    let (m, ck) = (tmp(&format!("{name}.mpi.jsonl")), tmp(&format!("{name}.mpi.safetensors")));
    let args =
        vec![file.display().to_string(), s("--steps"), s("10"), s("--no-eval"), s("--metrics"), m.display().to_string(), s("--save"), ck.display().to_string()];
    let (out, _) = launch(&[(n, args)], Duration::from_secs(300), |_| {});
    assert!(out.status.success(), "{name} on {n} processes:\n{}", text(&out));
    let mpi: Vec<u32> = common::losses(&m).into_iter().map(|(_, l)| l).collect();
    let ck_in = tmp(&format!("{name}.threads.safetensors"));
    let threads: Vec<u32> = common::train_text(plan, root(), |_| {}, Some(&ck_in)).into_iter().map(f32::to_bits).collect();
    assert_eq!(mpi.len(), 10, "{name}");
    assert_eq!(mpi, threads, "{name}: {n} processes and {n} threads give different losses");
    assert_eq!(worst(&tensors(&ck_in), &tensors(&ck)), 0.0, "{name}: {n} processes and {n} threads end with different parameters");
    let ck_one = tmp(&format!("{name}.one.safetensors"));
    let single = common::train_text(one, root(), |_| {}, Some(&ck_one));
    for (i, (a, b)) in single.iter().zip(&mpi).enumerate() {
        let b = f32::from_bits(*b);
        assert!(((a - b) / a).abs() <= 1e-6, "{name} step {}: {a} on one device, {b} on {n} processes", i + 1);
    }
    let w = worst(&tensors(&ck_one), &tensors(&ck));
    assert!(w <= 1e-5, "{name}: parameters differ from one device's by {w:e}");
}

#[test]
fn every_placement_on_processes_matches_threads_and_one_device() {
    if mpirun().is_none() {
        return;
    }
    let one = mlp(64, 1, "");
    check("dp2", &mlp(64, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}"), 2, &one);
    check("dp4_uneven", &mlp(63, 4, "placement {\n  mesh (data: 4)\n  data_parallel over data\n}"), 4, &mlp(63, 1, ""));
    check("tp2", &mlp(64, 2, &format!("placement {{\n  mesh (model: 2)\n  {TP_MLP}\n}}")), 2, &one);
    check("tp4", &mlp(64, 4, &format!("placement {{\n  mesh (model: 4)\n  {TP_MLP}\n}}")), 4, &one);
    let pp = "placement {\n  mesh (pipe: 2)\n  pipeline over pipe {\n    stage fc1, fc2\n    stage out\n    microbatches 4\n    schedule 1f1b\n  }\n}";
    check("pp2_1f1b", &mlp(64, 2, pp), 2, &one);
    let dp_pp = "placement {\n  mesh (data: 2, pipe: 2)\n  data_parallel over data\n  pipeline over pipe {\n    stage fc1\n    stage fc2, out\n    microbatches 4\n    schedule 1f1b\n  }\n}";
    check("dp2_pp2_1f1b", &mlp(64, 4, dp_pp), 4, &one);
    check("ps2", &mlp(63, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n  parameter_server on cpu1\n}"), 2, &mlp(63, 1, ""));
    check("ps4", &mlp(64, 4, "placement {\n  mesh (data: 4)\n  data_parallel over data\n  parameter_server on cpu1\n}"), 4, &one);
    let three_d = format!(
        "placement {{\n  mesh (data: 2, model: 2, pipe: 2)\n  data_parallel over data\n  {TP_MLP}\n  pipeline over pipe {{\n    stage fc1, fc2\n    stage out\n    microbatches 2\n    schedule 1f1b\n  }}\n}}"
    );
    check("dp2_tp2_pp2", &mlp(64, 8, &three_d), 8, &one);
    // Sharded model states: FSDP on four processes, ZeRO-2 with tensor parallelism and recompute.
    check("dp4_zero3", &mlp(64, 4, "placement {\n  mesh (data: 4)\n  data_parallel over data\n  zero 3\n}"), 4, &one);
    check(
        "dp2_tp2_zero2_recompute",
        &mlp(64, 4, &format!("placement {{\n  mesh (data: 2, model: 2)\n  data_parallel over data\n  {TP_MLP}\n  zero 2\n  recompute fc1, fc2\n}}")),
        4,
        &one,
    );
}

#[test]
fn a_killed_rank_stops_every_other_rank_quickly() {
    if mpirun().is_none() {
        return;
    }
    let args = vec![s("examples/data_parallel.plan"), s("--steps"), s("1000000"), s("--no-eval")];
    let killed_at = Mutex::new(None);
    let (out, _) = launch(&[(4, args)], Duration::from_secs(120), |mpirun| {
        // Once training runs, SIGKILL the process of rank 2.
        std::thread::sleep(Duration::from_secs(4));
        for pid in children(mpirun) {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if env.split(|b| *b == 0).any(|v| v == b"OMPI_COMM_WORLD_RANK=2") {
                // SAFETY: sending a signal to a child process of this test.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                *killed_at.lock().unwrap() = Some(Instant::now());
            }
        }
    });
    let killed = killed_at.lock().unwrap().expect("found and killed rank 2");
    let stopped = killed.elapsed();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(stopped < Duration::from_secs(15), "the run took {stopped:?} to stop after the kill:\n{all}");
    for r in [0, 1, 3] {
        assert!(all.contains(&format!("error[run::rank_lost]: rank {r} stopped at step")), "rank {r} did not say why it stopped:\n{all}");
    }
    assert!(all.matches("rank 2 (process").count() >= 3, "the error does not name rank 2:\n{all}");
    assert!(!all.contains("panicked"), "{all}");
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // The parent's pid is the second field after the command's closing parenthesis.
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|x| x.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

#[test]
fn ranks_with_different_plans_are_refused_at_start() {
    if mpirun().is_none() {
        return;
    }
    let a = tmp("a.plan");
    let b = tmp("b.plan");
    std::fs::write(&a, mlp(64, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}")).expect("write");
    std::fs::write(&b, mlp(64, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}").replace("seed: 7", "seed: 8")).expect("write");
    let m = tmp("differ.jsonl");
    let common = |f: &Path| vec![f.display().to_string(), s("--steps"), s("3"), s("--no-eval"), s("--metrics"), m.display().to_string()];
    let (out, _) = launch(&[(1, common(&a)), (1, common(&b))], Duration::from_secs(60), |_| {});
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("rank(s) 1 run a different plan or settings than rank 0"), "{all}");
    assert!(!m.exists(), "a step ran:\n{all}");
}

#[test]
fn a_rank_count_unlike_the_plans_devices_is_refused() {
    if mpirun().is_none() {
        return;
    }
    let m = tmp("count.jsonl");
    let args = vec![s("examples/data_parallel.plan"), s("--steps"), s("3"), s("--metrics"), m.display().to_string()];
    let (out, _) = launch(&[(3, args)], Duration::from_secs(60), |_| {});
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("the plan has 4 device(s), but the launcher started 3 process(es)"), "{all}");
    assert!(!all.contains("trained"), "{all}");
    assert!(!m.exists(), "a step ran:\n{all}");
}

#[test]
fn saved_on_four_processes_resumed_on_two_with_another_placement() {
    if mpirun().is_none() {
        return;
    }
    let dp = tmp("resume_dp4.plan");
    let tp = tmp("resume_tp2.plan");
    std::fs::write(&dp, mlp(64, 4, "placement {\n  mesh (data: 4)\n  data_parallel over data\n}")).expect("write");
    std::fs::write(&tp, mlp(64, 2, &format!("placement {{\n  mesh (model: 2)\n  {TP_MLP}\n}}"))).expect("write");
    let (ck, m1, m2) = (tmp("mid.safetensors"), tmp("first.jsonl"), tmp("second.jsonl"));
    let first = vec![
        dp.display().to_string(),
        s("--stop-after"),
        s("5"),
        s("--no-eval"),
        s("--metrics"),
        m1.display().to_string(),
        s("--save"),
        ck.display().to_string(),
    ];
    let (out, _) = launch(&[(4, first)], Duration::from_secs(120), |_| {});
    assert!(out.status.success(), "{}", text(&out));
    let second = vec![tp.display().to_string(), s("--resume"), ck.display().to_string(), s("--no-eval"), s("--metrics"), m2.display().to_string()];
    let (out, _) = launch(&[(2, second)], Duration::from_secs(120), |_| {});
    assert!(out.status.success(), "{}", text(&out));
    let mut pieced: Vec<f32> = common::losses(&m1).into_iter().map(|(_, l)| f32::from_bits(l)).collect();
    pieced.extend(common::losses(&m2).into_iter().map(|(_, l)| f32::from_bits(l)));
    let full = common::train_text(&mlp(64, 1, ""), root(), |c| c.start = Start::Fresh, None);
    assert_eq!((full.len(), pieced.len()), (10, 10));
    for (i, (a, b)) in full.iter().zip(&pieced).enumerate() {
        assert!(((a - b) / a).abs() < 1e-5, "step {}: {a} uninterrupted, {b} saved on 4 processes and resumed on 2", i + 1);
    }
}

#[test]
fn a_failing_device_stops_every_rank_with_one_error() {
    if mpirun().is_none() {
        return;
    }
    let args =
        vec![s("examples/data_tensor_pipeline.plan"), s("--steps"), s("20"), s("--no-eval"), s("--threads"), s("1"), s("--inject-fault"), s("device=5,step=3")];
    let (out, took) = launch(&[(8, args)], Duration::from_secs(120), |_| {});
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{all}");
    assert_eq!(all.matches("device 5 failed at step 3: injected fault").count(), 1, "one error, reported once:\n{all}");
    assert!(!all.contains("rank_lost") && !all.contains("panicked"), "{all}");
}

#[test]
fn rank_zero_reports_every_ranks_devices() {
    if mpirun().is_none() {
        return;
    }
    let m = tmp("report.jsonl");
    let args = vec![s("examples/pipeline_1f1b.plan"), s("--steps"), s("2"), s("--no-eval"), s("--profile"), s("--metrics"), m.display().to_string()];
    let (out, _) = launch(&[(2, args)], Duration::from_secs(120), |_| {});
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    // One report, from rank 0, with both devices' profiles and statistics.
    assert_eq!(all.matches("trained 2 steps").count(), 1, "{all}");
    assert!(all.contains("profile on device 0") && all.contains("profile on device 1"), "{all}");
    assert!(all.contains("2 devices: cpu0 ") && all.contains("; cpu1 "), "{all}");
    // The metrics' fractions cover both devices: the stages of a 2-stage pipeline idle.
    for line in std::fs::read_to_string(&m).expect("metrics").lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        let idle = v["idle_fraction"].as_f64().expect("idle_fraction");
        assert!(idle > 0.0 && idle < 1.0, "{line}");
    }
}

#[test]
fn ranks_of_different_builds_are_refused_at_start() {
    if mpirun().is_none() {
        return;
    }
    // Another build: the same executable with bytes appended, so its hash differs.
    let other = tmp("shardplan-other-build");
    let mut bytes = std::fs::read(env!("CARGO_BIN_EXE_shardplan")).expect("the executable");
    bytes.extend_from_slice(b"another build");
    std::fs::write(&other, bytes).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let plan = tmp("builds.plan");
    std::fs::write(&plan, mlp(64, 2, "placement {\n  mesh (data: 2)\n  data_parallel over data\n}")).expect("write");
    let args = |exe: Option<&Path>| {
        let mut v: Vec<String> = exe.map(|e| format!("exe={}", e.display())).into_iter().collect();
        v.extend([plan.display().to_string(), s("--steps"), s("3"), s("--no-eval")]);
        v
    };
    let (out, _) = launch(&[(1, args(None)), (1, args(Some(&other)))], Duration::from_secs(60), |_| {});
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("rank(s) 1 run a different build of shardplan than rank 0"), "{all}");
    assert!(!all.contains("trained"), "{all}");
}
