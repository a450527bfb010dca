//! Row-wise kernels, one block per row with block reductions in shared
//! memory: softmax, log-softmax and their gradients along any axis, layer
//! norm and its gradient in x along the last axis, the cross-entropy
//! gradient. The gradient in gamma sums over rows instead: warps take rows.
//! The scalar losses (cross-entropy, mean squared error) run in one block
//! so that their sum has one fixed order.
//!
//! A row along an axis other than the last is strided: element `j` of row
//! `(o, n)` is at `o·D·inner + j·inner + n`.
//!
//! Input: a step's operands and output (`Io`) and the op's attributes.
//! Output: the kernel, None when it has nothing to compute, or a `CodegenError`
//! when the operands or output do not fit the kernel (checked before any
//! source is written).
//! Invariant: reductions within a row run in a fixed order.

use super::writer::{f32_lit, f64_lit, pow2_block, Gen, Mode, MAX2, WARP_REDUCE};
use super::{CodegenError, Io, Kernel};
use shardplan_compiler::kernel::Elem;

/// Threads per block of the scalar losses.
const LOSS_BLOCK: u32 = 1024;

/// Rows of `shape` along `axis`: (rows, length, inner stride).
fn geometry(shape: &[usize], axis: usize) -> Result<(usize, usize, usize), CodegenError> {
    if axis >= shape.len() {
        return Err(CodegenError::Axis { axis, shape: shape.to_vec() });
    }
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    Ok((outer * inner, shape[axis], inner))
}

/// Starts a row kernel: block reductions, the loop over rows, `base` (the
/// row's first element); returns the index expression of element `j`.
fn start_rows(g: &mut Gen, rows: usize, d: usize, inner: usize) -> impl Fn(&str) -> String {
    let b = pow2_block(d, 32, 256);
    g.block_reduce(b);
    g.rows(rows, b);
    if inner == 1 {
        let dd = g.n(d);
        g.line(2, format!("const I base = row * {dd};"));
    } else {
        let (ii, di) = (g.n(inner), g.n(d * inner));
        g.line(2, format!("const I base = (row / {ii}) * {di} + row % {ii};"));
    }
    let stride = if inner == 1 { String::new() } else { format!(" * {}", g.n(inner)) };
    move |j: &str| format!("base + {j}{stride}")
}

/// `for j` over the row, this thread's share.
fn each_j(g: &mut Gen, d: usize, indent: usize) {
    let (dd, b) = (g.n(d), g.block);
    g.line(indent, format!("for (I j = threadIdx.x; j < {dd}; j += {b}u) {{"));
}

/// Softmax or log-softmax along `axis`. A row with no finite maximum (all
/// −∞) gives zeros (log-softmax: −∞), as on CPUs.
pub fn softmax(io: &Io<'_>, axis: usize, log: bool) -> Result<Option<Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    io.out_f32()?;
    io.expect_out(&xs)?;
    let (rows, d, inner) = geometry(&xs, axis)?;
    if rows == 0 || d == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("{} along axis {axis} of {xs:?}", if log { "log_softmax" } else { "softmax" }), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    let at = start_rows(&mut g, rows, d, inner);
    let ninf = f32_lit(f32::NEG_INFINITY);
    g.line(2, format!("float m = {ninf};"));
    each_j(&mut g, d, 2);
    g.line(3, format!("m = sp_max2(m, x[{}]);", at("j")));
    g.line(2, "}");
    g.line(2, "m = sp_block_max(m, sh_f);");
    g.line(2, format!("if (m == {ninf}) {{"));
    each_j(&mut g, d, 3);
    g.line(4, format!("out[{}] = {};", at("j"), if log { ninf.as_str() } else { "0.0f" }));
    g.line(3, "}");
    g.line(3, "continue;");
    g.line(2, "}");
    g.line(2, "double s = 0.0;");
    each_j(&mut g, d, 2);
    if log {
        g.line(3, format!("s += (double)expf(x[{}] - m);", at("j")));
        g.line(2, "}");
        g.line(2, "const float ln_s = logf((float)sp_block_sum(s, sh_d));");
        each_j(&mut g, d, 2);
        // (x − m) − ln Σ: adding m back first would round at m's scale.
        g.line(3, format!("out[{0}] = (x[{0}] - m) - ln_s;", at("j")));
        g.line(2, "}");
    } else {
        g.line(3, format!("const float e = expf(x[{}] - m);", at("j")));
        g.line(3, format!("out[{}] = e;", at("j")));
        g.line(3, "s += (double)e;");
        g.line(2, "}");
        g.line(2, "const float inv = 1.0f / (float)sp_block_sum(s, sh_d);");
        // Each thread rescales the elements it wrote itself.
        each_j(&mut g, d, 2);
        g.line(3, format!("out[{}] *= inv;", at("j")));
        g.line(2, "}");
    }
    g.close();
    Ok(Some(g.finish()))
}

