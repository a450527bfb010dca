//! Model checking: instantiate the layer tree, then type the forward pass.
//!
//! Input: a model definition, the layer templates in scope (prelude and user)
//! and the symbolic dims bound by the train section. Output: a [`Model`] with
//! every parameter's path, type and init, the instance tree, the top-level
//! layers in forward order and the loss type. Every expression is evaluated
//! once per call site with concrete shapes, so a template's error names the
//! shapes it was called with.
//!
//! Primitive ops are checked by `ops`, which sees this checker only through
//! the `context::Context` trait that `Cx` implements: `model` imports
//! `ops`, never the other way round.

use super::context::{number, ArgVal, Context};
use super::ops;
use super::types::{DType, Dim, InstId, Prim, TId, TraceOp, Ty, Val};
use crate::diag::{did_you_mean, Diagnostic, Diagnostics, SourceId, Span};
use crate::syntax::ast::{self, ExprKind, Index, PathSeg};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;

/// How a parameter is initialised.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f64),
    GlorotUniform,
    GlorotNormal,
    Normal { mean: f64, std: f64 },
    Uniform { low: f64, high: f64 },
}

#[derive(Clone, Debug)]
pub struct Param {
    /// Dotted path: `fc1.w`, `blocks.0.mlp.up.w`.
    pub path: String,
    pub ty: Ty,
    pub init: Init,
    pub inst: InstId,
    /// Its node in the trace.
    pub node: TId,
    /// The `param` declaration.
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum Child {
    One(InstId),
    Repeat(Vec<InstId>),
}

#[derive(Clone, Debug)]
pub struct Instance {
    /// Dotted path of the instance (`blocks.0.mlp`).
    pub path: String,
    pub template: String,
    /// Template arguments after defaults.
    pub args: Vec<(String, Val)>,
    /// Indices into `Model::params`, in declaration order.
    pub params: Vec<usize>,
    pub children: Vec<(String, Child)>,
    /// Members whose declaration had errors (already reported): their uses stay silent.
    pub broken: Vec<String>,
    /// The constructor call that built it.
    pub span: Span,
}

/// A top-level layer of the model.
#[derive(Clone, Debug)]
pub struct TopLayer {
    pub name: String,
    pub template: String,
    pub child: Child,
    pub span: Span,
}

/// A unit a pipeline stage can hold: a top-level layer, or one element of a
/// top-level `repeat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    Layer(usize),
    Elem(usize, usize),
}

#[derive(Clone, Debug)]
pub struct Input {
    pub name: String,
    pub ty: Ty,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    pub inputs: Vec<Input>,
    pub params: Vec<Param>,
    pub instances: Vec<Instance>,
    pub top: Vec<TopLayer>,
    /// Units in the order the forward pass first runs them.
    pub forward_order: Vec<Unit>,
    pub loss: Option<Ty>,
    /// The forward pass as a list of primitive operations; arguments refer
    /// to earlier entries, so the list is in a valid execution order.
    pub trace: Vec<TraceOp>,
    /// The loss's entry in the trace.
    pub loss_node: Option<TId>,
    /// False when an input's type had errors (and the input is missing here).
    pub inputs_complete: bool,
    pub name_span: Span,
    pub span: Span,
}

impl Model {
    pub fn param_count(&self) -> i64 {
        self.params.iter().map(|p| p.ty.numel()).sum()
    }

    pub fn param_bytes(&self) -> u64 {
        self.params.iter().map(|p| p.ty.bytes()).sum()
    }

    /// `blocks[2]` or `fc1`.
    pub fn unit_name(&self, u: Unit) -> String {
        match u {
            Unit::Layer(i) => self.top[i].name.clone(),
            Unit::Elem(i, j) => format!("{}[{j}]", self.top[i].name),
        }
    }

    /// The dotted path its parameters start with: `blocks.0` for `blocks[0]`.
    pub fn unit_path(&self, u: Unit) -> String {
        match u {
            Unit::Layer(i) => self.top[i].name.clone(),
            Unit::Elem(i, j) => format!("{}.{j}", self.top[i].name),
        }
    }

    /// Whether parameter `p` belongs to unit `u` (lies under its path).
    pub fn unit_owns(&self, u: Unit, p: usize) -> bool {
        let pre = self.unit_path(u);
        self.params.get(p).is_some_and(|x| x.path == pre || x.path.strip_prefix(&pre).is_some_and(|r| r.starts_with('.')))
    }

    /// Every unit, in declaration order.
    pub fn units(&self) -> Vec<Unit> {
        let mut out = Vec::new();
        for (i, t) in self.top.iter().enumerate() {
            match &t.child {
                Child::One(_) => out.push(Unit::Layer(i)),
                Child::Repeat(v) => out.extend((0..v.len()).map(|j| Unit::Elem(i, j))),
            }
        }
        out
    }
}

/// Names of the primitive ops, for "did you mean".
pub const OPS: &[&str] = &[
    "relu",
    "gelu",
    "tanh",
    "sigmoid",
    "exp",
    "log",
    "sqrt",
    "silu",
    "softmax",
    "log_softmax",
    "layer_norm",
    "rms_norm",
    "sum",
    "mean",
    "max",
    "reshape",
    "transpose",
    "embedding",
    "causal_attention",
    "attention",
    "rope",
    "conv2d",
    "max_pool2d",
    "avg_pool2d",
    "dropout",
    "cross_entropy",
    "mse",
];

/// Names an init may have.
pub const INITS: &[&str] = &["zeros", "ones", "constant", "glorot_uniform", "glorot_normal", "normal", "uniform"];

const MAX_DEPTH: usize = 48;

/// Distinct layer calls (instance and input types) one forward pass may make.
const MAX_CALLS: usize = 100_000;

/// Names visible to an expression.
#[derive(Default)]
struct Scope {
    vars: HashMap<String, Val>,
    /// Whether unknown names may be symbolic dims (model level).
    model_level: bool,
}

