"""EDM2 preconditioned denoiser with the optional logvar head (ALGORITHM.md §1.3, §1.4).

`EDM2Precond` is official `training.networks_edm2.Precond` (and SiDA's `EDM_2_Precond_EncoderDecoder`) as a
Diffusers model; `logvar_channels=0` gives SiDA's `EDM_2_Precond_Generator` (no `logvar_*` keys). The UNet
options are flat keyword arguments, exactly the names of the official `init_kwargs`, so `config.json` reads like
an official configuration and `from_official_kwargs` is a plain pass-through.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (Diffusers' loader looks the base class up here)

from sida_diffusers.networks.base import Denoiser, autocast_off, edm_preconditioning, plain_config
from sida_diffusers.networks.edm2 import MPConv, MPFourier, UNet, normalize_mpconv_weights_


class EDM2Precond(Denoiser):
    """EDM2 denoiser D(x; sigma, c) = c_skip x + c_out F(c_in x, log(sigma)/4, c), plus u(sigma) (Equation 21).

    Call contract: see `sida_diffusers.networks.base.Denoiser`. `use_fp16` runs the UNet in float16 on CUDA only.
    """

    family = "edm2"
    distillable = True

    backbone_name = "unet"
    _no_split_modules = ["Block"]

    @register_to_config
    def __init__(
        self,
        img_resolution: int,                          # Image (latent) resolution.
        img_channels: int,                            # Image (latent) channels.
        label_dim: int,                               # Class label dimensionality. 0 = unconditional.
        use_fp16: bool = True,                        # Run the UNet in float16 on CUDA?
        sigma_data: float = 0.5,                      # Expected standard deviation of the training data.
        logvar_channels: Optional[int] = 128,         # Fourier channels of the logvar head. 0 / None = no head.
        model_channels: int = 192,                    # UNet options, as in edm2.UNet and official init_kwargs.
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: Optional[int] = None,
        channel_mult_emb: Optional[int] = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        resample_filter: Sequence[float] = (1, 1),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: Optional[float] = 256,
    ):
        super().__init__()
        if logvar_channels is not None and logvar_channels < 0:
            raise ValueError(f"logvar_channels must be >= 0 (0 or None = no logvar head), got {logvar_channels}.")
        self.unet = UNet(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            model_channels=model_channels, channel_mult=channel_mult, channel_mult_noise=channel_mult_noise,
            channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
            label_balance=label_balance, concat_balance=concat_balance, resample_filter=resample_filter,
            channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
            attn_balance=attn_balance, clip_act=clip_act,
        )
        if logvar_channels:
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @classmethod
    def from_official_kwargs(cls, init_kwargs: dict, logvar: bool = True) -> "EDM2Precond":
        """Build (randomly initialised) from an official `Precond` object's `init_kwargs`.

        `logvar=False` builds SiDA's generator variant without the logvar head. Numpy scalars and tuples are
        accepted; SiDA's training-only flags (`force_normalization`, `use_gan`) are dropped by
        `denoiser_from_official`.
        """
        kwargs = {k: plain_config(v) for k, v in dict(init_kwargs).items() if k != "class_name"}
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"unknown EDM2 Precond option(s) {unknown}; EDM2Precond accepts {sorted(known)}. Remove them, or "
                "check that the checkpoint is an EDM2 network."
            )
        missing = [k for k in ("img_resolution", "img_channels", "label_dim") if k not in kwargs]
        if missing:
            raise ValueError(f"official EDM2 init_kwargs lack {missing}; add them (the network's input shape).")
        if not logvar:
            kwargs["logvar_channels"] = 0
        return cls(**kwargs)

    @property
    def has_logvar(self) -> bool:
        return bool(self.config.logvar_channels)

    def preconditioning(self, sigma: torch.Tensor):
        """EDM coefficients in the official operation order; c_noise = log(sigma)/4, flattened to [N]."""
        return edm_preconditioning(sigma, self.config.sigma_data)

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """The uncertainty u(sigma) of EDM2's loss, [N,1,1,1] (ALGORITHM.md §1.3)."""
        if not self.has_logvar:
            return super().logvar(c_noise)
        with autocast_off(c_noise.device.type):  # a loss weight e^-u: keep it exact in fp32
            return self.logvar_linear(self.logvar_fourier(c_noise.to(torch.float32))).reshape(-1, 1, 1, 1)

    def run_backbone(self, x_in, c_noise, class_labels, augment_labels, return_flag):
        # EDM2 has no augmentation conditioning (augment_dim is 0, so the base passes None).
        return self.unet(x_in, c_noise, class_labels, return_flag=return_flag)

    def normalize_weights_(self) -> "EDM2Precond":
        """Forced weight normalisation of every MPConv, in place under no_grad (Equation 66).

        The official MPConv does this inside every training-mode forward; here forward never writes weights, so
        the trainer calls this once per network per phase, before its first forward (ALGORITHM.md §1.3, §10 item 13).
        """
        return normalize_mpconv_weights_(self)
