//! Kernels: the training graph → a backend-neutral program of kernels.
//!
//! Input: a [`Graph`]. Output: a [`Program`]: buffers (one per value that
//! must exist in memory) and steps in execution order. Chains of
//! element-wise ops of one shape fuse into a single [`Fused`] kernel, an
//! expression over its inputs that each backend lowers to machine code
//! (cranelift IR on CPUs, CUDA C on GPUs). Every other op is one library
//! step. `Reshape` costs nothing: its buffer aliases its operand's.
//!
//! A fused kernel iterates its output as `rows × cols` (row-major); input
//! `k` is read at `r * row_stride[k] + c * col_stride[k]` with col stride 0
//! or 1, which covers same-shape operands, scalars, and operands broadcast
//! along rows (a bias) or along columns (a kept-dim reduction). Inputs
//! broadcast in other ways are first expanded by a `Broadcast` step.
//!
//! Invariants of a lowered program: buffer ids are dense indices into
//! `buffers`; an alias ends, without a loop, at a buffer of as many values
//! ([`Program::storage`]); steps run in order, each writing its output
//! whole. Which buffers get one copy per microbatch in flight is decided
//! once, by [`Program::banked`], for every backend and the memory plan.
//! [`Program::validate`] checks a program from outside the compiler against
//! these invariants and names the first problem in a [`ProgramError`].

use crate::graph::{Graph, Hyper, NodeId, Op, Role, Target};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A buffer of the program (dense index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BufId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Elem {
    F32,
    I32,
    /// bfloat16, two bytes: what `autocast bf16` stores (only its
    /// conversions, `ToBf16` and `FromBf16`, read or write it).
    Bf16,
}

impl Elem {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::Bf16 => 2,
        }
    }
}

/// Where a buffer's contents come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BufKind {
    /// A batch tensor, set before each step.
    Input(usize),
    Param(usize),
    State(usize),
    Hyper(Hyper),
    Const(f64),
    /// Computed by a step.
    Temp,
    /// Shares the memory of another buffer (a reshape).
    Alias(BufId),
    /// Gradient accumulator `k` of a device program: zeroed at the start of
    /// each step, summed into by every microbatch's backward pass.
    Accum(usize),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Buffer {
    pub kind: BufKind,
    pub elem: Elem,
    pub shape: Vec<usize>,
    /// The graph node it holds.
    pub node: NodeId,
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Unary element-wise operations of a fused body.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Unary {
    Neg,
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
    Exp,
    Log,
    Sqrt,
    /// min(1, max_norm / (x + 1e-6))
    ClipScale(f64),
}

/// Binary element-wise operations of a fused body.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    /// (x, dy) → x > 0 ? dy : 0
    ReluGrad,
    /// (x, dy) → dy · gelu'(x)
    GeluGrad,
}

/// One instruction of a fused body; operands index earlier instructions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Inst {
    /// Element of fused input `k`.
    Load(usize),
    Const(f64),
    Unary(Unary, usize),
    Binary(Binary, usize, usize),
}

/// A fused element-wise kernel. The last instruction is stored to the output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fused {
    pub rows: usize,
    pub cols: usize,
    pub row_strides: Vec<usize>,
    /// Each 0 (the input is constant along a row) or 1.
    pub col_strides: Vec<usize>,
    pub body: Vec<Inst>,
}

impl Fused {
    /// Evaluates the kernel in f64: the reference for generated code.
    pub fn eval_f64(&self, inputs: &[&[f64]], out: &mut [f64]) {
        let mut regs = vec![0.0f64; self.body.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                for (i, inst) in self.body.iter().enumerate() {
                    regs[i] = match *inst {
                        Inst::Load(k) => inputs[k][r * self.row_strides[k] + c * self.col_strides[k]],
                        Inst::Const(v) => v,
                        Inst::Unary(u, a) => unary(u, regs[a]),
                        Inst::Binary(b, x, y) => binary(b, regs[x], regs[y]),
                    };
                }
                if let Some(v) = regs.last() {
                    out[r * self.cols + c] = *v;
                }
            }
        }
    }

    /// The same on f32 data (computed in f64, rounded once at the end).
    pub fn reference(&self, inputs: &[&[f32]], out: &mut [f32]) {
        let ins: Vec<Vec<f64>> = inputs.iter().map(|x| x.iter().map(|&v| v as f64).collect()).collect();
        let refs: Vec<&[f64]> = ins.iter().map(Vec::as_slice).collect();
        let mut o = vec![0.0f64; out.len()];
        self.eval_f64(&refs, &mut o);
        for (d, s) in out.iter_mut().zip(o) {
            *d = s as f32;
        }
    }

    /// A stable text form, for golden tests and `inspect --kernels`.
    pub fn display(&self) -> String {
        let mut s = format!("fused [{} × {}]\n", self.rows, self.cols);
        for (k, (rs, cs)) in self.row_strides.iter().zip(&self.col_strides).enumerate() {
            s += &format!("  in{k}: row stride {rs}, col stride {cs}\n");
        }
        for (i, inst) in self.body.iter().enumerate() {
            let line = match inst {
                Inst::Load(k) => format!("load in{k}"),
                Inst::Const(v) => format!("const {v}"),
                Inst::Unary(u, a) => format!("{u:?} v{a}").to_lowercase(),
                Inst::Binary(b, x, y) => format!("{b:?} v{x}, v{y}").to_lowercase(),
            };
            s += &format!("  v{i} = {line}\n");
        }
        s
    }
}

pub fn unary(u: Unary, x: f64) -> f64 {
    match u {
        Unary::Neg => -x,
        Unary::Relu => x.max(0.0),
        Unary::Gelu => crate::interp::gelu(x),
        Unary::Tanh => x.tanh(),
        Unary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Unary::Exp => x.exp(),
        Unary::Log => x.ln(),
        Unary::Sqrt => x.sqrt(),
        Unary::ClipScale(m) => (m / (x + 1e-6)).min(1.0),
    }
}