pub(super) struct Cx<'a> {
    templates: &'a HashMap<String, &'a ast::LayerDef>,
    dims: &'a BTreeMap<String, i64>,
    /// Symbolic dims the train section leaves unbound (reported once already).
    unbound: &'a HashSet<String>,
    pub insts: Vec<Instance>,
    pub params: Vec<Param>,
    /// (span, note) frames added as labels to errors found inside them.
    frames: Vec<(Span, String)>,
    /// Templates being instantiated, to catch recursion.
    building: Vec<String>,
    calls: usize,
    forward_order: Vec<Unit>,
    top_index: HashMap<InstId, Unit>,
    /// Top-level layers mentioned at model level, called or not.
    used: HashSet<usize>,
    /// Results of layer calls by (instance, input types): a layer called
    /// again with the same types gives the same result and the same errors.
    memo: HashMap<(InstId, String), Val>,
    trace: Vec<TraceOp>,
    /// The top-level layer whose call is being traced.
    unit: Option<Unit>,
    pub diags: Diagnostics,
}

/// Checks one model. `dims` binds symbolic dims; `unbound` lists those that
/// are used but not bound (their error is reported by the caller).
pub fn check_model(
    def: &ast::ModelDef,
    templates: &HashMap<String, &ast::LayerDef>,
    dims: &BTreeMap<String, i64>,
    unbound: &HashSet<String>,
) -> (Model, Diagnostics) {
    let mut cx = Cx {
        templates,
        dims,
        unbound,
        insts: Vec::new(),
        params: Vec::new(),
        frames: Vec::new(),
        building: Vec::new(),
        calls: 0,
        forward_order: Vec::new(),
        top_index: HashMap::new(),
        used: HashSet::new(),
        memo: HashMap::new(),
        trace: Vec::new(),
        unit: None,
        diags: Diagnostics::default(),
    };
    let mut scope = Scope { model_level: true, ..Scope::default() };
    let mut seen: HashMap<String, Span> = HashMap::new();
    let mut inputs = Vec::new();
    let mut inputs_complete = true;
    let mut top = Vec::new();
    let mut loss: Option<Ty> = None;
    let mut loss_node: Option<TId> = None;
    let mut loss_span: Option<Span> = None;

    for m in &def.members {
        let name = match m {
            ast::ModelMember::Input(i) => Some(&i.name),
            ast::ModelMember::Layer(l) => Some(&l.name),
            ast::ModelMember::Let(l) => Some(&l.name),
            ast::ModelMember::Loss(..) => None,
        };
        if let Some(name) = name {
            if let Some(prev) = seen.get(&name.name) {
                cx.err(duplicate(&name.name, name.span, *prev));
                continue;
            }
            seen.insert(name.name.clone(), name.span);
        }
        match m {
            ast::ModelMember::Input(i) => {
                let ty = cx.tensor_type(&i.ty, &scope);
                if let Some(ty) = &ty {
                    let v = cx.emit(Prim::Input(inputs.len()), Vec::new(), ty.clone());
                    scope.vars.insert(i.name.name.clone(), v);
                    inputs.push(Input { name: i.name.name.clone(), ty: ty.clone(), span: i.span });
                } else {
                    scope.vars.insert(i.name.name.clone(), Val::Error);
                    inputs_complete = false;
                }
            }
            ast::ModelMember::Layer(l) => {
                let child = cx.build_child(l, &scope, &l.name.name);
                match &child {
                    Some(Child::One(id)) => {
                        cx.top_index.insert(*id, Unit::Layer(top.len()));
                        scope.vars.insert(l.name.name.clone(), Val::Layer(*id));
                    }
                    Some(Child::Repeat(ids)) => {
                        for (j, id) in ids.iter().enumerate() {
                            cx.top_index.insert(*id, Unit::Elem(top.len(), j));
                        }
                        scope.vars.insert(l.name.name.clone(), Val::Repeat(ids.clone()));
                    }
                    None => {
                        scope.vars.insert(l.name.name.clone(), Val::Error);
                    }
                }
                if let Some(child) = child {
                    top.push(TopLayer { name: l.name.name.clone(), template: l.template.name.clone(), child, span: l.span });
                }
            }
            ast::ModelMember::Let(l) => {
                let v = cx.eval(&l.value, &mut scope);
                scope.vars.insert(l.name.name.clone(), v);
            }
            ast::ModelMember::Loss(e, span) => {
                if let Some(prev) = loss_span {
                    cx.err(
                        Diagnostic::error("model::multiple_losses", "a model has one loss")
                            .label(*span, "second loss")
                            .label(prev, "first loss")
                            .help("add the terms into one expression: `loss a + b`"),
                    );
                    continue;
                }
                loss_span = Some(*span);
                match cx.eval(e, &mut scope) {
                    Val::Tensor(t, id) if t.rank() == 0 && t.dtype.is_float() => {
                        loss = Some(t);
                        loss_node = Some(id);
                    }
                    Val::Tensor(t, _) => {
                        let help = if t.dtype.is_float() {
                            "reduce it to a scalar, e.g. `loss mean(…)`, or use `cross_entropy`/`mse`, which return scalars"
                        } else {
                            "a loss is a floating-point scalar"
                        };
                        cx.err(
                            Diagnostic::error("model::loss_not_scalar", format!("the loss must be a float scalar, found {t}"))
                                .label(e.span, format!("this is {t}"))
                                .help(help),
                        );
                    }
                    Val::Error => {}
                    other => cx.err(
                        Diagnostic::error("model::loss_not_scalar", format!("the loss must be a float scalar, found {}", other.describe()))
                            .label(e.span, "not a tensor")
                            .help("a loss is computed from the inputs, e.g. `loss cross_entropy(out(x), label)`"),
                    ),
                }
            }
        }
    }
    if loss_span.is_none() {
        cx.err(
            Diagnostic::error("model::no_loss", format!("model `{}` has no loss", def.name.name))
                .label(def.name.span, "this model")
                .help("add a `loss` statement, e.g. `loss cross_entropy(out(x), label)`"),
        );
    }
    for (i, t) in top.iter().enumerate() {
        let used = cx.used.contains(&i);
        if !used && loss_span.is_some() {
            cx.diags.push(
                Diagnostic::warning("model::unused_layer", format!("layer `{}` is never called", t.name))
                    .label(t.span, "declared here")
                    .help("call it in the loss expression, or remove it"),
            );
        }
    }
    let model = Model {
        name: def.name.name.clone(),
        inputs,
        params: cx.params,
        instances: cx.insts,
        top,
        forward_order: cx.forward_order,
        loss,
        trace: cx.trace,
        loss_node,
        inputs_complete,
        name_span: def.name.span,
        span: def.span,
    };
    (model, cx.diags)
}

