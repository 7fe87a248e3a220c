"""Restricted unpicklers for files other people made: official network pickles and EDM2 reference statistics.

Official checkpoints are `torch_utils.persistence` pickles whose network objects carry the source code that defined
them; unpickling one with the official code *executes* that source (ALGORITHM.md §8). Nothing here ever does: each
unpickler maps the few globals its files use onto harmless stand-ins and refuses every other global.

Nor may a file make us allocate or compute more than it holds. `_check_sizes` checks every length a pickle declares
against the bytes that remain before unpickling (CPython allocates a declared length before reading it); tensor records
may view only elements their storage holds, each once; numpy records must carry exactly the bytes their shape needs;
`plain` bounds depth and size and refuses cycles, since the memo lets a small file share one object many times over.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import torch


__all__ = ["UnsafeCheckpointError", "PickledModule", "load_official_pickle", "load_arrays_pickle", "plain"]


class UnsafeCheckpointError(ValueError):
    """A pickle asked for a global outside the allow-list of official checkpoints; nothing was executed."""


# ---------------------------------------------------------------------------------------------------------------------
# Declared sizes, checked before the unpickler sees them

# Argument formats by pickletools' `n`: fixed-size arguments, and the length prefix of counted ones (n < 0).
_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q", pickletools.TAKEN_FROM_ARGUMENT1: "<B",
            pickletools.TAKEN_FROM_ARGUMENT4: "<i", pickletools.TAKEN_FROM_ARGUMENT4U: "<I",
            pickletools.TAKEN_FROM_ARGUMENT8U: "<Q"}


def _read_exactly(f, n: int, where: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"the pickle ends inside the opcode at byte {where}")
    return data


def _check_sizes(f, size: int) -> None:
    """Walk the pickle at `f`'s position up to its STOP opcode, building nothing, and rewind.

    Every counted argument and frame must fit in the `size - position` bytes that remain, and every memo slot must be
    one a file of `size` bytes could fill (the unpickler sizes its memo table by the largest index it is given).
    """
    start = f.tell()
    while True:
        where = f.tell()
        code = _read_exactly(f, 1, where).decode("latin-1")
        op = pickletools.code2op.get(code)
        if op is None:
            raise pickle.UnpicklingError(f"invalid opcode {code!r} at byte {where}")
        arg, value = op.arg, None
        if arg is not None and arg.n == pickletools.UP_TO_NEWLINE:
            value = f.readline()
            if arg.name == "stringnl_noescape_pair":  # GLOBAL: module and name, one line each
                f.readline()
        elif arg is not None:
            fmt = _FORMATS[arg.n]
            value, = struct.unpack(fmt, _read_exactly(f, struct.calcsize(fmt), where))
            if arg.n < 0:  # a counted argument: `value` bytes follow
                _check_fits(op.name, where, value, size - f.tell())
                f.seek(value, io.SEEK_CUR)
        if op.name == "FRAME":
            _check_fits(op.name, where, value, size - f.tell())
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(value) > size:
            raise pickle.UnpicklingError(f"{op.name} at byte {where} uses memo slot {int(value)}, more than a file of "
                                         f"{size} bytes can fill")
        elif op.name == "STOP":
            break
    f.seek(start)


def _check_fits(opcode: str, where: int, length: int, remaining: int) -> None:
    if not 0 <= length <= remaining:
        raise EOFError(f"{opcode} at byte {where} declares {length} bytes but only {max(remaining, 0)} remain")


# ---------------------------------------------------------------------------------------------------------------------
# Stand-ins for the objects an official pickle contains. None of them runs code from the file.

class PickledModule:
    """A pickled module: its class name and its `__dict__` (persistent class or a torch container)."""

    class_name, state = "?", None

    def __init__(self, class_name: str, state=None):
        self.class_name, self.state = class_name, state

    def __setstate__(self, state):  # BUILD of a torch container
        self.state = state

    def __repr__(self):
        return f"<pickled {self.class_name}>"


def _persistent_obj(meta):
    # Keeps the class name and state; `module_src` is dropped unread, it is the code the official loader would run.
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise ValueError("malformed persistent object record (expected a dict with type='class' and class_name)")
    return PickledModule(meta["class_name"], meta.get("state"))


class _Storage:
    """A typed storage parsed from a legacy `torch.save` blob: a flat 1-d tensor."""

    def __init__(self, data: torch.Tensor):
        self.data = data


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _BlobUnpickler(pickle.Unpickler):
    """Reads the small pickles inside a storage blob; the only globals are storage types, the only pid 'storage'."""

    def __init__(self, f: io.BytesIO, size: int):
        super().__init__(f)
        self._stream, self._size = f, size

    def load(self):
        _check_sizes(self._stream, self._size)
        return super().load()

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise UnsafeCheckpointError(f"refused to load global '{module}.{name}' inside a tensor storage blob: only "
                                    "storage types belong there. Nothing was executed.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[4], int)):
            raise UnsafeCheckpointError(f"refused persistent id {pid!r} inside a tensor storage blob")
        return pid  # (tag, dtype, key, location, numel, ...): filled with data after the key list


def _load_storage_blob(blob):
    # A legacy (non-zip) torch.save of one storage: magic, protocol, sys info, storage pid, keys, then raw data
    # (fixtures README, "Tensors").
    if not isinstance(blob, bytes):
        raise ValueError("storage blob is not bytes")
    loader = _BlobUnpickler(f := io.BytesIO(blob), len(blob))
    if loader.load() != _LEGACY_MAGIC:
        raise ValueError("storage blob has a wrong magic number")
    loader.load()  # protocol version
    info = loader.load()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise ValueError("storage blob is not little-endian; only little-endian checkpoints are supported")
    pid = loader.load()
    keys = loader.load()
    if not isinstance(pid, tuple) or keys != [pid[2]]:
        raise ValueError("storage blob must hold exactly one storage")
    _, dtype, _, _, numel = pid[:5]
    header = f.read(8)
    if len(header) != 8:
        raise ValueError("storage blob is truncated")
    count, = struct.unpack("<q", header)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if count != numel or count < 0:
        raise ValueError(f"storage blob announces {numel} elements but holds {count}")
    raw = f.read(count * itemsize)  # BytesIO hands out at most what the blob holds
    if len(raw) != count * itemsize:
        raise ValueError(f"storage blob declares {count} elements ({count * itemsize} bytes) but holds "
                         f"{len(raw)} bytes")
    return _Storage(torch.frombuffer(bytearray(raw), dtype=dtype) if count else torch.empty(0, dtype=dtype))


def _check_view(offset: int, size: tuple, stride: tuple, numel: int) -> None:
    """A tensor record may view each element of its storage at most once, and only elements the storage holds.

    Then the view never has more elements than the storage, so copying it allocates at most what the file holds; a
    zero or overlapping stride would repeat elements and turn a tiny storage into an arbitrarily large tensor.
    """
    if len(size) > 64:
        raise ValueError(f"tensor record has {len(size)} dimensions; torch tensors have at most 64")
    if offset < 0 or offset > numel or min(size + stride, default=0) < 0:
        raise ValueError("tensor record has a negative offset, size or stride, or an offset past its storage")
    if 0 in size:
        return
    reach = 0  # furthest element reached by the dimensions with smaller strides
    for step, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
        if step <= reach:
            raise ValueError(f"tensor of size {list(size)} and stride {list(stride)} views storage elements more "
                             "than once (a zero or overlapping stride); checkpoints only hold plain tensors")
        reach += step * (n - 1)
    if offset + reach >= numel:
        raise ValueError(f"tensor of size {list(size)} reaches outside its storage of {numel} elements")


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise ValueError("tensor record does not point at a storage")
    ints = lambda t: isinstance(t, tuple) and all(type(v) is int for v in t)  # noqa: E731
    if type(offset) is not int or not ints(size) or not ints(stride) or len(size) != len(stride):
        raise ValueError("malformed tensor record (offset, size and stride must be ints)")
    numel = storage.data.numel()
    _check_view(offset, size, stride, numel)
    tensor = storage.data.as_strided(size, stride, offset)
    return tensor if tensor.numel() == numel and tensor.is_contiguous() else tensor.clone()  # own blob: no copy


def _rebuild_parameter(data, requires_grad, *_):
    if not torch.is_tensor(data):
        raise ValueError("parameter record does not hold a tensor")
    return data


class _NumpyDType:
    """`numpy.dtype(code, align, copy)` + BUILD state; made real by `_numpy_dtype` once the byte order is known."""

    def __init__(self, code, *_):
        self.code, self.state = code, None

    def __setstate__(self, state):
        self.state = state


def _numpy_dtype(d) -> np.dtype:
    if not isinstance(d, _NumpyDType) or not isinstance(d.code, str):
        raise ValueError("numpy record does not carry a dtype")
    state = d.state if isinstance(d.state, tuple) else ()
    if len(state) > 3 and state[3] is not None:
        raise UnsafeCheckpointError("refused a structured numpy dtype (only plain numeric dtypes are accepted)")
    try:
        dtype = np.dtype(d.code)
    except TypeError as e:
        raise ValueError(f"numpy record has an unknown dtype {d.code[:40]!r}") from e
    if dtype.hasobject or dtype.kind not in "biufc":
        raise UnsafeCheckpointError(f"refused numpy dtype {d.code[:40]!r} (only numeric dtypes are accepted)")
    order = state[1] if len(state) > 1 else "="
    return dtype.newbyteorder(order) if order in ("<", ">") else dtype


def _numpy_scalar(dtype, raw=None):
    dtype = _numpy_dtype(dtype)
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise ValueError("malformed numpy scalar record")
    return np.frombuffer(raw, dtype)[0]


def _numpy_values(raw, shape, dtype: np.dtype, fortran: bool) -> np.ndarray:
    # math.prod on Python ints: np.prod would wrap around for a huge declared shape and match a short buffer.
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError("malformed numpy array shape")
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"numpy array of shape {list(shape)} needs {math.prod(shape) * dtype.itemsize} bytes but its "
                         f"record holds {len(raw)}")
    return np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


class _NumpyArray:
    """`numpy.core.multiarray._reconstruct(ndarray, ...)` + BUILD `(version, shape, dtype, fortran, raw bytes)`."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], bytes)):
            raise UnsafeCheckpointError("refused a numpy array whose data is not raw bytes (object arrays)")
        _, shape, dtype, fortran, raw = state
        self.array = _numpy_values(raw, shape, _numpy_dtype(dtype), bool(fortran))


