"""The trainable networks derived from the teacher: the fake score and the generator (ALGORITHM.md §2), as the trainer
sets them up (`models.setup_networks`) and the memory plan measures them (`memory_plan`), before either is placed on a
device.
"""

from __future__ import annotations

import copy
from typing import Optional

from sida_diffusers.networks.base import Denoiser
from sida_diffusers.training.config import TrainConfig


def derive_network(source: Denoiser, dropout: Optional[float] = None, logvar: Optional[bool] = None) -> Denoiser:
    """A trainable copy of `source` (ALGORITHM.md §2): same class, config and weights, optionally with another dropout
    and, for EDM2, with or without the logvar head (missing head weights keep their initialisation)."""
    own_config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    config = dict(own_config)
    if dropout is not None:
        if "model_kwargs" in config:  # EDM family: the UNet keywords hold the dropout
            config["model_kwargs"] = {**(config["model_kwargs"] or {}), "dropout": dropout}
        elif "unet_config" in config:  # a Diffusers UNet2DModel (ALGORITHM.md §12)
            config["unet_config"] = {**config["unet_config"], "dropout": dropout}
        else:
            config["dropout"] = dropout
    if logvar is not None and "logvar_channels" in config:
        config["logvar_channels"] = (config["logvar_channels"] or 128) if logvar else 0
    if config == own_config:
        return copy.deepcopy(source).train().requires_grad_(True)
    net = type(source).from_config(config)
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in source.state_dict().items() if k in own}, strict=False)
    return net.train().requires_grad_(True)


def student_networks(cfg: TrainConfig, teacher: Denoiser, init: Optional[Denoiser]) -> tuple[Denoiser, Denoiser]:
    """``(fake_score, generator)``: the fake score always starts from the teacher, the generator from the teacher or
    SiD²A's SiD generator (ALGORITHM.md §2, §10 item 14); EDM2 generators have no logvar head (§1.3)."""
    is_edm2 = teacher.family == "edm2"
    fake = derive_network(teacher, cfg.dropout, logvar=cfg.use_logvar if is_edm2 else None)
    gen = derive_network(init if init is not None else teacher, cfg.dropout, logvar=False if is_edm2 else None)
    for net in (fake, gen, teacher):
        net.register_to_config(use_fp16=cfg.mixed_precision == "fp16")
    return fake, gen
