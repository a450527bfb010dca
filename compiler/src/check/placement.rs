//! Placement validation.
//!
//! Input: the placement item, the checked model, train settings and devices.
//! Output: a [`Placement`] whose axes, paths, shardings and stages are all
//! resolved and valid: mesh size equals device count, each axis has one role,
//! sharded dims divide by their axis, stages cover every layer once in
//! forward order, microbatches divide the batch, and the parameter server is
//! a real device.

use super::model::{Child, Model, Unit};
use super::sections::{quantity, Device, UnitKind};
use super::types::Prim;
use crate::diag::{did_you_mean, Diagnostic, Diagnostics, Span};
use crate::syntax::ast::{self, Index, PathSeg, PlacementKind, PlacementStmt};
use crate::units::Bytes;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    GPipe,
    OneFOneB,
}

impl Schedule {
    pub fn name(self) -> &'static str {
        match self {
            Schedule::GPipe => "gpipe",
            Schedule::OneFOneB => "1f1b",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Pipeline {
    pub axis: usize,
    /// Units per stage, in forward order.
    pub stages: Vec<Vec<Unit>>,
    pub microbatches: i64,
    pub schedule: Schedule,
}

/// `param`'s dims split over mesh axes (None = not split).
#[derive(Clone, Debug)]
pub struct Shard {
    pub param: usize,
    pub spec: Vec<Option<usize>>,
}

#[derive(Clone, Debug)]
pub struct Explicit {
    pub mesh: Vec<(String, i64)>,
    pub data_axis: Option<usize>,
    pub shards: Vec<Shard>,
    pub pipeline: Option<Pipeline>,
    /// Device index of the parameter server.
    pub parameter_server: Option<usize>,
    /// Per parameter, its ZeRO stage over the data axis (`zero N`): 0 none,
    /// 1 optimizer state sharded, 2 and its gradient, 3 and the parameter
    /// itself (FSDP). Parameters past the end are 0.
    pub zero: Vec<u8>,
    /// Layers whose forward activations are recomputed in the backward pass.
    pub recompute: Vec<Unit>,
    /// Layers that compute in bfloat16 (`autocast bf16`).
    pub autocast: Vec<Unit>,
    /// The `placement` keyword.
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    StepTime,
    Memory,
}

#[derive(Clone, Debug)]
pub enum Placement {
    /// One device, no placement written.
    Single,
    Explicit(Explicit),
    Auto {
        memory_per_device: Option<u64>,
        objective: Objective,
    },
}

/// What a path in a placement resolves to.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    Param(usize),
    /// A whole instance that is a pipeline unit (top-level layer or repeat element).
    Unit(Unit),
    /// An instance below the top level.
    Inner(String),
}

pub(super) fn placement(p: Option<&ast::PlacementDef>, model: &Model, batch: i64, devices: &[Device], diags: &mut Diagnostics) -> Option<Placement> {
    let Some(p) = p else {
        if devices.len() > 1 {
            diags.push(
                Diagnostic::error("placement::missing", format!("{} devices are declared but there is no placement", devices.len()))
                    .label(
                        devices.iter().find_map(|d| d.span).unwrap_or(Span::new(crate::diag::SourceId::USER, 0, 0)),
                        "several devices, and no `placement` says how to use them",
                    )
                    .help(format!(
                        "say how to use them, e.g. `placement {{ mesh (data: {n}) data_parallel over data }}`, or `placement auto {{}}`",
                        n = devices.len()
                    )),
            );
            return None;
        }
        return Some(Placement::Single);
    };
    match &p.kind {
        PlacementKind::Auto(stmts) => auto(stmts, devices, diags),
        PlacementKind::Explicit(stmts) => Checker { model, batch, devices, diags, head: p.head, uses: None }.explicit(stmts),
    }
}

fn auto(stmts: &[ast::AutoStmt], devices: &[Device], diags: &mut Diagnostics) -> Option<Placement> {
    let mut memory = None;
    let mut objective = Objective::StepTime;
    let mut ok = true;
    for s in stmts {
        match s {
            ast::AutoStmt::Memory { value, .. } => match quantity(value, UnitKind::Memory, "`memory`", diags) {
                Some(m) => {
                    let smallest = devices.iter().filter_map(|d| d.memory.map(|m| (m, &d.name))).min();
                    if let Some((cap, name)) = smallest.filter(|(cap, _)| (m as u64) > *cap) {
                        diags.push(
                            Diagnostic::error("placement::auto_memory", format!("the memory budget is more than device `{name}` has"))
                                .label(value.span, format!("{} per device", Bytes(m as u64)))
                                .help(format!("`{name}` has {}; lower the budget to at most that, or omit it to use the devices' own memory", Bytes(cap))),
                        );
                        ok = false;
                    }
                    memory = Some(m as u64)
                }
                None => ok = false,
            },
            ast::AutoStmt::Option { key, value, .. } => match key.name.as_str() {
                "optimize" => match value.name.as_str() {
                    "step_time" => objective = Objective::StepTime,
                    "memory" => objective = Objective::Memory,
                    other => {
                        let mut d =
                            Diagnostic::error("placement::unknown_objective", format!("cannot optimize `{other}`")).label(value.span, "not an objective");
                        d = d.help(match did_you_mean(other, ["step_time", "memory"]) {
                            Some(s) => format!("did you mean `{s}`?"),
                            None => "objectives are `step_time` and `memory`".into(),
                        });
                        diags.push(d);
                        ok = false;
                    }
                },
                other => {
                    let mut d = Diagnostic::error("placement::unknown_option", format!("unknown auto option `{other}`")).label(key.span, "not an option");
                    d = d.help(match did_you_mean(other, ["optimize", "memory"]) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => "options are `memory 512 MiB per device` and `optimize step_time`".into(),
                    });
                    diags.push(d);
                    ok = false;
                }
            },
        }
    }
    ok.then_some(Placement::Auto { memory_per_device: memory, objective })
}

