//! Kernels with one thread per output element: fused expressions (and
//! reduction epilogues), copies through an index map (broadcast, expand,
//! transpose, slice, pack, unpack), the causal mask, embedding lookup, the
//! mean-squared-error gradient and gradient accumulation.
//!
//! Input: a step's operands and output (`Io`) and the op's attributes.
//! Output: the kernel, None when it has nothing to compute, or a `CodegenError`
//! when the operands or output do not fit the kernel (checked before any
//! source is written).

use super::writer::{f32_lit, f64_lit, Gen, Mode, GELU};
use super::{CodegenError, Io};
use shardplan_compiler::kernel::{Binary, BufId, Elem, Fused, Inst, Unary};

/// The fused kernel: `out[i] = body(inputs at i)`.
pub fn fused(f: &Fused, io: &Io<'_>) -> Result<Option<super::Kernel>, CodegenError> {
    f.validate(io.ins.len())?;
    io.out_f32()?;
    let total = f.rows * f.cols;
    if io.out_len() != total {
        return Err(CodegenError::Operands(format!("the output has {} elements for a {} × {} kernel", io.out_len(), f.rows, f.cols)));
    }
    if total == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("fused [{} × {}]", f.rows, f.cols), io.largest());
    for (k, b) in io.ins.iter().enumerate() {
        need_reads(io, k, f)?;
        g.param(*b, Elem::F32, Mode::In, &format!("in{k}"));
    }
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(total);
    body(&mut g, f, |k| format!("in{k}"));
    g.line(2, format!("out[i] = v{};", f.body.len() - 1));
    g.close();
    Ok(Some(g.finish()))
}

/// A reduction's epilogue, applied in place: input 0 is the output itself,
/// read at each element's own index before that element is written; `io`'s
/// operands are inputs 1.. .
pub fn epilogue(f: &Fused, io: &Io<'_>) -> Result<Option<super::Kernel>, CodegenError> {
    f.validate(io.ins.len() + 1)?;
    io.out_f32()?;
    let total = f.rows * f.cols;
    if io.out_len() != total {
        return Err(CodegenError::Operands(format!("the epilogue runs over {} × {} but the output has {} elements", f.rows, f.cols, io.out_len())));
    }
    if f.col_strides[0] != 1 || (f.row_strides[0] != f.cols && f.rows > 1) {
        return Err(CodegenError::Operands("the epilogue must read the reduction's result at the output's own index".into()));
    }
    if total == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("epilogue in place [{} × {}]", f.rows, f.cols), io.largest());
    g.param(io.out, Elem::F32, Mode::InOut, "io");
    for (k, b) in io.ins.iter().enumerate() {
        let buf = io.buf(*b);
        if buf.elem != Elem::F32 {
            return Err(CodegenError::Operands(format!("epilogue input {} is not f32", k + 1)));
        }
        let need = reach(f, k + 1);
        if buf.len() < need {
            return Err(CodegenError::Operands(format!("epilogue input {} has {} elements, the kernel reads {need}", k + 1, buf.len())));
        }
        g.param(*b, Elem::F32, Mode::In, &format!("in{}", k + 1));
    }
    g.each(total);
    body(&mut g, f, |k| if k == 0 { "io".into() } else { format!("in{k}") });
    g.line(2, format!("io[i] = v{};", f.body.len() - 1));
    g.close();
    Ok(Some(g.finish()))
}

/// The least length of input `k` (its largest index plus one).
fn reach(f: &Fused, k: usize) -> usize {
    if f.rows == 0 || f.cols == 0 {
        return 0;
    }
    (f.rows - 1) * f.row_strides[k] + (f.cols - 1) * f.col_strides[k] + 1
}

fn need_reads(io: &Io<'_>, k: usize, f: &Fused) -> Result<(), CodegenError> {
    let buf = io.input(k)?;
    if buf.elem != Elem::F32 {
        return Err(CodegenError::Operands(format!("fused input {k} is not f32")));
    }
    let need = reach(f, k);
    if buf.len() < need {
        return Err(CodegenError::Operands(format!("fused input {k} has {} elements, the kernel reads {need}", buf.len())));
    }
    Ok(())
}

