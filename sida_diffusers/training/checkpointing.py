"""Checkpoint folders: atomic writes, pruning, exact resume, and a training state that is never unpickled.

A checkpoint is ``OUTPUT_DIR/checkpoints/checkpoint-{cur_nimg:09d}/`` holding the three networks as Diffusers model
folders plus the training state (optimizers, EMA bookkeeping, RNG states and data position of every rank, best
metric, config). That state is written as ``training_state.json`` (the structure, plain JSON) and
``training_state.safetensors`` (every tensor and array it references), so resuming a run parses JSON and safetensors
only: a checkpoint folder from elsewhere cannot run code, and what it may allocate is bounded by its file sizes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sida_diffusers.safe_io.files import read_json
from sida_diffusers.safe_io.paths import check_folder_files, open_regular
from sida_diffusers.training.state_checks import (
    RunLimits,
    check_finite_tensors,
    check_state_numbers,
    optimizer_state_for,
)


CHECKPOINT_PREFIX = "checkpoint-"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
LEGACY_STATE = "training_state.pt"
MAX_STATE_JSON_BYTES = 64 << 20  # the structure of a training state is kilobytes; anything near this is not one
MAX_STATE_DEPTH = 32             # nesting of the JSON structure we write is at most 6
MAX_STATE_TENSORS = 100_000      # 3 Adam tensors per parameter tensor of two networks, plus RNG states per rank
MAX_HEADER_BYTES = 16 << 20      # a safetensors header lists ~100 bytes per tensor


def check_tensor_header(path: Path, max_tensors: int) -> None:
    """Refuse a safetensors file whose header lists more than `max_tensors` entries or is larger than such a header,
    read from its first bytes before safetensors parses it (a million zero-size entries take seconds and gigabytes
    to load although the file is small)."""
    with open_regular(path) as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ValueError(f"{path} has a safetensors header of {size:,} bytes (at most {MAX_HEADER_BYTES:,}); the "
                             "checkpoint is damaged or was not written by sida_diffusers.")
        header = f.read(size)
    listed = header.count(b'"data_offsets"')  # one per tensor: counted before the header is parsed
    if listed <= max_tensors:
        entries = read_json(header, f"{path} (header)", max_bytes=MAX_HEADER_BYTES, max_nodes=16 * max_tensors)
        listed = len(entries) - ("__metadata__" in entries) if isinstance(entries, dict) else 0
    if listed > max_tensors:
        raise ValueError(f"{path} lists {listed:,} tensors, more than the {max_tensors:,} a training state holds; the "
                         "checkpoint is damaged or forged.")


# ---- folders ----------------------------------------------------------------------------------------------------------

def is_checkpoint(folder) -> bool:
    """A finished checkpoint folder (``checkpoint-N`` with its training state; never a ``.tmp-*`` one)."""
    folder = Path(folder)
    return (folder.name.startswith(CHECKPOINT_PREFIX) and folder.name[len(CHECKPOINT_PREFIX):].isdigit()
            and (folder / STATE_JSON).is_file())


def list_checkpoints(output_dir) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders of an interrupted save are ignored)."""
    found = [p for p in (Path(output_dir) / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*") if is_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(folder) -> Optional[Path]:
    """The one "newest checkpoint" finder: `folder` itself when it is a checkpoint, else the newest checkpoint of the
    run folder `folder`; None when there is none."""
    if is_checkpoint(folder):
        return Path(folder)
    found = list_checkpoints(folder)
    return found[-1] if found else None


def resolve_checkpoint(spec: str, output_dir) -> Optional[Path]:
    """`--resume_from_checkpoint`: 'latest' (None when the run has none yet), a checkpoint name as Diffusers users
    pass it ('checkpoint-000000192' or 'checkpoint-192', looked up in OUTPUT_DIR/checkpoints), or a folder."""
    if spec == "latest":
        return latest_checkpoint(output_dir) if list_checkpoints(output_dir) else None
    path = Path(spec)
    number = spec[len(CHECKPOINT_PREFIX):] if spec.startswith(CHECKPOINT_PREFIX) else ""
    if not path.exists() and path.name == spec and number.isdigit():
        path = checkpoint_path(output_dir, int(number))
    if (path / LEGACY_STATE).is_file() and not (path / STATE_JSON).is_file():
        raise ValueError(f"{path} holds a pickled {LEGACY_STATE} from an earlier sida_diffusers, which is never "
                         "unpickled; start a new run from its networks instead (e.g. --generator_init "
                         f"{path / 'generator_ema'} for SiD²A).")
    if not (path / STATE_JSON).is_file():
        names = ", ".join(p.name for p in list_checkpoints(output_dir)[-3:]) or "none yet"
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no {STATE_JSON}); pass 'latest', a checkpoint "
                                f"name of {Path(output_dir) / 'checkpoints'} ({names}) or a checkpoint folder.")
    return path


