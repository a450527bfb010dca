//! Shape and dtype rules of the primitive operations, one arm per op.
//!
//! Input: evaluated operands with their spans. Output: the result value, or
//! `Val::Error` after reporting a diagnostic that labels every operand
//! involved with its inferred type.
//!
//! Invariants: errors and traced operations go through the `context::Context`
//! the caller passes in; this module imports no other checking module but
//! `context` and `types` (the model checker imports it, not the reverse).

use super::context::{number, ArgVal, Context};
use super::types::{Dim, Prim, TId, Ty, Val};
use crate::diag::{did_you_mean, Diagnostic, Span};
use crate::syntax::ast::{self, BinOp};

/// Binds call arguments to parameter names. Returns one slot per parameter.
pub(super) fn bind_args(
    cx: &mut dyn Context,
    fname: &str,
    call_span: Span,
    args: &[ArgVal],
    params: &[&str],
    required: usize,
) -> Option<Vec<Option<(Val, Span)>>> {
    let mut slots: Vec<Option<(Val, Span)>> = vec![None; params.len()];
    let mut ok = true;
    let mut pos = 0;
    let sig = signature(params, required);
    for a in args {
        let i = match &a.name {
            None => {
                pos += 1;
                if pos > params.len() {
                    cx.err(
                        Diagnostic::error(
                            "call::arity",
                            format!(
                                "`{fname}` takes at most {} argument{}, but {} were given",
                                params.len(),
                                if params.len() == 1 { "" } else { "s" },
                                args.len()
                            ),
                        )
                        .label(a.span, "unexpected argument")
                        .help(format!("the signature is `{fname}({sig})`")),
                    );
                    ok = false;
                    continue;
                }
                pos - 1
            }
            Some(n) => match params.iter().position(|p| *p == n.name) {
                Some(i) => i,
                None => {
                    let mut d =
                        Diagnostic::error("names::unknown_argument", format!("`{fname}` has no argument `{}`", n.name)).label(n.span, "unknown argument");
                    d = d.help(match did_you_mean(&n.name, params.iter().copied()) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!("the signature is `{fname}({sig})`"),
                    });
                    cx.err(d);
                    ok = false;
                    continue;
                }
            },
        };
        if slots[i].is_some() {
            cx.err(
                Diagnostic::error("call::argument_twice", format!("argument `{}` of `{fname}` is given twice", params[i]))
                    .label(a.span, "given again here")
                    .help("pass each argument once, by position or by name"),
            );
            ok = false;
            continue;
        }
        slots[i] = Some((a.val.clone(), a.span));
    }
    if ok {
        if let Some(missing) = (0..required).find(|&i| slots[i].is_none()) {
            cx.err(
                Diagnostic::error("call::missing_argument", format!("`{fname}` needs argument `{}`", params[missing]))
                    .label(call_span, format!("`{}` is not given", params[missing]))
                    .help(format!("the signature is `{fname}({sig})`")),
            );
            ok = false;
        }
    }
    if slots.iter().flatten().any(|(v, _)| matches!(v, Val::Error)) {
        return None;
    }
    ok.then_some(slots)
}

fn signature(params: &[&str], required: usize) -> String {
    params.iter().enumerate().map(|(i, p)| if i < required { p.to_string() } else { format!("{p}: …") }).collect::<Vec<_>>().join(", ")
}

