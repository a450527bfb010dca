//! Backward rules, one arm per op: given a node and the gradient `dy` of
//! its result, the gradient contributions to its operands.
//!
//! Operands that are not differentiable (integer inputs, labels, ids,
//! constants) get no contribution. Broadcasting in the forward op becomes a
//! `SumTo` in the backward one.

use crate::check::{Dim, Ty};
use crate::graph::{differentiable, Graph, NodeId, Op, Role};

const B: Role = Role::Backward;

fn ty(g: &Graph, id: NodeId) -> Ty {
    g.node(id).ty.clone()
}

fn konst(g: &mut Graph, v: f64, like: NodeId) -> NodeId {
    let dt = g.node(like).ty.dtype;
    g.add(Op::Const(v), &[], Ty::scalar(dt), B)
}

/// `d` summed down to the shape of `target` (no node when already equal).
fn sum_to(g: &mut Graph, d: NodeId, target: NodeId) -> NodeId {
    let t = ty(g, target);
    if g.node(d).ty.shape == t.shape && g.node(d).ty.rank() == t.rank() {
        return d;
    }
    g.add(Op::SumTo, &[d], t, B)
}

/// The last two axes swapped.
fn swap_last(g: &mut Graph, x: NodeId) -> NodeId {
    let t = ty(g, x);
    let r = t.rank();
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 1, r - 2);
    let shape: Vec<Dim> = perm.iter().map(|&i| t.shape[i].clone()).collect();
    g.add(Op::Transpose { perm }, &[x], Ty::new(t.dtype, shape), B)
}

/// `a @ b` with the result's batch dims broadcast.
fn matmul(g: &mut Graph, a: NodeId, b: NodeId) -> NodeId {
    let (ta, tb) = (ty(g, a), ty(g, b));
    let (ra, rb) = (ta.rank(), tb.rank());
    let batch = crate::check::broadcast_shapes(&ta.shape[..ra - 2], &tb.shape[..rb - 2]).unwrap_or_default();
    let mut shape = batch;
    shape.push(ta.shape[ra - 2].clone());
    shape.push(tb.shape[rb - 1].clone());
    g.add(Op::MatMul, &[a, b], Ty::new(ta.dtype, shape), B)
}

/// The value of forward node `id` as kept for the backward pass: its
/// bfloat16 rounding, when that is all the forward pass reads of it
/// (`autocast`), else the node itself.
fn stored(g: &Graph, id: NodeId) -> NodeId {
    let only = |x: NodeId, op: Op| {
        let users: Vec<NodeId> = g.users_of(x).into_iter().filter(|u| g.node(*u).role == Role::Forward).collect();
        match users[..] {
            [u] if g.node(u).op == op => Some(u),
            _ => None,
        }
    };
    only(id, Op::ToBf16).and_then(|h| only(h, Op::FromBf16)).unwrap_or(id)
}

