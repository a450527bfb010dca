//! MPI between the processes of a run (the `mpi` feature): one process per
//! device, started by `mpirun` or `srun`, with Open MPI moving the bytes.
//!
//! Input: a process started by a launcher. Output: [`Mpi`], which gives the
//! process's [`Rank`]: an [`MpiTransport`] for its device's transfers (the
//! same [`Transport`] interface as the in-process fabric, so the executor,
//! the schedule, the ring collectives and the header checks are the
//! same code) and [`MpiPeers`] for the processes' agreement on each command.
//!
//! Invariants:
//! - MPI runs at `MPI_THREAD_SERIALIZED`: the device's thread makes its
//!   transfers during a command, the session's thread exchanges the
//!   replies between commands, never both at once;
//! - a message is a header (tag `HDR`: plan hash, instruction, sequence
//!   number, length, kind) then its payload of `f32`s (tag `DAT`); MPI keeps
//!   the order of messages between two ranks with one tag, so headers and
//!   payloads pair up;
//! - sends never block: each is an `MPI_Isend` whose buffer is kept until
//!   MPI reports it done, so a ring of sends followed by receives cannot
//!   deadlock;
//! - a device that fails sends an `ABORT` message, with its reason, to every
//!   rank; a waiting receive looks for one at every poll, so every rank
//!   stops at its next transfer and names the rank that failed;
//! - when the launcher ends this process (`SIGTERM`, as `mpirun` does when
//!   another rank dies), a watcher prints which rank on this host is gone
//!   and at which step, and exits with status 1, unless the process is
//!   reporting an error of its own, which it then finishes.

use crate::cluster::{Peers, Rank};
use crate::transport::{decode_header, describe, encode_header, Header, Message, Transport, TransportError};
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::{Count, Threading};
use shardplan_compiler::hash;
use std::cell::RefCell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

const HDR: i32 = 11;
const DAT: i32 = 12;
const ABORT: i32 = 13;

/// Most bytes one all-gather round moves per rank (MPI counts are `int`s).
const ROUND: usize = 1 << 30;

/// The MPI environment of this process; finalises MPI when dropped.
pub struct Mpi {
    /// A copy of the world communicator for the last barrier of a failed
    /// run, which must not match a collective the others may be in.
    last: SimpleCommunicator,
    _universe: Universe,
    rank: usize,
    size: usize,
    local_rank: usize,
}

impl Mpi {
    /// Initialises MPI, learns where every rank runs, and starts the watcher
    /// that reports a rank the launcher ended.
    pub fn init(local_rank: usize) -> Result<Mpi, String> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized).ok_or("MPI was initialised twice")?;
        if matches!(level, Threading::Single | Threading::Funneled) {
            return Err(format!("this MPI offers threads at level {level:?}; shardplan needs MPI_THREAD_SERIALIZED"));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let me = format!("{}\n{}", hostname(), std::process::id());
        let peers = MpiPeers { rank, size };
        let hosts: Vec<(String, u32)> = peers
            .all_gather(me.into_bytes())
            .into_iter()
            .map(|b| {
                let s = String::from_utf8_lossy(&b).into_owned();
                let (h, p) = s.split_once('\n').unwrap_or((&s, "0"));
                (h.to_string(), p.parse().unwrap_or(0))
            })
            .collect();
        watch(rank, hosts);
        let last = world.duplicate();
        Ok(Mpi { last, _universe: universe, rank, size, local_rank })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's share of the run: its transport (receives give up
    /// after `timeout`) and the agreement with the other processes.
    pub fn share(&self, timeout: Duration) -> Rank {
        Rank {
            transport: Box::new(MpiTransport::new(self.rank, self.size, timeout)),
            peers: Box::new(MpiPeers { rank: self.rank, size: self.size }),
            local_rank: self.local_rank,
            build: build_id(),
            host: hostname(),
        }
    }

    /// Ends this process with `code` once every rank has reported (or
    /// after 3 seconds, when some rank is gone or failed on its own),
    /// without finalising MPI, which would wait for ranks that are gone.
    pub fn exit(&self, code: i32) -> ! {
        QUIET.store(true, Ordering::SeqCst);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let mut barrier = self.last.immediate_barrier();
        let until = Instant::now() + Duration::from_secs(3);
        loop {
            match barrier.test() {
                Ok(_) => break,
                Err(pending) if Instant::now() < until => {
                    barrier = pending;
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Dropping an unfinished request panics; the process ends here anyway.
                Err(pending) => {
                    std::mem::forget(pending);
                    break;
                }
            }
        }
        // SAFETY: `_exit` ends the process; nothing runs after it.
        unsafe { libc::_exit(code) }
    }
}

/// Says that this process is reporting its own error: a `SIGTERM` from the
/// launcher meanwhile (another rank ended first) lets it finish the report.
pub fn reporting() {
    QUIET.store(true, Ordering::SeqCst);
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "?".to_string()
    }
}

