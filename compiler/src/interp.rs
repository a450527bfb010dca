//! The reference interpreter: evaluates a [`Graph`] in f64, plainly.
//!
//! It exists to test everything else against: autodiff against finite
//! differences, generated kernels against it on random inputs, every
//! placement against the single-device run. It favours obviousness over
//! speed: every op is a direct loop over multi-indices.
//!
//! Input: a [`Graph`] and the values of its sources ([`Env`]). Output: the
//! value of every node, or an [`InterpError`] naming the node that could not
//! be evaluated (an operand count its op does not take, an index outside
//! its table, an op that runs only in a device program) or whose value has
//! another shape than its type.

use crate::graph::{Graph, Hyper, NodeId, Op};

/// A dense row-major tensor of f64 (integers are stored exactly).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Tensor {
        Tensor { shape, data }
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }

    pub fn scalar(x: f64) -> Tensor {
        Tensor { shape: Vec::new(), data: vec![x] }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Values of the graph's sources for one evaluation.
pub struct Env<'a> {
    pub inputs: &'a [Tensor],
    pub params: &'a [Tensor],
    pub states: &'a [Tensor],
    pub hyper: &'a dyn Fn(Hyper) -> f64,
}

/// Why the interpreter could not evaluate a graph or an op.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InterpError {
    /// Evaluating node `node` failed (`error` says why).
    #[error("node {} ({op}): {error}", .node.0)]
    At { node: NodeId, op: String, error: Box<InterpError> },
    /// A node's value has another shape than its type.
    #[error("node {} ({op}) produced shape {got:?}, its type says {want:?}", .node.0)]
    Shape { node: NodeId, op: String, got: Vec<usize>, want: Vec<usize> },
    /// The environment has no input, param or state `index`.
    #[error("no {what} {index}")]
    Missing { what: &'static str, index: usize },
    /// An op given another number of operands than it takes.
    #[error("{op} takes {want} operands, got {got}")]
    Arity { op: String, want: usize, got: usize },
    /// An unpack that reads past the end of its operand.
    #[error("unpack of {len} at {offset} from {from} elements")]
    Unpack { len: usize, offset: usize, from: usize },
    /// A transfer or collective: only a device program runs them.
    #[error("{op} runs only in a device program")]
    DeviceOnly { op: String },
    /// An index or label (`what`) outside `0..n`.
    #[error("{what} {value} is outside 0..{n}")]
    OutOfRange { what: &'static str, value: f64, n: usize },
}

/// Evaluates every node; returns the value of each, indexed by node id.
pub fn run(g: &Graph, env: &Env<'_>) -> Result<Vec<Tensor>, InterpError> {
    let mut vals: Vec<Tensor> = Vec::with_capacity(g.len());
    for id in g.ids() {
        let v = eval(g, id, &vals, env).map_err(|e| InterpError::At { node: id, op: g.node(id).op.name(), error: Box::new(e) })?;
        let want: Vec<usize> = g.node(id).ty.shape.iter().map(|d| d.size as usize).collect();
        if v.shape != want {
            return Err(InterpError::Shape { node: id, op: g.node(id).op.name(), got: v.shape, want });
        }
        vals.push(v);
    }
    Ok(vals)
}

fn shape_of(g: &Graph, id: NodeId) -> Vec<usize> {
    g.node(id).ty.shape.iter().map(|d| d.size as usize).collect()
}

fn eval(g: &Graph, id: NodeId, vals: &[Tensor], env: &Env<'_>) -> Result<Tensor, InterpError> {
    let out = shape_of(g, id);
    let a: Vec<&Tensor> = g.args(id).iter().map(|x| &vals[x.0 as usize]).collect();
    apply(&g.node(id).op, &a, &out, env)
}

/// Applies one op to operand values; `out` is the result's shape.
pub fn apply(op: &Op, a: &[&Tensor], out: &[usize], env: &Env<'_>) -> Result<Tensor, InterpError> {
    let out = out.to_vec();
    let get = |src: &[Tensor], index: usize, what: &'static str| src.get(index).cloned().ok_or(InterpError::Missing { what, index });
    if a.len() != op.arity() {
        return Err(InterpError::Arity { op: op.name(), want: op.arity(), got: a.len() });
    }
    Ok(match op {
        Op::Input(i) => get(env.inputs, *i, "input")?,
        Op::Param(i) => get(env.params, *i, "param")?,
        Op::State(i) => get(env.states, *i, "state")?,
        Op::Hyper(h) => Tensor::scalar((env.hyper)(*h)),
        Op::Const(c) => Tensor::scalar(*c),
        Op::Add => zip(&out, a[0], a[1], |x, y| x + y),
        Op::Sub => zip(&out, a[0], a[1], |x, y| x - y),
        Op::Mul => zip(&out, a[0], a[1], |x, y| x * y),
        Op::Div => zip(&out, a[0], a[1], |x, y| x / y),
        Op::Neg => map(a[0], |x| -x),
        Op::Relu => map(a[0], |x| x.max(0.0)),
        Op::Gelu => map(a[0], gelu),
        Op::Tanh => map(a[0], f64::tanh),
        Op::Sigmoid => map(a[0], |x| 1.0 / (1.0 + (-x).exp())),
        Op::Exp => map(a[0], f64::exp),
        Op::Log => map(a[0], f64::ln),
        Op::Sqrt => map(a[0], f64::sqrt),
        Op::ReluGrad => zip(&out, a[0], a[1], |x, dy| if x > 0.0 { dy } else { 0.0 }),
        Op::GeluGrad => zip(&out, a[0], a[1], |x, dy| dy * gelu_grad(x)),
        Op::ClipScale { max_norm } => map(a[0], |n| (max_norm / (n + 1e-6)).min(1.0)),
        Op::MatMul => matmul(&out, a[0], a[1]),
        Op::Reshape => Tensor::new(out, a[0].data.clone()),
        Op::Transpose { perm } => transpose(a[0], perm),
        Op::Sum { axes, .. } => reduce(a[0], axes, &out, 0.0, |acc, x| acc + x),
        Op::Mean { axes, .. } => {
            let n: usize = axes.iter().map(|&ax| a[0].shape[ax]).product();
            let mut t = reduce(a[0], axes, &out, 0.0, |acc, x| acc + x);
            t.data.iter_mut().for_each(|x| *x /= n.max(1) as f64);
            t
        }
        Op::Max { axes, .. } => reduce(a[0], axes, &out, f64::NEG_INFINITY, f64::max),
        Op::MaxGrad { axes, .. } => {
            // Count ties per reduced position, then share dy among them.
            let x = a[0];
            let ones = zip(&x.shape, x, &expand(a[1], axes, &x.shape), |xv, yv| if xv == yv { 1.0 } else { 0.0 });
            let count = reduce(&ones, axes, &a[1].shape, 0.0, |acc, v| acc + v);
            let dy = expand(a[2], axes, &x.shape);
            let cnt = expand(&count, axes, &x.shape);
            let mut t = zip(&x.shape, &ones, &dy, |m, d| m * d);
            t.data.iter_mut().zip(&cnt.data).for_each(|(v, c)| *v /= c.max(1.0));
            t
        }
        Op::SumTo => sum_to(a[0], &out),
        Op::Expand { axes, .. } => expand(a[0], axes, &out),
        Op::Softmax { axis } => softmax(a[0], *axis, false),
        Op::LogSoftmax { axis } => softmax(a[0], *axis, true),
        Op::SoftmaxGrad { axis } => {
            // dx = y · (dy − Σ dy·y)
            let (y, dy) = (a[0], a[1]);
            let prod = zip(&y.shape, y, dy, |p, q| p * q);
            let s = expand(&reduce(&prod, &[*axis], &keep_shape(&y.shape, *axis), 0.0, |acc, v| acc + v), &[*axis], &y.shape);
            let t = zip(&y.shape, dy, &s, |d, sv| d - sv);
            zip(&y.shape, y, &t, |p, q| p * q)
        }
        Op::LogSoftmaxGrad { axis } => {
            // dx = dy − exp(y) · Σ dy
            let (y, dy) = (a[0], a[1]);
            let s = expand(&reduce(dy, &[*axis], &keep_shape(&y.shape, *axis), 0.0, |acc, v| acc + v), &[*axis], &y.shape);
            let e = map(y, f64::exp);
            let t = zip(&y.shape, &e, &s, |p, q| p * q);
            zip(&y.shape, dy, &t, |d, v| d - v)
        }
        Op::LayerNorm { eps } => layer_norm(a[0], a[1], Some(a[2]), *eps),
        Op::LayerNormGradX { eps } => layer_norm_grad_x(a[0], a[1], a[2], *eps, false),
        Op::LayerNormGradGamma { eps } => layer_norm_grad_gamma(a[0], a[1], *eps, false),
        Op::RmsNorm { eps } => layer_norm(a[0], a[1], None, *eps),
        Op::RmsNormGradX { eps } => layer_norm_grad_x(a[0], a[1], a[2], *eps, true),
        Op::RmsNormGradGamma { eps } => layer_norm_grad_gamma(a[0], a[1], *eps, true),
        Op::CausalMask { fill } => causal_mask(a[0], *fill),
        // Values are f64 here: a bf16 value is the f64 of its bits.
        Op::ToBf16 => map(a[0], |x| crate::graph::from_bf16(crate::graph::to_bf16(x as f32)) as f64),
        Op::FromBf16 => a[0].clone(),
        Op::Dropout { p, seed } => dropout(a[0], a[1], a[2].data.first().copied().unwrap_or(0.0), *p, *seed),
        Op::Im2Col { kh, kw, stride, padding, fill } => im2col(a[0], *kh, *kw, *stride, *padding, *fill, &out),
        Op::Col2Im { kh, kw, stride, padding } => col2im(a[0], *kh, *kw, *stride, *padding, &out),
        Op::Rope { head_dim, base, inverse } => rope(a[0], *head_dim, *base, *inverse),
        Op::Embedding => embedding(a[0], a[1])?,
        Op::EmbeddingGrad => embedding_grad(a[0], a[1], &out)?,
        Op::CrossEntropy => cross_entropy(a[0], a[1], None)?,
        Op::CrossEntropyGrad => cross_entropy(a[0], a[1], Some(a[2].data[0]))?,
        Op::Mse => {
            let n = a[0].len().max(1) as f64;
            Tensor::scalar(a[0].data.iter().zip(&a[1].data).map(|(p, t)| (p - t) * (p - t)).sum::<f64>() / n)
        }
        Op::MseGrad => {
            let n = a[0].len().max(1) as f64;
            let dl = a[2].data[0];
            map(&zip(&a[0].shape, a[0], a[1], |p, t| p - t), |d| 2.0 * d / n * dl)
        }
        Op::Assign(_) | Op::Accumulate(_) => a[0].clone(),
        Op::Slice { dim, start } => slice(a[0], *dim, *start, &out),
        Op::Pack { .. } => Tensor::new(out, a.iter().flat_map(|t| t.data.iter().copied()).collect()),
        Op::Unpack { offset } => {
            let n: usize = out.iter().product();
            let data = a[0].data.get(*offset..offset + n).ok_or(InterpError::Unpack { len: n, offset: *offset, from: a[0].len() })?;
            Tensor::new(out, data.to_vec())
        }
        Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::Send { .. }
        | Op::Recv { .. }
        | Op::Accumulated(_) => return Err(InterpError::DeviceOnly { op: op.name() }),
    })
}

/// The part of `x` starting at `start` along `dim`, of shape `out`.
pub fn slice(x: &Tensor, dim: usize, start: usize, out: &[usize]) -> Tensor {
    let outer: usize = out[..dim].iter().product();
    let inner: usize = out[dim + 1..].iter().product();
    let (len, full) = (out[dim], x.shape[dim]);
    let mut data = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = (o * full + start) * inner;
        data.extend_from_slice(&x.data[base..base + len * inner]);
    }
    Tensor::new(out.to_vec(), data)
}

