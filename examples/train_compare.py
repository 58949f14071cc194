#!/usr/bin/env python3
"""iresnetc train against the PyTorch implementation (examples/pytorch/train_ref.py):
the same model, estimator, optimizer and batch, the same number of steps, both on
2 threads; prints one table (held-out NLL in nats for the 2-D densities, test
bits/dim for Fashion-MNIST, and steps per second).

    python3 examples/train_compare.py                     # every row, default steps
    python3 examples/train_compare.py --rows checkerboard --toy-steps 300

Needs target/release/iresnetc (cargo build --release -p iresnetc), python3 with
torch and numpy, and for the image row the Debian package dataset-fashion-mnist.
Runs go to build/compare/; each row takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def median_step(rows, batch):
    """Median seconds per step: robust to other jobs' bursts on a shared machine."""
    t = sorted(batch / r["samples_per_s"] for r in rows)
    return t[len(t) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=["checkerboard", "8gaussians", "fashion-mnist"])
    ap.add_argument("--toy-steps", type=int, default=500)
    ap.add_argument("--image-steps", type=int, default=300)
    ap.add_argument("--toy-lr", type=float, default=5e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--same-start", action="store_true",
                    help="2-D rows: PyTorch starts from iresnetc's initial weights and u, v (its step-0 "
                         "checkpoint) and trains on iresnetc's batches and held-out set, so the two loss "
                         "curves can be compared step by step")
    a = ap.parse_args()
    os.makedirs(os.path.join(ROOT, "build/compare"), exist_ok=True)
    table = []
    for row in a.rows:
        if row == "fashion-mnist":
            model, data, steps, batch, unit = "models/fmnist-flow.toml", FMNIST, a.image_steps, 64, "bits/dim"
            extra = ["--batch", "64"]
        else:
            model, data, steps, batch, unit = "models/toy2d.toml", row, a.toy_steps, 500, "nats"
            extra = ["--batch", "500", "--lr", str(a.toy_lr)]
        tag = f"build/compare/{row}"
        out = f"{tag}-iresnetc"
        if os.path.exists(os.path.join(ROOT, out)):
            subprocess.run(["rm", "-rf", os.path.join(ROOT, out)], check=True)
        run([os.path.join(ROOT, "target/release/iresnetc"), "train", model, "--data", data,
             "-o", out, "--steps", str(steps), "--threads", str(a.threads), "--seed", str(a.seed),
             "--no-plots", *extra])
        metrics = [json.loads(l) for l in open(os.path.join(ROOT, out, "metrics.jsonl"))]
        ev = json.load(open(os.path.join(ROOT, out, "eval.json")))
        ours_held = ev["bits_per_dim"] if ev.get("bits_per_dim") is not None else ev["loss"]

        pt_metrics = os.path.join(ROOT, f"{tag}-pytorch.jsonl")
        cmd = [sys.executable, "examples/pytorch/train_ref.py", model, "--data", data,
               "--steps", str(steps), "--threads", str(a.threads), "--seed", str(a.seed),
               "--metrics", pt_metrics, *extra]
        if a.same_start and row != "fashion-mnist":
            # The step-0 checkpoint holds the seeded initial weights and the u, v after the
            # initial power iterations; the batches come from iresnetc's streams (ported).
            start = f"{tag}-start"
            subprocess.run(["rm", "-rf", os.path.join(ROOT, start)], check=True)
            run([os.path.join(ROOT, "target/release/iresnetc"), "train", model, "--data", data, "-o", start,
                 "--steps", str(steps), "--seed", str(a.seed), "--stop-after", "0", "--no-plots", *extra])
            cmd += ["--init-weights", f"{start}/checkpoint.safetensors", "--iresnetc-data"]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        # OpenMP's default spin-waiting stalls PyTorch for seconds per step on a shared machine
        # (measured: 1-27 s steps instead of 0.2-0.7 s); passive waiting is its best setting here.
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        res = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=env)
        pt = json.loads(res.stdout.strip().splitlines()[-1])
        pt_rows = [json.loads(l) for l in open(pt_metrics)]
        table.append((row, model, batch, steps, unit, ours_held, pt["heldout"],
                      1.0 / median_step(metrics, batch), 1.0 / median_step(pt_rows, batch)))

    print()
    print(f"| data | model | batch | steps | held-out iresnetc | held-out PyTorch | difference "
          f"| steps/s iresnetc | steps/s PyTorch | speed ratio |")  # steps/s: 1 / median step time
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, model, batch, steps, unit, h1, h2, s1, s2 in table:
        print(f"| {row} | {os.path.basename(model)} | {batch} | {steps} | {h1:.3f} {unit} | {h2:.3f} {unit} "
              f"| {h1 - h2:+.3f} | {s1:.2f} | {s2:.2f} | {s1 / s2:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
