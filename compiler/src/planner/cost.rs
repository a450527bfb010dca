//! The cost model: a training step's time and memory under a placement,
//! predicted analytically.
//!
//! Input: a checked plan, its training graph, a device [`Profile`] and a
//! candidate's shape (data, tensor and pipeline degrees, stage cuts,
//! microbatches, schedule, shards). Output: a [`Candidate`] with its
//! predicted compute, communication and pipeline bubble, and the memory of
//! its fullest device.
//!
//! How: the training graph is summarised once per layer (unit): matmul
//! time, other bytes moved (after fusion, from the kernels the step runs,
//! each weighted by its [`KernelClass`]'s efficiency), kernel calls,
//! activation and parameter bytes, and whether the layer has Megatron pairs
//! (attention and MLP). A candidate's step time is then compute (matmul
//! time at the calibrated rates, bytes over the element-wise bandwidth,
//! devices sharing the cores), communication (ring formulas over the
//! calibrated link bandwidth and latency) and the pipeline bubble ((p − 1)
//! passes of the slowest stage).
//!
//! Invariants: every figure is finite and zero or more for a validated
//! profile; the model is deterministic (the same inputs give the same
//! figures, bit for bit); the memory is an estimate, which the search
//! checks against the exact memory plan before it chooses.

use super::{Candidate, Profile};
use crate::check::{Checked, Explicit, Optimizer, Placement, Schedule, Shard, Unit};
use crate::graph::{Graph, NodeId, Op, Role};
use crate::kernel::StepKind;
use crate::partition::partition_devices;

/// Per-unit figures of one training step at the full batch.
#[derive(Clone, Debug, Default)]
pub(super) struct UnitCost {
    /// Seconds of matmul on one core.
    pub(super) flops: f64,
    /// Bytes moved by the other forward and backward kernels, each weighted
    /// by its class's efficiency.
    pub(super) bytes: f64,
    act: f64,
    /// Bytes of the single-device program's buffers that hold the unit's
    /// forward and backward values (its exact memory plan, after reuse),
    /// and of those that hold its update's temporaries.
    act_exact: f64,
    /// Of `act_exact`, the bytes of values that live from the forward pass
    /// into the backward pass (kept once per microbatch in flight).
    kept_exact: f64,
    work_exact: f64,
    params: f64,
    /// Parameter tensors (each a collective of its own under `zero`).
    tensors: f64,
    /// Bytes of the parameters Megatron pairs split.
    shardable: f64,
    /// Megatron pairs (attention, MLP) in the unit.
    pairs: usize,
    /// Bytes of the activation each pair all-reduces.
    pair_bytes: f64,
    /// Kernels per step by class (by [`KernelClass::index`]; each costs a fixed overhead).
    ops: [f64; 3],
    /// Bytes the optimizer update moves, weighted likewise (every
    /// data-parallel replica repeats it).
    update: f64,
    /// The part of `update` in kernels too small to spread over threads.
    update_small: f64,
    /// Update kernels large enough to spread over threads.
    update_split: f64,
    /// Bytes of embedding tables the tensor axis can split along their width.
    tables: f64,
    /// Bytes of the unit's largest parameter.
    largest: f64,
    /// Seconds on one core (matmuls and bytes moved) of the forward and
    /// backward kernels, by how far their size lies above the size at which
    /// a kernel spreads over threads: bucket `b` holds kernels
    /// `2^(b − BUCKET0)` times that size at the full batch.
    by_size: Vec<f64>,
    /// The same for matmuls.
    mm_by_size: Vec<f64>,
    /// The forward and backward kernels (matmuls and the others) by the
    /// same buckets: each one large enough to split over threads costs the
    /// threads a meeting.
    calls_by_size: Vec<f64>,
    /// Bytes of the unit's output, which a split table leaves split and the
    /// next layer all-gathers.
    out: f64,
}

fn numel(g: &Graph, n: NodeId) -> f64 {
    g.node(n).ty.shape.iter().map(|d| d.size.max(0) as f64).product()
}

pub(super) fn unit_prefix(c: &Checked, u: Unit) -> String {
    c.model.unit_path(u)
}

