//! Training end to end: the digits MLP learns, the tiny GPT lowers its
//! loss, runs are bit-identical, and a resumed run continues exactly where
//! the uninterrupted one went, through the library as `shardplan run`
//! trains; bad checkpoints and data are clear errors, and metrics and
//! profiles are written, through the CLI, whose messages are under test.

mod common;

use shardplan_compiler::check::Length;
use shardplan_runtime::session::{Config, Start};
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

/// A session of `examples/NAME.plan`, for `steps` steps and with `seed`
/// when given (`run --steps`, `--seed`), its settings `configure`d.
fn session(name: &str, steps: Option<i64>, seed: Option<u64>, configure: impl FnOnce(&mut Config)) -> shardplan_runtime::session::Session {
    let text = std::fs::read_to_string(root().join(format!("examples/{name}.plan"))).expect("example");
    let edit = |c: &mut shardplan_compiler::Checked| {
        if let Some(s) = steps {
            c.train.length = Length::Steps(s);
        }
        if let Some(s) = seed {
            c.train.seed = s;
        }
    };
    common::session(&text, &root().join("examples"), edit, configure)
}

/// The losses of training `examples/NAME.plan` as [`session`] sets it up, as bits.
fn losses(name: &str, steps: Option<i64>, seed: Option<u64>, configure: impl FnOnce(&mut Config), save: Option<&Path>) -> Vec<u32> {
    common::train(&mut session(name, steps, seed, configure), save).iter().map(|l| l.to_bits()).collect()
}

#[test]
fn digits_mlp_reaches_90_percent() {
    let mut s = session("digits_mlp", None, None, |_| {});
    let l = common::train(&mut s, None);
    let e = s.evaluate().unwrap_or_else(|e| panic!("{}: {e}", e.code())).expect("a test split");
    let acc = e.accuracy.expect("a classifier") * 100.0;
    assert!(acc >= 90.0, "test accuracy {acc}% < 90% (loss {} after {} steps)", e.loss, l.len());
}

#[test]
fn tiny_gpt_lowers_its_loss_by_30_percent() {
    let l = common::train(&mut session("tiny_gpt", None, None, |_| {}), None);
    let first = l[0];
    let n = l.len();
    let last: f32 = l[n - 10..].iter().sum::<f32>() / 10.0;
    assert!(last <= 0.7 * first, "loss went from {first} to {last} (mean of the last 10 steps)");
}

#[test]
fn llama_lowers_its_loss_by_30_percent() {
    let l = common::train(&mut session("llama", None, None, |_| {}), None);
    let first = l[0];
    let n = l.len();
    let last: f32 = l[n - 10..].iter().sum::<f32>() / 10.0;
    assert!(last <= 0.7 * first, "loss went from {first} to {last} (mean of the last 10 steps)");
}

/// The CNN example, data parallel over 4 devices, reaches at least the
/// accuracy of the MLP of digits_mlp.plan on the same held-out rows.
#[test]
fn cnn_reaches_the_mlps_accuracy() {
    let accuracy = |name: &str| {
        let mut s = session(name, None, None, |_| {});
        common::train(&mut s, None);
        s.evaluate().unwrap_or_else(|e| panic!("{}: {e}", e.code())).expect("a test split").accuracy.expect("a classifier")
    };
    let (mlp, cnn) = (accuracy("digits_mlp"), accuracy("cnn_digits"));
    assert!(cnn >= mlp, "the CNN scores {:.2}%, the MLP {:.2}%", cnn * 100.0, mlp * 100.0);
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let (la, lb) = (losses("digits_mlp", Some(60), None, |_| {}, None), losses("digits_mlp", Some(60), None, |_| {}, None));
    assert_eq!(la.len(), 60);
    assert_eq!(la, lb);
    assert_ne!(losses("digits_mlp", Some(60), Some(8), |_| {}, None), la, "another seed gives another run");
}

