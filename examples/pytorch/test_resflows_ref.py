#!/usr/bin/env python3
"""Tests of resflows_ref.py and resflows_ckpt.py (numpy only).

    cd examples/pytorch && python3 -m unittest -v test_resflows_ref

Oracles, each written apart from the code under test:
  * squeeze and the latent order: index arithmetic (channel 4c + 2dy + dx) and a
    hand-listed z layout for factor-out;
  * convolutions: a naive loop convolution, and the adjoint identity <Ax, y> = <x, A^T y>;
  * activations: central differences of the values; LipSwish against its formula;
  * eval spectral normalization: numpy's SVD of the layer's operator matrix (converged
    u, v) and u^T M v with M built column by column (unconverged u, v);
  * the exact log-det: slogdet of the central-difference Jacobian of the whole x -> z;
  * the logit log-det: the derivative (1 - 2a) (1/s + 1/(1 - s)) and central differences;
  * bits/dim: train_img.py's formula evaluated by hand for a flow whose z is known;
  * the inverse: the forward of the inverse;
  * checkpoints: train_img.py-style files written by torchsave_testing.py (the pickle
    layout torch writes), read back through the restricted unpickler.
"""

from __future__ import annotations

import os

# The matrices here are small: BLAS threads only add overhead, most of all on a shared
# CI machine (set before numpy is imported; an explicit setting wins).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import collections  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import unittest  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resflows_ckpt as C  # noqa: E402
import resflows_ref as R  # noqa: E402
import torchsave_testing as W  # noqa: E402


# ------------------------------------------------------------------ test support


def random_state_dict(plan, rng, gain=2.0, power_iters=200):
    """A state dict in Residual Flows' layout: random weights (gain x the fan-in scale,
    so that most layers get normalized), u and v after `power_iters` power iterations,
    initialized ActNorms, and the buffers the real modules carry."""
    sd = {}
    for layer in plan.layers():
        if isinstance(layer, R.ActNorm):
            n = math.prod(layer.shape) if layer.flat else layer.shape[0]
            sd[layer.name + "weight"] = rng.normal(0, 0.2, n)
            sd[layer.name + "bias"] = rng.normal(0, 0.2, n)
            sd[layer.name + "initialized"] = np.array(1)
        elif isinstance(layer, R.Block):
            sd[layer.name + "geom_p"] = np.array(0.0)
            sd[layer.name + "lamb"] = np.array(2.0)
            for k in ("last_n_samples", "last_firmom", "last_secmom"):
                sd[layer.name + k] = np.zeros(1)
            for op in layer.ops:
                if isinstance(op, R.Act) and op.kind == "swish":
                    sd[op.name + "beta"] = np.array([0.5 + rng.normal(0, 0.3)])
                if not isinstance(op, R.Lin):
                    continue
                fan_in = op.cin * max(op.k, 1) ** 2
                wshape = (op.cout, op.cin, op.k, op.k) if op.k else (op.cout, op.cin)
                wt = rng.normal(0, gain / math.sqrt(fan_in), wshape)
                sd[op.name + "weight"], sd[op.name + "bias"] = wt, rng.normal(0, 0.1, op.cout)
                if op.k:
                    sd[op.name + "initialized"] = np.array(1)
                    sd[op.name + "spatial_dims"] = np.array(op.hw, dtype=np.float64)
                sd[op.name + "scale"] = np.array(0.0)
                sd[op.name + "u"], sd[op.name + "v"] = power_iteration(op, wt, rng, power_iters)
    return sd


def power_iteration(op, weight, rng, iters):
    """u, v after `iters` power iterations from random unit vectors."""
    if op.k <= 1:
        w2 = weight.reshape(op.cout, op.cin)
        u, v = R.normalize(rng.normal(size=op.cout)), R.normalize(rng.normal(size=op.cin))
        for _ in range(iters):
            u = R.normalize(w2 @ v)
            v = R.normalize(w2.T @ u)
        return u, v
    (h, w), pad = op.hw, op.k // 2
    v, u = R.normalize(rng.normal(size=op.cin * h * w)), None
    for _ in range(iters):
        us = R.conv2d(v.reshape(1, op.cin, h, w), weight, pad)
        u = R.normalize(us.reshape(-1))
        v = R.normalize(R.conv2d_adjoint(u.reshape(us.shape), weight, pad).reshape(-1))
    return u, v