/// Megatron shards of the instances under `prefix` that `t` divides.
pub(super) fn megatron(c: &Checked, prefix: &str, t: usize) -> (Vec<Shard>, usize) {
    let mut shards = Vec::new();
    let mut pairs = 0;
    for inst in &c.model.instances {
        if !(inst.path == prefix || inst.path.starts_with(&format!("{prefix}."))) {
            continue;
        }
        let param = |name: &str| c.model.params.iter().position(|p| p.path == format!("{}.{name}", inst.path));
        let dims = |i: usize| c.model.params[i].ty.shape.iter().map(|d| d.size.max(0) as usize).collect::<Vec<_>>();
        let count = |name: &str| {
            inst.args
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| if let crate::check::types::Val::Int(i, _) = v { Some(*i) } else { None })
                .map(|i| i.max(1) as usize)
        };
        match inst.template.as_str() {
            // Grouped-query attention splits whole key/value heads with their query groups.
            "SelfAttention" | "GroupedAttention" | "RotaryAttention" => {
                let heads = count("heads").unwrap_or(1);
                let kv_heads = count("kv_heads").unwrap_or(heads);
                let (Some(q), Some(k), Some(v), Some(o)) = (param("wq"), param("wk"), param("wv"), param("wo")) else { continue };
                if t > 1 && heads.is_multiple_of(t) && kv_heads.is_multiple_of(t) && dims(q)[1].is_multiple_of(t) {
                    for p in [q, k, v] {
                        shards.push(Shard { param: p, spec: vec![None, Some(usize::MAX)] });
                    }
                    shards.push(Shard { param: o, spec: vec![Some(usize::MAX), None] });
                    pairs += 1;
                }
            }
            // Llama's gated MLP: gate and up by columns, down by rows.
            "SwiGLU" => {
                let (Some(gw), Some(uw), Some(dw)) = (param("gate"), param("up"), param("down")) else { continue };
                if t > 1 && dims(uw)[1].is_multiple_of(t) {
                    shards.push(Shard { param: gw, spec: vec![None, Some(usize::MAX)] });
                    shards.push(Shard { param: uw, spec: vec![None, Some(usize::MAX)] });
                    shards.push(Shard { param: dw, spec: vec![Some(usize::MAX), None] });
                    pairs += 1;
                }
            }
            "Mlp" => {
                let (Some(uw), Some(ub), Some(dw)) = (param("up.w"), param("up.b"), param("down.w")) else { continue };
                if t > 1 && dims(uw)[1].is_multiple_of(t) {
                    shards.push(Shard { param: uw, spec: vec![None, Some(usize::MAX)] });
                    shards.push(Shard { param: ub, spec: vec![Some(usize::MAX)] });
                    shards.push(Shard { param: dw, spec: vec![Some(usize::MAX), None] });
                    pairs += 1;
                }
            }
            _ => {}
        }
    }
    (shards, pairs)
}

/// Width-split shards of the embedding tables (token and position) under
/// `prefix` whose width `t` divides.
pub(super) fn table_shards(c: &Checked, prefix: &str, t: usize) -> Vec<Shard> {
    let mut shards = Vec::new();
    for inst in &c.model.instances {
        if !(inst.path == prefix || inst.path.starts_with(&format!("{prefix}."))) || !matches!(inst.template.as_str(), "Embedding" | "PositionalEmbedding") {
            continue;
        }
        let Some(p) = c.model.params.iter().position(|p| p.path == format!("{}.table", inst.path)) else { continue };
        let width = c.model.params[p].ty.shape.last().map(|d| d.size.max(0) as usize).unwrap_or(0);
        if t > 1 && c.model.params[p].ty.shape.len() == 2 && width.is_multiple_of(t) {
            shards.push(Shard { param: p, spec: vec![None, Some(usize::MAX)] });
        }
    }
    shards
}

/// Elements below which the CPU backend runs a kernel on one thread.
const THREADS_MIN: f64 = 65536.0;
/// m·n·k below which a product runs on one thread.
const GEMM_THREADS_MIN: f64 = 48.0 * 48.0 * 256.0;
const BUCKETS: usize = 48;
const BUCKET0: i32 = 24;

/// The class of a kernel for the cost model: each has its own efficiency
/// and fixed cost per call in the [`Profile`], and `calibrate` fits them
/// one class at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelClass {
    /// Matmuls (with their transposes read in place).
    MatMul,
    /// Fused element-wise kernels, and the optimizer's update.
    Fused,
    /// The library's other kernels: reductions, softmax, norms, losses,
    /// gathers, layout changes.
    Library,
}

impl KernelClass {
    /// Every class, in the order of [`KernelClass::index`].
    pub const ALL: [KernelClass; 3] = [KernelClass::MatMul, KernelClass::Fused, KernelClass::Library];

    /// The class of a step of a kernel program.
    pub fn of(step: &crate::kernel::Step) -> KernelClass {
        match &step.kind {
            StepKind::MatMul { .. } | StepKind::Op(Op::MatMul) => KernelClass::MatMul,
            StepKind::Fused(_) => KernelClass::Fused,
            _ if step.role == Role::Update => KernelClass::Fused,
            _ => KernelClass::Library,
        }
    }

