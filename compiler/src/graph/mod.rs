//! Graph: the checked forward trace → a typed computation graph (petgraph).
//!
//! Input: a [`Checked`] plan. Output: a [`Graph`] whose nodes are operations
//! with their result types and whose edges carry operands in order. Only what
//! the loss depends on is kept. Attention is lowered here to matmuls, a
//! causal mask and a softmax, so later stages (autodiff, kernels, the
//! partitioner) need no attention-specific rules.
//!
//! Invariants (checked by [`Graph::verify`], which names the first node
//! that breaks one in a [`GraphError`]): acyclic; every node's operand count
//! matches its op; node ids are dense and in a valid execution order.

mod autocast;
mod dot;

pub use dot::to_dot;

use crate::check::{Checked, DType, Dim, Prim, Ty, Unit};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A node of the graph. Ids are dense, in execution order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u32);

/// Per-step scalars supplied by the executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Hyper {
    /// Learning rate after the schedule.
    Lr,
    /// Adam's bias corrections, 1 / (1 - beta^t).
    BiasCorrection1,
    BiasCorrection2,
    /// The step's number, from 0 (exact to 2^24 in the f32 buffer that holds it).
    Step,
}

/// Where an `Assign` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    Param(usize),
    State(usize),
}

/// Which part of the step a node belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Forward,
    Backward,
    Update,
}

