#!/usr/bin/env python3
"""PyTorch implementation of `iresnetc train`, for the speed and quality comparison.

The same model (built from the iresnetc model file, written from the README's
architecture), the same estimator (exact 2x2 log-det for 2-D flows; the Neumann
log-det gradient of Residual Flows with Russian-roulette term counts, or a fixed
truncation, for image flows), the same spectral normalization (persistent u, v,
`power_iters` iterations per step, gradient through sigma = u^T W v), the same
optimizer, warm-up, clipping and EMA, and the same batch. Random streams differ
(numpy/torch generators), so compare numbers of the same number of steps, not
bits; or start from iresnetc's step-0 checkpoint (--init-weights) on iresnetc's
own data streams (--iresnetc-data, 2-D sets), where the loss curves agree step
by step to f32 rounding (examples/train_compare.py --same-start). float32 by default (iresnetc's CPU engine multiplies in f32), --dtype
float64 for the f64 reference. examples/train_compare.py runs both and prints
the comparison table of the README.

    python3 examples/pytorch/train_ref.py models/toy2d.toml \
        --data 8gaussians --steps 600 --batch 500 --lr 5e-3 --eval-every 100
    python3 examples/pytorch/train_ref.py models/fmnist-flow.toml \
        --data /usr/share/datasets/fashion-mnist --steps 1000

Writes one JSON line per step (like RUN/metrics.jsonl) to --metrics when the run
ends (through safeio.py's output guard), and prints the held-out NLL (nats) or
test bits/dim and the steps per second. Not run in
CI (torch is several GB; see setup.sh).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import safeio  # noqa: E402

try:
    import numpy as np
    import torch
    import torch.nn.functional as F

    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
except ModuleNotFoundError as e:
    sys.exit(safeio.fail("train_ref.py", f"{e.name} is not installed: run `bash examples/pytorch/setup.sh` "
                                         "and use examples/pytorch/.venv/bin/python"))

LIPSWISH_DIV = 1.1
# Set from --dtype in main(): float32 matches iresnetc's CPU engine (f32 GEMMs).
DTYPE = torch.float32
# Raw (pre-softplus) initial LipSwish beta; main() sets it from train.lipswish_beta.
BETA_RAW = 1.0


# ---------------------------------------------------------------- data
def toy(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """The 2-D densities (FFJORD / Residual Flows shapes and scales)."""
    if name == "8gaussians":
        k = rng.integers(0, 8, n)
        a = k * np.pi / 4
        c = np.stack([4 * np.cos(a), 4 * np.sin(a)], 1)
        return (c + 0.5 * rng.standard_normal((n, 2))) / 1.414
    if name == "checkerboard":
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - rng.integers(0, 2, n) * 2.0
        x2 = x2 + np.floor(x1) % 2
        return np.stack([x1, x2], 1) * 2
    if name == "2spirals":
        t = np.sqrt(rng.random(n)) * 540 * 2 * np.pi / 360
        s = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
        x = s * (-np.cos(t) * t + 0.5 * rng.random(n))
        y = s * (np.sin(t) * t + 0.5 * rng.random(n))
        return np.stack([x, y], 1) / 3 + 0.1 * rng.standard_normal((n, 2))
    if name == "pinwheel":
        cls = np.minimum(np.arange(n) * 5 // n, 4)
        f0 = 0.3 * rng.standard_normal(n) + 1
        f1 = 0.1 * rng.standard_normal(n)
        ang = cls * 2 * np.pi / 5 + 0.25 * np.exp(f0)
        c, s = np.cos(ang), np.sin(ang)
        return 2 * np.stack([f0 * c - f1 * s, f0 * s + f1 * c], 1)
    if name == "moons":
        t = rng.random(n) * np.pi
        up = np.arange(n) % 2 == 0
        x = np.where(up, np.cos(t), 1 - np.cos(t))
        y = np.where(up, np.sin(t), 0.5 - np.sin(t))
        p = np.stack([x, y], 1) + 0.1 * rng.standard_normal((n, 2))
        return 2 * p - np.array([1.0, 0.2])
    if name == "rings":
        r = 0.75 * (np.arange(n) % 4 + 1)
        a = rng.random(n) * 2 * np.pi
        return np.stack([r * np.cos(a), r * np.sin(a)], 1) + 0.08 * rng.standard_normal((n, 2))
    if name == "circles":
        r = np.where(np.arange(n) % 2 == 0, 1.0, 0.5)
        a = rng.random(n) * 2 * np.pi
        return 3 * (np.stack([r * np.cos(a), r * np.sin(a)], 1) + 0.08 * rng.standard_normal((n, 2)))
    if name == "swissroll":
        t = 1.5 * np.pi * (1 + 2 * rng.random(n))
        return (np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2))) / 5
    raise SystemExit(f"unknown data set {name}")


class SplitMix:
    """iresnetc's generator (runtime/src/rng.rs: SplitMix64, Box-Muller with the spare kept),
    ported so that --iresnetc-data draws the very points `iresnetc train` draws."""

    MASK = (1 << 64) - 1
    GOLDEN = 0x9E3779B97F4A7C15

    @staticmethod
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & SplitMix.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & SplitMix.MASK
        return z ^ (z >> 31)

    def __init__(self, seed, stream):
        h = seed ^ 0x243F6A8885A308D3
        for s in stream:
            h = self.mix(h ^ ((s * self.GOLDEN) & self.MASK))
        self.state, self.spare = h, None

    def uniform(self):
        self.state = (self.state + self.GOLDEN) & self.MASK
        return (self.mix(self.state) >> 11) * (1.0 / (1 << 53))

    def normal(self):
        if self.spare is not None:
            z, self.spare = self.spare, None
            return z
        u1, u2 = 1.0 - self.uniform(), self.uniform()
        r, t = math.sqrt(-2.0 * math.log(u1)), 2 * math.pi * u2
        self.spare = r * math.sin(t)
        return r * math.cos(t)


# iresnetc's stream ids (compiler/src/train/data.rs): training batches (seed, 103, step),
# the held-out sample (seed, 104).
STREAM_DATA, STREAM_HELDOUT = 103, 104


def toy_iresnetc(name: str, n: int, r: SplitMix) -> np.ndarray:
    """The 2-D densities point by point in iresnetc's order of draws (compiler/src/train/toy.rs)."""
    pts = []
    for i in range(n):
        if name == "8gaussians":
            a = min(math.floor(r.uniform() * 8), 7) * math.pi / 4
            cx, cy = 4 * math.cos(a), 4 * math.sin(a)
            x = (cx + 0.5 * r.normal()) / 1.414
            p = [x, (cy + 0.5 * r.normal()) / 1.414]
        elif name == "checkerboard":
            x1 = r.uniform() * 4 - 2
            x2 = r.uniform() - 2 * min(math.floor(r.uniform() * 2), 1)
            p = [2 * x1, 2 * (x2 + math.floor(x1) % 2)]
        elif name == "2spirals":
            t = math.sqrt(r.uniform()) * 540 * 2 * math.pi / 360
            sg = 1.0 if i % 2 == 0 else -1.0
            x = sg * (-math.cos(t) * t + 0.5 * r.uniform())
            y = sg * (math.sin(t) * t + 0.5 * r.uniform())
            x = x / 3 + 0.1 * r.normal()
            p = [x, y / 3 + 0.1 * r.normal()]
        elif name == "pinwheel":
            cls = min(i * 5 // max(n, 1), 4)
            f0 = 0.3 * r.normal() + 1
            f1 = 0.1 * r.normal()
            ang = cls * 2 * math.pi / 5 + 0.25 * math.exp(f0)
            c, s = math.cos(ang), math.sin(ang)
            p = [2 * (f0 * c - f1 * s), 2 * (f0 * s + f1 * c)]
        elif name == "moons":
            t = r.uniform() * math.pi
            x, y = (math.cos(t), math.sin(t)) if i % 2 == 0 else (1 - math.cos(t), 0.5 - math.sin(t))
            x = 2 * (x + 0.1 * r.normal()) - 1
            p = [x, 2 * (y + 0.1 * r.normal()) - 0.2]
        elif name == "rings":
            ring, a = i % 4 + 1, r.uniform() * 2 * math.pi
            x = 0.75 * ring * math.cos(a) + 0.08 * r.normal()
            p = [x, 0.75 * ring * math.sin(a) + 0.08 * r.normal()]
        elif name == "circles":
            rad, a = (1.0 if i % 2 == 0 else 0.5), r.uniform() * 2 * math.pi
            x = 3 * (rad * math.cos(a) + 0.08 * r.normal())
            p = [x, 3 * (rad * math.sin(a) + 0.08 * r.normal())]
        elif name == "swissroll":
            t = 1.5 * math.pi * (1 + 2 * r.uniform())
            x = (t * math.cos(t) + r.normal()) / 5
            p = [x, (t * math.sin(t) + r.normal()) / 5]
        else:
            raise SystemExit(f"unknown data set {name}")
        pts.append(p)
    return np.array(pts)


def read_idx(path: str) -> np.ndarray:
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    nd = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(raw[4 + 4 * nd:], np.uint8).reshape(dims)


def image_set(src: str, test: bool) -> np.ndarray:
    if src.endswith(".npy"):
        x = np.load(src)
        return x.astype(np.float64) / 255 if x.dtype == np.uint8 else x.astype(np.float64)
    pre = "t10k" if test else "train"
    for name in (f"{pre}-images-idx3-ubyte.gz", f"{pre}-images-idx3-ubyte"):
        p = os.path.join(src, name)
        if os.path.exists(p):
            return read_idx(p)[:, None].astype(np.float64) / 255
    raise SystemExit(f"{src}: no {pre} images")


# ---------------------------------------------------------------- model
class SNLinear(torch.nn.Module):
    """A dense or conv layer with W / max(1, sigma / c), sigma = u^T W v."""

    def __init__(self, cin, cout, k, shape, coeff, conv):
        super().__init__()
        self.conv, self.k, self.coeff = conv, k, coeff
        fan = cin * k * k if conv else cin
        b = 1 / math.sqrt(fan)
        wshape = (cout, cin, k, k) if conv else (cout, cin)
        self.weight = torch.nn.Parameter(torch.empty(wshape, dtype=DTYPE).uniform_(-b, b))
        self.bias = torch.nn.Parameter(torch.empty(cout, dtype=DTYPE).uniform_(-b, b))
        ishape = (1, cin, *shape[1:]) if conv else (1, cin)
        oshape = (1, cout, *shape[1:]) if conv else (1, cout)
        self.register_buffer("v", F.normalize(torch.randn(ishape, dtype=DTYPE).flatten(), dim=0).view(ishape))
        self.register_buffer("u", F.normalize(torch.randn(oshape, dtype=DTYPE).flatten(), dim=0).view(oshape))

    def op(self, w, x):
        return F.conv2d(x, w, padding=self.k // 2) if self.conv else x @ w.t()

    def op_t(self, w, y):
        return F.conv_transpose2d(y, w, padding=self.k // 2) if self.conv else y @ w

    @torch.no_grad()
    def power(self, n):
        for _ in range(n):
            v = self.op_t(self.weight, self.u)
            self.v.copy_(v / v.norm())
            u = self.op(self.weight, self.v)
            self.u.copy_(u / u.norm())

    def forward(self, x):
        sigma = (self.u * self.op(self.weight, self.v)).sum()
        w = self.weight / torch.clamp(sigma / self.coeff, min=1.0)
        y = self.op(w, x)
        return y + (self.bias.view(1, -1, 1, 1) if self.conv else self.bias)


class Act(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "lipswish":
            self.beta = torch.nn.Parameter(torch.full((1,), BETA_RAW, dtype=DTYPE))

    def forward(self, x):
        if self.kind == "elu":
            return F.elu(x)
        if self.kind == "relu":
            return F.relu(x)
        return x * torch.sigmoid(F.softplus(self.beta) * x) / LIPSWISH_DIV


class ActNorm(torch.nn.Module):
    def __init__(self, c, image):
        super().__init__()
        self.image = image
        self.log_scale = torch.nn.Parameter(torch.zeros(c, dtype=DTYPE))
        self.bias = torch.nn.Parameter(torch.zeros(c, dtype=DTYPE))
        self.initialized = False

    def forward(self, x):
        view = (1, -1, 1, 1) if self.image else (1, -1)
        if not self.initialized:
            with torch.no_grad():
                dims = (0, 2, 3) if self.image else (0,)
                m, s = x.mean(dims), x.std(dims, unbiased=False)
                self.log_scale.copy_(-torch.log(s + 1e-6))
                self.bias.copy_(-m * self.log_scale.exp())
            self.initialized = True
        hw = x[0, 0].numel() if self.image else 1
        return x * self.log_scale.exp().view(view) + self.bias.view(view), hw * self.log_scale.sum()


class Block(torch.nn.Module):
    def __init__(self, shape, stage, first, coeff):
        super().__init__()
        image = len(shape) == 3
        c = shape[0]
        self.actnorm = ActNorm(c, image)
        layers = []
        if image:
            ks = stage.get("kernels", [3, 1, 3])
            width = stage["width"]
            for i, k in enumerate(ks):
                if i > 0 or not first:
                    layers.append(Act(stage.get("activation", "elu")))
                cin = c if i == 0 else width
                cout = c if i == len(ks) - 1 else width
                layers.append(SNLinear(cin, cout, k, shape, coeff, True))
        else:
            widths = stage["hidden"] + [c]
            fin = c
            for i, fout in enumerate(widths):
                if i > 0 or not first:
                    layers.append(Act(stage.get("activation", "elu")))
                layers.append(SNLinear(fin, fout, 1, shape, coeff, False))
                fin = fout
        self.g = torch.nn.Sequential(*layers)


def squeeze(x):
    return F.pixel_unshuffle(x, 2)


class Flow(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        shape = list(spec["input"])
        if spec.get("squeeze"):
            shape = [shape[0] * 4, shape[1] // 2, shape[2] // 2]
        if spec.get("pad_channels"):
            shape[0] = spec["pad_channels"]
        coeff = spec.get("lipschitz", {}).get("coeff", 0.9)
        self.stages = torch.nn.ModuleList()
        self.plan = []
        first = True
        for st in spec["stages"]:
            if st.get("squeeze"):
                shape = [shape[0] * 4, shape[1] // 2, shape[2] // 2]
            blocks = torch.nn.ModuleList()
            for _ in range(st["blocks"]):
                blocks.append(Block(shape, st, first, coeff))
                first = False
            self.stages.append(blocks)
            self.plan.append((st.get("squeeze", False), st.get("factor_out", False)))
            if st.get("factor_out"):
                shape[0] //= 2
        d = int(np.prod(spec["input"]))
        self.prior_mean = torch.nn.Parameter(torch.zeros(d, dtype=DTYPE))
        self.prior_log_std = torch.nn.Parameter(torch.zeros(d, dtype=DTYPE))

    def linears(self):
        return [m for m in self.modules() if isinstance(m, SNLinear)]

    def named_iresnetc(self):
        """(iresnetc weight name, parameter or buffer) pairs, in the README's naming scheme."""
        out = []
        for s, blocks in enumerate(self.stages):
            for b, blk in enumerate(blocks):
                pre = f"stage{s}.block{b}"
                out += [(f"{pre}.actnorm.log_scale", blk.actnorm.log_scale), (f"{pre}.actnorm.bias", blk.actnorm.bias)]
                acts = lins = 0
                for m in blk.g:
                    if isinstance(m, Act):
                        if m.kind == "lipswish":
                            out.append((f"{pre}.act{acts}.beta", m.beta))
                        acts += 1
                    else:
                        name = f"{pre}.{'conv' if m.conv else 'dense'}{lins}"
                        m.iresnetc_name = name
                        out += [(f"{name}.weight", m.weight), (f"{name}.bias", m.bias)]
                        lins += 1
        return out + [("prior.mean", self.prior_mean), ("prior.log_std", self.prior_log_std)]


def load_init(model, path):
    """Initial weights from iresnetc: a weights file (its names) or a run's checkpoint
    (`param.NAME`, with the spectral norm's persistent `sn.u.LAYER`, `sn.v.LAYER`).
    Returns True when u, v came with it (then they are used as they are)."""
    from safetensors.numpy import load_file
    st = load_file(path)
    ck = any(k.startswith("param.") for k in st)
    get = (lambda n: st.get("param." + n)) if ck else st.get
    with torch.no_grad():
        for name, t in model.named_iresnetc():
            a = get(name)
            if a is None:
                raise SystemExit(f"{path}: no tensor {name}")
            # Exact shapes (a transposed weight must not load silently); a 1-element beta may be [] or [1].
            if tuple(a.shape) != tuple(t.shape) and not (a.size == t.numel() == 1):
                raise SystemExit(f"{path}: {name} has shape {list(a.shape)}, the model needs {list(t.shape)}")
            t.copy_(torch.tensor(a, dtype=DTYPE).view(t.shape))
        have_uv = ck and all(f"sn.u.{m.iresnetc_name}" in st for m in model.linears())
        if have_uv:
            for m in model.linears():
                m.u.copy_(torch.tensor(st[f"sn.u.{m.iresnetc_name}"], dtype=DTYPE).view(m.u.shape))
                m.v.copy_(torch.tensor(st[f"sn.v.{m.iresnetc_name}"], dtype=DTYPE).view(m.v.shape))
    return have_uv


def roulette_weights(est, rng):
    terms = est["terms"]
    if est["estimator"] != "roulette":
        return [1.0] * terms
    dist, p = est["roulette"], est["roulette_param"]
    extra = rng.geometric(p) - 1 if dist == "geometric" else rng.poisson(p)

    def survival(m):
        if dist == "geometric":
            return (1 - p) ** m
        return 1 - sum(math.exp(-p) * p ** j / math.factorial(j) for j in range(m))

    return [1.0 if k <= terms else 1.0 / survival(k - terms) for k in range(1, terms + extra + 1)]


def block_logdet(g, x, est, rng, training):
    """log det(I + J_g) per sample; its gradient is exact (2-D) or the Neumann estimator's."""
    d = x[0].numel()
    if est["estimator"] == "exact" and d <= 16:
        x = x.requires_grad_(True) if not x.requires_grad else x
        gx = g(x)
        rows = []
        for i in range(d):
            e = torch.zeros_like(gx).flatten(1)
            e[:, i] = 1
            rows.append(torch.autograd.grad(gx, x, e.view_as(gx), create_graph=training, retain_graph=True)[0].flatten(1))
        j = torch.stack(rows, 1)
        eye = torch.eye(d, dtype=x.dtype).expand_as(j)
        return gx, torch.linalg.slogdet(eye + j)[1]
    weights = roulette_weights(est, rng)
    if not x.requires_grad:
        x = x.requires_grad_(True)
    gx = g(x)
    v = torch.randn_like(x)
    u, w, value = v, torch.zeros_like(v), torch.zeros(x.shape[0], dtype=x.dtype)
    for k, c in enumerate(weights, start=1):
        w = w + (-1) ** (k - 1) * c * u
        u = torch.autograd.grad(gx, x, u, retain_graph=True)[0]
        value = value + (-1) ** (k + 1) * c * (u * v).flatten(1).sum(1) / k
    if not training:
        return gx, value.detach()
    # d/dtheta of w^T J v with w held constant: the Neumann log-det gradient.
    surrogate = (torch.autograd.grad(gx, x, w.detach(), create_graph=True)[0] * v).flatten(1).sum(1)
    return gx, value.detach() + surrogate - surrogate.detach()


def log_prob(model, x, est, rng, training):
    spec = model.spec
    if spec.get("squeeze"):
        x = squeeze(x)
    if spec.get("pad_channels"):
        x = F.pad(x, (0, 0, 0, 0, 0, spec["pad_channels"] - x.shape[1]))
    logdet = torch.zeros(x.shape[0], dtype=x.dtype)
    zs = []
    for blocks, (sq, fo) in zip(model.stages, model.plan):
        if sq:
            x = squeeze(x)
        for b in blocks:
            x, ld = b.actnorm(x)
            gx, bld = block_logdet(b.g, x, est, rng, training)
            x = x + gx
            logdet = logdet + ld + bld
        if fo:
            c = x.shape[1] // 2
            zs.append(x[:, c:].flatten(1))
            x = x[:, :c]
    z = torch.cat(zs + [x.flatten(1)], 1)
    t = (z - model.prior_mean) * torch.exp(-model.prior_log_std)
    prior = (-0.5 * t * t - model.prior_log_std - 0.5 * math.log(2 * math.pi)).sum(1)
    return prior + logdet


def main():
    ap = safeio.ArgParser(prog="train_ref.py", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--heldout", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--metrics", default="train_ref_metrics.jsonl")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--init-weights", help="iresnetc's initial raw weights: a weights file, or a run's step-0 "
                    "checkpoint (`iresnetc train ... --stop-after 0`), whose u, v are used too")
    ap.add_argument("--save-init", help="write this run's initial raw weights (iresnetc's names, F64) to a "
                    "safetensors file, for `iresnetc train --weights FILE`, and exit")
    ap.add_argument("--iresnetc-data", action="store_true",
                    help="2-D flows: draw the training batches and the held-out sample from iresnetc's "
                         "random streams of --seed (the very points `iresnetc train --seed S` uses)")
    a = ap.parse_args()
    try:
        # --save-init exits before training: then it is the only output.
        declared = {"--save-init": a.save_init} if a.save_init else {"--metrics": a.metrics}
        outs = safeio.Outputs(declared, inputs={"MODEL": a.model, "--data": a.data, "--init-weights": a.init_weights})
    except safeio.OutputError as e:
        return safeio.fail("train_ref.py", e)
    global DTYPE
    DTYPE = getattr(torch, a.dtype)
    torch.set_num_threads(a.threads)
    # Subnormal floats take a slow path on x86; flush them like an accelerator would.
    torch.set_flush_denormal(True)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    spec = tomllib.load(open(a.model, "rb"))
    tr = {"optimizer": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "momentum": 0.9,
          "weight_decay": 0.0, "warmup": 0, "clip": 0.0, "ema": 0.0, "batch": 64, "steps": 1000,
          "power_iters": 5, "heldout": 10000, "estimator": None, "lipswish_beta": None}
    tr.update(spec.get("train", {}))
    est = {"estimator": "series", "terms": 5, "roulette": "geometric", "roulette_param": 0.5}
    est.update(spec.get("logdet", {}))
    eval_est = dict(est, estimator="exact" if est["estimator"] == "exact" else "series")
    if tr["estimator"]:
        est["estimator"] = tr["estimator"]
    steps, batch, lr = a.steps or tr["steps"], a.batch or tr["batch"], a.lr or tr["lr"]
    global BETA_RAW
    if tr["lipswish_beta"]:
        b = tr["lipswish_beta"]
        BETA_RAW = b + math.log1p(-math.exp(-b))  # softplus(BETA_RAW) = b
    heldout = a.heldout or tr["heldout"]
    deq = spec.get("data", {}).get("dequantize", False)
    model = Flow(spec)
    lin = model.linears()
    given_uv = load_init(model, a.init_weights) if a.init_weights else False
    if a.save_init:
        from safetensors.numpy import save
        outs.commit({Path(a.save_init): save({n: t.detach().to(torch.float64).numpy().copy()
                                              for n, t in model.named_iresnetc()})})
        return 0
    if not given_uv:
        for m in lin:
            m.power(50)
    params = list(model.parameters())
    opt = {"adam": lambda: torch.optim.Adam(params, lr, (tr["beta1"], tr["beta2"]), tr["eps"], tr["weight_decay"]),
           "adamax": lambda: torch.optim.Adamax(params, lr, (tr["beta1"], tr["beta2"]), tr["eps"], tr["weight_decay"]),
           "sgd": lambda: torch.optim.SGD(params, lr, tr["momentum"], weight_decay=tr["weight_decay"])}[tr["optimizer"]]()
    warm = tr["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warm) if warm else 1.0)
    # Like iresnetc: the average starts from the parameters after the first update (so it
    # never averages in the ActNorm parameters from before their data-dependent init).
    ema = None
    is_toy = not os.path.exists(a.data)
    if is_toy and a.iresnetc_data:
        held = torch.tensor(toy_iresnetc(a.data, heldout, SplitMix(a.seed, [STREAM_HELDOUT])), dtype=DTYPE)
    elif is_toy:
        held = torch.tensor(toy(a.data, heldout, np.random.default_rng(a.seed + 1)), dtype=DTYPE)
    else:
        train_x = image_set(a.data, False)
        held = torch.tensor(image_set(a.data, True)[:heldout], dtype=DTYPE)
    dim = int(np.prod(spec["input"]))

    def prep(x):
        return (255 * x + torch.rand_like(x)) / 256 - 0.5 if deq else x

    def evaluate():
        saved = [p.detach().clone() for p in params]
        if ema is not None:
            with torch.no_grad():
                for p, e in zip(params, ema):
                    p.copy_(e)
        total = 0.0
        for i in range(0, len(held), 500):
            x = prep(held[i:i + 500].clone())
            with torch.enable_grad():
                total += -log_prob(model, x, eval_est, rng, False).sum().item()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        nll = total / len(held)
        return nll / (dim * math.log(2)) + (8 if deq else 0) if len(spec["input"]) == 3 else nll

    # The metrics are written when the run ends (all or nothing, like every output here).
    metrics = []
    perm, pos, epoch = None, 0, 0
    start = time.time()
    for step in range(1, steps + 1):
        t0 = time.time()
        if is_toy and a.iresnetc_data:
            x = torch.tensor(toy_iresnetc(a.data, batch, SplitMix(a.seed, [STREAM_DATA, step - 1])), dtype=DTYPE)
        elif is_toy:
            x = torch.tensor(toy(a.data, batch, rng), dtype=DTYPE)
        else:
            idx = []
            while len(idx) < batch:
                if perm is None or pos >= len(perm):
                    perm, pos, epoch = rng.permutation(len(train_x)), 0, epoch + 1
                take = perm[pos:pos + batch - len(idx)]
                idx.extend(take)
                pos += len(take)
            x = torch.tensor(train_x[idx], dtype=DTYPE)
        x = prep(x)
        for m in lin:
            m.power(tr["power_iters"])
        loss = -log_prob(model, x, est, rng, True).mean()
        opt.zero_grad()
        loss.backward()
        gn = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None)).item()
        if tr["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, tr["clip"])
        cur_lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        if tr["ema"] > 0:
            with torch.no_grad():
                if ema is None:
                    ema = [p.detach().clone() for p in params]
                for p, e in zip(params, ema):
                    e.mul_(tr["ema"]).add_((1 - tr["ema"]) * p)
        rec = {"step": step, "loss": loss.item(), "lr": cur_lr, "grad_norm": gn,
               "samples_per_s": batch / (time.time() - t0)}
        if a.eval_every and step % a.eval_every == 0:
            rec["heldout"] = evaluate()
        metrics.append(json.dumps(rec) + "\n")
    elapsed = time.time() - start
    final = evaluate()
    outs.commit({Path(a.metrics): "".join(metrics).encode()})
    unit = "bits/dim" if len(spec["input"]) == 3 else "nats"
    print(json.dumps({"steps": steps, "steps_per_s": steps / elapsed, "heldout": final, "unit": unit}))


if __name__ == "__main__":
    sys.exit(main())
