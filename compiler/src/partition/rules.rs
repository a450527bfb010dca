//! Sharding propagation: for one op and one mesh axis, the layouts its
//! operands must have and the layout of its result.
//!
//! A rule sees the layouts the operands have now and answers with the
//! layouts it needs (the partitioner converts any operand that differs) and
//! the layout it produces. Rules never fail: when no split layout works, they
//! ask for replicated operands, which every op accepts.
//!
//! Input: one op, its operands' layouts and shapes along one mesh axis.
//! Output: the layouts it needs and the layout it produces. Invariant: the
//! answer is a function of its inputs only, so every device derives the same
//! layouts.

use super::{chunk_range, Layout};
use crate::graph::{Graph, NodeId, Op};

/// What a rule decided for one axis.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisRule {
    pub args: Vec<Layout>,
    pub out: Layout,
    /// The op reduces over a split dim (a mean, a loss): its local result is
    /// scaled by the device's share of the reduced elements.
    pub scale: Scale,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    None,
    /// Multiply the result by the share.
    Out,
    /// Multiply operand `i` by the share before the op.
    Arg(usize),
}

fn rule(args: Vec<Layout>, out: Layout) -> AxisRule {
    AxisRule { args, out, scale: Scale::None }
}

fn shape(g: &Graph, n: NodeId) -> Vec<usize> {
    g.node(n).ty.shape.iter().map(|d| d.size.max(0) as usize).collect()
}

fn all(n: usize, l: Layout) -> Vec<Layout> {
    vec![l; n]
}

