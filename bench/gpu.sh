#!/usr/bin/env bash
# GPU checks and benchmarks, in two halves.
#
# Here (with a Rust toolchain):
#     bench/gpu.sh build
# builds the release binary and puts a stripped copy in .gpu/shardplan
# (.gpu/ is ignored by git; the binary links nothing from CUDA).
#
# On the GPU machine (no Rust needed; a Python with torch and the nvidia-*
# wheels, the NVIDIA driver), from the repository root:
#     bench/gpu.sh LOGDIR
# finds libnvrtc.so.13, libcublas.so.13 and libnccl.so.2 (in the Python
# environment's nvidia/*/lib folders, else anywhere under /usr, /opt, /root,
# /home), links libnccl.so to libnccl.so.2 in a temporary folder, puts those
# folders on LD_LIBRARY_PATH, and runs, each step's output in LOGDIR/<step>.log
# and a summary in LOGDIR/summary.txt:
#   selftest      every distinct kernel of the examples, GPU against CPU
#   verify_*      digits_mlp and tiny_gpt on one GPU, data parallelism and a
#                 1F1B pipeline on two logical GPU devices, each against one CPU device
#   run_digits    training the digits MLP on the GPU (--metrics in LOGDIR)
#   bench         bench/gpu_step.py: the mlp and gpt steps of bench/train_step.py
#                 against PyTorch on the same GPU
# The whole run takes a few minutes; each step has its own time limit.
# SHARDPLAN_CUDA_SYNC=1 in the environment makes every launch wait, so that a
# failing kernel is named.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "${1:-}" = build ]; then
    set -e
    cargo build --release
    mkdir -p .gpu
    cp target/release/shardplan .gpu/shardplan
    strip .gpu/shardplan 2>/dev/null || true
    ls -l .gpu/shardplan
    echo "now, on the GPU machine, from the repository root: bench/gpu.sh LOGDIR"
    exit 0
fi

if [ $# -ne 1 ]; then
    echo "usage: bench/gpu.sh build | bench/gpu.sh LOGDIR" >&2
    exit 2
fi
LOG="$1"
mkdir -p "$LOG"
LOG="$(cd "$LOG" && pwd)"
BIN="$ROOT/.gpu/shardplan"
[ -x "$BIN" ] || BIN="$ROOT/target/release/shardplan"
if [ ! -x "$BIN" ]; then
    echo "no binary: run bench/gpu.sh build first (where Rust is)" | tee "$LOG/summary.txt"
    exit 1
fi
PY="${PYTHON:-python3}"

# The CUDA libraries: the Python environment's nvidia wheels first.
LIBDIRS=()
SITE="$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)"
find_lib() {
    local name="$1" found=""
    if [ -n "$SITE" ]; then
        found="$(find "$SITE/nvidia" -name "$name" 2>/dev/null | head -n 1)"
    fi
    if [ -z "$found" ]; then
        found="$(find /usr /opt /root /home -name "$name" 2>/dev/null | head -n 1)"
    fi
    echo "$found"
}
NCCL_LINKS="$(mktemp -d)"
trap 'rm -rf "$NCCL_LINKS"' EXIT
for lib in libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
    path="$(find_lib "$lib")"
    if [ -z "$path" ]; then
        echo "not found: $lib" >> "$LOG/libraries.txt"
        continue
    fi
    echo "$lib: $path" >> "$LOG/libraries.txt"
    LIBDIRS+=("$(dirname "$path")")
    if [ "$lib" = libnccl.so.2 ]; then
        ln -sf "$path" "$NCCL_LINKS/libnccl.so"
        LIBDIRS+=("$NCCL_LINKS")
    fi
done
JOINED="$(printf '%s:' "${LIBDIRS[@]}" | sed 's/:$//')"
export LD_LIBRARY_PATH="${JOINED}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >> "$LOG/libraries.txt"

: > "$LOG/summary.txt"
step() {
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" | tee -a "$LOG/summary.txt"
}

{ nvidia-smi; "$BIN" --version; } > "$LOG/machine.log" 2>&1
step selftest 120 "$BIN" selftest --backend cuda --seed 1 --color never
step verify_digits 45 "$BIN" verify examples/digits_mlp.plan --backend cuda --color never
step verify_tiny_gpt 60 "$BIN" verify examples/tiny_gpt.plan --backend cuda --color never
step verify_data_parallel 45 "$BIN" verify bench/gpu_data_parallel.plan --color never
step verify_pipeline 60 "$BIN" verify bench/gpu_pipeline.plan --steps 5 --color never
step verify_tensor_parallel 45 "$BIN" verify examples/tensor_parallel.plan --backend cuda --color never
step run_digits 45 "$BIN" run examples/digits_mlp.plan --backend cuda --quiet --steps 200 --metrics "$LOG/run_digits.jsonl" --color never
step bench 120 "$PY" bench/gpu_step.py --bin "$BIN" --steps 40 --rounds 2
echo "logs in $LOG"
