"""Every check of a run's input that can fail before the first training step, each with the fix in its message.

The trainer calls these in `SiDATrainer.__init__`, so a wrong flag, teacher, generator or dataset, a used output folder
or a Hub push that could not succeed stops the run before anything is written.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Optional

from sida_diffusers.hub import check_push_access
from sida_diffusers.networks.base import Denoiser
from sida_diffusers.safe_io.paths import check_output
from sida_diffusers.training.checkpointing import check_output_dir
from sida_diffusers.training.config import TrainConfig


_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_config(cfg: TrainConfig, generator_init=None, dataset=None) -> None:
    """What the method needs (teacher, SiD²A init, real data for the adversarial methods), lengths, trackers."""
    if cfg.teacher is None:
        raise ValueError("no teacher: pass --teacher (an official .pkl, URL, known name, Diffusers folder or Hub "
                         "repo) or a --preset that names one.")
    if cfg.method == "sid2a" and cfg.generator_init is None and generator_init is None:
        raise ValueError("--method sid2a initialises the generator from a pre-distilled SiD generator; pass "
                         "--generator_init (e.g. sid-cifar10-uncond-alpha1.2), or use --method sida.")
    if cfg.is_adversarial and cfg.train_data is None and dataset is None:
        raise ValueError(f"--method {cfg.method} trains a discriminator on real images; pass --train_data (HF "
                         "dataset, image folder or EDM/EDM2 zip), or use the data-free --method sid.")
    check_numbers(cfg)
    check_output(cfg.output_dir, folder=True, option="--output_dir")  # before anything is written there
    module = _TRACKER_PACKAGES.get(cfg.report_to)
    if module and not installed(module):
        raise ValueError(f"--report_to {cfg.report_to} needs the '{module}' package; `pip install {module}` or pass "
                         "--report_to none (stats.jsonl and the loss-curve PNG are always written).")
    check_output_dir(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir, cfg.logging_dir)
    if cfg.push_to_hub:  # hours before the push: the repo id, the token and the endpoint must work now
        check_push_access(hub_repo_id(cfg), cfg.hub_token)


def hub_repo_id(cfg: TrainConfig) -> str:
    """Where --push_to_hub uploads: --hub_model_id, else the name of --output_dir (Diffusers' default)."""
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name


MAX_KIMG = 1e9              # a thousand times the longest official run (EDM2-XXL trained for 939,524 kimg)
MAX_BATCH = 1 << 16         # images of one micro-batch; the paper's per-GPU batch is 32 or 64
MAX_TOTAL_BATCH = 1 << 24   # images of one iteration (the paper uses 2048)
_INF = math.inf
# flag -> (least, most, what); least/most inclusive unless marked open with a tuple ("open", value)
FLOAT_RANGES = {
    "alpha": (-1e3, 1e3, "SiD's alpha (1.0 or 1.2 in the paper)"),
    "tmax": (("open", 0), 1000, "the generator's largest t, in 1/1000 of the schedule"),
    "init_sigma": (("open", 0), 1e4, "the generator's input noise level"),
    "P_mean": (-20, 20, "a log-sigma"), "P_std": (("open", 0), 20, "a log-sigma spread"),
    "fake_score_loss_scale": (0, 1e12, "a loss multiplier"), "discriminator_loss_scale": (0, 1e12, "a loss multiplier"),
    "sid_loss_scale": (0, 1e12, "a loss multiplier"), "adversarial_loss_scale": (0, 1e12, "a loss multiplier"),
    "warmup_kimg": (0, MAX_KIMG, "kimg"), "adversarial_start_kimg": (0, MAX_KIMG, "kimg"),
    "augment_p": (0, 1, "a probability"), "dropout": (0, ("open", 1), "a dropout probability"),
    "lr": (0, 10, "a learning rate"), "glr": (0, 10, "a learning rate"), "g_beta1": (0, ("open", 1), "Adam's beta1"),
    "ema_halflife_kimg": (("open", 0), MAX_KIMG, "kimg"), "ema_rampup_ratio": (("open", 0), 1e6, "a ratio"),
    "max_train_kimg": (("open", 0), MAX_KIMG, "kimg"), "checkpointing_kimg": (("open", 0), _INF, "kimg"),
    "log_every_kimg": (("open", 0), _INF, "kimg"), "eval_every_kimg": (0, _INF, "kimg (0 = never)"),
}
INT_RANGES = {
    "train_batch_size": (1, MAX_BATCH), "total_batch_size": (1, MAX_TOTAL_BATCH), "checkpoints_total_limit": (1, 1 << 20),
    "sample_grid_size": (0, 64), "eval_num_samples": (1, 10_000_000), "eval_batch_size": (1, MAX_BATCH),
    "num_threads": (1, 1024), "seed": (0, (1 << 63) - 1), "resolution": (1, 4096),
}


def _bound(value, bound, lower: bool) -> bool:
    if isinstance(bound, tuple):
        return value > bound[1] if lower else value < bound[1]
    return value >= bound if lower else value <= bound


def _describe(low, high) -> str:
    left = f"> {low[1]:g}" if isinstance(low, tuple) else f">= {low:g}"
    right = "" if high == _INF else f" and < {high[1]:g}" if isinstance(high, tuple) else f" and <= {high:g}"
    return left + right


def check_numbers(cfg: TrainConfig) -> None:
    """Every number among the flags: finite and within its range (None where a flag is optional), before anything is
    built or written. A NaN would otherwise pass every comparison and end in a NaN pipeline, a huge batch in an
    allocation that fails mid-run."""
    for name, (low, high, what) in FLOAT_RANGES.items():
        value = getattr(cfg, name)
        if value is None and name in ("dropout", "ema_rampup_ratio"):
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and _bound(value, low, True) and _bound(value, high, False))
        if not ok:
            raise ValueError(f"--{name} must be a finite number {_describe(low, high)} ({what}), got {value}.")
    for name, (low, high) in INT_RANGES.items():
        value = getattr(cfg, name)
        if value is None and name in ("total_batch_size", "checkpoints_total_limit", "num_threads", "seed",
                                      "resolution"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"--{name} must be an integer from {low:,} to {high:,}, got {value}.")