/// The rule of node `id` on an axis of `k` devices, its operands laid out as `have`.
/// `update`: the node belongs to the optimizer update, where adding a
/// replicated value to a partial sum masks the replicated value rather than
/// reducing the partial one (one reduction for a whole sum of norms).
pub fn decide(g: &Graph, id: NodeId, have: &[Layout], k: usize, update: bool) -> AxisRule {
    let node = g.node(id);
    let args = g.args(id);
    let out_shape = shape(g, id);
    let n = args.len();
    let arg_shape = |i: usize| shape(g, args[i]);
    match &node.op {
        Op::Input(_) | Op::Param(_) | Op::State(_) | Op::Hyper(_) | Op::Const(_) | Op::Recv { .. } | Op::Accumulated(_) => rule(vec![], Layout::Replicated),
        op if op.is_elementwise() => elementwise(g, id, op, have, update),
        Op::MatMul => matmul(&arg_shape(0), &arg_shape(1), &out_shape, have),
        Op::Reshape => match have[0] {
            Layout::Partial => rule(vec![Layout::Partial], Layout::Partial),
            Layout::Replicated => rule(vec![Layout::Replicated], Layout::Replicated),
            Layout::Split(d, u) => match reshape_split(&arg_shape(0), &out_shape, d, u, k) {
                Some(o) => rule(vec![have[0]], o),
                None => rule(vec![Layout::Replicated], Layout::Replicated),
            },
        },
        Op::Transpose { perm } => match have[0] {
            Layout::Split(d, u) => rule(vec![have[0]], Layout::Split(perm.iter().position(|&p| p == d).unwrap_or(0), u)),
            l => rule(vec![l], l),
        },
        Op::Sum { axes, keepdims } | Op::Mean { axes, keepdims } => match have[0] {
            Layout::Partial => rule(vec![Layout::Partial], Layout::Partial),
            Layout::Replicated => rule(vec![Layout::Replicated], Layout::Replicated),
            Layout::Split(d, _) if axes.contains(&d) => {
                let mean = matches!(node.op, Op::Mean { .. });
                AxisRule { args: vec![have[0]], out: Layout::Partial, scale: if mean { Scale::Out } else { Scale::None } }
            }
            Layout::Split(d, u) => rule(vec![have[0]], Layout::Split(reduced_dim(d, axes, *keepdims), u)),
        },
        Op::Max { axes, keepdims } => match have[0] {
            Layout::Split(d, u) if !axes.contains(&d) => rule(vec![have[0]], Layout::Split(reduced_dim(d, axes, *keepdims), u)),
            _ => rule(vec![Layout::Replicated], Layout::Replicated),
        },
        Op::MaxGrad { axes, keepdims } => match have[0] {
            Layout::Split(d, u) if !axes.contains(&d) => {
                let r = Layout::Split(reduced_dim(d, axes, *keepdims), u);
                rule(vec![have[0], r, have[0]], have[0])
            }
            _ => rule(all(3, Layout::Replicated), Layout::Replicated),
        },
        Op::SumTo => match have[0] {
            Layout::Partial => rule(vec![Layout::Partial], Layout::Partial),
            Layout::Replicated => rule(vec![Layout::Replicated], Layout::Replicated),
            Layout::Split(d, u) => {
                let a = arg_shape(0);
                let off = a.len() - out_shape.len().min(a.len());
                if d < off || (out_shape[d - off] == 1 && a[d] != 1) {
                    rule(vec![have[0]], Layout::Partial)
                } else {
                    rule(vec![have[0]], Layout::Split(d - off, u))
                }
            }
        },
        Op::Expand { axes, keepdims } => match have[0] {
            Layout::Split(d, u) => {
                // Inverse of the reduction's dim map.
                let full = (0..out_shape.len()).filter(|i| !axes.contains(i)).nth(d);
                match (keepdims, full) {
                    (true, _) => rule(vec![have[0]], Layout::Split(d, u)),
                    (false, Some(f)) => rule(vec![have[0]], Layout::Split(f, u)),
                    _ => rule(vec![Layout::Replicated], Layout::Replicated),
                }
            }
            l => rule(vec![l], l),
        },
        Op::Softmax { axis } | Op::LogSoftmax { axis } => match have[0] {
            Layout::Split(d, _) if d != *axis => rule(vec![have[0]], have[0]),
            _ => rule(vec![Layout::Replicated], Layout::Replicated),
        },
        Op::SoftmaxGrad { axis } | Op::LogSoftmaxGrad { axis } => {
            // Linear in dy.
            match (have[0], have[1]) {
                (Layout::Replicated, Layout::Partial) => rule(vec![Layout::Replicated, Layout::Partial], Layout::Partial),
                (Layout::Split(d, u), _) | (_, Layout::Split(d, u)) if d != *axis => rule(vec![Layout::Split(d, u), Layout::Split(d, u)], Layout::Split(d, u)),
                _ => rule(all(2, Layout::Replicated), Layout::Replicated),
            }
        }
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
            let last = out_shape.len().saturating_sub(1);
            match have[0] {
                Layout::Split(d, u) if d != last => {
                    let mut args = all(n, Layout::Replicated);
                    args[0] = Layout::Split(d, u);
                    rule(args, Layout::Split(d, u))
                }
                _ => rule(all(n, Layout::Replicated), Layout::Replicated),
            }
        }
        Op::LayerNormGradX { .. } | Op::RmsNormGradX { .. } => {
            let last = out_shape.len().saturating_sub(1);
            // Linear in dy, but reducing dy first (as Megatron does) keeps the
            // norm's own gradients whole: one reduction instead of three.
            match (have[0], have[2]) {
                (Layout::Split(d, u), _) | (_, Layout::Split(d, u)) if d != last => {
                    rule(vec![Layout::Split(d, u), Layout::Replicated, Layout::Split(d, u)], Layout::Split(d, u))
                }
                _ => rule(all(3, Layout::Replicated), Layout::Replicated),
            }
        }
        Op::LayerNormGradGamma { .. } | Op::RmsNormGradGamma { .. } => {
            let last = arg_shape(0).len().saturating_sub(1);
            match (have[0], have[1]) {
                (Layout::Split(d, u), _) | (_, Layout::Split(d, u)) if d != last => rule(vec![Layout::Split(d, u), Layout::Split(d, u)], Layout::Partial),
                _ => rule(all(2, Layout::Replicated), Layout::Replicated),
            }
        }
        Op::CausalMask { .. } => {
            let r = out_shape.len();
            match have[0] {
                Layout::Split(d, u) if d + 2 < r => rule(vec![have[0]], Layout::Split(d, u)),
                _ => rule(vec![Layout::Replicated], Layout::Replicated),
            }
        }
        // Positions run along the second-last dim and pairs turn within a
        // head: any other dim splits, and the last one in whole heads.
        Op::Rope { head_dim, .. } => {
            let r = out_shape.len();
            let last = out_shape[r - 1];
            let whole_heads = |u: usize| u > 0 && (0..k).all(|i| (chunk_range(last / u, k, i).start * u) % head_dim.max(&1) == 0);
            match have[0] {
                Layout::Split(d, u) if d + 2 < r || (d + 1 == r && whole_heads(u)) => rule(vec![have[0]], Layout::Split(d, u)),
                Layout::Partial => rule(vec![Layout::Partial], Layout::Partial),
                _ => rule(vec![Layout::Replicated], Layout::Replicated),
            }
        }
        // Images split by batch (dim 0 of both sides); linear, so partial
        // sums pass through. (Im2Col pads with `fill`, so only Col2Im is
        // linear in the strict sense; its partial input is the gradient.)
        Op::Im2Col { .. } | Op::Col2Im { .. } => match have[0] {
            Layout::Split(0, u) => rule(vec![Layout::Split(0, u)], Layout::Split(0, u)),
            Layout::Partial if matches!(node.op, Op::Col2Im { .. }) => rule(vec![Layout::Partial], Layout::Partial),
            _ => rule(vec![Layout::Replicated], Layout::Replicated),
        },
        // Element by element; rounding is not linear, so a partial sum is reduced first.
        Op::ToBf16 | Op::FromBf16 => match have[0] {
            Layout::Partial => rule(vec![Layout::Replicated], Layout::Replicated),
            l => rule(vec![l], l),
        },
        // Samples split by batch, their indices with them; linear in x.
        Op::Dropout { .. } => match have[0] {
            Layout::Split(0, u) => rule(vec![Layout::Split(0, u), Layout::Split(0, u), Layout::Replicated], Layout::Split(0, u)),
            Layout::Partial => rule(vec![Layout::Partial, Layout::Replicated, Layout::Replicated], Layout::Partial),
            _ => rule(all(3, Layout::Replicated), Layout::Replicated),
        },
        Op::Embedding => {
            let r = out_shape.len();
            match (have[0], have[1]) {
                (_, Layout::Split(d, u)) => rule(vec![Layout::Replicated, Layout::Split(d, u)], Layout::Split(d, u)),
                (Layout::Split(1, u), Layout::Replicated) => rule(vec![Layout::Split(1, u), Layout::Replicated], Layout::Split(r - 1, u)),
                _ => rule(all(2, Layout::Replicated), Layout::Replicated),
            }
        }
        Op::EmbeddingGrad => {
            let r = arg_shape(1).len();
            match (have[0], have[1]) {
                (Layout::Split(d, u), _) => rule(vec![Layout::Split(d, u), Layout::Split(d, u)], Layout::Partial),
                (Layout::Replicated, Layout::Split(d, u)) if d + 1 == r => rule(vec![Layout::Replicated, Layout::Split(d, u)], Layout::Split(1, u)),
                (Layout::Replicated, Layout::Split(d, u)) => rule(vec![Layout::Split(d, u), Layout::Split(d, u)], Layout::Partial),
                (Layout::Replicated, Layout::Partial) => rule(vec![Layout::Replicated, Layout::Partial], Layout::Partial),
                _ => rule(all(2, Layout::Replicated), Layout::Replicated),
            }
        }
        Op::CrossEntropy | Op::Mse => {
            let last = arg_shape(0).len().saturating_sub(1);
            let class = matches!(node.op, Op::CrossEntropy);
            let pick = match (have[0], have[1]) {
                (Layout::Split(d, u), _) | (_, Layout::Split(d, u)) if !class || d < last => Some(Layout::Split(d, u)),
                _ => None,
            };
            match pick {
                Some(s) => AxisRule { args: vec![s, s], out: Layout::Partial, scale: Scale::Out },
                None => rule(all(2, Layout::Replicated), Layout::Replicated),
            }
        }
        Op::CrossEntropyGrad | Op::MseGrad => {
            let last = arg_shape(0).len().saturating_sub(1);
            let class = matches!(node.op, Op::CrossEntropyGrad);
            if have[2] == Layout::Partial && have[0] == Layout::Replicated && have[1] == Layout::Replicated {
                return rule(vec![Layout::Replicated, Layout::Replicated, Layout::Partial], Layout::Partial);
            }
            let pick = match (have[0], have[1]) {
                (Layout::Split(d, u), _) | (_, Layout::Split(d, u)) if !class || d < last => Some(Layout::Split(d, u)),
                _ => None,
            };
            match pick {
                Some(s) => AxisRule { args: vec![s, s, Layout::Replicated], out: s, scale: Scale::Arg(2) },
                None => rule(all(3, Layout::Replicated), Layout::Replicated),
            }
        }
        Op::Assign(_) | Op::Accumulate(_) | Op::Send { .. } => rule(vec![have[0]], Layout::Replicated),
        // Element-wise ops are matched above; device-program ops never occur
        // in a global graph.
        _ => rule(all(n, Layout::Replicated), Layout::Replicated),
    }
}

