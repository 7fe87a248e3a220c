"""EDM2 latent conventions shared by the data loader, the pipelines and the trainer (ALGORITHM.md §6.1).

EDM2 works on SD-VAE latents: the VAE's own range is [0, 1] (not [-1, 1]), and the latents are normalised per channel with
scale = 0.5 / raw_std and bias = -raw_mean * scale, computed in float32 as EDM2 does.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


_RAW_MEAN = np.float32([5.81, 3.25, 0.12, -2.15])
_RAW_STD = np.float32([4.17, 4.62, 3.71, 3.28])
EDM2_LATENT_SCALE = torch.from_numpy(np.float32(0.5) / _RAW_STD)
EDM2_LATENT_BIAS = torch.from_numpy(np.float32(0) - _RAW_MEAN * (np.float32(0.5) / _RAW_STD))


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(1, -1, 1, 1)


def encode_latents(mean_std: torch.Tensor, generator: Optional[torch.Generator] = None,
                   scale=EDM2_LATENT_SCALE, bias=EDM2_LATENT_BIAS) -> torch.Tensor:
    """Sample normalised EDM2 latents from stored VAE moments ``[B,8,H,W]`` (mean then std): ``[B,4,H,W]`` float32.

    ``(mean + std * eps) * scale + bias``, a fresh ``eps`` per call (ALGORITHM.md §6.1); ``eps`` is drawn on the
    generator's device when one is given.
    """
    if mean_std.ndim != 4 or mean_std.shape[1] != 2 * len(scale):
        raise ValueError(f"encode_latents expects VAE moments [B, 8, H, W] (4 mean then 4 std channels, as in EDM2's "
                         f"img-mean-std-*.npy), got shape {list(mean_std.shape)}.")
    mean, std = mean_std.to(torch.float32).chunk(2, dim=1)
    draw_device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=draw_device).to(mean.device)
    return (mean + std * eps) * _per_channel(scale, mean) + _per_channel(bias, mean)


def decode_latents(vae, x: torch.Tensor, scale=EDM2_LATENT_SCALE, bias=EDM2_LATENT_BIAS) -> torch.Tensor:
    """Normalised latents -> images in [0, 1] through the VAE: vae.decode((x - bias) / scale), clamped (§6.1)."""
    z = ((x - _per_channel(bias, x)) / _per_channel(scale, x)).to(vae.dtype)
    return vae.decode(z).sample.to(torch.float32).clamp(0, 1)
