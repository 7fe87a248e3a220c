"""What a training state read from a checkpoint must be before a run continues from it.

A checkpoint folder may come from anywhere (a shared drive, a colleague, a damaged disk). `checkpointing.load_state`
reads it as JSON + safetensors within bounds; here every value is checked against what this run could have written:
numbers finite and within the run's own magnitudes, RNG states of the right types and sizes, optimizer settings equal
to the run's configuration, optimizer state mapped to the parameters by *name* (torch maps it by position) and of
their shapes, every tensor finite. A state that fails a check is refused with a ValueError naming the file and the
entry, before anything is loaded into the run or written.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Optional

import numpy as np
import torch


MAX_PROCESSES = 1 << 16
MAX_NIMG = 10 ** 12  # a thousand times the longest official run, in images
MAX_SEED = 1 << 63
# Adam settings the run's own flags decide at every step or that only choose a kernel (not the update rule): the
# learning rate is set from --lr / --glr / --lr_scheduler before every step, and foreach / fused / capturable are
# picked for the device, so a CPU checkpoint resumes on a GPU. The checkpoint's values are range-checked, then the
# run's are kept.
RUN_OWNED = ("lr", "foreach", "fused", "capturable")
# Settings of the update rule itself: a checkpoint that differs from the run is refused, unless the user asks for the
# checkpoint's values with --resume_optimizer_settings_from_checkpoint.
COMPARED = ("betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay")
# Never right for this trainer, whatever the flag: it minimises its losses, and it never differentiates through Adam.
FORBIDDEN = {"maximize": True, "differentiable": True}
SLOTS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclasses.dataclass(frozen=True)
class RunLimits:
    """The magnitudes of this run a resumed state is checked against."""

    final_nimg: int                         # the last cur_nimg of the run (whole iterations to --max_train_kimg)
    total_batch_size: int                   # images per iteration
    optimizer_settings_from_checkpoint: bool = False  # --resume_optimizer_settings_from_checkpoint


def _fail(where: str, entry: str, problem: str):
    raise ValueError(f"{where}: {entry} {problem}; the checkpoint is damaged or was not written by this run. Resume "
                     "from another checkpoint, or start a new run.")


def check_int(value, where: str, entry: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(where, entry, f"is {str(value)[:40]}, not an integer")
    if not low <= value <= high:
        _fail(where, entry, f"is {str(value)[:40]}, outside {low}..{high}")
    return value


def check_float(value, where: str, entry: str, low: float, high: float, allow_none: bool = False) -> Optional[float]:
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high:
        _fail(where, entry, f"is {str(value)[:40]}, not a finite number in [{low:g}, {high:g}]")
    return float(value)


def _check_dict(value, where: str, entry: str, keys) -> dict:
    if not isinstance(value, dict) or set(value) != set(keys):
        found = sorted(map(str, value))[:8] if isinstance(value, dict) else type(value).__name__
        _fail(where, entry, f"holds {found}, not the entries {sorted(keys)}")
    return value


def check_finite_tensors(tensors: dict, where: str) -> None:
    """Every floating tensor of `tensors` is finite (no NaN or infinity would ever train on)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            _fail(where, name, f"holds {bad:,} NaN or infinite values")


# ---- the numbers, RNG states and data positions ------------------------------------------------------------------

def check_rng(rng, where: str, entry: str) -> None:
    """One rank's RNG states as `checkpointing.rng_state` writes them, of the sizes this torch/numpy/Python use."""
    _check_dict(rng, where, entry, ("torch", "cuda", "numpy", "python"))
    own = torch.get_rng_state()
    value = rng["torch"]
    if not torch.is_tensor(value) or value.dtype != torch.uint8 or value.shape != own.shape:
        _fail(where, f"{entry}.torch", f"is not torch's RNG state (uint8 [{own.numel()}])")
    cuda = rng["cuda"]
    cuda_size = torch.cuda.get_rng_state().numel() if torch.cuda.is_available() else None
    if not isinstance(cuda, list) or len(cuda) > 1024 or not all(
            torch.is_tensor(t) and t.dtype == torch.uint8 and t.ndim == 1 and t.numel() == (cuda_size or t.numel())
            and t.numel() <= 1 << 16 for t in cuda):
        _fail(where, f"{entry}.cuda", "is not a list of CUDA RNG states")
    numpy = rng["numpy"]
    own_numpy = np.random.get_state()
    if not (isinstance(numpy, (tuple, list)) and len(numpy) == 5 and numpy[0] == own_numpy[0]
            and isinstance(numpy[1], np.ndarray) and numpy[1].dtype == np.uint32 and numpy[1].shape == own_numpy[1].shape):
        _fail(where, f"{entry}.numpy", f"is not numpy's {own_numpy[0]} state")
    check_int(numpy[2], where, f"{entry}.numpy position", 0, len(own_numpy[1]))
    check_int(numpy[3], where, f"{entry}.numpy has_gauss", 0, 1)
    check_float(numpy[4], where, f"{entry}.numpy cached_gaussian", -1e3, 1e3)
    python = rng["python"]
    version, internal, _ = random.getstate()
    if not (isinstance(python, (tuple, list)) and len(python) == 3 and python[0] == version
            and isinstance(python[1], (tuple, list)) and len(python[1]) == len(internal)):
        _fail(where, f"{entry}.python", f"is not Python's random state (version {version}, {len(internal)} numbers)")
    for i, word in enumerate(python[1]):
        check_int(word, where, f"{entry}.python[{i}]", 0, (1 << 32) - 1)
    check_int(python[1][-1], where, f"{entry}.python position", 0, len(internal) - 1)
    check_float(python[2], where, f"{entry}.python gauss_next", -1e3, 1e3, allow_none=True)


