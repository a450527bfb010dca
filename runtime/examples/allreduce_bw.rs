//! All-reduce bus bandwidth of the CPU fabric, beside memcpy bandwidth measured in the same run.
//!
//! Usage: `cargo run --release -p shardplan-runtime --example allreduce_bw -- [--devices N] [--iters N] [--max-mib N]`
//!
//! For each size (1, 4, 16, 64 and 256 MiB of f32 per device, up to `--max-mib`) one thread per
//! device runs one warm-up all-reduce and `--iters` timed ones over a fresh fabric, every
//! iteration starting together at a barrier. An iteration takes as long as its slowest device;
//! the table reports the median over the timed iterations. As in nccl-tests, algbw is
//! bytes / time and busbw is algbw × 2(n−1)/n, the rate at which each device moves data in a
//! ring all-reduce, so it can be set beside a link's (here: memory's) bandwidth. memcpy is one
//! thread copying a buffer of the same size with `copy_from_slice`, quoted as bytes copied /
//! time (median over as many copies after one warm-up). GB/s means 10^9 bytes per second.
//!
//! Device `d` starts with every element equal to `d + 1`, so after the warm-up all-reduce every
//! element must equal n(n+1)/2 exactly; the program exits non-zero if one does not. The endpoints
//! recycle payload buffers; the last line counts the buffers the timed iterations had to allocate
//! (0 when every ring step reused one from its endpoint's pool).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use shardplan_runtime::collectives::{all_reduce, Tag};
use shardplan_runtime::transport::{Endpoint, Fabric};

const SIZES_MIB: [usize; 5] = [1, 4, 16, 64, 256];
const PLAN: u64 = 0xa11_5ed0;
const USAGE: &str = "usage: allreduce_bw [--devices N (default 4, at least 2)] [--iters N (default 5)] [--max-mib N (default 256)]";

