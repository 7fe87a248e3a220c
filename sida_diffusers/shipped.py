"""The weights shipped inside the package (`assets/`) and the short names that load them.

This module is the lowest layer on purpose: `load_denoiser("digits")` (checkpoints), `--teacher digits` (trainer) and
`sida_diffusers.digits` all resolve a shipped name through it, and none of them has to import the layer above it.
"""

from __future__ import annotations

from pathlib import Path


ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# name -> asset folder of the tiny digits teachers: EDM (reproduced by examples/train_teacher.py) and a Diffusers
# DDPMPipeline folder (examples/train_ddpm_teacher.py)
SHIPPED_TEACHERS = {"digits": "digits_teacher_cond", "digits-uncond": "digits_teacher_uncond",
                    "digits-ddpm": "digits_ddpm"}


def shipped_teacher_path(name: str) -> Path:
    """Diffusers folder of the shipped teacher called `name` ('digits', 'digits-uncond' or 'digits-ddpm')."""
    if name not in SHIPPED_TEACHERS:
        raise ValueError(f"{name!r} is not a shipped teacher; shipped: {', '.join(SHIPPED_TEACHERS)}.")
    path = ASSETS_DIR / SHIPPED_TEACHERS[name]
    if not ((path / "config.json").is_file() or (path / "model_index.json").is_file()):
        raise FileNotFoundError(f"shipped weights {path} are missing; reinstall sida_diffusers (the assets are package "
                                "data) or recreate them with `python examples/train_teacher.py`.")
    return path
