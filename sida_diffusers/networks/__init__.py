"""Raw UNets and preconditioned denoisers (EDM and EDM2 families)."""

from sida_diffusers.networks.base import RETURN_FLAGS, Denoiser

__all__ = ["Denoiser", "RETURN_FLAGS"]
