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
//!
//! Input: a partitioned [`Plan`] (or its devices' [`Event`]s, or a graph's
//! layouts). Output: `Ok`, or the first problem as a [`VerifyError`] that
//! names the device and the instruction (or the node) at fault.

use super::{Layout, Phase, Plan};
use crate::graph::{Graph, NodeId, Op, Role};
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

/// Which kind of tensor a device holds part of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    Parameter,
    State,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Held::Parameter => "parameter",
            Held::State => "optimizer state",
        })
    }
}

/// The first problem the verifier finds: which device (or node), and at
/// which event or instruction.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum VerifyError {
    /// A device holds a parameter or state the plan gives it no part of.
    #[error("device {device} holds {held} {index} but the plan does not say which part")]
    NoPart { device: usize, held: Held, index: usize },
    /// A device's buffer of a parameter or state has another shape than its part.
    #[error("device {device} holds {held} {index} as {shape:?}, but its layout gives it {part:?} of {global:?}")]
    PartShape { device: usize, held: Held, index: usize, shape: Vec<usize>, part: Vec<usize>, global: Vec<usize> },
    /// A device's part of a parameter or state reaches past the global tensor.
    #[error("device {device}'s part of {held} {index} lies outside its global shape {global:?}")]
    PartOutside { device: usize, held: Held, index: usize, global: Vec<usize> },
    /// A send to itself or to a device the plan does not have.
    #[error("device {device} sends to device {to}, which is not another device of the plan")]
    SendPeer { device: usize, to: usize },
    /// A receive from a device the plan does not have.
    #[error("device {device} receives from device {from}, which the plan does not have")]
    RecvPeer { device: usize, from: usize },
    /// A receive (event `at` of `device`) met another send of its peer:
    /// `len` values of instruction `id`.
    #[error("device {device} at event {at} expected a {} but device {from} sent {len} values of instruction {id}", .expected.describe())]
    Mismatch { device: usize, at: usize, expected: Event, from: usize, id: u32, len: usize },
    /// A device takes part in a collective of a group it is not in.
    #[error("device {device} takes part in a collective of group {group:?} it is not in")]
    NotInGroup { device: usize, group: Vec<u32> },
    /// A collective's group names devices the plan does not have.
    #[error("device {device}'s collective names devices outside the plan: {group:?}")]
    GroupOutside { device: usize, group: Vec<u32> },
    /// Members of a collective wait at different collectives.
    #[error("device {device} at event {at} expected {} but device {other} is at {}", .expected.describe(), .found.describe())]
    CollectiveMismatch { device: usize, at: usize, expected: Box<Event>, other: usize, found: Box<Event> },
    /// No device can go on: each waiting device and the event it waits at.
    #[error("the programs never finish: {}", .waiting.iter().map(|(d, e)| format!("device {d} waits at {}", e.describe())).collect::<Vec<_>>().join("; "))]
    Deadlock { waiting: Vec<(usize, Event)> },
    /// A send that no receive takes.
    #[error("device {device} sends {len} values (instruction {id}) to device {to}, which never receives them")]
    NeverReceived { device: usize, to: usize, id: u32, len: usize },
    /// Layout typing: a node reads a partial sum as if it were complete.
    #[error("node {} ({op}) reads a partial sum as operand {operand} along axis {axis} as if it were complete", .node.0)]
    PartialRead { node: NodeId, op: String, operand: usize, axis: usize },
}

