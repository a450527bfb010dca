//! Sharding propagation: for one op and one mesh axis, the layouts its
//! operands must have and the layout of its result.
//!
//! A rule sees the layouts the operands have now and answers with the
//! layouts it needs (the partitioner converts any operand that differs) and
//! the layout it produces. Rules never fail: when no split layout works, they
//! ask for replicated operands, which every op accepts.

use super::{chunk_range, L};
use crate::graph::{Graph, NodeId, Op};

/// What a rule decided for one axis.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisRule {
    pub args: Vec<L>,
    pub out: L,
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

fn rule(args: Vec<L>, out: L) -> AxisRule {
    AxisRule { args, out, scale: Scale::None }
}

fn shape(g: &Graph, n: NodeId) -> Vec<usize> {
    g.node(n).ty.shape.iter().map(|d| d.size.max(0) as usize).collect()
}

fn all(n: usize, l: L) -> Vec<L> {
    vec![l; n]
}

/// The rule of node `id` on an axis of `k` devices, its operands laid out as `have`.
/// `update`: the node belongs to the optimizer update, where adding a
/// replicated value to a partial sum masks the replicated value rather than
/// reducing the partial one (one reduction for a whole sum of norms).
pub fn decide(g: &Graph, id: NodeId, have: &[L], k: usize, update: bool) -> AxisRule {
    let node = g.node(id);
    let args = g.args(id);
    let out_shape = shape(g, id);
    let n = args.len();
    let arg_shape = |i: usize| shape(g, args[i]);
    match &node.op {
        Op::Input(_) | Op::Param(_) | Op::State(_) | Op::Hyper(_) | Op::Const(_) | Op::Recv { .. } | Op::Accumulated(_) => rule(vec![], L::R),
        op if op.is_elementwise() => elementwise(g, id, op, have, update),
        Op::MatMul => matmul(&arg_shape(0), &arg_shape(1), &out_shape, have),
        Op::Reshape => match have[0] {
            L::P => rule(vec![L::P], L::P),
            L::R => rule(vec![L::R], L::R),
            L::S(d, u) => match reshape_split(&arg_shape(0), &out_shape, d, u, k) {
                Some(o) => rule(vec![have[0]], o),
                None => rule(vec![L::R], L::R),
            },
        },
        Op::Transpose { perm } => match have[0] {
            L::S(d, u) => rule(vec![have[0]], L::S(perm.iter().position(|&p| p == d).unwrap_or(0), u)),
            l => rule(vec![l], l),
        },
        Op::Sum { axes, keepdims } | Op::Mean { axes, keepdims } => match have[0] {
            L::P => rule(vec![L::P], L::P),
            L::R => rule(vec![L::R], L::R),
            L::S(d, _) if axes.contains(&d) => {
                let mean = matches!(node.op, Op::Mean { .. });
                AxisRule { args: vec![have[0]], out: L::P, scale: if mean { Scale::Out } else { Scale::None } }
            }
            L::S(d, u) => rule(vec![have[0]], L::S(reduced_dim(d, axes, *keepdims), u)),
        },
        Op::Max { axes, keepdims } => match have[0] {
            L::S(d, u) if !axes.contains(&d) => rule(vec![have[0]], L::S(reduced_dim(d, axes, *keepdims), u)),
            _ => rule(vec![L::R], L::R),
        },
        Op::MaxGrad { axes, keepdims } => match have[0] {
            L::S(d, u) if !axes.contains(&d) => {
                let r = L::S(reduced_dim(d, axes, *keepdims), u);
                rule(vec![have[0], r, have[0]], have[0])
            }
            _ => rule(all(3, L::R), L::R),
        },
        Op::SumTo => match have[0] {
            L::P => rule(vec![L::P], L::P),
            L::R => rule(vec![L::R], L::R),
            L::S(d, u) => {
                let a = arg_shape(0);
                let off = a.len() - out_shape.len().min(a.len());
                if d < off || (out_shape[d - off] == 1 && a[d] != 1) {
                    rule(vec![have[0]], L::P)
                } else {
                    rule(vec![have[0]], L::S(d - off, u))
                }
            }
        },
        Op::Expand { axes, keepdims } => match have[0] {
            L::S(d, u) => {
                // Inverse of the reduction's dim map.
                let full = (0..out_shape.len()).filter(|i| !axes.contains(i)).nth(d);
                match (keepdims, full) {
                    (true, _) => rule(vec![have[0]], L::S(d, u)),
                    (false, Some(f)) => rule(vec![have[0]], L::S(f, u)),
                    _ => rule(vec![L::R], L::R),
                }
            }
            l => rule(vec![l], l),
        },
        Op::Softmax { axis } | Op::LogSoftmax { axis } => match have[0] {
            L::S(d, _) if d != *axis => rule(vec![have[0]], have[0]),
            _ => rule(vec![L::R], L::R),
        },
        Op::SoftmaxGrad { axis } | Op::LogSoftmaxGrad { axis } => {
            // Linear in dy.
            match (have[0], have[1]) {
                (L::R, L::P) => rule(vec![L::R, L::P], L::P),
                (L::S(d, u), _) | (_, L::S(d, u)) if d != *axis => rule(vec![L::S(d, u), L::S(d, u)], L::S(d, u)),
                _ => rule(all(2, L::R), L::R),
            }
        }
        Op::LayerNorm { .. } => {
            let last = out_shape.len().saturating_sub(1);
            match have[0] {
                L::S(d, u) if d != last => rule(vec![L::S(d, u), L::R, L::R], L::S(d, u)),
                _ => rule(all(3, L::R), L::R),
            }
        }
        Op::LayerNormGradX { .. } => {
            let last = out_shape.len().saturating_sub(1);
            // Linear in dy, but reducing dy first (as Megatron does) keeps the
            // norm's own gradients whole: one reduction instead of three.
            match (have[0], have[2]) {
                (L::S(d, u), _) | (_, L::S(d, u)) if d != last => rule(vec![L::S(d, u), L::R, L::S(d, u)], L::S(d, u)),
                _ => rule(all(3, L::R), L::R),
            }
        }
        Op::LayerNormGradGamma { .. } => {
            let last = arg_shape(0).len().saturating_sub(1);
            match (have[0], have[1]) {
                (L::S(d, u), _) | (_, L::S(d, u)) if d != last => rule(vec![L::S(d, u), L::S(d, u)], L::P),
                _ => rule(all(2, L::R), L::R),
            }
        }
        Op::CausalMask { .. } => {
            let r = out_shape.len();
            match have[0] {
                L::S(d, u) if d + 2 < r => rule(vec![have[0]], L::S(d, u)),
                _ => rule(vec![L::R], L::R),
            }
        }
        Op::Embedding => {
            let r = out_shape.len();
            match (have[0], have[1]) {
                (_, L::S(d, u)) => rule(vec![L::R, L::S(d, u)], L::S(d, u)),
                (L::S(1, u), L::R) => rule(vec![L::S(1, u), L::R], L::S(r - 1, u)),
                _ => rule(all(2, L::R), L::R),
            }
        }
        Op::EmbeddingGrad => {
            let r = arg_shape(1).len();
            match (have[0], have[1]) {
                (L::S(d, u), _) => rule(vec![L::S(d, u), L::S(d, u)], L::P),
                (L::R, L::S(d, u)) if d + 1 == r => rule(vec![L::R, L::S(d, u)], L::S(1, u)),
                (L::R, L::S(d, u)) => rule(vec![L::S(d, u), L::S(d, u)], L::P),
                (L::R, L::P) => rule(vec![L::R, L::P], L::P),
                _ => rule(all(2, L::R), L::R),
            }
        }
        Op::CrossEntropy | Op::Mse => {
            let last = arg_shape(0).len().saturating_sub(1);
            let class = matches!(node.op, Op::CrossEntropy);
            let pick = match (have[0], have[1]) {
                (L::S(d, u), _) | (_, L::S(d, u)) if !class || d < last => Some(L::S(d, u)),
                _ => None,
            };
            match pick {
                Some(s) => AxisRule { args: vec![s, s], out: L::P, scale: Scale::Out },
                None => rule(all(2, L::R), L::R),
            }
        }
        Op::CrossEntropyGrad | Op::MseGrad => {
            let last = arg_shape(0).len().saturating_sub(1);
            let class = matches!(node.op, Op::CrossEntropyGrad);
            if have[2] == L::P && have[0] == L::R && have[1] == L::R {
                return rule(vec![L::R, L::R, L::P], L::P);
            }
            let pick = match (have[0], have[1]) {
                (L::S(d, u), _) | (_, L::S(d, u)) if !class || d < last => Some(L::S(d, u)),
                _ => None,
            };
            match pick {
                Some(s) => AxisRule { args: vec![s, s, L::R], out: s, scale: Scale::Arg(2) },
                None => rule(all(3, L::R), L::R),
            }
        }
        Op::Assign(_) | Op::Accumulate(_) | Op::Send { .. } => rule(vec![have[0]], L::R),
        // Element-wise ops are matched above; device-program ops never occur
        // in a global graph.
        _ => rule(all(n, L::R), L::R),
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

fn elementwise(g: &Graph, id: NodeId, op: &Op, have: &[L], update: bool) -> AxisRule {
    let args = g.args(id);
    let out = shape(g, id);
    let n = args.len();
    let mut have = have.to_vec();
    if have.contains(&L::P) {
        let ps = have.iter().filter(|l| **l == L::P).count();
        let splits = have.iter().any(|l| matches!(l, L::S(..)));
        let linear = match op {
            Op::Add | Op::Sub => ps == n,
            Op::Mul => ps == 1 && !splits,
            Op::Div => have[0] == L::P && have[1] == L::R,
            Op::Neg => true,
            Op::ReluGrad | Op::GeluGrad => have[1] == L::P && have[0] == L::R,
            _ => false,
        };
        if linear {
            return rule(have, L::P);
        }
        if update && matches!(op, Op::Add | Op::Sub) && !splits {
            // Mask the replicated operands: the sum stays partial.
            return rule(all(n, L::P), L::P);
        }
        for l in &mut have {
            if *l == L::P {
                *l = L::R;
            }
        }
    }
    // Split like the first operand split along a dim it does not broadcast.
    let r = out.len();
    let mut target: Option<(usize, usize)> = None;
    for (i, l) in have.iter().enumerate() {
        if let L::S(d, u) = *l {
            let a = shape(g, args[i]);
            let od = d + r - a.len();
            if a[d] == out[od] {
                target = Some((od, u));
                break;
            }
        }
    }
    match target {
        None => rule(all(n, L::R), L::R),
        Some((od, u)) => {
            let req = args
                .iter()
                .map(|a| {
                    let s = shape(g, *a);
                    let off = r - s.len();
                    if od >= off && s[od - off] == out[od] {
                        L::S(od - off, u)
                    } else {
                        L::R
                    }
                })
                .collect();
            rule(req, L::S(od, u))
        }
    }
}

fn matmul(a: &[usize], b: &[usize], out: &[usize], have: &[L]) -> AxisRule {
    let (ra, rb, r) = (a.len(), b.len(), out.len());
    match (have[0], have[1]) {
        (L::P, _) => return rule(vec![L::P, L::R], L::P),
        (_, L::P) => return rule(vec![L::R, L::P], L::P),
        _ => {}
    }
    #[derive(Clone, Copy, PartialEq)]
    enum K {
        R,
        Contract(usize),
        Free(usize),
        Batch(usize, usize),
    }
    let kind = |l: L, rank: usize, is_a: bool| match l {
        L::S(d, u) if is_a && d + 1 == rank => K::Contract(u),
        L::S(d, u) if is_a && d + 2 == rank => K::Free(u),
        L::S(d, u) if !is_a && d + 2 == rank => K::Contract(u),
        L::S(d, u) if !is_a && d + 1 == rank => K::Free(u),
        L::S(d, u) => K::Batch(d + r - rank, u),
        _ => K::R,
    };
    let (ka, kb) = (kind(have[0], ra, true), kind(have[1], rb, false));
    // An operand's own dim for output batch dim `o`, when it has it at full size.
    let batch_of = |shape: &[usize], o: usize, u: usize| {
        let off = r - shape.len();
        if o >= off && o - off + 2 < shape.len() && shape[o - off] == out[o] {
            L::S(o - off, u)
        } else {
            L::R
        }
    };
    match (ka, kb) {
        (K::R, K::R) => rule(vec![L::R, L::R], L::R),
        (K::Batch(o, u), _) | (_, K::Batch(o, u)) => rule(vec![batch_of(a, o, u), batch_of(b, o, u)], L::S(o, u)),
        (K::Contract(u), _) | (_, K::Contract(u)) if !matches!(ka, K::Free(_)) && !matches!(kb, K::Free(_)) => {
            rule(vec![L::S(ra - 1, u), L::S(rb - 2, u)], L::P)
        }
        (K::Free(u), _) => rule(vec![L::S(ra - 2, u), L::R], L::S(r - 2, u)),
        (_, K::Free(u)) => rule(vec![L::R, L::S(rb - 1, u)], L::S(r - 1, u)),
        _ => rule(vec![L::R, L::R], L::R),
    }
}

/// Where a split of dim `d` (granule `u`) of `from` lands after a reshape to
/// `to`, if every device's block stays one contiguous block of a dim of `to`.
fn reshape_split(from: &[usize], to: &[usize], d: usize, u: usize, k: usize) -> Option<L> {
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
    candidates.into_iter().find(|&g| g > 0 && to[j].is_multiple_of(g) && (0..k).all(|c| chunk_range(to[j] / g, k, c).start * g == want[c])).map(|g| L::S(j, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_maps_splits() {
        // [B, S, D] → [B·S, D] with an uneven B split: granule S.
        assert_eq!(reshape_split(&[5, 3, 8], &[15, 8], 0, 1, 2), Some(L::S(0, 3)));
        // [B·S, D] → [B, S, D] with the granule back.
        assert_eq!(reshape_split(&[15, 8], &[5, 3, 8], 0, 3, 2), Some(L::S(0, 1)));
        // An even split needs no granule.
        assert_eq!(reshape_split(&[4, 3, 8], &[12, 8], 0, 1, 2), Some(L::S(0, 1)));
        // [B, S, D] → [B, S, H, Dh] with D split over 2: heads split.
        assert_eq!(reshape_split(&[2, 3, 8], &[2, 3, 4, 2], 2, 1, 2), Some(L::S(2, 1)));
        // and back.
        assert_eq!(reshape_split(&[2, 3, 4, 2], &[2, 3, 8], 2, 1, 2), Some(L::S(2, 1)));
        // A split of an inner dim that merges into an outer one is not contiguous.
        assert_eq!(reshape_split(&[4, 6], &[24], 1, 1, 2), None);
    }
}
