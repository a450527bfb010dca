//! Optimizer updates as graph nodes, with PyTorch's semantics.
//!
//! Clipping by global norm scales every gradient by
//! `min(1, max_norm / (‖g‖ + 1e-6))`. SGD: `g += wd·p; buf = μ·buf + g;
//! g = nesterov ? g + μ·buf : buf; p -= lr·g`. Adam: `g += wd·p;
//! m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
//! p −= lr·bc1·m / (√v·bc2 + ε)` with `bc1 = 1/(1−β1^t)` and
//! `bc2 = 1/√(1−β2^t)` supplied per step as hypers. AdamW decays
//! `p *= 1 − lr·wd` first instead of adding `wd·p` to the gradient.
//!
//! Input: the training graph after the backward pass, with each parameter's
//! gradient. Output: the same graph with update nodes assigning each
//! parameter (and optimizer state) its next value. Invariant: the update of a
//! parameter reads only that parameter, its gradient, its states and the
//! step's hypers (and, when clipping, the global norm), so the partitioner
//! can place it with the parameter.

use crate::check::{Checked, Optimizer, Ty};
use crate::graph::{Graph, Hyper, NodeId, Op, Role, StateVar, Target};

const U: Role = Role::Update;

pub(super) fn append_update(g: &mut Graph, c: &Checked, params: &[(usize, NodeId)]) {
    let params: Vec<(usize, NodeId, NodeId)> = params.iter().filter_map(|&(i, p)| g.grads.get(&i).map(|&gr| (i, p, gr))).collect();
    let Some(&(_, first, _)) = params.first() else { return };
    let dt = g.node(first).ty.dtype;
    let scalar = Ty::scalar(dt);
    let k = |g: &mut Graph, v: f64| g.add(Op::Const(v), &[], scalar.clone(), U);

    // Clip by the global norm of all gradients.
    let mut grads: Vec<NodeId> = params.iter().map(|p| p.2).collect();
    if let Some(max_norm) = c.train.clip_grad_norm {
        let mut total: Option<NodeId> = None;
        for &gr in &grads {
            let t = g.node(gr).ty.clone();
            let sq = g.add(Op::Mul, &[gr, gr], t.clone(), U);
            let axes: Vec<usize> = (0..t.rank()).collect();
            let s = g.add(Op::Sum { axes, keepdims: false }, &[sq], scalar.clone(), U);
            total = Some(match total {
                Some(acc) => g.add(Op::Add, &[acc, s], scalar.clone(), U),
                None => s,
            });
        }
        if let Some(total) = total {
            let norm = g.add(Op::Sqrt, &[total], scalar.clone(), U);
            let scale = g.add(Op::ClipScale { max_norm }, &[norm], scalar.clone(), U);
            grads = grads
                .iter()
                .map(|&gr| {
                    let t = g.node(gr).ty.clone();
                    g.add(Op::Mul, &[gr, scale], t, U)
                })
                .collect();
        }
    }
    let lr = g.add(Op::Hyper(Hyper::Lr), &[], scalar.clone(), U);
    let paths: Vec<String> = c.model.params.iter().map(|p| p.path.clone()).collect();
    for (&(i, p, _), &gr) in params.iter().zip(&grads) {
        let t = g.node(p).ty.clone();
        let path = paths.get(i).cloned().unwrap_or_default();
        let state = |g: &mut Graph, kind: &str| {
            let j = g.states.len();
            g.states.push(StateVar { name: format!("optim.{kind}.{path}"), ty: t.clone(), param: i });
            (j, g.add(Op::State(j), &[], t.clone(), U))
        };
        let new_p = match c.train.optimizer {
            Optimizer::Sgd { momentum, nesterov, weight_decay, .. } => {
                let mut d = gr;
                if weight_decay != 0.0 {
                    let wd = k(g, weight_decay);
                    let wp = g.add(Op::Mul, &[p, wd], t.clone(), U);
                    d = g.add(Op::Add, &[d, wp], t.clone(), U);
                }
                if momentum != 0.0 {
                    let (j, buf) = state(g, "momentum_buffer");
                    let mu = k(g, momentum);
                    let mb = g.add(Op::Mul, &[buf, mu], t.clone(), U);
                    let nb = g.add(Op::Add, &[mb, d], t.clone(), U);
                    g.add(Op::Assign(Target::State(j)), &[nb], t.clone(), U);
                    d = if nesterov {
                        let m2 = g.add(Op::Mul, &[nb, mu], t.clone(), U);
                        g.add(Op::Add, &[d, m2], t.clone(), U)
                    } else {
                        nb
                    };
                }
                let step = g.add(Op::Mul, &[d, lr], t.clone(), U);
                g.add(Op::Sub, &[p, step], t.clone(), U)
            }
            Optimizer::Adam { beta1, beta2, eps, weight_decay, decoupled, .. } => {
                let mut d = gr;
                let mut base = p;
                if weight_decay != 0.0 {
                    let wd = k(g, weight_decay);
                    if decoupled {
                        let lw = g.add(Op::Mul, &[lr, wd], scalar.clone(), U);
                        let one = k(g, 1.0);
                        let f = g.add(Op::Sub, &[one, lw], scalar.clone(), U);
                        base = g.add(Op::Mul, &[p, f], t.clone(), U);
                    } else {
                        let wp = g.add(Op::Mul, &[p, wd], t.clone(), U);
                        d = g.add(Op::Add, &[d, wp], t.clone(), U);
                    }
                }
                let (jm, m) = state(g, "exp_avg");
                let (jv, v) = state(g, "exp_avg_sq");
                let (b1, nb1, b2, nb2) = (k(g, beta1), k(g, 1.0 - beta1), k(g, beta2), k(g, 1.0 - beta2));
                let m1 = g.add(Op::Mul, &[m, b1], t.clone(), U);
                let m2 = g.add(Op::Mul, &[d, nb1], t.clone(), U);
                let nm = g.add(Op::Add, &[m1, m2], t.clone(), U);
                let d2 = g.add(Op::Mul, &[d, d], t.clone(), U);
                let v1 = g.add(Op::Mul, &[v, b2], t.clone(), U);
                let v2 = g.add(Op::Mul, &[d2, nb2], t.clone(), U);
                let nv = g.add(Op::Add, &[v1, v2], t.clone(), U);
                g.add(Op::Assign(Target::State(jm)), &[nm], t.clone(), U);
                g.add(Op::Assign(Target::State(jv)), &[nv], t.clone(), U);
                let bc1 = g.add(Op::Hyper(Hyper::BiasCorrection1), &[], scalar.clone(), U);
                let bc2 = g.add(Op::Hyper(Hyper::BiasCorrection2), &[], scalar.clone(), U);
                let sv = g.add(Op::Sqrt, &[nv], t.clone(), U);
                let sv = g.add(Op::Mul, &[sv, bc2], t.clone(), U);
                let e = k(g, eps);
                let den = g.add(Op::Add, &[sv, e], t.clone(), U);
                let q = g.add(Op::Div, &[nm, den], t.clone(), U);
                let lb = g.add(Op::Mul, &[lr, bc1], scalar.clone(), U);
                let step = g.add(Op::Mul, &[q, lb], t.clone(), U);
                g.add(Op::Sub, &[base, step], t.clone(), U)
            }
        };
        g.add(Op::Assign(Target::Param(i)), &[new_p], t, U);
    }
}