/// GELU, tanh approximation (as GPT-2 and PyTorch's `approximate="tanh"`).
pub fn gelu(x: f64) -> f64 {
    const C: f64 = 0.797_884_560_802_865_4; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

pub fn gelu_grad(x: f64) -> f64 {
    const C: f64 = 0.797_884_560_802_865_4;
    let u = C * (x + 0.044715 * x * x * x);
    let t = u.tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * x * x)
}

fn map(x: &Tensor, f: impl Fn(f64) -> f64) -> Tensor {
    Tensor::new(x.shape.clone(), x.data.iter().map(|v| f(*v)).collect())
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Flat index into `src` (right-aligned, broadcast) for each flat index of `out`.
fn broadcast_index(out: &[usize], src: &[usize]) -> Vec<usize> {
    let n: usize = out.iter().product();
    let so = strides(out);
    let ss = strides(src);
    let off = out.len() - src.len();
    (0..n)
        .map(|flat| {
            let mut idx = 0;
            for (k, &st) in so.iter().enumerate() {
                let i = (flat / st) % out[k].max(1);
                if k >= off && src[k - off] != 1 {
                    idx += i * ss[k - off];
                }
            }
            idx
        })
        .collect()
}

fn zip(out: &[usize], a: &Tensor, b: &Tensor, f: impl Fn(f64, f64) -> f64) -> Tensor {
    let ia = broadcast_index(out, &a.shape);
    let ib = broadcast_index(out, &b.shape);
    Tensor::new(out.to_vec(), ia.iter().zip(&ib).map(|(i, j)| f(a.data[*i], b.data[*j])).collect())
}

fn matmul(out: &[usize], a: &Tensor, b: &Tensor) -> Tensor {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
    let batch: Vec<usize> = out[..out.len() - 2].to_vec();
    let nb: usize = batch.iter().product();
    // Map each output batch index to the operands' batch offsets.
    let ia = broadcast_index(&batch, &a.shape[..ra - 2]);
    let ib = broadcast_index(&batch, &b.shape[..rb - 2]);
    let mut data = vec![0.0; nb * m * n];
    for bi in 0..nb {
        let (oa, ob, oo) = (ia[bi] * m * k, ib[bi] * k * n, bi * m * n);
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    acc += a.data[oa + i * k + p] * b.data[ob + p * n + j];
                }
                data[oo + i * n + j] = acc;
            }
        }
    }
    Tensor::new(out.to_vec(), data)
}