/// The closed set of operations. Every pass matches on it exhaustively.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    // ---- sources
    Input(usize),
    Param(usize),
    /// Optimizer state `i` of `Graph::states`.
    State(usize),
    Hyper(Hyper),
    /// A scalar constant of the node's dtype.
    Const(f64),
    // ---- element-wise (operands broadcast to the node's shape)
    Add,
    Sub,
    Mul,
    Div,
    Neg,
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
    Exp,
    Log,
    Sqrt,
    /// (x, dy): dy where x > 0.
    ReluGrad,
    /// (x, dy): dy · gelu'(x).
    GeluGrad,
    /// min(1, max_norm / (x + 1e-6)), for clipping by global norm.
    ClipScale {
        max_norm: f64,
    },
    // ---- structure and reductions
    MatMul,
    Reshape,
    Transpose {
        perm: Vec<usize>,
    },
    Sum {
        axes: Vec<usize>,
        keepdims: bool,
    },
    Mean {
        axes: Vec<usize>,
        keepdims: bool,
    },
    Max {
        axes: Vec<usize>,
        keepdims: bool,
    },
    /// (x, y, dy): the gradient of Max, shared equally among tied maxima.
    MaxGrad {
        axes: Vec<usize>,
        keepdims: bool,
    },
    /// Sums the operand over broadcast dims down to the node's shape.
    SumTo,
    /// Broadcasts the operand (a reduction result) back to the node's shape.
    Expand {
        axes: Vec<usize>,
        keepdims: bool,
    },
    Softmax {
        axis: usize,
    },
    LogSoftmax {
        axis: usize,
    },
    /// (y, dy) with y = softmax(x).
    SoftmaxGrad {
        axis: usize,
    },
    /// (y, dy) with y = log_softmax(x).
    LogSoftmaxGrad {
        axis: usize,
    },
    /// (x, gamma, beta) over the last axis.
    LayerNorm {
        eps: f64,
    },
    /// (x, gamma, dy) → dx.
    LayerNormGradX {
        eps: f64,
    },
    /// (x, dy) → dgamma (the last axis of x).
    LayerNormGradGamma {
        eps: f64,
    },
    /// (x, gamma) over the last axis: x / √(mean(x²) + eps) · gamma.
    RmsNorm {
        eps: f64,
    },
    /// (x, gamma, dy) → dx.
    RmsNormGradX {
        eps: f64,
    },
    /// (x, dy) → dgamma (the last axis of x).
    RmsNormGradGamma {
        eps: f64,
    },
    /// Keeps entries with key index ≤ query index of the last two axes; the
    /// others become `fill`.
    CausalMask {
        fill: f64,
    },
    /// Rotary position embedding over [batch, seq, heads·head_dim]: the pair
    /// (2i, 2i+1) of each head at position p turns by angle p · base^(-2i/head_dim),
    /// or back by it when `inverse` (the backward pass).
    Rope {
        head_dim: usize,
        base: f64,
        inverse: bool,
    },
    /// The windows of an image batch x [n, c, h, w] as [n, oh, ow, c, kh, kw]:
    /// element (n, i, j, c, a, b) is x[n, c, i·stride + a − padding,
    /// j·stride + b − padding], or `fill` where that lies in the padding.
    Im2Col {
        kh: usize,
        kw: usize,
        stride: usize,
        padding: usize,
        fill: f64,
    },
    /// The adjoint of `Im2Col` (fill 0): windows [n, oh, ow, c, kh, kw] summed
    /// back into an image of the node's shape [n, c, h, w].
    Col2Im {
        kh: usize,
        kw: usize,
        stride: usize,
        padding: usize,
    },
    /// (x, sample ids [batch], step): element j of sample row r is kept, and
    /// scaled by 1 / (1 − p), unless [`dropout_drops`] says so for
    /// (seed, step, ids[r], j). Its gradient is the same op applied to dy.
    Dropout {
        p: f64,
        seed: u64,
    },
    /// f32 → bf16, rounded to nearest (ties to even): what `autocast bf16`
    /// stores. NaN stays NaN, infinities stay infinite.
    ToBf16,
    /// bf16 → f32, exact.
    FromBf16,
    /// (table, ids)
    Embedding,
    /// (ids, dy) → d table, rows scatter-added.
    EmbeddingGrad,
    /// (logits, labels): mean over label positions.
    CrossEntropy,
    /// (logits, labels, dloss) → dlogits.
    CrossEntropyGrad,
    /// (pred, target): mean of squares.
    Mse,
    /// (pred, target, dloss) → dpred.
    MseGrad,
    // ---- effects
    /// Writes the operand to a parameter or optimizer state at the end of the step.
    Assign(Target),
    // ---- per-device programs of a partitioned plan (never in a global graph)
    /// Sums the operand over the devices of `group` (ring order), naming `axis` in errors.
    AllReduce {
        group: Vec<u32>,
        id: u32,
        axis: String,
    },
    /// Concatenates the members' parts along `dim`; member `i` holds chunk
    /// `i` (in whole granules of `granule` elements) of the node's dim.
    AllGather {
        group: Vec<u32>,
        id: u32,
        axis: String,
        dim: usize,
        granule: usize,
    },
    /// Sums the members' full-size operands and keeps this member's chunk
    /// `i` (in whole granules) of the sum along `dim`.
    ReduceScatter {
        group: Vec<u32>,
        id: u32,
        axis: String,
        dim: usize,
        granule: usize,
    },
    /// Re-splits a value split along `from` (granule `from_granule`) into
    /// one split along `to` (granule `to_granule`): member `i` ends with
    /// chunk `i` along `to` and the whole of `from`.
    AllToAll {
        group: Vec<u32>,
        id: u32,
        axis: String,
        from: usize,
        from_granule: usize,
        to: usize,
        to_granule: usize,
    },
    /// The part of the operand starting at `start` along `dim`, the node's size long.
    Slice {
        dim: usize,
        start: usize,
    },
    /// Sends the operand to device `to`. The node is a scalar placeholder.
    Send {
        to: u32,
        id: u32,
    },
    /// Receives a value of the node's type from device `from`.
    Recv {
        from: u32,
        id: u32,
    },
    /// Adds the operand into gradient accumulator `k` (zeroed at the start of each step).
    Accumulate(usize),
    /// The value of gradient accumulator `k`.
    Accumulated(usize),
    /// Flattens and concatenates its `n` operands.
    Pack {
        n: usize,
    },
    /// Elements `[offset, offset + len)` of a packed operand, in the node's shape.
    Unpack {
        offset: usize,
    },
}

impl Op {
    /// Number of operands, where fixed.
    pub fn arity(&self) -> usize {
        use Op::*;
        match self {
            Input(_) | Param(_) | State(_) | Hyper(_) | Const(_) | Recv { .. } | Accumulated(_) => 0,
            Pack { n } => *n,
            Neg
            | Relu
            | Gelu
            | Tanh
            | Sigmoid
            | Exp
            | Log
            | Sqrt
            | ClipScale { .. }
            | Reshape
            | Transpose { .. }
            | Sum { .. }
            | Mean { .. }
            | Max { .. }
            | SumTo
            | Expand { .. }
            | Softmax { .. }
            | LogSoftmax { .. }
            | CausalMask { .. }
            | Rope { .. }
            | Im2Col { .. }
            | Col2Im { .. }
            | ToBf16
            | FromBf16
            | Assign(_)
            | AllReduce { .. }
            | AllGather { .. }
            | ReduceScatter { .. }
            | AllToAll { .. }
            | Slice { .. }
            | Send { .. }
            | Accumulate(_)
            | Unpack { .. } => 1,
            Add
            | Sub
            | Mul
            | Div
            | ReluGrad
            | GeluGrad
            | MatMul
            | SoftmaxGrad { .. }
            | LogSoftmaxGrad { .. }
            | LayerNormGradGamma { .. }
            | RmsNorm { .. }
            | RmsNormGradGamma { .. }
            | Embedding
            | EmbeddingGrad
            | CrossEntropy
            | Mse => 2,
            MaxGrad { .. } | LayerNorm { .. } | LayerNormGradX { .. } | RmsNormGradX { .. } | Dropout { .. } | CrossEntropyGrad | MseGrad => 3,
        }
    }

