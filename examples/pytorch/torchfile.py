"""Reads PyTorch checkpoint files (`torch.save`) with numpy and the standard library only,
without executing anything the file says.

    import torchfile
    obj = torchfile.load("checkpoint.pt")                     # tensors become numpy arrays
    obj = torchfile.load(path, stubs={"resflows.*": torchfile.Stub})

A checkpoint is a pickle, and an ordinary unpickler calls whatever function the file
names: loading an untrusted `.pt` with torch's unrestricted unpickler runs code.
Here the unpickler's `find_class` resolves only an explicit allow-list:

  torch._utils._rebuild_tensor_v2 / _rebuild_tensor / _rebuild_parameter[_with_state]
      -> a numpy array (storage offset, size and stride honoured, bounds checked)
  torch[.cuda|.storage].<Float|Double|Half|BFloat16|Long|Int|Short|Char|Byte|Bool|
      ComplexFloat|ComplexDouble|Untyped>Storage -> the element type of a storage
  collections.OrderedDict -> itself
  argparse.Namespace -> `Namespace`, a plain attribute holder
  builtins.set / frozenset (of a list) and _codecs.encode (str -> latin1 bytes),
      which protocol-2 pickles use for sets (nn.Module has one) and bytes
  the caller's `stubs`: {"module.Class": StubClass} or {"module.prefix.*": StubClass};
      a `Stub` subclass only records what the file gives it (arguments and state)

Anything else is refused with a one-line `TorchFileError` naming the class. Stubs
never run code: `Stub.__new__`/`__setstate__` store their arguments.

Formats: the zip archive that torch.save writes since torch 1.6 (`<name>/data.pkl`,
`<name>/data/<key>` raw storages, `<name>/byteorder`), and the legacy stream of
torch < 1.6 (magic number, protocol version, system info, the object pickle, the
storage keys, then each storage as an 8-byte element count and its bytes). The
pre-0.4 tar format is refused. Everything is bounded by `max_bytes` (the file's
members, the storages, the arrays made from them): a member, storage or tensor that
claims more is an error before it is read or allocated; a tensor whose size and
stride reach past its storage, a truncated zip or a bad CRC are errors too.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile

import numpy as np

DEFAULT_MAX_BYTES = 8 << 30
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_DIMS = 64
MAX_STUB_CLASSES = 10_000

# Storage element types: torch's pickled class name -> numpy dtype (little endian on
# disk unless the archive's byteorder says otherwise). BFloat16 has no numpy dtype:
# it is read as uint16 and widened to float32 (exact: bf16 is the top half of f32).
STORAGE_DTYPES = {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16", "UntypedStorage": "u1",
}
STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")


class TorchFileError(ValueError):
    """A file that is not a loadable checkpoint; the message is one line."""


class Stub:
    """Stands in for a class the checkpoint names: keeps the constructor arguments in
    `_args` and the pickled state in the instance's attributes (a dict state) or in
    `_state` (anything else). Subclassed per class name, with `torch_class` set."""

    torch_class = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        slots = None
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_state"] = state
        if isinstance(slots, dict):
            self.__dict__.update({k: v for k, v in slots.items() if isinstance(k, str)})

    def __repr__(self):
        return f"<stub {self.torch_class}>"


class Namespace(Stub):
    """argparse.Namespace as a plain attribute holder (`vars(ns)` gives the options)."""

    torch_class = "argparse.Namespace"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)


class _Frozen:
    """What the allow-list hands the unpickler: a BUILD opcode aimed at it (pickle's
    way to set attributes) is refused, so a file cannot alter an element size or a
    function that later loads rely on."""

    __slots__ = ()

    def __setstate__(self, state):
        raise TorchFileError(f"pickled state for a {type(self).__name__.strip('_')}")


class _DType(_Frozen):
    __slots__ = ("name", "code", "itemsize")

    def __init__(self, name: str):
        self.name = name
        self.code = STORAGE_DTYPES[name]
        self.itemsize = 2 if self.code == "bf16" else np.dtype(self.code).itemsize


class _Function(_Frozen):
    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class _Storage:
    """A storage's elements, filled when its bytes are read (at once for zip files,
    after the object pickle for legacy ones)."""

    def __init__(self, dtype: _DType, numel: int, name: str):
        self.dtype, self.numel, self.name = dtype, numel, name
        self.array = None  # 1-D numpy array once read

    def fill(self, raw: bytes, big_endian: bool) -> None:
        if len(raw) != self.numel * self.dtype.itemsize:
            raise TorchFileError(f"storage {self.name}: {len(raw)} bytes, expected "
                                 f"{self.numel} x {self.dtype.itemsize}")
        order = ">" if big_endian else "<"
        if self.dtype.code == "bf16":
            bits = np.frombuffer(raw, dtype=order + "u2").astype(np.uint32) << 16
            self.array = bits.view(np.float32)
        else:
            self.array = np.frombuffer(raw, dtype=np.dtype(self.dtype.code).newbyteorder(order)).astype(
                np.dtype(self.dtype.code).newbyteorder("="))
        if self.array.shape != (self.numel,):
            raise TorchFileError(f"storage {self.name}: {self.array.shape[0]} elements, expected {self.numel}")

    def __setstate__(self, state):
        raise TorchFileError("a storage with pickled state")


class _StorageView:
    """A legacy view: elements [offset, offset + numel) of a root storage."""

    def __init__(self, root: _Storage, offset: int, numel: int, name: str):
        self.root, self.offset, self.numel, self.name = root, offset, numel, name
        self.dtype = root.dtype

    @property
    def array(self):
        return None if self.root.array is None else self.root.array[self.offset:self.offset + self.numel]

    def __setstate__(self, state):
        raise TorchFileError("a storage view with pickled state")


class _PendingTensor:
    """A tensor, materialized into a numpy array once every storage is read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __setstate__(self, state):
        # torch never BUILDs a tensor rebuilt by _rebuild_tensor_v2; a file that does is crafted.
        raise TorchFileError("a tensor with pickled state")