    /// The class's position in per-class arrays (such as
    /// [`Profile::call_costs`]): 0, 1, 2 in the order of [`KernelClass::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

fn size_bucket(size: f64, threshold: f64) -> usize {
    ((size.max(1.0) / threshold).log2().floor() as i32 + BUCKET0).clamp(0, BUCKETS as i32 - 1) as usize
}

/// Summarises the training graph per unit (in forward order).
pub(super) fn unit_costs(c: &Checked, g: &Graph, units: &[Unit], pr: &Profile) -> Vec<UnitCost> {
    let prefixes: Vec<String> = units.iter().map(|u| unit_prefix(c, *u)).collect();
    let unit_of_param: Vec<Option<usize>> =
        c.model.params.iter().map(|p| prefixes.iter().position(|pre| p.path == *pre || p.path.starts_with(&format!("{pre}.")))).collect();
    let mut unit: Vec<Option<usize>> = vec![None; g.len()];
    let mut out =
        vec![UnitCost { by_size: vec![0.0; BUCKETS], mm_by_size: vec![0.0; BUCKETS], calls_by_size: vec![0.0; BUCKETS], ..UnitCost::default() }; units.len()];
    for id in g.ids() {
        let node = g.node(id);
        let args = g.args(id);
        let u = match (&node.op, node.role) {
            (Op::Param(i), _) => unit_of_param.get(*i).copied().flatten(),
            (_, Role::Backward) => g.origin.get(&id).and_then(|o| unit[o.0 as usize]),
            _ => args.iter().filter_map(|a| unit[a.0 as usize]).max(),
        };
        unit[id.0 as usize] = u;
        let Some(u) = u else { continue };
        let n = numel(g, id);
        if let Op::Param(_) = node.op {
            out[u].params += 4.0 * n;
            out[u].tensors += 1.0;
            out[u].largest = out[u].largest.max(4.0 * n);
        }
        if node.role != Role::Update && !matches!(node.op, Op::Reshape | Op::Param(_) | Op::Const(_)) {
            out[u].act += 4.0 * n;
        }
        if node.role == Role::Forward && !matches!(node.op, Op::Param(_) | Op::Const(_)) {
            out[u].out = 4.0 * n;
        }
    }
    // Time from the kernels the step runs (after fusion, with transposes
    // read in place by the matmuls), each charged to its output's unit.
    let program = crate::kernel::lower(g);
    let banked = program.banked();
    let grads = crate::partition::memory::gradients(&program, &banked);
    let mut update_temp = vec![false; program.buffers.len()];
    for st in program.steps.iter().filter(|s| s.role == Role::Update) {
        update_temp[program.storage(st.output).0 as usize] = true;
    }
    for (i, b) in program.buffers.iter().enumerate() {
        let Some(u) = unit[b.node.0 as usize] else { continue };
        if b.kind == crate::kernel::BufKind::Temp && !grads[i] {
            let bytes = (b.elem.bytes() * b.len()) as f64;
            if update_temp[i] {
                out[u].work_exact += bytes;
            } else {
                out[u].act_exact += bytes;
                if banked[i] {
                    out[u].kept_exact += bytes;
                }
            }
        }
    }
    let (_, e_fused, e_kernel) = pr.efficiencies();
    let len = |b: &crate::kernel::BufId| program.buffers[b.0 as usize].len() as f64;
    for step in &program.steps {
        let Some(u) = unit[program.buffers[step.output.0 as usize].node.0 as usize] else { continue };
        out[u].ops[KernelClass::of(step).index()] += 1.0;
        let n = len(&step.output);
        match (&step.kind, step.inputs.as_slice()) {
            (StepKind::MatMul { .. } | StepKind::Op(Op::MatMul), [a, ..]) => {
                // `a` is stored [.., k, m] when read transposed.
                let trans_a = matches!(step.kind, StepKind::MatMul { trans_a: true, .. });
                let a = &program.buffers[a.0 as usize].shape;
                let dim = |i: usize| a.get(a.len().wrapping_sub(i)).copied().unwrap_or(1).max(1);
                let (m, k) = if trans_a { (dim(1), dim(2)) } else { (dim(2), dim(1)) };
                let nn = program.buffers[step.output.0 as usize].shape.last().copied().unwrap_or(1).max(1);
                let secs = 2.0 * n * k as f64 / pr.matmul_rate(k.min(m).min(nn));
                out[u].flops += secs;
                out[u].mm_by_size[size_bucket(n * k as f64, GEMM_THREADS_MIN)] += secs;
                out[u].calls_by_size[size_bucket(n * k as f64, GEMM_THREADS_MIN)] += 1.0;
            }
            (kind, _) => {
                // Bytes moved, weighted by how fast the kind of kernel moves them.
                let eff = if matches!(kind, StepKind::Fused(_)) || step.role == Role::Update { e_fused } else { e_kernel };
                let bytes = eff * 4.0 * (n + step.inputs.iter().map(len).sum::<f64>());
                if step.role == Role::Update {
                    out[u].update += bytes;
                    if n < THREADS_MIN {
                        out[u].update_small += bytes;
                    } else {
                        out[u].update_split += 1.0;
                    }
                } else {
                    out[u].bytes += bytes;
                    out[u].by_size[size_bucket(n, THREADS_MIN)] += bytes / pr.elementwise_bytes;
                    out[u].calls_by_size[size_bucket(n, THREADS_MIN)] += 1.0;
                }
            }
        }
    }
    for (u, pre) in prefixes.iter().enumerate() {
        let (shards, pairs) = megatron(c, pre, 2);
        out[u].shardable = shards.iter().map(|s| 4.0 * c.model.params[s.param].ty.numel() as f64).sum();
        out[u].pairs = pairs;
        // A pair all-reduces one activation of the unit's width per token.
        let width = shards.first().map(|s| c.model.params[s.param].ty.shape[0].size.max(1) as f64).unwrap_or(0.0);
        let tokens: f64 = c.model.inputs.first().map(|i| i.ty.shape.iter().map(|d| d.size.max(1) as f64).product()).unwrap_or(1.0);
        out[u].pair_bytes = 4.0 * tokens * width;
        out[u].tables = table_shards(c, pre, 2).iter().map(|s| 4.0 * c.model.params[s.param].ty.numel() as f64).sum();
    }
    out
}

fn ring(bytes: f64, k: usize, factor: f64, pr: &Profile) -> f64 {
    if k <= 1 {
        return 0.0;
    }
    let k = k as f64;
    factor * (k - 1.0) / k * bytes / pr.link_bytes + factor * (k - 1.0) * pr.link_latency
}

/// Tensors of optimizer state per parameter (momentum, Adam's moments).
pub(super) fn optimizer_states(c: &Checked) -> f64 {
    (match c.train.optimizer {
        Optimizer::Sgd { momentum, .. } => usize::from(momentum != 0.0),
        Optimizer::Adam { .. } => 2,
    }) as f64
}

/// Temporaries of the largest tensor's update (Adam's moments, the
/// corrected step, the decayed weight, ...).
const UPDATE_TEMPS: f64 = 6.0;

/// The degrees of a candidate and the devices it runs on.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) d: usize,
    pub(super) t: usize,
    pub(super) p: usize,
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) split_tables: bool,
    pub(super) schedule: Schedule,
    /// A parameter server sums the gradients and updates (explicit placements only).
    pub(super) server: bool,
    /// The ZeRO stage over the data axis of the parameters of the repeats'
    /// layers, and of the others.
    pub(super) zero: u8,
    pub(super) zero_rest: u8,
    /// The elements of `repeat`s recompute their activations.
    pub(super) recompute: bool,
}

