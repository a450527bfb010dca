//! Compiled plans: `shardplan compile` writes the device programs as JSON,
//! `shardplan run OUT.json` trains them bit for bit like the plan file, and
//! a damaged or edited file is refused with its diagnostic, never a panic.

mod common;

use shardplan_compiler::partition::plan_hash;
use shardplan_compiler::plan;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shardplan-compiled-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.join(name)
}

fn shardplan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardplan")).args(args).current_dir(root()).output().expect("runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Compiles `examples/NAME.plan` (on two devices) and returns the compiled file.
fn compile(name: &str) -> PathBuf {
    compile_on(name, 2)
}

/// Compiles `examples/NAME.plan` on `devices` devices and returns the compiled file.
fn compile_on(name: &str, devices: usize) -> PathBuf {
    let out = tmp(&format!("{name}.json"));
    let o = shardplan(&["compile", &format!("examples/{name}.plan"), "-o", path(&out)]);
    assert!(o.status.success(), "compile {name}: {}", text(&o.stderr));
    let stdout = text(&o.stdout);
    let plural = if devices == 1 { "" } else { "s" };
    assert!(stdout.starts_with(&format!("{}: {devices} device{plural}, ", out.display())), "{stdout}");
    let hash = stdout.trim_end().rsplit(", ").next().unwrap_or_default();
    assert!(hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()), "{stdout}");
    out
}

use common::losses;

#[test]
fn a_compiled_plan_trains_like_its_plan_file() {
    for (name, devices) in [("tensor_parallel", 2), ("pipeline_1f1b", 2), ("digits_mlp", 1)] {
        let json = compile_on(name, devices);
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("written")).expect("json");
        assert_eq!(doc["format"], "shardplan-plan-1");
        // Data paths resolve against the plan file's directory, recorded absolute.
        let examples = root().join("examples").canonicalize().expect("examples");
        assert_eq!(doc["base"].as_str(), examples.to_str());
        assert_eq!(doc["source"].as_str(), std::fs::read_to_string(root().join(format!("examples/{name}.plan"))).ok().as_deref());
        let (a, b) = (tmp(&format!("{name}.compiled.jsonl")), tmp(&format!("{name}.plan.jsonl")));
        let o = shardplan(&["run", path(&json), "--quiet", "--no-eval", "--steps", "5", "--metrics", path(&a)]);
        assert!(o.status.success(), "run {name}.json: {}", text(&o.stderr));
        let o = shardplan(&["run", &format!("examples/{name}.plan"), "--quiet", "--no-eval", "--steps", "5", "--metrics", path(&b)]);
        assert!(o.status.success(), "run {name}.plan: {}", text(&o.stderr));
        let (la, lb) = (losses(&a), losses(&b));
        assert_eq!(la.len(), 5, "{name}");
        assert_eq!(la, lb, "{name}: the compiled plan trains differently");
    }
}