    /// Operations that talk to other devices.
    pub fn is_comm(&self) -> bool {
        matches!(self, Op::AllReduce { .. } | Op::AllGather { .. } | Op::ReduceScatter { .. } | Op::AllToAll { .. } | Op::Send { .. } | Op::Recv { .. })
    }

    /// Short name for listings and DOT.
    pub fn name(&self) -> String {
        use Op::*;
        match self {
            Input(i) => format!("input {i}"),
            Param(i) => format!("param {i}"),
            State(i) => format!("state {i}"),
            Hyper(h) => format!("{h:?}").to_lowercase(),
            Const(c) => format!("{c}"),
            Transpose { perm } => format!("transpose {perm:?}"),
            Sum { axes, keepdims } => format!("sum {axes:?}{}", if *keepdims { " keep" } else { "" }),
            Mean { axes, keepdims } => format!("mean {axes:?}{}", if *keepdims { " keep" } else { "" }),
            Max { axes, keepdims } => format!("max {axes:?}{}", if *keepdims { " keep" } else { "" }),
            MaxGrad { axes, .. } => format!("max_grad {axes:?}"),
            Expand { axes, .. } => format!("expand {axes:?}"),
            Softmax { axis } => format!("softmax {axis}"),
            LogSoftmax { axis } => format!("log_softmax {axis}"),
            SoftmaxGrad { axis } => format!("softmax_grad {axis}"),
            LogSoftmaxGrad { axis } => format!("log_softmax_grad {axis}"),
            ClipScale { max_norm } => format!("clip_scale {max_norm}"),
            CausalMask { fill } => format!("causal_mask {fill}"),
            Im2Col { kh, kw, stride, padding, .. } => format!("im2col {kh}×{kw} stride {stride} padding {padding}"),
            Col2Im { kh, kw, stride, padding } => format!("col2im {kh}×{kw} stride {stride} padding {padding}"),
            Dropout { p, .. } => format!("dropout {p}"),
            ToBf16 => "to bf16".into(),
            FromBf16 => "from bf16".into(),
            Rope { head_dim, base, inverse } => format!("rope{} head_dim {head_dim} base {base}", if *inverse { " inverse" } else { "" }),
            Assign(Target::Param(i)) => format!("assign param {i}"),
            Assign(Target::State(i)) => format!("assign state {i}"),
            AllReduce { axis, .. } => format!("all-reduce({axis})"),
            AllGather { axis, dim, .. } => format!("all-gather({axis}) dim {dim}"),
            ReduceScatter { axis, dim, .. } => format!("reduce-scatter({axis}) dim {dim}"),
            AllToAll { axis, from, to, .. } => format!("all-to-all({axis}) dim {from} → {to}"),
            Slice { dim, start } => format!("slice dim {dim} from {start}"),
            Send { to, .. } => format!("send to {to}"),
            Recv { from, .. } => format!("recv from {from}"),
            Accumulate(k) => format!("accumulate {k}"),
            Accumulated(k) => format!("accumulated {k}"),
            Pack { n } => format!("pack {n}"),
            Unpack { offset } => format!("unpack at {offset}"),
            other => {
                let s = format!("{other:?}");
                let base = s.split([' ', '{', '(']).next().unwrap_or(&s).to_string();
                snake(&base)
            }
        }
    }

    /// Element-wise ops: each output element depends only on the operands'
    /// elements at the same (broadcast) index. Fusion chains these.
    pub fn is_elementwise(&self) -> bool {
        use Op::*;
        matches!(self, Add | Sub | Mul | Div | Neg | Relu | Gelu | Tanh | Sigmoid | Exp | Log | Sqrt | ReluGrad | GeluGrad | ClipScale { .. })
    }
}

fn snake(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub ty: Ty,
    pub role: Role,
}

