//! `placement auto`: searches data × tensor × pipeline degrees, Megatron
//! shardings, balanced stage cuts and microbatch counts for the lowest
//! predicted step time that fits the memory budget, and says why.
//!
//! The search is analytic: the training graph is summarised once per layer
//! (unit): matmul FLOPs, other bytes moved, activation bytes, parameter bytes,
//! and whether the layer has Megatron pairs (attention and MLP). A candidate's
//! step time is then compute (FLOPs over the calibrated matmul rate, bytes over
//! the element-wise bandwidth, devices sharing the cores), communication (ring
//! formulas over the calibrated link bandwidth and latency) and the pipeline
//! bubble ((p − 1) passes of the slowest stage). The best candidates are then
//! partitioned for real and their exact memory plan checked, so the chosen
//! plan always fits.

use super::{memory, partition_devices};
use crate::check::{Checked, Explicit, Objective, Optimizer, Pipeline, Placement, Schedule, Shard, Unit};
use crate::graph::{Graph, NodeId, Op, Role};
use crate::kernel::StepKind;
use serde::{Deserialize, Serialize};

/// What the devices can do, from `shardplan calibrate` (defaults: measured on
/// a 2-core AVX-512 machine).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Matmul FLOP/s of one core.
    pub matmul_flops: f64,
    /// Bytes/s of element-wise kernels on one core (large ones, from memory).
    pub elementwise_bytes: f64,
    /// Bytes/s of one core's element-wise kernels by the working set of the
    /// device (a small one stays in the caches), ascending.
    #[serde(default)]
    pub elementwise_by_size: Vec<(usize, f64)>,
    /// Bytes/s between two devices.
    pub link_bytes: f64,
    /// Seconds per message between two devices.
    pub link_latency: f64,
    /// Cores the devices share.
    pub cores: usize,
    /// Seconds of fixed cost per kernel (dispatch, buffer lookup).
    #[serde(default = "default_overhead")]
    pub op_overhead: f64,
    /// The same for a matmul (packing its operands), then for the library's
    /// other kernels, fitted by `calibrate` (None: `op_overhead`).
    #[serde(default)]
    pub matmul_overhead: Option<f64>,
    #[serde(default)]
    pub kernel_overhead: Option<f64>,
    /// Matmul FLOP/s of one core by the smallest of the product's dims
    /// (small products run far below the peak), ascending.
    #[serde(default)]
    pub matmul_by_size: Vec<(usize, f64)>,
    /// Measured matmul time over the model's, fitted by `calibrate` on
    /// reference steps (the products' shapes, transposes and batches cost
    /// more, or less, than the square products measured above).
    #[serde(default = "one")]
    pub efficiency: f64,
    /// The same for fused element-wise kernels and the optimizer's update
    /// (None: as `efficiency`).
    #[serde(default)]
    pub bytes_efficiency: Option<f64>,
    /// The same for the library's other memory-bound kernels: reductions,
    /// softmax, norms, losses, gathers, transposes (None: as
    /// `bytes_efficiency`).
    #[serde(default)]
    pub kernel_efficiency: Option<f64>,
    /// How much faster a device with all `cores` threads runs the kernels
    /// large enough to split than one thread does, before `split_cost`,
    /// fitted by `calibrate` (None: as many times as there are cores).
    #[serde(default)]
    pub thread_speedup: Option<f64>,
    /// The same for memory-bound kernels alone (None: as `thread_speedup`,
    /// which is what `calibrate` writes).
    #[serde(default)]
    pub bytes_speedup: Option<f64>,
    /// The work of how many lone cores the machine does when `cores`
    /// single-threaded devices run at once, as `calibrate` measures it
    /// (None: as `thread_speedup`).
    #[serde(default)]
    pub devices_speedup: Option<f64>,
    /// When devices outnumber the cores they take turns, and the turns cost
    /// (a thread switch at every message, caches warmed by another device):
    /// the machine then does `1 / (1 + crowding)` of the work of as many
    /// devices as cores, fitted by `calibrate` on a reference plan run over
    /// 2 and 4 devices per core.
    #[serde(default)]
    pub crowding: Option<f64>,
    /// Seconds a kernel split over a device's threads costs beyond its
    /// share of the work (waking the helpers, waiting for the last one),
    /// fitted by `calibrate`.
    #[serde(default)]
    pub split_cost: Option<f64>,
}

