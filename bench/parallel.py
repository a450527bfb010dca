#!/usr/bin/env python3
"""Multi-device benchmarks on CPU devices (issue 4), shardplan only.

  pipeline  a 4-stage pipeline (four 1024x1024 layers, one per stage, batch
            256) at 4, 8 and 16 microbatches, GPipe and 1F1B: the measured
            idle fraction of the stages (1 - sum of the devices' compute time
            / (devices x step time)) beside the schedule's own
            (p-1)/(m+p-1) for unit-time passes.
  dp        data-parallel scaling of the MLP benchmark (1024 -> 4096 -> 4096
            -> 1024, batch 256, SGD) from 1 to 2 devices of one core each
            (one kernel thread per device), beside PyTorch on the same
            machine: one process with one thread, and DistributedDataParallel
            (gloo) over two processes with one thread each.

The measured figures come from `shardplan run --metrics`, whose lines carry
per-step device statistics for placed plans.

With Open MPI installed and a build with `--features mpi`, the dp table also
has the two devices as two processes under mpirun.

Usage: python3 bench/parallel.py [--steps 20] [--only pipeline,dp] [--torch PYTHON]
Needs: cargo build --release [--features mpi]; for the peer, a Python with torch (--torch).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "shardplan")

PIPE = """
model Deep {{
  input x: f32[batch, 1024]
  input label: i32[batch]
  layer l0 = Linear(1024, 1024)
  layer l1 = Linear(1024, 1024)
  layer l2 = Linear(1024, 1024)
  layer l3 = Linear(1024, 1024)
  loss cross_entropy(l3(relu(l2(relu(l1(relu(l0(x))))))), label)
}}
data d = synthetic(rows: 4096, features: 1024, classes: 1024, seed: 1)
train {{ model: Deep, data: d, batch: 256, steps: {steps}, optimizer: sgd(lr: 0.01), seed: 1 }}
devices cpu x {p}
placement {{
  mesh (pipe: {p})
  pipeline over pipe {{
    {stages}
    microbatches {m}
    schedule {schedule}
  }}
}}
"""

STAGES = {4: "stage l0\n    stage l1\n    stage l2\n    stage l3", 2: "stage l0, l1\n    stage l2, l3"}

MLP = """
model Mlp {{
  input x: f32[batch, 1024]
  input label: i32[batch]
  layer fc1 = Linear(1024, 4096)
  layer fc2 = Linear(4096, 4096)
  layer fc3 = Linear(4096, 1024)
  loss cross_entropy(fc3(relu(fc2(relu(fc1(x))))), label)
}}
data d = synthetic(rows: 4096, features: 1024, classes: 1024, seed: 1)
train {{ model: Mlp, data: d, batch: 256, steps: {steps}, optimizer: sgd(lr: 0.01), seed: 1 }}
{placement}
"""


TORCH = r"""
import os, sys, time, statistics, torch, torch.nn as nn, torch.distributed as dist
steps, world = int(sys.argv[1]), int(sys.argv[2])
def work(rank):
    torch.set_num_threads(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024))
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", "29517"
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(256 // world, 1024)
    y = torch.randint(0, 1024, (256 // world,))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    if rank == 0:
        print(256 / statistics.median(times[steps // 4:]))
    if world > 1:
        dist.destroy_process_group()
if __name__ == "__main__":
    if world == 1:
        work(0)
    else:
        import torch.multiprocessing as mp
        mp.spawn(work, nprocs=world)
"""


def torch_rate(python, steps, world, tmp):
    script = os.path.join(tmp, "torch_dp.py")
    with open(script, "w") as f:
        f.write(TORCH)
    out = subprocess.run([python, script, str(steps), str(world)], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def run(plan_text, steps, tmp, name, threads=2):
    plan = os.path.join(tmp, name + ".plan")
    metrics = os.path.join(tmp, name + ".jsonl")
    with open(plan, "w") as f:
        f.write(plan_text)
    out = subprocess.run([BIN, "run", plan, "--quiet", "--threads", str(threads), "--metrics", metrics], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{name} failed:\n{out.stdout}\n{out.stderr}")
    lines = [json.loads(l) for l in open(metrics)]
    return lines[len(lines) // 4:]  # drop the warm-up quarter


def run_mpi(plan_text, steps, tmp, name, n):
    """The plan on `n` processes under mpirun (one kernel thread each); None without MPI."""
    import shutil
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return None
    plan = os.path.join(tmp, name + ".plan")
    metrics = os.path.join(tmp, name + ".jsonl")
    with open(plan, "w") as f:
        f.write(plan_text)
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = [mpirun, *root, "--oversubscribe", "-np", str(n), BIN, "run", plan, "--quiet", "--threads", "1", "--metrics", metrics]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  (2 processes not run: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'mpirun failed'})")
        return None
    lines = [json.loads(l) for l in open(metrics)]
    return lines[len(lines) // 4:]


def machine():
    model = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {model}; load average {os.getloadavg()[0]:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", default="pipeline,dp")
    ap.add_argument("--torch", default=sys.executable, help="a Python with torch, for the peer")
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    only = a.only.split(",")
    print("machine:", machine())
    with tempfile.TemporaryDirectory() as tmp:
        if "pipeline" in only:
            print("\npipeline of four 1024x1024 layers, batch 256, one kernel thread per stage")
            print(f"  {'stages':>6} {'schedule':<8} {'m':>3}  {'measured idle':>13}  {'(p-1)/(m+p-1)':>13}  {'step ms':>8}")
            for p in [4, 2]:
                for schedule in ["gpipe", "1f1b"]:
                    for m in [4, 8, 16]:
                        plan = PIPE.format(steps=a.steps, m=m, schedule=schedule, p=p, stages=STAGES[p])
                        rows = run(plan, a.steps, tmp, f"pipe{p}_{schedule}_{m}", threads=p)
                        idle = statistics.median(r["idle_fraction"] for r in rows)
                        step = statistics.median(r["step_s"] for r in rows) * 1e3
                        theory = (p - 1) / (m + p - 1)
                        print(f"  {p:>6} {schedule:<8} {m:>3}  {idle * 100:>12.1f}%  {theory * 100:>12.1f}%  {step:>8.1f}")
        if "dp" in only:
            print("\ndata parallel, MLP 1024-4096-4096-1024, batch 256, one core (thread) per device")
            one = run(MLP.format(steps=a.steps, placement=""), a.steps, tmp, "dp1", threads=1)
            two = run(MLP.format(steps=a.steps, placement="devices cpu x 2\nplacement {\n  mesh (data: 2)\n  data_parallel over data\n}"), a.steps, tmp, "dp2", threads=2)
            s1 = statistics.median(r["samples_per_step_s"] for r in one)
            s2 = statistics.median(r["samples_per_step_s"] for r in two)
            comm = statistics.median(r["comm_fraction"] for r in two)
            procs = run_mpi(MLP.format(steps=a.steps, placement="devices cpu x 2\nplacement {\n  mesh (data: 2)\n  data_parallel over data\n}"), a.steps, tmp, "dp2_mpi", 2)
            t1, t2 = torch_rate(a.torch, a.steps, 1, tmp), torch_rate(a.torch, a.steps, 2, tmp)
            print(f"  {'':<10} {'1 device':>12} {'2 devices':>12} {'speed-up':>9}")
            print(f"  {'shardplan':<10} {s1:>8.0f} s/s {s2:>8.0f} s/s {s2 / s1:>8.2f}x   (2 threads; transfers {comm * 100:.0f}% of the 2-device step)")
            if procs:
                p2 = statistics.median(r["samples_per_step_s"] for r in procs)
                pc = statistics.median(r["comm_fraction"] for r in procs)
                print(f"  {'shardplan':<10} {'':>12} {p2:>8.0f} s/s {p2 / s1:>8.2f}x   (2 processes under mpirun; transfers {pc * 100:.0f}% of the step)")
            if t1 and t2:
                print(f"  {'PyTorch':<10} {t1:>8.0f} s/s {t2:>8.0f} s/s {t2 / t1:>8.2f}x   (DDP, gloo)")
                print(f"  shardplan / PyTorch: {s1 / t1:.2f}x on 1 device, {s2 / t2:.2f}x on 2" + (f", {statistics.median(r['samples_per_step_s'] for r in procs) / t2:.2f}x on 2 processes" if procs else ""))
            else:
                print("  PyTorch: not run (pass --torch with a Python that has torch)")


if __name__ == "__main__":
    main()