/// `a op b` for numbers (folded) and tensors (typed).
pub(super) fn binary(cx: &mut dyn Context, op: BinOp, (a, sa): (Val, Span), (b, sb): (Val, Span), span: Span) -> Val {
    match (&a, &b) {
        (Val::Error, _) | (_, Val::Error) => Val::Error,
        (Val::Int(x, symx), Val::Int(y, symy)) => {
            let (x, y) = (*x, *y);
            let r = match op {
                BinOp::Add => x.checked_add(y),
                BinOp::Sub => x.checked_sub(y),
                BinOp::Mul => x.checked_mul(y),
                BinOp::Div if y == 0 => {
                    cx.err(Diagnostic::error("arith::division_by_zero", "division by zero").label(sb, "this is 0").help("divide by a non-zero number"));
                    return Val::Error;
                }
                BinOp::Div if x % y != 0 => return Val::Float(x as f64 / y as f64),
                BinOp::Div => Some(x / y),
                BinOp::MatMul => return not_tensors(cx, op, &a, sa, &b, sb),
            };
            match r {
                // `batch * 1` keeps its name; other arithmetic yields a plain number.
                Some(r) if r == x && matches!(op, BinOp::Mul | BinOp::Div) && y == 1 => Val::Int(r, symx.clone()),
                Some(r) if r == y && op == BinOp::Mul && x == 1 => Val::Int(r, symy.clone()),
                Some(r) => Val::Int(r, None),
                None => {
                    cx.err(Diagnostic::error("arith::overflow", "integer arithmetic overflows").label(span, "too large").help("use smaller sizes"));
                    Val::Error
                }
            }
        }
        (x, y) if number(x).is_some() && number(y).is_some() => {
            let (Some(x), Some(y)) = (number(x), number(y)) else { return Val::Error };
            match op {
                BinOp::Add => Val::Float(x + y),
                BinOp::Sub => Val::Float(x - y),
                BinOp::Mul => Val::Float(x * y),
                BinOp::Div if y == 0.0 => {
                    cx.err(Diagnostic::error("arith::division_by_zero", "division by zero").label(sb, "this is 0").help("divide by a non-zero number"));
                    Val::Error
                }
                BinOp::Div => Val::Float(x / y),
                BinOp::MatMul => not_tensors(cx, op, &a, sa, &b, sb),
            }
        }
        (Val::Tensor(t, tid), n) | (n, Val::Tensor(t, tid)) if number(n).is_some() => {
            if op == BinOp::MatMul {
                return not_tensors(cx, op, &a, sa, &b, sb);
            }
            if matches!(n, Val::Float(_)) && !t.dtype.is_float() {
                let tspan = if matches!(a, Val::Tensor(..)) { sa } else { sb };
                cx.err(
                    Diagnostic::error("dtype::mismatch", format!("cannot {} integer tensor {t} and a float", op.verb()))
                        .label(tspan, format!("this is {t}"))
                        .help("integer tensors combine with integers only"),
                );
                return Val::Error;
            }
            let (t, tid) = (t.clone(), *tid);
            let Val::Tensor(_, cid) = cx.emit(Prim::Const(number(n).unwrap_or_default()), Vec::new(), Ty::scalar(t.dtype)) else { return Val::Error };
            let args = if matches!(a, Val::Tensor(..)) { vec![tid, cid] } else { vec![cid, tid] };
            cx.emit(binary_prim(op), args, t)
        }
        (Val::Tensor(x, xid), Val::Tensor(y, yid)) => {
            if x.dtype != y.dtype {
                cx.err(
                    Diagnostic::error("dtype::mismatch", format!("cannot {} {} and {}: dtypes differ", op.verb(), x.dtype, y.dtype))
                        .label(sa, format!("this is {x}"))
                        .label(sb, format!("this is {y}"))
                        .help("both operands need the same dtype"),
                );
                return Val::Error;
            }
            if op == BinOp::MatMul {
                return matmul(cx, (x, *xid), sa, (y, *yid), sb);
            }
            match broadcast(&x.shape, &y.shape) {
                Ok(shape) => cx.emit(binary_prim(op), vec![*xid, *yid], Ty::new(x.dtype, shape)),
                Err((i, j)) => {
                    cx.err(
                        Diagnostic::error("shape::broadcast", format!("cannot {} {x} and {y}: shapes do not broadcast", op.verb()))
                            .label(sa, format!("this is {x}"))
                            .label(sb, format!("this is {y}"))
                            .help(format!("aligned from the right, dims `{}` and `{}` differ and neither is 1", x.shape[i], y.shape[j])),
                    );
                    Val::Error
                }
            }
        }
        _ => not_tensors(cx, op, &a, sa, &b, sb),
    }
}

fn binary_prim(op: BinOp) -> Prim {
    match op {
        BinOp::Add => Prim::Add,
        BinOp::Sub => Prim::Sub,
        BinOp::Mul => Prim::Mul,
        BinOp::Div => Prim::Div,
        BinOp::MatMul => Prim::MatMul,
    }
}

fn not_tensors(cx: &mut dyn Context, op: BinOp, a: &Val, sa: Span, b: &Val, sb: Span) -> Val {
    let help = if op == BinOp::MatMul { "`@` multiplies two tensors of rank 2 or more" } else { "arithmetic applies to numbers and tensors" };
    cx.err(
        Diagnostic::error("type::bad_operand", format!("cannot {} {} and {}", op.verb(), a.describe(), b.describe()))
            .label(sa, a.describe())
            .label(sb, b.describe())
            .help(help),
    );
    Val::Error
}

/// Numpy broadcasting. On failure, the indices of the clashing dims.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Vec<Dim>, (usize, usize)> {
    let n = a.len().max(b.len());
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let da = (k < a.len()).then(|| &a[a.len() - 1 - k]);
        let db = (k < b.len()).then(|| &b[b.len() - 1 - k]);
        let d = match (da, db) {
            (Some(x), Some(y)) if x.size == y.size => {
                if x.sym.is_some() {
                    x.clone()
                } else {
                    y.clone()
                }
            }
            (Some(x), Some(y)) if y.size == 1 => x.clone(),
            (Some(x), Some(y)) if x.size == 1 => y.clone(),
            (Some(_), Some(_)) => return Err((a.len() - 1 - k, b.len() - 1 - k)),
            (Some(x), None) | (None, Some(x)) => x.clone(),
            (None, None) => Dim::known(1),
        };
        out.push(d);
    }
    out.reverse();
    Ok(out)
}

fn matmul(cx: &mut dyn Context, (x, xid): (&Ty, TId), sa: Span, (y, yid): (&Ty, TId), sb: Span) -> Val {
    if x.rank() < 2 || y.rank() < 2 {
        let (bad, span) = if x.rank() < 2 { (x, sa) } else { (y, sb) };
        cx.err(
            Diagnostic::error("shape::matmul_rank", format!("`@` needs operands of rank 2 or more, found {bad}"))
                .label(sa, format!("this is {x}"))
                .label(sb, format!("this is {y}"))
                .help(if span == sa {
                    "reshape the left operand to [rows, k]"
                } else {
                    "reshape the right operand to [k, cols]; a vector can be added with `+` instead"
                }),
        );
        return Val::Error;
    }
    let k1 = &x.shape[x.rank() - 1];
    let k2 = &y.shape[y.rank() - 2];
    if k1.size != k2.size {
        cx.err(
            Diagnostic::error("shape::matmul_inner", format!("cannot multiply {x} @ {y}: inner dimensions {k1} and {k2} differ"))
                .label(sa, format!("this is {x}"))
                .label(sb, format!("this is {y}"))
                .help(format!("the last dim of the left operand ({}) must equal the second-to-last dim of the right one ({})", dim_desc(k1), dim_desc(k2))),
        );
        return Val::Error;
    }
    let bx = &x.shape[..x.rank() - 2];
    let by = &y.shape[..y.rank() - 2];
    let batch = match broadcast(bx, by) {
        Ok(b) => b,
        Err(_) => {
            cx.err(
                Diagnostic::error("shape::broadcast", format!("cannot multiply {x} @ {y}: batch dimensions do not broadcast"))
                    .label(sa, format!("this is {x}"))
                    .label(sb, format!("this is {y}"))
                    .help("the dims before the last two must be equal or 1"),
            );
            return Val::Error;
        }
    };
    let mut shape = batch;
    shape.push(x.shape[x.rank() - 2].clone());
    shape.push(y.shape[y.rank() - 1].clone());
    cx.emit(Prim::MatMul, vec![xid, yid], Ty::new(x.dtype, shape))
}

