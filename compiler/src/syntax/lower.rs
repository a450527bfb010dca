//! Lowering: pest's parse tree → AST.
//!
//! The grammar fixes the shape of every pair, so a pair of an unexpected kind
//! is a bug in this file; it is reported as `syntax::internal` with its
//! location rather than a panic.
//!
//! Input: pest's pairs for one file. Output: the [`File`](super::ast::File)
//! AST, or diagnostics. Invariant: spans are byte offsets into the source
//! text given to the parser.

use super::ast::*;
use super::Rule;
use crate::diag::{Diagnostic, Diagnostics, SourceId, Span};
use pest::iterators::{Pair, Pairs};
use pest::pratt_parser::{Assoc, Op, PrattParser};
use std::sync::OnceLock;

type P<'i> = Pair<'i, Rule>;
type R<T> = Result<T, Diagnostic>;

/// Deepest operator nesting in one expression.
const MAX_EXPR_DEPTH: u32 = 256;

pub(super) fn file(src: SourceId, mut pairs: Pairs<'_, Rule>) -> Result<File, Diagnostics> {
    let mut out = File::default();
    let lw = Lower { src };
    let Some(file) = pairs.next() else { return Ok(out) };
    let mut diags = Diagnostics::default();
    for item in file.into_inner() {
        let res = match item.as_rule() {
            Rule::layer_def => lw.layer_def(item).map(|l| out.layers.push(l)),
            Rule::model_def => lw.model_def(item).map(|m| out.models.push(m)),
            Rule::data_def => lw.data_def(item).map(|d| out.data.push(d)),
            Rule::train_def => lw.train_def(item).map(|t| out.trains.push(t)),
            Rule::devices_def => lw.devices_def(item).map(|d| out.devices.push(d)),
            Rule::placement_def => lw.placement_def(item).map(|p| out.placements.push(p)),
            Rule::EOI => Ok(()),
            _ => Err(lw.internal(&item)),
        };
        if let Err(d) = res {
            diags.push(d);
        }
    }
    if diags.has_errors() {
        Err(diags)
    } else {
        Ok(out)
    }
}

fn is_keyword(r: Rule) -> bool {
    matches!(
        r,
        Rule::kw_layer
            | Rule::kw_param
            | Rule::kw_forward
            | Rule::kw_let
            | Rule::kw_return
            | Rule::kw_model
            | Rule::kw_input
            | Rule::kw_loss
            | Rule::kw_repeat
            | Rule::kw_data
            | Rule::kw_train
            | Rule::kw_devices
            | Rule::kw_x
            | Rule::kw_placement
            | Rule::kw_auto
            | Rule::kw_mesh
            | Rule::kw_dp
            | Rule::kw_over
            | Rule::kw_shard
            | Rule::kw_pipeline
            | Rule::kw_stage
            | Rule::kw_micro
            | Rule::kw_schedule
            | Rule::kw_ps
            | Rule::kw_on
            | Rule::kw_per
            | Rule::kw_device
            | Rule::kw_memory
            | Rule::kw_zero
            | Rule::kw_recompute
            | Rule::kw_autocast
    )
}

fn pratt() -> &'static PrattParser<Rule> {
    static PRATT: OnceLock<PrattParser<Rule>> = OnceLock::new();
    PRATT.get_or_init(|| {
        PrattParser::new()
            .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
            .op(Op::infix(Rule::mul, Assoc::Left) | Op::infix(Rule::div, Assoc::Left) | Op::infix(Rule::matmul, Assoc::Left))
            .op(Op::prefix(Rule::neg))
    })
}

/// The children of a pair that carry information (keywords dropped).
struct Kids<'i> {
    iter: Pairs<'i, Rule>,
    parent_span: Span,
}

