"""Half-life EMA of the generator with ramp-up (ALGORITHM.md §5.6), as in EDM/SiD rather than diffusers' EMAModel."""

from __future__ import annotations

from typing import Optional

import torch

from sida_diffusers.training.sharding import local


class HalfLifeEMA:
    """Keeps `ema_model` an exponential moving average of `model`'s parameters (buffers keep their initial values).

    The half-life is measured in images: h = min(halflife_kimg * 1000, rampup_ratio * cur_nimg), so early in training the
    average follows the model closely; at cur_nimg = 0 the EMA copies the model (§5.6).
    """

    def __init__(self, model: torch.nn.Module, ema_model: torch.nn.Module, halflife_kimg: float,
                 rampup_ratio: Optional[float] = 0.05):
        self.model, self.ema_model = model, ema_model
        self.halflife_kimg, self.rampup_ratio = float(halflife_kimg), rampup_ratio
        self.num_updates = 0

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        """Decay of one update that consumes `batch_size` images at `cur_nimg` (before the increment)."""
        halflife_nimg = self.halflife_kimg * 1000
        if self.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, cur_nimg * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> float:
        """p_ema <- p_ema + (1 - beta)(p - p_ema) for every parameter; returns beta. Under `--fsdp` the EMA is sharded
        like the generator, so each process updates its own shards, without communication (ALGORITHM.md §13.2)."""
        beta = self.beta(cur_nimg, batch_size)
        ema = [local(p) for p in self.ema_model.parameters()]
        src = [local(p.detach()) for p in self.model.parameters()]
        torch._foreach_lerp_(ema, src, 1 - beta)
        self.num_updates += 1
        return beta

    def state_dict(self) -> dict:
        """Bookkeeping only; the EMA weights live in the EMA model (saved as `generator_ema/`)."""
        return {"halflife_kimg": self.halflife_kimg, "rampup_ratio": self.rampup_ratio, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.halflife_kimg, self.rampup_ratio = float(state["halflife_kimg"]), state["rampup_ratio"]
        self.num_updates = int(state["num_updates"])
