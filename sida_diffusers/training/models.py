"""The networks of a run: loading the teacher (and SiD²A's generator), the trainable fake score and generator derived
from them (`students`), their placement (device, memory format, activation checkpointing, DDP or FSDP), optimizers, gradient
clean-up (ALGORITHM.md §5.4) and compilation.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch

from sida_diffusers.networks.base import Denoiser
from sida_diffusers.training.config import TrainConfig
from sida_diffusers.training.ema import HalfLifeEMA
from sida_diffusers.training.memory_plan import check_fits
from sida_diffusers.training.students import student_networks


def load_network(source: str) -> Denoiser:
    """A `--teacher` / `--generator_init` source, in float32: anything `load_denoiser` reads (the shipped 'digits' /
    'digits-uncond' teachers, an official .pkl, URL or known name, a Diffusers folder, a Hub repo)."""
    from sida_diffusers.pretrained import load_denoiser

    return load_denoiser(source, dtype=torch.float32)


def setup_networks(cfg: TrainConfig, layout, teacher: Denoiser, init: Optional[Denoiser], device: torch.device):
    """The trained networks of a run on `device`: ``(fake_score, generator, generator_ema, ema, opt_fake, opt_gen)``,
    the first two as the loop calls them (DDP-wrapped or sharded by `layout`, a `sharding.NetworkLayout`), the EMA
    model a frozen copy of the generator laid out like it and `ema` its `HalfLifeEMA` (ALGORITHM.md §13.1, §13.2). The
    teacher is moved to `device` after the memory plan says the launch fits (`memory_plan.check_fits`)."""
    check_fits(cfg, teacher, device, layout.accelerator.num_processes)  # before anything is on the device
    fake, gen = student_networks(cfg, teacher.to(device), init)
    ema = copy.deepcopy(gen).eval().requires_grad_(False).to(device)
    fake, gen = fake.to(device), gen.to(device)
    if cfg.channels_last:
        for net in (fake, gen, teacher, ema):
            net.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:  # the teacher too: the generator's gradient flows through it (§13.4)
        for net in (fake, gen, teacher):
            net.enable_gradient_checkpointing()
    layout.shard((fake, gen, teacher, ema), device)
    opt_fake, opt_gen = make_optimizers(cfg, fake, gen, device)
    if cfg.compile:
        compile_networks((fake, gen, teacher), cfg.compile_backend)
    ema_update = HalfLifeEMA(gen, ema, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)
    fake, gen = layout.prepare(fake, gen)
    return fake, gen, ema, ema_update, opt_fake, opt_gen


def make_optimizers(cfg: TrainConfig, fake: Denoiser, gen: Denoiser, device: torch.device):
    """Adam with beta1 = 0 for the fake score and `g_beta1` for the generator, eps by precision (ALGORITHM.md §5.5)."""
    eps = 1e-6 if cfg.mixed_precision == "fp16" else 1e-8
    fused = cfg.adam_fused if cfg.adam_fused is not None else device.type == "cuda"
    adam = dict(eps=eps, fused=fused, foreach=not fused)
    # named parameters: the state dict then lists each parameter's name beside its id, so a resumed state is mapped
    # onto the parameters by name (training.state_checks), not by position
    return (torch.optim.Adam(fake.named_parameters(), lr=cfg.lr, betas=(0.0, 0.999), **adam),
            torch.optim.Adam(gen.named_parameters(), lr=cfg.glr, betas=(cfg.g_beta1, 0.999), **adam))


def lr_factor(scheduler: str, progress: float) -> float:
    """Multiplier of the base learning rates at `progress` = images seen / max_train_kimg images, in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if scheduler == "linear":
        return 1.0 - progress
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def set_learning_rates(cfg: TrainConfig, opt_fake, opt_gen, cur_nimg: int, max_nimg: int) -> None:
    """Both optimizers' learning rates for the iteration that starts at `cur_nimg` (`--lr_scheduler`)."""
    factor = lr_factor(cfg.lr_scheduler, cur_nimg / max(max_nimg, 1))
    for optimizer, base in ((opt_fake, cfg.lr), (opt_gen, cfg.glr)):
        for group in optimizer.param_groups:
            group["lr"] = base * factor


def compile_networks(networks, backend: str) -> None:
    """`torch.compile` each network in place, with room for every (network, phase) graph of one iteration.

    All compiled modules share `Module._call_impl`'s cache: the fake score holds 3 graphs (D step on fakes and reals,
    frozen in the G step), G 2 (no_grad sample, G step), the teacher 1. Past the limit Dynamo would silently run eager.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    for net in networks:
        net.compile(backend=backend)


def sanitize_grads(grads: list, clip: Optional[float]) -> None:
    """nan_to_num on every gradient (under --fsdp: every local shard), then optional value clipping (ALGORITHM.md
    §5.4, §13.1)."""
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    if clip is not None and grads:  # one multi-tensor kernel per bound instead of two kernels per parameter
        torch._foreach_clamp_min_(grads, -clip)
        torch._foreach_clamp_max_(grads, clip)


def augment_pipe(probability: float):
    """EDM's geometric augmentation of the real images (ALGORITHM.md §5.7), or None when `probability` is 0."""
    if probability <= 0:
        return None
    from sida_diffusers.training.augment import AugmentPipe

    return AugmentPipe(probability)
