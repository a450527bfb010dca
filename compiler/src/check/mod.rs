//! Check: AST → a fully resolved, typed plan description.
//!
//! Input: the user's file and the prelude. Output: [`Checked`] (the trained
//! model with every parameter typed, the train settings, the data source,
//! the devices and the validated placement) together with every diagnostic
//! found. Independent errors are all reported: each section is checked even
//! when another failed, and a failed value (`Val::Error`) silences the errors
//! that would only follow from it.

mod context;
pub mod model;
mod ops;
pub mod placement;
pub mod sections;
mod summary;
pub mod types;

pub use model::{Child, Init, Input, Instance, Model, Param, TopLayer, Unit};
pub use ops::broadcast as broadcast_shapes;
pub use placement::{Explicit, Objective, Pipeline, Placement, Schedule, Shard};
pub use sections::{Data, DataSource, Device, DeviceKind, Length, LrSchedule, Optimizer, RowRange, Train};
pub use summary::summary;
pub use types::{DType, Dim, InstId, Prim, TId, TraceOp, Ty};

use crate::diag::{did_you_mean, Diagnostic, Diagnostics, SourceId, Span};
use crate::syntax::ast::{self, ExprKind};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Everything `check` establishes about a plan.
#[derive(Clone, Debug)]
pub struct Checked {
    pub model: Model,
    pub train: Train,
    pub data: Data,
    pub devices: Vec<Device>,
    pub placement: Placement,
    /// Layers that compute in bfloat16 (`autocast bf16`): kept with the
    /// model's numerics when a run ignores the placement (the single-device
    /// reference), since it changes what is computed.
    pub autocast: Vec<Unit>,
}

/// Checks `file` against the `prelude` templates.
pub fn check(file: &ast::File, prelude: &ast::File) -> (Option<Checked>, Diagnostics) {
    check_with(file, prelude, &BTreeMap::new())
}

