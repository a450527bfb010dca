//! The memory plan of each device: every buffer its program allocates, by
//! what it holds, computed from the program before anything runs.
//!
//! Input: a device program and its number of buffer sets (microbatches in
//! flight). Output: its bytes by what they hold ([`Memory`]), and an error
//! for a plan that does not fit its devices' memory.
//!
//! Invariant: the executors allocate each buffer once (reshapes share their
//! operand's memory) and one copy per buffer set of the buffers
//! [`Program::banked`] names, the same rule used here, so the sum below is
//! exactly what a device allocates; the runtime measures its allocation too
//! and `inspect` shows both.
//!
//! [`Program::banked`]: crate::kernel::Program::banked

use super::{DeviceProgram, Plan};
use crate::graph::Role;
use crate::kernel::{BufKind, Program, StepKind};
use crate::units::{Bytes, Unit};
use serde::Serialize;

/// Bytes of one device, by what they hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Memory {
    pub params: u64,
    /// Gradients: accumulators, or backward results the update reads.
    pub grads: u64,
    pub optimizer: u64,
    /// Forward and backward values and inputs: those that outlive their
    /// pass times the buffer sets, the others once.
    pub activations: u64,
    /// Results of transfers and collectives.
    pub comm: u64,
    /// The update's temporaries, constants and scalars.
    pub workspace: u64,
}

impl Memory {
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.optimizer + self.activations + self.comm + self.workspace
    }
}

/// The memory plan of every device of `plan`.
pub fn plan(plan: &Plan) -> Vec<Memory> {
    plan.devices.iter().map(device).collect()
}

/// The memory plan of one device.
pub fn device(d: &DeviceProgram) -> Memory {
    program(&d.program, d.slots)
}

/// The memory plan of a program run with `slots` buffer sets (one device's
/// program, or the single program of a plan without a placement).
pub fn program(p: &Program, slots: usize) -> Memory {
    let n = p.buffers.len();
    // Inputs, and the values that outlive their pass: one copy per buffer set.
    let banked = p.banked();
    let mut comm = vec![false; n];
    // Temporaries of the forward and backward passes (banked or not).
    let mut pass = vec![false; n];
    for s in &p.steps {
        if s.role != Role::Update {
            pass[p.storage(s.output).0 as usize] = true;
        }
    }
    for s in &p.steps {
        if let StepKind::Op(op) = &s.kind {
            if op.is_comm() {
                comm[p.storage(s.output).0 as usize] = true;
            }
        }
    }
    let grad = gradients(p, &banked);
    let sets = slots.max(1) as u64;
    let mut m = Memory::default();
    for (i, b) in p.buffers.iter().enumerate() {
        let bytes = (b.elem.bytes() * b.len()) as u64;
        match b.kind {
            BufKind::Alias(_) => {}
            BufKind::Param(_) => m.params += bytes,
            BufKind::State(_) => m.optimizer += bytes,
            BufKind::Accum(_) => m.grads += bytes,
            BufKind::Temp if grad[i] => m.grads += bytes * sets,
            BufKind::Input(_) => m.activations += bytes * sets,
            BufKind::Temp if comm[i] && banked[i] => m.comm += bytes * sets,
            BufKind::Temp if comm[i] => m.comm += bytes,
            BufKind::Temp if banked[i] => m.activations += bytes * sets,
            BufKind::Temp if pass[i] => m.activations += bytes,
            BufKind::Temp | BufKind::Const(_) | BufKind::Hyper(_) => m.workspace += bytes,
        }
    }
    m
}

/// Which buffers of `p` are gradients held as temporaries: the banked
/// temporaries (see [`Program::banked`]) the update reads. Accumulators
/// ([`BufKind::Accum`]) are gradients too, by their kind.
pub fn gradients(p: &Program, banked: &[bool]) -> Vec<bool> {
    let mut grad = vec![false; p.buffers.len()];
    for s in p.steps.iter().filter(|s| s.role == Role::Update) {
        for b in &s.inputs {
            let i = p.storage(*b).0 as usize;
            if banked[i] && p.buffers[i].kind == BufKind::Temp {
                grad[i] = true;
            }
        }
    }
    grad
}

/// Sizes in messages: two decimals in GiB, one below, never in bytes.
fn size(b: u64) -> String {
    let b = Bytes(b).within(Unit::KiB, Unit::GiB);
    match b.unit() {
        Unit::GiB => format!("{b:.2}"),
        _ => format!("{b:.1}"),
    }
}

/// An error when some device's plan needs more memory than the device has:
/// pointing at the placement, with what each such device would hold.
pub fn check(c: &crate::Checked, plan: &Plan) -> Option<crate::Diagnostic> {
    let mems = self::plan(plan);
    let over: Vec<(usize, &Memory, u64)> = plan
        .devices
        .iter()
        .zip(&mems)
        .filter_map(|(d, m)| {
            let cap = c.devices.get(d.device)?.memory?;
            (m.total() > cap).then_some((d.device, m, cap))
        })
        .collect();
    let (first, _, cap) = *over.first()?;
    let name = |i: usize| c.devices.get(i).map(|d| d.name.clone()).unwrap_or_else(|| format!("device {i}"));
    let mut d = crate::Diagnostic::error(
        "placement::out_of_memory",
        format!(
            "{} of {} devices would need more memory than they have: {} needs {}, it has {}",
            over.len(),
            plan.devices.len(),
            name(first),
            size(over[0].1.total()),
            size(cap)
        ),
    );
    if let crate::check::Placement::Explicit(e) = &c.placement {
        d = d.label(e.span, "this placement does not fit");
    }
    if let Some(span) = c.devices.get(first).and_then(|x| x.span) {
        d = d.label(span, format!("{} has {}", name(first), size(cap)));
    }
    let lines: Vec<String> = over
        .iter()
        .take(8)
        .map(|(i, m, cap)| {
            format!(
                "{}: {} of {} (parameters {}, gradients {}, optimizer {}, activations {}, transfers {}, workspace {})",
                name(*i),
                size(m.total()),
                size(*cap),
                size(m.params),
                size(m.grads),
                size(m.optimizer),
                size(m.activations),
                size(m.comm),
                size(m.workspace)
            )
        })
        .collect();
    Some(d.help(format!(
        "{}; shard the largest layers over a `model` axis, cut the model into pipeline stages, or use fewer microbatches in flight (1f1b)",
        lines.join("; ")
    )))
}
