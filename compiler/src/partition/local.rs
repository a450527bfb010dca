//! One device's program: its part of the global graph at local shapes, with
//! the conversions, transfers and gradient exchange it takes part in.
//!
//! Input: the global training graph, every value's layout per mesh axis and
//! one device's coordinates and stage. Output: that device's
//! [`DeviceProgram`](super::DeviceProgram): a kernel program at local shapes,
//! its parameter and state pieces, and its schedule. Invariants: every local
//! shape follows from the global shape and the layout; every conversion is a
//! collective every member of its group reaches in the same order.

use super::rules::Scale;
use super::schedule::passes;
use super::{chunk_range, DeviceProgram, Global, Home, Layout, PartitionError, Piece};
use crate::check::{DType, Dim, Schedule, Ty};
use crate::graph::{Graph, NodeId, Op, Role, Target};
use std::collections::HashMap;

/// Bucket size for the data-parallel gradient all-reduce (PyTorch DDP's default).
const BUCKET_BYTES: usize = 25 << 20;
/// Transfer ids above this are the update's (accumulated values and buckets).
const UPDATE_IDS: u32 = 1 << 30;

struct Builder<'a, 'g> {
    glob: &'a Global<'g>,
    dev: usize,
    stage: usize,
    /// Layout coordinates (mesh coordinates, microbatch 0).
    at: Vec<usize>,
    worker: bool,
    server: bool,
    lg: Graph,
    /// Local value of each global node in its natural layout.
    val: HashMap<NodeId, NodeId>,
    /// The update's view of forward/backward values: (local node, layout).
    accum: HashMap<NodeId, (NodeId, Vec<Layout>)>,
    /// Conversions made: (global node, layout, pass) → local node. The pass
    /// is 0 for the forward and backward passes (which share conversions),
    /// 2 for the update, and each pass its own for a fully sharded
    /// parameter, which is gathered again in each (FSDP frees the gathered
    /// parameter after the forward pass).
    conv: HashMap<(NodeId, Vec<Layout>, u8), NodeId>,
    /// ZeRO-2 and -3 gradients reduce-scattered as the backward pass makes them.
    scattered: HashMap<NodeId, NodeId>,
    next_coll: u32,
    params: Vec<Piece>,
    states: Vec<Piece>,
    assigned: Vec<(usize, NodeId)>,
    loss: Option<NodeId>,
}

fn err<T>(m: String) -> Result<T, PartitionError> {
    Err(PartitionError(m))
}

pub(super) fn build(glob: &Global<'_>, dev: usize, sched: Option<Schedule>) -> Result<DeviceProgram, PartitionError> {
    let worker = dev < glob.mesh.size();
    let coords = if worker { glob.mesh.coords(dev) } else { Vec::new() };
    let stage = glob.mesh.pipe.and_then(|p| coords.get(p).copied()).unwrap_or(0);
    let at: Vec<usize> = glob.axes.iter().map(|a| a.mesh.and_then(|m| coords.get(m).copied()).unwrap_or(0)).collect();
    let mut b = Builder {
        glob,
        dev,
        stage,
        at,
        worker,
        server: glob.server == Some(dev),
        lg: Graph::new(),
        val: HashMap::new(),
        accum: HashMap::new(),
        conv: HashMap::new(),
        scattered: HashMap::new(),
        next_coll: 0,
        params: Vec::new(),
        states: Vec::new(),
        assigned: Vec::new(),
        loss: None,
    };
    b.run()?;
    let reports_loss = b.loss.is_some() && glob.axes.iter().enumerate().all(|(a, _)| a == glob.mb_axis || Some(a) == glob.data_axis || b.at[a] == 0);
    let mut lg = b.lg;
    lg.loss = b.loss.unwrap_or(NodeId(0));
    if let Err(e) = lg.verify() {
        return err(format!("internal: device {dev}'s program is malformed: {e}"));
    }
    let program = crate::kernel::lower(&lg);
    let (schedule, slots) = if worker { passes(sched, stage, glob.stages, glob.axes[glob.mb_axis].size) } else { passes(None, 0, 1, 0) };
    let schedule = if worker { schedule } else { schedule.into_iter().filter(|i| i.phase == super::Phase::Update).collect() };
    let data_rank = if worker { glob.data_axis.map(|d| b.at[d]) } else { None };
    Ok(DeviceProgram { device: dev, coords, stage, program, schedule, slots, reports_loss, data_rank, params: b.params, states: b.states })
}

