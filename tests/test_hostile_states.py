"""A resumed training state is checked value by value before the run continues from it.

Each case damages a copy of a finished tiny run's checkpoint the way a hostile or broken file could (NaN weights or
Adam moments, a sabotaged optimizer, absurd counters, wrong RNG states, permuted parameter ids, bombs in its JSON or
safetensors) and resumes from it: the trainer refuses it with one ValueError naming the file and the entry, within
1 GiB and 5 s, before anything is loaded or written.
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sida_diffusers.cli import train
from sida_diffusers.training.checkpointing import STATE_JSON, STATE_TENSORS

from conftest import copy_of, fails_in_one_line, resume, tiny_teacher


def edit_state(folder, change):
    """Apply `change` to the parsed training_state.json of `folder` and write it back."""
    state = json.loads((folder / STATE_JSON).read_text())
    change(state)
    (folder / STATE_JSON).write_text(json.dumps(state))
    return folder


def edit_tensors(folder, change, file=STATE_TENSORS):
    tensors = load_file(folder / file)
    change(tensors)
    save_file(tensors, folder / file)
    return folder


def refused(tmp_path, folder, digits, *problem, named=None, **overrides):
    """Resuming from `folder` raises one ValueError naming the file (`named`, default the folder) and every word of
    `problem`; the new run's folder is not even created."""
    with pytest.raises(ValueError) as error:
        resume(tmp_path, folder, digits, **overrides)
    message = str(error.value)
    assert str(named or folder) in message and all(word in message for word in problem), message
    assert "\n" not in message
    assert not (tmp_path / "run").exists(), "a refused state must leave the new run's folder unwritten"
    return message


def first_key(tensors, prefix, suffix):
    return next(k for k in sorted(tensors) if k.startswith(prefix) and k.endswith(suffix))


# ---- NaN anywhere ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("network", ["generator", "generator_ema", "fake_score"])
def test_nan_in_any_network_weight_is_refused(tmp_path, finished_checkpoint, digits8, bounded, network):
    def poison(tensors):
        tensors[first_key(tensors, "", "weight")][0] = math.nan
    folder = edit_tensors(copy_of(finished_checkpoint, tmp_path), poison, f"{network}/diffusion_pytorch_model.safetensors")
    refused(tmp_path, folder, digits8, "NaN or infinite values", named=folder / network)


@pytest.mark.parametrize("slot, value", [("exp_avg_sq", math.nan), ("exp_avg", math.inf), ("step", math.nan),
                                         ("exp_avg_sq", -1.0), ("step", 2.5)])
def test_poisoned_adam_moments_and_steps_are_refused(tmp_path, finished_checkpoint, digits8, bounded, slot, value):
    def poison(tensors):
        key = first_key(tensors, "state/opt_fake/state", slot)  # the generator is not stepped in warm-up
        tensors[key] = torch.full_like(tensors[key], value)
    folder = edit_tensors(copy_of(finished_checkpoint, tmp_path), poison)
    refused(tmp_path, folder, digits8, "opt_fake.state[", slot)


def test_a_nan_ema_half_life_is_refused(tmp_path, finished_checkpoint, digits8, bounded):
    folder = edit_state(copy_of(finished_checkpoint, tmp_path), lambda s: s["ema"].update(halflife_kimg=math.nan))
    refused(tmp_path, folder, digits8, "ema.halflife_kimg is nan")


def test_a_nan_checkpoint_never_reaches_an_exported_pipeline(tmp_path, finished_checkpoint, capsys, bounded):
    """The whole command: train_sida resuming from poisoned weights exits 2 in one line, and writes no pipeline."""
    folder = edit_tensors(copy_of(finished_checkpoint, tmp_path), lambda t: t[first_key(t, "", "weight")].fill_(math.nan),
                          "generator_ema/diffusion_pytorch_model.safetensors")
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    out = tmp_path / "resumed"
    fails_in_one_line(capsys, train, [
        "--teacher", tmp_path / "teacher", "--train_data", "digits", "--resolution", "8", "--train_batch_size", "4",
        "--total_batch_size", "8", "--warmup_kimg", "0.008", "--adversarial_start_kimg", "0.016",
        "--max_train_kimg", "0.032", "--checkpointing_kimg", "0.016", "--ema_halflife_kimg", "0.05",
        "--sample_grid_size", "0", "--seed", "1", "--cpu", "--output_dir", out, "--resume_from_checkpoint", folder],
        "generator_ema", "NaN or infinite values")
    assert not out.exists()


