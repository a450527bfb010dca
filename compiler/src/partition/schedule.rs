//! Pipeline schedules: the order in which one device runs the forward and
//! backward passes of each microbatch, then the update.
//!
//! GPipe: every forward, then every backward. 1F1B: stage `s` of `p` runs
//! `p − s − 1` warm-up forwards, then alternates one forward and one
//! backward, then drains the remaining backwards, so it keeps at most
//! `p − s` microbatches' activations instead of all of them.
//!
//! Input: the number of stages, a stage and the microbatch count. Output:
//! the device's list of passes ([`Instr`]). Invariant: a stage's k-th forward
//! and backward of a microbatch meet its neighbours' in the same order, so
//! sends and receives pair up.

use crate::check::Schedule;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Forward,
    Backward,
    Update,
}

/// One pass of a device's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instr {
    pub phase: Phase,
    /// The microbatch (0 for the update).
    pub mb: usize,
    /// The activation buffer set it uses (0 for the update).
    pub slot: usize,
}

/// The passes of `stage` of `stages`, and how many buffer sets they need.
pub fn passes(schedule: Option<Schedule>, stage: usize, stages: usize, microbatches: usize) -> (Vec<Instr>, usize) {
    let m = microbatches.max(1);
    let mut order: Vec<(Phase, usize)> = Vec::new();
    match schedule {
        Some(Schedule::OneFOneB) => {
            let warm = (stages - stage - 1).min(m);
            order.extend((0..warm).map(|i| (Phase::Forward, i)));
            for i in 0..m - warm {
                order.push((Phase::Forward, warm + i));
                order.push((Phase::Backward, i));
            }
            order.extend((m - warm..m).map(|i| (Phase::Backward, i)));
        }
        _ => {
            order.extend((0..m).map(|i| (Phase::Forward, i)));
            order.extend((0..m).map(|i| (Phase::Backward, i)));
        }
    }
    // Slots: a forward takes the lowest free one, its backward frees it.
    let mut free: Vec<bool> = Vec::new();
    let mut slot_of = vec![0usize; m];
    let mut out = Vec::new();
    for (phase, mb) in order {
        let slot = match phase {
            Phase::Forward => {
                let s = free.iter().position(|f| *f).unwrap_or_else(|| {
                    free.push(true);
                    free.len() - 1
                });
                free[s] = false;
                slot_of[mb] = s;
                s
            }
            _ => {
                let s = slot_of[mb];
                free[s] = true;
                s
            }
        };
        out.push(Instr { phase, mb, slot });
    }
    out.push(Instr { phase: Phase::Update, mb: 0, slot: 0 });
    (out, free.len().max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_keeps_fewer_microbatches() {
        let (gp, slots) = passes(Some(Schedule::GPipe), 0, 4, 8);
        assert_eq!(slots, 8);
        assert_eq!(gp.len(), 17);
        let (s0, slots0) = passes(Some(Schedule::OneFOneB), 0, 4, 8);
        assert_eq!(slots0, 4);
        let phases: String = s0
            .iter()
            .map(|i| {
                if i.phase == Phase::Forward {
                    'F'
                } else if i.phase == Phase::Backward {
                    'B'
                } else {
                    'U'
                }
            })
            .collect();
        assert_eq!(phases, "FFFFBFBFBFBFBBBBU");
        let (_, slots3) = passes(Some(Schedule::OneFOneB), 3, 4, 8);
        assert_eq!(slots3, 1);
    }
}