/// Gradient contributions of node `id` (operands `args`) given `dy`.
pub(super) fn vjp(g: &mut Graph, id: NodeId, args: &[NodeId], dy: NodeId) -> Vec<(NodeId, NodeId)> {
    let op = g.node(id).op.clone();
    let out = ty(g, id);
    let wants = |g: &Graph, a: NodeId| differentiable(g.node(a).ty.dtype) && !matches!(g.node(a).op, Op::Const(_) | Op::Input(_) | Op::Hyper(_));
    let mut res: Vec<(NodeId, NodeId)> = Vec::new();
    match op {
        Op::Input(_) | Op::Param(_) | Op::State(_) | Op::Hyper(_) | Op::Const(_) => {}
        Op::Add | Op::Sub => {
            if wants(g, args[0]) {
                let d = sum_to(g, dy, args[0]);
                res.push((args[0], d));
            }
            if wants(g, args[1]) {
                let d = if op == Op::Sub { g.add(Op::Neg, &[dy], out.clone(), B) } else { dy };
                let d = sum_to(g, d, args[1]);
                res.push((args[1], d));
            }
        }
        Op::Mul => {
            for (i, other) in [(0, 1), (1, 0)] {
                if wants(g, args[i]) {
                    let d = g.add(Op::Mul, &[dy, args[other]], out.clone(), B);
                    let d = sum_to(g, d, args[i]);
                    res.push((args[i], d));
                }
            }
        }
        Op::Div => {
            if wants(g, args[0]) {
                let d = g.add(Op::Div, &[dy, args[1]], out.clone(), B);
                let d = sum_to(g, d, args[0]);
                res.push((args[0], d));
            }
            if wants(g, args[1]) {
                // d(a/b)/db = −y/b
                let t = g.add(Op::Mul, &[dy, id], out.clone(), B);
                let t = g.add(Op::Div, &[t, args[1]], out.clone(), B);
                let t = g.add(Op::Neg, &[t], out.clone(), B);
                let d = sum_to(g, t, args[1]);
                res.push((args[1], d));
            }
        }
        Op::Neg => res.push((args[0], g.add(Op::Neg, &[dy], out, B))),
        Op::Relu => res.push((args[0], g.add(Op::ReluGrad, &[args[0], dy], out, B))),
        Op::Gelu => res.push((args[0], g.add(Op::GeluGrad, &[args[0], dy], out, B))),
        Op::Exp => res.push((args[0], g.add(Op::Mul, &[dy, id], out, B))),
        Op::Log => res.push((args[0], g.add(Op::Div, &[dy, args[0]], out, B))),
        Op::Sqrt => {
            let two = konst(g, 2.0, id);
            let t = g.add(Op::Mul, &[id, two], out.clone(), B);
            res.push((args[0], g.add(Op::Div, &[dy, t], out, B)));
        }
        Op::Tanh => {
            let one = konst(g, 1.0, id);
            let y2 = g.add(Op::Mul, &[id, id], out.clone(), B);
            let t = g.add(Op::Sub, &[one, y2], out.clone(), B);
            res.push((args[0], g.add(Op::Mul, &[dy, t], out, B)));
        }
        Op::Sigmoid => {
            let one = konst(g, 1.0, id);
            let t = g.add(Op::Sub, &[one, id], out.clone(), B);
            let t = g.add(Op::Mul, &[id, t], out.clone(), B);
            res.push((args[0], g.add(Op::Mul, &[dy, t], out, B)));
        }
        Op::MatMul => {
            if wants(g, args[0]) {
                let (ta, tb) = (ty(g, args[0]), ty(g, args[1]));
                let rows: i64 = ta.shape[..ta.rank() - 1].iter().map(|d| d.size).product();
                let (k, n) = (tb.shape[0].size, tb.shape.get(1).map(|d| d.size).unwrap_or(1));
                let d = if tb.rank() == 2 && rows * (k + n) < k * n {
                    // dA = dY · Bᵀ needs Bᵀ, a copy of the whole weight. When
                    // the activations are the smaller side, compute
                    // dAᵀ = B · dYᵀ instead: the copies are of dY and dAᵀ.
                    let dt = ta.dtype;
                    let (kd, nd) = (tb.shape[0].clone(), tb.shape[1].clone());
                    let d2 = g.add(Op::Reshape, &[dy], Ty::new(dt, vec![Dim::known(rows), nd]), B);
                    let d2t = swap_last(g, d2);
                    let p = g.add(Op::MatMul, &[args[1], d2t], Ty::new(dt, vec![kd, Dim::known(rows)]), B);
                    let pt = swap_last(g, p);
                    g.add(Op::Reshape, &[pt], ta.clone(), B)
                } else {
                    let bt = swap_last(g, args[1]);
                    let d = matmul(g, dy, bt);
                    sum_to(g, d, args[0])
                };
                res.push((args[0], d));
            }
            if wants(g, args[1]) {
                let (ta, tb) = (ty(g, args[0]), ty(g, args[1]));
                let d = if tb.rank() == 2 && ta.rank() > 2 {
                    // A weight shared by every batch row: one product over
                    // the flattened rows, not a batch of products summed.
                    let rows: i64 = ta.shape[..ta.rank() - 1].iter().map(|d| d.size).product();
                    let k = ta.shape[ta.rank() - 1].clone();
                    let n = out.shape[out.rank() - 1].clone();
                    let a2 = g.add(Op::Reshape, &[args[0]], Ty::new(ta.dtype, vec![Dim::known(rows), k]), B);
                    let d2 = g.add(Op::Reshape, &[dy], Ty::new(ta.dtype, vec![Dim::known(rows), n]), B);
                    let at = swap_last(g, a2);
                    matmul(g, at, d2)
                } else {
                    let at = swap_last(g, args[0]);
                    let d = matmul(g, at, dy);
                    sum_to(g, d, args[1])
                };
                res.push((args[1], d));
            }
        }
        Op::Reshape => {
            let t = ty(g, args[0]);
            res.push((args[0], g.add(Op::Reshape, &[dy], t, B)));
        }
        Op::Transpose { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            let t = ty(g, args[0]);
            res.push((args[0], g.add(Op::Transpose { perm: inv }, &[dy], t, B)));
        }
        Op::Sum { axes, keepdims } => {
            let t = ty(g, args[0]);
            res.push((args[0], g.add(Op::Expand { axes, keepdims }, &[dy], t, B)));
        }
        Op::Mean { axes, keepdims } => {
            let t = ty(g, args[0]);
            let n: i64 = axes.iter().map(|&a| t.shape[a].size).product();
            let e = g.add(Op::Expand { axes, keepdims }, &[dy], t.clone(), B);
            let k = konst(g, 1.0 / n.max(1) as f64, id);
            res.push((args[0], g.add(Op::Mul, &[e, k], t, B)));
        }
        Op::Max { axes, keepdims } => {
            let t = ty(g, args[0]);
            res.push((args[0], g.add(Op::MaxGrad { axes, keepdims }, &[args[0], id, dy], t, B)));
        }
        Op::Softmax { axis } => {
            // Under autocast the probabilities are kept in bfloat16: the
            // gradient reads them as stored.
            let y = stored(g, id);
            res.push((args[0], g.add(Op::SoftmaxGrad { axis }, &[y, dy], out, B)))
        }
        Op::LogSoftmax { axis } => res.push((args[0], g.add(Op::LogSoftmaxGrad { axis }, &[id, dy], out, B))),
        Op::LayerNorm { eps } => {
            if wants(g, args[0]) {
                res.push((args[0], g.add(Op::LayerNormGradX { eps }, &[args[0], args[1], dy], out.clone(), B)));
            }
            if wants(g, args[1]) {
                let t = ty(g, args[1]);
                res.push((args[1], g.add(Op::LayerNormGradGamma { eps }, &[args[0], dy], t, B)));
            }
            if wants(g, args[2]) {
                let d = sum_to(g, dy, args[2]);
                res.push((args[2], d));
            }
        }
        Op::RmsNorm { eps } => {
            if wants(g, args[0]) {
                res.push((args[0], g.add(Op::RmsNormGradX { eps }, &[args[0], args[1], dy], out.clone(), B)));
            }
            if wants(g, args[1]) {
                let t = ty(g, args[1]);
                res.push((args[1], g.add(Op::RmsNormGradGamma { eps }, &[args[0], dy], t, B)));
            }
        }
        // Linear: the adjoint sums each window's gradient back into the image.
        Op::Im2Col { kh, kw, stride, padding, .. } => {
            let t = ty(g, args[0]);
            res.push((args[0], g.add(Op::Col2Im { kh, kw, stride, padding }, &[dy], t, B)));
        }
        // The same mask, on the gradient.
        Op::Dropout { p, seed } => {
            if wants(g, args[0]) {
                res.push((args[0], g.add(Op::Dropout { p, seed }, &[dy, args[1], args[2]], out, B)));
            }
        }
        Op::CausalMask { .. } => res.push((args[0], g.add(Op::CausalMask { fill: 0.0 }, &[dy], out, B))),
        // A rounding to bfloat16 and its widening pass the gradient through:
        // gradients stay float32 (PyTorch's autocast rounds the gradient of
        // a bfloat16 value to bfloat16; keeping it in float32 is finer and
        // needs no conversions in the backward pass). The pair only ever
        // appears together, so the gradient of the two-byte value is never
        // read as two bytes.
        Op::ToBf16 | Op::FromBf16 => res.push((args[0], dy)),
        // A rotation: its transpose turns back by the same angles.
        Op::Rope { head_dim, base, inverse } => res.push((args[0], g.add(Op::Rope { head_dim, base, inverse: !inverse }, &[dy], out, B))),
        Op::Embedding => {
            if wants(g, args[0]) {
                let t = ty(g, args[0]);
                res.push((args[0], g.add(Op::EmbeddingGrad, &[args[1], dy], t, B)));
            }
        }
        Op::CrossEntropy => {
            if wants(g, args[0]) {
                let t = ty(g, args[0]);
                res.push((args[0], g.add(Op::CrossEntropyGrad, &[args[0], args[1], dy], t, B)));
            }
        }
        Op::Mse => {
            let t = ty(g, args[0]);
            let d = g.add(Op::MseGrad, &[args[0], args[1], dy], t.clone(), B);
            if wants(g, args[0]) {
                res.push((args[0], d));
            }
            if wants(g, args[1]) {
                res.push((args[1], g.add(Op::Neg, &[d], t, B)));
            }
        }
        // Backward and update ops are not differentiated again.
        Op::ReluGrad
        | Op::GeluGrad
        | Op::ClipScale { .. }
        | Op::MaxGrad { .. }
        | Op::SumTo
        | Op::Expand { .. }
        | Op::SoftmaxGrad { .. }
        | Op::LogSoftmaxGrad { .. }
        | Op::LayerNormGradX { .. }
        | Op::LayerNormGradGamma { .. }
        | Op::RmsNormGradX { .. }
        | Op::Col2Im { .. }
        | Op::RmsNormGradGamma { .. }
        | Op::EmbeddingGrad
        | Op::CrossEntropyGrad
        | Op::MseGrad
        | Op::Assign(_)
        | Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::Slice { .. }
        | Op::Send { .. }
        | Op::Recv { .. }
        | Op::Accumulate(_)
        | Op::Accumulated(_)
        | Op::Pack { .. }
        | Op::Unpack { .. } => {}
    }
    res.retain(|(a, _)| wants(g, *a));
    res
}
