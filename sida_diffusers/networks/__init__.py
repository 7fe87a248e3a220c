"""Raw UNets and preconditioned denoisers (EDM and EDM2 families, and Diffusers UNet2DModel VP teachers)."""

from sida_diffusers.networks.base import RETURN_FLAGS, Denoiser, edm_preconditioning, one_hot
from sida_diffusers.networks.edm import DhariwalUNet, SongUNet
from sida_diffusers.networks.edm2 import normalize_mpconv_weights_
from sida_diffusers.networks.edm_layers import UNetBlock
from sida_diffusers.networks.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from sida_diffusers.networks.precond_edm2 import EDM2Precond
from sida_diffusers.networks.unet2d import UNet2DDenoiser


__all__ = [
    "Denoiser", "DhariwalUNet", "EDM2Precond", "EDMPrecond", "RETURN_FLAGS", "SongUNet", "UNet2DDenoiser", "UNetBlock", "VEPrecond",
    "VPPrecond", "denoiser_classes", "denoiser_from_official", "edm_preconditioning", "iDDPMPrecond", "normalize_mpconv_weights_",
    "one_hot",
]

# Official class names -> (our class path, extra arguments). SiDA's encoder/decoder wrappers are the same networks
# with the return_flag added, so they map onto our classes unchanged (ALGORITHM.md §3); SiDA's EDM2 generator is an
# EDM2 denoiser without the logvar head (§1.3).
_OFFICIAL_CLASSES = {
    "EDMPrecond": ("precond", "EDMPrecond", {}),
    "VPPrecond": ("precond", "VPPrecond", {}),
    "VEPrecond": ("precond", "VEPrecond", {}),
    "iDDPMPrecond": ("precond", "iDDPMPrecond", {}),
    "EDMPrecond_EncoderDecoder": ("precond", "EDMPrecond", {}),
    "Precond": ("precond_edm2", "EDM2Precond", {"logvar": True}),
    "EDM_2_Precond_EncoderDecoder": ("precond_edm2", "EDM2Precond", {"logvar": True}),
    "EDM_2_Precond_Generator": ("precond_edm2", "EDM2Precond", {"logvar": False}),
}
# Constructor options of the SiDA wrappers that only steer training-time weight handling.
_TRAINING_ONLY_KWARGS = ("force_normalization", "use_gan")


def denoiser_classes() -> dict:
    """Name -> class of every public denoiser of the package: what a saved model folder may name."""
    return {name: obj for name, obj in sorted(globals().items())
            if name in __all__ and isinstance(obj, type) and issubclass(obj, Denoiser) and obj is not Denoiser}


def denoiser_from_official(class_name: str, init_kwargs: dict) -> Denoiser:
    """Build (randomly initialised) the denoiser that matches an official object's class name and init_kwargs."""
    import importlib

    if class_name not in _OFFICIAL_CLASSES:
        known = ", ".join(sorted(_OFFICIAL_CLASSES))
        raise ValueError(f"unknown official network class {class_name!r}; supported classes: {known}.")
    module_name, our_name, extra = _OFFICIAL_CLASSES[class_name]
    kwargs = {k: v for k, v in dict(init_kwargs).items() if k not in _TRAINING_ONLY_KWARGS}
    if isinstance(kwargs.get("model_type"), str) and kwargs["model_type"].endswith("_EncoderDecoder"):
        kwargs["model_type"] = kwargs["model_type"][: -len("_EncoderDecoder")]
    cls = getattr(importlib.import_module(f"sida_diffusers.networks.{module_name}"), our_name)
    return cls.from_official_kwargs(kwargs, **extra)