/// An optimizer state tensor (momentum buffer, Adam moments).
#[derive(Clone, Debug)]
pub struct StateVar {
    /// `optim.m.fc1.w`: the checkpoint name.
    pub name: String,
    pub ty: Ty,
    /// The parameter it belongs to.
    pub param: usize,
}

/// The computation of one training step.
#[derive(Clone, Debug)]
pub struct Graph {
    g: DiGraph<Node, usize>,
    /// The loss node.
    pub loss: NodeId,
    /// Gradient of each parameter (filled by autodiff).
    pub grads: HashMap<usize, NodeId>,
    pub states: Vec<StateVar>,
    /// For each backward node, the forward node whose rule made it (filled
    /// by autodiff; the partitioner places a backward node with its origin).
    pub origin: HashMap<NodeId, NodeId>,
    /// For each forward node made inside a call of a top-level layer (or a
    /// `repeat` element), that layer: what `recompute` names.
    pub units: HashMap<NodeId, Unit>,
}

impl Graph {
    pub(crate) fn new() -> Graph {
        Graph { g: DiGraph::new(), loss: NodeId(0), grads: HashMap::new(), states: Vec::new(), origin: HashMap::new(), units: HashMap::new() }
    }

    /// Adds a node; operands must already exist, which keeps ids in execution order.
    pub fn add(&mut self, op: Op, args: &[NodeId], ty: Ty, role: Role) -> NodeId {
        let n = self.g.add_node(Node { op, ty, role });
        for (i, a) in args.iter().enumerate() {
            self.g.add_edge(NodeIndex::new(a.0 as usize), n, i);
        }
        NodeId(n.index() as u32)
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[NodeIndex::new(id.0 as usize)]
    }

    /// Operands of `id`, in order.
    pub fn args(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(usize, NodeId)> = self
            .g
            .edges_directed(NodeIndex::new(id.0 as usize), petgraph::Direction::Incoming)
            .map(|e| (*e.weight(), NodeId(e.source().index() as u32)))
            .collect();
        e.sort_by_key(|(i, _)| *i);
        e.into_iter().map(|(_, n)| n).collect()
    }

    /// The nodes that use `id` (once each per operand slot), in no set order.
    pub fn users_of(&self, id: NodeId) -> Vec<NodeId> {
        self.g.edges_directed(NodeIndex::new(id.0 as usize), petgraph::Direction::Outgoing).map(|e| NodeId(e.target().index() as u32)).collect()
    }

    /// Number of nodes that use `id`.
    pub fn users(&self, id: NodeId) -> usize {
        self.g.edges_directed(NodeIndex::new(id.0 as usize), petgraph::Direction::Outgoing).count()
    }

    /// All node ids in execution order.
    pub fn ids(&self) -> impl Iterator<Item = NodeId> {
        (0..self.g.node_count() as u32).map(NodeId)
    }

    /// The assignments (param/state targets and their value nodes).
    pub fn assigns(&self) -> Vec<(Target, NodeId)> {
        self.ids()
            .filter_map(|id| match self.node(id).op {
                Op::Assign(t) => self.args(id).first().map(|a| (t, *a)),
                _ => None,
            })
            .collect()
    }

    /// Structural invariants; a failure is a compiler bug.
    pub fn verify(&self) -> Result<(), GraphError> {
        for id in self.ids() {
            let n = self.node(id);
            let args = self.args(id);
            if args.len() != n.op.arity() {
                return Err(GraphError::Arity { node: id, op: n.op.name(), got: args.len(), want: n.op.arity() });
            }
            if let Some(a) = args.iter().find(|a| a.0 >= id.0) {
                return Err(GraphError::Order { node: id, operand: *a });
            }
            if n.op.is_elementwise() {
                for a in &args {
                    let at = &self.node(*a).ty;
                    if crate::check::broadcast_shapes(&at.shape, &n.ty.shape).map(|s| s.iter().map(|d| d.size).collect::<Vec<_>>())
                        != Ok(n.ty.shape.iter().map(|d| d.size).collect())
                    {
                        return Err(GraphError::Broadcast { node: id, op: n.op.name(), operand: *a, operand_ty: at.clone(), ty: n.ty.clone() });
                    }
                }
            }
        }
        Ok(())
    }
}

