"""Official EDM/EDM2 network pickles for the tests, written without the official code.

An official checkpoint is a plain pickle of a dict (EDM) or a `dnnlib.util.EasyDict` (EDM2) whose `ema` entry is a
network saved by `torch_utils.persistence`: every network object is a call of
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the object's class name, its
`__dict__` and the source of the module that defined it, which the official loader executes. Tensors are
`torch._utils._rebuild_tensor_v2` (or `_rebuild_parameter` around it) over storages that `torch.storage._load_from_bytes`
reads from a legacy `torch.save` blob. `sida_diffusers.safe_io.pickles` reads exactly this, executing nothing.

The files written here have that structure; the embedded module source is a harmless payload that, if anything ever
executed it, appends a line to the file named by $EDM_PICKLE_PAYLOAD_MARKER (tests assert that file never appears).

Values are written by a small opcode encoder of our own rather than `pickle.Pickler`, which would import
`torch_utils.persistence` to check each global. Besides plain Python values (None, bools, ints, floats, str,
bytes, tuples, lists, dicts, sets, OrderedDicts, numpy scalars, dtypes and arrays) it writes three kinds of nodes:
`Global` (a reference to `module.name`), `Reduce` (a call, then optionally BUILD) and `NewObject` (`cls.__new__(cls)`
then SETITEMS and/or BUILD). Containers are memoised before their contents, as pickle does, so a value may share
objects or contain itself.
"""

import collections
import struct
from dataclasses import dataclass

import numpy as np
import torch


