"""What the peer checks (peer_llama.py, peer_cnn.py) share: safetensors read
and written by hand, shardplan's seeded batch order reproduced bit for bit
(runtime/src/data/{rng,sampler}.rs), and shardplan's own initial parameters.
"""
import json
import os
import struct
import subprocess

import numpy as np
import torch

# --- safetensors: u64 little-endian header length, JSON header, raw data.

def write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors.values():
            f.write(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())

def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        assert h["dtype"] == "F32", (name, h["dtype"])
        a, b = h["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[a:b], dtype="<f4").copy()).reshape(h["shape"])
    return out

# --- the data order: runtime/src/data/{rng,sampler,text}.rs

M64 = (1 << 64) - 1

def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)

class Xoshiro256:
    def __init__(self, seed, domain, index):  # Xoshiro256::stream
        s = mix64(mix64(mix64(seed) ^ domain) ^ index)
        self.s = []
        for _ in range(4):  # SplitMix64 fills the state
            s = (s + 0x9E3779B97F4A7C15) & M64
            self.s.append(mix64(s))

    def next_u64(self):
        s = self.s
        rotl = lambda x, k: ((x << k) | (x >> (64 - k))) & M64
        result = (rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result

    def below(self, n):  # Lemire's multiply-and-reject
        m = self.next_u64() * n
        if (m & M64) < n:
            threshold = ((1 << 64) - n) % n
            while (m & M64) < threshold:
                m = self.next_u64() * n
        return m >> 64

def epoch_batches(samples, epoch, seed, batch):
    """Sampler::epoch: a seeded Fisher-Yates shuffle of `samples` indices, cut into
    full batches of `batch` (a last partial batch is dropped)."""
    order = list(range(samples))
    rng = Xoshiro256(seed, 0x73616D706C657200, epoch)  # domain "sampler\0"
    for i in range(samples - 1, 0, -1):
        j = rng.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return [order[k:k + batch] for k in range(0, samples - batch + 1, batch)]

def shardplan_init(binary, plan, tmp):
    """shardplan's own initial parameters for `plan`'s seed: a checkpoint
    saved before the first step, its optimizer state and step left out."""
    path = os.path.join(tmp, "shardplan_init.safetensors")
    subprocess.run([binary, "run", plan, "--stop-after", "0", "--save", path, "--no-eval", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return {k: v for k, v in read_safetensors(path).items() if not k.startswith("optim.")}
