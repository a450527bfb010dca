//! `shardplan run` as one process per device: MPI started when a launcher
//! started this process (the `mpi` feature), and how a rank ends.

use super::run::Error;
use shardplan_runtime::cluster::Rank;
use shardplan_runtime::process::Launch;
use shardplan_runtime::session::SessionError;
use std::process::ExitCode;

#[cfg(feature = "mpi")]
type World = shardplan_runtime::process::mpi::Mpi;
/// Without MPI there is no world: a run with ranks cannot start.
#[cfg(not(feature = "mpi"))]
type World = std::convert::Infallible;

/// This process's rank in a run with one process per device.
pub struct Ranks(World);

/// Starts MPI for the process `l` describes.
pub fn start(l: Launch) -> Result<Ranks, SessionError> {
    #[cfg(feature = "mpi")]
    return World::init(l.local_rank)
        .map(Ranks)
        .map_err(|e| SessionError::failed("run::mpi", format!("cannot start MPI: {e}"), "check the MPI installation with `mpirun -np 2 hostname`"));
    #[cfg(not(feature = "mpi"))]
    Err(SessionError::failed(
        "run::no_mpi",
        format!("{} started this process as rank {} of {}, but this shardplan was built without MPI", l.launcher, l.rank, l.size),
        "build shardplan with MPI (`cargo install --path . --features mpi`, with Open MPI and libclang installed; docs/multi-process.md), or run it without a launcher",
    ))
}

impl Ranks {
    pub fn rank(&self) -> usize {
        #[cfg(feature = "mpi")]
        return self.0.rank();
        #[cfg(not(feature = "mpi"))]
        match self.0 {}
    }

    /// This process's share of the run.
    pub fn share(&self) -> Rank {
        #[cfg(feature = "mpi")]
        return self.0.share(std::time::Duration::from_secs(60));
        #[cfg(not(feature = "mpi"))]
        match self.0 {}
    }

    /// Ends a rank other than 0 after an error: it says in one line what
    /// failed on it, unless rank 0 reports the same error in full.
    pub fn fail(&self, e: &Error) -> ExitCode {
        let (code, message) = match e {
            Error::Session(s) => (s.code().to_string(), s.to_string()),
            Error::Diags(d) => d.iter().find(|d| d.is_error()).map(|d| (d.code.to_string(), d.message.clone())).unwrap_or_default(),
        };
        self.quiet();
        // Every rank sees the errors the ranks share (a device's failure, a
        // rank count or plan they disagree on): rank 0 alone reports those.
        if !matches!(code.as_str(), "run::device" | "run::rank_count" | "run::ranks_differ") {
            eprintln!("error[{code}]: rank {}: {message}", self.rank());
        }
        self.exit_after(ExitCode::from(1))
    }

    /// Ends the process once the error is reported, without waiting for ranks that may be gone.
    pub fn exit_after(&self, _reported: ExitCode) -> ExitCode {
        #[cfg(feature = "mpi")]
        self.0.exit(1);
        #[cfg(not(feature = "mpi"))]
        match self.0 {}
    }

    pub fn quiet(&self) {
        #[cfg(feature = "mpi")]
        shardplan_runtime::process::mpi::reporting();
    }
}
