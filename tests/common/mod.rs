//! Helpers shared by the command-line tests.

#![allow(dead_code)]

use std::path::Path;

/// (step, loss as bits) of each line of a JSON-lines metrics file.
pub fn losses(path: &Path) -> Vec<(u64, u32)> {
    std::fs::read_to_string(path)
        .expect("metrics written")
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            let loss = v["loss"].as_f64().expect("loss") as f32;
            (v["step"].as_u64().expect("step"), loss.to_bits())
        })
        .collect()
}
