//! Lays out the loops of a fused kernel in CLIF.
//!
//! Input: a well-formed [`Fused`] (checked by `required_lens`). Output: the
//! body of a function with the signature of [`signature`]:
//!
//! ```text
//! entry:    load the base pointer of every input the body reads;
//!           load and splat inputs that are one scalar (both strides 0);
//!           vector constants, splatted once (inserted here as they are needed)
//! row(r, o): per row: pointers to the row of each strided input, and
//!           loads + splats of inputs constant along the row (col stride 0)
//!   cols(off): UNROLL vectors of LANES floats per iteration, `cols / 16` times
//!   after:    up to 3 more whole vectors, then up to 3 floats gathered into
//!             the lanes of one vector and scattered back
//!           next row, or exit
//! ```
//!
//! The body is evaluated on groups of vectors (`G`): each instruction is
//! emitted for every vector of the group before the next, which gives the
//! CPU independent chains to overlap.

use crate::engine::EngineError;
use cranelift_codegen::cursor::{Cursor, FuncCursor};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, AbiParam, Block, Function, InstBuilder, MemFlagsData, Signature, Type, Value};
use cranelift_codegen::isa::{TargetFrontendConfig, TargetIsa};
use cranelift_frontend::{FuncInstBuilder, FunctionBuilder, FunctionBuilderContext};
use shardplan_compiler::kernel::{Fused, Inst};
use std::collections::HashMap;

/// Floats per vector: cranelift's SIMD types are 128 bits wide.
pub(super) const LANES: usize = 4;
/// Vectors per iteration of the column loop.
pub(super) const UNROLL: usize = 4;
const VEC_BYTES: i64 = 16;

/// What the generated code depends on besides the kernel.
#[derive(Clone, Copy)]
pub(super) struct Target {
    pub(super) frontend: TargetFrontendConfig,
    /// Whether `fma` lowers to one instruction (otherwise it is a libcall,
    /// so multiply and add are emitted separately).
    pub(super) fma: bool,
}

impl Target {
    pub(super) fn of(isa: &dyn TargetIsa) -> Target {
        let fma = match isa.name() {
            "x64" => isa.isa_flags().iter().any(|f| f.name == "has_fma" && f.as_bool() == Some(true)),
            "aarch64" => true,
            _ => false,
        };
        Target { frontend: isa.frontend_config(), fma }
    }
}

/// `(inputs, out_rows, row_begin, row_end)`, all pointer-sized, no results.
pub(super) fn signature(t: Target) -> Signature {
    let mut sig = Signature::new(t.frontend.default_call_conv);
    let ptr = t.frontend.pointer_type();
    sig.params.extend([AbiParam::new(ptr); 4]);
    sig
}

/// A group of `Emit::n` vectors holding consecutive elements.
pub(super) type G = Vec<Value>;

/// Where a group's elements of an input come from.
#[derive(Clone, Copy)]
enum Src {
    /// The body never reads it.
    Unused,
    /// Consecutive elements from this pointer (the current row's start).
    Row(Value),
    /// One value for the whole row (already splatted).
    Splat(Value),
}

/// How a group touches memory.
#[derive(Clone, Copy)]
enum Access {
    /// `n` whole vectors at byte offsets 0, 16, ….
    Vectors(usize),
    /// The first `n < LANES` floats, gathered into the lanes of one vector.
    Lanes(usize),
}

/// Per-function state of the translation.
pub(super) struct Emit<'a> {
    pub(super) b: FunctionBuilder<'a>,
    pub(super) t: Target,
    entry: Block,
    /// Vector constants by (type, bits), each defined once in `entry`.
    consts: HashMap<(Type, u32), Value>,
    /// Vectors in the group being emitted.
    pub(super) n: usize,
}

fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Builds `k` into `func`, whose signature must be [`signature`].
pub(super) fn build(k: &Fused, func: &mut Function, fctx: &mut FunctionBuilderContext, t: Target) -> Result<(), EngineError> {
    let ptr = t.frontend.pointer_type();
    let live = live(&k.body);
    let n_in = k.row_strides.len();
    let mut used = vec![false; n_in];
    for (inst, _) in k.body.iter().zip(&live).filter(|(_, l)| **l) {
        if let Inst::Load(j) = *inst {
            if let Some(u) = used.get_mut(j) {
                *u = true;
            }
        }
    }

    let mut b = FunctionBuilder::new(func, fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let &[inputs, out, row_begin, row_end] = b.block_params(entry) else {
        return Err(EngineError::Codegen("kernel signature must have four parameters".into()));
    };
    let mut e = Emit { b, t, entry, consts: HashMap::new(), n: 1 };

    // Base pointers, and inputs that are one scalar for the whole call.
    let ptr_bytes = i64::from(ptr.bytes());
    let mut base = vec![None; n_in];
    let mut scalar = vec![None; n_in];
    let strides: Vec<(usize, usize)> = k.row_strides.iter().copied().zip(k.col_strides.iter().copied()).collect();
    for (j, &(rs, cs)) in strides.iter().enumerate().filter(|&(j, _)| used[j]) {
        let off = i32::try_from(j as i64 * ptr_bytes).map_err(|_| EngineError::Bug(format!("too many inputs ({n_in})")))?;
        let p = e.b.ins().load(ptr, MemFlagsData::trusted(), inputs, off);
        base[j] = Some(p);
        if rs == 0 && cs == 0 {
            let s = e.b.ins().load(types::F32, flags(), p, 0);
            scalar[j] = Some(e.b.ins().splat(types::F32X4, s));
        }
    }

    let row = e.b.create_block();
    let r = e.b.append_block_param(row, ptr);
    let o = e.b.append_block_param(row, ptr);
    let exit = e.b.create_block();
    let go = e.b.ins().icmp(IntCC::UnsignedLessThan, row_begin, row_end);
    e.b.ins().brif(go, row, &[row_begin.into(), out.into()], exit, &[]);

    // One row.
    e.b.switch_to_block(row);
    let mut srcs = vec![Src::Unused; n_in];
    for (j, &(rs, cs)) in strides.iter().enumerate() {
        let Some(p) = base[j] else { continue };
        let at_row = |e: &mut Emit| {
            let bytes = e.b.ins().iconst(ptr, rs as i64 * 4);
            let off = e.b.ins().imul(r, bytes);
            e.b.ins().iadd(p, off)
        };
        srcs[j] = match (rs, cs, scalar[j]) {
            (_, _, Some(s)) => Src::Splat(s),
            (0, _, None) => Src::Row(p),
            (_, 0, None) => {
                let q = at_row(&mut e);
                let s = e.b.ins().load(types::F32, flags(), q, 0);
                Src::Splat(e.b.ins().splat(types::F32X4, s))
            }
            _ => Src::Row(at_row(&mut e)),
        };
    }

    let per_iter = LANES * UNROLL;
    let n_iter = k.cols / per_iter;
    let main_bytes = (n_iter * per_iter) as i64 * 4;
    if n_iter > 0 {
        let cols = e.b.create_block();
        let off = e.b.append_block_param(cols, ptr);
        let zero = e.b.ins().iconst(ptr, 0);
        e.b.ins().jump(cols, &[zero.into()]);
        e.b.switch_to_block(cols);
        e.group(k, &live, &srcs, o, off, Access::Vectors(UNROLL))?;
        let step = e.b.ins().iconst(ptr, per_iter as i64 * 4);
        let next = e.b.ins().iadd(off, step);
        let end = e.b.ins().iconst(ptr, main_bytes);
        let more = e.b.ins().icmp(IntCC::UnsignedLessThan, next, end);
        let after = e.b.create_block();
        e.b.ins().brif(more, cols, &[next.into()], after, &[]);
        e.b.switch_to_block(after);
    }
    let rest = k.cols % per_iter;
    if rest / LANES > 0 {
        let at = e.b.ins().iconst(ptr, main_bytes);
        e.group(k, &live, &srcs, o, at, Access::Vectors(rest / LANES))?;
    }
    if !rest.is_multiple_of(LANES) {
        let at = e.b.ins().iconst(ptr, (k.cols - rest % LANES) as i64 * 4);
        e.group(k, &live, &srcs, o, at, Access::Lanes(rest % LANES))?;
    }
    let one = e.b.ins().iconst(ptr, 1);
    let r_next = e.b.ins().iadd(r, one);
    let row_bytes = e.b.ins().iconst(ptr, k.cols as i64 * 4);
    let o_next = e.b.ins().iadd(o, row_bytes);
    let more = e.b.ins().icmp(IntCC::UnsignedLessThan, r_next, row_end);
    e.b.ins().brif(more, row, &[r_next.into(), o_next.into()], exit, &[]);

    e.b.switch_to_block(exit);
    e.b.ins().return_(&[]);
    e.b.seal_all_blocks();
    e.b.finalize(t.frontend);
    Ok(())
}

/// Which instructions the result depends on.
fn live(body: &[Inst]) -> Vec<bool> {
    let mut live = vec![false; body.len()];
    if let Some(l) = live.last_mut() {
        *l = true;
    }
    for i in (0..body.len()).rev() {
        if !live[i] {
            continue;
        }
        let (a, b) = match body[i] {
            Inst::Load(_) | Inst::Const(_) => (None, None),
            Inst::Unary(_, a) => (Some(a), None),
            Inst::Binary(_, a, b) => (Some(a), Some(b)),
        };
        for x in [a, b].into_iter().flatten() {
            if let Some(l) = live.get_mut(x) {
                *l = true;
            }
        }
    }
    live
}

impl Emit<'_> {
    /// Evaluates the body on one group of elements of the row, `at` bytes
    /// from its start, and stores the result to `out + at`.
    fn group(&mut self, k: &Fused, live: &[bool], srcs: &[Src], out: Value, at: Value, acc: Access) -> Result<(), EngineError> {
        self.n = match acc {
            Access::Vectors(n) => n,
            Access::Lanes(_) => 1,
        };
        let mut regs: Vec<Option<G>> = Vec::with_capacity(k.body.len());
        let mut loaded: Vec<Option<G>> = vec![None; srcs.len()];
        for (i, inst) in k.body.iter().enumerate() {
            if !live.get(i).copied().unwrap_or(false) {
                regs.push(None);
                continue;
            }
            let reg = |a: usize| {
                regs.get(a).and_then(Option::as_ref).ok_or_else(|| EngineError::Bug(format!("instruction v{i} reads v{a}, which is not computed before it")))
            };
            let v = match *inst {
                Inst::Load(j) => match (loaded.get(j).cloned().flatten(), srcs.get(j).copied()) {
                    (Some(g), _) => g,
                    (None, Some(Src::Row(p))) => {
                        let addr = self.b.ins().iadd(p, at);
                        let g = self.load(addr, acc);
                        loaded[j] = Some(g.clone());
                        g
                    }
                    (None, Some(Src::Splat(s))) => vec![s; self.n],
                    (None, _) => return Err(EngineError::Bug(format!("instruction v{i} loads missing input {j}"))),
                },
                Inst::Const(c) => self.k(c as f32),
                Inst::Unary(u, a) => {
                    let x = reg(a)?;
                    self.unary(u, x)
                }
                Inst::Binary(op, a, b) => {
                    let (x, y) = (reg(a)?, reg(b)?);
                    self.binary(op, x, y)
                }
            };
            regs.push(Some(v));
        }
        let result = regs.pop().flatten().ok_or_else(|| EngineError::Bug("kernel body is empty".into()))?;
        let addr = self.b.ins().iadd(out, at);
        self.store(addr, &result, acc);
        Ok(())
    }

    fn load(&mut self, addr: Value, acc: Access) -> G {
        match acc {
            Access::Vectors(n) => (0..n as i64).map(|j| self.b.ins().load(types::F32X4, flags(), addr, (j * VEC_BYTES) as i32)).collect(),
            Access::Lanes(n) => {
                let first = self.b.ins().load(types::F32, flags(), addr, 0);
                let mut v = self.b.ins().scalar_to_vector(types::F32X4, first);
                for i in 1..n.min(LANES) as u8 {
                    let s = self.b.ins().load(types::F32, flags(), addr, i32::from(i) * 4);
                    v = self.b.ins().insertlane(v, s, i);
                }
                vec![v]
            }
        }
    }

    fn store(&mut self, addr: Value, g: &[Value], acc: Access) {
        match acc {
            Access::Vectors(_) => {
                for (j, &v) in g.iter().enumerate() {
                    self.b.ins().store(flags(), v, addr, (j as i64 * VEC_BYTES) as i32);
                }
            }
            Access::Lanes(n) => {
                if let Some(&v) = g.first() {
                    for i in 0..n.min(LANES) as u8 {
                        let s = self.b.ins().extractlane(v, i);
                        self.b.ins().store(flags(), s, addr, i32::from(i) * 4);
                    }
                }
            }
        }
    }

    /// The vector constant of type `ty` with every lane holding `bits`,
    /// defined once, in the entry block (before its branch).
    fn konst(&mut self, ty: Type, bits: u32) -> Value {
        if let Some(&v) = self.consts.get(&(ty, bits)) {
            return v;
        }
        let mut cur = FuncCursor::new(&mut *self.b.func);
        cur = match cur.layout().last_inst(self.entry) {
            Some(_) => cur.at_last_inst(self.entry),
            None => cur.at_bottom(self.entry),
        };
        let v = if ty == types::F32X4 {
            let s = cur.ins().f32const(f32::from_bits(bits));
            cur.ins().splat(ty, s)
        } else {
            let s = cur.ins().iconst(types::I32, i64::from(bits as i32));
            cur.ins().splat(types::I32X4, s)
        };
        self.consts.insert((ty, bits), v);
        v
    }

    // Group operations. Float groups are f32x4; masks are f32x4 with all
    // bits set or clear per lane; integer groups are i32x4.

    /// `c` in every lane.
    pub(super) fn k(&mut self, c: f32) -> G {
        vec![self.konst(types::F32X4, c.to_bits()); self.n]
    }

    /// `c` in every lane, as integers.
    pub(super) fn ki(&mut self, c: i32) -> G {
        vec![self.konst(types::I32X4, c as u32); self.n]
    }

    fn map1(&mut self, a: &[Value], f: impl Fn(FuncInstBuilder<'_, '_>, Value) -> Value) -> G {
        a.iter().map(|&x| f(self.b.ins(), x)).collect()
    }

    fn map2(&mut self, a: &[Value], b: &[Value], f: impl Fn(FuncInstBuilder<'_, '_>, Value, Value) -> Value) -> G {
        a.iter().zip(b).map(|(&x, &y)| f(self.b.ins(), x, y)).collect()
    }

    pub(super) fn add(&mut self, a: &[Value], b: &[Value]) -> G {
        self.map2(a, b, |i, x, y| i.fadd(x, y))
    }

    pub(super) fn sub(&mut self, a: &[Value], b: &[Value]) -> G {
        self.map2(a, b, |i, x, y| i.fsub(x, y))
    }

    pub(super) fn mul(&mut self, a: &[Value], b: &[Value]) -> G {
        self.map2(a, b, |i, x, y| i.fmul(x, y))
    }

    pub(super) fn div(&mut self, a: &[Value], b: &[Value]) -> G {
        self.map2(a, b, |i, x, y| i.fdiv(x, y))
    }

    pub(super) fn neg(&mut self, a: &[Value]) -> G {
        self.map1(a, |i, x| i.fneg(x))
    }

    pub(super) fn abs(&mut self, a: &[Value]) -> G {
        self.map1(a, |i, x| i.fabs(x))
    }

    pub(super) fn sqrt(&mut self, a: &[Value]) -> G {
        self.map1(a, |i, x| i.sqrt(x))
    }

    /// `a * b + c`, rounded once where the host has `fma`.
    pub(super) fn mul_add(&mut self, a: &[Value], b: &[Value], c: &[Value]) -> G {
        if self.t.fma {
            a.iter().zip(b).zip(c).map(|((&x, &y), &z)| self.b.ins().fma(x, y, z)).collect()
        } else {
            let p = self.mul(a, b);
            self.add(&p, c)
        }
    }

    /// Horner's scheme: `c[0]·xⁿ⁻¹ + … + c[n-1]`.
    pub(super) fn poly(&mut self, x: &[Value], c: &[f32]) -> G {
        let Some((&first, rest)) = c.split_first() else { return self.k(0.0) };
        let mut p = self.k(first);
        for &ci in rest {
            let ci = self.k(ci);
            p = self.mul_add(&p, x, &ci);
        }
        p
    }

    /// All ones where `a cc b`.
    pub(super) fn cmp(&mut self, cc: FloatCC, a: &[Value], b: &[Value]) -> G {
        let m = self.map2(a, b, |i, x, y| i.fcmp(cc, x, y));
        self.map1(&m, |i, x| i.bitcast(types::F32X4, MemFlagsData::new(), x))
    }

    /// `mask ? a : b`, lane by lane.
    pub(super) fn select(&mut self, mask: &[Value], a: &[Value], b: &[Value]) -> G {
        mask.iter().zip(a).zip(b).map(|((&m, &x), &y)| self.b.ins().bitselect(m, x, y)).collect()
    }

    /// `a < b ? a : b`: one `minps` on x86 (`b` where either is NaN).
    pub(super) fn lesser(&mut self, a: &[Value], b: &[Value]) -> G {
        let m = self.cmp(FloatCC::LessThan, a, b);
        self.select(&m, a, b)
    }

    /// `b < a ? a : b`: one `maxps` on x86 (`b` where either is NaN).
    pub(super) fn greater(&mut self, a: &[Value], b: &[Value]) -> G {
        let m = self.cmp(FloatCC::LessThan, b, a);
        self.select(&m, a, b)
    }

    pub(super) fn and(&mut self, a: &[Value], b: &[Value]) -> G {
        self.map2(a, b, |i, x, y| i.band(x, y))
    }

    pub(super) fn or(&mut self, a: &[Value], b: &[Value]) -> G {
        self.map2(a, b, |i, x, y| i.bor(x, y))
    }

    /// The bits of a float group, as integers.
    pub(super) fn bits(&mut self, a: &[Value]) -> G {
        self.map1(a, |i, x| i.bitcast(types::I32X4, MemFlagsData::new(), x))
    }

    /// Integer bits as floats.
    pub(super) fn float_bits(&mut self, a: &[Value]) -> G {
        self.map1(a, |i, x| i.bitcast(types::F32X4, MemFlagsData::new(), x))
    }

    /// Integers converted to floats.
    pub(super) fn int_to_float(&mut self, a: &[Value]) -> G {
        self.map1(a, |i, x| i.fcvt_from_sint(types::F32X4, x))
    }

    pub(super) fn iadd(&mut self, a: &[Value], b: &[Value]) -> G {
        self.map2(a, b, |i, x, y| i.iadd(x, y))
    }

    pub(super) fn isub(&mut self, a: &[Value], b: &[Value]) -> G {
        self.map2(a, b, |i, x, y| i.isub(x, y))
    }

    /// Shifts every lane left by `s` bits.
    pub(super) fn shl(&mut self, a: &[Value], s: u8) -> G {
        let s = self.b.ins().iconst(types::I32, i64::from(s));
        self.map1(a, |i, x| i.ishl(x, s))
    }

    /// Shifts every lane right by `s` bits, copying the sign bit.
    pub(super) fn sshr(&mut self, a: &[Value], s: u8) -> G {
        let s = self.b.ins().iconst(types::I32, i64::from(s));
        self.map1(a, |i, x| i.sshr(x, s))
    }

    /// Shifts every lane right by `s` bits, filling with zeros.
    pub(super) fn ushr(&mut self, a: &[Value], s: u8) -> G {
        let s = self.b.ins().iconst(types::I32, i64::from(s));
        self.map1(a, |i, x| i.ushr(x, s))
    }
}
