#!/usr/bin/env python3
"""Reads a Residual Flows `train_img.py` checkpoint without torch and without executing
anything the file says; returns its options and the weights eval mode computes with.

    import resflows_ckpt
    args, weights = resflows_ckpt.load("checkpt.pth")            # EMA parameters
    args, weights = resflows_ckpt.load("checkpt.pth", use_ema=False)
    python3 examples/pytorch/resflows_ckpt.py CHECKPOINT [--no-ema]  # prints a summary

What train_img.py saves: {'state_dict': model.state_dict(), 'optimizer_state_dict',
'args': the argparse Namespace, 'ema': the ExponentialMovingAverage object, 'test_bpd'}.
The EMA object pickles the whole model with it (its `module`) and `shadow_params`, a
dict from `named_parameters()` names (the state_dict names of the parameters) to the
averaged values. Loading goes through torchfile's restricted unpickler: tensors,
storages, OrderedDict and Namespace from its allow-list, plus stubs here for the
classes such a file names (Residual Flows' own modules under `resflows.` or, for the
2019 layout, `lib.`, and torch's `torch.nn.modules.`); a stub only records what the
file gives it. Anything else is refused.

Parameters (weights, biases, ActNorm weight / bias, LipSwish beta) come from the EMA
by default (Residual Flows evaluates and samples with them), from the state_dict with
`use_ema=False`; buffers (u, v, spatial_dims, initialized) always from the state_dict.
The architecture comes from `args` (resflows_ref.Config.from_args, which refuses the
options it cannot express by name); every key the architecture needs must be in the
state_dict with the right shape and nothing else may be there (a classification head,
batch norm or a different block count shows up as an unexpected key).

The weights returned keep the state_dict names, in float64, in eval-mode form: each
conv / linear weight is W / max(1, sigma / coeff) with sigma from the stored u and v
(resflows_ref.effective_weights); biases, ActNorm weight (the log-scale: y = (x + b)
exp(w)) and bias, and the swish `beta` (the slope is softplus(beta)) as stored.
Errors are `CheckpointError`, one line naming the file and the key or option.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchfile  # noqa: E402
from resflows_ref import ActNorm, Block, Config, Lin, Plan, RefError, effective_weights, param_shapes  # noqa: E402

STUBS = {
    "resflows.*": torchfile.Stub,
    "lib.*": torchfile.Stub,
    "torch.nn.modules.*": torchfile.Stub,
}
OPTIONAL_BUFFERS = ("scale",)
BLOCK_EXTRAS = ("geom_p", "lamb", "last_n_samples", "last_firmom", "last_secmom")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message is one line."""


def allowed_keys(plan: Plan) -> tuple:
    """(required, optional) state_dict keys of the architecture."""
    required, optional = set(param_shapes(plan)), set()
    for layer in plan.layers():
        if isinstance(layer, ActNorm):
            required.add(layer.name + "initialized")
        elif isinstance(layer, Block):
            optional.update(layer.name + k for k in BLOCK_EXTRAS)
            for op in layer.ops:
                if isinstance(op, Lin):
                    required.update((op.name + "u", op.name + "v"))
                    optional.update(op.name + k for k in OPTIONAL_BUFFERS)
                    if op.k:
                        required.update((op.name + "initialized", op.name + "spatial_dims"))
    return required, optional


def parameter_names(module, prefix="", out=None, depth=0) -> list:
    """named_parameters() order of a stubbed module: its own `_parameters`, then each
    child's, depth first."""
    out = [] if out is None else out
    if depth > 100 or not isinstance(module, torchfile.Stub):
        raise CheckpointError(f"ema.module{'.' + prefix if prefix else ''}: not a module")
    params = getattr(module, "_parameters", {})
    children = getattr(module, "_modules", {})
    if not isinstance(params, dict) or not isinstance(children, dict):
        raise CheckpointError(f"ema.module.{prefix}: malformed module")
    out.extend(prefix + str(k) for k, v in params.items() if v is not None)
    for name, child in children.items():
        if child is not None:
            parameter_names(child, f"{prefix}{name}.", out, depth + 1)
    return out


def _strip_module(d: dict) -> dict:
    """Drops a DataParallel `module.` prefix carried by every key."""
    if d and all(isinstance(k, str) and k.startswith("module.") for k in d):
        return {k[len("module."):]: v for k, v in d.items()}
    return d