# ---- the output folder: one run per folder --------------------------------------------------------------------------

# What a run that took a step leaves in --output_dir, and would mix with a new run's (logging_dir is added by the
# caller). config.json (written before step 1) and summary.json (which may hold a teacher baseline put there to be
# reused, benchmarks/digits_table.py) alone do not make a folder used; --overwrite_output_dir deletes them too.
RUN_MARKERS = ("checkpoints", "samples", "pipeline", "best_pipeline", "stats.jsonl", "metrics.jsonl")
RUN_OUTPUTS = (*RUN_MARKERS, "config.json", "summary.json", "loss_curves.png", "metric_curve.png")


def run_outputs(output_dir, logging_dir: str = "logs", names=RUN_OUTPUTS) -> list[Path]:
    """The files and folders of `names` an earlier run left in `output_dir` (a logging_dir outside it is not its
    own)."""
    inside = not Path(logging_dir).is_absolute() and ".." not in Path(logging_dir).parts
    names = (*names, logging_dir) if inside else names
    return [p for p in (Path(output_dir) / name for name in names) if p.exists() or p.is_symlink()]


def check_output_dir(output_dir, resume: Optional[str], overwrite: bool, logging_dir: str = "logs") -> None:
    """A new run never mixes with an earlier one: a used `output_dir` needs --resume_from_checkpoint (continue it) or
    --overwrite_output_dir (start over, deleting what the earlier run wrote). Raises before anything is written."""
    if resume and overwrite:
        raise ValueError("--resume_from_checkpoint continues the run in --output_dir and --overwrite_output_dir "
                         "deletes it; pass one of them.")
    used = run_outputs(output_dir, logging_dir, RUN_MARKERS)
    if not used or overwrite:
        return
    if not resume:
        raise ValueError(f"--output_dir {output_dir} already holds a run ({', '.join(p.name for p in used[:4])}); "
                         "continue it with --resume_from_checkpoint latest, start over in it with "
                         "--overwrite_output_dir (deletes that run's files), or pass another --output_dir.")
    if resume == "latest" and not list_checkpoints(output_dir):
        raise ValueError(f"--output_dir {output_dir} holds a run without checkpoints, so there is nothing to resume; "
                         "start over in it with --overwrite_output_dir, or pass another --output_dir.")


