#!/usr/bin/env python3
"""PyTorch parity check for iresnetc.

Builds the network of an iresnetc model file in plain PyTorch (written from the
documented architecture; nothing is imported from iresnetc), loads the weights by
the documented names, runs the same input through PyTorch and through
`iresnetc run --backend reference` (the f64 reference executor), and compares z (or the
logits of a classifier) and the exact log-det. Then times PyTorch CPU against the
wall time of the same iresnetc command.

    examples/pytorch/.venv/bin/python examples/pytorch/parity.py models/cifar-tiny.toml --batch 8

MODEL is a model file (.toml) or a bundle directory from `iresnetc compile`
(model.toml + weights.safetensors). Without --weights (and without a bundle) the
script writes its own weights (PyTorch's default init, seeded) to a safetensors
file and hands that file to iresnetc.

Spectral normalization: iresnetc loads a weights file and then rescales each
linear map of a residual branch, W <- W / max(1, sigma / c). The factor of every
layer is in `iresnetc inspect --json` (`lipschitz.layers[].scale`); this script
applies the same factors to the PyTorch weights, so both sides run the same
normalized network (for a bundle's already normalized weights all factors are 1).
With --check-sigma it also estimates each layer's sigma independently in PyTorch
(power iteration on the operator at its input shape) and compares.

Architecture (the README's): optional squeeze (2x2 space-to-depth in the model's
`squeeze_order`: "space_to_depth", channel (2*dy + dx)*C + c, the default and the
official i-ResNet order, or "pixel_unshuffle", F.pixel_unshuffle(2)) and channel
zero-padding; stages of blocks y = a + g(a), a = ActNorm(x) = x*exp(log_scale)+bias
per channel; g = [act] conv_k0 -> act -> conv_k1 -> act -> conv_k2 ('same' padding,
with bias; widths: hidden = stage width, last = input channels) or the MLP
equivalent with dense layers; no input activation in the model's very first
block; factor-out sends the half named by `factor_out_half` ("first", the
default, or "second") to z and keeps the other; the rest goes to
z; z = concat(flattened factored-out parts in order, final part). LipSwish is
x*sigmoid(softplus(beta)*x)/1.1. Classifier head: eval batch norm -> ReLU ->
global average pool -> linear.

Exit status: 0 on PASS, 1 on FAIL, 2 on a usage or tool error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import safeio  # noqa: E402

try:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from safetensors.torch import load_file, save, save_file
except ModuleNotFoundError as e:  # named after the script run: torch_bench.py, cuda_bench.py import this
    sys.exit(safeio.fail(Path(sys.argv[0]).name, f"{e.name} is not installed: run `bash examples/pytorch/setup.sh` "
                                                 "and use examples/pytorch/.venv/bin/python"))

REPO = Path(__file__).resolve().parents[2]
LIPSWISH_DIV = 1.1


# --------------------------------------------------------------------------- spec


def squeeze2x2(x: torch.Tensor, order: str) -> torch.Tensor:
    """2x2 space-to-depth. pixel_unshuffle puts (c, dy, dx) at channel 4c + 2dy + dx;
    space_to_depth (ONNX SpaceToDepth, the official i-ResNet squeeze) at (2dy + dx)C + c."""
    if order == "pixel_unshuffle":
        return F.pixel_unshuffle(x, 2)
    if order != "space_to_depth":
        raise ValueError(f"squeeze_order {order!r}")
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def load_spec(path: Path) -> dict:
    with open(path, "rb") as f:
        s = tomllib.load(f)
    s.setdefault("squeeze", False)
    s.setdefault("squeeze_order", "space_to_depth")
    s.setdefault("factor_out_half", "first")
    s.setdefault("pad_channels", None)
    s.setdefault("seed", 0)
    lip = s.setdefault("lipschitz", {})
    lip.setdefault("coeff", 0.9)
    for st in s["stages"]:
        st.setdefault("width", None)
        st.setdefault("kernels", None)
        st.setdefault("hidden", None)
        st.setdefault("activation", "elu")
        st.setdefault("squeeze", False)
        st.setdefault("factor_out", False)
    if s["kind"] == "classifier":
        head = s.get("head") or {}
        head.setdefault("classes", 10)
        head.setdefault("batchnorm", True)
        head.setdefault("bn_eps", 1e-5)
        s["head"] = head
    return s


# ------------------------------------------------------------------------ modules


class ActNorm(nn.Module):
    """y = x * exp(log_scale) + bias, per channel (per feature for vectors)."""

    def __init__(self, channels: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._view(self.log_scale.exp(), x) + self._view(self.bias, x)

    def logdet(self, x: torch.Tensor) -> torch.Tensor:
        spatial = math.prod(x.shape[2:]) if x.dim() > 2 else 1
        return spatial * self.log_scale.sum()


class LipSwish(nn.Module):
    """x * sigmoid(softplus(beta) * x) / 1.1."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(F.softplus(self.beta) * x) / LIPSWISH_DIV


