//! Whole-model gradient checks: the training graph of small plans (an MLP and
//! a transformer) against central finite differences of the loss, in f64
//! through the reference interpreter; and one optimizer step against the
//! update written out by hand.

use shardplan_compiler::graph::{Hyper, Target};
use shardplan_compiler::interp::{run, Env, Tensor};

mod common;
use common::{checked, shape, training_graph, values, Rng};

/// Every node's value of `g` on `inputs` and `params`, with zero optimizer
/// state, every hyper-parameter 0.01 but the step (3), and, where dropout
/// reads the samples' data-set indices (an input after the model's), 7, 8, ….
fn values_of(g: &shardplan_compiler::graph::Graph, inputs: &[Tensor], params: &[Tensor]) -> Vec<Tensor> {
    let states: Vec<Tensor> = g.states.iter().map(|s| Tensor::zeros(&shape(&s.ty))).collect();
    let hyper = |h: Hyper| if h == Hyper::Step { 3.0 } else { 0.01 };
    let mut inputs = inputs.to_vec();
    for id in g.ids() {
        if let shardplan_compiler::graph::Op::Input(k) = g.node(id).op {
            if k == inputs.len() {
                let rows = shape(&g.node(id).ty);
                inputs.push(Tensor::new(rows.clone(), (0..rows[0]).map(|r| (r + 7) as f64).collect()));
            }
        }
    }
    let env = Env { inputs: &inputs, params, states: &states, hyper: &hyper };
    run(g, &env).expect("runs")
}

fn grad_check(src: &str, int_hi: f64) {
    let c = checked(src);
    // The driver verifies the graph's invariants.
    let g = training_graph(&c);
    let mut rng = Rng(7);
    let (mut params, inputs) = values(&c, &mut rng, int_hi);
    let loss = |params: &[Tensor]| values_of(&g, &inputs, params)[g.loss.0 as usize].data[0];
    let vals = values_of(&g, &inputs, &params);
    assert_eq!(g.grads.len(), c.model.params.len(), "every parameter has a gradient");
    for (pi, p) in c.model.params.iter().enumerate() {
        let gnode = g.grads[&pi];
        let analytic = vals[gnode.0 as usize].data.clone();
        let n = params[pi].len();
        // A few elements per parameter, spread over it.
        for k in [0, n / 3, n / 2, n - 1] {
            let orig = params[pi].data[k];
            let h = 1e-6;
            params[pi].data[k] = orig + h;
            let up = loss(&params);
            params[pi].data[k] = orig - h;
            let down = loss(&params);
            params[pi].data[k] = orig;
            let numeric = (up - down) / (2.0 * h);
            let err = (numeric - analytic[k]).abs() / numeric.abs().max(analytic[k].abs()).max(1e-4);
            assert!(err < 1e-4, "{}[{k}]: analytic {} vs numeric {numeric} (rel err {err:e})", p.path, analytic[k]);
        }
    }
}

#[test]
fn llama_layers_gradients_match_finite_differences() {
    // RMSNorm and the SwiGLU MLP (silu and rms_norm are chains of primitives).
    grad_check(
        r#"
model Gated {
  input x: f32[batch, 6]
  input label: i32[batch]
  layer norm = RMSNorm(6, eps: 1e-5)
  layer mlp = SwiGLU(6, 10)
  layer out = Linear(6, 3)
  loss cross_entropy(out(norm(x) + mlp(norm(x))), label)
}
data d = synthetic(features: 6, classes: 3)
train { batch: 4, steps: 1, optimizer: sgd(lr: 0.1) }
"#,
        3.0,
    );
}

