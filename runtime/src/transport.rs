//! Point-to-point transport between the CPU devices of one run.
//!
//! Input: `Fabric::new(n)` (or `Fabric::with_timeout`) builds one `Endpoint` per
//! device; each worker thread owns its endpoint and exchanges `Message`s (a
//! `Header` plus `f32` payload) with the others.
//! Output: payloads delivered in order, or one `TransportError` that says which
//! device failed and why.
//! Invariants:
//! - messages between one (sender, receiver) pair arrive in the order sent;
//! - every receive names the header it expects (plan hash, instruction, sequence
//!   number, kind), so a device that runs a different instruction than its peer
//!   is reported at the first message, not later as wrong numbers;
//! - the first failure on any device (its own `abort`, a mismatch, a timeout, a
//!   vanished peer) marks the whole fabric failed, and every blocked or later
//!   `send`/`recv` on every endpoint returns `Aborted` naming that device within
//!   one poll interval, so no device waits forever on a dead peer.
//!
//! Payload buffers are recycled: `take_buffer` hands out a spare `Vec` from the
//! endpoint's pool (at most `POOL_CAP` of them), and a receiver that has copied a
//! payload out hands it back with `give_back`. In a ring every device sends and
//! receives equally often, so after the first collective of a size the pools hold
//! enough buffers and steady-state collectives allocate nothing (a freshly
//! allocated buffer's pages would otherwise be faulted in and zeroed every step).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a blocked receive wakes to look at the abort flag.
const POLL: Duration = Duration::from_millis(50);

/// How long a receive waits for a live peer before giving up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Most spare payload buffers one endpoint keeps; a ring step needs one.
pub const POOL_CAP: usize = 4;

/// What a message claims to be; compared field by field with what the receiver expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Hash of the compiled plan both devices run.
    pub plan: u64,
    /// Instruction id within the plan.
    pub instr: u32,
    /// Sequence number of this message within the instruction.
    pub seq: u64,
    /// What the instruction is, e.g. `all-reduce(model)` or `send(pipe)`.
    pub kind: String,
}

/// One transfer: header plus payload.
#[derive(Debug, Clone)]
pub struct Message {
    pub header: Header,
    pub data: Vec<f32>,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum TransportError {
    #[error("device {device} at instruction {instr} expected {expected} but received {got}")]
    Mismatch { device: usize, instr: u32, expected: String, got: String },
    #[error("device {device} stopped because device {by} failed: {reason}")]
    Aborted { device: usize, by: usize, reason: String },
    #[error("device {device} waited {secs:.1} s at instruction {instr} for device {from}")]
    Timeout { device: usize, from: usize, instr: u32, secs: f64 },
    #[error("device {device} lost its connection to device {peer}")]
    Closed { device: usize, peer: usize },
    #[error("device {device} named device {peer}, but the fabric has {size} devices")]
    BadPeer { device: usize, peer: usize, size: usize },
    #[error("device {device} at instruction {instr}: {reason}")]
    Malformed { device: usize, instr: u32, reason: String },
}

impl TransportError {
    /// The device that reports the error.
    pub fn device(&self) -> usize {
        match self {
            TransportError::Mismatch { device, .. }
            | TransportError::Aborted { device, .. }
            | TransportError::Timeout { device, .. }
            | TransportError::Closed { device, .. }
            | TransportError::BadPeer { device, .. }
            | TransportError::Malformed { device, .. } => *device,
        }
    }
}

/// How a device's bytes reach the other devices of a run: the in-process
/// fabric between threads ([`Endpoint`]) or MPI between processes
/// (`transport::mpi`, with the `mpi` feature). The executor, the schedule,
/// the collectives and the header checks are shared; only how bytes move
/// differs.
///
/// Every implementation keeps the invariants of this module: per-pair
/// order, a receive that names the header it expects, and a failure on any
/// device that every other device sees at its next send or receive.
pub trait Transport {
    /// This device's rank: its index among the run's devices.
    fn rank(&self) -> usize;
    /// How many devices the run has.
    fn size(&self) -> usize;
    /// Sends `msg` to device `to` without waiting for it to be received.
    fn send(&self, to: usize, msg: Message) -> Result<(), TransportError>;
    /// The payload of the next message from `from`, which must carry `expect`.
    fn recv(&self, from: usize, expect: &Header) -> Result<Vec<f32>, TransportError>;
    /// Fails the whole run because of this device, with `reason`.
    fn abort(&self, reason: &str);
    /// A spare payload buffer of at least `capacity` elements (empty).
    fn take_buffer(&self, capacity: usize) -> Vec<f32> {
        Vec::with_capacity(capacity)
    }
    /// Hands a received payload's buffer back for reuse.
    fn give_back(&self, buf: Vec<f32>) {
        drop(buf);
    }
}

/// State every endpoint of one fabric shares: whether, and by whom, it was failed.
#[derive(Default)]
struct Shared {
    failed: AtomicBool,
    /// The first failure: (device, reason). Later failures are consequences of it.
    cause: Mutex<Option<(usize, String)>>,
}

/// Builds the endpoints of one fabric.
pub struct Fabric;

impl Fabric {
    /// `n` connected endpoints with the default receive timeout.
    // A fabric exists only as its endpoints, each owned by one device thread.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(n: usize) -> Vec<Endpoint> {
        Self::with_timeout(n, DEFAULT_TIMEOUT)
    }