def _numpy_reconstruct(cls, *_):
    if cls is not _NumpyArray:
        raise UnsafeCheckpointError("refused numpy _reconstruct of something other than numpy.ndarray")
    return _NumpyArray()


def _numpy_frombuffer(raw, dtype, shape, order="C"):
    # Protocol 5 spelling of an array: numeric._frombuffer(buffer, dtype, shape, order).
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError("numpy buffer record does not hold bytes")
    array = _NumpyArray()
    array.array = _numpy_values(bytes(raw), shape, _numpy_dtype(dtype), order == "F")
    return array


def _latin1_bytes(text, encoding):
    # Protocol 2 spells raw bytes as _codecs.encode(str, 'latin1'); any other codec (hex, base64, ...) could be nested
    # into an exponentially growing chain, so only this one-to-one spelling is accepted.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refused _codecs.encode(..., {str(encoding)[:20]!r}): only the latin1 spelling of "
                                    "raw bytes is accepted")
    return text.encode("latin-1")


_NUMPY_GLOBALS = {
    ("numpy", "dtype"): _NumpyDType,
    ("numpy", "ndarray"): _NumpyArray,
    **{(f"numpy.{core}.multiarray", "scalar"): _numpy_scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _numpy_reconstruct for core in ("core", "_core")},
}