/// Predicted time and memory of one candidate.
#[allow(clippy::too_many_arguments)]
pub(super) fn evaluate(
    c: &Checked,
    costs: &[UnitCost],
    units: &[Unit],
    cuts: &[std::ops::Range<usize>],
    pairs: &[usize],
    shards: Vec<Shard>,
    shape: Shape,
    states: f64,
    budget: Option<u64>,
    pr: &Profile,
) -> Candidate {
    let Shape { d, t, p, m, n, split_tables, schedule, server, zero, zero_rest, recompute } = shape;
    let (zero, zero_rest) = if d > 1 && !server { (zero, zero_rest) } else { (0, 0) };
    // Unit i's ZeRO stage, and what a stage divides by the data degree.
    let level = |i: usize| if matches!(units[i], Unit::Elem(..)) { zero } else { zero_rest };
    let by = |l: u8, from: u8| if l >= from { 1.0 / d as f64 } else { 1.0 };
    // Matmul seconds on one core, spread over the devices' share of the cores.
    // A device runs on max(1, cores / n) cores; when devices outnumber the
    // cores they take turns, which the bound on total work below accounts for.
    let (speed, bspeed) = pr.device_speed(n);
    let bw = pr.elementwise_bytes * bspeed;
    // Seconds of one lone core: matmuls, then memory-bound kernels.
    let (mut core_mm, mut core_bytes) = (0.0, 0.0);
    let mut stage_time = Vec::new();
    let mut stage_mem = Vec::new();
    let mut dp_comm: f64 = 0.0;
    let mut pp_comm = 0.0;
    let mut tp_comm = 0.0f64;
    for (s, r) in cuts.iter().enumerate() {
        let us = &costs[r.clone()];
        let lv: Vec<u8> = r.clone().map(level).collect();
        // Recomputed layers run their forward pass twice (the work is in
        // `costs`, summarised from the graph with recompute), and under
        // tensor parallelism all-reduce their forward activations again.
        let redone: Vec<f64> = r.clone().map(|i| if recompute && matches!(units[i], Unit::Elem(..)) { 4.0 / 3.0 } else { 1.0 }).collect();
        // The fraction of a unit's parameters (and work) each tensor-parallel device keeps.
        let share = |u: &UnitCost| {
            let split = if t > 1 && u.pairs > 0 { u.shardable } else { 0.0 } + if split_tables { u.tables } else { 0.0 };
            if t > 1 && split > 0.0 {
                (split + (u.params - split) * t as f64) / (u.params.max(1.0) * t as f64)
            } else {
                1.0
            }
        };
        let flops: f64 = us.iter().map(|u| u.flops * share(u)).sum::<f64>() / d as f64;
        let bytes: f64 = us.iter().map(|u| u.bytes * share(u)).sum::<f64>() / d as f64;
        let params: f64 = us.iter().map(|u| u.params * share(u)).sum();
        let act: f64 = us.iter().map(|u| u.act * share(u)).sum::<f64>() / (d * m) as f64;
        let in_flight = match (p, schedule) {
            (1, _) => 1.0,
            (_, Schedule::GPipe) => m as f64,
            (_, Schedule::OneFOneB) => (p - s).min(m) as f64,
        };
        // The update's temporaries are reused between tensors of one size
        // only: a large tensor of its own (an embedding table) adds several.
        let largest = us.iter().map(|u| u.largest * if split_tables && u.tables > 0.0 { 1.0 / t as f64 } else { 1.0 }).fold(0.0, f64::max);
        // A split table's gradient is computed whole, then sliced.
        let whole_grads: f64 = if split_tables { us.iter().map(|u| u.tables).sum() } else { 0.0 };
        // Activations from the single-device program's exact memory plan
        // (with recompute, when the candidate recomputes), scaled to the
        // device's rows: those kept from the forward pass into the backward
        // pass once per microbatch in flight, the others once.
        let act_x: f64 = us.iter().map(|u| u.kept_exact * share(u)).sum::<f64>() / (d * m) as f64;
        let redo_x: f64 = us.iter().map(|u| (u.act_exact - u.kept_exact) * share(u)).sum::<f64>() / (d * m) as f64;
        let work_x: f64 = us.iter().zip(&lv).map(|(u, &l)| u.work_exact * share(u) * by(l, 1)).sum::<f64>();
        // Gradient exchange buffers: the packed all-reduce buckets; under
        // `zero 1` and `zero 2` the scattered slices and the gathered new
        // parameters; under `zero 3` each layer's parameters gathered for
        // its forward and its backward pass (the largest layer's, reused).
        let held = |want: &dyn Fn(u8) -> bool| us.iter().zip(&lv).filter(|(_, l)| want(**l)).map(|(u, _)| u.params * share(u)).sum::<f64>();
        let largest_gathered = us.iter().zip(&lv).filter(|(_, l)| **l >= 3).map(|(u, _)| u.params * share(u)).fold(0.0, f64::max);
        let exchange = if d == 1 || server {
            0.0
        } else {
            let (bucketed, sliced) = (held(&|l| l == 0), held(&|l| l == 1 || l == 2));
            // (an all-reduced bucket is unpacked into a copy per gradient)
            2.0 * bucketed + sliced + sliced / d as f64 + 2.0 * largest_gathered
        };
        let states_mem: f64 = us.iter().zip(&lv).map(|(u, &l)| u.params * share(u) * (by(l, 3) + by(l, 2) + states * by(l, 1))).sum();
        let mem = states_mem + work_x + whole_grads + act_x * in_flight + redo_x + exchange;
        // The working set that decides how well memory-bound kernels use
        // the caches, as the profile's cache curve was fitted against: every
        // value of the passes once per microbatch in flight.
        let working = us.iter().zip(&lv).map(|(u, &l)| u.params * share(u) * (3.0 + states * by(l, 1))).sum::<f64>() + UPDATE_TEMPS * largest + whole_grads + act * in_flight;
        // Memory-bound kernels run faster when the device's whole working
        // set stays in the caches: their seconds at the headline bandwidth,
        // scaled. Devices that take turns on a core share its caches.
        let cache = pr.elementwise_bytes / pr.elementwise_rate(working * (n as f64 / pr.cores.max(1) as f64).max(1.0));
        // Devices beyond the cores wait their turn for the fixed costs too.
        let calls = pr.call_costs();
        let overhead = us.iter().map(|u| (0..3).map(|k| u.ops[k] * calls[k]).sum::<f64>()).sum::<f64>();
        let mut tp: f64 = us
            .iter()
            .zip(&pairs[r.clone()])
            .zip(&redone)
            .map(|((u, k), x)| (2.0 + 3.0 * (x - 1.0)) * *k as f64 * ring(u.pair_bytes / (d * m) as f64, t, 2.0, pr))
            .sum::<f64>()
            * m as f64;
        if split_tables {
            // The last of a run of split tables leaves its output split: one all-gather.
            for i in r.clone() {
                let next_split = costs.get(i + 1).is_some_and(|n| n.tables > 0.0);
                if costs[i].tables > 0.0 && !next_split {
                    tp += ring(costs[i].out / (d * m) as f64, t, 1.0, pr) * m as f64;
                }
            }
        }
        tp_comm = tp_comm.max(tp);
        // Under `zero` each replica updates its slice.
        let update: f64 = cache * us.iter().zip(&lv).map(|(u, &l)| u.update * share(u) * by(l, 1)).sum::<f64>() / bw;
        // Kernels that a device's batch share leaves too small to spread over
        // its threads run on one core.
        let split = ((d * m) as f64).log2();
        let small = |h: &dyn Fn(&UnitCost) -> &Vec<f64>| {
            us.iter()
                .map(|u| h(u).iter().enumerate().filter(|(b, _)| ((*b as i32 - BUCKET0) as f64) < split).map(|(_, x)| x).sum::<f64>() * share(u))
                .sum::<f64>()
                / d as f64
        };
        let (serial_mm, serial_bytes) = (small(&|u| &u.mm_by_size), cache * small(&|u| &u.by_size));
        // A device with several threads: every kernel it splits over them
        // costs their meeting (waking the helpers, waiting for the last).
        let split_calls =
            |u: &UnitCost| u.calls_by_size.iter().enumerate().filter(|(b, _)| ((*b as i32 - BUCKET0) as f64) >= split).map(|(_, x)| x).sum::<f64>();
        let (sync, update_sync) = if n < pr.cores {
            let c = pr.split_cost.unwrap_or(0.0).max(0.0);
            (c * us.iter().map(split_calls).sum::<f64>(), c * us.iter().map(|u| u.update_split).sum::<f64>())
        } else {
            (0.0, 0.0)
        };
        // Kernels too small to split run on one thread: at one core's speed
        // when the device has cores to itself, else at its share.
        let lone = |v: f64| 1.0 / if n < pr.cores { 1.0 } else { v.min(1.0) } - 1.0 / v;
        let (e_mm, _, _) = pr.efficiencies();
        let compute = e_mm * (flops / speed + serial_mm * lone(speed)) + cache * bytes / bw + serial_bytes * lone(bspeed);
        let work = compute / m as f64 + overhead + sync;
        let small_update: f64 = cache * us.iter().zip(&lv).map(|(u, &l)| u.update_small * share(u) * by(l, 1)).sum::<f64>() / pr.elementwise_bytes;
        let upd = (update + small_update * lone(bspeed) + update_sync) / m as f64;
        let pass = work + upd;
        // Every data-parallel replica repeats the update, unless a parameter server does it once.
        let updates = if server { 1 } else { d };
        core_mm += e_mm * flops * (d * t) as f64;
        core_bytes += cache * (bytes / pr.elementwise_bytes) * (d * t) as f64 + overhead * (m * d * t) as f64 + upd * bspeed * (m * updates * t) as f64;
        stage_time.push(pass + tp / m as f64);
        dp_comm = dp_comm.max(if server {
            // Every worker sends its gradients to the server and receives the parameters
            // back: the server's link carries them one worker after another.
            2.0 * ((d - 1) as f64 * params / pr.link_bytes + pr.link_latency)
        } else {
            // One all-reduce in buckets; under `zero`, a reduce-scatter and an
            // all-gather per parameter tensor (ZeRO-2: a reduce-scatter per
            // microbatch; FSDP: two all-gathers and a reduce-scatter per microbatch).
            let group = |l: u8| {
                let (bytes, tensors) = us.iter().zip(&lv).filter(|(_, x)| **x == l).fold((0.0, 0.0), |(b, n), (u, _)| (b + u.params * share(u), n + u.tensors));
                (bytes, tensors)
            };
            let per = |times: f64, (bytes, tensors): (f64, f64)| {
                if bytes > 0.0 {
                    times * (ring(bytes, d, 1.0, pr) + (tensors - 1.0).max(0.0) * (d - 1) as f64 * pr.link_latency)
                } else {
                    0.0
                }
            };
            let (plain, _) = group(0);
            (if plain > 0.0 { ring(plain, d, 2.0, pr) } else { 0.0 }) + per(2.0, group(1)) + per(m as f64 + 1.0, group(2)) + per(3.0 * m as f64, group(3))
        });
        if s + 1 < cuts.len() {
            let boundary = us.last().map(|u| u.pair_bytes.max(u.act / 16.0)).unwrap_or(0.0) / (d * m) as f64;
            pp_comm += 2.0 * (boundary / pr.link_bytes + pr.link_latency) * m as f64;
        }
        stage_mem.push(mem);
    }
    let slowest = stage_time.iter().cloned().fold(0.0, f64::max);
    // The step takes at least its critical path ((m + p − 1) passes of the
    // slowest stage) and at least the total work over the cores.
    let path = slowest * (m + p - 1) as f64;
    let (mm, by) = pr.throughput_for(n);
    // (One device: its path is all its work, and the bound would charge its
    // serial kernels at the split ones' speed.)
    let work = if n > 1 { core_mm / mm + core_bytes / by } else { 0.0 };
    let compute = (slowest * m as f64 - tp_comm).max(work - tp_comm).max(0.0);
    let bubble = (path.max(work) - compute - tp_comm).max(0.0);
    let memory = stage_mem.iter().cloned().fold(0.0, f64::max) as u64;
    let stages: Vec<Vec<Unit>> = cuts.iter().map(|r| units[r.clone()].to_vec()).collect();
    // Sends do not wait for their receiver: under GPipe a stage runs all
    // its forwards ahead, so in the steady state its transfers hide behind
    // the other stages' compute and only the fill and drain (one transfer
    // per boundary each way) stay on the critical path. Under 1F1B each
    // backward waits for the gradient of the forward just sent downstream:
    // every microbatch's round trip is on the critical path.
    let exposed_pp = match schedule {
        _ if m == 0 => pp_comm,
        Schedule::GPipe => pp_comm * (2.0 * (p - 1) as f64 / (2.0 * m as f64 * (p - 1).max(1) as f64)).min(1.0),
        Schedule::OneFOneB => pp_comm,
    };
    // Several devices: each step the runtime hands the device threads their
    // command and collects their replies: two thread wake-ups (about a
    // message's latency each) on the step's critical path.
    let dispatch = if n > 1 { 2.0 * pr.link_latency } else { 0.0 };
    Candidate {
        data: d,
        model: t,
        pipe: p,
        microbatches: m,
        schedule: schedule.name().to_string(),
        sharded_embeddings: split_tables,
        zero,
        zero_rest,
        recompute,
        stages: stages.iter().map(|s| s.iter().map(|u| c.model.unit_name(*u)).collect()).collect(),
        compute_s: compute.max(0.0),
        comm_s: tp_comm + dp_comm + exposed_pp + dispatch,
        tensor_comm_s: tp_comm,
        overlapped_s: pp_comm - exposed_pp,
        bubble_s: bubble,
        memory,
        exact_memory: None,
        refused: None,
        fits: budget.is_none_or(|b| memory <= b),
        placement: String::new(),
        stage_units: stages,
        shards,
        schedule_kind: schedule,
    }
}