pub fn binary(b: Binary, x: f64, y: f64) -> f64 {
    match b {
        Binary::Add => x + y,
        Binary::Sub => x - y,
        Binary::Mul => x * y,
        Binary::Div => x / y,
        Binary::ReluGrad => {
            if x > 0.0 {
                y
            } else {
                0.0
            }
        }
        Binary::GeluGrad => y * crate::interp::gelu_grad(x),
    }
}

/// What a step does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StepKind {
    Fused(Fused),
    /// A library kernel for this graph op (never element-wise, never Reshape).
    Op(Op),
    /// Copies the operand, broadcast, to the output's shape.
    Broadcast,
    /// A reduction (`Sum`, `Mean`, `Max`, `SumTo`) whose element-wise
    /// consumer is applied where the reduction leaves its result: the
    /// epilogue's input 0 is the reduction's output, read and overwritten
    /// in place; its other inputs follow the reduction's operand.
    Reduce {
        op: Op,
        epilogue: Fused,
    },
    /// A matmul whose operands may be read transposed in place: operand
    /// `a` (or `b`) holds the logical matrix with its last two dims swapped.
    MatMul {
        trans_a: bool,
        trans_b: bool,
    },
}

impl StepKind {
    /// What the step computes, as `inspect --kernels` and profiles name it:
    /// `fused`, the op's name, `broadcast`, `sum with epilogue`, `matmul Aᵀ`.
    pub fn name(&self) -> String {
        match self {
            StepKind::Fused(_) => "fused".to_string(),
            StepKind::Op(op) => op.name(),
            StepKind::Broadcast => "broadcast".to_string(),
            StepKind::Reduce { op, .. } => format!("{} with epilogue", op.name()),
            StepKind::MatMul { trans_a, trans_b } => format!("matmul{}{}", if *trans_a { " Aᵀ" } else { "" }, if *trans_b { " Bᵀ" } else { "" }),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    pub kind: StepKind,
    /// The part of the step it belongs to: a device program runs forward and
    /// backward once per microbatch and the update once per step.
    pub role: Role,
    pub inputs: Vec<BufId>,
    pub output: BufId,
}

/// The program of one training step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Program {
    pub buffers: Vec<Buffer>,
    pub steps: Vec<Step>,
    pub loss: BufId,
    /// At the end of a step, each target takes the value of its buffer.
    pub assigns: Vec<(Target, BufId)>,
}

impl Program {
    /// The buffer whose memory `b` uses (following aliases).
    pub fn storage(&self, mut b: BufId) -> BufId {
        while let BufKind::Alias(a) = self.buffers[b.0 as usize].kind {
            b = a;
        }
        b
    }

    /// Per buffer: whether it gets one copy per buffer set (one set per
    /// microbatch in flight) rather than one copy shared by all sets.
    ///
    /// The rule, the same for every backend and for the memory plan: a
    /// buffer is banked when it is an input (each microbatch has its own
    /// batch), the loss (read after the passes), or a temporary that a
    /// forward or backward step writes and a step of another pass reads (a
    /// forward value the backward pass reads, a gradient the update reads):
    /// each microbatch keeps its own until that later pass. A temporary
    /// written and read within one pass is dead when the pass ends, and
    /// passes run one at a time, so every buffer set shares one copy.
    /// Parameters, optimizer states, gradient accumulators, hypers,
    /// constants and the update's temporaries are shared too. Aliases are
    /// never banked themselves: they use their storage buffer's memory, and
    /// a step's output counts for its storage buffer.
    pub fn banked(&self) -> Vec<bool> {
        let mut banked: Vec<bool> = self.buffers.iter().map(|b| matches!(b.kind, BufKind::Input(_))).collect();
        let mut written: Vec<Option<Role>> = vec![None; self.buffers.len()];
        for st in &self.steps {
            let o = self.storage(st.output).0 as usize;
            if st.role != Role::Update && self.buffers[o].kind == BufKind::Temp {
                written[o].get_or_insert(st.role);
            }
        }
        let loss = self.storage(self.loss).0 as usize;
        if written[loss].is_some() {
            banked[loss] = true;
        }
        for st in &self.steps {
            for b in &st.inputs {
                let i = self.storage(*b).0 as usize;
                if written[i].is_some_and(|r| r != st.role) {
                    banked[i] = true;
                }
            }
        }
        banked
    }
}

fn elementwise(op: &Op) -> Option<Result<Unary, Binary>> {
    Some(match op {
        Op::Add => Err(Binary::Add),
        Op::Sub => Err(Binary::Sub),
        Op::Mul => Err(Binary::Mul),
        Op::Div => Err(Binary::Div),
        Op::ReluGrad => Err(Binary::ReluGrad),
        Op::GeluGrad => Err(Binary::GeluGrad),
        Op::Neg => Ok(Unary::Neg),
        Op::Relu => Ok(Unary::Relu),
        Op::Gelu => Ok(Unary::Gelu),
        Op::Tanh => Ok(Unary::Tanh),
        Op::Sigmoid => Ok(Unary::Sigmoid),
        Op::Exp => Ok(Unary::Exp),
        Op::Log => Ok(Unary::Log),
        Op::Sqrt => Ok(Unary::Sqrt),
        Op::ClipScale { max_norm } => Ok(Unary::ClipScale(*max_norm)),
        _ => return None,
    })
}

fn dims(g: &Graph, id: NodeId) -> Vec<usize> {
    g.node(id).ty.shape.iter().map(|d| d.size as usize).collect()
}

/// Lowers a training graph to a program of kernels.
pub fn lower(g: &Graph) -> Program {
    lower_keeping(g, &[]).0
}

/// As [`lower`], also keeping the values of `keep` in buffers (returned in order).
pub fn lower_keeping(g: &Graph, keep: &[NodeId]) -> (Program, Vec<BufId>) {
    let n = g.len();
    // Users of each node; a node is "fusable into its user" when it is
    // element-wise, has exactly one user, that user is element-wise, and
    // both have one shape. Nodes read after the step (the loss, assigned
    // values) must exist in memory.
    let mut users: Vec<Vec<NodeId>> = vec![Vec::new(); n];
    for id in g.ids() {
        for a in g.args(id) {
            users[a.0 as usize].push(id);
        }
    }
    let mut needed = vec![false; n];
    needed[g.loss.0 as usize] = true;
    for (_, v) in g.assigns() {
        needed[v.0 as usize] = true;
    }
    for k in keep {
        needed[k.0 as usize] = true;
    }
    let fused_into = |id: NodeId| -> Option<NodeId> {
        let node = g.node(id);
        if needed[id.0 as usize] || elementwise(&node.op).is_none() {
            return None;
        }
        match users[id.0 as usize].as_slice() {
            [u] if elementwise(&g.node(*u).op).is_some() && dims(g, *u) == dims(g, id) && g.node(*u).role == node.role => Some(*u),
            _ => None,
        }
    };

    // A transpose of the last two dims read only by matmuls is never
    // materialised: the matmul reads its operand transposed in place.
    let swaps_last = |id: NodeId| match &g.node(id).op {
        Op::Transpose { perm } => {
            let r = perm.len();
            r >= 2 && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p) && perm[r - 2] == r - 1 && perm[r - 1] == r - 2
        }
        _ => false,
    };
    // Only the left operand is read in place: gemm reads a transposed right
    // operand markedly slower than a transposed copy costs (measured on
    // [256, 4096] · [4096, 4096]ᵀ: 1.6× the plain product, against a copy
    // of a few percent).
    let folded = |id: NodeId| {
        swaps_last(id) && !needed[id.0 as usize] && users[id.0 as usize].iter().all(|u| g.node(*u).op == Op::MatMul && g.args(*u).first() == Some(&id))
    };