/// As [`check`], with some symbolic dims bound to other sizes than the train
/// section's (an evaluation batch, say). The train settings keep their own.
pub fn check_with(file: &ast::File, prelude: &ast::File, overrides: &BTreeMap<String, i64>) -> (Option<Checked>, Diagnostics) {
    let mut diags = Diagnostics::default();

    // Templates: the prelude's, then the user's (which shadow them).
    let mut templates: HashMap<String, &ast::LayerDef> = prelude.layers.iter().map(|l| (l.name.name.clone(), l)).collect();
    let mut user_templates: HashMap<&str, Span> = HashMap::new();
    for l in &file.layers {
        if let Some(prev) = user_templates.insert(&l.name.name, l.name.span) {
            diags.push(duplicate_item("layer template", &l.name, prev));
            continue;
        }
        check_template_params(l, &mut diags);
        templates.insert(l.name.name.clone(), l);
    }
    let mut models: Vec<&ast::ModelDef> = Vec::new();
    for m in &file.models {
        if let Some(prev) = models.iter().find(|p| p.name.name == m.name.name) {
            diags.push(duplicate_item("model", &m.name, prev.name.span));
            continue;
        }
        models.push(m);
    }
    let mut datas: Vec<&ast::DataDef> = Vec::new();
    for d in &file.data {
        if let Some(prev) = datas.iter().find(|p| p.name.name == d.name.name) {
            diags.push(duplicate_item("data source", &d.name, prev.name.span));
            continue;
        }
        datas.push(d);
    }
    for (what, extra) in
        [("train", file.trains.iter().skip(1).map(|t| t.head).collect::<Vec<_>>()), ("placement", file.placements.iter().skip(1).map(|p| p.head).collect())]
    {
        for span in extra {
            diags.push(
                Diagnostic::error(
                    if what == "train" { "train::duplicate" } else { "placement::duplicate" },
                    format!("the plan has more than one `{what}` section"),
                )
                .label(span, "another one here")
                .help(format!("a plan has one `{what}` section; merge them")),
            );
        }
    }

    let train_def = file.trains.first();
    if train_def.is_none() {
        let span = models.first().map(|m| m.name.span).unwrap_or(Span::new(SourceId::USER, 0, 0));
        diags.push(
            Diagnostic::error("train::missing", "the plan has no `train` section")
                .label(span, "nothing says how to train this")
                .help("add `train { model: M, data: D, batch: 64, epochs: 10, optimizer: sgd(lr: 0.1) }`"),
        );
    }

    // Which model is trained.
    let model_def = select_model(&models, train_def, &mut diags);

    // Symbolic dims: names in input types that the model does not define.
    let mut syms: Vec<String> = Vec::new();
    let mut sym_spans: BTreeMap<String, Span> = BTreeMap::new();
    if let Some(m) = model_def {
        let defined: HashSet<&str> = m
            .members
            .iter()
            .filter_map(|mm| match mm {
                ast::ModelMember::Input(i) => Some(i.name.name.as_str()),
                ast::ModelMember::Layer(l) => Some(l.name.name.as_str()),
                ast::ModelMember::Let(l) => Some(l.name.name.as_str()),
                ast::ModelMember::Loss(..) => None,
            })
            .collect();
        for mm in &m.members {
            if let ast::ModelMember::Input(i) = mm {
                for d in &i.ty.dims {
                    collect_names(d, &mut |id: &ast::Ident| {
                        if !defined.contains(id.name.as_str()) && !sym_spans.contains_key(&id.name) {
                            sym_spans.insert(id.name.clone(), id.span);
                            if id.name != "batch" {
                                syms.push(id.name.clone());
                            }
                        }
                    });
                }
            }
        }
    }

    let train = match (train_def, model_def) {
        (Some(t), Some(m)) => sections::train(t, &m.name.name, &syms, &mut diags),
        _ => None,
    };
    // Dims come from the raw entries, so that a mistake elsewhere in the
    // train section does not hide the model's own errors.
    let dims: BTreeMap<String, i64> = match train_def {
        Some(t) => t
            .entries
            .iter()
            .filter(|e| e.key.name == "batch" || syms.contains(&e.key.name))
            .filter_map(|e| match sections::konst(&e.value) {
                Ok(types::Val::Int(n, _)) if n >= 1 => Some((e.key.name.clone(), n)),
                _ => None,
            })
            .collect(),
        None => BTreeMap::new(),
    };
    let dims: BTreeMap<String, i64> = dims.into_iter().chain(overrides.iter().map(|(k, v)| (k.clone(), *v))).collect();
    let unbound: HashSet<String> = sym_spans.keys().filter(|s| !dims.contains_key(*s)).cloned().collect();
    if let Some(t) = train_def {
        for (name, span) in &sym_spans {
            if unbound.contains(name) && sections::train_entry(t, name).is_none() {
                diags.push(
                    Diagnostic::error("shape::unbound_dim", format!("symbolic dim `{name}` is not bound"))
                        .label(*span, format!("`{name}` is used here"))
                        .label(t.head, "the train section does not set it")
                        .help(format!("add `{name}: <size>` to the train section")),
                );
            }
        }
    }

    let model = model_def.map(|m| {
        let (model, d) = model::check_model(m, &templates, &dims, &unbound);
        diags.extend(d);
        model
    });

    // Templates no instance uses cannot be typed (their shapes depend on
    // their arguments), but their names can be resolved.
    let used: HashSet<&str> = model.as_ref().map(|m| m.instances.iter().map(|i| i.template.as_str()).collect()).unwrap_or_default();
    for l in &file.layers {
        if !used.contains(l.name.name.as_str()) && model.is_some() {
            lint_template(l, &templates, &mut diags);
        }
    }

    let data = match (train_def, &train) {
        (Some(t), _) => select_data(t, train.as_ref().and_then(|t| t.data.as_deref()), &datas, &mut diags),
        _ => None,
    };
    // Sources are checked even when unused, so their errors show.
    let mut data_checked = None;
    for d in &datas {
        let checked = sections::data(d, &mut diags);
        if data.is_some_and(|sel| std::ptr::eq(sel, *d)) {
            data_checked = checked;
        }
    }
    if let (Some(d), Some(m)) = (&data_checked, &model) {
        if m.inputs_complete {
            sections::data_fits_model(d, m, &mut diags);
        }
    }

    let (devices, devices_ok) = sections::devices(&file.devices, &mut diags);
    let placement = match (&model, dims.get("batch")) {
        (Some(m), Some(&batch)) if devices_ok => placement::placement(file.placements.first(), m, batch, &devices, &mut diags),
        _ => None,
    };

    let checked = match (model, train, data_checked, placement) {
        (Some(model), Some(train), Some(data), Some(placement)) if !diags.has_errors() => {
            let autocast = match &placement {
                Placement::Explicit(e) => e.autocast.clone(),
                _ => Vec::new(),
            };
            Some(Checked { model, train, data, devices, placement, autocast })
        }
        _ => None,
    };
    (checked, diags)
}