/// The body of a fused kernel, one `float vN` per instruction, inside the
/// loop over `i`; input `k` is the array `name(k)`.
fn body(g: &mut Gen, f: &Fused, name: impl Fn(usize) -> String) {
    let cols = f.cols;
    let strided = |k: &usize| !plain(f, *k);
    let c = g.n(cols);
    if (0..f.row_strides.len()).filter(strided).any(|k| f.row_strides[k] != 0) {
        g.line(2, format!("const I r = i / {c};"));
    }
    if (0..f.row_strides.len()).filter(strided).any(|k| f.col_strides[k] != 0) {
        g.line(2, format!("const I c = i % {c};"));
    }
    for (i, inst) in f.body.iter().enumerate() {
        let e = match *inst {
            Inst::Load(k) => {
                let (rs, cs) = (f.row_strides[k], f.col_strides[k]);
                let at = if plain(f, k) {
                    "i".to_string()
                } else {
                    let row = match rs {
                        0 => None,
                        1 => Some("r".to_string()),
                        s => Some(format!("r * {}", g.n(s))),
                    };
                    match (row, cs) {
                        (None, 0) => "0".into(),
                        (None, _) => "c".into(),
                        (Some(r), 0) => r,
                        (Some(r), _) => format!("{r} + c"),
                    }
                };
                format!("{}[{at}]", name(k))
            }
            Inst::Const(v) => f32_lit(v as f32),
            Inst::Unary(u, a) => {
                let a = format!("v{a}");
                match u {
                    Unary::Neg => format!("-{a}"),
                    Unary::Relu => format!("({a} > 0.0f ? {a} : 0.0f)"),
                    Unary::Gelu => {
                        g.helper(GELU);
                        format!("sp_gelu({a})")
                    }
                    Unary::Tanh => format!("tanhf({a})"),
                    Unary::Sigmoid => format!("1.0f / (1.0f + expf(-{a}))"),
                    Unary::Exp => format!("expf({a})"),
                    Unary::Log => format!("logf({a})"),
                    Unary::Sqrt => format!("sqrtf({a})"),
                    // fminf takes the number when the quotient is NaN: clip_scale(NaN) = 1, as on CPUs.
                    Unary::ClipScale(m) => format!("fminf({} / ({a} + 1e-6f), 1.0f)", f32_lit(m as f32)),
                }
            }
            Inst::Binary(b, x, y) => {
                let (x, y) = (format!("v{x}"), format!("v{y}"));
                match b {
                    Binary::Add => format!("{x} + {y}"),
                    Binary::Sub => format!("{x} - {y}"),
                    Binary::Mul => format!("{x} * {y}"),
                    Binary::Div => format!("{x} / {y}"),
                    Binary::ReluGrad => format!("({x} > 0.0f ? {y} : 0.0f)"),
                    Binary::GeluGrad => {
                        g.helper(GELU);
                        format!("{y} * sp_gelu_grad({x})")
                    }
                }
            }
        };
        g.line(2, format!("const float v{i} = {e};"));
    }
}

/// Input `k` is read at the output's own index.
fn plain(f: &Fused, k: usize) -> bool {
    f.col_strides[k] == 1 && (f.row_strides[k] == f.cols || f.rows == 1)
}

/// Dims of the output (size, stride in the source) simplified: size-1 dims
/// dropped, neighbours that are neighbours in the source merged.
pub(super) fn simplify(dims: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &(size, stride) in dims {
        if size == 1 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == stride * size => *last = (last.0 * size, stride),
            _ => out.push((size, stride)),
        }
    }
    out
}

/// Lines (at `indent`) declaring `to`, the source index of element
/// `from`, for dims `dims` = (size, source stride), outermost first.
pub(super) fn index_map(g: &mut Gen, dims: &[(usize, usize)], from: &str, to: &str, indent: usize) {
    let dims = simplify(dims);
    match dims.as_slice() {
        [] => g.line(indent, format!("const I {to} = 0;")),
        [(_, 1)] => g.line(indent, format!("const I {to} = {from};")),
        [(_, st)] => {
            let st = g.n(*st);
            g.line(indent, format!("const I {to} = {from} * {st};"));
        }
        _ => {
            g.line(indent, format!("I {to}_t = {from}, {to} = 0;"));
            for (d, &(size, stride)) in dims.iter().enumerate().rev() {
                let (sz, st) = (g.n(size), g.n(stride));
                if d == 0 {
                    if stride != 0 {
                        g.line(indent, format!("{to} += {to}_t * {st};"));
                    }
                } else if stride == 0 {
                    g.line(indent, format!("{to}_t /= {sz};"));
                } else {
                    g.line(indent, format!("{to} += ({to}_t % {sz}) * {st}; {to}_t /= {sz};"));
                }
            }
        }
    }
}

