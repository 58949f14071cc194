#!/usr/bin/env python3
"""The official i-ResNet multiscale flow, re-implemented in numpy (float64).

A faithful re-implementation of `multiscale_conv_iResNet` from the code behind the
i-ResNet paper (github jhjacobsen/invertible-resnet: models/conv_iResNet.py,
models/model_utils.py, spectral_norm_conv_inplace.py, spectral_norm_fc.py), written
from those sources so that weights in the official `state_dict` layout can be
produced and evaluated without PyTorch (no CPU-only torch wheel is on PyPI; see
setup.sh). It is the oracle of the converter test (`convert_official.py`).

What it mirrors, module by module:
  * `squeeze` (the i-RevNet "psi"): the same permute / split / stack sequence as
    the official forward and inverse, not a closed formula, so that the index
    order it produces is the official one by construction.
  * `Split`: first half of the channels, second half.
  * `injective_pad`: zero channels appended after the existing ones.
  * `ActNorm2D`: y = x * exp(log_scale) + shift, log-det H*W*sum(log_scale).
  * spectral norm in eval mode: 3x3 convs (`SpectralNormConv`) use
    sigma = u . conv2d(v.view(1, Cin, H, W), W_orig) and W_orig / (max(1, sigma/c) + 1e-5);
    1x1 convs (`SpectralNorm`, the fc variant on the [Cout, Cin] matrix) use
    sigma = u . (W v) and W_orig / max(1, sigma/c). Training-mode power iterations
    (what fills the stored u and v) are provided to build realistic state dicts.
  * `conv_iresnet_block` with stride 1: ActNorm, then y = x + F(x),
    F = [nonlin] conv3x3 -> nonlin -> conv1x1 -> nonlin -> conv3x3 (`bottleneck_block`,
    an `nn.Sequential`, so parameter indices 0..5 or 0..4 without the input nonlin).
  * `scale_block`: optional squeeze, blocks, optional split; block 0 of scale 0 has
    no input nonlinearity (`input_nonlin = i > 0` for the scale, `i > 0` for the block).
  * `multiscale_conv_iResNet`: optional initial squeeze, injective padding, the
    scales (stride 2 = squeeze at the scale's start; a split after every scale but
    the last, the first half to z), z = concat of the flattened parts in order,
    prior N(prior_mu, exp(prior_logstd)); inverse = fixed point with a given number
    of iterations per block.

The exact log-determinant is computed by forward-mode differentiation: every
operation also maps a stack of tangent vectors (the identity at the input), so
the final Jacobian dz/dx is exact up to rounding.
"""

from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------- primitives


def conv2d(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """`torch.nn.functional.conv2d` (stride 1, no bias) on [B, Cin, H, W]."""
    b, cin, h, wd = x.shape
    cout, cin2, k, k2 = w.shape
    assert cin == cin2 and k == k2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    y = np.zeros((b, cout, oh, ow))
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, :, ky : ky + oh, kx : kx + ow]
            y += np.einsum("bchw,oc->bohw", patch, w[:, :, ky, kx])
    return y


def conv_transpose2d(y: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """`conv_transpose2d` (stride 1, output_padding 0): the adjoint of `conv2d`."""
    b, cout, oh, ow = y.shape
    _, cin, k, _ = w.shape
    h, wd = oh - 2 * pad + k - 1, ow - 2 * pad + k - 1
    xp = np.zeros((b, cin, h + 2 * pad, wd + 2 * pad))
    for ky in range(k):
        for kx in range(k):
            xp[:, :, ky : ky + oh, kx : kx + ow] += np.einsum("bohw,oc->bchw", y, w[:, :, ky, kx])
    return xp[:, :, pad : pad + h, pad : pad + wd]


def normalize(v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """`torch.nn.functional.normalize(v, dim=0, eps)`."""
    return v / max(np.linalg.norm(v), eps)


def elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


def elu_grad(x):
    # torch's ELU backward: 1 for x > 0, alpha * exp(x) otherwise (both 1 at 0).
    return np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0)))


NONLIN = {
    "elu": (elu, elu_grad),
    "relu": (lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(x.dtype)),
}

# ------------------------------------------------------------ official modules