def _int(value, what: str) -> int:
    if type(value) is not int:
        raise TorchFileError(f"{what}: {type(value).__name__}, expected an int")
    if value < 0:
        raise TorchFileError(f"{what}: {value} is negative")
    return value


def _int_tuple(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS:
        raise TorchFileError(f"{what}: expected a tuple of at most {MAX_DIMS} ints")
    return tuple(_int(v, what) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, (_Storage, _StorageView)):
        raise TorchFileError(f"tensor rebuilt from a {type(storage).__name__}, expected a storage")
    offset = _int(storage_offset, "tensor storage offset")
    size, stride = _int_tuple(size, "tensor size"), _int_tuple(stride, "tensor stride")
    if len(size) != len(stride):
        raise TorchFileError(f"tensor size {size} and stride {stride} differ in length")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise TorchFileError(f"tensor of size {size}, stride {stride}, offset {offset} reaches element "
                                 f"{last} of storage {storage.name}, which has {storage.numel}")
    return _PendingTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    if not isinstance(data, _PendingTensor):
        raise TorchFileError(f"parameter rebuilt from a {type(data).__name__}, expected a tensor")
    return data


def _codecs_encode(text, encoding="utf-8", *_ignored):
    # Protocol 2 writes Python 3 bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TorchFileError("_codecs.encode other than of a str to latin1")
    return text.encode("latin1")


def _set(items=()):
    if not isinstance(items, (list, tuple)):
        raise TorchFileError(f"a set built from a {type(items).__name__}")
    return set(items)


def _frozenset(items=()):
    return frozenset(_set(items))


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Function(_rebuild_parameter),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): Namespace,
    ("_codecs", "encode"): _Function(_codecs_encode),
    # Protocol 2 names builtins `__builtin__` (Python 2's); nn.Module holds a set.
    ("builtins", "set"): _Function(_set),
    ("__builtin__", "set"): _Function(_set),
    ("builtins", "frozenset"): _Function(_frozenset),
    ("__builtin__", "frozenset"): _Function(_frozenset),
}