/// out[i] = in[s(i)] for the index map `dims` (output dims with their
/// source strides); `what` names the kernel.
fn copy_kernel(io: &Io<'_>, what: String, dims: &[(usize, usize)], offset: usize) -> Result<Option<super::Kernel>, CodegenError> {
    let x = io.input(0)?;
    if x.elem != io.out_buf().elem {
        return Err(CodegenError::Copy { from: x.elem, to: io.out_buf().elem });
    }
    let total = io.out_len();
    if total == 0 {
        return Ok(None);
    }
    // Every index the map produces is inside the source.
    let reach: usize = offset + dims.iter().map(|&(size, stride)| (size.max(1) - 1) * stride).sum::<usize>() + 1;
    if reach > x.len() {
        return Err(CodegenError::Operands(format!("reads up to element {reach} of a source of {}", x.len())));
    }
    let mut g = Gen::new(what, io.largest());
    g.param(io.ins[0], x.elem, Mode::In, "x");
    g.param(io.out, x.elem, Mode::Out, "out");
    g.each(total);
    index_map(&mut g, dims, "i", "s", 2);
    if offset == 0 {
        g.line(2, "out[i] = x[s];");
    } else {
        let o = g.n(offset);
        g.line(2, format!("out[i] = x[{o} + s];"));
    }
    g.close();
    Ok(Some(g.finish()))
}

fn row_major(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    st
}

/// Copies the operand broadcast (numpy rules, right-aligned) to the output's shape.
pub fn broadcast(io: &Io<'_>) -> Result<Option<super::Kernel>, CodegenError> {
    io.arity(1, "broadcast")?;
    let xs = io.shape(0)?;
    let os = io.out_shape();
    let lead = xs.len().saturating_sub(os.len());
    if xs[..lead].iter().any(|&d| d != 1) {
        return Err(CodegenError::Broadcast { from: xs.to_vec(), to: os.to_vec() });
    }
    let xs = &xs[lead..];
    let pad = os.len() - xs.len();
    let st = row_major(xs);
    let mut dims = Vec::with_capacity(os.len());
    for (d, &size) in os.iter().enumerate() {
        let src = if d < pad { 1 } else { xs[d - pad] };
        if src != size && src != 1 {
            return Err(CodegenError::Broadcast { from: xs.to_vec(), to: os.to_vec() });
        }
        dims.push((size, if src == 1 { 0 } else { st[d - pad] }));
    }
    copy_kernel(io, format!("broadcast {xs:?} → {os:?}"), &dims, 0)
}

/// Copies the operand transposed by `perm`.
pub fn transpose(io: &Io<'_>, perm: &[usize]) -> Result<Option<super::Kernel>, CodegenError> {
    let xs = io.shape(0)?;
    let mut seen = vec![false; xs.len()];
    for &p in perm {
        match seen.get_mut(p) {
            Some(s) if !*s => *s = true,
            _ => return Err(CodegenError::Operands(format!("{perm:?} is not a permutation of {} dims", xs.len()))),
        }
    }
    if perm.len() != xs.len() {
        return Err(CodegenError::Operands(format!("{perm:?} is not a permutation of {} dims", xs.len())));
    }
    let want: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
    io.expect_out(&want)?;
    let st = row_major(xs);
    let dims: Vec<(usize, usize)> = perm.iter().map(|&p| (xs[p], st[p])).collect();
    let simple = simplify(&dims);
    match (simple.last(), simple.iter().position(|d| d.1 == 1)) {
        (Some(&(_, sq)), Some(p)) if sq != 1 && io.out_len() >= 1024 => tiled_transpose(io, &simple, p, format!("transpose {xs:?} by {perm:?}")),
        _ => copy_kernel(io, format!("transpose {xs:?} by {perm:?}"), &dims, 0),
    }
}

