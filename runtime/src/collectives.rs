//! Collectives over the transport: all-reduce, reduce-scatter, all-gather, broadcast.
//!
//! Input: every member of `group` calls the same function with the same `group`,
//! `tag` and lengths, each with its own data; `group` lists member ranks in ring
//! order. Output: the collective's result in each member's buffer, or the first
//! `TransportError` (which also fails the fabric, so no member hangs).
//! Invariants:
//! - chunk layout: `len` elements split into `n` contiguous chunks, the first
//!   `len % n` of them one element longer (the partitioner's `chunk_range`, so a
//!   collective's chunks are the pieces the compiler planned); member at position
//!   `i` of `group` owns chunk `i`;
//! - sums follow the ring: chunk `c` starts at the member after `c` and each next
//!   member adds its own part to the running sum it received, so the reduction order, and
//!   therefore every bit of the result, is the same on every run and every member;
//! - ring algorithms move about `2 (n-1)/n * len` elements per member, never `n * len`;
//! - the messages of ring step `k` carry sequence number `tag.seq + k` and kind
//!   `tag.name`, so a peer running a different instruction is reported at once;
//! - a ring step moves its chunk in segments of at most `SEGMENT` elements, each
//!   folded in (summed or copied) as it arrives, in order: the sums, and so the
//!   bits, do not depend on the segmenting;
//! - a group of one is a no-op (beyond copying into `out`);
//! - payloads travel in buffers from the endpoints' pools: a send fills one taken from
//!   the sender's pool, and a receive hands the buffer back to the receiver's pool once
//!   it is reduced or copied out, so after the first collective of a size the ring
//!   steps allocate nothing (`reduce_scatter` still copies its input once).

use shardplan_compiler::partition::chunk_range;

use crate::transport::{Header, Message, Transport, TransportError};

/// Identifies one collective instruction on the wire.
#[derive(Debug, Clone)]
pub struct Tag {
    /// Hash of the plan being run.
    pub plan: u64,
    /// Instruction id of the collective.
    pub instr: u32,
    /// First sequence number the collective's messages use.
    pub seq: u64,
    /// Kind named in errors, e.g. `all-reduce(data)`.
    pub name: String,
}

/// Sums `data` across `group`; every member ends with the same bits.
pub fn all_reduce(ep: &dyn Transport, group: &[usize], tag: &Tag, data: &mut [f32]) -> Result<(), TransportError> {
    let ring = Ring::new(ep, group, tag)?;
    if ring.n() == 1 {
        return Ok(());
    }
    ring.reduce_scatter(data, 0)?;
    ring.all_gather(data, ring.n() as u64 - 1)
}

/// Member `i` of `group` gets in `out` the sum over members of chunk `i` of `data`.
pub fn reduce_scatter(ep: &dyn Transport, group: &[usize], tag: &Tag, data: &[f32], out: &mut Vec<f32>) -> Result<(), TransportError> {
    let ring = Ring::new(ep, group, tag)?;
    let mut work = data.to_vec();
    if ring.n() > 1 {
        ring.reduce_scatter(&mut work, 0)?;
    }
    out.clear();
    out.extend_from_slice(&work[chunk_range(data.len(), ring.n(), ring.pos)]);
    Ok(())
}

/// Concatenates every member's chunk `mine` into `out` (`total_len` elements, layout as above).
pub fn all_gather(ep: &dyn Transport, group: &[usize], tag: &Tag, mine: &[f32], total_len: usize, out: &mut [f32]) -> Result<(), TransportError> {
    let ring = Ring::new(ep, group, tag)?;
    let own = chunk_range(total_len, ring.n(), ring.pos);
    if out.len() != total_len || mine.len() != own.len() {
        return Err(ring.malformed(format!(
            "all-gather of {total_len} elements needs an output of {total_len} and a chunk of {}, got {} and {}",
            own.len(),
            out.len(),
            mine.len()
        )));
    }
    out[own].copy_from_slice(mine);
    if ring.n() == 1 {
        return Ok(());
    }
    ring.all_gather(out, 0)
}