struct Args {
    devices: usize,
    iters: usize,
    max_mib: usize,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args { devices: 4, iters: 5, max_mib: 256 };
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--devices" => &mut parsed.devices,
            "--iters" => &mut parsed.iters,
            "--max-mib" => &mut parsed.max_mib,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        };
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        *slot = value.parse().map_err(|_| format!("{flag} takes a whole number, got `{value}`"))?;
    }
    if parsed.devices < 2 {
        return Err("--devices must be at least 2 (a group of one moves no data)".to_string());
    }
    // Iteration `i` is instruction `i` on the wire.
    if parsed.iters == 0 || parsed.iters >= u32::MAX as usize {
        return Err(format!("--iters must be between 1 and {}", u32::MAX - 1));
    }
    if parsed.max_mib < SIZES_MIB[0] {
        return Err(format!("--max-mib must be at least {} (the smallest size)", SIZES_MIB[0]));
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("allreduce_bw: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let n = args.devices;
    let bus_factor = 2.0 * (n - 1) as f64 / n as f64;
    println!("ring all-reduce of f32 over {n} devices (one thread each); {} timed iterations after 1 warm-up, medians", args.iters);
    println!("busbw = algbw * 2(n-1)/n = algbw * {bus_factor:.3}; memcpy: one thread, bytes copied / time; GB/s = 10^9 B/s");
    println!();
    let mut steady_allocs = 0;
    println!("{:>8}  {:>10}  {:>10}  {:>10}  {:>11}  {:>12}", "size", "time ms", "algbw GB/s", "busbw GB/s", "memcpy GB/s", "busbw/memcpy");
    for mib in SIZES_MIB.into_iter().filter(|&mib| mib <= args.max_mib) {
        let bytes = mib << 20;
        let len = bytes / std::mem::size_of::<f32>();
        let secs = match time_all_reduce(n, len, args.iters) {
            Ok((secs, allocs)) => {
                steady_allocs += allocs;
                secs
            }
            Err(msg) => {
                eprintln!("allreduce_bw: all-reduce of {mib} MiB failed: {msg}");
                return ExitCode::FAILURE;
            }
        };
        let copy_secs = time_memcpy(len, args.iters);
        let algbw = bytes as f64 / secs / 1e9;
        let busbw = algbw * bus_factor;
        let memcpy = bytes as f64 / copy_secs / 1e9;
        println!("{:>4} MiB  {:>10.3}  {:>10.2}  {:>10.2}  {:>11.2}  {:>12.2}", mib, secs * 1e3, algbw, busbw, memcpy, busbw / memcpy);
    }
    println!();
    println!("every size checked: after the warm-up all-reduce each element of every device equals n(n+1)/2 = {}", n * (n + 1) / 2);
    println!("payload buffers allocated by the timed iterations, all sizes and devices: {steady_allocs}");
    ExitCode::SUCCESS
}

/// Median over `iters` timed all-reduces of `len` elements (after one warm-up) of the slowest device's time, in seconds,
/// and the payload buffers the devices allocated during the timed all-reduces.
fn time_all_reduce(n: usize, len: usize, iters: usize) -> Result<(f64, u64), String> {
    let group: Vec<usize> = (0..n).collect();
    let barrier = Barrier::new(n);
    let stop = AtomicBool::new(false);
    let per_device: Vec<Result<(Vec<Duration>, u64), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = Fabric::new(n)
            .into_iter()
            .map(|ep| {
                let (group, barrier, stop) = (&group, &barrier, &stop);
                s.spawn(move || run_device(&ep, group, barrier, stop, len, iters))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a device thread panicked")).collect()
    });
    let (per_device, allocs): (Vec<Vec<Duration>>, Vec<u64>) = per_device.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
    let slowest: Vec<Duration> = (0..iters).map(|i| per_device.iter().map(|times| times[i]).max().unwrap_or_default()).collect();
    Ok((median_secs(slowest), allocs.iter().sum()))
}

/// One device: a warm-up all-reduce, checked, then `iters` timed ones, each from freshly filled data;
/// their times, and the payload buffers this device allocated after the warm-up.
///
/// Every device passes the same barriers: a device that fails sets `stop` before its next barrier,
/// so after that barrier every device sees it and they all leave the loop together.
fn run_device(ep: &Endpoint, group: &[usize], barrier: &Barrier, stop: &AtomicBool, len: usize, iters: usize) -> Result<(Vec<Duration>, u64), String> {
    let n = group.len();
    let init = (ep.rank() + 1) as f32;
    let expected = (n * (n + 1) / 2) as f32;
    let mut data = vec![0.0f32; len];
    let mut times = Vec::with_capacity(iters);
    let mut failure = None;
    let mut after_warm_up = 0;
    for it in 0..=iters {
        data.fill(init);
        barrier.wait();
        if stop.load(Ordering::Acquire) {
            break;
        }
        // A distinct instruction per iteration: the ring's messages carry seq 0..2(n-1), so no header repeats.
        let tag = Tag { plan: PLAN, instr: it as u32, seq: 0, name: "all-reduce(bench)".to_string() };
        let start = Instant::now();
        let result = all_reduce(ep, group, &tag, &mut data);
        let elapsed = start.elapsed();
        let result = result.map_err(|err| err.to_string()).and_then(|()| if it == 0 { check(ep.rank(), &data, expected) } else { Ok(()) });
        match result {
            Ok(()) if it > 0 => times.push(elapsed),
            Ok(()) => after_warm_up = ep.buffers_allocated(),
            Err(msg) => {
                ep.abort(&msg);
                stop.store(true, Ordering::Release);
                failure = Some(msg);
            }
        }
    }
    failure.map_or_else(|| Ok((times, ep.buffers_allocated() - after_warm_up)), Err)
}

fn check(rank: usize, data: &[f32], expected: f32) -> Result<(), String> {
    match data.iter().position(|&x| x != expected) {
        None => Ok(()),
        Some(i) => Err(format!("device {rank}: element {i} is {}, expected {expected}", data[i])),
    }
}

/// Median over `iters` copies of `len` elements with `copy_from_slice` (after one warm-up), in seconds.
fn time_memcpy(len: usize, iters: usize) -> f64 {
    let src = vec![1.0f32; len];
    let mut dst = vec![0.0f32; len];
    let mut times = Vec::with_capacity(iters);
    for it in 0..=iters {
        let start = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        let elapsed = start.elapsed();
        if it > 0 {
            times.push(elapsed);
        }
    }
    median_secs(times)
}

/// Median of `times` in seconds (the mean of the middle two for an even count); 0 for none.
fn median_secs(mut times: Vec<Duration>) -> f64 {
    times.sort();
    let mid = times.len() / 2;
    match times.len() {
        0 => 0.0,
        len if len % 2 == 1 => times[mid].as_secs_f64(),
        _ => (times[mid - 1] + times[mid]).as_secs_f64() / 2.0,
    }
}
