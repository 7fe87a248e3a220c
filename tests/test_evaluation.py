"""Evaluation: metric math, feature networks, references, the metric suite and best tracking (ALGORITHM.md §9).

Everything runs offline on tiny random feature networks that go through the same code paths as Inception/DINOv2.
Tests on the real networks run only when SIDA_INCEPTION_PT / SIDA_DINOV2_DIR point at local weights.
"""

import itertools
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sida_diffusers.evaluation import (
    BestTracker,
    DINOv2Features,
    InceptionFeatures,
    MetricSuite,
    append_metrics_jsonl,
    evaluate_repeats,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_reference,
    parse_result_key,
    plot_curves,
    precision_recall,
    register_feature_metric,
    result_keys,
    save_reference,
)


RES = 8


class ToyFeatures(torch.nn.Module):
    """Fixed random projection of the pixels: a stand-in feature network with a known dimension."""

    def __init__(self, channels=1, feature_dim=6, seed=0):
        super().__init__()
        self.feature_dim = feature_dim
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(channels * RES * RES, feature_dim, generator=g) / RES)

    def forward(self, x):
        return (x.flatten(1) / 255) @ self.proj


class TinyInception(torch.nn.Module):
    """Scriptable stand-in for inception-2015-12-05.pt with the same interface (layers, output, forward kwargs)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Conv2d(3, 2048, 2))
        self.output = torch.nn.Linear(2048, 10)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        features = self.layers((img.to(torch.float32) - 128.0) / 128.0).reshape(-1, 2048)
        if return_features:
            return features
        logits = features @ self.output.weight.T if no_output_bias else self.output(features)
        return torch.softmax(logits, dim=1)


@pytest.fixture
def tiny_inception_pt(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(TinyInception()).save(str(path))
    return path


def gaussian_images(mean, count, seed=0, channels=1, std=40.0):
    """uint8 images [count, C, RES, RES] with i.i.d. pixels around `mean`; sample i depends only on seed + i."""
    out = [torch.randn(channels, RES, RES, generator=torch.Generator().manual_seed(seed + i)) * std + mean
           for i in range(count)]
    return torch.stack(out).clamp(0, 255).to(torch.uint8)


class CountingSampler:
    """sample_fn(start, count) that records its calls."""

    def __init__(self, mean=128.0, seed=0, channels=1):
        self.mean, self.seed, self.channels, self.calls = mean, seed, channels, []

    def __call__(self, start, count):
        self.calls.append((start, count))
        return gaussian_images(self.mean, count, self.seed + start, self.channels)


def toy_reference(tmp_path, feature_dim=6, count=400, with_features=True, name="fd_toy"):
    suite = MetricSuite([name], num_samples=count, batch_size=100, device="cpu", progress=False,
                        extractors={name: ToyFeatures(feature_dim=feature_dim)})
    entries, meta = suite.reference_entries(CountingSampler(seed=10_000), count, with_features=with_features)
    return save_reference(tmp_path / "ref.npz", entries, meta, labels=np.arange(count) % 10)


# ---- statistics ------------------------------------------------------------------------------------------------------

def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    x = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    mu, sigma = feature_statistics(x, chunk_size=64)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), atol=1e-10)


def test_feature_statistics_refuses_one_sample_and_warns_on_rank_deficiency():
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.warns(UserWarning, match="rank-deficient"):
        feature_statistics(np.random.default_rng(0).normal(size=(4, 8)))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    mu, sigma = feature_statistics(np.random.default_rng(0).normal(size=(500, 16)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_grows_monotonically_with_a_shift_and_matches_the_closed_form():
    x = np.random.default_rng(0).normal(size=(500, 8))
    mu, sigma = feature_statistics(x)
    distances = [frechet_distance(mu, sigma, *feature_statistics(x + s)) for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in itertools.pairwise(distances))
    np.testing.assert_allclose(distances, [8 * s ** 2 for s in (0.0, 0.5, 1.0, 2.0, 4.0)], atol=1e-6)
    # Diagonal Gaussians: sum (m1 - m2)^2 + (sqrt(s1) - sqrt(s2))^2.
    d = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([4.0, 9.0]))
    assert d == pytest.approx(2 + (1 - 2) ** 2 + (2 - 3) ** 2)


def test_frechet_distance_survives_a_singular_product_and_rejects_mismatched_shapes():
    singular = np.diag([1.0, 0.0, 0.0])
    assert frechet_distance(np.zeros(3), singular, np.zeros(3), singular) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


def test_precision_and_recall_are_one_on_identical_sets_and_zero_on_disjoint_ones():
    x = np.random.default_rng(0).normal(size=(200, 4))
    assert precision_recall(x, x.copy(), k=3, batch_size=64) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)
    # Mode collapse onto one real sample: every fake is realistic, but almost no real sample is covered.
    collapsed = x[:1] + 0.01 * np.random.default_rng(1).normal(size=(20, 4))
    precision, recall = precision_recall(x, collapsed, k=3)
    assert precision == 1.0 and recall <= 2 / 200


def test_inception_score_of_a_constant_predictor_is_one_and_of_confident_even_classes_is_the_class_count():
    assert inception_score(np.full((100, 10), 0.1), splits=10) == pytest.approx((1.0, 0.0))
    confident = np.eye(10)[np.arange(100) % 10]
    assert inception_score(confident, splits=10)[0] == pytest.approx(10.0)
    assert inception_score(np.log(confident + 1e-30), splits=10, from_logits=True)[0] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="from_logits=True"):
        inception_score(np.random.default_rng(0).normal(size=(20, 10)), splits=2)


def test_kernel_inception_distance_is_near_zero_for_identical_or_same_distribution_sets_and_large_when_shifted():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    shifted = kernel_inception_distance(x, x + 1.0, num_subsets=5, max_subset_size=300)
    assert shifted > 5.0
    assert abs(kernel_inception_distance(x, x, num_subsets=5, max_subset_size=300)) < 0.01 * shifted
    assert abs(kernel_inception_distance(x, y, num_subsets=5, max_subset_size=300)) < 0.002 * shifted
    assert kernel_inception_distance(x, y, num_subsets=5, max_subset_size=100) == \
        kernel_inception_distance(x, y, num_subsets=5, max_subset_size=100)  # seeded subsets: reproducible


# ---- feature networks ------------------------------------------------------------------------------------------------

def test_inception_features_run_the_torchscript_file_in_both_modes(tiny_inception_pt):
    ref = torch.jit.load(str(tiny_inception_pt))
    grey = gaussian_images(128.0, 3).float()
    legacy = InceptionFeatures(tiny_inception_pt, mode="legacy_tensorflow")
    feats = legacy(grey)
    assert feats.shape == (3, 2048)
    torch.testing.assert_close(feats, ref(grey.expand(-1, 3, -1, -1), return_features=True))  # grey -> RGB
    torch.testing.assert_close(legacy.class_probs(feats), ref(grey.expand(-1, 3, -1, -1), no_output_bias=True))
    clean = InceptionFeatures(tiny_inception_pt, mode="clean")(grey)
    assert clean.shape == (3, 2048) and torch.isfinite(clean).all()
    with pytest.raises(ValueError, match="legacy_tensorflow"):
        InceptionFeatures(tiny_inception_pt, mode="tf")
    with pytest.raises(FileNotFoundError, match="--inception PATH"):
        InceptionFeatures(tiny_inception_pt.parent / "missing.pt")


def test_dinov2_features_use_edm2_preprocessing_and_the_pooler_output(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14)
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    net = DINOv2Features(tmp_path / "dinov2")
    images = gaussian_images(128.0, 2, channels=3).float()
    feats = net(images)
    assert net.feature_dim == 32 and feats.shape == (2, 32)
    x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(feats, net.model(pixel_values=x).pooler_output)
    with pytest.raises(FileNotFoundError, match="--dinov2 DIR"):
        DINOv2Features(tmp_path / "no-such-model")


# ---- references ------------------------------------------------------------------------------------------------------

def test_reference_npz_round_trips_entries_meta_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    entries = {"fid": {"mu": rng.normal(size=4), "sigma": np.eye(4), "features": rng.normal(size=(9, 4))},
               "fd_dinov2": {"mu": np.zeros(3), "sigma": 2 * np.eye(3)}}
    meta = {"fid": {"extractor": "inception", "inception_mode": "clean", "num_images": 9, "feature_dim": 4}}
    ref = load_reference(save_reference(tmp_path / "r.npz", entries, meta, labels=[3, 1, 4]))
    assert sorted(ref.entries) == ["fd_dinov2", "fid"] and sorted(ref.entries["fid"]) == ["features", "mu", "sigma"]
    np.testing.assert_allclose(ref.entries["fid"]["mu"], entries["fid"]["mu"])
    np.testing.assert_allclose(ref.entries["fd_dinov2"]["sigma"], 2 * np.eye(3))
    assert ref.meta == meta and ref.labels.tolist() == [3, 1, 4]


def test_edm_npz_and_edm2_pkl_references_are_read(tmp_path):
    np.savez(tmp_path / "cifar10-32x32.npz", mu=np.ones(5), sigma=np.eye(5))
    edm = load_reference(tmp_path / "cifar10-32x32.npz")
    assert list(edm.entries) == ["fid"] and edm.meta["fid"]["inception_mode"] == "legacy_tensorflow"
    for protocol in (2, 4, 5):
        refs = {"fid": {"mu": np.ones(5), "sigma": np.eye(5)}, "fd_dinov2": {"mu": np.zeros(3), "sigma": np.eye(3)}}
        (tmp_path / "img512.pkl").write_bytes(pickle.dumps(refs, protocol=protocol))
        edm2 = load_reference(tmp_path / "img512.pkl")
        assert sorted(edm2.entries) == ["fd_dinov2", "fid"]
        np.testing.assert_array_equal(edm2.entries["fd_dinov2"]["sigma"], np.eye(3))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_reference_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"fid": {"mu": _Exploit(marker)}}))
    with pytest.raises(ValueError, match="never pickled code"):
        load_reference(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_bad_reference_sources_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="sida-ref-stats"):
        load_reference(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="cleanfid:NAME/RES/SPLIT"):
        load_reference("cleanfid:cifar10-32-train")
    (tmp_path / "stats.txt").write_text("mu")
    with pytest.raises(ValueError, match=r"\.npz"):
        load_reference(tmp_path / "stats.txt")


# ---- the metric suite ------------------------------------------------------------------------------------------------

def test_metric_suite_scores_a_custom_extractor_with_honest_names(tmp_path):
    ref = toy_reference(tmp_path)
    close, far = CountingSampler(mean=128.0), CountingSampler(mean=200.0)
    suite = MetricSuite(["fd_toy"], ref, num_samples=300, batch_size=64, device="cpu", progress=False,
                        extractors={"fd_toy": ToyFeatures()})
    near_fd, far_fd = suite.evaluate(close), suite.evaluate(far)
    assert list(near_fd) == ["fd_toy_300"] == list(result_keys("fd_toy", 300))
    assert near_fd["fd_toy_300"] < 0.05 < far_fd["fd_toy_300"]
    assert close.calls == [(0, 64), (64, 64), (128, 64), (192, 64), (256, 44)]


@pytest.mark.parametrize("metric", ["fid", "is", "kid", "fd_dinov2", "fd_digits", "fd_toy"])
@pytest.mark.parametrize("count", [50000, 10000, 2000, 1797, 300])
def test_result_names_parse_back_to_their_metric_and_sample_count(metric, count):
    (key,) = result_keys(metric, count)
    assert parse_result_key(key) == (metric, count)
    precision, recall = result_keys("pr", count)
    assert parse_result_key(precision) == ("precision", count) and parse_result_key(recall) == ("recall", count)


@pytest.mark.parametrize("name", ["fid", "fid50k_full", "fd_digits", "FID_50k", "fid_50m"])
def test_names_the_suite_never_writes_are_refused(name):
    with pytest.raises(ValueError, match="is not a metric result name"):
        parse_result_key(name)


def test_metric_suite_runs_fid_is_kid_and_pr_through_the_inception_path(tmp_path, tiny_inception_pt):
    net = InceptionFeatures(tiny_inception_pt)
    real = gaussian_images(128.0, 120, seed=500, channels=3).float()
    with torch.no_grad():
        feats = net(real).numpy()
    np.savez(tmp_path / "ref.npz", **{"meta": json.dumps({"fid": {"inception_mode": "legacy_tensorflow"}}),
                                      "fid.mu": feats.mean(0), "fid.sigma": np.eye(2048), "fid.features": feats})
    suite = MetricSuite("is,kid,pr", tmp_path / "ref.npz", num_samples=100, batch_size=50, device="cpu",
                        inception=tiny_inception_pt, progress=False)
    out = suite.evaluate(CountingSampler(channels=3))
    assert sorted(out) == ["is_100", "kid_100", "precision_100", "recall_100"]
    assert out["is_100"] >= 1.0 and abs(out["kid_100"]) < 0.05 and out["precision_100"] > 0.5
    # FID on the same 2048-d features needs more samples than dimensions: refused before generating.
    sampler = CountingSampler(channels=3)
    with pytest.raises(ValueError, match="num_samples > 2048"):
        MetricSuite(["fid"], tmp_path / "ref.npz", num_samples=2000, device="cpu", inception=tiny_inception_pt,
                    progress=False).evaluate(sampler)
    assert sampler.calls == []
    with pytest.raises(ValueError, match="inception_mode='legacy_tensorflow'"):
        MetricSuite(["kid"], tmp_path / "ref.npz", num_samples=100, device="cpu", inception=tiny_inception_pt,
                    inception_mode="clean").validate()


@pytest.mark.parametrize("case, kwargs, error, message", [
    ("unknown metric", dict(metrics=["fid_typo"]), ValueError, "known metrics: fd_dinov2, fid, is, kid, pr"),
    ("missing reference", dict(reference="missing.npz"), FileNotFoundError, "sida-ref-stats"),
    ("no reference", dict(reference=None), ValueError, "need reference statistics"),
    ("wrong feature dim", dict(extractors={"fd_toy": ToyFeatures(feature_dim=5)}), ValueError, "6-d mu"),
    ("fewer samples than features", dict(num_samples=6), ValueError, "num_samples > 6"),
    ("missing entry", dict(metrics=["fd_other"], extractors={"fd_other": ToyFeatures()}), ValueError,
     "no 'fd_other' entry"),
    ("built-in name for a custom net", dict(extractors={"fid": ToyFeatures()}), ValueError, "built-in metric 'fid'"),
])
def test_bad_input_is_refused_before_any_sample_is_generated(tmp_path, case, kwargs, error, message):
    ref = toy_reference(tmp_path, with_features=False)
    args = dict(metrics=["fd_toy"], reference=ref, num_samples=100, device="cpu", progress=False,
                extractors={"fd_toy": ToyFeatures()})
    args.update(kwargs)
    if isinstance(args["reference"], str):
        args["reference"] = tmp_path / args["reference"]
    sampler = CountingSampler()
    with pytest.raises(error, match=message):
        MetricSuite(**args).evaluate(sampler)
    assert sampler.calls == [], case


def test_kid_against_a_reference_without_raw_features_is_refused_before_generating(tmp_path, tiny_inception_pt):
    np.savez(tmp_path / "cifar10-32x32.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    sampler = CountingSampler(channels=3)
    with pytest.raises(ValueError, match="--features"):
        MetricSuite(["pr"], tmp_path / "cifar10-32x32.npz", num_samples=100, device="cpu",
                    inception=tiny_inception_pt).evaluate(sampler)
    assert sampler.calls == []


def test_sample_fn_must_return_uint8_images(tmp_path):
    suite = MetricSuite(["fd_toy"], toy_reference(tmp_path), num_samples=100, device="cpu", progress=False,
                        extractors={"fd_toy": ToyFeatures()})
    with pytest.raises(ValueError, match="uint8"):
        suite.evaluate(lambda start, count: gaussian_images(128.0, count).float())


def test_registered_feature_metric_and_probed_feature_dim(tmp_path, monkeypatch):
    class Undeclared(torch.nn.Module):  # a feature network that does not announce its dimension
        def __init__(self):
            super().__init__()
            self.inner = ToyFeatures()

        def forward(self, x):
            return self.inner(x)

    monkeypatch.setattr("sida_diffusers.evaluation.suite._FEATURE_METRICS", {})  # keep the registry test-local
    register_feature_metric("fd_toy", Undeclared)
    ref = toy_reference(tmp_path)
    with pytest.raises(ValueError, match="image_shape"):
        MetricSuite(["fd_toy"], ref, num_samples=100, device="cpu").validate()
    suite = MetricSuite(["fd_toy"], ref, num_samples=100, device="cpu", image_shape=(1, RES, RES), progress=False)
    assert suite.feature_dim("fd_toy") == 6
    assert suite.evaluate(CountingSampler())["fd_toy_100"] < 0.1
    with pytest.raises(ValueError, match="built-in"):
        register_feature_metric("fid", ToyFeatures)


def test_evaluate_repeats_uses_fresh_seeds_per_run_and_reports_mean_and_std(tmp_path):
    suite = MetricSuite(["fd_toy"], toy_reference(tmp_path), num_samples=100, batch_size=100, device="cpu",
                        progress=False, extractors={"fd_toy": ToyFeatures()})
    samplers = []

    def make_sample_fn(first_seed):
        samplers.append(CountingSampler(seed=first_seed))
        return samplers[-1]

    out = evaluate_repeats(suite, make_sample_fn, repeats=3, seeds_start=7)
    assert [s.seed for s in samplers] == [7, 107, 207]
    values = out["fd_toy_100"]["values"]
    assert len(set(values)) == 3
    assert out["fd_toy_100"]["mean"] == pytest.approx(np.mean(values))
    assert out["fd_toy_100"]["std"] == pytest.approx(np.std(values, ddof=1))


# ---- best tracking ---------------------------------------------------------------------------------------------------

def test_best_tracker_keeps_the_best_value_and_its_kimg_and_survives_a_resume():
    tracker = BestTracker("fid_10k")
    assert [tracker.update(v, k) for v, k in [(5.0, 10), (6.0, 20), (float("nan"), 30), (4.0, 40), (4.0, 50)]] == \
        [True, False, False, True, False]
    assert (tracker.best, tracker.best_kimg) == (4.0, 40)
    resumed = BestTracker("fid_10k")
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.update_from({"fid_10k": 3.5}, 60) and resumed.best_kimg == 60
    with pytest.raises(KeyError, match="not among the computed results"):
        resumed.update_from({"is_10k": 9.0}, 70)
    with pytest.raises(ValueError, match="same tracked metric"):
        BestTracker("is_10k", mode="max").load_state_dict(tracker.state_dict())
    high = BestTracker("is_10k", mode="max")
    assert high.update(9.0, 1) and high.update(9.5, 2) and not high.update(9.2, 3)


def test_metrics_jsonl_and_curve_plot(tmp_path):
    log = tmp_path / "logs" / "metrics.jsonl"
    for kimg, fid in [(0, 30.0), (10, 12.0), (20, 8.5)]:
        append_metrics_jsonl(log, {"kimg": kimg, "fid_10k": fid})
    assert [json.loads(line)["fid_10k"] for line in log.read_text().splitlines()] == [30.0, 12.0, 8.5]
    png = plot_curves(log, tmp_path / "metric_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- real networks (only with local weights) -------------------------------------------------------------------------

@pytest.mark.skipif(not os.environ.get("SIDA_INCEPTION_PT"),
                    reason="set SIDA_INCEPTION_PT to a local inception-2015-12-05.pt to test the real Inception")
def test_real_inception_gives_2048_features_and_probabilities():
    net = InceptionFeatures(Path(os.environ["SIDA_INCEPTION_PT"]))
    feats = net(gaussian_images(128.0, 2, channels=3).float())
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(net.class_probs(feats).sum(1), torch.ones(2))


@pytest.mark.skipif(not os.environ.get("SIDA_DINOV2_DIR"),
                    reason="set SIDA_DINOV2_DIR to a local facebook/dinov2-large folder to test the real DINOv2")
def test_real_dinov2_gives_1024_features():
    net = DINOv2Features(os.environ["SIDA_DINOV2_DIR"])
    assert net(gaussian_images(128.0, 2, channels=3).float()).shape == (2, 1024)
