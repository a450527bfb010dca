//! Gradient checks: every backward rule against central finite differences,
//! computed in f64 by the reference interpreter, on fresh random inputs.

use super::backward;
use crate::check::{DType, Dim, Ty};
use crate::graph::{Graph, Hyper, NodeId, Op, Role};
use crate::interp::{run, Env, Tensor};

/// Deterministic generator for test data (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next()
    }
}

fn ty(shape: &[i64]) -> Ty {
    Ty::new(DType::F32, shape.iter().map(|&d| Dim::known(d)).collect())
}

fn ity(shape: &[i64]) -> Ty {
    Ty::new(DType::I32, shape.iter().map(|&d| Dim::known(d)).collect())
}

/// A test case: parameters (with a value range), integer inputs, and a body
/// producing the node to differentiate.
struct Case {
    name: &'static str,
    params: Vec<(Vec<i64>, f64, f64)>,
    ints: Vec<(Vec<i64>, usize)>,
    body: fn(&mut Graph, &[NodeId], &[NodeId]) -> NodeId,
}

/// Builds `loss = sum(body(params) * r)` with a random weight tensor `r`.
fn build(case: &Case, rng: &mut Rng) -> (Graph, Vec<Tensor>, Vec<Tensor>) {
    let mut g = Graph::new();
    let f = Role::Forward;
    let ps: Vec<NodeId> = case.params.iter().enumerate().map(|(i, (s, _, _))| g.add(Op::Param(i), &[], ty(s), f)).collect();
    let is: Vec<NodeId> = case.ints.iter().enumerate().map(|(i, (s, _))| g.add(Op::Input(i + 1), &[], ity(s), f)).collect();
    let out = (case.body)(&mut g, &ps, &is);
    let oty = g.node(out).ty.clone();
    let r = g.add(Op::Input(0), &[], oty.clone(), f);
    let w = g.add(Op::Mul, &[out, r], oty.clone(), f);
    let axes: Vec<usize> = (0..oty.rank()).collect();
    g.loss = g.add(Op::Sum { axes, keepdims: false }, &[w], Ty::scalar(DType::F32), f);
    let params: Vec<Tensor> = case
        .params
        .iter()
        .map(|(s, lo, hi)| {
            let shape: Vec<usize> = s.iter().map(|&d| d as usize).collect();
            let n = shape.iter().product();
            Tensor::new(shape, (0..n).map(|_| rng.uniform(*lo, *hi)).collect())
        })
        .collect();
    let rshape: Vec<usize> = oty.shape.iter().map(|d| d.size as usize).collect();
    let rn = rshape.iter().product();
    let mut inputs = vec![Tensor::new(rshape, (0..rn).map(|_| rng.uniform(-1.0, 1.0)).collect())];
    for (s, hi) in &case.ints {
        let shape: Vec<usize> = s.iter().map(|&d| d as usize).collect();
        let n = shape.iter().product();
        inputs.push(Tensor::new(shape, (0..n).map(|_| (rng.next() * *hi as f64).floor()).collect()));
    }
    (g, params, inputs)
}

fn loss_of(g: &Graph, params: &[Tensor], inputs: &[Tensor]) -> f64 {
    let env = Env { inputs, params, states: &[], hyper: &|_: Hyper| 0.0 };
    let vals = run(g, &env).expect("forward runs");
    vals[g.loss.0 as usize].data[0]
}

fn check(case: &Case, seed: u64) {
    let mut rng = Rng(seed);
    let (mut g, mut params, inputs) = build(case, &mut rng);
    let fwd_len = g.len();
    let grads = backward(&mut g);
    g.verify().unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let env = Env { inputs: &inputs, params: &params, states: &[], hyper: &|_: Hyper| 0.0 };
    let vals = run(&g, &env).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    for (pi, pnode) in (0..case.params.len()).map(|i| (i, NodeId(i as u32))) {
        let gnode = grads.get(&pnode).unwrap_or_else(|| panic!("{}: no gradient for param {pi}", case.name));
        assert!(gnode.0 as usize >= fwd_len || gnode.0 == pnode.0, "{}: gradient is a forward node", case.name);
        let analytic = vals[gnode.0 as usize].data.clone();
        for (k, &a) in analytic.iter().enumerate() {
            let h = 1e-6 * params[pi].data[k].abs().max(1.0);
            let orig = params[pi].data[k];
            params[pi].data[k] = orig + h;
            let up = loss_of(&g, &params, &inputs);
            params[pi].data[k] = orig - h;
            let down = loss_of(&g, &params, &inputs);
            params[pi].data[k] = orig;
            let numeric = (up - down) / (2.0 * h);
            let err = (numeric - a).abs() / numeric.abs().max(a.abs()).max(1e-3);
            assert!(err < 1e-5, "{} param {pi}[{k}]: analytic {a} vs numeric {numeric} (rel err {err:e})", case.name);
        }
    }
}