/// `rms_norm` and `silu` compute their formulas: the interpreter's values
/// against the formulas written out here, in f64, on random inputs.
#[test]
fn rms_norm_and_silu_compute_their_formulas() {
    let c = checked(
        r#"
model M {
  input x: f32[batch, 5]
  input label: i32[batch]
  layer norm = RMSNorm(5, eps: 0.001)
  loss mse(silu(norm(x)), x)
}
data d = synthetic(features: 5, classes: 2)
train { batch: 3, steps: 1, optimizer: sgd(lr: 0.1) }
"#,
    );
    let g = training_graph(&c);
    let mut rng = Rng(11);
    let (params, inputs) = values(&c, &mut rng, 2.0);
    let got = values_of(&g, &inputs, &params)[g.loss.0 as usize].data[0];
    let (x, gamma) = (&inputs[0].data, &params[0].data);
    let mut sum = 0.0;
    for row in x.chunks(5) {
        let rms = (row.iter().map(|v| v * v).sum::<f64>() / 5.0 + 0.001).sqrt();
        for (j, v) in row.iter().enumerate() {
            let y = v / rms * gamma[j];
            let s = y / (1.0 + (-y).exp());
            sum += (s - v).powi(2);
        }
    }
    let expected = sum / x.len() as f64;
    assert!((got - expected).abs() <= 1e-12 * expected.abs().max(1.0), "{got} against {expected}");
}

/// A model of one attention layer with `kv` key/value heads of `heads`, causal or not.
fn attention_model(heads: usize, kv: usize, causal: bool) -> String {
    let call = if causal { "causal_attention" } else { "attention" };
    format!(
        r#"
layer Attn(d, heads, kv) {{
  param wq: f32[d, d] = glorot_uniform
  param wk: f32[d, d / heads * kv] = glorot_uniform
  param wv: f32[d, d / heads * kv] = glorot_uniform
  forward(x) = {call}(x @ wq, x @ wk, x @ wv, heads: heads, kv_heads: kv)
}}
model M {{
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(11, 8)
  layer attn = Attn(8, {heads}, {kv})
  layer head = Linear(8, 11)
  loss cross_entropy(head(attn(embed(tokens))), targets)
}}
data corpus = text("t.txt")
train {{ batch: 2, seq: 5, steps: 1, optimizer: sgd(lr: 0.1) }}
"#
    )
}

#[test]
fn grouped_query_attention_gradients_match_finite_differences() {
    for causal in [true, false] {
        grad_check(&attention_model(4, 2, causal), 11.0);
        grad_check(&attention_model(4, 1, causal), 11.0);
    }
    // Non-causal attention with as many key/value heads as heads.
    grad_check(&attention_model(2, 2, false), 11.0);
}

/// Grouped-query attention is attention whose key and value heads are
/// shared: with each key/value head's columns repeated for its group, the
/// same model with as many key/value heads as heads gives the same loss.
#[test]
fn grouped_query_attention_equals_attention_with_repeated_heads() {
    let (heads, kv, d) = (4usize, 2usize, 8usize);
    let (dh, group) = (d / heads, heads / kv);
    for causal in [true, false] {
        // The same tokens for both models; the parameters given, or drawn.
        let loss = |src: &str, given: Option<(&[Tensor], &[Tensor])>| {
            let c = checked(src);
            let g = training_graph(&c);
            let mut rng = Rng(5);
            let (own, own_inputs) = values(&c, &mut rng, 11.0);
            let (params, inputs) = given.map(|(p, i)| (p.to_vec(), i.to_vec())).unwrap_or((own, own_inputs));
            (values_of(&g, &inputs, &params)[g.loss.0 as usize].data[0], params, inputs)
        };
        let (grouped, params, inputs) = loss(&attention_model(heads, kv, causal), None);
        // Params in order: embed.table, attn.wq, attn.wk, attn.wv, head.w, head.b.
        let repeat = |t: &Tensor| {
            let rows = t.shape[0];
            let mut out = Vec::with_capacity(rows * d);
            for r in 0..rows {
                for h in 0..heads {
                    let j = h / group;
                    out.extend_from_slice(&t.data[r * kv * dh + j * dh..r * kv * dh + (j + 1) * dh]);
                }
            }
            Tensor::new(vec![rows, d], out)
        };
        let mut full = params.clone();
        full[2] = repeat(&params[2]);
        full[3] = repeat(&params[3]);
        let (plain, _, _) = loss(&attention_model(heads, heads, causal), Some((&full, &inputs)));
        assert!((grouped - plain).abs() <= 1e-12 * plain.abs(), "causal {causal}: {grouped} grouped, {plain} with repeated heads");
    }
}

