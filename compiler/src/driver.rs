//! The compiler driver: a checked plan through every later stage, in order,
//! with the verifiers between them.
//!
//! Input: a [`Checked`] plan and [`Options`]. Output: a [`Compiled`] plan:
//! the training graph, the placement it runs with (`placement auto`
//! resolved by the planner), and either one device's kernel program or every
//! device's program ([`Target`]); or the diagnostics of the first stage that
//! failed.
//!
//! Stages: build the graph → differentiate (backward and update) → verify
//! the graph → plan (`placement auto` only: search, then the placement
//! chosen written out) → partition → verify the device programs → check
//! every device's memory plan against its memory. A plan without a
//! placement (or compiled with [`Options::single_device`]) is lowered to one
//! kernel program instead of partitioned.
//!
//! Invariants: no other code chains these stages; every caller (the command
//! line, the training session, the tests) goes through [`compile`] (or
//! [`compile_explained`], which also returns the planner's search when no
//! placement fits). The graph and communication verifiers always run (both
//! are linear in the program); the kernel programs' own structural check
//! runs in debug builds and tests. A verifier's failure is a compiler bug, reported as the
//! diagnostic `compile::internal`.

use crate::check::{Checked, Placement};
use crate::graph::{Graph, NodeId, Op};
use crate::kernel::{BufId, Program};
use crate::partition::{self, Plan};
use crate::planner::{Profile, Search};
use crate::{autodiff, graph, kernel, planner, Diagnostic, Diagnostics};

/// How to compile.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Ignore the placement: one device's training step, the reference
    /// every placement must match.
    pub single_device: bool,
    /// The device profile `placement auto` plans with (built-in figures when
    /// none is given).
    pub profile: Option<Profile>,
    /// Compile the forward pass only (no backward, no update), keeping the
    /// logits of a cross-entropy loss: what evaluation runs.
    pub forward_only: bool,
}

/// What the devices run.
#[derive(Clone, Debug)]
pub enum Target {
    /// One device's kernel program.
    One(Program),
    /// Every device's program, transfers, collectives and schedule.
    Placed(Plan),
}

/// A plan through every stage.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The checked plan as it runs: with `placement auto` replaced by the
    /// placement the planner chose, and without a placement when compiled
    /// for one device.
    pub checked: Checked,
    /// The training graph (the forward graph with [`Options::forward_only`]).
    pub graph: Graph,
    pub target: Target,
    /// The planner's search, for `placement auto`.
    pub search: Option<Search>,
    /// Seconds the planner's search took.
    pub search_s: f64,
    /// The buffer holding the logits, with [`Options::forward_only`] on a
    /// cross-entropy loss.
    pub logits: Option<BufId>,
}

impl Compiled {
    /// The number of devices the target runs on.
    pub fn devices(&self) -> usize {
        match &self.target {
            Target::One(_) => 1,
            Target::Placed(p) => p.devices.len(),
        }
    }

    /// The plan's devices, when it is partitioned.
    pub fn plan(&self) -> Option<&Plan> {
        match &self.target {
            Target::Placed(p) => Some(p),
            Target::One(_) => None,
        }
    }
}

const BUG: &str = "this is a bug in shardplan; please report it with the plan";

fn internal(message: String) -> Diagnostics {
    Diagnostic::error("compile::internal", message).help(BUG).into()
}

/// Runs every stage after the checker on `c`.
pub fn compile(c: &Checked, o: &Options) -> Result<Compiled, Diagnostics> {
    compile_explained(c, o).map_err(|f| f.diagnostics)
}

/// Why [`compile_explained`] failed.
#[derive(Clone, Debug)]
pub struct Failure {
    pub diagnostics: Diagnostics,
    /// The planner's search and the seconds it took, when `placement auto`
    /// found no placement that fits.
    pub search: Option<(Box<Search>, f64)>,
}

impl From<Diagnostics> for Failure {
    fn from(diagnostics: Diagnostics) -> Failure {
        Failure { diagnostics, search: None }
    }
}

/// As [`compile`]; when no placement of `placement auto` fits, the failure
/// keeps the planner's search, whose closest candidates `inspect --explain`
/// lists.
pub fn compile_explained(c: &Checked, o: &Options) -> Result<Compiled, Failure> {
    let mut checked = c.clone();
    if o.single_device || o.forward_only {
        checked.placement = Placement::Single;
    }
    let forward = graph::build_for(&checked, !o.forward_only);
    if o.forward_only {
        forward.verify().map_err(|e| internal(format!("the forward graph is malformed: {e}")))?;
        let keep: Vec<NodeId> = logits(&forward).into_iter().collect();
        let (program, kept) = kernel::lower_keeping(&forward, &keep);
        verify_program(&program)?;
        return Ok(Compiled { checked, graph: forward, target: Target::One(program), search: None, search_s: 0.0, logits: kept.first().copied() });
    }
    let mut g = autodiff::differentiate(forward, &checked);
    g.verify().map_err(|e| internal(format!("the training graph is malformed: {e}")))?;

    let (mut search, mut search_s) = (None, 0.0);
    if let Placement::Auto { .. } = &checked.placement {
        let profile = o.profile.clone().unwrap_or_default();
        let t = std::time::Instant::now();
        let found = planner::search(&checked, &g, &profile);
        search_s = t.elapsed().as_secs_f64();
        let Some(best) = found.chosen.map(|i| found.candidates[i].clone()) else {
            return Err(Failure { diagnostics: no_fit(), search: Some((Box::new(found), search_s)) });
        };
        let e = planner::explicit(c, &best);
        if !e.recompute.is_empty() {
            // The search ran on the graph without recompute.
            g = autodiff::recompute(&g, &e.recompute);
        }
        checked.placement = Placement::Explicit(e);
        search = Some(found);
    }

    let target = match &checked.placement {
        Placement::Explicit(_) => {
            let plan = partition::partition(&checked, &g).map_err(|e| {
                let help = if search.is_some() { BUG } else { "change the placement; `shardplan check` shows what it holds" };
                Diagnostics::from(Diagnostic::error("run::placement", format!("cannot partition the plan: {e}")).help(help))
            })?;
            verify_plan(&checked, &plan)?;
            Target::Placed(plan)
        }
        _ => {
            let program = kernel::lower(&g);
            verify_program(&program)?;
            Target::One(program)
        }
    };
    Ok(Compiled { checked, graph: g, target, search, search_s, logits: None })
}

