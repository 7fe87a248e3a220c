"""Feature extractors: ``nn.Module``s mapping images ``[N,C,H,W]`` with values in [0,255] to features ``[N, D]``.

* ``InceptionFeatures``: the TorchScript Inception-v3 ``inception-2015-12-05.pt`` that clean-fid, StyleGAN2-ADA, EDM
  and SiD all use (ALGORITHM.md §9.1). ``legacy_tensorflow`` mode (default) resizes inside the network exactly as
  EDM/SiD do, so its FID is comparable with EDM's ``.npz`` references; ``clean`` mode is clean-fid's PIL-bicubic resize.
* ``DINOv2Features``: transformers' ``Dinov2Model`` (ViT-L/14 = ``facebook/dinov2-large``) with EDM2's preprocessing.
  It is NOT bit-identical to EDM2's torch.hub model (transformers interpolates the position embeddings to the
  target size, the dinov2 repo by a scale factor); check FD_DINOv2 against EDM2's reference before publishing numbers.

Every extractor exposes ``feature_dim`` so ``MetricSuite.validate`` can check references before generating.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sida_diffusers.safe_io.paths import check_regular_file


INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_MODES = ("legacy_tensorflow", "clean")
DINOV2_DEFAULT = "facebook/dinov2-large"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Float ``[N,3,H,W]`` from ``[N,1|3,H,W]``: grey images are repeated to three channels, as EDM/EDM2 do."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {list(x.shape)}; ImageNet-trained feature "
                         "networks need grey or RGB images (decode latents to pixels first).")
    return x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()


def check_private(path: Path) -> None:
    """`path` and its folder must belong to this user (or root) and not be writable by every user.

    A TorchScript file is code: `torch.jit.load` runs whatever graph it holds. The file we load by default must
    therefore be one nobody else can have planted or replaced (clean-fid's own default, /tmp/inception-2015-12-05.pt,
    sits in a folder every local user can write to, so we never read it).
    """
    uid = os.getuid() if hasattr(os, "getuid") else None
    for item in (path, path.parent):
        st = item.stat()
        if uid is not None and st.st_uid not in (uid, 0):
            raise ValueError(f"{item} belongs to another user (uid {st.st_uid}); the default Inception weights are "
                             "only loaded from a folder of yours. Remove it, or pass --inception PATH.")
        if st.st_mode & 0o002:
            raise ValueError(f"{item} is writable by every user (mode {oct(st.st_mode & 0o777)}), so anyone could "
                             f"have replaced the Inception weights; `chmod o-w {item}`, or pass --inception PATH.")


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """Path of ``inception-2015-12-05.pt``: ``path`` if given (the user's own file), else our download cache
    (``$SIDA_CACHE`` or ~/.cache/sida_diffusers), downloaded there once and loaded only if no other user can write
    to it (`check_private`)."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {path}; download {INCEPTION_URL} and pass its "
                                    "path (--inception PATH).")
        check_regular_file(path, "the Inception weights")
        return path
    from sida_diffusers.pretrained import cached_download

    try:
        cached = cached_download(INCEPTION_URL)
    except OSError as e:
        raise FileNotFoundError(f"Inception weights are not in the sida_diffusers cache and downloading "
                                f"{INCEPTION_URL} failed ({e}); fetch that file on a machine with network and pass "
                                "its path (--inception PATH), or set $SIDA_CACHE to a folder that holds it.") from e
    check_private(cached)
    return cached


class InceptionFeatures(torch.nn.Module):
    """2048-d pool features of the TorchScript Inception-v3; ``class_probs`` gives the IS softmax (no output bias)."""

    feature_dim = 2048

    def __init__(self, path: str | os.PathLike | None = None, mode: str = "legacy_tensorflow"):
        super().__init__()
        if mode not in INCEPTION_MODES:
            raise ValueError(f"unknown Inception mode {mode!r}; choose one of {INCEPTION_MODES} (legacy_tensorflow "
                             "matches EDM/SiD numbers).")
        self.mode = mode
        self.base = torch.jit.load(str(resolve_inception_path(path)), map_location="cpu").eval()
        if mode == "clean":
            from cleanfid.resize import build_resizer

            self._clean_resize = build_resizer("clean")  # PIL bicubic to 299x299 on float HWC numpy, per channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_rgb(x)
        if self.mode == "legacy_tensorflow":
            return self.base(x, return_features=True)  # the network's own TF-style resize to 299, then /128 - 1
        hwc = x.permute(0, 2, 3, 1).cpu().numpy()
        x = torch.from_numpy(np.stack([self._clean_resize(im) for im in hwc])).permute(0, 3, 1, 2).to(x.device)
        return self.base.layers((x - 128) / 128).reshape(len(x), self.feature_dim)

    def class_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities from pool features, without the output bias (the IS convention)."""
        return torch.softmax(features @ self.base.output.weight.T, dim=1)


class DINOv2Features(torch.nn.Module):
    """DINOv2 CLS features (``pooler_output``) with EDM2's FD_DINOv2 preprocessing (ALGORITHM.md §9.1)."""

    def __init__(self, source: str | os.PathLike = DINOV2_DEFAULT):
        super().__init__()
        from transformers import Dinov2Model

        try:
            self.model = Dinov2Model.from_pretrained(str(source)).eval()
        except OSError as e:
            raise FileNotFoundError(f"cannot load DINOv2 from {source!r} ({e}); pass a local folder saved with "
                                    f"save_pretrained (--dinov2 DIR), or warm the Hugging Face cache with "
                                    f"{DINOV2_DEFAULT!r} and set HF_HUB_OFFLINE=1.") from e
        self.feature_dim = self.model.config.hidden_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(to_rgb(x), size=(224, 224), mode="bicubic", antialias=True)
        return self.model(pixel_values=(x / 255 - self.mean) / self.std).pooler_output
