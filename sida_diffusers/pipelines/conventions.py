"""Diffusers pipeline conventions that every pipeline over an EDM/EDM2 denoiser shares: the step-end callback
(`callback_on_step_end` with `callback_on_step_end_tensor_inputs`) and the VAE memory switches of latent pipelines
(`enable_vae_slicing`, `enable_vae_tiling`), as Diffusers' own pipelines name them.
"""

from __future__ import annotations

import torch


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