/// Runs a compiled plan of `contents` and expects a refusal with `code`.
fn refused(name: &str, contents: &[u8], code: &str) -> String {
    let file = tmp(&format!("{name}.json"));
    std::fs::write(&file, contents).expect("write");
    let o = shardplan(&["run", path(&file), "--quiet", "--steps", "1"]);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{name}: {stderr}");
    assert!(stderr.contains(code), "{name}: expected {code} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    stderr
}

/// The document with its plan's hash recomputed, as a well-meaning edit would leave it.
fn rehashed(doc: serde_json::Value) -> Vec<u8> {
    let mut doc = plan::parse(&serde_json::to_vec_pretty(&doc).expect("json")).expect("a compiled plan");
    doc.plan.hash = plan_hash(&doc.plan);
    plan::encode(&doc).expect("json").into_bytes()
}

#[test]
fn damaged_and_edited_plans_are_refused() {
    let json = compile("tensor_parallel");
    let bytes = std::fs::read(&json).expect("written");
    let doc: serde_json::Value = serde_json::from_slice(&bytes).expect("json");

    let stderr = refused("truncated", &bytes[..bytes.len() / 2], "plan::json");
    assert!(stderr.contains("line ") && stderr.contains("column "), "{stderr}");

    let mut other = doc.clone();
    other["format"] = "other".into();
    refused("format", &serde_json::to_vec(&other).expect("json"), "plan::json");
    refused("no_format", b"{}", "plan::json");
    refused("not_an_object", b"[1, 2]", "plan::json");

    let mut edited = doc.clone();
    let hash = edited["plan"]["hash"].as_u64().expect("hash");
    edited["plan"]["hash"] = (hash ^ 1).into();
    let stderr = refused("hash", &serde_json::to_vec(&edited).expect("json"), "plan::hash");
    assert!(stderr.contains("changed after it was compiled"), "{stderr}");

    // An edited program whose hash was brought up to date.
    let mut wild = doc.clone();
    wild["plan"]["devices"][0]["program"]["steps"][0]["output"] = 999999.into();
    let stderr = refused("wild_buffer", &rehashed(wild), "plan::invalid");
    assert!(stderr.contains("device 0") && stderr.contains("999999"), "{stderr}");

    // Hostile values: a negative id, a huge number, an empty plan, a huge buffer, an alias loop, a stray slot.
    let mut negative = doc.clone();
    negative["plan"]["devices"][1]["program"]["loss"] = (-1).into();
    refused("negative", &serde_json::to_vec(&negative).expect("json"), "plan::json");
    let mut huge = doc.clone();
    huge["plan"]["microbatches"] = serde_json::Value::from(1e300);
    refused("huge", &serde_json::to_vec(&huge).expect("json"), "plan::json");
    let mut empty = doc.clone();
    empty["plan"] = serde_json::json!({});
    refused("empty_plan", &serde_json::to_vec(&empty).expect("json"), "plan::json");
    let mut big = doc.clone();
    big["plan"]["devices"][0]["program"]["buffers"][0]["shape"] = serde_json::json!([u32::MAX, u32::MAX]);
    refused("big_buffer", &rehashed(big), "plan::invalid");
    let mut alias = doc.clone();
    alias["plan"]["devices"][1]["program"]["buffers"][0]["kind"] = serde_json::json!({ "Alias": 0 });
    refused("alias_loop", &rehashed(alias), "plan::invalid");
    let mut slot = doc.clone();
    slot["plan"]["devices"][0]["schedule"][0]["slot"] = 7.into();
    refused("slot", &rehashed(slot), "plan::invalid");
}

#[test]
fn an_auto_plan_compiles_to_the_plan_the_search_chooses() {
    let out = tmp("auto.json");
    let o = shardplan(&["compile", "examples/auto.plan", "-o", path(&out)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains(": 4 devices, "), "{}", text(&o.stdout));
    let (a, b) = (tmp("auto.compiled.jsonl"), tmp("auto.plan.jsonl"));
    let o = shardplan(&["run", path(&out), "--quiet", "--no-eval", "--steps", "3", "--metrics", path(&a)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = shardplan(&["run", "examples/auto.plan", "--quiet", "--no-eval", "--steps", "3", "--metrics", path(&b)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(losses(&a), losses(&b), "the compiled choice trains like the searched one");
}

/// Where a refusal points: the line of the file its label is on.
fn pointed_line(stderr: &str, file: &Path, contents: &[u8]) -> String {
    let shown = format!("[{}:", file.display());
    let at = stderr.find(&shown).unwrap_or_else(|| panic!("no location in:\n{stderr}")) + shown.len();
    let line: usize = stderr[at..].split(':').next().and_then(|l| l.parse().ok()).unwrap_or_else(|| panic!("no line in:\n{stderr}"));
    text(contents).lines().nth(line - 1).unwrap_or_default().trim().to_string()
}

#[test]
fn edited_meshes_are_refused_where_they_are() {
    for (name, devices) in [("auto", 4), ("pipeline_1f1b", 2)] {
        let json = compile_on(name, devices);
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("written")).expect("json");
        for field in ["data", "pipe"] {
            let mut edited = doc.clone();
            edited["plan"]["mesh"][field] = 99.into();
            // As edited: the hash no longer matches.
            let case = format!("{name}_{field}_99");
            let bytes = serde_json::to_vec_pretty(&edited).expect("json");
            let stderr = refused(&case, &bytes, "plan::hash");
            assert!(stderr.contains("changed after it was compiled"), "{case}: {stderr}");
            assert!(pointed_line(&stderr, &tmp(&format!("{case}.json")), &bytes).starts_with("\"hash\":"), "{case}: {stderr}");
            // With the hash brought up to date, validation refuses it.
            let case = format!("{name}_{field}_99_rehashed");
            let bytes = rehashed(edited);
            let stderr = refused(&case, &bytes, "plan::invalid");
            let what = if field == "data" { "its data axis is axis 99" } else { "its pipeline axis is axis 99" };
            assert!(stderr.contains(what), "{case}: {stderr}");
            let line = pointed_line(&stderr, &tmp(&format!("{case}.json")), &bytes);
            assert_eq!(line.trim_end_matches(','), format!("\"{field}\": 99"), "{case}: {stderr}");
            assert!(!stderr.contains("stack backtrace"), "{case}: {stderr}");
        }
    }
}

#[test]
fn a_compiled_plan_runs_from_anywhere() {
    let json = compile("tensor_parallel");
    let elsewhere = tmp("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("dir");
    std::fs::copy(&json, elsewhere.join("plan.json")).expect("copied");
    let metrics = tmp("elsewhere.jsonl");
    let o = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["run", "plan.json", "--quiet", "--no-eval", "--steps", "3", "--metrics", path(&metrics)])
        .current_dir(&elsewhere)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let here = tmp("here.jsonl");
    let o = shardplan(&["run", path(&json), "--quiet", "--no-eval", "--steps", "3", "--metrics", path(&here)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(losses(&metrics), losses(&here));

    // Data that is not where the plan was compiled: the help says where it looked, and why.
    let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("written")).expect("json");
    let gone = tmp("gone");
    doc["base"] = path(&gone).into();
    let stderr = refused("moved_data", &serde_json::to_vec_pretty(&doc).expect("json"), "data::missing_file");
    let looked = gone.join("data").join("digits.csv");
    assert!(stderr.contains(&format!("cannot read `{}`", looked.display())), "{stderr}");
    let help = stderr.split("help:").nth(1).unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains(&format!("relative to `{}`, the directory of the plan file it was compiled from", gone.display())), "{stderr}");
}

/// A compiled plan written as one line of JSON (as `json.dump` leaves it),
/// edited deep inside a program: refused with the place named by line and
/// column, never a panic (the snippet renderer cannot pad that far).
#[test]
fn an_edit_of_a_one_line_plan_is_named_by_line_and_column() {
    let json = compile_on("cnn_digits", 4);
    let mut doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("written")).expect("json");
    let stride = doc["plan"]["devices"][3]["program"]["steps"]
        .as_array_mut()
        .and_then(|steps| steps.iter_mut().find_map(|s| s.pointer_mut("/kind/Op/Im2Col/stride")))
        .expect("an Im2Col step");
    *stride = serde_json::Value::from(0);
    let line = serde_json::to_vec(&doc).expect("json");
    let stderr = refused("one_line", &line, "plan::hash");
    assert!(stderr.contains("one_line.json:1:"), "{stderr}");
}
