"""EDM's geometric augment pipe as SiDA uses it (ALGORITHM.md §5.7, §10 item 8).

`AugmentPipe(p)` x-flips half of the images (``xflip * p >= 1``) and, each with probability ``p``, applies a y-flip,
an isotropic scale, a fractional rotation, an anisotropic scale and a fractional translation. It returns the images
and the 9-d augment label that conditions the denoiser (``augment_dim = 9``), laid out as in the official pipe:

    [xflip, yflip, scale, cos(rot) - 1, sin(rot), aniso * cos(r), aniso * sin(r), translate_x, translate_y]

Scale, aniso and translation entries are the unit-normal draws (before multiplying by their ``*_std``), as there.
Unlike the official pipe, a disabled transform keeps its (zero) slot, so the label is always ``[N, 9]``.

Geometric transforms are resampled without aliasing: reflect-pad, 2x upsample with the orthonormal symlet-6 low-pass
filter, bilinear ``grid_sample`` on the upsampled grid, then filter and 2x downsample. Because the filter is
orthonormal, downsample(upsample(x)) == x exactly, so identity and integer translations are exact in the interior.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


AUGMENT_DIM = 9  # length of the augment label, the denoiser's augment_dim (ALGORITHM.md §5.7)

# Symlet-6 low-pass decomposition filter (Daubechies' least-asymmetric wavelet with 6 vanishing moments): orthonormal,
# sum(h[k] h[k + 2m]) = delta(m), sum(h) = sqrt(2). The official pipe uses the same filter.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148)


# ---- batched 3x3 homogeneous 2-d transforms (pixel units, origin at the image centre, y pointing down) ---------------

def _affine(a, b, c, d, tx, ty) -> torch.Tensor:
    """``[N,3,3]`` matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from ``[N]`` tensors (or numbers broadcast to them)."""
    device = next((v.device for v in (a, b, c, d, tx, ty) if torch.is_tensor(v)), None)
    # Numbers become device tensors through a fill kernel: as_tensor would copy from the host and wait for the GPU.
    a, b, c, d, tx, ty = torch.broadcast_tensors(*(v.to(torch.float32) if torch.is_tensor(v) else
                                                   torch.full((), v, dtype=torch.float32, device=device)
                                                   for v in (a, b, c, d, tx, ty)))
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=-1).reshape(*a.shape, 3, 3)


def translate2d(tx, ty) -> torch.Tensor:
    return _affine(1, 0, 0, 1, tx, ty)


def scale2d(sx, sy) -> torch.Tensor:
    return _affine(sx, 0, 0, sy, 0, 0)


def rotate2d(theta) -> torch.Tensor:
    theta = torch.as_tensor(theta, dtype=torch.float32)
    return _affine(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), 0, 0)


# ---- the resampler ---------------------------------------------------------------------------------------------------

def _filter_1d(x: torch.Tensor, taps: torch.Tensor, dim: int, up: bool) -> torch.Tensor:
    """2x upsampling (transposed conv = zero insertion + filter) or downsampling (filter, stride 2) along ``dim``."""
    weight = taps.view(1, 1, -1, 1) if dim == 2 else taps.view(1, 1, 1, -1)
    stride = (2, 1) if dim == 2 else (1, 2)
    return F.conv_transpose2d(x, weight, stride=stride) if up else F.conv2d(x, weight, stride=stride)


def warp_images(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Resample ``images [N,C,H,W]`` so that output pixel ``q`` reads input position ``g_inv[n] @ q``.

    ``g_inv`` is ``[N,3,3]`` (or ``[3,3]``) in pixel units with the origin at the image centre and y pointing down, so
    ``translate2d(-2, -1)`` moves the content 2 pixels right and 1 down. Out-of-image reads come from reflect padding.
    No host-device synchronisation: the padding is fixed and constants travel with non-blocking copies.
    """
    n, c, h, w = images.shape
    device = images.device
    g_inv = g_inv.to(device=device, dtype=torch.float32).expand(n, 3, 3)
    taps = torch.tensor(SYM6, dtype=images.dtype).to(device, non_blocking=True)
    extra = len(SYM6) - 2  # a 2x upsample of k samples has 2k + extra outputs; a downsample of 2k + extra gives k

    # Reflect-pad by the most reflect padding allows (size - 1 per side), whatever the transforms: a pad sized to
    # where the corners' sources land would need their coordinates on the host. Sources within the pad read the
    # same reflected pixels either way; the filters' reach past them only sees more reflected data, not zeros.
    padded = F.pad(images.reshape(n * c, 1, h, w), [w - 1, w - 1, h - 1, h - 1], mode="reflect")

    # Upsample. Padded pixel k lands at upsampled index 2k + 5 (the filter's low-frequency delay is ~5.1 taps), so the
    # image centre sits half an upsampled pixel before the tensor centre; honouring that makes rotations and scalings
    # pivot on the true centre (rotating by pi is a double flip), which is also the official convention.
    in_h, in_w = 2 * padded.shape[2] + extra, 2 * padded.shape[3] + extra
    x = _filter_1d(_filter_1d(padded, taps, 3, up=True), taps, 2, up=True).reshape(n, c, in_h, in_w)

    # Bilinear sampling on the upsampled grid. The output grid (2H+extra x 2W+extra) is what the downsampler needs to
    # give H x W and shares the upsampled origin convention. affine_grid works in [-1,1]: offset = normalised * size/2.
    out_h, out_w = 2 * h + extra, 2 * w + extra
    to_original = translate2d(0.25, 0.25) @ scale2d(out_w / 4, out_h / 4)  # output grid (normalised) -> pixels
    to_input = scale2d(4 / in_w, 4 / in_h) @ translate2d(-0.25, -0.25)  # padded pixels -> input grid (normalised)
    theta = to_input.to(device, non_blocking=True) @ g_inv @ to_original.to(device, non_blocking=True)
    grid = F.affine_grid(theta[:, :2].to(images.dtype), [n, c, out_h, out_w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Filter and downsample: exactly undoes the upsampling where the transform is the identity.
    x = _filter_1d(_filter_1d(x.reshape(n * c, 1, out_h, out_w), taps, 3, up=False), taps, 2, up=False)
    return x.reshape(n, c, h, w)


# ---- the pipe --------------------------------------------------------------------------------------------------------

class AugmentPipe:
    """EDM's augment pipe restricted to what SiDA uses; ``pipe(images, generator=None) -> (images, labels [N,9])``.

    Each ``xflip``... ``translate_frac`` is a probability multiplier (0 disables the transform, a transform fires
    with probability ``min(1, multiplier * p)``); the ``*_std`` / ``*_max`` options are the official strengths.
    Deterministic given ``generator`` (its draws are made on the generator's device and moved to the images').
    """

    def __init__(
        self,
        p: float,                           # overall augmentation probability (CIFAR-10 0.12, FFHQ/AFHQ 0.15)
        xflip: float = 1e8,                 # x-flip multiplier; 1e8 * p >= 1 flips a fair-coin half of the images
        yflip: float = 1,                   # y-flip multiplier
        scale: float = 1,                   # isotropic-scaling multiplier
        rotate_frac: float = 1,             # fractional-rotation multiplier
        aniso: float = 1,                   # anisotropic-scaling multiplier
        translate_frac: float = 1,          # fractional-translation multiplier
        scale_std: float = 0.2,             # log2 standard deviation of isotropic scaling
        rotate_frac_max: float = 1,         # range of the rotation angle, 1 = full circle
        aniso_std: float = 0.2,             # log2 standard deviation of anisotropic scaling
        aniso_rotate_prob: float = 0.5,     # probability of scaling along a randomly rotated axis
        translate_frac_std: float = 0.125,  # standard deviation of translation, relative to the image size
    ):
        options = dict(p=p, xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
                       translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
                       aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std)
        for name, value in options.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"AugmentPipe option {name} must be a finite number >= 0, got {value!r}; "
                                 f"use 0 to disable a transform (--augment 0 turns the pipe off).")
            setattr(self, name, float(value))

    def __repr__(self) -> str:
        return f"AugmentPipe(p={self.p}, xflip={self.xflip:g}, yflip={self.yflip:g}, scale={self.scale:g}, " \
               f"rotate_frac={self.rotate_frac:g}, aniso={self.aniso:g}, translate_frac={self.translate_frac:g})"

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Augment float ``images [N,C,H,W]`` (any channel count); returns ``(images, labels float32 [N,9])``."""
        if not (torch.is_tensor(images) and images.ndim == 4 and images.is_floating_point()):
            got = f"{images.dtype} {list(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"AugmentPipe expects float images [N, C, H, W] in [-1, 1], got {got}; convert uint8 "
                             f"pixels with x / 127.5 - 1 first.")
        n, _, h, w = images.shape
        device = images.device
        draw_device = generator.device if generator is not None else device
        rand = lambda *shape: torch.rand(shape, generator=generator, device=draw_device).to(device)
        randn = lambda *shape: torch.randn(shape, generator=generator, device=draw_device).to(device)
        fires = lambda multiplier: rand(n) < multiplier * self.p  # per-image Bernoulli(min(1, multiplier * p))
        labels = torch.zeros(n, AUGMENT_DIM, device=device)
        if self.p == 0:
            return images, labels

        # Pixel blitting: exact flips, label 1 where flipped.
        for slot, multiplier, dim in ((0, self.xflip, 3), (1, self.yflip, 2)):
            if multiplier > 0:
                flip = (rand(n) < 0.5) & fires(multiplier)
                images = torch.where(flip.view(n, 1, 1, 1), images.flip(dim), images)
                labels[:, slot] = flip.float()

        # Geometric transforms, composed as one inverse (output -> input) matrix per image, in the official order.
        g_inv = torch.eye(3, device=device).expand(n, 3, 3)
        if self.scale > 0:
            z = randn(n) * fires(self.scale)
            s = (z * self.scale_std).exp2()
            g_inv = g_inv @ scale2d(1 / s, 1 / s)
            labels[:, 2] = z
        if self.rotate_frac > 0:
            angle = (rand(n) * 2 - 1) * (math.pi * self.rotate_frac_max) * fires(self.rotate_frac)
            g_inv = g_inv @ rotate2d(angle)
            labels[:, 3], labels[:, 4] = angle.cos() - 1, angle.sin()
        if self.aniso > 0:
            z = randn(n) * fires(self.aniso)
            axis = (rand(n) * 2 - 1) * math.pi * (rand(n) < self.aniso_rotate_prob)
            s = (z * self.aniso_std).exp2()
            g_inv = g_inv @ rotate2d(-axis) @ scale2d(1 / s, s) @ rotate2d(axis)
            labels[:, 5], labels[:, 6] = z * axis.cos(), z * axis.sin()
        if self.translate_frac > 0:
            z = randn(2, n) * fires(self.translate_frac)
            g_inv = g_inv @ translate2d(-z[0] * (w * self.translate_frac_std), -z[1] * (h * self.translate_frac_std))
            labels[:, 7], labels[:, 8] = z[0], z[1]

        if self.scale or self.rotate_frac or self.aniso or self.translate_frac:
            # Untransformed images keep their exact pixels; deciding per image on the device avoids a host sync.
            identity = (g_inv == torch.eye(3, device=device)).all(dim=(1, 2)).view(n, 1, 1, 1)
            images = torch.where(identity, images, warp_images(images, g_inv))
        return images, labels
