"""EDM-family preconditioned denoisers: EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond (ALGORITHM.md §1.2).

Each wraps a raw UNet from `edm.py` as `self.model` (official state-dict prefix `model.`) and supplies
c_skip, c_out, c_in, c_noise with the operation order of NVlabs/edm `training/networks.py`; input checks, the
`return_flag` dispatch and dtype handling live in `base.Denoiser`. The configuration is flat precond options plus a
nested `model_kwargs` dict of UNet keywords, so `save_pretrained`/`from_pretrained` round-trip through config.json.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (Diffusers' loader looks the base class up here)

from sida_diffusers.networks.base import Denoiser, edm_preconditioning, plain_config
from sida_diffusers.networks.edm import build_unet


class _EDMFamilyPrecond(Denoiser):
    """Shared construction for the preconditioners that wrap a SongUNet/DhariwalUNet as `model`."""

    backbone_name = "model"
    #: raw UNet output channels per image channel (iDDPM also predicts a variance)
    _out_channel_factor = 1

    def _build_model(self, img_resolution, img_channels, label_dim, model_type, model_kwargs):
        self.model = build_unet(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                out_channels=img_channels * self._out_channel_factor, label_dim=label_dim,
                                **plain_config(model_kwargs or {}))

    @classmethod
    def from_official_kwargs(cls, init_kwargs: dict):
        """Build the model from an official object's flat `init_kwargs` (precond options plus UNet keywords)."""
        kwargs = plain_config(dict(init_kwargs))
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "model_kwargs"}
        missing = {"img_resolution", "img_channels"} - set(kwargs)
        if missing:
            raise ValueError(f"{cls.__name__} init_kwargs lack {sorted(missing)}; official init_kwargs always hold "
                             "img_resolution and img_channels.")
        if kwargs.get("sigma_max") == math.inf:
            kwargs["sigma_max"] = None  # config.json cannot hold inf
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in own}, model_kwargs=kwargs)

    @property
    def sigma_min(self) -> float:
        """Smallest supported noise level (from the config; VP and iDDPM derive theirs from their schedules)."""
        return float(self.config.sigma_min)

    @property
    def sigma_max(self) -> float:
        """Largest supported noise level; a config value of None (EDM's default) means infinity."""
        return math.inf if self.config.sigma_max is None else float(self.config.sigma_max)

    def round_sigma(self, sigma):
        """Noise levels the network supports, as the official `round_sigma` (identity except for iDDPM)."""
        return torch.as_tensor(sigma)


class EDMPrecond(_EDMFamilyPrecond):
    """EDM preconditioning (Karras et al. 2022): c_noise = ln(sigma)/4, unit-variance c_in/c_out."""

    distillable = True

    @register_to_config
    def __init__(
        self,
        img_resolution: int,                # Image resolution.
        img_channels: int,                  # Number of color channels.
        label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,             # Run the UNet in float16 on CUDA.
        sigma_min: float = 0.0,             # Minimum supported noise level.
        sigma_max: Optional[float] = None,  # Maximum supported noise level; None = infinity.
        sigma_data: float = 0.5,            # Expected standard deviation of the training data.
        model_type: str = "DhariwalUNet",   # Raw UNet class: "SongUNet" or "DhariwalUNet".
        model_kwargs: Optional[dict] = None,  # Keywords of the raw UNet.
    ):
        super().__init__()
        self._build_model(img_resolution, img_channels, label_dim, model_type, model_kwargs)

    def preconditioning(self, sigma):
        return edm_preconditioning(sigma, self.config.sigma_data)