fn duplicate(name: &str, span: Span, prev: Span) -> Diagnostic {
    Diagnostic::error("names::duplicate", format!("`{name}` is defined twice"))
        .label(span, "defined again here")
        .label(prev, "first defined here")
        .help(format!("rename one of the two `{name}`"))
}

/// The context the primitive ops' rules (`ops`) check in: errors are
/// labelled with the calls they were found inside, operations go to the
/// forward trace.
impl Context for Cx<'_> {
    fn err(&mut self, mut d: Diagnostic) {
        // The innermost frames say where; the outermost, which call of the
        // user's started it. Frames between are left out.
        let n = self.frames.len();
        let shown = self.frames.iter().enumerate().rev().filter(|(i, _)| *i + 3 >= n || *i == 0).map(|(_, f)| f);
        for (span, note) in shown {
            if d.labels.iter().all(|l| l.span != *span) {
                d.labels.push(crate::diag::Label { span: *span, message: note.clone() });
            }
        }
        // An error inside a prelude template is the user's call's fault:
        // lead with the innermost place in the user's file.
        if d.primary_span().is_some_and(|s| s.src != SourceId::USER) {
            if let Some(i) = d.labels.iter().position(|l| l.span.src == SourceId::USER) {
                let l = d.labels.remove(i);
                d.labels.insert(0, l);
            }
        }
        self.diags.push(d);
    }

    fn emit(&mut self, prim: Prim, args: Vec<TId>, ty: Ty) -> Val {
        let id = TId(self.trace.len() as u32);
        self.trace.push(TraceOp { prim, args, ty: ty.clone(), unit: self.unit });
        Val::Tensor(ty, id)
    }
}

impl<'a> Cx<'a> {
    fn mark_used(&mut self, v: &Val) {
        let ids: Vec<InstId> = match v {
            Val::Layer(id) => vec![*id],
            Val::Repeat(ids) => ids.clone(),
            _ => return,
        };
        for id in ids {
            if let Some(Unit::Layer(i) | Unit::Elem(i, _)) = self.top_index.get(&id) {
                self.used.insert(*i);
            }
        }
    }

    // -------------------------------------------------------------- instantiation

    /// Builds `layer name = [repeat N] Template(args)` in `scope`.
    fn build_child(&mut self, decl: &ast::SublayerDecl, scope: &Scope, path: &str) -> Option<Child> {
        let mut eval_scope = Scope { vars: scope.vars.clone(), model_level: scope.model_level };
        let args: Vec<ArgVal> =
            decl.args.iter().map(|a| ArgVal { name: a.name.clone(), val: self.eval(&a.value, &mut eval_scope), span: a.value.span }).collect();
        match &decl.repeat {
            None => self.instantiate(&decl.template, &args, decl.ctor_span, path).map(Child::One),
            Some(count) => {
                let (n, span) = match count {
                    ast::RepeatCount::Int(n, span) => (*n, *span),
                    ast::RepeatCount::Name(id) => match self.lookup(&id.name, id.span, &eval_scope) {
                        Val::Int(n, _) => (n, id.span),
                        Val::Error => return None,
                        other => {
                            self.err(
                                Diagnostic::error("layer::repeat_count", format!("`repeat` needs an integer count, found {}", other.describe()))
                                    .label(id.span, "not an integer")
                                    .help("write `repeat 4 Block(…)`"),
                            );
                            return None;
                        }
                    },
                };
                if !(1..=4096).contains(&n) {
                    self.err(
                        Diagnostic::error("layer::repeat_count", format!("`repeat` count must be between 1 and 4096, found {n}"))
                            .label(span, "this count")
                            .help("repeat a layer at least once"),
                    );
                    return None;
                }
                let mut ids = Vec::new();
                for i in 0..n {
                    ids.push(self.instantiate(&decl.template, &args, decl.ctor_span, &format!("{path}.{i}"))?);
                }
                Some(Child::Repeat(ids))
            }
        }
    }

