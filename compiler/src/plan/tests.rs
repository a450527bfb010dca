//! Compiled plan documents: every example round-trips and validates, and
//! hostile edits are refused with a located error, never a panic.

use super::*;
use crate::{check_source, compile, Checked, Options};
use serde_json::Value;

/// The plan files of the examples, by name.
fn examples() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("examples")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "plan"))
        .map(|p| (p.file_stem().unwrap_or_default().to_string_lossy().into_owned(), std::fs::read_to_string(&p).expect("plan")))
        .collect();
    out.sort();
    assert!(out.len() >= 5, "found {} examples", out.len());
    out
}

fn checked(source: &str) -> Checked {
    let (c, d) = check_source(source.as_bytes());
    c.unwrap_or_else(|| panic!("the example checks: {d:?}"))
}

/// The compiled document of `source`, as `shardplan compile` writes it.
fn document(source: &str) -> (Checked, String) {
    let c = checked(source);
    let compiled = compile(&c, &Options::default()).expect("compiles");
    let text = encode(&Document::new(source.to_string(), "/plans".into(), &compiled)).expect("encodes");
    (c, text)
}

fn example(name: &str) -> String {
    examples().into_iter().find(|e| e.0 == name).map(|e| e.1).expect("the example")
}

/// `text` with the plan at `pointer` set to `value`, its hash recomputed when `rehash`.
fn edited(text: &str, pointer: &str, value: Value, rehash: bool) -> Option<String> {
    let mut v: Value = serde_json::from_str(text).expect("json");
    *v.pointer_mut(pointer)? = value;
    let text = serde_json::to_string_pretty(&v).expect("json");
    if !rehash {
        return Some(text);
    }
    let mut doc = parse(text.as_bytes()).ok()?;
    doc.plan.hash = partition::plan_hash(&doc.plan);
    Some(encode(&doc).expect("encodes"))
}

/// Decodes and validates `text` as `shardplan run` does.
fn read(text: &str, c: &Checked) -> Result<Document, PlanFileError> {
    let doc = decode(text.as_bytes())?;
    validate(&doc.plan, c).map_err(|e| e.located(text.as_bytes()))?;
    Ok(doc)
}

#[test]
fn every_example_round_trips_and_validates() {
    for (name, source) in examples() {
        let (c, text) = document(&source);
        let doc = read(&text, &c).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(doc.source, source, "{name}");
        assert_eq!(doc.base, "/plans", "{name}");
        assert_eq!(partition::plan_hash(&doc.plan), doc.plan.hash, "{name}");
        // Written again, it is the same text.
        assert_eq!(encode(&doc).expect("encodes"), text, "{name}");
    }
}

#[test]
fn the_hash_covers_the_whole_plan() {
    let (_, text) = document(&example("pipeline_1f1b"));
    let doc = decode(text.as_bytes()).expect("decodes");
    for (pointer, value) in [
        ("/plan/mesh/axes/0/1", Value::from(3)),
        ("/plan/mesh/pipe", Value::Null),
        ("/plan/mesh/data", Value::from(0)),
        ("/plan/layout_axes/0/size", Value::from(2)),
        ("/plan/microbatches", Value::from(2)),
        ("/plan/schedule", Value::from("gpipe")),
        ("/plan/server", Value::from(1)),
        ("/plan/param_layouts/0/0", Value::from(1)),
        ("/plan/devices/1/slots", Value::from(2)),
    ] {
        let text = edited(&text, pointer, value, false).expect(pointer);
        let e = decode(text.as_bytes()).expect_err(pointer);
        assert_eq!(e.code, "plan::hash", "{pointer}");
        assert_eq!(e.pointer.as_deref(), Some("/plan/hash"));
        assert!(e.at.is_some(), "{pointer}: {e:?}");
    }
    assert!(decode(text.as_bytes()).is_ok_and(|d| d.plan.hash == doc.plan.hash));
}

#[test]
fn mesh_edits_are_refused_where_they_are() {
    let sources = ["auto", "pipeline_1f1b", "parameter_server", "tensor_parallel", "digits_mlp"].map(|n| (n.to_string(), example(n)));
    for (name, source) in sources.into_iter().chain([("small_mesh".to_string(), small_mesh())]) {
        let (c, text) = document(&source);
        let original: Value = serde_json::from_str(&text).expect("json");
        for (field, value) in [("data", 99), ("pipe", 99), ("data", 0), ("pipe", 0), ("data", 1), ("pipe", 1)] {
            let pointer = format!("/plan/mesh/{field}");
            if original.pointer(&pointer) == Some(&Value::from(value)) {
                continue;
            }
            let text = edited(&text, &pointer, value.into(), true).expect("edited");
            let e = read(&text, &c).expect_err(&format!("{name}: {field} = {value}"));
            assert_eq!(e.code, "plan::invalid", "{name}: {field} = {value}: {e}");
            assert_eq!(e.pointer.as_deref(), Some(pointer.as_str()), "{name}: {field} = {value}: {e}");
            let (line, _) = e.at.unwrap_or_else(|| panic!("{name}: {field} = {value}: not located: {e}"));
            assert!(text.lines().nth(line - 1).is_some_and(|l| l.contains(&format!("\"{field}\""))), "{name}: {field} = {value}: line {line}");
        }
    }
}