fn duplicate_item(what: &str, name: &ast::Ident, prev: Span) -> Diagnostic {
    Diagnostic::error("names::duplicate", format!("{what} `{}` is defined twice", name.name))
        .label(name.span, "defined again here")
        .label(prev, "first defined here")
        .help(format!("rename one of the two `{}`", name.name))
}

fn check_template_params(l: &ast::LayerDef, diags: &mut Diagnostics) {
    let mut seen: HashMap<&str, Span> = HashMap::new();
    for p in &l.params {
        if let Some(prev) = seen.insert(&p.name.name, p.name.span) {
            diags.push(duplicate_item("template argument", &p.name, prev));
        }
    }
}

fn select_model<'a>(models: &[&'a ast::ModelDef], train: Option<&ast::TrainDef>, diags: &mut Diagnostics) -> Option<&'a ast::ModelDef> {
    let entry = train.and_then(|t| sections::train_entry(t, "model"));
    match entry {
        Some(e) => {
            let name = match &e.value.kind {
                ExprKind::Path(p) if p.segs.is_empty() => &p.root,
                _ => {
                    diags.push(
                        Diagnostic::error("train::bad_value", "`model` names a model").label(e.value.span, "not a model name").help("write `model: MyModel`"),
                    );
                    return None;
                }
            };
            match models.iter().find(|m| m.name.name == name.name) {
                Some(m) => Some(m),
                None => {
                    let names: Vec<&str> = models.iter().map(|m| m.name.name.as_str()).collect();
                    let mut d = Diagnostic::error("names::unknown_model", format!("there is no model `{}`", name.name)).label(name.span, "not a model");
                    d = d.help(match did_you_mean(&name.name, names.iter().copied()) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None if names.is_empty() => "define one with `model Name { … }`".into(),
                        None => format!("models in this file: {}", names.join(", ")),
                    });
                    diags.push(d);
                    None
                }
            }
        }
        None => match models {
            [] => {
                diags.push(
                    Diagnostic::error("model::missing", "the plan defines no model")
                        .label(train.map(|t| t.head).unwrap_or(Span::new(SourceId::USER, 0, 0)), "nothing to train")
                        .help("define one: `model M { input x: f32[batch, 4]  layer fc = Linear(4, 2)  loss … }`"),
                );
                None
            }
            [one] => Some(one),
            [first, ..] => {
                if let Some(t) = train {
                    diags.push(
                        Diagnostic::error("train::missing_key", "several models are defined; the train section must say which")
                            .label(t.head, "no `model:` here")
                            .label(first.name.span, "one of the models")
                            .help(format!("add `model: {}`", first.name.name)),
                    );
                }
                None
            }
        },
    }
}

fn select_data<'a>(t: &ast::TrainDef, name: Option<&str>, datas: &[&'a ast::DataDef], diags: &mut Diagnostics) -> Option<&'a ast::DataDef> {
    match name {
        Some(n) => match datas.iter().find(|d| d.name.name == n) {
            Some(d) => Some(d),
            None => {
                let span = sections::train_entry(t, "data").map(|e| e.value.span).unwrap_or(t.head);
                let names: Vec<&str> = datas.iter().map(|d| d.name.name.as_str()).collect();
                let mut d = Diagnostic::error("names::unknown_data", format!("there is no data source `{n}`")).label(span, "not a data source");
                d = d.help(match did_you_mean(n, names.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None if names.is_empty() => "define one, e.g. `data digits = csv(\"data/digits.csv\", label: \"label\")`".into(),
                    None => format!("data sources: {}", names.join(", ")),
                });
                diags.push(d);
                None
            }
        },
        None if sections::train_entry(t, "data").is_some() => None,
        None => match datas {
            [one] => Some(one),
            _ => {
                diags.push(Diagnostic::error("train::missing_key", "the train section does not set `data`").label(t.head, "this section").help(
                    if datas.is_empty() {
                        "define a source, e.g. `data digits = csv(\"data/digits.csv\", label: \"label\")`, and add `data: digits`".to_string()
                    } else {
                        format!("add `data: {}`", datas[0].name.name)
                    },
                ));
                None
            }
        },
    }
}

