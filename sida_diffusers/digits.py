"""The embedded offline default: scikit-learn's digits, a shipped tiny EDM teacher and the FD-digits feature network.

Everything here works without network access: the 1,797 digits come with scikit-learn (`sida_diffusers.data.digits.load_digits_dataset` upsamples
them to 16x16 and hands them to the trainer's data loader as a Hugging Face dataset, the path CIFAR-10 takes), and the
teacher and classifier weights are package assets (`sida_diffusers/assets/`), reproduced by `examples/train_teacher.py` and `examples/train_digits_classifier.py`.

FD-digits is the Frechet distance between Gaussian fits of the classifier's penultimate features of two image sets. It
plays the role FID plays for natural images but is NOT comparable to FID (different features, different data).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from sida_diffusers.data.digits import (  # noqa: F401 (the offline default in one place)
    DIGITS_RESOLUTION,
    digits_holdout_split,
    load_digits_dataset,
    load_digits_tensors,
)
from sida_diffusers.networks.precond import EDMPrecond
from sida_diffusers.shipped import ASSETS_DIR, SHIPPED_TEACHERS


DIGITS_ID2LABEL = {i: str(i) for i in range(10)}
FD_DIGITS = "fd_digits"


# ---- the FD-digits feature network -----------------------------------------------------------------------------------

def _conv_relu(cin: int, cout: int) -> list:
    return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.ReLU()]


class DigitsFeatureNet(ModelMixin, ConfigMixin):
    """Small CNN digit classifier. Input ``[N,1,R,R]`` pixels in [0,255] (float or uint8).

    ``features(x)`` -> penultimate activations ``[N, feature_dim]`` (the FD-digits feature space); ``forward(x)`` ->
    class logits ``[N, num_classes]``.
    """

    @register_to_config
    def __init__(
        self,
        resolution: int = DIGITS_RESOLUTION,  # input height and width; two 2x poolings need a multiple of 4
        channels: tuple = (32, 64),         # conv widths of the two stages
        feature_dim: int = 64,              # size of the penultimate (feature) layer
        num_classes: int = 10,
        dropout: float = 0.2,               # on the features, training only
    ):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"resolution must be a multiple of 4 (two 2x poolings), got {resolution}.")
        c0, c1 = channels
        self.trunk = torch.nn.Sequential(
            *_conv_relu(1, c0), *_conv_relu(c0, c0), torch.nn.MaxPool2d(2),
            *_conv_relu(c0, c1), *_conv_relu(c1, c1), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(c1 * (resolution // 4) ** 2, feature_dim), torch.nn.ReLU(),
        )
        self.feature_dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, feature_dim]`` of images ``[N,1,R,R]`` in [0,255]."""
        r = self.config.resolution
        if not torch.is_tensor(x) or x.ndim != 4 or tuple(x.shape[1:]) != (1, r, r):
            shape = list(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects grey images of shape [N, 1, {r}, {r}] with values in "
                             f"[0, 255], got {shape}; convert RGB to one channel and resize to {r}x{r} first.")
        return self.trunk(x.to(self.dtype) / 127.5 - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_dropout(self.features(x)))


class _Features(torch.nn.Module):
    """Feature-extractor view of a classifier: ``forward(x) = net.features(x)``."""

    def __init__(self, net: DigitsFeatureNet):
        super().__init__()
        self.net = net
        self.feature_dim = int(net.config.feature_dim)  # lets the evaluation suite check references without a probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


# ---- shipped assets --------------------------------------------------------------------------------------------------

def _asset_dir(name: str, script: str) -> Path:
    path = ASSETS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"shipped weights {path} are missing; reinstall sida_diffusers (the assets are package "
                                f"data) or recreate them with `python examples/{script}`.")
    return path


def digits_teacher_path(conditional: bool = True) -> Path:
    """Diffusers folder of the shipped digits teacher (``load_denoiser("digits")`` reads the same folder)."""
    return _asset_dir(SHIPPED_TEACHERS["digits" if conditional else "digits-uncond"], "train_teacher.py")


def load_digits_teacher(conditional: bool = True) -> EDMPrecond:
    """The shipped tiny EDM teacher (``EDMPrecond``, SongUNet DDPM++, 1x16x16, float32, eval mode); no network."""
    return EDMPrecond.from_pretrained(digits_teacher_path(conditional), dtype=torch.float32).eval()


def load_digits_classifier() -> DigitsFeatureNet:
    """The shipped digits classifier (eval mode, float32)."""
    return DigitsFeatureNet.from_pretrained(_asset_dir("digits_classifier", "train_digits_classifier.py"),
                                            dtype=torch.float32).eval()


def load_digits_feature_extractor() -> torch.nn.Module:
    """Frozen eval-mode module mapping ``[N,1,16,16]`` images in [0,255] to FD-digits features ``[N, 64]``."""
    return _Features(load_digits_classifier()).eval().requires_grad_(False)


def register_digits_metric() -> None:
    """Register ``fd_digits`` (Frechet distance of `load_digits_feature_extractor` features) for evaluation."""
    from sida_diffusers.evaluation import register_feature_metric

    register_feature_metric(FD_DIGITS, load_digits_feature_extractor)