    let mut p = Program { buffers: Vec::new(), steps: Vec::new(), loss: BufId(0), assigns: Vec::new() };
    let mut buf_of: HashMap<NodeId, BufId> = HashMap::new();
    let new_buf = |p: &mut Program, kind: BufKind, elem: Elem, shape: Vec<usize>, node: NodeId| {
        let b = BufId(p.buffers.len() as u32);
        p.buffers.push(Buffer { kind, elem, shape, node });
        b
    };
    for id in g.ids() {
        let node = g.node(id);
        let elem = match node.ty.dtype {
            crate::check::DType::BF16 => Elem::Bf16,
            d if d.is_float() => Elem::F32,
            _ => Elem::I32,
        };
        let shape = dims(g, id);
        let args = g.args(id);
        let b = match &node.op {
            Op::Input(i) => new_buf(&mut p, BufKind::Input(*i), elem, shape, id),
            Op::Param(i) => new_buf(&mut p, BufKind::Param(*i), elem, shape, id),
            Op::State(i) => new_buf(&mut p, BufKind::State(*i), elem, shape, id),
            Op::Hyper(h) => new_buf(&mut p, BufKind::Hyper(*h), elem, shape, id),
            Op::Const(c) => new_buf(&mut p, BufKind::Const(*c), elem, shape, id),
            Op::Accumulated(k) => new_buf(&mut p, BufKind::Accum(*k), elem, shape, id),
            Op::Reshape => {
                let src = buf_of.get(&args[0]).copied().unwrap_or(BufId(0));
                new_buf(&mut p, BufKind::Alias(src), elem, shape, id)
            }
            Op::Assign(t) => {
                if let Some(&src) = buf_of.get(&args[0]) {
                    p.assigns.push((*t, src));
                }
                continue;
            }
            Op::Transpose { .. } if folded(id) => continue,
            Op::MatMul => {
                let out = new_buf(&mut p, BufKind::Temp, elem, shape, id);
                let mut inputs = Vec::new();
                let mut trans = [false, false];
                for (i, a) in args.iter().enumerate().take(2) {
                    if folded(*a) {
                        trans[i] = true;
                        let src = g.args(*a)[0];
                        inputs.push(buf_of.get(&src).copied().unwrap_or(BufId(0)));
                    } else {
                        inputs.push(buf_of.get(a).copied().unwrap_or(BufId(0)));
                    }
                }
                p.steps.push(Step { kind: StepKind::MatMul { trans_a: trans[0], trans_b: trans[1] }, role: node.role, inputs, output: out });
                out
            }
            op if elementwise(op).is_some() => {
                if fused_into(id).is_some() {
                    continue; // emitted as part of its user
                }
                let out = new_buf(&mut p, BufKind::Temp, Elem::F32, shape.clone(), id);
                // A reduction read by nothing else becomes this kernel's prologue.
                let absorbable = |n: NodeId| users[n.0 as usize].len() == 1 && !needed[n.0 as usize] && g.node(n).role == node.role;
                fuse(g, id, &shape, &buf_of, &fused_into, &absorbable, &mut p, out);
                out
            }
            op => {
                let out = new_buf(&mut p, BufKind::Temp, elem, shape, id);
                let inputs = args.iter().map(|a| buf_of.get(a).copied().unwrap_or(BufId(0))).collect();
                p.steps.push(Step { kind: StepKind::Op(op.clone()), role: node.role, inputs, output: out });
                out
            }
        };
        buf_of.insert(id, b);
    }
    p.loss = buf_of.get(&g.loss).copied().unwrap_or(BufId(0));
    let kept: Vec<BufId> = keep.iter().map(|k| buf_of.get(k).copied().unwrap_or(BufId(0))).collect();
    reuse_dead_buffers(&mut p, &kept);
    update_in_place(&mut p);
    (p, kept)
}