/// Where dim `d` of a reduction's operand lands in its result.
fn reduced_dim(d: usize, axes: &[usize], keepdims: bool) -> usize {
    if keepdims {
        d
    } else {
        d - axes.iter().filter(|&&a| a < d).count()
    }
}

fn elementwise(g: &Graph, id: NodeId, op: &Op, have: &[Layout], update: bool) -> AxisRule {
    let args = g.args(id);
    let out = shape(g, id);
    let n = args.len();
    let mut have = have.to_vec();
    if have.contains(&Layout::Partial) {
        let ps = have.iter().filter(|l| **l == Layout::Partial).count();
        let splits = have.iter().any(|l| matches!(l, Layout::Split(..)));
        let linear = match op {
            Op::Add | Op::Sub => ps == n,
            Op::Mul => ps == 1 && !splits,
            Op::Div => have[0] == Layout::Partial && have[1] == Layout::Replicated,
            Op::Neg => true,
            Op::ReluGrad | Op::GeluGrad => have[1] == Layout::Partial && have[0] == Layout::Replicated,
            _ => false,
        };
        if linear {
            return rule(have, Layout::Partial);
        }
        if update && matches!(op, Op::Add | Op::Sub) && !splits {
            // Mask the replicated operands: the sum stays partial.
            return rule(all(n, Layout::Partial), Layout::Partial);
        }
        for l in &mut have {
            if *l == Layout::Partial {
                *l = Layout::Replicated;
            }
        }
    }
    // Split like the first operand split along a dim it does not broadcast.
    let r = out.len();
    let mut target: Option<(usize, usize)> = None;
    for (i, l) in have.iter().enumerate() {
        if let Layout::Split(d, u) = *l {
            let a = shape(g, args[i]);
            let od = d + r - a.len();
            if a[d] == out[od] {
                target = Some((od, u));
                break;
            }
        }
    }
    match target {
        None => rule(all(n, Layout::Replicated), Layout::Replicated),
        Some((od, u)) => {
            let req = args
                .iter()
                .map(|a| {
                    let s = shape(g, *a);
                    let off = r - s.len();
                    if od >= off && s[od - off] == out[od] {
                        Layout::Split(od - off, u)
                    } else {
                        Layout::Replicated
                    }
                })
                .collect();
            rule(req, Layout::Split(od, u))
        }
    }
}

