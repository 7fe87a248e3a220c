"""Every check of a run's input that can fail before the first training step, each with the fix in its message.

The trainer calls these in `SiDATrainer.__init__`, so a wrong flag, teacher, generator or dataset, a used output folder
or a Hub push that could not succeed stops the run before anything is written.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from sida_diffusers.hub import check_push_access
from sida_diffusers.networks.base import Denoiser
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
    for name, least in (("max_train_kimg", 1e-9), ("checkpointing_kimg", 1e-9), ("log_every_kimg", 1e-9),
                        ("warmup_kimg", 0), ("adversarial_start_kimg", 0)):
        if getattr(cfg, name) < least:
            raise ValueError(f"--{name} must be {'> 0' if least else '>= 0'} (kimg), got {getattr(cfg, name)}.")
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


def check_networks(cfg: TrainConfig, teacher: Denoiser, init: Optional[Denoiser]) -> None:
    """The teacher is EDM/EDM2-preconditioned, the options fit it, and a SiD²A init matches it."""
    if not teacher.distillable:
        raise ValueError(f"the teacher is a {type(teacher).__name__}; SiD/SiDA support only EDM- and EDM2-preconditioned teachers "
                         "(ALGORITHM.md §1.2). Use an EDMPrecond teacher (every official edm-*.pkl is one).")
    is_edm2 = teacher.family == "edm2"
    if not is_edm2 and (cfg.use_logvar or cfg.force_normalization):
        raise ValueError("--use_logvar and --force_normalization are EDM2 options; drop them for an EDM teacher.")
    if cfg.use_logvar and not teacher.has_logvar:
        raise ValueError("--use_logvar needs a teacher with a logvar head (official EDM2 Precond); drop the flag.")
    if cfg.augment_p > 0 and teacher.augment_dim != 9:
        raise ValueError(f"--augment_p {cfg.augment_p} needs a teacher conditioned on the 9-d augment label "
                         f"(augment_dim=9), this one has augment_dim={teacher.augment_dim}; pass --augment_p 0.")
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
