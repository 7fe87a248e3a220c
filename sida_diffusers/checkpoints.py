"""Load official EDM / EDM2 / SiD / SiDA network pickles safely, and convert them to Diffusers model folders.

Official checkpoints are `torch_utils.persistence` pickles: each network object carries the source code of the
module that defined it and unpickling it with the official code *executes* that source (ALGORITHM.md §8). The
reader below never does: a restricted unpickler maps the handful of globals these files use onto harmless
stand-ins (class name + state, containers, tensors rebuilt from raw bytes with bounds checks) and refuses every
other global. The `ema` network tree is then walked into a state dict with the official key names and loaded,
strictly, into the matching `Denoiser` built by `networks.denoiser_from_official`.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union
from urllib.request import urlopen

import numpy as np
import torch
from huggingface_hub import hf_hub_download, snapshot_download

from sida_diffusers.networks import Denoiser, denoiser_from_official
from sida_diffusers.shipped import SHIPPED_TEACHERS, shipped_teacher_path

__all__ = [
    "KNOWN_CHECKPOINTS", "OfficialCheckpoint", "UnsafeCheckpointError",
    "read_official_pickle", "load_denoiser", "convert_official", "cached_download",
]

# ---------------------------------------------------------------------------------------------------------------------
# Known checkpoints (ALGORITHM.md §8): short name -> URL, or Hub path "owner/repo/path/in/repo.pkl".

_EDM = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
_EDM2 = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"
_SID = "UT-Austin-PML/SiD/"
_SIDA = "UT-Austin-PML/SiDA/EDM_distillation/"
_SIDA2 = "UT-Austin-PML/SiDA/EDM2_distillation/edm2_img512_"

KNOWN_CHECKPOINTS = {
    # EDM teachers (§8.1)
    "edm-cifar10-32x32-uncond-vp": _EDM + "edm-cifar10-32x32-uncond-vp.pkl",
    "edm-cifar10-32x32-cond-vp": _EDM + "edm-cifar10-32x32-cond-vp.pkl",
    "edm-ffhq-64x64-uncond-vp": _EDM + "edm-ffhq-64x64-uncond-vp.pkl",
    "edm-afhqv2-64x64-uncond-vp": _EDM + "edm-afhqv2-64x64-uncond-vp.pkl",
    "edm-imagenet-64x64-cond-adm": _EDM + "edm-imagenet-64x64-cond-adm.pkl",
    # EDM2 teachers: the FID-optimal post-hoc EMA reconstructions (§8.2)
    "edm2-img512-xs": _EDM2 + "edm2-img512-xs-2147483-0.135.pkl",
    "edm2-img512-s": _EDM2 + "edm2-img512-s-2147483-0.130.pkl",
    "edm2-img512-m": _EDM2 + "edm2-img512-m-2147483-0.100.pkl",
    "edm2-img512-l": _EDM2 + "edm2-img512-l-1879048-0.085.pkl",
    "edm2-img512-xl": _EDM2 + "edm2-img512-xl-1342177-0.085.pkl",
    "edm2-img512-xxl": _EDM2 + "edm2-img512-xxl-0939524-0.070.pkl",
    # The same files under the preset names of EDM2's generate_images.py, and its FD_DINOv2-optimal presets, which
    # are other post-hoc EMA lengths of the same training runs.
    "edm2-img512-xs-fid": _EDM2 + "edm2-img512-xs-2147483-0.135.pkl",
    "edm2-img512-s-fid": _EDM2 + "edm2-img512-s-2147483-0.130.pkl",
    "edm2-img512-m-fid": _EDM2 + "edm2-img512-m-2147483-0.100.pkl",
    "edm2-img512-l-fid": _EDM2 + "edm2-img512-l-1879048-0.085.pkl",
    "edm2-img512-xl-fid": _EDM2 + "edm2-img512-xl-1342177-0.085.pkl",
    "edm2-img512-xxl-fid": _EDM2 + "edm2-img512-xxl-0939524-0.070.pkl",
    "edm2-img512-xs-dino": _EDM2 + "edm2-img512-xs-2147483-0.200.pkl",
    "edm2-img512-s-dino": _EDM2 + "edm2-img512-s-2147483-0.190.pkl",
    "edm2-img512-m-dino": _EDM2 + "edm2-img512-m-2147483-0.155.pkl",
    "edm2-img512-l-dino": _EDM2 + "edm2-img512-l-1879048-0.155.pkl",
    "edm2-img512-xl-dino": _EDM2 + "edm2-img512-xl-1342177-0.155.pkl",
    "edm2-img512-xxl-dino": _EDM2 + "edm2-img512-xxl-0939524-0.150.pkl",
    # SiD generators (§8.3); the AFHQ file is alpha=1.0 although the README says 1.2
    "sid-cifar10-uncond-alpha1.2": _SID + "cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl",
    "sid-cifar10-cond-alpha1.2": _SID + "cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl",
    "sid-imagenet64-alpha1.2": _SID + "imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl",
    "sid-ffhq64-alpha1.2": _SID + "ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl",
    "sid-afhq64-alpha1": _SID + "afhq64/alpha1/network-snapshot-1.000000-371712.pkl",
    # SiDA (alpha=1) and SiD²A generators, EDM (§8.3)
    "sida-cifar10-uncond": _SIDA + "cifar10_uncond_sida_alpha1-217920.pkl",
    "sid2a-cifar10-uncond-alpha1": _SIDA + "cifar10_uncond_sid2a_alpha1-028160.pkl",
    "sid2a-cifar10-uncond-alpha1.2": _SIDA + "cifar10_uncond_sid2a_alpha1.2-022528.pkl",
    "sida-cifar10-cond": _SIDA + "cifar10_cond_sida_alpha1-293184.pkl",
    "sid2a-cifar10-cond-alpha1": _SIDA + "cifar10_cond_sid2a_alpha1-038912.pkl",
    "sid2a-cifar10-cond-alpha1.2": _SIDA + "cifar10_cond_sid2a_alpha1.2-053760.pkl",
    "sida-imagenet64": _SIDA + "imgnet64_sida_alpha1-249167.pkl",
    "sid2a-imagenet64-alpha1": _SIDA + "imgnet64_sid2a_alpha1-029499.pkl",
    "sid2a-imagenet64-alpha1.2": _SIDA + "imgnet64_sid2a_alpha1.2-021471.pkl",
    "sida-ffhq64": _SIDA + "ffhq64_sida_alpha1-185856.pkl",
    "sid2a-ffhq64-alpha1": _SIDA + "ffhq64_sid2a_alpha1-168960.pkl",
    "sid2a-ffhq64-alpha1.2": _SIDA + "ffhq64_sid2a_alpha1.2-080896.pkl",
    "sida-afhq64": _SIDA + "afhq64-v2_sida_alpha1-127488.pkl",
    "sid2a-afhq64-alpha1": _SIDA + "afhq64-v2_sid2a_alpha1-175104.pkl",
    "sid2a-afhq64-alpha1.2": _SIDA + "afhq64-v2_sid2a_alpha1.2-175104.pkl",
    # EDM2 generators, alpha=1 (§8.3). Two file names disagree with the README's method column (sida-edm2-xl points
    # at an "xl_sid2a" file, sid-edm2-xxl at an "xxl_sida" file); these are the files the README links.
    "sid-edm2-xs": _SIDA2 + "xs_sid_alpha1-249360.pkl",
    "sida-edm2-xs": _SIDA2 + "xs_sida_alpha1-166410.pkl",
    "sid2a-edm2-xs": _SIDA2 + "xs_sid2a_alpha1-028674.pkl",
    "sid-edm2-s": _SIDA2 + "s_sid_alpha1-192010.pkl",
    "sida-edm2-s": _SIDA2 + "s_sida_alpha1-117764.pkl",
    "sid2a-edm2-s": _SIDA2 + "s_sid2a_alpha1-075268.pkl",
    "sid-edm2-m": _SIDA2 + "m_sid_alpha1-226830.pkl",
    "sida-edm2-m": _SIDA2 + "m_sida_alpha1-115716.pkl",
    "sid2a-edm2-m": _SIDA2 + "m_sid2a_alpha1-044036.pkl",
    "sid-edm2-l": _SIDA2 + "l_sid_alpha1-203788.pkl",
    "sida-edm2-l": _SIDA2 + "l_sida_alpha1-166918.pkl",
    "sid2a-edm2-l": _SIDA2 + "l_sid2a_alpha1-050182.pkl",
    "sid-edm2-xl": _SIDA2 + "xl_sid_alpha1-234004.pkl",
    "sida-edm2-xl": _SIDA2 + "xl_sid2a_alpha1-024578.pkl",
    "sid2a-edm2-xl": _SIDA2 + "xl_sid2a_alpha1-079495.pkl",
    "sid-edm2-xxl": _SIDA2 + "xxl_sida_alpha1-077932.pkl",
    "sida-edm2-xxl": _SIDA2 + "xxl_sida_alpha1-089816.pkl",
    "sid2a-edm2-xxl": _SIDA2 + "xxl_sid2a_alpha1-029812.pkl",
}


class UnsafeCheckpointError(ValueError):
    """A pickle asked for a global outside the allow-list of official checkpoints; nothing was executed."""


# ---------------------------------------------------------------------------------------------------------------------
# Stand-ins for the objects an official pickle contains. None of them runs code from the file.

class _Module:
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
    return _Module(meta["class_name"], meta.get("state"))


def _container(class_name):
    # Containers are rebuilt with NEWOBJ (no __init__) then BUILD, so the class name lives on the class.
    return type(class_name, (_Module,), {"class_name": class_name})


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
    f = io.BytesIO(blob)
    loader = _BlobUnpickler(f)
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
    raw = f.read(count * itemsize)
    if len(raw) != count * itemsize:
        raise ValueError("storage blob is truncated")
    return _Storage(torch.frombuffer(bytearray(raw), dtype=dtype) if count else torch.empty(0, dtype=dtype))


def _rebuild_tensor(storage, offset, size, stride, *_):
    # Every index the view can reach must lie inside the storage: offset + sum((size_i - 1) * stride_i) < numel.
    if not isinstance(storage, _Storage):
        raise ValueError("tensor record does not point at a storage")
    ints = lambda t: isinstance(t, tuple) and all(type(v) is int for v in t)  # noqa: E731
    if type(offset) is not int or not ints(size) or not ints(stride) or len(size) != len(stride):
        raise ValueError("malformed tensor record (offset, size and stride must be ints)")
    numel = storage.data.numel()
    if offset < 0 or offset > numel or min(size + stride, default=0) < 0:
        raise ValueError("tensor record has a negative offset, size or stride, or an offset past its storage")
    if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        raise ValueError(f"tensor of size {list(size)} reaches outside its storage of {numel} elements")
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
    dtype = np.dtype(d.code)
    if dtype.hasobject or dtype.kind not in "biufc":
        raise UnsafeCheckpointError(f"refused numpy dtype {d.code!r} (only numeric dtypes are accepted)")
    order = state[1] if len(state) > 1 else "="
    return dtype.newbyteorder(order) if order in "<>" else dtype


def _numpy_scalar(dtype, raw=None):
    dtype = _numpy_dtype(dtype)
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise ValueError("malformed numpy scalar record")
    return np.frombuffer(raw, dtype)[0]


class _NumpyArray:
    """`numpy.core.multiarray._reconstruct(ndarray, ...)` + BUILD `(version, shape, dtype, fortran, raw bytes)`."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], bytes)):
            raise UnsafeCheckpointError("refused a numpy array whose data is not raw bytes (object arrays)")
        _, shape, dtype, fortran, raw = state
        dtype = _numpy_dtype(dtype)
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise ValueError("malformed numpy array shape")
        if len(raw) != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError("numpy array data does not match its shape")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