def naive_conv(x, w, pad):
    """Direct sum over every index; slow, for tiny shapes only."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    out = np.zeros((n, o, h + 2 * pad - k + 1, wd + 2 * pad - k + 1))
    for b in range(n):
        for oc in range(o):
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    acc = 0.0
                    for ic in range(c):
                        for dy in range(k):
                            for dx in range(k):
                                y, xx = i + dy - pad, j + dx - pad
                                if 0 <= y < h and 0 <= xx < wd:
                                    acc += x[b, ic, y, xx] * w[oc, ic, dy, dx]
                    out[b, oc, i, j] = acc
    return out


def operator_matrix(op, weight, hw):
    """The matrix of a conv layer on [cin, h, w] inputs, column by column."""
    h, w = hw
    d = op.cin * h * w
    cols = R.conv2d(np.eye(d).reshape(d, op.cin, h, w), weight, op.k // 2)
    return cols.reshape(d, -1).T


def fd_logdet(net, x1, h=1e-6):
    """log|det dz/dx| of the whole flow at one sample, by central differences."""
    d = x1.size
    e = np.eye(d).reshape((d,) + x1.shape)
    zp, _ = net.forward(x1[None] + h * e, with_logdet=False)
    zm, _ = net.forward(x1[None] - h * e, with_logdet=False)
    sign, logabs = np.linalg.slogdet(((zp - zm) / (2 * h)).T)
    return sign, logabs


def make_net(args, seed=0, **kw):
    cfg = R.Config.from_args(args)
    plan = R.Plan(cfg)
    sd = random_state_dict(plan, np.random.default_rng(seed), **kw)
    return cfg, plan, sd, R.ResFlow.from_state_dict(cfg, sd)


# ------------------------------------------------------------------ primitives


class Primitives(unittest.TestCase):
    def test_squeeze_index_arithmetic(self):
        x = np.random.default_rng(1).normal(size=(2, 3, 4, 6))
        y = R.squeeze(x)
        self.assertEqual(y.shape, (2, 12, 2, 3))
        for c in range(3):
            for dy in range(2):
                for dx in range(2):
                    for i in range(2):
                        for j in range(3):
                            got = y[:, 4 * c + 2 * dy + dx, i, j]
                            np.testing.assert_array_equal(got, x[:, c, 2 * i + dy, 2 * j + dx])
        np.testing.assert_array_equal(R.unsqueeze(y), x)

    def test_conv_against_naive_loops_and_adjoint(self):
        rng = np.random.default_rng(2)
        for k in (1, 3, 5):
            x, w = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(2, 3, k, k))
            y = R.conv2d(x, w, k // 2)
            np.testing.assert_allclose(y, naive_conv(x, w, k // 2), rtol=0, atol=1e-12)
            r = rng.normal(size=y.shape)
            self.assertAlmostEqual(float(np.sum(y * r)), float(np.sum(x * R.conv2d_adjoint(r, w, k // 2))), places=10)

    def test_activation_derivatives(self):
        x = np.linspace(-3.3, 3.3, 67)  # avoids the kinks at 0 and +-1
        x = x[(np.abs(np.abs(x) - 1) > 1e-3) & (np.abs(x) > 1e-3)]
        for kind in R.ACTS:
            beta = 0.37 if kind == "swish" else None
            val, der = R.activation(kind, x, beta)
            h = 1e-6
            fd = (R.activation(kind, x + h, beta)[0] - R.activation(kind, x - h, beta)[0]) / (2 * h)
            np.testing.assert_allclose(der, fd, rtol=1e-7, atol=1e-8, err_msg=kind)
        val, _ = R.activation("swish", x, 0.37)
        slope = math.log1p(math.exp(0.37))
        np.testing.assert_allclose(val, x / (1 + np.exp(-x * slope)) / 1.1, rtol=1e-14)
        val, _ = R.activation("lcube", np.array([-2.0, -1.0, 0.5, 1.0, 2.0]))
        np.testing.assert_allclose(val, [-2 + 2 / 3, -1 / 3, 0.125 / 3, 1 / 3, 2 - 2 / 3], rtol=1e-15)
        val, der = R.activation("softplus", np.array([25.0, 19.0]))
        np.testing.assert_allclose(val, [25.0, math.log1p(math.exp(19.0))], rtol=1e-15)  # torch's threshold 20
        self.assertEqual(der[0], 1.0)

    def test_dequantize_is_pixel_plus_noise_over_256(self):
        p, u = np.array([0, 17, 255]), np.array([0.25, 0.5, 0.999])
        np.testing.assert_allclose(R.dequantize(p, u), (p + u) / 256, rtol=1e-15)


# ------------------------------------------------------------------ spectral normalization


class SpectralNorm(unittest.TestCase):
    LAYERS = [R.Lin("d.", 7, 5, 0), R.Lin("p.", 6, 4, 1, (3, 3)), R.Lin("c.", 2, 3, 3, (4, 5))]

    def test_converged_sigma_is_the_top_singular_value(self):
        rng = np.random.default_rng(3)
        for op in self.LAYERS:
            wshape = (op.cout, op.cin, op.k, op.k) if op.k else (op.cout, op.cin)
            wt = rng.normal(size=wshape)
            u, v = power_iteration(op, wt, rng, 3000)
            m = operator_matrix(op, wt, op.hw) if op.k > 1 else wt.reshape(op.cout, op.cin)
            top = np.linalg.svd(m, compute_uv=False)[0]
            self.assertAlmostEqual(R.eval_sigma(op, wt, u, v) / top, 1.0, delta=1e-9, msg=op.name)

    def test_unconverged_sigma_is_u_M_v_and_scaling(self):
        rng = np.random.default_rng(4)
        for op in self.LAYERS:
            wshape = (op.cout, op.cin, op.k, op.k) if op.k else (op.cout, op.cin)
            wt = rng.normal(size=wshape)
            m = operator_matrix(op, wt, op.hw) if op.k > 1 else wt.reshape(op.cout, op.cin)
            u, v = R.normalize(rng.normal(size=m.shape[0])), R.normalize(rng.normal(size=m.shape[1]))
            sigma = float(u @ m @ v)
            self.assertAlmostEqual(R.eval_sigma(op, wt, u, v), sigma, delta=1e-12 * (1 + abs(sigma)))

    def test_effective_weights_divide_only_above_coeff(self):
        cfg, plan, sd, _ = make_net(dict(data="mnist", imagesize=8, nblocks="1-1", idim=3, fc_end=False, coeff=0.9))
        eff = R.effective_weights(plan, sd)
        divided = kept = 0
        for layer in plan.layers():
            for op in getattr(layer, "ops", []):
                if not isinstance(op, R.Lin):
                    continue
                wt, u, v = sd[op.name + "weight"], sd[op.name + "u"], sd[op.name + "v"]
                m = operator_matrix(op, wt, op.hw) if op.k > 1 else wt.reshape(op.cout, -1)
                sigma = float(u @ m @ v)
                expect = wt * (0.9 / sigma) if sigma > 0.9 else wt
                np.testing.assert_allclose(eff[op.name + "weight"], expect, rtol=1e-12)
                divided, kept = divided + (sigma > 0.9), kept + (sigma <= 0.9)
        self.assertGreater(divided, 0)
        sd2 = dict(sd)
        name = next(k for k in sd if k.endswith("nnet.2.weight"))
        sd2[name] = sd[name] * 1e-3  # far below coeff: kept as is
        np.testing.assert_array_equal(R.effective_weights(plan, sd2)[name], sd2[name])


# ------------------------------------------------------------------ the flow


CONFIGS = {
    # image size 28 (MNIST), no factor-out, fc_end, LipSwish, the train_img.py chain
    "mnist28": dict(data="mnist", imagesize=28, nblocks="1-1-1", idim=3, fc_idim=6),
    # image size 32, factor-out, no fc_end
    "mnist32_fo": dict(data="mnist", imagesize=32, nblocks="1-1", idim=3, factor_out=True, fc_end=False),
    # CIFAR channels, factor-out and fc_end, elu, no preact / first_resblock, dropout, fc_actnorm
    "cifar8": dict(data="cifar10", imagesize=8, nblocks="1-1", idim=4, fc_idim=5, factor_out=True, act="elu",
                   preact=False, first_resblock=False, dropout=0.1, fc_actnorm=True, kernels="3-3-1"),
    # padding, squeeze_first, all-dense blocks (fc), softplus
    "pad_fc": dict(data="cifar10", imagesize=8, nblocks="1-1", idim=6, padding=1, squeeze_first=True,
                   fc=True, act="softplus", fc_end=False, kernels="3-1-3"),
    # lcube, 5x5 kernels, no actnorm
    "lcube": dict(data="cifar10", imagesize=8, nblocks="2", idim=3, act="lcube", actnorm=False,
                  kernels="5-1-3", fc_idim=4),
}


class Flow(unittest.TestCase):
    def check(self, name, fd_tol):
        cfg, plan, sd, net = make_net(CONFIGS[name])
        rng = np.random.default_rng(5)
        x = rng.uniform(0.05, 0.95, (2,) + plan.input_shape)
        z, _ = net.forward(x, with_logdet=False)
        self.assertEqual(z.shape, (2, math.prod(plan.input_shape)))
        z0, ld = net.forward(x[:1])
        np.testing.assert_allclose(z0, z[:1], rtol=1e-12, atol=1e-12)  # batching changes only rounding
        sign, fd = fd_logdet(net, x[0])
        self.assertEqual(sign, 1.0)
        self.assertLess(abs(ld[0] - fd), fd_tol * max(1.0, abs(fd)), f"{name}: exact {ld[0]} vs fd {fd}")
        x_back = net.inverse(z)
        self.assertLess(float(np.max(np.abs(x_back - x))), 1e-9, name)
        return cfg, plan, net, x, z, ld

    def test_mnist28(self):
        self.check("mnist28", 1e-7)

    def test_mnist32_factor_out(self):
        self.check("mnist32_fo", 1e-7)

    def test_cifar8_factor_out_fc_end(self):
        self.check("cifar8", 1e-7)

    def test_padding_squeeze_first_dense(self):
        self.check("pad_fc", 1e-7)

    def test_lcube_no_actnorm(self):
        self.check("lcube", 1e-7)

    def test_block_logdet_is_the_log_of_a_positive_determinant(self):
        # a second, direct oracle per block: det(I + J) with J by central differences of g
        cfg, plan, sd, net = make_net(CONFIGS["cifar8"])
        x = np.random.default_rng(6).normal(size=(1,) + plan.scale_shapes[1])
        blk = next(l for l in plan.scales[1] if isinstance(l, R.Block) and l.dense)
        d, h = x.size, 1e-6
        e = np.eye(d).reshape((d,) + x.shape[1:])
        jac = ((net.g(blk, x + h * e)[0] - net.g(blk, x - h * e)[0]) / (2 * h)).reshape(d, d).T
        np.testing.assert_allclose(net.block_jacobian(blk, x[0]), jac, atol=1e-8)
        self.assertAlmostEqual(net.block_logdet(blk, x)[0], np.linalg.slogdet(np.eye(d) + jac)[1], delta=1e-7)

    def test_branches_by_hand(self):
        # g of a conv block (first block of scale 0: no input activation; second block:
        # with it) and of a dense fc_end block, written out layer by layer.
        cfg, plan, sd, net = make_net(dict(data="cifar10", imagesize=8, nblocks="2-1", idim=3, fc_idim=4,
                                           kernels="3-1-3", dropout=0.2))
        w = net.w
        sw = lambda t, name: R.activation("swish", t, w[name + "beta"][0])[0]  # noqa: E731
        rng = np.random.default_rng(13)
        x = rng.normal(size=(1, 3, 8, 8))
        pre = "transforms.0.chain."
        blocks = [l for l in plan.scales[0] if isinstance(l, R.Block)]
        self.assertEqual([b.name for b in blocks], [pre + "2.", pre + "4."])

        def conv(t, name, k):
            return naive_conv(t, w[name + "weight"], k // 2) + w[name + "bias"][None, :, None, None]

        n = pre + "2.nnet."  # conv, act, conv, act, dropout, conv
        h = sw(conv(sw(conv(x, n + "0.", 3), n + "1."), n + "2.", 1), n + "3.")
        np.testing.assert_allclose(net.g(blocks[0], x)[0], conv(h, n + "5.", 3), rtol=1e-12, atol=1e-12)
        n = pre + "4.nnet."  # act, conv, act, conv, act, dropout, conv
        h = sw(conv(sw(conv(sw(x, n + "0."), n + "1.", 3), n + "2."), n + "3.", 1), n + "4.")
        np.testing.assert_allclose(net.g(blocks[1], x)[0], conv(h, n + "6.", 3), rtol=1e-12, atol=1e-12)
        dense = next(l for l in plan.scales[1] if isinstance(l, R.Block) and l.dense)
        n = dense.name + "nnet.nnet."  # act, linear, act, linear, act, dropout, linear on the flattened tensor
        y = rng.normal(size=(1,) + dense.shape)
        h = sw(y.reshape(1, -1), n + "0.")
        for i in (1, 3):
            h = sw(h @ w[n + f"{i}.weight"].T + w[n + f"{i}.bias"], n + f"{i + 1}.")
        h = h @ w[n + "6.weight"].T + w[n + "6.bias"]
        np.testing.assert_allclose(net.g(dense, y)[0], h.reshape(y.shape), rtol=1e-12, atol=1e-12)

    def zero_branch_net(self, args):
        """A flow whose residual branches are g = 0 (all weights and biases zero)."""
        cfg = R.Config.from_args(args)
        plan = R.Plan(cfg)
        sd = random_state_dict(plan, np.random.default_rng(7))
        for layer in plan.layers():
            for op in getattr(layer, "ops", []):
                if isinstance(op, R.Lin):
                    sd[op.name + "weight"] = np.zeros_like(sd[op.name + "weight"])
                    sd[op.name + "bias"] = np.zeros_like(sd[op.name + "bias"])
        return cfg, plan, R.ResFlow.from_state_dict(cfg, sd)

    def test_latent_order_with_factor_out(self):
        # 1 x 8 x 8, two scales: scale 0 squeezes to 4 x 4 x 4 and sends channels 2, 3
        # to z; scale 1 keeps channels 0, 1. With g = 0 and no actnorm z is logit(x)
        # permuted: list the permutation by hand.
        cfg, plan, net = self.zero_branch_net(dict(data="mnist", imagesize=8, nblocks="1-1", idim=2,
                                                   factor_out=True, fc_end=False, actnorm=False))
        x = np.random.default_rng(8).uniform(0.1, 0.9, (1, 1, 8, 8))
        z, _ = net.forward(x)
        a = cfg.alpha
        lx = np.log(a + (1 - 2 * a) * x[0, 0]) - np.log(1 - a - (1 - 2 * a) * x[0, 0])
        expect = []
        for channels in ((2, 3), (0, 1)):
            for ch in channels:
                dy, dx = divmod(ch, 2)
                for i in range(4):
                    for j in range(4):
                        expect.append(lx[2 * i + dy, 2 * j + dx])
        np.testing.assert_allclose(z[0], expect, rtol=1e-13, atol=1e-13)

    def test_logit_logdet_and_bits_per_dim_by_hand(self):
        for padding in (0, 1):
            args = dict(data="cifar10", imagesize=8, nblocks="1-1", idim=2, actnorm=False, padding=padding)
            cfg, plan, net = self.zero_branch_net(args)
            x = np.full((1,) + plan.input_shape, 0.3)
            z, ld = net.forward(x)
            a, d = cfg.alpha, x.size
            s = a + (1 - 2 * a) * 0.3
            z0 = math.log(s / (1 - s))
            np.testing.assert_allclose(z, z0, rtol=1e-14)
            dlogit = (1 - 2 * a) * (1 / s + 1 / (1 - s))  # d/dx [log s - log(1 - s)]
            fd = ((math.log((s + 1e-7) / (1 - s - 1e-7)) - math.log((s - 1e-7) / (1 - s + 1e-7))) / 2e-7) * (1 - 2 * a)
            self.assertAlmostEqual(dlogit / fd, 1.0, delta=1e-8)
            self.assertAlmostEqual(ld[0], d * math.log(dlogit), delta=1e-10 * d)
            # train_img.py: logpx = logpz - delta_logp - log(256) * S^2 (3 + padding); bpd = -logpx / (S^2 3) / log 2
            logpz = d * (-0.5 * math.log(2 * math.pi) - z0 * z0 / 2)
            bpd = -(logpz + d * math.log(dlogit) - math.log(256) * 64 * (3 + padding)) / (64 * 3) / math.log(2)
            self.assertAlmostEqual(R.bits_per_dim(cfg, z, ld)[0], bpd, delta=1e-11)

    def test_actnorm_form_and_placement_by_hand(self):
        # 1 x 8 x 8, blocks 1-1, g = 0, actnorm and fc_actnorm: scale 0 is logit,
        # actnorm, fc-actnorm, block, actnorm, fc-actnorm, squeeze; scale 1 is block,
        # actnorm, fc-actnorm. Each ActNorm is (x + b) exp(w), per channel or per
        # element of the flattened (c, h, w) tensor.
        cfg, plan, net = self.zero_branch_net(dict(data="mnist", imagesize=8, nblocks="1-1", idim=2, fc_end=False,
                                                   actnorm=True, fc_actnorm=True))
        names = [l.name for l in plan.layers() if isinstance(l, R.ActNorm)]
        self.assertEqual(names, ["transforms.0.chain.1.", "transforms.0.chain.2.fc_module.", "transforms.0.chain.4.",
                                 "transforms.0.chain.5.fc_module.", "transforms.1.chain.1.",
                                 "transforms.1.chain.2.fc_module."])
        p = {k: net.w[k] for k in net.w}
        x = np.random.default_rng(12).uniform(0.1, 0.9, (1, 1, 8, 8))
        a = cfg.alpha
        v = np.log(a + (1 - 2 * a) * x[0, 0]) - np.log(1 - a - (1 - 2 * a) * x[0, 0])  # [8, 8]
        logdet = float(np.sum(np.log((1 - 2 * a) / ((a + (1 - 2 * a) * x) * (1 - a - (1 - 2 * a) * x)))))
        for chan, flat in ((names[0], names[1]), (names[2], names[3])):
            v = (v + p[chan + "bias"][0]) * math.exp(p[chan + "weight"][0])
            v = (v + p[flat + "bias"].reshape(8, 8)) * np.exp(p[flat + "weight"].reshape(8, 8))
            logdet += 64 * p[chan + "weight"][0] + p[flat + "weight"].sum()
        sq = np.zeros((4, 4, 4))
        for dy in range(2):
            for dx in range(2):
                for i in range(4):
                    for j in range(4):
                        sq[2 * dy + dx, i, j] = v[2 * i + dy, 2 * j + dx]
        sq = (sq + p[names[4] + "bias"][:, None, None]) * np.exp(p[names[4] + "weight"])[:, None, None]
        sq = (sq + p[names[5] + "bias"].reshape(4, 4, 4)) * np.exp(p[names[5] + "weight"].reshape(4, 4, 4))
        logdet += 16 * p[names[4] + "weight"].sum() + p[names[5] + "weight"].sum()
        z, ld = net.forward(x)
        np.testing.assert_allclose(z[0], sq.reshape(-1), rtol=1e-13, atol=1e-13)
        self.assertAlmostEqual(ld[0], logdet, delta=1e-10 * abs(logdet))
        np.testing.assert_allclose(net.inverse(z), x, rtol=0, atol=1e-13)

    def test_model_input_pads_then_squeezes(self):
        cfg = R.Config.from_args(dict(data="mnist", imagesize=8, padding=2, squeeze_first=True))
        rng = np.random.default_rng(9)
        x, u = rng.uniform(size=(1, 1, 8, 8)), rng.uniform(size=(1, 2, 8, 8))
        m = R.model_input(cfg, x, u)
        self.assertEqual(m.shape, (1, 12, 4, 4))
        np.testing.assert_array_equal(m[0, 4 * 2 + 3, 1, 2], u[0, 1, 3, 5] / 256)  # channel 2, dy = dx = 1
        np.testing.assert_array_equal(m[0, 0, 3, 0], x[0, 0, 6, 0])


# ------------------------------------------------------------------ options


class Options(unittest.TestCase):
    def test_train_img_defaults_build_their_cifar_chain(self):
        cfg = R.Config.from_args({})
        plan = R.Plan(cfg)
        self.assertEqual((cfg.data, cfg.alpha, cfg.imagesize, plan.n_scale, cfg.coeff), ("cifar10", 0.05, 32, 3, 0.98))
        shapes = R.param_shapes(plan)
        # scale 0: logit, actnorm, 16 x (block, actnorm), squeeze; its first block has no preact
        self.assertEqual(shapes["transforms.0.chain.1.weight"], (3,))
        self.assertEqual(shapes["transforms.0.chain.2.nnet.0.weight"], (512, 3, 3, 3))
        self.assertEqual(shapes["transforms.0.chain.4.nnet.0.beta"], (1,))
        self.assertEqual(shapes["transforms.0.chain.4.nnet.1.weight"], (512, 3, 3, 3))
        self.assertEqual(shapes["transforms.0.chain.33.bias"], (3,))
        self.assertNotIn("transforms.0.chain.34.weight", shapes)  # the squeeze
        # scale 2 (48 x 8 x 8): 16 x (block, actnorm), then 4 x (dense block, fc actnorm)
        self.assertEqual(shapes["transforms.2.chain.30.nnet.5.weight"], (48, 512, 3, 3))
        self.assertEqual(shapes["transforms.2.chain.32.nnet.nnet.1.weight"], (128, 3072))
        self.assertEqual(shapes["transforms.2.chain.32.nnet.nnet.5.weight"], (3072, 128))
        self.assertEqual(shapes["transforms.2.chain.39.fc_module.weight"], (3072,))
        self.assertNotIn("transforms.2.chain.40.fc_module.weight", shapes)

    def test_n_scale_for_28_and_odd_sizes(self):
        self.assertEqual(R.n_scales((1, 1, 1, 1), 28, 28), 3)  # 28, 14, 7
        self.assertEqual(R.n_scales((1, 1), 28, 28), 2)
        plan = R.Plan(R.Config.from_args(dict(data="mnist", imagesize=28, nblocks="1-1-1")))
        self.assertEqual(plan.scale_shapes, [(1, 28, 28), (4, 14, 14), (16, 7, 7)])

    def test_unsupported_options_are_named(self):
        for key, value in [("vnorms", "2122"), ("quadratic", True), ("batchnorm", True), ("learn_p", True),
                           ("block", "coupling"), ("task", "hybrid"), ("task", "classification"), ("act", "sort"),
                           ("kernels", "3-2-3"), ("kernels", "3-1"), ("padding_dist", "gaussian"),
                           ("nblocks", "4-x"), ("coeff", "0.9"), ("data", "lsun")]:
            args = dict(padding=1) if key == "padding_dist" else {}
            args[key] = value
            with self.assertRaises(R.RefError) as cm:
                R.Config.from_args(args)
            msg = str(cm.exception)
            self.assertIn(f"args.{key}", msg)
            self.assertNotIn("\n", msg)
        with self.assertRaisesRegex(R.RefError, "imagesize"):
            R.Plan(R.Config.from_args(dict(imagesize=3)))
        self.assertEqual(R.Config.from_args(dict(dropout=0.3)).dropout, 0.3)


# ------------------------------------------------------------------ checkpoints


# Options of a train_img.py namespace beside the architecture's (kept as a real file has them).
TRAIN_ARGS = dict(dataroot="data", nbits=8, block="resblock", coeff=0.98, vnorms="2222", n_lipschitz_iters=None,
                  sn_tol=1e-3, learn_p=False, n_power_series=None, n_dist="poisson", n_samples=1, n_exact_terms=2,
                  neumann_grad=True, mem_eff=True, quadratic=False, batchnorm=False, add_noise=True, cdim=256,
                  optimizer="adam", lr=1e-3, save="experiment1", seed=1234, ema_val=True, task="density",
                  padding_dist="uniform", resume=None, begin_epoch=0)


def module_tree(names_params: dict, names_buffers: dict):
    """A pickled nn.Module tree (stand-in classes) holding the given parameters and
    buffers, each module's own entries before its children's, as torch keeps them."""
    def node():
        return {"_parameters": collections.OrderedDict(), "_buffers": collections.OrderedDict(),
                "_modules": collections.OrderedDict()}

    root = node()
    for table, items in (("_parameters", names_params), ("_buffers", names_buffers)):
        for name, value in items.items():
            cur, parts = root, name.split(".")
            for p in parts[:-1]:
                cur = cur["_modules"].setdefault(p, node())
            cur[table][parts[-1]] = value

    def build(d, cls):
        state = {"training": False, "_non_persistent_buffers_set": set(), "_forward_hooks": collections.OrderedDict(),
                 "_parameters": d["_parameters"], "_buffers": d["_buffers"],
                 "_modules": collections.OrderedDict((k, build(v, ("torch.nn.modules.container", "Sequential")))
                                                     for k, v in d["_modules"].items())}
        return W.Obj(cls[0], cls[1], state)

    return build(root, ("resflows.resflow", "ResidualFlow"))


class Checkpoints(unittest.TestCase):
    ARCH = CONFIGS["cifar8"]  # factor-out, fc_end, dropout, fc_actnorm

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.cfg = R.Config.from_args(self.ARCH)
        self.plan = R.Plan(self.cfg)
        rng = np.random.default_rng(10)
        self.sd = {k: np.asarray(v, dtype=np.float32) for k, v in random_state_dict(self.plan, rng).items()}
        self.sd = {k: (v.astype(np.int64) if k.endswith("initialized") else v) for k, v in self.sd.items()}
        self.params = list(R.param_shapes(self.plan)) + [k for k in self.sd if k.endswith(("geom_p", "lamb"))]
        order = [k for k in self.sd if k in self.params]  # state_dict order of the parameters
        self.params = order
        self.ema = {k: (self.sd[k] + rng.normal(0, 0.01, self.sd[k].shape)).astype(np.float32) for k in order}

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, args=None, sd=None, shadow=None, shadow_as_list=False, extra=None, name="checkpt.pth"):
        args = dict(TRAIN_ARGS, **self.ARCH) if args is None else args
        sd = self.sd if sd is None else sd
        shadow = self.ema if shadow is None else shadow
        params = {k: W.Tensor(sd[k], param=True) for k in self.params if k in sd}
        buffers = {k: W.Tensor(v) for k, v in sd.items() if k not in params}
        model = module_tree(params, buffers)
        tensors = [W.Tensor(shadow[k]) for k in self.params if k in shadow]
        ema = W.Obj("resflows.utils", "ExponentialMovingAverage", {
            "module": model, "decay": 0.999, "nparams": 0,
            "shadow_params": tensors if shadow_as_list else {k: W.Tensor(v) for k, v in shadow.items()}})
        obj = {"state_dict": W.state_dict(sd), "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3}]},
               "args": W.Obj("argparse", "Namespace", args), "ema": ema, "test_bpd": 3.5}
        obj.update(extra or {})
        path = self.dir / name
        path.write_bytes(W.zip_bytes(obj))
        return path

    def expected(self, params):
        """Eval weights computed here: sigma = u^T M v with M the operator matrix."""
        out = {}
        for layer in self.plan.layers():
            if isinstance(layer, R.ActNorm):
                for k in ("weight", "bias"):
                    out[layer.name + k] = params[layer.name + k].astype(np.float64)
            for op in getattr(layer, "ops", []):
                if isinstance(op, R.Act) and op.kind == "swish":
                    out[op.name + "beta"] = params[op.name + "beta"].astype(np.float64)
                if not isinstance(op, R.Lin):
                    continue
                wt = params[op.name + "weight"].astype(np.float64)
                m = operator_matrix(op, wt, op.hw) if op.k > 1 else wt.reshape(op.cout, -1)
                sigma = float(self.sd[op.name + "u"].astype(np.float64) @ m @ self.sd[op.name + "v"].astype(np.float64))
                out[op.name + "weight"] = wt / max(1.0, sigma / self.cfg.coeff)
                out[op.name + "bias"] = params[op.name + "bias"].astype(np.float64)
        return out

    def assert_weights(self, got, want):
        self.assertEqual(sorted(got), sorted(want))
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15, err_msg=k)

    def test_ema_by_default_raw_with_no_ema(self):
        path = self.write()
        args, weights = C.load(path)
        self.assertEqual(args["vnorms"], "2222")
        self.assertEqual(args["nblocks"], self.ARCH["nblocks"])
        self.assert_weights(weights, self.expected(self.ema))
        _, raw = C.load(path, use_ema=False)
        self.assert_weights(raw, self.expected(self.sd))
        # the loaded weights drive the flow like the state dict with the EMA values does
        sd = {k: v.astype(np.float64) for k, v in self.sd.items()}
        sd.update({k: v.astype(np.float64) for k, v in self.ema.items()})
        x = np.random.default_rng(11).uniform(0.1, 0.9, (1,) + self.plan.input_shape)
        z1, ld1 = R.ResFlow(self.cfg, weights).forward(x)
        z2, ld2 = R.ResFlow.from_state_dict(self.cfg, sd).forward(x)
        np.testing.assert_allclose(z1, z2, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(ld1, ld2, rtol=1e-13)

    def test_shadow_params_as_a_list_follow_parameter_order(self):
        _, by_list = C.load(self.write(shadow_as_list=True))
        self.assert_weights(by_list, self.expected(self.ema))

    def test_unsupported_options_refused_naming_the_option(self):
        for key, value in [("vnorms", "2122"), ("quadratic", True), ("batchnorm", True), ("learn_p", True),
                           ("block", "coupling"), ("task", "classification")]:
            path = self.write(args=dict(TRAIN_ARGS, **self.ARCH, **{key: value}), name=f"{key}.pth")
            with self.assertRaises(C.CheckpointError) as cm:
                C.load(path)
            msg = str(cm.exception)
            self.assertTrue(msg.startswith(str(path)), msg)
            self.assertIn(f"args.{key}", msg)
            self.assertNotIn("\n", msg)

    def test_bad_state_refused_naming_the_key(self):
        actnorm = next(l.name for l in self.plan.layers() if isinstance(l, R.ActNorm))
        conv = next(op.name for l in self.plan.layers() for op in getattr(l, "ops", []) if isinstance(op, R.Lin))
        cases = [
            ({actnorm + "initialized": np.array(0)}, None, f"{actnorm}initialized: 0"),
            ({conv + "initialized": np.array(0)}, None, f"{conv}initialized: 0"),
            ({"classification_heads.0.0.weight": np.zeros(3, np.float32)}, None, "classification_heads.0.0.weight"),
            ({conv + "v": np.zeros(5, np.float32)}, None, f"{conv}v"),
            ({conv + "weight": None}, None, f"state_dict[{conv}weight]: missing"),
            ({}, {}, "ema.shadow_params: empty"),
            ({}, {conv + "bias": np.zeros(2, np.float32)}, f"ema.shadow_params[{conv}bias]: shape"),
        ]
        for i, (change, shadow_change, needle) in enumerate(cases):
            sd = {k: v for k, v in {**self.sd, **change}.items() if v is not None}
            shadow = {} if shadow_change == {} else {**self.ema, **(shadow_change or {})}
            path = self.write(sd=sd, shadow=shadow, name=f"bad{i}.pth")
            with self.assertRaises(C.CheckpointError) as cm:
                C.load(path)
            self.assertIn(needle, str(cm.exception))

    def test_foreign_class_refused_and_not_run(self):
        marker = self.dir / "ran"
        path = self.write(extra={"hook": W.Reduce(W.Global("os", "system"), (f"touch {marker}",))})
        with self.assertRaisesRegex(C.CheckpointError, "os.system"):
            C.load(path)
        self.assertFalse(marker.exists())

    def test_command_line(self):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            self.assertEqual(C.main([str(self.write())]), 0)
            self.assertEqual(C.main([str(self.dir / "absent.pth")]), 2)
        self.assertIn("data cifar10, input [3, 8, 8], 2 scales", out.getvalue())
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1)
        self.assertIn("absent.pth", err.getvalue())


if __name__ == "__main__":
    unittest.main()
