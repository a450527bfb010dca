//! Partition: the training graph and a placement → one program per device.
//!
//! Input: a [`Checked`] plan and its training graph (forward, backward and
//! update). Output: a [`Plan`]: for every device a kernel [`Program`] (its
//! part of the graph, with the transfers and collectives it takes part in)
//! and a schedule of forward, backward and update passes over microbatches.
//!
//! How:
//! - Layouts are types. Every value has, per mesh axis, a layout [`Layout`]:
//!   replicated, split along a dim, or a partial sum. Parameters take the
//!   layouts the placement gives, inputs are split along the batch over the
//!   data axis (and over microbatches, a virtual axis of its own), and
//!   `rules.rs` propagates layouts through every op of the graph, in order.
//!   Where an op needs an operand in another layout, the device programs
//!   convert it: a partial sum is all-reduced (or reduce-scattered into a
//!   split), a split value all-gathered (or re-split along another dim by an
//!   all-to-all), a replicated value sliced (free) or masked into a partial
//!   sum (free).
//! - Pipeline stages: a parameter lives on the stage of its layer; a forward
//!   op on the latest stage of its operands; a backward op with the forward
//!   op it differentiates; an update op with the one parameter it updates
//!   (or, when it serves several, on the latest stage of its operands).
//!   Values that cross stages are sent and received.
//! - Gradients leave the backward pass through accumulators (summed over
//!   microbatches); gradients that are partial over the data axis are then
//!   all-reduced in buckets, or, under a parameter server, sent to the
//!   server, which updates and sends back the parameters.
//!
//! Invariants (checked by `verify`): every value's local shape follows from
//! its global shape and layout; every send has its receive, in the same
//! order; the members of a collective meet it in the same order.

mod local;
pub mod memory;
pub mod report;
mod rules;
pub(crate) mod schedule;
pub mod verify;

pub use schedule::{Instr, Phase};

use crate::check::{Checked, Placement, Schedule};
use crate::graph::{Graph, NodeId, Op, Role};
use crate::kernel::Program;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A value's layout along one mesh axis. (Compiled plan files spell the
/// variants `R`, `S` and `P`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Layout {
    /// Every device of the axis holds all of it.
    #[serde(rename = "R")]
    Replicated,
    /// Split along dim `.0` in blocks of whole granules of `.1` elements
    /// of that dim (1 unless an uneven split was merged with inner dims).
    #[serde(rename = "S")]
    Split(usize, usize),
    /// Every device holds a full-size partial sum; the value is their sum.
    #[serde(rename = "P")]
    Partial,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::Replicated => write!(f, "replicated"),
            Layout::Split(d, _) => write!(f, "split(dim {d})"),
            Layout::Partial => write!(f, "partial"),
        }
    }
}

/// Elements `[start, end)` of chunk `i` when `len` elements are split `n`
/// ways as evenly as possible (the first `len % n` chunks one longer).
pub fn chunk_range(len: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    if n == 0 {
        return 0..0;
    }
    let (base, rem) = (len / n, len % n);
    let start = i * base + i.min(rem);
    start..start + base + usize::from(i < rem)
}

/// An axis a layout is given along: a mesh axis, or the microbatches.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayoutAxis {
    pub name: String,
    pub size: usize,
    /// Its index in the mesh (None for microbatches).
    pub mesh: Option<usize>,
}

/// The device mesh: axes in declaration order, devices numbered row-major.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Mesh {
    pub axes: Vec<(String, usize)>,
    pub data: Option<usize>,
    pub pipe: Option<usize>,
}

impl Mesh {
    pub fn size(&self) -> usize {
        self.axes.iter().map(|a| a.1).product()
    }

    pub fn coords(&self, dev: usize) -> Vec<usize> {
        let mut c = vec![0; self.axes.len()];
        let mut rest = dev;
        for (i, (_, n)) in self.axes.iter().enumerate().rev() {
            c[i] = rest % n;
            rest /= n;
        }
        c
    }