/// The first node of a graph that breaks one of its invariants (see
/// [`Graph::verify`]): a bug in the stage that built the graph.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GraphError {
    /// The node has more or fewer operands than its op takes.
    #[error("node {} ({op}) has {got} operands, expected {want}", .node.0)]
    Arity { node: NodeId, op: String, got: usize, want: usize },
    /// The node reads a node that comes after it in execution order.
    #[error("node {} uses node {} defined later", .node.0, .operand.0)]
    Order { node: NodeId, operand: NodeId },
    /// An element-wise node's operand does not broadcast to its result.
    #[error("node {} ({op}): operand {} of type {operand_ty} does not broadcast to {ty}", .node.0, .operand.0)]
    Broadcast { node: NodeId, op: String, operand: NodeId, operand_ty: Ty, ty: Ty },
}

impl GraphError {
    /// The node that breaks the invariant.
    pub fn node(&self) -> NodeId {
        match self {
            GraphError::Arity { node, .. } | GraphError::Order { node, .. } | GraphError::Broadcast { node, .. } => *node,
        }
    }
}

/// Builds the forward graph of a checked plan for training: the nodes the loss
/// depends on.
pub fn build(c: &Checked) -> Graph {
    build_for(c, true)
}

/// As [`build`]; without `training` (evaluation), dropout passes its input
/// through.
pub fn build_for(c: &Checked, training: bool) -> Graph {
    let m = &c.model;
    let mut g = Graph::new();
    let Some(loss) = m.loss_node else { return g };
    // Live set: what the loss depends on.
    let mut live = vec![false; m.trace.len()];
    live[loss.0 as usize] = true;
    for i in (0..m.trace.len()).rev() {
        if live[i] {
            for a in &m.trace[i].args {
                live[a.0 as usize] = true;
            }
        }
    }
    let mut map: Vec<Option<NodeId>> = vec![None; m.trace.len()];
    // Dropout's operands: the samples' indices (an input after the model's
    // own, filled by the data loader) and the step, made on first use.
    let mut dropout_args: Option<(NodeId, NodeId)> = None;
    for (i, t) in m.trace.iter().enumerate() {
        if !live[i] {
            continue;
        }
        let args: Vec<NodeId> = t.args.iter().filter_map(|a| map[a.0 as usize]).collect();
        let f = Role::Forward;
        let first = g.len();
        let id = match &t.prim {
            Prim::Attention { heads, kv_heads, causal } if kv_heads == heads && *causal => attention(&mut g, &args, *heads, &t.ty),
            Prim::Attention { heads, kv_heads, causal } => grouped_attention(&mut g, &args, *heads, *kv_heads, *causal, &t.ty),
            Prim::Dropout { .. } if !training => args[0],
            Prim::Dropout { p } => {
                let (ids, step) = *dropout_args.get_or_insert_with(|| {
                    let ids = g.add(Op::Input(m.inputs.len()), &[], Ty::new(DType::I32, vec![t.ty.shape[0].clone()]), f);
                    (ids, g.add(Op::Hyper(Hyper::Step), &[], Ty::scalar(DType::F32), f))
                });
                g.add(Op::Dropout { p: *p, seed: c.train.seed }, &[args[0], ids, step], t.ty.clone(), f)
            }
            Prim::Conv2d { stride, padding } => conv2d(&mut g, &args, *stride, *padding, &t.ty),
            Prim::Pool2d { kernel, stride, padding, max } => pool2d(&mut g, args[0], *kernel, *stride, *padding, *max, &t.ty),
            p => g.add(forward_op(p), &args, t.ty.clone(), f),
        };
        map[i] = Some(id);
        if let Some(u) = t.unit {
            for n in first..g.len() {
                g.units.insert(NodeId(n as u32), u);
            }
        }
    }
    g.loss = map[loss.0 as usize].unwrap_or(NodeId(0));
    if !c.autocast.is_empty() {
        g = autocast::apply(&g, &c.autocast);
    }
    g
}