def check_state_numbers(state: dict, where: str, limits: RunLimits) -> None:
    """cur_nimg, seed, process count, per-rank RNG and data positions, EMA bookkeeping and the best metric."""
    cur = state["cur_nimg"]
    if isinstance(cur, int) and not isinstance(cur, bool) and limits.final_nimg < cur <= MAX_NIMG:
        raise ValueError(f"{where}: the checkpoint is at cur_nimg={str(cur)[:40]}, past this run's end at "
                         f"{limits.final_nimg:,} images; pass --max_train_kimg {cur / 1000:g} or more to continue it.")
    check_int(cur, where, "cur_nimg", 0, limits.final_nimg)
    check_int(state["seed"], where, "seed", 0, MAX_SEED - 1)
    processes = check_int(state["num_processes"], where, "num_processes", 1, MAX_PROCESSES)
    for key in ("rng", "data"):
        if not isinstance(state[key], list) or len(state[key]) != processes:
            _fail(where, key, f"does not hold one entry per process ({processes})")
    for rank, rng in enumerate(state["rng"]):
        check_rng(rng, where, f"rng[{rank}]")
    for rank, data in enumerate(state["data"]):
        if data is not None:  # data-free runs have no stream
            _check_dict(data, where, f"data[{rank}]", ("position", "seed"))
            # every iteration draws total_batch_size images in each of the two phases (§5.8)
            check_int(data["position"], where, f"data[{rank}].position", 0, 2 * (cur + limits.total_batch_size))
            check_int(data["seed"], where, f"data[{rank}].seed", 0, MAX_SEED - 1)
    ema = _check_dict(state["ema"], where, "ema", ("halflife_kimg", "rampup_ratio", "num_updates"))
    check_float(ema["halflife_kimg"], where, "ema.halflife_kimg", 1e-9, 1e12)
    check_float(ema["rampup_ratio"], where, "ema.rampup_ratio", 0, 1e6, allow_none=True)
    check_int(ema["num_updates"], where, "ema.num_updates", 0, cur)
    best = state["best"]
    if best is not None:
        _check_dict(best, where, "best", ("metric", "mode", "best", "best_kimg"))
        if not isinstance(best["metric"], str) or best["mode"] not in ("min", "max"):
            _fail(where, "best", "does not name a metric and a mode (min or max)")
        check_float(best["best"], where, "best.best", -math.inf, math.inf, allow_none=True)
        check_float(best["best_kimg"], where, "best.best_kimg", 0, cur / 1000, allow_none=True)


# ---- optimizers -----------------------------------------------------------------------------------------------------

def _check_setting(key: str, value, where: str, entry: str):
    entry = f"{entry}.{key}"
    if key == "betas":
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            _fail(where, entry, "is not a pair of numbers")
        return tuple(check_float(b, where, entry, 0, 1 - 1e-12) for b in value)
    if key in ("lr", "weight_decay"):
        return check_float(value, where, entry, 0, 1e6)
    if key == "eps":
        return check_float(value, where, entry, 1e-30, 1)
    if key in ("foreach", "fused") and value is None:
        return None
    if not isinstance(value, bool):
        _fail(where, entry, f"is {str(value)[:40]!r}, not true or false")
    if FORBIDDEN.get(key) is value:
        _fail(where, entry, f"is {value}: this trainer never runs Adam that way (a sabotaged optimizer?)")
    return value


