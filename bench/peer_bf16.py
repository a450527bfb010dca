"""Peer check of `autocast bf16`: examples/llama.plan with its blocks under
`autocast bf16`, trained by shardplan and by PyTorch under
`torch.autocast("cpu", dtype=torch.bfloat16)` around the blocks, from the same
initial parameters (shardplan's own) on the same batches (see peer_llama.py,
whose model, data order and hand-written AdamW this reuses).

Both sides round the blocks' matmul operands and results, and element-wise
results on bfloat16 values, to bfloat16, and keep norms, the loss, the master
weights and the optimizer in float32. They are not bit-equal: PyTorch also
rounds the gradients of bfloat16 values to bfloat16 (shardplan keeps
gradients in float32), and its bfloat16 kernels may round intermediate steps
differently. So the check is against the scale of bfloat16 itself: the
relative loss difference between the two bfloat16 runs, beside the
difference each makes from the float32 run (shardplan's own f32 run, and
PyTorch's f32 run).

Usage: python bench/peer_bf16.py [--shardplan target/release/shardplan] [--steps 10]
"""
import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

import peer_common
import peer_llama as L


def loss_autocast(p, tokens, targets):
    """peer_llama.loss_fn with the blocks under CPU autocast (bf16)."""
    x = p["embed.table"][tokens]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for b in range(L.BLOCKS):
            w = lambda name: p[f"blocks.{b}.{name}"]
            a = L.rms_norm(x, w("attn_norm.gamma"), L.BLOCK_EPS)
            q, k = L.rope(a @ w("attn.wq"), L.HEADS), L.rope(a @ w("attn.wk"), L.KV_HEADS)
            h = x + L.attention(q, k, a @ w("attn.wv")) @ w("attn.wo")
            m = L.rms_norm(h, w("mlp_norm.gamma"), L.BLOCK_EPS)
            x = h + (F.silu(m @ w("mlp.gate")) * (m @ w("mlp.up"))) @ w("mlp.down")
    x = x.float()
    logits = L.rms_norm(x, p["norm.gamma"], L.FINAL_EPS) @ p["embed.table"].T
    return F.cross_entropy(logits.reshape(-1, L.VOCAB), targets.reshape(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shardplan", default=os.path.join("target", "release", "shardplan"))
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    binary = os.path.join(L.ROOT, args.shardplan) if not os.path.isabs(args.shardplan) else args.shardplan
    torch.set_num_threads(L.THREADS)
    data = L.batches(args.steps)
    text = open(L.PLAN).read().replace('"data/', '"' + os.path.join(L.ROOT, "examples", "data") + "/")
    autocast = text.replace("devices cpu x 1", "devices cpu x 1\nplacement {\n  mesh (one: 1)\n  autocast bf16 blocks[*]\n}")
    assert autocast != text
    with tempfile.TemporaryDirectory() as tmp:
        plan = os.path.join(tmp, "llama_bf16.plan")
        with open(plan, "w") as f:
            f.write(autocast)
        init = peer_common.shardplan_init(binary, L.PLAN, tmp)
        sp_bf16, _ = L.train_shardplan(binary, init, args.steps, tmp, plan)
        sp_f32, _ = L.train_shardplan(binary, init, args.steps, tmp)
    pt_bf16, _ = L.train_torch(init, data, torch.float32, loss_autocast)
    pt_f32, _ = L.train_torch(init, data, torch.float32)
    print(f"examples/llama.plan, blocks under autocast bf16, {args.steps} steps, torch {torch.__version__}")
    print(f"{'step':>4} {'shardplan bf16':>15} {'PyTorch bf16':>13} {'rel diff':>9} {'shardplan: bf16-f32':>20} {'PyTorch: bf16-f32':>18}")
    worst, scale = 0.0, 0.0
    for i in range(args.steps):
        rel = abs(sp_bf16[i] - pt_bf16[i]) / abs(pt_bf16[i])
        a, b = abs(sp_bf16[i] - sp_f32[i]) / sp_f32[i], abs(pt_bf16[i] - pt_f32[i]) / pt_f32[i]
        worst, scale = max(worst, rel), max(scale, a, b)
        print(f"{i + 1:>4} {sp_bf16[i]:>15.7f} {pt_bf16[i]:>13.7f} {rel:>9.2e} {a:>20.2e} {b:>18.2e}")
    print(f"largest relative difference between the bf16 runs: {worst:.2e}; largest bf16-f32 difference of either side: {scale:.2e}")
    # The two bf16 runs agree within the size of what bf16 itself changes (and within 1e-2 relative).
    ok = worst <= max(2 * scale, 1e-3) and worst < 1e-2
    print("OK" if ok else "FAIL: the bf16 runs differ by more than bf16's own effect")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