    fn instantiate(&mut self, template: &ast::Ident, args: &[ArgVal], ctor: Span, path: &str) -> Option<InstId> {
        let Some(def) = self.templates.get(&template.name).copied() else {
            let names: Vec<&str> = self.templates.keys().map(String::as_str).collect();
            let mut d =
                Diagnostic::error("names::unknown_layer", format!("no layer template named `{}`", template.name)).label(template.span, "not a layer template");
            d = match did_you_mean(&template.name, names.iter().copied()) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => {
                    let mut all = names.clone();
                    all.sort();
                    d.help(format!("templates in scope: {}", all.join(", ")))
                }
            };
            self.err(d);
            return None;
        };
        if self.building.len() >= MAX_DEPTH {
            self.err(
                Diagnostic::error("layer::too_deep", format!("layers nest more than {MAX_DEPTH} deep"))
                    .label(template.span, "nesting limit reached here")
                    .help("flatten the model: fewer templates inside templates"),
            );
            return None;
        }
        if self.building.contains(&def.name.name) {
            self.err(
                Diagnostic::error("layer::recursive", format!("layer `{}` contains itself", def.name.name))
                    .label(template.span, "instantiated again here, inside itself")
                    .label(def.name.span, "template defined here")
                    .help("a layer's sublayers must be other templates; use `repeat` to stack copies"),
            );
            return None;
        }
        let bound = self.bind_template_args(def, args, ctor)?;
        let id = InstId(self.insts.len() as u32);
        self.insts.push(Instance {
            path: path.to_string(),
            template: def.name.name.clone(),
            args: bound.clone(),
            params: Vec::new(),
            children: Vec::new(),
            broken: Vec::new(),
            span: ctor,
        });
        self.building.push(def.name.name.clone());
        self.frames.push((ctor, format!("building `{}` = {}(…)", short_path(path), def.name.name)));