/// Copies `data` of the member with rank `root` to every member of `group`:
/// the root scatters one chunk to each member, then a ring all-gather.
pub fn broadcast(ep: &dyn Transport, group: &[usize], root: usize, tag: &Tag, data: &mut [f32]) -> Result<(), TransportError> {
    let ring = Ring::new(ep, group, tag)?;
    let n = ring.n();
    let Some(root_pos) = group.iter().position(|&r| r == root) else {
        return Err(ring.malformed(format!("broadcast root {root} is not in group {group:?}")));
    };
    if n == 1 {
        return Ok(());
    }
    let len = data.len();
    if ring.pos == root_pos {
        for (i, &member) in group.iter().enumerate().filter(|&(i, _)| i != root_pos) {
            let mut chunk = ep.take_buffer(ring.max_chunk(len));
            chunk.extend_from_slice(&data[chunk_range(len, n, i)]);
            ep.send(member, Message { header: ring.header(i as u64), data: chunk })?;
        }
    } else {
        let got = ep.recv(root, &ring.header(ring.pos as u64))?;
        let own = chunk_range(len, n, ring.pos);
        if got.len() != own.len() {
            return Err(ring.wrong_length(own.len(), got.len()));
        }
        data[own].copy_from_slice(&got);
        ep.give_back(got);
    }
    ring.all_gather(data, n as u64)
}

/// One member's view of a ring collective.
struct Ring<'a> {
    ep: &'a dyn Transport,
    group: &'a [usize],
    tag: &'a Tag,
    /// This member's position in `group`.
    pos: usize,
}

impl<'a> Ring<'a> {
    fn new(ep: &'a dyn Transport, group: &'a [usize], tag: &'a Tag) -> Result<Self, TransportError> {
        let malformed = |reason: String| TransportError::Malformed { device: ep.rank(), instr: tag.instr, reason };
        let Some(pos) = group.iter().position(|&r| r == ep.rank()) else {
            return Err(malformed(format!("{} called on a device outside its group {group:?}", tag.name)));
        };
        if group.iter().enumerate().any(|(i, r)| group[..i].contains(r)) {
            return Err(malformed(format!("{} group {group:?} names a device twice", tag.name)));
        }
        Ok(Ring { ep, group, tag, pos })
    }

    fn n(&self) -> usize {
        self.group.len()
    }

    /// The member `k` places after this one in the ring (`k` may be negative).
    fn member(&self, k: isize) -> usize {
        let n = self.n() as isize;
        self.group[(self.pos as isize + k).rem_euclid(n) as usize]
    }

    /// Chunk index `k` places after this member's own.
    fn chunk(&self, k: isize) -> usize {
        (self.pos as isize + k).rem_euclid(self.n() as isize) as usize
    }

    fn header(&self, step: u64) -> Header {
        Header { plan: self.tag.plan, instr: self.tag.instr, seq: self.tag.seq.wrapping_add(step), kind: self.tag.name.clone() }
    }

    fn malformed(&self, reason: String) -> TransportError {
        TransportError::Malformed { device: self.ep.rank(), instr: self.tag.instr, reason }
    }

    /// Length of the longest chunk of `len` elements (chunk 0); every payload buffer is taken
    /// with this capacity, so buffers passed around the ring fit any chunk of the collective.
    fn max_chunk(&self, len: usize) -> usize {
        chunk_range(len, self.n(), 0).len()
    }

    fn wrong_length(&self, expected: usize, got: usize) -> TransportError {
        let err = self.malformed(format!("{} expected {expected} elements but received {got}", self.tag.name));
        self.ep.abort(&err.to_string());
        err
    }