/// A transpose whose innermost output dim is strided in the source, and
/// whose dim `p` is the source's contiguous one: 32 × 32 tiles of the
/// (p, last) planes go through shared memory, so that both the reads and
/// the writes of neighbouring threads are neighbours. Blocks of 32 × 8
/// threads, one tile per block (grid-stride over tiles).
fn tiled_transpose(io: &Io<'_>, dims: &[(usize, usize)], p: usize, what: String) -> Result<Option<super::Kernel>, CodegenError> {
    let x = io.input(0)?;
    let elem = x.elem;
    if elem != io.out_buf().elem {
        return Err(CodegenError::Copy { from: elem, to: io.out_buf().elem });
    }
    let q = dims.len() - 1;
    let (np, nq, sq) = (dims[p].0, dims[q].0, dims[q].1);
    // Output strides of the (simplified, dense) output dims.
    let mut ost = vec![1usize; dims.len()];
    for d in (0..dims.len() - 1).rev() {
        ost[d] = ost[d + 1] * dims[d + 1].0;
    }
    let op = ost[p];
    let outer_src: Vec<(usize, usize)> = (0..q).filter(|&d| d != p).map(|d| (dims[d].0, dims[d].1)).collect();
    let outer_dst: Vec<(usize, usize)> = (0..q).filter(|&d| d != p).map(|d| (dims[d].0, ost[d])).collect();
    let outer: usize = outer_src.iter().map(|d| d.0).product();
    let (ti, tj) = (np.div_ceil(32), nq.div_ceil(32));
    let tiles = outer * ti * tj;
    let t = match elem {
        Elem::F32 => "float",
        Elem::I32 => "int",
        Elem::Bf16 => "unsigned short",
    };
    let mut g = Gen::new(what, io.largest());
    g.param(io.ins[0], elem, Mode::In, "x");
    g.param(io.out, elem, Mode::Out, "out");
    g.block = 256;
    g.grid = tiles.clamp(1, super::writer::MAX_GRID) as u32;
    let (nt, tjn, tin, npn, nqn, sqn, opn) = (g.n(tiles), g.n(tj), g.n(ti), g.n(np), g.n(nq), g.n(sq), g.n(op));
    g.line(1, format!("__shared__ {t} tile[32][33];"));
    g.line(1, "const unsigned tx = threadIdx.x % 32u, ty = threadIdx.x / 32u;");
    g.line(1, format!("for (I b = blockIdx.x; b < {nt}; b += gridDim.x) {{"));
    g.line(2, format!("const I j0 = (b % {tjn}) * 32u, i0 = ((b / {tjn}) % {tin}) * 32u, rest = b / ({tjn} * {tin});"));
    index_map(&mut g, &outer_src, "rest", "src", 2);
    index_map(&mut g, &outer_dst, "rest", "dst", 2);
    // Load: source row j (stride sq), element i (contiguous).
    g.line(2, "for (unsigned jj = ty; jj < 32u; jj += 8u) {");
    g.line(3, "const I i = i0 + tx, j = j0 + jj;");
    g.line(3, format!("if (i < {npn} && j < {nqn}) tile[jj][tx] = x[src + i + j * {sqn}];"));
    g.line(2, "}");
    g.line(2, "__syncthreads();");
    // Store: output row i (stride op), element j (contiguous).
    g.line(2, "for (unsigned ii = ty; ii < 32u; ii += 8u) {");
    g.line(3, "const I i = i0 + ii, j = j0 + tx;");
    g.line(3, format!("if (i < {npn} && j < {nqn}) out[dst + i * {opn} + j] = tile[tx][ii];"));
    g.line(2, "}");
    g.line(2, "__syncthreads();");
    g.close();
    Ok(Some(g.finish()))
}

/// Broadcasts a reduction result over `axes` back to the output's shape.
pub fn expand(io: &Io<'_>, axes: &[usize]) -> Result<Option<super::Kernel>, CodegenError> {
    let os = io.out_shape().to_vec();
    if let Some(a) = axes.iter().find(|&&a| a >= os.len()) {
        return Err(CodegenError::Axis { axis: *a, shape: os.to_vec() });
    }
    let kept: usize = os.iter().enumerate().filter(|(d, _)| !axes.contains(d)).map(|(_, s)| s).product();
    if io.input(0)?.len() != kept {
        return Err(CodegenError::Operands(format!("operand has {} elements, expected {kept}", io.input(0)?.len())));
    }
    let mut dims = vec![(0, 0); os.len()];
    let mut acc = 1;
    for d in (0..os.len()).rev() {
        if axes.contains(&d) {
            dims[d] = (os[d], 0);
        } else {
            dims[d] = (os[d], acc);
            acc *= os[d];
        }
    }
    copy_kernel(io, format!("expand over {axes:?} → {os:?}"), &dims, 0)
}

