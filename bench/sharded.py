#!/usr/bin/env python3
"""Sharded model states and recompute on four CPU devices (issue 15).

The GPT of bench/train_step.py (2 pre-LayerNorm blocks, d 256, 4 heads, seq
128, vocab 256, GELU MLP of width 1024, batch 16, AdamW) on 4 devices of one
kernel thread each, under data parallelism, `zero 1`, `zero 2`, `zero 3`
(FSDP) and `zero 3` with `recompute blocks[*]`. For each:

  - memory per device: what the plan says before the run, and what the
    executors allocate (`shardplan run` prints both);
  - the median step time over the last three quarters of the steps, beside
    the cost model's prediction (`shardplan run` prints both).

Peer: PyTorch on the same machine, 4 processes of one thread each over gloo:
DistributedDataParallel, and FSDP2 (`fully_shard` on each block, then on the
model), and FSDP2 with each block checkpointed (torch.utils.checkpoint). Its
memory is each rank's peak resident set above the resident set before the
model was built (the allocator's and Python's own overheads included), so it
is a measured upper bound rather than a like-for-like figure. The sides run
alternating, --rounds times; the table gives medians over rounds.

Usage: python3 bench/sharded.py [--steps 40] [--rounds 2] [--torch PYTHON]
Needs: cargo build --release; for the peer, a Python with torch >= 2.6.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "shardplan")

PLAN = """
model Gpt {{
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(256, 256)
  layer pos = PositionalEmbedding(seq, 256)
  layer blocks = repeat 2 Block(256, 4, 1024)
  layer ln = LayerNorm(256)
  layer head = Linear(256, 256)
  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets)
}}
data corpus = text("{data}/tiny.txt")
train {{ model: Gpt, data: corpus, batch: 16, seq: 128, steps: {steps}, optimizer: adamw(lr: 0.001), seed: 1 }}
devices cpu x 4
placement {{
  mesh (data: 4)
  data_parallel over data
  {extra}
}}
"""

MODES = [
    ("data parallel", "", "ddp"),
    ("zero 1", "zero 1", None),
    ("zero 2", "zero 2", None),
    ("zero 3 (FSDP)", "zero 3", "fsdp"),
    ("zero 3 + recompute", "zero 3\n  recompute blocks[*]", "fsdp_ckpt"),
]

TORCH = r"""
import os, resource, statistics, sys, time
import torch, torch.nn as nn, torch.nn.functional as F, torch.distributed as dist
mode, steps, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Attn(nn.Module):
    def __init__(s, d, h):
        super().__init__(); s.h = h
        s.wq, s.wk, s.wv, s.wo = (nn.Linear(d, d, bias=False) for _ in range(4))
    def forward(s, x):
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, s.h, d // s.h).transpose(1, 2) for w in (s.wq, s.wk, s.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return s.wo(y.transpose(1, 2).reshape(b, t, d))

class Block(nn.Module):
    def __init__(s, d, h, hidden, ckpt):
        super().__init__(); s.ckpt = ckpt
        s.ln1, s.attn, s.ln2 = nn.LayerNorm(d), Attn(d, h), nn.LayerNorm(d)
        s.up, s.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
    def inner(s, x):
        x = x + s.attn(s.ln1(x))
        return x + s.down(F.gelu(s.up(s.ln2(x)), approximate="tanh"))
    def forward(s, x):
        if s.ckpt:
            return torch.utils.checkpoint.checkpoint(s.inner, x, use_reentrant=False)
        return s.inner(x)