impl<'i> Kids<'i> {
    fn next(&mut self) -> Option<P<'i>> {
        self.iter.by_ref().find(|p| !is_keyword(p.as_rule()))
    }

    /// The next child, which the grammar guarantees exists.
    fn req(&mut self) -> R<P<'i>> {
        self.next().ok_or_else(|| {
            Diagnostic::error("syntax::internal", "the parser produced an incomplete tree")
                .label(self.parent_span, "while reading this")
                .help("this is a bug in shardplan; please report it with the file")
        })
    }

    /// The next child if it has the given rule.
    fn opt(&mut self, rule: Rule) -> Option<P<'i>> {
        let mut peek = self.iter.clone();
        let p = peek.find(|p| !is_keyword(p.as_rule()))?;
        if p.as_rule() == rule {
            self.iter = peek;
            Some(p)
        } else {
            None
        }
    }

    fn rest(self) -> impl Iterator<Item = P<'i>> {
        self.iter.filter(|p| !is_keyword(p.as_rule()))
    }
}

#[derive(Clone, Copy)]
struct Lower {
    src: SourceId,
}

impl Lower {
    /// The pair's span without the whitespace and comments pest attaches
    /// to a rule that ends in a repetition.
    fn span(&self, p: &P<'_>) -> Span {
        let s = p.as_span();
        Span::new(self.src, s.start(), s.start() + code_end(p.as_str()))
    }