/// (y, dy) → dx for y = softmax(x): y·(dy − Σ dy·y); for y = log_softmax(x):
/// dy − exp(y)·Σ dy.
pub fn softmax_grad(io: &Io<'_>, axis: usize, log: bool) -> Result<Option<Kernel>, CodegenError> {
    let ys = io.typed(0, Elem::F32)?.shape.clone();
    let dys = io.typed(1, Elem::F32)?.shape.clone();
    io.out_f32()?;
    io.expect_out(&ys)?;
    if dys != ys {
        return Err(CodegenError::Operands(format!("dy has shape {dys:?}, y has {ys:?}")));
    }
    let (rows, d, inner) = geometry(&ys, axis)?;
    if rows == 0 || d == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("{} gradient along axis {axis} of {ys:?}", if log { "log_softmax" } else { "softmax" }), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "y");
    g.param(io.ins[1], Elem::F32, Mode::In, "dy");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    let at = start_rows(&mut g, rows, d, inner);
    g.line(2, "double s = 0.0;");
    each_j(&mut g, d, 2);
    if log {
        g.line(3, format!("s += (double)dy[{}];", at("j")));
    } else {
        g.line(3, format!("s += (double)(dy[{0}] * y[{0}]);", at("j")));
    }
    g.line(2, "}");
    g.line(2, "const float sum = (float)sp_block_sum(s, sh_d);");
    each_j(&mut g, d, 2);
    if log {
        g.line(3, format!("out[{0}] = dy[{0}] - expf(y[{0}]) * sum;", at("j")));
    } else {
        g.line(3, format!("out[{0}] = y[{0}] * (dy[{0}] - sum);", at("j")));
    }
    g.line(2, "}");
    g.close();
    Ok(Some(g.finish()))
}

/// Lines computing `mu` and `rstd` of the row at `base` (length `d`,
/// contiguous), accumulated in double.
fn stats(g: &mut Gen, d: usize, eps: f64, rms: bool, indent: usize) {
    let df = f64_lit(d.max(1) as f64);
    if rms {
        // RMS norm: the mean square, about 0.
        g.line(indent, "const float mu = 0.0f;");
    } else {
        g.line(indent, "double s = 0.0;");
        each_j(g, d, indent);
        g.line(indent + 1, "s += (double)x[base + j];");
        g.line(indent, "}");
        g.line(indent, format!("const float mu = (float)(sp_block_sum(s, sh_d) / {df});"));
    }
    g.line(indent, "double q = 0.0;");
    each_j(g, d, indent);
    g.line(indent + 1, "const float c = x[base + j] - mu;");
    g.line(indent + 1, "q += (double)(c * c);");
    g.line(indent, "}");
    g.line(indent, format!("const float rstd = (float)(1.0 / sqrt(sp_block_sum(q, sh_d) / {df} + {}));", f64_lit(eps)));
}

/// The last dim of `shape` (1 for a scalar) and the number of rows.
fn last_dim(shape: &[usize]) -> (usize, usize) {
    let d = shape.last().copied().unwrap_or(1);
    let len: usize = shape.iter().product();
    (d, len.checked_div(d).unwrap_or(0))
}

fn expect_len(what: &'static str, got: usize, want: usize) -> Result<(), CodegenError> {
    if got == want {
        Ok(())
    } else {
        Err(CodegenError::Len { what, got, want })
    }
}

