"""Checkpoints survive SIGKILL and `--resume_from_checkpoint latest` continues exactly where the run stopped."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from sida_diffusers.pretrained import load_denoiser
from sida_diffusers.training import SiDATrainer, list_checkpoints, parse_args

from conftest import params, tiny_teacher


# A training process that SIGKILLs itself at a chosen point of the checkpoint written at KILL_AT images: "after" it
# is complete, or "during" its write (the networks written, the training state not yet).
KILLED_RUN = """
import os, signal, sys, torch
import sida_diffusers.training.checkpointing as checkpointing
from sida_diffusers.training import SiDATrainer, parse_args

when, kill_at = sys.argv[1], int(sys.argv[2])
save_state = checkpointing.save_state

def save_state_or_die(folder, state):
    if when == "during" and state["cur_nimg"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    save_state(folder, state)

checkpointing.save_state = save_state_or_die

class KilledTrainer(SiDATrainer):
    def save_checkpoint(self):
        path = super().save_checkpoint()
        if when == "after" and self.cur_nimg == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

KilledTrainer(parse_args(sys.argv[3:])).train()
"""


def flags(teacher_dir, out, max_kimg, extra=()):
    return [*extra, "--teacher", str(teacher_dir), "--method", "sida", "--train_data", "digits", "--resolution", "8",
            "--train_batch_size", "4", "--total_batch_size", "8", "--warmup_kimg", "0.008",
            "--adversarial_start_kimg", "0.016", "--max_train_kimg", str(max_kimg), "--checkpointing_kimg", "0.008",
            "--log_every_kimg", "0.008", "--lr", "1e-3", "--glr", "1e-3", "--ema_halflife_kimg", "0.05",
            "--sample_grid_size", "0", "--seed", "5", "--cpu", "--output_dir", str(out)]


def run_killed(tmp_path, when, kill_at, out, max_kimg, resume=False, extra=()):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN)
    resume_flags = ["--resume_from_checkpoint", "latest"] if resume else []
    proc = subprocess.run([sys.executable, str(script), when, str(kill_at),
                           *flags(tmp_path / "teacher", out, max_kimg, extra), *resume_flags],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def resumed(tmp_path, out, max_kimg, extra=()):
    return SiDATrainer(parse_args(flags(tmp_path / "teacher", out, max_kimg, extra)
                                  + ["--resume_from_checkpoint", "latest"]))


def losses(out):
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


def uninterrupted_run(tmp_path_factory, extra=()):
    """A run to 0.032 kimg (4 iterations) without interruption: the reference."""
    tmp_path = tmp_path_factory.mktemp("reference")
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed subprocess, so that float results match
    trainer = SiDATrainer(parse_args(flags(tmp_path / "teacher", tmp_path / "run", 0.032, extra)))
    trainer.train()
    torch.set_num_threads(threads)
    return {name: params(trainer.unwrap(getattr(trainer, name))) for name in ("generator", "generator_ema",
                                                                              "fake_score")}, losses(tmp_path / "run")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return uninterrupted_run(tmp_path_factory)


def assert_same_run(trainer, out, reference):
    """Bit for bit: the same parameters and, for every logged iteration, the same losses."""
    nets, stats = reference
    for name, expected in nets.items():
        torch.testing.assert_close(params(trainer.unwrap(getattr(trainer, name))), expected, rtol=0, atol=0)
    logged = {round(s["kimg"], 3): s for s in losses(out)}
    for s in stats:
        for key in ("fake_score_loss", "d_loss", "g_loss", "g_gan_loss"):
            assert logged[round(s["kimg"], 3)][key] == s[key], (s["kimg"], key)


@pytest.mark.slow
def test_three_kills_after_checkpoints_then_resumed_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    for trial, kill_at in enumerate((8, 16, 24)):  # each trial resumes the previous one's latest checkpoint
        run_killed(tmp_path, "after", kill_at, out, 0.032, resume=trial > 0)
        assert list_checkpoints(out)[-1].name == f"checkpoint-{kill_at:09d}"
    trainer = resumed(tmp_path, out, 0.032)
    assert trainer.cur_nimg == 24
    trainer.train()
    assert_same_run(trainer, out, uninterrupted)


@pytest.mark.slow
def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path, uninterrupted):
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    run_killed(tmp_path, "during", 32, out, 0.032)
    assert (out / "checkpoints" / ".tmp-checkpoint-000000032" / "generator").is_dir()  # the interrupted write
    assert list_checkpoints(out)[-1].name == "checkpoint-000000024"
    trainer = resumed(tmp_path, out, 0.032)
    assert trainer.cur_nimg == 24
    saved = load_denoiser(out / "checkpoints" / "checkpoint-000000024" / "generator")
    torch.testing.assert_close(params(trainer.unwrap(trainer.generator)), params(saved), rtol=0, atol=0)
    trainer.train()
    assert list_checkpoints(out)[-1].name == "checkpoint-000000032"
    assert not (out / "checkpoints" / ".tmp-checkpoint-000000032").exists()
    assert_same_run(trainer, out, uninterrupted)


# A four-step generator (ALGORITHM.md §11), k* drawn per iteration: seed 5 draws k* = 1, 1, 3, 4.
FOUR_STEPS = ("--num_steps", "4", "--step_sigmas", "karras")


@pytest.mark.slow
def test_a_four_step_run_killed_and_resumed_draws_the_same_steps_and_equals_the_uninterrupted_run(tmp_path,
                                                                                                   tmp_path_factory):
    reference = uninterrupted_run(tmp_path_factory, FOUR_STEPS)
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    run_killed(tmp_path, "after", 16, out, 0.032, extra=FOUR_STEPS)
    trainer = resumed(tmp_path, out, 0.032, FOUR_STEPS)
    assert trainer.cur_nimg == 16
    trainer.train()
    assert_same_run(trainer, out, reference)