/// A partitioned plan made before (a compiled plan file read back), with its
/// checked source: verified as [`compile`] verifies the plans it makes. A
/// plan without a mesh is one device's program.
pub fn from_plan(c: &Checked, plan: Plan) -> Result<Compiled, Diagnostics> {
    let g = autodiff::differentiate(graph::build(c), c);
    g.verify().map_err(|e| internal(format!("the training graph is malformed: {e}")))?;
    verify_plan(c, &plan)?;
    let target = match plan.devices.first() {
        Some(d) if plan.mesh.axes.is_empty() && plan.devices.len() == 1 => Target::One(d.program.clone()),
        _ => Target::Placed(plan),
    };
    Ok(Compiled { checked: c.clone(), graph: g, target, search: None, search_s: 0.0, logits: None })
}

/// The checks a partitioned plan passes before it runs, whoever made it
/// (the partitioner, or a compiled plan read back from a file): the
/// communication verifier, each program's structure, and every device's
/// memory plan within the device's memory.
pub fn verify_plan(c: &Checked, plan: &Plan) -> Result<(), Diagnostics> {
    partition::verify::verify(plan).map_err(|e| {
        Diagnostics::from(
            Diagnostic::error("run::verify", format!("the device programs do not fit together: {e}"))
                .help("this is a bug in shardplan; please report it with the plan"),
        )
    })?;
    for d in &plan.devices {
        verify_program(&d.program)?;
    }
    match partition::memory::check(c, plan) {
        Some(d) => Err(d.into()),
        None => Ok(()),
    }
}

/// A kernel program's own structure (every buffer and step well formed), in
/// debug builds and tests.
fn verify_program(p: &Program) -> Result<(), Diagnostics> {
    if cfg!(debug_assertions) {
        p.validate().map_err(|e| internal(format!("a kernel program is malformed: {e}")))?;
    }
    Ok(())
}

/// What the memory levers of a placement save (see [`savings`]).
#[derive(Clone, Debug)]
pub struct Savings {
    /// The levers in use, as the plan writes them: `` `zero 3` ``, `` `recompute` ``, `` `autocast bf16` ``.
    pub modes: Vec<String>,
    /// Per device: its memory plan, and that of the same placement without the levers.
    pub devices: Vec<(usize, partition::memory::Memory, partition::memory::Memory)>,
}

/// What `zero`, `recompute` and `autocast` save on each device of `plan`
/// (the plan of `c`): its memory plan against the same placement compiled
/// without them, whether or not that fits the devices' memory. None when
/// the placement uses none of them.
pub fn savings(c: &Checked, plan: &Plan) -> Option<Savings> {
    let Placement::Explicit(e) = &c.placement else { return None };
    let levels: std::collections::BTreeSet<u8> = e.zero.iter().copied().filter(|z| *z > 0).collect();
    if levels.is_empty() && e.recompute.is_empty() && c.autocast.is_empty() {
        return None;
    }
    let mut plain = c.clone();
    plain.autocast.clear();
    if let Placement::Explicit(p) = &mut plain.placement {
        p.zero.clear();
        p.recompute.clear();
        p.autocast.clear();
    }
    for d in &mut plain.devices {
        d.memory = None;
    }
    let without = compile(&plain, &Options::default()).ok()?;
    let base = partition::memory::plan(without.plan()?);
    let mut modes: Vec<String> = levels.iter().map(|z| format!("`zero {z}`")).collect();
    if !e.recompute.is_empty() {
        modes.push("`recompute`".into());
    }
    if !c.autocast.is_empty() {
        modes.push("`autocast bf16`".into());
    }
    let now = partition::memory::plan(plan);
    let devices = plan.devices.iter().zip(now).zip(base).map(|((d, m), b)| (d.device, m, b)).collect();
    Some(Savings { modes, devices })
}

/// The diagnostic when no candidate of `placement auto` fits.
fn no_fit() -> Diagnostics {
    Diagnostic::error("placement::no_fit", "no placement of the model over these devices fits the memory budget")
        .help("`shardplan inspect FILE --explain` lists the closest candidates; raise the budget or add devices")
        .into()
}

/// The logits node of a forward graph (the cross-entropy's first operand).
fn logits(g: &Graph) -> Option<NodeId> {
    g.ids().find(|&id| g.node(id).op == Op::CrossEntropy).and_then(|id| g.args(id).first().copied())
}
