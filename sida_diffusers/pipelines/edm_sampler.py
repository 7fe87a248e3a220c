"""The teacher baseline: EDM's Heun sampler (Karras et al. 2022, Algorithm 2) as a function and as a pipeline.

`edm_sampler` is the plain function (evaluation and benchmarks call it with any `Denoiser`); `EDMHeunPipeline` wraps
it with the label, noise and output conventions of `SiDAPipeline` (shared through `EDMFamilyPipeline`), so that
"student vs teacher" is the same call with a different pipeline class. Named presets hold EDM's published settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import UNet2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from sida_diffusers.networks import Denoiser
from sida_diffusers.pipelines.pipeline_sida import EDMFamilyPipeline, GeneratorLike, LabelsLike
from sida_diffusers.schedule import RHO, SIGMA_MAX, SIGMA_MIN, karras_interpolate


# Algorithm 2 defaults (EDM generate.py; the same values are EDM2's sampler defaults).
HEUN_DEFAULTS = dict(num_steps=18, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO,
                     S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0)
# Published sampler settings per benchmark; NFE = 2 * num_steps - 1.
HEUN_PRESETS = {
    "cifar10": dict(num_steps=18),      # 35 NFE, deterministic
    "ffhq": dict(num_steps=40),         # 79 NFE, deterministic
    "afhq": dict(num_steps=40),         # 79 NFE, deterministic
    "imagenet64": dict(num_steps=256, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003),  # 511 NFE, stochastic
    "edm2": dict(num_steps=32),         # 63 NFE, deterministic (EDM2 generate_images.py defaults)
}


def heun_nfe(num_steps: int, guided: bool = False) -> int:
    """Network evaluations of the Heun sampler: 2N - 1 (no correction on the last step), doubled with a guide net."""
    return (2 * num_steps - 1) * (2 if guided else 1)


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                  round_sigma: Callable = torch.as_tensor) -> torch.Tensor:
    """Noise levels t_0 > ... > t_{N-1} of EDM Eq. 5 in float64, followed by t_N = 0."""
    if num_steps < 2:
        raise ValueError(f"the Heun sampler needs num_steps >= 2, got {num_steps}; the one-step model is SiDAPipeline.")
    i = torch.arange(num_steps, dtype=torch.float64)
    t = karras_interpolate(i / (num_steps - 1), sigma_min, sigma_max, rho)
    return torch.cat([torch.as_tensor(round_sigma(t), dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def edm_sampler(
    net: Denoiser,
    latents: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
    num_steps: int = 18,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    generator: GeneratorLike = None,
    guide: Optional[Denoiser] = None,
    guidance: float = 1.0,
    progress: Callable = iter,
) -> torch.Tensor:
    """EDM's deterministic/stochastic Heun sampler (Algorithm 2); returns x_0 in float64.

    `latents` is unit Gaussian noise (scaled by t_0 here); `class_labels` one-hot `[N, label_dim]` or None. With
    `S_churn > 0`, churn noise is drawn at every step from `generator` (a generator or one per image), in float64
    like EDM, so per-seed results match EDM's generate script. `guide` + `guidance` (EDM2 CFG/autoguidance):
    D = guide(x) + guidance * (net(x) - guide(x)). `progress` wraps the step iterable (e.g. a tqdm bar).
    """
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(net, "sigma_max", math.inf)))
    round_sigma = getattr(net, "round_sigma", torch.as_tensor)
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, round_sigma).to(latents.device)
    guide_labels = class_labels if guide is not None and guide.is_conditional else None

    def denoise(x, t):
        d = net(x, t, class_labels).to(torch.float64)
        if guide is None:
            return d
        ref = guide(x, t, guide_labels).to(torch.float64)
        return ref + guidance * (d - ref)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i in progress(range(num_steps)):
        t_cur, t_next, x_cur = t_steps[i], t_steps[i + 1], x_next
        # Churn: raise the noise level to t_hat = t_cur (1 + gamma) by adding fresh noise (Algorithm 2, lines 5-6).
        t_hat, x_hat = t_cur, x_cur
        if S_churn > 0:
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
            t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur), dtype=torch.float64, device=t_cur.device)
            noise = randn_tensor(x_cur.shape, generator=generator, device=x_cur.device, dtype=torch.float64)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * noise
        # Euler step, then the 2nd-order correction except on the last step (t_next = 0).
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@dataclass
class EDMHeunPipelineOutput(BaseOutput):
    """Images plus the number of network evaluations per image that produced them."""

    images: Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]
    nfe: int


class EDMHeunPipeline(EDMFamilyPipeline):
    r"""The teacher baseline: an EDM/EDM2 denoiser sampled with EDM's Heun sampler.

    Components: `unet` (the teacher `Denoiser`, or a Diffusers UNet2DModel with its `scheduler`, sampled on the
    sigma ladder of that schedule: ALGORITHM.md §12.5), optional `vae` (EDM2 latents, with
    `latent_scale`/`latent_bias`) and optional `guide` (EDM2 guidance net). `preset` picks the published settings: "cifar10" (35 NFE), "ffhq" /
    "afhq" (79 NFE), "imagenet64" (511 NFE, stochastic), "edm2" (63 NFE); default "edm2" for latent models, else
    "cifar10". Labels, generators and output types behave as in `SiDAPipeline`.
    """

    model_cpu_offload_seq = "unet->guide->vae"
    _optional_components = ["vae", "guide", "scheduler"]

    def __init__(
        self,
        unet: Union[Denoiser, UNet2DModel],
        vae=None,
        guide: Optional[Denoiser] = None,
        scheduler=None,
        preset: Optional[str] = None,
        id2label: Optional[dict] = None,
        latent_scale: Optional[list] = None,
        latent_bias: Optional[list] = None,
    ):
        super().__init__()
        preset = preset or ("edm2" if latent_scale is not None else "cifar10")
        _check_preset(preset)
        self._register_common(unet, vae, id2label, latent_scale, latent_bias, scheduler)
        self.register_modules(guide=guide)
        self.register_to_config(preset=preset)

    def sampler_settings(self, preset: Optional[str] = None, **overrides) -> dict:
        """Algorithm 2 settings: defaults, then the preset, then every override that is not None."""
        preset = preset or self.config.preset
        _check_preset(preset)
        settings = {**HEUN_DEFAULTS, **HEUN_PRESETS[preset]}
        unknown = sorted(set(overrides) - set(settings))
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {unknown}; known: {sorted(settings)}.")
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return settings

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: LabelsLike = None,
        generator: GeneratorLike = None,
        latents: Optional[torch.Tensor] = None,
        num_inference_steps: Optional[int] = None,
        preset: Optional[str] = None,
        guidance: float = 1.0,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        rho: Optional[float] = None,
        S_churn: Optional[float] = None,
        S_min: Optional[float] = None,
        S_max: Optional[float] = None,
        S_noise: Optional[float] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        label_pool: Optional[Sequence[int]] = None,
    ):
        r"""Sample `batch_size` images with the Heun sampler.

        `num_inference_steps` (N, NFE = 2N-1) and the Algorithm 2 settings override the `preset`'s values when given.
        `guidance` != 1 needs the `guide` component. Other arguments as `SiDAPipeline.__call__`. Returns
        `EDMHeunPipelineOutput(images, nfe)` (or `(images, nfe)` with `return_dict=False`).
        """
        generator = self.check_common_inputs(batch_size, output_type, generator)
        if guidance != 1 and self.guide is None:
            raise ValueError(f"guidance={guidance} needs a guide network; pass guide=... to the pipeline or use 1.0.")
        settings = self.sampler_settings(preset, num_steps=num_inference_steps, sigma_min=sigma_min,
                                         sigma_max=sigma_max, rho=rho, S_churn=S_churn, S_min=S_min, S_max=S_max,
                                         S_noise=S_noise)
        device = self._execution_device
        eps = self.prepare_noise(batch_size, generator, latents, device)
        labels = self.prepare_class_labels(class_labels, batch_size, generator, device, label_pool)
        guide = self.guide if guidance != 1 else None
        x = edm_sampler(self.denoiser, eps, labels, generator=generator, guide=guide, guidance=guidance,
                        progress=self.progress_bar, **settings)

        images = self.postprocess(x, output_type)
        nfe = heun_nfe(settings["num_steps"], guided=guide is not None)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, nfe)
        return EDMHeunPipelineOutput(images=images, nfe=nfe)


def _check_preset(preset: str):
    if preset not in HEUN_PRESETS:
        raise ValueError(f"unknown Heun sampler preset {preset!r}; use one of {sorted(HEUN_PRESETS)}.")