#[test]
fn llama_block_gradients_match_finite_differences() {
    // RMSNorm, rotary grouped-query attention and SwiGLU, tied embeddings.
    grad_check(
        r#"
model M {
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(11, 8)
  layer block = LlamaBlock(8, 2, 1, hidden: 12, base: 100)
  layer norm = RMSNorm(8)
  loss cross_entropy(norm(block(embed(tokens))) @ transpose(embed.table), targets)
}
data corpus = text("t.txt")
train { batch: 2, seq: 5, steps: 1, optimizer: sgd(lr: 0.1) }
"#,
        11.0,
    );
}

/// `rope` turns each head's pairs as complex numbers: x₂ᵢ + i·x₂ᵢ₊₁ times
/// e^(i·pos·base^(-2i/head_dim)), written out here against the interpreter.
#[test]
fn rope_computes_its_formula() {
    let c = checked(
        r#"
model M {
  input x: f32[batch, 8]
  input label: i32[batch]
  loss mse(reshape(rope(reshape(x, [1, batch, 8]), heads: 2, base: 50), [batch, 8]), x)
}
data d = synthetic(features: 8, classes: 2)
train { batch: 4, steps: 1, optimizer: sgd(lr: 0.1) }
"#,
    );
    let g = training_graph(&c);
    let mut rng = Rng(13);
    let (params, inputs) = values(&c, &mut rng, 2.0);
    let got = values_of(&g, &inputs, &params)[g.loss.0 as usize].data[0];
    let x = &inputs[0].data;
    let mut sum = 0.0;
    for (pos, row) in x.chunks(8).enumerate() {
        for head in row.chunks(4) {
            for (i, pair) in head.chunks(2).enumerate() {
                let angle = pos as f64 * 50f64.powf(-(2.0 * i as f64) / 4.0);
                let (c, s) = (angle.cos(), angle.sin());
                let (re, im) = (pair[0] * c - pair[1] * s, pair[0] * s + pair[1] * c);
                sum += (re - pair[0]).powi(2) + (im - pair[1]).powi(2);
            }
        }
    }
    let expected = sum / x.len() as f64;
    assert!(expected > 1e-3, "the rotation moved the inputs");
    assert!((got - expected).abs() <= 1e-12 * expected.abs().max(1.0), "{got} against {expected}");
}

#[test]
fn cnn_gradients_match_finite_differences() {
    // Convolutions with stride and padding, a residual block, max and average pooling.
    grad_check(
        r#"
model M {
  input x: f32[batch, 2, 6, 6]
  input label: i32[batch]
  layer conv1 = Conv2d(2, 3, 3, padding: 1)
  layer res = ResidualBlock(3)
  layer pool = MaxPool2d(2)
  layer conv2 = Conv2d(3, 4, 2, stride: 2, padding: 1)
  layer out = Linear(36, 3)
  loss cross_entropy(out(reshape(avg_pool2d(conv2(pool(res(relu(conv1(x))))), kernel: 2, stride: 1, padding: 1), [batch, 36])), label)
}
data d = synthetic(features: 72, classes: 3)
train { batch: 3, steps: 1, optimizer: sgd(lr: 0.1) }
"#,
        3.0,
    );
}