    /// Step `step` of the collective: sends chunk `send` of `buf` right and
    /// receives chunk `recv` from the left, folding it into `buf` with `fold`.
    /// A chunk travels in segments of at most [`SEGMENT`] elements (an empty
    /// chunk as one empty message), one segment sent ahead of the one being
    /// received, so a segment is folded in while it is still in cache and
    /// the next is on its way. Both neighbours cut a chunk the same way.
    fn exchange(&self, buf: &mut [f32], send: usize, recv: usize, step: u64, fold: fn(&mut [f32], &[f32])) -> Result<(), TransportError> {
        let (len, n) = (buf.len(), self.n());
        let sends = segments(chunk_range(len, n, send));
        let recvs = segments(chunk_range(len, n, recv));
        let capacity = SEGMENT.min(self.max_chunk(len));
        let mut sent = 0;
        for r in &recvs {
            if let Some(s) = sends.get(sent) {
                let mut data = self.ep.take_buffer(capacity);
                data.extend_from_slice(&buf[s.clone()]);
                self.ep.send(self.member(1), Message { header: self.header(step), data })?;
                sent += 1;
            }
            let got = self.ep.recv(self.member(-1), &self.header(step))?;
            if got.len() != r.len() {
                return Err(self.wrong_length(r.len(), got.len()));
            }
            fold(&mut buf[r.clone()], &got);
            self.ep.give_back(got);
        }
        for s in &sends[sent..] {
            let mut data = self.ep.take_buffer(capacity);
            data.extend_from_slice(&buf[s.clone()]);
            self.ep.send(self.member(1), Message { header: self.header(step), data })?;
        }
        Ok(())
    }

    /// Leaves in chunk `pos` of `buf` the sum of that chunk over the group (other chunks partial).
    fn reduce_scatter(&self, buf: &mut [f32], first_step: u64) -> Result<(), TransportError> {
        for s in 0..self.n() - 1 {
            let (send, recv) = (self.chunk(-(s as isize) - 1), self.chunk(-(s as isize) - 2));
            self.exchange(buf, send, recv, first_step + s as u64, |acc, got| acc.iter_mut().zip(got).for_each(|(a, &x)| *a += x))?;
        }
        Ok(())
    }

    /// Given chunk `pos` of `buf` complete on every member, fills in every other chunk.
    fn all_gather(&self, buf: &mut [f32], first_step: u64) -> Result<(), TransportError> {
        for s in 0..self.n() - 1 {
            let (send, recv) = (self.chunk(-(s as isize)), self.chunk(-(s as isize) - 1));
            self.exchange(buf, send, recv, first_step + s as u64, |dst, got| dst.copy_from_slice(got))?;
        }
        Ok(())
    }
}

/// Most elements one message of a ring step carries (1 MiB of f32).
pub const SEGMENT: usize = 1 << 18;

