#!/usr/bin/env python3
"""Times PyTorch CPU (f32) on an iresnetc model: forward, forward + log-det, inverse.

The network is parity.py's PyTorch implementation (written from the README's
architecture), run in f32 with `--threads` threads (default 2, this machine's
cores). The log-det is the official i-ResNet estimator: per block, the power
series sum_k (-1)^(k+1) v^T J^k v / k with `terms` vector-Jacobian products
from autograd, `probes` Gaussian probes per sample (the model file's [logdet]).
The inverse is the fixed point x <- y - g(x) per block in reverse order, stopped
as iresnetc's CPU engine stops: when the largest step is <= inverse.tol, when the
smallest step has not improved for 3 steps (f32's precision floor), or at
inverse.max_iters. The steps taken are reported, so a per-step cost compares too.

    python3 examples/pytorch/torch_bench.py build/cifar --batch 8 --json out.json

MODEL is a bundle directory (model.toml + its normalized weights.safetensors) or
a model file with --weights; spectral normalization must already be applied
(a bundle's weights are), or the inverse may not converge.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import safeio  # noqa: E402

try:
    import torch
    from safetensors.torch import load_file
except ModuleNotFoundError as e:
    sys.exit(safeio.fail("torch_bench.py", f"{e.name} is not installed: run `bash examples/pytorch/setup.sh` "
                                           "and use examples/pytorch/.venv/bin/python"))
from parity import IResNet, load_spec, median_time, squeeze2x2  # noqa: E402


def forward_logdet(model: IResNet, x: torch.Tensor, terms: int, probes: int, gen: torch.Generator):
    """z and the power-series log-det, block by block as the official code does."""
    spec = model.spec
    if spec["squeeze"]:
        x = squeeze2x2(x, spec["squeeze_order"])
    if spec["pad_channels"]:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, spec["pad_channels"] - x.shape[1]))
    ld = torch.zeros(x.shape[0])
    latents = []
    for s, st in enumerate(spec["stages"]):
        if st["squeeze"]:
            x = squeeze2x2(x, spec["squeeze_order"])
        stage = getattr(model, f"stage{s}")
        for b in range(st["blocks"]):
            blk = getattr(stage, f"block{b}")
            with torch.no_grad():
                ld = ld + blk.actnorm.logdet(x)
                a = blk.actnorm(x)
            a = a.detach().requires_grad_(True)
            with torch.enable_grad():
                fa = blk.g(a)
                dims = tuple(range(1, a.dim()))
                for _ in range(probes):
                    v = torch.randn(a.shape, generator=gen)
                    w = v
                    for k in range(1, terms + 1):
                        (w,) = torch.autograd.grad(fa, a, w, retain_graph=True)
                        ld = ld + (-1) ** (k + 1) * (w * v).sum(dims).detach() / (k * probes)
            x = (a + fa).detach()
        if st["factor_out"]:
            c = x.shape[1]
            first, second = x[:, : c // 2], x[:, c // 2:]
            out, x = (first, second) if spec["factor_out_half"] == "first" else (second, first)
            latents.append(out.flatten(1))
    latents.append(x.flatten(1))
    return torch.cat(latents, 1), ld


def inverse(model: IResNet, z: torch.Tensor, tol: float, max_iters: int):
    """x from z; returns (x, fixed-point steps taken in all blocks)."""
    spec = model.spec
    # Rebuild the per-stage shapes by running the walk's shape logic on a probe.
    shapes, latent_sizes = [], []
    shape = list(spec["input"])
    if spec["squeeze"]:
        shape = [shape[0] * 4, shape[1] // 2, shape[2] // 2]
    if spec["pad_channels"]:
        shape = [spec["pad_channels"]] + shape[1:]
    for st in spec["stages"]:
        if st["squeeze"]:
            shape = [shape[0] * 4, shape[1] // 2, shape[2] // 2]
        shapes.append(list(shape))
        if st["factor_out"]:
            c = shape[0]
            out = c // 2 if spec["factor_out_half"] == "first" else c - c // 2
            latent_sizes.append(out * math.prod(shape[1:]))
            shape = [c - out] + shape[1:]
        else:
            latent_sizes.append(0)
    n = z.shape[0]
    offsets, off = [], 0
    for size in latent_sizes:
        offsets.append(off)
        off += size
    x = z[:, off:].reshape([n] + shape)
    steps = 0
    for s in reversed(range(len(spec["stages"]))):
        st = spec["stages"][s]
        if st["factor_out"]:
            c = shapes[s][0]
            out_c = c // 2 if spec["factor_out_half"] == "first" else c - c // 2
            part = z[:, offsets[s]:offsets[s] + latent_sizes[s]].reshape([n, out_c] + shapes[s][1:])
            x = torch.cat([part, x] if spec["factor_out_half"] == "first" else [x, part], 1)
        stage = getattr(model, f"stage{s}")
        for b in reversed(range(st["blocks"])):
            blk = getattr(stage, f"block{b}")
            y, a = x, x
            best, stalled = math.inf, 0
            for _ in range(max_iters):
                a_new = y - blk.g(a)
                step = (a_new - a).abs().max().item()
                a = a_new
                steps += 1
                if step <= tol:
                    break
                if step < best:
                    best, stalled = step, 0
                else:
                    stalled += 1
                    if stalled >= 3:
                        break
            an = blk.actnorm
            x = (a - an._view(an.bias, a)) * torch.exp(-an._view(an.log_scale, a))
        if st["squeeze"]:
            x = torch.nn.functional.pixel_shuffle(x, 2) if spec["squeeze_order"] == "pixel_unshuffle" \
                else unsqueeze_s2d(x)
    if spec["pad_channels"]:
        x = x[:, : spec["input"][0]]
    if spec["squeeze"]:
        x = torch.nn.functional.pixel_shuffle(x, 2) if spec["squeeze_order"] == "pixel_unshuffle" \
            else unsqueeze_s2d(x)
    return x, steps


def unsqueeze_s2d(x: torch.Tensor) -> torch.Tensor:
    """Inverse of parity.squeeze2x2 in the space_to_depth order (channel (2*dy+dx)*C + c)."""
    n, c4, h, w = x.shape
    c = c4 // 4
    return x.reshape(n, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c, 2 * h, 2 * w)


def main() -> int:
    ap = safeio.ArgParser(prog="torch_bench.py", description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--entries", default="forward,forward+logdet,inverse")
    ap.add_argument("--json", help="write the results here (a str: Path() would drop a trailing slash)")
    args = ap.parse_args()
    try:
        outs = safeio.Outputs({"--json": args.json}, inputs={
            "MODEL": args.model, "--weights": args.weights, "MODEL/model.toml": args.model / "model.toml",
            "MODEL/weights.safetensors": args.model / "weights.safetensors"})
    except safeio.OutputError as e:
        return safeio.fail("torch_bench.py", e)
    torch.set_num_threads(args.threads)
    toml = args.model / "model.toml" if args.model.is_dir() else args.model
    weights = args.weights or (args.model / "weights.safetensors")
    spec = load_spec(toml)
    import tomllib
    raw = tomllib.loads(toml.read_text())
    ld_cfg, inv_cfg = raw.get("logdet", {}), raw.get("inverse", {})
    terms, probes = int(ld_cfg.get("terms", 5)), int(ld_cfg.get("probes", 1))
    tol, max_iters = float(inv_cfg.get("tol", 1e-6)), int(inv_cfg.get("max_iters", 100))
    model = IResNet(spec).eval()
    sd = {k: v.float() for k, v in load_file(str(weights)).items()}
    model.load_state_dict(sd, strict=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand([args.batch] + list(spec["input"]), generator=gen) * 2 - 1
    res = {"model": str(args.model), "batch": args.batch, "threads": args.threads, "torch": torch.__version__,
           "terms": terms, "probes": probes}
    entries = args.entries.split(",")
    with torch.no_grad():
        z, _, _ = model(x)
    if "forward" in entries:
        with torch.no_grad():
            t, ts = median_time(lambda: model(x), args.warmup, args.reps)
        res["forward_s"] = t
    if "forward+logdet" in entries:
        t, _ = median_time(lambda: forward_logdet(model, x, terms, probes, gen), args.warmup, args.reps)
        res["forward_logdet_s"] = t
    if "inverse" in entries:
        with torch.no_grad():
            xr, steps = inverse(model, z, tol, max_iters)
            res["inverse_roundtrip_max_abs_err"] = (xr - x).abs().max().item()
            t, _ = median_time(lambda: inverse(model, z, tol, max_iters), args.warmup, args.reps)
        res["inverse_s"], res["inverse_steps"] = t, steps
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))
    if args.json:
        outs.commit({Path(args.json): json.dumps(res, indent=1).encode()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