class _Unpickler(pickle.Unpickler):
    """The restricted unpickler: `find_class` is the allow-list, `persistent_load`
    turns torch's storage ids into `_Storage`s."""

    def __init__(self, file, loader: "_Loader"):
        super().__init__(file, encoding="utf-8")
        self.loader = loader

    def find_class(self, module, name):
        return self.loader.find_class(module, name)

    def persistent_load(self, pid):
        return self.loader.persistent_load(pid)


class _Loader:
    def __init__(self, path, stubs, max_bytes: int):
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.stubs = dict(stubs or {})
        for key, cls in self.stubs.items():
            if not isinstance(key, str) or not isinstance(cls, type):
                raise TypeError("stubs: {'module.Class' or 'module.prefix.*': class}")
        self.stub_classes: dict = {}
        self.storages: dict = {}
        self.budget_used = 0
        self.legacy = False
        self.zip = None
        self.prefix = ""
        self.big_endian = False

    def spend(self, nbytes: int, what: str) -> None:
        self.budget_used += nbytes
        if self.budget_used > self.max_bytes:
            raise TorchFileError(f"{what} brings the data read to {self.budget_used} bytes, "
                                 f"over the budget of {self.max_bytes}")

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise TorchFileError("a class named by a non-string")
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module in STORAGE_MODULES and name in STORAGE_DTYPES:
            return _DType(name)
        full = f"{module}.{name}"
        base = self.stubs.get(full)
        if base is None:
            parts = module.split(".")
            for i in range(len(parts), 0, -1):
                base = self.stubs.get(".".join(parts[:i]) + ".*")
                if base is not None:
                    break
        if base is None:
            raise TorchFileError(f"refuses class `{full}`: not on the allow-list of tensors, storages and stubs")
        if not issubclass(base, Stub):
            return base
        key = (full, base)
        if key not in self.stub_classes:
            if len(self.stub_classes) >= MAX_STUB_CLASSES:
                raise TorchFileError(f"more than {MAX_STUB_CLASSES} distinct stubbed classes")
            self.stub_classes[key] = type(name, (base,), {"torch_class": full, "__module__": __name__})
        return self.stub_classes[key]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise TorchFileError(f"persistent id {type(pid).__name__}, expected a tuple")
        kind = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if self.legacy and kind == "module" and len(pid) == 4:
            # A pickled nn.Module's class with its source; the class was already
            # resolved through find_class, and the source is never looked at.
            return pid[1]
        if kind != "storage" or len(pid) != (6 if self.legacy else 5):
            raise TorchFileError(f"unknown persistent id `{kind}` of {len(pid)} fields")
        dtype, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(dtype, _DType):
            raise TorchFileError(f"storage of type {type(dtype).__name__}, expected a storage class")
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise TorchFileError("storage key: expected a string")
        key = str(key)
        numel = _int(numel, f"storage {key}: element count")
        if dtype.name == "UntypedStorage":
            dtype = _DType("ByteStorage")
        storage = self.storages.get(key)
        if storage is None:
            self.spend(numel * dtype.itemsize, f"storage {key}")
            storage = _Storage(dtype, numel, key)
            self.storages[key] = storage
            if not self.legacy:
                storage.fill(self.read_member(f"data/{key}"), self.big_endian)
        elif storage.numel != numel or storage.dtype.name != dtype.name:
            raise TorchFileError(f"storage {key} declared twice with different types or sizes")
        if self.legacy and pid[5] is not None:
            view = pid[5]
            if not isinstance(view, tuple) or len(view) != 3:
                raise TorchFileError(f"storage {key}: malformed view")
            vkey, voff, vnum = str(view[0]), _int(view[1], "view offset"), _int(view[2], "view size")
            if voff + vnum > numel:
                raise TorchFileError(f"view {vkey} of storage {key} ends at {voff + vnum}, past its {numel}")
            return _StorageView(storage, voff, vnum, vkey)
        return storage

    # --- zip archives (torch >= 1.6) ---
    def read_member(self, name: str) -> bytes:
        full = f"{self.prefix}/{name}"
        try:
            info = self.zip.getinfo(full)
        except KeyError:
            raise TorchFileError(f"zip member {full} missing") from None
        if info.file_size > self.max_bytes:
            raise TorchFileError(f"zip member {full}: {info.file_size} bytes, over the budget of {self.max_bytes}")
        with self.zip.open(info) as f:
            data = f.read(info.file_size + 1)  # zipfile checks the CRC once the member is read through
        if len(data) != info.file_size:
            raise TorchFileError(f"zip member {full}: {len(data)} bytes, its header says {info.file_size}")
        return data

    def load_zip(self):
        self.zip = zipfile.ZipFile(self.path)
        names = self.zip.namelist()
        if len(set(names)) != len(names):
            raise TorchFileError("zip archive with duplicate member names")
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            what = "an .npz or another zip" if any(n.endswith(".npy") for n in names) else "another zip"
            raise TorchFileError(f"a zip archive without one <name>/data.pkl: not a torch.save file ({what})")
        self.prefix = pkls[0].split("/")[0]
        if f"{self.prefix}/byteorder" in names:
            order = self.read_member("byteorder")
            if order not in (b"little", b"big"):
                raise TorchFileError(f"byteorder {order[:16]!r}, expected little or big")
            self.big_endian = order == b"big"
        data = self.read_member("data.pkl")
        return _Unpickler(io.BytesIO(data), self).load()

    # --- the legacy stream (torch < 1.6) ---
    def load_legacy(self, raw: bytes):
        self.legacy = True
        f = io.BytesIO(raw)

        def read_pickle():
            # One pickle of the stream; the C unpickler stops right after its STOP.
            return _Unpickler(f, self).load()

        if read_pickle() != LEGACY_MAGIC:
            raise TorchFileError("not a torch.save file (no legacy magic number)")
        version = read_pickle()
        if version != LEGACY_PROTOCOL:
            raise TorchFileError(f"legacy protocol version {version!r}, expected {LEGACY_PROTOCOL}")
        info = read_pickle()
        if not isinstance(info, dict):
            raise TorchFileError("legacy system info is not a dict")
        if info.get("little_endian", True) is not True:
            raise TorchFileError("a big-endian legacy checkpoint")
        result = read_pickle()
        keys = read_pickle()
        if not isinstance(keys, list) or not all(isinstance(k, (str, int)) for k in keys):
            raise TorchFileError("legacy storage key list malformed")
        for key in map(str, keys):
            storage = self.storages.get(key)
            if storage is None or storage.array is not None:
                raise TorchFileError(f"legacy storage key {key} unknown or repeated")
            head = f.read(8)
            if len(head) != 8:
                raise TorchFileError(f"truncated before storage {key}")
            (count,) = struct.unpack("<q", head)
            if count != storage.numel:
                raise TorchFileError(f"storage {key}: {count} elements on disk, {storage.numel} declared")
            nbytes = count * storage.dtype.itemsize
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise TorchFileError(f"truncated in storage {key} ({len(data)} of {nbytes} bytes)")
            storage.fill(data, False)
        missing = [k for k, s in self.storages.items() if s.array is None]
        if missing:
            raise TorchFileError(f"storage {missing[0]} has no data")
        return result

    # --- tensors -> numpy ---
    def materialize(self, t: _PendingTensor) -> np.ndarray:
        base = t.storage.array
        if base is None:
            raise TorchFileError(f"storage {t.storage.name} has no data")
        count = math.prod(t.size)
        self.spend(count * base.itemsize, f"tensor of size {t.size}")
        if count == 0:
            return np.zeros(t.size, dtype=base.dtype)
        view = np.lib.stride_tricks.as_strided(
            base[t.offset:], shape=t.size, strides=tuple(s * base.itemsize for s in t.stride), writeable=False)
        return np.array(view, copy=True)

    def plain(self, obj, memo: dict):
        """Replace pending tensors and bare storages by arrays, in place where the
        container is mutable (a cycle through dicts, lists or stubs stays a cycle)."""
        oid = id(obj)
        if oid in memo:
            return memo[oid]
        if isinstance(obj, _PendingTensor):
            memo[oid] = out = self.materialize(obj)
            return out
        if isinstance(obj, (_Storage, _StorageView)):
            memo[oid] = out = np.array(obj.array, copy=True)
            return out
        if isinstance(obj, (_Frozen, type)):
            return obj
        memo[oid] = obj
        if isinstance(obj, dict):
            for k in list(obj):
                if isinstance(k, (_PendingTensor, _Storage, _StorageView)):
                    raise TorchFileError("a tensor used as a dict key")
                obj[k] = self.plain(obj[k], memo)
            if isinstance(obj, collections.OrderedDict):
                for k, v in list(vars(obj).items()):
                    setattr(obj, k, self.plain(v, memo))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                obj[i] = self.plain(v, memo)
        elif isinstance(obj, tuple):
            memo[oid] = out = tuple(self.plain(v, memo) for v in obj)
            return out
        elif isinstance(obj, (set, frozenset)):
            if any(isinstance(v, (_PendingTensor, _Storage, _StorageView)) for v in obj):
                raise TorchFileError("a tensor in a set")
        elif isinstance(obj, Stub):
            for k, v in list(obj.__dict__.items()):
                obj.__dict__[k] = self.plain(v, memo)
        return obj