        let mut scope = Scope::default();
        for (k, v) in &bound {
            scope.vars.insert(k.clone(), v.clone());
        }
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for (k, _) in &bound {
            if let Some(p) = def.params.iter().find(|p| &p.name.name == k) {
                seen.insert(k, p.name.span);
            }
        }
        let mut forward: Option<Span> = None;
        for m in &def.members {
            let name = match m {
                ast::Member::Param(p) => Some(&p.name),
                ast::Member::Sublayer(s) => Some(&s.name),
                ast::Member::Forward(f) => {
                    if let Some(prev) = forward {
                        self.err(
                            Diagnostic::error("layer::duplicate_forward", format!("layer `{}` has two `forward`s", def.name.name))
                                .label(f.span, "second forward")
                                .label(prev, "first forward")
                                .help("a layer has exactly one forward function"),
                        );
                    }
                    forward = Some(f.span);
                    None
                }
            };
            let Some(name) = name else { continue };
            if let Some(prev) = seen.get(name.name.as_str()) {
                self.err(duplicate(&name.name, name.span, *prev));
                continue;
            }
            seen.insert(&name.name, name.span);
            match m {
                ast::Member::Param(p) => {
                    let Some(ty) = self.tensor_type(&p.ty, &scope) else {
                        scope.vars.insert(p.name.name.clone(), Val::Error);
                        self.insts[id.0 as usize].broken.push(p.name.name.clone());
                        continue;
                    };
                    if !ty.dtype.is_float() {
                        self.err(
                            Diagnostic::error("dtype::param_not_float", format!("parameter `{}` has integer dtype {}", p.name.name, ty.dtype))
                                .label(p.ty.dtype.span, "trained parameters must be floats")
                                .help("declare it as `f32[…]`"),
                        );
                        scope.vars.insert(p.name.name.clone(), Val::Error);
                        self.insts[id.0 as usize].broken.push(p.name.name.clone());
                        continue;
                    }
                    let init = match &p.init {
                        None => Init::Zeros,
                        Some(e) => self.init(e, &mut scope).unwrap_or(Init::Zeros),
                    };
                    let idx = self.params.len();
                    let node = self.emit(Prim::Param(idx), Vec::new(), ty.clone());
                    let Val::Tensor(_, node_id) = node else { continue };
                    self.params.push(Param { path: format!("{path}.{}", p.name.name), ty, init, inst: id, node: node_id, span: p.span });
                    self.insts[id.0 as usize].params.push(idx);
                    scope.vars.insert(p.name.name.clone(), node);
                }
                ast::Member::Sublayer(s) => {
                    let child = self.build_child(s, &scope, &format!("{path}.{}", s.name.name));
                    let val = match &child {
                        Some(Child::One(c)) => Val::Layer(*c),
                        Some(Child::Repeat(v)) => Val::Repeat(v.clone()),
                        None => Val::Error,
                    };
                    scope.vars.insert(s.name.name.clone(), val);
                    match child {
                        Some(child) => self.insts[id.0 as usize].children.push((s.name.name.clone(), child)),
                        None => self.insts[id.0 as usize].broken.push(s.name.name.clone()),
                    }
                }
                ast::Member::Forward(_) => {}
            }
        }
        if forward.is_none() {
            self.err(
                Diagnostic::error("layer::no_forward", format!("layer `{}` has no `forward`", def.name.name))
                    .label(def.name.span, "this template")
                    .help("add `forward(x) = …` saying what the layer computes"),
            );
        }
        self.frames.pop();
        self.building.pop();
        Some(id)
    }

    /// Binds a template's arguments: positional, then named, then defaults.
    fn bind_template_args(&mut self, def: &ast::LayerDef, args: &[ArgVal], ctor: Span) -> Option<Vec<(String, Val)>> {
        let mut slots: Vec<Option<Val>> = vec![None; def.params.len()];
        let mut ok = true;
        let mut positional = 0;
        for a in args {
            let slot = match &a.name {
                None => {
                    positional += 1;
                    if positional > def.params.len() {
                        self.err(
                            Diagnostic::error(
                                "layer::arity",
                                format!("`{}` takes {} argument{}, but {} were given", def.name.name, def.params.len(), plural(def.params.len()), args.len()),
                            )
                            .label(a.span, "unexpected argument")
                            .label(def.name.span, format!("`{}` is defined here", def.name.name))
                            .help(format!("the arguments are ({})", param_list(def))),
                        );
                        ok = false;
                        continue;
                    }
                    positional - 1
                }
                Some(n) => match def.params.iter().position(|p| p.name.name == n.name) {
                    Some(i) => i,
                    None => {
                        let names: Vec<&str> = def.params.iter().map(|p| p.name.name.as_str()).collect();
                        let mut d = Diagnostic::error("names::unknown_argument", format!("`{}` has no argument `{}`", def.name.name, n.name))
                            .label(n.span, "unknown argument");
                        d = d.help(match did_you_mean(&n.name, names.iter().copied()) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => format!("the arguments are ({})", param_list(def)),
                        });
                        self.err(d);
                        ok = false;
                        continue;
                    }
                },
            };
            if slots[slot].is_some() {
                self.err(
                    Diagnostic::error("layer::argument_twice", format!("argument `{}` is given twice", def.params[slot].name.name))
                        .label(a.span, "given again here")
                        .help("pass each argument once, by position or by name"),
                );
                ok = false;
                continue;
            }
            slots[slot] = Some(a.val.clone());
        }
        let mut bound: Vec<(String, Val)> = Vec::new();
        for (i, p) in def.params.iter().enumerate() {
            let v = match slots[i].take() {
                Some(v) => v,
                None => match &p.default {
                    Some(e) => {
                        let mut scope = Scope::default();
                        for (k, v) in &bound {
                            scope.vars.insert(k.clone(), v.clone());
                        }
                        self.eval(e, &mut scope)
                    }
                    None => {
                        self.err(
                            Diagnostic::error("layer::missing_argument", format!("`{}` needs argument `{}`", def.name.name, p.name.name))
                                .label(ctor, format!("`{}` is not given", p.name.name))
                                .label(p.name.span, "declared here")
                                .help(format!("the arguments are ({})", param_list(def))),
                        );
                        ok = false;
                        Val::Error
                    }
                },
            };
            bound.push((p.name.name.clone(), v));
        }
        ok.then_some(bound)
    }

    fn init(&mut self, e: &ast::Expr, scope: &mut Scope) -> Option<Init> {
        let (name, span, args): (&str, Span, &[ast::Arg]) = match &e.kind {
            ExprKind::Path(p) if p.segs.is_empty() => (&p.root.name, p.root.span, &[]),
            ExprKind::Call(c) if c.callee.segs.is_empty() => (&c.callee.root.name, c.callee.root.span, &c.args),
            ExprKind::Int(_) | ExprKind::Float(_) | ExprKind::Neg(_) => {
                let v = self.eval(e, scope);
                return number(&v).map(Init::Constant);
            }
            _ => {
                self.err(
                    Diagnostic::error("init::unknown", "a parameter's init is an init name or call")
                        .label(e.span, "not an init")
                        .help(format!("use one of: {}", INITS.join(", "))),
                );
                return None;
            }
        };
        let (params, required): (&[&str], usize) = match name {
            "zeros" | "ones" | "glorot_uniform" | "glorot_normal" => (&[], 0),
            "constant" => (&["value"], 1),
            "normal" => (&["mean", "std"], 0),
            "uniform" => (&["low", "high"], 0),
            _ => {
                let mut d = Diagnostic::error("init::unknown", format!("unknown init `{name}`")).label(span, "not an init");
                d = d.help(match did_you_mean(name, INITS.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("use one of: {}", INITS.join(", ")),
                });
                self.err(d);
                return None;
            }
        };
        let vals: Vec<ArgVal> = args.iter().map(|a| ArgVal { name: a.name.clone(), val: self.eval(&a.value, scope), span: a.value.span }).collect();
        let bound = ops::bind_args(self, name, e.span, &vals, params, required)?;
        let mut num = |i: usize, default: f64| -> Option<f64> {
            match &bound[i] {
                None => Some(default),
                Some((v, s)) => match number(v) {
                    Some(x) => Some(x),
                    None => {
                        self.err(
                            Diagnostic::error("init::bad_argument", format!("`{}` must be a number, found {}", params[i], v.describe()))
                                .label(*s, "not a number")
                                .help("write a number such as `0.02`"),
                        );
                        None
                    }
                },
            }
        };
        Some(match name {
            "zeros" => Init::Zeros,
            "ones" => Init::Ones,
            "glorot_uniform" => Init::GlorotUniform,
            "glorot_normal" => Init::GlorotNormal,
            "constant" => Init::Constant(num(0, 0.0)?),
            "normal" => {
                let (mean, std) = (num(0, 0.0)?, num(1, 0.02)?);
                if std <= 0.0 {
                    self.err(
                        Diagnostic::error("init::bad_argument", format!("`std` must be positive, found {std}"))
                            .label(e.span, "this init")
                            .help("a typical choice is `normal(std: 0.02)`"),
                    );
                }
                Init::Normal { mean, std }
            }
            _ => {
                let (low, high) = (num(0, -0.1)?, num(1, 0.1)?);
                if low >= high {
                    self.err(
                        Diagnostic::error("init::bad_argument", format!("`low` ({low}) must be below `high` ({high})"))
                            .label(e.span, "empty range")
                            .help("write `uniform(low: -0.1, high: 0.1)`"),
                    );
                }
                Init::Uniform { low, high }
            }
        })
    }

    /// `f32[batch, 4 * d]` → a type, or None after reporting.
    fn tensor_type(&mut self, t: &ast::TensorType, scope: &Scope) -> Option<Ty> {
        let dtype = match DType::parse(&t.dtype.name) {
            // The runtime computes in f32 and indexes with i32; another
            // dtype would be trained as one of those without a word.
            Some(d @ (DType::F32 | DType::I32)) => Some(d),
            Some(d) => {
                self.err(
                    Diagnostic::error("dtype::unsupported", format!("dtype `{d}` is not implemented by the runtime yet"))
                        .label(t.dtype.span, format!("{d} is not supported"))
                        .help("tensors are `f32` (parameters, activations, features) or `i32` (token ids, labels); write `f32` to train in single precision"),
                );
                None
            }
            None => {
                let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
                let mut d = Diagnostic::error("dtype::unknown", format!("unknown dtype `{}`", t.dtype.name)).label(t.dtype.span, "not a dtype");
                d = d.help(match did_you_mean(&t.dtype.name, names.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => format!("dtypes are {}", names.join(", ")),
                });
                self.err(d);
                None
            }
        };
        let mut shape = Vec::new();
        let mut ok = true;
        let mut scope = Scope { vars: scope.vars.clone(), model_level: scope.model_level };
        for e in &t.dims {
            match self.eval(e, &mut scope) {
                Val::Int(n, sym) if n >= 1 => shape.push(Dim { size: n, sym }),
                Val::Int(n, _) => {
                    self.err(
                        Diagnostic::error("shape::bad_dim", format!("dimension must be at least 1, found {n}"))
                            .label(e.span, format!("this is {n}"))
                            .help("every dimension of a tensor is a positive integer"),
                    );
                    ok = false;
                }
                Val::Error => ok = false,
                other => {
                    let help = match other {
                        Val::Float(_) => "a dimension is an integer; a division such as `d / heads` must be exact",
                        _ => "a dimension is an integer, a name bound to one, or arithmetic on them like `4 * d`",
                    };
                    self.err(
                        Diagnostic::error("shape::bad_dim", format!("dimension must be an integer, found {}", other.describe()))
                            .label(e.span, "not an integer")
                            .help(help),
                    );
                    ok = false;
                }
            }
        }
        if ok {
            dtype.map(|d| Ty::new(d, shape))
        } else {
            None
        }
    }

    // -------------------------------------------------------------- evaluation

    fn lookup(&mut self, name: &str, span: Span, scope: &Scope) -> Val {
        if let Some(v) = scope.vars.get(name) {
            if scope.model_level {
                self.mark_used(v);
            }
            return v.clone();
        }
        if scope.model_level {
            if let Some(&n) = self.dims.get(name) {
                return Val::Int(n, Some(Rc::from(name)));
            }
            if self.unbound.contains(name) {
                return Val::Error;
            }
        }
        if let Some(def) = self.templates.get(name) {
            self.err(
                Diagnostic::error("names::template_as_value", format!("`{name}` is a layer template, not a value"))
                    .label(span, "a template")
                    .label(def.name.span, "defined here")
                    .help(format!("declare an instance with `layer my_{} = {name}(…)` and call it", name.to_lowercase())),
            );
            return Val::Error;
        }
        let mut cands: Vec<&str> = scope.vars.keys().map(String::as_str).collect();
        if scope.model_level {
            cands.extend(self.dims.keys().map(String::as_str));
        }
        let mut d = Diagnostic::error("names::undefined", format!("cannot find `{name}` in this scope")).label(span, "not found");
        if let Some(s) = did_you_mean(name, cands.iter().copied()) {
            d = d.help(format!("did you mean `{s}`?"));
        } else if OPS.contains(&name) {
            d = d.help(format!("`{name}` is an operation: call it, as in `{name}(x)`"));
        } else if !cands.is_empty() {
            cands.sort();
            cands.truncate(12);
            d = d.help(format!("names in scope: {}", cands.join(", ")));
        }
        self.err(d);
        Val::Error
    }

    fn eval(&mut self, e: &ast::Expr, scope: &mut Scope) -> Val {
        match &e.kind {
            ExprKind::Int(i) => Val::Int(*i, None),
            ExprKind::Float(x) => Val::Float(*x),
            ExprKind::Str(s) => Val::Str(s.clone()),
            ExprKind::Range(a, b) => Val::Range(*a, *b),
            ExprKind::List(items) => Val::List(items.iter().map(|x| (self.eval(x, scope), x.span)).collect()),
            ExprKind::Path(p) => self.path(p, scope),
            ExprKind::Neg(x) => match self.eval(x, scope) {
                Val::Int(i, _) => Val::Int(i.saturating_neg(), None),
                Val::Float(f) => Val::Float(-f),
                Val::Tensor(t, id) => self.emit(Prim::Neg, vec![id], t),
                Val::Error => Val::Error,
                other => {
                    self.err(
                        Diagnostic::error("type::bad_operand", format!("cannot negate {}", other.describe()))
                            .label(x.span, "not a number or tensor")
                            .help("`-` applies to numbers and tensors"),
                    );
                    Val::Error
                }
            },
            ExprKind::Binary(op, a, b) => {
                let va = self.eval(a, scope);
                let vb = self.eval(b, scope);
                ops::binary(self, *op, (va, a.span), (vb, b.span), e.span)
            }
            ExprKind::Call(c) => self.call(c, scope),
        }
    }

    /// A name, or a path into a layer: `fc1.w`, `blocks[0].attn`.
    fn path(&mut self, p: &ast::Path, scope: &Scope) -> Val {
        if p.segs.is_empty() {
            return match p.root.name.as_str() {
                "true" => Val::Bool(true),
                "false" => Val::Bool(false),
                name if !scope.vars.contains_key(name) && (INITS.contains(&name)) => Val::Name(name.to_string()),
                name => self.lookup(name, p.root.span, scope),
            };
        }
        let mut cur = self.lookup(&p.root.name, p.root.span, scope);
        let mut walked = p.root.name.clone();
        for seg in &p.segs {
            cur = match (seg, cur) {
                (_, Val::Error) => return Val::Error,
                (PathSeg::Field(f), Val::Layer(id)) => {
                    let inst = &self.insts[id.0 as usize];
                    if let Some((_, c)) = inst.children.iter().find(|(n, _)| *n == f.name) {
                        match c {
                            Child::One(c) => Val::Layer(*c),
                            Child::Repeat(v) => Val::Repeat(v.clone()),
                        }
                    } else if let Some(&pi) = inst.params.iter().find(|&&pi| self.params[pi].path.rsplit('.').next() == Some(f.name.as_str())) {
                        Val::Tensor(self.params[pi].ty.clone(), self.params[pi].node)
                    } else {
                        let mut names: Vec<String> = inst.children.iter().map(|(n, _)| n.clone()).collect();
                        names.extend(inst.params.iter().filter_map(|&pi| self.params[pi].path.rsplit('.').next().map(str::to_string)));
                        let mut d = Diagnostic::error("names::no_member", format!("`{walked}` has no member `{}`", f.name)).label(f.span, "no such member");
                        d = d.help(match did_you_mean(&f.name, names.iter().map(String::as_str)) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => format!("its members are: {}", names.join(", ")),
                        });
                        self.err(d);
                        return Val::Error;
                    }
                }
                (PathSeg::Index(Index::At(i), span), Val::Repeat(v)) => match usize::try_from(*i).ok().and_then(|i| v.get(i)) {
                    Some(id) => Val::Layer(*id),
                    None => {
                        self.err(
                            Diagnostic::error("names::index_out_of_range", format!("`{walked}` has {} layers; index {i} is out of range", v.len()))
                                .label(*span, "out of range")
                                .help(format!("indices run from 0 to {}", v.len() - 1)),
                        );
                        return Val::Error;
                    }
                },
                (PathSeg::Index(ix, span), Val::Repeat(v)) => {
                    let (lo, hi) = match ix {
                        Index::Range(a, b) => (a.unwrap_or(0), b.unwrap_or(v.len() as i64)),
                        _ => (0, v.len() as i64),
                    };
                    if lo < 0 || hi > v.len() as i64 || lo >= hi {
                        self.err(
                            Diagnostic::error("names::index_out_of_range", format!("`{walked}[{ix}]` is not within its {} layers", v.len()))
                                .label(*span, "bad range")
                                .help(format!("ranges are `a..b` with 0 ≤ a < b ≤ {}", v.len())),
                        );
                        return Val::Error;
                    }
                    Val::Repeat(v[lo as usize..hi as usize].to_vec())
                }
                (seg, other) => {
                    let (span, what) = match seg {
                        PathSeg::Field(f) => (f.span, format!("`.{}`", f.name)),
                        PathSeg::Index(ix, s) => (*s, format!("`[{ix}]`")),
                    };
                    self.err(
                        Diagnostic::error("names::no_member", format!("cannot take {what} of {}", other.describe()))
                            .label(span, "not available here")
                            .help("fields name the members of a layer; indices select layers of a `repeat`"),
                    );
                    return Val::Error;
                }
            };
            match seg {
                PathSeg::Field(f) => walked = format!("{walked}.{}", f.name),
                PathSeg::Index(ix, _) => walked = format!("{walked}[{ix}]"),
            }
        }
        cur
    }

    fn call(&mut self, c: &ast::Call, scope: &mut Scope) -> Val {
        let args: Vec<ArgVal> = c.args.iter().map(|a| ArgVal { name: a.name.clone(), val: self.eval(&a.value, scope), span: a.value.span }).collect();
        let callee = if c.callee.segs.is_empty() {
            let name = c.callee.root.name.as_str();
            if let Some(v) = scope.vars.get(name) {
                if scope.model_level {
                    self.mark_used(v);
                }
                v.clone()
            } else if OPS.contains(&name) {
                return ops::apply(self, name, c, args);
            } else if self.templates.contains_key(name) {
                let def = self.templates[name];
                self.err(
                    Diagnostic::error("names::template_as_value", format!("`{name}` is a layer template and cannot be called on tensors"))
                        .label(c.callee.span, "a template")
                        .label(def.name.span, "defined here")
                        .help(format!("declare an instance, `layer my_{} = {name}(…)`, then call `my_{}(x)`", name.to_lowercase(), name.to_lowercase())),
                );
                return Val::Error;
            } else {
                let mut cands: Vec<&str> = OPS.to_vec();
                cands.extend(scope.vars.iter().filter(|(_, v)| matches!(v, Val::Layer(_) | Val::Repeat(_))).map(|(k, _)| k.as_str()));
                let mut d = Diagnostic::error("names::unknown_function", format!("no layer or operation named `{name}`")).label(c.callee.span, "not found");
                d = d.help(match did_you_mean(name, cands.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "call a layer declared in this scope, or one of the primitive operations listed in docs/language.md".to_string(),
                });
                self.err(d);
                return Val::Error;
            }
        } else {
            self.path(&c.callee, scope)
        };
        if let Some(a) = args.iter().find(|a| a.name.is_some()) {
            if matches!(callee, Val::Layer(_) | Val::Repeat(_)) {
                self.err(
                    Diagnostic::error("layer::named_input", "layer inputs are passed by position")
                        .label(a.span, "named here")
                        .help(format!("write `{}(x)`", c.callee)),
                );
                return Val::Error;
            }
        }
        match callee {
            Val::Layer(id) => self.call_layer(id, &args, c),
            Val::Repeat(ids) => {
                let mut cur: Vec<ArgVal> = args;
                for id in ids {
                    let out = self.call_layer(id, &cur, c);
                    if matches!(out, Val::Error) {
                        return Val::Error;
                    }
                    cur = vec![ArgVal { name: None, val: out, span: c.span }];
                }
                cur.pop().map(|a| a.val).unwrap_or(Val::Error)
            }
            Val::Error => Val::Error,
            other => {
                self.err(
                    Diagnostic::error("type::not_callable", format!("`{}` is {}, which cannot be called", c.callee, other.describe()))
                        .label(c.callee.span, "not a layer")
                        .help("only layers and primitive operations can be called"),
                );
                Val::Error
            }
        }
    }

    /// Calls a layer, tagging what it traces with the top-level layer it belongs to.
    fn call_layer(&mut self, id: InstId, args: &[ArgVal], c: &ast::Call) -> Val {
        let outer = self.unit;
        if self.frames.is_empty() {
            if let Some(u) = self.top_index.get(&id) {
                self.unit = Some(*u);
            }
        }
        let v = self.trace_layer(id, args, c);
        self.unit = outer;
        v
    }

    fn trace_layer(&mut self, id: InstId, args: &[ArgVal], c: &ast::Call) -> Val {
        if self.frames.is_empty() {
            if let Some(u) = self.top_index.get(&id) {
                if !self.forward_order.contains(u) {
                    self.forward_order.push(*u);
                }
            }
        }
        let key = (
            id,
            args.iter()
                .map(|a| match &a.val {
                    Val::Tensor(_, t) => format!("#{}", t.0),
                    other => other.describe(),
                })
                .collect::<Vec<_>>()
                .join(";"),
        );
        if let Some(v) = self.memo.get(&key) {
            return v.clone();
        }
        self.calls += 1;
        if self.frames.len() >= 2 * MAX_DEPTH || self.calls > MAX_CALLS {
            if self.calls == MAX_CALLS + 1 || self.frames.len() >= 2 * MAX_DEPTH {
                self.err(
                    Diagnostic::error("layer::too_deep", format!("the forward pass makes more than {MAX_CALLS} distinct layer calls"))
                        .label(c.span, "limit reached in this call")
                        .help("a model this large is beyond what the checker accepts; reduce `repeat` counts"),
                );
            }
            return Val::Error;
        }
        let inst = self.insts[id.0 as usize].clone();
        let Some(def) = self.templates.get(&inst.template).copied() else { return Val::Error };
        let Some(fwd) = def.members.iter().find_map(|m| match m {
            ast::Member::Forward(f) => Some(f),
            _ => None,
        }) else {
            return Val::Error;
        };
        if args.len() != fwd.inputs.len() {
            self.err(
                Diagnostic::error(
                    "layer::call_arity",
                    format!("`{}` ({}) takes {} input{}, but {} were given", c.callee, def.name.name, fwd.inputs.len(), plural(fwd.inputs.len()), args.len()),
                )
                .label(c.span, format!("{} input{} given", args.len(), plural(args.len())))
                .label(fwd.span, "forward defined here")
                .help(format!("call it as `{}({})`", c.callee, fwd.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", "))),
            );
            return Val::Error;
        }
        let mut scope = Scope::default();
        for (k, v) in &inst.args {
            scope.vars.insert(k.clone(), v.clone());
        }
        for &pi in &inst.params {
            let p = &self.params[pi];
            let short = p.path.rsplit('.').next().unwrap_or(&p.path).to_string();
            scope.vars.insert(short, Val::Tensor(p.ty.clone(), p.node));
        }
        for n in &inst.broken {
            scope.vars.insert(n.clone(), Val::Error);
        }
        for (n, ch) in &inst.children {
            let v = match ch {
                Child::One(c) => Val::Layer(*c),
                Child::Repeat(v) => Val::Repeat(v.clone()),
            };
            scope.vars.insert(n.clone(), v);
        }
        let mut shown = Vec::new();
        for (name, a) in fwd.inputs.iter().zip(args) {
            match &a.val {
                Val::Tensor(t, _) => shown.push(format!("{}: {t}", name.name)),
                Val::Error => return Val::Error,
                other => {
                    self.err(
                        Diagnostic::error("type::not_a_tensor", format!("layer inputs are tensors, found {}", other.describe()))
                            .label(a.span, "not a tensor")
                            .help("pass a model input or the output of another layer"),
                    );
                    return Val::Error;
                }
            }
            scope.vars.insert(name.name.clone(), a.val.clone());
        }
        let pushed = if inst.span.src == SourceId::USER && c.span.src == SourceId::USER {
            let args: Vec<String> = inst.args.iter().map(|(k, v)| format!("{k} = {}", brief(v))).collect();
            self.frames.push((inst.span, format!("`{}` is {}({})", c.callee, def.name.name, args.join(", "))));
            2
        } else {
            1
        };
        self.frames.push((c.span, format!("in this call of `{}` with {}", c.callee, shown.join(", "))));
        for l in &fwd.lets {
            if scope.vars.contains_key(&l.name.name) && fwd.inputs.iter().any(|i| i.name == l.name.name) {
                self.err(
                    Diagnostic::error("names::duplicate", format!("`{}` is already an input of this forward", l.name.name))
                        .label(l.name.span, "bound again here")
                        .help("choose another name for the `let`"),
                );
            }
            let v = self.eval(&l.value, &mut scope);
            scope.vars.insert(l.name.name.clone(), v);
        }
        let out = self.eval(&fwd.ret, &mut scope);
        for _ in 0..pushed {
            self.frames.pop();
        }
        let out = match out {
            Val::Tensor(..) | Val::Error => out,
            other => {
                self.err(
                    Diagnostic::error("type::not_a_tensor", format!("a forward returns a tensor, found {}", other.describe()))
                        .label(fwd.ret.span, "not a tensor")
                        .help("return the layer's output tensor"),
                );
                Val::Error
            }
        };
        self.memo.insert(key, out.clone());
        out
    }
}

/// `a.b.c.d.e.f` as `a.….e.f` when long.
fn short_path(path: &str) -> String {
    let segs: Vec<&str> = path.split('.').collect();
    if path.len() <= 40 || segs.len() <= 4 {
        return path.to_string();
    }
    format!("{}.….{}", segs[0], segs[segs.len() - 2..].join("."))
}

/// A template argument as written back in a label.
fn brief(v: &Val) -> String {
    match v {
        Val::Int(i, Some(s)) => format!("{s} ({i})"),
        Val::Int(i, None) => i.to_string(),
        Val::Float(x) => x.to_string(),
        Val::Bool(b) => b.to_string(),
        Val::Str(s) => format!("{s:?}"),
        other => other.describe(),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn param_list(def: &ast::LayerDef) -> String {
    def.params.iter().map(|p| if p.default.is_some() { format!("{} = …", p.name.name) } else { p.name.name.clone() }).collect::<Vec<_>>().join(", ")
}