fn node(g: &mut Graph, op: Op, args: &[NodeId], shape: &[i64]) -> NodeId {
    g.add(op, args, ty(shape), Role::Forward)
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "add broadcast",
            params: vec![(vec![2, 3], -1.0, 1.0), (vec![3], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Add, &[p[0], p[1]], &[2, 3]),
        },
        Case {
            name: "sub broadcast",
            params: vec![(vec![2, 1], -1.0, 1.0), (vec![2, 3], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Sub, &[p[0], p[1]], &[2, 3]),
        },
        Case {
            name: "mul",
            params: vec![(vec![2, 3], -1.0, 1.0), (vec![1, 3], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Mul, &[p[0], p[1]], &[2, 3]),
        },
        Case {
            name: "div",
            params: vec![(vec![2, 3], -1.0, 1.0), (vec![3], 0.5, 2.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Div, &[p[0], p[1]], &[2, 3]),
        },
        Case { name: "neg", params: vec![(vec![4], -1.0, 1.0)], ints: vec![], body: |g, p, _| node(g, Op::Neg, &[p[0]], &[4]) },
        Case { name: "relu", params: vec![(vec![7], -1.0, 1.0)], ints: vec![], body: |g, p, _| node(g, Op::Relu, &[p[0]], &[7]) },
        Case { name: "gelu", params: vec![(vec![7], -3.0, 3.0)], ints: vec![], body: |g, p, _| node(g, Op::Gelu, &[p[0]], &[7]) },
        Case { name: "tanh", params: vec![(vec![5], -2.0, 2.0)], ints: vec![], body: |g, p, _| node(g, Op::Tanh, &[p[0]], &[5]) },
        Case { name: "sigmoid", params: vec![(vec![5], -3.0, 3.0)], ints: vec![], body: |g, p, _| node(g, Op::Sigmoid, &[p[0]], &[5]) },
        Case { name: "exp", params: vec![(vec![5], -2.0, 2.0)], ints: vec![], body: |g, p, _| node(g, Op::Exp, &[p[0]], &[5]) },
        Case { name: "log", params: vec![(vec![5], 0.5, 3.0)], ints: vec![], body: |g, p, _| node(g, Op::Log, &[p[0]], &[5]) },
        Case { name: "sqrt", params: vec![(vec![5], 0.5, 3.0)], ints: vec![], body: |g, p, _| node(g, Op::Sqrt, &[p[0]], &[5]) },
        Case {
            name: "matmul",
            params: vec![(vec![3, 4], -1.0, 1.0), (vec![4, 2], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::MatMul, &[p[0], p[1]], &[3, 2]),
        },
        Case {
            name: "batched matmul, broadcast rhs",
            params: vec![(vec![2, 3, 4], -1.0, 1.0), (vec![4, 5], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::MatMul, &[p[0], p[1]], &[2, 3, 5]),
        },
        Case { name: "reshape", params: vec![(vec![2, 6], -1.0, 1.0)], ints: vec![], body: |g, p, _| node(g, Op::Reshape, &[p[0]], &[3, 4]) },
        Case {
            name: "transpose",
            params: vec![(vec![2, 3, 4], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Transpose { perm: vec![2, 0, 1] }, &[p[0]], &[4, 2, 3]),
        },
        Case {
            name: "sum axis",
            params: vec![(vec![2, 3, 4], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Sum { axes: vec![1], keepdims: false }, &[p[0]], &[2, 4]),
        },
        Case {
            name: "sum keepdims",
            params: vec![(vec![2, 3, 4], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Sum { axes: vec![0, 2], keepdims: true }, &[p[0]], &[1, 3, 1]),
        },
        Case {
            name: "mean",
            params: vec![(vec![3, 4], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Mean { axes: vec![1], keepdims: false }, &[p[0]], &[3]),
        },
        Case {
            name: "max",
            params: vec![(vec![3, 4], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Max { axes: vec![1], keepdims: false }, &[p[0]], &[3]),
        },
        Case { name: "softmax", params: vec![(vec![3, 5], -2.0, 2.0)], ints: vec![], body: |g, p, _| node(g, Op::Softmax { axis: 1 }, &[p[0]], &[3, 5]) },
        Case {
            name: "softmax axis 0",
            params: vec![(vec![3, 5], -2.0, 2.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Softmax { axis: 0 }, &[p[0]], &[3, 5]),
        },
        Case {
            name: "log_softmax",
            params: vec![(vec![3, 5], -2.0, 2.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::LogSoftmax { axis: 1 }, &[p[0]], &[3, 5]),
        },
        Case {
            name: "layer_norm",
            params: vec![(vec![3, 6], -2.0, 2.0), (vec![6], 0.5, 1.5), (vec![6], -0.5, 0.5)],
            ints: vec![],
            body: |g, p, _| node(g, Op::LayerNorm { eps: 1e-5 }, &[p[0], p[1], p[2]], &[3, 6]),
        },
        Case {
            name: "causal attention (lowered)",
            params: vec![(vec![2, 4, 6], -1.0, 1.0), (vec![2, 4, 6], -1.0, 1.0), (vec![2, 4, 6], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| crate::graph::attention(g, &[p[0], p[1], p[2]], 2, &ty(&[2, 4, 6])),
        },
        Case {
            name: "embedding",
            params: vec![(vec![5, 3], -1.0, 1.0)],
            ints: vec![(vec![2, 4], 5)],
            body: |g, p, i| node(g, Op::Embedding, &[p[0], i[0]], &[2, 4, 3]),
        },
        Case {
            name: "cross_entropy",
            params: vec![(vec![2, 3, 5], -2.0, 2.0)],
            ints: vec![(vec![2, 3], 5)],
            body: |g, p, i| node(g, Op::CrossEntropy, &[p[0], i[0]], &[]),
        },
        Case {
            name: "mse",
            params: vec![(vec![2, 3], -1.0, 1.0), (vec![2, 3], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| node(g, Op::Mse, &[p[0], p[1]], &[]),
        },
        Case {
            name: "shared operand (accumulated gradient)",
            params: vec![(vec![3], -1.0, 1.0)],
            ints: vec![],
            body: |g, p, _| {
                let t = node(g, Op::Tanh, &[p[0]], &[3]);
                node(g, Op::Mul, &[t, p[0]], &[3])
            },
        },
    ]
}

#[test]
fn every_backward_rule_matches_finite_differences() {
    for (k, case) in cases().iter().enumerate() {
        for seed in 0..3u64 {
            check(case, 1000 * k as u64 + seed + 1);
        }
    }
}
