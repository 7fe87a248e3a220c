"""One path each: a run's grids, its export and sida-export all go through the pipeline the trainer holds, the one
grid function and the run record, so the same run and seeds give the same pixels and the same card everywhere."""

import json

import numpy as np
import PIL.Image
import pytest

from sida_diffusers.cli import export as export_cli
from sida_diffusers.cli import sample as sample_cli
from sida_diffusers.pipelines import SiDAPipeline, seed_generators
from sida_diffusers.run_record import RunRecord
from sida_diffusers.training import SiDATrainer, latest_checkpoint

from conftest import tiny_config, tiny_teacher


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits8):
    """A finished tiny SiDA run on 8x8 digits with a 2x2 grid at every checkpoint, and its trainer."""
    root = tmp_path_factory.mktemp("one_path")
    trainer = SiDATrainer(tiny_config(root, sample_grid_size=2), teacher=tiny_teacher(), dataset=digits8)
    trainer.train()
    return root / "run", trainer


def pixels(path):
    return np.asarray(PIL.Image.open(path))


def test_the_training_grid_the_exported_grid_and_sida_sample_grid_are_the_same_pixels(run, tmp_path):
    out, _ = run
    training = pixels(out / "samples" / "fakes_000000.png")  # the grid of the last checkpoint
    exported = pixels(out / "pipeline" / "samples_grid.png")
    assert sample_cli.main([str(out / "pipeline"), "--seeds", "0-3", "--grid", str(tmp_path / "grid.png"),
                            "--device", "cpu"]) == 0
    sampled = pixels(tmp_path / "grid.png")
    assert training.shape == (256, 256)  # 2x2 images of 8 px, enlarged 16x
    np.testing.assert_array_equal(training, exported)
    np.testing.assert_array_equal(training, sampled)
    # each 16x16 block is one pixel of the image of its seed, labels drawn from the seed (per-seed labels)
    pipe = SiDAPipeline.from_pretrained(out / "pipeline")
    seed_two = pipe(generator=seed_generators([2]), output_type="np").images[0]
    np.testing.assert_array_equal(training[128::16, 0:128:16], np.round(seed_two[..., 0] * 255).astype(np.uint8))


def test_the_export_is_the_pipeline_the_trainer_holds_with_its_run_record(run):
    out, trainer = run
    assert RunRecord.read(out / "pipeline") == trainer.record(trainer.last_metrics, None)
    loaded = SiDAPipeline.from_pretrained(out / "pipeline")
    for key in ("init_sigma", "id2label", "latent_scale", "latent_bias"):
        assert loaded.config[key] == trainer.pipeline.config[key], key
    kwargs = dict(batch_size=3, generator=seed_generators([5, 6, 7]), output_type="np")
    np.testing.assert_array_equal(loaded(**kwargs).images, trainer.pipeline(**{**kwargs, "generator":
                                                                              seed_generators([5, 6, 7])}).images)
    config = json.loads((out / "pipeline" / "unet" / "config.json").read_text())
    assert "_name_or_path" not in config and "_name_or_path" not in (out / "pipeline" / "model_index.json").read_text()


def test_sida_export_of_the_run_gives_the_runs_own_card_apart_from_the_repo_id(run, tmp_path):
    out, _ = run
    assert latest_checkpoint(out) == out / "checkpoints" / "checkpoint-000000032"
    assert export_cli.main([str(out), str(tmp_path / "dst"), "--device", "cpu"]) == 0
    for name in ("README.md", "run_info.json", "samples_grid.png", "model_index.json", "unet/config.json"):
        assert (tmp_path / "dst" / name).read_bytes() == (out / "pipeline" / name).read_bytes(), name
    assert export_cli.main([str(out), str(tmp_path / "named"), "--device", "cpu", "--no-grid"]) == 0
    assert export_cli.main([str(out / "checkpoints" / "checkpoint-000000016"), str(tmp_path / "older"),
                            "--device", "cpu", "--no-grid"]) == 0
    assert RunRecord.read(tmp_path / "older").cur_nimg == 16  # an earlier checkpoint keeps its own record