/// (x, gamma, beta) → (x − mean)/√(var + eps)·gamma + beta over the last axis.
/// Without beta (`rms`), RMS norm: x/√(mean(x²) + eps)·gamma.
pub fn layer_norm(io: &Io<'_>, eps: f64, rms: bool) -> Result<Option<Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    let gamma = io.typed(1, Elem::F32)?.len();
    io.out_f32()?;
    io.expect_out(&xs)?;
    let (d, rows) = last_dim(&xs);
    expect_len("gamma", gamma, d)?;
    if !rms {
        expect_len("beta", io.typed(2, Elem::F32)?.len(), d)?;
    }
    if d == 0 || rows == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("{} of {xs:?}", if rms { "rms_norm" } else { "layer_norm" }), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.ins[1], Elem::F32, Mode::In, "gamma");
    if !rms {
        g.param(io.ins[2], Elem::F32, Mode::In, "beta");
    }
    g.param(io.out, Elem::F32, Mode::Out, "out");
    let _ = start_rows(&mut g, rows, d, 1);
    stats(&mut g, d, eps, rms, 2);
    each_j(&mut g, d, 2);
    if rms {
        g.line(3, "out[base + j] = x[base + j] * rstd * gamma[j];");
    } else {
        g.line(3, "out[base + j] = (x[base + j] - mu) * rstd * gamma[j] + beta[j];");
    }
    g.line(2, "}");
    g.close();
    Ok(Some(g.finish()))
}

/// (x, gamma, dy) → dx of layer norm: with g = dy·gamma and x̂ = (x − mu)·rstd,
/// dx = rstd/n · (n·g − Σg − x̂·Σ g·x̂); for RMS norm (`rms`, mu = 0) without Σg.
pub fn layer_norm_grad_x(io: &Io<'_>, eps: f64, rms: bool) -> Result<Option<Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    let (gamma, dy) = (io.typed(1, Elem::F32)?.len(), io.typed(2, Elem::F32)?.len());
    io.out_f32()?;
    io.expect_out(&xs)?;
    let (d, rows) = last_dim(&xs);
    expect_len("gamma", gamma, d)?;
    expect_len("dy", dy, d * rows)?;
    if d == 0 || rows == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("{} gradient of x {xs:?}", if rms { "rms_norm" } else { "layer_norm" }), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.ins[1], Elem::F32, Mode::In, "gamma");
    g.param(io.ins[2], Elem::F32, Mode::In, "dy");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    let _ = start_rows(&mut g, rows, d, 1);
    stats(&mut g, d, eps, rms, 2);
    g.line(2, "double sg = 0.0, sgd = 0.0;");
    each_j(&mut g, d, 2);
    g.line(3, "const float gj = dy[base + j] * gamma[j];");
    g.line(3, "sg += (double)gj;");
    g.line(3, "sgd += (double)(gj * (x[base + j] - mu));");
    g.line(2, "}");
    if rms {
        g.line(2, "const float sgf = 0.0f;");
    } else {
        g.line(2, "const float sgf = (float)sp_block_sum(sg, sh_d);");
    }
    g.line(2, "const float sgx = (float)(sp_block_sum(sgd, sh_d) * (double)rstd);");
    let n = f32_lit(d as f32);
    g.line(2, format!("const float a = rstd / {n};"));
    each_j(&mut g, d, 2);
    g.line(3, "const float xhat = (x[base + j] - mu) * rstd;");
    g.line(3, format!("out[base + j] = a * ({n} * (dy[base + j] * gamma[j]) - sgf - xhat * sgx);"));
    g.line(2, "}");
    g.close();
    Ok(Some(g.finish()))
}