/// `r` cut into runs of at most [`SEGMENT`] elements; an empty range is one empty run.
fn segments(r: std::ops::Range<usize>) -> Vec<std::ops::Range<usize>> {
    if r.is_empty() {
        return vec![r];
    }
    (r.start..r.end).step_by(SEGMENT).map(|a| a..(a + SEGMENT).min(r.end)).collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::transport::{Endpoint, Fabric};

    const SIZES: [usize; 4] = [2, 3, 4, 8];
    const LENGTHS: [usize; 5] = [0, 1, 7, 1001, 4096 + 3];

    fn tag(name: &str) -> Tag {
        Tag { plan: 0x5eed, instr: 417, seq: 0, name: name.to_string() }
    }

    /// Input of device `rank`: distinct, non-integer values so rounding order matters.
    fn input(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((rank * 7919 + i * 104_729) % 1000) as f32 * 0.013 - 6.1 + 1.0 / (i + rank + 3) as f32).collect()
    }

    fn naive_sum(ranks: &[usize], len: usize) -> Vec<f64> {
        let mut sum = vec![0.0f64; len];
        for &r in ranks {
            for (acc, x) in sum.iter_mut().zip(input(r, len)) {
                *acc += f64::from(x);
            }
        }
        sum
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(g) - w).abs();
            assert!(err <= 1e-5 * w.abs().max(1.0), "{what}: element {i}: got {g}, want {w}");
        }
    }

    /// Runs `f` on one thread per device of an `n`-device fabric; results by rank.
    fn on_devices<T: Send>(n: usize, f: impl Fn(&Endpoint) -> Result<T, TransportError> + Sync) -> Vec<Result<T, TransportError>> {
        let eps = Fabric::new(n);
        std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = eps.into_iter().map(|ep| s.spawn(move || f(&ep))).collect();
            handles.into_iter().map(|h| h.join().expect("device thread does not panic")).collect()
        })
    }

    fn all_ok<T>(results: Vec<Result<T, TransportError>>) -> Vec<T> {
        results.into_iter().map(|r| r.expect("collective succeeds")).collect()
    }

    fn run_all_reduce(n: usize, group: &[usize], len: usize) -> Vec<Option<Vec<f32>>> {
        all_ok(on_devices(n, |ep| {
            if !group.contains(&ep.rank()) {
                return Ok(None);
            }
            let mut data = input(ep.rank(), len);
            all_reduce(ep, group, &tag("all-reduce(data)"), &mut data)?;
            Ok(Some(data))
        }))
    }

    #[test]
    fn collectives_all_reduce_matches_naive_sum() {
        for n in SIZES {
            let group: Vec<usize> = (0..n).collect();
            for len in LENGTHS {
                let want = naive_sum(&group, len);
                let results = run_all_reduce(n, &group, len);
                let first = results[0].clone().expect("member");
                for (rank, got) in results.into_iter().enumerate() {
                    let got = got.expect("member");
                    assert_close(&got, &want, &format!("all-reduce n={n} len={len} rank={rank}"));
                    // Every member holds the same bits, not merely close values.
                    assert!(got.iter().zip(&first).all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }

    #[test]
    fn collectives_all_reduce_is_bit_identical_across_runs() {
        for n in SIZES {
            let group: Vec<usize> = (0..n).collect();
            let bits = |r: Vec<Option<Vec<f32>>>| -> Vec<Vec<u32>> { r.into_iter().flatten().map(|v| v.iter().map(|x| x.to_bits()).collect()).collect() };
            let a = bits(run_all_reduce(n, &group, 4096 + 3));
            let b = bits(run_all_reduce(n, &group, 4096 + 3));
            assert_eq!(a, b, "n={n}");
        }
    }

    #[test]
    fn collectives_reduce_scatter_matches_naive_sum() {
        for n in SIZES {
            let group: Vec<usize> = (0..n).collect();
            for len in LENGTHS {
                let want = naive_sum(&group, len);
                let results = all_ok(on_devices(n, |ep| {
                    let mut out = vec![1.0; 3];
                    reduce_scatter(ep, &group, &tag("reduce-scatter(data)"), &input(ep.rank(), len), &mut out)?;
                    Ok(out)
                }));
                for (rank, got) in results.into_iter().enumerate() {
                    let want = &want[chunk_range(len, n, rank)];
                    assert_close(&got, want, &format!("reduce-scatter n={n} len={len} rank={rank}"));
                }
            }
        }
    }

    #[test]
    fn collectives_all_gather_concatenates_chunks() {
        for n in SIZES {
            let group: Vec<usize> = (0..n).collect();
            for len in LENGTHS {
                let full = input(99, len);
                let results = all_ok(on_devices(n, |ep| {
                    let mine = &full[chunk_range(len, n, ep.rank())];
                    let mut out = vec![f32::NAN; len];
                    all_gather(ep, &group, &tag("all-gather(data)"), mine, len, &mut out)?;
                    Ok(out)
                }));
                for got in results {
                    assert_eq!(got, full, "all-gather n={n} len={len}");
                }
            }
        }
    }

    #[test]
    fn collectives_broadcast_from_zero_and_nonzero_root() {
        for n in SIZES {
            let group: Vec<usize> = (0..n).collect();
            for root in [0, n - 1] {
                for len in LENGTHS {
                    let results = all_ok(on_devices(n, |ep| {
                        let mut data = input(ep.rank(), len);
                        broadcast(ep, &group, root, &tag("broadcast(data)"), &mut data)?;
                        Ok(data)
                    }));
                    for got in results {
                        assert_eq!(got, input(root, len), "broadcast n={n} root={root} len={len}");
                    }
                }
            }
        }
    }

    #[test]
    fn collectives_sub_group_runs_while_others_idle() {
        let group = [3, 1];
        for len in LENGTHS {
            let want = naive_sum(&group, len);
            let results = run_all_reduce(4, &group, len);
            assert!(results[0].is_none() && results[2].is_none());
            for rank in group {
                let got = results[rank].clone().expect("member");
                assert_close(&got, &want, &format!("sub-group len={len} rank={rank}"));
            }
        }
        // Broadcast within the sub-group from its non-first member.
        let results = all_ok(on_devices(4, |ep| {
            if !group.contains(&ep.rank()) {
                return Ok(None);
            }
            let mut data = input(ep.rank(), 9);
            broadcast(ep, &group, 1, &tag("broadcast(data)"), &mut data)?;
            Ok(Some(data))
        }));
        assert_eq!(results[3], Some(input(1, 9)));
    }

    #[test]
    fn collectives_group_of_one_is_a_no_op() {
        let eps = Fabric::new(1);
        let mut data = input(0, 5);
        all_reduce(&eps[0], &[0], &tag("all-reduce(data)"), &mut data).expect("no-op");
        assert_eq!(data, input(0, 5));
        let mut out = Vec::new();
        reduce_scatter(&eps[0], &[0], &tag("reduce-scatter(data)"), &data, &mut out).expect("no-op");
        assert_eq!(out, data);
    }

    #[test]
    fn collectives_mismatched_kind_is_reported() {
        let results = on_devices(2, |ep| {
            if ep.rank() == 0 {
                let header = Header { plan: 0x5eed, instr: 417, seq: 0, kind: "send(pipe)".to_string() };
                ep.send(1, Message { header, data: vec![1.0] })?;
                // Takes device 1's first all-reduce message as that message, so
                // device 0 neither reports a mismatch of its own (which could
                // race with device 1's) nor leaves before device 1 has sent.
                let t = tag("all-reduce(model)");
                let first = Header { plan: t.plan, instr: t.instr, seq: t.seq, kind: t.name };
                ep.recv(1, &first).map(|_| ())
            } else {
                let mut data = vec![2.0];
                all_reduce(ep, &[0, 1], &tag("all-reduce(model)"), &mut data)
            }
        });
        match &results[1] {
            Err(err @ TransportError::Mismatch { .. }) => {
                assert_eq!(err.to_string(), "device 1 at instruction 417 expected all-reduce(model) but received send(pipe)")
            }
            other => panic!("expected a mismatch on device 1, got {other:?}"),
        }
        // Device 0 either took the message before device 1 failed, or saw the fabric failed by it.
        assert!(matches!(results[0], Ok(()) | Err(TransportError::Aborted { device: 0, by: 1, .. })), "{:?}", results[0]);
    }

    #[test]
    fn collectives_abort_stops_every_device_quickly() {
        let group = [0, 1, 2, 3];
        let start = Instant::now();
        let results = on_devices(4, |ep| {
            if ep.rank() == 2 {
                ep.abort("injected fault");
                return Ok(Duration::ZERO);
            }
            let mut data = input(ep.rank(), 1001);
            all_reduce(ep, &group, &tag("all-reduce(data)"), &mut data)?;
            Ok(start.elapsed())
        });
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        for (rank, result) in results.into_iter().enumerate() {
            match result {
                Ok(_) if rank == 2 => {}
                Err(TransportError::Aborted { device, by: 2, reason }) => {
                    assert_eq!((device, reason.as_str()), (rank, "injected fault"));
                }
                other => panic!("device {rank}: expected Aborted by device 2, got {other:?}"),
            }
        }
    }

    #[test]
    fn collectives_reject_outsiders_and_bad_lengths() {
        let eps = Fabric::new(3);
        let mut data = vec![0.0; 4];
        let err = all_reduce(&eps[2], &[0, 1], &tag("all-reduce(data)"), &mut data).expect_err("outsider");
        assert!(matches!(err, TransportError::Malformed { device: 2, instr: 417, .. }), "{err:?}");
        let mut out = vec![0.0; 4];
        let err = all_gather(&eps[0], &[0, 1], &tag("all-gather(data)"), &[1.0], 4, &mut out).expect_err("length");
        assert!(matches!(err, TransportError::Malformed { device: 0, .. }), "{err:?}");
    }

    #[test]
    fn collectives_steady_state_takes_every_payload_buffer_from_the_pool() {
        // Odd lengths, so chunks differ in length and buffers of either length circulate.
        for n in SIZES {
            let group: Vec<usize> = (0..n).collect();
            for len in [1001, 4096 + 3] {
                let want = naive_sum(&group, len);
                let results = all_ok(on_devices(n, |ep| {
                    let mut warm = input(ep.rank(), len);
                    all_reduce(ep, &group, &tag("all-reduce(data)"), &mut warm)?;
                    let after_warm_up = ep.buffers_allocated();
                    let mut steady = Vec::new();
                    for instr in 0..3 {
                        let mut data = input(ep.rank(), len);
                        all_reduce(ep, &group, &Tag { instr: 500 + instr, ..tag("all-reduce(data)") }, &mut data)?;
                        let mut chunk = vec![0.0; chunk_range(len, n, ep.rank()).len()];
                        reduce_scatter(ep, &group, &Tag { instr: 600 + instr, ..tag("reduce-scatter(data)") }, &data, &mut chunk)?;
                        let mut gathered = vec![0.0; len];
                        all_gather(ep, &group, &Tag { instr: 700 + instr, ..tag("all-gather(data)") }, &chunk, len, &mut gathered)?;
                        steady.push(data.iter().map(|x| x.to_bits()).collect::<Vec<u32>>());
                    }
                    let (after_all, pool_len) = (ep.buffers_allocated(), ep.pool_len());
                    // The root of a broadcast sends n - 1 chunks and receives none, so it may allocate;
                    // its result is still bit for bit the root's data.
                    let mut data = warm.clone();
                    broadcast(ep, &group, n - 1, &Tag { instr: 800, ..tag("broadcast(data)") }, &mut data)?;
                    steady.push(data.iter().map(|x| x.to_bits()).collect());
                    Ok((warm, after_warm_up, after_all, pool_len, steady))
                }));
                let first_bits: Vec<u32> = results[0].0.iter().map(|x| x.to_bits()).collect();
                for (rank, (warm, after_warm_up, after_all, pool_len, steady)) in results.into_iter().enumerate() {
                    let what = format!("n={n} len={len} rank={rank}");
                    assert_close(&warm, &want, &what);
                    // The warm-up needs one buffer per device; everything after reuses it.
                    assert_eq!(after_warm_up, 1, "{what}: buffers allocated by the warm-up");
                    assert_eq!(after_all, after_warm_up, "{what}: buffers allocated after the warm-up");
                    assert!((1..=crate::transport::POOL_CAP).contains(&pool_len), "{what}: pool holds {pool_len}");
                    // Recycled buffers change no bit of any result.
                    for bits in steady {
                        assert_eq!(bits, first_bits, "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn collectives_uneven_chunks_put_extra_elements_first() {
        let sizes: Vec<usize> = (0..4).map(|i| chunk_range(10, 4, i).len()).collect();
        assert_eq!(sizes, [3, 3, 2, 2]);
        assert_eq!(chunk_range(10, 4, 3), 8..10);
    }
}
