"""The baseline of a Diffusers UNet2DModel teacher: its own scheduler's sampling loop (ALGORITHM.md §12.5).

`SchedulerSamplerPipeline` runs the loop of Diffusers' `DDPMPipeline` / `DDIMPipeline` (set_timesteps, then per step
scale_model_input, the UNet, scheduler.step) with any of Diffusers' VP schedulers, built from the teacher's
scheduler configuration (`scheduler_for`): DDIM-50 is the usual "teacher" figure of a DDPM checkpoint. It shares the
label, per-seed noise and uint8 conventions of the other pipelines (`EDMFamilyPipeline`), so `generate_uint8` gives
the teacher's images on exactly the seeds and labels of the one-step student.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
from diffusers import UNet2DModel

from sida_diffusers.networks.unet2d import SCHEDULER_CLASSES, UNet2DDenoiser
from sida_diffusers.pipelines.edm_sampler import EDMHeunPipelineOutput
from sida_diffusers.pipelines.pipeline_sida import EDMFamilyPipeline, GeneratorLike, LabelsLike


def scheduler_for(teacher: UNet2DDenoiser, name: Optional[str] = None):
    """Diffusers scheduler `name` (e.g. "DDIMScheduler"; default: the teacher's own class) over the teacher's noise
    schedule, with the rest of its scheduler configuration (clipping, timestep spacing) as the teacher's folder has it."""
    import diffusers

    config = dict(teacher.config.scheduler_config)
    name = name or config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown teacher scheduler {name!r}; use one of Diffusers' VP schedulers: "
                         f"{', '.join(SCHEDULER_CLASSES)}.")
    return getattr(diffusers, name).from_config(config)


class SchedulerSamplerPipeline(EDMFamilyPipeline):
    r"""A UNet2DModel teacher sampled by a Diffusers scheduler, as `DDPMPipeline` / `DDIMPipeline` sample it.

    Components: `unet` (a `UNet2DModel`, or the `UNet2DDenoiser` over one) and `scheduler` (any of Diffusers' VP
    schedulers; default the teacher's own). Noise, labels and outputs behave as in `SiDAPipeline`; images are
    converted to uint8 with EDM's rule, like every figure of the package. Returns `(images, nfe)`.
    """

    def __init__(self, unet: Union[UNet2DDenoiser, UNet2DModel], scheduler=None, id2label: Optional[dict] = None,
                 vae=None, latent_scale: Optional[list] = None, latent_bias: Optional[list] = None):
        super().__init__()
        if vae is not None or latent_scale is not None:
            raise ValueError("latent DDPM teachers are not supported; SchedulerSamplerPipeline samples pixels.")
        if isinstance(unet, UNet2DDenoiser) and scheduler is None:
            scheduler = scheduler_for(unet)
        self._register_common(unet, vae, id2label, latent_scale, latent_bias, scheduler)
        if not isinstance(self.denoiser, UNet2DDenoiser):
            raise ValueError(f"{type(self).__name__} samples Diffusers UNet2DModel teachers with their scheduler; for "
                             f"a {type(self.denoiser).__name__} use EDMHeunPipeline.")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: LabelsLike = None,
        generator: GeneratorLike = None,
        latents: Optional[torch.Tensor] = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        label_pool: Optional[Sequence[int]] = None,
    ):
        r"""Sample `batch_size` images in `num_inference_steps` scheduler steps.

        `eta` is DDIM's (0: deterministic), passed to schedulers whose `step` takes it; `generator` reaches the
        stochastic ones (DDPM, ancestral), one per image for per-seed images. Other arguments as
        `SiDAPipeline.__call__`. Returns `EDMHeunPipelineOutput(images, nfe)` (or a tuple with `return_dict=False`).
        """
        generator = self.check_common_inputs(batch_size, output_type, generator)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        device = self._execution_device
        x = self.prepare_noise(batch_size, generator, latents, device)
        labels = self.prepare_class_labels(class_labels, batch_size, generator, device, label_pool)

        # 1. the scheduler's timesteps and initial noise scale
        scheduler, denoiser = self.scheduler, self.denoiser
        scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * scheduler.init_noise_sigma
        accepted = inspect.signature(scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
        # 2. one network evaluation per scheduler step, at the scheduler's (possibly fractional) timestep
        nfe = 0
        for t in self.progress_bar(scheduler.timesteps):
            model_input = scheduler.scale_model_input(x, t)
            output = denoiser.unet_forward(model_input.to(denoiser.unet.dtype), torch.as_tensor(t, device=device),
                                           labels).to(torch.float32)
            x = scheduler.step(output, t, x, **step_kwargs).prev_sample
            nfe += 1

        images = self.postprocess(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, nfe)
        return EDMHeunPipelineOutput(images=images, nfe=nfe)
