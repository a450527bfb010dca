//! Syntax: plan text → AST.
//!
//! Input: the bytes of one source. Output: an [`ast::File`] whose every node
//! has a span, or diagnostics. Never panics, on any input: text that is not
//! UTF-8, unbalanced comments and strings, nesting deep enough to exhaust a
//! stack and numbers that overflow all become diagnostics with a location.

pub mod ast;
mod lower;

use crate::diag::{Diagnostic, Diagnostics, SourceId, Span};
use pest::Parser as _;

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/shardplan.pest"]
pub(crate) struct PlanParser;

/// Deepest nesting of brackets accepted. Real plans stay below 20.
pub const MAX_NESTING: usize = 64;

/// Parses one source text.
pub fn parse(src: SourceId, text: &str) -> Result<ast::File, Diagnostics> {
    prescan(src, text)?;
    pest::set_error_detail(true);
    pest::set_call_limit(std::num::NonZeroUsize::new(50_000_000));
    let pairs = PlanParser::parse(Rule::file, text).map_err(|e| Diagnostics::from(syntax_error(src, text, &e)))?;
    lower::file(src, pairs)
}

/// Decodes bytes as UTF-8, pointing at the first invalid byte otherwise.
pub fn decode(src: SourceId, bytes: &[u8]) -> Result<&str, Diagnostic> {
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        Diagnostic::error("syntax::invalid_utf8", "the file is not valid UTF-8 text")
            .label(Span::new(src, at, at + 1), "this byte does not start a UTF-8 character")
            .help("save the plan as UTF-8 text")
    })
}