/// A fingerprint of this build: a hash of the running executable, so ranks
/// started from different builds are told apart.
pub fn build_id() -> u64 {
    let Ok(exe) = std::env::current_exe() else { return 0 };
    let Ok(mut f) = std::fs::File::open(exe) else { return 0 };
    let mut h = hash::START;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match std::io::Read::read(&mut f, &mut buf) {
            Ok(0) | Err(_) => return h,
            Ok(n) => h = hash::fnv1a_from(h, &buf[..n]),
        }
    }
}

/// The processes of the world communicator, for [`Peers::all_gather`].
pub struct MpiPeers {
    rank: usize,
    size: usize,
}

impl Peers for MpiPeers {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
        let world = SimpleCommunicator::world();
        let mut lens = vec![0u64; self.size];
        world.all_gather_into(&(mine.len() as u64), &mut lens[..]);
        let mut out: Vec<Vec<u8>> = lens.iter().map(|&l| Vec::with_capacity(l as usize)).collect();
        let longest = lens.iter().copied().max().unwrap_or(0) as usize;
        let mut at = 0;
        while at < longest {
            let counts: Vec<Count> = lens.iter().map(|&l| (l as usize).saturating_sub(at).min(ROUND) as Count).collect();
            let displs: Vec<Count> = counts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect();
            let mut buf = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
            let send = &mine[at.min(mine.len())..(at + ROUND).min(mine.len())];
            {
                let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
                world.all_gather_varcount_into(send, &mut part);
            }
            for (r, o) in out.iter_mut().enumerate() {
                let d = displs[r] as usize;
                o.extend_from_slice(&buf[d..d + counts[r] as usize]);
            }
            at += ROUND;
        }
        out
    }

    fn boxed(&self) -> Box<dyn Peers + Send> {
        Box::new(MpiPeers { rank: self.rank, size: self.size })
    }
}

/// A send MPI has not finished with, and the buffer it reads from.
struct Pending {
    request: ffi::MPI_Request,
    _bytes: Vec<u8>,
    floats: Vec<f32>,
}

/// One rank's device's transport over MPI.
pub struct MpiTransport {
    rank: usize,
    size: usize,
    timeout: Duration,
    pending: RefCell<Vec<Pending>>,
    /// The failure that stopped this rank: (rank at fault, reason).
    failed: RefCell<Option<(usize, String)>>,
    pool: RefCell<Vec<Vec<f32>>>,
}

// SAFETY: the transport is built on the session's thread and then moved to
// its device's thread, which alone uses it; MPI runs at
// MPI_THREAD_SERIALIZED and the session makes no MPI call while the device
// runs a command. The request handles it holds are plain MPI handles.
unsafe impl Send for MpiTransport {}

impl MpiTransport {
    fn new(rank: usize, size: usize, timeout: Duration) -> MpiTransport {
        MpiTransport { rank, size, timeout, pending: RefCell::default(), failed: RefCell::default(), pool: RefCell::default() }
    }