/// conv2d and the pools compute their definitions, written out here as
/// loops over the windows, against the interpreter: the loss is the mean
/// square of `pool(conv(x))` for each pool.
#[test]
fn conv2d_and_pools_compute_their_formulas() {
    // (pool call, k, stride, padding, max)
    for (call, k, st, p, max) in [
        ("max_pool2d(y, kernel: 2, stride: 1)", 2i64, 1i64, 0i64, true),
        ("avg_pool2d(y, kernel: 3, padding: 1)", 3, 3, 1, false),
        ("max_pool2d(y, kernel: 3, padding: 1, stride: 1)", 3, 1, 1, true),
        ("y", 1, 1, 0, true),
    ] {
        let c = checked(&format!(
            r#"
layer C(in, out, k) {{
  param w: f32[out, in, k, k] = glorot_uniform
  forward(x) {{
    let y = conv2d(x, w, stride: 2, padding: 1)
    let z = {call}
    return z * z
  }}
}}
model M {{
  input x: f32[batch, 2, 5, 5]
  input label: i32[batch]
  layer conv = C(2, 3, 3)
  loss mean(conv(x))
}}
data d = synthetic(features: 50, classes: 2)
train {{ batch: 2, steps: 1, optimizer: sgd(lr: 0.1) }}
"#
        ));
        let g = training_graph(&c);
        let mut rng = Rng(17);
        let (params, inputs) = values(&c, &mut rng, 2.0);
        let got = values_of(&g, &inputs, &params)[g.loss.0 as usize].data[0];
        let (x, w) = (&inputs[0].data, &params[0].data);
        let at = |t: &[f64], dims: [usize; 4], i: [i64; 4]| -> Option<f64> {
            (0..4)
                .all(|k| i[k] >= 0 && (i[k] as usize) < dims[k])
                .then(|| t[((i[0] as usize * dims[1] + i[1] as usize) * dims[2] + i[2] as usize) * dims[3] + i[3] as usize])
        };
        // conv: [2, 2, 5, 5] ⊛ [3, 2, 3, 3], stride 2, padding 1 → [2, 3, 3, 3].
        let mut y = vec![0.0; 2 * 3 * 3 * 3];
        for n in 0..2 {
            for o in 0..3 {
                for i in 0..3 {
                    for j in 0..3 {
                        let mut s = 0.0;
                        for ch in 0..2 {
                            for a in 0..3 {
                                for b in 0..3 {
                                    let v = at(x, [2, 2, 5, 5], [n, ch, 2 * i + a - 1, 2 * j + b - 1]).unwrap_or(0.0);
                                    s += v * w[((o as usize * 2 + ch as usize) * 3 + a as usize) * 3 + b as usize];
                                }
                            }
                        }
                        y[((n as usize * 3 + o) * 3 + i as usize) * 3 + j as usize] = s;
                    }
                }
            }
        }
        // The pool: max with −∞ padding, or the mean counting the zero padding.
        let o = (3 + 2 * p - k) / st + 1;
        let mut sum = 0.0;
        for n in 0..2 {
            for ch in 0..3 {
                for i in 0..o {
                    for j in 0..o {
                        let vals: Vec<f64> = (0..k)
                            .flat_map(|a| (0..k).map(move |b| (a, b)))
                            .map(|(a, b)| at(&y, [2, 3, 3, 3], [n, ch, i * st + a - p, j * st + b - p]).unwrap_or(if max { f64::NEG_INFINITY } else { 0.0 }))
                            .collect();
                        let v = if max { vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max) } else { vals.iter().sum::<f64>() / vals.len() as f64 };
                        sum += v * v;
                    }
                }
            }
        }
        let expected = sum / (2 * 3 * o * o) as f64;
        assert!(expected > 1e-3, "{call}: the convolution is not zero");
        assert!((got - expected).abs() <= 1e-12 * expected.abs().max(1.0), "{call}: {got} against {expected}");
    }
}

#[test]
fn dropout_gradients_match_finite_differences() {
    // The same mask in the backward pass as in the forward pass.
    grad_check(
        r#"
model M {
  input x: f32[batch, 6]
  input label: i32[batch]
  layer fc1 = Linear(6, 12)
  layer fc2 = Linear(12, 3)
  loss cross_entropy(fc2(dropout(relu(fc1(dropout(x, p: 0.3))), p: 0.5)), label)
}
data d = synthetic(features: 6, classes: 3)
train { batch: 4, steps: 1, optimizer: sgd(lr: 0.1) }
"#,
        3.0,
    );
}

#[test]
fn mlp_gradients_match_finite_differences() {
    grad_check(
        r#"
model Mlp {
  input x: f32[batch, 6]
  input label: i32[batch]
  layer fc1 = Linear(6, 8)
  layer fc2 = Linear(8, 3)
  loss cross_entropy(fc2(tanh(fc1(x))), label) + 0.01 * mean(fc1.w * fc1.w)
}
data d = synthetic(features: 6, classes: 3)
train { batch: 4, steps: 1, optimizer: sgd(lr: 0.1) }
"#,
        3.0,
    );
}

#[test]
fn transformer_gradients_match_finite_differences() {
    grad_check(&common::tiny_gpt("adamw(lr: 0.001)", ""), 11.0);
}

