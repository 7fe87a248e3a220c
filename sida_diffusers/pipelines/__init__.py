"""Sampling pipelines: the one-step SiDAPipeline, the teacher's EDM Heun sampler, for Diffusers UNet2DModel teachers
their own Diffusers scheduler (SchedulerSamplerPipeline), and sample grids."""

from sida_diffusers.latents import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE
from sida_diffusers.pipelines.edm_sampler import (
    HEUN_PRESETS,
    EDMHeunPipeline,
    EDMHeunPipelineOutput,
    edm_sampler,
    heun_nfe,
    karras_sigmas,
)
from sida_diffusers.pipelines.grids import GRID_MIN_WIDTH, grid_image, image_grid, sample_grid, upscale_nearest
from sida_diffusers.pipelines.pipeline_sida import (
    EDMFamilyPipeline,
    SiDAPipeline,
    np_to_uint8,
    seed_generators,
    seed_noise,
    uint8_to_pil,
)
from sida_diffusers.pipelines.scheduler_sampler import SchedulerSamplerPipeline, scheduler_for


__all__ = [
    "EDM2_LATENT_BIAS",
    "EDM2_LATENT_SCALE",
    "EDMFamilyPipeline",
    "EDMHeunPipeline",
    "EDMHeunPipelineOutput",
    "GRID_MIN_WIDTH",
    "HEUN_PRESETS",
    "SchedulerSamplerPipeline",
    "SiDAPipeline",
    "edm_sampler",
    "grid_image",
    "heun_nfe",
    "image_grid",
    "karras_sigmas",
    "np_to_uint8",
    "sample_grid",
    "scheduler_for",
    "seed_generators",
    "seed_noise",
    "uint8_to_pil",
    "upscale_nearest",
]