#[test]
fn an_auto_mesh_must_be_one_the_planner_makes() {
    let source = example("auto");
    let (c, text) = document(&source);
    for (pointer, value) in [
        ("/plan/mesh/axes", serde_json::json!([["data", 4]])),
        ("/plan/mesh/axes", serde_json::json!([["pipe", 2], ["data", 2]])),
        ("/plan/mesh/axes", serde_json::json!([["data", 2], ["pipe", 3]])),
        ("/plan/mesh/axes", serde_json::json!([["data", 2], ["pipe", 1]])),
        ("/plan/mesh/axes", serde_json::json!([])),
        ("/plan/microbatches", Value::from(0)),
        ("/plan/microbatches", Value::from(u64::MAX)),
        ("/plan/schedule", Value::Null),
        ("/plan/schedule", Value::from("zigzag")),
        ("/plan/server", Value::from(0)),
    ] {
        let text = edited(&text, pointer, value.clone(), true).expect(pointer);
        let e = read(&text, &c).expect_err(&format!("{pointer} = {value}"));
        assert_eq!(e.code, "plan::invalid", "{pointer} = {value}: {e}");
    }
}

/// The digits MLP over a data-parallel, tensor-parallel and pipelined mesh:
/// a small plan with every kind of axis.
fn small_mesh() -> String {
    let mlp = example("tensor_parallel");
    let head = &mlp[..mlp.find("devices ").expect("devices")];
    format!(
        "{head}devices cpu x 8

placement {{
  mesh (data: 2, model: 2, pipe: 2)
  data_parallel over data
  shard fc1.w (_, model)
  shard fc1.b (model)
  shard fc2.w (model, _)
  pipeline over pipe {{
    stage fc1
    stage fc2, out
    microbatches 4
    schedule 1f1b
  }}
}}
"
    )
}

/// Numbers of the plan (every fifth outside the programs, every 61st
/// inside them) set to hostile values, with the hash recomputed:
/// decoding and validating never panics.
#[test]
fn hostile_numbers_never_panic() {
    for source in [small_mesh(), example("parameter_server")] {
        let (c, text) = document(&source);
        let v: Value = serde_json::from_str(&text).expect("json");
        let mut leaves = Vec::new();
        numbers(&v["plan"], "/plan".to_string(), &mut leaves);
        let (mut outside, mut inside) = (0, 0);
        for pointer in leaves {
            let (count, every) = if pointer.contains("/program/") { (&mut inside, 61) } else { (&mut outside, 5) };
            *count += 1;
            if *count % every != 0 {
                continue;
            }
            for value in [Value::from(0), Value::from(99), Value::from(u64::MAX)] {
                if v.pointer(&pointer) == Some(&value) {
                    continue;
                }
                // Values of the wrong type are refused by `parse`; the rest,
                // with the hash brought up to date (so `decode` would pass
                // them on), are validated.
                let mut edit = v.clone();
                let Some(slot) = edit.pointer_mut(&pointer) else { continue };
                *slot = value;
                if let Ok(mut doc) = parse(&serde_json::to_vec(&edit).expect("json")) {
                    doc.plan.hash = partition::plan_hash(&doc.plan);
                    let _ = validate(&doc.plan, &c);
                }
            }
        }
    }
}

fn numbers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Number(_) => out.push(at),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| numbers(x, format!("{at}/{i}"), out)),
        Value::Object(o) => o.iter().for_each(|(k, x)| numbers(x, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out)),
        _ => {}
    }
}

#[test]
fn damaged_documents_are_json_errors() {
    let (_, text) = document(&example("tensor_parallel"));
    let e = decode(&text.as_bytes()[..text.len() / 2]).expect_err("truncated");
    assert_eq!(e.code, "plan::json");
    assert!(e.at.is_some());
    for bad in [&b"{}"[..], b"[1, 2]", b"{\"format\": \"other\"}", b"{\"format\": 1}", b""] {
        assert_eq!(decode(bad).expect_err("refused").code, "plan::json");
    }
}