/// The optimizer's update written where its target lives: an assigned value
/// made by a fused update kernel that reads the target's current value at
/// each element's own index, where no later step reads that value, is
/// computed in place (the kernel reads the element, then overwrites it), so
/// a parameter or optimizer state is not held twice. The value's buffer
/// becomes an alias of the target's, and the kernel's input 0 is the target.
fn update_in_place(p: &mut Program) {
    // Indexes, built once: the buffer of each parameter and state, the step
    // writing each storage buffer, and the last step reading each.
    let n = p.buffers.len();
    let mut holder: HashMap<Target, BufId> = HashMap::new();
    for (i, b) in p.buffers.iter().enumerate() {
        let t = match b.kind {
            BufKind::Param(j) => Target::Param(j),
            BufKind::State(j) => Target::State(j),
            _ => continue,
        };
        holder.entry(t).or_insert(BufId(i as u32));
    }
    let mut writer: Vec<Option<usize>> = vec![None; n];
    let mut last_read: Vec<Option<usize>> = vec![None; n];
    for (si, st) in p.steps.iter().enumerate() {
        writer[p.storage(st.output).0 as usize].get_or_insert(si);
        for b in &st.inputs {
            last_read[p.storage(*b).0 as usize] = Some(si);
        }
    }
    let mut assigned: HashMap<BufId, usize> = HashMap::new();
    for (_, v) in &p.assigns {
        *assigned.entry(p.storage(*v)).or_default() += 1;
    }
    for (t, v) in p.assigns.clone() {
        let Some(&target) = holder.get(&t) else { continue };
        let target = p.storage(target);
        let v = p.storage(v);
        if p.buffers[v.0 as usize].kind != BufKind::Temp || p.buffers[v.0 as usize].len() != p.buffers[target.0 as usize].len() {
            continue;
        }
        let Some(si) = writer[v.0 as usize] else { continue };
        let st = &p.steps[si];
        let StepKind::Fused(f) = &st.kind else { continue };
        if st.role != Role::Update {
            continue;
        }
        // The target read at the output's own index, by this kernel only from here on.
        let Some(k) = st.inputs.iter().position(|b| p.storage(*b) == target) else { continue };
        let own = f.col_strides[k] == 1 && (f.row_strides[k] == f.cols || f.rows <= 1);
        let once = st.inputs.iter().filter(|b| p.storage(**b) == target).count() == 1;
        let later = last_read[target.0 as usize].is_some_and(|r| r > si);
        let other_assign = assigned.get(&v).copied().unwrap_or(0) > 1;
        if !own || !once || later || other_assign {
            continue;
        }
        // Input k becomes input 0.
        let mut f = f.clone();
        let mut inputs = st.inputs.clone();
        inputs.swap(0, k);
        f.row_strides.swap(0, k);
        f.col_strides.swap(0, k);
        for inst in f.body.iter_mut() {
            if let Inst::Load(j) = inst {
                *j = if *j == 0 {
                    k
                } else if *j == k {
                    0
                } else {
                    *j
                };
            }
        }
        let out = p.steps[si].output;
        p.steps[si] = Step { kind: StepKind::Fused(f), role: Role::Update, inputs, output: out };
        p.buffers[v.0 as usize].kind = BufKind::Alias(target);
    }
}

/// Liveness-based reuse: a temporary whose value is dead takes over the
/// memory of an earlier temporary of the same size, element type and pass
/// (forward, backward, update) that is dead by then. Values read after the
/// step (the loss, assigned values, kept buffers) and values that live across
/// passes keep memory of their own.
fn reuse_dead_buffers(p: &mut Program, kept: &[BufId]) {
    let n = p.buffers.len();
    let mut def: Vec<Option<usize>> = vec![None; n];
    let mut last: Vec<usize> = vec![0; n];
    let mut pinned = vec![false; n];
    let mut role_of: Vec<Option<Role>> = vec![None; n];
    for (si, st) in p.steps.iter().enumerate() {
        let o = p.storage(st.output).0 as usize;
        if def[o].is_none() {
            def[o] = Some(si);
            role_of[o] = Some(st.role);
        }
        last[o] = last[o].max(si);
        for b in &st.inputs {
            let i = p.storage(*b).0 as usize;
            last[i] = last[i].max(si);
        }
    }
    for b in std::iter::once(p.loss).chain(p.assigns.iter().map(|a| a.1)).chain(kept.iter().copied()) {
        pinned[p.storage(b).0 as usize] = true;
    }
    // A value read by a step of another pass lives across passes.
    for st in &p.steps {
        for b in &st.inputs {
            let i = p.storage(*b).0 as usize;
            if role_of[i].is_some_and(|r| r != st.role) {
                pinned[i] = true;
            }
        }
    }
    let eligible = |i: usize| p.buffers[i].kind == BufKind::Temp && def[i].is_some() && !pinned[i];
    let eligible: Vec<bool> = (0..n).map(eligible).collect();
    // Free memory by (length, element type, pass); `owner` is the buffer whose memory it is.
    let mut free: HashMap<(usize, bool, u8), Vec<usize>> = HashMap::new();
    let mut dies: Vec<Vec<usize>> = vec![Vec::new(); p.steps.len()];
    for i in 0..n {
        if eligible[i] {
            dies[last[i]].push(i);
        }
    }
    let key = |b: &Buffer, r: Role| (b.len(), b.elem == Elem::F32, r as u8);
    let mut owner: Vec<usize> = (0..n).collect();
    for (si, dying) in dies.iter().enumerate() {
        let o = p.storage(p.steps[si].output).0 as usize;
        if eligible[o] && def[o] == Some(si) {
            let k = key(&p.buffers[o], p.steps[si].role);
            if let Some(donor) = free.get_mut(&k).and_then(Vec::pop) {
                owner[o] = donor;
            }
        }
        for &i in dying {
            let k = key(&p.buffers[i], role_of[i].unwrap_or(Role::Forward));
            free.entry(k).or_default().push(owner[i]);
        }
    }
    for (i, &o) in owner.iter().enumerate() {
        if o != i {
            p.buffers[i].kind = BufKind::Alias(BufId(o as u32));
        }
    }
}