PAYLOAD_ENV = "EDM_PICKLE_PAYLOAD_MARKER"
PERSISTENCE_VERSION = 6
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first record of a legacy (pre-zip) torch.save file
STORAGE_CLASSES = {np.dtype(k): v for k, v in {
    "float32": "FloatStorage", "float16": "HalfStorage", "float64": "DoubleStorage", "int64": "LongStorage",
    "int32": "IntStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}.items()}


# ---- nodes --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Global:
    """`module.name`, written as a pickle global (never imported)."""
    module: str
    name: str


class Reduce:
    """`func(*args)`, then BUILD with `state` when it is not None."""

    def __init__(self, func, args=(), state=None):
        self.func, self.args, self.state = func, tuple(args), state


class NewObject:
    """`cls.__new__(cls)` (NEWOBJ with no arguments), then SETITEMS with `items` and/or BUILD with `state`."""

    def __init__(self, cls, items=None, state=None):
        self.cls, self.items, self.state = cls, items, state


class PersistentId:
    """A persistent id (BINPERSID): how a storage is referred to inside a legacy torch.save blob."""

    def __init__(self, pid):
        self.pid = pid


# ---- the encoder --------------------------------------------------------------------------------------------------

class _Encoder:
    def __init__(self, protocol):
        if not 2 <= protocol <= 4:
            raise ValueError(f"protocol {protocol}: official checkpoints use protocols 2 to 4")
        self.protocol, self.out, self.memo = protocol, bytearray(), {}

    def encode(self, obj) -> bytes:
        self.out += b"\x80" + bytes([self.protocol])  # PROTO (no FRAMEs: opcodes stay easy to splice in tests)
        self.save(obj)
        self.out += b"."  # STOP
        return bytes(self.out)

    # memo: strings and globals by value, everything else by identity (the object is kept alive with its slot)
    def _key(self, obj):
        if isinstance(obj, str):
            return ("str", obj)
        if isinstance(obj, Global):
            return ("global", obj.module, obj.name)
        return ("id", id(obj))

    def _remember(self, obj):
        index = len(self.memo)
        self.memo[self._key(obj)] = (index, obj)
        if self.protocol >= 4:
            self.out += b"\x94"  # MEMOIZE
        else:
            self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)  # (LONG_)BINPUT

    def _recall(self, index):
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)  # (LONG_)BINGET

    def save(self, obj):
        if obj is None:
            self.out += b"N"
        elif obj is True or obj is False:
            self.out += b"\x88" if obj else b"\x89"
        elif type(obj) is int:
            self._int(obj)
        elif type(obj) is float:
            self.out += b"G" + struct.pack(">d", obj)
        elif self._key(obj) in self.memo:
            self._recall(self.memo[self._key(obj)][0])
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, bytes):
            self._bytes(obj)
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, list):
            self.out += b"]"  # EMPTY_LIST
            self._remember(obj)
            self._marked(obj, b"e", single=b"a")  # APPENDS / APPEND
        elif isinstance(obj, collections.OrderedDict):
            self._reduce(obj, Global("collections", "OrderedDict"), (), items=obj.items())
        elif isinstance(obj, dict):
            self.out += b"}"  # EMPTY_DICT
            self._remember(obj)
            self._setitems(obj.items())
        elif isinstance(obj, (set, frozenset)):
            self._set(obj)
        elif isinstance(obj, np.dtype):
            _, args, state = obj.__reduce__()  # numpy's own spelling: dtype(code, align, copy) + BUILD state
            self._reduce(obj, Global("numpy", "dtype"), args, state=state)
        elif isinstance(obj, np.generic):
            self._reduce(obj, Global("numpy.core.multiarray", "scalar"), (obj.dtype, obj.tobytes()))
        elif isinstance(obj, np.ndarray):
            array = np.ascontiguousarray(obj)
            self._reduce(obj, Global("numpy.core.multiarray", "_reconstruct"), (Global("numpy", "ndarray"), (0,), b"b"),
                         state=(1, array.shape, array.dtype, False, array.tobytes()))
        elif isinstance(obj, Global):
            self._global(obj)
        elif isinstance(obj, Reduce):
            self._reduce(obj, obj.func, obj.args, state=obj.state)
        elif isinstance(obj, NewObject):
            self.save(obj.cls)
            self.out += b")\x81"  # EMPTY_TUPLE, NEWOBJ
            self._remember(obj)
            if obj.items is not None:
                self._setitems(obj.items)
            if obj.state is not None:
                self.save(obj.state)
                self.out += b"b"  # BUILD
        elif isinstance(obj, PersistentId):
            self.save(obj.pid)
            self.out += b"Q"  # BINPERSID
        else:
            raise TypeError(f"official_pickles cannot write a {type(obj).__name__}")

    def _int(self, n):
        if 0 <= n < 1 << 8:
            self.out += b"K" + bytes([n])  # BININT1
        elif 0 <= n < 1 << 16:
            self.out += b"M" + struct.pack("<H", n)  # BININT2
        elif -(1 << 31) <= n < 1 << 31:
            self.out += b"J" + struct.pack("<i", n)  # BININT
        else:
            raw = n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True)  # two's complement, sign bit included
            self.out += b"\x8a" + bytes([len(raw)]) + raw if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw)) + raw

    def _str(self, text):
        raw = text.encode("utf-8", "surrogatepass")
        if self.protocol >= 4 and len(raw) < 256:
            self.out += b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE
        else:
            self.out += b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE
        self._remember(text)

    def _bytes(self, data):
        if self.protocol < 3:
            raise ValueError("bytes need protocol 3 or later (protocol 2 has no bytes opcode)")
        self.out += (b"C" + bytes([len(data)]) if len(data) < 256 else b"B" + struct.pack("<I", len(data))) + data
        self._remember(data)

    def _tuple(self, items):
        if not items:
            self.out += b")"  # EMPTY_TUPLE
            return
        if len(items) <= 3:
            for item in items:
                self.save(item)
            self.out += b"\x85\x86\x87"[len(items) - 1:len(items)]  # TUPLE1..3
        else:
            self.out += b"("  # MARK
            for item in items:
                self.save(item)
            self.out += b"t"  # TUPLE
        self._remember(items)

    def _marked(self, items, opcode, single=None):
        # MARK items... opcode; like pickle, one item goes without MARK when a one-item opcode exists
        items = list(items)
        if len(items) == 1 and single:
            self.save(items[0])
            self.out += single
        elif items:
            self.out += b"("
            for item in items:
                self.save(item)
            self.out += opcode

    def _setitems(self, pairs):
        pairs = list(pairs)
        if len(pairs) == 1:
            self.save(pairs[0][0])
            self.save(pairs[0][1])
            self.out += b"s"  # SETITEM
        elif pairs:
            self.out += b"("
            for key, value in pairs:
                self.save(key)
                self.save(value)
            self.out += b"u"  # SETITEMS

    def _set(self, items):
        if self.protocol < 4:  # what pickle does before EMPTY_SET existed
            self._reduce(items, Global("builtins", "set"), (list(items),))
            return
        self.out += b"\x8f"  # EMPTY_SET
        self._remember(items)
        self._marked(items, b"\x90")  # ADDITEMS

    def _global(self, ref):
        if self.protocol >= 4:
            self.save(ref.module)
            self.save(ref.name)
            self.out += b"\x93"  # STACK_GLOBAL
        else:
            self.out += b"c" + f"{ref.module}\n{ref.name}\n".encode("utf-8")  # GLOBAL
        self._remember(ref)

    def _reduce(self, obj, func, args, state=None, items=None):
        self.save(func)
        self.save(tuple(args))
        self.out += b"R"  # REDUCE
        self._remember(obj)
        if items is not None:
            self._setitems(items)
        if state is not None:
            self.save(state)
            self.out += b"b"  # BUILD