/// The part of the operand starting at `start` along `dim`.
pub fn slice(io: &Io<'_>, dim: usize, start: usize) -> Result<Option<super::Kernel>, CodegenError> {
    let xs = io.shape(0)?;
    let os = io.out_shape();
    if dim >= xs.len() || xs.len() != os.len() || start + os[dim] > xs[dim] || (0..xs.len()).any(|d| d != dim && xs[d] != os[d]) {
        return Err(CodegenError::Operands(format!("cannot take {os:?} at {start} along dim {dim} of {xs:?}")));
    }
    let st = row_major(xs);
    let dims: Vec<(usize, usize)> = os.iter().zip(&st).map(|(&s, &t)| (s, t)).collect();
    copy_kernel(io, format!("slice {os:?} at {start} along dim {dim} of {xs:?}"), &dims, start * st[dim])
}

/// Flattens and concatenates the operands.
pub fn pack(io: &Io<'_>) -> Result<Option<super::Kernel>, CodegenError> {
    let total: usize = (0..io.ins.len()).map(|i| io.buf(io.ins[i]).len()).sum();
    if total != io.out_len() {
        return Err(CodegenError::Operands(format!("packs {total} values into {}", io.out_len())));
    }
    let elem = io.out_buf().elem;
    if total == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("pack {} operands into {total}", io.ins.len()), io.largest());
    for (k, b) in io.ins.iter().enumerate() {
        if io.buf(*b).elem != elem {
            return Err(CodegenError::Operands(format!("operand {k} is not {elem:?}")));
        }
        g.param(*b, elem, Mode::In, &format!("in{k}"));
    }
    g.param(io.out, elem, Mode::Out, "out");
    g.each(total);
    let mut at = 0;
    let mut first = true;
    for (k, b) in io.ins.iter().enumerate() {
        let len = io.buf(*b).len();
        if len == 0 {
            continue;
        }
        let (lo, hi) = (g.n(at), g.n(at + len));
        let kw = if first { "if" } else { "else if" };
        first = false;
        let index = if at == 0 { "i".to_string() } else { format!("i - {lo}") };
        g.line(2, format!("{kw} (i < {hi}) out[i] = in{k}[{index}];"));
        at += len;
    }
    g.close();
    Ok(Some(g.finish()))
}

/// Elements `[offset, offset + len)` of a packed operand.
pub fn unpack(io: &Io<'_>, offset: usize) -> Result<Option<super::Kernel>, CodegenError> {
    let x = io.input(0)?;
    let n = io.out_len();
    if offset + n > x.len() {
        return Err(CodegenError::Operands(format!("reads {n} elements at {offset} of {}", x.len())));
    }
    copy_with_offset(io, io.ins[0], offset, format!("unpack {n} values at {offset}"))
}

/// The value of gradient accumulator `acc` (an `Accumulated` step).
pub fn copy_from(io: &Io<'_>, acc: BufId) -> Result<Option<super::Kernel>, CodegenError> {
    if io.buf(acc).len() != io.out_len() {
        return Err(CodegenError::Operands(format!("the accumulator has {} values, the output {}", io.buf(acc).len(), io.out_len())));
    }
    copy_with_offset(io, acc, 0, "accumulated value".into())
}

fn copy_with_offset(io: &Io<'_>, src: BufId, offset: usize, what: String) -> Result<Option<super::Kernel>, CodegenError> {
    let elem = io.out_buf().elem;
    if io.buf(src).elem != elem {
        return Err(CodegenError::Copy { from: io.buf(src).elem, to: elem });
    }
    let n = io.out_len();
    if n == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(what, io.largest().max(io.buf(src).len()));
    g.param(src, elem, Mode::In, "x");
    g.param(io.out, elem, Mode::Out, "out");
    g.each(n);
    if offset == 0 {
        g.line(2, "out[i] = x[i];");
    } else {
        let o = g.n(offset);
        g.line(2, format!("out[i] = x[{o} + i];"));
    }
    g.close();
    Ok(Some(g.finish()))
}

/// Adds the operand into accumulator `acc` (args: accumulator, operand).
pub fn accumulate(io: &Io<'_>, acc: BufId, k: usize) -> Result<Option<super::Kernel>, CodegenError> {
    let x = io.typed(0, Elem::F32)?;
    let a = io.buf(acc);
    if a.elem != Elem::F32 || a.len() != x.len() {
        return Err(CodegenError::Operands(format!("accumulator {k} ({:?} × {}) does not match its gradient (f32 × {})", a.elem, a.len(), x.len())));
    }
    if x.is_empty() {
        return Ok(None);
    }
    let mut g = Gen::new(format!("accumulate {} values into accumulator {k}", x.len()), x.len());
    g.param(acc, Elem::F32, Mode::InOut, "acc");
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.each(x.len());
    g.line(2, "acc[i] += x[i];");
    g.close();
    Ok(Some(g.finish()))
}

