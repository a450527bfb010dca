//! Training end to end through the CLI: the digits MLP learns, the tiny GPT
//! lowers its loss, runs are bit-identical, and a resumed run continues
//! exactly where the uninterrupted one went.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shardplan-train-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.join(name)
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan")).arg("run").arg("--quiet").args(args).current_dir(root()).output().expect("runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

use common::losses;

#[test]
fn digits_mlp_reaches_90_percent() {
    let (ok, out, err) = run(&["examples/digits_mlp.plan"]);
    assert!(ok, "{err}");
    let acc: f64 = out
        .lines()
        .find_map(|l| l.split("accuracy ").nth(1))
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in:\n{out}"));
    assert!(acc >= 90.0, "test accuracy {acc}% < 90%\n{out}");
}

#[test]
fn tiny_gpt_lowers_its_loss_by_30_percent() {
    let m = tmp("gpt.jsonl");
    let (ok, out, err) = run(&["examples/tiny_gpt.plan", "--metrics", m.to_str().expect("path")]);
    assert!(ok, "{err}");
    let l = losses(&m);
    let first = f32::from_bits(l[0].1);
    let n = l.len();
    let last: f32 = l[n - 10..].iter().map(|x| f32::from_bits(x.1)).sum::<f32>() / 10.0;
    assert!(last <= 0.7 * first, "loss went from {first} to {last} (mean of the last 10 steps)\n{out}");
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let (a, b) = (tmp("det-a.jsonl"), tmp("det-b.jsonl"));
    for m in [&a, &b] {
        let (ok, _, err) = run(&["examples/digits_mlp.plan", "--steps", "60", "--metrics", m.to_str().expect("path")]);
        assert!(ok, "{err}");
    }
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 60);
    assert_eq!(la, lb);
    let (c, _) = (tmp("det-c.jsonl"), ());
    let (ok, _, err) = run(&["examples/digits_mlp.plan", "--steps", "60", "--seed", "8", "--metrics", c.to_str().expect("path")]);
    assert!(ok, "{err}");
    assert_ne!(losses(&c), la, "another seed gives another run");
}

#[test]
fn resumed_run_continues_bit_for_bit() {
    for plan in ["examples/digits_mlp.plan", "examples/tiny_gpt.plan"] {
        let full = tmp("full.jsonl");
        let ck = tmp("half.safetensors");
        let rest = tmp("rest.jsonl");
        let (ok, _, err) = run(&[plan, "--steps", "40", "--metrics", full.to_str().expect("p")]);
        assert!(ok, "{err}");
        let (ok, _, err) = run(&[plan, "--steps", "40", "--stop-after", "17", "--save", ck.to_str().expect("p")]);
        assert!(ok, "{err}");
        let (ok, _, err) = run(&[plan, "--steps", "40", "--resume", ck.to_str().expect("p"), "--metrics", rest.to_str().expect("p")]);
        assert!(ok, "{err}");
        let (f, r) = (losses(&full), losses(&rest));
        assert_eq!(r.len(), 23, "{plan}");
        assert_eq!(&f[17..], &r[..], "{plan}: resumed losses differ");
    }
}

#[test]
fn bad_checkpoints_and_data_are_clear_errors() {
    let junk = tmp("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").expect("write");
    let (ok, _, err) = run(&["examples/digits_mlp.plan", "--steps", "1", "--init", junk.to_str().expect("p")]);
    assert!(!ok);
    assert!(err.contains("checkpoint::corrupt"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A checkpoint of another model lists what does not match.
    let gpt = tmp("gpt.safetensors");
    let (ok, _, err) = run(&["examples/tiny_gpt.plan", "--steps", "1", "--save", gpt.to_str().expect("p")]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["examples/digits_mlp.plan", "--steps", "1", "--init", gpt.to_str().expect("p")]);
    assert!(!ok);
    assert!(err.contains("checkpoint::mismatch") && err.contains("fc1.w"), "{err}");

    // A ragged CSV row is named by file, line and column.
    let dir = tmp("baddata");
    std::fs::create_dir_all(dir.join("data")).expect("dir");
    let mut csv = std::fs::read_to_string(root().join("examples/data/digits.csv")).expect("csv");
    csv = csv.replacen("\n0,0,0,12,13,5", "\n0,0,x,12,13,5", 1);
    std::fs::write(dir.join("data/digits.csv"), csv).expect("write");
    let plan = std::fs::read_to_string(root().join("examples/digits_mlp.plan")).expect("plan");
    std::fs::write(dir.join("p.plan"), plan).expect("write");
    let (ok, _, err) = run(&[dir.join("p.plan").to_str().expect("p"), "--steps", "1"]);
    assert!(!ok);
    assert!(err.contains("data::not_numeric") && err.contains("line 3"), "{err}");
}

#[test]
fn metrics_as_csv_and_profile() {
    let m = tmp("metrics.csv");
    let (ok, out, err) = run(&["examples/digits_mlp.plan", "--steps", "5", "--metrics", m.to_str().expect("p"), "--profile"]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&m).expect("metrics written");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "step,epoch,loss,lr,samples_per_s,wall_s");
    assert_eq!(lines.len(), 6);
    assert!(lines[1].starts_with("1,1,"), "{}", lines[1]);
    assert!(out.contains("profile:") && out.contains("matmul"), "{out}");
}
