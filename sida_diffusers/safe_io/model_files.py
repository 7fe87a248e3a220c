"""Networks described by files: built on the meta device within what the file holds, compared, only then allocated.

A `config.json` (Diffusers folders) or `init_kwargs` (official pickles) decides how big a network is, and a few bytes
of either can describe billions of parameters while the file holds kilobytes of weights. So a network named by a
file is first built on the `meta` device (no memory) under a budget taken from the weights the file really holds:
construction stops as soon as it registers more tensors or more elements than that. Every parameter and buffer shape
is then compared with the file's, and only then is memory allocated. Safetensors headers give the shapes without
reading the data.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch.nn.modules import module as torch_module

from sida_diffusers.safe_io.files import read_json
from sida_diffusers.safe_io.paths import folder_root, inside_folder


__all__ = ["build_within", "check_shapes", "safetensors_shapes", "check_model_folder", "read_model_config"]

MAX_CONFIG_BYTES = 1 << 20  # a config.json of ours is ~1 kB


class _OverBudget(Exception):
    """Raised from a registration hook to stop a constructor that outgrows the file."""


class _Budget:
    """Counts the tensors and elements a constructor registers; over `max_tensors` or `max_elements` it stops it."""

    def __init__(self, max_tensors: int, max_elements: int):
        self.max_tensors, self.max_elements = max_tensors, max_elements
        self.sizes = {}  # (module id, name) -> numel: a re-registered name replaces its tensor
        self.elements, self.modules = 0, 0

    def tensor(self, module, name, tensor):
        if tensor is not None:
            self.elements += tensor.numel() - self.sizes.get((id(module), name), 0)
            self.sizes[(id(module), name)] = tensor.numel()
            if len(self.sizes) > self.max_tensors or self.elements > self.max_elements:
                raise _OverBudget(f"at least {len(self.sizes):,} tensors of {self.elements:,} elements")

    def module(self, module, name, submodule):
        # Submodules without tensors (activations, containers) are at most a few per tensor in every network.
        self.modules += 1
        if self.modules > 4 * self.max_tensors + 64:
            raise _OverBudget(f"at least {self.modules:,} submodules")

    @contextlib.contextmanager
    def watching(self):
        handles = [torch_module.register_module_parameter_registration_hook(self.tensor),
                   torch_module.register_module_buffer_registration_hook(self.tensor),
                   torch_module.register_module_module_registration_hook(self.module)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def build_within(factory: Callable[[], torch.nn.Module], shapes: dict, label: str) -> torch.nn.Module:
    """`factory()` run on the meta device, stopped once it registers more tensors or elements than `shapes` has."""
    budget = _Budget(len(shapes), sum(math.prod(int(n) for n in shape) for shape in shapes.values()))
    try:
        with budget.watching(), torch.device("meta"):
            return factory()
    except _OverBudget as e:
        held = f"{len(shapes):,} tensors of {budget.max_elements:,} elements"
        raise ValueError(f"{label}: its configuration describes a network of {e}, but the file holds only {held}; "
                         "the configuration does not belong to these weights.") from None
    except Exception as e:  # whatever a constructor raises on a configuration from a file: it does not build
        message = str(e) if len(str(e)) < 400 else f"{str(e)[:300]} ... {str(e)[-80:]}"  # it may quote the file
        if not isinstance(e, ValueError):
            message = f"the configuration does not build the network ({type(e).__name__}: {message})"
        raise ValueError(f"{label}: {message}") from e


def check_shapes(model: torch.nn.Module, shapes: dict, label: str, hint: str) -> None:
    """Every parameter and persistent buffer of `model` must be in `shapes` with the same shape, and nothing more."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v) for k, v in shapes.items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    mismatched = [f"{k}: {found[k]} vs {expected[k]}" for k in sorted(expected.keys() & found.keys())
                  if found[k] != expected[k]]
    problems = [f"{what} {keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    if problems:
        raise ValueError(f"{label}: its weights do not fit {type(model).__name__}({hint}): {', '.join(problems)}. "
                         "The weights were written by a different network definition or configuration.")


# ---- Diffusers model folders -----------------------------------------------------------------------------------------

_WEIGHTS = "diffusion_pytorch_model"
# The files of a Diffusers model folder that are ever read (as Hub download patterns): nothing else is fetched.
MODEL_FOLDER_FILES = ("config.json", f"{_WEIGHTS}*.safetensors", f"{_WEIGHTS}*.safetensors.index.json")


def _weight_files(folder: Path, variant: Optional[str], root: Path) -> list:
    stem = f"{_WEIGHTS}.{variant}" if variant else _WEIGHTS
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        inside_folder(index, root)
        weight_map = read_json(index, max_bytes=MAX_CONFIG_BYTES * 64)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and "\\" not in v
                                                       for v in weight_map.values()):
            raise ValueError(f"{index} has no valid weight_map of shard file names (in this folder).")
        return [folder / name for name in sorted(set(weight_map.values()))]
    pickled = sorted(p.name for p in folder.glob(f"{_WEIGHTS}*.bin"))
    raise FileNotFoundError(
        f"{folder} has no {single.name}" + (f" (only {pickled}: pickled weights, which sida_diffusers never loads; "
                                            "convert them to safetensors)" if pickled else "")
        + "; pass a folder written by save_pretrained.")


