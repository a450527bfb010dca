#!/usr/bin/env python3
"""Peer check: examples/cnn_digits.plan trained by shardplan and by PyTorch, step by step.

The script
  1. takes shardplan's own initial parameters for the plan's seed (a checkpoint
     saved before the first step), or, with --init-seed, draws them in Python (the plan's init families: uniform in
     ±1/√(in·k²) for the convolutions' weights and biases, Glorot uniform for the
     output layer's matrix, zeros for its bias) and writes them as safetensors
     under the model's dotted parameter names;
  2. runs `shardplan run examples/cnn_digits.plan --init FILE --stop-after N` (the
     placed run: data parallel over 4 CPU devices; `--single-device` runs it on
     one) and reads the per-step losses from its `--metrics` file;
  3. trains the same model in PyTorch from the same parameters on the same batches:
     the csv rows shardplan's seeded sampler picks (xoshiro256** Fisher-Yates,
     reproduced here bit for bit), with a hand-written SGD with momentum that
     follows shardplan's update graph exactly;
  4. prints step / shardplan / PyTorch f32 / relative difference (and a PyTorch f64
     column, to show which f32 side is nearer exact arithmetic), and exits 1 if
     any relative difference exceeds the tolerance (1e-5).

Usage: python bench/peer_cnn.py [--shardplan target/release/shardplan] [--steps 10] [--single-device]
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
PLAN = os.path.join(ROOT, "examples", "cnn_digits.plan")
DIGITS = os.path.join(ROOT, "examples", "data", "digits.csv")

# examples/cnn_digits.plan and the prelude's Conv2d / ResidualBlock / Linear.
CLASSES, SIDE, TRAIN_ROWS, SCALE = 10, 8, 1500, 1 / 16
BATCH, EPOCHS, SEED = 64, 20, 7
LR, MOMENTUM = 0.05, 0.9
THREADS, TOLERANCE = 2, 1e-5

# --- shared with the other peer check: safetensors, the batch order, the initial parameters.

def epoch_batches(samples, epoch):
    return peer_common.epoch_batches(samples, epoch, SEED, BATCH)


def load_digits():
    """csv::parse: the header, then one row per line; the features are every column but
    `label`, in file order, each scaled in f64 and rounded to f32 (exact here: k/16)."""
    with open(DIGITS) as f:
        names = f.readline().strip().split(",")
        rows = [line.strip().split(",") for line in f if line.strip()]
    col = names.index("label")
    feats = np.array([[float(v) for i, v in enumerate(r) if i != col] for r in rows], dtype=np.float64)
    labels = np.array([int(r[col]) for r in rows], dtype=np.int64)
    x = (feats * SCALE).astype(np.float32)[:TRAIN_ROWS]  # train: 0..1500
    return torch.from_numpy(x).reshape(-1, 1, SIDE, SIDE), torch.from_numpy(labels[:TRAIN_ROWS])

def batches(steps):
    """(images [64, 1, 8, 8], labels [64]) of each step: sample i is csv data row i."""
    images, labels = load_digits()
    per_epoch, order, out = TRAIN_ROWS // BATCH, None, []
    for step in range(steps):
        epoch = step // per_epoch
        if order is None or order[0] != epoch:
            order = (epoch, epoch_batches(TRAIN_ROWS, epoch))
        rows = torch.tensor(order[1][step % per_epoch])
        out.append((images[rows], labels[rows]))
    return out

# --- the model: compiler/src/prelude.plan (Conv2d, MaxPool2d, AvgPool2d, ResidualBlock, Linear)

CONVS = {"conv1": (1, 16), "res.conv1": (16, 16), "res.conv2": (16, 16), "conv2": (16, 32)}

def init_params(seed):
    g = torch.Generator().manual_seed(seed)
    uniform = lambda shape, a: (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * a
    p = {}
    for name, (i, o) in CONVS.items():
        bound = 1 / math.sqrt(i * 3 * 3)
        p[name + ".weight"] = uniform((o, i, 3, 3), bound)
        p[name + ".bias"] = uniform((o,), bound)
    p["out.w"] = uniform((128, CLASSES), math.sqrt(6 / (128 + CLASSES)))  # [in, out], not torch's [out, in]
    p["out.b"] = torch.zeros(CLASSES, dtype=torch.float64)
    return {k: v.to(torch.float32) for k, v in p.items()}

def conv(p, name, x):
    """conv2d(x, weight, padding: 1) + reshape(bias, [out, 1, 1]): the bias is added after."""
    return F.conv2d(x, p[name + ".weight"], padding=1) + p[name + ".bias"].reshape(-1, 1, 1)

def loss_fn(p, images, labels):
    h = F.max_pool2d(F.relu(conv(p, "conv1", images)), 2)                  # [b, 16, 4, 4]
    h = F.relu(h + conv(p, "res.conv2", F.relu(conv(p, "res.conv1", h))))  # ResidualBlock(16)
    h = F.avg_pool2d(F.relu(conv(p, "conv2", h)), 2)                        # [b, 32, 2, 2]
    logits = h.reshape(h.shape[0], 128) @ p["out.w"] + p["out.b"]
    return F.cross_entropy(logits, labels)

# --- training: runtime/src/session/schedule.rs (constant lr) and compiler/src/autodiff/optim.rs


def train_torch(init, data, dtype):
    p = {k: v.to(dtype).clone().requires_grad_(True) for k, v in init.items()}
    buf = {k: torch.zeros_like(v) for k, v in p.items()}  # the momentum buffer starts at zero
    losses = []
    for images, labels in data:
        loss = loss_fn(p, images.to(dtype), labels)
        grads = torch.autograd.grad(loss, list(p.values()))
        losses.append(loss.item())
        with torch.no_grad():
            for (name, w), g in zip(p.items(), grads):
                buf[name] = buf[name] * MOMENTUM + g  # buf = μ·buf + g (no dampening)
                w.sub_(buf[name] * LR)                # p -= lr·buf (not Nesterov)
    return losses, {k: w.detach() for k, w in p.items()}

def train_shardplan(binary, init, steps, tmp, single_device):
    init_path, metrics, saved = (os.path.join(tmp, f) for f in ("init.safetensors", "metrics.jsonl", "end.safetensors"))
    peer_common.write_safetensors(init_path, init)
    cmd = [binary, "run", PLAN, "--init", init_path, "--stop-after", str(steps), "--metrics", metrics,
           "--save", saved, "--threads", str(THREADS), "--no-eval", "--quiet"]
    if single_device:
        cmd.append("--single-device")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "unexpected steps in the metrics file"
    per_epoch = TRAIN_ROWS // BATCH
    for r in rows:
        assert abs(r["lr"] - LR) <= 1e-12 * LR, ("learning rate differs", r)
        assert r["epoch"] == (r["step"] - 1) // per_epoch + 1, ("epoch differs", r)
    return [r["loss"] for r in rows], peer_common.read_safetensors(saved)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shardplan", default=os.path.join("target", "release", "shardplan"),
                    help="the shardplan binary (relative paths from the repository root)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--init-seed", type=int, default=None,
                    help="draw the initial parameters in Python with this seed instead of loading shardplan's own")
    ap.add_argument("--single-device", action="store_true",
                    help="run shardplan on one device instead of the plan's 4-way data parallelism")
    args = ap.parse_args()
    binary = os.path.join(ROOT, args.shardplan) if not os.path.isabs(args.shardplan) else args.shardplan
    torch.set_num_threads(THREADS)

    data = batches(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        init = peer_common.shardplan_init(binary, PLAN, tmp) if args.init_seed is None else init_params(args.init_seed)
        sp_losses, sp_params = train_shardplan(binary, init, args.steps, tmp, args.single_device)
    f32_losses, f32_params = train_torch(init, data, torch.float32)
    f64_losses, f64_params = train_torch(init, data, torch.float64)

    total = EPOCHS * (TRAIN_ROWS // BATCH)
    where = "one device (--single-device)" if args.single_device else "data parallel over 4 devices"
    print(f"examples/cnn_digits.plan, {args.steps} steps of {total}, {where}, batch {BATCH} of 8 x 8 images, "
          f"sgd lr {LR} momentum {MOMENTUM}, {THREADS} threads, torch {torch.__version__}")
    print(f"{'step':>4} {'shardplan':>12} {'PyTorch f32':>12} {'rel diff':>9} {'PyTorch f64':>12} "
          f"{'shardplan-f64':>13} {'torch32-f64':>11}")
    worst = 0.0
    for i, (s, t, e) in enumerate(zip(sp_losses, f32_losses, f64_losses)):
        rel = abs(s - t) / abs(t)
        worst = max(worst, rel)
        print(f"{i + 1:>4} {s:>12.7f} {t:>12.7f} {rel:>9.2e} {e:>12.7f} {abs(s - e) / e:>13.2e} {abs(t - e) / e:>11.2e}")
    # Informational: the parameters after the last step.
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
