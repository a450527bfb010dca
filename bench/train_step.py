#!/usr/bin/env python3
"""Training-step benchmark: shardplan against PyTorch on the same CPU, side by side.

Workloads (float32, 2 threads each):
  (a) mlp    MLP 1024 -> 4096 -> 4096 -> 1024, batch 256, SGD
  (b) gpt    GPT decoder, 2 layers, d 256, 4 heads, seq 128, vocab 256, batch 16, AdamW
  (c) digits the digits MLP 64 -> 128 -> 64 -> 10, batch 64, SGD with momentum
  (d) llama  examples/llama.plan's model: Llama decoder, 2 blocks, d 64, 4 heads
             (2 key/value heads), SwiGLU 176, rotary, RMSNorm, tied head,
             vocab 512, seq 64, batch 16, AdamW
  (e) llama256 the same architecture at gpt's size: d 256, 4 heads (2 key/value
             heads), SwiGLU 704, vocab 512, seq 128, batch 16, AdamW

Each round runs every workload once on each side, alternating, back to back;
the report gives per-round ratios (PyTorch step time / shardplan step time,
above 1 means shardplan is faster), their median, peak memory (max RSS) of
both processes, the matmul GFLOP/s each side achieves per step, numpy's on
the same shapes, and the load average before and after.

Usage: python3 bench/train_step.py [--rounds 3] [--steps 30] [--only mlp,gpt,digits]
                                   [--shardplan target/release/shardplan]
(--only defaults to mlp,gpt,digits; add llama,llama256 to time those too.)
Needs: cargo build --release; pip install torch numpy.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "shardplan")
THREADS = 2

PLANS = {
    "mlp": """
model Mlp {
  input x: f32[batch, 1024]
  input label: i32[batch]
  layer fc1 = Linear(1024, 4096)
  layer fc2 = Linear(4096, 4096)
  layer fc3 = Linear(4096, 1024)
  loss cross_entropy(fc3(relu(fc2(relu(fc1(x))))), label)
}
data d = synthetic(rows: 4096, features: 1024, classes: 1024, seed: 1)
train { model: Mlp, data: d, batch: 256, steps: STEPS, optimizer: sgd(lr: 0.01), seed: 1 }
""",
    "gpt": """
model Gpt {
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(256, 256)
  layer pos = PositionalEmbedding(seq, 256)
  layer blocks = repeat 2 Block(256, 4, 1024)
  layer ln = LayerNorm(256)
  layer head = Linear(256, 256)
  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets)
}
data corpus = text("DATA/tiny.txt")
train { model: Gpt, data: corpus, batch: 16, seq: 128, steps: STEPS, optimizer: adamw(lr: 0.001), seed: 1 }
""",
    "digits": """
model DigitsMlp {
  input x: f32[batch, 64]
  input label: i32[batch]
  layer fc1 = Linear(64, 128)
  layer fc2 = Linear(128, 64)
  layer out = Linear(64, 10)
  loss cross_entropy(out(relu(fc2(relu(fc1(x))))), label)
}
data digits = csv("DATA/digits.csv", label: "label", scale: 1/16, train: 0..1500, test: 1500..)
train { model: DigitsMlp, data: digits, batch: 64, steps: STEPS, optimizer: sgd(lr: 0.1, momentum: 0.9), seed: 7 }
""",
    # examples/llama.plan's model and optimizer, without its lr schedule and
    # gradient clipping (gpt has neither).
    "llama": """
model Llama {
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(512, 64)
  layer blocks = repeat 2 LlamaBlock(64, 4, kv_heads: 2, hidden: 176)
  layer norm = RMSNorm(64)
  loss cross_entropy(norm(blocks(embed(tokens))) @ transpose(embed.table), targets)
}
data corpus = tokens("DATA/tiny_tokens.bin", dtype: "uint16")
train { model: Llama, data: corpus, batch: 16, seq: 64, steps: STEPS, optimizer: adamw(lr: 0.003, weight_decay: 0.01), seed: 1 }
""",
    # The same architecture at gpt's size.
    "llama256": """
