"""Diffusers pipeline conventions that every pipeline over an EDM/EDM2 denoiser shares: the step-end callback
(`callback_on_step_end` with `callback_on_step_end_tensor_inputs`) and the VAE memory switches of latent pipelines
(`enable_vae_slicing`, `enable_vae_tiling`), as Diffusers' own pipelines name them; and the checks of the
configuration values (`id2label`, the latent constants) that Diffusers passes from a loaded model_index.json.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


MAX_LABELS = 100_000  # class names a pipeline may carry (ImageNet-21k has 21,841)


def _is_index(key) -> bool:
    return (isinstance(key, int) and not isinstance(key, bool)) or (isinstance(key, str) and key.isdigit()
                                                                      and len(key) < 7)


def check_id2label(id2label) -> Optional[dict]:
    """`id2label` as ``{int: str}``; JSON (config.json, Hub round trips) turns the int keys into strings."""
    if id2label is None:
        return None
    if not isinstance(id2label, dict) or len(id2label) > MAX_LABELS:
        what = f"dict of {len(id2label):,} entries" if isinstance(id2label, dict) else type(id2label).__name__
        raise ValueError(f"id2label must be a dict {{class index: name}} of at most {MAX_LABELS:,} classes, got a "
                         f"{what}; fix the pipeline's model_index.json (or pass id2label=None).")
    bad = [k for k, v in id2label.items() if not (_is_index(k) and isinstance(v, str))]
    if bad:
        raise ValueError(f"id2label must map class indices to names; its entry {str(bad[0])[:40]!r} does not. Fix "
                         "the pipeline's model_index.json.")
    return {int(k): v for k, v in id2label.items()}


def check_floats(name: str, values) -> Optional[list]:
    """A per-channel latent constant as a list of finite floats (config.json holds plain lists)."""
    if values is None:
        return None
    try:
        values = [float(c) for c in (values.tolist() if torch.is_tensor(values) else values)]
    except (TypeError, ValueError):
        values = None
    if values is None or not 0 < len(values) <= 64 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be a short list of finite numbers (one per latent channel, ALGORITHM.md §6.1); "
                         "fix the pipeline's model_index.json.")
    return values


class PipelineConventionsMixin:
    """Mixed into `EDMFamilyPipeline`; expects `self.vae` (None for pixel models)."""

    # ---- Diffusers' step-end callback --------------------------------------------------------------------------
    _callback_tensor_inputs = ["latents"]  # the running sample: the generator's output at each step

    def check_callback(self, callback, tensor_inputs) -> tuple:
        """(callback, tensor input names): a `PipelineCallback` / `MultiPipelineCallbacks` names its own inputs."""
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        if callback is not None and not callable(callback):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback).__name__}.")
        tensor_inputs = list(tensor_inputs or [])
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not among this pipeline's "
                             f"{self._callback_tensor_inputs}.")
        return callback, tensor_inputs

    def step_end(self, callback, tensor_inputs: list, step: int, sigma: float, latents: torch.Tensor) -> torch.Tensor:
        """Call `callback(pipe, step, sigma, {name: tensor})` after generator evaluation `step` (Diffusers'
        `callback_on_step_end`, with the noise level as the timestep); a returned "latents" replaces the sample."""
        if callback is None:
            return latents
        outputs = callback(self, step, sigma, dict.fromkeys(tensor_inputs, latents)) or {}
        return outputs.get("latents", latents)

    # ---- the VAE of latent models (Diffusers' pipeline methods) --------------------------------------------------
    def _vae(self):
        if self.vae is None:
            raise ValueError("this pipeline has no vae (a pixel model): there is no VAE decode to slice or tile.")
        return self.vae

    def enable_vae_slicing(self):
        """Decode the batch one image at a time (less memory for large batches of EDM2 latents)."""
        self._vae().enable_slicing()

    def disable_vae_slicing(self):
        self._vae().disable_slicing()

    def enable_vae_tiling(self):
        """Decode each image in overlapping tiles (less memory for large images; tiles may show faint seams)."""
        self._vae().enable_tiling()

    def disable_vae_tiling(self):
        self._vae().disable_tiling()