def clear_output_dir(output_dir, logging_dir: str = "logs") -> None:
    """--overwrite_output_dir: delete what an earlier run wrote into `output_dir` (other files are left alone)."""
    for path in run_outputs(output_dir, logging_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def checkpoint_path(output_dir, cur_nimg: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{cur_nimg:09d}"


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary sibling folder, then move it to `final` in one rename: an interrupted save leaves
    the previous checkpoints as they were and at worst a ``.tmp-*`` folder that nothing reads."""
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune_checkpoints(output_dir, limit: Optional[int]) -> None:
    """Keep the newest `limit` checkpoints (all when None)."""
    if limit is None:
        return
    for old in list_checkpoints(output_dir)[:-limit] if limit > 0 else list_checkpoints(output_dir):
        shutil.rmtree(old)


# ---- RNG ------------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG the training step draws from (torch CPU and CUDA, numpy, Python)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- the training state as JSON + safetensors --------------------------------------------------------------------------

def _pack(obj, tensors: dict, path: str):
    """JSON-able form of `obj`; tensors and arrays go to `tensors` under their path and are referenced by it."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        # stored as int64/float64 (safetensors has no uint32, which numpy's RNG state uses), restored to `dtype`
        wide = np.int64 if np.issubdtype(obj.dtype, np.integer) else np.float64
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj, dtype=wide))
        return {"__ndarray__": path, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        items = [[k, _pack(v, tensors, f"{path}/{k}")] for k, v in obj.items()]
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return dict(items)
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"training state key at {path} must be str or int, got {[type(k) for k in obj]}")
        return {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        packed = [_pack(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": packed} if isinstance(obj, tuple) else packed
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state value at {path} of type {type(obj).__name__} cannot be stored")


def _unpack(obj, tensors: dict, where: str, depth: int = 0):
    if depth > MAX_STATE_DEPTH:
        raise ValueError(f"{where}: the training state is nested deeper than {MAX_STATE_DEPTH} levels; it was not "
                         "written by sida_diffusers.")
    if isinstance(obj, list):
        return [_unpack(v, tensors, where, depth + 1) for v in obj]
    if not isinstance(obj, dict):
        return obj
    for tag in ("__tensor__", "__ndarray__"):
        if tag in obj:
            key = obj[tag]
            if not isinstance(key, str) or key not in tensors:
                raise ValueError(f"{where}: the state refers to tensor {key!r}, which {STATE_TENSORS} does not hold.")
            if tag == "__tensor__":
                return tensors[key]
            try:
                dtype = np.dtype(str(obj.get("dtype"))[:16])
            except TypeError as error:
                raise ValueError(f"{where}: unknown array dtype {str(obj.get('dtype'))[:40]!r} ({error}).") from None
            # numbers only, never wider than the int64/float64 they are stored as: a dtype such as 'V20000000'
            # would turn each stored element into 20 MB
            if dtype.kind not in "biuf" or dtype.itemsize > 8:
                raise ValueError(f"{where}: array {key!r} has dtype {dtype}; the training state holds numeric arrays "
                                 "only.")
            return tensors[key].numpy().astype(dtype)
    if "__tuple__" in obj:
        return tuple(_unpack(obj["__tuple__"], tensors, where, depth + 1))
    if "__dict__" in obj:
        items = obj["__dict__"]
        if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 and isinstance(i[0], (str, int))
                                                  and not isinstance(i[0], bool) for i in items):
            raise ValueError(f"{where}: malformed mapping in the training state (keys are strings or integers).")
        return {k: _unpack(v, tensors, where, depth + 1) for k, v in items}
    return {k: _unpack(v, tensors, where, depth + 1) for k, v in obj.items()}


def save_state(folder: Path, state: dict) -> None:
    """Write `state` (nested dicts, lists, tuples, numbers, strings, tensors, numpy arrays) into `folder`."""
    tensors: dict = {}
    skeleton = _pack(state, tensors, "state")
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(skeleton))


def load_state(folder: Path) -> dict:
    """Read what `save_state` wrote, parsing JSON and safetensors only; a damaged or foreign state raises ValueError
    naming the file."""
    folder = Path(folder)
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the checkpoint {folder} is incomplete, resume from another one.")
    check_folder_files(folder, (STATE_JSON, STATE_TENSORS))  # regular files, no links out of the checkpoint
    skeleton = read_json(json_path, max_bytes=MAX_STATE_JSON_BYTES)  # refuses oversized, over-counted, over-nested
    check_tensor_header(tensor_path, MAX_STATE_TENSORS)
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{tensor_path} is not a valid safetensors file ({error}); the checkpoint is damaged, "
                         "resume from another one.") from None
    state = _unpack(skeleton, tensors, str(json_path))
    if not isinstance(state, dict):
        raise ValueError(f"{json_path} does not hold a training state (a JSON object).")
    return state