#[test]
fn resumed_run_continues_bit_for_bit() {
    for plan in ["digits_mlp", "tiny_gpt"] {
        let ck = tmp(&format!("{plan}-half.safetensors"));
        let full = losses(plan, Some(40), None, |_| {}, None);
        let half = losses(plan, Some(40), None, |c| c.stop_after = Some(17), Some(&ck));
        assert_eq!(half.len(), 17, "{plan}");
        let rest = losses(plan, Some(40), None, |c| c.start = Start::Resume { path: ck.clone(), seed_given: false }, None);
        assert_eq!(rest.len(), 23, "{plan}");
        assert_eq!(&full[17..], &rest[..], "{plan}: resumed losses differ");
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
    let (ok, _, err) = run(&["examples/tiny_gpt.plan", "--steps", "1", "--no-eval", "--save", gpt.to_str().expect("p")]);
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

/// A token file (uint16 and uint32 ids) of the bytes of tiny.txt trains
/// exactly as the byte-level text source does: the same windows, the same
/// losses, bit for bit.
#[test]
fn token_files_train_like_the_text_they_encode() {
    let text = std::fs::read(root().join("examples/data/tiny.txt")).expect("tiny.txt");
    let plan = |source: &str| {
        std::fs::read_to_string(root().join("examples/tiny_gpt.plan"))
            .expect("example")
            .replace(r#"text("data/tiny.txt", train: 0..30000, test: 30000..)"#, source)
            .replace("steps: 300", "steps: 4")
    };
    let reference = plan(r#"text("data/tiny.txt", train: 0..30000, test: 30000..)"#);
    assert!(reference.contains("steps: 4"), "the example changed: {reference}");
    let want = common::train_text(&reference, &root().join("examples"), |_| {}, None);
    for (dtype, width) in [("uint16", 2), ("uint32", 4)] {
        let file = tmp(&format!("tiny.{dtype}.bin"));
        let ids: Vec<u8> =
            text.iter().flat_map(|&b| if width == 2 { u16::from(b).to_le_bytes().to_vec() } else { u32::from(b).to_le_bytes().to_vec() }).collect();
        std::fs::write(&file, ids).expect("write");
        let source = format!(r#"tokens("{}", dtype: "{dtype}", train: 0..30000, test: 30000..)"#, file.display());
        let got = common::train_text(&plan(&source), &root().join("examples"), |_| {}, None);
        assert_eq!(got.len(), 4);
        assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{dtype}");
    }
}

/// A layer the loss never calls keeps its initial parameters (it gets no
/// gradient, as in PyTorch), on one device and placed alike, and its
/// parameters reach the checkpoint: a single-device save used to fail on
/// them and a placed one wrote zeros.
#[test]
fn an_unused_layer_keeps_its_parameters_in_checkpoints() {
    let plan = |placement: &str| {
        format!(
            "model M {{\n  input x: f32[batch, 64]\n  input label: i32[batch]\n  layer fc1 = Linear(64, 32)\n  layer spare = Linear(32, 32)\n  layer out = Linear(32, 10)\n  loss cross_entropy(out(relu(fc1(x))), label)\n}}\n\
             data digits = csv(\"data/digits.csv\", label: \"label\", scale: 1/16, train: 0..1500, test: 1500..)\n\
             train {{ model: M, data: digits, batch: 64, steps: 3, optimizer: adamw(lr: 0.01), seed: 7 }}\n{placement}\n"
        )
    };
    let base = root().join("examples");
    let tensors = |path: &Path| -> Vec<(String, Vec<f32>)> {
        let (t, _) = shardplan_runtime::checkpoint::load(path).unwrap_or_else(|e| panic!("{e}"));
        t.into_iter().map(|t| (t.name, t.data)).collect()
    };
    let get = |ts: &[(String, Vec<f32>)], name: &str| ts.iter().find(|(n, _)| n == name).map(|(_, d)| d.clone()).unwrap_or_else(|| panic!("{name} missing"));
    let (one, placed, early) = (tmp("unused-one.safetensors"), tmp("unused-placed.safetensors"), tmp("unused-early.safetensors"));
    common::train_text(&plan(""), &base, |_| {}, Some(&one));
    common::train_text(&plan("devices cpu x 2\nplacement {\n  mesh (data: 2)\n  data_parallel over data\n}"), &base, |_| {}, Some(&placed));
    common::train_text(&plan(""), &base, |c| c.stop_after = Some(1), Some(&early));
    let (one, placed, early) = (tensors(&one), tensors(&placed), tensors(&early));
    let w = get(&one, "spare.w");
    assert!(w.iter().any(|x| *x != 0.0), "spare.w was saved as zeros");
    assert_eq!(w, get(&placed, "spare.w"), "placed and single-device runs save different unused parameters");
    assert_eq!(w, get(&early, "spare.w"), "an unused parameter changed during training");
    assert_ne!(get(&one, "fc1.w"), get(&early, "fc1.w"), "the used parameters trained");
}

/// A token file with an id the model has no class for, or a length that is
/// not a whole number of ids, stops `run` with one located error, rendered
/// as a snapshot (run from the scratch folder, so paths are relative).
#[test]
fn bad_token_files_are_rendered_errors() {
    let llama = std::fs::read_to_string(root().join("examples/llama.plan")).expect("example");
    let mut rendered = String::new();
    for (name, bytes) in
        [("out_of_range.bin", [1u16, 2, 600, 3, 4, 5, 6, 7].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()), ("odd.bin", vec![1, 0, 2, 0, 3])]
    {
        let file = tmp(name);
        std::fs::write(&file, &bytes).expect("write");
        let plan = llama
            .replace(r#"tokens("data/tiny_tokens.bin", dtype: "uint16", train: 0..12800, test: 12800..)"#, &format!(r#"tokens("{name}", dtype: "uint16")"#))
            .replace("seq: 64", "seq: 2")
            .replace("batch: 16", "batch: 2");
        let plan_name = format!("{name}.plan");
        std::fs::write(tmp(&plan_name), plan).expect("write plan");
        let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
            .args(["run", "--quiet", &plan_name, "--steps", "1", "--color", "never"])
            .current_dir(file.parent().expect("scratch folder"))
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        rendered.push_str(&err);
    }
    insta::assert_snapshot!(rendered);
}