/// Emits the fused kernel rooted at `root` (whose buffer is `out`).
#[allow(clippy::too_many_arguments)]
fn fuse(
    g: &Graph,
    root: NodeId,
    shape: &[usize],
    buf_of: &HashMap<NodeId, BufId>,
    fused_into: &dyn Fn(NodeId) -> Option<NodeId>,
    absorbable: &dyn Fn(NodeId) -> bool,
    p: &mut Program,
    out: BufId,
) {
    // Collect the body by walking operands that fuse into this kernel.
    let mut body: Vec<Inst> = Vec::new();
    let mut inputs: Vec<BufId> = Vec::new();
    let mut memo: HashMap<NodeId, usize> = HashMap::new();
    #[allow(clippy::too_many_arguments)]
    fn emit(
        g: &Graph,
        id: NodeId,
        root: NodeId,
        body: &mut Vec<Inst>,
        inputs: &mut Vec<BufId>,
        memo: &mut HashMap<NodeId, usize>,
        buf_of: &HashMap<NodeId, BufId>,
        fused_into: &dyn Fn(NodeId) -> Option<NodeId>,
    ) -> usize {
        if let Some(&r) = memo.get(&id) {
            return r;
        }
        let inner = id == root || fused_into(id).is_some();
        let r = match (inner, elementwise(&g.node(id).op), &g.node(id).op) {
            (_, _, Op::Const(c)) => {
                body.push(Inst::Const(*c));
                body.len() - 1
            }
            (true, Some(kind), _) => {
                let args: Vec<usize> = g.args(id).into_iter().map(|a| emit(g, a, root, body, inputs, memo, buf_of, fused_into)).collect();
                body.push(match kind {
                    Ok(u) => Inst::Unary(u, args[0]),
                    Err(b) => Inst::Binary(b, args[0], args[1]),
                });
                body.len() - 1
            }
            _ => {
                let b = buf_of.get(&id).copied().unwrap_or(BufId(0));
                let k = match inputs.iter().position(|x| *x == b) {
                    Some(k) => k,
                    None => {
                        inputs.push(b);
                        inputs.len() - 1
                    }
                };
                body.push(Inst::Load(k));
                body.len() - 1
            }
        };
        memo.insert(id, r);
        r
    }
    emit(g, root, root, &mut body, &mut inputs, &mut memo, buf_of, fused_into);

    // Choose the widest `cols` (a suffix of the output dims) for which every
    // input reads linearly; inputs that never do are expanded first.
    let in_shapes: Vec<Vec<usize>> = inputs.iter().map(|b| p.buffers[b.0 as usize].shape.clone()).collect();
    let rank = shape.len();
    let mut chosen: Option<(usize, Vec<(usize, usize)>)> = None;
    for k in 0..=rank {
        let strides: Option<Vec<(usize, usize)>> = in_shapes.iter().map(|s| linear_strides(s, shape, k)).collect();
        if let Some(st) = strides {
            chosen = Some((k, st));
            break;
        }
    }
    let (k, strides) = match chosen {
        Some(c) => c,
        None => {
            // Expand the inputs that do not read linearly with cols = last dim.
            let k = rank.saturating_sub(1);
            let mut st = Vec::new();
            for (i, s) in in_shapes.iter().enumerate() {
                match linear_strides(s, shape, k) {
                    Some(x) => st.push(x),
                    None => {
                        let src = inputs[i];
                        let node = p.buffers[src.0 as usize].node;
                        let b = BufId(p.buffers.len() as u32);
                        p.buffers.push(Buffer { kind: BufKind::Temp, elem: Elem::F32, shape: shape.to_vec(), node });
                        p.steps.push(Step { kind: StepKind::Broadcast, role: g.node(root).role, inputs: vec![src], output: b });
                        inputs[i] = b;
                        let cols: usize = shape[k..].iter().product();
                        st.push((cols, 1));
                    }
                }
            }
            (k, st)
        }
    };
    let mut cols: usize = shape[k..].iter().product();
    let mut rows: usize = shape[..k].iter().product();
    let mut strides = strides;
    // A kernel over whole tensors (every input full or scalar) is re-tiled
    // into rows of about 4K elements, so that its rows can be shared out
    // among threads.
    let plain = strides.iter().all(|&(r, c)| (r == cols && c == 1) || (r == 0 && c == 0) || rows == 1 && c == 1);
    if rows == 1 && plain && cols >= 8192 {
        let mut r = 1;
        while cols.is_multiple_of(r * 2) && cols / (r * 2) >= 4096 {
            r *= 2;
        }
        if r > 1 {
            rows = r;
            cols /= r;
            strides = strides.iter().map(|&(_, c)| if c == 1 { (cols, 1) } else { (0, 0) }).collect();
        }
    }
    let mut fused = Fused { rows, cols, row_strides: strides.iter().map(|s| s.0).collect(), col_strides: strides.iter().map(|s| s.1).collect(), body };

    // Epilogue of a reduction: an input that is the whole output of a
    // reduction step read only here, at the output's own index.
    let total = rows * cols;
    let candidate = inputs.iter().enumerate().find_map(|(k, &b)| {
        let full = fused.col_strides[k] == 1 && (fused.row_strides[k] == cols || rows == 1) && p.buffers[b.0 as usize].len() == total;
        let step =
            p.steps.iter().rposition(|s| s.output == b && matches!(&s.kind, StepKind::Op(Op::Sum { .. } | Op::Mean { .. } | Op::Max { .. } | Op::SumTo)))?;
        (full && absorbable(p.buffers[b.0 as usize].node) && p.buffers[b.0 as usize].kind == BufKind::Temp).then_some((k, step, b))
    });
    if let Some((k, step, b)) = candidate {
        // Make the reduction's output input 0 of the epilogue.
        let remap = |i: usize| {
            if i == k {
                0
            } else if i < k {
                i + 1
            } else {
                i
            }
        };
        for inst in &mut fused.body {
            if let Inst::Load(i) = inst {
                *i = remap(*i);
            }
        }
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by_key(|&i| remap(i));
        fused.row_strides = order.iter().map(|&i| fused.row_strides[i]).collect();
        fused.col_strides = order.iter().map(|&i| fused.col_strides[i]).collect();
        let rest: Vec<BufId> = order.iter().skip(1).map(|&i| inputs[i]).collect();
        if let StepKind::Op(op) = p.steps[step].kind.clone() {
            // The combined step runs here, where every epilogue input exists;
            // the reduction's operand existed already where it was.
            let mut reduce = p.steps.remove(step);
            reduce.kind = StepKind::Reduce { op, epilogue: fused };
            reduce.inputs.extend(rest);
            p.steps.push(reduce);
            // The epilogue's result lives where the reduction wrote.
            p.buffers[out.0 as usize].kind = BufKind::Alias(b);
            return;
        }
    }
    p.steps.push(Step { kind: StepKind::Fused(fused), role: g.node(root).role, inputs, output: out });
}

