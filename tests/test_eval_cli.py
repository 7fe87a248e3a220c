"""sida-eval and sida-ref-stats end to end on a tiny saved pipeline and a registered toy feature network, no weights."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sida_diffusers.cli import evaluate as eval_cli
from sida_diffusers.evaluation import MetricSuite, load_reference, register_feature_metric, save_reference
from sida_diffusers.networks.precond import EDMPrecond
from sida_diffusers.pipelines import SiDAPipeline


RES, LABEL_DIM = 8, 3


class ToyFeatures(torch.nn.Module):
    """Fixed random projection of grey 8x8 pixels to 4 features."""

    feature_dim = 4

    def __init__(self):
        super().__init__()
        self.register_buffer("proj", torch.randn(RES * RES, 4, generator=torch.Generator().manual_seed(0)) / RES)

    def forward(self, x):
        return (x.flatten(1) / 255) @ self.proj


@pytest.fixture
def toy_metric(monkeypatch):
    monkeypatch.setattr("sida_diffusers.evaluation.suite._FEATURE_METRICS", {})  # keep the registry test-local
    register_feature_metric("fd_toy", ToyFeatures)
    return "fd_toy"


@pytest.fixture
def pipeline_dir(tmp_path):
    unet = EDMPrecond.from_official_kwargs(dict(
        img_resolution=RES, img_channels=1, label_dim=LABEL_DIM, model_type="SongUNet", model_channels=16,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)).eval()
    SiDAPipeline(unet).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


@pytest.fixture
def call_log(monkeypatch):
    """Records the class indices every pipeline call generates with (however they were chosen)."""
    calls, original = [], SiDAPipeline.prepare_class_labels

    def spy(self, *args, **kwargs):
        labels = original(self, *args, **kwargs)
        calls.append(None if labels is None else labels.argmax(1).tolist())
        return labels

    monkeypatch.setattr(SiDAPipeline, "prepare_class_labels", spy)
    return calls


def toy_reference(path, labels):
    suite = MetricSuite(["fd_toy"], num_samples=40, batch_size=40, device="cpu", progress=False)
    images = lambda start, count: torch.randint(0, 256, (count, 1, RES, RES), dtype=torch.uint8)
    entries, meta = suite.reference_entries(images, 40)
    return save_reference(path, entries, meta, labels=labels)


def test_sida_eval_runs_repeats_with_dataset_labels_and_writes_json(tmp_path, toy_metric, pipeline_dir, call_log):
    ref = toy_reference(tmp_path / "ref.npz", labels=np.full(40, 2))
    argv = [str(pipeline_dir), "--metrics", toy_metric, "--ref", str(ref), "--num-samples", "20", "--repeats", "2",
            "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "results.json")]
    assert eval_cli.main(argv) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    result = record["results"]["fd_toy_20"]
    assert len(result["values"]) == 2 and result["values"][0] != result["values"][1]  # fresh seeds per run
    assert result["mean"] == pytest.approx(np.mean(result["values"]))
    assert [len(labels) for labels in call_log] == [8, 8, 4] * 2
    assert {label for labels in call_log for label in labels} == {2}  # drawn from the reference's label list
    # Same seeds, same numbers: the evaluation is reproducible.
    assert eval_cli.main(argv) == 0
    assert json.loads((tmp_path / "results.json").read_text())["results"]["fd_toy_20"]["values"] == result["values"]


def test_sida_eval_refuses_bad_input_before_generating(tmp_path, toy_metric, pipeline_dir, call_log, capsys):
    ref = toy_reference(tmp_path / "ref.npz", labels=np.full(40, 7))
    cases = [(["--ref", str(tmp_path / "missing.npz")], "sida-ref-stats"),
             (["--ref", str(ref), "--metrics", "fid_typo"], "unknown metric"),
             (["--ref", str(ref), "--num-samples", "4"], "num_samples > 4"),
             (["--ref", str(ref)], "label_dim=3")]
    for extra, message in cases:
        argv = [str(pipeline_dir), "--metrics", toy_metric, "--num-samples", "20", "--device", "cpu", *extra]
        with pytest.raises(SystemExit) as exit_info:
            eval_cli.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert call_log == []


def test_label_files_in_edm_and_numpy_formats(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["a.png", 3], ["b.png", 1]]}))
    np.save(tmp_path / "labels.npy", np.eye(4, dtype=np.float32)[[2, 0]])
    assert eval_cli.load_label_pool(tmp_path / "dataset.json").tolist() == [3, 1]
    assert eval_cli.load_label_pool(tmp_path / "labels.npy").tolist() == [2, 0]
    with pytest.raises(FileNotFoundError, match="--labels"):
        eval_cli.load_label_pool(tmp_path / "none.json")


def test_sida_ref_stats_writes_a_reference_sida_eval_can_read(tmp_path, toy_metric):
    from sida_diffusers.cli import ref_stats

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (RES, RES), dtype=np.uint8), mode="L").save(folder / f"{i:03d}.png")
    out = tmp_path / "ref.npz"
    assert ref_stats.main([str(folder), str(out), "--metrics", toy_metric, "--features", "--batch-size", "5",
                           "--device", "cpu"]) == 0
    ref = load_reference(out)
    assert ref.entries["fd_toy"]["features"].shape == (12, 4)
    assert ref.meta["fd_toy"]["num_images"] == 12 and ref.meta["fd_toy"]["feature_dim"] == 4
    assert ref.labels is None  # an image folder has no classes, so sida-eval will draw labels uniformly