/// A call of primitive op `name`.
pub(super) fn apply(cx: &mut dyn Context, name: &str, c: &ast::Call, args: Vec<ArgVal>) -> Val {
    let span = c.span;
    let (params, required): (&[&str], usize) = match name {
        "relu" | "gelu" | "tanh" | "sigmoid" | "exp" | "log" | "sqrt" => (&["x"], 1),
        "silu" => (&["x"], 1),
        "rms_norm" => (&["x", "gamma", "eps"], 2),
        "softmax" | "log_softmax" => (&["x", "axis"], 1),
        "layer_norm" => (&["x", "gamma", "beta", "eps"], 3),
        "sum" | "mean" | "max" => (&["x", "axis", "keepdims"], 1),
        "reshape" => (&["x", "shape"], 2),
        "transpose" => (&["x", "perm"], 1),
        "embedding" => (&["table", "ids"], 2),
        "causal_attention" | "attention" => (&["q", "k", "v", "heads", "kv_heads"], 4),
        "rope" => (&["x", "heads", "base"], 2),
        "dropout" => (&["x", "p"], 2),
        "conv2d" => (&["x", "weight", "stride", "padding"], 2),
        "max_pool2d" | "avg_pool2d" => (&["x", "kernel", "stride", "padding"], 2),
        "cross_entropy" => (&["logits", "labels"], 2),
        "mse" => (&["pred", "target"], 2),
        _ => return Val::Error,
    };
    let Some(slots) = bind_args(cx, name, span, &args, params, required) else { return Val::Error };
    let mut a = Args { cx, name: name.to_string(), slots, params };
    match name {
        "relu" | "gelu" | "tanh" | "sigmoid" | "exp" | "log" | "sqrt" => {
            if let Some((v, _)) = &a.slots[0] {
                if let Some(x) = number(v) {
                    // Folding on numbers lets scales such as `1 / sqrt(d)` be written.
                    return match name {
                        "sqrt" if x >= 0.0 => Val::Float(x.sqrt()),
                        "exp" => Val::Float(x.exp()),
                        "log" if x > 0.0 => Val::Float(x.ln()),
                        "tanh" => Val::Float(x.tanh()),
                        "relu" => Val::Float(x.max(0.0)),
                        "sigmoid" => Val::Float(1.0 / (1.0 + (-x).exp())),
                        "gelu" => {
                            a.cx.err(
                                Diagnostic::error("type::not_a_tensor", "`gelu` applies to tensors, not to numbers")
                                    .label(span, "called on a number")
                                    .help("pass a tensor: an input, a parameter or a layer's output"),
                            );
                            Val::Error
                        }
                        _ => {
                            a.cx.err(
                                Diagnostic::error("arith::domain", format!("`{name}({x})` is undefined"))
                                    .label(span, "outside the domain")
                                    .help("pass a value in the function's domain"),
                            );
                            Val::Error
                        }
                    };
                }
            }
            let Some(x) = a.float_tensor(0) else { return Val::Error };
            let prim = match name {
                "relu" => Prim::Relu,
                "gelu" => Prim::Gelu,
                "tanh" => Prim::Tanh,
                "sigmoid" => Prim::Sigmoid,
                "exp" => Prim::Exp,
                "log" => Prim::Log,
                _ => Prim::Sqrt,
            };
            a.emit(prim, &[0], x)
        }
        "softmax" | "log_softmax" => {
            let Some(x) = a.float_tensor(0) else { return Val::Error };
            if x.rank() == 0 {
                return a.rank_error(0, &x, "a tensor of rank 1 or more");
            }
            let Some(axis) = a.axis(1, &x, -1) else { return Val::Error };
            let prim = if name == "softmax" { Prim::Softmax { axis } } else { Prim::LogSoftmax { axis } };
            a.emit(prim, &[0], x)
        }
        // silu(x) = x · sigmoid(x), as primitives: the backward pass and the
        // partitioning follow theirs, and the kernels fuse the chain.
        "silu" => {
            let Some(x) = a.float_tensor(0) else { return Val::Error };
            let Some((Val::Tensor(_, xid), _)) = a.slots[0].clone() else { return Val::Error };
            let Val::Tensor(_, sid) = a.emit(Prim::Sigmoid, &[0], x.clone()) else { return Val::Error };
            a.cx.emit(Prim::Mul, vec![xid, sid], x)
        }
        // rms_norm(x, gamma, eps) = x / sqrt(mean(x², last axis) + eps) · gamma:
        // one op, with its own gradients, so that tensor parallelism reduces
        // its input gradient once, as it does layer norm's.
        "rms_norm" => {
            let Some(x) = a.float_tensor(0) else { return Val::Error };
            if x.rank() == 0 {
                return a.rank_error(0, &x, "a tensor of rank 1 or more");
            }
            let last = x.shape[x.rank() - 1].clone();
            let Some(g) = a.float_tensor(1) else { return Val::Error };
            if g.rank() != 1 || g.shape[0].size != last.size || g.dtype != x.dtype {
                let (xs, gs) = (a.span(0), a.span(1));
                a.cx.err(
                    Diagnostic::error("shape::rms_norm_gamma", format!("`rms_norm` gamma must be [{last}] of {}, found {g}", x.dtype))
                        .label(gs, format!("this is {g}"))
                        .label(xs, format!("normalising {x} over its last dim {last}"))
                        .help(format!("declare it as `{}[{last}]`", x.dtype)),
                );
                return Val::Error;
            }
            let Some(eps) = a.number(2, 1e-6) else { return Val::Error };
            a.emit(Prim::RmsNorm { eps }, &[0, 1], x)
        }
        "layer_norm" => {
            let Some(x) = a.float_tensor(0) else { return Val::Error };
            if x.rank() == 0 {
                return a.rank_error(0, &x, "a tensor of rank 1 or more");
            }
            let last = x.shape[x.rank() - 1].clone();
            for i in [1, 2] {
                let Some(p) = a.float_tensor(i) else { return Val::Error };
                if p.rank() != 1 || p.shape[0].size != last.size {
                    let (xs, ps) = (a.span(0), a.span(i));
                    a.cx.err(
                        Diagnostic::error("shape::layer_norm_params", format!("`layer_norm` {} must be [{last}], found {p}", a.params[i]))
                            .label(ps, format!("this is {p}"))
                            .label(xs, format!("normalising {x} over its last dim {last}"))
                            .help(format!("declare it as `f32[{last}]`")),
                    );
                    return Val::Error;
                }
            }
            let Some(eps) = a.number(3, 1e-5) else { return Val::Error };
            a.emit(Prim::LayerNorm { eps }, &[0, 1, 2], x)
        }
        "sum" | "mean" | "max" => {
            let Some(x) = a.tensor(0) else { return Val::Error };
            let keep = match &a.slots[2] {
                None => false,
                Some((Val::Bool(b), _)) => *b,
                Some((v, s)) => {
                    let (d, s) = (v.describe(), *s);
                    a.cx.err(
                        Diagnostic::error("call::bad_argument", format!("`keepdims` must be `true` or `false`, found {d}"))
                            .label(s, "not a boolean")
                            .help("write `keepdims: true`"),
                    );
                    return Val::Error;
                }
            };
            let axes: Vec<usize> = match &a.slots[1] {
                None => (0..x.rank()).collect(),
                Some((Val::List(items), _)) => {
                    let mut out = Vec::new();
                    for (v, s) in items.clone() {
                        let Some(ax) = a.axis_value(&v, s, &x) else { return Val::Error };
                        if out.contains(&ax) {
                            a.cx.err(
                                Diagnostic::error("shape::axis_repeated", format!("axis {ax} is listed twice"))
                                    .label(s, "repeated axis")
                                    .help("list each axis once"),
                            );
                            return Val::Error;
                        }
                        out.push(ax);
                    }
                    out
                }
                Some(_) => match a.axis(1, &x, 0) {
                    Some(ax) => vec![ax],
                    None => return Val::Error,
                },
            };
            let shape: Vec<Dim> = x
                .shape
                .iter()
                .enumerate()
                .filter_map(|(i, d)| match (axes.contains(&i), keep) {
                    (false, _) => Some(d.clone()),
                    (true, true) => Some(Dim::known(1)),
                    (true, false) => None,
                })
                .collect();
            let (axes, keepdims) = (axes.clone(), keep);
            let prim = match name {
                "sum" => Prim::Sum { axes, keepdims },
                "mean" => Prim::Mean { axes, keepdims },
                _ => Prim::Max { axes, keepdims },
            };
            a.emit(prim, &[0], Ty::new(x.dtype, shape))
        }
        "reshape" => {
            let Some(x) = a.tensor(0) else { return Val::Error };
            let Some((Val::List(items), ls)) = a.slots[1].clone() else {
                let s = a.span(1);
                a.cx.err(
                    Diagnostic::error("call::bad_argument", "`reshape` takes the new shape as a list")
                        .label(s, "not a list")
                        .help("write `reshape(x, [batch, 8, 8])`; one entry may be -1"),
                );
                return Val::Error;
            };
            let mut dims: Vec<Option<Dim>> = Vec::new();
            for (v, s) in &items {
                match v {
                    Val::Int(-1, _) if dims.iter().any(Option::is_none) => {
                        a.cx.err(
                            Diagnostic::error("shape::reshape_infer", "only one dimension of a reshape can be -1")
                                .label(*s, "second -1")
                                .help("give all but one dimension explicitly"),
                        );
                        return Val::Error;
                    }
                    Val::Int(-1, _) => dims.push(None),
                    Val::Int(n, sym) if *n >= 1 => dims.push(Some(Dim { size: *n, sym: sym.clone() })),
                    Val::Error => return Val::Error,
                    other => {
                        a.cx.err(
                            Diagnostic::error("shape::bad_dim", format!("reshape dimensions are positive integers or -1, found {}", other.describe()))
                                .label(*s, "not a dimension")
                                .help("write each dimension as an integer; one may be -1"),
                        );
                        return Val::Error;
                    }
                }
            }
            let known: i64 = dims.iter().flatten().fold(1i64, |acc, d| acc.saturating_mul(d.size));
            let total = x.numel();
            let shown = |dims: &[Option<Dim>]| dims.iter().map(|d| d.as_ref().map(|d| d.to_string()).unwrap_or("-1".into())).collect::<Vec<_>>().join(", ");
            let ok = if dims.iter().any(Option::is_none) { known > 0 && total % known == 0 } else { known == total };
            if !ok {
                let xs = a.span(0);
                a.cx.err(
                    Diagnostic::error("shape::reshape_count", format!("cannot reshape {x} ({total} elements) to [{}]", shown(&dims)))
                        .label(ls, format!("{known} elements{}", if dims.iter().any(Option::is_none) { " times the -1 dim" } else { "" }))
                        .label(xs, format!("this is {x}, {total} elements"))
                        .help("the new shape must hold the same number of elements"),
                );
                return Val::Error;
            }
            let shape = dims.into_iter().map(|d| d.unwrap_or_else(|| Dim::known(total / known))).collect();
            a.emit(Prim::Reshape, &[0], Ty::new(x.dtype, shape))
        }
        "transpose" => {
            let Some(x) = a.tensor(0) else { return Val::Error };
            match a.slots[1].clone() {
                None => {
                    if x.rank() < 2 {
                        return a.rank_error(0, &x, "a tensor of rank 2 or more");
                    }
                    let mut shape = x.shape.clone();
                    let r = shape.len();
                    shape.swap(r - 1, r - 2);
                    let mut perm: Vec<usize> = (0..r).collect();
                    perm.swap(r - 1, r - 2);
                    a.emit(Prim::Transpose { perm }, &[0], Ty::new(x.dtype, shape))
                }
                Some((Val::List(items), ls)) => {
                    let mut perm = Vec::new();
                    for (v, s) in &items {
                        let Some(ax) = a.axis_value(v, *s, &x) else { return Val::Error };
                        perm.push(ax);
                    }
                    let mut sorted = perm.clone();
                    sorted.sort_unstable();
                    if sorted != (0..x.rank()).collect::<Vec<_>>() {
                        a.cx.err(
                            Diagnostic::error("shape::bad_permutation", format!("{:?} is not a permutation of the {} axes of {x}", perm, x.rank()))
                                .label(ls, "not a permutation")
                                .help(format!("list each axis 0..{} exactly once", x.rank())),
                        );
                        return Val::Error;
                    }
                    let ty = Ty::new(x.dtype, perm.iter().map(|&i| x.shape[i].clone()).collect());
                    a.emit(Prim::Transpose { perm }, &[0], ty)
                }
                Some((v, s)) => {
                    a.cx.err(
                        Diagnostic::error("call::bad_argument", format!("`perm` is a list of axes, found {}", v.describe()))
                            .label(s, "not a list")
                            .help("write `transpose(x, [0, 2, 1])`"),
                    );
                    Val::Error
                }
            }
        }
        "embedding" => {
            let Some(table) = a.float_tensor(0) else { return Val::Error };
            let Some(ids) = a.tensor(1) else { return Val::Error };
            if table.rank() != 2 {
                return a.rank_error(0, &table, "a table of rank 2, [vocab, dim]");
            }
            if ids.dtype.is_float() {
                let (s, ts) = (a.span(1), a.span(0));
                a.cx.err(
                    Diagnostic::error("dtype::embedding_index", format!("embedding indices must be integers, found {ids}"))
                        .label(s, format!("this is {ids}"))
                        .label(ts, format!("looking up rows of {table}"))
                        .help("declare the index input as `i32[…]`"),
                );
                return Val::Error;
            }
            let mut shape = ids.shape.clone();
            shape.push(table.shape[1].clone());
            a.emit(Prim::Embedding, &[0, 1], Ty::new(table.dtype, shape))
        }
        "causal_attention" | "attention" => {
            let Some(q) = a.float_tensor(0) else { return Val::Error };
            let Some(k) = a.float_tensor(1) else { return Val::Error };
            let Some(v) = a.float_tensor(2) else { return Val::Error };
            if q.rank() != 3 {
                return a.rank_error(0, &q, "[batch, seq, dim]");
            }
            let count = |a: &mut Args, i: usize, what: &str| -> Option<i64> {
                match &a.slots[i] {
                    Some((Val::Int(h, _), _)) if *h >= 1 => Some(*h),
                    Some((v, s)) => {
                        let (d, s) = (v.describe(), *s);
                        a.cx.err(
                            Diagnostic::error("call::bad_argument", format!("`{what}` must be a positive integer, found {d}"))
                                .label(s, "not a head count")
                                .help(format!("write `{what}: 4`")),
                        );
                        None
                    }
                    None => None,
                }
            };
            let Some(heads) = count(&mut a, 3, "heads") else { return Val::Error };
            let kv_heads = if a.slots[4].is_some() {
                let Some(kv) = count(&mut a, 4, "kv_heads") else { return Val::Error };
                kv
            } else {
                heads
            };
            let d = &q.shape[2];
            if d.size % heads != 0 {
                let (hs, qs) = (a.span(3), a.span(0));
                let near = nearest_divisors(d.size, heads);
                a.cx.err(
                    Diagnostic::error("shape::attention_heads", format!("model dim {} is not divisible by {heads} heads", d.size))
                        .label(hs, format!("{heads} heads"))
                        .label(qs, format!("q is {q}"))
                        .help(format!("use a head count that divides {}: {near}", d.size)),
                );
                return Val::Error;
            }
            if heads % kv_heads != 0 {
                let (ks, hs) = (a.span(4), a.span(3));
                let near = nearest_divisors(heads, kv_heads);
                a.cx.err(
                    Diagnostic::error("shape::attention_kv_heads", format!("{heads} query heads do not split into groups of {kv_heads} key/value heads"))
                        .label(ks, format!("{kv_heads} key/value heads"))
                        .label(hs, format!("{heads} query heads"))
                        .help(format!("use a key/value head count that divides {heads}: {near}")),
                );
                return Val::Error;
            }
            // k and v: [batch, seq, kv_heads · (dim / heads)].
            let mut kv_shape = q.shape.clone();
            kv_shape[2] = Dim::known(kv_heads * (d.size / heads));
            for (i, t) in [(1, &k), (2, &v)] {
                if t.shape != kv_shape || t.dtype != q.dtype {
                    let (qs, ts) = (a.span(0), a.span(i));
                    let want = Ty::new(q.dtype, kv_shape.clone());
                    let help = if kv_heads == heads {
                        "project q, k and v to the same [batch, seq, dim]".to_string()
                    } else {
                        format!("with {kv_heads} of {heads} heads for keys and values, project k and v to {want}")
                    };
                    a.cx.err(
                        Diagnostic::error("shape::attention_shapes", format!("`{name}` needs {} to be {want}, found {t}", a.params[i]))
                            .label(ts, format!("this is {t}"))
                            .label(qs, format!("q is {q}"))
                            .help(help),
                    );
                    return Val::Error;
                }
            }
            a.emit(Prim::Attention { heads: heads as usize, kv_heads: kv_heads as usize, causal: name == "causal_attention" }, &[0, 1, 2], q)
        }
        // Rotary position embedding (RoFormer, Llama): within each head, the
        // pair (2i, 2i+1) at position p turns by p · base^(-2i/head_dim).
        "rope" => {
            let Some(x) = a.float_tensor(0) else { return Val::Error };
            if x.rank() != 3 {
                return a.rank_error(0, &x, "[batch, seq, heads · head_dim]");
            }
            let heads = match &a.slots[1] {
                Some((Val::Int(h, _), _)) if *h >= 1 => *h,
                Some((v, s)) => {
                    let (d, s) = (v.describe(), *s);
                    a.cx.err(
                        Diagnostic::error("call::bad_argument", format!("`heads` must be a positive integer, found {d}"))
                            .label(s, "not a head count")
                            .help("write `heads: 4`"),
                    );
                    return Val::Error;
                }
                None => return Val::Error,
            };
            let d = x.shape[2].size;
            if d % heads != 0 || (d / heads) % 2 != 0 {
                let (hs, xs) = (a.span(1), a.span(0));
                let why = if d % heads != 0 {
                    format!("{d} is not divisible by {heads} heads")
                } else {
                    format!("{heads} heads of {} have an odd head dim", d / heads)
                };
                let fits: Vec<String> = (1..=d).filter(|h| d % h == 0 && (d / h) % 2 == 0).map(|h| h.to_string()).collect();
                a.cx.err(
                    Diagnostic::error("shape::rope_heads", format!("`rope` turns pairs within each head, but {why}"))
                        .label(hs, format!("{heads} heads"))
                        .label(xs, format!("x is {x}"))
                        .help(format!("use a head count that leaves an even head dim: {}", fits.join(", "))),
                );
                return Val::Error;
            }
            let Some(base) = a.number(2, 10000.0) else { return Val::Error };
            if !(base > 1.0 && base.is_finite()) {
                let s = a.span(2);
                a.cx.err(
                    Diagnostic::error("call::bad_argument", format!("`base` must be a finite number above 1, found {base}"))
                        .label(s, "not a rotary base")
                        .help("Llama uses `base: 10000`; Llama 3 uses `base: 500000`"),
                );
                return Val::Error;
            }
            a.emit(Prim::Rope { head_dim: (d / heads) as usize, base }, &[0], x)
        }
        // Each sample's mask is drawn from the seed, the step and the sample's
        // index in the data set, so any split of the batch draws the same.
        "dropout" => {
            let Some(x) = a.float_tensor(0) else { return Val::Error };
            if x.shape.first().and_then(|d| d.sym.as_deref()) != Some("batch") {
                let s = a.span(0);
                a.cx.err(
                    Diagnostic::error("shape::dropout_batch", format!("`dropout` needs a tensor whose first dim is `batch`, found {x}"))
                        .label(s, format!("this is {x}"))
                        .help("apply dropout to per-sample activations, such as a layer's output [batch, …]"),
                );
                return Val::Error;
            }
            let Some(p) = a.number(1, 0.0) else { return Val::Error };
            if !(0.0..1.0).contains(&p) {
                let s = a.span(1);
                a.cx.err(
                    Diagnostic::error("call::bad_argument", format!("`p` must be at least 0 and below 1, found {p}"))
                        .label(s, "not a dropout probability")
                        .help("write `p: 0.1` to drop one element in ten"),
                );
                return Val::Error;
            }
            if p == 0.0 {
                return a.slots[0].clone().map_or(Val::Error, |(v, _)| v);
            }
            a.emit(Prim::Dropout { p }, &[0], x)
        }
        // Images are NCHW: [batch, channels, height, width].
        "conv2d" | "max_pool2d" | "avg_pool2d" => {
            let Some(x) = a.float_tensor(0) else { return Val::Error };
            if x.rank() != 4 {
                return a.rank_error(0, &x, "an image batch [n, channels, height, width]");
            }
            let conv = name == "conv2d";
            let size = |a: &mut Args, i: usize, what: &str, least: i64, default: Option<i64>| -> Option<i64> {
                match &a.slots[i] {
                    Some((Val::Int(v, _), _)) if *v >= least => Some(*v),
                    Some((v, s)) => {
                        let (d, s) = (v.describe(), *s);
                        a.cx.err(
                            Diagnostic::error("call::bad_argument", format!("`{what}` must be an integer of at least {least}, found {d}"))
                                .label(s, format!("not a {what}"))
                                .help(format!("write `{what}: {}`", least.max(1))),
                        );
                        None
                    }
                    None => default,
                }
            };
            let (kh, kw, o) = if conv {
                let Some(w) = a.float_tensor(1) else { return Val::Error };
                if w.rank() != 4 || w.shape[1].size != x.shape[1].size || w.dtype != x.dtype {
                    let (xs, ws) = (a.span(0), a.span(1));
                    a.cx.err(
                        Diagnostic::error("shape::conv2d_weight", format!("`conv2d` needs a weight [out, {}, kh, kw] of {}, found {w}", x.shape[1], x.dtype))
                            .label(ws, format!("this is {w}"))
                            .label(xs, format!("x is {x}, with {} channel{}", x.shape[1], if x.shape[1].size == 1 { "" } else { "s" }))
                            .help(format!("declare it as `{}[out, {}, kh, kw]`, as PyTorch's Conv2d lays out its weight", x.dtype, x.shape[1])),
                    );
                    return Val::Error;
                }
                (w.shape[2].size, w.shape[3].size, w.shape[0].clone())
            } else {
                let Some(k) = size(&mut a, 1, "kernel", 1, None) else { return Val::Error };
                (k, k, x.shape[1].clone())
            };
            let default_stride = if conv { 1 } else { kh };
            let Some(stride) = size(&mut a, 2, "stride", 1, Some(default_stride)) else { return Val::Error };
            let Some(padding) = size(&mut a, 3, "padding", 0, Some(0)) else { return Val::Error };
            let (h, w) = (x.shape[2].size, x.shape[3].size);
            if kh > h + 2 * padding || kw > w + 2 * padding || (!conv && 2 * padding > kh) {
                let (xs, ks) = (a.span(0), a.span(1));
                let why = if !conv && 2 * padding > kh {
                    format!("padding {padding} is more than half the {kh} × {kw} window")
                } else {
                    format!("the {kh} × {kw} window is larger than the {h} × {w} image padded by {padding}")
                };
                a.cx.err(
                    Diagnostic::error("shape::conv2d_window", format!("`{name}` has no output: {why}"))
                        .label(ks, format!("a {kh} × {kw} window"))
                        .label(xs, format!("x is {x}"))
                        .help("use a smaller window, or more padding"),
                );
                return Val::Error;
            }
            let (oh, ow) = ((h + 2 * padding - kh) / stride + 1, (w + 2 * padding - kw) / stride + 1);
            let ty = Ty::new(x.dtype, vec![x.shape[0].clone(), o, Dim::known(oh), Dim::known(ow)]);
            let (stride, padding) = (stride as usize, padding as usize);
            if conv {
                a.emit(Prim::Conv2d { stride, padding }, &[0, 1], ty)
            } else {
                a.emit(Prim::Pool2d { kernel: kh as usize, stride, padding, max: name == "max_pool2d" }, &[0], ty)
            }
        }
        "cross_entropy" => {
            let Some(logits) = a.float_tensor(0) else { return Val::Error };
            let Some(labels) = a.tensor(1) else { return Val::Error };
            if logits.rank() == 0 {
                return a.rank_error(0, &logits, "logits of rank 1 or more, [..., classes]");
            }
            if labels.dtype.is_float() {
                let s = a.span(1);
                a.cx.err(
                    Diagnostic::error("dtype::labels", format!("`cross_entropy` labels are class indices (integers), found {labels}"))
                        .label(s, format!("this is {labels}"))
                        .help("declare the label input as `i32[…]`"),
                );
                return Val::Error;
            }
            let want = &logits.shape[..logits.rank() - 1];
            if labels.shape.as_slice() != want {
                let (ls, gs) = (a.span(1), a.span(0));
                let want_ty = Ty::new(labels.dtype, want.to_vec());
                a.cx.err(
                    Diagnostic::error("shape::cross_entropy_labels", format!("labels {labels} do not match logits {logits}"))
                        .label(ls, format!("this is {labels}"))
                        .label(gs, format!("logits are {logits}"))
                        .help(format!("labels have the logits' shape without the class dim: {want_ty}")),
                );
                return Val::Error;
            }
            a.emit(Prim::CrossEntropy, &[0, 1], Ty::scalar(logits.dtype))
        }
        "mse" => {
            let Some(p) = a.float_tensor(0) else { return Val::Error };
            let Some(t) = a.float_tensor(1) else { return Val::Error };
            if p != t {
                let (ps, ts) = (a.span(0), a.span(1));
                a.cx.err(
                    Diagnostic::error("shape::mse", format!("`mse` compares tensors of one type; found {p} and {t}"))
                        .label(ps, format!("this is {p}"))
                        .label(ts, format!("this is {t}"))
                        .help("the prediction and target must have the same shape and dtype"),
                );
                return Val::Error;
            }
            a.emit(Prim::Mse, &[0, 1], Ty::scalar(p.dtype))
        }
        _ => Val::Error,
    }
}