struct Checker<'a> {
    model: &'a Model,
    batch: i64,
    devices: &'a [Device],
    diags: &'a mut Diagnostics,
    head: Span,
    /// For `heads_split`, built on first use: each trace entry's users, and
    /// each parameter's entries.
    uses: Option<(Vec<Vec<usize>>, Vec<Vec<usize>>)>,
}

/// The role an axis plays, with where it was given.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Data,
    Tensor,
    Pipeline,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Data => "data parallelism",
            Role::Tensor => "tensor parallelism (`shard`)",
            Role::Pipeline => "pipeline parallelism",
        }
    }
}

impl Checker<'_> {
    fn explicit(&mut self, stmts: &[PlacementStmt]) -> Option<Placement> {
        let before = self.diags.error_count();
        // Mesh first: everything else names its axes.
        let meshes: Vec<(&Vec<ast::MeshAxis>, Span)> = stmts
            .iter()
            .filter_map(|s| match s {
                PlacementStmt::Mesh(a, sp) => Some((a, *sp)),
                _ => None,
            })
            .collect();
        if meshes.len() > 1 {
            self.diags.push(
                Diagnostic::error("placement::duplicate", "the placement has two meshes")
                    .label(meshes[1].1, "second mesh")
                    .label(meshes[0].1, "first mesh")
                    .help("declare all axes in one `mesh (…)`"),
            );
        }
        let Some(&(axes, mesh_span)) = meshes.first() else {
            self.diags.push(Diagnostic::error("placement::no_mesh", "the placement has no mesh").label(self.head, "this placement").help(format!(
                "start it with a mesh over the {} devices, e.g. `mesh (data: {})`",
                self.devices.len(),
                self.devices.len()
            )));
            return None;
        };
        let mut mesh: Vec<(String, i64)> = Vec::new();
        let mut axis_spans: Vec<Span> = Vec::new();
        let axes_before = self.diags.error_count();
        for a in axes {
            if let Some(i) = mesh.iter().position(|(n, _)| *n == a.name.name) {
                self.diags.push(
                    Diagnostic::error("names::duplicate", format!("mesh axis `{}` is declared twice", a.name.name))
                        .label(a.name.span, "declared again here")
                        .label(axis_spans[i], "first declared here")
                        .help("give each axis its own name"),
                );
                continue;
            }
            if a.size < 1 {
                self.diags.push(
                    Diagnostic::error("placement::axis_size", format!("mesh axis `{}` has size {}", a.name.name, a.size))
                        .label(a.size_span, "must be at least 1")
                        .help("an axis spans one or more devices"),
                );
            }
            mesh.push((a.name.name.clone(), a.size.max(1)));
            axis_spans.push(a.name.span);
        }
        let size = mesh.iter().try_fold(1i64, |acc, (_, s)| acc.checked_mul(*s));
        let n = self.devices.len() as i64;
        let Some(size) = size else {
            self.diags.push(
                Diagnostic::error("placement::mesh_size", "the mesh is impossibly large: its size overflows")
                    .label(mesh_span, "these axis sizes multiply past 2^63")
                    .help(format!("make the product of the axis sizes equal the {n} devices")),
            );
            return None;
        };
        if size != n && self.diags.error_count() == axes_before {
            let shape = mesh.iter().map(|(a, s)| format!("{a}: {s}")).collect::<Vec<_>>().join(" × ");
            self.diags.push(
                Diagnostic::error("placement::mesh_size", format!("the mesh has {size} positions but there are {n} devices"))
                    .label(mesh_span, format!("{shape} = {size}"))
                    .help(format!("make the product of the axis sizes equal {n}, or declare `devices … x {size}`")),
            );
        }

        let mut roles: Vec<Option<(Role, Span)>> = vec![None; mesh.len()];
        let mut data_axis = None;
        let mut shards: Vec<Shard> = Vec::new();
        let mut shard_spans: BTreeMap<usize, Span> = BTreeMap::new();
        let mut pipeline = None;
        let mut ps = None;
        let mut ps_span = None;
        let mut zero: Vec<u8> = vec![0; self.model.params.len()];
        let mut zero_by: Vec<Option<Span>> = vec![None; self.model.params.len()];
        let mut zero_default: Option<(u8, Span)> = None;
        let mut recompute: Vec<Unit> = Vec::new();
        let mut autocast: Vec<Unit> = Vec::new();
        let mut autocast_span: Option<Span> = None;
        for s in stmts {
            match s {
                PlacementStmt::Mesh(..) => {}
                PlacementStmt::DataParallel { axis, span } => {
                    if data_axis.is_some() {
                        self.diags.push(
                            Diagnostic::error("placement::duplicate", "`data_parallel` is given twice")
                                .label(*span, "second data_parallel")
                                .help("data parallelism runs over one mesh axis"),
                        );
                        continue;
                    }
                    if let Some(i) = self.axis(&mesh, axis) {
                        self.claim(&mut roles, &mesh, i, Role::Data, axis.span);
                        data_axis = Some(i);
                        if self.batch < mesh[i].1 {
                            self.diags.push(
                                Diagnostic::error(
                                    "placement::batch_too_small",
                                    format!("batch {} cannot be split over {} data-parallel replicas", self.batch, mesh[i].1),
                                )
                                .label(*span, format!("{} replicas", mesh[i].1))
                                .help(format!("use a batch of at least {}", mesh[i].1)),
                            );
                        }
                    }
                }
                PlacementStmt::Shard { path, spec, spec_span, span } => {
                    self.shard(&mesh, &mut roles, path, spec, *spec_span, *span, &mut shards, &mut shard_spans)
                }
                PlacementStmt::Pipeline(p) => {
                    if pipeline.is_some() {
                        self.diags.push(
                            Diagnostic::error("placement::duplicate", "the placement has two pipelines")
                                .label(p.span, "second pipeline")
                                .help("one pipeline splits the model into stages"),
                        );
                        continue;
                    }
                    pipeline = self.pipeline(&mesh, &mut roles, p, data_axis.map(|i| mesh[i].1));
                }
                PlacementStmt::Zero { level, level_span, paths, span } => {
                    if !(1..=3).contains(level) {
                        self.diags.push(
                            Diagnostic::error("placement::zero_level", format!("there is no ZeRO stage {level}"))
                                .label(*level_span, "not 1, 2 or 3")
                                .help("`zero 1` shards optimizer state, `zero 2` also gradients, `zero 3` also parameters (FSDP)"),
                        );
                        continue;
                    }
                    let level = *level as u8;
                    if paths.is_empty() {
                        if let Some((_, prev)) = zero_default {
                            self.diags.push(
                                Diagnostic::error("placement::duplicate", "`zero` without paths is given twice")
                                    .label(*span, "second one")
                                    .label(prev, "first one")
                                    .help("a `zero` without paths sets the stage of every parameter no other `zero` names; give it once"),
                            );
                        }
                        zero_default = Some((level, *span));
                        continue;
                    }
                    for path in paths {
                        let Some(targets) = self.resolve(path) else { continue };
                        for pi in self.params_of(&targets) {
                            if let Some(prev) = zero_by[pi] {
                                self.diags.push(
                                    Diagnostic::error("placement::duplicate", format!("`{}` is named by two `zero` statements", self.model.params[pi].path))
                                        .label(path.span, "named again here")
                                        .label(prev, "first named here")
                                        .help("give each parameter one ZeRO stage"),
                                );
                                break;
                            }
                            zero[pi] = level;
                            zero_by[pi] = Some(path.span);
                        }
                    }
                }
                PlacementStmt::Autocast { dtype, paths, span } => {
                    if let Some(prev) = autocast_span {
                        self.diags.push(
                            Diagnostic::error("placement::duplicate", "`autocast` is given twice")
                                .label(*span, "second autocast")
                                .label(prev, "first autocast")
                                .help("list every layer in one `autocast bf16 PATH, …`"),
                        );
                        continue;
                    }
                    autocast_span = Some(*span);
                    if dtype.name != "bf16" {
                        let what = if dtype.name == "f16" { "f16 autocast is not supported yet".to_string() } else { format!("`{}` is not a dtype autocast computes in", dtype.name) };
                        self.diags.push(
                            Diagnostic::error("placement::autocast_dtype", what)
                                .label(dtype.span, "not bf16")
                                .help("write `autocast bf16`: bfloat16 compute with float32 master weights, optimizer state and accumulations"),
                        );
                        continue;
                    }
                    if paths.is_empty() {
                        autocast = self.model.units();
                    }
                    for path in paths {
                        let Some(targets) = self.resolve(path) else { continue };
                        for t in targets {
                            match t {
                                Target::Unit(u) => {
                                    if !autocast.contains(&u) {
                                        autocast.push(u);
                                    }
                                }
                                _ => {
                                    self.diags.push(
                                        Diagnostic::error("placement::autocast_path", format!("`{path}` is not a layer of the model; `autocast` works on whole layers"))
                                            .label(path.span, "a parameter or a layer inside another")
                                            .help(format!("name a layer of `{}` or an element of a `repeat`, or write `autocast bf16` alone for every layer", self.model.name)),
                                    );
                                    break;
                                }
                            }
                        }
                    }
                }
                PlacementStmt::Recompute { paths, .. } => {
                    for path in paths {
                        let Some(targets) = self.resolve(path) else { continue };
                        for t in targets {
                            match t {
                                Target::Unit(u) => {
                                    if !recompute.contains(&u) {
                                        recompute.push(u);
                                    }
                                }
                                _ => {
                                    self.diags.push(
                                        Diagnostic::error(
                                            "placement::recompute_path",
                                            format!("`{path}` is not a layer of the model; `recompute` works on whole layers"),
                                        )
                                        .label(path.span, "a parameter or a layer inside another")
                                        .help(format!(
                                            "name a layer of `{}` or an element of a `repeat`, such as `{}`",
                                            self.model.name,
                                            self.model.units().first().map(|u| self.model.unit_name(*u)).unwrap_or_default()
                                        )),
                                    );
                                    break;
                                }
                            }
                        }
                    }
                }
                PlacementStmt::ParameterServer { device, span } => {
                    if ps_span.is_some() {
                        self.diags.push(
                            Diagnostic::error("placement::duplicate", "`parameter_server` is given twice")
                                .label(*span, "second parameter server")
                                .help("one device serves the parameters"),
                        );
                        continue;
                    }
                    ps_span = Some(*span);
                    match self.devices.iter().position(|d| d.name == device.name) {
                        Some(i) => ps = Some(i),
                        None => {
                            let names: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
                            let mut d = Diagnostic::error("placement::unknown_device", format!("there is no device `{}`", device.name))
                                .label(device.span, "not a device");
                            d = d.help(match did_you_mean(&device.name, names.iter().copied()) {
                                Some(s) => format!("did you mean `{s}`?"),
                                None => format!("devices are {}", device_range(self.devices)),
                            });
                            self.diags.push(d);
                        }
                    }
                }
            }
        }
        // A parameter server's workers are data-parallel replicas. With a
        // one-axis mesh and no `data_parallel`, that axis is the workers'.
        if let Some(span) = ps_span {
            if data_axis.is_none() {
                if mesh.len() == 1 && roles[0].is_none() {
                    data_axis = Some(0);
                    roles[0] = Some((Role::Data, span));
                } else {
                    self.diags.push(
                        Diagnostic::error("placement::ps_needs_data", "a parameter server needs data-parallel workers")
                            .label(span, "parameter server")
                            .help("add `data_parallel over AXIS` to say which axis holds the workers"),
                    );
                }
            }
        }
        if let Some((level, _)) = zero_default {
            for (z, by) in zero.iter_mut().zip(&zero_by) {
                if by.is_none() {
                    *z = level;
                }
            }
        }
        let zero_span = stmts.iter().find_map(|s| match s {
            PlacementStmt::Zero { span, .. } => Some(*span),
            _ => None,
        });
        if let Some(span) = zero_span {
            if let Some(sp) = ps_span {
                self.diags.push(
                    Diagnostic::error(
                        "placement::zero_with_server",
                        "`zero` shards model states over data-parallel replicas, which a parameter server already holds",
                    )
                    .label(span, "sharded states")
                    .label(sp, "the server holds every parameter and its optimizer state")
                    .help("drop `zero`, or drop the parameter server and use `data_parallel over AXIS`"),
                );
            } else if data_axis.is_none() {
                self.diags.push(
                    Diagnostic::error("placement::zero_needs_data", "`zero` shards model states over the data-parallel axis, and there is none")
                        .label(span, "sharded over which axis?")
                        .help("add `data_parallel over AXIS`: ZeRO and FSDP shard over its replicas"),
                );
            }
        }
        let clean = self.diags.error_count() == before;
        for (i, (name, size)) in mesh.iter().enumerate() {
            if clean && roles[i].is_none() && *size > 1 {
                self.diags.push(
                    Diagnostic::warning("placement::unused_axis", format!("mesh axis `{name}` is not used: its {size} devices repeat the same work"))
                        .label(axis_spans[i], "never used")
                        .help(format!("use it in `data_parallel over {name}`, a `shard`, or a `pipeline`, or remove it")),
                );
            }
        }
        (self.diags.error_count() == before).then_some(Placement::Explicit(Explicit {
            mesh,
            data_axis,
            shards,
            pipeline,
            parameter_server: ps,
            zero,
            recompute,
            autocast,
            span: self.head,
        }))
    }

    fn axis(&mut self, mesh: &[(String, i64)], id: &ast::Ident) -> Option<usize> {
        if let Some(i) = mesh.iter().position(|(n, _)| *n == id.name) {
            return Some(i);
        }
        let names: Vec<&str> = mesh.iter().map(|(n, _)| n.as_str()).collect();
        let mut d = Diagnostic::error("placement::unknown_axis", format!("the mesh has no axis `{}`", id.name)).label(id.span, "not a mesh axis");
        d = d.help(match did_you_mean(&id.name, names.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!("the mesh axes are {}", names.join(", ")),
        });
        self.diags.push(d);
        None
    }

    /// Gives axis `i` a role; an axis plays one role only.
    fn claim(&mut self, roles: &mut [Option<(Role, Span)>], mesh: &[(String, i64)], i: usize, role: Role, span: Span) -> bool {
        match roles[i] {
            None => {
                roles[i] = Some((role, span));
                true
            }
            Some((r, _)) if r == role => true,
            Some((r, prev)) => {
                self.diags.push(
                    Diagnostic::error("placement::axis_reused", format!("mesh axis `{}` is used for both {} and {}", mesh[i].0, r.name(), role.name()))
                        .label(span, format!("used for {} here", role.name()))
                        .label(prev, format!("already used for {} here", r.name()))
                        .help("each mesh axis plays one role; add another axis to the mesh for the second one"),
                );
                false
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn shard(
        &mut self,
        mesh: &[(String, i64)],
        roles: &mut [Option<(Role, Span)>],
        path: &ast::Path,
        spec: &[ast::Ident],
        spec_span: Span,
        span: Span,
        shards: &mut Vec<Shard>,
        shard_spans: &mut BTreeMap<usize, Span>,
    ) {
        let mut axes: Vec<Option<usize>> = Vec::new();
        let mut ok = true;
        for (k, e) in spec.iter().enumerate() {
            if e.name == "_" {
                axes.push(None);
                continue;
            }
            match self.axis(mesh, e) {
                Some(i) => {
                    if let Some(j) = spec[..k].iter().position(|p| p.name == e.name) {
                        self.diags.push(
                            Diagnostic::error("placement::axis_reused", format!("axis `{}` splits two dims of one tensor", e.name))
                                .label(e.span, "used again here")
                                .label(spec[j].span, "first used here")
                                .help("a tensor is split over an axis along one dim at most"),
                        );
                        ok = false;
                    }
                    ok &= self.claim(roles, mesh, i, Role::Tensor, e.span);
                    axes.push(Some(i));
                }
                None => {
                    ok = false;
                    axes.push(None);
                }
            }
        }
        let Some(targets) = self.resolve(path) else { return };
        if !ok {
            return;
        }
        for t in targets {
            let pi = match t {
                Target::Param(pi) => pi,
                Target::Unit(_) | Target::Inner(_) => {
                    let params = self.params_under(path);
                    self.diags.push(
                        Diagnostic::error("placement::not_a_param", format!("`{path}` is a layer; `shard` splits parameters"))
                            .label(path.span, "a layer, not a parameter")
                            .help(match params.first() {
                                Some(p) => format!("name one of its parameters, e.g. `shard {p} (…)`"),
                                None => "name a parameter, e.g. `shard fc1.w (_, model)`".into(),
                            }),
                    );
                    return;
                }
            };
            let p = &self.model.params[pi];
            if axes.len() != p.ty.rank() {
                self.diags.push(
                    Diagnostic::error(
                        "placement::shard_rank",
                        format!(
                            "`{}` is {} with {} dim{}, but the spec has {} entr{}",
                            p.path,
                            p.ty,
                            p.ty.rank(),
                            if p.ty.rank() == 1 { "" } else { "s" },
                            axes.len(),
                            if axes.len() == 1 { "y" } else { "ies" }
                        ),
                    )
                    .label(spec_span, format!("{} entr{}", axes.len(), if axes.len() == 1 { "y" } else { "ies" }))
                    .label(path.span, format!("this is {}", p.ty))
                    .help(format!("give one entry per dim, `_` for dims that are not split: ({})", vec!["_"; p.ty.rank()].join(", "))),
                );
                return;
            }
            for (d, ax) in axes.iter().enumerate() {
                let Some(ax) = ax else { continue };
                let (aname, asize) = (&mesh[*ax].0, mesh[*ax].1);
                let dim = &p.ty.shape[d];
                if dim.size % asize != 0 {
                    let lo = dim.size / asize * asize;
                    let hi = lo + asize;
                    let near = if lo > 0 { format!("{lo} or {hi}") } else { format!("{hi}") };
                    let divisors: Vec<String> = (1..=asize).filter(|k| dim.size % k == 0 && *k > 1).map(|k| k.to_string()).collect();
                    self.diags.push(
                        Diagnostic::error(
                            "placement::shard_indivisible",
                            format!("dim {d} of `{}` has size {} , which does not divide by the {asize} devices of axis `{aname}`", p.path, dim.size)
                                .replace(" ,", ","),
                        )
                        .label(spec[d].span, format!("splits dim {d} ({}) over `{aname}` ({asize})", dim.size))
                        .label(
                            match self.model.instances.get(p.inst.0 as usize).map(|i| i.span).filter(|s| s.src == crate::diag::SourceId::USER) {
                                Some(inst) => inst,
                                None => p.span,
                            },
                            format!("`{}` is {} here", p.path, p.ty),
                        )
                        .help(format!(
                            "make dim {d} a multiple of {asize} (nearest: {near}){}",
                            if divisors.is_empty() { String::new() } else { format!(", or split it over an axis of size {}", divisors.join(" or ")) }
                        )),
                    );
                    return;
                }
            }
            if let Some((d, ax, heads, what)) = self.heads_split(pi, &axes, mesh) {
                let (aname, asize) = (&mesh[ax].0, mesh[ax].1);
                let fits: Vec<String> = (2..=heads).filter(|k| heads % k == 0).map(|k| k.to_string()).collect();
                self.diags.push(
                    Diagnostic::error(
                        "placement::shard_heads",
                        format!("`{}` projects {heads} {what}, which do not split over the {asize} devices of axis `{aname}`", p.path),
                    )
                    .label(spec[d].span, format!("splits its {heads} {what} over `{aname}` ({asize})"))
                    .label(
                        match self.model.instances.get(p.inst.0 as usize).map(|i| i.span).filter(|s| s.src == crate::diag::SourceId::USER) {
                            Some(inst) => inst,
                            None => p.span,
                        },
                        format!("`{}` is {} here", p.path, p.ty),
                    )
                    .help(if fits.is_empty() {
                        format!("a single head cannot be split; leave `{}` unsplit", p.path)
                    } else {
                        format!("tensor parallelism gives each device whole heads: use an axis of {} devices", fits.join(" or "))
                    }),
                );
                return;
            }
            if let Some(prev) = shard_spans.insert(pi, span) {
                self.diags.push(
                    Diagnostic::error("placement::duplicate_shard", format!("`{}` is sharded twice", self.model.params[pi].path))
                        .label(span, "sharded again here")
                        .label(prev, "first sharded here")
                        .help("each parameter has one sharding"),
                );
                return;
            }
            shards.push(Shard { param: pi, spec: axes.clone() });
        }
    }

    /// Where parameter `pi` is split by columns (its last dim) and projects
    /// the queries (`x @ p`), or the keys or values, of an attention, the head
    /// count of that role must divide by the axis: Megatron gives each device
    /// whole heads, and whole key/value heads with their query groups.
    /// Returns (dim, axis, heads, "query heads" or "key/value heads") of the
    /// first that does not.
    fn heads_split(&mut self, pi: usize, axes: &[Option<usize>], mesh: &[(String, i64)]) -> Option<(usize, usize, i64, &'static str)> {
        let d = axes.len().checked_sub(1)?;
        let ax = axes[d]?;
        let k = mesh[ax].1;
        let trace = &self.model.trace;
        let (users, entries) = self.uses.get_or_insert_with(|| {
            let mut users = vec![Vec::new(); trace.len()];
            let mut entries = vec![Vec::new(); self.model.params.len()];
            for (t, op) in trace.iter().enumerate() {
                for a in &op.args {
                    if let Some(u) = users.get_mut(a.0 as usize) {
                        u.push(t);
                    }
                }
                if let Prim::Param(p) = op.prim {
                    if let Some(e) = entries.get_mut(p) {
                        e.push(t);
                    }
                }
            }
            (users, entries)
        });
        for &t in entries.get(pi)? {
            for &m in users[t].iter().filter(|&&m| trace[m].prim == Prim::MatMul && trace[m].args.get(1).map(|a| a.0 as usize) == Some(t)) {
                // Through a rotary embedding to the attention.
                let mut at = vec![m];
                at.extend(users[m].iter().filter(|&&r| matches!(trace[r].prim, Prim::Rope { .. })));
                for &v in &at {
                    for &u in &users[v] {
                        if let Prim::Attention { heads, kv_heads, .. } = trace[u].prim {
                            let role = trace[u].args.iter().position(|a| a.0 as usize == v);
                            let (n, what) = if role == Some(0) { (heads as i64, "query heads") } else { (kv_heads as i64, "key/value heads") };
                            if n % k != 0 {
                                return Some((d, ax, n, what));
                            }
                        }
                    }
                }
            }
        }
        None
    }

    /// The parameters under resolved targets, in index order.
    fn params_of(&self, targets: &[Target]) -> Vec<usize> {
        let m = self.model;
        let mut out: Vec<usize> = (0..m.params.len())
            .filter(|&pi| {
                targets.iter().any(|t| match t {
                    Target::Param(p) => *p == pi,
                    Target::Unit(u) => m.unit_owns(*u, pi),
                    Target::Inner(path) => m.params[pi].path.strip_prefix(path.as_str()).is_some_and(|r| r.starts_with('.')),
                })
            })
            .collect();
        out.dedup();
        out
    }

    /// Parameters below `path`, for help lines.
    fn params_under(&self, path: &ast::Path) -> Vec<String> {
        let prefix = path.to_string().replace('[', ".").replace(']', "");
        self.model.params.iter().filter(|p| p.path.starts_with(&format!("{prefix}."))).map(|p| p.path.clone()).take(3).collect()
    }

    fn pipeline(&mut self, mesh: &[(String, i64)], roles: &mut [Option<(Role, Span)>], p: &ast::PipelineDef, dp: Option<i64>) -> Option<Pipeline> {
        let axis = self.axis(mesh, &p.axis)?;
        if !self.claim(roles, mesh, axis, Role::Pipeline, p.axis.span) {
            return None;
        }
        let before = self.diags.error_count();
        let n = mesh[axis].1;
        if p.stages.len() as i64 != n {
            let mut d = Diagnostic::error(
                "placement::stage_count",
                format!("pipeline axis `{}` has {n} devices but {} stages are given", mesh[axis].0, p.stages.len()),
            );
            d = match p.stages.get(n as usize) {
                Some(extra) => d.label(extra.span, format!("stage {n} is one too many")),
                None => match p.stages.last() {
                    Some(last) => d.label(last.span, format!("only {} stage{}", p.stages.len(), if p.stages.len() == 1 { "" } else { "s" })),
                    None => d.label(p.axis.span, "no stages"),
                },
            };
            self.diags.push(
                d.label(p.axis.span, format!("{n} devices along `{}`", mesh[axis].0))
                    .help(format!("give exactly {n} `stage` lines, one per device along `{}`", mesh[axis].0)),
            );
        }
        // Resolve stages to units.
        let mut stages: Vec<Vec<(Unit, Span)>> = Vec::new();
        for st in &p.stages {
            let mut units = Vec::new();
            for path in &st.paths {
                let Some(targets) = self.resolve(path) else { continue };
                for t in targets {
                    match t {
                        Target::Unit(u) => units.push((u, path.span)),
                        Target::Param(_) | Target::Inner(_) => {
                            self.diags.push(
                                Diagnostic::error("placement::stage_not_layer", format!("`{path}` is not a top-level layer"))
                                    .label(path.span, "too deep for a stage")
                                    .help("stages hold top-level layers of the model, or elements of a top-level `repeat` such as `blocks[0..2]`"),
                            );
                            break;
                        }
                    }
                }
            }
            stages.push(units);
        }
        // Exactly once each.
        let mut at: BTreeMap<Unit, Span> = BTreeMap::new();
        for (u, s) in stages.iter().flatten() {
            if let Some(prev) = at.insert(*u, *s) {
                self.diags.push(
                    Diagnostic::error("placement::stage_overlap", format!("`{}` is placed in two stages", self.model.unit_name(*u)))
                        .label(*s, "placed again here")
                        .label(prev, "first placed here")
                        .help("each layer belongs to exactly one stage"),
                );
            }
        }
        let missing: Vec<String> = self.model.forward_order.iter().filter(|u| !at.contains_key(u)).map(|u| self.model.unit_name(*u)).collect();
        let (count, missing) = (missing.len(), index_ranges(&missing));
        if !missing.is_empty() && self.diags.error_count() == before {
            self.diags.push(
                Diagnostic::error(
                    "placement::stage_missing",
                    format!("{} not in any stage: {}", if count == 1 { "this layer is" } else { "these layers are" }, missing.join(", ")),
                )
                .label(p.stages.last().map(|s| s.span).unwrap_or(p.axis.span), "the stages end here without them")
                .help(format!("add {} to a stage", missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "))),
            );
        }
        // Forward order: every unit of stage i runs before every unit of stage i+1.
        let pos = |u: &Unit| self.model.forward_order.iter().position(|v| v == u);
        if self.diags.error_count() == before {
            let mut latest: Option<(Unit, Span, usize)> = None;
            'outer: for (si, st) in stages.iter().enumerate() {
                for (u, s) in st {
                    if let (Some(p_u), Some((lu, ls, lsi))) = (pos(u), latest) {
                        if lsi < si && pos(&lu).is_some_and(|pl| pl > p_u) {
                            self.diags.push(
                                Diagnostic::error(
                                    "placement::stage_order",
                                    format!(
                                        "`{}` (stage {si}) runs before `{}` (stage {lsi}) in the forward pass",
                                        self.model.unit_name(*u),
                                        self.model.unit_name(lu)
                                    ),
                                )
                                .label(*s, format!("stage {si}"))
                                .label(ls, format!("stage {lsi}"))
                                .help(format!(
                                    "stages follow the forward order: {}",
                                    self.model.forward_order.iter().map(|u| self.model.unit_name(*u)).collect::<Vec<_>>().join(" → ")
                                )),
                            );
                            break 'outer;
                        }
                    }
                    if latest.is_none_or(|(lu, _, _)| pos(&lu) < pos(u)) {
                        latest = Some((*u, *s, si));
                    }
                }
            }
        }
        // Work goes where its parameters are: a stage of parameter-free
        // layers only (a pooling, an activation) would have nothing to run.
        if self.diags.error_count() == before {
            for (si, st) in stages.iter().enumerate() {
                let owns = |u: &Unit| (0..self.model.params.len()).any(|p| self.model.unit_owns(*u, p));
                if !st.is_empty() && !st.iter().any(|(u, _)| owns(u)) {
                    let names: Vec<String> = st.iter().map(|(u, _)| format!("`{}`", self.model.unit_name(*u))).collect();
                    self.diags.push(
                        Diagnostic::error(
                            "placement::stage_no_params",
                            format!("stage {si} holds no parameters ({}), so it would have nothing to run", names.join(", ")),
                        )
                        .label(p.stages[si].span, format!("stage {si}"))
                        .help("a layer runs on the stage of the parameters it reads; put these layers in a stage with a layer that has parameters"),
                    );
                    break;
                }
            }
        }
        // Microbatches and schedule.
        if p.microbatches.len() > 1 {
            self.diags.push(
                Diagnostic::error("placement::duplicate", "`microbatches` is given twice")
                    .label(p.microbatches[1].1, "second")
                    .label(p.microbatches[0].1, "first")
                    .help("keep one"),
            );
        }
        let (mb, mb_span) = p.microbatches.first().copied().unwrap_or((1, p.span));
        let per_replica = match dp {
            Some(d) if d > 1 => self.batch / d,
            _ => self.batch,
        };
        if mb < 1 {
            self.diags.push(
                Diagnostic::error("placement::microbatches_divide", format!("a pipeline needs at least 1 microbatch, found {mb}"))
                    .label(mb_span, "too few")
                    .help("use a count that divides the batch, e.g. `microbatches 4`"),
            );
        } else if per_replica % mb != 0 {
            let divs: Vec<String> = (1..=per_replica.min(1 << 16)).filter(|k| per_replica % k == 0).map(|k| k.to_string()).collect();
            let near: Vec<String> = {
                let mut v: Vec<i64> = divs.iter().filter_map(|d| d.parse().ok()).collect();
                v.sort_by_key(|d: &i64| ((d - mb).abs(), *d));
                v.truncate(3);
                v.sort_unstable();
                v.iter().map(|d| d.to_string()).collect()
            };
            let of = match dp {
                Some(d) if d > 1 => format!("the per-replica batch {per_replica} (batch {} over {d} data-parallel replicas)", self.batch),
                _ => format!("the batch {}", self.batch),
            };
            self.diags.push(
                Diagnostic::error("placement::microbatches_divide", format!("{mb} microbatches do not divide {of}"))
                    .label(mb_span, format!("{mb} microbatches"))
                    .help(format!("use a microbatch count that divides {per_replica}, such as {}", near.join(", "))),
            );
        }
        if p.schedules.len() > 1 {
            self.diags.push(
                Diagnostic::error("placement::duplicate", "`schedule` is given twice")
                    .label(p.schedules[1].span, "second")
                    .label(p.schedules[0].span, "first")
                    .help("keep one"),
            );
        }
        let schedule = match p.schedules.first().map(|s| (s.name.as_str(), s.span)) {
            None | Some(("1f1b", _)) => Schedule::OneFOneB,
            Some(("gpipe", _)) => Schedule::GPipe,
            Some((other, span)) => {
                let mut d = Diagnostic::error("placement::unknown_schedule", format!("unknown pipeline schedule `{other}`")).label(span, "not a schedule");
                d = d.help(match did_you_mean(other, ["gpipe", "1f1b"]) {
                    Some(s) => format!("did you mean `{s}`?"),
                    None => "schedules are `gpipe` and `1f1b`".into(),
                });
                self.diags.push(d);
                Schedule::OneFOneB
            }
        };
        let mut ordered: Vec<Vec<Unit>> = stages.into_iter().map(|st| st.into_iter().map(|(u, _)| u).collect()).collect();
        for st in &mut ordered {
            st.sort_by_key(|u| pos(u).unwrap_or(usize::MAX));
        }
        (self.diags.error_count() == before).then_some(Pipeline { axis, stages: ordered, microbatches: mb, schedule })
    }

    /// Resolves a placement path to parameters or layers.
    fn resolve(&mut self, path: &ast::Path) -> Option<Vec<Target>> {
        let m = self.model;
        let Some(ti) = m.top.iter().position(|t| t.name == path.root.name) else {
            let names: Vec<&str> = m.top.iter().map(|t| t.name.as_str()).collect();
            let mut d = Diagnostic::error("placement::unknown_path", format!("model `{}` has no layer `{}`", m.name, path.root.name))
                .label(path.root.span, "no such layer");
            d = d.help(match did_you_mean(&path.root.name, names.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("its layers are {}", names.join(", ")),
            });
            self.diags.push(d);
            return None;
        };
        // Frontier: (target, walked text)
        #[derive(Clone)]
        enum Node {
            Inst(super::types::InstId, Option<Unit>),
            Rep(Vec<super::types::InstId>, usize),
            Param(usize),
        }
        let mut cur: Vec<Node> = vec![match &m.top[ti].child {
            Child::One(id) => Node::Inst(*id, Some(Unit::Layer(ti))),
            Child::Repeat(ids) => Node::Rep(ids.clone(), ti),
        }];
        let mut walked = path.root.name.clone();
        let mut depth = 0;
        for seg in &path.segs {
            let mut next = Vec::new();
            for node in &cur {
                match (seg, node) {
                    (PathSeg::Index(ix, span), Node::Rep(ids, top)) => {
                        let n = ids.len() as i64;
                        let range = match ix {
                            Index::Star => 0..n,
                            Index::At(i) => *i..i.saturating_add(1),
                            Index::Range(a, b) => a.unwrap_or(0)..b.unwrap_or(n),
                        };
                        if range.start < 0 || range.end > n || range.start >= range.end {
                            self.diags.push(
                                Diagnostic::error("placement::index_out_of_range", format!("`{walked}` has {n} layers; `[{ix}]` is out of range"))
                                    .label(*span, "out of range")
                                    .help(format!("indices run from 0 to {}; ranges `a..b` need a < b ≤ {n}", n - 1)),
                            );
                            return None;
                        }
                        for j in range {
                            let unit = (depth == 0).then_some(Unit::Elem(*top, j as usize));
                            next.push(Node::Inst(ids[j as usize], unit));
                        }
                    }
                    (PathSeg::Index(_, span), _) => {
                        self.diags.push(
                            Diagnostic::error("placement::not_repeated", format!("`{walked}` is not a `repeat`, so it cannot be indexed"))
                                .label(*span, "index on a single layer")
                                .help(format!("only layers built with `repeat N …` have elements; write `{walked}` alone")),
                        );
                        return None;
                    }
                    (PathSeg::Field(f), Node::Inst(id, _)) => {
                        let inst = &m.instances[id.0 as usize];
                        if let Some((_, c)) = inst.children.iter().find(|(n, _)| *n == f.name) {
                            next.push(match c {
                                Child::One(c) => Node::Inst(*c, None),
                                Child::Repeat(v) => Node::Rep(v.clone(), usize::MAX),
                            });
                        } else if let Some(&pi) = inst.params.iter().find(|&&pi| m.params[pi].path.rsplit('.').next() == Some(f.name.as_str())) {
                            next.push(Node::Param(pi));
                        } else {
                            let mut names: Vec<&str> = inst.children.iter().map(|(n, _)| n.as_str()).collect();
                            names.extend(inst.params.iter().filter_map(|&pi| m.params[pi].path.rsplit('.').next()));
                            let mut d = Diagnostic::error("placement::unknown_path", format!("`{walked}` ({}) has no member `{}`", inst.template, f.name))
                                .label(f.span, "no such member");
                            d = d.help(match did_you_mean(&f.name, names.iter().copied()) {
                                Some(s) => format!("did you mean `{s}`?"),
                                None => format!("its members are {}", names.join(", ")),
                            });
                            self.diags.push(d);
                            return None;
                        }
                    }
                    (PathSeg::Field(f), Node::Rep(..)) => {
                        self.diags.push(
                            Diagnostic::error("placement::unknown_path", format!("`{walked}` is a `repeat`; pick its elements before `.{}`", f.name))
                                .label(f.span, "member of which element?")
                                .help(format!("write `{walked}[*].{}` for every element, or `{walked}[0].{}` for one", f.name, f.name)),
                        );
                        return None;
                    }
                    (PathSeg::Field(f), Node::Param(pi)) => {
                        self.diags.push(
                            Diagnostic::error("placement::unknown_path", format!("`{}` is a parameter and has no members", m.params[*pi].path))
                                .label(f.span, "nothing to select")
                                .help("end the path at the parameter"),
                        );
                        return None;
                    }
                }
            }
            match seg {
                PathSeg::Field(f) => walked = format!("{walked}.{}", f.name),
                PathSeg::Index(ix, _) => walked = format!("{walked}[{ix}]"),
            }
            if matches!(seg, PathSeg::Field(_)) {
                depth += 1;
            }
            cur = next;
        }
        Some(
            cur.into_iter()
                .flat_map(|n| match n {
                    Node::Param(pi) => vec![Target::Param(pi)],
                    Node::Inst(_, Some(u)) => vec![Target::Unit(u)],
                    Node::Inst(id, None) => vec![Target::Inner(m.instances[id.0 as usize].path.clone())],
                    Node::Rep(ids, top) if top != usize::MAX && depth == 0 => (0..ids.len()).map(|j| Target::Unit(Unit::Elem(top, j))).collect(),
                    Node::Rep(ids, _) => ids.iter().map(|id| Target::Inner(m.instances[id.0 as usize].path.clone())).collect(),
                })
                .collect(),
        )
    }
}

/// Runs of consecutive elements of one `repeat` written as a range, as a
/// stage names them: `blocks[4]`, `blocks[5]`, `blocks[6]` → `blocks[4..7]`.
pub(super) fn index_ranges(names: &[String]) -> Vec<String> {
    let split = |n: &str| -> Option<(String, usize)> {
        let (head, rest) = n.strip_suffix(']')?.rsplit_once('[')?;
        Some((head.to_string(), rest.parse().ok()?))
    };
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(String, usize, usize)> = None;
    let close = |run: &mut Option<(String, usize, usize)>, out: &mut Vec<String>| {
        if let Some((head, a, b)) = run.take() {
            out.push(if b == a + 1 { format!("{head}[{a}]") } else { format!("{head}[{a}..{b}]") });
        }
    };
    for n in names {
        match (split(n), &mut run) {
            (Some((head, i)), Some((h, _, b))) if *h == head && *b == i => *b = i + 1,
            (Some((head, i)), _) => {
                close(&mut run, &mut out);
                run = Some((head, i, i + 1));
            }
            (None, _) => {
                close(&mut run, &mut out);
                out.push(n.clone());
            }
        }
    }
    close(&mut run, &mut out);
    out
}

fn device_range(devices: &[Device]) -> String {
    match devices {
        [] => "none".into(),
        [one] => one.name.clone(),
        [first, .., last] => format!("{}..{}", first.name, last.name),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn index_ranges_merge_consecutive_elements() {
        let names: Vec<String> = ["embed", "blocks[4]", "blocks[5]", "blocks[6]", "blocks[8]", "head"].iter().map(|s| s.to_string()).collect();
        assert_eq!(super::index_ranges(&names), ["embed", "blocks[4..7]", "blocks[8]", "head"]);
    }
}