def check_batch_memory(cfg: TrainConfig, img_shape: tuple, device=None) -> None:
    """One micro-batch of float32 images must take at most 1/16 of the device's memory (the networks' activations
    take many times that): a batch far beyond the machine is refused before the first allocation fails."""
    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        from sida_diffusers.data.datasets import cache_budget

        memory = 2 * cache_budget()  # physical memory
    batch_bytes = cfg.train_batch_size * math.prod(img_shape) * 4
    if batch_bytes * 16 > memory:
        raise ValueError(f"--train_batch_size {cfg.train_batch_size} makes one micro-batch of {list(img_shape)} images "
                         f"take {batch_bytes / 2**30:.1f} GiB, more than 1/16 of the {memory / 2**30:.0f} GiB of this "
                         "device; use a smaller micro-batch and --total_batch_size for the global batch.")


def batch_layout(cfg: TrainConfig, num_processes: int) -> tuple[int, int]:
    """``(total_batch_size, rounds)``: the global batch per iteration and the accumulation rounds R per process."""
    b = cfg.train_batch_size
    total = cfg.total_batch_size or b * num_processes
    if total < 1:
        raise ValueError(f"--total_batch_size must be a positive number of images, got {total}.")
    if total % (b * num_processes):
        raise ValueError(f"--total_batch_size {total} is not divisible by --train_batch_size {b} x {num_processes} "
                         f"process(es) = {b * num_processes}; use a multiple of {b * num_processes} (accumulation "
                         "rounds R = total / (B x processes) must be an integer).")
    return total, total // (b * num_processes)