def safetensors_shapes(files: list) -> dict:
    """Tensor name -> shape from safetensors headers; safetensors checks each header against its file's size."""
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({e}); download or save it again.") from e
    return shapes


# Keys of a config.json that make Diffusers do more than build the class (quantization needs a GPU backend and
# loads other code paths); no folder of ours has them.
REFUSED_CONFIG_KEYS = ("quantization_config",)


def read_model_config(folder: Path, cls_name: Optional[str] = None, root: Optional[Path] = None) -> dict:
    """`folder/config.json` as a dict: a regular file inside `root` (links out of the folder refused), bounded in
    bytes, values and nesting, naming `cls_name` if given, without keys that would switch Diffusers to other loaders."""
    path = Path(folder) / "config.json"
    if not (path.is_file() or path.is_symlink()):
        raise FileNotFoundError(f"{folder} has no config.json; pass a Diffusers model folder (config.json + "
                                f"{_WEIGHTS}.safetensors).")
    inside_folder(path, folder_root(folder) if root is None else root)
    config = read_json(path, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a model configuration (an object).")
    if cls_name is not None and config.get("_class_name", cls_name) != cls_name:
        raise ValueError(f"{path} describes a class {str(config.get('_class_name'))[:80]!r}, not a {cls_name}.")
    refused = [key for key in REFUSED_CONFIG_KEYS if key in config]
    if refused:
        raise ValueError(f"{path} sets {refused[0]!r}, which sida_diffusers never writes and does not load "
                         f"(quantized weights); remove the key or use the unquantized folder.")
    return config


def check_model_folder(cls, folder: Path, variant: Optional[str] = None, root: Optional[Path] = None) -> None:
    """Check that `cls.from_config(folder/config.json)` fits the folder's weights, building it on meta only.

    Raises FileNotFoundError when config.json or safetensors weights are missing, ValueError when the config does
    not build or describes another network than the weights hold, or when a file is a link out of `root` (default:
    the folder, or the repository folder of a Hugging Face cache snapshot).
    """
    folder = Path(folder)
    root = folder_root(folder) if root is None else root
    label = f"{folder}/config.json"
    config = read_model_config(folder, cls.__name__, root)
    files = _weight_files(folder, variant, root)
    for file in files:
        inside_folder(file, root)
    shapes = safetensors_shapes(files)
    model = build_within(lambda: cls.from_config(config), shapes, label)
    check_shapes(model, shapes, label, "**config.json")