/// (x, dy) → dgamma = Σ over rows of dy·x̂, one output per column of x.
/// Each block owns a band of `32·K` columns; its 16 warps take every 16th
/// row, each computing the row's statistics itself (warp reductions, no
/// block barrier per row) and adding one term per column of the band to
/// its lanes' sums; the warps' sums are then added in warp order. Bands
/// are as narrow as keeps the blocks to about 16, so the statistics are
/// recomputed by at most that many blocks.
pub fn layer_norm_grad_gamma(io: &Io<'_>, eps: f64, rms: bool) -> Result<Option<Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    let dy = io.typed(1, Elem::F32)?.len();
    io.out_f32()?;
    let (d, rows) = last_dim(&xs);
    io.expect_out(&[d])?;
    expect_len("dy", dy, d * rows)?;
    if d == 0 {
        return Ok(None);
    }
    const WARPS: u32 = 16;
    let k = d.div_ceil(32 * 16).clamp(1, 8);
    let band = 32 * k;
    let mut g = Gen::new(format!("{} gradient of gamma, x {xs:?}", if rms { "rms_norm" } else { "layer_norm" }), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.ins[1], Elem::F32, Mode::In, "dy");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.helper(MAX2);
    g.helper(WARP_REDUCE);
    g.block = 32 * WARPS;
    g.grid = d.div_ceil(band).clamp(1, super::writer::MAX_GRID) as u32;
    let (dd, rr, bw) = (g.n(d), g.n(rows), g.n(band));
    let df = f64_lit(d as f64);
    g.line(1, format!("__shared__ double part[{WARPS}][32];"));
    g.line(1, "const unsigned lane = threadIdx.x % 32u, warp = threadIdx.x / 32u;");
    g.line(1, format!("for (I first = blockIdx.x * {bw}; first < {dd}; first += gridDim.x * {bw}) {{"));
    g.line(2, format!("double acc[{k}];"));
    g.line(2, format!("for (unsigned k = 0; k < {k}u; ++k) acc[k] = 0.0;"));
    g.line(2, format!("for (I row = warp; row < {rr}; row += {WARPS}u) {{"));
    g.line(3, format!("const I base = row * {dd};"));
    if rms {
        g.line(3, "const float mu = 0.0f;");
    } else {
        g.line(3, "double s = 0.0;");
        g.line(3, format!("for (I j = lane; j < {dd}; j += 32u) s += (double)x[base + j];"));
        g.line(3, format!("const float mu = (float)(sp_warp_sum(s) / {df});"));
    }
    g.line(3, "double q = 0.0;");
    g.line(3, format!("for (I j = lane; j < {dd}; j += 32u) {{"));
    g.line(4, "const float c = x[base + j] - mu;");
    g.line(4, "q += (double)(c * c);");
    g.line(3, "}");
    g.line(3, format!("const float rstd = (float)(1.0 / sqrt(sp_warp_sum(q) / {df} + {}));", f64_lit(eps)));
    g.line(3, format!("for (unsigned k = 0; k < {k}u; ++k) {{"));
    g.line(4, "const I col = first + lane + 32u * k;");
    g.line(4, format!("if (col < {dd}) acc[k] += (double)(dy[base + col] * ((x[base + col] - mu) * rstd));"));
    g.line(3, "}");
    g.line(2, "}");
    g.line(2, format!("for (unsigned k = 0; k < {k}u; ++k) {{"));
    g.line(3, "part[warp][lane] = acc[k];");
    g.line(3, "__syncthreads();");
    g.line(3, "const I col = first + lane + 32u * k;");
    g.line(3, format!("if (warp == 0 && col < {dd}) {{"));
    g.line(4, "double sum = 0.0;");
    g.line(4, format!("for (unsigned w = 0; w < {WARPS}u; ++w) sum += part[w][lane];"));
    g.line(4, "out[col] = (float)sum;");
    g.line(3, "}");
    g.line(3, "__syncthreads();");
    g.line(2, "}");
    g.close();
    Ok(Some(g.finish()))
}

/// Checks (logits, labels): returns (classes, rows).
fn logits(io: &Io<'_>) -> Result<(Vec<usize>, usize, usize), CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    let labels = io.typed(1, Elem::I32)?.len();
    let (c, r) = last_dim(&xs);
    if labels != r {
        return Err(CodegenError::Operands(format!("{labels} labels for {r} rows of logits")));
    }
    Ok((xs, c, r))
}

/// (logits, labels) → mean cross-entropy. One block: each warp takes every
/// 32nd row, the warps' sums are added in order. A label outside the
/// classes contributes nothing.
pub fn cross_entropy(io: &Io<'_>) -> Result<Option<Kernel>, CodegenError> {
    let (xs, c, r) = logits(io)?;
    io.out_f32()?;
    if io.out_len() != 1 {
        return Err(CodegenError::NotScalar { shape: io.out_shape().to_vec() });
    }
    let mut g = Gen::new(format!("cross_entropy of {xs:?}"), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.ins[1], Elem::I32, Mode::In, "labels");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.helper(MAX2);
    g.helper(WARP_REDUCE);
    g.block = LOSS_BLOCK;
    g.grid = 1;
    let warps = LOSS_BLOCK / 32;
    let (cc, rr) = (g.n(c), g.n(r));
    let ninf = f32_lit(f32::NEG_INFINITY);
    g.line(1, format!("__shared__ double part[{warps}];"));
    g.line(1, "const unsigned lane = threadIdx.x % 32u, warp = threadIdx.x / 32u;");
    g.line(1, "double total = 0.0;");
    g.line(1, format!("for (I row = warp; row < {rr}; row += {warps}u) {{"));
    g.line(2, format!("const I base = row * {cc};"));
    g.line(2, format!("float m = {ninf};"));
    g.line(2, format!("for (I j = lane; j < {cc}; j += 32u) m = sp_max2(m, x[base + j]);"));
    g.line(2, "m = sp_warp_max(m);");
    g.line(2, "double s = 0.0;");
    g.line(2, format!("for (I j = lane; j < {cc}; j += 32u) s += (double)expf(x[base + j] - m);"));
    g.line(2, "s = sp_warp_sum(s);");
    g.line(2, "const int l = labels[row];");
    g.line(2, format!("if (l >= 0 && (I)l < {cc}) total += (double)m + log(s) - (double)x[base + (I)l];"));
    g.line(1, "}");
    g.line(1, "if (lane == 0) part[warp] = total;");
    g.line(1, "__syncthreads();");
    g.line(1, "if (threadIdx.x == 0) {");
    g.line(2, "double sum = 0.0;");
    g.line(2, format!("for (unsigned w = 0; w < {warps}u; ++w) sum += part[w];"));
    g.line(2, format!("out[0] = (float)(sum / {});", f64_lit(r.max(1) as f64)));
    g.line(1, "}");
    Ok(Some(g.finish()))
}

