#!/usr/bin/env python3
"""PyTorch CUDA timings of the work `iresnetc bench` measures on wgpu, for comparison.

For a model file (default models/cifar.toml) at each batch size (default 1 and 64):
  forward          z and the ActNorm log-det (no series),
  forward+logdet   forward plus the 5-term (the model's `logdet.terms`) Hutchinson series
                   of every block, one Gaussian probe: w <- w^T J_g by autograd, term k
                   (-1)^(k+1) <w, v> / k, as the i-ResNet reference code does,
  inverse          every block inverted by N fixed-point steps (x <- y - g(x), default 10),
                   then ActNorm's inverse, in the multi-scale order,
each in three precisions: fp32 with TF32 off (the comparison the issue's goal names),
fp32 with TF32 on, and bf16 (weights and activations). Times are CUDA-event medians after
warm-up, in ms; the network is `parity.py`'s PyTorch module (weights randomly initialized and
scaled so every branch is a contraction: the timings do not depend on trained values).

    python3 examples/pytorch/cuda_bench.py [--model M] [--batch 1,64] [--json out.json]

Without CUDA it says so and exits with status 3 (nothing measured); `--device cpu` runs the
same code on the CPU as a dry run (for small models: it checks the script, not a speed).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import safeio  # noqa: E402

try:
    import torch
except ModuleNotFoundError:
    print("cuda_bench.py: PyTorch is not installed; nothing to measure", file=sys.stderr)
    sys.exit(3)

from parity import IResNet, load_spec, squeeze2x2  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def unsqueeze2x2(x: torch.Tensor, order: str) -> torch.Tensor:
    """The inverse of parity.squeeze2x2."""
    if order == "pixel_unshuffle":
        return torch.nn.functional.pixel_shuffle(x, 2)
    b, c4, h, w = x.shape
    c = c4 // 4
    # space_to_depth: channel (2*dy + dx)*C + c.
    x = x.view(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c, 2 * h, 2 * w)


def contract(model: IResNet, factor: float = 0.5) -> None:
    """Scales each branch's linear maps so that g is a contraction (product of spectral norms
    <= factor), estimated by a few power iterations on the weight matrices."""
    with torch.no_grad():
        for _, blk in model.blocks_in_order:
            layers = blk.linear_layers()
            per = factor ** (1.0 / len(layers))
            for _, layer in layers:
                w = layer.weight
                k = w.shape[-1] if w.dim() == 4 else 1
                mat = w.reshape(w.shape[0], -1)
                v = torch.randn(mat.shape[1], device=w.device)
                for _ in range(20):
                    v = mat.t() @ (mat @ v)
                    v = v / v.norm()
                sigma = (mat @ v).norm().item() * k  # k*k taps bound the conv by k * ||W||
                layer.weight.mul_(per / max(sigma, 1e-12))


def logdet_series(blk, a: torch.Tensor, terms: int, probe: torch.Tensor) -> torch.Tensor:
    a = a.detach().requires_grad_(True)
    with torch.enable_grad():
        ga = blk.g(a)
        w, total = probe, torch.zeros(a.shape[0], device=a.device, dtype=torch.float32)
        for k in range(1, terms + 1):
            (w,) = torch.autograd.grad(ga, a, w, retain_graph=k < terms)
            total = total + (-1) ** (k + 1) * (w * probe).flatten(1).sum(1).float() / k
    return ga.detach(), total


def forward(model: IResNet, x: torch.Tensor, terms: int):
    """z, the log-det (ActNorm terms, plus the series when terms > 0) and the latent parts."""
    spec = model.spec
    if spec["squeeze"]:
        x = squeeze2x2(x, spec["squeeze_order"])
    ld = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
    latents = []
    for s, st in enumerate(spec["stages"]):
        if st["squeeze"]:
            x = squeeze2x2(x, spec["squeeze_order"])
        stage = getattr(model, f"stage{s}")
        for b in range(st["blocks"]):
            blk = getattr(stage, f"block{b}")
            ld = ld + blk.actnorm.logdet(x).float()
            a = blk.actnorm(x)
            if terms > 0:
                ga, series = logdet_series(blk, a, terms, torch.randn_like(a))
                ld = ld + series
            else:
                ga = blk.g(a)
            x = a + ga
        if st["factor_out"]:
            c = x.shape[1]
            first, second = x[:, : c // 2], x[:, c // 2 :]
            out, x = (first, second) if spec["factor_out_half"] == "first" else (second, first)
            latents.append(out)
    latents.append(x)
    return torch.cat([t.flatten(1) for t in latents], 1), ld, latents


def inverse(model: IResNet, parts: list[torch.Tensor], steps: int) -> torch.Tensor:
    """x from the latent parts (as `forward` factored them out, the last one the final
    activation), `steps` fixed-point steps per block."""
    spec = model.spec
    parts = list(parts)
    x = parts.pop()
    for s in reversed(range(len(spec["stages"]))):
        st = spec["stages"][s]
        if st["factor_out"]:
            out = parts.pop()
            x = torch.cat([out, x] if spec["factor_out_half"] == "first" else [x, out], 1)
        stage = getattr(model, f"stage{s}")
        for b in reversed(range(st["blocks"])):
            blk = getattr(stage, f"block{b}")
            y, a = x, x
            for _ in range(steps):
                a = y - blk.g(a)
            an = blk.actnorm
            x = (a - an._view(an.bias, a)) * torch.exp(-an._view(an.log_scale, a))
        if st["squeeze"]:
            x = unsqueeze2x2(x, spec["squeeze_order"])
    if spec["squeeze"]:
        x = unsqueeze2x2(x, spec["squeeze_order"])
    return x


def split_parts(model: IResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The latent parts of `forward` in their shapes (for the inverse's input)."""
    spec = model.spec
    if spec["squeeze"]:
        x = squeeze2x2(x, spec["squeeze_order"])
    parts = []
    for st in spec["stages"]:
        if st["squeeze"]:
            x = squeeze2x2(x, spec["squeeze_order"])
        if st["factor_out"]:
            c = x.shape[1]
            first, second = x[:, : c // 2], x[:, c // 2 :]
            out, x = (first, second) if spec["factor_out_half"] == "first" else (second, first)
            parts.append(out.contiguous())
    parts.append(x.contiguous())
    return parts


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = safeio.ArgParser(prog="cuda_bench.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models/cifar.toml"))
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--inverse-steps", type=int, default=10)
    ap.add_argument("--terms", type=int, default=None, help="series terms (default: the model's)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,tf32,bf16")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--json", default=None, help="write the rows here (checked before measuring)")
    ap.add_argument("--check", action="store_true", help="check inverse(forward(x)) = x first")
    a = ap.parse_args()
    try:
        outs = safeio.Outputs({"--json": a.json}, inputs={"--model": a.model})
    except safeio.OutputError as e:
        return safeio.fail("cuda_bench.py", e)

    if a.device == "cuda" and not torch.cuda.is_available():
        print(
            f"cuda_bench.py: no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); nothing measured. `--device cpu` runs a dry run.",
            file=sys.stderr,
        )
        return 3
    try:
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        print(f"cuda_bench.py: --batch {a.batch!r}: expected integers like 1,64", file=sys.stderr)
        return 2
    spec = load_spec(Path(a.model))
    if spec["kind"] != "flow":
        print(f"cuda_bench.py: {a.model}: a flow model is needed", file=sys.stderr)
        return 2
    terms = a.terms if a.terms is not None else spec.get("logdet", {}).get("terms", 5)
    device = torch.device(a.device)
    torch.manual_seed(0)
    base = IResNet(spec).to(device).eval()
    contract(base)
    name = spec.get("name", Path(a.model).stem)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name} on {dev_name} (torch {torch.__version__}), {terms} series terms, "
          f"{a.inverse_steps} inverse steps; median ms of {a.reps} after {a.warmup} warm-ups")
    rows = []
    for prec in a.precisions.split(","):
        if prec not in ("fp32", "tf32", "bf16"):
            print(f"cuda_bench.py: unknown precision {prec!r}", file=sys.stderr)
            return 2
        tf32 = prec == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        model = copy.deepcopy(base).to(dtype)
        for batch in batches:
            x = torch.rand(batch, *spec["input"], device=device, dtype=dtype) - 0.5
            with torch.no_grad():
                z, _, real_parts = forward(model, x, 0)
                parts = split_parts(model, x)
                if a.check:
                    # The inverse of the real latents must give x back (g is a contraction).
                    back = inverse(model, real_parts, max(a.inverse_steps, 40))
                    err = (back.float() - x.float()).abs().max().item()
                    print(f"  check {prec} batch {batch}: inverse(forward(x)) - x = {err:.2e}")
                    if prec == "fp32" and err > 1e-3:
                        print("cuda_bench.py: inverse check failed", file=sys.stderr)
                        return 1
            work = {
                "forward": lambda: forward(model, x, 0),
                "forward+logdet": lambda: forward(model, x, terms),
                "inverse": lambda: inverse(model, parts, a.inverse_steps),
            }
            for entry, fn in work.items():
                grad = torch.enable_grad() if entry == "forward+logdet" else torch.no_grad()
                with grad:
                    ms = timed(fn, device, a.warmup, a.reps)
                rows.append({"model": name, "entry": entry, "precision": prec, "batch": batch,
                             "median_ms": ms, "ms_per_image": ms / batch})
                print(f"  {entry:<15} {prec:<5} batch {batch:>4}: {ms:10.3f} ms "
                      f"({ms / batch:8.3f} ms/image)", flush=True)
            if not torch.isfinite(z.float()).all():
                print("cuda_bench.py: warning: non-finite z", file=sys.stderr)
    if a.json:
        outs.commit({Path(a.json): json.dumps({"device": dev_name, "rows": rows}, indent=2).encode()})
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
