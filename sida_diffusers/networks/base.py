"""The call contract shared by every preconditioned denoiser (ALGORITHM.md §1.2-§1.4, §3).

A denoiser is D(x; sigma, c) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), c), where F is a raw
UNet. Subclasses supply the preconditioning coefficients and the backbone; this class owns input checking, the
`return_flag` dispatch (decoder / encoder discriminator / both from one pass), dtype handling and the logvar output.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin


RETURN_FLAGS = ("decoder", "encoder", "encoder_decoder")  # the values of `return_flag` (ALGORITHM.md §3)

SigmaLike = Union[float, int, torch.Tensor, Sequence[float]]


def plain_config(value):
    """Official init_kwargs as JSON-able Python (tuples -> lists, numpy scalars -> numbers), for config.json."""
    if isinstance(value, dict):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain_config(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def one_hot(labels, label_dim: int) -> torch.Tensor:
    """Float32 one-hot rows ``[N, label_dim]`` of integer class indices ``[N]`` (``[N, 0]`` when ``label_dim == 0``),
    the label encoding every denoiser takes (ALGORITHM.md §1.1)."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if label_dim == 0:
        return torch.zeros(len(labels), 0, device=labels.device)
    # Checked on the host only: on an accelerator the check would cost a sync, and one_hot's own kernel asserts there.
    if labels.device.type == "cpu" and len(labels) and (labels.min() < 0 or labels.max() >= label_dim):
        raise ValueError(f"class labels must lie in [0, {label_dim}) for label_dim={label_dim}, got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]; pass labels of the model's classes, or none "
                         "for an unconditional model (an unlabeled dataset: use_labels=False).")
    return torch.nn.functional.one_hot(labels, label_dim).to(torch.float32)


