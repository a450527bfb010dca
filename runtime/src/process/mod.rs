//! One process per device: how a process learns it was started by a
//! launcher (`mpirun`, `srun`, `mpiexec`) and which rank it is, and (with
//! the `mpi` feature) the MPI transport and agreement between the
//! processes ([`mpi`]).
//!
//! Input: the environment the launcher sets. Output: a [`Launch`] (rank,
//! size, rank on this host), or None when no launcher started this process.
//! Invariant: detection reads only variables a launcher sets for each
//! process it starts, so a process run by hand is never mistaken for a rank.

#[cfg(feature = "mpi")]
pub mod mpi;

use std::sync::atomic::{AtomicU64, Ordering};

/// This process's place among the processes a launcher started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Which launcher: `Open MPI`, `Slurm`, `MPICH`.
    pub launcher: &'static str,
    pub rank: usize,
    pub size: usize,
    /// The rank among the processes on this host (GPUs are dealt by it).
    pub local_rank: usize,
}

/// The launcher that started this process, from the variables it sets:
/// Open MPI's `OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}`, Slurm's
/// `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` and `SLURM_LOCALID` (set by
/// `srun`, not in a batch script itself), or MPICH's `PMI_RANK`, `PMI_SIZE`
/// and `MPI_LOCALRANKID`.
pub fn detect() -> Option<Launch> {
    detect_in(&|k| std::env::var(k).ok())
}

/// [`detect`] over the variables `var` gives.
pub fn detect_in(var: &dyn Fn(&str) -> Option<String>) -> Option<Launch> {
    let num = |k: &str| var(k).and_then(|v| v.trim().parse::<usize>().ok());
    let found = |launcher, rank: Option<usize>, size: Option<usize>, local: Option<usize>| match (rank, size) {
        (Some(rank), Some(size)) if rank < size => Some(Launch { launcher, rank, size, local_rank: local.unwrap_or(0) }),
        _ => None,
    };
    found("Open MPI", num("OMPI_COMM_WORLD_RANK"), num("OMPI_COMM_WORLD_SIZE"), num("OMPI_COMM_WORLD_LOCAL_RANK"))
        .or_else(|| found("Slurm", num("SLURM_PROCID"), num("SLURM_STEP_NUM_TASKS"), num("SLURM_LOCALID")))
        .or_else(|| found("MPICH", num("PMI_RANK"), num("PMI_SIZE"), num("MPI_LOCALRANKID")))
}

/// Whether this build can run one process per device (the `mpi` feature).
pub const HAS_MPI: bool = cfg!(feature = "mpi");

/// The step the session is running (from 1), for messages written when
/// the launcher ends this process.
pub static CURRENT_STEP: AtomicU64 = AtomicU64::new(0);

pub(crate) fn set_step(step: u64) {
    CURRENT_STEP.store(step, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launchers_are_told_apart_by_their_variables() {
        assert_eq!(detect_in(&env(&[])), None);
        let ompi = env(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0")]);
        assert_eq!(detect_in(&ompi), Some(Launch { launcher: "Open MPI", rank: 2, size: 4, local_rank: 0 }));
        // In a batch script Slurm sets SLURM_PROCID but no step: not a rank.
        assert_eq!(detect_in(&env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")])), None);
        let srun = env(&[("SLURM_PROCID", "5"), ("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_LOCALID", "1")]);
        assert_eq!(detect_in(&srun), Some(Launch { launcher: "Slurm", rank: 5, size: 8, local_rank: 1 }));
        let hydra = env(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")]);
        assert_eq!(detect_in(&hydra), Some(Launch { launcher: "MPICH", rank: 1, size: 2, local_rank: 0 }));
        // Nonsense is not a launch.
        assert_eq!(detect_in(&env(&[("OMPI_COMM_WORLD_RANK", "4"), ("OMPI_COMM_WORLD_SIZE", "4")])), None);
        assert_eq!(detect_in(&env(&[("OMPI_COMM_WORLD_RANK", "x"), ("OMPI_COMM_WORLD_SIZE", "4")])), None);
    }
}