def _numpy_reconstruct(cls, *_):
    if cls is not _NumpyArray:
        raise UnsafeCheckpointError("refused numpy _reconstruct of something other than numpy.ndarray")
    return _NumpyArray()


# Every global an official EDM / EDM2 / SiD / SiDA pickle needs (fixtures README, "Other globals you will meet").
_SAFE_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_blob,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy", "ndarray"): _NumpyArray,
    **{("torch.nn.modules.container", name): _container(name) for name in ("ModuleDict", "ModuleList", "Sequential")},
    **{(f"numpy.{core}.multiarray", "scalar"): _numpy_scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _numpy_reconstruct for core in ("core", "_core")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafeCheckpointError(
                f"refused to load global '{module}.{name}': official EDM/EDM2/SiD checkpoints never contain it, so "
                "this file is either not an official network pickle or has been tampered with. Nothing was executed."
            )
        return _SAFE_GLOBALS[(module, name)]


# ---------------------------------------------------------------------------------------------------------------------
# From the unpickled tree to plain data

def _plain(obj):
    """numpy scalars/arrays -> numbers/lists, tuples -> lists, persistent objects -> dicts of their attributes."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _NumpyArray):
        return obj.array.tolist()
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, _Module):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_modules" in state:  # a network: summarised, its weights are what read_official_pickle(key=...) is for
            return {"class_name": obj.class_name, "init_kwargs": _plain(state.get("_init_kwargs", {}))}
        attrs = {k: _plain(v) for k, v in state.items() if not k.startswith("_")}
        return {"class_name": obj.class_name, "init_kwargs": _plain(state.get("_init_kwargs", {})), **attrs}
    return obj


def _collect_state_dict(module: _Module, prefix: str, out: dict) -> dict:
    # Key = path of _modules names + parameter/buffer name, as Module.state_dict() builds it (fixtures README).
    if prefix.count(".") > 64:  # real networks nest < 10 deep; this stops cyclic (memo-referenced) trees
        raise ValueError(f"module tree is cyclic or implausibly deep at '{prefix[:200]}...'")
    state = module.state
    if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise ValueError(f"'{prefix.rstrip('.')}' ({module.class_name}) is not a torch module (no _modules)")
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    tensors = list((state.get("_parameters") or {}).items())
    tensors += [(k, v) for k, v in (state.get("_buffers") or {}).items() if k not in non_persistent]
    for name, tensor in tensors:
        if tensor is None:  # e.g. resample_filter of a convolution without resampling
            continue
        if not torch.is_tensor(tensor):
            raise ValueError(f"'{prefix}{name}' is a {type(tensor).__name__}, expected a tensor")
        # EDM2 pickles are float16 throughout; float16 gains change the outputs (fixtures README, "Quirks").
        out[prefix + name] = tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(child, _Module):
            raise ValueError(f"'{prefix}{name}' is a {type(child).__name__}, expected a module")
        _collect_state_dict(child, f"{prefix}{name}.", out)
    return out


@dataclass
class OfficialCheckpoint:
    """What an official network pickle holds, as plain data.

    `class_name` and `init_kwargs` identify and configure the network (`networks.denoiser_from_official`),
    `state_dict` holds its tensors under the official key names (float16 cast to float32). `dataset_kwargs` and
    `encoder` (EDM2: class name, `vae_name`, latent `scale`/`bias`) are copied from the top level when present;
    `extras` has the remaining top-level entries (e.g. `loss_fn`, `augment_pipe`) as dicts of their attributes.
    """

    class_name: str
    init_kwargs: dict
    state_dict: dict
    dataset_kwargs: Optional[dict] = None
    encoder: Optional[dict] = None
    extras: dict = field(default_factory=dict)


_SNIFF = {b"\x89PNG": "a PNG image", b"PK\x03\x04": "a zip archive (e.g. a torch.save file or a dataset zip)",
          b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image"}


def _unpickle(path: Path):
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        kind = next((what for magic, what in _SNIFF.items() if head.startswith(magic)), None)
        if kind is None and not head.startswith(b"\x80"):
            kind = "not a pickle (no protocol-2+ header)" if head else "empty"
        if kind is not None:
            raise ValueError(
                f"{path} is {kind}, not an official EDM/EDM2 network pickle (.pkl). Pass a network-snapshot or "
                "published .pkl file, a Diffusers model folder, a known checkpoint name or a Hub repo id."
            )
        try:
            return _RestrictedUnpickler(f).load()
        except UnsafeCheckpointError:
            raise
        except (EOFError, pickle.UnpicklingError) as e:
            if isinstance(e, EOFError) or "truncated" in str(e):
                raise ValueError(f"{path} is truncated ({e}); download it again.") from e
            raise ValueError(f"{path} is a corrupt or unsupported pickle: {e}") from e
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError, OverflowError) as e:
            raise ValueError(f"{path} is not a readable official network pickle: {e}") from e


def read_official_pickle(path: Union[str, os.PathLike], key: str = "ema") -> OfficialCheckpoint:
    """Read an official EDM/EDM2/SiD/SiDA `.pkl` without executing anything in it; the network is entry `key`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    top = _unpickle(path)
    if isinstance(top, _Module):  # a network pickled on its own
        top = {key: top}
    if not isinstance(top, dict):
        raise ValueError(f"{path} holds a {type(top).__name__}, not an official checkpoint (a dict with an "
                         f"'{key}' network entry).")
    nets = [k for k, v in top.items() if isinstance(v, _Module) and isinstance(v.state, dict) and "_modules" in v.state]
    if key not in top:
        hint = f"pass key= one of {nets}" if nets else "none of its entries is a network"
        raise ValueError(f"{path} has no '{key}' entry; its top-level keys are {list(top)} ({hint}).")
    if key not in nets:
        what = f"class {top[key].class_name}" if isinstance(top[key], _Module) else f"type {type(top[key]).__name__}"
        raise ValueError(f"entry '{key}' of {path} has {what}, not a network module"
                         + (f"; entries holding a network: {nets}" if nets else "; the file holds no network."))
    net = top[key]
    try:
        state_dict = _collect_state_dict(net, "", {})
        rest = {k: _plain(v) for k, v in top.items() if k != key}
    except RecursionError as e:  # self-referencing containers: never written by torch or the official code
        raise ValueError(f"{path} holds self-referencing data, which no official checkpoint does") from e
    return OfficialCheckpoint(
        class_name=net.class_name, init_kwargs=_plain(net.state.get("_init_kwargs") or {}), state_dict=state_dict,
        dataset_kwargs=rest.pop("dataset_kwargs", None), encoder=rest.pop("encoder", None), extras=rest)


# ---------------------------------------------------------------------------------------------------------------------
# Sources: files, URLs, known names, Diffusers folders, the Hub

def _cache_dir(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("SIDA_CACHE") or Path.home() / ".cache" / "sida_diffusers").expanduser()


def cached_download(url: str, cache_dir=None) -> Path:
    """Download `url` once into the cache (`$SIDA_CACHE` or ~/.cache/sida_diffusers); the file appears atomically."""
    parsed = urllib.parse.urlparse(url)
    dst = _cache_dir(cache_dir) / (parsed.netloc or "url") / Path(urllib.parse.unquote(parsed.path)).name
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dst)  # readers never see a half-written file
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"could not download {url}: {e}. Check the network, or download the file yourself and "
                          "pass its local path.") from e
        raise
    return dst


