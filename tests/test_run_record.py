"""The run record: one typed, versioned description of a run, read from run_info.json within bounds."""

import dataclasses
import json

import pytest

from sida_diffusers import run_record
from sida_diffusers.latents import EDM2_LATENT_SCALE
from sida_diffusers.model_card import make_model_card
from sida_diffusers.run_record import RECORD_VERSION, RunRecord


def test_a_record_round_trips_through_run_info_json(tmp_path):
    record = RunRecord(method="sid2a", teacher="edm-cifar10-32x32-cond-vp", kimg=12.5, cur_nimg=12500, alpha=1.2,
                       label_dim=3, id2label={0: "plane", 1: "car", 2: "bird"}, metrics={"fid_50k": 1.5},
                       sampling={"init_sigma": 2.5, "num_steps": 1, "num_samples": 50000})
    record.write(tmp_path)
    assert json.loads((tmp_path / "run_info.json").read_text())["record_version"] == RECORD_VERSION
    assert RunRecord.read(tmp_path) == record  # a folder or the file itself
    assert RunRecord.read(tmp_path / "run_info.json").id2label == {0: "plane", 1: "car", 2: "bird"}


def test_a_run_info_written_before_the_record_was_versioned_still_loads(tmp_path):
    old = {"method": "sida", "alpha": 1.0, "teacher": "edm2-img512-xs", "dataset": "img512-sd.zip", "kimg": 217.9,
           "cur_nimg": 217920, "train_batch_size": 32, "total_batch_size": 256, "num_processes": 8,
           "init_sigma": 2.5, "tmax": 800, "id2label": {"0": "tench"}, "label_dim": 1000, "resolution": 64,
           "channels": 4, "latent": True, "metrics": {"fid_50k": 1.4}, "sampling": {}}
    (tmp_path / "run_info.json").write_text(json.dumps(old))
    record = RunRecord.read(tmp_path)
    assert record.record_version == 0 and record.kimg == 217.9 and record.id2label == {0: "tench"}
    assert record.latent_scale == EDM2_LATENT_SCALE.tolist()  # the latent settings an old run used
    assert record.teacher_license is None and record.extras == {}


def test_keys_of_a_newer_record_are_kept_aside_with_a_warning_and_written_back(tmp_path):
    newer = {"record_version": RECORD_VERSION + 1, "method": "sida", "guidance_interval": [0.2, 1.0], "cfg_scale": 2}
    with pytest.warns(UserWarning, match=r"\['cfg_scale', 'guidance_interval'\] .* kept aside"):
        record = RunRecord.from_dict(newer)
    assert record.extras == {"guidance_interval": [0.2, 1.0], "cfg_scale": 2}
    record.write(tmp_path)
    assert json.loads((tmp_path / "run_info.json").read_text())["guidance_interval"] == [0.2, 1.0]


@pytest.mark.parametrize("values, problem", [
    ({"kimg": "lots"}, "'kimg' must be float"),
    ({"metrics": {"fid_50k": "1.4"}}, r"'metrics'\['fid_50k'\] must be float"),
    ({"id2label": {"first": "tench"}}, "'id2label' has the key 'first', not a class index"),
    ({"latent": 1}, "'latent' must be bool"),
    ({"teacher": "x" * 5000}, "'teacher' is a string of 5,000 characters"),
    ({"label_dim": 2, "id2label": {"5": "five"}}, "id2label names class 5 but label_dim is 2"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(values, problem):
    with pytest.raises(ValueError, match=problem):
        RunRecord.from_dict(values)


def test_a_run_info_that_is_not_a_record_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "run_info.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="holds a list, not a run record"):
        RunRecord.read(tmp_path)
    monkeypatch.setattr(run_record, "MAX_RECORD_BYTES", 8)  # the size bound applies before parsing
    with pytest.raises(ValueError, match="more than the 8 any JSON file of ours needs"):
        RunRecord.read(tmp_path)
    with pytest.raises(FileNotFoundError, match="run_info.json"):
        RunRecord.read(tmp_path / "nowhere")


def test_every_field_with_a_card_label_is_a_row_of_the_model_card():
    """Adding a card field is one line of RunRecord: its `card` label makes the row."""
    values = {}
    for f in dataclasses.fields(RunRecord):
        if "card" in f.metadata:
            values[f.name] = 7 if "int" in str(f.type) or "float" in str(f.type) else f"value {len(values)}"
            if "list" in str(f.type):  # a K-step grid (num_steps is 7): seven decreasing noise levels
                values[f.name] = [7.0 - i for i in range(7)]
    values["method"] = "sida"
    text = str(make_model_card(RunRecord(**values)))
    for name, label in RunRecord.card_fields():
        shown = {"method": "SiDA", "step_sigmas": r"\[7, 6, 5, 4, 3, 2, 1\]"}.get(name, values[name])
        assert f"| {label} | {shown} |" in text, name
