//! Candidate enumeration and ranking.
//!
//! Input: a checked plan, its training graph, a device profile and the
//! memory budget per device. Output: every candidate placement over the
//! plan's devices (data × tensor × pipeline degrees dividing the device
//! count, Megatron shards, embedding tables replicated or split, balanced
//! stage cuts, microbatch counts, 1F1B or GPipe), each predicted by the cost
//! model; ranked; and the choice among the best, partitioned for real.
//!
//! Invariants: the ranking is total and deterministic (fitting candidates
//! first by the objective, then by memory, then by their degrees); among
//! fitting candidates within [`NEAR_TIE`] of the fastest the simplest goes
//! first; a chosen candidate fits the budget by its exact memory plan, and a
//! candidate that does not (or cannot be partitioned) is marked as not
//! fitting.

use super::cost::{evaluate, megatron, optimizer_states, table_shards, unit_costs, unit_prefix, Shape};
use super::{explicit, Candidate, Profile, NEAR_TIE};
use crate::check::{Checked, Objective, Placement, Schedule, Shard, Unit};
use crate::graph::Graph;
use crate::partition::{memory, partition_devices};

/// Every candidate placement of `c` over its devices, predicted (in the
/// order enumerated), and how many were considered.
pub(super) fn enumerate(c: &Checked, g: &Graph, pr: &Profile, budget: Option<u64>) -> (Vec<Candidate>, usize) {
    let n = c.devices.len().max(1);
    let units: Vec<Unit> = c.model.forward_order.clone();
    let costs = unit_costs(c, g, &units, pr);
    // The same with the repeats' layers recomputed, for the candidates that recompute.
    let recomputable = !super::recomputed(c).is_empty();
    let costs_rc = if recomputable { unit_costs(c, &crate::autodiff::recompute(g, &super::recomputed(c)), &units, pr) } else { costs.clone() };
    let batch = c.train.batch.max(1) as usize;
    let states = optimizer_states(c);
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
            // Sharded model states need data-parallel replicas; recompute, a repeated layer.
            // (the repeats' layers, the rest): one stage for all, or FSDP or
            // ZeRO-2 for the repeats with less for the embeddings and head.
            let zeros: &[(u8, u8)] = if d == 1 {
                &[(0, 0)]
            } else if recomputable {
                &[(0, 0), (1, 1), (2, 2), (3, 3), (3, 1), (3, 0), (2, 1)]
            } else {
                &[(0, 0), (1, 1), (2, 2), (3, 3)]
            };
            let recomputes: &[bool] = if recomputable { &[false, true] } else { &[false] };
            for m in mbs {
                for &split_tables in table_choices {
                    for &schedule in schedules {
                        for &(zero, zero_rest) in zeros {
                            for &recompute in recomputes {
                                considered += 1;
                                let shape = Shape { d, t, p, m, n, split_tables, schedule, server: false, zero, zero_rest, recompute };
                                let mut all = shards.clone();
                                if split_tables {
                                    all.extend(tables.iter().cloned());
                                }
                                let costs = if recompute { &costs_rc } else { &costs };
                                cands.push(evaluate(c, costs, &units, &cuts, &pairs, all, shape, states, budget, pr));
                            }
                        }
                    }
                }
            }
        }
    }
    (cands, considered)
}

/// Orders candidates best first for `objective`.
pub(super) fn rank(cands: &mut [Candidate], objective: Objective) {
    let mem = |c: &Candidate| c.exact_memory.unwrap_or(c.memory);
    let key = |c: &Candidate| match objective {
        Objective::StepTime => c.step_s(),
        Objective::Memory => mem(c) as f64,
    };
    // Fitting candidates by the objective, then by memory (1F1B before GPipe
    // at the same time); the others by how close they come to fitting.
    cands.sort_by(|a, b| {
        let k = |c: &Candidate| if c.fits { key(c) } else { mem(c) as f64 };
        b.fits.cmp(&a.fits).then(k(a).total_cmp(&k(b))).then(mem(a).cmp(&mem(b))).then(
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
            cands[..near].sort_by(|a, b| a.complexity().cmp(&b.complexity()).then(a.step_s().total_cmp(&b.step_s())).then(mem(a).cmp(&mem(b))));
        }
    }
}

/// Chooses among the candidates, best first for `objective`, by exact
/// memory: walking them in the objective's order (predicted step time, or
/// predicted memory), each whose estimate is within twice the budget is
/// partitioned for real and its exact memory plan checked, until the first
/// that fits and every near tie of it are known. No candidate that an
/// estimate error could have let in or kept out is decided by its estimate:
/// one estimated above twice the budget is left out unchecked, and the
/// estimate is within a factor of two of the exact plan (see
/// `each_estimate_is_close_to_the_exact_plan` in the planner's tests).
/// Then ranks them all (see [`rank`]) and returns the index of the choice:
/// the first, when it fits exactly.
pub(super) fn choose(c: &Checked, g: &Graph, cands: &mut [Candidate], budget: Option<u64>, objective: Objective) -> Option<usize> {
    let key = |x: &Candidate| match objective {
        Objective::StepTime => x.step_s(),
        Objective::Memory => x.memory as f64,
    };
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by(|&a, &b| key(&cands[a]).total_cmp(&key(&cands[b])).then(cands[a].complexity().cmp(&cands[b].complexity())));
    let mut bound: Option<f64> = None;
    let mut g_rc: Option<Graph> = None;
    for i in order {
        if bound.is_some_and(|b| key(&cands[i]) > b) {
            break;
        }
        if budget.is_some_and(|b| cands[i].memory as f64 > 2.0 * b as f64) {
            cands[i].fits = false;
            continue;
        }
        let mut placed = c.clone();
        let e = explicit(c, &cands[i]);
        let graph = if e.recompute.is_empty() { g } else { g_rc.get_or_insert_with(|| crate::autodiff::recompute(g, &e.recompute)) };
        placed.placement = Placement::Explicit(e);
        match partition_devices(&placed, graph, true) {
            Ok(plan) => {
                let exact = memory::plan(&plan).iter().map(memory::Memory::total).max().unwrap_or(0);
                cands[i].exact_memory = Some(exact);
                cands[i].fits = budget.is_none_or(|b| exact <= b);
                if cands[i].fits && bound.is_none() {
                    // Its near ties are checked too: the simplest of them is chosen.
                    bound = Some(match objective {
                        Objective::StepTime => key(&cands[i]) * (1.0 + NEAR_TIE),
                        Objective::Memory => key(&cands[i]) * 2.0,
                    });
                }
            }
            Err(e) => {
                cands[i].fits = false;
                cands[i].refused = Some(e.0);
            }
        }
    }
    // Candidates past the bound were not partitioned: they are slower than
    // the choice whatever their memory.
    rank(cands, objective);
    cands.first().filter(|x| x.fits && x.exact_memory.is_some()).map(|_| 0)
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