impl Builder<'_, '_> {
    fn g(&self) -> &Graph {
        self.glob.g
    }

    fn shape(&self, n: NodeId) -> Vec<usize> {
        self.glob.shape(n)
    }

    fn is_source(&self, n: NodeId) -> bool {
        matches!(self.g().node(n).op, Op::Param(_) | Op::State(_) | Op::Input(_) | Op::Const(_) | Op::Hyper(_))
    }

    fn local_ty(&self, global: &Ty, l: &[Layout]) -> Ty {
        let shape: Vec<usize> = global.shape.iter().map(|d| d.size.max(0) as usize).collect();
        let s = self.glob.local_shape(&shape, l, &self.at);
        Ty::new(global.dtype, s.into_iter().map(|x| Dim::known(x as i64)).collect())
    }

    fn role_allowed(&self, role: Role) -> bool {
        match (self.worker, self.server, self.glob.server.is_some()) {
            (false, _, _) => role == Role::Update,
            (true, false, true) => role != Role::Update,
            _ => true,
        }
    }

    /// Nodes this device computes.
    fn needed(&self) -> Vec<bool> {
        let g = self.g();
        let mut need = vec![false; g.len()];
        for id in g.ids() {
            let i = id.0 as usize;
            let here = match self.glob.home[i] {
                Home::Stage(s) => s == self.stage,
                Home::Replicated(p) => self.glob.replicas[p].contains(&self.stage),
                Home::Anywhere => false,
            };
            need[i] = here && !self.is_source(id) && self.role_allowed(g.node(id).role);
        }
        for id in g.ids().collect::<Vec<_>>().into_iter().rev() {
            let i = id.0 as usize;
            if self.is_source(id) && self.glob.home[i] == Home::Stage(self.stage) {
                // A staged source: needed here, or to be sent to another stage.
                need[i] = self.glob.users[i].iter().any(|u| need[u.0 as usize] || self.stage_of(*u).is_some_and(|s| s != self.stage));
            }
            if !need[i] {
                continue;
            }
            for a in g.args(id) {
                if self.glob.home[a.0 as usize] == Home::Anywhere {
                    need[a.0 as usize] = true;
                }
            }
        }
        need
    }

    fn stage_of(&self, n: NodeId) -> Option<usize> {
        match self.glob.home[n.0 as usize] {
            Home::Stage(s) => Some(s),
            Home::Anywhere | Home::Replicated(_) => None,
        }
    }

    fn crossing_index(&self, n: NodeId) -> Option<usize> {
        self.glob.crossing.iter().position(|x| *x == n)
    }

    /// Whether `user` reads `n` directly (not through the update's accumulators).
    fn direct_use(&self, n: NodeId, user: NodeId) -> bool {
        let g = self.g();
        !(g.node(user).role == Role::Update && g.node(n).role != Role::Update && !self.is_source(n))
    }

    /// Stages other than `from` that read `n` directly, and the role the transfer runs in.
    fn readers(&self, n: NodeId, from: usize) -> Vec<(usize, Role)> {
        let g = self.g();
        let mut out: Vec<(usize, Role)> = Vec::new();
        for u in &self.glob.users[n.0 as usize] {
            for s in self.glob.stages_of(*u) {
                if s == from || !self.direct_use(n, *u) {
                    continue;
                }
                let role = if self.is_source(n) { g.node(*u).role } else { g.node(n).role };
                match out.iter_mut().find(|x| x.0 == s) {
                    Some(x) => {
                        if rank(role) < rank(x.1) {
                            x.1 = role;
                        }
                    }
                    None => out.push((s, role)),
                }
            }
        }
        out.sort_by_key(|x| x.0);
        out
    }

    fn peer(&self, stage: usize) -> u32 {
        let mut c = self.glob.mesh.coords(self.dev);
        if let Some(p) = self.glob.mesh.pipe {
            c[p] = stage;
        }
        self.glob.mesh.device(&c) as u32
    }

