"""Checkpoints survive SIGKILL and `--resume_from_checkpoint latest` continues exactly where the run stopped."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from sida_diffusers.checkpoints import load_denoiser
from sida_diffusers.training import SiDATrainer, list_checkpoints, parse_args
from test_trainer import params, tiny_teacher

# A training process that SIGKILLs itself at a chosen point of checkpoint number KILL_AT (in images).
KILLED_RUN = """
import os, signal, sys, torch
from sida_diffusers.training import SiDATrainer, parse_args

torch.set_num_threads(1)
when, kill_at = sys.argv[1], int(sys.argv[2])

class KilledTrainer(SiDATrainer):
    def save_checkpoint(self):
        path = super().save_checkpoint()
        if when == "after" and self.cur_nimg == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def _write_checkpoint(self, folder, per_rank):
        if when == "during" and self.cur_nimg == kill_at:
            self.unwrap(self.generator).save_pretrained(folder / "generator")  # half written
            os.kill(os.getpid(), signal.SIGKILL)
        super()._write_checkpoint(folder, per_rank)

KilledTrainer(parse_args(sys.argv[3:])).train()
"""


def flags(teacher_dir, out, max_kimg):
    return ["--teacher", str(teacher_dir), "--method", "sida", "--train_data", "digits", "--resolution", "8",
            "--train_batch_size", "4", "--total_batch_size", "8", "--warmup_kimg", "0.008",
            "--adversarial_start_kimg", "0.016", "--max_train_kimg", str(max_kimg), "--checkpointing_kimg", "0.016",
            "--log_every_kimg", "0.008", "--lr", "1e-3", "--glr", "1e-3", "--ema_halflife_kimg", "0.05",
            "--sample_grid_size", "0", "--seed", "5", "--cpu", "--output_dir", str(out)]


def run_killed(tmp_path, when, kill_at, out, max_kimg):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN)
    proc = subprocess.run([sys.executable, str(script), when, str(kill_at), *flags(tmp_path / "teacher", out, max_kimg)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def resumed(tmp_path, out, max_kimg):
    return SiDATrainer(parse_args(flags(tmp_path / "teacher", out, max_kimg) + ["--resume_from_checkpoint", "latest"]))


def losses(out):
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A run to 0.032 kimg (4 iterations) without interruption: the reference."""
    tmp_path = tmp_path_factory.mktemp("reference")
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed subprocess, so that float results match
    trainer = SiDATrainer(parse_args(flags(tmp_path / "teacher", tmp_path / "run", 0.032)))
    trainer.train()
    yield {name: params(trainer.unwrap(getattr(trainer, name))) for name in ("generator", "generator_ema",
                                                                             "fake_score")}, losses(tmp_path / "run")
    torch.set_num_threads(threads)


def assert_same_run(trainer, out, reference):
    nets, stats = reference
    for name, expected in nets.items():
        torch.testing.assert_close(params(trainer.unwrap(getattr(trainer, name))), expected, rtol=1e-5, atol=1e-6)
    resumed_stats = {round(s["kimg"], 3): s for s in losses(out)}
    for s in stats:
        if round(s["kimg"], 3) > 0.016:  # the steps done after the resume
            got = resumed_stats[round(s["kimg"], 3)]
            for key in ("fake_score_loss", "d_loss", "g_loss", "g_gan_loss"):
                assert got[key] == pytest.approx(s[key], rel=1e-4), key


@pytest.mark.slow
def test_killed_after_a_checkpoint_then_resumed_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    run_killed(tmp_path, "after", 16, out, 0.032)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000000016"]
    trainer = resumed(tmp_path, out, 0.032)
    assert trainer.cur_nimg == 16
    trainer.train()
    assert_same_run(trainer, out, uninterrupted)


@pytest.mark.slow
def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path, uninterrupted):
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    run_killed(tmp_path, "during", 32, out, 0.032)
    assert (out / "checkpoints" / ".tmp-checkpoint-000000032" / "generator").is_dir()  # the interrupted write
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000000016"]
    trainer = resumed(tmp_path, out, 0.032)
    assert trainer.cur_nimg == 16
    saved = load_denoiser(out / "checkpoints" / "checkpoint-000000016" / "generator")
    torch.testing.assert_close(params(trainer.unwrap(trainer.generator)), params(saved), rtol=0, atol=0)
    trainer.train()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000000016", "checkpoint-000000032"]
    assert not (out / "checkpoints" / ".tmp-checkpoint-000000032").exists()
    assert_same_run(trainer, out, uninterrupted)