/// (row stride, col stride) of an input of shape `s` broadcast to `out`,
/// iterated with cols = out[k..], if its index is linear in (row, col).
fn linear_strides(s: &[usize], out: &[usize], k: usize) -> Option<(usize, usize)> {
    let pad = out.len() - s.len().min(out.len());
    let full: Vec<usize> = std::iter::repeat_n(1, pad).chain(s.iter().copied()).collect();
    let (lead, trail) = (&full[..k], &full[k..]);
    let (olead, otrail) = (&out[..k], &out[k..]);
    let col = if trail == otrail {
        1
    } else if trail.iter().all(|&d| d == 1) {
        0
    } else {
        return None;
    };
    let inner: usize = trail.iter().product();
    // Leading dims: the input's leading index must be a linear function of
    // the flattened row index, i.e. equal to it (same dims) or constant.
    let row = if lead.iter().all(|&d| d == 1) {
        0
    } else if lead == olead {
        inner
    } else {
        // e.g. [1, S] read as rows of [B, S]: index r mod S is not linear.
        return None;
    };
    Some((row, col))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_cover_common_broadcasts() {
        // x[B, D] + b[D]
        assert_eq!(linear_strides(&[4, 8], &[4, 8], 1), Some((8, 1)));
        assert_eq!(linear_strides(&[8], &[4, 8], 1), Some((0, 1)));
        // keepdims reduction [B, 1] against [B, D]
        assert_eq!(linear_strides(&[4, 1], &[4, 8], 1), Some((1, 0)));
        // scalar
        assert_eq!(linear_strides(&[], &[4, 8], 0), Some((0, 0)));
        assert_eq!(linear_strides(&[], &[4, 8], 1), Some((0, 0)));
        // [B, 1, D] against [B, S, D] is not linear with cols = D
        assert_eq!(linear_strides(&[2, 1, 8], &[2, 3, 8], 2), None);
    }

    #[test]
    fn inputs_and_pass_temporaries_are_banked() {
        let buf = |kind: BufKind| Buffer { kind, elem: Elem::F32, shape: vec![4], node: NodeId(0) };
        let step = |role: Role, inputs: Vec<u32>, output: u32| Step {
            kind: StepKind::Op(Op::Relu),
            role,
            inputs: inputs.into_iter().map(BufId).collect(),
            output: BufId(output),
        };
        // 0 input, 1 param, 2 forward temporary (written through its alias 3), 4 update temporary, 5 accumulator.
        let p = Program {
            buffers: vec![
                buf(BufKind::Input(0)),
                buf(BufKind::Param(0)),
                buf(BufKind::Temp),
                buf(BufKind::Alias(BufId(2))),
                buf(BufKind::Temp),
                buf(BufKind::Accum(0)),
            ],
            steps: vec![step(Role::Forward, vec![0], 3), step(Role::Backward, vec![2], 5), step(Role::Update, vec![1], 4)],
            loss: BufId(2),
            assigns: vec![(Target::Param(0), BufId(4))],
        };
        assert_eq!(p.banked(), vec![true, false, true, false, false, false]);
    }
}

/// Why a program is malformed ([`Program::validate`]): the first problem
/// found, with the buffer and the step it concerns.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ProgramError {
    /// A buffer id names no buffer of the program.
    #[error("{at} is buffer {}, but the program has {buffers} buffers", .buffer.0)]
    UnknownBuffer { at: BufUse, buffer: BufId, buffers: usize },
    /// A buffer's size in bytes is not representable.
    #[error("buffer {buffer} of shape {shape:?} is too large")]
    TooLarge { buffer: usize, shape: Vec<usize> },
    /// A step reads its own output's memory other than as a fused kernel's
    /// input 0 at the output's own index.
    #[error("step {step} reads its own output as operand {operand}")]
    InPlace { step: usize, operand: usize },
    /// A step reads or writes a buffer of an element type it does not take
    /// (bfloat16 buffers are for `ToBf16` and `FromBf16` only).
    #[error("step {step} cannot use buffer {} of {elem:?} values", .buffer.0)]
    Elem { step: usize, buffer: BufId, elem: Elem },
    /// Following a buffer's aliases never ends.
    #[error("the aliases of buffer {buffer} form a loop")]
    AliasLoop { buffer: usize },
    /// An alias has another number of values than the buffer whose memory it shares.
    #[error("buffer {buffer} of {values} values shares the memory of buffer {}, of {storage_values}", .storage.0)]
    AliasSize { buffer: usize, values: usize, storage: BufId, storage_values: usize },
    /// A step has more or fewer operands than its kind (`what`) takes.
    #[error("step {step} ({what}) has {got} operands, but takes {want}")]
    Operands { step: usize, what: String, got: usize, want: usize },
    /// A pack's operands hold another number of values than its output
    /// (`packed` is None when their sum overflows).
    #[error("step {step} (pack) packs operands of {} values into an output of {out}", .packed.map_or_else(|| "too many".to_string(), |p| p.to_string()))]
    Pack { step: usize, packed: Option<usize>, out: usize },
    /// An all-gather along a dim its output does not have.
    #[error("step {step} (all-gather) gathers along dim {dim} of a value with {dims} dims")]
    Gather { step: usize, dim: usize, dims: usize },
    /// An all-reduce whose operand and output differ in size.
    #[error("step {step} (all-reduce) sums {from} values into {into}")]
    AllReduce { step: usize, from: usize, into: usize },
    /// A fused kernel that does not fit its step's operands.
    #[error("step {step} (fused kernel): {error}")]
    Fused { step: usize, error: FusedError },
    /// A reduction with an epilogue that has fewer operands than the reduction takes.
    #[error("step {step} ({op} with an epilogue) has {got} operands, but takes at least {want}")]
    EpilogueOperands { step: usize, op: String, got: usize, want: usize },
    /// A reduction's epilogue that does not fit its step's operands.
    #[error("step {step} (epilogue of {op}): {error}")]
    Epilogue { step: usize, op: String, error: FusedError },
    /// An assignment whose value and target differ in size.
    #[error("assignment {index} writes {values} values to {target:?}, which holds {held}")]
    Assignment { index: usize, target: Target, values: usize, held: usize },
}