    fn run(&mut self) -> Result<(), PartitionError> {
        let g = self.glob.g;
        let need = self.needed();
        let mut at_update = false;
        for id in g.ids() {
            let i = id.0 as usize;
            let node = g.node(id);
            if node.role == Role::Update && !at_update {
                at_update = true;
                self.boundary()?;
            }
            if need[i] {
                self.emit(id)?;
                if self.stage_of(id) == Some(self.stage) && self.worker {
                    for (t, role) in self.readers(id, self.stage) {
                        let v = self.have(id)?;
                        let to = self.peer(t);
                        self.lg.add(Op::Send { to, id: id.0 }, &[v], Ty::scalar(DType::F32), role);
                    }
                    // ZeRO-2/3: the gradient is reduce-scattered over the data
                    // axis as soon as it is made, and only this rank's shard kept.
                    if let (Some(_), Some(d), true) = (self.crossing_index(id), self.glob.data_axis, self.early_scatter(id)) {
                        let v = self.have(id)?;
                        let have = self.glob.layout[i].clone();
                        let mut want = have.clone();
                        want[d] = self.glob.grad_split[&id];
                        let shard = self.convert(v, &node.ty, have, &want, Role::Backward)?;
                        self.scattered.insert(id, shard);
                    }
                    // With microbatches, gradients are summed into accumulators;
                    // without, the update reads them where the backward pass left them.
                    if let (Some(k), true) = (self.crossing_index(id), self.glob.axes[self.glob.mb_axis].size > 1) {
                        let v = match self.scattered.get(&id) {
                            Some(v) => *v,
                            None => self.have(id)?,
                        };
                        self.lg.add(Op::Accumulate(k), &[v], Ty::scalar(DType::F32), Role::Backward);
                    }
                }
                if id == g.loss {
                    self.loss_value(id)?;
                }
            } else if let Some(s) = self.stage_of(id) {
                if s != self.stage && self.worker {
                    let reads = self.readers(id, s);
                    if let Some(&(_, role)) = reads.iter().find(|x| x.0 == self.stage) {
                        let ty = self.local_ty(&node.ty, &self.glob.layout[i]);
                        let from = self.peer(s);
                        let r = self.lg.add(Op::Recv { from, id: id.0 }, &[], ty, role);
                        self.val.insert(id, r);
                    }
                }
            }
        }
        if !at_update {
            self.boundary()?;
        }
        self.server_tail()
    }

    /// Emits global node `id` at local shapes.
    fn emit(&mut self, id: NodeId) -> Result<(), PartitionError> {
        let g = self.glob.g;
        let node = g.node(id);
        let i = id.0 as usize;
        let natural = self.glob.layout[i].clone();
        let ty = self.local_ty(&node.ty, &natural);
        let role = node.role;
        let local = match &node.op {
            Op::Param(p) | Op::State(p) => {
                let piece = self.piece(*p, &node.ty, &natural);
                if matches!(node.op, Op::Param(_)) {
                    self.params.push(piece);
                } else {
                    self.states.push(piece);
                }
                self.lg.add(node.op.clone(), &[], ty, role)
            }
            Op::Input(_) | Op::Const(_) | Op::Hyper(_) => self.lg.add(node.op.clone(), &[], ty, role),
            op => {
                let args = g.args(id);
                let mut local_args = Vec::with_capacity(args.len());
                for (k, a) in args.iter().enumerate() {
                    let want = self.glob.args[i][k].clone();
                    local_args.push(self.operand(*a, role, &want)?);
                }
                let scale = self.glob.scale[i];
                if let Scale::Arg(k) = scale {
                    let share = self.share(id, &local_args);
                    local_args[k] = self.mul_const(local_args[k], share, role);
                }
                if let Op::Assign(t) = op {
                    if let Target::Param(p) = t {
                        self.assigned.push((*p, local_args[0]));
                    }
                    self.lg.add(op.clone(), &local_args, ty, role)
                } else {
                    let out = self.lg.add(op.clone(), &local_args, ty, role);
                    if scale == Scale::Out {
                        let share = self.share(id, &local_args);
                        self.mul_const(out, share, role)
                    } else {
                        out
                    }
                }
            }
        };
        self.val.insert(id, local);
        Ok(())
    }

    /// The local value of global node `id`, which was emitted here.
    fn have(&self, id: NodeId) -> Result<NodeId, PartitionError> {
        self.val.get(&id).copied().ok_or_else(|| PartitionError(format!("internal: device {} has no value for node {}", self.dev, id.0)))
    }