fn forward_op(p: &Prim) -> Op {
    match p {
        Prim::Input(i) => Op::Input(*i),
        Prim::Param(i) => Op::Param(*i),
        Prim::Const(c) => Op::Const(*c),
        Prim::Add => Op::Add,
        Prim::Sub => Op::Sub,
        Prim::Mul => Op::Mul,
        Prim::Div => Op::Div,
        Prim::Neg => Op::Neg,
        Prim::MatMul => Op::MatMul,
        Prim::Relu => Op::Relu,
        Prim::Gelu => Op::Gelu,
        Prim::Tanh => Op::Tanh,
        Prim::Sigmoid => Op::Sigmoid,
        Prim::Exp => Op::Exp,
        Prim::Log => Op::Log,
        Prim::Sqrt => Op::Sqrt,
        Prim::Softmax { axis } => Op::Softmax { axis: *axis },
        Prim::LogSoftmax { axis } => Op::LogSoftmax { axis: *axis },
        Prim::LayerNorm { eps } => Op::LayerNorm { eps: *eps },
        Prim::RmsNorm { eps } => Op::RmsNorm { eps: *eps },
        Prim::Sum { axes, keepdims } => Op::Sum { axes: axes.clone(), keepdims: *keepdims },
        Prim::Mean { axes, keepdims } => Op::Mean { axes: axes.clone(), keepdims: *keepdims },
        Prim::Max { axes, keepdims } => Op::Max { axes: axes.clone(), keepdims: *keepdims },
        Prim::Reshape => Op::Reshape,
        Prim::Transpose { perm } => Op::Transpose { perm: perm.clone() },
        Prim::Embedding => Op::Embedding,
        Prim::Rope { head_dim, base } => Op::Rope { head_dim: *head_dim, base: *base, inverse: false },
        Prim::CrossEntropy => Op::CrossEntropy,
        Prim::Mse => Op::Mse,
        // Lowered by `attention`, `conv2d` and `pool2d`.
        Prim::Attention { .. } | Prim::Conv2d { .. } | Prim::Pool2d { .. } | Prim::Dropout { .. } => Op::MatMul,
    }
}

/// attention(q, k, v) with H query heads and KV key/value heads (KV divides
/// H; each key/value head serves G = H / KV query heads), causal or not, as
/// primitives. Heads are laid out head-major along the last dim, so a
/// tensor-parallel split of q's columns and of k's and v's keeps whole groups
/// together, as Megatron splits them:
/// q [B,S,KV·G·Dh] → [B,KV,G,S,Dh]; k [B,S,KV·Dh] → [B,KV,1,Dh,S];
/// scores [B,KV,G,S,S] (the matmul broadcasts k over the group) → mask →
/// softmax → ·v [B,KV,1,S,Dh] → [B,KV,G,S,Dh] → [B,S,KV·G·Dh].
pub(crate) fn grouped_attention(g: &mut Graph, args: &[NodeId], heads: usize, kv_heads: usize, causal: bool, ty: &Ty) -> NodeId {
    let f = Role::Forward;
    let (b, s, d) = (ty.shape[0].clone(), ty.shape[1].clone(), ty.shape[2].clone());
    let dt = ty.dtype;
    let (h, kv) = (heads.max(1) as i64, kv_heads.max(1) as i64);
    let (dh, kvd, gd, one) = (Dim::known(d.size / h), Dim::known(kv), Dim::known(h / kv), Dim::known(1));
    let t = |dims: &[&Dim]| Ty::new(dt, dims.iter().map(|x| (*x).clone()).collect());
    let q5 = g.add(Op::Reshape, &[args[0]], t(&[&b, &s, &kvd, &gd, &dh]), f);
    let q = g.add(Op::Transpose { perm: vec![0, 2, 3, 1, 4] }, &[q5], t(&[&b, &kvd, &gd, &s, &dh]), f);
    let k5 = g.add(Op::Reshape, &[args[1]], t(&[&b, &s, &kvd, &one, &dh]), f);
    let kt = g.add(Op::Transpose { perm: vec![0, 2, 3, 4, 1] }, &[k5], t(&[&b, &kvd, &one, &dh, &s]), f);
    let v5 = g.add(Op::Reshape, &[args[2]], t(&[&b, &s, &kvd, &one, &dh]), f);
    let v = g.add(Op::Transpose { perm: vec![0, 2, 3, 1, 4] }, &[v5], t(&[&b, &kvd, &one, &s, &dh]), f);
    let scores_ty = t(&[&b, &kvd, &gd, &s, &s]);
    let scores = g.add(Op::MatMul, &[q, kt], scores_ty.clone(), f);
    let scale = g.add(Op::Const(1.0 / (dh.size as f64).sqrt()), &[], Ty::scalar(dt), f);
    let mut scaled = g.add(Op::Mul, &[scores, scale], scores_ty.clone(), f);
    if causal {
        scaled = g.add(Op::CausalMask { fill: f64::NEG_INFINITY }, &[scaled], scores_ty.clone(), f);
    }
    let p = g.add(Op::Softmax { axis: 4 }, &[scaled], scores_ty, f);
    let o = g.add(Op::MatMul, &[p, v], t(&[&b, &kvd, &gd, &s, &dh]), f);
    let ot = g.add(Op::Transpose { perm: vec![0, 3, 1, 2, 4] }, &[o], t(&[&b, &s, &kvd, &gd, &dh]), f);
    g.add(Op::Reshape, &[ot], Ty::new(dt, vec![b, s, d]), f)
}