class Gpt(nn.Module):
    def __init__(s, ckpt):
        super().__init__()
        s.embed = nn.Embedding(256, 256); s.pos = nn.Parameter(torch.zeros(128, 256))
        s.blocks = nn.ModuleList([Block(256, 4, 1024, ckpt), Block(256, 4, 1024, ckpt)])
        s.ln, s.head = nn.LayerNorm(256), nn.Linear(256, 256)
    def forward(s, tok):
        x = s.embed(tok) + s.pos
        for b in s.blocks:
            x = b(x)
        return s.head(s.ln(x))

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def work(rank, world):
    torch.set_num_threads(1)
    torch.manual_seed(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    dist.init_process_group("gloo", rank=rank, world_size=world)
    base = rss()
    model = Gpt(ckpt=(mode == "fsdp_ckpt"))
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        for b in model.blocks:
            fully_shard(b)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.001)
    data = open(sys.argv[4], "rb").read()
    g = torch.Generator().manual_seed(rank)
    times = []
    for i in range(steps):
        starts = torch.randint(0, len(data) - 129, (4,), generator=g)
        rows = torch.tensor([list(data[s:s + 129]) for s in starts.tolist()], dtype=torch.long)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(rows[:, :-1]).reshape(-1, 256), rows[:, 1:].reshape(-1)).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    peak = torch.tensor([float(rss() - base)])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(statistics.median(times[steps // 4:]), int(peak.item()))
    dist.destroy_process_group()

if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(work, args=(4,), nprocs=4)
"""


def shardplan(extra, steps, tmp, name):
    plan = os.path.join(tmp, name + ".plan")
    metrics = os.path.join(tmp, name + ".jsonl")
    with open(plan, "w") as f:
        f.write(PLAN.format(data=os.path.join(ROOT, "examples", "data"), steps=steps, extra=extra))
    out = subprocess.run([BIN, "run", plan, "--quiet", "--no-eval", "--threads", "1", "--metrics", metrics], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{name} failed:\n{out.stdout}\n{out.stderr}")
    lines = [json.loads(l) for l in open(metrics)]
    step = statistics.median(l["step_s"] if "step_s" in l else l["wall_s"] for l in lines[len(lines) // 4:])
    # "cpu0 11.1 MiB (planned 11.1 MiB)": the fullest device's.
    mem = re.findall(r"cpu\d+ ([\d.]+) MiB \(planned ([\d.]+) MiB\)", out.stdout + out.stderr)
    alloc = max(float(a) for a, _ in mem)
    planned = max(float(p) for _, p in mem)
    predicted = float(re.search(r"step time: predicted ([\d.]+) ms", out.stdout + out.stderr).group(1)) / 1e3
    return step, planned, alloc, predicted


def torch_run(python, mode, steps, tmp, port):
    script = os.path.join(tmp, "torch_sharded.py")
    with open(script, "w") as f:
        f.write(TORCH)
    out = subprocess.run([python, script, mode, str(steps), str(port), os.path.join(ROOT, "examples", "data", "tiny.txt")], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"PyTorch {mode} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    t, peak = out.stdout.split()[-2:]
    return float(t), int(peak) / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--torch", default=None, help="a Python with torch, for the peer")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = {m[0]: [] for m in MODES}
        peer = {m[2]: [] for m in MODES if m[2]}
        port = 29600
        for r in range(a.rounds):
            for name, extra, tmode in MODES:
                ours[name].append(shardplan(extra, a.steps, tmp, f"m{r}_{len(ours[name])}"))
                if a.torch and tmode:
                    port += 1
                    res = torch_run(a.torch, tmode, a.steps, tmp, port)
                    if res:
                        peer[tmode].append(res)
        print(f"{'mode':<22} {'planned MiB':>12} {'allocated MiB':>14} {'predicted ms':>13} {'step ms':>9} {'PyTorch ms':>11} {'ratio':>7} {'PyTorch peak RSS MiB':>21}")
        for name, _, tmode in MODES:
            step = statistics.median(x[0] for x in ours[name])
            planned, alloc, predicted = ours[name][0][1], ours[name][0][2], ours[name][0][3]
            line = f"{name:<22} {planned:>12.1f} {alloc:>14.1f} {predicted * 1e3:>13.2f} {step * 1e3:>9.2f}"
            if tmode and peer.get(tmode):
                pt = statistics.median(x[0] for x in peer[tmode])
                pm = statistics.median(x[1] for x in peer[tmode])
                line += f" {pt * 1e3:>11.2f} {pt / step:>6.2f}x {pm:>21.1f}"
            print(line)


if __name__ == "__main__":
    main()