# Every global an official EDM / EDM2 / SiD / SiDA pickle needs (fixtures README, "Other globals you will meet").
_OFFICIAL_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_blob,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    **_NUMPY_GLOBALS,
    # Containers are rebuilt with NEWOBJ (no __init__) then BUILD, so the class name lives on the class.
    **{("torch.nn.modules.container", name): type(name, (PickledModule,), {"class_name": name})
       for name in ("ModuleDict", "ModuleList", "Sequential")},
}

# What an EDM2-style reference pickle (dicts of numpy arrays) needs, in every protocol numpy writes.
_ARRAY_GLOBALS = {
    **_NUMPY_GLOBALS,
    **{(f"numpy.{core}.numeric", "_frombuffer"): _numpy_frombuffer for core in ("core", "_core")},
    ("_codecs", "encode"): _latin1_bytes,
}


class _AllowListUnpickler(pickle.Unpickler):
    allowed: dict = {}  # (module, name) -> stand-in
    refusal = ""        # why anything else is refused
    what = ""           # the kind of file, for messages

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise UnsafeCheckpointError(f"refused to load global '{module}.{name}': {self.refusal} Nothing was "
                                        "executed.")
        return self.allowed[(module, name)]


class _OfficialUnpickler(_AllowListUnpickler):
    allowed, what = _OFFICIAL_GLOBALS, "official network pickle"
    refusal = ("official EDM/EDM2/SiD checkpoints never contain it, so this file is either not an official network "
               "pickle or has been tampered with.")


