import math

import pytest
import torch

from sida_diffusers.training.augment import AUGMENT_DIM, AugmentPipe, rotate2d, translate2d, warp_images


ONLY_XFLIP = dict(yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
ONLY_TRANSLATE = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0)


def smooth_images(n, c=3, size=16, seed=0):
    """Band-limited images in [-1, 1]: bicubic upsampling of coarse noise."""
    coarse = torch.rand(n, c, size // 4, size // 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def blob(size=16, x0=0.0, y0=0.0, width=1.5):
    """One grey Gaussian blob centred (x0, y0) pixels from the image centre (y pointing down)."""
    coord = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return torch.exp(-((coord[None, :] - x0) ** 2 + (coord[:, None] - y0) ** 2) / (2 * width**2))[None, None]


def centroid(images):
    """Intensity-weighted (x, y) centre of each image [N,1,H,W], relative to the image centre."""
    n, _, h, w = images.shape
    weight = images.clamp(min=0)[:, 0]
    xs = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
    ys = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
    total = weight.sum(dim=(1, 2))
    return (weight.sum(1) * xs).sum(1) / total, (weight.sum(2) * ys).sum(1) / total


def test_zero_probability_is_identity_with_zero_labels():
    images = smooth_images(8)
    out, labels = AugmentPipe(0)(images)
    assert torch.equal(out, images)
    assert labels.shape == (8, AUGMENT_DIM) and labels.dtype == torch.float32
    assert torch.count_nonzero(labels) == 0


def test_xflip_pipe_flips_exactly_the_labelled_half():
    images = smooth_images(400, c=1)
    out, labels = AugmentPipe(1, **ONLY_XFLIP)(images, generator=torch.Generator().manual_seed(1))
    flipped = labels[:, 0] == 1
    assert torch.equal(out[flipped], images[flipped].flip(3))
    assert torch.equal(out[~flipped], images[~flipped])
    assert 0.4 < flipped.float().mean() < 0.6  # 1e8 * p >= 1: every image tosses a fair coin
    assert torch.count_nonzero(labels[:, 1:]) == 0


def test_default_pipe_always_reports_nine_labels_and_flips_half():
    out, labels = AugmentPipe(0.12)(smooth_images(256), generator=torch.Generator().manual_seed(2))
    assert labels.shape == (256, 9) and labels.dtype == torch.float32 and out.shape == (256, 3, 16, 16)
    assert 0.4 < labels[:, 0].mean() < 0.6
    assert 0 < (labels[:, 1:] != 0).any(dim=1).float().mean() < 0.6  # each other transform fires with p = 0.12


def test_identity_warp_and_integer_translation_are_exact_in_the_interior():
    images = smooth_images(4, size=12)
    assert torch.allclose(warp_images(images, torch.eye(3)), images, atol=1e-5)
    moved = warp_images(images, translate2d(-2.0, -1.0))  # content 2 px right, 1 px down
    rolled = torch.roll(images, shifts=(1, 2), dims=(2, 3))
    assert torch.allclose(moved[:, :, 3:-3, 3:-3], rolled[:, :, 3:-3, 3:-3], atol=1e-5)


def test_half_turn_pivots_on_the_image_centre():
    images = smooth_images(4, size=24)
    turned = warp_images(images, rotate2d(torch.tensor(math.pi)))
    error = (turned - images.flip(2).flip(3))[:, :, 4:-4, 4:-4].abs().mean()
    assert error < 0.03


def test_translation_label_is_the_content_shift_in_units_of_translate_frac_std():
    pipe = AugmentPipe(1, **ONLY_TRANSLATE, translate_frac_std=0.05)
    out, labels = pipe(blob(32).expand(16, 1, 32, 32), generator=torch.Generator().manual_seed(3))
    x, y = centroid(out)
    assert torch.allclose(x, labels[:, 7] * 32 * 0.05, atol=0.1)
    assert torch.allclose(y, labels[:, 8] * 32 * 0.05, atol=0.1)


def test_rotation_label_is_cos_minus_one_and_sin_of_the_angle():
    pipe = AugmentPipe(1, xflip=0, yflip=0, scale=0, aniso=0, translate_frac=0)
    out, labels = pipe(blob(32, x0=6.0).expand(16, 1, 32, 32), generator=torch.Generator().manual_seed(4))
    x, y = centroid(out)
    assert torch.allclose(labels[:, 3] + 1, x / 6, atol=0.05)  # a blob at (6, 0) moves to (6 cos a, -6 sin a)
    assert torch.allclose(-labels[:, 4], y / 6, atol=0.05)
    assert torch.allclose((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, torch.ones(16), atol=1e-5)


def test_same_generator_seed_gives_the_same_augmentation_without_touching_the_global_rng():
    images, pipe = smooth_images(32), AugmentPipe(0.5)
    state = torch.get_rng_state()
    first = pipe(images, generator=torch.Generator().manual_seed(7))
    second = pipe(images, generator=torch.Generator().manual_seed(7))
    other = pipe(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_output_range_is_roughly_preserved():
    images = smooth_images(64)
    out, _ = AugmentPipe(1)(images, generator=torch.Generator().manual_seed(5))
    assert out.abs().max() < 1.3
    assert abs(out.std() - images.std()) < 0.2 * images.std()


def test_grey_images_keep_one_channel():
    out, labels = AugmentPipe(1)(smooth_images(8, c=1), generator=torch.Generator().manual_seed(6))
    assert out.shape == (8, 1, 16, 16) and labels.shape == (8, 9) and torch.isfinite(out).all()


def test_bad_input_is_rejected_with_a_fix():
    with pytest.raises(ValueError, match="127.5"):
        AugmentPipe(0.1)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scale_std"):
        AugmentPipe(0.1, scale_std=-1)