/// f32 → bfloat16 bits, rounded to nearest with ties to even (NaN stays a
/// quiet NaN), as `graph::to_bf16` does on the CPU.
pub fn to_bf16(io: &Io<'_>) -> Result<Option<super::Kernel>, CodegenError> {
    let x = io.typed(0, Elem::F32)?;
    if io.out_buf().elem != Elem::Bf16 || io.out_len() != x.len() {
        return Err(CodegenError::Operands(format!("rounds f32 × {} into {:?} × {}", x.len(), io.out_buf().elem, io.out_len())));
    }
    let n = io.out_len();
    if n == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("to bf16 × {n}"), n);
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.out, Elem::Bf16, Mode::Out, "out");
    g.each(n);
    g.line(2, "const unsigned b = __float_as_uint(x[i]);");
    g.line(2, "out[i] = (b & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((b >> 16) | 0x40u) : (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);");
    g.close();
    Ok(Some(g.finish()))
}

/// bfloat16 bits → f32 (exact).
pub fn from_bf16(io: &Io<'_>) -> Result<Option<super::Kernel>, CodegenError> {
    let x = io.typed(0, Elem::Bf16)?;
    io.out_f32()?;
    if io.out_len() != x.len() {
        return Err(CodegenError::Operands(format!("widens bf16 × {} into f32 × {}", x.len(), io.out_len())));
    }
    let n = io.out_len();
    if n == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("from bf16 × {n}"), n);
    g.param(io.ins[0], Elem::Bf16, Mode::In, "x");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(n);
    g.line(2, "out[i] = __uint_as_float(((unsigned)x[i]) << 16);");
    g.close();
    Ok(Some(g.finish()))
}

/// Entries with key index (last axis) > query index (second to last) become `fill`.
pub fn causal_mask(io: &Io<'_>, fill: f64) -> Result<Option<super::Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    io.out_f32()?;
    io.expect_out(&xs)?;
    let &[.., sq, sk] = xs.as_slice() else {
        return Err(CodegenError::Operands(format!("needs rank ≥ 2, got {xs:?}")));
    };
    let n = io.out_len();
    if n == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("causal mask {xs:?}"), n);
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(n);
    let (k, q) = (g.n(sk), g.n(sq));
    g.line(2, format!("const I key = i % {k}, query = (i / {k}) % {q};"));
    g.line(2, format!("out[i] = key <= query ? x[i] : {};", f32_lit(fill as f32)));
    g.close();
    Ok(Some(g.finish()))
}

/// Rotary position embedding over [.., seq, d], one thread per element: the
/// element and its pair partner turn by `rope_angle` (computed in double, as
/// on the CPU), or back by it when `inverse`.
pub fn rope(io: &Io<'_>, head_dim: usize, base: f64, inverse: bool) -> Result<Option<super::Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    io.out_f32()?;
    io.expect_out(&xs)?;
    let &[.., seq, d] = xs.as_slice() else {
        return Err(CodegenError::Operands(format!("needs rank ≥ 2, got {xs:?}")));
    };
    if head_dim == 0 || head_dim % 2 != 0 || d % head_dim != 0 {
        return Err(CodegenError::Operands(format!("head dim {head_dim} does not split the last dim of {xs:?} into pairs")));
    }
    let n = io.out_len();
    if n == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("rope{} head_dim {head_dim} {xs:?}", if inverse { " inverse" } else { "" }), n);
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(n);
    let (dn, sn, hn) = (g.n(d), g.n(seq), g.n(head_dim));
    g.line(2, format!("const I j = (i % {dn}) % {hn}, pos = (i / {dn}) % {sn}, even = i - (j & 1u);"));
    g.line(2, format!("const double a = (double)pos * pow({}, -(double)(j & ~(I)1) / {});", f64_lit(base), f64_lit(head_dim as f64)));
    g.line(2, format!("const float c = (float)cos(a), s = (float)({}sin(a));", if inverse { "-" } else { "" }));
    g.line(2, "const float x0 = x[even], x1 = x[even + 1];");
    g.line(2, "out[i] = (j & 1u) ? x0 * s + x1 * c : x0 * c - x1 * s;");
    g.close();
    Ok(Some(g.finish()))
}

/// SplitMix64's finaliser, as `graph::dropout_drops` uses it.
const MIX: &str = "__device__ __forceinline__ unsigned long long sp_mix(unsigned long long z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
";