def load(path, stubs: dict | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
    """The object a torch.save file holds, tensors as numpy arrays. Raises
    TorchFileError (one line, the path not included) on anything else."""
    loader = _Loader(path, stubs, max_bytes)
    try:
        with open(loader.path, "rb") as f:
            head = f.read(512)
        if head.startswith(b"PK"):
            obj = loader.load_zip()
        elif len(head) > 262 and head[257:262] == b"ustar":
            raise TorchFileError("the tar format of torch < 0.4 is not supported; re-save with a newer torch")
        elif head.startswith(b"\x80"):
            size = os.path.getsize(loader.path)
            if size > max_bytes:
                raise TorchFileError(f"{size} bytes, over the budget of {max_bytes}")
            with open(loader.path, "rb") as f:
                raw = f.read(max_bytes + 1)
            obj = loader.load_legacy(raw)
        else:
            raise TorchFileError("not a torch.save file (neither its zip archive nor its legacy pickle stream)")
        return loader.plain(obj, {})
    except TorchFileError:
        raise
    except RecursionError:
        raise TorchFileError("objects nested too deeply") from None
    except MemoryError:
        raise TorchFileError("out of memory while reading") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise TorchFileError(f"damaged zip archive: {e}") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise TorchFileError(f"damaged pickle: {e or 'truncated'}") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error,
            NotImplementedError, OverflowError, RuntimeError, UnicodeDecodeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise TorchFileError(f"{type(e).__name__}: {msg}") from None
    finally:
        if loader.zip is not None:
            loader.zip.close()


def module_state_dict(module, prefix: str = "", out: dict | None = None, depth: int = 0) -> dict:
    """The state_dict of a stubbed nn.Module: its `_parameters` and `_buffers` (None
    entries skipped, as torch does), then its `_modules`, names joined by dots."""
    out = {} if out is None else out
    if depth > 100:
        raise TorchFileError("module nesting deeper than 100")
    if not isinstance(module, Stub):
        raise TorchFileError(f"{prefix or 'the model'}: a {type(module).__name__}, expected a module")
    for attr in ("_parameters", "_buffers"):
        table = getattr(module, attr, {})
        if not isinstance(table, dict):
            raise TorchFileError(f"{prefix}{attr}: not a dict")
        non_persistent = getattr(module, "_non_persistent_buffers_set", set()) if attr == "_buffers" else set()
        for name, value in table.items():
            if value is not None and name not in (non_persistent if isinstance(non_persistent, (set, frozenset)) else ()):
                out[prefix + str(name)] = value
    children = getattr(module, "_modules", {})
    if not isinstance(children, dict):
        raise TorchFileError(f"{prefix}_modules: not a dict")
    for name, child in children.items():
        if child is not None:
            module_state_dict(child, f"{prefix}{name}.", out, depth + 1)
    return out
