//! The plan verifier: runs before launch.
//!
//! - Layout typing ([`check_layouts`]): a partial sum may reach only ops that
//!   are linear in that operand; a split operand must be split along the
//!   dim its op reads split.
//! - Communication ([`verify`]): simulates one training step of every
//!   device's program together. Every receive must meet a send from its
//!   peer of the same instruction and size, in order; the members of a
//!   collective must reach the same collective (instruction, size, group) in
//!   the same order; and the whole set must finish (no device waits forever).

use super::{Layout, Phase, Plan};
use crate::graph::{Graph, Op, Role};
use crate::kernel::StepKind;
use std::collections::VecDeque;

/// What a device does with the others, in program order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Send { to: usize, id: u32, len: usize },
    Recv { from: usize, id: u32, len: usize },
    Collective { kind: String, group: Vec<u32>, id: u32, len: usize },
}

impl Event {
    /// Whether two members' events are the same collective. Members' parts
    /// of an all-to-all differ in size under uneven splits (the runtime
    /// checks each part), so only its instruction and group must agree.
    fn same(&self, other: &Event) -> bool {
        match (self, other) {
            (Event::Collective { kind: k1, group: g1, id: i1, .. }, Event::Collective { kind: k2, group: g2, id: i2, .. }) if k1.starts_with("all-to-all") => {
                k1 == k2 && g1 == g2 && i1 == i2
            }
            _ => self == other,
        }
    }

    fn describe(&self) -> String {
        match self {
            Event::Send { to, id, len } => format!("send of {len} values to device {to} (instruction {id})"),
            Event::Recv { from, id, len } => format!("receive of {len} values from device {from} (instruction {id})"),
            Event::Collective { kind, id, len, .. } => format!("{kind} of {len} values (instruction {id})"),
        }
    }
}

/// The communication events of each device during one training step.
pub fn events(plan: &Plan) -> Vec<Vec<Event>> {
    plan.devices
        .iter()
        .map(|d| {
            let p = &d.program;
            let mut out = Vec::new();
            for instr in &d.schedule {
                let role = match instr.phase {
                    Phase::Forward => Role::Forward,
                    Phase::Backward => Role::Backward,
                    Phase::Update => Role::Update,
                };
                for s in p.steps.iter().filter(|s| s.role == role) {
                    let StepKind::Op(op) = &s.kind else { continue };
                    let in_len = s.inputs.first().map(|b| p.buffers[b.0 as usize].len()).unwrap_or(0);
                    let out_len = p.buffers[s.output.0 as usize].len();
                    match op {
                        Op::Send { to, id } => out.push(Event::Send { to: *to as usize, id: *id, len: in_len }),
                        Op::Recv { from, id } => out.push(Event::Recv { from: *from as usize, id: *id, len: out_len }),
                        Op::AllReduce { group, id, axis } => {
                            out.push(Event::Collective { kind: format!("all-reduce({axis})"), group: group.clone(), id: *id, len: out_len })
                        }
                        Op::AllGather { group, id, axis, .. } => {
                            out.push(Event::Collective { kind: format!("all-gather({axis})"), group: group.clone(), id: *id, len: out_len })
                        }
                        Op::ReduceScatter { group, id, axis, .. } => {
                            out.push(Event::Collective { kind: format!("reduce-scatter({axis})"), group: group.clone(), id: *id, len: in_len })
                        }
                        Op::AllToAll { group, id, axis, .. } => {
                            out.push(Event::Collective { kind: format!("all-to-all({axis})"), group: group.clone(), id: *id, len: in_len })
                        }
                        _ => {}
                    }
                }
            }
            out
        })
        .collect()
}

/// Checks every device's layouts and shapes, then simulates every device's step together.
pub fn verify(plan: &Plan) -> Result<(), String> {
    shapes(plan)?;
    simulate(&events(plan))
}

/// Every parameter and optimizer state a device holds has the shape of its
/// piece of the global tensor, and the pieces of one tensor agree on its
/// global shape.
pub fn shapes(plan: &Plan) -> Result<(), String> {
    use crate::kernel::BufKind;
    for d in &plan.devices {
        for b in &d.program.buffers {
            let (pieces, i, what) = match b.kind {
                BufKind::Param(i) => (&d.params, i, "parameter"),
                BufKind::State(i) => (&d.states, i, "optimizer state"),
                _ => continue,
            };
            let Some(piece) = pieces.iter().find(|p| p.index == i) else {
                return Err(format!("device {} holds {what} {i} but the plan does not say which part", d.device));
            };
            if piece.len != b.shape {
                return Err(format!("device {} holds {what} {i} as {:?}, but its layout gives it {:?} of {:?}", d.device, b.shape, piece.len, piece.global));
            }
            if piece.start.iter().zip(&piece.len).zip(&piece.global).any(|((s, l), g)| s + l > *g) {
                return Err(format!("device {}'s part of {what} {i} lies outside its global shape {:?}", d.device, piece.global));
            }
        }
    }
    Ok(())
}