    fn mul_const(&mut self, x: NodeId, c: f64, role: Role) -> NodeId {
        let ty = self.lg.node(x).ty.clone();
        let k = self.lg.add(Op::Const(c), &[], Ty::scalar(ty.dtype), role);
        self.lg.add(Op::Mul, &[x, k], ty, role)
    }

    /// This device's share of the elements an op reduces over.
    fn share(&self, id: NodeId, local_args: &[NodeId]) -> f64 {
        let g = self.g();
        let args = g.args(id);
        let ratio = |k: usize, dims: Option<&[usize]>| {
            let gl = self.shape(args[k]);
            let lo: Vec<usize> = self.lg.node(local_args[k]).ty.shape.iter().map(|d| d.size as usize).collect();
            let pick = |s: &[usize]| -> f64 {
                match dims {
                    Some(ds) => ds.iter().map(|&d| s[d] as f64).product(),
                    None => s.iter().map(|&x| x as f64).product(),
                }
            };
            pick(&lo) / pick(&gl).max(1.0)
        };
        match &g.node(id).op {
            Op::Mean { axes, .. } => ratio(0, Some(axes)),
            Op::CrossEntropy | Op::CrossEntropyGrad => ratio(1, None),
            _ => ratio(0, None),
        }
    }

    /// The local value of global `a` for a consumer of `role`, in layout `want`.
    fn operand(&mut self, a: NodeId, role: Role, want: &[Layout]) -> Result<NodeId, PartitionError> {
        let g = self.glob.g;
        let update_view = role == Role::Update && g.node(a).role != Role::Update && !self.is_source(a);
        let (v, have) = if update_view {
            match self.accum.get(&a) {
                Some((v, l)) => (*v, l.clone()),
                None => return err(format!("internal: device {} reads {} in the update without having it", self.dev, g.node(a).op.name())),
            }
        } else {
            match self.val.get(&a) {
                Some(v) => (*v, self.glob.layout[a.0 as usize].clone()),
                None => return err(format!("internal: device {} reads {} before having it", self.dev, g.node(a).op.name())),
            }
        };
        if have == want {
            return Ok(v);
        }
        let pass = match g.node(a).op {
            Op::Param(p) if self.glob.zero[p] >= 3 => rank(role),
            _ if role == Role::Update => 2,
            _ => 0,
        };
        let key = (a, want.to_vec(), pass);
        if let Some(&c) = self.conv.get(&key) {
            return Ok(c);
        }
        let c = self.convert(v, &g.node(a).ty, have, want, role)?;
        self.conv.insert(key, c);
        Ok(c)
    }