model Llama {
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(512, 256)
  layer blocks = repeat 2 LlamaBlock(256, 4, kv_heads: 2, hidden: 704)
  layer norm = RMSNorm(256)
  loss cross_entropy(norm(blocks(embed(tokens))) @ transpose(embed.table), targets)
}
data corpus = tokens("DATA/tiny_tokens.bin", dtype: "uint16")
train { model: Llama, data: corpus, batch: 16, seq: 128, steps: STEPS, optimizer: adamw(lr: 0.003, weight_decay: 0.01), seed: 1 }
""",
}


def llama_flops(batch, seq, d, heads, kv_heads, hidden, vocab, layers):
    """Matmul FLOPs of a Llama training step: per block wq, wo [d, d], wk, wv
    [d, d / heads * kv_heads], gate, up [d, hidden], down [hidden, d], and the
    two attention products per head (q @ k^T and p @ v, full seq x seq as for
    gpt); then the tied head [d, vocab]. Forward + two backward products each."""
    kv = d // heads * kv_heads
    linear = batch * seq * (layers * (2 * d * d + 2 * d * kv + 3 * d * hidden) + d * vocab)
    attention = layers * batch * heads * seq * seq * (d // heads) * 2
    return 3 * 2 * (linear + attention)

# Matmul FLOPs per training step (forward + two backward products each).
FLOPS = {
    "mlp": 3 * 2 * 256 * (1024 * 4096 + 4096 * 4096 + 4096 * 1024),
    "gpt": 3 * 2 * (16 * 128) * (2 * (4 * 256 * 256 + 2 * 256 * 1024) + 256 * 256) + 3 * 2 * 2 * (16 * 4) * (128 * 128 * 64 * 2),
    "digits": 3 * 2 * 64 * (64 * 128 + 128 * 64 + 64 * 10),
    "llama": llama_flops(16, 64, 64, 4, 2, 176, 512, 2),
    "llama256": llama_flops(16, 128, 256, 4, 2, 704, 512, 2),
}

TORCH = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np
    import torch, torch.nn as nn, torch.nn.functional as F
    torch.set_num_threads(THREADS)
    torch.manual_seed(1)
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

    # Rotary tables, computed once: the pair (2i, 2i+1) of each head at
    # position p turns by p * base^(-2i / head_dim).
    def rope_tables(seq, head_dim, base=10000.0):
        inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        a = torch.arange(seq, dtype=torch.float64)[:, None] * inv
        return a.cos().float(), a.sin().float()

    def rope(x, cos, sin):  # x: [b, h, t, head_dim]; cos, sin: [t, head_dim / 2]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)

    class LlamaAttn(nn.Module):
        def __init__(s, d, h, kv):
            super().__init__(); s.h, s.kv, s.dh = h, kv, d // h
            s.wq, s.wo = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            s.wk, s.wv = nn.Linear(d, kv * s.dh, bias=False), nn.Linear(d, kv * s.dh, bias=False)
        def forward(s, x, cos, sin):
            b, t, d = x.shape
            q = s.wq(x).view(b, t, s.h, s.dh).transpose(1, 2)
            k = s.wk(x).view(b, t, s.kv, s.dh).transpose(1, 2)
            v = s.wv(x).view(b, t, s.kv, s.dh).transpose(1, 2)
            y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True, enable_gqa=True)
            return s.wo(y.transpose(1, 2).reshape(b, t, d))

    class SwiGLU(nn.Module):
        def __init__(s, d, hidden):
            super().__init__()
            s.gate, s.up, s.down = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)
        def forward(s, x):
            return s.down(F.silu(s.gate(x)) * s.up(x))

    class LlamaBlock(nn.Module):
        def __init__(s, d, h, kv, hidden):
            super().__init__()
            s.attn_norm, s.attn = nn.RMSNorm(d, eps=1e-5), LlamaAttn(d, h, kv)
            s.mlp_norm, s.mlp = nn.RMSNorm(d, eps=1e-5), SwiGLU(d, hidden)
        def forward(s, x, cos, sin):
            h = x + s.attn(s.attn_norm(x), cos, sin)
            return h + s.mlp(s.mlp_norm(h))

    class Llama(nn.Module):
        def __init__(s, vocab, d, h, kv, hidden, layers, seq):
            super().__init__()
            s.embed = nn.Embedding(vocab, d); nn.init.normal_(s.embed.weight, std=0.02)
            s.blocks = nn.ModuleList(LlamaBlock(d, h, kv, hidden) for _ in range(layers))
            s.norm = nn.RMSNorm(d, eps=1e-6)
            cos, sin = rope_tables(seq, d // h)
            s.register_buffer("cos", cos); s.register_buffer("sin", sin)
        def forward(s, tok):
            x = s.embed(tok)
            for blk in s.blocks:
                x = blk(x, s.cos, s.sin)
            return s.norm(x) @ s.embed.weight.T

    class Gpt(nn.Module):
        def __init__(s):
            super().__init__()
            s.embed = nn.Embedding(256, 256); s.pos = nn.Parameter(torch.zeros(128, 256))
            s.blocks = nn.Sequential(Block(256, 4, 1024), Block(256, 4, 1024))
            s.ln, s.head = nn.LayerNorm(256), nn.Linear(256, 256)
        def forward(s, tok):
            return s.head(s.ln(s.blocks(s.embed(tok) + s.pos)))

    if kind == "mlp":
        model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(4096, 1024); y = torch.randint(0, 1024, (4096,))
        def batch(i):
            j = (i * 256) % 4096
            return x[j:j + 256], y[j:j + 256]
        def loss_of(b):
            return F.cross_entropy(model(b[0]), b[1])
    elif kind == "digits":
        raw = np.loadtxt(data_dir + "/digits.csv", delimiter=",", skiprows=1, dtype=np.float32)
        x = torch.from_numpy(raw[:1500, :64] / 16); y = torch.from_numpy(raw[:1500, 64].astype(np.int64))
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        def batch(i):
            j = (i * 64) % (1500 - 64)
            return x[j:j + 64], y[j:j + 64]
        def loss_of(b):
            return F.cross_entropy(model(b[0]), b[1])
    elif kind in ("llama", "llama256"):
        d, hidden, seq = (64, 176, 64) if kind == "llama" else (256, 704, 128)
        data = torch.from_numpy(np.fromfile(data_dir + "/tiny_tokens.bin", dtype="<u2").astype(np.int64))
        model = Llama(512, d, 4, 2, hidden, 2, seq)
        opt = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.01)
        def batch(i):
            starts = [(i * 16 + r) * 97 % (len(data) - seq - 1) for r in range(16)]
            tok = torch.stack([data[s:s + seq] for s in starts]); tgt = torch.stack([data[s + 1:s + seq + 1] for s in starts])
            return tok, tgt
        def loss_of(b):
            return F.cross_entropy(model(b[0]).reshape(-1, 512), b[1].reshape(-1))
    else:
        text = np.frombuffer(open(data_dir + "/tiny.txt", "rb").read(), dtype=np.uint8).astype(np.int64)
        data = torch.from_numpy(text)
        model = Gpt()
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
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(b)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": times, "rss": rss, "loss": float(loss)}))
    """
).replace("THREADS", str(THREADS))