/// Simulates devices' event lists together; the first problem, described.
pub fn simulate(ev: &[Vec<Event>]) -> Result<(), String> {
    let n = ev.len();
    let mut pos = vec![0usize; n];
    // queue[from][to]: sends not yet received.
    let mut queue: Vec<Vec<VecDeque<(u32, usize)>>> = vec![vec![VecDeque::new(); n]; n];
    loop {
        let mut progressed = false;
        for d in 0..n {
            while let Some(e) = ev[d].get(pos[d]) {
                match e {
                    Event::Send { to, id, len } => {
                        if *to >= n || *to == d {
                            return Err(format!("device {d} sends to device {to}, which is not another device of the plan"));
                        }
                        queue[d][*to].push_back((*id, *len));
                    }
                    Event::Recv { from, id, len } => {
                        if *from >= n {
                            return Err(format!("device {d} receives from device {from}, which the plan does not have"));
                        }
                        match queue[*from][d].front() {
                            None => break,
                            Some(&(sid, slen)) if sid == *id && slen == *len => {
                                queue[*from][d].pop_front();
                            }
                            Some(&(sid, slen)) => {
                                return Err(format!(
                                    "device {d} at event {} expected a {} but device {from} sent {slen} values of instruction {sid}",
                                    pos[d],
                                    e.describe()
                                ))
                            }
                        }
                    }
                    Event::Collective { group, .. } => {
                        if !group.contains(&(d as u32)) {
                            return Err(format!("device {d} takes part in a collective of group {group:?} it is not in"));
                        }
                        // Only the lowest member completes it, once all are there.
                        let members: Vec<usize> = group.iter().map(|&m| m as usize).collect();
                        if members.iter().any(|&m| m >= n) {
                            return Err(format!("device {d}'s collective names devices outside the plan: {group:?}"));
                        }
                        let heads: Vec<Option<&Event>> = members.iter().map(|&m| ev[m].get(pos[m])).collect();
                        if heads.iter().any(|h| !matches!(h, Some(Event::Collective { .. }))) {
                            break;
                        }
                        if heads.iter().any(|h| h.map(|h| !h.same(e)).unwrap_or(true)) {
                            // Maybe a member waits on another group first; decided at the end.
                            break;
                        }
                        for &m in &members {
                            if m != d {
                                pos[m] += 1;
                            }
                        }
                    }
                }
                pos[d] += 1;
                progressed = true;
            }
        }
        if (0..n).all(|d| pos[d] >= ev[d].len()) {
            break;
        }
        if !progressed {
            // A collective whose members wait at different collectives is a mismatch.
            for d in 0..n {
                if let Some(e @ Event::Collective { group, .. }) = ev[d].get(pos[d]) {
                    for &m in group {
                        let m = m as usize;
                        if let Some(h @ Event::Collective { .. }) = ev.get(m).and_then(|x| x.get(pos[m])) {
                            if !h.same(e) {
                                return Err(format!("device {d} at event {} expected {} but device {m} is at {}", pos[d], e.describe(), h.describe()));
                            }
                        }
                    }
                }
            }
            let stuck: Vec<String> = (0..n).filter(|&d| pos[d] < ev[d].len()).map(|d| format!("device {d} waits at {}", ev[d][pos[d]].describe())).collect();
            return Err(format!("the programs never finish: {}", stuck.join("; ")));
        }
    }
    for (from, row) in queue.iter().enumerate() {
        for (to, q) in row.iter().enumerate() {
            if let Some((id, len)) = q.front() {
                return Err(format!("device {from} sends {len} values (instruction {id}) to device {to}, which never receives them"));
            }
        }
    }
    Ok(())
}

