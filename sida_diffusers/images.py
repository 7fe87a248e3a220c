"""Exact uint8 conversion of generated images, shared by every pipeline (ALGORITHM.md §2, §6.1, §10 item 18).

EDM pixels live in [-1, 1] and become uint8 as (x*127.5 + 128).clamp(0, 255), truncated; decoded EDM2 latents live in
[0, 1] and become uint8 as clamp(0, 1)*255, truncated.
"""

from __future__ import annotations

import torch


def pixels_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> uint8 with the official rounding: x*127.5 + 128, clamp, truncate (ALGORITHM.md §10 item 18).

    Computed in float64 on the CPU, as the official generate scripts do, so truncation matches them bit for bit.
    """
    return (x.detach().cpu().to(torch.float64) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def unit_to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (decoded latents) -> uint8 by clamp(0, 1) * 255 and truncation (ALGORITHM.md §6.1)."""
    return (image.clamp(0, 1) * 255).to(torch.uint8)