def run_shardplan(kind, steps, tmp):
    data_dir = os.path.join(ROOT, "examples", "data")
    plan = PLANS[kind].replace("STEPS", str(steps)).replace("DATA", data_dir)
    path = os.path.join(tmp, f"{kind}.plan")
    with open(path, "w") as f:
        f.write(plan)
    metrics = os.path.join(tmp, f"{kind}.jsonl")
    # A wrapper process reports the peak memory of its only child.
    wrap = "import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
    cmd = [sys.executable, "-c", wrap, BIN, "run", "--quiet", "--threads", str(THREADS), path, "--metrics", metrics]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"shardplan failed on {kind}:\n{r.stderr}")
    rss = int(r.stderr.strip().splitlines()[-1]) * 1024
    walls = [json.loads(l)["wall_s"] for l in open(metrics)]
    times = [b - a for a, b in zip(walls, walls[1:])]
    return times, rss


def run_torch(kind, steps, python):
    r = subprocess.run([python, "-c", TORCH, kind, str(steps), os.path.join(ROOT, "examples", "data")], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"PyTorch failed on {kind}:\n{r.stderr}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["times"], out["rss"]


NUMPY = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    shapes = {
        "mlp": [(256, 1024, 4096), (256, 4096, 4096), (256, 4096, 1024)],
        "gpt": [(2048, 256, 256), (2048, 256, 1024), (2048, 1024, 256)],
        "digits": [(64, 64, 128), (64, 128, 64), (64, 64, 10)],
        "llama": [(1024, 64, 64), (1024, 64, 32), (1024, 64, 176), (1024, 176, 64), (1024, 64, 512)],
        "llama256": [(2048, 256, 256), (2048, 256, 128), (2048, 256, 704), (2048, 704, 256), (2048, 256, 512)],
    }[sys.argv[1]]
    mats = [(np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in mats:
        a @ b
    reps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        for a, b in mats:
            a @ b
        reps += 1
    print(flops * reps / (time.perf_counter() - t0) / 1e9)
    """
)


def numpy_gflops(kind, python):
    # This machine pins OpenBLAS to an older core type for safety; that slows
    # a current numpy, so the comparison runs without the pin (and with the
    # same 2 threads).
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["OPENBLAS_NUM_THREADS"] = str(THREADS)
    r = subprocess.run([python, "-c", NUMPY, kind], capture_output=True, text=True, env=env)
    try:
        return float(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def main():
    global BIN
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", default="mlp,gpt,digits")
    ap.add_argument("--numpy-only", action="store_true", help="only the numpy GFLOP/s column")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch installed")
    ap.add_argument("--shardplan", default=BIN, help="the shardplan binary (default: target/release/shardplan)")
    a = ap.parse_args()
    BIN = os.path.abspath(a.shardplan)
    if not os.path.exists(BIN):
        sys.exit(f"no shardplan binary at {BIN}: cargo build --release, or pass --shardplan PATH")
    kinds = a.only.split(",")
    if a.numpy_only:
        for k in kinds:
            print(f"{k:8} numpy {numpy_gflops(k, a.python):.1f} GFLOP/s")
        return
    load0 = os.getloadavg()
    results = {k: {"ratios": [], "sp": [], "pt": [], "sp_rss": 0, "pt_rss": 0} for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for k in kinds:
                steps = a.steps if k != "digits" else a.steps * 10
                order = [("sp", run_shardplan), ("pt", run_torch)] if rnd % 2 == 0 else [("pt", run_torch), ("sp", run_shardplan)]
                got = {}
                for side, fn in order:
                    times, rss = fn(k, steps, tmp if side == "sp" else a.python)
                    warm = max(3, len(times) // 5)
                    got[side] = statistics.median(times[warm:])
                    results[k][side + "_rss"] = max(results[k][side + "_rss"], rss)
                results[k]["sp"].append(got["sp"])
                results[k]["pt"].append(got["pt"])
                results[k]["ratios"].append(got["pt"] / got["sp"])
                print(f"round {rnd + 1} {k:6}: shardplan {got['sp'] * 1e3:8.2f} ms  PyTorch {got['pt'] * 1e3:8.2f} ms  ratio {got['pt'] / got['sp']:.2f}", flush=True)
    load1 = os.getloadavg()
    print()
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f}, after {load1[0]:.2f} {load1[1]:.2f}; {THREADS} threads each")
    print(f"{'workload':8} {'median ratio':>12} {'shardplan ms':>12} {'PyTorch ms':>10} {'sp GFLOP/s':>10} {'pt GFLOP/s':>10} {'numpy GFLOP/s':>13} {'sp peak MiB':>11} {'pt peak MiB':>11}")
    for k in kinds:
        r = results[k]
        sp, pt = statistics.median(r["sp"]), statistics.median(r["pt"])
        print(f"{k:8} {statistics.median(r['ratios']):12.2f} {sp * 1e3:12.2f} {pt * 1e3:10.2f} {FLOPS[k] / sp / 1e9:10.1f} {FLOPS[k] / pt / 1e9:10.1f} {numpy_gflops(k, a.python):13.1f} {r['sp_rss'] / 2**20:11.0f} {r['pt_rss'] / 2**20:11.0f}")


if __name__ == "__main__":
    main()