/// conv2d(x [N, C, H, W], w [O, C, KH, KW]) as one matmul over the windows
/// (im2col): [N, OH·OW, C·KH·KW] @ [C·KH·KW, O] → [N, OH·OW, O] → [N, O, OH, OW].
/// Its backward pass is the matmul's and `Col2Im`.
pub(crate) fn conv2d(g: &mut Graph, args: &[NodeId], stride: usize, padding: usize, ty: &Ty) -> NodeId {
    let f = Role::Forward;
    let dt = ty.dtype;
    let (xs, ws) = (g.node(args[0]).ty.shape.clone(), g.node(args[1]).ty.shape.clone());
    let (n, c, kh, kw) = (xs[0].clone(), xs[1].size, ws[2].size, ws[3].size);
    let (o, oh, ow) = (ty.shape[1].clone(), ty.shape[2].size, ty.shape[3].size);
    let k = Dim::known(c * kh * kw);
    let p = Dim::known(oh * ow);
    let d = |v: i64| Dim::known(v);
    let cols_ty = Ty::new(dt, vec![n.clone(), d(oh), d(ow), d(c), d(kh), d(kw)]);
    let cols = g.add(Op::Im2Col { kh: kh as usize, kw: kw as usize, stride, padding, fill: 0.0 }, &[args[0]], cols_ty, f);
    let rows = g.add(Op::Reshape, &[cols], Ty::new(dt, vec![n.clone(), p.clone(), k.clone()]), f);
    let w2 = g.add(Op::Reshape, &[args[1]], Ty::new(dt, vec![o.clone(), k.clone()]), f);
    let wt = g.add(Op::Transpose { perm: vec![1, 0] }, &[w2], Ty::new(dt, vec![k, o.clone()]), f);
    let y = g.add(Op::MatMul, &[rows, wt], Ty::new(dt, vec![n.clone(), p.clone(), o.clone()]), f);
    let yt = g.add(Op::Transpose { perm: vec![0, 2, 1] }, &[y], Ty::new(dt, vec![n, o, p]), f);
    g.add(Op::Reshape, &[yt], ty.clone(), f)
}

/// max_pool2d / avg_pool2d of x [N, C, H, W]: the windows (padding is −∞
/// for max, 0 for the mean, which counts it as PyTorch does by default)
/// moved to [N, C, OH, OW, K·K], then the max or the mean of the last axis.
pub(crate) fn pool2d(g: &mut Graph, x: NodeId, kernel: usize, stride: usize, padding: usize, max: bool, ty: &Ty) -> NodeId {
    let f = Role::Forward;
    let dt = ty.dtype;
    let (n, c, oh, ow) = (ty.shape[0].clone(), ty.shape[1].clone(), ty.shape[2].clone(), ty.shape[3].clone());
    let k = Dim::known(kernel as i64);
    let fill = if max { f64::NEG_INFINITY } else { 0.0 };
    let cols_ty = Ty::new(dt, vec![n.clone(), oh.clone(), ow.clone(), c.clone(), k.clone(), k.clone()]);
    let cols = g.add(Op::Im2Col { kh: kernel, kw: kernel, stride, padding, fill }, &[x], cols_ty, f);
    let moved =
        g.add(Op::Transpose { perm: vec![0, 3, 1, 2, 4, 5] }, &[cols], Ty::new(dt, vec![n.clone(), c.clone(), oh.clone(), ow.clone(), k.clone(), k]), f);
    let windows = g.add(Op::Reshape, &[moved], Ty::new(dt, vec![n, c, oh, ow, Dim::known((kernel * kernel) as i64)]), f);
    let op = if max { Op::Max { axes: vec![4], keepdims: false } } else { Op::Mean { axes: vec![4], keepdims: false } };
    g.add(op, &[windows], ty.clone(), f)
}