    /// Converts a local value from layout `have` to `want`, axis by axis.
    fn convert(&mut self, mut v: NodeId, global: &Ty, mut have: Vec<Layout>, want: &[Layout], role: Role) -> Result<NodeId, PartitionError> {
        let shape: Vec<usize> = global.shape.iter().map(|d| d.size.max(0) as usize).collect();
        for a in 0..want.len() {
            if have[a] == want[a] {
                continue;
            }
            let axis = &self.glob.axes[a];
            let Some(mesh_axis) = axis.mesh else {
                return err(format!(
                    "a {global} would have to change from {} to {} across microbatches, which a pipeline cannot do; use fewer microbatches or another split",
                    have[a], want[a]
                ));
            };
            let group = self.glob.mesh.group(self.dev, mesh_axis);
            let name = axis.name.clone();
            let k = axis.size;
            let c = self.at[a];
            let split_elsewhere = |l: &[Layout], d: usize| l.iter().enumerate().any(|(b, x)| b != a && matches!(x, Layout::Split(dd, _) if *dd == d));
            // Partial → split: one reduce-scatter.
            if let (Layout::Partial, Layout::Split(d, u)) = (have[a], want[a]) {
                if !split_elsewhere(&have, d) {
                    let mut to = have.clone();
                    to[a] = want[a];
                    let ty = self.local_ty(global, &to);
                    let id = self.coll_id();
                    v = self.lg.add(Op::ReduceScatter { group: group.clone(), id, axis: name.clone(), dim: d, granule: u }, &[v], ty, role);
                    have[a] = want[a];
                    continue;
                }
            }
            // Split → split along another dim: one all-to-all.
            if let (Layout::Split(d, du), Layout::Split(e, eu)) = (have[a], want[a]) {
                if d != e && !split_elsewhere(&have, d) && !split_elsewhere(&have, e) {
                    let mut to = have.clone();
                    to[a] = want[a];
                    let ty = self.local_ty(global, &to);
                    let id = self.coll_id();
                    let op = Op::AllToAll { group: group.clone(), id, axis: name.clone(), from: d, from_granule: du, to: e, to_granule: eu };
                    v = self.lg.add(op, &[v], ty, role);
                    have[a] = want[a];
                    continue;
                }
            }
            // Gather or reduce to replicated first, when needed.
            match have[a] {
                Layout::Partial if want[a] != Layout::Partial => {
                    let ty = self.lg.node(v).ty.clone();
                    let id = self.coll_id();
                    v = self.lg.add(Op::AllReduce { group: group.clone(), id, axis: name.clone() }, &[v], ty, role);
                    have[a] = Layout::Replicated;
                }
                Layout::Split(d, u) => {
                    if have.iter().enumerate().any(|(b, x)| b != a && matches!(x, Layout::Split(dd, _) if *dd == d)) {
                        return err(format!("a {global} split along dim {d} over two axes cannot be gathered over `{name}`"));
                    }
                    let mut to = have.clone();
                    to[a] = Layout::Replicated;
                    let ty = self.local_ty(global, &to);
                    let id = self.coll_id();
                    v = self.lg.add(Op::AllGather { group: group.clone(), id, axis: name.clone(), dim: d, granule: u }, &[v], ty, role);
                    have[a] = Layout::Replicated;
                }
                _ => {}
            }
            match want[a] {
                Layout::Replicated => {}
                Layout::Split(d, u) => {
                    if have.iter().enumerate().any(|(b, x)| b != a && matches!(x, Layout::Split(dd, _) if *dd == d)) {
                        return err(format!("a {global} split along dim {d} over two axes cannot be sliced over `{name}`"));
                    }
                    let start = chunk_range(shape[d] / u.max(1), k, c).start * u.max(1);
                    let mut to = have.clone();
                    to[a] = Layout::Split(d, u);
                    let ty = self.local_ty(global, &to);
                    v = self.lg.add(Op::Slice { dim: d, start }, &[v], ty, role);
                }
                Layout::Partial => {
                    if c != 0 {
                        let ty = self.lg.node(v).ty.clone();
                        v = self.lg.add(Op::Const(0.0), &[], ty, role);
                    }
                }
            }
            have[a] = want[a];
        }
        Ok(v)
    }

    fn coll_id(&mut self) -> u32 {
        self.next_coll += 1;
        self.next_coll
    }

    fn piece(&self, p: usize, global: &Ty, l: &[Layout]) -> Piece {
        let shape: Vec<usize> = global.shape.iter().map(|d| d.size.max(0) as usize).collect();
        let len = self.glob.local_shape(&shape, l, &self.at);
        let mut start = vec![0; shape.len()];
        for (a, x) in l.iter().enumerate() {
            if let Layout::Split(d, u) = *x {
                start[d] = chunk_range(shape[d] / u.max(1), self.glob.axes[a].size, self.at[a]).start * u.max(1);
            }
        }
        Piece { index: p, global: shape, start, len }
    }

    /// The loss this device reports: reduced over every axis but the data
    /// axis and the microbatches (the runtime sums those).
    fn loss_value(&mut self, id: NodeId) -> Result<(), PartitionError> {
        let mut want = self.glob.layout[id.0 as usize].clone();
        for (a, w) in want.iter_mut().enumerate() {
            if a != self.glob.mb_axis && Some(a) != self.glob.data_axis {
                *w = Layout::Replicated;
            }
        }
        let v = self.operand(id, Role::Forward, &want)?;
        self.loss = Some(v);
        Ok(())
    }

    /// Layout of a forward/backward value as the update reads it.
    fn update_layout(&self, n: NodeId) -> Vec<Layout> {
        let mut l = self.glob.layout[n.0 as usize].clone();
        l[self.glob.mb_axis] = Layout::Replicated;
        if let Some(d) = self.glob.data_axis {
            if l[d] == Layout::Partial && (self.glob.axes[d].size > 1) {
                l[d] = self.glob.grad_split.get(&n).copied().unwrap_or(Layout::Replicated);
            }
        }
        l
    }