def _denoiser_classes() -> dict:
    import importlib

    for module in ("precond", "precond_edm2"):  # where ARCHITECTURE.md puts the Denoiser subclasses
        importlib.import_module(f"sida_diffusers.networks.{module}")
    found, todo = {}, Denoiser.__subclasses__()
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if not cls.__name__.startswith("_"):  # private bases such as a shared EDM-family parent are not models
            found[cls.__name__] = cls
    return found


def _load_diffusers_folder(folder: Path, dtype) -> Denoiser:
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"  # a SiDAPipeline folder: its denoiser lives in unet/
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is a folder without config.json; pass a Diffusers model folder "
                                "(config.json + diffusion_pytorch_model.safetensors) or an official .pkl file.")
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    classes = _denoiser_classes()
    if class_name not in classes:
        raise ValueError(f"{folder}/config.json names class {class_name!r}, which is not a sida_diffusers denoiser; "
                         f"known classes: {sorted(classes)}. Point at the folder of a saved denoiser.")
    return classes[class_name].from_pretrained(folder, **({"dtype": dtype} if dtype is not None else {}))


def _load_official(path: Path, key: str, label: str) -> Denoiser:
    ckpt = read_official_pickle(path, key=key)
    try:
        model = denoiser_from_official(ckpt.class_name, ckpt.init_kwargs)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in ckpt.state_dict.items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    shapes = [f"{k}: {found[k]} vs {expected[k]}" for k in sorted(expected.keys() & found.keys())
              if found[k] != expected[k]]
    problems = [f"{what} {keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    if problems:
        raise ValueError(f"{label}: its weights do not fit {type(model).__name__}(**init_kwargs): "
                         f"{', '.join(problems)}. The checkpoint was written by a modified network definition; "
                         "convert it with code that matches that definition.")
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model


def _move(model: Denoiser, device, dtype) -> Denoiser:
    # torch's Module.to: diffusers 0.42's ModelMixin.to logs a spurious fp32-modules warning on every dtype cast
    # (ECOSYSTEM.md §1.1); nothing else differs.
    return torch.nn.Module.to(model, device=device, dtype=dtype) if device is not None or dtype is not None else model


def _split_hub_source(src: str):
    """'owner/repo[/path][:subfolder]' -> (repo_id, path in repo), or None if `src` cannot be a Hub reference."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    spec, _, subfolder = src.partition(":")
    parts = spec.split("/")
    if len(parts) < 2 or src.startswith((".", "/", "~")) or (len(parts) == 2 and spec.endswith(".pkl")):
        return None
    try:
        validate_repo_id("/".join(parts[:2]))
    except HFValidationError:
        return None
    return "/".join(parts[:2]), "/".join(p for p in (*parts[2:], subfolder) if p)


def load_denoiser(src, dtype: Optional[torch.dtype] = None, key: str = "ema", device=None,
                  cache_dir=None) -> Denoiser:
    """Load a denoiser in eval mode from any of the places official or converted weights live.

    `src`: a `Denoiser` (returned as is, moved to `device`/`dtype` if given), an official `.pkl` file, an http(s)
    URL of one (cached in `cache_dir`, `$SIDA_CACHE` or ~/.cache/sida_diffusers), a name in `KNOWN_CHECKPOINTS`, a
    shipped teacher ('digits', 'digits-uncond', as `--teacher`), a Diffusers model folder, or a Hub reference:
    `owner/repo`, `owner/repo:subfolder` or `owner/repo/path/file.pkl`.
    `key` names the network entry of an official pickle. Official weights are loaded key for key (strict).
    """
    if isinstance(src, Denoiser):
        return _move(src, device, dtype)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"load_denoiser expects a path, URL, checkpoint name, repo id or Denoiser, got {type(src)}")
    name = os.fspath(src)
    src = os.fspath(shipped_teacher_path(name)) if name in SHIPPED_TEACHERS else KNOWN_CHECKPOINTS.get(name, name)
    path = Path(src).expanduser()
    if src.startswith(("http://", "https://")):
        model = _load_official(cached_download(src, cache_dir), key, src)
    elif path.is_file():
        model = _load_official(path, key, src)
    elif path.is_dir():
        return _move(_load_diffusers_folder(path, dtype), device, None).eval()
    elif (hub := _split_hub_source(src)) is not None:
        repo_id, inner = hub
        try:
            if inner.endswith(".pkl"):
                local = Path(hf_hub_download(repo_id, filename=inner, cache_dir=cache_dir))
            else:
                patterns = [f"{inner}/*"] if inner else None
                local = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir)) / inner
        except Exception as e:  # network, auth, missing repo/file: all end the same way for the caller
            shown = repr(src) if name == src else f"{name!r} ({src})"
            raise OSError(f"could not fetch {shown} from the Hugging Face Hub ({type(e).__name__}: {e}), and it is "
                          "no local file or folder either. Check the path, or the repo id, network and token.") from e
        if not local.is_file():
            return _move(_load_diffusers_folder(local, dtype), device, None).eval()
        model = _load_official(local, key, src)
    else:
        raise FileNotFoundError(
            f"{src!r} is not an existing file or folder, an http(s) URL, a known checkpoint name or a Hub repo id "
            f"('owner/repo', 'owner/repo:subfolder' or 'owner/repo/path/file.pkl'). Known names: "
            f"{', '.join(sorted([*KNOWN_CHECKPOINTS, *SHIPPED_TEACHERS]))}.")
    return _move(model, device, dtype).eval()


def convert_official(src, dst: Union[str, os.PathLike], dtype: torch.dtype = torch.float32, key: str = "ema",
                     cache_dir=None) -> Denoiser:
    """Write the denoiser of `src` (anything `load_denoiser` reads) as a Diffusers model folder `dst`; returns it."""
    model = load_denoiser(src, dtype=dtype, key=key, cache_dir=cache_dir)
    model.save_pretrained(os.fspath(dst))
    return model