/// Dropout of x [rows, …] (row r: the sample with data-set index ids[r]),
/// one thread per element, with the CPU's hash of (seed, step, id, j).
pub fn dropout(io: &Io<'_>, p: f64, seed: u64) -> Result<Option<super::Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    let rows = io.typed(1, Elem::I32)?.len();
    io.typed(2, Elem::F32)?;
    io.out_f32()?;
    io.expect_out(&xs)?;
    let n = io.out_len();
    if n == 0 {
        return Ok(None);
    }
    if rows == 0 || n % rows != 0 {
        return Err(CodegenError::Operands(format!("{rows} sample indices for {xs:?}")));
    }
    let row = n / rows;
    let mut g = Gen::new(format!("dropout {p} of {xs:?}"), n);
    g.helper(MIX);
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.ins[1], Elem::I32, Mode::In, "ids");
    g.param(io.ins[2], Elem::F32, Mode::In, "step");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(n);
    let rn = g.n(row);
    g.line(2, format!("const unsigned long long id = (unsigned long long)(unsigned)ids[i / {rn}], j = (unsigned long long)(i % {rn});"));
    g.line(2, format!("const unsigned long long h = sp_mix(sp_mix(sp_mix(sp_mix({seed}ull) ^ (unsigned long long)step[0]) ^ id) ^ j);"));
    g.line(2, format!("out[i] = (double)(h >> 11) * (1.0 / 9007199254740992.0) < {} ? 0.0f : x[i] * {};", f64_lit(p), f32_lit((1.0 / (1.0 - p)) as f32)));
    g.close();
    Ok(Some(g.finish()))
}

/// The (n, c, h, w, oh, ow) of an image and its windows, checked.
fn windows(image: &[usize], cols: &[usize], kh: usize, kw: usize, stride: usize, padding: usize) -> Result<[usize; 6], CodegenError> {
    shardplan_compiler::graph::window_geometry(image, cols, (kh, kw), stride, padding)
        .ok_or_else(|| CodegenError::Operands(format!("windows {cols:?} are not the {kh}×{kw} windows (stride {stride}, padding {padding}) of {image:?}")))
}

/// x [n, c, h, w] → windows [n, oh, ow, c, kh, kw], `fill` in the padding;
/// one thread per window entry.
pub fn im2col(io: &Io<'_>, (kh, kw, stride, padding): (usize, usize, usize, usize), fill: f64) -> Result<Option<super::Kernel>, CodegenError> {
    let xs = io.typed(0, Elem::F32)?.shape.clone();
    io.out_f32()?;
    let os = io.buf(io.out).shape.clone();
    let [_, c, h, w, oh, ow] = windows(&xs, &os, kh, kw, stride, padding)?;
    let n = io.out_len();
    if n == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("im2col {kh}×{kw} stride {stride} padding {padding} of {xs:?}"), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "x");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(n);
    let (kwn, khn, cn, own, ohn) = (g.n(kw), g.n(kh), g.n(c), g.n(ow), g.n(oh));
    g.line(2, format!("const I e = i % {kwn}, a = (i / {kwn}) % {khn}, ch = (i / ({kwn} * {khn})) % {cn};"));
    g.line(2, format!("const I j = (i / ({kwn} * {khn} * {cn})) % {own}, r = i / ({kwn} * {khn} * {cn} * {own});"));
    g.line(2, format!("const I b = r / {ohn}, oi = r % {ohn};"));
    g.line(2, format!("const long long y = (long long)(oi * {s} + a) - {padding}ll, z = (long long)(j * {s} + e) - {padding}ll;", s = g.n(stride)));
    g.line(2, format!("const bool inside = y >= 0 && y < {h}ll && z >= 0 && z < {w}ll;"));
    g.line(2, format!("out[i] = inside ? x[((b * {cn} + ch) * {} + (I)y) * {} + (I)z] : {};", g.n(h), g.n(w), f32_lit(fill as f32)));
    g.close();
    Ok(Some(g.finish()))
}