# ---- resume -----------------------------------------------------------------------------------------------------------

def read_model_weights(folder: Path) -> dict:
    """The tensors of a Diffusers model folder written by `save_pretrained` (one safetensors file, or shards listed
    in its index), read without building anything from the folder's config."""
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    try:
        if single.is_file():
            check_folder_files(folder, [single.name], folder.parent)  # inside the checkpoint, no links out
            return load_file(str(single))
        if index.is_file():
            check_folder_files(folder, [index.name], folder.parent)
            shards = sorted(set(read_json(index)["weight_map"].values()))
            if any(Path(name).name != name for name in shards):
                raise ValueError(f"{index} names shards outside its folder")
            check_folder_files(folder, shards, folder.parent)
            return {k: v for name in shards for k, v in load_file(str(folder / name)).items()}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{folder}: unreadable network weights ({error}); the checkpoint is damaged, resume from "
                         "another one.") from None
    raise FileNotFoundError(f"{folder} holds no diffusion_pytorch_model.safetensors; the checkpoint is incomplete.")


def _check_shapes(where: str, expected: dict, found: dict) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [k for k in set(expected) & set(found) if tuple(found[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        detail = "; ".join(f"{label}: {names[:5]}" for label, names in
                           (("missing", missing), ("unexpected", extra), ("wrong shape", sorted(wrong))) if names)
        raise ValueError(f"{where} does not fit this run's networks ({detail}); resume with the same teacher and "
                         "settings that wrote it, or start a new run.")


def save_checkpoint(output_dir, cur_nimg: int, networks: dict, state: dict, run_info: dict,
                    limit: Optional[int]) -> Path:
    """Write ``checkpoint-{cur_nimg:09d}`` atomically: each network as a Diffusers folder, the training state, the
    run_info; then keep the newest `limit` checkpoints."""
    def write(folder: Path) -> None:
        for name, net in networks.items():
            net.save_pretrained(folder / name, safe_serialization=True)
        save_state(folder, state)
        (folder / "run_info.json").write_text(json.dumps(run_info, indent=2, default=str))

    final = write_atomically(checkpoint_path(output_dir, cur_nimg), write)
    prune_checkpoints(output_dir, limit)
    return final


def load_checkpoint(path: Path, networks: dict, optimizers: dict, ema, limits: RunLimits) -> dict:
    """Load checkpoint `path` into this run's networks, optimizers and EMA; returns the training state (cur_nimg,
    seed, per-rank RNG and data positions, best metric).

    Everything is checked before anything is loaded (`state_checks`): every number against `limits`, every network
    and Adam tensor for its shape and for NaN or infinity, the optimizers' settings against the run's, their state
    mapped onto the parameters by name. A poisoned or foreign checkpoint raises ValueError and leaves the run as it
    was.
    """
    state = load_state(path)
    where = str(path / STATE_JSON)
    for key in ("cur_nimg", "seed", "num_processes", "rng", "data", "best", "ema", *optimizers):
        if key not in state:
            raise ValueError(f"{where} lacks {key!r}; it was not written by this version of sida_diffusers, or is "
                             "damaged.")
    check_state_numbers(state, where, limits)
    weights = {}
    for name, net in networks.items():
        weights[name] = read_model_weights(path / name)
        _check_shapes(str(path / name), net.state_dict(), weights[name])
        check_finite_tensors(weights[name], str(path / name))
    max_step = state["cur_nimg"]  # Adam steps at most once per iteration, and an iteration counts >= 1 image
    mapped = {name: optimizer_state_for(optimizer, state[name], where, name, limits, max_step)
              for name, optimizer in optimizers.items()}
    for name, net in networks.items():
        net.load_state_dict(weights[name])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(mapped[name])
    ema.load_state_dict(state["ema"])
    return state
