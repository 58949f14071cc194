#!/usr/bin/env python3
"""Tests of convert_official.py, make_official_fixture.py and official_model.py
(numpy only: the .pt checkpoints are written by torchsave_testing.py, not torch).

    cd examples/pytorch && python3 -m unittest -v test_convert_official

1. The official re-implementation: its squeeze puts channel c at offset (dy, dx)
   into (2*dy + dx)*C + c (checked by index arithmetic), its inverse undoes it,
   its forward-mode log-det agrees with central finite differences, its inverse
   with its forward.
2. The converter: written weights equal the eval-mode weights the official model
   computes with (3x3: / (max(1, sigma/c) + 1e-5), 1x1: / max(1, sigma/c)),
   ActNorm and prior map by name, `module.` prefixes are accepted, actnorm=False
   maps to the identity, a .pt (zip or legacy format, a bare state dict, one under
   `state_dict`, or a whole pickled model) gives the same files as the .npz, and
   bad state dicts exit 2 naming the key, writing nothing.
3. Bad input through the scripts as a user runs them (a subprocess per case):
   damaged or mislabelled archives, hostile pickles, complex or non-finite tensors,
   outputs that are directories, symlinks or the input, usage errors: exit 2, one
   line on stderr, no traceback, the directory exactly as before.
4. The committed fixture of compiler/tests/official.rs is what the script produces.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import convert_official  # noqa: E402
import make_official_fixture  # noqa: E402
import torchsave_testing as W  # noqa: E402
from official_model import OfficialFlow, squeeze_forward, squeeze_inverse  # noqa: E402
from test_safeio import snapshot  # noqa: E402

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


def run_converter(sd: dict, tmp: Path, *extra) -> tuple[int, Path, Path]:
    src = tmp / "sd.npz"
    np.savez(src, **sd)
    w, t = tmp / "w.safetensors", tmp / "m.toml"
    for f in (w, t):
        if f.exists():
            f.unlink()
    # In-process (the oracle reads the arrays directly); its messages are not checked here.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = convert_official.main([str(src), "--input", "3,8,8", "--out-weights", str(w), "--out-model", str(t),
                                    *extra])
    return rc, w, t


def module_tree(sd: dict, module: str, name: str):
    """The state dict as a whole pickled nn.Module of class module.name: each dotted
    prefix a child module (torch.nn.Sequential), u and v buffers, the rest parameters."""
    def node(cls_module, cls_name):
        return W.Obj(cls_module, cls_name, nn_module=True, state={
            "_parameters": collections.OrderedDict(), "_buffers": collections.OrderedDict(),
            "_modules": collections.OrderedDict(), "training": False})

    root = node(module, name)
    for key, value in sd.items():
        *path, leaf = key.split(".")
        cur = root
        for part in path:
            cur = cur._modules.setdefault(part, node("torch.nn.modules.container", "Sequential"))
        if leaf in ("weight_u", "weight_v"):
            cur._buffers[leaf] = W.Tensor(value)
        else:
            cur._parameters[leaf] = W.Tensor(value, param=True)
    return root


def run_script(script: str, args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


class OfficialModel(unittest.TestCase):
    def test_squeeze_order(self):
        x = np.random.default_rng(0).standard_normal((2, 3, 4, 6))
        y = squeeze_forward(x)
        c = 3
        for ci in range(c):
            for h in range(4):
                for w in range(6):
                    assert y[1, (2 * (h % 2) + w % 2) * c + ci, h // 2, w // 2] == x[1, ci, h, w]
        assert np.array_equal(squeeze_inverse(y), x)

    def test_official_model_logdet_and_inverse(self):
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


class Converter(unittest.TestCase):
    def test_converter_weights(self):
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

    def test_converter_actnorm_false_is_identity(self):
        m = OfficialFlow((3, 8, 8), [1, 1], [1, 2], [4, 4], init_squeeze=True, actnorm=False)
        p = m.init_state_dict(seed=4)
        with tempfile.TemporaryDirectory() as d:
            rc, w, _ = run_converter(p, Path(d))
            assert rc == 0
            got = read_safetensors(w)
            assert not got["stage1.block0.actnorm.log_scale"].any()
            assert not got["stage1.block0.actnorm.bias"].any()

    def test_converter_rejects_bad_input(self):
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


    def test_pt_checkpoints_match_the_npz(self):
        model, p, _ = make_official_fixture.build()
        sd = {"module." + k: v for k, v in p.items()}
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            rc, w, t = run_converter(sd, d)
            self.assertEqual(rc, 0)
            want_w, want_t = w.read_bytes(), t.read_text()
            ref = read_safetensors(w)
            # The .npz output itself holds the official eval-mode weights.
            key = "stack.1.stack.0.bottleneck_block.1"
            self.assertTrue(np.array_equal(ref["stage1.block0.conv0.weight"], model.eval_weights(p)[key]))
            checkpoints = {
                "zip.pt": W.zip_bytes(W.state_dict(sd)),
                "legacy.pth": W.legacy_bytes(W.state_dict(sd)),
                "dict.pt": W.zip_bytes({"state_dict": W.state_dict(sd), "epoch": 200,
                                        "optimizer": {"lr": 0.1}}),
                "model.pt": W.zip_bytes({"model": module_tree(p, "models.conv_iResNet", "multiscale_conv_iResNet")}),
                "model-legacy.pt": W.legacy_bytes({"model": module_tree(p, "models.conv_iResNet",
                                                                        "multiscale_conv_iResNet")}),
            }
            for name, data in checkpoints.items():
                with self.subTest(name):
                    (d / name).write_bytes(data)
                    r = run_script("convert_official.py", [name, "--input", "3,8,8", "--out-weights",
                                   f"out/{name}.safetensors", "--out-model", f"out/{name}.toml"], d)
                    self.assertEqual(r.returncode, 0, r.stderr)
                    self.assertEqual((d / "out" / f"{name}.safetensors").read_bytes(), want_w)
                    self.assertEqual((d / "out" / f"{name}.toml").read_text(), want_t)

    @unittest.skipUnless(importlib.util.find_spec("torch") is not None,
                         "torch is not installed: the cross-check with real torch.save files needs it "
                         "(bash examples/pytorch/setup.sh); CI runs without it")
    def test_real_torch_checkpoints_match_the_npz(self):
        import torch

        _, p, _ = make_official_fixture.build()
        sd = {"module." + k: v for k, v in p.items()}
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            rc, w, t = run_converter(sd, d)
            self.assertEqual(rc, 0)
            tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())
            for legacy in (False, True):
                torch.save({"state_dict": tensors, "epoch": 3}, d / "real.pt", _use_new_zipfile_serialization=not legacy)
                r = run_script("convert_official.py", ["real.pt", "--input", "3,8,8", "--out-weights", "o.safetensors",
                                                       "--out-model", "o.toml"], d)
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertEqual((d / "o.safetensors").read_bytes(), w.read_bytes())
                self.assertEqual((d / "o.toml").read_text(), t.read_text())


class ScriptBadInput(unittest.TestCase):
    """Every case: exit 2, exactly one line on stderr, no traceback, nothing changed."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.d = Path(self.tmp.name)
        _, self.p, _ = make_official_fixture.build()

    def tearDown(self):
        self.tmp.cleanup()

    def check(self, script, args, pattern):
        before = snapshot(self.d)
        r = run_script(script, args, self.d)
        self.assertEqual(r.returncode, 2, (args, r.stdout, r.stderr))
        self.assertNotIn("Traceback", r.stderr)
        lines = r.stderr.splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertRegex(lines[0], f"^{script}: error: .*{pattern}")
        self.assertEqual(snapshot(self.d), before, args)

    def convert(self, checkpoint, pattern, *extra, weights="w.safetensors", model="m.toml"):
        self.check("convert_official.py", [checkpoint, "--input", "3,8,8", "--out-weights", weights,
                                           "--out-model", model, *extra], pattern)

    def npz_bytes(self, sd: dict) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **sd)
        return buf.getvalue()

    def test_damaged_and_mislabelled_files(self):
        good = self.npz_bytes(self.p)
        key = "stack.0.stack.0.bottleneck_block.0.weight_orig"
        at = good.index(self.p[key].tobytes()) + 8
        npy = io.BytesIO()
        np.save(npy, np.zeros(3))
        pt = W.zip_bytes(W.state_dict(self.p))
        files = {
            "garbage.npz": (os.urandom(200), r"garbage\.npz: not an \.npz"),
            "truncated.npz": (good[: len(good) // 2], r"truncated\.npz: damaged \.npz"),
            "crc.npz": (good[:at] + bytes([good[at] ^ 0x10]) + good[at + 1:], r"crc\.npz: damaged \.npz.*(?i:crc)"),
            "renamed.npz": (npy.getvalue(), r"renamed\.npz: not an \.npz"),
            "objects.npz": (self.npz_bytes({"a": np.array([{}], dtype=object)}), r"objects\.npz: damaged \.npz"),
            "garbage.pt": (b"\x00garbage" * 20, r"garbage\.pt: not a torch\.save file"),
            "truncated.pt": (pt[: len(pt) // 2], r"truncated\.pt: damaged zip"),
            "npz-named.pt": (good, r"npz-named\.pt: .*\.npz"),
            "empty.pt": (b"", r"empty\.pt: not a torch\.save file"),
        }
        for name, (data, pattern) in files.items():
            (self.d / name).write_bytes(data)
        for name, (data, pattern) in files.items():
            with self.subTest(name):
                self.convert(name, pattern)
        self.convert("missing.pt", r"missing\.pt: no such file")
        (self.d / "adir.pt").mkdir()
        self.convert("adir.pt", r"adir\.pt: not a regular file")

    def test_npz_budget(self):
        # 64 MB of zeros compress to a few hundred kB: the declared sizes are checked first.
        path = self.d / "bomb.npz"
        np.savez_compressed(path, w=np.zeros(8 << 20))
        self.assertLess(path.stat().st_size, 1 << 20)
        with mock.patch.object(convert_official, "NPZ_MAX_BYTES", 32 << 20):
            with self.assertRaisesRegex(convert_official.ConvertError, r"unpacks to \d+ bytes, over the budget"):
                convert_official.load_state_dict(path)
        self.assertEqual(convert_official.load_state_dict(path)["w"].shape, (8 << 20,))

    def test_hostile_pickles(self):
        marker = self.d / "pwned"
        sd = W.state_dict(self.p)
        sd["x"] = W.Reduce(W.Global("os", "system"), (f"touch {marker}",))
        (self.d / "system.pt").write_bytes(W.zip_bytes(sd))
        (self.d / "legacy.pt").write_bytes(W.legacy_bytes({"state_dict": sd}))
        one = W.Storage.of(np.ones(1))
        (self.d / "huge.pt").write_bytes(W.zip_bytes({"w": W.Tensor(storage=one, size=(10**6,) * 2, stride=(0, 0))}))
        (self.d / "other.pt").write_bytes(W.zip_bytes({"model": W.Obj("evil", "Module", {})}))
        self.convert("system.pt", r"system\.pt: refuses class `os\.system`")
        self.convert("legacy.pt", r"legacy\.pt: refuses class `os\.system`")
        self.convert("huge.pt", r"huge\.pt: .*over the budget")
        self.convert("other.pt", r"other\.pt: refuses class `evil\.Module`")
        self.assertFalse(marker.exists())

    def test_complex_and_non_finite_tensors(self):
        key = "stack.1.stack.0.bottleneck_block.3.weight_orig"
        cases = {
            "complex.npz": self.npz_bytes({**self.p, key: self.p[key].astype(np.complex128)}),
            "complex.pt": W.zip_bytes(W.state_dict({**self.p, key: self.p[key].astype(np.complex64)})),
            "inf.npz": self.npz_bytes({**self.p, key: np.where(self.p[key] > 0, np.inf, self.p[key])}),
            "nan.pt": W.zip_bytes(W.state_dict({**self.p, key: np.full_like(self.p[key], np.nan)})),
            "ninf16.pt": W.zip_bytes(W.state_dict({**self.p, key: np.full(self.p[key].shape, -np.inf, np.float16)})),
        }
        for name, data in cases.items():
            (self.d / name).write_bytes(data)
        for name in cases:
            with self.subTest(name):
                what = "dtype complex" if name.startswith("complex") else "non-finite"
                self.convert(name, rf"{name}: key `{key}`: {what}")

    def test_outputs_that_may_not_be_written(self):
        (self.d / "sd.npz").write_bytes(self.npz_bytes(self.p))
        (self.d / "dir").mkdir()
        (self.d / "old.toml").write_text("keep me\n")
        os.symlink("old.toml", self.d / "link.toml")
        os.link(self.d / "sd.npz", self.d / "hard.safetensors")
        self.convert("sd.npz", r"--out-weights 'o\.npy/': names a directory", weights="o.npy/")
        self.convert("sd.npz", r"--out-weights dir: is a directory", weights="dir")
        self.convert("sd.npz", r"--out-model link\.toml: is a symlink", model="link.toml")
        self.convert("sd.npz", r"--out-weights sd\.npz: is the same file as CHECKPOINT", weights="sd.npz")
        self.convert("sd.npz", r"--out-weights hard\.safetensors: is the same file as CHECKPOINT",
                     weights="hard.safetensors")
        self.convert("sd.npz", r"--out-model \./old\.toml: is the same file as --out-weights",
                     weights="old.toml", model="./old.toml")
        self.convert("sd.npz", r"--out-model old\.toml/x\.toml: old\.toml is not a directory", model="old.toml/x.toml")
        # A conversion that fails after the checks writes nothing either (here: a bad key).
        (self.d / "bad.npz").write_bytes(self.npz_bytes({**self.p, "stack.0.stack.0.foo": np.zeros(1)}))
        self.convert("bad.npz", r"bad\.npz: key `stack\.0\.stack\.0\.foo`", weights="new/w.safetensors")
        self.check("make_official_fixture.py", ["old.toml"], r"OUTDIR/model\.toml old\.toml/model\.toml: "
                   r"old\.toml is not a directory")

    def test_usage_errors(self):
        (self.d / "sd.npz").write_bytes(self.npz_bytes(self.p))
        self.check("convert_official.py", ["sd.npz", "--out-weights", "w"], r"--out-model")
        self.check("convert_official.py", ["sd.npz", "--out-weights", "w", "--out-model", "m", "--bogus"],
                   r"unrecognized arguments: --bogus")
        self.check("convert_official.py", ["sd.npz", "--out-weights", "w", "--out-model", "m", "--dtype", "f16"],
                   r"argument --dtype: invalid choice")
        for flag, value, pattern in (("--coeff", "nan", r"--coeff nan: must be in \(0, 1\)"),
                                     ("--coeff", "x", r"argument --coeff: invalid float"),
                                     ("--input", "3,x,8", r"--input '3,x,8': expected C,H,W"),
                                     ("--nonlin", "softplus", r"--nonlin 'softplus'")):
            with self.subTest(flag=flag, value=value):
                self.check("convert_official.py", ["sd.npz", "--out-weights", "w", "--out-model", "m",
                                                   flag, value], pattern)
        self.check("make_official_fixture.py", ["a", "b"], r"unrecognized arguments: b")


class TorchTools(unittest.TestCase):
    """The scripts that need torch fail in one line, with no traceback, whether torch is
    there (a usage error, or an output refused before any work) or not (the install hint)."""

    def test_one_line_without_or_with_torch(self):
        have_torch = importlib.util.find_spec("torch") is not None
        have_safetensors = importlib.util.find_spec("safetensors") is not None
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            (d / "dir").mkdir()
            before = snapshot(d)
            runs = [("parity.py", ["models/x.toml", "--bogus"], r"unrecognized arguments: --bogus"),
                    ("train_ref.py", ["m.toml", "--data", "8gaussians", "--metrics", "dir"], r"--metrics dir: is a directory"),
                    ("torch_bench.py", ["m.toml", "--json", "o.json/"], r"--json 'o\.json/': names a directory"),
                    ("cuda_bench.py", ["--bogus"], r"unrecognized arguments: --bogus")]
            for script, args, pattern in runs:
                with self.subTest(script):
                    r = run_script(script, args, d)
                    self.assertNotIn("Traceback", r.stderr)
                    self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)
                    # train_ref.py imports safetensors only for --save-init.
                    if have_torch and (have_safetensors or script == "train_ref.py"):
                        self.assertEqual(r.returncode, 2, r.stderr)
                        self.assertRegex(r.stderr, f"^{script}: error: {pattern}")
                    elif script == "cuda_bench.py" and not have_torch:
                        # Its documented status when nothing can be measured.
                        self.assertEqual(r.returncode, 3, r.stderr)
                        self.assertRegex(r.stderr, r"^cuda_bench\.py: PyTorch is not installed")
                    else:
                        self.assertEqual(r.returncode, 2, r.stderr)
                        self.assertRegex(r.stderr, rf"^{script}: error: (torch|safetensors) is not installed: "
                                                   r"run `bash examples/pytorch/setup\.sh`")
            self.assertEqual(snapshot(d), before)


class Fixture(unittest.TestCase):
    def test_fixture_is_reproducible(self):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "new" / "fixture"  # missing parents are created
            r = run_script("make_official_fixture.py", [out], Path(d))
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(sorted(p.name for p in out.iterdir()), sorted(make_official_fixture.FILES))
            self.assertEqual(sorted(p.name for p in FIXTURE.iterdir()), sorted(make_official_fixture.FILES))
            for f in sorted(FIXTURE.iterdir()):
                new = out / f.name
                if f.suffix == ".npy":
                    self.assertTrue(np.allclose(np.load(new), np.load(f), rtol=1e-13, atol=0), f.name)
                elif f.suffix == ".safetensors":
                    a, b = read_safetensors(new), read_safetensors(f)
                    self.assertEqual(a.keys(), b.keys())
                    for k in a:
                        self.assertTrue(np.allclose(a[k], b[k], rtol=1e-13, atol=0), k)
                else:
                    self.assertEqual(new.read_text(), f.read_text(), f.name)


if __name__ == "__main__":
    unittest.main()
