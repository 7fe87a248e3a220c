"""sida_diffusers: one-step distillation of EDM/EDM2 diffusion models with SiD, SiDA and SiD²A."""

import importlib


__version__ = "0.1.0"

# Public names and the module that defines each. Modules load on first use so that `import sida_diffusers`
# stays cheap; the network module is imported eagerly because Diffusers resolves pipeline components through
# `sys.modules` (see docs/ARCHITECTURE.md).
_LAZY = {
    "load_denoiser": "sida_diffusers.pretrained",
    "convert_official": "sida_diffusers.pretrained",
    "read_official_pickle": "sida_diffusers.pretrained",
    "KNOWN_NETWORKS": "sida_diffusers.pretrained",
    "SiDAPipeline": "sida_diffusers.pipelines",
    "EDMHeunPipeline": "sida_diffusers.pipelines",
    "SchedulerSamplerPipeline": "sida_diffusers.pipelines",
    "edm_sampler": "sida_diffusers.pipelines",
    "seed_generators": "sida_diffusers.pipelines",
    "RunRecord": "sida_diffusers.run_record",
    "export_pipeline": "sida_diffusers.hub",
    "push_to_hub": "sida_diffusers.hub",
    "load_digits_teacher": "sida_diffusers.digits",
    "load_digits_feature_extractor": "sida_diffusers.digits",
    "SiDATrainer": "sida_diffusers.training",
    "TrainConfig": "sida_diffusers.training",
}

from sida_diffusers.networks import *  # noqa: E402,F401,F403
from sida_diffusers.networks import __all__ as _network_names  # noqa: E402


__all__ = sorted(set(_network_names) | set(_LAZY))


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sida_diffusers' has no attribute {name!r}")
