"""The embedded offline default: shipped digits teachers, the FD-digits classifier and its feature extractor."""

import json

import pytest
import torch

from sida_diffusers.digits import (
    ASSETS_DIR,
    DIGITS_ID2LABEL,
    FD_DIGITS,
    DigitsFeatureNet,
    digits_holdout_split,
    load_digits_classifier,
    load_digits_feature_extractor,
    load_digits_teacher,
    load_digits_tensors,
    register_digits_metric,
)
from sida_diffusers.networks.precond import EDMPrecond


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensors()


@pytest.fixture(scope="module")
def extractor():
    return load_digits_feature_extractor()


def test_digits_come_as_16x16_grey_uint8_with_ten_balanced_classes(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.uint8
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert labels.bincount().min() >= 170
    assert DIGITS_ID2LABEL == {i: str(i) for i in range(10)}


@pytest.mark.parametrize("conditional", [True, False])
def test_shipped_teacher_loads_offline_as_float32_edm_precond(conditional):
    teacher = load_digits_teacher(conditional=conditional)
    assert isinstance(teacher, EDMPrecond) and not teacher.training
    assert teacher.is_conditional is conditional and teacher.label_dim == (10 if conditional else 0)
    assert (teacher.img_channels, teacher.img_resolution, teacher.augment_dim) == (1, 16, 0)
    assert teacher.config.model_type == "SongUNet"
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}


@pytest.mark.parametrize("conditional", [True, False])
def test_teacher_denoises_real_digits_at_sigma_half_far_better_than_identity(digits, conditional):
    images, labels = digits
    x = images[::60].float() / 127.5 - 1  # 30 real digits in [-1, 1]
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoised = load_digits_teacher(conditional)(noisy, 0.5, labels[::60] if conditional else None)
    identity_mse, teacher_mse = (noisy - x).square().mean().item(), (denoised - x).square().mean().item()
    assert identity_mse == pytest.approx(0.25, rel=0.1)
    assert teacher_mse < 0.1 * identity_mse


def test_holdout_split_is_stratified_disjoint_and_deterministic(digits):
    _, labels = digits
    train_idx, heldout_idx = digits_holdout_split(labels)
    assert len(heldout_idx) == 360 and len(train_idx) == 1797 - 360
    assert not set(train_idx.tolist()) & set(heldout_idx.tolist())
    assert torch.equal(digits_holdout_split(labels)[1], heldout_idx)
    assert labels[heldout_idx].bincount().tolist() == pytest.approx((labels.bincount() * 0.2).tolist(), abs=1)
    with pytest.raises(ValueError, match="fraction"):
        digits_holdout_split(labels, holdout=20)


def test_classifier_recognises_at_least_97_percent_of_held_out_digits(digits):
    images, labels = digits
    _, heldout_idx = digits_holdout_split(labels)
    classifier = load_digits_classifier()
    with torch.no_grad():
        predicted = classifier(images[heldout_idx].float()).argmax(1)
    assert isinstance(classifier, DigitsFeatureNet) and not classifier.training
    assert (predicted == labels[heldout_idx]).float().mean().item() >= 0.97


def test_feature_extractor_is_frozen_and_maps_images_to_penultimate_features(digits, extractor):
    images, _ = digits
    with torch.no_grad():
        features = extractor(images[:8].float())
        assert torch.equal(extractor(images[:8]), features)  # uint8 input is accepted as well
    assert features.shape == (8, extractor.feature_dim) == (8, 64)
    assert features.dtype == torch.float32 and (features >= 0).all()  # post-ReLU activations
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())


def test_feature_extractor_rejects_rgb_images_with_a_fix(extractor):
    with pytest.raises(ValueError, match=r"\[N, 1, 16, 16\].*convert RGB to one channel"):
        extractor(torch.zeros(2, 3, 16, 16))


def test_fd_digits_separates_real_digits_from_shuffled_pixels(digits, extractor):
    from sida_diffusers.evaluation import feature_statistics, frechet_distance

    images, labels = digits
    train_idx, heldout_idx = digits_holdout_split(labels)
    shuffled = images.flatten(1)[:, torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        stats = [feature_statistics(extractor(x.reshape(-1, 1, 16, 16).float()).numpy())
                 for x in (images[train_idx], images[heldout_idx], shuffled[heldout_idx])]
    real_vs_real = frechet_distance(*stats[0], *stats[1])
    real_vs_shuffled = frechet_distance(*stats[0], *stats[2])
    assert 0 < real_vs_real < 0.05 * real_vs_shuffled


def test_register_digits_metric_makes_fd_digits_available(monkeypatch):
    from sida_diffusers.evaluation import available_metrics, suite

    monkeypatch.setattr(suite, "_FEATURE_METRICS", {})  # whatever ran before, fd_digits is not registered yet
    assert FD_DIGITS == "fd_digits" and FD_DIGITS not in available_metrics()
    register_digits_metric()
    assert FD_DIGITS in available_metrics() and suite._FEATURE_METRICS[FD_DIGITS] is load_digits_feature_extractor


@pytest.mark.parametrize("name", ["digits_teacher_cond", "digits_teacher_uncond", "digits_classifier"])
def test_shipped_assets_are_one_small_safetensors_file_plus_config(name):
    files = sorted(p.name for p in (ASSETS_DIR / name).iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert all((ASSETS_DIR / name / f).stat().st_size < 2 * 2 ** 20 for f in files)
    assert "_class_name" in json.loads((ASSETS_DIR / name / "config.json").read_text())


def test_missing_assets_raise_file_not_found_naming_the_script_that_recreates_them(tmp_path, monkeypatch):
    monkeypatch.setattr("sida_diffusers.digits.ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"digits_teacher_uncond.*examples/train_teacher.py"):
        load_digits_teacher(conditional=False)
    with pytest.raises(FileNotFoundError, match="examples/train_digits_classifier.py"):
        load_digits_feature_extractor()