def _check_slots(slots, param: torch.Tensor, amsgrad: bool, max_step: int, where: str, entry: str) -> dict:
    expected = [s for s in SLOTS if s != "max_exp_avg_sq" or amsgrad]
    _check_dict(slots, where, entry, expected)
    step = slots["step"]
    if not torch.is_tensor(step) or step.ndim != 0 or not step.is_floating_point():
        _fail(where, f"{entry}.step", "is not a scalar float tensor (torch's Adam step)")
    value = float(step)
    if not math.isfinite(value) or not 0 <= value <= max_step or value != int(value):
        _fail(where, f"{entry}.step", f"is {value:g}, not a whole number of steps from 0 to {max_step:,}")
    for slot in expected[1:]:
        tensor = slots[slot]
        if not torch.is_tensor(tensor) or tuple(tensor.shape) != tuple(param.shape) or not tensor.is_floating_point():
            _fail(where, f"{entry}.{slot}", f"does not match its parameter's shape {list(param.shape)}; resume with the "
                  "settings that wrote it")
        check_finite_tensors({f"{entry}.{slot}": tensor}, where)
        if slot != "exp_avg" and bool((tensor < 0).any()):
            _fail(where, f"{entry}.{slot}", "holds negative values (a second moment cannot)")
    return slots


def optimizer_state_for(optimizer: torch.optim.Optimizer, saved, where: str, name: str, limits: RunLimits,
                        max_step: int) -> dict:
    """The state dict `optimizer.load_state_dict` should get: the checkpoint's Adam state mapped onto this run's
    parameters by name, every setting checked (see RUN_OWNED, COMPARED, FORBIDDEN) and every tensor checked."""
    _check_dict(saved, where, name, ("state", "param_groups"))
    groups, saved_groups, saved_state = optimizer.param_groups, saved["param_groups"], saved["state"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        _fail(where, f"{name}.param_groups", f"is not a list of {len(groups)} parameter group(s)")
    if not isinstance(saved_state, dict) or not all(isinstance(k, int) and not isinstance(k, bool)
                                                    for k in saved_state):
        _fail(where, f"{name}.state", "is not a mapping from parameter ids to Adam state")
    new_groups, new_state, used, position = [], {}, set(), 0
    for g, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        entry = f"{name}.param_groups[{g}]"
        if not isinstance(saved_group, dict) or not set(saved_group) <= set(group) or "params" not in saved_group:
            extra = sorted(set(saved_group) - set(group)) if isinstance(saved_group, dict) else []
            _fail(where, entry, f"is not an Adam parameter group of this torch{f' (unknown {extra[:4]})' if extra else ''}")
        names, ids = group["param_names"], saved_group["params"]
        # torch numbers the parameters 0, 1, 2, ... across its groups and writes them in that order; ids in any
        # other order would make torch give one parameter another's Adam moments (it maps them by position)
        if ids != list(range(position, position + len(names))):
            _fail(where, f"{entry}.params", f"are not the ids {position}..{position + len(names) - 1} in order (torch "
                  "writes no other), so the Adam state would land on other parameters")
        used.update(ids)
        saved_names = saved_group.get("param_names", names)  # written before names were saved: positions only
        if not isinstance(saved_names, list) or len(set(map(str, saved_names))) != len(saved_names) \
                or sorted(map(str, saved_names)) != sorted(names):
            _fail(where, f"{entry}.param_names", "are not the names of this run's parameters")
        source = dict(zip(saved_names, ids))  # the state of each parameter, found by its name
        settings = {}
        for key, own in group.items():
            if key in ("params", "param_names"):
                continue
            value = _check_setting(key, saved_group.get(key, own), where, entry)
            if key in RUN_OWNED or key not in saved_group:
                settings[key] = own
            elif value != own and not limits.optimizer_settings_from_checkpoint:
                raise ValueError(f"{where}: {entry}.{key} is {value} in the checkpoint but {own} in this run; resume "
                                 "with the settings that wrote it, or pass --resume_optimizer_settings_from_checkpoint "
                                 "to continue with the checkpoint's.")
            else:
                settings[key] = value
        params = group["params"]
        for i, (param_name, param) in enumerate(zip(names, params)):
            sid = source[param_name]
            if sid in saved_state:
                new_state[position + i] = _check_slots(saved_state[sid], param, settings.get("amsgrad", False),
                                                       max_step, where, f"{name}.state[{param_name}]")
        new_groups.append({**settings, "params": list(range(position, position + len(params))), "param_names": names})
        position += len(params)
    unknown = sorted(set(saved_state) - used)
    if unknown:
        _fail(where, f"{name}.state", f"holds state for parameter ids {unknown[:5]} that no group lists")
    return {"state": new_state, "param_groups": new_groups}