# ---- the optimizer's settings -----------------------------------------------------------------------------------------

def set_group(key, value, optimizer="opt_gen"):
    return lambda s: s[optimizer]["param_groups"][0].update({key: value})


def test_a_maximizing_optimizer_is_refused_even_when_checkpoint_settings_are_trusted(tmp_path, finished_checkpoint,
                                                                                     digits8, bounded):
    folder = edit_state(copy_of(finished_checkpoint, tmp_path), set_group("maximize", True))
    refused(tmp_path, folder, digits8, "opt_gen.param_groups[0].maximize is True", "sabotaged",
            resume_optimizer_settings_from_checkpoint=True)


def test_other_adam_settings_are_refused_unless_the_flag_takes_them(tmp_path, finished_checkpoint, digits8, bounded):
    folder = edit_state(copy_of(finished_checkpoint, tmp_path), set_group("betas", {"__tuple__": [0.5, 0.99]}))
    refused(tmp_path, folder, digits8, "betas is (0.5, 0.99) in the checkpoint but (0.0, 0.999) in this run",
            "--resume_optimizer_settings_from_checkpoint")
    trainer = resume(tmp_path, folder, digits8, resume_optimizer_settings_from_checkpoint=True)
    assert trainer.opt_gen.param_groups[0]["betas"] == (0.5, 0.99)


def test_amsgrad_without_its_state_is_refused_with_or_without_the_flag(tmp_path, finished_checkpoint, digits8, bounded):
    folder = edit_state(copy_of(finished_checkpoint, tmp_path), set_group("amsgrad", True, "opt_fake"))
    refused(tmp_path, folder, digits8, "amsgrad is True in the checkpoint but False in this run")
    refused(tmp_path, folder, digits8, "'max_exp_avg_sq'", resume_optimizer_settings_from_checkpoint=True)


def test_kernel_choices_and_the_learning_rate_follow_the_run(tmp_path, finished_checkpoint, digits8):
    folder = edit_state(copy_of(finished_checkpoint, tmp_path),
                        lambda s: s["opt_fake"]["param_groups"][0].update(foreach=False, fused=None, lr=0.5))
    group = resume(tmp_path, folder, digits8).opt_fake.param_groups[0]
    assert group["foreach"] is True and group["lr"] == 1e-3  # the run's own choices (tiny_config: lr 1e-3, CPU)


# ---- parameter ids and names --------------------------------------------------------------------------------------------

def equal_shape_pair(trainer):
    """Positions (i, j) of two parameters of the fake score with the same shape."""
    shapes = [tuple(p.shape) for p in trainer.opt_fake.param_groups[0]["params"]]
    return next((i, j) for i in range(len(shapes)) for j in range(i + 1, len(shapes)) if shapes[i] == shapes[j])


def test_permuted_parameter_ids_are_refused(tmp_path, finished_checkpoint, digits8, bounded):
    def permute(state):
        ids = state["opt_fake"]["param_groups"][0]["params"]
        ids[0], ids[1] = ids[1], ids[0]
    refused(tmp_path, edit_state(copy_of(finished_checkpoint, tmp_path), permute), digits8,
            "opt_fake.param_groups[0].params are not the ids 0..", "in order")