    /// Whether gradient `n` is reduce-scattered in the backward pass (ZeRO
    /// stage 2 or 3) rather than exchanged after it.
    fn early_scatter(&self, n: NodeId) -> bool {
        let Some(d) = self.glob.data_axis else { return false };
        self.glob.server.is_none()
            && self.glob.grad_split.contains_key(&n)
            && self.glob.layout[n.0 as usize][d] == Layout::Partial
            && self.glob.g.grads.iter().any(|(p, x)| *x == n && self.glob.zero[*p] >= 2)
    }

    /// Between the last backward and the first update node: accumulators,
    /// the gradient exchange, and the update's cross-stage transfers.
    fn boundary(&mut self) -> Result<(), PartitionError> {
        let g = self.glob.g;
        let u = Role::Update;
        let crossing = self.glob.crossing.clone();
        let mine: Vec<(usize, NodeId)> =
            crossing.iter().enumerate().filter(|(_, n)| self.stage_of(**n) == Some(self.stage) && self.worker).map(|(k, n)| (k, *n)).collect();
        let mut raw: Vec<(NodeId, NodeId)> = Vec::new();
        for &(k, n) in &mine {
            let mut l = self.glob.layout[n.0 as usize].clone();
            l[self.glob.mb_axis] = Layout::Replicated;
            if self.scattered.contains_key(&n) {
                l = self.update_layout(n);
            }
            let ty = self.local_ty(&g.node(n).ty, &l);
            let v = if self.glob.axes[self.glob.mb_axis].size > 1 {
                self.lg.add(Op::Accumulated(k), &[], ty, u)
            } else {
                match self.scattered.get(&n).or_else(|| self.val.get(&n)) {
                    Some(v) => *v,
                    None => return err(format!("internal: device {} has no gradient {k} for the update", self.dev)),
                }
            };
            raw.push((n, v));
        }
        // ZeRO-1: the gradient is reduce-scattered after the backward pass.
        let mut zero_raw: Vec<(usize, NodeId)> = Vec::new();
        if let (Some(d), None) = (self.glob.data_axis, self.glob.server) {
            for (i, (n, v)) in raw.iter_mut().enumerate() {
                if let (Some(s), false) = (self.glob.grad_split.get(n), self.scattered.contains_key(n)) {
                    if self.glob.layout[n.0 as usize][d] != Layout::Partial {
                        continue;
                    }
                    let mut have = self.glob.layout[n.0 as usize].clone();
                    have[self.glob.mb_axis] = Layout::Replicated;
                    let mut want = have.clone();
                    want[d] = *s;
                    *v = self.convert(*v, &g.node(*n).ty, have, &want, u)?;
                    zero_raw.push((i, *v));
                } else if self.scattered.contains_key(n) {
                    zero_raw.push((i, *v));
                }
            }
        }
        let sharded: Vec<usize> = zero_raw.iter().map(|x| x.0).collect();
        let exchanged: Vec<NodeId> = match (self.glob.data_axis, self.glob.server) {
            (Some(_), Some(server)) => self.exchange_with_server(&raw, server)?,
            (Some(d), None) if self.glob.axes[d].size > 1 => self.all_reduce_buckets(&raw, d, &sharded)?,
            _ => raw.iter().map(|x| x.1).collect(),
        };
        for (&(n, _), v) in raw.iter().zip(exchanged) {
            let l = self.update_layout(n);
            self.accum.insert(n, (v, l));
        }
        // Cross-stage transfers of the values the update reads.
        if self.worker {
            for n in crossing {
                let Some(home) = self.stage_of(n) else { continue };
                let readers: Vec<usize> = {
                    let mut r: Vec<usize> = self.glob.users[n.0 as usize]
                        .iter()
                        .filter(|x| g.node(**x).role == Role::Update)
                        .flat_map(|x| self.glob.stages_of(*x))
                        .filter(|s| *s != home)
                        .collect();
                    r.sort();
                    r.dedup();
                    r
                };
                let k = self.crossing_index(n).unwrap_or(0) as u32;
                if home == self.stage {
                    for t in readers {
                        let v = self
                            .accum
                            .get(&n)
                            .map(|x| x.0)
                            .ok_or_else(|| PartitionError(format!("internal: device {} lost update value {}", self.dev, n.0)))?;
                        let to = self.peer(t);
                        self.lg.add(Op::Send { to, id: UPDATE_IDS + k }, &[v], Ty::scalar(DType::F32), u);
                    }
                } else if readers.contains(&self.stage) {
                    let l = self.update_layout(n);
                    let ty = self.local_ty(&g.node(n).ty, &l);
                    let from = self.peer(home);
                    let v = self.lg.add(Op::Recv { from, id: UPDATE_IDS + k }, &[], ty, u);
                    self.accum.insert(n, (v, l));
                }
            }
        }
        Ok(())
    }

