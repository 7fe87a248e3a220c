"""The trainer speaks Accelerate's and the Diffusers examples' language: launch precision, flag spellings, trackers."""

import json
import subprocess
import sys

import numpy as np
import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from sida_diffusers.training import SiDATrainer, make_config, parse_args
from sida_diffusers.training.config import resolve_mixed_precision

from conftest import REPO_ROOT, tiny_config, tiny_teacher


# ---- precision: the flag, else Accelerate's launch setting, else the preset ------------------------------------------

def test_accelerate_precision_is_taken_when_the_flag_is_not_given(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert parse_args([]).mixed_precision == "bf16"
    assert parse_args(["--preset", "edm2-s"]).mixed_precision == "bf16"  # the launch beats the preset's fp16
    assert parse_args(["--mixed_precision", "bf16"]).mixed_precision == "bf16"  # both given and agreeing


def test_accelerate_no_is_no_choice_so_the_preset_and_flag_stand(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` exports when nothing is set
    assert parse_args(["--preset", "edm2-s"]).mixed_precision == "fp16"
    assert parse_args(["--mixed_precision", "fp16"]).mixed_precision == "fp16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert parse_args([]).mixed_precision == "no"


def test_a_flag_that_disagrees_with_accelerate_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="--mixed_precision bf16 disagrees with Accelerate's mixed precision 'fp16'"):
        parse_args(["--mixed_precision", "bf16"])
    with pytest.raises(ValueError, match="does not support"):
        resolve_mixed_precision(None, "no", "fp8")


def test_accelerate_launch_bf16_reaches_the_run_config(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "bf16", "--dynamo_backend", "no", str(REPO_ROOT / "examples" / "train_sida.py"),
         "--output_dir", str(out), "--max_train_kimg", "0.064", "--eval_every_kimg", "0", "--sample_grid_size", "0",
         "--train_batch_size", "64", "--seed", "0", "--cpu"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "bf16"
    assert "bf16 autocast" in proc.stdout + proc.stderr


# ---- flags ------------------------------------------------------------------------------------------------------------

def test_paper_names_and_descriptive_names_and_hyphens_are_one_flag():
    cfg = parse_args(["--lsg", "50", "--lsd=3", "--adversarial-loss-scale", "0.5", "--fake_score_loss_scale", "2",
                      "--train-batch-size", "16", "--total-batch-size", "32", "--no-allow-tf32"])
    assert (cfg.sid_loss_scale, cfg.discriminator_loss_scale, cfg.adversarial_loss_scale,
            cfg.fake_score_loss_scale) == (50, 3, 0.5, 2)
    assert (cfg.train_batch_size, cfg.total_batch_size, cfg.allow_tf32) == (16, 32, False)
    assert make_config(lsg_gan=0.1).adversarial_loss_scale == 0.1  # programmatic use takes the paper names too


@pytest.mark.parametrize("flag, ours", [("--learning_rate", "--lr"), ("--gradient_accumulation_steps",
                                                                       "--total_batch_size"),
                                        ("--max_train_steps", "--max_train_kimg"),
                                        ("--checkpointing-steps", "--checkpointing_kimg")])
def test_diffusers_example_flags_are_refused_with_our_equivalent(flag, ours):
    with pytest.raises(ValueError, match=f"not a flag of the SiD/SiDA trainer.*{ours}"):
        parse_args([flag, "10"])


def test_train_sida_answers_bad_flags_with_one_line_and_exit_2(tmp_path):
    for flags in (["--max_train_steps", "100"], ["--train_batch_size", "0"], ["--train_batch_size", "-4"],
                  ["--total_batch_size", "-64"]):
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "train_sida.py"), *flags,
                               "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (flags, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("train_sida: error:"), proc.stderr
        assert not (tmp_path / "run").exists()


# ---- trackers: scalars, evaluations and sample grids, stepped by images seen ------------------------------------------

class RecordingTracker(GeneralTracker):
    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.values, self.images = [], []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.values.append((step, dict(values)))

    def log_images(self, values, step=None, **kwargs):
        self.images.append((step, {k: np.asarray(v).shape for k, v in values.items()}))


def test_trackers_get_losses_evaluations_and_sample_grids_stepped_by_images(tmp_path, digits8):  # noqa: F811
    from sida_diffusers.evaluation import register_feature_metric

    from conftest import pixel_features

    register_feature_metric("fd_pixels8", pixel_features)
    tracker = RecordingTracker()
    cfg = tiny_config(tmp_path, eval_metrics=["fd_pixels8"], eval_every_kimg=0.016, eval_num_samples=16,
                      eval_batch_size=16)
    SiDATrainer(cfg, accelerator=Accelerator(cpu=True, log_with=[tracker]), teacher=tiny_teacher(),
                dataset=digits8).train()
    steps_with = lambda key: [step for step, values in tracker.values if key in values]
    assert steps_with("g_loss") == [8, 16, 24, 32] and steps_with("sec_per_kimg") == [8, 16, 24, 32]
    assert steps_with("fd_pixels8_16") == [16, 32]
    # a 2x2 grid of 8 px images, enlarged 16x to 256 px like every grid
    assert tracker.images == [(16, {"samples": (1, 256, 256, 3)}), (32, {"samples": (1, 256, 256, 3)})]