    fn world() -> SimpleCommunicator {
        SimpleCommunicator::world()
    }

    /// Starts sending `buf` to `to` with `tag`; MPI reads it until the request completes.
    fn isend<T: Equivalence>(&self, to: usize, tag: i32, buf: &[T]) -> ffi::MPI_Request {
        // SAFETY: REQUEST_NULL is a constant handle.
        let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `buf` stays alive and unmoved until the request completes:
        // the caller keeps it in `pending` (a Vec's heap buffer does not move).
        unsafe {
            ffi::MPI_Isend(
                buf.as_ptr() as *const c_void,
                buf.len() as c_int,
                T::equivalent_datatype().as_raw(),
                to as c_int,
                tag,
                Self::world().as_raw(),
                &mut request,
            );
        }
        request
    }

    /// Takes back the buffers of sends MPI has finished: payloads go back
    /// to the pool, so steady-state collectives allocate nothing.
    fn progress(&self) {
        let mut pending = self.pending.borrow_mut();
        let mut freed = Vec::new();
        pending.retain_mut(|p| {
            let mut done: c_int = 0;
            // SAFETY: `p.request` is a live request from MPI_Isend; STATUS_IGNORE is valid.
            unsafe { ffi::MPI_Test(&mut p.request, &mut done, ffi::RSMPI_STATUS_IGNORE) };
            if done != 0 {
                freed.push(std::mem::take(&mut p.floats));
            }
            done == 0
        });
        drop(pending);
        for buf in freed {
            self.give_back(buf);
        }
    }