/// `128`, or `seq (= 64)` for a symbolic dim.
fn dim_desc(d: &Dim) -> String {
    match &d.sym {
        Some(s) => format!("{s} = {}", d.size),
        None => d.size.to_string(),
    }
}

/// Head counts (or sizes) near `want` that divide `n`, for help lines.
fn nearest_divisors(n: i64, want: i64) -> String {
    let mut divs: Vec<i64> = (1..=n.min(4096)).filter(|d| n % d == 0).collect();
    divs.sort_by_key(|d| ((d - want).abs(), *d));
    divs.truncate(3);
    divs.sort_unstable();
    divs.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
}

struct Args<'c> {
    cx: &'c mut dyn Context,
    name: String,
    slots: Vec<Option<(Val, Span)>>,
    params: &'static [&'static str],
}

impl Args<'_> {
    fn span(&self, i: usize) -> Span {
        self.slots[i].as_ref().map(|(_, s)| *s).unwrap_or(Span::new(crate::diag::SourceId::USER, 0, 0))
    }

    /// Emits the result of this op, taking the tensors in `slots` as arguments.
    fn emit(&mut self, prim: Prim, slots: &[usize], ty: Ty) -> Val {
        let mut args = Vec::with_capacity(slots.len());
        for &i in slots {
            match &self.slots[i] {
                Some((Val::Tensor(_, id), _)) => args.push(*id),
                _ => return Val::Error,
            }
        }
        self.cx.emit(prim, args, ty)
    }

    fn tensor(&mut self, i: usize) -> Option<Ty> {
        match self.slots[i].clone() {
            Some((Val::Tensor(t, _), _)) => Some(t),
            Some((Val::Error, _)) | None => None,
            Some((v, s)) => {
                self.cx.err(
                    Diagnostic::error("type::not_a_tensor", format!("`{}` of `{}` must be a tensor, found {}", self.params[i], self.name, v.describe()))
                        .label(s, "not a tensor")
                        .help("pass an input, a parameter or the output of a layer"),
                );
                None
            }
        }
    }

    fn float_tensor(&mut self, i: usize) -> Option<Ty> {
        let t = self.tensor(i)?;
        if !t.dtype.is_float() {
            let s = self.span(i);
            self.cx.err(
                Diagnostic::error("dtype::not_float", format!("`{}` needs a floating-point tensor, found {t}", self.name))
                    .label(s, format!("this is {t}"))
                    .help("integer tensors hold indices and labels; embed them first, e.g. with `Embedding`"),
            );
            return None;
        }
        Some(t)
    }

    fn rank_error(&mut self, i: usize, t: &Ty, want: &str) -> Val {
        let s = self.span(i);
        self.cx.err(
            Diagnostic::error("shape::rank", format!("`{}` needs {want} for `{}`, found {t}", self.name, self.params[i]))
                .label(s, format!("this is {t}"))
                .help("reshape the operand first"),
        );
        Val::Error
    }

    fn number(&mut self, i: usize, default: f64) -> Option<f64> {
        match &self.slots[i] {
            None => Some(default),
            Some((v, s)) => match number(v) {
                Some(x) => Some(x),
                None => {
                    let (d, s) = (v.describe(), *s);
                    self.cx.err(
                        Diagnostic::error("call::bad_argument", format!("`{}` must be a number, found {d}", self.params[i]))
                            .label(s, "not a number")
                            .help("write a number such as `1e-5`"),
                    );
                    None
                }
            },
        }
    }

    /// The axis in slot `i` (negative counts from the end), or `default`.
    fn axis(&mut self, i: usize, x: &Ty, default: i64) -> Option<usize> {
        match self.slots[i].clone() {
            None => {
                let r = x.rank() as i64;
                Some(if default < 0 { (r + default).max(0) } else { default } as usize)
            }
            Some((v, s)) => self.axis_value(&v, s, x),
        }
    }

    fn axis_value(&mut self, v: &Val, s: Span, x: &Ty) -> Option<usize> {
        let r = x.rank() as i64;
        match v {
            Val::Int(a, _) if -r <= *a && *a < r => Some(if *a < 0 { r + a } else { *a } as usize),
            Val::Int(a, _) => {
                let xs = self.span(0);
                self.cx.err(
                    Diagnostic::error(
                        "shape::axis_out_of_range",
                        format!("axis {a} is out of range for {x}, which has {r} dimension{}", if r == 1 { "" } else { "s" }),
                    )
                    .label(s, format!("axis {a}"))
                    .label(xs, format!("this is {x}"))
                    .help(if r == 0 {
                        "a scalar has no axes".to_string()
                    } else {
                        format!("axes run from {} to {} (negative counts from the end)", -r, r - 1)
                    }),
                );
                None
            }
            Val::Error => None,
            other => {
                self.cx.err(
                    Diagnostic::error("call::bad_argument", format!("an axis is an integer, found {}", other.describe()))
                        .label(s, "not an axis")
                        .help("write `axis: -1` for the last axis"),
                );
                None
            }
        }
    }
}
