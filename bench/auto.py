#!/usr/bin/env python3
"""The planner (issue 5): search time and cost-model accuracy.

  search    `placement auto` for a 48-block GPT (d 1024, 16 heads, vocab
            50304, seq 1024, batch 512) on 8, 64 and 512 devices: the time the
            search itself takes (as `inspect --explain` reports it) and the
            whole process (parse, check, graph, autodiff, search, exact memory
            of the chosen plan).
  accuracy  `shardplan calibrate`, then every example trained 40 steps: the
            predicted step time beside the measured one.
  choice    examples/auto.plan (the tiny GPT) on 2 and 4 devices: every
            candidate the search considers that fits, trained 30 steps each as
            the explicit placement the search prints for it, in interleaved
            rounds; auto's choice against the fastest measured (medians).

Usage: python3 bench/auto.py [--only search,accuracy,choice] [--rounds 5]
Needs: cargo build --release.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "shardplan")

GPT48 = """
model Gpt {{
  input tokens: i32[batch, seq]
  input targets: i32[batch, seq]
  layer embed = Embedding(50304, 1024)
  layer pos = PositionalEmbedding(seq, 1024)
  layer blocks = repeat 48 Block(1024, 16)
  layer ln = LayerNorm(1024)
  layer head = Linear(1024, 50304)
  loss cross_entropy(head(ln(blocks(pos(embed(tokens))))), targets)
}}
data corpus = text("{data}")
train {{ model: Gpt, data: corpus, batch: 512, seq: 1024, steps: 10, optimizer: adamw(lr: 0.001), seed: 1 }}
devices cpu x {n} {{ memory 80 GiB }}
placement auto {{
  memory 40 GiB per device
  optimize step_time
}}
"""


def machine():
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    return f"{os.cpu_count()} cores, {model}; load average {os.getloadavg()[0]:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="search,accuracy,choice")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    print("machine:", machine())
    with tempfile.TemporaryDirectory() as tmp:
        if "search" in a.only:
            print("\nsearch, 48-block GPT")
            print(f"  {'devices':>7} {'candidates':>10} {'search ms':>10} {'process ms':>11}  chosen")
            for n in [8, 64, 512]:
                plan = os.path.join(tmp, f"gpt48_{n}.plan")
                with open(plan, "w") as f:
                    f.write(GPT48.format(n=n, data=os.path.join(ROOT, "examples", "data", "tiny.txt")))
                searches, walls, out = [], [], ""
                for _ in range(3):
                    t = time.perf_counter()
                    out = subprocess.run([BIN, "inspect", plan, "--explain"], capture_output=True, text=True).stdout
                    walls.append((time.perf_counter() - t) * 1e3)
                    m = re.search(r"(\d+) candidates searched in ([\d.]+) ms", out)
                    searches.append(float(m.group(2)))
                cands = re.search(r"(\d+) candidates", out).group(1)
                m = re.search(r"chosen: (.*)", out)
                chosen = m.group(1) if m else "none fits the 40 GiB budget"

                print(f"  {n:>7} {cands:>10} {statistics.median(searches):>10.1f} {statistics.median(walls):>11.1f}  {chosen}")
        prof = os.path.join(tmp, "profile.json")
        if "choice" in a.only:
            subprocess.run([BIN, "calibrate", "-o", prof], check=True, capture_output=True)
        if "accuracy" in a.only:
            # This machine's speed drifts over minutes, so each round calibrates
            # and then runs every example at once; the table gives the medians.
            examples = sorted(e for e in os.listdir(os.path.join(ROOT, "examples")) if e.endswith(".plan"))
            pred, meas, effs = {e: [] for e in examples}, {e: [] for e in examples}, []
            for _ in range(a.rounds):
                r = subprocess.run([BIN, "calibrate", "-o", prof], check=True, capture_output=True, text=True).stdout
                m = re.search(r"matmuls take ([\d.]+)× the model's time and ([\d.]+) µs per call, element-wise kernels ([\d.]+)× and ([\d.]+) µs, other kernels ([\d.]+)× and ([\d.]+) µs", r)
                t = re.search(r"split run ([\d.]+)× as fast as on one, plus ([\d.]+) µs each", r)
                k = re.search(r"take turns, at ([\d.]+)× the work", r)
                if m and t and k:
                    effs.append(tuple(float(x) for x in m.groups() + t.groups() + k.groups()))
                for e in examples:
                    out = subprocess.run([BIN, "run", os.path.join("examples", e), "--steps", "40", "--quiet", "--device-profile", prof], capture_output=True, text=True, cwd=ROOT).stdout
                    m = re.search(r"predicted ([\d.]+) ms(?: per step)?, measured ([\d.]+) ms", out)
                    if m:
                        pred[e].append(float(m.group(1)))
                        meas[e].append(float(m.group(2)))
            print(f"\ncost model: {a.rounds} rounds of `shardplan calibrate` then every example (40 steps, median step); medians")
            print("  fitted per round: matmuls, element-wise, other kernels (× the model's time, µs per call); on every core: speedup of split kernels, µs per split; work when devices outnumber cores")
            for e in effs:
                print(f"    {e[0]:.2f}× {e[1]:.2f} µs, {e[2]:.2f}× {e[3]:.2f} µs, {e[4]:.2f}× {e[5]:.2f} µs; {e[6]:.2f}×, {e[7]:.1f} µs; {e[8]:.2f}×")
            print(f"  {'example':<24} {'predicted ms':>12} {'measured ms':>12} {'error':>8} {'measured range':>15}  error per round")
            for e in examples:
                if not meas[e]:
                    print(f"  {e:<24} (no prediction)")
                    continue
                p, r = statistics.median(pred[e]), statistics.median(meas[e])
                rounds = " ".join(f"{(x - y) / y * 100:+.0f}%" for x, y in zip(pred[e], meas[e]))
                print(f"  {e:<24} {p:>12.3g} {r:>12.3g} {(p - r) / r * 100:>7.0f}% {min(meas[e]):>7.3g}-{max(meas[e]):<7.3g}  {rounds}")
        if "choice" in a.only:
            for n in [2, 4]:
                choice(prof, n, a.rounds, 30)


def choice(prof, devices, rounds, steps):
    """Every fitting candidate of examples/auto.plan on `devices` devices, as
    the explicit placement the search prints for it, measured `rounds` times
    (interleaved, so drift hits every candidate alike); the median per candidate."""
    import json
    src = open(os.path.join(ROOT, "examples", "auto.plan")).read().replace("devices cpu x 4", f"devices cpu x {devices}")
    head = src[: src.index("\nplacement auto") + 1]
    # Plans go to a folder of their own (with the examples' data beside them),
    # never among the examples, which the tests read.
    work = tempfile.mkdtemp()
    os.symlink(os.path.join(ROOT, "examples", "data"), os.path.join(work, "data"))
    auto_plan = os.path.join(work, f"auto_{devices}.plan")
    with open(auto_plan, "w") as f:
        f.write(src)
    try:
        out = subprocess.run([BIN, "inspect", auto_plan, "--format", "json", "--device-profile", prof], capture_output=True, text=True, cwd=ROOT).stdout
    finally:
        os.remove(auto_plan)
    search = json.loads(out)["search"]
    cands = [(i, c) for i, c in enumerate(search["candidates"]) if c["fits"]]
    times = {i: [] for i, _ in cands}
    for _ in range(rounds):
        for i, c in cands:
            plan = os.path.join(work, f"candidate_{i}.plan")
            with open(plan, "w") as f:
                f.write(head + c["placement"])
            try:
                r = subprocess.run([BIN, "run", plan, "--steps", str(steps), "--quiet", "--device-profile", prof], capture_output=True, text=True, cwd=ROOT)
            finally:
                os.remove(plan)
            m = re.search(r"measured ([\d.]+) ms", r.stdout)
            if m:
                times[i].append(float(m.group(1)))
            else:
                print(f"  candidate {i}: did not run: {r.stderr.strip().splitlines()[:2]}")
    rows = []
    for i, c in cands:
        if times[i]:
            pred = c["compute_s"] + c["comm_s"] + c["bubble_s"]
            rows.append((statistics.median(times[i]), min(times[i]), max(times[i]), pred * 1e3, name(c), i == search["chosen"]))
    rows.sort()
    print(f"\nauto's choice against every fitting candidate, measured (examples/auto.plan on {devices} devices, "
          f"{steps} steps, median of {rounds} interleaved rounds)")
    print(f"  {'candidate':<66} {'median ms':>9} {'range ms':>13} {'predicted':>9}")
    for med, lo, hi, pred, nm, chosen in rows:
        print(f"  {nm:<66} {med:>9.2f} {lo:>6.2f}-{hi:<6.2f} {pred:>9.2f}{'   <- chosen' if chosen else ''}")
    best = rows[0][0] if rows else float("nan")
    mine = next((r[0] for r in rows if r[5]), float("nan"))
    print(f"  auto's choice is {(mine / best - 1) * 100:.0f}% slower than the fastest measured candidate (target: within 15%)")


def name(c):
    parts = []
    if c["data"] > 1:
        parts.append(f"data {c['data']}")
    if c["model"] > 1:
        parts.append(f"tensor {c['model']}" + (" +tables" if c["sharded_embeddings"] else ""))
    if c["pipe"] > 1:
        parts.append(f"pipe {c['pipe']} x {c['microbatches']} {c['schedule']}")
    return ", ".join(parts) or "one device"


if __name__ == "__main__":
    main()