/// Where a program names a buffer, as a [`ProgramError::UnknownBuffer`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufUse {
    /// What buffer `.0` aliases.
    AliasOf(usize),
    /// Operand `operand` of step `step`.
    Operand { step: usize, operand: usize },
    /// The output of step `.0`.
    Output(usize),
    /// The loss.
    Loss,
    /// The value of assignment `.0`.
    Assignment(usize),
}

impl std::fmt::Display for BufUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BufUse::AliasOf(i) => write!(f, "buffer {i} aliases a buffer that"),
            BufUse::Operand { step, operand } => write!(f, "operand {operand} of step {step}"),
            BufUse::Output(step) => write!(f, "the output of step {step}"),
            BufUse::Loss => f.write_str("the loss"),
            BufUse::Assignment(k) => write!(f, "the value of assignment {k}"),
        }
    }
}

/// Why a fused kernel does not read the inputs it is given ([`Fused::validate`]).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FusedError {
    /// Not one row and one column stride per input.
    #[error("{rows} row strides and {cols} col strides for {inputs} inputs")]
    Strides { rows: usize, cols: usize, inputs: usize },
    /// The kernel computes nothing.
    #[error("the body is empty")]
    EmptyBody,
    /// Instruction `index` loads an input that does not exist or reads a
    /// value computed at or after it.
    #[error("instruction v{index} ({inst:?}) reads a missing input or a value computed later")]
    Operand { index: usize, inst: Inst },
}

/// Validation of programs read from outside the compiler.
mod validation {
    use super::*;

    impl Program {
        /// Checks that the program is well formed, for programs that come from
        /// outside the compiler (a compiled plan read back from a file), so
        /// that an executor can run it without indexing out of bounds: every
        /// buffer id names a buffer; aliases end, without a loop, at a buffer
        /// of as many values; every buffer's size is representable; every
        /// step has the operands its kind takes (fused kernels one row and one
        /// column stride per input); packs, all-reduces and assignments move
        /// as many values as they hold. Returns the first problem found.
        pub fn validate(&self) -> Result<(), ProgramError> {
            let n = self.buffers.len();
            let known = |buffer: BufId, at: BufUse| if (buffer.0 as usize) < n { Ok(()) } else { Err(ProgramError::UnknownBuffer { at, buffer, buffers: n }) };
            for (i, buf) in self.buffers.iter().enumerate() {
                let elems = buf.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
                if elems.and_then(|e| e.checked_mul(4)).is_none_or(|bytes| bytes > isize::MAX as usize) {
                    return Err(ProgramError::TooLarge { buffer: i, shape: buf.shape.clone() });
                }
                if let BufKind::Alias(a) = buf.kind {
                    known(a, BufUse::AliasOf(i))?;
                }
            }
            // Following aliases must end within `n` steps, or they loop.
            for i in 0..n {
                let mut b = BufId(i as u32);
                let mut hops = 0;
                while let BufKind::Alias(a) = self.buffers[b.0 as usize].kind {
                    hops += 1;
                    if hops > n {
                        return Err(ProgramError::AliasLoop { buffer: i });
                    }
                    b = a;
                }
                // A reshape keeps the number of values of the memory it shares.
                let (own, shared) = (self.buffers[i].len(), self.buffers[b.0 as usize].len());
                if own != shared {
                    return Err(ProgramError::AliasSize { buffer: i, values: own, storage: b, storage_values: shared });
                }
            }
            for (si, s) in self.steps.iter().enumerate() {
                for (k, &b) in s.inputs.iter().enumerate() {
                    known(b, BufUse::Operand { step: si, operand: k })?;
                }
                known(s.output, BufUse::Output(si))?;
                let count = |want: usize, what: &str| {
                    if s.inputs.len() == want {
                        Ok(())
                    } else {
                        Err(ProgramError::Operands { step: si, what: what.to_string(), got: s.inputs.len(), want })
                    }
                };
                match &s.kind {
                    StepKind::Op(Op::Pack { .. }) => {
                        let packed: Option<usize> = s.inputs.iter().try_fold(0usize, |acc, b| acc.checked_add(self.buffers[b.0 as usize].len()));
                        let out = self.buffers[s.output.0 as usize].len();
                        if packed != Some(out) {
                            return Err(ProgramError::Pack { step: si, packed, out });
                        }
                    }
                    StepKind::Op(op) => {
                        count(op.arity(), &op.name())?;
                        let out = &self.buffers[s.output.0 as usize];
                        match op {
                            Op::AllGather { dim, .. } if *dim >= out.shape.len() => {
                                return Err(ProgramError::Gather { step: si, dim: *dim, dims: out.shape.len() });
                            }
                            Op::AllReduce { .. } if self.buffers[s.inputs[0].0 as usize].len() != out.len() => {
                                return Err(ProgramError::AllReduce { step: si, from: self.buffers[s.inputs[0].0 as usize].len(), into: out.len() });
                            }
                            _ => {}
                        }
                    }
                    StepKind::Fused(f) => f.validate(s.inputs.len()).map_err(|error| ProgramError::Fused { step: si, error })?,
                    StepKind::Reduce { op, epilogue } => {
                        let arity = op.arity();
                        if s.inputs.len() < arity {
                            return Err(ProgramError::EpilogueOperands { step: si, op: op.name(), got: s.inputs.len(), want: arity });
                        }
                        // The epilogue reads the reduction's result, then the operands after the reduction's own.
                        epilogue.validate(s.inputs.len() - arity + 1).map_err(|error| ProgramError::Epilogue { step: si, op: op.name(), error })?;
                    }
                    StepKind::MatMul { .. } => count(2, "matmul")?,
                    StepKind::Broadcast => count(1, "broadcast")?,
                }
            }
            // A step reads its own output's memory only as an update in place:
            // a fused kernel's input 0, read at each element's own index.
            for (si, s) in self.steps.iter().enumerate() {
                let out = self.storage(s.output);
                for (k, b) in s.inputs.iter().enumerate() {
                    if self.storage(*b) != out {
                        continue;
                    }
                    let ok = match &s.kind {
                        StepKind::Fused(f) => k == 0 && f.col_strides.first() == Some(&1) && (f.row_strides.first() == Some(&f.cols) || f.rows <= 1),
                        _ => false,
                    };
                    if !ok {
                        return Err(ProgramError::InPlace { step: si, operand: k });
                    }
                }
            }
            // bfloat16 buffers: written by `ToBf16` only, read by `FromBf16` only.
            for (si, s) in self.steps.iter().enumerate() {
                let elem = |b: &BufId| self.buffers[self.storage(*b).0 as usize].elem;
                let (want_in, want_out) = match &s.kind {
                    StepKind::Op(Op::ToBf16) => (Some(Elem::F32), Elem::Bf16),
                    StepKind::Op(Op::FromBf16) => (Some(Elem::Bf16), Elem::F32),
                    _ => (None, elem(&s.output)),
                };
                let bad_in = s.inputs.iter().find(|b| match want_in {
                    Some(w) => elem(b) != w,
                    None => elem(b) == Elem::Bf16,
                });
                if let Some(b) = bad_in {
                    return Err(ProgramError::Elem { step: si, buffer: *b, elem: elem(b) });
                }
                if elem(&s.output) != want_out || (want_in.is_none() && want_out == Elem::Bf16) {
                    return Err(ProgramError::Elem { step: si, buffer: s.output, elem: elem(&s.output) });
                }
            }
            known(self.loss, BufUse::Loss)?;
            for (k, (t, b)) in self.assigns.iter().enumerate() {
                known(*b, BufUse::Assignment(k))?;
                let kind = match *t {
                    Target::Param(i) => BufKind::Param(i),
                    Target::State(i) => BufKind::State(i),
                };
                let value = self.buffers[b.0 as usize].len();
                if let Some(held) = self.buffers.iter().find(|x| x.kind == kind).map(Buffer::len).filter(|&n| n != value) {
                    return Err(ProgramError::Assignment { index: k, target: *t, values: value, held });
                }
            }
            Ok(())
        }
    }

