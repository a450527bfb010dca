//! All-reduce bus bandwidth between processes over MPI: shardplan's ring
//! over MPI point-to-point (what a run uses) beside Open MPI's own
//! `MPI_Allreduce`, and one-thread memcpy bandwidth measured in the same run.
//!
//! Usage (built with the `mpi` feature):
//! `mpirun -np N target/release/examples/allreduce_mpi [--iters N] [--max-mib N]`
//!
//! For each size (1, 4, 16, 64 and 256 MiB of f32 per process, up to
//! `--max-mib`), every process runs one warm-up and `--iters` timed
//! all-reduces of each kind, all starting together after a barrier; an
//! iteration takes as long as its slowest process and the table reports
//! the median. algbw and busbw are as nccl-tests defines them (busbw =
//! algbw × 2(n−1)/n). Process `r` starts with every element equal to r + 1;
//! after the warm-ups every element must equal n(n+1)/2 in both kinds, or
//! the program exits non-zero. Rank 0 prints the table.

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use shardplan_runtime::collectives::{all_reduce, Tag};
use shardplan_runtime::process::{self, mpi::Mpi};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const SIZES_MIB: [usize; 5] = [1, 4, 16, 64, 256];

fn main() -> ExitCode {
    let mut iters = 5usize;
    let mut max_mib = 256usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().and_then(|v| v.parse().ok());
        match (a.as_str(), v) {
            ("--iters", Some(v)) if v > 0 => iters = v,
            ("--max-mib", Some(v)) => max_mib = v,
            _ => {
                eprintln!("usage: mpirun -np N allreduce_mpi [--iters N] [--max-mib N]");
                return ExitCode::from(2);
            }
        }
    }
    let local = process::detect().map(|l| l.local_rank).unwrap_or(0);
    let world = match Mpi::init(local) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("allreduce_mpi: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (me, n) = (world.rank(), world.size());
    if n < 2 {
        eprintln!("allreduce_mpi: run it on at least 2 processes (mpirun -np 2 …)");
        return ExitCode::from(2);
    }
    let share = world.share(Duration::from_secs(60));
    let comm = SimpleCommunicator::world();
    let group: Vec<usize> = (0..n).collect();
    let expected = (n * (n + 1) / 2) as f32;
    let bus = 2.0 * (n - 1) as f64 / n as f64;
    if me == 0 {
        println!("all-reduce of f32 over {n} processes (MPI); {iters} timed iterations after 1 warm-up, medians of the slowest process");
        println!("ring: shardplan's ring over MPI point-to-point; MPI: MPI_Allreduce; busbw = algbw * {bus:.3}; GB/s = 10^9 B/s");
        println!();
        println!("{:>8}  {:>12}  {:>12}  {:>11}  {:>11}  {:>11}", "size", "ring busbw", "MPI busbw", "memcpy GB/s", "ring/memcpy", "MPI/memcpy");
    }
    let mut instr = 0u32;
    for mib in SIZES_MIB.into_iter().filter(|&m| m <= max_mib) {
        let len = (mib << 20) / 4;
        let mut data = vec![0f32; len];
        let mut out = vec![0f32; len];
        let (mut ring, mut native) = (Vec::new(), Vec::new());
        for it in 0..=iters {
            data.fill((me + 1) as f32);
            comm.barrier();
            let tag = Tag { plan: 0xa11_5ed0, instr, seq: 0, name: "all-reduce(bench)".into() };
            instr += 1;
            let t = Instant::now();
            if let Err(e) = all_reduce(share.transport.as_ref(), &group, &tag, &mut data) {
                eprintln!("allreduce_mpi: rank {me}: {e}");
                world.exit(1);
            }
            let ring_s = t.elapsed().as_secs_f64();
            data.fill((me + 1) as f32);
            comm.barrier();
            let t = Instant::now();
            comm.all_reduce_into(&data[..], &mut out[..], SystemOperation::sum());
            let native_s = t.elapsed().as_secs_f64();
            if it == 0 {
                data.fill((me + 1) as f32);
                let _ = all_reduce(share.transport.as_ref(), &group, &Tag { plan: 0xa11_5ed0, instr, seq: 0, name: "all-reduce(check)".into() }, &mut data);
                instr += 1;
                if let Some(i) = data.iter().chain(&out).position(|&x| x != expected) {
                    eprintln!("allreduce_mpi: rank {me}: element {i} of the {mib} MiB all-reduce is wrong (expected {expected})");
                    world.exit(1);
                }
            } else {
                ring.push(slowest(&share, ring_s));
                native.push(slowest(&share, native_s));
            }
        }
        let copy = memcpy_secs(len, iters);
        if me == 0 {
            let bytes = (mib << 20) as f64;
            let (r, m, c) = (bytes / median(ring) / 1e9 * bus, bytes / median(native) / 1e9 * bus, bytes / copy / 1e9);
            println!("{mib:>4} MiB  {r:>12.2}  {m:>12.2}  {c:>11.2}  {:>11.2}  {:>11.2}", r / c, m / c);
        }
    }
    if me == 0 {
        println!();
        println!("every size checked: after the warm-ups every element of every process equals n(n+1)/2 = {expected} in both kinds");
    }
    ExitCode::SUCCESS
}

/// The longest of every process's `secs`.
fn slowest(share: &shardplan_runtime::cluster::Rank, secs: f64) -> f64 {
    share.peers.all_gather(secs.to_le_bytes().to_vec()).iter().filter_map(|b| b.as_slice().try_into().ok().map(f64::from_le_bytes)).fold(0.0, f64::max)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of one thread copying `len` floats.
fn memcpy_secs(len: usize, iters: usize) -> f64 {
    let src = vec![1.0f32; len];
    let mut dst = vec![0.0f32; len];
    dst.copy_from_slice(&src);
    let times = (0..iters)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(times)
}
