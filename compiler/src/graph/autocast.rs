//! Mixed precision (`autocast bf16`): the forward graph with the layers
//! named computing where PyTorch's autocast computes in bfloat16.
//!
//! Input: a forward graph whose nodes carry their top-level layer
//! ([`Graph::units`]) and the layers to autocast. Output: the same graph in
//! which, inside those layers,
//! - a matmul reads its operands rounded to bfloat16 (a parameter is
//!   rounded from its float32 master copy, which the optimizer keeps
//!   updating in float32), multiplies them with float32 accumulation, and
//!   rounds its result to bfloat16;
//! - an element-wise operation (and `rope`, `dropout`) whose tensor operands
//!   are bfloat16 values (or parameters, cast to bfloat16 as a Linear's bias
//!   is) gives a bfloat16 value (computed in float32, then rounded); one with
//!   a float32 activation operand gives float32, as PyTorch promotes
//!   `bf16 + f32` to f32 (the residual stream stays float32);
//! - a softmax of bfloat16 scores accumulates in float32 and gives its
//!   probabilities in bfloat16, as PyTorch's CPU autocast does;
//! - reshapes, transposes, windows and masks keep their operand's precision;
//! - norms, reductions, embeddings and the loss compute in float32 and give
//!   float32.
//!
//! A rounding is the pair `FromBf16(ToBf16(x))`: the bfloat16 value is held
//! in two bytes, and widened for the float32 kernels that read it. Autodiff
//! then rounds every gradient of a bfloat16 value to bfloat16 (the pair's
//! adjoint is the same pair), and a parameter's gradient arrives widened
//! into float32, where it is all-reduced and applied. After autodiff, the
//! backward pass widens its own copy of each bfloat16 value it reads (see
//! `autodiff::recompute`), so what lives from the forward pass into the
//! backward pass is the two-byte value.
//!
//! Invariants: outside the layers named nothing changes; every value is
//! rounded at most once.

use super::{Graph, NodeId, Op, Role};
use crate::check::{DType, Ty, Unit};
use std::collections::HashMap;

/// `g` with `layers` computing in bfloat16.
pub(crate) fn apply(g: &Graph, layers: &[Unit]) -> Graph {
    let mut out = Graph::new();
    let n = g.len();
    let mut map: Vec<NodeId> = Vec::with_capacity(n);
    // New nodes holding bfloat16-exact values.
    let mut exact: Vec<bool> = Vec::new();
    // The rounded copy of a new node.
    let mut rounded: HashMap<NodeId, NodeId> = HashMap::new();
    let mut unit_of_new: HashMap<NodeId, Unit> = HashMap::new();
    // A value already widened from its own two bytes is not rounded again;
    // any other value is (a reshape or transpose of a bfloat16 value too:
    // exact, so the rounding changes nothing, but it is what the matmul
    // keeps for the backward pass, in two bytes).
    let round = |out: &mut Graph, exact: &mut Vec<bool>, rounded: &mut HashMap<NodeId, NodeId>, x: NodeId, unit: Option<Unit>, units: &mut HashMap<NodeId, Unit>| -> NodeId {
        if out.node(x).op == Op::FromBf16 {
            return x;
        }
        if let Some(r) = rounded.get(&x) {
            return *r;
        }
        let ty = out.node(x).ty.clone();
        let half = out.add(Op::ToBf16, &[x], Ty::new(DType::BF16, ty.shape.clone()), Role::Forward);
        let wide = out.add(Op::FromBf16, &[half], ty, Role::Forward);
        exact.resize(out.len(), false);
        exact[wide.0 as usize] = true;
        if let Some(u) = unit {
            units.insert(half, u);
            units.insert(wide, u);
        }
        rounded.insert(x, wide);
        wide
    };
    for id in g.ids() {
        let node = g.node(id);
        let unit = g.units.get(&id).copied();
        let inside = unit.is_some_and(|u| layers.contains(&u)) && node.role == Role::Forward && node.ty.dtype == DType::F32;
        let args: Vec<NodeId> = g.args(id).iter().map(|a| map[a.0 as usize]).collect();
        let is_exact = |exact: &Vec<bool>, x: NodeId| exact.get(x.0 as usize).copied().unwrap_or(false);
        let tensor = |out: &Graph, x: NodeId| !out.node(x).ty.shape.is_empty() && out.node(x).ty.dtype == DType::F32;
        let (new, make_exact, round_out) = if !inside {
            (out.add(node.op.clone(), &args, node.ty.clone(), node.role), false, false)
        } else {
            match &node.op {
                Op::MatMul => {
                    let a = round(&mut out, &mut exact, &mut rounded, args[0], unit, &mut unit_of_new);
                    let b = round(&mut out, &mut exact, &mut rounded, args[1], unit, &mut unit_of_new);
                    (out.add(Op::MatMul, &[a, b], node.ty.clone(), node.role), false, true)
                }
                op if op.is_elementwise() || matches!(op, Op::Rope { .. } | Op::Dropout { .. }) => {
                    // bfloat16 operands, and parameters (cast to bfloat16, as
                    // a Linear's bias is under autocast), give bfloat16.
                    let param = |out: &Graph, x: NodeId| matches!(out.node(x).op, Op::Param(_));
                    let floats: Vec<NodeId> = args.iter().copied().filter(|x| tensor(&out, *x)).collect();
                    let all = floats.iter().any(|x| is_exact(&exact, *x)) && floats.iter().all(|x| is_exact(&exact, *x) || param(&out, *x));
                    let mut args = args.clone();
                    if all {
                        for a in args.iter_mut() {
                            if tensor(&out, *a) && param(&out, *a) {
                                *a = round(&mut out, &mut exact, &mut rounded, *a, unit, &mut unit_of_new);
                            }
                        }
                    }
                    (out.add(op.clone(), &args, node.ty.clone(), node.role), false, all)
                }
                // Softmax of bfloat16 scores: accumulated in float32, its
                // probabilities stored in bfloat16 (PyTorch's CPU autocast).
                op @ Op::Softmax { .. } if args.first().is_some_and(|x| is_exact(&exact, *x)) => (out.add(op.clone(), &args, node.ty.clone(), node.role), false, true),
                op @ (Op::Reshape | Op::Transpose { .. } | Op::CausalMask { .. } | Op::Im2Col { .. }) => {
                    let keeps = args.first().is_some_and(|x| is_exact(&exact, *x));
                    (out.add(op.clone(), &args, node.ty.clone(), node.role), keeps, false)
                }
                op => (out.add(op.clone(), &args, node.ty.clone(), node.role), false, false),
            }
        };
        exact.resize(out.len(), false);
        if make_exact {
            exact[new.0 as usize] = true;
        }
        if let Some(u) = unit {
            unit_of_new.insert(new, u);
        }
        let v = if round_out { round(&mut out, &mut exact, &mut rounded, new, unit, &mut unit_of_new) } else { new };
        map.push(v);
    }
    out.loss = map.get(g.loss.0 as usize).copied().unwrap_or(NodeId(0));
    out.states = g.states.clone();
    out.units = unit_of_new;
    out
}
