//! The train section, data sources, devices and units.
//!
//! Input: the AST items. Output: typed settings with defaults filled in.
//! These sections hold constants only, so they are evaluated without scopes.

use super::model::Model;
use super::types::Val;
use crate::diag::{did_you_mean, Diagnostic, Diagnostics, Span};
use crate::syntax::ast::{self, ExprKind};
use std::collections::BTreeMap;

// ------------------------------------------------------------------ constants

/// Evaluates a constant expression: numbers, strings, ranges, names, calls.
pub(super) fn konst(e: &ast::Expr) -> Result<Val, Diagnostic> {
    Ok(match &e.kind {
        ExprKind::Int(i) => Val::Int(*i, None),
        ExprKind::Float(x) => Val::Float(*x),
        ExprKind::Str(s) => Val::Str(s.clone()),
        ExprKind::Range(a, b) => Val::Range(*a, *b),
        ExprKind::List(items) => Val::List(items.iter().map(|x| Ok((konst(x)?, x.span))).collect::<Result<_, Diagnostic>>()?),
        ExprKind::Path(p) => match (p.as_name(), p.root.name.as_str()) {
            (Some(_), "true") => Val::Bool(true),
            (Some(_), "false") => Val::Bool(false),
            (Some(id), _) => Val::Name(id.name.clone()),
            (None, _) => {
                return Err(Diagnostic::error("config::not_constant", "a setting is a number, string, name or call")
                    .label(e.span, "a path is not allowed here")
                    .help("write a plain name"))
            }
        },
        ExprKind::Call(c) => {
            let Some(name) = c.callee.as_name() else {
                return Err(Diagnostic::error("config::not_constant", "a setting's call names a function")
                    .label(c.callee.span, "not a plain name")
                    .help("write e.g. `sgd(lr: 0.1)`"));
            };
            let args =
                c.args.iter().map(|a| Ok((a.name.as_ref().map(|n| n.name.clone()), konst(&a.value)?, a.value.span))).collect::<Result<_, Diagnostic>>()?;
            Val::Spec(name.name.clone(), args)
        }
        ExprKind::Neg(x) => match konst(x)? {
            Val::Int(i, _) => Val::Int(i.saturating_neg(), None),
            Val::Float(f) => Val::Float(-f),
            other => return Err(bad_value(e.span, "a number", &other)),
        },
        ExprKind::Binary(op, a, b) => {
            let (x, y) = (konst(a)?, konst(b)?);
            let (Some(fx), Some(fy)) = (num(&x), num(&y)) else {
                let bad = if num(&x).is_none() { (a.span, &x) } else { (b.span, &y) };
                return Err(bad_value(bad.0, "a number", bad.1));
            };
            use ast::BinOp::*;
            match (op, &x, &y) {
                (Add, Val::Int(i, _), Val::Int(j, _)) => i.checked_add(*j).map(|v| Val::Int(v, None)).unwrap_or(Val::Float(fx + fy)),
                (Sub, Val::Int(i, _), Val::Int(j, _)) => i.checked_sub(*j).map(|v| Val::Int(v, None)).unwrap_or(Val::Float(fx - fy)),
                (Mul, Val::Int(i, _), Val::Int(j, _)) => i.checked_mul(*j).map(|v| Val::Int(v, None)).unwrap_or(Val::Float(fx * fy)),
                (Div, _, _) if fy == 0.0 => {
                    return Err(Diagnostic::error("arith::division_by_zero", "division by zero").label(b.span, "this is 0").help("divide by a non-zero number"))
                }
                (Div, Val::Int(i, _), Val::Int(j, _)) if i % j == 0 => Val::Int(i / j, None),
                (Add, ..) => Val::Float(fx + fy),
                (Sub, ..) => Val::Float(fx - fy),
                (Mul, ..) => Val::Float(fx * fy),
                (Div, ..) => Val::Float(fx / fy),
                (MatMul, ..) => return Err(bad_value(e.span, "a number", &Val::Error)),
            }
        }
    })
}

fn num(v: &Val) -> Option<f64> {
    super::context::number(v)
}

/// A setting `key` whose value is not `want`.
fn bad_setting(span: Span, key: &str, want: &str, found: &Val) -> Diagnostic {
    let example = if want.contains("true") {
        format!("`{key}: true` or `{key}: false`")
    } else if want.contains("integer") {
        format!("e.g. `{key}: 10`")
    } else if want.contains("number") {
        format!("e.g. `{key}: 0.1`")
    } else if want.contains("string") {
        format!("e.g. `{key}: \"text\"`")
    } else if want.contains("range") {
        format!("e.g. `{key}: 0..1000`")
    } else {
        format!("{want} for `{key}`")
    };
    Diagnostic::error("config::bad_value", format!("`{key}` must be {want}, found {}", found.describe()))
        .label(span, format!("this is {}", found.describe()))
        .help(format!("write {example}"))
}