/// (logits, labels, dloss) → d logits = softmax(x)·dl/n, minus dl/n at the label.
pub fn cross_entropy_grad(io: &Io<'_>) -> Result<Option<Kernel>, CodegenError> {
    let (xs, c, r) = logits(io)?;
    let dl = io.typed(2, Elem::F32)?.len();
    io.out_f32()?;
    io.expect_out(&xs)?;
    if dl != 1 {
        return Err(CodegenError::Len { what: "dloss", got: dl, want: 1 });
    }
    if c == 0 || r == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("cross_entropy gradient of {xs:?}"), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.ins[1], Elem::I32, Mode::In, "labels");
    g.param(io.ins[2], Elem::F32, Mode::In, "dl");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    let ninf = f32_lit(f32::NEG_INFINITY);
    let _ = start_rows(&mut g, r, c, 1);
    g.line(2, format!("const float scale = (float)((double)dl[0] / {});", f64_lit(r as f64)));
    g.line(2, format!("float m = {ninf};"));
    each_j(&mut g, c, 2);
    g.line(3, "m = sp_max2(m, x[base + j]);");
    g.line(2, "}");
    g.line(2, "m = sp_block_max(m, sh_f);");
    g.line(2, "double s = 0.0;");
    each_j(&mut g, c, 2);
    g.line(3, "const float e = expf(x[base + j] - m);");
    g.line(3, "out[base + j] = e;");
    g.line(3, "s += (double)e;");
    g.line(2, "}");
    g.line(2, "const float f = scale / (float)sp_block_sum(s, sh_d);");
    g.line(2, "const int l = labels[row];");
    each_j(&mut g, c, 2);
    g.line(3, "float v = out[base + j] * f;");
    g.line(3, "if ((int)j == l) v -= scale;");
    g.line(3, "out[base + j] = v;");
    g.line(2, "}");
    g.close();
    Ok(Some(g.finish()))
}

/// (pred, target) → mean of squared differences, in one block.
pub fn mse(io: &Io<'_>) -> Result<Option<Kernel>, CodegenError> {
    let p = io.typed(0, Elem::F32)?.len();
    let t = io.typed(1, Elem::F32)?.len();
    io.out_f32()?;
    if p != t {
        return Err(CodegenError::Operands(format!("pred has {p} elements, target {t}")));
    }
    if io.out_len() != 1 {
        return Err(CodegenError::NotScalar { shape: io.out_shape().to_vec() });
    }
    let mut g = Gen::new(format!("mse over {p}"), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "p");
    g.param(io.ins[1], Elem::F32, Mode::In, "t");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.block_reduce(LOSS_BLOCK);
    g.grid = 1;
    let n = g.n(p);
    g.line(1, "double s = 0.0;");
    g.line(1, format!("for (I i = threadIdx.x; i < {n}; i += {LOSS_BLOCK}u) {{"));
    g.line(2, "const float c = p[i] - t[i];");
    g.line(2, "s += (double)(c * c);");
    g.line(1, "}");
    g.line(1, "s = sp_block_sum(s, sh_d);");
    g.line(1, format!("if (threadIdx.x == 0) out[0] = (float)(s / {});", f64_lit(p.max(1) as f64)));
    Ok(Some(g.finish()))
}