/// Layout typing of a partitioned graph: `out[n]` is node n's layout and
/// `args[n][i]` the layout its operand i is given, per axis. Partial sums may
/// only reach ops linear in that operand.
pub fn check_layouts(g: &Graph, out: &[Vec<Layout>], args: &[Vec<Vec<Layout>>]) -> Result<(), String> {
    for id in g.ids() {
        let node = g.node(id);
        let a = &args[id.0 as usize];
        let axes = out[id.0 as usize].len();
        for ax in 0..axes {
            let has: Vec<Layout> = a.iter().map(|x| x[ax]).collect();
            let ps: Vec<usize> = (0..has.len()).filter(|&i| has[i] == Layout::Partial).collect();
            if ps.is_empty() {
                continue;
            }
            let ok = match &node.op {
                Op::Add | Op::Sub => ps.len() == has.len(),
                Op::Mul | Op::MatMul => ps.len() == 1 && !has.iter().any(|l| matches!(l, Layout::Split(..))),
                Op::Div => ps == [0],
                Op::Neg | Op::Reshape | Op::Transpose { .. } | Op::Sum { .. } | Op::Mean { .. } | Op::SumTo | Op::Expand { .. } => true,
                Op::ReluGrad | Op::GeluGrad | Op::SoftmaxGrad { .. } | Op::LogSoftmaxGrad { .. } | Op::LayerNormGradGamma { .. } | Op::EmbeddingGrad => {
                    ps == [1]
                }
                Op::LayerNormGradX { .. } | Op::CrossEntropyGrad | Op::MseGrad => ps == [2],
                Op::Accumulate(_) | Op::Send { .. } => true,
                _ => false,
            };
            let carries = matches!(node.op, Op::Accumulate(_) | Op::Send { .. });
            if !ok || (!carries && out[id.0 as usize][ax] != Layout::Partial) {
                return Err(format!("node {} ({}) reads a partial sum as operand {} along axis {ax} as if it were complete", id.0, node.op.name(), ps[0]));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{DType, Dim, Ty};

    fn send(to: usize, id: u32) -> Event {
        Event::Send { to, id, len: 4 }
    }
    fn recv(from: usize, id: u32) -> Event {
        Event::Recv { from, id, len: 4 }
    }
    fn ar(id: u32) -> Event {
        Event::Collective { kind: "all-reduce(model)".into(), group: vec![0, 1], id, len: 4 }
    }

    #[test]
    fn matched_programs_pass() {
        assert_eq!(simulate(&[vec![send(1, 1), ar(2), recv(1, 3)], vec![recv(0, 1), ar(2), send(0, 3)]]), Ok(()));
    }

    #[test]
    fn mismatches_and_deadlocks_are_named() {
        // Receives in the other order.
        let e = simulate(&[vec![send(1, 1), send(1, 2)], vec![recv(0, 2), recv(0, 1)]]).unwrap_err();
        assert!(e.contains("device 1") && e.contains("instruction 1"), "{e}");
        // Collectives met in different orders.
        let e = simulate(&[vec![ar(1), ar(2)], vec![ar(2), ar(1)]]).unwrap_err();
        assert!(e.contains("expected all-reduce(model)"), "{e}");
        // Both wait for the other.
        let e = simulate(&[vec![recv(1, 1), send(1, 2)], vec![recv(0, 2), send(0, 1)]]).unwrap_err();
        assert!(e.contains("never finish"), "{e}");
        // A send nobody receives.
        let e = simulate(&[vec![send(1, 1)], vec![]]).unwrap_err();
        assert!(e.contains("never receives"), "{e}");
    }

    #[test]
    fn a_partial_sum_read_as_complete_is_rejected() {
        let mut g = Graph::new();
        let t = Ty::new(DType::F32, vec![Dim::known(4)]);
        let x = g.add(Op::Input(0), &[], t.clone(), Role::Forward);
        let r = g.add(Op::Relu, &[x], t.clone(), Role::Forward);
        let n = g.add(Op::Neg, &[x], t, Role::Forward);
        let _ = (r, n);
        // relu of a partial sum: wrong.
        let out = vec![vec![Layout::Partial], vec![Layout::Partial], vec![Layout::Partial]];
        let args = vec![vec![], vec![vec![Layout::Partial]], vec![vec![Layout::Partial]]];
        let e = check_layouts(&g, &out, &args).unwrap_err();
        assert!(e.contains("relu"), "{e}");
        // negation is linear: fine once relu reads the reduced value.
        let args = vec![vec![], vec![vec![Layout::Replicated]], vec![vec![Layout::Partial]]];
        let out = vec![vec![Layout::Partial], vec![Layout::Replicated], vec![Layout::Partial]];
        assert_eq!(check_layouts(&g, &out, &args), Ok(()));
    }
}
