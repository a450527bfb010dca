//! Autodiff: forward graph → forward + backward + optimizer update, in one graph.
//!
//! Input: the forward [`Graph`] and the train settings. Output: the same graph
//! extended with the gradient of the loss with respect to every parameter
//! (reverse mode, one rule per op in `rules.rs`), gradient clipping, and the
//! optimizer's update as `Assign` nodes to parameters and optimizer states
//! (`optim.rs`). Keeping all three in one graph lets the partitioner place
//! forward, backward and update together.

mod optim;
mod recompute;
mod rules;

use crate::check::{Checked, Ty};
use crate::graph::{Graph, NodeId, Op, Role};
use std::collections::HashMap;

/// The training graph `g` with the forward activations of `layers`
/// recomputed in the backward pass (what `recompute` does).
pub fn recompute(g: &Graph, layers: &[crate::check::Unit]) -> Graph {
    recompute::apply(g, layers)
}

/// Differentiates `g` (a forward graph built from `c`) and appends the update.
pub fn differentiate(mut g: Graph, c: &Checked) -> Graph {
    let grads = backward(&mut g);
    let params: Vec<(usize, NodeId)> = g.ids().filter_map(|id| if let Op::Param(i) = g.node(id).op { Some((i, id)) } else { None }).collect();
    for (i, node) in &params {
        if let Some(gr) = grads.get(node) {
            g.grads.insert(*i, *gr);
        }
    }
    optim::append_update(&mut g, c, &params);
    let layers = match &c.placement {
        crate::check::Placement::Explicit(e) => e.recompute.clone(),
        _ => Vec::new(),
    };
    if layers.is_empty() && !g.ids().any(|id| g.node(id).op == Op::FromBf16) {
        return g;
    }
    recompute::apply(&g, &layers)
}

/// Reverse-mode gradients of the loss: node → its gradient node.
fn backward(g: &mut Graph) -> HashMap<NodeId, NodeId> {
    let loss = g.loss;
    let dt = g.node(loss).ty.dtype;
    let mut grads: HashMap<NodeId, NodeId> = HashMap::new();
    let one = g.add(Op::Const(1.0), &[], Ty::scalar(dt), Role::Backward);
    g.origin.insert(one, loss);
    grads.insert(loss, one);
    let forward: Vec<NodeId> = g.ids().filter(|id| g.node(*id).role == Role::Forward && id.0 <= loss.0).collect();
    for id in forward.into_iter().rev() {
        let Some(&dy) = grads.get(&id) else { continue };
        let args = g.args(id);
        let first = g.len();
        let contributions = rules::vjp(g, id, &args, dy);
        for (arg, d) in contributions {
            let acc = match grads.get(&arg) {
                Some(&prev) => {
                    let ty = g.node(arg).ty.clone();
                    g.add(Op::Add, &[prev, d], ty, Role::Backward)
                }
                None => d,
            };
            grads.insert(arg, acc);
        }
        for n in first..g.len() {
            g.origin.insert(NodeId(n as u32), id);
        }
    }
    grads
}

#[cfg(test)]
mod tests;
