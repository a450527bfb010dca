//! Defects found by trying shardplan as a new user would: each is a clear
//! error or does what it says, never silently something else. These spawn
//! the binary because the command line (its usage errors, its exit codes,
//! what it prints) is what is under test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shardplan-new-user-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.join(name)
}

fn shardplan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardplan")).arg("--color").arg("never").args(args).current_dir(root()).output().expect("runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The digits example with its input (and first layer) `width` wide, in
/// `examples/` so its data path resolves.
fn digits_with_width(width: usize) -> PathBuf {
    let src = std::fs::read_to_string(root().join("examples/digits_mlp.plan")).expect("example");
    let changed = src.replace("input x: f32[batch, 64]", &format!("input x: f32[batch, {width}]")).replace("Linear(64, 128)", &format!("Linear({width}, 128)"));
    assert_ne!(src, changed, "the example changed shape; update this test");
    let p = root().join(format!("examples/.width{width}-{}.plan", std::process::id()));
    std::fs::write(&p, changed).expect("write");
    p
}

#[test]
fn zero_steps_are_usage_errors() {
    for args in [
        vec!["verify", "examples/data_parallel.plan", "--steps", "0"],
        vec!["run", "examples/digits_mlp.plan", "--steps", "0"],
        vec!["run", "examples/digits_mlp.plan", "--epochs", "0"],
    ] {
        let o = shardplan(&args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {t}");
        assert!(t.contains("must be at least 1"), "{args:?}: {t}");
        assert!(!t.contains("ok: the placement matches") && !t.contains("NaN"), "{args:?}: {t}");
    }
}

#[test]
fn verify_refuses_a_dimension_the_plan_does_not_have() {
    let o = shardplan(&["verify", "examples/data_parallel.plan", "--set", "foo=3"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("the plan has no dimension `foo`") && t.contains("`batch`"), "{t}");
    assert!(!t.contains("ok: the placement matches"), "{t}");
}

#[test]
fn data_narrower_than_the_input_is_reported_before_any_kernel() {
    let plan = digits_with_width(65);
    let p = plan.to_str().expect("utf-8");
    for args in [vec!["check", p], vec!["run", "--quiet", "--steps", "1", p]] {
        let o = shardplan(&args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {t}");
        assert!(t.contains("data::width_mismatch"), "{args:?}: {t}");
        assert!(t.contains("64 feature columns") && t.contains("input `x: f32[batch, 65]` takes 65") && t.contains("digits.csv"), "{args:?}: {t}");
        assert!(!t.contains("invalid kernel call"), "{args:?}: {t}");
    }
    let _ = std::fs::remove_file(plan);
}

#[test]
fn a_saved_checkpoint_initialises_a_run() {
    let ck = tmp("saved.safetensors");
    let o = shardplan(&["run", "--quiet", "--steps", "3", "examples/digits_mlp.plan", "--save", ck.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}", text(&o));
    let o = shardplan(&["run", "--quiet", "--steps", "2", "examples/digits_mlp.plan", "--init", ck.to_str().expect("utf-8")]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(t.matches("optimizer state").count(), 1, "{t}");
    assert!(t.contains("its optimizer state (") && t.contains("is left out"), "{t}");
}

/// The digits example written wholly in `dtype` (a layer of its own with
/// `dtype` parameters, a `dtype` input), in `examples/` so its data resolves.
fn digits_in(dtype: &str) -> PathBuf {
    let src = std::fs::read_to_string(root().join("examples/digits_mlp.plan")).expect("example");
    let layer = format!("layer Lin(i, o) {{\n  param w: {dtype}[i, o] = glorot_uniform\n  param b: {dtype}[o] = zeros\n  forward(x) = x @ w + b\n}}\n\n");
    let changed = src
        .replace("input x: f32[batch, 64]", &format!("input x: {dtype}[batch, 64]"))
        .replace("= Linear(", "= Lin(")
        .replace("model DigitsMlp {", &format!("{layer}model DigitsMlp {{"));
    let p = root().join(format!("examples/.{dtype}-{}.plan", std::process::id()));
    std::fs::write(&p, changed).expect("write");
    p
}

#[test]
fn reduced_precision_dtypes_are_refused_at_check() {
    // Written in f32 the plan checks, so the refusal is the dtype's.
    let f32_plan = digits_in("f32");
    let o = shardplan(&["check", f32_plan.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&f32_plan);
    assert!(o.status.success(), "{}", text(&o));
    for dtype in ["bf16", "f16", "f64"] {
        let p = digits_in(dtype);
        for args in [vec!["check", p.to_str().expect("utf-8")], vec!["run", "--quiet", "--steps", "1", p.to_str().expect("utf-8")]] {
            let o = shardplan(&args);
            let t = text(&o);
            assert_eq!(o.status.code(), Some(1), "{dtype} {args:?}: {t}");
            assert!(t.contains("dtype::unsupported") && t.contains(&format!("dtype `{dtype}` is not implemented")), "{dtype}: {t}");
            assert!(!t.contains("trained"), "{dtype}: {t}");
        }
        let _ = std::fs::remove_file(&p);
    }
}

#[test]
fn profile_covers_every_device_of_a_placed_plan() {
    let o = shardplan(&["run", "--quiet", "--steps", "2", "--profile", "examples/data_parallel.plan"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for d in 0..2 {
        assert!(t.contains(&format!("profile on device {d}: ")), "device {d}: {t}");
    }
    assert!(t.contains("all-reduce(data)"), "{t}");
}

/// `--no-eval` skips the evaluation on the test split; without it, the run reports it.
#[test]
fn no_eval_skips_the_evaluation() {
    let with = shardplan(&["run", "--quiet", "--steps", "1", "examples/digits_mlp.plan"]);
    let without = shardplan(&["run", "--quiet", "--steps", "1", "--no-eval", "examples/digits_mlp.plan"]);
    assert!(with.status.success() && without.status.success(), "{}{}", text(&with), text(&without));
    assert!(text(&with).contains("test  loss"), "{}", text(&with));
    assert!(!text(&without).contains("test  loss"), "{}", text(&without));
    assert!(text(&without).contains("train loss"), "{}", text(&without));
}

/// Started by a launcher (here: Open MPI's variables for rank 0 of 2), a
/// build without MPI refuses, rather than running the whole plan in every
/// process; commands other than `run` refuse under a launcher in any build.
#[test]
fn a_launcher_without_mpi_support_is_refused() {
    let launched = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shardplan"))
            .args(["--color", "never"])
            .args(args)
            .env("OMPI_COMM_WORLD_RANK", "0")
            .env("OMPI_COMM_WORLD_SIZE", "2")
            .current_dir(root())
            .output()
            .expect("runs")
    };
    let o = launched(&["check", "examples/tensor_parallel.plan"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("only `shardplan run` runs as one process per device"), "{}", text(&o));
    if cfg!(not(feature = "mpi")) {
        let o = launched(&["run", "--quiet", "--steps", "1", "examples/tensor_parallel.plan"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("run::no_mpi") && text(&o).contains("built without MPI"), "{}", text(&o));
        assert!(!text(&o).contains("trained"), "{}", text(&o));
        // `--launcher none` runs every device here, whatever the environment says.
        let o = launched(&["run", "--quiet", "--steps", "1", "--no-eval", "--launcher", "none", "examples/tensor_parallel.plan"]);
        assert!(o.status.success(), "{}", text(&o));
    }
}