fn one() -> f64 {
    1.0
}

impl Profile {
    /// How many times faster than one core a device runs its matmuls (and,
    /// second, its memory-bound kernels) while it computes, when `n` devices
    /// share the machine: with every core busy the machine does the work of
    /// `throughput()` cores, split evenly between the devices that run at
    /// once (at most one per core; devices beyond the cores take turns, which
    /// the bound on total work accounts for).
    pub fn device_speed(&self, n: usize) -> (f64, f64) {
        let (mm, bytes) = self.throughput_for(n);
        let running = n.clamp(1, self.cores.max(1)) as f64;
        (mm / running, bytes / running)
    }

    /// [`Profile::throughput`] for `n` devices: memory-bound kernels split
    /// over one device's threads gain less than the cores' throughput (the
    /// threads meet after every kernel), devices of their own do not.
    pub fn throughput_for(&self, n: usize) -> (f64, f64) {
        let (mm, bytes) = self.throughput();
        let cores = self.cores.max(1);
        if n >= cores {
            let all = self.devices_speedup.unwrap_or(mm).clamp(1.0, cores as f64);
            let crowded = 1.0 + if n > cores { self.crowding.unwrap_or(0.0).max(0.0) } else { 0.0 };
            (all / crowded, all / crowded)
        } else {
            (mm, bytes)
        }
    }

    /// The work of how many lone cores the machine does with every core busy
    /// (below the core count where cores share caches, memory bandwidth or a
    /// physical core), as `calibrate` measures it; else the core count. For
    /// matmuls, then for memory-bound kernels.
    pub fn throughput(&self) -> (f64, f64) {
        let cores = self.cores.max(1) as f64;
        let mm = self.thread_speedup.unwrap_or(cores).clamp(1.0, cores);
        // Below 1 where splitting small kernels over threads costs more than it gains.
        (mm, self.bytes_speedup.unwrap_or(mm).clamp(0.5, cores))
    }

    /// Seconds of fixed cost per call of a matmul, a fused element-wise
    /// kernel (or the update), and the other kernels (see [`kernel_kind`]).
    pub fn call_costs(&self) -> [f64; 3] {
        let o = self.op_overhead.max(0.0);
        [self.matmul_overhead.unwrap_or(o).max(0.0), o, self.kernel_overhead.unwrap_or(o).max(0.0)]
    }

    /// Bytes/s of one core for a device whose working set is `bytes`.
    /// Between measured sizes the rate is interpolated in log(size);
    /// beyond them it is the nearest one's.
    pub fn elementwise_rate(&self, bytes: f64) -> f64 {
        let pts = &self.elementwise_by_size;
        let rate = match pts.iter().position(|&(size, _)| size as f64 >= bytes) {
            None => pts.last().map(|x| x.1).unwrap_or(self.elementwise_bytes),
            Some(0) => pts[0].1,
            Some(i) => {
                let ((s0, r0), (s1, r1)) = (pts[i - 1], pts[i]);
                let f = (bytes.max(1.0).ln() - (s0.max(1) as f64).ln()) / ((s1.max(1) as f64).ln() - (s0.max(1) as f64).ln()).max(1e-9);
                r0 + (r1 - r0) * f.clamp(0.0, 1.0)
            }
        };
        if rate.is_finite() {
            rate.max(1.0)
        } else {
            self.elementwise_bytes
        }
    }

    /// Measured over modelled time of matmuls, of fused element-wise
    /// kernels, and of the other memory-bound kernels.
    pub fn efficiencies(&self) -> (f64, f64, f64) {
        let bytes = self.bytes_efficiency.unwrap_or(self.efficiency);
        (self.efficiency, bytes, self.kernel_efficiency.unwrap_or(bytes))
    }

    /// FLOP/s of one core for a product whose smallest dim is `k`.
    pub fn matmul_rate(&self, k: usize) -> f64 {
        let mut rate = self.matmul_by_size.first().map(|x| x.1).unwrap_or(self.matmul_flops);
        for &(size, r) in &self.matmul_by_size {
            if size <= k {
                rate = r;
            }
        }
        rate.max(1.0)
    }
}

fn default_overhead() -> f64 {
    0.5e-6
}

