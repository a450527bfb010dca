#!/usr/bin/env python3
"""Training-step benchmark on one GPU: shardplan (--backend cuda) against PyTorch on the same GPU.

Workloads: the `mlp` and `gpt` plans of bench/train_step.py (float32; TF32 off on
both sides: cuBLAS's default math for shardplan, torch.backends.*.allow_tf32 =
False for PyTorch). PyTorch times each step between torch.cuda.synchronize()
calls; shardplan's step times come from its --metrics wall clock (each step
ends reading the loss back, which waits for the GPU). Medians after warm-up;
ratio = PyTorch step time / shardplan step time (above 1: shardplan is faster).

Usage: python3 bench/gpu_step.py --bin .gpu/shardplan [--steps 50] [--only mlp,gpt]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import FLOPS, PLANS, ROOT  # noqa: E402

TORCH = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import torch, torch.nn as nn, torch.nn.functional as F
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(1)
    dev = torch.device("cuda")
    kind, steps, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]

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
        def __init__(s, d, h, hidden):
            super().__init__()
            s.ln1, s.attn, s.ln2 = nn.LayerNorm(d), Attn(d, h), nn.LayerNorm(d)
            s.up, s.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        def forward(s, x):
            x = x + s.attn(s.ln1(x))
            return x + s.down(F.gelu(s.up(s.ln2(x)), approximate="tanh"))

    class Gpt(nn.Module):
        def __init__(s):
            super().__init__()
            s.embed = nn.Embedding(256, 256); s.pos = nn.Parameter(torch.zeros(128, 256))
            s.blocks = nn.Sequential(Block(256, 4, 1024), Block(256, 4, 1024))
            s.ln, s.head = nn.LayerNorm(256), nn.Linear(256, 256)
        def forward(s, tok):
            return s.head(s.ln(s.blocks(s.embed(tok) + s.pos)))

    if kind == "mlp":
        model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024)).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(4096, 1024, device=dev); y = torch.randint(0, 1024, (4096,), device=dev)
        def batch(i):
            j = (i * 256) % 4096
            return x[j:j + 256], y[j:j + 256]
        def loss_of(b):
            return F.cross_entropy(model(b[0]), b[1])
    else:
        text = np.frombuffer(open(data_dir + "/tiny.txt", "rb").read(), dtype=np.uint8).astype(np.int64)
        data = torch.from_numpy(text).to(dev)
        model = Gpt().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=0.001)
        def batch(i):
            starts = [(i * 16 + r) * 97 % (len(data) - 129) for r in range(16)]
            tok = torch.stack([data[s:s + 128] for s in starts]); tgt = torch.stack([data[s + 1:s + 129] for s in starts])
            return tok, tgt
        def loss_of(b):
            return F.cross_entropy(model(b[0]).reshape(-1, 256), b[1].reshape(-1))

    times = []
    for i in range(steps):
        b = batch(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(b)
        loss.backward()
        opt.step()
        l = float(loss)  # like shardplan, read the loss back every step
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "loss": l, "peak": torch.cuda.max_memory_allocated()}))
    """
)


def run_shardplan(binary, kind, steps, tmp):
    data_dir = os.path.join(ROOT, "examples", "data")
    path = os.path.join(tmp, f"{kind}.plan")
    with open(path, "w") as f:
        f.write(PLANS[kind].replace("STEPS", str(steps)).replace("DATA", data_dir))
    metrics = os.path.join(tmp, f"{kind}.jsonl")
    r = subprocess.run([binary, "run", "--quiet", "--backend", "cuda", path, "--metrics", metrics], capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr + r.stdout
    walls = [json.loads(l)["wall_s"] for l in open(metrics)]
    return [b - a for a, b in zip(walls, walls[1:])], r.stdout


def run_torch(python, kind, steps):
    r = subprocess.run([python, "-c", TORCH, kind, str(steps), os.path.join(ROOT, "examples", "data")], capture_output=True, text=True)
    if r.returncode != 0:
        return None, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["times"], out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, ".gpu", "shardplan"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="mlp,gpt")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch (CUDA) installed")
    a = ap.parse_args()
    kinds = a.only.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in kinds:
            sp_med, pt_med = [], []
            for rnd in range(a.rounds):
                sp, sp_out = run_shardplan(a.bin, k, a.steps, tmp)
                pt, pt_out = run_torch(a.python, k, a.steps)
                if sp is None:
                    print(f"{k}: shardplan failed:\n{sp_out}", flush=True)
                if pt is None:
                    print(f"{k}: PyTorch failed:\n{pt_out}", flush=True)
                if sp is None or pt is None:
                    break
                warm = max(3, len(sp) // 5)
                s, p = statistics.median(sp[warm:]), statistics.median(pt[warm:])
                sp_med.append(s)
                pt_med.append(p)
                print(f"round {rnd + 1} {k:4}: shardplan {s * 1e3:8.3f} ms  PyTorch {p * 1e3:8.3f} ms  ratio {p / s:.2f}  (PyTorch final loss {pt_out['loss']:.4f})", flush=True)
            if sp_med:
                s, p = statistics.median(sp_med), statistics.median(pt_med)
                rows.append((k, p / s, s, p))
    print()
    print(f"{'workload':8} {'ratio':>6} {'shardplan ms':>12} {'PyTorch ms':>10} {'sp TFLOP/s':>10} {'pt TFLOP/s':>10}")
    for k, ratio, s, p in rows:
        print(f"{k:8} {ratio:6.2f} {s * 1e3:12.3f} {p * 1e3:10.3f} {FLOPS[k] / s / 1e12:10.2f} {FLOPS[k] / p / 1e12:10.2f}")


if __name__ == "__main__":
    main()