/// Whether parameter `p` belongs to no element of a `repeat` (an embedding,
/// a head): the planner's second ZeRO group.
pub(super) fn rest_param(c: &Checked, p: usize) -> bool {
    // A repeat element's parameters lie under `name.j.`, `name` a top-level repeat.
    let path = &c.model.params[p].path;
    let (top, rest) = path.split_once('.').unwrap_or((path.as_str(), ""));
    let in_repeat = c.model.top.iter().any(|t| t.name == top && matches!(t.child, crate::check::Child::Repeat(_)));
    !(in_repeat && rest.split('.').next().is_some_and(|j| j.chars().all(|ch| ch.is_ascii_digit()) && !j.is_empty()))
}

/// The predicted step time and memory of an explicit placement (by the same
/// model the search uses; tensor parallelism is assumed to split the
/// Megatron pairs it finds).
pub fn predict(c: &Checked, g: &Graph, pr: &Profile) -> Option<Candidate> {
    let single = Explicit {
        mesh: vec![],
        data_axis: None,
        shards: vec![],
        pipeline: None,
        parameter_server: None,
        zero: vec![],
        recompute: vec![],
        autocast: vec![],
        span: crate::Span::new(crate::SourceId::USER, 0, 0),
    };
    let e = match &c.placement {
        Placement::Explicit(e) => e,
        Placement::Single => &single,
        Placement::Auto { .. } => return None,
    };
    let size = |a: Option<usize>| a.and_then(|a| e.mesh.get(a)).map(|x| x.1.max(1) as usize).unwrap_or(1);
    let d = size(e.data_axis);
    let p = e.pipeline.as_ref().map(|x| x.stages.len()).unwrap_or(1);
    let n = c.devices.len().max(1);
    let t = (n / (d * p).max(1)).max(1);
    let m = e.pipeline.as_ref().map(|x| x.microbatches.max(1) as usize).unwrap_or(1);
    let units: Vec<Unit> = c.model.forward_order.clone();
    let costs = unit_costs(c, g, &units, pr);
    let cuts: Vec<std::ops::Range<usize>> = match &e.pipeline {
        None => std::iter::once(0..units.len()).collect(),
        Some(pl) => {
            let mut out = Vec::new();
            let mut at = 0;
            for st in &pl.stages {
                let end = st.iter().filter_map(|u| units.iter().position(|x| x == u)).max().map(|x| x + 1).unwrap_or(at);
                out.push(at..end.max(at));
                at = end.max(at);
            }
            out
        }
    };
    let pairs: Vec<usize> = units.iter().map(|u| if t > 1 && !e.shards.is_empty() { megatron(c, &unit_prefix(c, *u), t).1 } else { 0 }).collect();
    let states = optimizer_states(c);
    let tables: Vec<usize> = units.iter().flat_map(|u| table_shards(c, &unit_prefix(c, *u), t)).map(|s| s.param).collect();
    let split_tables = t > 1 && e.shards.iter().any(|s| tables.contains(&s.param));
    let schedule = e.pipeline.as_ref().map(|x| x.schedule).unwrap_or(Schedule::OneFOneB);
    let mut cand = evaluate(
        c,
        &costs,
        &units,
        &cuts,
        &pairs,
        e.shards.clone(),
        Shape {
            d,
            t,
            p,
            m,
            n,
            split_tables,
            schedule,
            server: e.parameter_server.is_some(),
            zero: (0..c.model.params.len()).filter(|p| !rest_param(c, *p)).map(|p| e.zero.get(p).copied().unwrap_or(0)).max().unwrap_or(0),
            zero_rest: (0..c.model.params.len()).filter(|p| rest_param(c, *p)).map(|p| e.zero.get(p).copied().unwrap_or(0)).max().unwrap_or(0),
            recompute: !e.recompute.is_empty(),
        },
        states,
        None,
        pr,
    );
    // A placement written out may split layers the model above does not
    // know as Megatron pairs: charge the tensor-parallel collectives its
    // device programs actually hold (once per microbatch).
    if !e.shards.is_empty() {
        if let Ok(plan) = partition_devices(c, g, true) {
            let data_axis = e.data_axis.and_then(|a| e.mesh.get(a)).map(|x| x.0.as_str());
            let exact = plan.devices.iter().map(|d| tensor_comm(&d.program, data_axis, pr)).fold(0.0, f64::max) * m as f64;
            cand.comm_s = (cand.comm_s + exact - cand.tensor_comm_s).max(0.0);
            cand.tensor_comm_s = exact;
        }
    }
    Some(cand)
}

/// Seconds of one pass's collectives in `program` other than those over
/// the data axis (the gradients' all-reduce, charged apart) and pipeline
/// transfers: ring formulas over each collective's group.
fn tensor_comm(program: &crate::kernel::Program, data_axis: Option<&str>, pr: &Profile) -> f64 {
    let len = |b: &crate::kernel::BufId| 4.0 * program.buffers[b.0 as usize].len() as f64;
    program
        .steps
        .iter()
        .filter(|s| s.role != Role::Update)
        .map(|s| {
            let bytes = len(&s.output).max(s.inputs.first().map(len).unwrap_or(0.0));
            match &s.kind {
                StepKind::Op(Op::AllReduce { group, axis, .. }) if Some(axis.as_str()) != data_axis => ring(bytes, group.len(), 2.0, pr),
                StepKind::Op(Op::AllGather { group, axis, .. } | Op::ReduceScatter { group, axis, .. } | Op::AllToAll { group, axis, .. })
                    if Some(axis.as_str()) != data_axis =>
                {
                    ring(bytes, group.len(), 1.0, pr)
                }
                _ => 0.0,
            }
        })
        .sum()
}