    /// `n` connected endpoints whose receives give up after `timeout`.
    pub fn with_timeout(n: usize, timeout: Duration) -> Vec<Endpoint> {
        let shared = Arc::new(Shared::default());
        // senders[from][to] and receivers[to][from]: one FIFO channel per ordered pair.
        let mut senders: Vec<Vec<Sender<Message>>> = (0..n).map(|_| Vec::with_capacity(n)).collect();
        let mut receivers: Vec<Vec<Receiver<Message>>> = (0..n).map(|_| Vec::with_capacity(n)).collect();
        for row in senders.iter_mut() {
            for inbox in receivers.iter_mut() {
                let (tx, rx) = mpsc::channel();
                row.push(tx);
                inbox.push(rx);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| Endpoint { rank, to, from, shared: Arc::clone(&shared), timeout, pool: Mutex::default() })
            .collect()
    }
}

/// One device's connection to every other device of its fabric.
pub struct Endpoint {
    rank: usize,
    /// `to[d]` carries messages from this device to device `d`.
    to: Vec<Sender<Message>>,
    /// `from[d]` carries messages from device `d` to this device.
    from: Vec<Receiver<Message>>,
    shared: Arc<Shared>,
    timeout: Duration,
    /// Spare payload buffers. Only this endpoint's thread touches it, so the lock is never
    /// contended; a `Mutex` rather than a `RefCell` keeps `Endpoint` `Sync`.
    pool: Mutex<Pool>,
}

/// Spare payload buffers of one endpoint, and how often `take_buffer` found none that fitted.
#[derive(Default)]
struct Pool {
    spare: Vec<Vec<f32>>,
    allocated: u64,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint").field("rank", &self.rank).field("size", &self.size()).finish()
    }
}

impl Transport for Endpoint {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn send(&self, to: usize, msg: Message) -> Result<(), TransportError> {
        Endpoint::send(self, to, msg)
    }

    fn recv(&self, from: usize, expect: &Header) -> Result<Vec<f32>, TransportError> {
        Endpoint::recv(self, from, expect)
    }

    fn abort(&self, reason: &str) {
        Endpoint::abort(self, reason)
    }

    fn take_buffer(&self, capacity: usize) -> Vec<f32> {
        Endpoint::take_buffer(self, capacity)
    }

    fn give_back(&self, buf: Vec<f32>) {
        Endpoint::give_back(self, buf)
    }
}