impl Default for Profile {
    fn default() -> Profile {
        Profile {
            matmul_flops: 200e9,
            elementwise_bytes: 25e9,
            elementwise_by_size: Vec::new(),
            link_bytes: 10e9,
            link_latency: 30e-6,
            cores: 2,
            op_overhead: default_overhead(),
            matmul_overhead: None,
            kernel_overhead: None,
            matmul_by_size: Vec::new(),
            efficiency: 1.0,
            bytes_efficiency: None,
            kernel_efficiency: None,
            thread_speedup: None,
            bytes_speedup: None,
            devices_speedup: None,
            crowding: None,
            split_cost: None,
        }
    }
}

/// One placement the search considered.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub data: usize,
    pub model: usize,
    pub pipe: usize,
    pub microbatches: usize,
    /// The pipeline schedule (GPipe or 1F1B; only meaningful when `pipe` > 1).
    pub schedule: String,
    /// Embedding tables split along their width over the tensor axis.
    pub sharded_embeddings: bool,
    /// Units (layer names) per stage.
    pub stages: Vec<Vec<String>>,
    pub compute_s: f64,
    /// Communication on the critical path.
    pub comm_s: f64,
    /// Of `comm_s`, the tensor-parallel collectives inside the passes.
    pub tensor_comm_s: f64,
    /// Communication hidden behind compute (pipeline transfers in the steady state).
    pub overlapped_s: f64,
    pub bubble_s: f64,
    /// Predicted bytes of the fullest device.
    pub memory: u64,
    /// Exact bytes of the fullest device, for candidates partitioned for real.
    pub exact_memory: Option<u64>,
    pub fits: bool,
    /// The candidate as placement text.
    pub placement: String,
    #[serde(skip)]
    stage_units: Vec<Vec<Unit>>,
    #[serde(skip)]
    shards: Vec<Shard>,
    #[serde(skip)]
    schedule_kind: Schedule,
}

/// Predicted step times within this fraction of each other count as even.
pub const NEAR_TIE: f64 = 0.03;

impl Candidate {
    pub fn step_s(&self) -> f64 {
        self.compute_s + self.comm_s + self.bubble_s
    }

    /// What makes a plan harder to run well, most weighty first: pipeline
    /// stages, the tensor degree, microbatches, split tables.
    pub fn complexity(&self) -> (usize, usize, usize, bool) {
        (self.pipe, self.model, self.microbatches, self.sharded_embeddings)
    }

    pub fn name(&self) -> String {
        let mut parts = Vec::new();
        if self.data > 1 {
            parts.push(format!("data {}", self.data));
        }
        if self.model > 1 {
            parts.push(format!("tensor {}{}", self.model, if self.sharded_embeddings { " with sharded embeddings" } else { "" }));
        }
        if self.pipe > 1 {
            parts.push(format!("pipeline {} × {} microbatches ({})", self.pipe, self.microbatches, self.schedule));
        }
        if parts.is_empty() {
            "one device".into()
        } else {
            parts.join(", ")
        }
    }
}

/// The outcome of a search.
#[derive(Clone, Debug, Serialize)]
pub struct Search {
    pub devices: usize,
    pub budget: Option<u64>,
    /// Best first: fitting candidates by predicted time, then the others.
    pub candidates: Vec<Candidate>,
    /// Index of the chosen candidate (the first that fits when partitioned).
    pub chosen: Option<usize>,
    pub considered: usize,
    /// The chosen candidate as placement text (empty when none fits).
    pub placement: String,
}