def activation(name: str) -> nn.Module:
    return {"elu": nn.ELU, "relu": nn.ReLU, "lipswish": LipSwish}[name]()


class Block(nn.Module):
    """ActNorm, then y = a + g(a). Submodules carry the weight names:
    actnorm, act{i}, conv{i} / dense{i}; `body` is g's order."""

    def __init__(self, shape: list[int], stage: dict, first_of_model: bool):
        super().__init__()
        self.actnorm = ActNorm(shape[0])
        self.body: list[str] = []
        n_act = 0

        def add_act():
            nonlocal n_act
            name = f"act{n_act}"
            self.add_module(name, activation(stage["activation"]))
            self.body.append(name)
            n_act += 1

        if len(shape) == 3:
            c = shape[0]
            width = stage["width"] or c
            kernels = stage["kernels"] or [3, 1, 3]
            cin = c
            for i, k in enumerate(kernels):
                if i > 0 or not first_of_model:
                    add_act()
                cout = c if i + 1 == len(kernels) else width
                self.add_module(f"conv{i}", nn.Conv2d(cin, cout, k, padding=k // 2, bias=True))
                self.body.append(f"conv{i}")
                cin = cout
        else:
            d = shape[0]
            widths = list(stage["hidden"] or []) + [d]
            fin = d
            for i, fout in enumerate(widths):
                if i > 0 or not first_of_model:
                    add_act()
                self.add_module(f"dense{i}", nn.Linear(fin, fout, bias=True))
                self.body.append(f"dense{i}")
                fin = fout

    def g(self, a: torch.Tensor) -> torch.Tensor:
        h = a
        for name in self.body:
            h = getattr(self, name)(h)
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.actnorm(x)
        return a + self.g(a), a

    def linear_layers(self):
        return [(n, getattr(self, n)) for n in self.body if n.startswith(("conv", "dense"))]


class EvalBatchNorm(nn.Module):
    """Batch norm in eval form (running statistics), state names as PyTorch's."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Prior(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(d))
        self.log_std = nn.Parameter(torch.zeros(d))


class IResNet(nn.Module):
    """The whole model; state_dict keys are iresnetc's weight names."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.kind = spec["kind"]
        shape = list(spec["input"])
        image = len(shape) == 3
        if spec["squeeze"]:
            shape = [shape[0] * 4, shape[1] // 2, shape[2] // 2]
        if spec["pad_channels"]:
            shape = [spec["pad_channels"]] + shape[1:]
        self.stage_names = []
        self.blocks_in_order: list[tuple[str, Block]] = []
        latent_dim = 0
        self.block_dims = []
        for s, st in enumerate(spec["stages"]):
            stage = nn.Module()
            if st["squeeze"]:
                shape = [shape[0] * 4, shape[1] // 2, shape[2] // 2]
            for b in range(st["blocks"]):
                blk = Block(shape, st, first_of_model=not self.blocks_in_order)
                stage.add_module(f"block{b}", blk)
                self.blocks_in_order.append((f"stage{s}.block{b}", blk))
                self.block_dims.append(math.prod(shape))
            self.add_module(f"stage{s}", stage)
            self.stage_names.append(f"stage{s}")
            if st["factor_out"]:
                c = shape[0]
                out = c // 2 if spec["factor_out_half"] == "first" else c - c // 2
                latent_dim += out * math.prod(shape[1:])
                shape = [c - out] + shape[1:]
        if self.kind == "flow":
            latent_dim += math.prod(shape)
            self.prior = Prior(latent_dim)
        else:
            head = spec["head"]
            self.head = nn.Module()
            if image:
                if head["batchnorm"]:
                    self.head.bn = EvalBatchNorm(shape[0], head["bn_eps"])
            self.head.linear = nn.Linear(shape[0], head["classes"])
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor, keep_block_inputs: bool = False):
        """Returns (z or logits, ActNorm log-det per sample, [(block, a)] where a is
        each block's branch input, for the exact log-det)."""
        spec = self.spec
        if spec["squeeze"]:
            x = squeeze2x2(x, spec["squeeze_order"])
        if spec["pad_channels"]:
            x = F.pad(x, (0, 0, 0, 0, 0, spec["pad_channels"] - x.shape[1]))
        ld = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        latents, inputs = [], []
        for s, st in enumerate(spec["stages"]):
            if st["squeeze"]:
                x = squeeze2x2(x, spec["squeeze_order"])
            stage = getattr(self, f"stage{s}")
            for b in range(st["blocks"]):
                blk = getattr(stage, f"block{b}")
                ld = ld + blk.actnorm.logdet(x)
                x, a = blk(x)
                if keep_block_inputs:
                    inputs.append((blk, a.detach()))
            if st["factor_out"]:
                c = x.shape[1]
                first, second = x[:, : c // 2], x[:, c // 2 :]
                out, x = (first, second) if spec["factor_out_half"] == "first" else (second, first)
                latents.append(out.flatten(1))
        if self.kind == "flow":
            latents.append(x.flatten(1))
            return torch.cat(latents, 1), ld, inputs
        if x.dim() == 4:
            if hasattr(self.head, "bn"):
                x = self.head.bn(x)
            x = F.relu(x).mean(dim=(2, 3))
        return self.head.linear(x), ld, inputs


def exact_branch_logdet(blk: Block, a: torch.Tensor, chunk: int) -> torch.Tensor:
    """ln|det(I + J_g(a_i))| per sample: the full Jacobian J_g(a_i), row r being the
    vector-Jacobian product e_r^T J_g (autograd, `chunk` rows per batched backward
    pass through one forward), then the log-determinant."""
    n, d = a.shape[0], a[0].numel()
    jac = np.empty((n, d, d))
    if d < 1024:
        # Small blocks: (sample, row) pairs batched together, one forward each
        # (cheaper than the vmap of batched gradients at this size).
        flat = jac.reshape(n * d, d)
        for s in range(0, n * d, chunk):
            pairs = torch.arange(s, min(s + chunk, n * d))
            xa = a[pairs // d].clone().requires_grad_(True)
            with torch.enable_grad():
                y = blk.g(xa).reshape(len(pairs), d)
            (r,) = torch.autograd.grad(y, xa, F.one_hot(pairs % d, d).to(a.dtype))
            flat[s : s + len(pairs)] = r.reshape(len(pairs), d).numpy()
    for i in range(n if d >= 1024 else 0):
        xi = a[i : i + 1].clone().requires_grad_(True)
        with torch.enable_grad():
            y = blk.g(xi).reshape(1, d)
        for s in range(0, d, chunk):
            rows = torch.arange(s, min(s + chunk, d))
            e = F.one_hot(rows, d).to(a.dtype).unsqueeze(1)  # [k, 1, d]
            (r,) = torch.autograd.grad(y, xi, e, retain_graph=True, is_grads_batched=True)
            jac[i, s : s + len(rows)] = r.reshape(len(rows), d).numpy()
        print(f"  [PyTorch exact log-det, {d}x{d} Jacobian: sample {i + 1}/{n}]", file=sys.stderr, flush=True)
    # numpy's slogdet (OpenBLAS), not torch.linalg.slogdet: the PyPI torch 2.15 wheel's
    # MKL fails on f64 LU beyond 128x128 on this machine's AVX-512 CPU ("Intel oneMKL
    # ERROR: Parameter 6 was incorrect on entry to DLASWP", then hangs); see README.md.
    return torch.from_numpy(np.linalg.slogdet(np.eye(d) + jac)[1])


def exact_logdet(model: IResNet, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        z, ld, inputs = model(x, keep_block_inputs=True)
    t0 = time.perf_counter()
    for k, (blk, a) in enumerate(inputs):
        ld = ld + exact_branch_logdet(blk, a, chunk)
        if a[0].numel() >= 1024:  # long: show progress
            print(f"  [PyTorch exact log-det: block {k + 1}/{len(inputs)}, {time.perf_counter() - t0:.0f} s]",
                  file=sys.stderr, flush=True)
    return z, ld


# -------------------------------------------------------------- weights and sigma


def init_weights(model: IResNet, seed: int) -> dict[str, torch.Tensor]:
    """PyTorch's default init for linear maps; small random ActNorm, prior, LipSwish
    and batch-norm values (not identities, so a wrong convention shows)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    gen = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(("log_scale", "actnorm.bias")) or k.startswith("prior."):
            v = 0.05 * torch.randn(v.shape, generator=gen)
        elif k.endswith(".beta"):
            v = 1.0 + 0.5 * torch.randn(v.shape, generator=gen)
        elif k.startswith("head.bn."):
            if k.endswith("running_var"):
                v = 1.0 + 0.1 * torch.rand(v.shape, generator=gen)
            elif k.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(v.shape, generator=gen)
            else:
                v = 0.1 * torch.randn(v.shape, generator=gen)
        sd[k] = v.detach().to(torch.float32).contiguous()
    return sd


def power_sigma(layer: nn.Module, in_shape: list[int], iters: int, seed: int) -> float:
    """Largest singular value of the layer's linear part as an operator on its
    input shape, by power iteration with the adjoint (transposed conv / W^T)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = layer.weight.detach()
        if isinstance(layer, nn.Linear):
            return torch.linalg.matrix_norm(w, ord=2).item()
        k = w.shape[-1]
        if k == 1:
            return torch.linalg.matrix_norm(w[:, :, 0, 0], ord=2).item()
        v = torch.randn(1, *in_shape, generator=gen, dtype=w.dtype)
        v /= v.norm()
        sigma = 0.0
        for _ in range(iters):
            u = F.conv2d(v, w, padding=k // 2)
            sigma_new = u.norm().item()
            u /= u.norm()
            v = F.conv_transpose2d(u, w, padding=k // 2)
            v /= v.norm()
            if abs(sigma_new - sigma) <= 1e-10 * sigma_new:
                sigma = sigma_new
                break
            sigma = sigma_new
        return sigma


# -------------------------------------------------------------------------- tools


def run_cmd(cmd: list[str], what: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        print(f"error: {what} failed (exit {p.returncode}):\n  {' '.join(cmd)}\n{p.stderr.strip()}", file=sys.stderr)
        sys.exit(2)
    return dt, p.stdout


def median_time(fn, warmup: int, reps: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def errors(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |ours - ref|, max |ours - ref| / max(1, |ref|)) elementwise."""
    d = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    return float(d.max(initial=0.0)), float((d / np.maximum(1.0, np.abs(ref))).max(initial=0.0))


def busy_cores(window: float = 1.0) -> float:
    """Cores kept busy by other processes while this one sleeps (from /proc/stat;
    the 1-min load average where that is missing)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(window)
        t1, i1 = sample()
        return (os.cpu_count() or 1) * (1.0 - (i1 - i0) / max(1, t1 - t0))
    except OSError:
        return os.getloadavg()[0]


def fmt_s(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = safeio.ArgParser(prog="parity.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="model file (.toml) or bundle directory")
    ap.add_argument("--weights", type=Path, help="safetensors file (default: the bundle's, else generated here)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated weights and of the input")
    ap.add_argument("--iresnetc", type=Path, default=REPO / "target/release/iresnetc")
    ap.add_argument("--backend", default="reference", choices=["reference", "cpu", "tract", "wgpu", "auto"],
                    help="iresnetc backend to compare with (default: reference, the f64 executor; cpu is the native f32 engine)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |err| / max(1, |ref|) allowed (default 1e-4)")
    ap.add_argument("--logdet", choices=["auto", "exact", "off"], default="auto",
                    help="exact log-det check: auto = when the block dimensions sum to <= --exact-budget")
    ap.add_argument("--exact-budget", type=int, default=4096,
                    help="--logdet auto checks the exact log-det when the block dimensions sum to at most this"
                         " (Jacobian rows, i.e. vjps, per sample; default 4096: toy2d, cifar-tiny, cifar-block yes,"
                         " cifar/mnist no). iresnetc itself refuses blocks above 4096 dimensions")
    ap.add_argument("--jac-chunk", type=int, default=256, help="vjps per batch when building a Jacobian")
    ap.add_argument("--reps", type=int, default=10, help="timed PyTorch repetitions (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2, this machine's cores)")
    ap.add_argument("--check-sigma", action="store_true",
                    help="also estimate each layer's sigma in PyTorch and compare with iresnetc's estimate")
    ap.add_argument("--workdir", type=Path, help="keep the arrays and weights here (default: a temp dir, removed)")
    ap.add_argument("--json", help="write the results as JSON here")  # a str: Path() drops a trailing slash
    ap.add_argument("--save-normalized",
                    help="write the spectrally normalized weights (F32 safetensors, iresnetc's names) here")
    args = ap.parse_args()
    # Written together at the end, if the comparison ran (PASS or FAIL); a bundle's files are inputs too.
    outs = safeio.declare("parity.py", {"--json": args.json, "--save-normalized": args.save_normalized}, {
        "MODEL": args.model, "--weights": args.weights, "--iresnetc": args.iresnetc,
        "MODEL/model.toml": args.model / "model.toml", "MODEL/weights.safetensors": args.model / "weights.safetensors"})
    pending = {}

    torch.set_num_threads(args.threads)
    exe = args.iresnetc
    if not exe.is_file():
        print(f"error: no iresnetc binary at {exe}; build it with `cargo build --release -p iresnetc` "
              "or pass --iresnetc PATH", file=sys.stderr)
        return 2

    model_path = args.model
    weights = args.weights
    run_target = [str(args.model)] + (["--weights", str(weights)] if weights else [])
    if model_path.is_dir():
        toml = model_path / "model.toml"
        if not toml.is_file():
            print(f"error: {model_path} is not a bundle (no model.toml)", file=sys.stderr)
            return 2
        weights = weights or model_path / "weights.safetensors"
        model_path = toml
    spec = load_spec(model_path)
    is_flow = spec["kind"] == "flow"

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="iresnetc-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = IResNet(spec).double().eval()
        for p in model.parameters():
            p.requires_grad_(False)

        # Weights: a given file, or PyTorch-initialized ones written for iresnetc.
        if weights is None:
            weights = work / "weights.safetensors"
            save_file(init_weights(IResNet(spec), args.seed), str(weights))
            weights_note = f"generated here (seed {args.seed}) -> {weights}"
        else:
            weights_note = str(weights)
        sd = {k: v.to(torch.float64) for k, v in load_file(str(weights)).items()}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            print(f"error: weight names differ from the documented scheme: missing {missing[:5]}, "
                  f"unexpected {unexpected[:5]}", file=sys.stderr)
            return 2

        # iresnetc's spectral normalization factors, applied to the same weights.
        t_inspect, out = run_cmd([str(exe), "inspect", str(model_path), "--weights", str(weights), "--json"],
                                 "iresnetc inspect")
        report = json.loads(out)
        layers = {l["name"]: l for l in report["lipschitz"]["layers"]}
        blocks = dict(model.blocks_in_order)
        if set(layers) != {f"{b}.{n}" for b, blk in model.blocks_in_order for n, _ in blk.linear_layers()}:
            print("error: iresnetc's normalized layers differ from the PyTorch model's linear layers", file=sys.stderr)
            return 2
        n_scaled = 0
        sigma_rel = []
        for lname, l in layers.items():
            bname, layer_name = lname.rsplit(".", 1)
            layer = getattr(blocks[bname], layer_name)
            if args.check_sigma:
                in_shape = [layer.weight.shape[1]] + list(spec_shape_of(model, spec, bname)[1:])
                s_pt = power_sigma(layer, in_shape, 2000, args.seed)
                sigma_rel.append((abs(s_pt - l["sigma_estimate"]) / s_pt, lname, s_pt, l["sigma_estimate"]))
            if l["scale"] != 1.0:
                n_scaled += 1
                layer.weight.div_(l["scale"])
        if args.save_normalized:
            pending[Path(args.save_normalized)] = save({k: v.float().contiguous() for k, v in model.state_dict().items()})

        # Input: the same values on both sides (f64 .npy; iresnetc reads f32 or f64).
        rng = np.random.default_rng(args.seed + 7)
        x_np = rng.uniform(-0.5, 0.5, size=(args.batch, *spec["input"]))
        x_path = work / "x.npy"
        np.save(x_path, x_np)
        x = torch.from_numpy(x_np)

        vjps = sum(model.block_dims)
        # iresnetc's exact estimator runs on the cpu backend (tract: 2-D blocks only, wgpu: none).
        backend_exact = args.backend == "reference" or (args.backend == "tract" and max(model.block_dims) <= 2)
        do_logdet = is_flow and (args.logdet == "exact" or
                                 (args.logdet == "auto" and vjps <= args.exact_budget and backend_exact))

        # iresnetc: with the exact log-det (if checked), and z alone (timed).
        z_path, ld_path = work / "z.npy", work / "ld.npy"
        mode = "forward" if is_flow else "classify"
        if not args.model.is_dir():  # a bundle directory is run as it is (its plan, ONNX and weights)
            run_target = [str(model_path), "--weights", str(weights)]
        base = [str(exe), "run", *run_target, "--backend", args.backend, "--mode", mode, "--input", str(x_path)]
        t_ir_ld = None
        if do_logdet:
            t_ir_ld, _ = run_cmd(base + ["--output", str(z_path), "--logdet-out", str(ld_path), "--estimator", "exact"],
                                 "iresnetc run (exact log-det)")
            ld_ir = np.load(ld_path).reshape(-1)
        t_ir, _ = run_cmd(base + ["--output", str(z_path)], "iresnetc run")
        z_ir = np.load(z_path)

        # PyTorch, f64 (parity) and f32 (the usual dtype; informative).
        with torch.no_grad():
            z64, _, _ = model(x)
        t0 = time.perf_counter()
        if do_logdet:
            _, ld64 = exact_logdet(model, x, args.jac_chunk)
        t_pt_ld = time.perf_counter() - t0
        load_before = busy_cores()
        model32 = IResNet(spec).eval()
        model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        x32 = x.float()
        with torch.no_grad():
            z32, _, _ = model32(x32)
            t_pt, samples = median_time(lambda: model32(x32), args.warmup, args.reps)

        what = "z" if is_flow else "logits"
        res = {"model": str(args.model), "weights": weights_note, "batch": args.batch, "tol": args.tol,
               "layers_rescaled_by_iresnetc": n_scaled, "latent_dim": z_ir.shape[1]}
        ok = True
        if z_ir.shape != tuple(z64.shape):
            print(f"FAIL: {what} shapes differ: iresnetc {z_ir.shape}, PyTorch {tuple(z64.shape)}")
            return 1
        ea, er = errors(z64.numpy(), z_ir)
        ea32, er32 = errors(z32.double().numpy(), z_ir)
        res[what] = {"max_abs_err": ea, "max_rel_err": er, "f32_max_abs_err": ea32, "f32_max_rel_err": er32}
        ok &= er <= args.tol
        if do_logdet:
            la, lr = errors(ld64.numpy(), ld_ir)
            res["logdet"] = {"max_abs_err": la, "max_rel_err": lr, "range": [float(ld_ir.min()), float(ld_ir.max())]}
            ok &= lr <= args.tol
        res["timing"] = {
            "pytorch_f32_forward_median_s": t_pt, "pytorch_f32_forward_samples_s": samples,
            "iresnetc_run_wall_s": t_ir, "iresnetc_inspect_wall_s": t_inspect,
            "ratio_iresnetc_wall_over_pytorch": t_ir / t_pt,
            "threads": args.threads, "other_busy_cores_before_timing": load_before,
        }
        if do_logdet:
            res["timing"].update({"pytorch_f64_exact_logdet_s": t_pt_ld, "iresnetc_run_exact_logdet_wall_s": t_ir_ld})
        if sigma_rel:
            worst = max(sigma_rel)
            res["sigma_check"] = {"max_rel_diff": worst[0], "layer": worst[1], "pytorch": worst[2], "iresnetc": worst[3]}
        res["pass"] = bool(ok)

        # Report.
        print(f"model {args.model} ({spec['kind']}), batch {args.batch}, weights {weights_note}")
        print(f"  iresnetc rescaled {n_scaled}/{len(layers)} linear layers (W / max(1, sigma/c)); applied the same factors")
        print(f"  {what:<7} [{args.batch}x{z_ir.shape[1]}]: max abs err {ea:.3e}, max rel err {er:.3e}"
              f"   (PyTorch f32 model: {ea32:.3e} / {er32:.3e}, informative)")
        if do_logdet:
            print(f"  log-det (exact, per sample, range {ld_ir.min():.4f} .. {ld_ir.max():.4f}): "
                  f"max abs err {la:.3e}, max rel err {lr:.3e}")
        elif is_flow:
            if args.logdet == "off":
                print("  log-det: not checked (--logdet off)")
            elif not backend_exact:
                print(f"  log-det: not checked (iresnetc's exact estimator does not run on --backend {args.backend})")
            else:
                print(f"  log-det: not checked (block dimensions sum to {vjps} > --exact-budget {args.exact_budget};"
                      " --logdet exact forces it)")
        if sigma_rel:
            w = res["sigma_check"]
            print(f"  sigma: PyTorch power iteration vs iresnetc estimate, max rel diff {w['max_rel_diff']:.2e} "
                  f"({w['layer']}: {w['pytorch']:.6f} vs {w['iresnetc']:.6f})")
        print(f"  timing ({args.threads} threads; other processes kept {load_before:.2f} of {os.cpu_count()}"
              f" cores busy just before):")
        if load_before > 0.3:
            print("    WARNING: other processes are busy: with OMP threads competing for cores PyTorch can run"
                  " 10-25x slower (spinning OpenMP barriers); rerun on a quiet machine, or compare with"
                  " OMP_WAIT_POLICY=PASSIVE or --threads 1")
        print(f"    PyTorch f32 forward ({what}), median of {args.reps} after {args.warmup} warm-up: {fmt_s(t_pt)}")
        print(f"    iresnetc run --backend {args.backend} ({what}), wall time of the whole command: {fmt_s(t_ir)}"
              f"   [includes process start and loading; `iresnetc inspect` (load + Lipschitz certification) alone:"
              f" {fmt_s(t_inspect)}" + ("; f64 reference arithmetic]" if args.backend == "reference" else "]"))
        print(f"    ratio iresnetc wall / PyTorch forward: {t_ir / t_pt:.1f}x")
        if do_logdet:
            print(f"    exact log-det: PyTorch f64 (d vjps + slogdet, one run) {fmt_s(t_pt_ld)}; "
                  f"iresnetc run --estimator exact wall {fmt_s(t_ir_ld)}")
        print(("PASS" if ok else "FAIL") + f" (tolerance {args.tol:g} on max |err| / max(1, |ref|))")
        if args.json:
            pending[Path(args.json)] = json.dumps(res, indent=2).encode()
        try:
            outs.commit(pending)
        except (safeio.OutputError, OSError) as e:
            return safeio.fail("parity.py", f"writing the outputs: {e}")
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def spec_shape_of(model: IResNet, spec: dict, block_name: str) -> list[int]:
    """Per-sample input shape of a block (what its convs see)."""
    shape = list(spec["input"])
    if spec["squeeze"]:
        shape = [shape[0] * 4, shape[1] // 2, shape[2] // 2]
    if spec["pad_channels"]:
        shape = [spec["pad_channels"]] + shape[1:]
    for s, st in enumerate(spec["stages"]):
        if st["squeeze"]:
            shape = [shape[0] * 4, shape[1] // 2, shape[2] // 2]
        for b in range(st["blocks"]):
            if f"stage{s}.block{b}" == block_name:
                return shape
        if st["factor_out"]:
            keep = shape[0] - shape[0] // 2 if spec["factor_out_half"] == "first" else shape[0] // 2
            shape = [keep] + shape[1:]
    raise KeyError(block_name)


if __name__ == "__main__":
    sys.exit(main())
