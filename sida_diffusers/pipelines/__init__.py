"""Sampling pipelines: the one-step SiDAPipeline, the teacher's EDM Heun sampler and, for Diffusers UNet2DModel
teachers, their own Diffusers scheduler (SchedulerSamplerPipeline)."""

from sida_diffusers.latents import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE
from sida_diffusers.pipelines.edm_sampler import (
    HEUN_PRESETS,
    EDMHeunPipeline,
    EDMHeunPipelineOutput,
    edm_sampler,
    heun_nfe,
    karras_sigmas,
)
from sida_diffusers.pipelines.pipeline_sida import (
    EDMFamilyPipeline,
    SiDAPipeline,
    image_grid,
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
    "HEUN_PRESETS",
    "SchedulerSamplerPipeline",
    "SiDAPipeline",
    "edm_sampler",
    "heun_nfe",
    "image_grid",
    "karras_sigmas",
    "np_to_uint8",
    "scheduler_for",
    "seed_generators",
    "seed_noise",
    "uint8_to_pil",
]
