//! Activation recompute: the backward pass of a chosen layer reads its
//! forward activations from a second forward computation made just before it
//! is needed, rather than from values kept since the forward pass.
//!
//! Input: the training graph and the layers to recompute. Output: the same
//! computation, where each backward node that read an activation made inside
//! one of those layers reads a copy of it, computed in the backward pass from
//! the layer's inputs and parameters. What a layer hands on to later layers
//! (its outputs) is still kept: the next layer's backward pass reads it, and
//! recomputing it would mean recomputing every earlier layer too.
//!
//! The same rewrite gives the backward pass its own widening of each
//! bfloat16 value of `autocast` (see `graph::autocast`).
//!
//! Invariants: the copies are the same operations on the same operands, so
//! every value, and so every gradient, is bit for bit the one without
//! recompute; each recomputed activation is made once, before the first
//! backward node that reads it (the start of its layer's backward pass), so
//! a layer's recomputed activations live only through that layer's
//! backward pass.

use crate::check::Unit;
use crate::graph::{Graph, NodeId, Op, Role};
use std::collections::HashMap;

/// The training graph `g` with the forward activations of `layers` recomputed.
pub(crate) fn apply(g: &Graph, layers: &[Unit]) -> Graph {
    let n = g.len();
    let mut users: Vec<Vec<NodeId>> = vec![Vec::new(); n];
    for id in g.ids() {
        for a in g.args(id) {
            users[a.0 as usize].push(id);
        }
    }
    let source = |id: NodeId| matches!(g.node(id).op, Op::Param(_) | Op::State(_) | Op::Input(_) | Op::Const(_) | Op::Hyper(_));
    // Activations to recompute: made by a chosen layer, not a source, and
    // read outside it only by the backward pass; and every widening of a
    // bfloat16 value (`autocast`), so that the backward pass widens its own
    // copy and only the two-byte value lives between the passes.
    let widen = |id: NodeId| g.node(id).op == Op::FromBf16 && g.node(id).role == Role::Forward;
    let redo: Vec<bool> = g
        .ids()
        .map(|id| {
            if widen(id) {
                return true;
            }
            let Some(u) = g.units.get(&id) else { return false };
            layers.contains(u)
                && g.node(id).role == Role::Forward
                && !source(id)
                && id != g.loss
                && users[id.0 as usize].iter().all(|x| match g.node(*x).role {
                    Role::Forward => g.units.get(x) == Some(u),
                    Role::Backward => true,
                    Role::Update => false,
                })
        })
        .collect();
    let mut out = Graph::new();
    let mut map: Vec<NodeId> = Vec::with_capacity(n);
    let mut copy: HashMap<NodeId, NodeId> = HashMap::new();
    for id in g.ids() {
        let node = g.node(id);
        let mut args = Vec::new();
        for a in g.args(id) {
            let v = if node.role == Role::Backward && redo[a.0 as usize] { again(g, &redo, &map, &mut copy, &mut out, a) } else { map[a.0 as usize] };
            args.push(v);
        }
        let new = out.add(node.op.clone(), &args, node.ty.clone(), node.role);
        map.push(new);
    }
    out.loss = map[g.loss.0 as usize];
    out.grads = g.grads.iter().map(|(p, x)| (*p, map[x.0 as usize])).collect();
    out.states = g.states.clone();
    for (b, o) in &g.origin {
        out.origin.insert(map[b.0 as usize], map[o.0 as usize]);
    }
    for (x, u) in &g.units {
        out.units.insert(map[x.0 as usize], *u);
    }
    for (orig, c) in &copy {
        out.origin.insert(*c, map[orig.0 as usize]);
        if let Some(u) = g.units.get(orig) {
            out.units.insert(*c, *u);
        }
    }
    out
}

/// The backward pass's copy of forward activation `x`, made (with the
/// copies it reads) on first use.
fn again(g: &Graph, redo: &[bool], map: &[NodeId], copy: &mut HashMap<NodeId, NodeId>, out: &mut Graph, x: NodeId) -> NodeId {
    if let Some(c) = copy.get(&x) {
        return *c;
    }
    let args: Vec<NodeId> = g.args(x).into_iter().map(|a| if redo[a.0 as usize] { again(g, redo, map, copy, out, a) } else { map[a.0 as usize] }).collect();
    let node = g.node(x);
    let c = out.add(node.op.clone(), &args, node.ty.clone(), Role::Backward);
    copy.insert(x, c);
    c
}
