#!/usr/bin/env python3
"""Residual Flows' eval-mode image flow, re-implemented in numpy (float64).

An independent re-implementation of `ResidualFlow` as `train_img.py` builds it (github
rtqichen/residual-flows: resflows/resflow.py, resflows/layers/*, resflows/layers/base/*,
train_img.py), written from a reading of those sources, so that a checkpoint's
`state_dict` can be evaluated without PyTorch. It is the oracle of the Residual Flows
converter (issue 19) and of `test_resflows_ref.py`.

What the network is, for the options supported (see `Config.from_args`):

  model input  x: (im_dim + padding) x S x S in [0, 1]; with `squeeze_first` it is
               squeezed once before the model (outside it, as train_img.py does).
  scale i      (i < n_scale = min(len(nblocks), #halvings while both sides >= 4)):
                 [logit(alpha)]                              only scale 0 (init_layer)
                 [actnorm] [fc-actnorm]                      scale 0, `first_resblock`
                 nblocks[i] x ( resblock, [actnorm], [fc-actnorm] )
                 squeeze                                     every scale but the last
                 fc_end: 4 x ( dense resblock, [fc-actnorm] ) the last scale only
               then, with `factor_out` and i < n_scale - 1, the channels are halved:
               the first half goes on, the second half is a latent part.
  z            concat of the latent parts in scale order, then the final tensor, each
               flattened per sample in (channel, row, column) order. Without factor_out
               z is the final tensor flattened.

  logit        y = log(s) - log(1 - s), s = alpha + (1 - 2 alpha) x; log-det per element
               log(1 - 2 alpha) - log(s - s^2). Inverse x = (sigmoid(y) - alpha) / (1 - 2 alpha).
  actnorm      y = (x + b) * exp(w), per channel (ActNorm2d) or per element of the
               flattened tensor (FCWrapper(ActNorm1d)); log-det sum(w) x (pixels per
               channel, or 1).
  squeeze      output channel 4c + 2dy + dx at (i, j) is input channel c at
               (2i + dy, 2j + dx); its inverse is pixel_shuffle.
  resblock     y = x + g(x). Conv g (kernels k0-k1-k2, padding k//2, stride 1):
                 [act]  conv(c->idim, k0) act  conv(idim->idim, k1) act [dropout]
                 conv(idim->c, k2)
               the leading act (`preact`) is left out of the first block of scale 0
               when `first_resblock` and scale 0 squeezes. Dense g (`fc`, `fc_end`) on
               the flattened tensor: [act] (linear(->h) act) x 2 [dropout] linear(->D),
               h = idim (fc) or fc_idim (fc_end), its leading act whenever `preact`.
               Dropout is the identity in eval mode.
  weights      every conv / linear is an InducedNormConv2d / InducedNormLinear (vnorms
               '2222'); in eval mode its weight is W / max(1, sigma / coeff) with
               sigma = u . (W v) for dense and 1x1 layers (W as [out, in]) and
               sigma = u . conv2d(v as [1, in, h, w], W) for k x k layers, (h, w) the
               stored `spatial_dims`, from the stored u and v (no power iteration).
  activations  swish (LipSwish): x sigmoid(x softplus(beta)) / 1.1 with a learned beta
               per activation module; elu; softplus (torch's: x above 20); lcube
               (x^3/3 inside [-1, 1], x -/+ 2/3 outside); relu; identity.

Log-density as train_img.py computes it: log p(x) = log N(z; 0, I) + log-det
- D log(nvals) - log p(u_pad) with D = S^2 (im_dim + padding), and bits/dim =
-log p(x) / (S^2 im_dim) / log 2 (per sample here; train_img.py averages a batch).
The data chain before it: x = (x01 (nvals - 1) + U(0, 1)) / nvals with x01 = pixel / 255.

The log-det here is exact: each block's Jacobian J of g is built by forward-mode
differentiation (one tangent per input coordinate) and log det(I + J) taken by
`slogdet`; the logit and actnorm log-dets are analytic. (Residual Flows itself
evaluates an unbiased stochastic estimate in eval mode; the exact value is what it
estimates.) The inverse runs each block's fixed point x = y - g(x) until a step is
below 1e-12 (relative to max(1, |y|)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# data set -> (image channels, logit alpha) as train_img.py sets them for task density.
DATASETS = {
    "mnist": (1, 1e-6), "cifar10": (3, 0.05), "svhn": (3, 0.05), "celebahq": (3, 0.05),
    "celeba_5bit": (3, 0.05), "imagenet32": (3, 0.05), "imagenet64": (3, 0.05),
}
ACTS = ("swish", "elu", "softplus", "lcube", "relu", "identity")
# train_img.py's defaults, used for options an older checkpoint's args may lack.
DEFAULTS = {
    "data": "cifar10", "imagesize": 32, "nbits": 8, "block": "resblock", "coeff": 0.98, "vnorms": "2222",
    "learn_p": False, "factor_out": False, "act": "swish", "idim": 512, "nblocks": "16-16-16",
    "squeeze_first": False, "actnorm": True, "fc_actnorm": False, "batchnorm": False, "dropout": 0.0,
    "fc": False, "kernels": "3-1-3", "quadratic": False, "fc_end": True, "fc_idim": 128, "preact": True,
    "padding": 0, "first_resblock": True, "task": "density", "padding_dist": "uniform", "add_noise": True,
}
FC_NBLOCKS = 4  # StackediResBlocks' fc_nblocks; train_img.py never changes it
MAX_DIM = 1 << 31
MAX_BLOCKS, MAX_KERNEL = 4096, 63  # bounds on what a file's options can make us build


class RefError(ValueError):
    """An option or weight this re-implementation cannot use; one line, naming it."""


# ------------------------------------------------------------------ options


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _bool(args, key):
    v = args.get(key, DEFAULTS[key])
    if not isinstance(v, (bool, np.bool_)):
        raise RefError(f"args.{key} = {_show(v)}: expected True or False")
    return bool(v)


def _int(args, key, lo=0):
    v = args.get(key, DEFAULTS[key])
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or v > MAX_DIM:
        raise RefError(f"args.{key} = {_show(v)}: expected an integer in [{lo}, {MAX_DIM}]")
    return int(v)


def _float(args, key):
    v = args.get(key, DEFAULTS[key])
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v):
        raise RefError(f"args.{key} = {_show(v)}: expected a finite number")
    return float(v)


def _dashed(args, key, hi):
    v = args.get(key, DEFAULTS[key])
    parts = v.split("-") if isinstance(v, str) and len(v) < 1000 else []
    if not parts or not all(p.isdigit() and 0 < int(p) <= hi for p in parts):
        raise RefError(f"args.{key} = {_show(v)}: expected integers in [1, {hi}] joined by '-'")
    return tuple(int(p) for p in parts)


def n_scales(nblocks, h, w):
    """ResidualFlow's scale count: one per halving while both sides are at least 4,
    at most len(nblocks)."""
    n = 0
    while h >= 4 and w >= 4:
        n, h, w = n + 1, h // 2, w // 2
    return min(len(nblocks), n)


@dataclass(frozen=True)
class Config:
    data: str
    im_dim: int
    padding: int
    imagesize: int
    nblocks: tuple
    idim: int
    kernels: tuple
    act: str
    fc: bool
    fc_end: bool
    fc_idim: int
    factor_out: bool
    squeeze_first: bool
    actnorm: bool
    fc_actnorm: bool
    preact: bool
    first_resblock: bool
    coeff: float
    alpha: float
    nvals: int
    dropout: float = 0.0
    fc_nblocks: int = FC_NBLOCKS

    @classmethod
    def from_args(cls, args: dict) -> "Config":
        """The architecture of train_img.py's `args` (a dict of its options). Options
        that change the network in ways not re-implemented are refused by name."""
        block = args.get("block", DEFAULTS["block"])
        if block != "resblock":
            raise RefError(f"args.block = {_show(block)}: only 'resblock' is supported (coupling blocks are not)")
        task = args.get("task", DEFAULTS["task"])
        if task != "density":
            raise RefError(f"args.task = {_show(task)}: only 'density' is supported (classification heads are not)")
        vnorms = args.get("vnorms", DEFAULTS["vnorms"])
        if vnorms != "2222":
            raise RefError(f"args.vnorms = {_show(vnorms)}: only '2222' (spectral norms) is supported")
        for key in ("quadratic", "batchnorm", "learn_p"):
            if _bool(args, key):
                raise RefError(f"args.{key} = True is not supported")
        data = args.get("data", DEFAULTS["data"])
        if data not in DATASETS:
            raise RefError(f"args.data = {_show(data)}: expected one of {', '.join(DATASETS)}")
        act = args.get("act", DEFAULTS["act"])
        if act not in ACTS:
            raise RefError(f"args.act = {_show(act)}: expected one of {', '.join(ACTS)}")
        if not _bool(args, "add_noise"):
            raise RefError("args.add_noise = False is not supported (the density assumes dequantized data)")
        padding = _int(args, "padding")
        if padding > 0 and args.get("padding_dist", DEFAULTS["padding_dist"]) != "uniform":
            raise RefError(f"args.padding_dist = {_show(args.get('padding_dist'))}: only 'uniform' is supported")
        kernels = _dashed(args, "kernels", MAX_KERNEL)
        if len(kernels) != len(vnorms) - 1:
            raise RefError(f"args.kernels = {_show(args.get('kernels'))}: expected {len(vnorms) - 1} kernel sizes")
        if any(k % 2 == 0 for k in kernels):
            raise RefError(f"args.kernels = {_show(args.get('kernels'))}: even kernels change the image size")
        coeff = _float(args, "coeff")
        if coeff <= 0:
            raise RefError(f"args.coeff = {_show(coeff)}: expected a positive number")
        dropout = _float(args, "dropout")
        if not 0 <= dropout < 1:
            raise RefError(f"args.dropout = {_show(dropout)}: expected a number in [0, 1)")
        im_dim, alpha = DATASETS[data]
        nbits = _int(args, "nbits", 1)
        if data == "celebahq" and nbits > 8:
            raise RefError(f"args.nbits = {nbits}: expected at most 8")
        nvals = 2 ** nbits if data == "celebahq" else 32 if data == "celeba_5bit" else 256
        cfg = cls(
            data=data, im_dim=im_dim, padding=padding, imagesize=_int(args, "imagesize", 1),
            nblocks=_dashed(args, "nblocks", MAX_BLOCKS), idim=_int(args, "idim", 1), kernels=kernels, act=act,
            fc=_bool(args, "fc"), fc_end=_bool(args, "fc_end"), fc_idim=_int(args, "fc_idim", 1),
            factor_out=_bool(args, "factor_out"), squeeze_first=_bool(args, "squeeze_first"),
            actnorm=_bool(args, "actnorm"), fc_actnorm=_bool(args, "fc_actnorm"), preact=_bool(args, "preact"),
            first_resblock=_bool(args, "first_resblock"), coeff=coeff, alpha=alpha, nvals=nvals, dropout=dropout,
        )
        cfg.model_input_shape()  # size checks
        return cfg

    def data_dim(self) -> int:
        """D of train_img.py's log(nvals) term: S^2 (im_dim + padding)."""
        return self.imagesize * self.imagesize * (self.im_dim + self.padding)

    def model_input_shape(self) -> tuple:
        c, s = self.im_dim + self.padding, self.imagesize
        if c * s * s > MAX_DIM:
            raise RefError(f"args.imagesize = {s}: {c} x {s} x {s} is too large")
        if self.squeeze_first:
            if s % 2:
                raise RefError(f"args.imagesize = {s}: squeeze_first needs an even size")
            return (4 * c, s // 2, s // 2)
        return (c, s, s)


# ------------------------------------------------------------------ primitives


def conv2d(x, w, pad):
    """Cross-correlation of x [N, C, H, W] with w [O, C, k, k], stride 1, zero padding."""
    n, c, h, wd = x.shape
    o, c2, k, _ = w.shape
    assert c == c2, (x.shape, w.shape)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    oh, ow = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    out = np.zeros((o, n, oh, ow))
    for dy in range(k):
        for dx in range(k):
            out += np.tensordot(w[:, :, dy, dx], xp[:, :, dy:dy + oh, dx:dx + ow], axes=([1], [1]))
    return out.transpose(1, 0, 2, 3)


def conv2d_adjoint(y, w, pad):
    """The adjoint of `conv2d` (conv_transpose2d, output_padding 0)."""
    n, o, oh, ow = y.shape
    _, c, k, _ = w.shape
    h, wd = oh - 2 * pad + k - 1, ow - 2 * pad + k - 1
    xp = np.zeros((c, n, h + 2 * pad, wd + 2 * pad))
    for dy in range(k):
        for dx in range(k):
            xp[:, :, dy:dy + oh, dx:dx + ow] += np.tensordot(w[:, :, dy, dx], y, axes=([0], [1]))
    return xp[:, :, pad:pad + h, pad:pad + wd].transpose(1, 0, 2, 3)


def squeeze(x):
    """[N, C, 2H, 2W] -> [N, 4C, H, W], channel 4c + 2dy + dx <- (c, 2i + dy, 2j + dx)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(y):
    n, c4, h, w = y.shape
    return y.reshape(n, c4 // 4, 2, 2, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, 2 * h, 2 * w)


def sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


def torch_softplus(x):
    """torch's softplus (beta 1, threshold 20): the identity above 20."""
    return np.where(x > 20.0, x, np.logaddexp(0.0, np.minimum(x, 20.0)))


def activation(kind, x, beta=None):
    """(value, derivative) of an activation at x."""
    if kind == "swish":
        b = float(torch_softplus(np.float64(beta)))
        s = sigmoid(x * b)
        return x * s / 1.1, (s + x * b * s * (1.0 - s)) / 1.1
    if kind == "elu":
        neg = np.minimum(x, 0.0)
        return np.where(x > 0, x, np.expm1(neg)), np.where(x > 0, 1.0, np.exp(neg))
    if kind == "softplus":
        return torch_softplus(x), np.where(x > 20.0, 1.0, sigmoid(np.minimum(x, 20.0)))
    if kind == "lcube":
        inside = np.abs(x) < 1
        return (np.where(inside, x ** 3 / 3, x - np.sign(x) * (2.0 / 3.0)), np.where(inside, x * x, 1.0))
    if kind == "relu":
        return np.maximum(x, 0.0), (x > 0).astype(np.float64)
    if kind == "identity":
        return x, np.ones_like(x)
    raise RefError(f"activation {kind!r}")


def normalize(v, eps=1e-12):
    return v / max(np.linalg.norm(v), eps)


# ------------------------------------------------------------------ the network plan


@dataclass
class Lin:
    """InducedNormConv2d (k > 0) or InducedNormLinear (k == 0) at `name` (a prefix)."""
    name: str
    cin: int
    cout: int
    k: int
    hw: tuple = (1, 1)  # input spatial size of a conv


@dataclass
class Act:
    name: str
    kind: str


@dataclass
class Dropout:
    name: str


@dataclass
class Block:
    name: str
    dense: bool
    shape: tuple
    ops: list = field(default_factory=list)


@dataclass
class ActNorm:
    name: str  # prefix of weight / bias / initialized
    flat: bool
    shape: tuple


@dataclass
class Logit:
    alpha: float


@dataclass
class Squeeze:
    pass


class Plan:
    """The layer chain of `ResidualFlow(...)` for a Config, with state_dict names."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        c, h, w = self.input_shape = cfg.model_input_shape()
        self.n_scale = n_scales(cfg.nblocks, h, w)
        if self.n_scale == 0:
            raise RefError(f"args.imagesize = {cfg.imagesize}: no scale fits (sides below 4)")
        self.scales, self.scale_shapes, self.dims = [], [], []
        for i in range(self.n_scale):
            squeeze_here = i < self.n_scale - 1
            if squeeze_here and (h % 2 or w % 2):
                raise RefError(f"args.imagesize = {cfg.imagesize}: scale {i} squeezes an odd size {h}x{w}")
            self.scale_shapes.append((c, h, w))
            self.scales.append(self._scale(i, (c, h, w), squeeze_here))
            if squeeze_here:
                self.dims.append((2 * c, h // 2, w // 2) if cfg.factor_out else None)
            c, h, w = (2 * c if cfg.factor_out else 4 * c), h // 2, w // 2
        last = self.scale_shapes[-1]
        self.dims = [d for d in self.dims if d is not None] + [last]
        self.z_dim = sum(math.prod(d) for d in self.dims)
        assert self.z_dim == math.prod(self.input_shape)

    def _scale(self, i, size, squeeze_here):
        cfg, pre = self.cfg, f"transforms.{i}.chain."
        chain = []

        def actnorm(flat):
            name = f"{pre}{len(chain)}." + ("fc_module." if flat else "")
            chain.append(ActNorm(name, flat, size))

        first = cfg.first_resblock and i == 0
        if i == 0:
            chain.append(Logit(cfg.alpha))
        if first and cfg.actnorm:
            actnorm(cfg.fc)
        if first and cfg.fc_actnorm:
            actnorm(True)
        for b in range(cfg.nblocks[i]):
            skip_preact = first and b == 0 and squeeze_here
            chain.append(self._block(f"{pre}{len(chain)}.", size, cfg.fc, cfg.idim, skip_preact))
            if cfg.actnorm:
                actnorm(cfg.fc)
            if cfg.fc_actnorm:
                actnorm(True)
        if squeeze_here:
            chain.append(Squeeze())
        elif cfg.fc_end:
            for _ in range(cfg.fc_nblocks):
                chain.append(self._block(f"{pre}{len(chain)}.", size, True, cfg.fc_idim, False))
                if cfg.actnorm or cfg.fc_actnorm:
                    actnorm(True)
        return chain

    def _block(self, name, size, dense, width, skip_preact):
        cfg, (c, h, w) = self.cfg, size
        blk = Block(name, dense, size)
        pre = name + ("nnet.nnet." if dense else "nnet.")

        def op(make):
            blk.ops.append(make(f"{pre}{len(blk.ops)}."))

        if cfg.preact and (dense or not skip_preact):
            op(lambda n: Act(n, cfg.act))
        if dense:
            d = c * h * w
            last = d
            for _ in range(len(cfg.kernels) - 1):
                op(lambda n, a=last: Lin(n, a, width, 0))
                op(lambda n: Act(n, cfg.act))
                last = width
            if cfg.dropout:
                op(Dropout)
            op(lambda n, a=last: Lin(n, a, d, 0))
        else:
            ks = cfg.kernels
            op(lambda n: Lin(n, c, width, ks[0], (h, w)))
            op(lambda n: Act(n, cfg.act))
            for k in ks[1:-1]:
                op(lambda n, k=k: Lin(n, width, width, k, (h, w)))
                op(lambda n: Act(n, cfg.act))
            if cfg.dropout:
                op(Dropout)
            op(lambda n: Lin(n, width, c, ks[-1], (h, w)))
        return blk

    def layers(self):
        for chain in self.scales:
            yield from chain


# ------------------------------------------------------------------ weights


def eval_sigma(layer: Lin, weight, u, v, spatial=None):
    """sigma of InducedNorm{Linear,Conv2d}.compute_weight(update=False) from the stored
    u and v. `spatial` is the stored spatial_dims of a k x k conv (default: the
    layer's input size)."""
    if layer.k <= 1:
        w2 = weight.reshape(layer.cout, layer.cin)
        if u.shape != (layer.cout,) or v.shape != (layer.cin,):
            raise RefError(f"{layer.name}u/v: sizes {u.size}/{v.size}, expected {layer.cout}/{layer.cin}")
        return float(u @ (w2 @ v))
    h, w = layer.hw if spatial is None else spatial
    if v.size != layer.cin * h * w:
        raise RefError(f"{layer.name}v: {v.size} elements, expected {layer.cin} x {h} x {w}")
    wv = conv2d(v.reshape(1, layer.cin, h, w), weight, layer.k // 2).reshape(-1)
    if u.size != wv.size:
        raise RefError(f"{layer.name}u: {u.size} elements, expected {wv.size}")
    return float(u.reshape(-1) @ wv)


def _spatial(layer, sd):
    key = layer.name + "spatial_dims"
    if layer.k <= 1 or key not in sd:
        return None
    sp = np.asarray(sd[key], dtype=np.float64).reshape(-1)
    if sp.size != 2 or not np.all(sp == np.round(sp)) or np.any(sp < 1) or np.any(sp > MAX_DIM):
        raise RefError(f"{key}: {sp.tolist()} is not a pair of positive integers")
    return int(sp[0]), int(sp[1])


def _get(sd, key, shape):
    if key not in sd:
        raise RefError(f"{key}: missing")
    a = np.asarray(sd[key], dtype=np.float64)
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise RefError(f"{key}: shape {list(a.shape)}, expected {list(shape)}")
    if not np.all(np.isfinite(a)):
        raise RefError(f"{key}: not finite")
    return a


def param_shapes(plan: Plan) -> dict:
    """Name -> shape of every parameter the eval network uses."""
    out = {}
    for layer in plan.layers():
        if isinstance(layer, ActNorm):
            n = math.prod(layer.shape) if layer.flat else layer.shape[0]
            out[layer.name + "weight"] = out[layer.name + "bias"] = (n,)
        elif isinstance(layer, Block):
            for op in layer.ops:
                if isinstance(op, Lin):
                    out[op.name + "weight"] = (op.cout, op.cin, op.k, op.k) if op.k else (op.cout, op.cin)
                    out[op.name + "bias"] = (op.cout,)
                elif isinstance(op, Act) and op.kind == "swish":
                    out[op.name + "beta"] = (1,)
    return out


def effective_weights(plan: Plan, sd: dict) -> dict:
    """The weights eval mode computes with, from a state dict (raw weights with u, v):
    each conv / linear weight divided by max(1, sigma / coeff); actnorm, biases and
    swish betas as they are. Checks shapes, finiteness and the `initialized` flags."""
    out = {}
    shapes = param_shapes(plan)
    for layer in plan.layers():
        if isinstance(layer, ActNorm):
            flag = layer.name + "initialized"
            if flag in sd and int(np.asarray(sd[flag]).reshape(-1)[0]) == 0:
                raise RefError(f"{flag}: 0, the ActNorm was never initialized by data")
        if not isinstance(layer, Block):
            continue
        for op in layer.ops:
            if not isinstance(op, Lin):
                continue
            flag = op.name + "initialized"
            if op.k and flag in sd and int(np.asarray(sd[flag]).reshape(-1)[0]) == 0:
                raise RefError(f"{flag}: 0, the layer's u and v were never initialized")
            wt = _get(sd, op.name + "weight", shapes[op.name + "weight"])
            u, v = _get(sd, op.name + "u", None), _get(sd, op.name + "v", None)
            sigma = eval_sigma(op, wt, u.reshape(-1), v.reshape(-1), _spatial(op, sd))
            out[op.name + "weight"] = wt / max(1.0, sigma / plan.cfg.coeff)
    for key, shape in shapes.items():
        if key not in out:
            out[key] = _get(sd, key, shape)
    return out


# ------------------------------------------------------------------ evaluation


class ResFlow:
    """The eval-mode network of a Config over effective weights (`effective_weights`),
    on batches [N, C, H, W] of model inputs (after padding and squeeze_first)."""

    def __init__(self, cfg: Config, weights: dict):
        self.cfg, self.plan = cfg, Plan(cfg)
        shapes = param_shapes(self.plan)
        self.w = {k: _get(weights, k, s) for k, s in shapes.items()}

    @classmethod
    def from_state_dict(cls, cfg: Config, sd: dict) -> "ResFlow":
        return cls(cfg, effective_weights(Plan(cfg), sd))

    # --- one residual branch g, with its Jacobian-vector products
    def g(self, blk: Block, x, tangents=None):
        """g(x) for x [N, ...]; with `tangents` [K, ...] (N must be 1) also J_g T."""
        shape, tshape = x.shape, None if tangents is None else tangents.shape
        h = x.reshape(shape[0], -1) if blk.dense else x
        t = tangents if tangents is None or not blk.dense else tangents.reshape(tshape[0], -1)
        for op in blk.ops:
            if isinstance(op, Lin):
                wt, b = self.w[op.name + "weight"], self.w[op.name + "bias"]
                if blk.dense:
                    h = h @ wt.T + b
                    t = None if t is None else t @ wt.T
                else:
                    h = conv2d(h, wt, op.k // 2) + b[None, :, None, None]
                    t = None if t is None else conv2d(t, wt, op.k // 2)
            elif isinstance(op, Act):
                h, dh = activation(op.kind, h, self.w.get(op.name + "beta", [None])[0])
                t = None if t is None else t * dh
        return h.reshape(shape), None if t is None else t.reshape(tshape)

    def block_jacobian(self, blk: Block, x1):
        """J of g at one sample x1 [C, H, W] (or [D]), as a D x D matrix."""
        d = x1.size
        _, t = self.g(blk, x1.reshape((1,) + x1.shape), np.eye(d).reshape((d,) + x1.shape))
        return t.reshape(d, d).T

    def block_logdet(self, blk: Block, x):
        out = np.zeros(x.shape[0])
        for i in range(x.shape[0]):
            jac = self.block_jacobian(blk, x[i])
            sign, logabs = np.linalg.slogdet(np.eye(jac.shape[0]) + jac)
            if sign <= 0:
                raise RefError(f"{blk.name}: I + J has determinant sign {sign}; the block is not invertible")
            out[i] = logabs
        return out

    def _actnorm(self, layer: ActNorm, x, inverse=False):
        w, b = self.w[layer.name + "weight"], self.w[layer.name + "bias"]
        shape = x.shape
        flat = x.reshape(shape[0], -1) if layer.flat else x
        if not layer.flat:
            w, b = w[None, :, None, None], b[None, :, None, None]
        y = flat * np.exp(-w) - b if inverse else (flat + b) * np.exp(w)
        per = 1 if layer.flat else shape[2] * shape[3]
        return y.reshape(shape), float(np.sum(self.w[layer.name + "weight"])) * per

    # --- the whole flow
    def forward(self, x, with_logdet=True):
        """(z [N, D], log-det [N]) with z in Residual Flows' order (module docstring)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[1:] != self.plan.input_shape:
            raise RefError(f"input of shape {list(x.shape[1:])}, expected {list(self.plan.input_shape)}")
        n, ld, parts = x.shape[0], np.zeros(x.shape[0]), []
        for i, chain in enumerate(self.plan.scales):
            for layer in chain:
                if isinstance(layer, Logit):
                    a = layer.alpha
                    s = a + (1 - 2 * a) * x
                    if with_logdet:
                        ld += (math.log(1 - 2 * a) - np.log(s - s * s)).reshape(n, -1).sum(1)
                    x = np.log(s) - np.log(1 - s)
                elif isinstance(layer, ActNorm):
                    x, l = self._actnorm(layer, x)
                    ld += l
                elif isinstance(layer, Squeeze):
                    x = squeeze(x)
                else:
                    if with_logdet:
                        ld += self.block_logdet(layer, x)
                    x = x + self.g(layer, x)[0]
            if self.cfg.factor_out and i < self.plan.n_scale - 1:
                d = x.shape[1] // 2
                parts.append(x[:, d:])
                x = x[:, :d]
        parts.append(x)
        return np.concatenate([p.reshape(n, -1) for p in parts], axis=1), ld

    def block_inverse(self, blk: Block, y, tol=1e-12, max_iter=50000):
        """The fixed point x = y - g(x), until a step is below tol x max(1, |y|max)."""
        x = y - self.g(blk, y)[0]
        bound = tol * max(1.0, float(np.max(np.abs(y))))
        for _ in range(max_iter):
            x_new = y - self.g(blk, x)[0]
            step = float(np.max(np.abs(x_new - x)))
            x = x_new
            if step <= bound:
                return x
        raise RefError(f"{blk.name}: the fixed-point inverse did not converge in {max_iter} steps")

    def inverse(self, z):
        """The model input x [N, C, H, W] of latents z [N, D] (ResidualFlow.inverse)."""
        z = np.asarray(z, dtype=np.float64)
        n = z.shape[0]
        if z.shape[1:] != (self.plan.z_dim,):
            raise RefError(f"latent of shape {list(z.shape[1:])}, expected [{self.plan.z_dim}]")
        if self.cfg.factor_out:
            offs = np.cumsum([0] + [math.prod(d) for d in self.plan.dims])
            zs = [z[:, offs[i]:offs[i + 1]].reshape((n,) + d) for i, d in enumerate(self.plan.dims)]
        else:
            zs = [z.reshape((n,) + self.plan.dims[-1])]
        x = zs[-1]
        for i in range(self.plan.n_scale - 1, -1, -1):
            if self.cfg.factor_out and i < self.plan.n_scale - 1:
                x = np.concatenate([x, zs[i]], axis=1)
            for layer in reversed(self.plan.scales[i]):
                if isinstance(layer, Logit):
                    x = (sigmoid(x) - layer.alpha) / (1 - 2 * layer.alpha)
                elif isinstance(layer, ActNorm):
                    x = self._actnorm(layer, x, inverse=True)[0]
                elif isinstance(layer, Squeeze):
                    x = unsqueeze(x)
                else:
                    x = self.block_inverse(layer, x)
        return x


# ------------------------------------------------------------------ data and density


def dequantize(pixels, noise, nvals=256):
    """train_img.py's add_noise on ToTensor's output: (p/255 (nvals - 1) + U) / nvals,
    for 8-bit pixel values p (all data sets but celebahq with nbits < 8 and celeba_5bit)."""
    return (np.asarray(pixels, dtype=np.float64) / 255.0 * (nvals - 1) + noise) / nvals


def model_input(cfg: Config, x, pad_noise=None):
    """add_padding (uniform noise / nvals as extra channels), then squeeze_first."""
    if cfg.padding:
        if pad_noise is None or pad_noise.shape != (x.shape[0], cfg.padding) + x.shape[2:]:
            raise RefError(f"padding {cfg.padding}: pad_noise of shape [N, {cfg.padding}, S, S] needed")
        x = np.concatenate([x, pad_noise / cfg.nvals], axis=1)
    return squeeze(x) if cfg.squeeze_first else x


def logp_standard_normal(z):
    return (-0.5 * math.log(2 * math.pi) - 0.5 * z * z).sum(axis=1)


def bits_per_dim(cfg: Config, z, logdet, logpu=0.0):
    """Per-sample bits/dim as compute_loss: log p(x) = log p(z) + log-det - D log nvals
    - log p(u), divided by -(S^2 im_dim) log 2. (Uniform padding has log p(u) = 0.)"""
    logpx = logp_standard_normal(z) + logdet - math.log(cfg.nvals) * cfg.data_dim() - logpu
    return -logpx / (cfg.imagesize * cfg.imagesize * cfg.im_dim) / math.log(2)
