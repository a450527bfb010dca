#!/usr/bin/env bash
# All-reduce bus bandwidth (as nccl-tests defines it) beside memcpy bandwidth, measured in one run.
#
# Usage: bench/allreduce.sh [--devices N] [--iters N] [--max-mib N]
# The arguments go to the allreduce_bw example of shardplan-runtime (see its header).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

cpu=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^[[:space:]]*//' || true)
mem=$(awk '/^MemTotal:/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo 2>/dev/null || true)
echo "machine: $(nproc) cores, ${cpu:-unknown CPU}${mem:+, $mem}"
echo

cargo run --release -p shardplan-runtime --example allreduce_bw -- "$@"
