"""The offline demo (README command 1) end to end at reduced length: the default `digits` preset through the real
entry point, then what a newcomer is told to look at: the pipeline folder, the sample grid and summary.json with the
student's and the teacher's FD-digits."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sida_diffusers.cli.train import main
from sida_diffusers.pipelines import SiDAPipeline
from sida_diffusers.training.config import make_config
from sida_diffusers.training.summary import format_summary


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # No --preset/--teacher: the default digits preset, exactly as `accelerate launch examples/train_sida.py`;
    # one iteration and a small evaluation keep it to seconds.
    pipeline_dir = main(["--output_dir", str(out), "--max_train_kimg", "0.064", "--eval_num_samples", "120",
                         "--seed", "0", "--sample_grid_size", "4"])
    return out, pipeline_dir


def test_default_entry_point_is_the_digits_sida_demo():
    cfg = make_config()
    assert (cfg.preset, cfg.teacher, cfg.train_data, cfg.method) == ("digits", "digits", "digits", "sida")
    assert cfg.eval_metrics == ["fd_digits"] and cfg.eval_every_kimg > 0


def test_demo_writes_a_loadable_pipeline_and_grid(demo_run):
    out, pipeline_dir = demo_run
    assert pipeline_dir == out / "pipeline"
    assert (out / "pipeline" / "samples_grid.png").is_file()
    pipe = SiDAPipeline.from_pretrained(pipeline_dir)
    images = pipe(batch_size=3, class_labels=[0, 4, 9], output_type="np").images
    assert np.asarray(images).shape[:3] == (3, 16, 16)


def test_demo_summary_compares_student_and_teacher_fd_digits(demo_run):
    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    student, teacher = summary["fd_digits_student"], summary["fd_digits_teacher"]
    assert summary["metric"] == "FD-digits" and summary["metric_key"] == "fd_digits_120"
    assert math.isfinite(student) and math.isfinite(teacher) and student > 0 and teacher > 0
    assert summary["student"]["metrics"]["fd_digits_120"] == student  # the final evaluation, not a recomputation
    assert (summary["teacher_eval"]["nfe"], summary["teacher_eval"]["num_samples"]) == (35, 120)
    # one iteration of warm-up leaves the student at its teacher initialisation: one step, far worse than 35 NFE
    assert student > teacher
    for name in ("pipeline", "sample_grid", "fd_curve", "metrics_jsonl"):
        assert Path(summary[name]).exists(), name


def test_printed_report_names_fd_digits_never_fid(demo_run):
    out, _ = demo_run
    report = format_summary(json.loads((out / "summary.json").read_text()))
    assert "FD-digits     student, 1 step" in report and "teacher, Heun 35 NFE" in report
    assert "FID" not in report and str(out / "pipeline") in report


def test_sida_eval_reproduces_the_in_training_figure_of_the_exported_pipeline(demo_run, capsys):
    # One generation path and one label convention: the exported pipeline evaluated by sida-eval on the same seeds,
    # with the digits reference and labels it defaults to, gives the trainer's last FD-digits, at another batch size.
    from sida_diffusers.cli.evaluate import main as sida_eval

    out, pipeline_dir = demo_run
    capsys.readouterr()
    sida_eval([str(pipeline_dir), "--metrics", "fd_digits", "--num-samples", "120", "--repeats", "1",
               "--batch-size", "7", "--out", str(out / "eval.json")])
    printed = capsys.readouterr().out
    assert "drawn per seed from 1797 dataset labels" in printed
    result = json.loads((out / "eval.json").read_text())["results"]["fd_digits_120"]["mean"]
    trained = json.loads((out / "summary.json").read_text())["fd_digits_student"]
    assert result == pytest.approx(trained, abs=1e-3)