def dumps(obj, protocol=4) -> bytes:
    """`obj` as pickle bytes (no FRAME opcodes)."""
    return _Encoder(protocol).encode(obj)


# ---- tensors --------------------------------------------------------------------------------------------------------

def storage_blob(flat: np.ndarray) -> bytes:
    """A legacy `torch.save` of one storage holding `flat`: what `torch.storage._load_from_bytes` reads.

    Five protocol-2 pickles (magic number, format version 1001, system info, the storage as a persistent id, the list
    of storage keys), then the element count as int64 and the little-endian data.
    """
    flat = np.ascontiguousarray(flat).reshape(-1)
    key = "0"  # any string: each blob holds one storage
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    pid = ("storage", Global("torch", STORAGE_CLASSES[flat.dtype]), key, "cpu", flat.size, None)
    records = [dumps(value, protocol=2) for value in (LEGACY_MAGIC, 1001, info, PersistentId(pid), [key])]
    return b"".join(records) + struct.pack("<q", flat.size) + flat.astype(flat.dtype.newbyteorder("<")).tobytes()


def tensor(values, parameter=False, requires_grad=False) -> Reduce:
    """A tensor record (a parameter record around it when `parameter`) over its own storage blob."""
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    array = np.array(array, order="C")  # a copy; 0-d stays 0-d
    strides = tuple(s // array.itemsize for s in array.strides)
    storage = Reduce(Global("torch.storage", "_load_from_bytes"), (storage_blob(array),))
    record = Reduce(Global("torch._utils", "_rebuild_tensor_v2"),
                    (storage, 0, array.shape, strides, False, collections.OrderedDict()))
    if parameter:
        record = Reduce(Global("torch._utils", "_rebuild_parameter"), (record, requires_grad, collections.OrderedDict()))
    return record


# ---- persistent objects ---------------------------------------------------------------------------------------------

def payload_source(module: str, tag: str) -> str:
    """What stands in for a module's source: harmless, but it leaves a trace if it is ever executed."""
    return (f'"""Stand-in for the source of {module} in the test pickle {tag!r}; executing it is the bug under test."""\n'
            "import os\n"
            f"_trace = os.environ.get({PAYLOAD_ENV!r})\n"
            "if _trace:\n"
            "    with open(_trace, 'a') as _f:\n"
            f"        _f.write({f'executed the embedded source of {module} ({tag})'!r} + '\\n')\n")


def persistent(class_name: str, module: str, state: dict, tag: str = "test") -> Reduce:
    """An instance of a `torch_utils.persistence` class: `_reconstruct_persistent_obj(meta)`, no BUILD."""
    meta = {"type": "class", "version": PERSISTENCE_VERSION, "module_src": payload_source(module, tag),
            "class_name": class_name, "state": state}
    return Reduce(Global("torch_utils.persistence", "_reconstruct_persistent_obj"), (meta,))


# ---- a fixture network from its recipe ------------------------------------------------------------------------------

def _value(tagged, tensors):
    """A recipe value: JSON with tagged objects for what JSON cannot spell (tuples, numpy values, tensors...)."""
    if isinstance(tagged, list):
        return [_value(v, tensors) for v in tagged]
    if not isinstance(tagged, dict):
        return tagged
    tag = next((key for key in tagged if key.startswith("__")), None)
    body = tagged.get(tag)
    if tag == "__tensor__":
        return tensors(tagged)
    if tag == "__py_tuple__":
        return tuple(_value(v, tensors) for v in body)
    if tag in ("__py_dict__", "__py_odict__"):
        pairs = [(k, _value(v, tensors)) for k, v in body]
        return collections.OrderedDict(pairs) if tag == "__py_odict__" else dict(pairs)
    if tag == "__py_dictsub__":  # a dict subclass such as dnnlib.util.EasyDict: NEWOBJ then SETITEMS
        return NewObject(Global(*body.rsplit(".", 1)), items=[(k, _value(v, tensors)) for k, v in tagged["items"]])
    if tag == "__py_np_scalar__":
        return np.array(tagged["value"], dtype=body)[()]
    if tag == "__py_ndarray__":
        return np.array(tagged["data"], dtype=body).reshape(tagged["shape"])
    if tag == "__py_float__":
        return float(body)
    raise ValueError(f"unknown recipe tag {tag!r}")


def _module(path, tree, tensors, tag):
    entry, state = tree["modules"][path], {}
    for key, default in tree["internal_layout"]:  # torch's own Module attributes, in their order
        if key == "training":
            state[key] = entry["training"]
        elif key in ("_parameters", "_buffers"):  # OrderedDicts, as the torch of the published files wrote them
            items = entry["parameters" if key == "_parameters" else "buffers"]
            state[key] = collections.OrderedDict((name, None if ref is None else tensors(ref)) for name, ref in items)
        elif key == "_non_persistent_buffers_set":
            state[key] = set(entry["non_persistent_buffers"])
        elif key == "_modules":
            state[key] = collections.OrderedDict((name, None if child is None else _module(child, tree, tensors, tag))
                                                 for name, child in entry["modules"])
        else:
            state[key] = _value(default, tensors)
    state.update((key, _value(value, tensors)) for key, value in entry["attrs"])
    if entry["persistent"]:
        return persistent(entry["class_name"], entry["module"], state, tag)
    return NewObject(Global(entry["module"], entry["class_name"]), state=state)  # e.g. torch's ModuleDict


def network_pickle(recipe: dict, state_dict: dict, tag: str, init_kwargs: dict = None) -> bytes:
    """A fixture network as an official checkpoint: `recipe` gives the object tree, `state_dict` the tensors.

    `init_kwargs` replaces entries of the network's recorded `_init_kwargs` (each must exist), leaving the weights
    as they are: a file whose configuration no longer describes its weights. EDM2 recipes store float16 tensors,
    as official EDM2 pickles do; the values must be exactly representable.
    """
    dtype = getattr(torch, recipe.get("ema_tensor_dtype", "float32"))

    def tensors(ref):
        value = state_dict[ref["__tensor__"]]
        if not torch.equal(value.to(dtype).to(value.dtype), value):
            raise ValueError(f"{ref['__tensor__']} is not exactly representable in {dtype}")
        return tensor(value.to(dtype), ref["parameter"], ref["requires_grad"])

    ema = _module(recipe["ema"]["root"], recipe["ema"], tensors, tag)
    if init_kwargs:
        recorded = ema.args[0]["state"]["_init_kwargs"]
        unknown = sorted(set(init_kwargs) - set(recorded))
        if unknown:
            raise KeyError(f"{tag} records no init_kwargs {unknown}; it has {sorted(recorded)}")
        recorded.update(init_kwargs)
    parts = {"ema": ema, "dataset_kwargs": _value(recipe["dataset_kwargs"], tensors)}
    for key in ("loss_fn", "augment_pipe", "encoder"):
        if key in recipe:
            entry = recipe[key]
            parts[key] = None if entry is None else persistent(
                entry["class_name"], entry["module"], {k: _value(v, tensors) for k, v in entry["dict"]}, tag)
    items = [(key, parts[key]) for key in recipe["top_level"]["keys"]]
    kind = recipe["top_level"]["type"]
    top = dict(items) if kind == "dict" else NewObject(Global(*kind.rsplit(".", 1)), items=items)
    return dumps(top, protocol=4)