fn matmul(a: &[usize], b: &[usize], out: &[usize], have: &[Layout]) -> AxisRule {
    let (ra, rb, r) = (a.len(), b.len(), out.len());
    match (have[0], have[1]) {
        (Layout::Partial, _) => return rule(vec![Layout::Partial, Layout::Replicated], Layout::Partial),
        (_, Layout::Partial) => return rule(vec![Layout::Replicated, Layout::Partial], Layout::Partial),
        _ => {}
    }
    #[derive(Clone, Copy, PartialEq)]
    enum K {
        R,
        Contract(usize),
        Free(usize),
        Batch(usize, usize),
    }
    let kind = |l: Layout, rank: usize, is_a: bool| match l {
        Layout::Split(d, u) if is_a && d + 1 == rank => K::Contract(u),
        Layout::Split(d, u) if is_a && d + 2 == rank => K::Free(u),
        Layout::Split(d, u) if !is_a && d + 2 == rank => K::Contract(u),
        Layout::Split(d, u) if !is_a && d + 1 == rank => K::Free(u),
        Layout::Split(d, u) => K::Batch(d + r - rank, u),
        _ => K::R,
    };
    let (ka, kb) = (kind(have[0], ra, true), kind(have[1], rb, false));
    // An operand's own dim for output batch dim `o`, when it has it at full size.
    let batch_of = |shape: &[usize], o: usize, u: usize| {
        let off = r - shape.len();
        if o >= off && o - off + 2 < shape.len() && shape[o - off] == out[o] {
            Layout::Split(o - off, u)
        } else {
            Layout::Replicated
        }
    };
    match (ka, kb) {
        (K::R, K::R) => rule(vec![Layout::Replicated, Layout::Replicated], Layout::Replicated),
        (K::Batch(o, u), _) | (_, K::Batch(o, u)) => rule(vec![batch_of(a, o, u), batch_of(b, o, u)], Layout::Split(o, u)),
        (K::Contract(u), _) | (_, K::Contract(u)) if !matches!(ka, K::Free(_)) && !matches!(kb, K::Free(_)) => {
            rule(vec![Layout::Split(ra - 1, u), Layout::Split(rb - 2, u)], Layout::Partial)
        }
        (K::Free(u), _) => rule(vec![Layout::Split(ra - 2, u), Layout::Replicated], Layout::Split(r - 2, u)),
        (_, K::Free(u)) => rule(vec![Layout::Replicated, Layout::Split(rb - 1, u)], Layout::Split(r - 1, u)),
        _ => rule(vec![Layout::Replicated, Layout::Replicated], Layout::Replicated),
    }
}