/// Calls `f` on every plain name an expression mentions.
fn collect_names(e: &ast::Expr, f: &mut impl FnMut(&ast::Ident)) {
    match &e.kind {
        ExprKind::Path(p) if p.segs.is_empty() => f(&p.root),
        ExprKind::Neg(x) => collect_names(x, f),
        ExprKind::Binary(_, a, b) => {
            collect_names(a, f);
            collect_names(b, f);
        }
        ExprKind::List(items) => items.iter().for_each(|x| collect_names(x, f)),
        ExprKind::Call(c) => c.args.iter().for_each(|a| collect_names(&a.value, f)),
        _ => {}
    }
}

/// Name resolution for a template that is never instantiated.
fn lint_template(l: &ast::LayerDef, templates: &HashMap<String, &ast::LayerDef>, diags: &mut Diagnostics) {
    let mut names: Vec<String> = l.params.iter().map(|p| p.name.name.clone()).collect();
    let mut forward = None;
    for m in &l.members {
        match m {
            ast::Member::Param(p) => names.push(p.name.name.clone()),
            ast::Member::Sublayer(s) => {
                names.push(s.name.name.clone());
                if !templates.contains_key(&s.template.name) {
                    let mut d = Diagnostic::error("names::unknown_layer", format!("no layer template named `{}`", s.template.name))
                        .label(s.template.span, "not a layer template");
                    if let Some(t) = did_you_mean(&s.template.name, templates.keys().map(String::as_str)) {
                        d = d.help(format!("did you mean `{t}`?"));
                    }
                    diags.push(d);
                }
            }
            ast::Member::Forward(f) => forward = Some(f),
        }
    }
    let check = |e: &ast::Expr, scope: &[String], diags: &mut Diagnostics| {
        walk_names(e, &mut |id: &ast::Ident, called: bool| {
            let known = scope.contains(&id.name)
                || (called && model::OPS.contains(&id.name.as_str()))
                || (!called && (model::INITS.contains(&id.name.as_str()) || id.name == "true" || id.name == "false"));
            if !known {
                let mut d = Diagnostic::error("names::undefined", format!("cannot find `{}` in this scope", id.name)).label(id.span, "not found");
                let mut cands: Vec<&str> = scope.iter().map(String::as_str).collect();
                if called {
                    cands.extend(model::OPS.iter().copied());
                }
                if let Some(s) = did_you_mean(&id.name, cands.iter().copied()) {
                    d = d.help(format!("did you mean `{s}`?"));
                }
                diags.push(d);
            }
        });
    };
    for m in &l.members {
        match m {
            ast::Member::Param(p) => {
                p.ty.dims.iter().for_each(|d| check(d, &names, diags));
                if let Some(init) = &p.init {
                    check(init, &names, diags);
                }
            }
            ast::Member::Sublayer(s) => s.args.iter().for_each(|a| check(&a.value, &names, diags)),
            ast::Member::Forward(_) => {}
        }
    }
    match forward {
        None => diags.push(
            Diagnostic::error("layer::no_forward", format!("layer `{}` has no `forward`", l.name.name))
                .label(l.name.span, "this template")
                .help("add `forward(x) = …` saying what the layer computes"),
        ),
        Some(f) => {
            let mut scope = names.clone();
            scope.extend(f.inputs.iter().map(|i| i.name.clone()));
            for let_ in &f.lets {
                check(&let_.value, &scope, diags);
                scope.push(let_.name.name.clone());
            }
            check(&f.ret, &scope, diags);
        }
    }
}

/// Calls `f(name, is_callee)` on the root name of every path and call.
fn walk_names(e: &ast::Expr, f: &mut impl FnMut(&ast::Ident, bool)) {
    match &e.kind {
        ExprKind::Path(p) => f(&p.root, false),
        ExprKind::Call(c) => {
            f(&c.callee.root, c.callee.segs.is_empty());
            c.args.iter().for_each(|a| walk_names(&a.value, f));
        }
        ExprKind::Neg(x) => walk_names(x, f),
        ExprKind::Binary(_, a, b) => {
            walk_names(a, f);
            walk_names(b, f);
        }
        ExprKind::List(items) => items.iter().for_each(|x| walk_names(x, f)),
        _ => {}
    }
}
