"""The process layout and numerics of a run: the Accelerator, the shared run seed, CUDA math settings.

Multi-GPU and multi-node are Accelerate's job; this module only makes sure that what the launcher started is what
Accelerate sees, so that two processes never run as two independent trainings writing one output folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list

from sida_diffusers.training.config import ACCELERATE_FSDP_ENV, TrainConfig


def launcher_world_size() -> int:
    """Processes the launcher started (torchrun / accelerate launch set WORLD_SIZE), 1 without a launcher."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def requested_processes(parent_args: Optional[list] = None) -> int:
    """The process count `accelerate launch` was asked for when it is this process's parent (1 otherwise; `parent_args`:
    its command line, read from /proc by default): its simple launcher, which `--cpu`, and a CPU machine without
    `--multi_gpu`, use, starts the script once whatever that count."""
    args = parent_args
    if args is None:
        try:
            args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return 1
    accelerate = ("launch" in args and any(Path(a).name == "accelerate" for a in args[:2])
                  or "accelerate.commands.launch" in args[:3])  # `accelerate launch` or `python -m` its module
    if not accelerate:
        return 1
    count = 1
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name.replace("-", "_") in ("__num_processes", "__num_machines"):
            value = value or (args[i + 1] if i + 1 < len(args) else "1")
            count = max(count, int(value) if value.isdigit() else 1)
    return count


@contextlib.contextmanager
def _without_accelerate_fsdp():
    """Accelerate's FSDP plugin off while the Accelerator is built: `--fsdp` shards with FSDP2 itself (the plugin would
    wrap the models, and refuses CPUs); `config.resolve_fsdp` already read the launch's FSDP options."""
    value = os.environ.pop(ACCELERATE_FSDP_ENV, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[ACCELERATE_FSDP_ENV] = value


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator; several launched processes on a machine without a GPU use the CPU process group (gloo),
    as `--cpu` does. Raises before anything is written if Accelerate still sees another number of processes."""
    output_dir = Path(cfg.output_dir)
    world = launcher_world_size()
    asked = requested_processes()
    if world == 1 and asked > 1:
        raise ValueError(f"`accelerate launch` was asked for {asked} processes but started one (its simple launcher, "
                         "which --cpu and machines without a GPU use); launch `accelerate launch --multi_gpu "
                         f"--num_processes {asked} ...` (CPU machines too: they join one gloo run) or `torchrun "
                         f"--nproc_per_node {asked} examples/train_sida.py`.")
    cpu = cfg.cpu or (world > 1 and not torch.cuda.is_available())
    with _without_accelerate_fsdp():
        accelerator = Accelerator(
            cpu=cpu, mixed_precision="no",  # precision is handled by the networks themselves (ALGORITHM.md §1.4)
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                logging_dir=str(output_dir / cfg.logging_dir)),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)])
    if accelerator.num_processes != world:
        raise ValueError(f"the launcher started {world} processes but Accelerate runs {accelerator.num_processes}; "
                         "they would train independently into one output folder. Launch CPU runs with `torchrun "
                         "--nproc_per_node N examples/train_sida.py --cpu`, GPU runs with `accelerate launch`.")
    return accelerator


def run_seed(seed: Optional[int], num_processes: int) -> int:
    """The run seed: `seed`, or a random one drawn on the main process and shared with every process."""
    value = [seed if seed is not None else random.randrange(1 << 31)]
    if num_processes > 1:
        broadcast_object_list(value, from_process=0)
    return int(value[0])


def set_device_numerics(device: torch.device, allow_tf32: bool, num_threads: Optional[int] = None) -> None:
    """CUDA: TF32 only when asked (IEEE fp32 otherwise, as the official runs), cuDNN autotuning on (§1.4); the CPU
    thread count when one is given."""
    if num_threads is not None:  # checked >= 1 by TrainConfig
        torch.set_num_threads(num_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
        torch.backends.cudnn.benchmark = True


def effective_precision(cfg: TrainConfig, device: torch.device, say=print) -> TrainConfig:
    """The config with the precision that will really run. fp16 is the networks' own float16 path, which runs on CUDA
    only (ALGORITHM.md §1.4): elsewhere the run trains in float32, says so once with `say`, and records "no" (in
    config.json, the checkpoints and the run record), not the fp16 that was asked for."""
    if cfg.mixed_precision != "fp16" or device.type == "cuda":
        return cfg
    say(f"--mixed_precision fp16 runs the networks in float16 on CUDA only; on {device.type} this run trains in "
        "float32 and records mixed_precision 'no' (bf16 autocast does run on CPUs).")
    return dataclasses.replace(cfg, mixed_precision="no")