fn transpose(x: &Tensor, perm: &[usize]) -> Tensor {
    let out: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let sx = strides(&x.shape);
    let so = strides(&out);
    let n = x.len();
    let mut data = vec![0.0; n];
    for (flat, slot) in data.iter_mut().enumerate() {
        let mut src = 0;
        for (k, &st) in so.iter().enumerate() {
            let i = (flat / st) % out[k].max(1);
            src += i * sx[perm[k]];
        }
        *slot = x.data[src];
    }
    Tensor::new(out, data)
}

/// Reduces `axes` of x; `out` is the node's shape (with or without kept dims).
fn reduce(x: &Tensor, axes: &[usize], out: &[usize], init: f64, f: impl Fn(f64, f64) -> f64) -> Tensor {
    let kept: Vec<usize> = x.shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let n: usize = kept.iter().product();
    let mut data = vec![init; n];
    let sx = strides(&x.shape);
    let sk = strides(&kept);
    for flat in 0..x.len() {
        let mut dst = 0;
        for (k, &st) in sx.iter().enumerate() {
            let i = (flat / st) % x.shape[k].max(1);
            if !axes.contains(&k) {
                dst += i * sk[k];
            }
        }
        data[dst] = f(data[dst], x.data[flat]);
    }
    Tensor::new(out.to_vec(), data)
}

