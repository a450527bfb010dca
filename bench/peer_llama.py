#!/usr/bin/env python3
"""Peer check: examples/llama.plan trained by shardplan and by PyTorch, step by step.

The script
  1. takes shardplan's own initial parameters for the plan's seed (a checkpoint
     saved before the first step), or, with --init-seed, draws them in Python (the plan's init families: normal(0.02) for
     the embedding, Glorot uniform for the matrices, ones for the norm gains) and
     writes them as safetensors under the model's dotted parameter names;
  2. runs `shardplan run examples/llama.plan --init FILE --stop-after N` (the cosine
     schedule still spans the plan's 300 steps) and reads the per-step losses from
     its `--metrics` file;
  3. trains the same model in PyTorch from the same parameters on the same batches:
     the token windows shardplan's seeded sampler picks (xoshiro256** Fisher-Yates,
     reproduced here bit for bit), with a hand-written AdamW, cosine schedule and
     global-norm clipping that follow shardplan's update graph exactly;
  4. prints step / shardplan / PyTorch f32 / relative difference (and a PyTorch f64
     column, to show which f32 side is nearer exact arithmetic), and exits 1 if
     any relative difference exceeds the tolerance (1e-5).

Usage: python bench/peer_llama.py [--shardplan target/release/shardplan] [--steps 10]
Needs: a release build of shardplan; torch and numpy (safetensors is read and
written by hand below, so the `safetensors` package is not needed).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

import peer_common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "examples", "llama.plan")
TOKENS = os.path.join(ROOT, "examples", "data", "tiny_tokens.bin")

# examples/llama.plan and the prelude's LlamaBlock / RMSNorm defaults.
VOCAB, D, HEADS, KV_HEADS, HIDDEN, BLOCKS = 512, 64, 4, 2, 176, 2
BLOCK_EPS, FINAL_EPS, ROPE_BASE = 1e-5, 1e-6, 10000.0
BATCH, SEQ, TOTAL_STEPS, SEED, TRAIN_TOKENS = 16, 64, 300, 1, 12800
LR, WEIGHT_DECAY, BETA1, BETA2, ADAM_EPS = 0.003, 0.01, 0.9, 0.999, 1e-8
WARMUP, MIN_LR, CLIP = 20, 0.0, 1.0
THREADS, TOLERANCE = 2, 1e-5

# --- shared with the other peer check: safetensors, the batch order, the initial parameters.

def epoch_batches(samples, epoch):
    return peer_common.epoch_batches(samples, epoch, SEED, BATCH)


def batches(steps):
    """(tokens, targets) of each step: sample i is the window of tokens i .. i+SEQ."""
    ids = np.fromfile(TOKENS, dtype="<u2")[:TRAIN_TOKENS].astype(np.int64)
    samples = TRAIN_TOKENS - SEQ
    per_epoch, order, out = samples // BATCH, None, []
    for step in range(steps):
        epoch = step // per_epoch
        if order is None or order[0] != epoch:
            order = (epoch, epoch_batches(samples, epoch))
        rows = order[1][step % per_epoch]
        windows = torch.from_numpy(np.stack([ids[i:i + SEQ + 1] for i in rows]))
        out.append((windows[:, :-1], windows[:, 1:]))
    return out

# --- the model: compiler/src/prelude.plan (LlamaBlock, RotaryAttention, SwiGLU, RMSNorm)

def init_params(seed):
    g = torch.Generator().manual_seed(seed)
    glorot = lambda i, o: (torch.rand(i, o, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(6 / (i + o))
    p = {"embed.table": torch.randn(VOCAB, D, generator=g, dtype=torch.float64) * 0.02}
    kv = D // HEADS * KV_HEADS
    for b in range(BLOCKS):
        pre = f"blocks.{b}."
        p[pre + "attn_norm.gamma"] = torch.ones(D, dtype=torch.float64)
        for name, (i, o) in {"wq": (D, D), "wk": (D, kv), "wv": (D, kv), "wo": (D, D)}.items():
            p[pre + "attn." + name] = glorot(i, o)
        p[pre + "mlp_norm.gamma"] = torch.ones(D, dtype=torch.float64)
        for name, (i, o) in {"gate": (D, HIDDEN), "up": (D, HIDDEN), "down": (HIDDEN, D)}.items():
            p[pre + "mlp." + name] = glorot(i, o)
    p["norm.gamma"] = torch.ones(D, dtype=torch.float64)
    return {k: v.to(torch.float32) for k, v in p.items()}

def rms_norm(x, gamma, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gamma

def rope(x, heads):
    """Rotates column pairs (2i, 2i+1) of each head by pos * base^(-2i/head_dim)."""
    b, s, width = x.shape
    hd = width // heads
    pos = torch.arange(s, dtype=torch.float64)[:, None]
    angle = pos * ROPE_BASE ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # [s, hd/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x = x.view(b, s, heads, hd // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).view(b, s, width)

def attention(q, k, v):
    """Causal grouped-query attention; query head h reads key/value head h // (H / KV)."""
    b, s, _ = q.shape
    hd = D // HEADS
    q = q.view(b, s, HEADS, hd).transpose(1, 2)
    k = k.view(b, s, KV_HEADS, hd).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.view(b, s, KV_HEADS, hd).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    att = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(b, s, HEADS * hd)

