"""The denoiser behind a pipeline's `unet` (and `scheduler`) components (ALGORITHM.md §12).

A pipeline's `unet` is a `Denoiser` of this package, or, for a Diffusers UNet2DModel network, the plain `UNet2DModel`
with the Diffusers scheduler that carries its noise schedule as `scheduler` (as in Diffusers' DDPM pipelines, so a
saved folder holds a UNet2DModel folder Diffusers reads alone). `DenoiserView.denoiser` is the EDM view every sampler
uses either way: the `Denoiser` itself, or the `UNet2DDenoiser` over that very UNet.
"""

from __future__ import annotations

from diffusers import UNet2DModel

from sida_diffusers.networks import Denoiser, UNet2DDenoiser


def split_components(unet, scheduler=None) -> tuple:
    """``(denoiser, unet component, scheduler component)`` of what a pipeline was given as `unet` and `scheduler`:
    a Denoiser (no scheduler), a UNet2DDenoiser (saved as its UNet2DModel and scheduler) or a UNet2DModel with its
    scheduler."""
    if isinstance(unet, UNet2DModel):
        if scheduler is None:
            raise ValueError("a UNet2DModel unet needs the scheduler that carries its noise schedule; pass "
                             "scheduler=DDPMScheduler.from_pretrained(...) (or the teacher's own).")
        return UNet2DDenoiser.over(unet, scheduler), unet, scheduler
    if not isinstance(unet, Denoiser):
        raise ValueError(f"unet must be a sida_diffusers Denoiser (e.g. EDMPrecond, EDM2Precond) or a Diffusers "
                         f"UNet2DModel with its scheduler, got {type(unet).__name__}; load weights with "
                         "sida_diffusers.load_denoiser(...).")
    if isinstance(unet, UNet2DDenoiser):
        return unet, unet.unet, scheduler if scheduler is not None else unet.make_scheduler()
    if scheduler is not None:
        raise ValueError(f"a scheduler goes with a Diffusers UNet2DModel; a {type(unet).__name__} has none.")
    return unet, unet, None


class DenoiserView:
    """`denoiser` for a pipeline with `unet` and `scheduler` components; `_remember_denoiser` keeps the one given
    (e.g. the trainer's EMA generator) for as long as the components are the ones it was built from."""

    def _remember_denoiser(self, denoiser, scheduler) -> None:
        self.__dict__.update(_denoiser=denoiser, _scheduler_of=scheduler)

    @property
    def denoiser(self) -> Denoiser:
        """The `Denoiser` the pipeline samples with: `unet` itself, or the `UNet2DDenoiser` over a UNet2DModel `unet`
        and the noise schedule of `scheduler` (rebuilt when either was replaced)."""
        denoiser, unet = self.__dict__.get("_denoiser"), self.unet
        if isinstance(unet, Denoiser):
            return unet
        if denoiser is None or denoiser.unet is not unet or self.scheduler is not self.__dict__.get("_scheduler_of"):
            denoiser = UNet2DDenoiser.over(unet, self.scheduler)
            self._remember_denoiser(denoiser, self.scheduler)
        return denoiser

    def use_denoiser(self, denoiser) -> None:
        """Sample with `denoiser` from now on (the trainer's EMA generator, or under --fsdp its gathered copy): a
        `Denoiser` becomes `unet`; a `UNet2DDenoiser` gives its UNet2DModel (the schedule stays `scheduler`'s, so a
        saved folder is still a plain UNet2DModel); None while a process holds no copy."""
        if isinstance(denoiser, UNet2DDenoiser):
            self.unet = denoiser.unet
            self._remember_denoiser(denoiser, self.scheduler)
        else:
            self.unet = denoiser