/// Shape of x with `axis` set to 1.
fn keep_shape(shape: &[usize], axis: usize) -> Vec<usize> {
    shape.iter().enumerate().map(|(i, &d)| if i == axis { 1 } else { d }).collect()
}

/// Broadcasts `x` (right-aligned, numpy rules) to `out`.
pub fn broadcast(x: &Tensor, out: &[usize]) -> Tensor {
    let idx = broadcast_index(out, &x.shape);
    Tensor::new(out.to_vec(), idx.iter().map(|&i| x.data[i]).collect())
}

/// Broadcasts a reduction result (over `axes` of `out`) back to `out`.
fn expand(y: &Tensor, axes: &[usize], out: &[usize]) -> Tensor {
    let kept: Vec<usize> = out.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let y = Tensor::new(kept.clone(), y.data.clone());
    let idx = broadcast_index(out, &kept);
    Tensor::new(out.to_vec(), idx.iter().map(|&i| y.data[i]).collect())
}

/// Sums x over the dims broadcasting added, down to `out`.
fn sum_to(x: &Tensor, out: &[usize]) -> Tensor {
    let idx = broadcast_index(&x.shape, out);
    let mut data = vec![0.0; out.iter().product()];
    for (flat, &dst) in idx.iter().enumerate() {
        data[dst] += x.data[flat];
    }
    Tensor::new(out.to_vec(), data)
}

fn softmax(x: &Tensor, axis: usize, log: bool) -> Tensor {
    let keep = keep_shape(&x.shape, axis);
    let mx = expand(&reduce(x, &[axis], &keep, f64::NEG_INFINITY, f64::max), &[axis], &x.shape);
    let e = zip(&x.shape, x, &mx, |v, m| if m == f64::NEG_INFINITY { 0.0 } else { (v - m).exp() });
    let s = expand(&reduce(&e, &[axis], &keep, 0.0, |a, v| a + v), &[axis], &x.shape);
    if log {
        let lse = zip(&x.shape, &mx, &s, |m, sv| m + sv.ln());
        zip(&x.shape, x, &lse, |v, l| v - l)
    } else {
        zip(&x.shape, &e, &s, |v, sv| v / sv)
    }
}