/// One step of each optimizer on `loss = cross_entropy(x @ w, label)`, against the update
/// written out by hand from the same gradient.
#[test]
fn optimizer_updates_follow_their_definitions() {
    for (opt, clip) in [
        ("sgd(lr: 0.1)", None),
        ("sgd(lr: 0.1, momentum: 0.9, weight_decay: 0.01)", None),
        ("sgd(lr: 0.1, momentum: 0.9, nesterov: true)", Some(0.05)),
        ("adam(lr: 0.01, weight_decay: 0.1)", None),
        ("adamw(lr: 0.01, weight_decay: 0.1)", Some(0.01)),
    ] {
        let clip_line = clip.map(|c| format!("clip_grad_norm: {c}")).unwrap_or_default();
        let src = format!(
            r#"
layer Lin(i, o) {{ param w: f32[i, o] = zeros  forward(x) = x @ w }}
model M {{
  input x: f32[batch, 3]
  input label: i32[batch]
  layer f = Lin(3, 2)
  loss cross_entropy(f(x), label)
}}
data d = synthetic(features: 3, classes: 2)
train {{ batch: 4, steps: 1, optimizer: {opt}, {clip_line} }}
"#
        );
        let c = checked(&src);
        let g = training_graph(&c);
        let mut rng = Rng(3);
        let (params, inputs) = values(&c, &mut rng, 2.0);
        // Non-zero state, as after some steps.
        let states: Vec<Tensor> = g.states.iter().map(|s| Tensor::new(shape(&s.ty), (0..6).map(|_| rng.next() * 0.1).collect())).collect();
        let (lr, bc1, bc2) = (0.1_f64, 1.0 / (1.0 - 0.9_f64.powi(3)), 1.0 / (1.0 - 0.999_f64.powi(3)).sqrt());
        let lr = if opt.starts_with("sgd") { lr } else { 0.01 };
        let hyper = move |h: Hyper| match h {
            Hyper::Lr => lr,
            Hyper::BiasCorrection1 => bc1,
            Hyper::BiasCorrection2 => bc2,
            Hyper::Step => 0.0,
        };
        let env = Env { inputs: &inputs, params: &params, states: &states, hyper: &hyper };
        let vals = run(&g, &env).expect("runs");
        let grad = &vals[g.grads[&0].0 as usize].data;
        let norm = grad.iter().map(|v| v * v).sum::<f64>().sqrt();
        let scale = clip.map(|m| (m / (norm + 1e-6)).min(1.0)).unwrap_or(1.0);
        let p = &params[0].data;
        let assigned = |t: Target| g.assigns().into_iter().find(|(x, _)| *x == t).map(|(_, n)| vals[n.0 as usize].data.clone()).expect("assigned");
        let new_p = assigned(Target::Param(0));
        for k in 0..6 {
            let gk = grad[k] * scale;
            let want = match opt {
                "sgd(lr: 0.1)" => p[k] - lr * gk,
                o if o.contains("nesterov") => {
                    let buf = 0.9 * states[0].data[k] + gk;
                    p[k] - lr * (gk + 0.9 * buf)
                }
                o if o.starts_with("sgd") => {
                    let d = gk + 0.01 * p[k];
                    let buf = 0.9 * states[0].data[k] + d;
                    p[k] - lr * buf
                }
                o => {
                    let decoupled = o.starts_with("adamw");
                    let d = if decoupled { gk } else { gk + 0.1 * p[k] };
                    let m = 0.9 * states[0].data[k] + 0.1 * d;
                    let v = 0.999 * states[1].data[k] + 0.001 * d * d;
                    let base = if decoupled { p[k] * (1.0 - lr * 0.1) } else { p[k] };
                    base - lr * bc1 * m / (v.sqrt() * bc2 + 1e-8)
                }
            };
            assert!((new_p[k] - want).abs() < 1e-12, "{opt}: param[{k}] {} vs {want}", new_p[k]);
        }
    }
}

/// A batch smaller than the weights: the input gradient of a linear layer is
/// then computed as (W · dYᵀ)ᵀ; it must still match finite differences.
#[test]
fn small_batch_input_gradients_match_finite_differences() {
    grad_check(
        r#"
model Wide {
  input x: f32[batch, 6]
  input label: i32[batch]
  layer fc1 = Linear(6, 12)
  layer fc2 = Linear(12, 10)
  layer fc3 = Linear(10, 5)
  loss cross_entropy(fc3(tanh(fc2(tanh(fc1(x))))), label)
}
data d = synthetic(features: 6, classes: 5)
train { batch: 2, steps: 1, optimizer: sgd(lr: 0.1) }
"#,
        5.0,
    );
}