    /// All-reduces the gradients partial over data axis `d` (but those
    /// `sharded` already reduce-scattered), packed into buckets.
    fn all_reduce_buckets(&mut self, raw: &[(NodeId, NodeId)], d: usize, sharded: &[usize]) -> Result<Vec<NodeId>, PartitionError> {
        let u = Role::Update;
        let mut out: Vec<NodeId> = raw.iter().map(|x| x.1).collect();
        let partial: Vec<usize> = (0..raw.len()).filter(|&i| self.glob.layout[raw[i].0 .0 as usize][d] == Layout::Partial && !sharded.contains(&i)).collect();
        let group = self.glob.mesh.group(self.dev, self.glob.axes[d].mesh.unwrap_or(0));
        let name = self.glob.axes[d].name.clone();
        let mut bucket: Vec<usize> = Vec::new();
        let mut bytes = 0usize;
        let flush = |b: &mut Builder<'_, '_>, bucket: &mut Vec<usize>, out: &mut Vec<NodeId>| {
            if bucket.is_empty() {
                return;
            }
            let vals: Vec<NodeId> = bucket.iter().map(|&i| raw[i].1).collect();
            if let [one] = vals[..] {
                let ty = b.lg.node(one).ty.clone();
                let id = b.coll_id();
                out[bucket[0]] = b.lg.add(Op::AllReduce { group: group.clone(), id, axis: name.clone() }, &[one], ty, u);
                bucket.clear();
                return;
            }
            let total: usize = vals.iter().map(|v| b.lg.node(*v).ty.shape.iter().map(|x| x.size as usize).product::<usize>()).sum();
            let flat = Ty::new(DType::F32, vec![Dim::known(total as i64)]);
            let packed = b.lg.add(Op::Pack { n: vals.len() }, &vals, flat.clone(), u);
            let id = b.coll_id();
            let reduced = b.lg.add(Op::AllReduce { group: group.clone(), id, axis: name.clone() }, &[packed], flat, u);
            let mut offset = 0;
            for &i in bucket.iter() {
                let ty = b.lg.node(raw[i].1).ty.clone();
                let n: usize = ty.shape.iter().map(|x| x.size as usize).product();
                out[i] = b.lg.add(Op::Unpack { offset }, &[reduced], ty, u);
                offset += n;
            }
            bucket.clear();
        };
        for &i in &partial {
            let n: usize = self.lg.node(raw[i].1).ty.shape.iter().map(|x| x.size as usize).product();
            if bytes + 4 * n > BUCKET_BYTES && !bucket.is_empty() {
                flush(self, &mut bucket, &mut out);
                bytes = 0;
            }
            bucket.push(i);
            bytes += 4 * n;
        }
        flush(self, &mut bucket, &mut out);
        Ok(out)
    }