impl Endpoint {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.to.len()
    }

    pub fn send(&self, to: usize, msg: Message) -> Result<(), TransportError> {
        self.check_aborted()?;
        let tx = self.to.get(to).ok_or(TransportError::BadPeer { device: self.rank, peer: to, size: self.size() })?;
        if tx.send(msg).is_err() {
            return Err(self.fail(TransportError::Closed { device: self.rank, peer: to }));
        }
        Ok(())
    }

    /// Receives the next message from `from`, which must match `expect` (plan, instr, seq, kind) — else Mismatch.
    pub fn recv(&self, from: usize, expect: &Header) -> Result<Vec<f32>, TransportError> {
        let rx = self.from.get(from).ok_or(TransportError::BadPeer { device: self.rank, peer: from, size: self.size() })?;
        let start = Instant::now();
        loop {
            self.check_aborted()?;
            let left = self.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(self.fail(TransportError::Timeout { device: self.rank, from, instr: expect.instr, secs: start.elapsed().as_secs_f64() }));
            }
            match rx.recv_timeout(left.min(POLL)) {
                Ok(msg) if msg.header == *expect => return Ok(msg.data),
                Ok(msg) => {
                    let (expected, got) = describe(expect, &msg.header);
                    return Err(self.fail(TransportError::Mismatch { device: self.rank, instr: expect.instr, expected, got }));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // A peer that failed first has usually aborted already; report that cause.
                    self.check_aborted()?;
                    return Err(self.fail(TransportError::Closed { device: self.rank, peer: from }));
                }
            }
        }
    }

    /// An empty buffer with room for at least `capacity` elements, for a message payload:
    /// the smallest spare one that fits, else a spare one grown (or a new one) to exactly
    /// `capacity`. Hand it back with `give_back` once its contents are no longer needed.
    pub fn take_buffer(&self, capacity: usize) -> Vec<f32> {
        let mut pool = self.pool();
        let fits = pool.spare.iter().enumerate().filter(|(_, b)| b.capacity() >= capacity).min_by_key(|(_, b)| b.capacity()).map(|(i, _)| i);
        let mut buf = match fits {
            Some(i) => pool.spare.swap_remove(i),
            None => {
                pool.allocated += 1;
                // Grow the largest spare rather than keep a buffer that is too small.
                let largest = pool.spare.iter().enumerate().max_by_key(|(_, b)| b.capacity()).map(|(i, _)| i);
                largest.map_or_else(Vec::new, |i| pool.spare.swap_remove(i))
            }
        };
        buf.clear();
        buf.reserve_exact(capacity);
        buf
    }

    /// Returns a payload buffer (typically one `recv` delivered) to this endpoint's pool.
    /// A full pool keeps its largest buffers; one without capacity is dropped.
    pub fn give_back(&self, buf: Vec<f32>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut pool = self.pool();
        if pool.spare.len() < POOL_CAP {
            pool.spare.push(buf);
        } else if let Some(smallest) = pool.spare.iter_mut().min_by_key(|b| b.capacity()) {
            if smallest.capacity() < buf.capacity() {
                *smallest = buf;
            }
        }
    }

    /// How many spare payload buffers the pool holds now.
    pub fn pool_len(&self) -> usize {
        self.pool().spare.len()
    }

    /// How many times `take_buffer` found no spare buffer large enough and allocated (or grew
    /// one) since the endpoint was built; constant across steady-state collectives.
    pub fn buffers_allocated(&self) -> u64 {
        self.pool().allocated
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        // The pool holds no invariant a panic could break: a poisoned lock is still usable.
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the whole fabric failed (this device's error); every blocked or later recv/send on any endpoint returns Aborted within ~100 ms.
    pub fn abort(&self, reason: &str) {
        self.record(reason.to_string());
    }

    /// Records the first failure of the fabric; later ones keep the original cause.
    fn record(&self, reason: String) {
        let mut cause = self.shared.cause.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if cause.is_none() {
            *cause = Some((self.rank, reason));
        }
        self.shared.failed.store(true, Ordering::Release);
    }

    /// Fails the fabric with `err` so peers stop too, and hands `err` back to this device.
    fn fail(&self, err: TransportError) -> TransportError {
        self.record(err.to_string());
        err
    }

    fn check_aborted(&self) -> Result<(), TransportError> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let cause = self.shared.cause.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (by, reason) = cause.clone().unwrap_or((self.rank, "unknown failure".to_string()));
        Err(TransportError::Aborted { device: self.rank, by, reason })
    }
}

