//! `placement auto` at the command line: the device profile file, and
//! `shardplan calibrate`, which writes one.

use shardplan_compiler::planner::Profile;
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
    let (p, report) = match shardplan_runtime::calibrate::calibrate(&mut |line| println!("{line}")) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error[calibrate::measure]: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match &report.unfitted {
        None => {
            let (e_mm, e_fused, e_kernel) = p.efficiencies();
            let [o_mm, o_fused, o_kernel] = p.call_costs().map(|o| o * 1e6);
            println!(
                "fitted on three reference steps: matmuls take {e_mm:.2}× the model's time and {o_mm:.2} µs per call, element-wise kernels {e_fused:.2}× and {o_fused:.2} µs, other kernels {e_kernel:.2}× and {o_kernel:.2} µs"
            );
            let (s, _) = p.throughput();
            println!(
                "on {} threads, kernels large enough to split run {s:.2}× as fast as on one, plus {:.1} µs each for the threads to meet",
                p.cores,
                p.split_cost.unwrap_or(0.0) * 1e6
            );
            if let Some(s) = p.devices_speedup {
                println!("{} single-threaded devices at once do the work of {s:.2} alone", p.cores);
            }
            if let Some(k) = p.crowding {
                println!("more devices than cores take turns, at {:.2}× the work", 1.0 + k);
            }
        }
        Some(e) => eprintln!("warning: the reference steps could not be run ({e}); the profile keeps the raw rates"),
    }
    let text = match serde_json::to_string_pretty(&p) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error[calibrate::write]: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    if let Err(e) = shardplan_runtime::atomic::write(out, format!("{text}\n").as_bytes()) {
        eprintln!("error[calibrate::write]: cannot write `{}`: {e}", out.display());
        return std::process::ExitCode::from(1);
    }
    println!("wrote {}", out.display());
    std::process::ExitCode::SUCCESS
}