    /// Parameter server: workers send their gradients to the server, which
    /// sums them in worker order.
    fn exchange_with_server(&mut self, raw: &[(NodeId, NodeId)], server: usize) -> Result<Vec<NodeId>, PartitionError> {
        let u = Role::Update;
        let g = self.glob.g;
        let d = self.glob.data_axis.unwrap_or(0);
        for (n, _) in raw {
            if self.glob.layout[n.0 as usize][d] != Layout::Partial && self.glob.axes[d].size > 1 {
                return err(format!("a parameter server needs every gradient summed over `{}`; {} is not", self.glob.axes[d].name, g.node(*n).op.name()));
            }
        }
        // The server's view of the gradients (shapes at the full batch: gradients are parameter-shaped).
        let tys: Vec<Ty> = self.glob.crossing.iter().map(|n| self.local_ty(&g.node(*n).ty, &self.update_layout(*n))).collect();
        let total: usize = tys.iter().map(|t| t.shape.iter().map(|x| x.size as usize).product::<usize>()).sum();
        let flat = Ty::new(DType::F32, vec![Dim::known(total as i64)]);
        if self.worker && !self.server {
            let vals: Vec<NodeId> = raw.iter().map(|x| x.1).collect();
            let packed = self.lg.add(Op::Pack { n: vals.len() }, &vals, flat, u);
            self.lg.add(Op::Send { to: server as u32, id: UPDATE_IDS - 1 }, &[packed], Ty::scalar(DType::F32), u);
            return Ok(raw.iter().map(|x| x.1).collect());
        }
        if !self.server {
            return Ok(raw.iter().map(|x| x.1).collect());
        }
        let mut sum: Option<NodeId> = None;
        for w in 0..self.glob.mesh.size() {
            let part = if w == self.dev {
                let vals: Vec<NodeId> = raw.iter().map(|x| x.1).collect();
                self.lg.add(Op::Pack { n: vals.len() }, &vals, flat.clone(), u)
            } else {
                self.lg.add(Op::Recv { from: w as u32, id: UPDATE_IDS - 1 }, &[], flat.clone(), u)
            };
            sum = Some(match sum {
                Some(s) => self.lg.add(Op::Add, &[s, part], flat.clone(), u),
                None => part,
            });
        }
        let Some(sum) = sum else { return err("a parameter server with no workers".into()) };
        let mut out = Vec::new();
        let mut offset = 0;
        for ty in tys {
            let n: usize = ty.shape.iter().map(|x| x.size as usize).product();
            out.push(self.lg.add(Op::Unpack { offset }, &[sum], ty, u));
            offset += n;
        }
        if !self.worker {
            // Outside the mesh the server has no accumulators of its own.
            let crossing = self.glob.crossing.clone();
            for (n, v) in crossing.iter().zip(&out) {
                let l = self.update_layout(*n);
                self.accum.insert(*n, (*v, l));
            }
            return Ok(Vec::new());
        }
        Ok(out)
    }

    /// Parameter server: the server sends the new parameters; workers take them.
    fn server_tail(&mut self) -> Result<(), PartitionError> {
        let Some(server) = self.glob.server else { return Ok(()) };
        let g = self.glob.g;
        let u = Role::Update;
        // Parameters in index order, as the server assigns them.
        let mut order: Vec<usize> = g
            .ids()
            .filter_map(|id| match g.node(id).op {
                Op::Assign(Target::Param(p)) => Some(p),
                _ => None,
            })
            .collect();
        order.sort();
        let ty_of = |p: usize| {
            let node = g.ids().find(|id| g.node(*id).op == Op::Param(p));
            node.map(|n| g.node(n).ty.clone())
        };
        let sizes: Vec<usize> = order.iter().map(|p| ty_of(*p).map(|t| t.shape.iter().map(|d| d.size as usize).product()).unwrap_or(0)).collect();
        let total: usize = sizes.iter().sum();
        let flat = Ty::new(DType::F32, vec![Dim::known(total as i64)]);
        if self.server {
            let mut vals = Vec::new();
            for p in &order {
                match self.assigned.iter().find(|x| x.0 == *p) {
                    Some(x) => vals.push(x.1),
                    None => return err(format!("internal: the server does not update parameter {p}")),
                }
            }
            let packed = self.lg.add(Op::Pack { n: vals.len() }, &vals, flat, u);
            for w in 0..self.glob.mesh.size() {
                if w != self.dev {
                    self.lg.add(Op::Send { to: w as u32, id: UPDATE_IDS - 2 }, &[packed], Ty::scalar(DType::F32), u);
                }
            }
        } else if self.worker {
            let packed = self.lg.add(Op::Recv { from: server as u32, id: UPDATE_IDS - 2 }, &[], flat, u);
            let mut offset = 0;
            for (p, n) in order.iter().zip(&sizes) {
                let Some(ty) = ty_of(*p) else { continue };
                let v = self.lg.add(Op::Unpack { offset }, &[packed], ty.clone(), u);
                self.lg.add(Op::Assign(Target::Param(*p)), &[v], ty, u);
                offset += n;
            }
        }
        Ok(())
    }
}

fn rank(r: Role) -> u8 {
    match r {
        Role::Forward => 0,
        Role::Backward => 1,
        Role::Update => 2,
    }
}