/// Names the expected and received headers by the first field that differs, kind first.
/// A header and its payload's length as bytes, for transports between processes.
pub fn encode_header(h: &Header, len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + h.kind.len());
    b.extend_from_slice(&h.plan.to_le_bytes());
    b.extend_from_slice(&h.instr.to_le_bytes());
    b.extend_from_slice(&h.seq.to_le_bytes());
    b.extend_from_slice(&(len as u64).to_le_bytes());
    b.extend_from_slice(h.kind.as_bytes());
    b
}

/// The header and payload length [`encode_header`] wrote; None for other bytes.
pub fn decode_header(b: &[u8]) -> Option<(Header, usize)> {
    if b.len() < 28 {
        return None;
    }
    let u64_at = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
    let plan = u64_at(0)?;
    let instr = u32::from_le_bytes(b[8..12].try_into().ok()?);
    let seq = u64_at(12)?;
    let len = usize::try_from(u64_at(20)?).ok()?;
    let kind = String::from_utf8_lossy(&b[28..]).into_owned();
    Some((Header { plan, instr, seq, kind }, len))
}

/// The expected and received headers, told apart by their first difference.
pub(crate) fn describe(expect: &Header, got: &Header) -> (String, String) {
    if expect.kind != got.kind {
        (expect.kind.clone(), got.kind.clone())
    } else if expect.plan != got.plan {
        (format!("{} of plan {:016x}", expect.kind, expect.plan), format!("{} of plan {:016x}", got.kind, got.plan))
    } else if expect.instr != got.instr {
        (format!("{} of instruction {}", expect.kind, expect.instr), format!("{} of instruction {}", got.kind, got.instr))
    } else {
        (format!("{} message #{}", expect.kind, expect.seq), format!("{} message #{}", got.kind, got.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_cross_processes_intact() {
        let h = Header { plan: u64::MAX - 3, instr: 417, seq: 1 << 40, kind: "all-reduce(data)".into() };
        let b = encode_header(&h, 12345);
        assert_eq!(decode_header(&b), Some((h, 12345)));
        assert_eq!(decode_header(&b[..27]), None);
    }

    fn header(instr: u32, seq: u64, kind: &str) -> Header {
        Header { plan: 7, instr, seq, kind: kind.to_string() }
    }

    #[test]
    fn transport_delivers_in_order_per_pair() {
        let eps = Fabric::new(2);
        let results: Vec<Result<Vec<Vec<f32>>, TransportError>> = std::thread::scope(|s| {
            let handles: Vec<_> = eps
                .into_iter()
                .map(|ep| {
                    s.spawn(move || {
                        let peer = 1 - ep.rank();
                        for seq in 0..3 {
                            let data = vec![ep.rank() as f32, seq as f32];
                            ep.send(peer, Message { header: header(1, seq, "send(pipe)"), data })?;
                        }
                        (0..3).map(|seq| ep.recv(peer, &header(1, seq, "send(pipe)"))).collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("device thread does not panic")).collect()
        });
        for (rank, got) in results.into_iter().enumerate() {
            let got = got.expect("exchange succeeds");
            let peer = (1 - rank) as f32;
            assert_eq!(got, vec![vec![peer, 0.0], vec![peer, 1.0], vec![peer, 2.0]]);
        }
    }

    #[test]
    fn transport_mismatch_names_both_kinds() {
        let eps = Fabric::new(2);
        let msg = Message { header: header(417, 0, "send(pipe)"), data: vec![] };
        eps[0].send(1, msg).expect("send succeeds");
        let err = eps[1].recv(0, &header(417, 0, "all-reduce(model)")).expect_err("mismatch");
        assert_eq!(err.to_string(), "device 1 at instruction 417 expected all-reduce(model) but received send(pipe)");
        // The mismatch failed the fabric: the other device stops too, naming device 1.
        match eps[0].recv(1, &header(418, 0, "send(pipe)")) {
            Err(TransportError::Aborted { device: 0, by: 1, .. }) => {}
            other => panic!("expected Aborted by device 1, got {other:?}"),
        }
    }

    #[test]
    fn transport_mismatch_on_sequence_number() {
        let eps = Fabric::new(2);
        let msg = Message { header: header(3, 1, "send(pipe)"), data: vec![] };
        eps[0].send(1, msg).expect("send succeeds");
        let err = eps[1].recv(0, &header(3, 0, "send(pipe)")).expect_err("mismatch");
        assert!(err.to_string().contains("expected send(pipe) message #0 but received send(pipe) message #1"), "{err}");
    }

    #[test]
    fn transport_times_out_on_silent_peer() {
        let eps = Fabric::with_timeout(2, Duration::from_millis(200));
        let start = Instant::now();
        let err = eps[0].recv(1, &header(5, 0, "send(pipe)")).expect_err("timeout");
        assert!(matches!(err, TransportError::Timeout { device: 0, from: 1, instr: 5, .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn transport_abort_wakes_blocked_receiver() {
        let mut eps = Fabric::new(3);
        let first = eps.remove(0);
        let start = Instant::now();
        let err = std::thread::scope(|s| {
            let waiter = s.spawn(move || first.recv(1, &header(1, 0, "send(pipe)")));
            std::thread::sleep(Duration::from_millis(100));
            eps[1].abort("injected fault");
            waiter.join()
        });
        match err {
            Ok(Err(TransportError::Aborted { device: 0, by: 2, reason })) => {
                assert_eq!(reason, "injected fault")
            }
            other => panic!("expected Aborted by device 2, got {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(matches!(eps[0].send(0, Message { header: header(1, 0, "send(pipe)"), data: vec![] }), Err(TransportError::Aborted { device: 1, by: 2, .. })));
    }

    #[test]
    fn transport_pool_reuses_returned_buffers() {
        let eps = Fabric::new(2);
        let ep = &eps[0];
        assert_eq!((ep.pool_len(), ep.buffers_allocated()), (0, 0));
        let mut buf = ep.take_buffer(100);
        assert!(buf.is_empty() && buf.capacity() >= 100);
        assert_eq!(ep.buffers_allocated(), 1);
        buf.extend_from_slice(&[1.0; 100]);
        let addr = buf.as_ptr();
        ep.give_back(buf);
        assert_eq!(ep.pool_len(), 1);
        // A smaller request reuses the spare buffer, cleared.
        let again = ep.take_buffer(60);
        assert!(again.is_empty());
        assert_eq!((again.as_ptr(), ep.buffers_allocated(), ep.pool_len()), (addr, 1, 0));
        ep.give_back(again);
        // A larger one grows the spare buffer and counts as an allocation.
        let big = ep.take_buffer(1000);
        assert!(big.capacity() >= 1000);
        assert_eq!((ep.buffers_allocated(), ep.pool_len()), (2, 0));
        ep.give_back(big);
        // A buffer received from a peer lands in the receiver's pool.
        let mut payload = eps[1].take_buffer(3);
        payload.extend_from_slice(&[1.0, 2.0, 3.0]);
        eps[1].send(0, Message { header: header(1, 0, "send(pipe)"), data: payload }).expect("send succeeds");
        let got = ep.recv(1, &header(1, 0, "send(pipe)")).expect("recv succeeds");
        assert_eq!(got, [1.0, 2.0, 3.0]);
        ep.give_back(got);
        assert_eq!((ep.pool_len(), eps[1].pool_len()), (2, 0));
    }

    #[test]
    fn transport_pool_is_bounded_and_keeps_the_largest() {
        let eps = Fabric::new(1);
        let ep = &eps[0];
        for cap in 1..=POOL_CAP + 3 {
            ep.give_back(Vec::with_capacity(cap * 10));
        }
        ep.give_back(Vec::new());
        assert_eq!(ep.pool_len(), POOL_CAP);
        // The smallest buffers were dropped: every request up to the largest is served from the pool.
        let taken: Vec<Vec<f32>> = (0..POOL_CAP).map(|_| ep.take_buffer(40)).collect();
        assert_eq!(ep.buffers_allocated(), 0);
        assert!(taken.iter().all(|b| b.capacity() >= 40));
        assert_eq!(ep.pool_len(), 0);
    }

    #[test]
    fn transport_rejects_unknown_peer() {
        let eps = Fabric::new(2);
        let msg = Message { header: header(1, 0, "send(pipe)"), data: vec![] };
        assert!(matches!(eps[0].send(5, msg), Err(TransportError::BadPeer { peer: 5, size: 2, .. })));
    }
}