fn rows(x: &Tensor) -> (usize, usize) {
    let d = x.shape.last().copied().unwrap_or(1).max(1);
    (x.len() / d, d)
}

/// A row's mean (0 for RMS norm) and 1/√(variance + eps) (of the mean square for RMS norm).
fn norm_stats(row: &[f64], eps: f64, rms: bool) -> (f64, f64) {
    let n = row.len().max(1) as f64;
    let mu = if rms { 0.0 } else { row.iter().sum::<f64>() / n };
    let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / n;
    (mu, 1.0 / (var + eps).sqrt())
}

/// Layer norm (x, gamma, beta), or RMS norm (x, gamma) when `beta` is None.
fn layer_norm(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>, eps: f64) -> Tensor {
    let (r, d) = rows(x);
    let mut out = vec![0.0; x.len()];
    for i in 0..r {
        let row = &x.data[i * d..(i + 1) * d];
        let (mu, rstd) = norm_stats(row, eps, beta.is_none());
        for j in 0..d {
            out[i * d + j] = (row[j] - mu) * rstd * gamma.data[j] + beta.map_or(0.0, |b| b.data[j]);
        }
    }
    Tensor::new(x.shape.clone(), out)
}

fn layer_norm_grad_x(x: &Tensor, gamma: &Tensor, dy: &Tensor, eps: f64, rms: bool) -> Tensor {
    let (r, d) = rows(x);
    let mut out = vec![0.0; x.len()];
    let n = d as f64;
    for i in 0..r {
        let row = &x.data[i * d..(i + 1) * d];
        let (mu, rstd) = norm_stats(row, eps, rms);
        let xhat: Vec<f64> = row.iter().map(|v| (v - mu) * rstd).collect();
        let g: Vec<f64> = (0..d).map(|j| dy.data[i * d + j] * gamma.data[j]).collect();
        // The mean does not move with x in RMS norm.
        let sg: f64 = if rms { 0.0 } else { g.iter().sum() };
        let sgx: f64 = g.iter().zip(&xhat).map(|(a, b)| a * b).sum();
        for j in 0..d {
            out[i * d + j] = rstd / n * (n * g[j] - sg - xhat[j] * sgx);
        }
    }
    Tensor::new(x.shape.clone(), out)
}

fn layer_norm_grad_gamma(x: &Tensor, dy: &Tensor, eps: f64, rms: bool) -> Tensor {
    let (r, d) = rows(x);
    let mut out = vec![0.0; d];
    for i in 0..r {
        let row = &x.data[i * d..(i + 1) * d];
        let (mu, rstd) = norm_stats(row, eps, rms);
        for j in 0..d {
            out[j] += dy.data[i * d + j] * (row[j] - mu) * rstd;
        }
    }
    Tensor::new(vec![d], out)
}

fn dropout(x: &Tensor, ids: &Tensor, step: f64, p: f64, seed: u64) -> Tensor {
    let row = x.len() / ids.len().max(1);
    let mut t = x.clone();
    for (k, v) in t.data.iter_mut().enumerate() {
        let id = ids.data.get(k / row.max(1)).copied().unwrap_or(0.0);
        *v = if crate::graph::dropout_drops(seed, step as u64, id as u64, (k % row.max(1)) as u64, p) { 0.0 } else { *v / (1.0 - p) };
    }
    t
}

/// Calls `f(image index)` for each entry of the windows [n, oh, ow, c, kh,
/// kw] of an image [n, c, h, w], in order: the pixel the entry reads, or
/// None where it lies in the padding.
#[allow(clippy::too_many_arguments)]
fn each_window_entry(image: &[usize], (oh, ow): (usize, usize), (kh, kw): (usize, usize), stride: usize, padding: usize, mut f: impl FnMut(Option<usize>)) {
    let (n, c, h, w) = (image[0], image[1], image[2], image[3]);
    for b in 0..n {
        for i in 0..oh {
            for j in 0..ow {
                for ch in 0..c {
                    for a in 0..kh {
                        for e in 0..kw {
                            let at = crate::graph::window_source(i, a, stride, padding, h).zip(crate::graph::window_source(j, e, stride, padding, w));
                            f(at.map(|(y, z)| ((b * c + ch) * h + y) * w + z));
                        }
                    }
                }
            }
        }
    }
}