def autocast_enabled(device_type: str) -> bool:
    """`torch.is_autocast_enabled` that also answers for meta tensors (never autocast), which memory planning runs the
    networks on (shapes only, ALGORITHM.md §13.4)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """A region computed in the inputs' own dtype whatever the autocast state (meta tensors: nothing to switch off)."""
    return contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type, enabled=False)


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float):
    """EDM's ``(c_skip, c_out, c_in, c_noise)`` for sigma ``[N,1,1,1]``, c_noise = ln(sigma)/4 flattened to ``[N]``
    (ALGORITHM.md §1.2), in the official operation order; EDM2 uses the same coefficients (§1.3)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    return c_skip, c_out, c_in, sigma.flatten().log() / 4


class Denoiser(ModelMixin, ConfigMixin):
    """Base class of EDM/EDM2 preconditioned denoisers.

    Call: ``model(x, sigma, class_labels=None, augment_labels=None, return_flag="decoder", return_logvar=False)``.

    * ``sigma``: a number, or a tensor of shape ``[N]`` / ``[N,1,1,1]`` (or one element, broadcast).
    * ``class_labels``: one-hot ``[N, label_dim]`` (integer class indices of shape ``[N]`` are accepted too).
      A conditional model called with ``None`` uses an all-zero label row, as the official networks do.
    * ``return_flag``: ``"decoder"`` -> denoised ``[N,C,H,W]``; ``"encoder"`` -> discriminator logits
      ``[N,1,h,w]`` (channel mean of the last encoder block, encoder only); ``"encoder_decoder"`` ->
      ``(denoised, logits)`` from one forward pass.
    * ``return_logvar=True`` (models with a logvar head) appends the logvar ``[N,1,1,1]`` as the last element.
    """

    #: attribute name of the raw UNet ("model" for EDM, "unet" for EDM2), as in the official state dicts
    backbone_name = "model"
    #: the family the trainer and pipelines branch on (never on the class name): "edm" (EDM preconditioning over
    #: SongUNet / ADM, pixel space) or "edm2" (EDM2's UNet, with its latent, loss and optimiser conventions)
    family = "edm"
    #: whether SiD / SiDA may distil this denoiser (its preconditioning is one the trainer supports, §1.2)
    distillable = False
    #: Diffusers' flags: `enable_gradient_checkpointing()` checkpoints every UNet block; `_no_split_modules` names
    #: the block class, the unit of sharding (`training/sharding.py`, ALGORITHM.md §13.1)
    _supports_gradient_checkpointing = True
    _no_split_modules = ["UNetBlock"]

    # ---- to be provided by subclasses -------------------------------------------------------------------------
    def preconditioning(self, sigma: torch.Tensor):
        """Return ``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` of shape ``[N,1,1,1]``; c_noise has shape [N]."""
        raise NotImplementedError

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden where it exists
        raise ValueError(f"{type(self).__name__} has no logvar head; call it with return_logvar=False.")

    # ---- properties every consumer relies on ------------------------------------------------------------------
    @property
    def backbone(self) -> torch.nn.Module:
        return getattr(self, self.backbone_name)

    @property
    def img_resolution(self) -> int:
        return int(self.config.img_resolution)

    @property
    def img_channels(self) -> int:
        return int(self.config.img_channels)

    @property
    def label_dim(self) -> int:
        return int(self.config.label_dim)

    @property
    def is_conditional(self) -> bool:
        return self.label_dim > 0

    @property
    def augment_dim(self) -> int:
        return int(getattr(self.backbone, "augment_dim", 0) or 0)

    @property
    def has_logvar(self) -> bool:
        return False

    @property
    def sigma_data(self) -> float:
        return float(getattr(self.config, "sigma_data", 0.5))

    def unet_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the raw UNet runs in: float16 only with ``use_fp16`` on CUDA (ALGORITHM.md §1.4), and on meta
        tensors, so that memory planning sees what a CUDA run allocates.

        Under ``torch.autocast`` the input stays float32 and autocast picks the compute dtype, so the input is not
        rounded to float16 before being cast to, say, bfloat16.
        """
        if autocast_enabled(x.device.type):
            return torch.float32
        if getattr(self.config, "use_fp16", False) and x.device.type in ("cuda", "meta"):
            return torch.float16
        return torch.float32

    # ---- input handling ----------------------------------------------------------------------------------------
    def _prepare_inputs(self, x, sigma, class_labels, augment_labels, return_flag, return_logvar):
        name = type(self).__name__
        if return_flag not in RETURN_FLAGS:
            raise ValueError(f"return_flag must be one of {RETURN_FLAGS}, got {return_flag!r}.")
        if return_logvar and not self.has_logvar:
            raise ValueError(f"{name} has no logvar head; call it with return_logvar=False.")
        if not torch.is_tensor(x) or x.ndim != 4:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} expects x of shape [N, C, H, W], got {shape}.")
        n, c, h, w = x.shape
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if (c, h, w) != expected:
            raise ValueError(
                f"{name} was built for images of shape [N, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(img_channels={expected[0]}, img_resolution={expected[1]}) but got {list(x.shape)}. "
                "Resize or convert the data to the teacher's resolution and channel count, or use a teacher "
                "trained at this shape."
            )
        x = x.to(torch.float32)

        if torch.is_tensor(sigma):
            sigma = sigma.to(device=x.device, dtype=torch.float32)
        else:
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1, 1, 1, 1).expand(n, 1, 1, 1)
        elif sigma.numel() == n:
            sigma = sigma.reshape(n, 1, 1, 1)
        else:
            raise ValueError(f"sigma must be a number or hold one value per sample ({n}), got shape {list(sigma.shape)}.")

        class_labels = self._prepare_labels(class_labels, n, x.device)

        if augment_labels is not None:
            if self.augment_dim == 0:
                augment_labels = None  # the official networks ignore augment labels without map_augment
            else:
                augment_labels = torch.as_tensor(augment_labels, device=x.device).to(torch.float32)
                if augment_labels.ndim != 2 or augment_labels.shape[1] != self.augment_dim:
                    raise ValueError(
                        f"augment_labels must have shape [N, {self.augment_dim}], got {list(augment_labels.shape)}."
                    )
                if augment_labels.shape[0] == 1 and n > 1:
                    augment_labels = augment_labels.expand(n, -1)
                elif augment_labels.shape[0] != n:
                    raise ValueError(f"augment_labels has {augment_labels.shape[0]} rows for a batch of {n}.")
        return x, sigma, class_labels, augment_labels

    def _prepare_labels(self, class_labels, n: int, device) -> Optional[torch.Tensor]:
        name = type(self).__name__
        if self.label_dim == 0:
            if class_labels is not None and torch.as_tensor(class_labels).numel() > 0:
                raise ValueError(f"{name} is unconditional (label_dim=0) but class_labels were given; pass None.")
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        labels = torch.as_tensor(class_labels, device=device)
        if not labels.is_floating_point() and labels.ndim <= 1:
            labels = one_hot(labels, self.label_dim)
        labels = labels.to(torch.float32)
        if labels.ndim != 2 or labels.shape[1] != self.label_dim:
            raise ValueError(
                f"{name} expects one-hot class_labels of shape [N, {self.label_dim}] (label_dim={self.label_dim}), "
                f"got {list(labels.shape)}."
            )
        if labels.shape[0] not in (1, n):
            raise ValueError(f"class_labels has {labels.shape[0]} rows for a batch of {n}.")
        return labels

    # ---- the forward pass ----------------------------------------------------------------------------------------
    def run_backbone(self, x_in, c_noise, class_labels, augment_labels, return_flag):
        """Call the raw UNet; subclasses may adapt the arguments (e.g. EDM2 takes no augment labels)."""
        return self.backbone(x_in, c_noise, class_labels=class_labels, augment_labels=augment_labels,
                             return_flag=return_flag)

    def select_output(self, f_x: torch.Tensor) -> torch.Tensor:
        """Hook for nets whose raw output has extra channels (iDDPM keeps the first img_channels)."""
        return f_x

    def forward(
        self,
        x: torch.Tensor,
        sigma: SigmaLike,
        class_labels: Optional[torch.Tensor] = None,
        augment_labels: Optional[torch.Tensor] = None,
        return_flag: str = "decoder",
        return_logvar: bool = False,
    ):
        x, sigma, class_labels, augment_labels = self._prepare_inputs(
            x, sigma, class_labels, augment_labels, return_flag, return_logvar
        )
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        out = self.run_backbone((c_in * x).to(self.unet_dtype(x)), c_noise, class_labels, augment_labels, return_flag)

        if return_flag == "encoder":
            result = (out.to(torch.float32),)
        else:
            f_x, logits = (out if return_flag == "encoder_decoder" else (out, None))
            denoised = c_skip * x + c_out * self.select_output(f_x.to(torch.float32))
            result = (denoised,) if logits is None else (denoised, logits.to(torch.float32))
        if return_logvar:
            result = result + (self.logvar(c_noise),)
        return result[0] if len(result) == 1 else result
