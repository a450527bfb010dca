//! The planner: `placement auto` resolved to an explicit placement. The
//! stage before partition.
//!
//! Input: a [`Checked`] plan whose placement is `auto`, its training graph
//! and a device [`Profile`]. Output: a [`Search`]: every candidate placement
//! considered (data × tensor × pipeline degrees, Megatron shardings,
//! balanced stage cuts, microbatch counts, schedules), best first, each with
//! its predicted step time broken down and its memory, and the chosen one as
//! placement text ([`explicit`] gives it as the placement the partitioner
//! takes).
//!
//! How: the training graph is summarised once per layer (unit) and every
//! candidate's step time and memory predicted from that summary by the
//! analytic cost model (`cost`); the candidates are enumerated and ranked
//! (`search`); the best are then partitioned for real and their exact
//! memory plan checked. [`predict`] applies the same model to a placement
//! written out; `explain` turns a search or a prediction into the text
//! `inspect --explain` prints.
//!
//! Invariants: the chosen candidate fits the memory budget by the exact
//! memory plan of its device programs, not only by the estimate; candidates
//! within [`NEAR_TIE`] of the fastest count as even, and the simplest of
//! them goes first; the search is deterministic (ties broken by the
//! candidate's degrees).
//!
//! [`Profile`]: crate::planner::Profile
//! [`Search`]: crate::planner::Search
//! [`explicit`]: crate::planner::explicit
//! [`predict`]: crate::planner::predict
//! [`NEAR_TIE`]: crate::planner::NEAR_TIE

mod cost;
mod explain;
mod profile;
mod search;

pub use cost::{predict, KernelClass};
pub use explain::{explain, explain_placed, ms};
pub use profile::{Profile, ProfileError};

use crate::check::{Checked, Explicit, Objective, Pipeline, Placement, Schedule, Shard, Unit};
use crate::graph::Graph;
use serde::Serialize;

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
    /// The ZeRO stage over the data axis (0: none) of the parameters of the
    /// model's `repeat`s, and of the others (embeddings, heads).
    pub zero: u8,
    pub zero_rest: u8,
    /// The layers of the model's `repeat`s recompute their activations.
    pub recompute: bool,
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
    /// Why partitioning the candidate failed, where it did (a pipeline
    /// stage left with no parameters, for one).
    pub refused: Option<String>,
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
    /// stages, the tensor degree, sharded model states, recompute,
    /// microbatches, split tables.
    pub fn complexity(&self) -> (usize, usize, u8, bool, usize, bool) {
        // (The higher of the two ZeRO stages.)
        (self.pipe, self.model, self.zero.max(self.zero_rest), self.recompute, self.microbatches, self.sharded_embeddings)
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
        let stage = |z: u8| if z == 3 { "zero 3 (FSDP)".to_string() } else { format!("zero {z}") };
        if self.zero == self.zero_rest && self.zero > 0 {
            parts.push(stage(self.zero));
        } else if self.zero != self.zero_rest {
            parts.push(format!("{} for the repeated layers, {} for the rest", stage(self.zero), if self.zero_rest == 0 { "no zero".to_string() } else { stage(self.zero_rest) }));
        }
        if self.recompute {
            parts.push("recompute".into());
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

/// Searches placements of `c` (whose placement is `auto`) over its devices:
/// the stage's entry point.
pub fn search(c: &Checked, g: &Graph, pr: &Profile) -> Search {
    let n = c.devices.len().max(1);
    let (budget, objective) = match &c.placement {
        Placement::Auto { memory_per_device, objective } => (*memory_per_device, *objective),
        _ => (None, Objective::StepTime),
    };
    let budget = budget.or_else(|| c.devices.iter().filter_map(|d| d.memory).min());
    let (mut cands, considered) = search::enumerate(c, g, pr, budget);
    let chosen = search::choose(c, g, &mut cands, budget, objective);
    for cand in &mut cands {
        cand.placement = placement_text(c, cand);
    }
    let placement = chosen.map(|i| cands[i].placement.clone()).unwrap_or_default();
    Search { devices: n, budget, candidates: cands, chosen, considered, placement }
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
    let zero = if data_axis.is_some() && cand.zero.max(cand.zero_rest) > 0 {
        (0..c.model.params.len()).map(|p| if cost::rest_param(c, p) { cand.zero_rest } else { cand.zero }).collect()
    } else {
        Vec::new()
    };
    let recompute = if cand.recompute { recomputed(c) } else { Vec::new() };
    Explicit { mesh, data_axis, shards, pipeline, parameter_server: None, zero, recompute, autocast: c.autocast.clone(), span }
}

/// The layers the planner recomputes: the elements of the model's `repeat`s.
pub(crate) fn recomputed(c: &Checked) -> Vec<Unit> {
    c.model.forward_order.iter().copied().filter(|u| matches!(u, Unit::Elem(..))).collect()
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
    // The stage of the other parameters without paths, then the repeats'.
    let rest = (0..e.zero.len()).find(|p| cost::rest_param(c, *p)).map(|p| e.zero[p]).unwrap_or(0);
    let blocks = (0..e.zero.len()).find(|p| !cost::rest_param(c, *p)).map(|p| e.zero[p]).unwrap_or(rest);
    if rest > 0 || blocks > 0 {
        if blocks == rest {
            out += &format!("  zero {rest}\n");
        } else {
            if rest > 0 {
                out += &format!("  zero {rest}\n");
            }
            let repeats: Vec<String> = c.model.top.iter().filter(|t| matches!(t.child, crate::check::Child::Repeat(_))).map(|t| format!("{}[*]", t.name)).collect();
            out += &format!("  zero {blocks} {}\n", repeats.join(", "));
        }
    }
    if !e.recompute.is_empty() {
        // Whole repeats as `name[*]`.
        let mut names: Vec<String> = Vec::new();
        for u in &e.recompute {
            let name = match u {
                Unit::Elem(i, _) if c.model.units().iter().filter(|x| matches!(x, Unit::Elem(j, _) if j == i)).all(|x| e.recompute.contains(x)) => {
                    format!("{}[*]", c.model.top[*i].name)
                }
                u => c.model.unit_name(*u),
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        out += &format!("  recompute {}\n", names.join(", "));
    }
    out + "}\n"
}
