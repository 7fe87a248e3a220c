"""Resuming reads a checkpoint folder as hostile: JSON and safetensors only, every tensor checked against the run."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from sida_diffusers.training.checkpointing import STATE_JSON, STATE_TENSORS, load_state, save_state

from conftest import copy_of, resume


def test_the_state_round_trips_every_type_the_trainer_writes(tmp_path):
    import numpy as np

    state = {"opt": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
                     "param_groups": [{"lr": 1e-4, "betas": (0.0, 0.999), "params": [0]}]},
             "rng": {"numpy": ("MT19937", np.arange(624, dtype=np.uint32), 5, 0, 0.0), "python": (3, (1, 2), None)},
             "best": None, "config": {"eval_metrics": ["fd_digits"], "lr": 1e-4, "seed": None}}
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert back["opt"]["state"][0]["exp_avg"].equal(torch.ones(2, 2)) and back["opt"]["param_groups"][0]["betas"] == (
        0.0, 0.999)
    assert back["rng"]["numpy"][1].dtype == np.uint32 and back["rng"]["numpy"][1].tolist() == list(range(624))
    assert back["rng"]["python"] == (3, (1, 2), None) and back["config"] == state["config"]


def test_a_pickle_in_place_of_the_state_is_refused_and_never_unpickled(tmp_path, finished_checkpoint, digits8, bounded):
    folder = copy_of(finished_checkpoint, tmp_path)
    marker = tmp_path / "executed"
    payload = pickle.dumps(type("Boom", (), {"__reduce__": lambda self: (open, (str(marker), "w"))})())
    (folder / STATE_JSON).write_bytes(payload)
    with pytest.raises(ValueError, match=f"{STATE_JSON}.*not valid JSON"):
        resume(tmp_path, folder, digits8)
    assert not marker.exists()


def test_a_legacy_pickled_state_is_refused_with_the_way_forward(tmp_path, finished_checkpoint, digits8):
    folder = copy_of(finished_checkpoint, tmp_path)
    (folder / STATE_JSON).unlink()
    (folder / "training_state.pt").write_bytes(b"not even read")
    with pytest.raises(ValueError, match="never unpickled.*--generator_init"):
        resume(tmp_path, folder, digits8)


def test_deeply_nested_or_oversized_state_json_is_refused(tmp_path, finished_checkpoint, digits8, bounded):
    folder = copy_of(finished_checkpoint, tmp_path)
    (folder / STATE_JSON).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nests its JSON too deeply"):
        resume(tmp_path, folder, digits8)


def test_a_truncated_tensor_file_is_refused(tmp_path, finished_checkpoint, digits8, bounded):
    folder = copy_of(finished_checkpoint, tmp_path)
    data = (folder / STATE_TENSORS).read_bytes()
    (folder / STATE_TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{STATE_TENSORS} is not a valid safetensors file"):
        resume(tmp_path, folder, digits8)


def test_a_state_that_refers_to_missing_tensors_is_refused(tmp_path, finished_checkpoint, digits8):
    folder = copy_of(finished_checkpoint, tmp_path)
    state = json.loads((folder / STATE_JSON).read_text())
    state["opt_fake"]["state"]["__dict__"][0][1]["exp_avg"] = {"__tensor__": "nowhere"}
    (folder / STATE_JSON).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="refers to tensor 'nowhere'"):
        resume(tmp_path, folder, digits8)


def test_optimizer_state_of_another_shape_is_refused_before_loading(tmp_path, finished_checkpoint, digits8):
    folder = copy_of(finished_checkpoint, tmp_path)
    tensors = load_file(folder / STATE_TENSORS)
    key = next(k for k in tensors if k.startswith("state/opt_fake/state") and k.endswith("exp_avg"))
    tensors[key] = torch.zeros(10 ** 6)
    save_file(tensors, folder / STATE_TENSORS)
    with pytest.raises(ValueError, match=r"opt_fake.state\[.*\].exp_avg does not match its parameter's shape"):
        resume(tmp_path, folder, digits8)


def test_network_weights_of_another_shape_are_refused(tmp_path, finished_checkpoint, digits8):
    folder = copy_of(finished_checkpoint, tmp_path)
    weights = folder / "generator" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="does not fit this run's networks.*wrong shape"):
        resume(tmp_path, folder, digits8)


def test_an_intact_checkpoint_still_resumes(tmp_path, finished_checkpoint, digits8):
    trainer = resume(tmp_path, copy_of(finished_checkpoint, tmp_path), digits8)
    assert trainer.cur_nimg == 16