def test_adam_state_follows_parameter_names_when_the_saved_order_differs(tmp_path, finished_checkpoint, digits8):
    """A state that lists two equal-shape parameters in the other order, each with its own moments: torch alone
    would give each the other's (it maps by position); mapped by name, each gets its own."""
    reference = resume(tmp_path / "a", copy_of(finished_checkpoint, tmp_path / "a"), digits8)
    i, j = equal_shape_pair(reference)

    def reorder(state):
        group, slots = state["opt_fake"]["param_groups"][0], state["opt_fake"]["state"]["__dict__"]
        group["param_names"][i], group["param_names"][j] = group["param_names"][j], group["param_names"][i]
        by_id = dict(slots)
        by_id[i], by_id[j] = by_id[j], by_id[i]
        state["opt_fake"]["state"]["__dict__"] = [[k, v] for k, v in sorted(by_id.items())]
    resumed = resume(tmp_path / "b", edit_state(copy_of(finished_checkpoint, tmp_path / "b"), reorder), digits8)
    for p_ref, p_new in zip(reference.opt_fake.param_groups[0]["params"], resumed.opt_fake.param_groups[0]["params"]):
        for slot in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(reference.opt_fake.state[p_ref][slot], resumed.opt_fake.state[p_new][slot])
    assert not torch.equal(*(reference.opt_fake.state[reference.opt_fake.param_groups[0]["params"][k]]["exp_avg_sq"]
                             for k in (i, j))), "the two parameters' moments must differ for the case to mean something"


def test_names_of_another_network_are_refused(tmp_path, finished_checkpoint, digits8, bounded):
    folder = edit_state(copy_of(finished_checkpoint, tmp_path),
                        lambda s: s["opt_gen"]["param_groups"][0]["param_names"].__setitem__(0, "model.renamed"))
    refused(tmp_path, folder, digits8, "opt_gen.param_groups[0].param_names are not the names of this run's")


def test_a_step_tensor_of_shape_5_is_refused(tmp_path, finished_checkpoint, digits8, bounded):
    def widen(tensors):
        tensors[first_key(tensors, "state/opt_fake/state", "step")] = torch.ones(5)
    refused(tmp_path, edit_tensors(copy_of(finished_checkpoint, tmp_path), widen), digits8,
            ".step is not a scalar float tensor")


# ---- counters, positions and keys ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, problem", [
    (-10 ** 15, "cur_nimg is -1000000000000000, outside 0..32"),
    (math.inf, "cur_nimg is inf, not an integer"),
    (10 ** 4000, "cur_nimg is 1000000000000000000000000000000000000000, outside 0..32"),
    (10 ** 15, "cur_nimg is 1000000000000000, outside 0..32"),
    (48, "the checkpoint is at cur_nimg=48, past this run's end at 32 images; pass --max_train_kimg 0.048 or more"),
    (True, "cur_nimg is True, not an integer"),
])
def test_absurd_image_counters_are_refused(tmp_path, finished_checkpoint, digits8, bounded, value, problem):
    folder = copy_of(finished_checkpoint, tmp_path)
    text = (folder / STATE_JSON).read_text().replace('"cur_nimg": 16', f'"cur_nimg": {json.dumps(value)}')
    (folder / STATE_JSON).write_text(text)
    refused(tmp_path, folder, digits8, problem)


@pytest.mark.parametrize("change, problem", [
    (lambda s: s["data"][0].update(position=-8), "data[0].position is -8"),
    (lambda s: s["data"][0].update(position=10 ** 12), "data[0].position is 1000000000000"),
    (lambda s: s.update(seed=-1), "seed is -1"),
    (lambda s: s.update(num_processes=2), "rng does not hold one entry per process (2)"),
    (lambda s: s["ema"].update(num_updates=10 ** 9), "ema.num_updates"),
    (lambda s: s.update(best={"metric": "fd_digits", "mode": "min", "best": math.nan, "best_kimg": 0.0}),
     "best.best is nan"),
])
def test_counters_positions_and_bookkeeping_are_range_checked(tmp_path, finished_checkpoint, digits8, bounded, change,
                                                              problem):
    refused(tmp_path, edit_state(copy_of(finished_checkpoint, tmp_path), change), digits8, problem)


def test_a_list_as_a_mapping_key_is_refused(tmp_path, finished_checkpoint, digits8, bounded):
    folder = edit_state(copy_of(finished_checkpoint, tmp_path),
                        lambda s: s["opt_fake"]["state"]["__dict__"][0].__setitem__(0, [0]))
    refused(tmp_path, folder, digits8, "malformed mapping", "keys are strings or integers")


# ---- RNG states ----------------------------------------------------------------------------------------------------------

def python_rng(state):
    return state["rng"][0]["python"]["__tuple__"]