class _ArraysUnpickler(_AllowListUnpickler):
    allowed, what = _ARRAY_GLOBALS, "reference pickle"
    refusal = "reference pickles may only hold dicts of numpy arrays."


# ---------------------------------------------------------------------------------------------------------------------
# Reading files

_SNIFF = {b"\x89PNG": "a PNG image", b"PK\x03\x04": "a zip archive (e.g. a torch.save file or a dataset zip)",
          b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image"}


def _load(path: Path, unpickler):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            _check_sizes(f, size)
            return unpickler(f).load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{path}: {e}") from None
        except (EOFError, pickle.UnpicklingError) as e:
            if isinstance(e, EOFError) or "truncated" in str(e):
                raise ValueError(f"{path} is truncated ({e}); download it again.") from e
            raise ValueError(f"{path} is a corrupt or unsupported pickle: {e}") from e
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError, OverflowError) as e:
            raise ValueError(f"{path} is not a readable {unpickler.what}: {e}") from e


def load_official_pickle(path: Path):
    """The top-level object of an official network pickle, made of stand-ins; nothing in the file is executed."""
    with open(path, "rb") as f:
        head = f.read(4)
    kind = next((what for magic, what in _SNIFF.items() if head.startswith(magic)), None)
    if kind is None and not head.startswith(b"\x80"):
        kind = "not a pickle (no protocol-2+ header)" if head else "empty"
    if kind is not None:
        raise ValueError(f"{path} is {kind}, not an official EDM/EDM2 network pickle (.pkl). Pass a network-snapshot "
                         "or published .pkl file, a Diffusers model folder, a known checkpoint name or a Hub repo id.")
    return _load(path, _OfficialUnpickler)


def load_arrays_pickle(path: Path):
    """A pickle of dicts/lists of numpy arrays (EDM2 `img512.pkl`), arrays as numpy arrays; nothing is executed."""
    data = _load(path, _ArraysUnpickler)
    try:
        return plain(data, keep_arrays=True)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------------------------------
# From the stand-ins to plain data

_MAX_DEPTH = 100          # official init_kwargs and reference dicts nest a few levels
_MAX_VALUES = 1_000_000   # containers and list items made in one walk; memo sharing could expand exponentially


def plain(obj, keep_arrays: bool = False):
    """Numpy scalars -> numbers, arrays -> lists (or numpy arrays), tuples -> lists, pickled objects -> dicts.

    Refuses a container inside itself, nesting deeper than `_MAX_DEPTH` and walks making over `_MAX_VALUES` values.
    """
    return _plain(obj, keep_arrays, [_MAX_VALUES], set())


def _spend(budget: list, count: int) -> None:
    budget[0] -= count
    if budget[0] < 0:
        raise ValueError(f"its data expands to more than {_MAX_VALUES:,} values (one object shared many times over), "
                         "which no checkpoint or statistics file holds")


def _plain(obj, keep_arrays, budget, ancestors):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _NumpyArray):
        if keep_arrays:
            return obj.array
        _spend(budget, obj.array.size)  # Python numbers take several times the bytes of the array
        return obj.array.tolist()
    if not isinstance(obj, (list, tuple, dict, PickledModule)):
        return obj
    if id(obj) in ancestors:
        raise ValueError("a container contains itself, which no checkpoint or statistics file holds")
    if len(ancestors) >= _MAX_DEPTH:
        raise ValueError(f"its data nests deeper than {_MAX_DEPTH} levels, which no checkpoint or statistics file does")
    items = obj.state if isinstance(obj, PickledModule) else obj
    _spend(budget, 1 + (len(items) if isinstance(items, (list, tuple, dict)) else 0))
    ancestors.add(id(obj))
    walk = lambda v: _plain(v, keep_arrays, budget, ancestors)  # noqa: E731
    if isinstance(obj, (list, tuple)):
        out = [walk(v) for v in obj]
    elif isinstance(obj, dict):
        out = {k: walk(v) for k, v in obj.items()}
    else:
        state = obj.state if isinstance(obj.state, dict) else {}
        out = {"class_name": obj.class_name, "init_kwargs": walk(state.get("_init_kwargs", {}))}
        if "_modules" not in state:  # a network is summarised: checkpoints.read_official_pickle reads its weights
            out.update({k: walk(v) for k, v in state.items() if not k.startswith("_")})
    ancestors.discard(id(obj))
    return out