    impl Fused {
        /// Checks that the kernel reads `inputs` inputs: one row and one column
        /// stride per input, loads of existing inputs, operands computed earlier.
        pub fn validate(&self, inputs: usize) -> Result<(), FusedError> {
            if self.row_strides.len() != inputs || self.col_strides.len() != inputs {
                return Err(FusedError::Strides { rows: self.row_strides.len(), cols: self.col_strides.len(), inputs });
            }
            if self.body.is_empty() {
                return Err(FusedError::EmptyBody);
            }
            for (i, inst) in self.body.iter().enumerate() {
                let ok = match *inst {
                    Inst::Load(k) => k < inputs,
                    Inst::Const(_) => true,
                    Inst::Unary(_, a) => a < i,
                    Inst::Binary(_, a, b) => a < i && b < i,
                };
                if !ok {
                    return Err(FusedError::Operand { index: i, inst: *inst });
                }
            }
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::graph::NodeId;

        fn buffer(kind: BufKind, shape: &[usize]) -> Buffer {
            Buffer { kind, elem: Elem::F32, shape: shape.to_vec(), node: NodeId(0) }
        }

        /// x[4] + 1 → y, assigned to parameter 0.
        fn program() -> Program {
            let fused = Fused {
                rows: 1,
                cols: 4,
                row_strides: vec![0],
                col_strides: vec![1],
                body: vec![Inst::Load(0), Inst::Const(1.0), Inst::Binary(Binary::Add, 0, 1)],
            };
            Program {
                buffers: vec![buffer(BufKind::Param(0), &[4]), buffer(BufKind::Temp, &[4]), buffer(BufKind::Alias(BufId(1)), &[2, 2])],
                steps: vec![Step { kind: StepKind::Fused(fused), role: Role::Update, inputs: vec![BufId(0)], output: BufId(1) }],
                loss: BufId(2),
                assigns: vec![(Target::Param(0), BufId(1))],
            }
        }

        #[test]
        fn a_well_formed_program_passes() {
            assert_eq!(program().validate(), Ok(()));
        }

        #[test]
        fn malformed_programs_are_named() {
            let mut p = program();
            p.steps[0].output = BufId(999_999);
            assert_eq!(p.validate(), Err(ProgramError::UnknownBuffer { at: BufUse::Output(0), buffer: BufId(999_999), buffers: 3 }));
            let mut p = program();
            p.buffers[1].kind = BufKind::Alias(BufId(2));
            assert!(matches!(p.validate(), Err(ProgramError::AliasLoop { .. })));
            let mut p = program();
            p.buffers[2].shape = vec![3];
            assert_eq!(p.validate(), Err(ProgramError::AliasSize { buffer: 2, values: 3, storage: BufId(1), storage_values: 4 }));
            let mut p = program();
            p.buffers[1].shape = vec![usize::MAX, 2];
            assert!(p.validate().is_err_and(|e| matches!(e, ProgramError::TooLarge { buffer: 1, .. }) && e.to_string().contains("too large")));
            let mut p = program();
            p.steps[0].inputs.push(BufId(1));
            assert_eq!(p.validate(), Err(ProgramError::Fused { step: 0, error: FusedError::Strides { rows: 1, cols: 1, inputs: 2 } }));
            let mut p = program();
            p.steps[0].kind = StepKind::MatMul { trans_a: false, trans_b: false };
            assert!(p.validate().is_err_and(|e| matches!(e, ProgramError::Operands { step: 0, want: 2, .. }) && e.to_string().contains("operands")));
            let mut p = program();
            p.loss = BufId(3);
            assert_eq!(p.validate().map_err(|e| e.to_string()), Err("the loss is buffer 3, but the program has 3 buffers".to_string()));
        }
    }
}