def loss_fn(p, tokens, targets):
    x = p["embed.table"][tokens]
    for b in range(BLOCKS):
        w = lambda name: p[f"blocks.{b}.{name}"]
        a = rms_norm(x, w("attn_norm.gamma"), BLOCK_EPS)
        q, k = rope(a @ w("attn.wq"), HEADS), rope(a @ w("attn.wk"), KV_HEADS)
        h = x + attention(q, k, a @ w("attn.wv")) @ w("attn.wo")
        m = rms_norm(h, w("mlp_norm.gamma"), BLOCK_EPS)
        x = h + (F.silu(m @ w("mlp.gate")) * (m @ w("mlp.up"))) @ w("mlp.down")
    logits = rms_norm(x, p["norm.gamma"], FINAL_EPS) @ p["embed.table"].T
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

# --- training: runtime/src/session/schedule.rs and compiler/src/autodiff/optim.rs

def learning_rate(step):
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = min(max((step - WARMUP) / max(TOTAL_STEPS - WARMUP, 1), 0.0), 1.0)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def train_torch(init, data, dtype, loss_of=None):
    loss_of = loss_of or loss_fn
    p = {k: v.to(dtype).clone().requires_grad_(True) for k, v in init.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    losses = []
    for step, (tokens, targets) in enumerate(data):
        loss = loss_of(p, tokens, targets)
        grads = torch.autograd.grad(loss, list(p.values()))
        losses.append(loss.item())
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        scale = torch.clamp(CLIP / (norm + 1e-6), max=1.0)  # min(1, max / (|g| + 1e-6))
        lr, t = learning_rate(step), step + 1
        bc1, bc2 = 1 / (1 - BETA1 ** t), 1 / math.sqrt(1 - BETA2 ** t)
        with torch.no_grad():
            for (name, w), g in zip(p.items(), grads):
                g = g * scale
                m[name] = BETA1 * m[name] + (1 - BETA1) * g
                v2[name] = BETA2 * v2[name] + (1 - BETA2) * g * g
                w.mul_(1 - lr * WEIGHT_DECAY)  # AdamW: decoupled decay, every parameter
                w.sub_(m[name] / (v2[name].sqrt() * bc2 + ADAM_EPS) * (lr * bc1))
    return losses, {k: w.detach() for k, w in p.items()}

def train_shardplan(binary, init, steps, tmp, plan=PLAN):
    init_path, metrics, saved = (os.path.join(tmp, f) for f in ("init.safetensors", "metrics.jsonl", "end.safetensors"))
    peer_common.write_safetensors(init_path, init)
    cmd = [binary, "run", plan, "--init", init_path, "--stop-after", str(steps), "--metrics", metrics,
           "--save", saved, "--threads", str(THREADS), "--no-eval", "--quiet"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "unexpected steps in the metrics file"
    for r in rows:
        assert abs(r["lr"] - learning_rate(r["step"] - 1)) <= 1e-12 * LR, ("learning rate differs", r)
    return [r["loss"] for r in rows], peer_common.read_safetensors(saved)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shardplan", default=os.path.join("target", "release", "shardplan"),
                    help="the shardplan binary (relative paths from the repository root)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--init-seed", type=int, default=None,
                    help="draw the initial parameters in Python with this seed instead of loading shardplan's own")
    args = ap.parse_args()
    binary = os.path.join(ROOT, args.shardplan) if not os.path.isabs(args.shardplan) else args.shardplan
    torch.set_num_threads(THREADS)

    data = batches(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        init = peer_common.shardplan_init(binary, PLAN, tmp) if args.init_seed is None else init_params(args.init_seed)
        sp_losses, sp_params = train_shardplan(binary, init, args.steps, tmp)
    f32_losses, f32_params = train_torch(init, data, torch.float32)
    f64_losses, f64_params = train_torch(init, data, torch.float64)

    print(f"examples/llama.plan, {args.steps} steps of {TOTAL_STEPS} (cosine schedule over all {TOTAL_STEPS}), "
          f"batch {BATCH} x seq {SEQ}, {THREADS} threads, torch {torch.__version__}")
    print(f"{'step':>4} {'shardplan':>12} {'PyTorch f32':>12} {'rel diff':>9} {'PyTorch f64':>12} "
          f"{'shardplan-f64':>13} {'torch32-f64':>11}")
    worst = 0.0
    for i, (s, t, e) in enumerate(zip(sp_losses, f32_losses, f64_losses)):
        rel = abs(s - t) / abs(t)
        worst = max(worst, rel)
        print(f"{i + 1:>4} {s:>12.7f} {t:>12.7f} {rel:>9.2e} {e:>12.7f} {abs(s - e) / e:>13.2e} {abs(t - e) / e:>11.2e}")
    # Informational: the parameters after the last step (weight decay, for one, barely moves
    # the loss in 10 steps but shows here). Both f32 sides sit at the same distance from f64.
    pdiff = lambda a, b: max((a[k].double() - b[k].double()).abs().max().item() for k in init)
    print(f"largest relative loss difference: {worst:.2e} (tolerance {TOLERANCE:.0e})")
    print(f"largest parameter difference after step {args.steps}: shardplan vs PyTorch f32 "
          f"{pdiff(sp_params, f32_params):.2e}, shardplan vs f64 {pdiff(sp_params, f64_params):.2e}, "
          f"PyTorch f32 vs f64 {pdiff(f32_params, f64_params):.2e}")
    if worst > TOLERANCE or len(sp_losses) != args.steps:
        print("FAIL: shardplan and PyTorch disagree", file=sys.stderr)
        return 1
    print("OK")
    return 0

if __name__ == "__main__":
    sys.exit(main())
