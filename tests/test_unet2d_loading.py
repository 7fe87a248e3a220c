"""`load_denoiser` and `--teacher` read a Diffusers DDPM/DDIM model as a Diffusers user keeps it (ALGORITHM.md §12): a
pipeline folder, a bare unet/ folder with its scheduler config beside it, or a Hub id of either, from safetensors
only and within bounds; what cannot be distilled yet is refused with one line naming it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel
from safetensors.torch import load_file, save_file

import sida_diffusers.pretrained as pretrained
from sida_diffusers.cli.convert import main as convert_main
from sida_diffusers.cli.train import main as train_main
from sida_diffusers.networks import UNet2DDenoiser
from sida_diffusers.pretrained import load_denoiser

from conftest import refused_file, save_ddpm_folder, tiny_unet2d


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([10.0, 700.5])


def same_network(denoiser, unet):
    assert isinstance(denoiser, UNet2DDenoiser) and not denoiser.training
    with torch.no_grad():
        assert torch.equal(denoiser.unet_forward(X, T), unet(X, T).sample)


@pytest.fixture
def ddpm_folder(tmp_path):
    unet = tiny_unet2d()
    save_ddpm_folder(tmp_path / "ddpm", unet, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return tmp_path / "ddpm", unet


def refused(folder, named, *problem):
    """load_denoiser(folder) raises one line naming the file `named` and the problem."""
    message = refused_file(lambda _: load_denoiser(folder), named, *problem)
    assert "\n" not in message and len(message) < 1000
    return message


def edit_json(path, **changes):
    config = json.loads(Path(path).read_text())
    config.update(changes)
    Path(path).write_text(json.dumps(config))


# ---- the layouts -----------------------------------------------------------------------------------------------------
def test_a_ddpm_pipeline_folder_is_a_teacher_with_its_schedule(ddpm_folder):
    folder, unet = ddpm_folder
    teacher = load_denoiser(folder)
    same_network(teacher, unet)
    assert teacher.prediction_type == "v_prediction" and teacher.family == "vp-discrete" and teacher.distillable
    assert teacher.config.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert load_denoiser(folder, dtype=torch.float16).unet.dtype == torch.float16


def test_a_bare_unet_folder_reads_the_scheduler_config_beside_or_inside_it(ddpm_folder, tmp_path):
    folder, unet = ddpm_folder
    same_network(load_denoiser(folder / "unet"), unet)  # ../scheduler/scheduler_config.json
    shutil.copytree(folder / "unet", tmp_path / "alone")
    shutil.copy(folder / "scheduler" / "scheduler_config.json", tmp_path / "alone")
    teacher = load_denoiser(tmp_path / "alone")
    same_network(teacher, unet)
    assert teacher.prediction_type == "v_prediction"
    (tmp_path / "alone" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="UNet2DModel folder without its noise schedule; pass the pipeline"):
        load_denoiser(tmp_path / "alone")
    # the folder above a lone unet/ (no model_index.json, no scheduler/) names the same problem
    shutil.copytree(tmp_path / "alone", tmp_path / "parent" / "unet")
    with pytest.raises(FileNotFoundError, match="unet is a UNet2DModel folder without its noise schedule"):
        load_denoiser(tmp_path / "parent")


def test_a_ddim_pipeline_folder_keeps_its_scheduler_class(tmp_path):
    unet = tiny_unet2d(label_dim=3)
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear")).save_pretrained(tmp_path / "ddim")
    teacher = load_denoiser(tmp_path / "ddim")
    assert teacher.label_dim == 3 and type(teacher.make_scheduler()).__name__ == "DDIMScheduler"


def test_a_hub_id_downloads_configs_and_safetensors_only(ddpm_folder, tmp_path, monkeypatch):
    folder, unet = ddpm_folder
    torch.save(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")  # a Hub repo often has both
    requests = []

    def fake_snapshot_download(repo_id, allow_patterns=None, cache_dir=None):
        import fnmatch

        requests.append((repo_id, allow_patterns))
        local = tmp_path / "hub" / repo_id
        for path in folder.rglob("*"):
            name = path.relative_to(folder).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (local / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, local / name)
        return str(local)

    monkeypatch.setattr(pretrained, "snapshot_download", fake_snapshot_download)
    same_network(load_denoiser("google/ddpm-tiny"), unet)
    same_network(load_denoiser("google/ddpm-tiny2:unet"), unet)  # a bare unet/ subfolder, scheduler/ beside it
    assert not list((tmp_path / "hub").rglob("*.bin"))
    assert requests[1][1][-1] == "scheduler/scheduler_config.json"  # the schedule beside a bare unet/ folder


def test_weights_written_before_diffusers_renamed_attention_still_load(ddpm_folder):
    folder, unet = ddpm_folder
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in weights.items():
        for new, legacy in old.items():
            key = key.replace(f".{new}.", f".{legacy}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    save_file(renamed, folder / "unet" / "diffusion_pytorch_model.safetensors")
    same_network(load_denoiser(folder), UNet2DModel.from_pretrained(folder / "unet").eval())
    same_network(load_denoiser(folder), unet)


# ---- refusals ---------------------------------------------------------------------------------------------------------
def test_pickled_bin_weights_are_refused_with_how_to_convert_them(ddpm_folder):
    folder, unet = ddpm_folder
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    refused(folder, folder / "unet", "only pickled weights (diffusion_pytorch_model.bin)", "never unpickles",
                 "DDPMPipeline.from_pretrained(src).save_pretrained(dst, safe_serialization=True)")


@pytest.mark.parametrize("index, problem", [
    ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
      "text_encoder": ["transformers", "CLIPTextModel"]}, "UNet2DConditionModel teachers are not supported yet"),
    ({"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "VQModel"],
      "scheduler": ["diffusers", "DDIMScheduler"]}, "latent DDPM teachers are not supported yet"),
    ({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}, "no scheduler component"),
])
def test_what_cannot_be_distilled_yet_is_named_in_one_line(ddpm_folder, index, problem):
    folder, _ = ddpm_folder
    (folder / "model_index.json").write_text(json.dumps(index))
    refused(folder, folder / "model_index.json", problem)


def test_a_text_to_image_unet_folder_is_refused(ddpm_folder):
    folder, _ = ddpm_folder
    edit_json(folder / "unet" / "config.json", _class_name="UNet2DConditionModel")
    refused(folder, folder / "unet" / "config.json", "UNet2DConditionModel", "teachers are not supported yet")


@pytest.mark.parametrize("where, changes, problem", [
    ("unet", {"block_out_channels": [1 << 20, 1 << 20]}, "describes a network of at least"),
    ("unet", {"layers_per_block": 10 ** 6}, "describes a network of at least"),
    ("unet", {"down_block_types": ["DownBlock2D"] * 20_000, "up_block_types": ["UpBlock2D"] * 20_000,
              "block_out_channels": [8] * 20_000}, "describes a network of at least"),
    ("unet", {"num_class_embeds": 10 ** 9}, "describes a network of at least"),
    ("unet", {"sample_size": 10 ** 9}, "sample_size must be one square resolution"),
    ("unet", {"time_embedding_type": "fourier"}, "score-SDE VE UNets are not VP"),
    ("scheduler", {"num_train_timesteps": 10 ** 9}, "num_train_timesteps must be an integer in 2..100,000"),
    ("scheduler", {"trained_betas": [float("nan")] * 1000}, "every value of trained_betas must be a finite number"),
    ("scheduler", {"beta_end": float("nan")}, "beta_end must be a finite number"),
    ("scheduler", {"prediction_type": "x_start"}, "prediction_type 'x_start' is unknown"),
])
def test_hostile_configs_are_refused_in_one_line_within_bounds(ddpm_folder, where, changes, problem, bounded):
    folder, _ = ddpm_folder
    config = folder / where / ("config.json" if where == "unet" else "scheduler_config.json")
    edit_json(config, **changes)
    refused(folder, config, problem)


def test_the_commands_print_one_line_and_exit_2(ddpm_folder, tmp_path, capsys):
    folder, _ = ddpm_folder
    edit_json(folder / "scheduler" / "scheduler_config.json", num_train_timesteps=10 ** 9)
    with pytest.raises(SystemExit) as exit_code:
        convert_main([str(folder), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_code.value.code == 2 and err.count("\n") == 0 and "num_train_timesteps must be" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_code:
        train_main(["--teacher", str(folder), "--method", "sid", "--cpu", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_code.value.code == 2 and err.count("\n") == 0 and err.startswith("train_sida: error: ")
    assert "num_train_timesteps must be" in err and not (tmp_path / "run").exists()


def test_the_converted_teacher_is_a_folder_of_this_package_that_loads_back(ddpm_folder, tmp_path):
    folder, unet = ddpm_folder
    assert convert_main([str(folder), str(tmp_path / "converted")]) == 0
    same_network(load_denoiser(tmp_path / "converted"), unet)
    assert DDPMPipeline.from_pretrained(folder).unet.config.sample_size == 8  # the source folder is Diffusers' own


def test_the_shipped_ddpm_digits_teacher_is_a_diffusers_ddpm_pipeline_and_a_teacher():
    teacher = load_denoiser("digits-ddpm")
    assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim, teacher.prediction_type) == (16, 1, 0,
                                                                                                         "epsilon")
    from sida_diffusers.shipped import shipped_teacher_path

    pipe = DDPMPipeline.from_pretrained(shipped_teacher_path("digits-ddpm"))  # Diffusers alone reads it too
    with torch.no_grad():
        x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 900])
        assert torch.equal(teacher.unet_forward(x, t), pipe.unet(x, t).sample)