    pub fn device(&self, coords: &[usize]) -> usize {
        self.axes.iter().zip(coords).fold(0, |acc, ((_, n), c)| acc * n + c)
    }

    /// The devices that differ from `dev` only along `axis`, in coordinate order.
    pub fn group(&self, dev: usize, axis: usize) -> Vec<u32> {
        let mut c = self.coords(dev);
        (0..self.axes[axis].1)
            .map(|i| {
                c[axis] = i;
                self.device(&c) as u32
            })
            .collect()
    }
}

/// Where one device holds one global tensor: per dim, `start..start + len`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Piece {
    pub index: usize,
    pub global: Vec<usize>,
    pub start: Vec<usize>,
    pub len: Vec<usize>,
}

/// The program of one device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceProgram {
    pub device: usize,
    /// Mesh coordinates (empty for a parameter server outside the mesh).
    pub coords: Vec<usize>,
    pub stage: usize,
    pub program: Program,
    /// Forward, backward and update passes in order.
    pub schedule: Vec<Instr>,
    /// Microbatches in flight at most (activation buffer sets).
    pub slots: usize,
    /// The device reports the loss (its part of it, summed over microbatches).
    pub reports_loss: bool,
    /// Its rank along the data axis and the axis size (inputs are the rows
    /// of this rank's part of the batch, split again into microbatches).
    pub data_rank: Option<usize>,
    /// Parameters and optimizer states it holds, as parts of the global tensors.
    pub params: Vec<Piece>,
    pub states: Vec<Piece>,
}

/// The whole partitioned plan.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub mesh: Mesh,
    pub layout_axes: Vec<LayoutAxis>,
    pub microbatches: usize,
    pub schedule: Option<String>,
    pub server: Option<usize>,
    pub devices: Vec<DeviceProgram>,
    /// Per parameter: its stage and its layout per layout axis.
    pub param_layouts: Vec<(usize, Vec<Layout>)>,
    /// FNV-1a hash of the rest of the plan ([`plan_hash`]): every message carries it.
    pub hash: u64,
}

/// Why a placement cannot be partitioned.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionError(pub String);

impl std::fmt::Display for PartitionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a node runs along the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Home {
    Stage(usize),
    /// A source or a value computed from sources only: made wherever used.
    Anywhere,
    /// The update of tied parameter `.0`, run on each stage that holds a copy
    /// of it ([`Global::replicas`]).
    Replicated(usize),
}

/// The global analysis shared by every device's program.
pub(crate) struct Global<'a> {
    pub g: &'a Graph,
    pub mesh: Mesh,
    pub axes: Vec<LayoutAxis>,
    /// Index of the microbatch axis in `axes`.
    pub mb_axis: usize,
    pub data_axis: Option<usize>,
    pub layout: Vec<Vec<Layout>>,
    /// Per node: required operand layouts and the scale rule, per axis.
    pub args: Vec<Vec<Vec<Layout>>>,
    pub scale: Vec<rules::Scale>,
    pub home: Vec<Home>,
    pub stages: usize,
    pub param_stage: Vec<usize>,
    /// Per parameter: the stages that hold a copy of it, when it is tied,
    /// i.e. read by the forward pass on more than one stage (an output head
    /// reusing the embedding table); empty otherwise. Each copy is updated
    /// with the sum of every stage's gradient, as Megatron keeps its
    /// embedding group equal.
    pub replicas: Vec<Vec<usize>>,
    pub param_layout: Vec<Vec<Layout>>,
    /// Per parameter, its ZeRO stage (`zero N`; 0 when not sharded).
    pub zero: Vec<u8>,
    /// Per parameter, its optimizer states' layouts: the parameter's, split
    /// over the data axis as well from ZeRO stage 1.
    pub state_layout: Vec<Vec<Layout>>,
    /// The gradients of ZeRO-sharded parameters and the data-axis split the
    /// update reads them in (reduce-scattered rather than all-reduced).
    pub grad_split: std::collections::HashMap<NodeId, Layout>,
    /// Forward/backward values read by the update, in node order.
    pub crossing: Vec<NodeId>,
    pub users: Vec<Vec<NodeId>>,
    pub server: Option<usize>,
}