/// Windows [n, oh, ow, c, kh, kw] → the image [n, c, h, w] summing them; one
/// thread per pixel, gathering the entries that read it in window order (so
/// offsets from the last, as the CPU adds them).
pub fn col2im(io: &Io<'_>, (kh, kw, stride, padding): (usize, usize, usize, usize)) -> Result<Option<super::Kernel>, CodegenError> {
    let cs = io.typed(0, Elem::F32)?.shape.clone();
    io.out_f32()?;
    let os = io.buf(io.out).shape.clone();
    let [_, c, h, w, oh, ow] = windows(&os, &cs, kh, kw, stride, padding)?;
    let n = io.out_len();
    if n == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("col2im {kh}×{kw} stride {stride} padding {padding} to {os:?}"), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "cols");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(n);
    let (wn, hn, cn) = (g.n(w), g.n(h), g.n(c));
    g.line(2, format!("const I z = i % {wn}, y = (i / {wn}) % {hn}, ch = (i / ({wn} * {hn})) % {cn}, b = i / ({wn} * {hn} * {cn});"));
    g.line(2, "float s = 0.0f;");
    g.line(2, format!("for (long long a = {}ll; a >= 0; --a) {{", kh as i64 - 1));
    g.line(3, format!("const long long t = (long long)y + {padding}ll - a;"));
    g.line(3, format!("if (t < 0 || t % {stride}ll != 0 || t / {stride}ll >= {oh}ll) continue;"));
    g.line(3, format!("for (long long e = {}ll; e >= 0; --e) {{", kw as i64 - 1));
    g.line(4, format!("const long long u = (long long)z + {padding}ll - e;"));
    g.line(4, format!("if (u < 0 || u % {stride}ll != 0 || u / {stride}ll >= {ow}ll) continue;"));
    g.line(4, format!("s += cols[((((b * {oh}ull + (unsigned long long)(t / {stride}ll)) * {ow}ull + (unsigned long long)(u / {stride}ll)) * {c}ull + ch) * {kh}ull + (unsigned long long)a) * {kw}ull + (unsigned long long)e];"));
    g.line(3, "}");
    g.line(2, "}");
    g.line(2, "out[i] = s;");
    g.close();
    Ok(Some(g.finish()))
}

/// (table [v, d], ids) → rows of the table; an id outside the table reads zeros.
pub fn embedding(io: &Io<'_>) -> Result<Option<super::Kernel>, CodegenError> {
    let ts = io.typed(0, Elem::F32)?.shape.clone();
    let is = io.typed(1, Elem::I32)?.shape.clone();
    io.out_f32()?;
    let &[v, d] = ts.as_slice() else {
        return Err(CodegenError::Operands(format!("table must be [vocab, dim], got {ts:?}")));
    };
    let want: Vec<usize> = is.iter().copied().chain([d]).collect();
    io.expect_out(&want)?;
    let n = io.out_len();
    if n == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("embedding [{v} × {d}] at {is:?}"), io.largest());
    g.param(io.ins[0], Elem::F32, Mode::In, "table");
    g.param(io.ins[1], Elem::I32, Mode::In, "ids");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.each(n);
    let (dd, vv) = (g.n(d), g.n(v));
    g.line(2, format!("const int id = ids[i / {dd}];"));
    g.line(2, format!("out[i] = id >= 0 && (I)id < {vv} ? table[(I)id * {dd} + i % {dd}] : 0.0f;"));
    g.close();
    Ok(Some(g.finish()))
}

/// (pred, target, dloss) → 2·(pred − target)/n·dloss.
pub fn mse_grad(io: &Io<'_>) -> Result<Option<super::Kernel>, CodegenError> {
    let p = io.typed(0, Elem::F32)?;
    let t = io.typed(1, Elem::F32)?;
    let dl = io.typed(2, Elem::F32)?;
    io.out_f32()?;
    if p.len() != t.len() {
        return Err(CodegenError::Operands(format!("pred has {} elements, target {}", p.len(), t.len())));
    }
    if dl.len() != 1 {
        return Err(CodegenError::Len { what: "dloss", got: dl.len(), want: 1 });
    }
    io.expect_out(&p.shape)?;
    let n = p.len();
    if n == 0 {
        return Ok(None);
    }
    let mut g = Gen::new(format!("mse gradient over {n}"), n);
    g.param(io.ins[0], Elem::F32, Mode::In, "p");
    g.param(io.ins[1], Elem::F32, Mode::In, "t");
    g.param(io.ins[2], Elem::F32, Mode::In, "dl");
    g.param(io.out, Elem::F32, Mode::Out, "out");
    g.line(1, format!("const float k = (float)(2.0 * (double)dl[0] / {n}.0);"));
    g.each(n);
    g.line(2, "out[i] = (p[i] - t[i]) * k;");
    g.close();
    Ok(Some(g.finish()))
}