def _shadow(ema) -> dict:
    shadow = getattr(ema, "shadow_params", None)
    if isinstance(shadow, dict):
        return _strip_module(dict(shadow))
    if isinstance(shadow, (list, tuple)):
        names = parameter_names(getattr(ema, "module", None))
        if len(names) != len(shadow):
            raise CheckpointError(f"ema.shadow_params: {len(shadow)} tensors for {len(names)} model parameters")
        return dict(zip(names, shadow))
    raise CheckpointError("ema.shadow_params: neither a dict nor a list")


def _array(value, key):
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"{key}: a {type(value).__name__}, expected a tensor")
    if value.dtype.kind not in "fiub":
        raise CheckpointError(f"{key}: dtype {value.dtype}, expected a real tensor")
    return value.astype(np.float64)


def read(path, use_ema=True, max_bytes=torchfile.DEFAULT_MAX_BYTES):
    """(args dict, Config, state dict with the chosen parameters, test_bpd or None)."""
    try:
        obj = torchfile.load(path, stubs=STUBS, max_bytes=max_bytes)
    except torchfile.TorchFileError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "args" not in obj:
        raise CheckpointError("not a train_img.py checkpoint (a dict with state_dict and args)")
    ns = obj["args"]
    if not isinstance(ns, torchfile.Namespace):
        raise CheckpointError(f"args: a {type(ns).__name__}, expected an argparse Namespace")
    args = {k: v for k, v in vars(ns).items() if not k.startswith("_")}
    try:
        cfg = Config.from_args(args)
    except RefError as e:
        raise CheckpointError(str(e)) from None
    raw = obj["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise CheckpointError("state_dict: not a dict of named tensors")
    sd = {k: _array(v, f"state_dict[{k}]") for k, v in _strip_module(raw).items()}
    try:
        plan = Plan(cfg)
    except RefError as e:
        raise CheckpointError(str(e)) from None
    required, optional = allowed_keys(plan)
    for key in sd:
        if key not in required and key not in optional:
            raise CheckpointError(f"state_dict[{key}]: unexpected for the architecture args describe")
    for key in sorted(required):
        if key not in sd:
            raise CheckpointError(f"state_dict[{key}]: missing")
    if use_ema:
        if obj.get("ema") is None:
            raise CheckpointError("ema: missing (use --no-ema for the raw parameters)")
        shadow = _shadow(obj["ema"])
        if not shadow:
            raise CheckpointError("ema.shadow_params: empty, the average was never taken (use --no-ema)")
        for key in param_shapes(plan):
            if key not in shadow:
                raise CheckpointError(f"ema.shadow_params[{key}]: missing")
            value = _array(shadow[key], f"ema.shadow_params[{key}]")
            if value.shape != sd[key].shape:
                raise CheckpointError(f"ema.shadow_params[{key}]: shape {list(value.shape)}, "
                                      f"the state_dict has {list(sd[key].shape)}")
            sd[key] = value
    bpd = obj.get("test_bpd")
    return args, cfg, sd, (float(bpd) if isinstance(bpd, (int, float, np.ndarray)) and np.size(bpd) == 1 else None)


def load(path, use_ema=True, max_bytes=torchfile.DEFAULT_MAX_BYTES):
    """(args dict, eval-mode weights {state_dict name: float64 array}). Raises
    CheckpointError, its message one line starting with the path."""
    try:
        args, cfg, sd, _ = read(path, use_ema, max_bytes)
        return args, effective_weights(Plan(cfg), sd)
    except (CheckpointError, RefError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror or e}") from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[1] != "--no-ema") or argv[0].startswith("-"):
        print("usage: resflows_ckpt.py CHECKPOINT [--no-ema]", file=sys.stderr)
        return 2
    try:
        args, cfg, sd, bpd = read(argv[0], use_ema=len(argv) == 1)
        weights = effective_weights(Plan(cfg), sd)
    except (CheckpointError, RefError) as e:
        print(f"resflows_ckpt.py: error: {argv[0]}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"resflows_ckpt.py: error: {argv[0]}: {e.strerror or e}", file=sys.stderr)
        return 2
    plan = Plan(cfg)
    print(f"data {cfg.data}, input {list(plan.input_shape)}, {plan.n_scale} scales, blocks "
          f"{'-'.join(map(str, cfg.nblocks[:plan.n_scale]))}, idim {cfg.idim}, kernels "
          f"{'-'.join(map(str, cfg.kernels))}, act {cfg.act}, fc_end {cfg.fc_end}, factor_out {cfg.factor_out}")
    print(f"{len(weights)} tensors, {sum(w.size for w in weights.values())} values; test_bpd {bpd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