fn bad_value(span: Span, want: &str, found: &Val) -> Diagnostic {
    Diagnostic::error("config::bad_value", format!("expected {want}, found {}", found.describe()))
        .label(span, format!("expected {want}"))
        .help(format!("write {want} here"))
}

/// An argument of a spec call: (name, value, span).
type SpecArg = (Option<String>, Val, Span);

/// Reads the arguments of a spec call such as `sgd(lr: 0.1, momentum: 0.9)`:
/// positional arguments fill `params` in order.
struct SpecArgs {
    vals: BTreeMap<&'static str, (Val, Span)>,
}

impl SpecArgs {
    fn bind(
        fname: &str,
        code: &'static str,
        span: Span,
        args: &[SpecArg],
        params: &[&'static str],
        required: &[&'static str],
        diags: &mut Diagnostics,
    ) -> Option<SpecArgs> {
        let mut vals = BTreeMap::new();
        let mut ok = true;
        for (i, (name, v, s)) in args.iter().enumerate() {
            let key = match name {
                None => match params.get(i) {
                    Some(k) => *k,
                    None => {
                        diags.push(
                            Diagnostic::error(code, format!("`{fname}` takes at most {} argument{}", params.len(), if params.len() == 1 { "" } else { "s" }))
                                .label(*s, "unexpected argument")
                                .help(format!("its arguments are: {}", params.join(", "))),
                        );
                        ok = false;
                        continue;
                    }
                },
                Some(n) => match params.iter().find(|p| **p == n.as_str()) {
                    Some(k) => *k,
                    None => {
                        let mut d = Diagnostic::error("names::unknown_argument", format!("`{fname}` has no argument `{n}`")).label(*s, "unknown argument");
                        d = d.help(match did_you_mean(n, params.iter().copied()) {
                            Some(m) => format!("did you mean `{m}`?"),
                            None => format!("its arguments are: {}", params.join(", ")),
                        });
                        diags.push(d);
                        ok = false;
                        continue;
                    }
                },
            };
            if vals.insert(key, (v.clone(), *s)).is_some() {
                diags.push(
                    Diagnostic::error(code, format!("argument `{key}` of `{fname}` is given twice"))
                        .label(*s, "given again here")
                        .help("pass each argument once"),
                );
                ok = false;
            }
        }
        for r in required {
            if !vals.contains_key(r) {
                diags.push(
                    Diagnostic::error(code, format!("`{fname}` needs argument `{r}`"))
                        .label(span, format!("`{r}` is missing"))
                        .help(format!("its arguments are: {}", params.join(", "))),
                );
                ok = false;
            }
        }
        ok.then_some(SpecArgs { vals })
    }

    fn float(&self, key: &str, default: f64, code: &'static str, diags: &mut Diagnostics) -> Option<f64> {
        match self.vals.get(key) {
            None => Some(default),
            Some((v, s)) => match num(v) {
                Some(x) => Some(x),
                None => {
                    diags.push(bad_setting(*s, key, "a number", v).with_code(code));
                    None
                }
            },
        }
    }

    fn int(&self, key: &str, default: i64, min: i64, code: &'static str, diags: &mut Diagnostics) -> Option<i64> {
        match self.vals.get(key) {
            None => Some(default),
            Some((Val::Int(i, _), _)) if *i >= min => Some(*i),
            Some((v, s)) => {
                diags.push(bad_setting(*s, key, &format!("an integer ≥ {min}"), v).with_code(code));
                None
            }
        }
    }

    fn boolean(&self, key: &str, default: bool, code: &'static str, diags: &mut Diagnostics) -> Option<bool> {
        match self.vals.get(key) {
            None => Some(default),
            Some((Val::Bool(b), _)) => Some(*b),
            Some((v, s)) => {
                diags.push(bad_setting(*s, key, "`true` or `false`", v).with_code(code));
                None
            }
        }
    }

    fn string(&self, key: &str, code: &'static str, diags: &mut Diagnostics) -> Option<Option<String>> {
        match self.vals.get(key) {
            None => Some(None),
            Some((Val::Str(s), _)) => Some(Some(s.clone())),
            Some((v, s)) => {
                diags.push(bad_setting(*s, key, "a string", v).with_code(code));
                None
            }
        }
    }
}

impl Diagnostic {
    fn with_code(mut self, code: &'static str) -> Diagnostic {
        self.code = code;
        self
    }
}

// ------------------------------------------------------------------ train

#[derive(Clone, Debug, PartialEq)]
pub enum Length {
    Epochs(i64),
    Steps(i64),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    Sgd {
        lr: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// Adam; `decoupled` weight decay makes it AdamW.
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        decoupled: bool,
    },
}

impl Optimizer {
    pub fn describe(&self) -> String {
        match self {
            Optimizer::Sgd { lr, momentum, nesterov, weight_decay } => {
                let mut s = format!("sgd(lr {lr}");
                if *momentum != 0.0 {
                    s += &format!(", momentum {momentum}");
                }
                if *nesterov {
                    s += ", nesterov";
                }
                if *weight_decay != 0.0 {
                    s += &format!(", weight_decay {weight_decay}");
                }
                s + ")"
            }
            Optimizer::Adam { lr, beta1, beta2, weight_decay, decoupled, .. } => {
                let name = if *decoupled { "adamw" } else { "adam" };
                format!("{name}(lr {lr}, betas {beta1}/{beta2}, weight_decay {weight_decay})")
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum LrSchedule {
    Constant,
    Warmup { steps: i64 },
    Cosine { warmup: i64, min_lr: f64 },
}

#[derive(Clone, Debug)]
pub struct Train {
    pub model: String,
    pub data: Option<String>,
    pub batch: i64,
    pub length: Length,
    pub optimizer: Optimizer,
    pub lr_schedule: LrSchedule,
    pub clip_grad_norm: Option<f64>,
    pub seed: u64,
    pub shuffle: bool,
    /// Symbolic dims bound here (`batch` included).
    pub dims: BTreeMap<String, i64>,
    pub span: Span,
}

pub const TRAIN_KEYS: &[&str] = &["model", "data", "batch", "epochs", "steps", "optimizer", "lr_schedule", "clip_grad_norm", "seed", "shuffle"];

/// The `model:` entry of a train section (or None).
pub(super) fn train_entry<'t>(t: &'t ast::TrainDef, key: &str) -> Option<&'t ast::TrainEntry> {
    t.entries.iter().find(|e| e.key.name == key)
}

/// Reads the train section; `syms` are the model's symbolic dims (not `batch`).
pub(super) fn train(t: &ast::TrainDef, model: &str, syms: &[String], diags: &mut Diagnostics) -> Option<Train> {
    let mut seen: BTreeMap<&str, Span> = BTreeMap::new();
    let mut vals: BTreeMap<&str, (Val, Span)> = BTreeMap::new();
    let mut dims = BTreeMap::new();
    let mut ok = true;
    // Keys already reported (bad value, or suggested for a misspelt key):
    // their absence is not reported again.
    let mut reported: Vec<&str> = Vec::new();
    for e in &t.entries {
        let key = e.key.name.as_str();
        if let Some(prev) = seen.insert(key, e.key.span) {
            diags.push(
                Diagnostic::error("train::duplicate_key", format!("`{key}` is set twice"))
                    .label(e.key.span, "set again here")
                    .label(prev, "first set here")
                    .help("keep one of them"),
            );
            ok = false;
            continue;
        }
        let v = match konst(&e.value) {
            Ok(v) => v,
            Err(d) => {
                diags.push(d);
                ok = false;
                reported.push(key);
                continue;
            }
        };
        if TRAIN_KEYS.contains(&key) {
            vals.insert(key, (v, e.value.span));
        } else if syms.iter().any(|s| s == key) {
            match v {
                Val::Int(n, _) if n >= 1 => {
                    dims.insert(key.to_string(), n);
                }
                other => {
                    diags.push(bad_setting(e.value.span, key, "a positive integer (it is a dimension of the model)", &other).with_code("train::bad_value"));
                    ok = false;
                }
            }
        } else {
            let mut cands: Vec<&str> = TRAIN_KEYS.to_vec();
            cands.extend(syms.iter().map(String::as_str));
            let mut d = Diagnostic::error("train::unknown_key", format!("unknown train setting `{key}`")).label(e.key.span, "not a setting");
            d = d.help(match did_you_mean(key, cands.iter().copied()) {
                Some(s) => {
                    reported.push(s);
                    format!("did you mean `{s}`?")
                }
                None => format!(
                    "settings are {}; symbolic dims of the model{}",
                    TRAIN_KEYS.join(", "),
                    if syms.is_empty() { " (none here)".to_string() } else { format!(": {}", syms.join(", ")) }
                ),
            });
            diags.push(d);
            ok = false;
        }
    }
    let missing = |key: &str, example: &str, diags: &mut Diagnostics| {
        if !reported.contains(&key) {
            diags.push(
                Diagnostic::error("train::missing_key", format!("the train section does not set `{key}`"))
                    .label(t.head, "this section")
                    .help(format!("add `{example}`")),
            );
        }
    };
    let batch = match vals.get("batch") {
        Some((Val::Int(n, _), _)) if *n >= 1 => *n,
        Some((v, s)) => {
            diags.push(bad_setting(*s, "batch", "a positive integer (samples per step)", v).with_code("train::bad_value"));
            return None;
        }
        None => {
            missing("batch", "batch: 64", diags);
            return None;
        }
    };
    dims.insert("batch".to_string(), batch);
    let positive = |key: &str, diags: &mut Diagnostics| -> Option<Option<i64>> {
        match vals.get(key) {
            None => Some(None),
            Some((Val::Int(n, _), _)) if *n >= 1 => Some(Some(*n)),
            Some((v, s)) => {
                diags.push(bad_setting(*s, key, "a positive integer", v).with_code("train::bad_value"));
                None
            }
        }
    };
    let epochs = positive("epochs", diags);
    let steps = positive("steps", diags);
    let length = match (epochs, steps) {
        (Some(Some(_)), Some(Some(_))) => {
            let (es, ss) = (vals["epochs"].1, vals["steps"].1);
            diags.push(
                Diagnostic::error("train::conflict", "`epochs` and `steps` both say how long to train")
                    .label(ss, "steps")
                    .label(es, "epochs")
                    .help("keep one of them"),
            );
            None
        }
        (Some(Some(e)), _) => Some(Length::Epochs(e)),
        (_, Some(Some(s))) => Some(Length::Steps(s)),
        (Some(None), Some(None)) => {
            if !reported.contains(&"steps") {
                missing("epochs", "epochs: 10` or `steps: 1000", diags);
            }
            None
        }
        _ => None,
    };
    let optimizer = match vals.get("optimizer") {
        None => {
            missing("optimizer", "optimizer: sgd(lr: 0.1)", diags);
            None
        }
        Some((v, s)) => optimizer(v, *s, diags),
    };
    let lr_schedule = match vals.get("lr_schedule") {
        None => Some(LrSchedule::Constant),
        Some((v, s)) => schedule(v, *s, diags),
    };
    let clip_grad_norm = match vals.get("clip_grad_norm") {
        None => Some(None),
        Some((v, _)) if num(v).is_some_and(|x| x > 0.0) => Some(num(v)),
        Some((v, s)) => {
            diags.push(bad_setting(*s, "clip_grad_norm", "a positive number", v).with_code("train::bad_value"));
            None
        }
    };
    let seed = match vals.get("seed") {
        None => Some(0),
        Some((Val::Int(n, _), _)) if *n >= 0 => Some(*n as u64),
        Some((v, s)) => {
            diags.push(bad_setting(*s, "seed", "a non-negative integer", v).with_code("train::bad_value"));
            None
        }
    };
    let shuffle = match vals.get("shuffle") {
        None => Some(true),
        Some((Val::Bool(b), _)) => Some(*b),
        Some((v, s)) => {
            diags.push(bad_setting(*s, "shuffle", "`true` or `false`", v).with_code("train::bad_value"));
            None
        }
    };
    let data = match vals.get("data") {
        None => None,
        Some((Val::Name(n), _)) => Some(n.clone()),
        Some((v, s)) => {
            diags.push(bad_setting(*s, "data", "the name of a data source", v).with_code("train::bad_value"));
            ok = false;
            None
        }
    };
    Some(Train {
        model: model.to_string(),
        data,
        batch,
        length: length?,
        optimizer: optimizer?,
        lr_schedule: lr_schedule?,
        clip_grad_norm: clip_grad_norm?,
        seed: seed?,
        shuffle: shuffle?,
        dims,
        span: t.span,
    })
    .filter(|_| ok)
}

const OPTIMIZERS: &[&str] = &["sgd", "adam", "adamw"];

fn optimizer(v: &Val, span: Span, diags: &mut Diagnostics) -> Option<Optimizer> {
    let (name, args): (&str, &[SpecArg]) = match v {
        Val::Spec(n, a) => (n, a),
        Val::Name(n) => (n, &[]),
        other => {
            diags.push(bad_setting(span, "optimizer", "an optimizer such as `sgd(lr: 0.1)`", other).with_code("train::unknown_optimizer"));
            return None;
        }
    };
    const C: &str = "train::bad_optimizer";
    let opt = match name {
        "sgd" => {
            let a = SpecArgs::bind(name, C, span, args, &["lr", "momentum", "nesterov", "weight_decay"], &["lr"], diags)?;
            let sgd = Optimizer::Sgd {
                lr: a.float("lr", 0.0, C, diags)?,
                momentum: a.float("momentum", 0.0, C, diags)?,
                nesterov: a.boolean("nesterov", false, C, diags)?,
                weight_decay: a.float("weight_decay", 0.0, C, diags)?,
            };
            if let Optimizer::Sgd { nesterov: true, momentum, .. } = sgd {
                if momentum == 0.0 {
                    diags.push(
                        Diagnostic::error(C, "nesterov momentum needs a non-zero `momentum`")
                            .label(span, "nesterov without momentum")
                            .help("add `momentum: 0.9`"),
                    );
                    return None;
                }
            }
            sgd
        }
        "adam" | "adamw" => {
            let a = SpecArgs::bind(name, C, span, args, &["lr", "beta1", "beta2", "eps", "weight_decay"], &["lr"], diags)?;
            let decoupled = name == "adamw";
            let opt = Optimizer::Adam {
                lr: a.float("lr", 0.0, C, diags)?,
                beta1: a.float("beta1", 0.9, C, diags)?,
                beta2: a.float("beta2", 0.999, C, diags)?,
                eps: a.float("eps", 1e-8, C, diags)?,
                weight_decay: a.float("weight_decay", if decoupled { 0.01 } else { 0.0 }, C, diags)?,
                decoupled,
            };
            if let Optimizer::Adam { beta1, beta2, .. } = opt {
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    diags.push(
                        Diagnostic::error(C, "Adam's betas must lie in [0, 1)")
                            .label(span, format!("beta1 {beta1}, beta2 {beta2}"))
                            .help("the usual values are `beta1: 0.9, beta2: 0.999`"),
                    );
                    return None;
                }
            }
            opt
        }
        _ => {
            let mut d = Diagnostic::error("train::unknown_optimizer", format!("unknown optimizer `{name}`")).label(span, "not an optimizer");
            d = d.help(match did_you_mean(name, OPTIMIZERS.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("optimizers are {}", OPTIMIZERS.join(", ")),
            });
            diags.push(d);
            return None;
        }
    };
    let lr = match opt {
        Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } => lr,
    };
    if !(lr > 0.0 && lr.is_finite()) {
        diags.push(
            Diagnostic::error(C, format!("the learning rate must be positive, found {lr}"))
                .label(span, "this optimizer")
                .help("a typical value is `lr: 0.001` for Adam or `lr: 0.1` for SGD"),
        );
        return None;
    }
    Some(opt)
}

fn schedule(v: &Val, span: Span, diags: &mut Diagnostics) -> Option<LrSchedule> {
    const C: &str = "train::bad_schedule";
    let (name, args): (&str, &[SpecArg]) = match v {
        Val::Spec(n, a) => (n, a),
        Val::Name(n) => (n, &[]),
        other => {
            diags.push(bad_setting(span, "lr_schedule", "a schedule such as `cosine(warmup: 100)`", other).with_code(C));
            return None;
        }
    };
    Some(match name {
        "constant" => {
            SpecArgs::bind(name, C, span, args, &[], &[], diags)?;
            LrSchedule::Constant
        }
        "warmup" => {
            let a = SpecArgs::bind(name, C, span, args, &["steps"], &["steps"], diags)?;
            LrSchedule::Warmup { steps: a.int("steps", 0, 1, C, diags)? }
        }
        "cosine" => {
            let a = SpecArgs::bind(name, C, span, args, &["warmup", "min_lr"], &[], diags)?;
            LrSchedule::Cosine { warmup: a.int("warmup", 0, 0, C, diags)?, min_lr: a.float("min_lr", 0.0, C, diags)? }
        }
        _ => {
            let names = ["constant", "warmup", "cosine"];
            let mut d = Diagnostic::error(C, format!("unknown learning-rate schedule `{name}`")).label(span, "not a schedule");
            d = d.help(match did_you_mean(name, names) {
                Some(s) => format!("did you mean `{s}`?"),
                None => "schedules are constant, warmup(steps: N), cosine(warmup: N, min_lr: x)".into(),
            });
            diags.push(d);
            return None;
        }
    })
}

// ------------------------------------------------------------------ data

#[derive(Clone, Debug, PartialEq)]
pub struct RowRange {
    pub start: i64,
    /// Exclusive end; None runs to the end of the data.
    pub end: Option<i64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    Csv {
        path: String,
        label: String,
        scale: f64,
        train: RowRange,
        test: Option<RowRange>,
    },
    /// Byte-level text: windows of `seq` bytes, targets shifted by one.
    Text {
        path: String,
        train: RowRange,
        test: Option<RowRange>,
    },
    /// Token ids as nanoGPT and Megatron keep them: a flat little-endian
    /// binary of `bytes`-wide unsigned ids (2: uint16, 4: uint32); ranges
    /// count tokens; windows of `seq` ids, targets shifted by one.
    Tokens {
        path: String,
        bytes: u8,
        train: RowRange,
        test: Option<RowRange>,
    },
    Synthetic {
        rows: i64,
        features: i64,
        classes: i64,
        seed: u64,
    },
}

#[derive(Clone, Debug)]
pub struct Data {
    pub name: String,
    pub source: DataSource,
    pub span: Span,
}

pub const SOURCES: &[&str] = &["csv", "text", "tokens", "synthetic"];

pub(super) fn data(d: &ast::DataDef, diags: &mut Diagnostics) -> Option<Data> {
    let kind = d.source.callee.root.name.as_str();
    const C: &str = "data::bad_argument";
    let mut args = Vec::new();
    for a in &d.source.args {
        match konst(&a.value) {
            Ok(v) => args.push((a.name.as_ref().map(|n| n.name.clone()), v, a.value.span)),
            Err(e) => {
                diags.push(e);
                return None;
            }
        }
    }
    let span = d.source.span;
    let range = |a: &SpecArgs, key: &str, diags: &mut Diagnostics| -> Option<Option<RowRange>> {
        match a.vals.get(key) {
            None => Some(None),
            Some((Val::Range(lo, hi), s)) => {
                let start = lo.unwrap_or(0);
                if start < 0 || hi.is_some_and(|h| h <= start) {
                    diags.push(
                        Diagnostic::error("data::bad_range", format!("`{key}` range is empty or negative"))
                            .label(*s, "this range")
                            .help("write `start..end` with 0 ≤ start < end, or `start..` to run to the end"),
                    );
                    return None;
                }
                Some(Some(RowRange { start, end: *hi }))
            }
            Some((v, s)) => {
                diags.push(bad_setting(*s, key, "a range such as `0..1500`", v).with_code(C));
                None
            }
        }
    };
    let source = match kind {
        "csv" | "text" | "tokens" => {
            let params: &[&'static str] = match kind {
                "csv" => &["path", "label", "scale", "train", "test"],
                "tokens" => &["path", "dtype", "train", "test"],
                _ => &["path", "train", "test"],
            };
            let a = SpecArgs::bind(kind, C, span, &args, params, &["path"], diags)?;
            let path = a.string("path", C, diags)?.unwrap_or_default();
            if path.is_empty() {
                diags.push(Diagnostic::error(C, "the data path is empty").label(span, "here").help("give the file's path relative to the plan file"));
                return None;
            }
            let train = range(&a, "train", diags)?.unwrap_or(RowRange { start: 0, end: None });
            let test = range(&a, "test", diags)?;
            if let Some(t) = &test {
                let overlap = match (train.end, t.end) {
                    (None, None) => true,
                    (Some(te), None) => te > t.start,
                    (None, Some(e)) => e > train.start,
                    (Some(te), Some(e)) => train.start < e && t.start < te,
                };
                if overlap {
                    let (ts, es) = (a.vals["test"].1, a.vals.get("train").map(|v| v.1).unwrap_or(span));
                    diags.push(
                        Diagnostic::error("data::overlap", "the train and test ranges overlap")
                            .label(es, "train rows")
                            .label(ts, "test rows")
                            .help("held-out rows must not be trained on: make the ranges disjoint"),
                    );
                    return None;
                }
            }
            if kind == "csv" {
                let scale = a.float("scale", 1.0, C, diags)?;
                DataSource::Csv { path, label: a.string("label", C, diags)?.unwrap_or_else(|| "label".into()), scale, train, test }
            } else if kind == "tokens" {
                let bytes = match a.string("dtype", C, diags)?.as_deref() {
                    None | Some("uint16") => 2,
                    Some("uint32") => 4,
                    Some(other) => {
                        let s = a.vals.get("dtype").map(|v| v.1).unwrap_or(span);
                        diags.push(
                            Diagnostic::error(C, format!("a token file's `dtype` is \"uint16\" or \"uint32\", not {other:?}"))
                                .label(s, "this dtype")
                                .help("write `dtype: \"uint16\"` (nanoGPT's .bin files) or `dtype: \"uint32\"` (vocabularies over 65,536)"),
                        );
                        return None;
                    }
                };
                DataSource::Tokens { path, bytes, train, test }
            } else {
                DataSource::Text { path, train, test }
            }
        }
        "synthetic" => {
            let a = SpecArgs::bind(kind, C, span, &args, &["rows", "features", "classes", "seed"], &["features", "classes"], diags)?;
            DataSource::Synthetic {
                rows: a.int("rows", 1024, 1, C, diags)?,
                features: a.int("features", 1, 1, C, diags)?,
                classes: a.int("classes", 2, 2, C, diags)?,
                seed: a.int("seed", 0, 0, C, diags)? as u64,
            }
        }
        _ => {
            let mut e = Diagnostic::error("data::unknown_source", format!("unknown data source `{kind}`")).label(d.source.callee.span, "not a data source");
            e = e.help(match did_you_mean(kind, SOURCES.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("sources are {}", SOURCES.join(", ")),
            });
            diags.push(e);
            return None;
        }
    };
    Some(Data { name: d.name.name.clone(), source, span: d.span })
}

/// Checks that a data source can feed the model's inputs.
pub(super) fn data_fits_model(data: &Data, model: &Model, diags: &mut Diagnostics) {
    use super::types::DType;
    let (want, what): (Vec<(&str, bool, usize)>, &str) = match &data.source {
        DataSource::Csv { .. } | DataSource::Synthetic { .. } => (vec![("features", true, 2), ("labels", false, 1)], "feature rows and integer labels"),
        DataSource::Text { .. } | DataSource::Tokens { .. } => (vec![("tokens", false, 2), ("targets", false, 2)], "token windows and next-token targets"),
    };
    let shape_of = |want: &[(&str, bool, usize)]| {
        want.iter()
            .map(|(n, f, r)| {
                format!(
                    "{n}: {}[batch{}]",
                    if *f { "f32" } else { "i32" },
                    if *r == 2 {
                        if *f {
                            ", F"
                        } else {
                            ", seq"
                        }
                    } else {
                        ""
                    }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if model.inputs.len() != want.len() {
        diags.push(
            Diagnostic::error(
                "data::inputs",
                format!("data `{}` yields {} inputs, but model `{}` has {}", data.name, want.len(), model.name, model.inputs.len()),
            )
            .label(data.span, format!("yields {what}"))
            .label(model.name_span, format!("has {} input{}", model.inputs.len(), if model.inputs.len() == 1 { "" } else { "s" }))
            .help(format!("declare the model's inputs as ({})", shape_of(&want))),
        );
        return;
    }
    for (input, (n, float, rank)) in model.inputs.iter().zip(&want) {
        let dtype_ok = input.ty.dtype.is_float() == *float;
        // Feature rows may be shaped, e.g. f32[batch, 1, 8, 8] images of 64 features.
        let shaped = *float && *rank == 2 && matches!(data.source, DataSource::Csv { .. } | DataSource::Synthetic { .. });
        let rank_ok = input.ty.rank() == *rank || (shaped && input.ty.rank() > 2);
        let batch_ok = input.ty.shape.first().is_some_and(|d| d.sym.as_deref() == Some("batch"));
        let mut extra_ok = true;
        if let (DataSource::Synthetic { features, .. }, true, 2) = (&data.source, *float, *rank) {
            extra_ok = input.ty.shape.iter().skip(1).map(|d| d.size).product::<i64>() == *features;
        }
        if !(dtype_ok && rank_ok && batch_ok && extra_ok) {
            let want_dt = if *float { DType::F32 } else { DType::I32 };
            diags.push(
                Diagnostic::error("data::inputs", format!("input `{}` cannot take the {n} of data `{}`", input.name, data.name))
                    .label(input.span, format!("declared {}", input.ty))
                    .label(data.span, format!("yields {what}"))
                    .help(format!(
                        "declare it as {want_dt}[batch{}]",
                        match (&data.source, *rank) {
                            (DataSource::Synthetic { features, .. }, 2) if *float => format!(", {features}"),
                            (_, 2) if *float => ", <features>".to_string(),
                            (_, 2) => ", seq".to_string(),
                            _ => String::new(),
                        }
                    )),
            );
        }
    }
}

// ------------------------------------------------------------------ devices and units

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

#[derive(Clone, Debug)]
pub struct Device {
    /// `cpu0`, `gpu3`.
    pub name: String,
    pub kind: DeviceKind,
    pub memory: Option<u64>,
    /// Bytes per second.
    pub bandwidth: Option<f64>,
    /// Seconds.
    pub latency: Option<f64>,
    /// The `devices` line that declared it (None for the default device).
    pub span: Option<Span>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitKind {
    Memory,
    Bandwidth,
    Time,
}

impl UnitKind {
    fn name(self) -> &'static str {
        match self {
            UnitKind::Memory => "a memory size (B, KiB, MiB, GiB, …)",
            UnitKind::Bandwidth => "a bandwidth (MB/s, GB/s, GiB/s, …)",
            UnitKind::Time => "a time (ns, us, ms, s)",
        }
    }
}

const UNITS: &[(&str, UnitKind, f64)] = &[
    ("B", UnitKind::Memory, 1.0),
    ("KB", UnitKind::Memory, 1e3),
    ("MB", UnitKind::Memory, 1e6),
    ("GB", UnitKind::Memory, 1e9),
    ("TB", UnitKind::Memory, 1e12),
    ("KiB", UnitKind::Memory, 1024.0),
    ("MiB", UnitKind::Memory, 1048576.0),
    ("GiB", UnitKind::Memory, 1073741824.0),
    ("TiB", UnitKind::Memory, 1099511627776.0),
    ("B/s", UnitKind::Bandwidth, 1.0),
    ("KB/s", UnitKind::Bandwidth, 1e3),
    ("MB/s", UnitKind::Bandwidth, 1e6),
    ("GB/s", UnitKind::Bandwidth, 1e9),
    ("TB/s", UnitKind::Bandwidth, 1e12),
    ("KiB/s", UnitKind::Bandwidth, 1024.0),
    ("MiB/s", UnitKind::Bandwidth, 1048576.0),
    ("GiB/s", UnitKind::Bandwidth, 1073741824.0),
    ("ns", UnitKind::Time, 1e-9),
    ("us", UnitKind::Time, 1e-6),
    ("ms", UnitKind::Time, 1e-3),
    ("s", UnitKind::Time, 1.0),
];

/// A quantity in base units (bytes, bytes/s, seconds), checked to be of `kind`.
pub(super) fn quantity(q: &ast::Quantity, kind: UnitKind, what: &str, diags: &mut Diagnostics) -> Option<f64> {
    let Some(&(_, k, scale)) = UNITS.iter().find(|(n, _, _)| *n == q.unit.name) else {
        let mut d = Diagnostic::error("units::unknown", format!("unknown unit `{}`", q.unit.name)).label(q.unit.span, "not a unit");
        d = d.help(match did_you_mean(&q.unit.name, UNITS.iter().map(|u| u.0)) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("{what} takes {}", kind.name()),
        });
        diags.push(d);
        return None;
    };
    if k != kind {
        diags.push(
            Diagnostic::error("units::wrong_kind", format!("{what} takes {}, found `{}`", kind.name(), q.unit.name))
                .label(q.span, format!("this is {}", k.name()))
                .help(format!("write it in units of {}", kind.name())),
        );
        return None;
    }
    if q.value <= 0.0 {
        diags.push(Diagnostic::error("units::not_positive", format!("{what} must be positive")).label(q.span, "not positive").help("write a positive amount"));
        return None;
    }
    Some(q.value * scale)
}

/// The devices, and whether every group was valid (a bad group leaves the
/// count unknown, so placement checks that need it are skipped).
pub(super) fn devices(defs: &[ast::DevicesDef], diags: &mut Diagnostics) -> (Vec<Device>, bool) {
    let mut out = Vec::new();
    let before = diags.error_count();
    let mut counts = [0usize; 2];
    for d in defs {
        let kind = match d.kind.name.as_str() {
            "cpu" => DeviceKind::Cpu,
            "gpu" => DeviceKind::Gpu,
            other => {
                let mut e = Diagnostic::error("devices::unknown_kind", format!("unknown device kind `{other}`")).label(d.kind.span, "not a device kind");
                e = e.help(match did_you_mean(other, ["cpu", "gpu"]) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "devices are `cpu` or `gpu`, as in `devices cpu x 4`".into(),
                });
                diags.push(e);
                continue;
            }
        };
        if !(1..=4096).contains(&d.count) {
            diags.push(
                Diagnostic::error("devices::count", format!("a device group has 1 to 4096 devices, found {}", d.count))
                    .label(d.count_span, "this count")
                    .help("write e.g. `devices cpu x 4`"),
            );
            continue;
        }
        let mut memory = None;
        let mut bandwidth = None;
        let mut latency = None;
        for o in &d.options {
            let slot = match o.key.name.as_str() {
                "memory" => (&mut memory, UnitKind::Memory),
                "bandwidth" => (&mut bandwidth, UnitKind::Bandwidth),
                "latency" => (&mut latency, UnitKind::Time),
                other => {
                    let keys = ["memory", "bandwidth", "latency"];
                    let mut e = Diagnostic::error("devices::unknown_option", format!("unknown device option `{other}`")).label(o.key.span, "not an option");
                    e = e.help(match did_you_mean(other, keys) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => "options are memory, bandwidth and latency".into(),
                    });
                    diags.push(e);
                    continue;
                }
            };
            *slot.0 = quantity(&o.value, slot.1, &format!("`{}`", o.key.name), diags);
        }
        let k = kind as usize;
        for _ in 0..d.count {
            let prefix = if kind == DeviceKind::Cpu { "cpu" } else { "gpu" };
            out.push(Device { name: format!("{prefix}{}", counts[k]), kind, memory: memory.map(|m| m as u64), bandwidth, latency, span: Some(d.span) });
            counts[k] += 1;
        }
    }
    if defs.is_empty() {
        out.push(Device { name: "cpu0".into(), kind: DeviceKind::Cpu, memory: None, bandwidth: None, latency: None, span: None });
    }
    let ok = diags.error_count() == before;
    (out, ok)
}