/// Per-unit figures of one training step at the full batch.
#[derive(Clone, Debug, Default)]
struct UnitCost {
    /// Seconds of matmul on one core.
    flops: f64,
    /// Bytes moved by the other forward and backward kernels, each weighted
    /// by its kind's efficiency.
    bytes: f64,
    act: f64,
    params: f64,
    /// Bytes of the parameters Megatron pairs split.
    shardable: f64,
    /// Megatron pairs (attention, MLP) in the unit.
    pairs: usize,
    /// Bytes of the activation each pair all-reduces.
    pair_bytes: f64,
    /// Kernels per step by kind (see [`kernel_kind`]; each costs a fixed overhead).
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

fn unit_prefix(c: &Checked, u: Unit) -> String {
    match u {
        Unit::Layer(i) => c.model.top[i].name.clone(),
        Unit::Elem(i, j) => format!("{}.{j}", c.model.top[i].name),
    }
}

/// Megatron shards of the instances under `prefix` that `t` divides.
fn megatron(c: &Checked, prefix: &str, t: usize) -> (Vec<Shard>, usize) {
    let mut shards = Vec::new();
    let mut pairs = 0;
    for inst in &c.model.instances {
        if !(inst.path == prefix || inst.path.starts_with(&format!("{prefix}."))) {
            continue;
        }
        let param = |name: &str| c.model.params.iter().position(|p| p.path == format!("{}.{name}", inst.path));
        let dims = |i: usize| c.model.params[i].ty.shape.iter().map(|d| d.size.max(0) as usize).collect::<Vec<_>>();
        match inst.template.as_str() {
            "SelfAttention" => {
                let heads = inst
                    .args
                    .iter()
                    .find(|(n, _)| n == "heads")
                    .and_then(|(_, v)| if let crate::check::types::Val::Int(i, _) = v { Some(*i) } else { None })
                    .unwrap_or(1)
                    .max(1) as usize;
                let (Some(q), Some(k), Some(v), Some(o)) = (param("wq"), param("wk"), param("wv"), param("wo")) else { continue };
                if t > 1 && heads.is_multiple_of(t) && dims(q)[1].is_multiple_of(t) {
                    for p in [q, k, v] {
                        shards.push(Shard { param: p, spec: vec![None, Some(usize::MAX)] });
                    }
                    shards.push(Shard { param: o, spec: vec![Some(usize::MAX), None] });
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
fn table_shards(c: &Checked, prefix: &str, t: usize) -> Vec<Shard> {
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

/// The kind of a step for the cost model: 0 matmuls, 1 fused element-wise
/// kernels and the optimizer update, 2 the library's other kernels
/// (reductions, softmax, norms, losses, gathers, layout changes).
pub fn kernel_kind(step: &crate::kernel::Step) -> usize {
    match &step.kind {
        StepKind::MatMul { .. } | StepKind::Op(Op::MatMul) => 0,
        StepKind::Fused(_) => 1,
        _ if step.role == Role::Update => 1,
        _ => 2,
    }
}

fn size_bucket(size: f64, threshold: f64) -> usize {
    ((size.max(1.0) / threshold).log2().floor() as i32 + BUCKET0).clamp(0, BUCKETS as i32 - 1) as usize
}

/// Summarises the training graph per unit (in forward order).
fn unit_costs(c: &Checked, g: &Graph, units: &[Unit], pr: &Profile) -> Vec<UnitCost> {
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
    let (_, e_fused, e_kernel) = pr.efficiencies();
    let len = |b: &crate::kernel::BufId| program.buffers[b.0 as usize].len() as f64;
    for step in &program.steps {
        let Some(u) = unit[program.buffers[step.output.0 as usize].node.0 as usize] else { continue };
        out[u].ops[kernel_kind(step)] += 1.0;
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

/// Contiguous cuts of `costs` into `p` stages minimising the largest stage.
fn balanced_cuts(costs: &[f64], p: usize) -> Option<Vec<std::ops::Range<usize>>> {
    let n = costs.len();
    if p == 0 || p > n {
        return None;
    }
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(costs.iter().scan(0.0, |s, c| {
            *s += c;
            Some(*s)
        }))
        .collect();
    // best[k][i]: the largest stage when the first i units form k stages.
    let mut best = vec![vec![f64::INFINITY; n + 1]; p + 1];
    let mut from = vec![vec![0usize; n + 1]; p + 1];
    best[0][0] = 0.0;
    for k in 1..=p {
        for i in k..=n {
            for j in (k - 1)..i {
                let v = best[k - 1][j].max(prefix[i] - prefix[j]);
                if v < best[k][i] {
                    best[k][i] = v;
                    from[k][i] = j;
                }
            }
        }
    }
    let mut cuts = Vec::new();
    let mut i = n;
    for k in (1..=p).rev() {
        let j = from[k][i];
        cuts.push(j..i);
        i = j;
    }
    cuts.reverse();
    Some(cuts)
}

fn ring(bytes: f64, k: usize, factor: f64, pr: &Profile) -> f64 {
    if k <= 1 {
        return 0.0;
    }
    let k = k as f64;
    factor * (k - 1.0) / k * bytes / pr.link_bytes + factor * (k - 1.0) * pr.link_latency
}

/// Searches placements of `c` (whose placement is `auto`) over its devices.
pub fn search(c: &Checked, g: &Graph, pr: &Profile) -> Search {
    let n = c.devices.len().max(1);
    let (budget, objective) = match &c.placement {
        Placement::Auto { memory_per_device, objective } => (*memory_per_device, *objective),
        _ => (None, Objective::StepTime),
    };
    let budget = budget.or_else(|| c.devices.iter().filter_map(|d| d.memory).min());
    let units: Vec<Unit> = c.model.forward_order.clone();
    let costs = unit_costs(c, g, &units, pr);
    let batch = c.train.batch.max(1) as usize;
    let states = match c.train.optimizer {
        Optimizer::Sgd { momentum, .. } => usize::from(momentum != 0.0),
        Optimizer::Adam { .. } => 2,
    } as f64;
    let mut cands = Vec::new();
    let mut considered = 0;
    for d in (1..=n).filter(|d| n.is_multiple_of(*d)) {
        for t in (1..=n / d).filter(|t| (n / d).is_multiple_of(*t)) {
            let p = n / d / t;
            if d > batch || p > units.len() {
                continue;
            }
            let cuts = if p == 1 {
                Some(std::iter::once(0..units.len()).collect())
            } else {
                balanced_cuts(&costs.iter().map(|u| u.flops + u.bytes / pr.elementwise_bytes).collect::<Vec<_>>(), p)
            };
            let Some(cuts) = cuts else { continue };
            // Megatron shards for every unit; a unit with none stays replicated.
            let mut shards = Vec::new();
            let mut pairs = vec![0usize; units.len()];
            if t > 1 {
                for (i, u) in units.iter().enumerate() {
                    let (s, k) = megatron(c, &unit_prefix(c, *u), t);
                    shards.extend(s);
                    pairs[i] = k;
                }
                if shards.is_empty() {
                    continue;
                }
            }
            let rows = batch.div_ceil(d);
            let mbs: Vec<usize> = if p == 1 { vec![1] } else { [1, 2, 4, 8, 16, 32].into_iter().filter(|m| *m >= p && rows.is_multiple_of(*m)).collect() };
            // Embedding tables replicated, or split along their width over the tensor axis.
            let tables: Vec<Shard> = if t > 1 { units.iter().flat_map(|u| table_shards(c, &unit_prefix(c, *u), t)).collect() } else { Vec::new() };
            let table_choices: &[bool] = if tables.is_empty() { &[false] } else { &[false, true] };
            let schedules: &[Schedule] = if p == 1 { &[Schedule::OneFOneB] } else { &[Schedule::OneFOneB, Schedule::GPipe] };
            for m in mbs {
                for &split_tables in table_choices {
                    for &schedule in schedules {
                        considered += 1;
                        let shape = Shape { d, t, p, m, n, split_tables, schedule, server: false };
                        let mut all = shards.clone();
                        if split_tables {
                            all.extend(tables.iter().cloned());
                        }
                        cands.push(evaluate(c, &costs, &units, &cuts, &pairs, all, shape, states, budget, pr));
                    }
                }
            }
        }
    }
    let key = |c: &Candidate| match objective {
        Objective::StepTime => c.step_s(),
        Objective::Memory => c.memory as f64,
    };
    // Fitting candidates by the objective, then by memory (1F1B before GPipe
    // at the same time); the others by how close they come to fitting.
    cands.sort_by(|a, b| {
        let k = |c: &Candidate| if c.fits { key(c) } else { c.memory as f64 };
        b.fits.cmp(&a.fits).then(k(a).total_cmp(&k(b))).then(a.memory.cmp(&b.memory)).then(
            (a.data, a.model, a.pipe, a.microbatches, a.sharded_embeddings, &a.schedule).cmp(&(
                b.data,
                b.model,
                b.pipe,
                b.microbatches,
                b.sharded_embeddings,
                &b.schedule,
            )),
        )
    });
    // Predictions this close are within the model's error: among fitting
    // candidates within `NEAR_TIE` of the fastest, the simplest goes first
    // (fewer pipeline stages, then a lower tensor degree, then fewer
    // microbatches), as an expert would pick at an even estimate.
    if objective == Objective::StepTime {
        let best = cands.first().filter(|c| c.fits).map(Candidate::step_s);
        if let Some(best) = best {
            let near = cands.iter().take_while(|c| c.fits && c.step_s() <= best * (1.0 + NEAR_TIE)).count();
            cands[..near].sort_by(|a, b| a.complexity().cmp(&b.complexity()).then(a.step_s().total_cmp(&b.step_s())).then(a.memory.cmp(&b.memory)));
        }
    }
    // Partition the best for real: the chosen plan must fit exactly.
    let mut chosen = None;
    for i in 0..cands.len().min(6) {
        if !cands[i].fits {
            break;
        }
        let mut placed = c.clone();
        placed.placement = Placement::Explicit(explicit(c, &cands[i]));
        if let Ok(plan) = partition_devices(&placed, g, true) {
            let exact = memory::plan(&plan).iter().map(memory::Memory::total).max().unwrap_or(0);
            cands[i].exact_memory = Some(exact);
            if budget.is_none_or(|b| exact <= b) {
                chosen = Some(i);
                break;
            }
            cands[i].fits = false;
        } else {
            cands[i].fits = false;
        }
    }
    for cand in &mut cands {
        cand.placement = placement_text(c, cand);
    }
    let placement = chosen.map(|i| cands[i].placement.clone()).unwrap_or_default();
    Search { devices: n, budget, candidates: cands, chosen, considered, placement }
}

/// Temporaries of the largest tensor's update (Adam's moments, the
/// corrected step, the decayed weight, ...).
const UPDATE_TEMPS: f64 = 6.0;

/// The degrees of a candidate and the devices it runs on.
#[derive(Clone, Copy)]
struct Shape {
    d: usize,
    t: usize,
    p: usize,
    m: usize,
    n: usize,
    split_tables: bool,
    schedule: Schedule,
    /// A parameter server sums the gradients and updates (explicit placements only).
    server: bool,
}

/// Predicted time and memory of one candidate.
#[allow(clippy::too_many_arguments)]
fn evaluate(
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
    let Shape { d, t, p, m, n, split_tables, schedule, server } = shape;
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
        let mem = params * (2.0 + states + 1.0) + UPDATE_TEMPS * largest + whole_grads + act * in_flight;
        // Memory-bound kernels run faster when the device's whole working
        // set stays in the caches: their seconds at the headline bandwidth,
        // scaled. Devices that take turns on a core share its caches.
        let cache = pr.elementwise_bytes / pr.elementwise_rate(mem * (n as f64 / pr.cores.max(1) as f64).max(1.0));
        // Devices beyond the cores wait their turn for the fixed costs too.
        let calls = pr.call_costs();
        let overhead = us.iter().map(|u| (0..3).map(|k| u.ops[k] * calls[k]).sum::<f64>()).sum::<f64>();
        let mut tp: f64 =
            us.iter().zip(&pairs[r.clone()]).map(|(u, k)| 2.0 * *k as f64 * ring(u.pair_bytes / (d * m) as f64, t, 2.0, pr)).sum::<f64>() * m as f64;
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
        let update: f64 = cache * us.iter().map(|u| u.update * share(u)).sum::<f64>() / bw;
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
        let small_update: f64 = cache * us.iter().map(|u| u.update_small * share(u)).sum::<f64>() / pr.elementwise_bytes;
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
            ring(params, d, 2.0, pr)
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
        stages: stages.iter().map(|s| s.iter().map(|u| c.model.unit_name(*u)).collect()).collect(),
        compute_s: compute.max(0.0),
        comm_s: tp_comm + dp_comm + exposed_pp + dispatch,
        tensor_comm_s: tp_comm,
        overlapped_s: pp_comm - exposed_pp,
        bubble_s: bubble,
        memory,
        exact_memory: None,
        fits: budget.is_none_or(|b| memory <= b),
        placement: String::new(),
        stage_units: stages,
        shards,
        schedule_kind: schedule,
    }
}

/// The predicted step time and memory of an explicit placement (by the same
/// model the search uses; tensor parallelism is assumed to split the
/// Megatron pairs it finds).
pub fn predict(c: &Checked, g: &Graph, pr: &Profile) -> Option<Candidate> {
    let single =
        Explicit { mesh: vec![], data_axis: None, shards: vec![], pipeline: None, parameter_server: None, span: crate::Span::new(crate::SourceId::USER, 0, 0) };
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
    let states = match c.train.optimizer {
        Optimizer::Sgd { momentum, .. } => usize::from(momentum != 0.0),
        Optimizer::Adam { .. } => 2,
    } as f64;
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
        Shape { d, t, p, m, n, split_tables, schedule, server: e.parameter_server.is_some() },
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

/// The explicit placement a candidate stands for.
pub fn explicit(c: &Checked, cand: &Candidate) -> Explicit {
    let mut mesh = Vec::new();
    let axis = |name: &str, k: usize, mesh: &mut Vec<(String, i64)>| {
        if k > 1 {
            mesh.push((name.to_string(), k as i64));
            Some(mesh.len() - 1)
        } else {
            None
        }
    };
    let data_axis = axis("data", cand.data, &mut mesh);
    let model_axis = axis("model", cand.model, &mut mesh);
    let pipe_axis = axis("pipe", cand.pipe, &mut mesh);
    if mesh.is_empty() {
        mesh.push(("data".into(), 1));
    }
    let shards = match model_axis {
        Some(m) => cand.shards.iter().map(|s| Shard { param: s.param, spec: s.spec.iter().map(|x| x.map(|_| m)).collect() }).collect(),
        None => Vec::new(),
    };
    let pipeline =
        pipe_axis.map(|a| Pipeline { axis: a, stages: cand.stage_units.clone(), microbatches: cand.microbatches as i64, schedule: cand.schedule_kind });
    let span = match &c.placement {
        Placement::Explicit(e) => e.span,
        _ => crate::Span::new(crate::SourceId::USER, 0, 0),
    };
    Explicit { mesh, data_axis, shards, pipeline, parameter_server: None, span }
}

/// A parameter's path as a plan writes it: `blocks.0.attn.wq` → `blocks[0].attn.wq`.
fn plan_path(path: &str) -> String {
    let mut out = String::new();
    for part in path.split('.') {
        if !out.is_empty() && part.chars().all(|c| c.is_ascii_digit()) {
            out += &format!("[{part}]");
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out += part;
        }
    }
    out
}

/// A candidate as placement text, to paste into a plan in place of `placement auto`.
pub fn placement_text(c: &Checked, cand: &Candidate) -> String {
    let e = explicit(c, cand);
    let mut out = String::from("placement {\n");
    out += &format!("  mesh ({})\n", e.mesh.iter().map(|(n, k)| format!("{n}: {k}")).collect::<Vec<_>>().join(", "));
    if let Some(a) = e.data_axis {
        out += &format!("  data_parallel over {}\n", e.mesh[a].0);
    }
    for s in &e.shards {
        let spec: Vec<&str> = s.spec.iter().map(|x| x.map(|a| e.mesh[a].0.as_str()).unwrap_or("_")).collect();
        out += &format!("  shard {} ({})\n", plan_path(&c.model.params[s.param].path), spec.join(", "));
    }
    if let Some(pl) = &e.pipeline {
        out += &format!("  pipeline over {} {{\n", e.mesh[pl.axis].0);
        for st in &pl.stages {
            out += &format!("    stage {}\n", st.iter().map(|u| c.model.unit_name(*u)).collect::<Vec<_>>().join(", "));
        }
        out += &format!("    microbatches {}\n    schedule {}\n  }}\n", pl.microbatches, pl.schedule.name());
    }
    out + "}\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_balance_the_largest_stage() {
        let costs = [1.0, 1.0, 1.0, 1.0, 4.0, 1.0];
        let c = balanced_cuts(&costs, 3).expect("cuts");
        assert_eq!(c.len(), 3);
        let largest = c.iter().map(|r| costs[r.clone()].iter().sum::<f64>()).fold(0.0, f64::max);
        assert_eq!(largest, 4.0);
        assert_eq!(c.first().map(|r| r.start), Some(0));
        assert_eq!(c.last().map(|r| r.end), Some(6));
        assert!(balanced_cuts(&[1.0], 2).is_none());
    }
}