/// causal_attention(q, k, v) over [B, S, D] with H heads, as primitives:
/// split heads → scores q·kᵀ/√(D/H) → causal mask → softmax → ·v → merge heads.
pub(crate) fn attention(g: &mut Graph, args: &[NodeId], heads: usize, ty: &Ty) -> NodeId {
    let f = Role::Forward;
    let (b, s, d) = (ty.shape[0].clone(), ty.shape[1].clone(), ty.shape[2].clone());
    let dt = ty.dtype;
    let h = heads.max(1) as i64;
    let dh = Dim::known(d.size / h);
    let hd = Dim::known(h);
    let split = |g: &mut Graph, x: NodeId| {
        let r = g.add(Op::Reshape, &[x], Ty::new(dt, vec![b.clone(), s.clone(), hd.clone(), dh.clone()]), f);
        g.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[r], Ty::new(dt, vec![b.clone(), hd.clone(), s.clone(), dh.clone()]), f)
    };
    let (q, k, v) = (split(g, args[0]), split(g, args[1]), split(g, args[2]));
    let kt = g.add(Op::Transpose { perm: vec![0, 1, 3, 2] }, &[k], Ty::new(dt, vec![b.clone(), hd.clone(), dh.clone(), s.clone()]), f);
    let scores_ty = Ty::new(dt, vec![b.clone(), hd.clone(), s.clone(), s.clone()]);
    let scores = g.add(Op::MatMul, &[q, kt], scores_ty.clone(), f);
    let scale = g.add(Op::Const(1.0 / (dh.size as f64).sqrt()), &[], Ty::scalar(dt), f);
    let scaled = g.add(Op::Mul, &[scores, scale], scores_ty.clone(), f);
    let masked = g.add(Op::CausalMask { fill: f64::NEG_INFINITY }, &[scaled], scores_ty.clone(), f);
    let p = g.add(Op::Softmax { axis: 3 }, &[masked], scores_ty, f);
    let o = g.add(Op::MatMul, &[p, v], Ty::new(dt, vec![b.clone(), hd.clone(), s.clone(), dh.clone()]), f);
    let ot = g.add(Op::Transpose { perm: vec![0, 2, 1, 3] }, &[o], Ty::new(dt, vec![b.clone(), s.clone(), hd, dh]), f);
    g.add(Op::Reshape, &[ot], Ty::new(dt, vec![b, s, d]), f)
}

/// The angle by which `Op::Rope` turns pair `i` (elements 2i and 2i+1) of a
/// head of `head_dim` at position `pos`: pos · base^(-2i/head_dim). Every
/// backend computes it this way, in f64.
pub fn rope_angle(pos: usize, i: usize, head_dim: usize, base: f64) -> f64 {
    pos as f64 * base.powf(-((2 * i) as f64) / head_dim as f64)
}

/// The image row (or column) that window position `i`, offset `a` reads in
/// an `Im2Col` of `size` rows: i·stride + a − padding, or None in the padding.
pub fn window_source(i: usize, a: usize, stride: usize, padding: usize, size: usize) -> Option<usize> {
    (i * stride + a).checked_sub(padding).filter(|&y| y < size)
}

/// (n, c, h, w, oh, ow) when `cols` are the kh × kw windows (stride,
/// padding) of an image of shape `image`, as `Op::Im2Col` makes them; None
/// when the shapes do not fit together.
pub fn window_geometry(image: &[usize], cols: &[usize], (kh, kw): (usize, usize), stride: usize, padding: usize) -> Option<[usize; 6]> {
    let (&[n, c, h, w], &[n2, oh, ow, c2, kh2, kw2]) = (image, cols) else { return None };
    let fits = |size: usize, k: usize, o: usize| stride > 0 && size + 2 * padding >= k && (size + 2 * padding - k) / stride + 1 == o;
    (n == n2 && c == c2 && kh == kh2 && kw == kw2 && fits(h, kh, oh) && fits(w, kw, ow)).then_some([n, c, h, w, oh, ow])
}

/// `x` rounded to the nearest bfloat16 (ties to even), as its 16 bits: the
/// upper half of the f32 it rounds to. NaN keeps a quiet NaN.
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// The f32 of bfloat16 bits (exact).
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Whether `Op::Dropout` drops element `j` of the sample with data-set index
/// `id` at `step`: a SplitMix64 hash of (seed, step, id, j), as a uniform
/// draw in [0, 1) of 53 bits, below `p`. Every backend computes it this way.
pub fn dropout_drops(seed: u64, step: u64, id: u64, j: u64, p: f64) -> bool {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let h = mix(mix(mix(mix(seed) ^ step) ^ id) ^ j);
    ((h >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < p
}

/// Whether a dtype is trained (gets gradients).
pub fn differentiable(d: DType) -> bool {
    d.is_float()
}