/// Where a split of dim `d` (granule `u`) of `from` lands after a reshape to
/// `to`, if every device's block stays one contiguous block of a dim of `to`.
fn reshape_split(from: &[usize], to: &[usize], d: usize, u: usize, k: usize) -> Option<Layout> {
    let prefix: usize = from[..d].iter().product();
    let mut acc = 1usize;
    let mut j = 0;
    while j < to.len() && acc < prefix {
        acc *= to[j];
        j += 1;
    }
    if acc != prefix || j >= to.len() || u == 0 || !from[d].is_multiple_of(u) {
        return None;
    }
    let inner_from: usize = from[d + 1..].iter().product();
    let inner_to: usize = to[j + 1..].iter().product::<usize>().max(1);
    // Block boundaries in elements from the start of the prefix's block.
    let units = from[d] / u;
    let bounds: Vec<usize> = (0..k).map(|c| chunk_range(units, k, c).start * u * inner_from).collect();
    if bounds.iter().any(|b| !b.is_multiple_of(inner_to)) {
        return None;
    }
    let want: Vec<usize> = bounds.iter().map(|b| b / inner_to).collect();
    let mut candidates = vec![1];
    if (u * inner_from).is_multiple_of(inner_to) {
        candidates.push(u * inner_from / inner_to);
    }
    candidates
        .into_iter()
        .find(|&g| g > 0 && to[j].is_multiple_of(g) && (0..k).all(|c| chunk_range(to[j] / g, k, c).start * g == want[c]))
        .map(|g| Layout::Split(j, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_maps_splits() {
        // [B, S, D] → [B·S, D] with an uneven B split: granule S.
        assert_eq!(reshape_split(&[5, 3, 8], &[15, 8], 0, 1, 2), Some(Layout::Split(0, 3)));
        // [B·S, D] → [B, S, D] with the granule back.
        assert_eq!(reshape_split(&[15, 8], &[5, 3, 8], 0, 3, 2), Some(Layout::Split(0, 1)));
        // An even split needs no granule.
        assert_eq!(reshape_split(&[4, 3, 8], &[12, 8], 0, 1, 2), Some(Layout::Split(0, 1)));
        // [B, S, D] → [B, S, H, Dh] with D split over 2: heads split.
        assert_eq!(reshape_split(&[2, 3, 8], &[2, 3, 4, 2], 2, 1, 2), Some(Layout::Split(2, 1)));
        // and back.
        assert_eq!(reshape_split(&[2, 3, 4, 2], &[2, 3, 8], 2, 1, 2), Some(Layout::Split(2, 1)));
        // A split of an inner dim that merges into an outer one is not contiguous.
        assert_eq!(reshape_split(&[4, 6], &[24], 1, 1, 2), None);
    }
}
