#!/usr/bin/env python3
"""Tests of convert_official.py and official_model.py (numpy only; not part of CI).

    python3 examples/pytorch/test_convert_official.py

1. The official re-implementation: its squeeze puts channel c at offset (dy, dx)
   into (2*dy + dx)*C + c (checked by index arithmetic), its inverse undoes it,
   its forward-mode log-det agrees with central finite differences, its inverse
   with its forward.
2. The converter: written weights equal the eval-mode weights the official model
   computes with (3x3: / (max(1, sigma/c) + 1e-5), 1x1: / max(1, sigma/c)),
   ActNorm and prior map by name, `module.` prefixes are accepted, actnorm=False
   maps to the identity, and bad state dicts exit 2 naming the key, writing nothing.
3. The committed fixture of compiler/tests/official.rs is what the scripts produce.
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import convert_official  # noqa: E402
import make_official_fixture  # noqa: E402
from official_model import OfficialFlow, squeeze_forward, squeeze_inverse  # noqa: E402

FIXTURE = HERE.parents[1] / "compiler" / "tests" / "fixtures" / "official"


def read_safetensors(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        dt = {"F64": "<f8", "F32": "<f4"}[info["dtype"]]
        out[name] = np.frombuffer(data[8 + n + a : 8 + n + b], dtype=dt).reshape(info["shape"])
    return out


def test_squeeze_order():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 6))
    y = squeeze_forward(x)
    c = 3
    for ci in range(c):
        for h in range(4):
            for w in range(6):
                assert y[1, (2 * (h % 2) + w % 2) * c + ci, h // 2, w // 2] == x[1, ci, h, w]
    assert np.array_equal(squeeze_inverse(y), x)


def test_official_model_logdet_and_inverse():
    m = OfficialFlow((3, 4, 4), [1, 1], [1, 2], [4, 4], init_squeeze=True)
    p = m.init_state_dict(seed=3, power_iters=20)
    x = 0.3 * np.random.default_rng(1).standard_normal((1, 3, 4, 4))
    z, ld = m.forward(p, x)
    d = x.size
    jac = np.zeros((d, d))
    h = 1e-6
    for i in range(d):
        e = np.zeros(d)
        e[i] = h
        zp, _ = m.forward(p, x + e.reshape(x.shape), tangents=False)
        zm, _ = m.forward(p, x - e.reshape(x.shape), tangents=False)
        jac[i] = (zp - zm)[0] / (2 * h)
    fd = np.linalg.slogdet(jac)[1]
    assert abs(fd - ld[0]) < 1e-6, (fd, ld)
    assert np.abs(m.inverse(p, z, max_iter=200) - x).max() < 1e-12


def run_converter(sd: dict, tmp: Path, *extra) -> tuple[int, Path, Path]:
    src = tmp / "sd.npz"
    np.savez(src, **sd)
    w, t = tmp / "w.safetensors", tmp / "m.toml"
    for f in (w, t):
        if f.exists():
            f.unlink()
    rc = convert_official.main([str(src), "--input", "3,8,8", "--out-weights", str(w), "--out-model", str(t), *extra])
    return rc, w, t


def test_converter_weights():
    model, p, _ = make_official_fixture.build()
    with tempfile.TemporaryDirectory() as d:
        rc, w, t = run_converter({"module." + k: v for k, v in p.items()}, Path(d))
        assert rc == 0
        got = read_safetensors(w)
        want = model.eval_weights(p)
        for s in range(3):
            for b in range(2):
                for li, (key, k, ish) in enumerate(model.layers(s, b)):
                    ours = f"stage{s}.block{b}.conv{li}"
                    assert np.array_equal(got[ours + ".weight"], want[key]), ours
                    assert np.array_equal(got[ours + ".bias"], p[key + ".bias"])
                an = f"stack.{s}.stack.{b}.actnorm"
                assert np.array_equal(got[f"stage{s}.block{b}.actnorm.log_scale"], p[an + "._log_scale"])
                assert np.array_equal(got[f"stage{s}.block{b}.actnorm.bias"], p[an + "._shift"])
        assert np.array_equal(got["prior.mean"], p["prior_mu"])
        assert np.array_equal(got["prior.log_std"], p["prior_logstd"])
        toml = t.read_text()
        for line in ('squeeze_order = "space_to_depth"', 'factor_out_half = "first"',
                     'normalize = "if_needed"', "squeeze = true", "factor_out = true"):
            assert line in toml, line


def test_converter_actnorm_false_is_identity():
    m = OfficialFlow((3, 8, 8), [1, 1], [1, 2], [4, 4], init_squeeze=True, actnorm=False)
    p = m.init_state_dict(seed=4)
    with tempfile.TemporaryDirectory() as d:
        rc, w, _ = run_converter(p, Path(d))
        assert rc == 0
        got = read_safetensors(w)
        assert not got["stage1.block0.actnorm.log_scale"].any()
        assert not got["stage1.block0.actnorm.bias"].any()


def test_converter_rejects_bad_input():
    _, p, _ = make_official_fixture.build()
    bad = {
        "extra key": {**p, "stack.0.stack.0.foo": np.zeros(1)},
        "classifier": {**p, "bn1.weight": np.zeros(4)},
        "missing u": {k: v for k, v in p.items() if k != "stack.1.stack.0.bottleneck_block.3.weight_u"},
        "missing prior": {k: v for k, v in p.items() if k != "prior_mu"},
        "bad shape": {**p, "stack.0.stack.1.bottleneck_block.1.bias": np.zeros(3)},
        "nan": {**p, "stack.0.stack.1.actnorm._shift": np.full(12, np.nan)},
    }
    with tempfile.TemporaryDirectory() as d:
        for name, sd in bad.items():
            rc, w, t = run_converter(sd, Path(d))
            assert rc == 2, name
            assert not w.exists() and not t.exists(), name
        rc, w, _ = run_converter(p, Path(d), "--input", "3,9,8")
        assert rc == 2 and not w.exists()
        rc, w, _ = run_converter(p, Path(d), "--nonlin", "softplus")
        assert rc == 2 and not w.exists()


def test_fixture_is_reproducible():
    with tempfile.TemporaryDirectory() as d:
        assert make_official_fixture.main.__code__  # the script's entry point
        sys.argv = ["make_official_fixture.py", d]
        assert make_official_fixture.main() == 0
        for f in sorted(FIXTURE.iterdir()):
            new = Path(d) / f.name
            if f.suffix == ".npy":
                assert np.allclose(np.load(new), np.load(f), rtol=1e-13, atol=0), f.name
            elif f.suffix == ".safetensors":
                a, b = read_safetensors(new), read_safetensors(f)
                assert a.keys() == b.keys()
                for k in a:
                    assert np.allclose(a[k], b[k], rtol=1e-13, atol=0), k
            else:
                assert new.read_text() == f.read_text(), f.name


if __name__ == "__main__":
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_")]
    for t in tests:
        t()
        print(f"ok   {t.__name__}")
    print(f"{len(tests)} passed")