/// Partitions the training graph `g` of `c` over its devices.
pub fn partition(c: &Checked, g: &Graph) -> Result<Plan, PartitionError> {
    partition_devices(c, g, false)
}

/// As [`partition`]; with `representatives`, only the devices whose mesh
/// coordinates are 0 on every axis but the pipeline's (one per stage, each
/// holding the largest share of an uneven split): enough for memory plans.
pub fn partition_devices(c: &Checked, g: &Graph, representatives: bool) -> Result<Plan, PartitionError> {
    let err = |m: String| Err(PartitionError(m));
    let (mesh, shards, pipeline, server, zero) = match &c.placement {
        Placement::Single => (Mesh { axes: vec![], data: None, pipe: None }, vec![], None, None, vec![]),
        Placement::Explicit(e) => (
            Mesh {
                axes: e.mesh.iter().map(|(n, s)| (n.clone(), (*s).max(1) as usize)).collect(),
                data: e.data_axis,
                pipe: e.pipeline.as_ref().map(|p| p.axis),
            },
            e.shards.clone(),
            e.pipeline.clone(),
            e.parameter_server,
            e.zero.clone(),
        ),
        Placement::Auto { .. } => return err("`placement auto` is partitioned as the placement `planner::search` chooses".into()),
    };
    let n_dev = c.devices.len().max(1);
    if mesh.size() > n_dev {
        return err(format!("the mesh has {} devices but the plan declares {n_dev}", mesh.size()));
    }
    if server.is_some() && (pipeline.is_some() || !shards.is_empty() || mesh.axes.len() != 1 || mesh.data.is_none()) {
        return err("a parameter server serves a data-parallel mesh of one axis; drop the shards and the pipeline, or drop the server".into());
    }
    let microbatches = pipeline.as_ref().map(|p| p.microbatches.max(1) as usize).unwrap_or(1);
    let mut axes: Vec<LayoutAxis> = mesh
        .axes
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != mesh.pipe)
        .map(|(i, (n, s))| LayoutAxis { name: n.clone(), size: *s, mesh: Some(i) })
        .collect();
    let data_axis = mesh.data.and_then(|d| axes.iter().position(|a| a.mesh == Some(d)));
    axes.push(LayoutAxis { name: "microbatch".into(), size: microbatches, mesh: None });
    let mb_axis = axes.len() - 1;
    let m = &c.model;

    // Parameter layouts.
    let mut param_layout: Vec<Vec<Layout>> = vec![vec![Layout::Replicated; axes.len()]; m.params.len()];
    for s in &shards {
        for (d, a) in s.spec.iter().enumerate() {
            if let Some(a) = a {
                if let Some(ax) = axes.iter().position(|x| x.mesh == Some(*a)) {
                    param_layout[s.param][ax] = Layout::Split(d, 1);
                }
            }
        }
    }
    // ZeRO: optimizer states (stage 1), gradients (2) and parameters (3)
    // split over the data axis too, along the first dim no other axis
    // splits that has at least one row per rank.
    let zero: Vec<u8> = (0..m.params.len()).map(|p| zero.get(p).copied().unwrap_or(0)).collect();
    let mut state_layout = param_layout.clone();
    if let Some(d) = data_axis.filter(|&d| axes[d].size > 1) {
        for (p, z) in zero.iter().enumerate() {
            if *z == 0 {
                continue;
            }
            let shape: Vec<usize> = m.params[p].ty.shape.iter().map(|x| x.size.max(0) as usize).collect();
            let free = |dim: usize| !param_layout[p].iter().any(|l| matches!(l, Layout::Split(x, _) if *x == dim));
            let k = axes[d].size;
            let dim = (0..shape.len())
                .find(|&i| free(i) && shape[i].is_multiple_of(k))
                .or_else(|| (0..shape.len()).filter(|&i| free(i) && shape[i] >= k).max_by_key(|&i| shape[i]));
            if let Some(dim) = dim {
                state_layout[p][d] = Layout::Split(dim, 1);
                if *z >= 3 {
                    param_layout[p][d] = Layout::Split(dim, 1);
                }
            }
        }
    }
    let mut grad_split = std::collections::HashMap::new();
    for (p, gr) in &g.grads {
        if let (Some(d), Some(&z)) = (data_axis, zero.get(*p)) {
            if z >= 1 && state_layout[*p][d] != Layout::Replicated {
                grad_split.insert(*gr, state_layout[*p][d]);
            }
        }
    }
    // Parameter stages from the pipeline's units.
    let stages = pipeline.as_ref().map(|p| p.stages.len()).unwrap_or(1).max(1);
    let mut param_stage = vec![0usize; m.params.len()];
    if let Some(p) = &pipeline {
        for (s, units) in p.stages.iter().enumerate() {
            for u in units {
                for pi in 0..m.params.len() {
                    if m.unit_owns(*u, pi) {
                        param_stage[pi] = s;
                    }
                }
            }
        }
    }

    let n = g.len();
    let mut users: Vec<Vec<NodeId>> = vec![Vec::new(); n];
    for id in g.ids() {
        for a in g.args(id) {
            if !users[a.0 as usize].contains(&id) {
                users[a.0 as usize].push(id);
            }
        }
    }
    // Roles come in order: forward, backward, update.
    let rank = |r: Role| match r {
        Role::Forward => 0,
        Role::Backward => 1,
        Role::Update => 2,
    };
    if g.ids().collect::<Vec<_>>().windows(2).any(|w| rank(g.node(w[0]).role) > rank(g.node(w[1]).role)) {
        return err("internal: the training graph's passes are interleaved".into());
    }

    let mut glob = Global {
        g,

        mesh,
        axes,
        mb_axis,
        data_axis,
        layout: vec![Vec::new(); n],
        args: vec![Vec::new(); n],
        scale: vec![rules::Scale::None; n],
        home: vec![Home::Anywhere; n],
        stages,
        param_stage,
        replicas: vec![Vec::new(); m.params.len()],
        param_layout,
        zero,
        state_layout,
        grad_split,
        crossing: Vec::new(),
        users,
        server,
    };
    glob.propagate()?;
    verify::check_layouts(g, &glob.layout, &glob.args).map_err(|e| PartitionError(format!("internal: {e}")))?;
    glob.place()?;
    if let Some(s) = (0..glob.stages).find(|s| !glob.home.iter().any(|h| *h == Home::Stage(*s))) {
        return err(format!(
            "pipeline stage {s} holds no parameters, so it would have nothing to run; put its layers in a stage with a layer that has parameters"
        ));
    }
    if let Some(d) = glob.data_axis {
        let (k, b) = (glob.axes[d].size, c.train.batch.max(0) as usize);
        for r in 0..k {
            let rows = chunk_range(b, k, r).len();
            if !rows.is_multiple_of(microbatches) {
                return err(format!("data-parallel rank {r} gets {rows} of the batch's {b} rows, which {microbatches} microbatches do not divide"));
            }
        }
    }
    glob.crossing = g
        .ids()
        .filter(|&id| !matches!(g.node(id).op, Op::Param(_) | Op::State(_) | Op::Input(_) | Op::Const(_) | Op::Hyper(_)))
        .filter(|&id| g.node(id).role != Role::Update && glob.users[id.0 as usize].iter().any(|u| g.node(*u).role == Role::Update))
        .collect();
    for &x in &glob.crossing {
        let l = &glob.layout[x.0 as usize];
        if glob.axes[mb_axis].size > 1 && l[mb_axis] != Layout::Partial {
            return err(format!("internal: the update reads {} which is not summed over microbatches", g.node(x).op.name()));
        }
        if glob.home[x.0 as usize] == Home::Anywhere {
            return err(format!("internal: the update reads {} which belongs to no stage", g.node(x).op.name()));
        }
    }

    let total = n_dev.max(glob.mesh.size());
    let mut devices = Vec::new();
    for dev in 0..total {
        if representatives && dev < glob.mesh.size() && glob.mesh.coords(dev).iter().enumerate().any(|(a, &x)| Some(a) != glob.mesh.pipe && x != 0) {
            continue;
        }
        devices.push(local::build(&glob, dev, pipeline.as_ref().map(|p| p.schedule))?);
    }
    let param_layouts = glob.param_stage.iter().zip(&glob.param_layout).map(|(s, l)| (*s, l.clone())).collect();
    let mut plan = Plan {
        mesh: glob.mesh.clone(),
        layout_axes: glob.axes.clone(),
        microbatches,
        schedule: pipeline.as_ref().map(|p| match p.schedule {
            Schedule::GPipe => "gpipe".to_string(),
            Schedule::OneFOneB => "1f1b".to_string(),
        }),
        server,
        devices,
        param_layouts,
        hash: 0,
    };
    plan.hash = plan_hash(&plan);
    Ok(plan)
}

