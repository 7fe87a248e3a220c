"""Sampling pipelines: the one-step SiDAPipeline and the teacher's EDM Heun sampler."""

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


__all__ = [
    "EDM2_LATENT_BIAS",
    "EDM2_LATENT_SCALE",
    "EDMFamilyPipeline",
    "EDMHeunPipeline",
    "EDMHeunPipelineOutput",
    "HEUN_PRESETS",
    "SiDAPipeline",
    "edm_sampler",
    "heun_nfe",
    "image_grid",
    "karras_sigmas",
    "np_to_uint8",
    "seed_generators",
    "seed_noise",
    "uint8_to_pil",
]