class VPPrecond(_EDMFamilyPrecond):
    """Variance-preserving preconditioning (Song et al. 2021): c_noise = (M-1) t(sigma)."""

    @register_to_config
    def __init__(
        self,
        img_resolution: int,                # Image resolution.
        img_channels: int,                  # Number of color channels.
        label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,             # Run the UNet in float16 on CUDA.
        beta_d: float = 19.9,               # Extent of the noise level schedule.
        beta_min: float = 0.1,              # Initial slope of the noise level schedule.
        M: int = 1000,                      # Original number of timesteps in the DDPM formulation.
        epsilon_t: float = 1e-5,            # Minimum t-value used during training.
        model_type: str = "SongUNet",       # Raw UNet class: "SongUNet" or "DhariwalUNet".
        model_kwargs: Optional[dict] = None,  # Keywords of the raw UNet.
    ):
        super().__init__()
        self._build_model(img_resolution, img_channels, label_dim, model_type, model_kwargs)

    def sigma(self, t):
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.config.beta_d * (t ** 2) + self.config.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """t(sigma), the inverse of `sigma(t)`."""
        beta_d, beta_min = self.config.beta_d, self.config.beta_min
        sigma = torch.as_tensor(sigma)
        return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.config.epsilon_t))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1))

    def preconditioning(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.config.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise.flatten()


class VEPrecond(_EDMFamilyPrecond):
    """Variance-exploding preconditioning (Song et al. 2021): c_noise = ln(sigma/2), c_out = sigma."""

    @register_to_config
    def __init__(
        self,
        img_resolution: int,                # Image resolution.
        img_channels: int,                  # Number of color channels.
        label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,             # Run the UNet in float16 on CUDA.
        sigma_min: float = 0.02,            # Minimum supported noise level.
        sigma_max: float = 100.0,           # Maximum supported noise level.
        model_type: str = "SongUNet",       # Raw UNet class: "SongUNet" or "DhariwalUNet".
        model_kwargs: Optional[dict] = None,  # Keywords of the raw UNet.
    ):
        super().__init__()
        self._build_model(img_resolution, img_channels, label_dim, model_type, model_kwargs)

    def preconditioning(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise.flatten()


class iDDPMPrecond(_EDMFamilyPrecond):
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021): c_noise = M-1-j*, sigma snapped to the table `u`.

    The UNet predicts 2*img_channels (mean and variance); only the first img_channels are used.
    """

    _out_channel_factor = 2

    @register_to_config
    def __init__(
        self,
        img_resolution: int,                # Image resolution.
        img_channels: int,                  # Number of color channels.
        label_dim: int = 0,                 # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,             # Run the UNet in float16 on CUDA.
        C_1: float = 0.001,                 # Timestep adjustment at low noise levels.
        C_2: float = 0.008,                 # Timestep adjustment at high noise levels.
        M: int = 1000,                      # Original number of timesteps in the DDPM formulation.
        model_type: str = "DhariwalUNet",   # Raw UNet class: "SongUNet" or "DhariwalUNet".
        model_kwargs: Optional[dict] = None,  # Keywords of the raw UNet.
    ):
        super().__init__()
        self._build_model(img_resolution, img_channels, label_dim, model_type, model_kwargs)
        # u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1), u_M = 0, in float32 as official.
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1) if not u.is_meta else ():  # on meta (shape checks before loading) nothing to compute
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer("u", u)

    def alpha_bar(self, j):
        """Cosine schedule alpha_bar(j) = sin^2(pi/2 * j / M / (C_2 + 1))."""
        j = torch.as_tensor(j, dtype=torch.float32)
        return (0.5 * math.pi * j / self.config.M / (self.config.C_2 + 1)).sin() ** 2

    @property
    def sigma_min(self) -> float:
        return float(self.u[self.config.M - 1])

    @property
    def sigma_max(self) -> float:
        return float(self.u[0])

    def round_sigma(self, sigma, return_index: bool = False):
        """Snap sigma to the nearest entry of `u` (or return that entry's index)."""
        sigma = torch.as_tensor(sigma)
        u = self.u.to(torch.float32)  # the table may have been loaded in half precision
        index = torch.cdist(sigma.to(u.device).to(torch.float32).reshape(1, -1, 1), u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

    def preconditioning(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.config.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise.flatten()

    def select_output(self, f_x):
        return f_x[:, : self.img_channels]
