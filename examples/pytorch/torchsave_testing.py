"""Test support only: writes files in torch.save's formats from numpy arrays, without
torch, so that the tests of torchfile.py and of the converters need numpy alone.

The pickles are made the way torch makes them (protocol 2; a tensor is a REDUCE of
`torch._utils._rebuild_tensor_v2` over a persistent-id storage `('storage',
torch.FloatStorage, key, 'cpu', numel)`; the storages are raw little-endian members
`<name>/data/<key>` of an uncompressed zip), written by a pickler that names torch's
globals without importing them. `Global` and `Obj` also let a test craft what torch
would never write (a REDUCE of `os.system`, an unknown class).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

STORAGE_NAMES = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage", "complex64": "ComplexFloatStorage",
    "complex128": "ComplexDoubleStorage",
}

_GLOBALS: dict = {}


def Global(module: str, name: str) -> type:
    """A stand-in pickled as GLOBAL `module name` (a class, so that it can also be the
    class of an `Obj`)."""
    key = (module, name)
    if key not in _GLOBALS:
        _GLOBALS[key] = type(name, (), {"_fake_global": key})
    return _GLOBALS[key]


def Obj(module: str, name: str, state: dict, nn_module: bool = False):
    """An instance of class module.name with attributes `state` (NEWOBJ + BUILD). An
    nn_module's class is written in the legacy format as torch does: a persistent id
    ('module', class, source file, source)."""
    cls = Global(module, name)
    if nn_module:
        cls._nn_module = True
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


class Reduce:
    """REDUCE of a global over args: what a hostile file uses to call a function."""

    def __init__(self, func: type, args: tuple):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class Storage:
    """A storage: raw bytes of `numel` elements of torch type `type_name`."""

    def __init__(self, data: bytes, type_name: str, numel: int):
        self.data, self.type_name, self.numel = data, type_name, numel

    @classmethod
    def of(cls, array: np.ndarray) -> "Storage":
        a = np.ascontiguousarray(array).reshape(-1)
        return cls(a.astype(a.dtype.newbyteorder("<")).tobytes(), STORAGE_NAMES[a.dtype.name], a.size)


class StorageView:
    """Legacy format only: elements [offset, offset + numel) of a root storage."""

    def __init__(self, root: Storage, offset: int, numel: int):
        self.root, self.offset, self.numel = root, offset, numel
        self.type_name = root.type_name


class Tensor:
    """A tensor over a storage; by default a fresh contiguous storage of `array`."""

    def __init__(self, array=None, *, storage=None, offset=0, size=None, stride=None, param=False):
        if storage is None:
            array = np.asarray(array)
            storage = Storage.of(array)
            size = array.shape if size is None else size
            if stride is None:
                stride, acc = [], 1
                for n in reversed(array.shape):
                    stride.insert(0, acc)
                    acc *= n
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
        self.param = param

    def __reduce__(self):
        inner = (Global("torch._utils", "_rebuild_tensor_v2"),
                 (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))
        if not self.param:
            return inner
        return (Global("torch._utils", "_rebuild_parameter"), (_Raw(inner), True, collections.OrderedDict()))


class _Raw:
    def __init__(self, reduced):
        self.reduced = reduced

    def __reduce__(self):
        return self.reduced


class _Pickler(pickle._Pickler):
    """The pure-Python pickler, with `Global` stand-ins written as GLOBAL opcodes and
    `Storage`s as torch's persistent ids."""

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy
        self.storages: dict = {}
        self.modules_seen: set = set()

    def save_global(self, obj, name=None):
        key = getattr(obj, "_fake_global", None)
        if key is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{key[0]}\n{key[1]}\n".encode())
        self.memoize(obj)

    def key(self, storage: Storage) -> str:
        return self.storages.setdefault(id(storage), (str(len(self.storages)), storage))[0]

    def persistent_id(self, obj):
        if self.legacy and isinstance(obj, type) and getattr(obj, "_nn_module", False) \
                and obj not in self.modules_seen:
            # As torch: only the first mention (the class inside this very id is then a GLOBAL).
            self.modules_seen.add(obj)
            return ("module", obj, f"{obj._fake_global[0].replace('.', '/')}.py", "class ...: pass\n")
        if isinstance(obj, StorageView):
            view = (f"view{id(obj)}", obj.offset, obj.numel)
            return ("storage", Global("torch", obj.type_name), self.key(obj.root), "cpu", obj.root.numel, view)
        if not isinstance(obj, Storage):
            return None
        pid = ("storage", Global("torch", obj.type_name), self.key(obj), "cpu", obj.numel)
        return pid + (None,) if self.legacy else pid


def _pickle(obj, legacy=False):
    buf = io.BytesIO()
    p = _Pickler(buf, legacy)
    p.dump(obj)
    return buf.getvalue(), p.storages


def zip_bytes(obj, *, prefix="archive", byteorder="little", data_order=None, extra=None, pkl=None) -> bytes:
    """torch.save's zip format (torch >= 1.6); `pkl` replaces the pickle of obj by
    hand-made bytes (obj then only supplies the storages); `data_order` writes the
    storages in another byte order than the `byteorder` member declares."""
    made, storages = _pickle(obj)
    pkl = made if pkl is None else pkl
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, st in storages.values():
            data = st.data
            if (data_order or byteorder) == "big":
                data = _swap(st)
            z.writestr(f"{prefix}/data/{key}", data)
        z.writestr(f"{prefix}/version", "3\n")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def _swap(st: Storage) -> bytes:
    size = len(st.data) // st.numel if st.numel else 1
    if size == 1:
        return st.data
    return np.frombuffer(st.data, dtype=f"<u{size}").astype(f">u{size}").tobytes()


def legacy_bytes(obj, pkl=None) -> bytes:
    """The stream of torch < 1.6: magic, protocol, sys info, the object, the storage
    keys, then every storage as <int64 element count><bytes>."""
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        out.write(pickle.dumps(header, protocol=2))
    made, storages = _pickle(obj, legacy=True)
    out.write(made if pkl is None else pkl)
    out.write(pickle.dumps([key for key, _ in storages.values()], protocol=2))
    for _, st in storages.values():
        out.write(struct.pack("<q", st.numel) + st.data)
    return out.getvalue()


def state_dict(arrays: dict) -> collections.OrderedDict:
    """A state dict as nn.Module.state_dict() pickles it: an OrderedDict of tensors."""
    return collections.OrderedDict((k, Tensor(v)) for k, v in arrays.items())