impl VerifyError {
    /// The device at fault (the first one named), or None for a layout
    /// error of the global graph.
    pub fn device(&self) -> Option<usize> {
        match self {
            VerifyError::NoPart { device, .. }
            | VerifyError::PartShape { device, .. }
            | VerifyError::PartOutside { device, .. }
            | VerifyError::SendPeer { device, .. }
            | VerifyError::RecvPeer { device, .. }
            | VerifyError::Mismatch { device, .. }
            | VerifyError::NotInGroup { device, .. }
            | VerifyError::GroupOutside { device, .. }
            | VerifyError::CollectiveMismatch { device, .. }
            | VerifyError::NeverReceived { device, .. } => Some(*device),
            VerifyError::Deadlock { waiting } => waiting.first().map(|w| w.0),
            VerifyError::PartialRead { .. } => None,
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
pub fn verify(plan: &Plan) -> Result<(), VerifyError> {
    shapes(plan)?;
    simulate(&events(plan))
}

/// Every parameter and optimizer state a device holds has the shape of its
/// piece of the global tensor, and the pieces of one tensor agree on its
/// global shape.
pub fn shapes(plan: &Plan) -> Result<(), VerifyError> {
    use crate::kernel::BufKind;
    for d in &plan.devices {
        let device = d.device;
        for b in &d.program.buffers {
            let (pieces, index, held) = match b.kind {
                BufKind::Param(i) => (&d.params, i, Held::Parameter),
                BufKind::State(i) => (&d.states, i, Held::State),
                _ => continue,
            };
            let Some(piece) = pieces.iter().find(|p| p.index == index) else {
                return Err(VerifyError::NoPart { device, held, index });
            };
            if piece.len != b.shape {
                return Err(VerifyError::PartShape { device, held, index, shape: b.shape.clone(), part: piece.len.clone(), global: piece.global.clone() });
            }
            if piece.start.iter().zip(&piece.len).zip(&piece.global).any(|((s, l), g)| s + l > *g) {
                return Err(VerifyError::PartOutside { device, held, index, global: piece.global.clone() });
            }
        }
    }
    Ok(())
}

/// Simulates devices' event lists together; the first problem, described.
pub fn simulate(ev: &[Vec<Event>]) -> Result<(), VerifyError> {
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
                            return Err(VerifyError::SendPeer { device: d, to: *to });
                        }
                        queue[d][*to].push_back((*id, *len));
                    }
                    Event::Recv { from, id, len } => {
                        if *from >= n {
                            return Err(VerifyError::RecvPeer { device: d, from: *from });
                        }
                        match queue[*from][d].front() {
                            None => break,
                            Some(&(sid, slen)) if sid == *id && slen == *len => {
                                queue[*from][d].pop_front();
                            }
                            Some(&(sid, slen)) => {
                                return Err(VerifyError::Mismatch { device: d, at: pos[d], expected: e.clone(), from: *from, id: sid, len: slen })
                            }
                        }
                    }
                    Event::Collective { group, .. } => {
                        if !group.contains(&(d as u32)) {
                            return Err(VerifyError::NotInGroup { device: d, group: group.clone() });
                        }
                        // Only the lowest member completes it, once all are there.
                        let members: Vec<usize> = group.iter().map(|&m| m as usize).collect();
                        if members.iter().any(|&m| m >= n) {
                            return Err(VerifyError::GroupOutside { device: d, group: group.clone() });
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
                                return Err(VerifyError::CollectiveMismatch {
                                    device: d,
                                    at: pos[d],
                                    expected: Box::new(e.clone()),
                                    other: m,
                                    found: Box::new(h.clone()),
                                });
                            }
                        }
                    }
                }
            }
            let waiting = (0..n).filter(|&d| pos[d] < ev[d].len()).map(|d| (d, ev[d][pos[d]].clone())).collect();
            return Err(VerifyError::Deadlock { waiting });
        }
    }
    for (from, row) in queue.iter().enumerate() {
        for (to, q) in row.iter().enumerate() {
            if let Some(&(id, len)) = q.front() {
                return Err(VerifyError::NeverReceived { device: from, to, id, len });
            }
        }
    }
    Ok(())
}

/// Layout typing of a partitioned graph: `out[n]` is node n's layout and
/// `args[n][i]` the layout its operand i is given, per axis. Partial sums may
/// only reach ops linear in that operand.
pub fn check_layouts(g: &Graph, out: &[Vec<Layout>], args: &[Vec<Vec<Layout>>]) -> Result<(), VerifyError> {
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
                Op::Neg
                | Op::Reshape
                | Op::Transpose { .. }
                | Op::Sum { .. }
                | Op::Mean { .. }
                | Op::SumTo
                | Op::Expand { .. }
                | Op::Rope { .. }
                | Op::Col2Im { .. } => true,
                Op::ReluGrad
                | Op::GeluGrad
                | Op::SoftmaxGrad { .. }
                | Op::LogSoftmaxGrad { .. }
                | Op::LayerNormGradGamma { .. }
                | Op::RmsNormGradGamma { .. }
                | Op::EmbeddingGrad => ps == [1],
                Op::LayerNormGradX { .. } | Op::RmsNormGradX { .. } | Op::CrossEntropyGrad | Op::MseGrad => ps == [2],
                Op::Dropout { .. } => ps == [0],
                Op::Accumulate(_) | Op::Send { .. } => true,
                _ => false,
            };
            let carries = matches!(node.op, Op::Accumulate(_) | Op::Send { .. });
            if !ok || (!carries && out[id.0 as usize][ax] != Layout::Partial) {
                return Err(VerifyError::PartialRead { node: id, op: node.op.name(), operand: ps[0], axis: ax });
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
        assert_eq!(e, VerifyError::Mismatch { device: 1, at: 0, expected: recv(0, 2), from: 0, id: 1, len: 4 });
        assert!(e.to_string().contains("device 1") && e.to_string().contains("instruction 1"), "{e}");
        // Collectives met in different orders.
        let e = simulate(&[vec![ar(1), ar(2)], vec![ar(2), ar(1)]]).unwrap_err();
        assert!(matches!(e, VerifyError::CollectiveMismatch { device: 0, .. }), "{e:?}");
        assert!(e.to_string().contains("expected all-reduce(model)"), "{e}");
        // Both wait for the other.
        let e = simulate(&[vec![recv(1, 1), send(1, 2)], vec![recv(0, 2), send(0, 1)]]).unwrap_err();
        assert_eq!(e, VerifyError::Deadlock { waiting: vec![(0, recv(1, 1)), (1, recv(0, 2))] });
        assert!(e.to_string().contains("never finish"), "{e}");
        // A send nobody receives.
        let e = simulate(&[vec![send(1, 1)], vec![]]).unwrap_err();
        assert_eq!(e, VerifyError::NeverReceived { device: 0, to: 1, id: 1, len: 4 });
        assert!(e.to_string().contains("never receives"), "{e}");
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
        assert!(matches!(e, VerifyError::PartialRead { node: NodeId(1), operand: 0, axis: 0, .. }), "{e:?}");
        assert!(e.to_string().contains("relu"), "{e}");
        // negation is linear: fine once relu reads the reduced value.
        let args = vec![vec![], vec![vec![Layout::Replicated]], vec![vec![Layout::Partial]]];
        let out = vec![vec![Layout::Partial], vec![Layout::Replicated], vec![Layout::Partial]];
        assert_eq!(check_layouts(&g, &out, &args), Ok(()));
    }
}