def check_networks(cfg: TrainConfig, teacher: Denoiser, init: Optional[Denoiser], device=None) -> None:
    """The teacher is EDM/EDM2-preconditioned, the options fit it, a SiD²A init matches it, and one micro-batch of
    its images fits the device (`check_batch_memory`)."""
    if not teacher.distillable:
        raise ValueError(f"the teacher is a {type(teacher).__name__}; SiD/SiDA support EDM- and EDM2-preconditioned teachers "
                         "(ALGORITHM.md §1.2) and Diffusers UNet2DModel DDPM/DDIM teachers (§12). Use an EDMPrecond "
                         "teacher (every official edm-*.pkl is one) or a DDPM/DDIM pipeline folder.")
    if teacher.family == "vp-discrete":
        from sida_diffusers.networks.unet2d import SCHEDULER_CLASSES

        if cfg.teacher_scheduler not in SCHEDULER_CLASSES:
            raise ValueError(f"--teacher_scheduler {cfg.teacher_scheduler} is not one of Diffusers' VP schedulers: "
                             f"{', '.join(SCHEDULER_CLASSES)}.")
        if not 1 <= cfg.teacher_num_inference_steps <= teacher.num_train_timesteps:
            raise ValueError(f"--teacher_num_inference_steps must be in 1..{teacher.num_train_timesteps} (the "
                             f"teacher's training steps), got {cfg.teacher_num_inference_steps}.")
    is_edm2 = teacher.family == "edm2"
    if not is_edm2 and (cfg.use_logvar or cfg.force_normalization):
        raise ValueError("--use_logvar and --force_normalization are EDM2 options; drop them for an EDM teacher.")
    if cfg.use_logvar and not teacher.has_logvar:
        raise ValueError("--use_logvar needs a teacher with a logvar head (official EDM2 Precond); drop the flag.")
    if cfg.augment_p > 0 and teacher.augment_dim != 9:
        raise ValueError(f"--augment_p {cfg.augment_p} needs a teacher conditioned on the 9-d augment label "
                         f"(augment_dim=9), this one has augment_dim={teacher.augment_dim}; pass --augment_p 0.")
    check_batch_memory(cfg, (teacher.img_channels, teacher.img_resolution, teacher.img_resolution), device)
    if init is not None:
        got = (type(init).__name__, init.img_channels, init.img_resolution, init.label_dim)
        want = (type(teacher).__name__, teacher.img_channels, teacher.img_resolution, teacher.label_dim)
        if got != want:
            raise ValueError(f"--generator_init is a {got[0]} for {got[1]}x{got[2]}x{got[2]} images with "
                             f"label_dim={got[3]}, the teacher a {want[0]} for {want[1]}x{want[2]}x{want[2]} with "
                             f"label_dim={want[3]}; pass the SiD generator distilled from this teacher.")


def check_data(dataset, teacher: Denoiser) -> None:
    """Real data of the teacher's shape, kind (pixels or EDM2 latents) and classes."""
    if dataset is None:
        return
    t, is_edm2 = teacher, teacher.family == "edm2"
    if (dataset.num_channels, dataset.resolution) != (t.img_channels, t.img_resolution):
        r = dataset.resolution
        raise ValueError(f"the training data holds {dataset.num_channels}x{r}x{r} "
                         f"{'latents' if dataset.is_latent else 'images'} but the teacher expects "
                         f"{t.img_channels}x{t.img_resolution}x{t.img_resolution}; pass --resolution "
                         f"{t.img_resolution} (images), convert the data, or pick the matching teacher.")
    if dataset.is_latent != is_edm2:
        raise ValueError("EDM2 teachers need EDM2 latent data (img-mean-std-*.npy) and EDM teachers pixel data; "
                         "pass the matching --train_data.")
    if t.is_conditional and not dataset.has_labels:
        raise ValueError(f"the teacher is class-conditional (label_dim={t.label_dim}) but the training data has "
                         "no labels; pass --label_column (HF datasets) or data with dataset.json labels.")
    if not t.is_conditional and dataset.has_labels:
        raise ValueError("the teacher is unconditional but labels were requested from the data; drop "
                         "--label_column or use a class-conditional teacher.")
    if t.is_conditional and dataset.label_dim != t.label_dim:
        raise ValueError(f"the data has {dataset.label_dim} classes but the teacher label_dim={t.label_dim}; use "
                         "data with the teacher's classes (or the teacher trained on this data).")
