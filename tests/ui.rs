//! Snapshot tests of rendered diagnostics: each `tests/ui/NAME.plan` is a bad
//! plan whose first line names the code it must produce,
//! `// error: shape::matmul_inner`. The test runs `shardplan check` on it,
//! requires exit status 1 and that code, and compares the rendered output
//! with its snapshot (bless with `INSTA_UPDATE=always cargo test --test ui`).

use std::process::Command;

fn render(rel: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardplan"))
        .args(["check", "--color", "never", rel])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the shardplan binary runs");
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.code(), text)
}

#[test]
fn ui() {
    let mut codes = std::collections::BTreeSet::new();
    insta::glob!("ui/*.plan", |path: &std::path::Path| {
        let name = path.file_name().and_then(|n| n.to_str()).expect("utf-8 file name");
        let rel = format!("tests/ui/{name}");
        let src = String::from_utf8_lossy(&std::fs::read(path).expect("readable ui file")).into_owned();
        let want = src
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("// error: "))
            .unwrap_or_else(|| panic!("{rel}: first line must be `// error: CODE`"))
            .trim()
            .to_string();
        let (status, text) = render(&rel);
        assert_eq!(status, Some(1), "{rel}: expected exit status 1, got {status:?}\n{text}");
        assert!(text.contains(&format!("{want}\n")) || text.contains(&format!("{want} ")), "{rel}: expected code `{want}` in\n{text}");
        assert!(!text.contains("panicked"), "{rel}: panicked\n{text}");
        codes.insert(want);
        insta::assert_snapshot!(text);
    });
    assert!(codes.len() >= 30, "only {} distinct error codes are covered: {codes:?}", codes.len());
}