def squeeze_forward(x: np.ndarray) -> np.ndarray:
    """`model_utils.squeeze(2).forward`, step by step."""
    bs = 2
    out = x.transpose(0, 2, 3, 1)
    b, s_h, s_w, s_d = out.shape
    d_d = s_d * bs * bs
    d_h = s_h // bs
    chunks = np.split(out, s_w // bs, axis=2)  # torch .split(bs, 2): chunks of width bs
    stack = [t.reshape(b, d_h, d_d) for t in chunks]
    out = np.stack(stack, 1)
    out = out.transpose(0, 2, 1, 3)
    out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out)


def squeeze_inverse(x: np.ndarray) -> np.ndarray:
    """`model_utils.squeeze(2).inverse`, step by step."""
    bs = 2
    out = x.transpose(0, 2, 3, 1)
    b, d_h, d_w, d_d = out.shape
    s_d = d_d // (bs * bs)
    s_w = d_w * bs
    s_h = d_h * bs
    t1 = out.reshape(b, d_h, d_w, bs * bs, s_d)
    spl = np.split(t1, t1.shape[3] // bs, axis=3)
    stack = [t.reshape(b, d_h, s_w, s_d) for t in spl]
    out = np.stack(stack, 0).swapaxes(0, 1).transpose(0, 2, 1, 3, 4).reshape(b, s_h, s_w, s_d)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def sn_conv_sigma(p: dict, key: str, in_shape) -> float:
    """Eval-mode sigma of `SpectralNormConv`: u . conv2d(v.view(1, C, H, W), W_orig)."""
    w = p[key + ".weight_orig"]
    v = p[key + ".weight_v"].reshape((1,) + tuple(in_shape))
    wv = conv2d(v, w, w.shape[2] // 2).reshape(-1)
    return float(np.dot(p[key + ".weight_u"].reshape(-1), wv))


def sn_fc_sigma(p: dict, key: str) -> float:
    """Eval-mode sigma of `SpectralNorm` (fc) on the [Cout, Cin*k*k] matrix."""
    w = p[key + ".weight_orig"]
    m = w.reshape(w.shape[0], -1)
    return float(np.dot(p[key + ".weight_u"], m @ p[key + ".weight_v"]))


def eval_weight(p: dict, key: str, in_shape, coeff: float) -> np.ndarray:
    """The weight the official code convolves with in eval mode."""
    w = p[key + ".weight_orig"]
    if w.shape[2] == 1:
        sigma = sn_fc_sigma(p, key)
        return w / max(1.0, sigma / coeff)
    sigma = sn_conv_sigma(p, key, in_shape)
    return w / (max(1.0, sigma / coeff) + 1e-5)


def power_iterate(p: dict, key: str, in_shape, iters: int) -> None:
    """Training-mode power iterations that update the stored u, v in place."""
    w = p[key + ".weight_orig"]
    u, v = p[key + ".weight_u"], p[key + ".weight_v"]
    if w.shape[2] == 1:
        m = w.reshape(w.shape[0], -1)
        for _ in range(iters):
            v = normalize(m.T @ u)
            u = normalize(m @ v)
    else:
        pad = w.shape[2] // 2
        out_shape = (1, w.shape[0]) + tuple(in_shape[1:])
        for _ in range(iters):
            v = normalize(conv_transpose2d(u.reshape(out_shape), w, pad).reshape(-1))
            u = normalize(conv2d(v.reshape((1,) + tuple(in_shape)), w, pad).reshape(-1))
    p[key + ".weight_u"], p[key + ".weight_v"] = u, v


# --------------------------------------------------------------------- model


class OfficialFlow:
    """`multiscale_conv_iResNet(in_shape, nBlocks, nStrides, nChannels, init_squeeze,
    inj_pad, coeff, density_estimation=True, nonlin=...)` in eval mode."""

    def __init__(self, in_shape, n_blocks, n_strides, n_channels, init_squeeze=True,
                 inj_pad=0, coeff=0.9, nonlin="elu", actnorm=True):
        assert len(n_blocks) == len(n_strides) == len(n_channels)
        self.in_shape = tuple(in_shape)
        self.n_blocks, self.n_strides, self.n_channels = n_blocks, n_strides, n_channels
        self.init_squeeze, self.inj_pad, self.coeff = init_squeeze, inj_pad, coeff
        self.act, self.act_grad = NONLIN[nonlin]
        self.actnorm = actnorm
        c, h, w = self.in_shape
        if init_squeeze:
            c, h, w = 4 * c, h // 2, w // 2
        c += inj_pad
        # Per scale: (squeeze, conv shape, split).
        self.scales = []
        shape = (c, h, w)
        for i, stride in enumerate(n_strides):
            if stride == 2:
                shape = (4 * shape[0], shape[1] // 2, shape[2] // 2)
            split = i < len(n_strides) - 1
            self.scales.append((stride == 2, shape, split))
            if split:
                shape = (shape[0] - shape[0] // 2, shape[1], shape[2])
        self.dim = int(np.prod((c, h, w)))

    # Layer keys of block b of scale s: (state-dict prefix, kernel, input shape).
    def layers(self, s: int, b: int):
        shape = self.scales[s][1]
        width = self.n_channels[s]
        lead = 0 if (s == 0 and b == 0) else 1  # input nonlinearity takes index 0
        pre = f"stack.{s}.stack.{b}.bottleneck_block"
        return [
            (f"{pre}.{lead}", 3, shape),
            (f"{pre}.{lead + 2}", 1, (width,) + shape[1:]),
            (f"{pre}.{lead + 4}", 3, (width,) + shape[1:]),
        ]

    def init_state_dict(self, seed: int, power_iters: int = 5) -> dict:
        """A state dict as the official code would hold one after some training:
        PyTorch-default-like conv init, ActNorm and prior away from their identity
        values, and u, v after `power_iters` training-mode power iterations."""
        rng = np.random.default_rng(seed)
        p = {}
        for s, (_, shape, _) in enumerate(self.scales):
            for b in range(self.n_blocks[s]):
                an = f"stack.{s}.stack.{b}.actnorm"
                if self.actnorm:
                    p[an + "._log_scale"] = 0.1 * rng.standard_normal(shape[0])
                    p[an + "._shift"] = 0.1 * rng.standard_normal(shape[0])
                dims = [(shape[0], self.n_channels[s]), (self.n_channels[s], self.n_channels[s]),
                        (self.n_channels[s], shape[0])]
                for (key, k, in_shape), (cin, cout) in zip(self.layers(s, b), dims):
                    bound = 1.0 / np.sqrt(cin * k * k)
                    # Larger than PyTorch's default so that normalization is active.
                    p[key + ".weight_orig"] = 3.0 * rng.uniform(-bound, bound, (cout, cin, k, k))
                    p[key + ".bias"] = rng.uniform(-bound, bound, cout)
                    if k == 1:
                        p[key + ".weight_u"] = normalize(rng.standard_normal(cout))
                        p[key + ".weight_v"] = normalize(rng.standard_normal(cin))
                    else:
                        n_out = cout * in_shape[1] * in_shape[2]
                        p[key + ".weight_u"] = normalize(rng.standard_normal(n_out))
                        p[key + ".weight_v"] = normalize(rng.standard_normal(int(np.prod(in_shape))))
                    p[key + ".weight_sigma"] = np.ones(1)
                    power_iterate(p, key, in_shape, power_iters)
        p["prior_mu"] = 0.1 * rng.standard_normal(self.dim)
        p["prior_logstd"] = 0.1 * rng.standard_normal(self.dim)
        return p

    def eval_weights(self, p: dict) -> dict:
        """The normalized weight of every conv, as the eval-mode forward uses it."""
        out = {}
        for s in range(len(self.scales)):
            for b in range(self.n_blocks[s]):
                for key, _, in_shape in self.layers(s, b):
                    out[key] = eval_weight(p, key, in_shape, self.coeff)
        return out

    # ---- forward with tangents: x [B, ...], t [B, T, ...] (T tangent vectors)

    def _bottleneck(self, p, w, s, b, x, t):
        lead = not (s == 0 and b == 0)
        h, th = x, t
        for i, (key, k, _) in enumerate(self.layers(s, b)):
            if i > 0 or lead:
                th = th * self.act_grad(h)[:, None]
                h = self.act(h)
            bsz, nt = th.shape[:2]
            th = conv2d(th.reshape((bsz * nt,) + th.shape[2:]), w[key], k // 2)
            th = th.reshape((bsz, nt) + th.shape[1:])
            h = conv2d(h, w[key], k // 2) + p[key + ".bias"][None, :, None, None]
        return h, th

    def _actnorm(self, p, s, b, x, t):
        if not self.actnorm:
            return x, t, 0.0
        an = f"stack.{s}.stack.{b}.actnorm"
        ls = p[an + "._log_scale"][None, :, None, None]
        y = x * np.exp(ls) + p[an + "._shift"][None, :, None, None]
        return y, t * np.exp(ls)[:, None], float(p[an + "._log_scale"].sum()) * x.shape[2] * x.shape[3]

    def forward(self, p: dict, x: np.ndarray, tangents: bool = True):
        """z [B, D], and with `tangents` the exact log|det dz/dx| per sample."""
        w = self.eval_weights(p)
        bsz = x.shape[0]
        d_in = int(np.prod(x.shape[1:]))
        t = np.broadcast_to(np.eye(d_in).reshape((1, d_in) + x.shape[1:]), (bsz, d_in) + x.shape[1:]).copy() \
            if tangents else np.zeros((bsz, 0) + x.shape[1:])

        def both(f, x, t):
            tt = f(t.reshape((-1,) + t.shape[2:]))
            return f(x), tt.reshape((bsz, t.shape[1]) + tt.shape[1:])

        if self.init_squeeze:
            x, t = both(squeeze_forward, x, t)
        if self.inj_pad:
            padf = lambda a: np.pad(a, ((0, 0), (0, self.inj_pad), (0, 0), (0, 0)))
            x, t = both(padf, x, t)
        zs, tzs = [], []
        for s, (sq, _, split) in enumerate(self.scales):
            if sq:
                x, t = both(squeeze_forward, x, t)
            for b in range(self.n_blocks[s]):
                x, t, _ = self._actnorm(p, s, b, x, t)
                fx, tf = self._bottleneck(p, w, s, b, x, t)
                x, t = fx + x, tf + t
            if split:
                n = x.shape[1] // 2
                zs.append(x[:, :n]); tzs.append(t[:, :, :n])
                x, t = x[:, n:], t[:, :, n:]
        zs.append(x); tzs.append(t)
        z = np.concatenate([a.reshape(bsz, -1) for a in zs], 1)
        if not tangents:
            return z, None
        jac = np.concatenate([a.reshape(bsz, a.shape[1], -1) for a in tzs], 2)  # [B, D_in, D_z]
        logdet = np.array([np.linalg.slogdet(jac[i])[1] for i in range(bsz)])
        return z, logdet

    def logpz(self, p: dict, z: np.ndarray) -> np.ndarray:
        mu, ls = p["prior_mu"], p["prior_logstd"]
        return (-0.5 * ((z - mu) / np.exp(ls)) ** 2 - ls - 0.5 * np.log(2 * np.pi)).sum(1)

    def split_zs(self, z: np.ndarray):
        """`split_zs`: the flat z back into the per-scale parts."""
        shapes = [(shape[0] // 2,) + shape[1:] for _, shape, split in self.scales if split]
        shapes.append(self.scales[-1][1])  # the last scale never splits
        out, off = [], 0
        for sh in shapes:
            n = int(np.prod(sh))
            out.append(z[:, off : off + n].reshape((z.shape[0],) + tuple(sh)))
            off += n
        return out

    def inverse(self, p: dict, z: np.ndarray, max_iter: int = 10) -> np.ndarray:
        """`multiscale_conv_iResNet.inverse(split_zs(z), max_iter)`."""
        w = self.eval_weights(p)
        zs = self.split_zs(z)
        cur = zs[-1]
        zs = zs[:-1]
        for s in reversed(range(len(self.scales))):
            sq, _, split = self.scales[s]
            if split:
                cur = np.concatenate([zs[-1], cur], 1)
                zs = zs[:-1]
            for b in reversed(range(self.n_blocks[s])):
                y = cur
                xk = y
                for _ in range(max_iter):
                    fx, _ = self._bottleneck(p, w, s, b, xk, np.zeros((xk.shape[0], 0) + xk.shape[1:]))
                    xk = y - fx
                if self.actnorm:
                    an = f"stack.{s}.stack.{b}.actnorm"
                    xk = (xk - p[an + "._shift"][None, :, None, None]) * np.exp(
                        -p[an + "._log_scale"][None, :, None, None])
                cur = xk
            if sq:
                cur = squeeze_inverse(cur)
        if self.inj_pad:
            cur = cur[:, : cur.shape[1] - self.inj_pad]
        if self.init_squeeze:
            cur = squeeze_inverse(cur)
        return cur
