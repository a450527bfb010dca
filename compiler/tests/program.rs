//! The kernel program of a training step computes what its graph computes:
//! every step run plainly in f64 (fused bodies by their reference
//! evaluator, library ops by the interpreter) against the interpreter on the
//! whole graph.

use shardplan_compiler::graph::{Hyper, Target};
use shardplan_compiler::interp::{apply, broadcast, run, Env, Tensor};
use shardplan_compiler::kernel::{BufKind, Program, StepKind};

mod common;
use common::{shape, values, Rng};

/// Runs `p` in f64; returns every buffer's value.
fn execute(p: &Program, env: &Env<'_>) -> Vec<Tensor> {
    let mut vals: Vec<Option<Tensor>> = vec![None; p.buffers.len()];
    for (i, b) in p.buffers.iter().enumerate() {
        vals[i] = match &b.kind {
            BufKind::Input(k) => Some(env.inputs[*k].clone()),
            BufKind::Param(k) => Some(env.params[*k].clone()),
            BufKind::State(k) => Some(env.states[*k].clone()),
            BufKind::Hyper(h) => Some(Tensor::scalar((env.hyper)(*h))),
            BufKind::Const(c) => Some(Tensor::scalar(*c)),
            BufKind::Temp | BufKind::Alias(_) | BufKind::Accum(_) => None,
        };
    }
    let get = |vals: &[Option<Tensor>], p: &Program, b: shardplan_compiler::kernel::BufId| {
        let s = p.storage(b);
        let mut t = vals[s.0 as usize].clone().expect("buffer computed before use");
        t.shape = p.buffers[b.0 as usize].shape.clone();
        t
    };
    for step in &p.steps {
        let ins: Vec<Tensor> = step.inputs.iter().map(|b| get(&vals, p, *b)).collect();
        let out_shape = p.buffers[step.output.0 as usize].shape.clone();
        let out = match &step.kind {
            StepKind::Fused(f) => {
                let refs: Vec<&[f64]> = ins.iter().map(|t| t.data.as_slice()).collect();
                let mut o = vec![0.0; out_shape.iter().product()];
                f.eval_f64(&refs, &mut o);
                Tensor::new(out_shape, o)
            }
            StepKind::Op(op) => apply(op, &ins.iter().collect::<Vec<_>>(), &out_shape, env).expect("op runs"),
            StepKind::Broadcast => broadcast(&ins[0], &out_shape),
            StepKind::Reduce { op, epilogue } => {
                let n = op.arity();
                let r = apply(op, &ins[..n].iter().collect::<Vec<_>>(), &out_shape, env).expect("reduction runs");
                let mut refs: Vec<&[f64]> = vec![r.data.as_slice()];
                refs.extend(ins[n..].iter().map(|t| t.data.as_slice()));
                let mut o = vec![0.0; out_shape.iter().product()];
                epilogue.eval_f64(&refs, &mut o);
                Tensor::new(out_shape, o)
            }
            StepKind::MatMul { trans_a, trans_b } => {
                let t = |x: &Tensor, on: bool| {
                    if !on {
                        return x.clone();
                    }
                    let r = x.shape.len();
                    let mut perm: Vec<usize> = (0..r).collect();
                    perm.swap(r - 1, r - 2);
                    let mut s = x.shape.clone();
                    s.swap(r - 1, r - 2);
                    apply(&shardplan_compiler::graph::Op::Transpose { perm }, &[x], &s, env).expect("transpose")
                };
                let (a, b) = (t(&ins[0], *trans_a), t(&ins[1], *trans_b));
                apply(&shardplan_compiler::graph::Op::MatMul, &[&a, &b], &out_shape, env).expect("matmul")
            }
        };
        vals[p.storage(step.output).0 as usize] = Some(out);
    }
    (0..p.buffers.len()).map(|i| vals[p.storage(shardplan_compiler::kernel::BufId(i as u32)).0 as usize].clone().unwrap_or(Tensor::scalar(f64::NAN))).collect()
}

fn same_as_graph(src: &str, int_hi: f64) {
    let c = common::checked(src);
    let (g, p) = common::one_device(&c);
    let fused = p.steps.iter().filter(|s| matches!(s.kind, StepKind::Fused(_))).count();
    assert!(fused > 0 && p.steps.len() < g.len(), "fusion should merge nodes: {} steps for {} nodes", p.steps.len(), g.len());
    let folded = p.steps.iter().filter(|s| matches!(s.kind, StepKind::MatMul { trans_a: true, .. } | StepKind::MatMul { trans_b: true, .. })).count();
    assert!(folded > 0, "backward matmuls read transposes in place");
    let epilogues = p.steps.iter().filter(|s| matches!(s.kind, StepKind::Reduce { .. })).count();
    assert!(epilogues > 0, "reductions carry their element-wise consumers");
    let mut rng = Rng(11);
    let (params, inputs) = values(&c, &mut rng, int_hi);
    let states: Vec<Tensor> = g
        .states
        .iter()
        .map(|s| {
            let sh = shape(&s.ty);
            let n = sh.iter().product();
            Tensor::new(sh, (0..n).map(|_| rng.next() * 0.01).collect())
        })
        .collect();
    let hyper = |h: Hyper| match h {
        Hyper::Lr => 0.05,
        Hyper::BiasCorrection1 => 1.5,
        Hyper::BiasCorrection2 => 1.2,
        Hyper::Step => 0.0,
    };
    let env = Env { inputs: &inputs, params: &params, states: &states, hyper: &hyper };
    let want = run(&g, &env).expect("graph runs");
    let got = execute(&p, &env);
    let close = |a: &[f64], b: &[f64], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{what}: {x} vs {y}");
        }
    };
    close(&got[p.loss.0 as usize].data, &want[g.loss.0 as usize].data, "loss");
    let assigns = g.assigns();
    assert_eq!(assigns.len(), p.assigns.len());
    for ((t, node), (pt, buf)) in assigns.iter().zip(&p.assigns) {
        assert_eq!(t, pt);
        let what = match t {
            Target::Param(i) => format!("param {}", c.model.params[*i].path),
            Target::State(i) => format!("state {}", g.states[*i].name),
        };
        close(&got[buf.0 as usize].data, &want[node.0 as usize].data, &what);
    }
}

#[test]
fn mlp_program_matches_graph() {
    same_as_graph(
        r#"
model Mlp {
  input x: f32[batch, 6]
  input label: i32[batch]
  layer fc1 = Linear(6, 8)
  layer fc2 = Linear(8, 3)
  loss cross_entropy(fc2(relu(fc1(x))), label)
}
data d = synthetic(features: 6, classes: 3)
train { batch: 4, steps: 1, optimizer: sgd(lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0.01), clip_grad_norm: 0.5 }
"#,
        3.0,
    );
}

#[test]
fn transformer_program_matches_graph() {
    same_as_graph(&common::tiny_gpt("adamw(lr: 0.001)", ", clip_grad_norm: 1.0"), 11.0);
}