/// Checks what a PEG parser reports badly: unterminated comments and strings,
/// and nesting too deep for the recursive parts of the compiler.
fn prescan(src: SourceId, text: &str) -> Result<(), Diagnostics> {
    let bytes = text.as_bytes();
    let mut stack: Vec<(u8, usize)> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => match text[i + 2..].find("*/") {
                Some(end) => {
                    i += end + 4;
                    continue;
                }
                None => {
                    return Err(Diagnostic::error("syntax::unterminated_comment", "block comment is never closed")
                        .label(Span::new(src, i, i + 2), "this `/*` has no matching `*/`")
                        .help("add `*/` where the comment ends")
                        .into())
                }
            },
            b'"' => {
                let mut j = i + 1;
                while j < bytes.len() && bytes[j] != b'"' && bytes[j] != b'\n' {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                if j >= bytes.len() || bytes[j] != b'"' {
                    return Err(Diagnostic::error("syntax::unterminated_string", "string is never closed")
                        .label(Span::new(src, i, i + 1), "this string has no closing `\"` on its line")
                        .help("add a `\"` where the string ends; an odd number of quotes on this line means one is missing, possibly earlier")
                        .into());
                }
                i = j + 1;
                continue;
            }
            b'-' => {
                // A run of prefix minus signs recurses in the parser like brackets do.
                let mut j = i;
                let mut run = 0;
                while j < bytes.len() && (bytes[j] == b'-' || bytes[j].is_ascii_whitespace()) {
                    run += usize::from(bytes[j] == b'-');
                    j += 1;
                }
                if run > MAX_NESTING {
                    return Err(Diagnostic::error("syntax::too_deep", format!("more than {MAX_NESTING} minus signs in a row"))
                        .label(Span::new(src, i, j), "nesting limit reached here")
                        .help("write the sign once: `--x` is `x`")
                        .into());
                }
                i = j;
                continue;
            }
            open @ (b'(' | b'[' | b'{') => {
                stack.push((open, i));
                if stack.len() > MAX_NESTING {
                    return Err(Diagnostic::error("syntax::too_deep", format!("brackets nest more than {MAX_NESTING} deep"))
                        .label(Span::new(src, i, i + 1), "nesting limit reached here")
                        .help("split the expression with `let` bindings")
                        .into());
                }
            }
            close @ (b')' | b']' | b'}') => {
                let want = match close {
                    b')' => b'(',
                    b']' => b'[',
                    _ => b'{',
                };
                match stack.pop() {
                    Some((open, _)) if open == want => {}
                    Some((open, at)) => {
                        return Err(Diagnostic::error("syntax::unbalanced", format!("`{}` closes `{}`", close as char, open as char))
                            .label(Span::new(src, i, i + 1), "this closing bracket")
                            .label(Span::new(src, at, at + 1), "does not match this one")
                            .help(format!("close the `{}` with `{}` first", open as char, closing(open)))
                            .into())
                    }
                    None => {
                        return Err(Diagnostic::error("syntax::unbalanced", format!("unmatched `{}`", close as char))
                            .label(Span::new(src, i, i + 1), "nothing was opened here")
                            .help("remove it, or add the opening bracket it closes")
                            .into())
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    if let Some((open, at)) = stack.pop() {
        return Err(Diagnostic::error("syntax::unbalanced", format!("`{}` is never closed", open as char))
            .label(Span::new(src, at, at + 1), "opened here")
            .label(Span::new(src, text.len(), text.len()), "the file ends here")
            .help(format!("add `{}` where it ends", closing(open)))
            .into());
    }
    Ok(())
}

fn closing(open: u8) -> char {
    match open {
        b'(' => ')',
        b'[' => ']',
        _ => '}',
    }
}

/// Turns a pest error into a diagnostic naming what was expected in words.
fn syntax_error(src: SourceId, text: &str, e: &pest::error::Error<Rule>) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let pos = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    let mut expected: Vec<String> = Vec::new();
    fn add(expected: &mut Vec<String>, s: String) {
        if !expected.contains(&s) {
            expected.push(s);
        }
    }
    let mut pos = pos;
    if let Some(attempts) = e.parse_attempts() {
        pos = attempts.max_position.max(pos);
        for tok in attempts.expected_tokens() {
            // Literal tokens display as themselves; character ranges as `a..z`.
            let token = tok.to_string();
            let is_range = token.chars().count() == 4 && token.chars().skip(1).take(2).all(|c| c == '.');
            if !is_range && token != "BUILTIN_RULE" {
                if let Some(t) = describe_literal(&token) {
                    add(&mut expected, t);
                }
            }
        }
        for stack in attempts.call_stacks() {
            if let Some(rule) = stack.deepest.get_rule().or(stack.parent.as_ref()) {
                if let Some(t) = describe_rule(*rule) {
                    add(&mut expected, t.to_string());
                }
            }
        }
    }
    if expected.is_empty() {
        if let ErrorVariant::ParsingError { positives, .. } = &e.variant {
            for r in positives {
                if let Some(t) = describe_rule(*r) {
                    add(&mut expected, t.to_string());
                }
            }
        }
    }
    let pos = pos.min(text.len());
    let found = found_token(text, pos);
    let (end, found_desc) = match found {
        Some(tok) => (pos + tok.len(), format!("`{tok}`")),
        None => (pos, "the end of the file".to_string()),
    };
    if let ErrorVariant::CustomError { message } = &e.variant {
        return Diagnostic::error("syntax::too_complex", format!("the parser gave up: {message}"))
            .label(Span::new(src, pos, end), "here")
            .help("simplify the file; split long expressions with `let`");
    }
    let want = join_or(&expected);
    let message = if want.is_empty() { format!("unexpected {found_desc}") } else { format!("expected {want}, found {found_desc}") };
    let mut d = Diagnostic::error("syntax::unexpected", message).label(Span::new(src, pos, end), format!("unexpected {found_desc}"));
    if let Some(h) = syntax_help(&expected, found) {
        d = d.help(h);
    }
    d
}

fn syntax_help(expected: &[String], found: Option<&str>) -> Option<String> {
    let has = |s: &str| expected.iter().any(|e| e == s);
    match found {
        Some(tok) if has("an item (`layer`, `model`, `data`, `train`, `devices` or `placement`)") => Some(format!(
            "a plan is a list of items, each starting with `layer`, `model`, `data`, `train`, `devices` or `placement`; `{tok}` starts none of them"
        )),
        _ if has("an expression") => Some("an expression is a name, a number, a call like `relu(x)`, or operands joined by `+ - * / @`".into()),
        Some("=") if has("`:`") => Some("parameters and inputs are typed with `:`, as in `param w: f32[4, 4]`".into()),
        _ => None,
    }
}

/// The token at `pos`, for "found …": a word, a number, or one character.
fn found_token(text: &str, pos: usize) -> Option<&str> {
    let rest = text.get(pos..)?;
    let first = rest.chars().next()?;
    let len = if first.is_ascii_alphanumeric() || first == '_' {
        rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.')).unwrap_or(rest.len())
    } else {
        first.len_utf8()
    };
    let tok = &rest[..len];
    Some(tok.trim_end_matches('.'))
}

fn describe_literal(tok: &str) -> Option<String> {
    match tok {
        " " | "\t" | "\r" | "\n" | "\u{FEFF}" | "//" | "/*" | "*/" | "\"" | "\\" | "e" | "E" | "_" => None,
        // Keywords are spelt by their rules; the bare words are internal to them.
        t if t.chars().all(|c| c.is_ascii_alphabetic() || c == '_') => None,
        t => Some(format!("`{t}`")),
    }
}

fn describe_rule(r: Rule) -> Option<&'static str> {
    Some(match r {
        Rule::ident | Rule::repeat_count | Rule::spec_entry => "a name",
        Rule::schedule_name => "a schedule (`gpipe` or `1f1b`)",
        Rule::int => "an integer",
        Rule::float => "a number",
        Rule::string | Rule::string_body => "a string",
        Rule::unit | Rule::quantity => "a unit such as `MiB`, `GB/s` or `us`",
        Rule::expr | Rule::paren | Rule::list | Rule::range | Rule::call | Rule::arg => "an expression",
        Rule::path => "a path such as `fc1.w` or `blocks[0]`",
        Rule::add | Rule::sub | Rule::mul | Rule::div | Rule::matmul => "an operator",
        Rule::layer_def | Rule::model_def | Rule::data_def | Rule::train_def | Rule::devices_def | Rule::placement_def | Rule::file => {
            "an item (`layer`, `model`, `data`, `train`, `devices` or `placement`)"
        }
        Rule::EOI => "the end of the file",
        Rule::kw_layer => "`layer`",
        Rule::kw_param => "`param`",
        Rule::kw_forward => "`forward`",
        Rule::kw_let => "`let`",
        Rule::kw_return => "`return`",
        Rule::kw_model => "`model`",
        Rule::kw_input => "`input`",
        Rule::kw_loss => "`loss`",
        Rule::kw_repeat => "`repeat`",
        Rule::kw_data => "`data`",
        Rule::kw_train => "`train`",
        Rule::kw_devices => "`devices`",
        Rule::kw_x => "`x` (as in `cpu x 4`)",
        Rule::kw_placement => "`placement`",
        Rule::kw_auto => "`auto`",
        Rule::kw_mesh => "`mesh`",
        Rule::kw_dp => "`data_parallel`",
        Rule::kw_over => "`over`",
        Rule::kw_shard => "`shard`",
        Rule::kw_pipeline => "`pipeline`",
        Rule::kw_stage => "`stage`",
        Rule::kw_micro => "`microbatches`",
        Rule::kw_schedule => "`schedule`",
        Rule::kw_ps => "`parameter_server`",
        Rule::kw_on => "`on`",
        Rule::kw_per => "`per`",
        Rule::kw_device => "`device`",
        Rule::kw_memory => "`memory`",
        Rule::kw_zero => "`zero`",
        Rule::kw_recompute => "`recompute`",
        Rule::kw_autocast => "`autocast`",
        Rule::autocast_stmt => "`autocast`",
        Rule::zero_stmt => "`zero`",
        Rule::recompute_stmt => "`recompute`",
        Rule::param_stmt => "`param`",
        Rule::sublayer_stmt => "`layer`",
        Rule::forward_def => "`forward`",
        Rule::let_stmt => "`let`",
        Rule::return_stmt => "`return`",
        Rule::input_stmt => "`input`",
        Rule::loss_stmt => "`loss`",
        Rule::layer_params | Rule::layer_param => "template arguments `(…)`",
        Rule::tensor_type => "a tensor type such as `f32[batch, 64]`",
        Rule::train_entry => "a setting such as `batch: 64`",
        Rule::device_opt | Rule::device_opts => "a device option such as `memory 256 MiB`",
        Rule::mesh_stmt | Rule::mesh_axis => "`mesh`",
        Rule::dp_stmt => "`data_parallel`",
        Rule::shard_stmt => "`shard`",
        Rule::pipeline_stmt => "`pipeline`",
        Rule::ps_stmt => "`parameter_server`",
        Rule::stage_stmt => "`stage`",
        Rule::micro_stmt => "`microbatches`",
        Rule::schedule_stmt => "`schedule`",
        Rule::auto_memory => "`memory`",
        Rule::auto_option => "an option such as `optimize step_time`",
        _ => return None,
    })
}

fn join_or(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => {
            let shown: Vec<&str> = init.iter().take(7).map(String::as_str).collect();
            let more = if init.len() > 7 { ", …" } else { "" };
            format!("{}{more} or {last}", shown.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> ast::File {
        match parse(SourceId::USER, text) {
            Ok(f) => f,
            Err(d) => panic!("parse failed: {:?}", d.into_vec()),
        }
    }

    fn show(e: &ast::Expr) -> String {
        use ast::ExprKind::*;
        match &e.kind {
            Int(i) => i.to_string(),
            Float(f) => f.to_string(),
            Str(s) => format!("{s:?}"),
            Range(a, b) => format!("{}..{}", a.map(|v| v.to_string()).unwrap_or_default(), b.map(|v| v.to_string()).unwrap_or_default()),
            List(xs) => format!("[{}]", xs.iter().map(show).collect::<Vec<_>>().join(", ")),
            Path(p) => p.to_string(),
            Call(c) => format!(
                "{}({})",
                c.callee,
                c.args
                    .iter()
                    .map(|a| match &a.name {
                        Some(n) => format!("{}: {}", n.name, show(&a.value)),
                        None => show(&a.value),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Neg(x) => format!("(-{})", show(x)),
            Binary(op, a, b) => format!("({} {} {})", show(a), op.symbol(), show(b)),
        }
    }

    fn expr(src: &str) -> String {
        let f = parse_ok(&format!("model M {{ loss {src} }}"));
        match &f.models[0].members[0] {
            ast::ModelMember::Loss(e, _) => show(e),
            other => panic!("not a loss: {other:?}"),
        }
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(expr("a + b * c"), "(a + (b * c))");
        assert_eq!(expr("a - b - c"), "((a - b) - c)");
        assert_eq!(expr("a / b / c"), "((a / b) / c)");
        assert_eq!(expr("x @ w + b"), "((x @ w) + b)");
        assert_eq!(expr("x @ w @ v"), "((x @ w) @ v)");
        assert_eq!(expr("-a * b"), "((-a) * b)");
        assert_eq!(expr("a * -b"), "(a * (-b))");
        assert_eq!(expr("--a"), "(-(-a))");
        assert_eq!(expr("(a + b) * c"), "((a + b) * c)");
        assert_eq!(expr("4 * d / 2"), "((4 * d) / 2)");
        assert_eq!(expr("f(x, axis: -1)"), "f(x, axis: (-1))");
        assert_eq!(expr("blocks[*].mlp.up.w"), "blocks[*].mlp.up.w");
        assert_eq!(expr("blocks[0..2]"), "blocks[0..2]");
        assert_eq!(expr("reshape(x, [2, -1])"), "reshape(x, [2, (-1)])");
        assert_eq!(expr("1e-5 + 0.5 + 1_000"), "((1e-5 + 0.5) + 1000)".replace("1e-5", &(1e-5f64).to_string()));
        assert_eq!(expr("f(1500..)"), "f(1500..)");
    }

    #[test]
    fn keywords_need_a_word_boundary() {
        let f = parse_ok("model M { input layerx: f32[2] loss layerx }");
        assert_eq!(f.models[0].members.len(), 2);
    }

    #[test]
    fn spans_point_at_source() {
        let text = "model M {\n  loss foo(bar)\n}";
        let f = parse_ok(text);
        let ast::ModelMember::Loss(e, _) = &f.models[0].members[0] else { panic!() };
        assert_eq!(&text[e.span.start as usize..e.span.end as usize], "foo(bar)");
    }

    #[test]
    fn errors_have_locations() {
        for bad in [
            "model M {",
            "model M { loss }",
            "layer L { param w f32[2] }",
            "\"abc",
            "/* x",
            "model M { loss ((((a }",
            "train { batch: 99999999999999999999999 }",
        ] {
            let d = parse(SourceId::USER, bad).expect_err(bad);
            for diag in d.iter() {
                assert!(diag.primary_span().is_some(), "{bad}: {diag:?}");
            }
        }
    }

    #[test]
    fn deep_nesting_is_a_diagnostic() {
        let text = format!("model M {{ loss {}a{} }}", "(".repeat(10_000), ")".repeat(10_000));
        let d = parse(SourceId::USER, &text).expect_err("too deep");
        assert_eq!(d.iter().next().map(|d| d.code), Some("syntax::too_deep"));
    }
}