@pytest.mark.parametrize("change, problem", [
    (lambda s: s.update(rng=[]), "rng does not hold one entry per process (1)"),
    (lambda s: s["rng"][0].update(cuda=[[]]), "rng[0].cuda is not a list of CUDA RNG states"),
    (lambda s: python_rng(s)[1]["__tuple__"].pop(), "rng[0].python is not Python's random state"),
    (lambda s: python_rng(s)[1]["__tuple__"].__setitem__(0, 2 ** 40), "rng[0].python[0]"),
    (lambda s: s["rng"][0]["numpy"]["__tuple__"].__setitem__(2, 10 ** 6), "rng[0].numpy position"),
])
def test_malformed_rng_states_are_refused(tmp_path, finished_checkpoint, digits8, bounded, change, problem):
    refused(tmp_path, edit_state(copy_of(finished_checkpoint, tmp_path), change), digits8, problem)


def test_a_torch_rng_state_of_the_wrong_size_is_refused(tmp_path, finished_checkpoint, digits8, bounded):
    def shorten(tensors):
        tensors["state/rng/0/torch"] = tensors["state/rng/0/torch"][:100].clone()
    refused(tmp_path, edit_tensors(copy_of(finished_checkpoint, tmp_path), shorten), digits8,
            "rng[0].torch is not torch's RNG state")


# ---- bombs in the two files --------------------------------------------------------------------------------------------

def test_a_void_dtype_of_20_megabytes_per_element_is_refused_before_allocating(tmp_path, finished_checkpoint, digits8,
                                                                                bounded):
    folder = copy_of(finished_checkpoint, tmp_path)
    text = (folder / STATE_JSON).read_text().replace('"dtype": "<u4"', '"dtype": "V20000000"')
    (folder / STATE_JSON).write_text(text)
    refused(tmp_path, folder, digits8, "has dtype |V20000000", "numeric arrays only")


def test_a_63_mib_state_json_of_empty_objects_is_refused_by_counting(tmp_path, finished_checkpoint, digits8, bounded):
    folder = copy_of(finished_checkpoint, tmp_path)
    with open(folder / STATE_JSON, "wb") as f:
        f.write(b"[" + b"{}," * (21 << 20) + b"{}]")  # 63 MiB under the 64 MiB cap, 22 million dicts if parsed
    refused(tmp_path, folder, digits8, "holds at least 22,020,096 JSON values, more than the 1,048,576")


def zero_size_tensors(count: int) -> bytes:
    """A safetensors file listing `count` zero-size tensors: all header, no data."""
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(count))
    header = ("{" + entries + "}").encode()
    return len(header).to_bytes(8, "little") + header


@pytest.fixture
def crowded_checkpoint(tmp_path, finished_checkpoint, request):
    folder = copy_of(finished_checkpoint, tmp_path)
    (folder / STATE_TENSORS).write_bytes(zero_size_tensors(request.param))
    return folder


@pytest.mark.parametrize("crowded_checkpoint, problem", [
    (1_300_000, "has a safetensors header of 76,888,891 bytes"),  # the reported file: refused from 8 bytes
    (120_000, "lists 120,000 tensors, more than the 100,000"),  # a header of legal size, counted
], indirect=["crowded_checkpoint"])
def test_a_state_listing_a_million_zero_size_tensors_is_refused_from_its_header(tmp_path, crowded_checkpoint, digits8,
                                                                                bounded, problem):
    refused(tmp_path, crowded_checkpoint, digits8, problem)


def test_a_state_file_linked_from_outside_the_checkpoint_is_refused(tmp_path, finished_checkpoint, digits8):
    folder = copy_of(finished_checkpoint, tmp_path)
    outside = tmp_path / "elsewhere.json"
    (folder / STATE_JSON).rename(outside)
    (folder / STATE_JSON).symlink_to(outside)
    refused(tmp_path, folder, digits8, "is a link to", "outside")


def test_the_intact_checkpoint_resumes_with_every_check_passing(tmp_path, finished_checkpoint, digits8):
    trainer = resume(tmp_path, copy_of(finished_checkpoint, tmp_path), digits8)
    assert trainer.cur_nimg == 16 and trainer.opt_fake.state and trainer.ema.num_updates == 2
    assert np.isfinite(trainer.ema.halflife_kimg)
