"""Tests of torchfile.py (numpy only): what it reads against the arrays the files were
made from (torchsave_testing.py writes torch.save's formats without torch), element
addressing against index arithmetic written here, and the refusals: classes off the
allow-list (with proof that nothing ran), state pushed into allow-listed objects,
tensors reaching past their storage, budgets, damaged archives and streams.

    cd examples/pytorch && python3 -m unittest -v test_torchfile
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import os
import struct
import sys
import tempfile
import time
import unittest
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchfile  # noqa: E402
import torchsave_testing as W  # noqa: E402

HAVE_TORCH = importlib.util.find_spec("torch") is not None

DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool",
          "complex64", "complex128"]


def sample(dtype: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    if dtype.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


class Files(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, data: bytes, name="f.pt") -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def load_bytes(self, data: bytes, **kw):
        return torchfile.load(self.write(data), **kw)

    def refused(self, data: bytes, pattern: str, **kw) -> str:
        with self.assertRaises(torchfile.TorchFileError) as cm:
            self.load_bytes(data, **kw)
        msg = str(cm.exception)
        self.assertNotIn("\n", msg)
        self.assertRegex(msg, pattern)
        return msg


class RoundTrip(Files):
    def test_every_dtype_both_formats(self):
        arrays = {d: sample(d, (3, 5), i) for i, d in enumerate(DTYPES)}
        for fmt in (W.zip_bytes, W.legacy_bytes):
            got = self.load_bytes(fmt(W.state_dict(arrays)))
            self.assertIsInstance(got, collections.OrderedDict)
            self.assertEqual(list(got), DTYPES)
            for d, want in arrays.items():
                self.assertEqual(got[d].dtype, want.dtype, (fmt.__name__, d))
                self.assertEqual(got[d].shape, (3, 5))
                self.assertTrue(np.array_equal(got[d], want), (fmt.__name__, d))

    def test_bfloat16_widened_exactly(self):
        # bf16 bit patterns worked out by hand: sign | 8-bit exponent | 7-bit mantissa.
        bits = [0x3F80, 0xC020, 0x3E20, 0x0000, 0x7F80]
        want = np.array([1.0, -2.5, 0.15625, 0.0, np.inf], dtype=np.float32)
        st = W.Storage(struct.pack("<5H", *bits), "BFloat16Storage", 5)
        got = self.load_bytes(W.zip_bytes({"t": W.Tensor(storage=st, size=(5,), stride=(1,))}))["t"]
        self.assertEqual(got.dtype, np.float32)
        self.assertTrue(np.array_equal(got, want), got)

    def test_offset_size_stride(self):
        base = np.arange(30, dtype=np.float64) * 1.5
        st = W.Storage.of(base)
        cases = {
            "transposed": (2, (3, 4), (1, 3)),
            "broadcast": (5, (2, 2, 2), (0, 7, 1)),
            "scalar": (29, (), ()),
            "empty": (30, (0, 5), (5, 1)),
            "last": (0, (2, 15), (15, 1)),
        }
        obj = {k: W.Tensor(storage=st, offset=o, size=s, stride=t) for k, (o, s, t) in cases.items()}
        for fmt in (W.zip_bytes, W.legacy_bytes):
            got = self.load_bytes(fmt(obj))
            for name, (off, size, stride) in cases.items():
                want = np.zeros(size)
                for idx in np.ndindex(*size):
                    want[idx] = base[off + sum(i * s for i, s in zip(idx, stride))]
                self.assertEqual(got[name].shape, tuple(size), name)
                self.assertTrue(np.array_equal(got[name], want), (fmt.__name__, name))
            # Each tensor is its own array: writing one leaves the others as they were.
            got["transposed"][0, 0] = -1.0
            self.assertEqual(got["last"][0, 2], base[2])

    def test_legacy_storage_view(self):
        base = np.arange(12, dtype=np.float32)
        view = W.StorageView(W.Storage.of(base), 4, 6)
        got = self.load_bytes(W.legacy_bytes({"v": W.Tensor(storage=view, offset=1, size=(2, 2), stride=(2, 1))}))
        # element (i, j) of the tensor is view[1 + 2i + j] = base[4 + 1 + 2i + j]
        self.assertTrue(np.array_equal(got["v"], np.array([[5, 6], [7, 8]], dtype=np.float32)))

    def test_byteorder(self):
        a = sample("float64", (4,), 1)
        b = sample("int32", (2, 2), 2)
        obj = {"a": W.Tensor(a), "b": W.Tensor(b)}
        for order in ("big", "little", None):
            got = self.load_bytes(W.zip_bytes(obj, byteorder=order))
            self.assertTrue(np.array_equal(got["a"], a), order)
            self.assertTrue(np.array_equal(got["b"], b), order)
        # The bytes really are big-endian: read little-endian they differ.
        swapped = self.load_bytes(W.zip_bytes(obj, byteorder="little", data_order="big"))
        self.assertTrue(np.array_equal(swapped["a"], a.byteswap()))

    def test_containers_namespace_parameters_shared_tensors(self):
        t = W.Tensor(np.array([1.0, 2.0]))
        obj = {
            "list": [t, (t, 3), "s"],
            "args": argparse.Namespace(nblocks="16-16-16", idim=512, coeff=0.98),
            "param": W.Tensor(np.array([[4.0]]), param=True),
            "none": None, "float": 3.28, "bytes": b"\x00\x01",
        }
        for fmt in (W.zip_bytes, W.legacy_bytes):
            got = self.load_bytes(fmt(obj))
            self.assertIs(got["list"][0], got["list"][1][0])  # one storage, one tensor object
            self.assertTrue(np.array_equal(got["list"][0], [1.0, 2.0]))
            self.assertEqual(got["list"][1][1], 3)
            self.assertIsInstance(got["args"], torchfile.Namespace)
            self.assertEqual(vars(got["args"]), {"nblocks": "16-16-16", "idim": 512, "coeff": 0.98})
            self.assertTrue(np.array_equal(got["param"], [[4.0]]))
            self.assertEqual((got["none"], got["float"], got["bytes"]), (None, 3.28, b"\x00\x01"))

    def test_stubs_and_module_state_dict(self):
        def module(params, buffers, children, non_persistent=()):
            return W.Obj("resflows.layers", "Layer", nn_module=True, state={
                "_parameters": collections.OrderedDict(params), "_buffers": collections.OrderedDict(buffers),
                "_modules": collections.OrderedDict(children), "_non_persistent_buffers_set": set(non_persistent),
                "training": False})

        w, u, g = np.ones((2, 2)), np.arange(2.0), np.full(3, 7.0)
        conv = module({"weight": W.Tensor(w, param=True), "bias": None},
                      {"u": W.Tensor(u), "tmp": W.Tensor(u)}, {}, non_persistent=["tmp"])
        root = module({"g": W.Tensor(g, param=True)}, {}, {"0": conv, "skip": None})
        ema = W.Obj("resflows.utils", "ExponentialMovingAverage", {"module": root, "decay": 0.999})
        data = W.zip_bytes({"ema": ema})
        legacy = W.legacy_bytes({"ema": ema})
        self.assertIn(b"resflows/layers.py", legacy)  # the class went as torch's ('module', ...) id
        self.refused(data, r"`resflows\.utils\.ExponentialMovingAverage`")
        self.refused(legacy, r"`resflows\.(utils\.ExponentialMovingAverage|layers\.Layer)`")
        exact = {"resflows.utils.ExponentialMovingAverage": torchfile.Stub, "resflows.layers.Layer": torchfile.Stub}
        for stubs, blob in ((exact, data), ({"resflows.*": torchfile.Stub}, data), (exact, legacy)):
            got = self.load_bytes(blob, stubs=stubs)["ema"]
            self.assertEqual(got.torch_class, "resflows.utils.ExponentialMovingAverage")
            self.assertEqual(got.decay, 0.999)
            sd = torchfile.module_state_dict(got.module)
            self.assertEqual(list(sd), ["g", "0.weight", "0.u"])
            for key, want in (("g", g), ("0.weight", w), ("0.u", u)):
                self.assertTrue(np.array_equal(sd[key], want), key)
        # A prefix stub covers that package only, not one whose name merely starts alike.
        other = W.zip_bytes({"x": W.Obj("resflows_evil", "Thing", {})})
        self.refused(other, r"`resflows_evil\.Thing`", stubs={"resflows.*": torchfile.Stub})

    @unittest.skipUnless(HAVE_TORCH, "torch is not installed: the cross-check against real torch.save files "
                                     "needs it (bash examples/pytorch/setup.sh); CI runs without it")
    def test_real_torch_save(self):
        import torch

        t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ELU(), torch.nn.BatchNorm2d(4))
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
        obj = {"sd": collections.OrderedDict(a=t, b=t.t()[1:], c=torch.nn.Parameter(t[2])),
               "h": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "ns": argparse.Namespace(k=1),
               "model": model, "opt": opt.state_dict(), "bytes": b"\x00\xff", "set": {1, 2},
               "dtypes": {str(d): (torch.arange(6) % 3 - 1).to(d).reshape(2, 3).t() for d in dtypes}}
        for legacy in (False, True):
            path = self.dir / f"real{legacy}.pt"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            with self.assertRaisesRegex(torchfile.TorchFileError, r"`torch\.nn\.modules\.container\.Sequential`"):
                torchfile.load(path)
            got = torchfile.load(path, stubs={"torch.nn.*": torchfile.Stub})
            self.assertTrue(np.array_equal(got["sd"]["a"], t.numpy()))
            self.assertTrue(np.array_equal(got["sd"]["b"], t.t()[1:].numpy()))
            self.assertTrue(np.array_equal(got["sd"]["c"], t[2].numpy()))
            self.assertTrue(np.array_equal(got["h"], [1.5, -2.0]))
            self.assertEqual(vars(got["ns"]), {"k": 1})
            self.assertEqual((got["bytes"], got["set"]), (b"\x00\xff", {1, 2}))
            sd = torchfile.module_state_dict(got["model"])
            want = model.state_dict()
            self.assertEqual(list(sd), list(want))
            for key, value in want.items():
                self.assertTrue(np.array_equal(sd[key], value.numpy()), key)
            self.assertEqual(got["opt"]["param_groups"][0]["lr"], 1e-3)
            self.assertTrue(np.array_equal(got["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]))
            for d in dtypes:
                ref = obj["dtypes"][str(d)]
                ref = ref.float().numpy() if d == torch.bfloat16 else ref.numpy()
                self.assertEqual(got["dtypes"][str(d)].shape, ref.shape, d)
                self.assertTrue(np.array_equal(got["dtypes"][str(d)], ref), d)


    @unittest.skipUnless(HAVE_TORCH, "torch is not installed: the cross-check against real torch.save files "
                                     "needs it (bash examples/pytorch/setup.sh); CI runs without it")
    def test_real_torch_save_of_a_hostile_object(self):
        import torch

        marker = self.dir / "ran"

        class Hostile:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        for legacy in (False, True):
            path = self.dir / f"hostile{legacy}.pt"
            torch.save({"w": torch.zeros(2), "x": Hostile()}, path, _use_new_zipfile_serialization=not legacy)
            with self.assertRaisesRegex(torchfile.TorchFileError, r"refuses class `(posix|os)\.system`"):
                torchfile.load(path, stubs={"torch.nn.*": torchfile.Stub})
        self.assertFalse(marker.exists())


class Refusals(Files):
    def test_code_in_the_pickle_does_not_run(self):
        marker = self.dir / "ran"
        for module, name in (("os", "system"), ("posix", "system"), ("builtins", "eval"),
                             ("__builtin__", "exec"), ("subprocess", "call"), ("torch", "load")):
            arg = f"touch {marker}" if name in ("system", "call") else f"open({str(marker)!r}, 'w')"
            data = W.zip_bytes({"x": W.Reduce(W.Global(module, name), (arg,))})
            self.refused(data, rf"refuses class `{module}\.{name}`", stubs={"resflows.*": torchfile.Stub})
            self.refused(W.legacy_bytes({"x": W.Reduce(W.Global(module, name), (arg,))}), rf"`{module}\.{name}`")
            self.assertFalse(marker.exists(), (module, name))

    def test_state_pushed_into_allow_listed_objects(self):
        st = W.zip_bytes({"t": W.Tensor(np.zeros(4))})
        crafted = {
            # BUILD {"itemsize": 0} on a storage type, BUILD slot state on the rebuild function
            "dtype": b"\x80\x02ctorch\nFloatStorage\n}X\x08\x00\x00\x00itemsizeK\x00sb.",
            "function": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b.",
        }
        for name, pkl in crafted.items():
            with self.subTest(name):
                self.refused(W.zip_bytes({}, pkl=pkl), r"pickled state for a (DType|Function)")
        # BUILD on a class: its __setstate__ is a plain function there, called without self.
        klass = b"\x80\x02cargparse\nNamespace\nN}X\x0c\x00\x00\x00__setstate__Ns\x86b."
        self.refused(W.zip_bytes({}, pkl=klass), r"TypeError")
        # The allow-listed objects are unchanged for the next load.
        self.assertTrue(np.array_equal(self.load_bytes(st)["t"], np.zeros(4)))
        self.assertIsNone(torchfile._rebuild_tensor.__defaults__)
        ns = self.load_bytes(W.zip_bytes({"a": argparse.Namespace(k=2)}))["a"]
        self.assertEqual(vars(ns), {"k": 2})

    def test_tensor_past_its_storage(self):
        st = W.Storage.of(np.arange(10, dtype=np.float32))
        bad = {
            "offset": (10, (1,), (1,)),
            "size": (0, (11,), (1,)),
            "stride": (1, (2, 3), (4, 3)),  # last element 1 + 4 + 6 = 11
            "negative stride": (9, (2,), (-1,)),
            "negative size": (0, (-1,), (1,)),
            "bool size": (0, (True,), (1,)),
            "float offset": (0.0, (1,), (1,)),
            "rank mismatch": (0, (2, 2), (1,)),
        }
        for name, (off, size, stride) in bad.items():
            for fmt in (W.zip_bytes, W.legacy_bytes):
                with self.subTest(name, fmt=fmt.__name__):
                    self.refused(fmt({"t": W.Tensor(storage=st, offset=off, size=size, stride=stride)}), r"tensor")
        # The largest valid reach is accepted: 1 + 4 + 2*2 = 9, the last element.
        ok = self.load_bytes(W.zip_bytes({"t": W.Tensor(storage=st, offset=1, size=(2, 3), stride=(4, 2))}))
        self.assertEqual(ok["t"][1, 2], 9.0)

    def test_budgets(self):
        big = W.zip_bytes({"t": W.Tensor(np.zeros(1000))})
        self.refused(big, r"over the budget of 4000", max_bytes=4000)
        self.assertEqual(self.load_bytes(big, max_bytes=16000)["t"].shape, (1000,))
        # A zero stride makes a 10^12-element tensor of one stored element: refused, fast.
        one = W.Storage.of(np.ones(1))
        huge = W.zip_bytes({"t": W.Tensor(storage=one, size=(10**6, 10**6), stride=(0, 0))})
        start = time.monotonic()
        self.refused(huge, r"tensor of size \(1000000, 1000000\).*over the budget")
        self.assertLess(time.monotonic() - start, 5.0)
        # A storage that claims more elements than its member holds.
        lying = W.zip_bytes({"t": W.Tensor(storage=W.Storage(np.zeros(2).tobytes(), "DoubleStorage", 3),
                                           size=(3,), stride=(1,))})
        self.refused(lying, r"storage 0: 16 bytes, expected 3 x 8")
        self.refused(W.legacy_bytes({"t": W.Tensor(storage=W.Storage(np.zeros(2).tobytes(), "DoubleStorage", 3),
                                                   size=(3,), stride=(1,))}), r"storage 0")

    def test_damaged_zip(self):
        data = W.zip_bytes(W.state_dict({"w": np.arange(64, dtype=np.float64)}))
        for cut in (10, len(data) // 2, len(data) - 5):
            with self.subTest(cut=cut):
                self.refused(data[:cut], r"zip")
        # One flipped bit in the stored tensor bytes: the member's CRC no longer matches.
        at = data.index(np.arange(64, dtype=np.float64).tobytes()) + 100
        flipped = data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]
        self.refused(flipped, r"(?i)crc")
        dup = io.BytesIO()
        with zipfile.ZipFile(dup, "w") as z, self.assertWarns(UserWarning):
            z.writestr("archive/data.pkl", b"\x80\x02N.")
            z.writestr("archive/data.pkl", b"\x80\x02N.")
        self.refused(dup.getvalue(), r"duplicate")

    def test_not_a_torch_file(self):
        npz = io.BytesIO()
        np.savez(npz, w=np.zeros(3))
        npy = io.BytesIO()
        np.save(npy, np.zeros(3))
        tar = bytearray(1024)
        tar[257:262] = b"ustar"
        cases = {
            "npz": (npz.getvalue(), r"\.npz"),
            "npy": (npy.getvalue(), r"not a torch\.save file"),
            "empty": (b"", r"not a torch\.save file"),
            "garbage": (os.urandom(64).replace(b"P", b"Q").replace(b"\x80", b"\x81"), r"not a torch\.save file"),
            "tar": (bytes(tar), r"tar format"),
            "plain pickle": (b"\x80\x02K\x05.", r"legacy magic"),
            "bad pickle": (W.zip_bytes({}, pkl=b"\x80\x02}q\x00(X"), r"damaged pickle|pickle"),
            "unknown persistent id": (W.zip_bytes({}, pkl=b"\x80\x02X\x03\x00\x00\x00abc\x85Q."),
                                      r"unknown persistent id `abc`"),
            "persistent id not a tuple": (W.zip_bytes({}, pkl=b"\x80\x02X\x03\x00\x00\x00abcQ."),
                                          r"persistent id str"),
        }
        for name, (data, pattern) in cases.items():
            with self.subTest(name):
                self.refused(data, pattern)
        with self.assertRaises(torchfile.TorchFileError):
            torchfile.load(self.dir / "missing.pt")

    def test_legacy_stream_damage(self):
        data = W.legacy_bytes(W.state_dict({"w": np.arange(8, dtype=np.float32)}))
        self.refused(data[:-3], r"truncated in storage 0")
        self.refused(data[:-32], r"truncated before storage 0|truncated")
        count_at = len(data) - 32 - 8
        self.assertEqual(struct.unpack("<q", data[count_at:count_at + 8])[0], 8)
        wrong = data[:count_at] + struct.pack("<q", 9) + data[count_at + 8:]
        self.refused(wrong, r"9 elements on disk, 8 declared")

    def test_deep_nesting(self):
        depth = 200_000
        pkl = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
        self.refused(W.zip_bytes({}, pkl=pkl), r"nested too deeply")


if __name__ == "__main__":
    unittest.main()
