"""Diffusers/Accelerate habits on the trainer: one run per output folder, bare checkpoint names, Diffusers' flag names,
honest precision, and a Hub push that is checked before the first step and never loses the pipeline."""

import contextlib
import json
import subprocess
import sys
from unittest import mock

import pytest

from sida_diffusers.run_record import RunRecord
from sida_diffusers.training import SiDATrainer, build_parser, parse_args, resolve_checkpoint
from sida_diffusers.training.config import DIFFUSERS_FLAGS

from conftest import REPO_ROOT, tiny_config, tiny_teacher


def train(tmp_path, digits8, **overrides):
    trainer = SiDATrainer(tiny_config(tmp_path, sample_grid_size=0, **overrides), teacher=tiny_teacher(),
                          dataset=digits8)
    return trainer, trainer.train()


def hub(role="write", token="stored-token", whoami_error=None, offline=False):
    """The Hub as check_push_access sees it, without a network."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("huggingface_hub.get_token", return_value=token))
    stack.enter_context(mock.patch("huggingface_hub.is_offline_mode", return_value=offline))
    whoami = {"name": "me", "auth": {"accessToken": {"role": role}}}
    stack.enter_context(mock.patch("huggingface_hub.whoami", return_value=whoami, side_effect=whoami_error))
    return stack


# ---- one run per output folder ------------------------------------------------------------------------------------------

def test_a_fresh_run_into_a_used_output_dir_is_refused_with_the_flags_that_continue_or_start_over(tmp_path, digits8):
    train(tmp_path, digits8)
    out = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ValueError, match="already holds a run .* --resume_from_checkpoint latest, .* "
                                         "--overwrite_output_dir"):
        SiDATrainer(tiny_config(tmp_path), teacher=tiny_teacher(), dataset=digits8)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "train_sida.py"), "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--overwrite_output_dir" in proc.stderr


def test_overwrite_output_dir_starts_over_and_nothing_of_the_earlier_run_is_left(tmp_path, digits8):
    train(tmp_path, digits8, max_train_kimg=0.048)
    out = tmp_path / "run"
    (out / "notes.txt").write_text("mine")  # not a run file: left alone
    train(tmp_path, digits8, overwrite_output_dir=True)
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [s["kimg"] for s in stats] == [0.008, 0.016, 0.024, 0.032]  # one run's log, not two
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000000016", "checkpoint-000000032"]
    assert (out / "notes.txt").read_text() == "mine"


def test_resuming_and_overwriting_at_once_is_refused(tmp_path, digits8):
    with pytest.raises(ValueError, match="pass one of them"):
        SiDATrainer(tiny_config(tmp_path, resume_from_checkpoint="latest", overwrite_output_dir=True),
                    teacher=tiny_teacher(), dataset=digits8)


def test_a_bare_checkpoint_name_resumes_as_in_diffusers(tmp_path, digits8):
    train(tmp_path, digits8)
    out = tmp_path / "run"
    expected = out / "checkpoints" / "checkpoint-000000016"
    assert resolve_checkpoint("checkpoint-000000016", out) == expected
    assert resolve_checkpoint("checkpoint-16", out) == expected
    with pytest.raises(FileNotFoundError, match="checkpoint-000000016, checkpoint-000000032"):
        resolve_checkpoint("checkpoint-24", out)
    trainer = SiDATrainer(tiny_config(tmp_path, resume_from_checkpoint="checkpoint-000000016"),
                          teacher=tiny_teacher(), dataset=digits8)
    assert trainer.cur_nimg == 16


# ---- Diffusers' flags -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, field", [("--pretrained_model_name_or_path", "teacher"),
                                         ("--dataset_name", "train_data"), ("--train_data_dir", "train_data"),
                                         ("--tracker_project_name", "tracker_project_name"),
                                         ("--hub_token", "hub_token")])
def test_diffusers_flags_with_our_meaning_are_aliases(flag, field):
    assert getattr(parse_args([flag, "some/value"]), field) == "some/value"
    assert getattr(parse_args([flag.replace("_", "-"), "some/value"]), field) == "some/value"


@pytest.mark.parametrize("flag", sorted(DIFFUSERS_FLAGS))
def test_diffusers_flags_with_another_meaning_point_to_ours_in_one_line(flag):
    with pytest.raises(ValueError) as error:
        parse_args([f"--{flag}", "1"])
    assert str(error.value) == f"--{flag} is not a flag of the SiD/SiDA trainer: {DIFFUSERS_FLAGS[flag]}."


def test_every_help_line_names_at_most_one_default():
    for action in build_parser()._actions:
        assert (action.help or "").count("default") <= 1, action.dest


def test_the_tracker_run_is_named_by_tracker_project_name_and_the_token_is_never_written(tmp_path, digits8):
    from accelerate import Accelerator

    with mock.patch.object(Accelerator, "init_trackers") as init:
        trainer, _ = train(tmp_path, digits8, tracker_project_name="my-project", hub_token="hf_secret")
    assert init.call_args.args[0] == "my-project" and "hub_token" not in init.call_args.kwargs["config"]
    out = tmp_path / "run"
    assert all("hf_secret" not in p.read_text(errors="ignore") for p in out.rglob("*.json"))


# ---- precision ---------------------------------------------------------------------------------------------------------

def test_fp16_on_a_cpu_says_it_trains_in_fp32_and_records_what_ran(tmp_path, digits8, capsys):
    trainer, pipeline = train(tmp_path, digits8, mixed_precision="fp16")
    assert "on cpu this run trains in float32 and records mixed_precision 'no'" in capsys.readouterr().out
    assert trainer.cfg.mixed_precision == "no" and not trainer.unwrap(trainer.generator).config.use_fp16
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mixed_precision"] == "no"
    assert RunRecord.read(pipeline).mixed_precision == "no"
    assert "| precision (what ran) | no |" in (pipeline / "README.md").read_text()


# ---- the Hub push ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hub_state, overrides, problem", [
    (dict(offline=True), {}, "offline here .HF_HUB_OFFLINE=1."),
    (dict(token=None), {}, "no Hugging Face token .* --hub_token"),
    (dict(role="read"), {}, "can only read"),
    (dict(whoami_error=ConnectionError("connection refused")), {}, "could not be reached .*connection refused"),
    (dict(), {"hub_model_id": "not a repo id!"}, "is not a Hub repo id"),
])
def test_push_to_hub_is_checked_before_the_first_step(tmp_path, digits8, hub_state, overrides, problem):
    with hub(**hub_state), pytest.raises(ValueError, match=problem):
        SiDATrainer(tiny_config(tmp_path, push_to_hub=True, **overrides), teacher=tiny_teacher(), dataset=digits8)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_push_that_fails_at_the_end_keeps_the_pipeline_and_says_how_to_push_it(tmp_path, digits8, capsys):
    publishing = "sida_diffusers.pipelines.publishing"
    with hub(), mock.patch(f"{publishing}.create_repo") as create, \
            mock.patch(f"{publishing}.upload_folder", side_effect=ConnectionError("connection reset")):
        create.return_value.repo_id = "me/tiny"
        trainer, pipeline = train(tmp_path, digits8, push_to_hub=True, hub_model_id="me/tiny", hub_token="hf_x")
    assert (pipeline / "model_index.json").is_file() and (pipeline / "README.md").is_file()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == trainer.push_error
    assert "pushing to me/tiny failed (ConnectionError: connection reset)" in err
    assert f"push it later with `hf upload me/tiny {pipeline}`" in err
    assert create.call_args.kwargs["token"] == "hf_x"
