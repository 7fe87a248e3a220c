"""Every sida-* command answers bad input with one line on stderr and exit code 2, and never claims what it did not do.

The commands are called in-process through their `main(argv)`; one case per command family also runs the real
console entry (`python -m sida_diffusers.cli.X`) in a subprocess, to see exactly what a user sees.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from sida_diffusers.cli import convert, evaluate, export, ref_stats, sample
from sida_diffusers.pipelines import SiDAPipeline

from conftest import REPO_ROOT, fails_in_one_line, grey_png, official_pickle, png_header, tiny_edm


def run_console(module, *argv):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}  # this checkout, not an installed copy
    return subprocess.run([sys.executable, "-m", f"sida_diffusers.cli.{module}", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def pipeline(tmp_path):
    SiDAPipeline(unet=tiny_edm(label_dim=3), id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


@pytest.fixture
def unconditional_pipeline(tmp_path):
    SiDAPipeline(unet=tiny_edm()).save_pretrained(tmp_path / "uncond")
    return tmp_path / "uncond"


# ---- sida-convert ----------------------------------------------------------------------------------------------------

def test_sida_convert_to_an_existing_file_fails_and_keeps_the_file(tmp_path):
    pkl, dst = official_pickle(tmp_path, "edm2_latent_uncond"), tmp_path / "existing.txt"
    dst.write_text("precious")
    result = run_console("convert", pkl, dst)
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr == (f"sida-convert: error: DST {dst} cannot be a folder: {dst} is an existing file.\n")
    assert dst.read_text() == "precious"


def test_sida_convert_refuses_a_destination_inside_a_file_and_a_bad_source(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    fails_in_one_line(capsys, convert, [tmp_path / "missing.pkl", tmp_path / "file" / "out"], "is an existing file")
    (tmp_path / "not.pkl").write_bytes(png_header(8, 8))
    fails_in_one_line(capsys, convert, [tmp_path / "not.pkl", tmp_path / "out"], "is a PNG image")
    assert not (tmp_path / "out").exists()


def test_sida_convert_checks_its_own_options_in_one_line(tmp_path, capsys):
    fails_in_one_line(capsys, convert, [tmp_path / "a.pkl", tmp_path / "out", "--dtype", "int8"],
                      "argument --dtype: invalid choice: 'int8'", "(see sida-convert --help)")


# ---- sida-sample -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, problem", [
    (["--class-labels", "7"], "class index out of range: [7] (valid: 0..2 for label_dim=3)"),
    (["--class-labels", "zebra"], "unknown class name(s) ['zebra']"),
    (["--steps", "0"], "--steps must be >= 1 (1 = one step), got 0"),
    (["--steps", "-4"], "--steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--seeds", "9-2"], "argument --seeds: bad seed list '9-2'"),
    (["--steps", "2"], "num_inference_steps=2 but this generator was trained for at most 1 step"),  # §11.4
])
def test_sida_sample_refuses_bad_options_before_writing_anything(pipeline, tmp_path, capsys, argv, problem):
    fails_in_one_line(capsys, sample, [pipeline, "--outdir", tmp_path / "out", "--device", "cpu", *argv], problem)
    assert not (tmp_path / "out").exists()


def test_sida_sample_refuses_labels_for_an_unconditional_model(unconditional_pipeline, tmp_path, capsys):
    fails_in_one_line(capsys, sample, [unconditional_pipeline, "--outdir", tmp_path / "out", "--class-labels", "1"],
                      "this model is unconditional (label_dim=0) but class_labels were given")


def test_sida_sample_refuses_an_outdir_that_is_a_file_and_a_grid_that_is_a_folder(pipeline, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    fails_in_one_line(capsys, sample, [pipeline, "--outdir", tmp_path / "taken"],
                      f"--outdir {tmp_path / 'taken'} cannot be a folder: {tmp_path / 'taken'} is an existing file")
    fails_in_one_line(capsys, sample, [pipeline, "--grid", tmp_path],
                      f"--grid {tmp_path} is an existing folder; pass a file name")
    assert (tmp_path / "taken").read_text() == "x"


def test_sida_sample_console_answers_an_out_of_range_label_in_one_line(pipeline, tmp_path):
    result = run_console("sample", pipeline, "--outdir", tmp_path / "out", "--class-labels", "3", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "sida-sample: error: class index out of range: [3] (valid: 0..2 for label_dim=3)."]


def test_sida_sample_refuses_a_pipeline_folder_naming_foreign_components(pipeline, tmp_path, capsys):
    index = json.loads((pipeline / "model_index.json").read_text())
    (pipeline / "model_index.json").write_text(json.dumps({**index, "vae": ["transformers", "CLIPTextModel"]}))
    fails_in_one_line(capsys, sample, [pipeline, "--outdir", tmp_path / "out"], "component 'vae' is")


def test_sida_sample_still_writes_a_grid_into_a_new_folder(pipeline, tmp_path):
    assert sample.main([str(pipeline), "--seeds", "0-1", "--grid", str(tmp_path / "new" / "grid.png"),
                        "--device", "cpu"]) == 0
    assert PIL.Image.open(tmp_path / "new" / "grid.png").size == (16 * 16, 8 * 16)  # enlarged to 256 px wide


# ---- sida-ref-stats --------------------------------------------------------------------------------------------------

def image_folder(path, images):
    path.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (path / name).write_bytes(data)
    return path


@pytest.mark.parametrize("images, problem", [
    ({"a.png": grey_png(), "b.png": b"not an image"}, "b.png: cannot read the image"),
    ({"a.png": grey_png(), "b.png": png_header(100_000, 100_000)}, "b.png: cannot read the image"),
    ({"a.png": grey_png(), "b.png": png_header(9000, 9000)}, "b.png: the image header declares 9000x9000 pixels"),
    ({"a.png": grey_png(), "b.png": grey_png(6)}, "every item must share one shape"),
    ({"notes.txt": b"hello"}, "contains no image files"),
])
def test_sida_ref_stats_on_unusable_images_fails_in_one_line(tmp_path, capsys, images, problem):
    folder = image_folder(tmp_path / "data", images)
    fails_in_one_line(capsys, ref_stats, [folder, tmp_path / "ref.npz", "--metrics", "fd_digits", "--device", "cpu"],
                      problem)
    assert not (tmp_path / "ref.npz").exists()


def test_sida_ref_stats_refuses_an_output_it_could_not_write_before_reading_the_data(tmp_path, capsys):
    (tmp_path / "taken.npz").mkdir()
    fails_in_one_line(capsys, ref_stats, [tmp_path / "missing-data", tmp_path / "taken.npz"], "is an existing folder")
    fails_in_one_line(capsys, ref_stats, [tmp_path / "data", tmp_path / "ref.txt"], "OUT must end in .npz")
    fails_in_one_line(capsys, ref_stats, [tmp_path / "data", tmp_path / "ref.npz", "--batch-size", "0"],
                      "--batch-size and --max-images must be >= 1")


# ---- sida-eval and sida-export ---------------------------------------------------------------------------------------

def test_sida_eval_refuses_bad_steps_and_an_unwritable_output_before_generating(pipeline, tmp_path, capsys):
    fails_in_one_line(capsys, evaluate, [pipeline, "--steps", "0"], "--steps must be >= 1, got 0")
    fails_in_one_line(capsys, evaluate, [pipeline, "--steps", "3"], "trained for at most 1 step")  # one-step model
    (tmp_path / "results").mkdir()
    fails_in_one_line(capsys, evaluate, [pipeline, "--out", tmp_path / "results"], "is an existing folder")
    fails_in_one_line(capsys, evaluate, [pipeline, "--repeats", "0"], "--repeats must be >= 1")


@pytest.mark.parametrize("content", [{"labels": [["a.png"]]}, {"labels": 3}, [1.5, 2]])
def test_sida_eval_label_files_that_are_not_labels_are_refused(tmp_path, content):
    (tmp_path / "labels.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="labels.json (holds no list of labels|must list integer class labels)"):
        evaluate.load_label_pool(tmp_path / "labels.json")


def test_sida_export_to_an_existing_file_fails_and_keeps_it(tmp_path, capsys):
    tiny_edm().save_pretrained(tmp_path / "generator")
    (tmp_path / "dst").write_text("precious")
    fails_in_one_line(capsys, export, [tmp_path / "generator", tmp_path / "dst", "--no-grid", "--device", "cpu"],
                      "DST", "is an existing file")
    assert Path(tmp_path / "dst").read_text() == "precious"
