//! docs/language.md stays in step with the compiler: every diagnostic code
//! the compiler can emit is documented, and every plan snippet parses.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `"area::kind"` string literal in the sources.
fn codes_in_sources() -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut stack = vec![root().join("compiler/src"), root().join("runtime/src"), root().join("src")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("source dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).expect("source file");
            for piece in text.split('"').skip(1).step_by(2) {
                let mut parts = piece.split("::");
                let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else { continue };
                let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if word(a) && word(b) {
                    out.insert(piece.to_string());
                }
            }
        }
    }
    out
}

#[test]
fn every_diagnostic_code_is_documented() {
    let doc = std::fs::read_to_string(root().join("docs/language.md")).expect("docs/language.md");
    let codes = codes_in_sources();
    assert!(codes.len() > 60, "found only {} codes", codes.len());
    let missing: Vec<&String> = codes.iter().filter(|c| !doc.contains(&format!("`{c}`"))).collect();
    assert!(missing.is_empty(), "codes missing from docs/language.md: {missing:?}");
}

#[test]
fn plan_snippets_in_the_reference_parse() {
    let doc = std::fs::read_to_string(root().join("docs/language.md")).expect("docs/language.md");
    let items = ["layer ", "model ", "data ", "train ", "devices ", "placement"];
    let mut checked = 0;
    let mut in_block = false;
    let mut block = String::new();
    let mut failures = Vec::new();
    for line in doc.lines() {
        if line.starts_with("```") {
            if in_block {
                let first = block.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("//"));
                // Whole items only; fragments of a body are shown for illustration.
                if first.is_some_and(|f| items.iter().any(|i| f.starts_with(i))) && !block.contains('…') {
                    checked += 1;
                    if let Err(d) = shardplan_compiler::syntax::parse(shardplan_compiler::SourceId::USER, &block) {
                        failures.push(format!("{block}\n→ {:?}", d.iter().map(|d| &d.message).collect::<Vec<_>>()));
                    }
                }
                block.clear();
            }
            in_block = !in_block;
        } else if in_block {
            block.push_str(line);
            block.push('\n');
        }
    }
    assert!(checked >= 10, "only {checked} snippets found");
    assert!(failures.is_empty(), "snippets that do not parse:\n{}", failures.join("\n\n"));
}