    fn kids<'i>(&self, p: P<'i>) -> Kids<'i> {
        let parent_span = self.span(&p);
        Kids { iter: p.into_inner(), parent_span }
    }

    fn internal(&self, p: &P<'_>) -> Diagnostic {
        Diagnostic::error("syntax::internal", format!("unexpected {:?} in the parse tree", p.as_rule()))
            .label(self.span(p), "here")
            .help("this is a bug in shardplan; please report it with the file")
    }

    fn want_rule(&self, p: &P<'_>, rule: Rule) -> R<()> {
        if p.as_rule() == rule {
            Ok(())
        } else {
            Err(self.internal(p))
        }
    }

    fn ident(&self, p: P<'_>) -> R<Ident> {
        self.want_rule(&p, Rule::ident)?;
        Ok(Ident { name: p.as_str().to_string(), span: self.span(&p) })
    }

    fn int(&self, p: P<'_>) -> R<i64> {
        self.want_rule(&p, Rule::int)?;
        let digits: String = p.as_str().chars().filter(|c| *c != '_').collect();
        digits.parse::<i64>().map_err(|_| {
            Diagnostic::error("syntax::bad_number", "integer is too large")
                .label(self.span(&p), "does not fit in 64 bits")
                .help(format!("integers range up to {}", i64::MAX))
        })
    }

    fn float(&self, p: P<'_>) -> R<f64> {
        let text = p.as_str();
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(Diagnostic::error("syntax::bad_number", "number is out of range")
                .label(self.span(&p), "not a finite 64-bit float")
                .help("write a smaller exponent")),
        }
    }

    // ------------------------------------------------------------ layers

    fn layer_def(&self, p: P<'_>) -> R<LayerDef> {
        let span = self.span(&p);
        let mut k = self.kids(p);
        let name = self.ident(k.req()?)?;
        let mut params = Vec::new();
        if let Some(lp) = k.opt(Rule::layer_params) {
            for param in lp.into_inner() {
                let mut pk = self.kids(param);
                let name = self.ident(pk.req()?)?;
                let default = pk.next().map(|e| self.expr(e)).transpose()?;
                params.push(LayerParam { name, default });
            }
        }
        let mut members = Vec::new();
        for m in k.rest() {
            members.push(match m.as_rule() {
                Rule::param_stmt => Member::Param(self.param_stmt(m)?),
                Rule::sublayer_stmt => Member::Sublayer(self.sublayer(m)?),
                Rule::forward_def => Member::Forward(self.forward_def(m)?),
                _ => return Err(self.internal(&m)),
            });
        }
        Ok(LayerDef { name, params, members, span })
    }

    fn param_stmt(&self, p: P<'_>) -> R<ParamDecl> {
        let span = self.span(&p);
        let mut k = self.kids(p);
        let name = self.ident(k.req()?)?;
        let ty = self.tensor_type(k.req()?)?;
        let init = k.next().map(|e| self.expr(e)).transpose()?;
        Ok(ParamDecl { name, ty, init, span })
    }

    fn tensor_type(&self, p: P<'_>) -> R<TensorType> {
        self.want_rule(&p, Rule::tensor_type)?;
        let span = self.span(&p);
        let mut k = self.kids(p);
        let dtype = self.ident(k.req()?)?;
        let dims = k.rest().map(|e| self.expr(e)).collect::<R<Vec<_>>>()?;
        Ok(TensorType { dtype, dims, span })
    }

    fn sublayer(&self, p: P<'_>) -> R<SublayerDecl> {
        let span = self.span(&p);
        let mut k = self.kids(p);
        let name = self.ident(k.req()?)?;
        let ctor = k.req()?;
        let (repeat, ctor) = match ctor.as_rule() {
            Rule::repeat_ctor => {
                let mut rk = self.kids(ctor);
                let count = rk.req()?;
                let count_inner = self.kids(count).req()?;
                let repeat = match count_inner.as_rule() {
                    Rule::int => RepeatCount::Int(self.int(count_inner.clone())?, self.span(&count_inner)),
                    _ => RepeatCount::Name(self.ident(count_inner)?),
                };
                (Some(repeat), rk.req()?)
            }
            _ => (None, ctor),
        };
        self.want_rule(&ctor, Rule::layer_ctor)?;
        let call = self.call(self.kids(ctor).req()?)?;
        let template = match call.callee.as_name() {
            Some(id) => id.clone(),
            None => {
                return Err(Diagnostic::error("layer::bad_constructor", "a layer is built by calling a template by name")
                    .label(call.callee.span, "not a plain template name")
                    .help("write `layer name = Template(args)`, e.g. `layer fc1 = Linear(64, 128)`"))
            }
        };
        Ok(SublayerDecl { name, repeat, template, args: call.args, ctor_span: call.span, span })
    }

    fn forward_def(&self, p: P<'_>) -> R<ForwardDef> {
        let span = self.span(&p);
        let mut inputs = Vec::new();
        let mut lets = Vec::new();
        let mut ret = None;
        for k in self.kids(p).rest() {
            match k.as_rule() {
                Rule::ident => inputs.push(self.ident(k)?),
                Rule::forward_expr => ret = Some(self.expr(self.kids(k).req()?)?),
                Rule::block => {
                    for stmt in self.kids(k).rest() {
                        match stmt.as_rule() {
                            Rule::let_stmt => lets.push(self.let_stmt(stmt)?),
                            Rule::return_stmt => ret = Some(self.expr(self.kids(stmt).req()?)?),
                            _ => return Err(self.internal(&stmt)),
                        }
                    }
                }
                _ => return Err(self.internal(&k)),
            }
        }
        let ret = ret.ok_or_else(|| Diagnostic::error("syntax::internal", "forward without a result").label(span, "here"))?;
        Ok(ForwardDef { inputs, lets, ret, span })
    }

    fn let_stmt(&self, p: P<'_>) -> R<Let> {
        let span = self.span(&p);
        let mut k = self.kids(p);
        let name = self.ident(k.req()?)?;
        let value = self.expr(k.req()?)?;
        Ok(Let { name, value, span })
    }

    // ------------------------------------------------------------ models

    fn model_def(&self, p: P<'_>) -> R<ModelDef> {
        let span = self.span(&p);
        let mut k = self.kids(p);
        let name = self.ident(k.req()?)?;
        let mut members = Vec::new();
        for m in k.rest() {
            members.push(match m.as_rule() {
                Rule::input_stmt => {
                    let span = self.span(&m);
                    let mut ik = self.kids(m);
                    let name = self.ident(ik.req()?)?;
                    let ty = self.tensor_type(ik.req()?)?;
                    ModelMember::Input(InputDecl { name, ty, span })
                }
                Rule::sublayer_stmt => ModelMember::Layer(self.sublayer(m)?),
                Rule::let_stmt => ModelMember::Let(self.let_stmt(m)?),
                Rule::loss_stmt => {
                    let span = self.span(&m);
                    ModelMember::Loss(self.expr(self.kids(m).req()?)?, span)
                }
                _ => return Err(self.internal(&m)),
            });
        }
        Ok(ModelDef { name, members, span })
    }

    // ------------------------------------------------------------ expressions

    fn expr(&self, p: P<'_>) -> R<Expr> {
        self.want_rule(&p, Rule::expr)?;
        let lw = *self;
        // Depth is tracked as the tree is built: later passes recurse over
        // it, so a chain of ten thousand `+` must stop here, not overflow.
        let deep = |span: Span| {
            Diagnostic::error("syntax::too_deep", format!("expression nests more than {MAX_EXPR_DEPTH} operators deep"))
                .label(span, "this expression")
                .help("split it with `let` bindings")
        };
        let result = pratt()
            .map_primary(move |prim| lw.primary(prim).map(|e| (e, 1u32)))
            .map_prefix(move |op, rhs| {
                let (rhs, d) = rhs?;
                let span = lw.span(&op).to(rhs.span);
                if d >= MAX_EXPR_DEPTH {
                    return Err(deep(span));
                }
                Ok((Expr { kind: ExprKind::Neg(Box::new(rhs)), span }, d + 1))
            })
            .map_infix(move |lhs, op, rhs| {
                let ((lhs, dl), (rhs, dr)) = (lhs?, rhs?);
                let bin = match op.as_rule() {
                    Rule::add => BinOp::Add,
                    Rule::sub => BinOp::Sub,
                    Rule::mul => BinOp::Mul,
                    Rule::div => BinOp::Div,
                    Rule::matmul => BinOp::MatMul,
                    _ => return Err(lw.internal(&op)),
                };
                let span = lhs.span.to(rhs.span);
                let d = dl.max(dr);
                if d >= MAX_EXPR_DEPTH {
                    return Err(deep(span));
                }
                Ok((Expr { kind: ExprKind::Binary(bin, Box::new(lhs), Box::new(rhs)), span }, d + 1))
            })
            .parse(p.into_inner());
        result.map(|(e, _)| e)
    }

    fn primary(&self, p: P<'_>) -> R<Expr> {
        let span = self.span(&p);
        let kind = match p.as_rule() {
            Rule::int => ExprKind::Int(self.int(p)?),
            Rule::float => ExprKind::Float(self.float(p)?),
            Rule::string => ExprKind::Str(unescape(self.kids(p).req()?.as_str())),
            Rule::range => {
                let (a, b) = self.range(p)?;
                ExprKind::Range(a, b)
            }
            Rule::list => ExprKind::List(self.kids(p).rest().map(|e| self.expr(e)).collect::<R<Vec<_>>>()?),
            Rule::call => ExprKind::Call(self.call(p)?),
            Rule::path => ExprKind::Path(self.path(p)?),
            Rule::paren => {
                let inner = self.expr(self.kids(p).req()?)?;
                return Ok(Expr { kind: inner.kind, span });
            }
            _ => return Err(self.internal(&p)),
        };
        Ok(Expr { kind, span })
    }

    /// `a..b`, `a..`, `..b`: the bounds are told apart by their side of `..`.
    fn range(&self, p: P<'_>) -> R<(Option<i64>, Option<i64>)> {
        let text_start = p.as_span().start();
        let dots = p.as_str().find("..").unwrap_or(0) + text_start;
        let mut lo = None;
        let mut hi = None;
        for b in self.kids(p).rest() {
            let before = b.as_span().start() < dots;
            let v = self.int(b)?;
            if before {
                lo = Some(v);
            } else {
                hi = Some(v);
            }
        }
        Ok((lo, hi))
    }

    fn call(&self, p: P<'_>) -> R<Call> {
        self.want_rule(&p, Rule::call)?;
        let span = self.span(&p);
        let mut k = self.kids(p);
        let callee = self.path(k.req()?)?;
        let mut args = Vec::new();
        for a in k.rest() {
            let aspan = self.span(&a);
            let mut ak = self.kids(a);
            let first = ak.req()?;
            let (name, value) = if first.as_rule() == Rule::ident { (Some(self.ident(first)?), self.expr(ak.req()?)?) } else { (None, self.expr(first)?) };
            args.push(Arg { name, value, span: aspan });
        }
        Ok(Call { callee, args, span })
    }

    fn path(&self, p: P<'_>) -> R<Path> {
        self.want_rule(&p, Rule::path)?;
        let span = self.span(&p);
        let mut k = self.kids(p);
        let root = self.ident(k.req()?)?;
        let mut segs = Vec::new();
        for s in k.rest() {
            let sspan = self.span(&s);
            match s.as_rule() {
                Rule::field => segs.push(PathSeg::Field(self.ident(self.kids(s).req()?)?)),
                Rule::index => {
                    let inner = self.kids(s).req()?;
                    let ix = match inner.as_rule() {
                        Rule::star => Index::Star,
                        Rule::int => Index::At(self.int(inner)?),
                        Rule::range => {
                            let (a, b) = self.range(inner)?;
                            Index::Range(a, b)
                        }
                        _ => return Err(self.internal(&inner)),
                    };
                    segs.push(PathSeg::Index(ix, sspan));
                }
                _ => return Err(self.internal(&s)),
            }
        }
        Ok(Path { root, segs, span })
    }

    fn quantity(&self, p: P<'_>) -> R<Quantity> {
        self.want_rule(&p, Rule::quantity)?;
        let span = self.span(&p);
        let mut k = self.kids(p);
        let num = k.req()?;
        let value = match num.as_rule() {
            Rule::int => self.int(num)? as f64,
            _ => self.float(num)?,
        };
        let unit = k.req()?;
        let unit = Ident { name: unit.as_str().to_string(), span: self.span(&unit) };
        Ok(Quantity { value, unit, span })
    }

    // ------------------------------------------------------------ data, train, devices

    fn data_def(&self, p: P<'_>) -> R<DataDef> {
        let span = self.span(&p);
        let mut k = self.kids(p);
        let name = self.ident(k.req()?)?;
        let source = self.call(k.req()?)?;
        Ok(DataDef { name, source, span })
    }

    fn train_def(&self, p: P<'_>) -> R<TrainDef> {
        let span = self.span(&p);
        let head = Span::new(self.src, p.as_span().start(), p.as_span().start() + "train".len());
        let mut entries = Vec::new();
        for e in self.kids(p).rest() {
            let espan = self.span(&e);
            let mut ek = self.kids(e);
            let key = self.ident(ek.req()?)?;
            let value = self.expr(ek.req()?)?;
            entries.push(TrainEntry { key, value, span: espan });
        }
        Ok(TrainDef { entries, head, span })
    }

    fn devices_def(&self, p: P<'_>) -> R<DevicesDef> {
        let span = self.span(&p);
        let mut k = self.kids(p);
        let kind = self.ident(k.req()?)?;
        let count_p = k.req()?;
        let count_span = self.span(&count_p);
        let count = self.int(count_p)?;
        let mut options = Vec::new();
        if let Some(opts) = k.opt(Rule::device_opts) {
            for o in self.kids(opts).rest() {
                let ospan = self.span(&o);
                let mut ok = self.kids(o);
                let key = self.ident(ok.req()?)?;
                let value = self.quantity(ok.req()?)?;
                options.push(DeviceOption { key, value, span: ospan });
            }
        }
        Ok(DevicesDef { kind, count, count_span, options, span })
    }

    // ------------------------------------------------------------ placement

    fn placement_def(&self, p: P<'_>) -> R<PlacementDef> {
        let span = self.span(&p);
        let mut head = Span::new(self.src, p.as_span().start(), p.as_span().start() + "placement".len());
        let body = self.kids(p).req()?;
        let kind = match body.as_rule() {
            Rule::auto_body => {
                head = head.to(Span::new(self.src, body.as_span().start(), body.as_span().start() + "auto".len()));
                let mut stmts = Vec::new();
                for s in self.kids(body).rest() {
                    let sspan = self.span(&s);
                    match s.as_rule() {
                        Rule::auto_memory => {
                            let per_device = s.as_str().contains("per");
                            let value = self.quantity(self.kids(s).req()?)?;
                            stmts.push(AutoStmt::Memory { value, per_device, span: sspan });
                        }
                        Rule::auto_option => {
                            let mut ok = self.kids(s);
                            let key = self.ident(ok.req()?)?;
                            let value = self.ident(ok.req()?)?;
                            stmts.push(AutoStmt::Option { key, value, span: sspan });
                        }
                        _ => return Err(self.internal(&s)),
                    }
                }
                PlacementKind::Auto(stmts)
            }
            Rule::explicit_body => {
                let mut stmts = Vec::new();
                for s in self.kids(body).rest() {
                    stmts.push(self.placement_stmt(s)?);
                }
                PlacementKind::Explicit(stmts)
            }
            _ => return Err(self.internal(&body)),
        };
        Ok(PlacementDef { kind, head, span })
    }

    fn placement_stmt(&self, s: P<'_>) -> R<PlacementStmt> {
        let span = self.span(&s);
        Ok(match s.as_rule() {
            Rule::mesh_stmt => {
                let mut axes = Vec::new();
                for a in self.kids(s).rest() {
                    let mut ak = self.kids(a);
                    let name = self.ident(ak.req()?)?;
                    let size_p = ak.req()?;
                    let size_span = self.span(&size_p);
                    axes.push(MeshAxis { name, size: self.int(size_p)?, size_span });
                }
                PlacementStmt::Mesh(axes, span)
            }
            Rule::dp_stmt => PlacementStmt::DataParallel { axis: self.ident(self.kids(s).req()?)?, span },
            Rule::shard_stmt => {
                let mut k = self.kids(s);
                let path = self.path(k.req()?)?;
                let mut spec = Vec::new();
                for e in k.rest() {
                    spec.push(self.ident(self.kids(e).req()?)?);
                }
                let spec_span = match (spec.first(), spec.last()) {
                    (Some(a), Some(b)) => a.span.to(b.span),
                    _ => path.span,
                };
                PlacementStmt::Shard { path, spec, spec_span, span }
            }
            Rule::ps_stmt => PlacementStmt::ParameterServer { device: self.ident(self.kids(s).req()?)?, span },
            Rule::zero_stmt => {
                let mut k = self.kids(s);
                let lp = k.req()?;
                let level_span = self.span(&lp);
                let level = self.int(lp)?;
                let paths = k.rest().map(|p| self.path(p)).collect::<R<Vec<_>>>()?;
                PlacementStmt::Zero { level, level_span, paths, span }
            }
            Rule::autocast_stmt => {
                let mut k = self.kids(s);
                let dtype = self.ident(k.req()?)?;
                let paths = k.rest().map(|p| self.path(p)).collect::<R<Vec<_>>>()?;
                PlacementStmt::Autocast { dtype, paths, span }
            }
            Rule::recompute_stmt => PlacementStmt::Recompute { paths: self.kids(s).rest().map(|p| self.path(p)).collect::<R<Vec<_>>>()?, span },
            Rule::pipeline_stmt => {
                let mut k = self.kids(s);
                let axis = self.ident(k.req()?)?;
                let mut pipe = PipelineDef { axis, stages: Vec::new(), microbatches: Vec::new(), schedules: Vec::new(), span };
                for item in k.rest() {
                    let ispan = self.span(&item);
                    match item.as_rule() {
                        Rule::stage_stmt => {
                            let paths = self.kids(item).rest().map(|p| self.path(p)).collect::<R<Vec<_>>>()?;
                            pipe.stages.push(StageDef { paths, span: ispan });
                        }
                        Rule::micro_stmt => {
                            let n = self.kids(item).req()?;
                            let nspan = self.span(&n);
                            pipe.microbatches.push((self.int(n)?, nspan));
                        }
                        Rule::schedule_stmt => {
                            let n = self.kids(item).req()?;
                            pipe.schedules.push(Ident { name: n.as_str().to_string(), span: self.span(&n) });
                        }
                        _ => return Err(self.internal(&item)),
                    }
                }
                PlacementStmt::Pipeline(pipe)
            }
            _ => return Err(self.internal(&s)),
        })
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Length of `text` up to the end of its last character of code (not
/// whitespace, not a comment).
fn code_end(text: &str) -> usize {
    let b = text.as_bytes();
    let (mut i, mut last) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = text[i + 2..].find("*/").map(|e| i + e + 4).unwrap_or(b.len());
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(b.len());
                last = i;
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                i += 1;
                last = i;
            }
        }
    }
    // A multi-byte character's tail bytes are "code" too, so `last` ends on a boundary.
    last
}
