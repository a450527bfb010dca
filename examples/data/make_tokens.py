#!/usr/bin/env python3
"""Tokenizes tiny.txt into tiny_tokens.bin, as nanoGPT and Megatron users keep
their corpora: a flat file of little-endian uint16 token ids.

The tokenizer is a byte-level BPE learned from tiny.txt itself: ids 0..255 are
the bytes, and each of the next MERGES ids is the most frequent adjacent pair
of ids at the time it was made (ties go to the smaller pair), so the
vocabulary is 256 + MERGES = 512 ids. The merges are written to
tiny_bpe.json ({"merges": [[a, b], ...]}, id 256 + i for merge i), which is all
it takes to encode or decode text the same way.

Standard library only; deterministic. Run from anywhere:

    python3 examples/data/make_tokens.py [--out DIR]

The files go beside this script unless --out names another folder.
"""

import argparse
import json
import os
import struct
import sys
from collections import Counter

MERGES = 256


def learn(ids, merges):
    out = []
    for n in range(merges):
        pairs = Counter(zip(ids, ids[1:]))
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == top)
        new = 256 + n
        out.append(best)
        ids = apply(ids, best, new)
    return ids, out


def apply(ids, pair, new):
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            merged.append(new)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description="Tokenize tiny.txt with a byte-level BPE learned from it.")
    ap.add_argument("--out", default=here, help="folder for tiny_tokens.bin and tiny_bpe.json (default: beside this script)")
    out = ap.parse_args().out
    with open(os.path.join(here, "tiny.txt"), "rb") as f:
        text = f.read()
    ids, merges = learn(list(text), MERGES)
    data = struct.pack("<%dH" % len(ids), *ids)
    for name, payload in [("tiny_tokens.bin", data), ("tiny_bpe.json", (json.dumps({"merges": merges}) + "\n").encode())]:
        path = os.path.join(out, name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    print(f"{len(text)} bytes -> {len(ids)} tokens of {256 + len(merges)} ids: tiny_tokens.bin, tiny_bpe.json", file=sys.stderr)


if __name__ == "__main__":
    main()