/// x [n, c, h, w] → windows [n, oh, ow, c, kh, kw] (`out` is that shape).
fn im2col(x: &Tensor, kh: usize, kw: usize, stride: usize, padding: usize, fill: f64, out: &[usize]) -> Tensor {
    let mut data = Vec::with_capacity(out.iter().product());
    each_window_entry(&x.shape, (out[1], out[2]), (kh, kw), stride, padding, |at| data.push(at.map_or(fill, |k| x.data[k])));
    Tensor::new(out.to_vec(), data)
}

/// Windows [n, oh, ow, c, kh, kw] summed back into an image `out` [n, c, h, w].
fn col2im(cols: &Tensor, kh: usize, kw: usize, stride: usize, padding: usize, out: &[usize]) -> Tensor {
    let mut data = vec![0.0; out.iter().product()];
    let mut entries = cols.data.iter();
    each_window_entry(out, (cols.shape[1], cols.shape[2]), (kh, kw), stride, padding, |at| {
        let v = entries.next().copied().unwrap_or(0.0);
        if let Some(k) = at {
            data[k] += v;
        }
    });
    Tensor::new(out.to_vec(), data)
}

fn rope(x: &Tensor, head_dim: usize, base: f64, inverse: bool) -> Tensor {
    let r = x.shape.len();
    let (seq, d) = (x.shape[r - 2], x.shape[r - 1]);
    let mut t = x.clone();
    let hd = head_dim.max(2);
    for (row, chunk) in t.data.chunks_exact_mut(d.max(1)).enumerate() {
        let pos = row % seq.max(1);
        for j in (0..d).step_by(2) {
            let a = crate::graph::rope_angle(pos, (j % hd) / 2, hd, base);
            let (sin, cos) = if inverse { (-a.sin(), a.cos()) } else { (a.sin(), a.cos()) };
            let (x0, x1) = (chunk[j], chunk[j + 1]);
            chunk[j] = x0 * cos - x1 * sin;
            chunk[j + 1] = x0 * sin + x1 * cos;
        }
    }
    t
}

fn causal_mask(x: &Tensor, fill: f64) -> Tensor {
    let r = x.shape.len();
    let (sq, sk) = (x.shape[r - 2], x.shape[r - 1]);
    let mut t = x.clone();
    for (flat, v) in t.data.iter_mut().enumerate() {
        let (i, j) = ((flat / sk) % sq, flat % sk);
        if j > i {
            *v = fill;
        }
    }
    t
}

fn index(v: f64, n: usize, what: &'static str) -> Result<usize, InterpError> {
    if v >= 0.0 && v.fract() == 0.0 && (v as usize) < n {
        Ok(v as usize)
    } else {
        Err(InterpError::OutOfRange { what, value: v, n })
    }
}

fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor, InterpError> {
    let (v, d) = (table.shape[0], table.shape[1]);
    let mut data = Vec::with_capacity(ids.len() * d);
    for &id in &ids.data {
        let r = index(id, v, "index")?;
        data.extend_from_slice(&table.data[r * d..(r + 1) * d]);
    }
    let mut shape = ids.shape.clone();
    shape.push(d);
    Ok(Tensor::new(shape, data))
}

fn embedding_grad(ids: &Tensor, dy: &Tensor, out: &[usize]) -> Result<Tensor, InterpError> {
    let (v, d) = (out[0], out[1]);
    let mut data = vec![0.0; v * d];
    for (k, &id) in ids.data.iter().enumerate() {
        let r = index(id, v, "index")?;
        for j in 0..d {
            data[r * d + j] += dy.data[k * d + j];
        }
    }
    Ok(Tensor::new(out.to_vec(), data))
}

/// Mean cross-entropy, or with `dloss` its gradient with respect to the logits.
fn cross_entropy(logits: &Tensor, labels: &Tensor, dloss: Option<f64>) -> Result<Tensor, InterpError> {
    let (r, c) = rows(logits);
    let ls = softmax(logits, logits.shape.len() - 1, true);
    let n = r.max(1) as f64;
    match dloss {
        None => {
            let mut total = 0.0;
            for i in 0..r {
                total -= ls.data[i * c + index(labels.data[i], c, "label")?];
            }
            Ok(Tensor::scalar(total / n))
        }
        Some(dl) => {
            let mut g: Vec<f64> = ls.data.iter().map(|v| v.exp() * dl / n).collect();
            for i in 0..r {
                g[i * c + index(labels.data[i], c, "label")?] -= dl / n;
            }
            Ok(Tensor::new(logits.shape.clone(), g))
        }
    }
}