/// A stable hash of the whole plan but its hash (FNV-1a over its JSON): the
/// mesh, the layout axes, the microbatches, the schedule, the server, every
/// device's program and schedule, and the parameter layouts.
pub fn plan_hash(p: &Plan) -> u64 {
    /// The plan's fields, every one but the hash, in declaration order.
    #[derive(Serialize)]
    struct Hashed<'a> {
        mesh: &'a Mesh,
        layout_axes: &'a [LayoutAxis],
        microbatches: usize,
        schedule: &'a Option<String>,
        server: Option<usize>,
        devices: &'a [DeviceProgram],
        param_layouts: &'a [(usize, Vec<Layout>)],
    }
    // Destructured so that a field added to `Plan` cannot be left out unnoticed.
    let Plan { mesh, layout_axes, microbatches, schedule, server, devices, param_layouts, hash: _ } = p;
    let fields = Hashed { mesh, layout_axes, microbatches: *microbatches, schedule, server: *server, devices, param_layouts };
    crate::hash::fnv1a(serde_json::to_string(&fields).unwrap_or_default().as_bytes())
}

impl Global<'_> {
    /// The stages that run node `n`: its stage, each stage holding a copy of
    /// the tied parameter it updates, or none (made wherever used).
    pub fn stages_of(&self, n: NodeId) -> Vec<usize> {
        match self.home[n.0 as usize] {
            Home::Stage(s) => vec![s],
            Home::Anywhere => Vec::new(),
            Home::Replicated(p) => self.replicas[p].clone(),
        }
    }

    fn shape(&self, n: NodeId) -> Vec<usize> {
        self.g.node(n).ty.shape.iter().map(|d| d.size.max(0) as usize).collect()
    }

    /// Drops what an axis cannot express: anything on an axis of one device,
    /// granules where the split is even.
    fn normalize(&self, shape: &[usize], l: &mut [Layout]) {
        for (a, x) in l.iter_mut().enumerate() {
            let k = self.axes[a].size;
            if k <= 1 {
                *x = Layout::Replicated;
            } else if let Layout::Split(d, u) = *x {
                if d >= shape.len() || shape[d] < k {
                    *x = Layout::Replicated;
                } else if u > 1 && (shape[d] / u).is_multiple_of(k) {
                    *x = Layout::Split(d, 1);
                }
            }
        }
    }

    /// Layouts of every node, in graph order.
    fn propagate(&mut self) -> Result<(), PartitionError> {
        let g = self.g;
        let na = self.axes.len();
        // Partial values some consumer already reduced, per axis: later
        // consumers read the reduced value too, rather than passing the
        // partial sum on into more reductions.
        let mut reduced: Vec<std::collections::HashSet<NodeId>> = vec![Default::default(); na];
        for id in g.ids() {
            let node = g.node(id);
            let shape = self.shape(id);
            let args = g.args(id);
            let mut out = vec![Layout::Replicated; na];
            let mut req: Vec<Vec<Layout>> = vec![vec![Layout::Replicated; na]; args.len()];
            let mut scale = rules::Scale::None;
            match &node.op {
                Op::Param(i) => out = self.param_layout[*i].clone(),
                Op::State(j) => out = self.state_layout[g.states[*j].param].clone(),
                Op::Input(_) => {
                    let batch = node.ty.shape.first().is_some_and(|d| d.sym.as_deref() == Some("batch"));
                    if batch {
                        if let Some(d) = self.data_axis {
                            out[d] = Layout::Split(0, 1);
                        }
                        out[self.mb_axis] = Layout::Split(0, 1);
                    }
                }
                _ => {
                    // The update reads forward/backward values after they are
                    // summed over microbatches and the data axis.
                    let view = |x: &NodeId, a: usize| {
                        let l = self.layout[x.0 as usize][a];
                        let xn = g.node(*x);
                        let summed = node.role == Role::Update
                            && xn.role != Role::Update
                            && !matches!(xn.op, Op::Param(_) | Op::State(_) | Op::Input(_) | Op::Const(_) | Op::Hyper(_));
                        let reduced_here = l == Layout::Partial && reduced[a].contains(x) && (xn.role == Role::Update) == (node.role == Role::Update);
                        if Some(a) == self.data_axis {
                            // A ZeRO-sharded gradient reaches the update
                            // reduce-scattered; a fully sharded parameter is
                            // gathered for the forward and backward passes.
                            if let (true, Some(s)) = (summed, self.grad_split.get(x)) {
                                return *s;
                            }
                            if let Op::Param(p) = xn.op {
                                if self.zero[p] >= 3 && node.role != Role::Update {
                                    return Layout::Replicated;
                                }
                            }
                        }
                        if (summed && (a == self.mb_axis || (Some(a) == self.data_axis && l == Layout::Partial))) || reduced_here {
                            Layout::Replicated
                        } else {
                            l
                        }
                    };
                    for a in 0..na {
                        let have: Vec<Layout> = args.iter().map(|x| view(x, a)).collect();
                        let r = rules::decide(g, id, &have, self.axes[a].size, node.role == Role::Update);
                        for (i, l) in r.args.into_iter().enumerate() {
                            req[i][a] = l;
                        }
                        out[a] = r.out;
                        if r.scale != rules::Scale::None {
                            scale = r.scale;
                        }
                    }
                }
            }
            // Assignments take the target's layout.
            if let Op::Assign(t) = node.op {
                let p = match t {
                    crate::graph::Target::Param(i) => i,
                    crate::graph::Target::State(j) => g.states[j].param,
                };
                req[0] = match t {
                    crate::graph::Target::Param(_) => self.param_layout[p].clone(),
                    crate::graph::Target::State(_) => self.state_layout[p].clone(),
                };
            }
            for (i, r) in req.iter_mut().enumerate() {
                let s = self.shape(args[i]);
                self.normalize(&s, r);
                for (a, l) in r.iter().enumerate() {
                    if *l == Layout::Replicated && self.layout[args[i].0 as usize].get(a) == Some(&Layout::Partial) {
                        reduced[a].insert(args[i]);
                    }
                }
            }
            self.normalize(&shape, &mut out);
            // Two mesh axes may not split one dim (microbatches nest inside the data axis).
            for a in 0..na {
                for b in a + 1..na {
                    if let (Layout::Split(d1, _), Layout::Split(d2, _)) = (out[a], out[b]) {
                        let nested = Some(a) == self.data_axis && b == self.mb_axis;
                        if d1 == d2 && !nested {
                            return Err(PartitionError(format!(
                                "{} would split dim {d1} of a {} over both `{}` and `{}`; shard it over one axis",
                                node.op.name(),
                                node.ty,
                                self.axes[a].name,
                                self.axes[b].name
                            )));
                        }
                    }
                }
            }
            self.layout[id.0 as usize] = out;
            self.args[id.0 as usize] = req;
            self.scale[id.0 as usize] = scale;
        }
        Ok(())
    }

    /// Pipeline stage of every node.
    fn place(&mut self) -> Result<(), PartitionError> {
        let g = self.g;
        let n = g.len();
        let latest = |home: &[Home], args: &[NodeId]| {
            args.iter()
                .filter_map(|a| match home[a.0 as usize] {
                    Home::Stage(s) => Some(s),
                    Home::Anywhere | Home::Replicated(_) => None,
                })
                .max()
                .map(Home::Stage)
                .unwrap_or(Home::Anywhere)
        };
        // Which parameters each update node serves (through the assignments it feeds).
        let mut serves: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
        for id in g.ids().collect::<Vec<_>>().into_iter().rev() {
            if let Op::Assign(t) = g.node(id).op {
                let p = match t {
                    crate::graph::Target::Param(i) => i,
                    crate::graph::Target::State(j) => g.states[j].param,
                };
                serves[id.0 as usize].insert(p);
            }
            let mine = serves[id.0 as usize].clone();
            for a in g.args(id) {
                serves[a.0 as usize].extend(mine.iter().copied());
            }
        }
        let staged = |home: &[Home], args: &[NodeId]| -> Vec<usize> {
            let s: BTreeSet<usize> = args
                .iter()
                .filter_map(|a| match home[a.0 as usize] {
                    Home::Stage(s) => Some(s),
                    Home::Anywhere | Home::Replicated(_) => None,
                })
                .collect();
            s.into_iter().collect()
        };
        let homes = |tied: &[Vec<usize>]| {
            // The additions that sum each tied parameter's gradients.
            let mut sums: BTreeSet<NodeId> = BTreeSet::new();
            for (p, t) in tied.iter().enumerate() {
                let mut todo: Vec<NodeId> = g.grads.get(&p).filter(|_| !t.is_empty()).into_iter().copied().collect();
                while let Some(x) = todo.pop() {
                    if g.node(x).op == Op::Add && g.node(x).role == Role::Backward && sums.insert(x) {
                        todo.extend(g.args(x));
                    }
                }
            }
            let mut home = vec![Home::Anywhere; n];
            for id in g.ids() {
                let node = g.node(id);
                let args = g.args(id);
                let tied_param = |p: usize| !tied[p].is_empty();
                home[id.0 as usize] = match (&node.op, node.role) {
                    (Op::Param(i), _) if tied_param(*i) => Home::Anywhere,
                    (Op::State(j), _) if tied_param(g.states[*j].param) => Home::Anywhere,
                    (Op::Param(i), _) => Home::Stage(self.param_stage[*i]),
                    (Op::State(j), _) => Home::Stage(self.param_stage[g.states[*j].param]),
                    (Op::Input(_) | Op::Const(_) | Op::Hyper(_), _) => Home::Anywhere,
                    (_, Role::Forward) => latest(&home, &args),
                    // The sum of a tied parameter's gradients from several
                    // stages: on the earliest, whose backward pass runs last,
                    // so each later stage's part arrives before it is needed.
                    (_, Role::Backward) if sums.contains(&id) && staged(&home, &args).len() > 1 => Home::Stage(staged(&home, &args)[0]),
                    (_, Role::Backward) => match g.origin.get(&id) {
                        Some(o) => match home[o.0 as usize] {
                            Home::Anywhere | Home::Replicated(_) => latest(&home, &args),
                            h => h,
                        },
                        None => latest(&home, &args),
                    },
                    (_, Role::Update) => {
                        let served = &serves[id.0 as usize];
                        let s: BTreeSet<usize> = served.iter().map(|p| self.param_stage[*p]).collect();
                        match served.iter().next() {
                            Some(&p) if served.len() == 1 && tied_param(p) => Home::Replicated(p),
                            _ if s.len() == 1 && !matches!(latest(&home, &args), Home::Anywhere) => Home::Stage(*s.iter().next().unwrap_or(&0)),
                            _ => latest(&home, &args),
                        }
                    }
                };
            }
            home
        };
        let mut home = homes(&self.replicas);
        // Tied parameters: a parameter whose value (or a value made from it
        // alone, such as its transpose) is read by the forward pass on a
        // stage other than its own gets a copy on each such stage.
        if self.stages > 1 {
            let mut only: Vec<Option<usize>> = vec![None; n];
            let mut tied: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); self.param_stage.len()];
            for id in g.ids() {
                let node = g.node(id);
                if node.role != Role::Forward {
                    continue;
                }
                let i = id.0 as usize;
                only[i] = match node.op {
                    Op::Param(p) => Some(p),
                    Op::Input(_) | Op::Const(_) | Op::Hyper(_) => None,
                    _ => {
                        let from: BTreeSet<Option<usize>> = g
                            .args(id)
                            .iter()
                            .filter(|a| !matches!(g.node(**a).op, Op::Input(_) | Op::Const(_) | Op::Hyper(_)))
                            .map(|a| only[a.0 as usize])
                            .collect();
                        match from.iter().next() {
                            Some(Some(p)) if from.len() == 1 => Some(*p),
                            _ => None,
                        }
                    }
                };
                for a in g.args(id) {
                    if let (Some(p), Home::Stage(s)) = (only[a.0 as usize], home[i]) {
                        if s != self.param_stage[p] {
                            tied[p].insert(s);
                        }
                    }
                }
            }
            if tied.iter().any(|t| !t.is_empty()) {
                for (p, t) in tied.into_iter().enumerate() {
                    if !t.is_empty() {
                        let mut all: Vec<usize> = t.into_iter().collect();
                        all.push(self.param_stage[p]);
                        all.sort();
                        self.replicas[p] = all;
                    }
                }
                home = homes(&self.replicas);
            }
        }
        // A backward node whose origin is made anywhere, yet reads staged values, follows them.
        self.home = home;
        if self.stages > 1 {
            if let Home::Anywhere = self.home[g.loss.0 as usize] {
                return Err(PartitionError("the loss depends on no parameter, so it belongs to no pipeline stage".into()));
            }
        }
        Ok(())
    }

    /// Local shape of a value of global `shape` in layout `l` on a device at
    /// layout coordinates `at`.
    pub fn local_shape(&self, shape: &[usize], l: &[Layout], at: &[usize]) -> Vec<usize> {
        let mut s = shape.to_vec();
        for d in 0..s.len() {
            let mut units: Option<(usize, usize)> = None;
            for (a, x) in l.iter().enumerate() {
                if let Layout::Split(dd, u) = *x {
                    if dd == d {
                        let (n, uu) = units.unwrap_or((shape[d] / u.max(1), u.max(1)));
                        units = Some((chunk_range(n, self.axes[a].size, at[a]).len(), uu));
                    }
                }
            }
            if let Some((n, u)) = units {
                s[d] = n * u;
            }
        }
        s
    }
}

/// The stage and device numbering helpers used by the runtime and `inspect`.
impl Plan {
    /// Devices that hold a piece of parameter `p`.
    pub fn holders(&self, p: usize) -> Vec<usize> {
        self.devices.iter().filter(|d| d.params.iter().any(|x| x.index == p)).map(|d| d.device).collect()
    }
}