    fn check_failed(&self) -> Result<(), TransportError> {
        match &*self.failed.borrow() {
            Some((by, reason)) => Err(TransportError::Aborted { device: self.rank, by: *by, reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// Records `err` as this rank's failure and tells every rank.
    fn fail(&self, err: TransportError) -> TransportError {
        self.abort(&err.to_string());
        err
    }

    /// Receives the payload from `from` into `buf`'s spare capacity (at
    /// least `len`, unfilled: the bytes come straight from MPI) and sets its
    /// length; the number of values received, None when MPI cannot say.
    fn receive_payload(&self, from: usize, buf: &mut Vec<f32>, len: usize) -> Option<usize> {
        buf.clear();
        buf.reserve_exact(len);
        let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
        let mut count: c_int = 0;
        // SAFETY: the buffer has room for `len` floats and MPI writes at most
        // `len` (a longer message is an MPI error); the length is set only
        // to the count MPI reports it wrote, never more than `len`.
        unsafe {
            ffi::MPI_Recv(
                buf.as_mut_ptr() as *mut c_void,
                len as c_int,
                f32::equivalent_datatype().as_raw(),
                from as c_int,
                DAT,
                Self::world().as_raw(),
                status.as_mut_ptr(),
            );
            ffi::MPI_Get_count(status.as_ptr(), f32::equivalent_datatype().as_raw(), &mut count);
            let n = usize::try_from(count).ok().filter(|&n| n <= len)?;
            buf.set_len(n);
            Some(n)
        }
    }

    /// An ABORT message from any rank, if one has arrived.
    fn aborted_by(&self) -> Option<(usize, String)> {
        let world = Self::world();
        let found = world.any_process().immediate_matched_probe_with_tag(ABORT)?;
        let (bytes, status) = found.matched_receive_vec::<u8>();
        Some((status.source_rank() as usize, String::from_utf8_lossy(&bytes).into_owned()))
    }
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&self, to: usize, msg: Message) -> Result<(), TransportError> {
        self.check_failed()?;
        if to >= self.size {
            return Err(TransportError::BadPeer { device: self.rank, peer: to, size: self.size });
        }
        if msg.data.len() > c_int::MAX as usize {
            let reason = format!("a message of {} values is more than one MPI message holds", msg.data.len());
            return Err(self.fail(TransportError::Malformed { device: self.rank, instr: msg.header.instr, reason }));
        }
        self.progress();
        let bytes = encode_header(&msg.header, msg.data.len());
        let hr = self.isend(to, HDR, &bytes);
        let mut pending = self.pending.borrow_mut();
        pending.push(Pending { request: hr, _bytes: bytes, floats: Vec::new() });
        if !msg.data.is_empty() {
            let dr = self.isend(to, DAT, &msg.data);
            pending.push(Pending { request: dr, _bytes: Vec::new(), floats: msg.data });
        }
        Ok(())
    }

    fn recv(&self, from: usize, expect: &Header) -> Result<Vec<f32>, TransportError> {
        if from >= self.size {
            return Err(TransportError::BadPeer { device: self.rank, peer: from, size: self.size });
        }
        let world = Self::world();
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            self.check_failed()?;
            if let Some((by, reason)) = self.aborted_by() {
                *self.failed.borrow_mut() = Some((by, reason.clone()));
                return Err(TransportError::Aborted { device: self.rank, by, reason });
            }
            if let Some(found) = world.process_at_rank(from as i32).immediate_matched_probe_with_tag(HDR) {
                let (bytes, _) = found.matched_receive_vec::<u8>();
                let Some((got, len)) = decode_header(&bytes) else {
                    let reason = format!("an unreadable message header from device {from}");
                    return Err(self.fail(TransportError::Malformed { device: self.rank, instr: expect.instr, reason }));
                };
                if got != *expect {
                    let (expected, got) = describe(expect, &got);
                    return Err(self.fail(TransportError::Mismatch { device: self.rank, instr: expect.instr, expected, got }));
                }
                let mut buf = self.take_buffer(len);
                if len > 0 {
                    let got = self.receive_payload(from, &mut buf, len);
                    if got != Some(len) {
                        let reason = format!("a payload of {got:?} values from device {from}, expected {len}");
                        return Err(self.fail(TransportError::Malformed { device: self.rank, instr: expect.instr, reason }));
                    }
                }
                self.progress();
                return Ok(buf);
            }
            self.progress();
            if start.elapsed() >= self.timeout {
                let secs = start.elapsed().as_secs_f64();
                return Err(self.fail(TransportError::Timeout { device: self.rank, from, instr: expect.instr, secs }));
            }
            // Spin briefly (transfers of a step follow each other closely), then sleep between polls.
            polls = polls.saturating_add(1);
            if polls < 2000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    fn abort(&self, reason: &str) {
        if self.failed.borrow().is_some() {
            return;
        }
        *self.failed.borrow_mut() = Some((self.rank, reason.to_string()));
        // Short messages go out at once (eagerly), so a blocking send does not wait for the peer.
        let mut text = reason.as_bytes().to_vec();
        text.truncate(1000);
        let world = Self::world();
        for r in (0..self.size).filter(|&r| r != self.rank) {
            world.process_at_rank(r as i32).send_with_tag(&text[..], ABORT);
        }
    }

    fn take_buffer(&self, capacity: usize) -> Vec<f32> {
        let mut pool = self.pool.borrow_mut();
        let fits = pool.iter().position(|b| b.capacity() >= capacity);
        let mut buf = fits.map(|i| pool.swap_remove(i)).unwrap_or_else(|| Vec::with_capacity(capacity));
        buf.clear();
        buf
    }

    fn give_back(&self, buf: Vec<f32>) {
        let mut pool = self.pool.borrow_mut();
        if pool.len() < crate::transport::POOL_CAP && buf.capacity() > 0 {
            pool.push(buf);
        }
    }
}

impl Drop for MpiTransport {
    fn drop(&mut self) {
        // Every send of a finished run has its receive; wait a little for
        // MPI to finish them, and leave the buffers of any it has not
        // (after a failure) rather than free memory MPI may still read.
        let until = Instant::now() + Duration::from_secs(2);
        while !self.pending.borrow().is_empty() && Instant::now() < until {
            self.progress();
            std::thread::sleep(Duration::from_micros(100));
        }
        std::mem::forget(std::mem::take(&mut *self.pending.borrow_mut()));
    }
}

static PIPE: AtomicI32 = AtomicI32::new(-1);
static QUIET: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: c_int) {
    let fd = PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = [1u8];
        // SAFETY: write(2) is async-signal-safe; the buffer is valid.
        unsafe { libc::write(fd, b.as_ptr() as *const c_void, 1) };
    }
}

/// Starts the thread that, when the launcher ends this process, says why.
fn watch(rank: usize, hosts: Vec<(String, u32)>) {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    PIPE.store(fds[1], Ordering::SeqCst);
    // SAFETY: installing a handler that only writes one byte to a pipe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    let read_fd = fds[0];
    let _ = HOSTS.set((rank, hosts));
    // Open MPI ends a process itself when it finds a peer gone in the middle
    // of a transfer; it exits through `exit`, so say why there too.
    // SAFETY: registering a plain `extern "C" fn()` to run at exit.
    unsafe { libc::atexit(at_exit) };
    let _ = std::thread::Builder::new().name("launcher watch".into()).spawn(move || {
        let mut b = [0u8; 1];
        loop {
            // SAFETY: reading one byte into a valid buffer.
            while unsafe { libc::read(read_fd, b.as_mut_ptr() as *mut c_void, 1) } != 1 {}
            // A rank reporting its own error finishes and exits by itself.
            if !QUIET.load(Ordering::SeqCst) {
                break;
            }
        }
        report_lost();
        // SAFETY: ends the process at once; MPI is not finalised (a peer is gone).
        unsafe { libc::_exit(1) }
    });
}

/// Where every rank runs, (this rank, [(host, pid)]), for [`report_lost`].
static HOSTS: std::sync::OnceLock<(usize, Vec<(String, u32)>)> = std::sync::OnceLock::new();
/// Set when MPI is finalised after a run that ended well.
static FINISHED: AtomicBool = AtomicBool::new(false);

extern "C" fn at_exit() {
    if !FINISHED.load(Ordering::SeqCst) && !QUIET.swap(true, Ordering::SeqCst) {
        report_lost();
    }
}

/// Says, once, that this rank stopped because another one ended, naming
/// the ranks on this host whose process is gone, and the step.
fn report_lost() {
    static SAID: AtomicBool = AtomicBool::new(false);
    if SAID.swap(true, Ordering::SeqCst) {
        return;
    }
    let Some((rank, hosts)) = HOSTS.get() else { return };
    let me = hosts.get(*rank).map(|h| h.0.clone()).unwrap_or_default();
    let gone: Vec<String> = hosts
        .iter()
        .enumerate()
        .filter(|(r, (h, pid))| {
            *r != *rank && *h == me && *pid > 0 && {
                // SAFETY: signal 0 only asks whether the process exists.
                unsafe { libc::kill(*pid as libc::pid_t, 0) != 0 && *libc::__errno_location() == libc::ESRCH }
            }
        })
        .map(|(r, (h, pid))| format!("rank {r} (process {pid} on {h})"))
        .collect();
    let step = super::CURRENT_STEP.load(Ordering::Relaxed);
    let at = if step == 0 { "before the first step".to_string() } else { format!("at step {step}") };
    let why =
        if gone.is_empty() { "another rank ended (the launcher's message names it)".to_string() } else { format!("{} ended unexpectedly", gone.join(", ")) };
    // Never panic here (this also runs at exit): a failed write is ignored.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "error[run::rank_lost]: rank {rank} stopped {at}: {why}, and the launcher ended the run\n  help: nothing was saved; see why that rank ended, then run again (--resume continues from a checkpoint)"
    );
}

impl Drop for Mpi {
    fn drop(&mut self) {
        FINISHED.store(true, Ordering::SeqCst);
    }
}
