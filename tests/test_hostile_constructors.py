"""Networks whose size a file decides (official init_kwargs, Diffusers config.json) are built on meta first.

A configuration that describes billions of parameters next to kilobytes of weights is refused while the network is
still being built on the meta device, before any memory is allocated; a genuinely large network (EDM2-XXL) passes
the same checks. Bomb cases run under the `bounded` fixture (4 GiB above the current use, 20 s).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from sida_diffusers.networks import denoiser_from_official
from sida_diffusers.networks.precond import iDDPMPrecond
from sida_diffusers.pipelines import SiDAPipeline
from sida_diffusers.pretrained import load_denoiser
from sida_diffusers.safe_io.model_files import build_within, check_shapes

import official_pickles
from conftest import full_size_shapes, official_pickle, tiny_edm, tiny_vae


def edit_config(path, **changes):
    config = json.loads(path.read_text())
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    path.write_text(json.dumps(config))


def refused(load, source, *problem):
    with pytest.raises(ValueError) as error:
        load(source)
    message = str(error.value)
    assert all(word in message for word in problem), message
    return message


# ---- official pickles: init_kwargs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, init_kwargs", [
    ("edm_ddpmpp_cond", {"model_channels": 1 << 14}),       # ~10^11 parameters for 318,019 in the file
    ("edm_ddpmpp_cond", {"num_blocks": 1_000_000}),          # a million blocks: a time bomb even on meta
    ("edm2_latent_cond", {"model_channels": 1 << 15}),
    ("edm2_latent_cond", {"num_blocks": 1_000_000}),
])
def test_init_kwargs_describing_a_far_larger_network_than_the_pickle_holds_are_refused(tmp_path, name, init_kwargs,
                                                                                         bounded):
    path = official_pickle(tmp_path, name, **init_kwargs)
    refused(load_denoiser, path, str(path), "its configuration describes a network of at least",
            "but the file holds only", "the configuration does not belong to these weights")


def test_constructor_errors_quoting_the_file_are_kept_short(tmp_path, bounded):
    path = official_pickle(tmp_path, "edm2_latent_cond", channel_mult=[1] * 100_000)
    message = refused(load_denoiser, path, str(path), "must be divisible by", "...")
    assert len(message) < 1000


def test_an_iddpm_table_of_a_billion_steps_is_neither_computed_nor_allocated(tmp_path, bounded):
    state = {"_init_kwargs": {"img_resolution": 8, "img_channels": 3, "M": 10**9, "model_type": "SongUNet",
                              "model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []},
             "_modules": {}, "_parameters": {"u": official_pickles.tensor(torch.zeros(1001))}, "_buffers": {}}
    net = official_pickles.persistent("iDDPMPrecond", "training.networks", state, tag="iddpm")
    path = tmp_path / "iddpm.pkl"
    path.write_bytes(official_pickles.dumps({"ema": net}, protocol=4))
    refused(load_denoiser, path, str(path), "describes a network of at least")


def test_the_fixture_networks_still_load_at_their_true_size(tmp_path):
    model = load_denoiser(official_pickle(tmp_path, "edm2_latent_uncond"))
    assert sum(p.numel() for p in model.parameters()) == 78_872 and not next(model.parameters()).is_meta


def test_edm2_xxl_passes_the_checks_on_meta_without_allocating(bounded):
    # 1.5 billion parameters (6 GB in float32) do not fit the 4 GiB the fixture allows: nothing may be allocated.
    xxl = full_size_shapes()["edm2-img512-xxl"]
    shapes = xxl["state_dict"]
    model = build_within(lambda: denoiser_from_official("Precond", xxl["init_kwargs"]), shapes, "edm2-img512-xxl")
    check_shapes(model, shapes, "edm2-img512-xxl", "**init_kwargs")
    assert sum(p.numel() for p in model.parameters()) == xxl["num_params"] == 1_523_164_773
    assert all(t.is_meta for t in model.state_dict().values())


def test_one_missing_tensor_of_edm2_xxl_is_named(bounded):
    xxl = full_size_shapes()["edm2-img512-xxl"]
    shapes = {k: v for k, v in xxl["state_dict"].items() if k != "unet.out_gain"}
    with pytest.raises(ValueError, match=r"describes a network of at least 203 tensors .* holds only 202 tensors"):
        build_within(lambda: denoiser_from_official("Precond", xxl["init_kwargs"]), shapes, "xxl")


# ---- Diffusers folders: config.json ----------------------------------------------------------------------------------

@pytest.fixture
def denoiser_folder(tmp_path):
    tiny_edm().save_pretrained(tmp_path / "unet")
    return tmp_path / "unet"


@pytest.mark.parametrize("changes", [
    {"model_kwargs.model_channels": 1 << 16},
    {"model_kwargs.num_blocks": 1_000_000},
    {"img_resolution": 1 << 20, "model_kwargs.channel_mult": [1] * 20},
])
def test_a_config_json_describing_a_huge_denoiser_is_refused(denoiser_folder, changes, bounded):
    edit_config(denoiser_folder / "config.json", **changes)
    refused(load_denoiser, denoiser_folder, f"{denoiser_folder}/config.json", "describes a network of at least")


def test_an_iddpm_config_of_a_billion_steps_is_refused(tmp_path, bounded):
    net = iDDPMPrecond(img_resolution=8, img_channels=3, M=10, model_type="SongUNet",
                       model_kwargs=dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    net.save_pretrained(tmp_path / "iddpm")
    edit_config(tmp_path / "iddpm" / "config.json", M=10**9)
    refused(load_denoiser, tmp_path / "iddpm", "iddpm/config.json", "describes a network of at least",
            "holds only 71 tensors of 11,113 elements")
    edit_config(tmp_path / "iddpm" / "config.json", M=10)
    assert load_denoiser(tmp_path / "iddpm").round_sigma(net.u[3]) == net.u[3]  # the honest folder loads


def test_a_config_json_for_other_weights_lists_the_differences(denoiser_folder):
    edit_config(denoiser_folder / "config.json", **{"model_kwargs.model_channels": 4})  # smaller: within budget
    refused(load_denoiser, denoiser_folder, "its weights do not fit EDMPrecond(**config.json)", "shape mismatches")


def test_a_safetensors_header_that_lies_about_its_data_is_refused(denoiser_folder, bounded):
    weights = denoiser_folder / "diffusion_pytorch_model.safetensors"
    header = json.dumps({"model.w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}})
    weights.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(16))
    refused(load_denoiser, denoiser_folder, str(weights), "not a readable safetensors file")


def test_pickled_bin_weights_are_never_loaded(denoiser_folder):
    weights = denoiser_folder / "diffusion_pytorch_model.safetensors"
    weights.rename(denoiser_folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"only \['diffusion_pytorch_model.bin'\]: pickled weights, which "
                                                "sida_diffusers never loads; convert them to safetensors"):
        load_denoiser(denoiser_folder)


# ---- pipeline folders: every component ------------------------------------------------------------------------------

@pytest.fixture
def latent_pipeline(tmp_path):
    from sida_diffusers.pipelines import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE

    SiDAPipeline(unet=tiny_edm(channels=4, augment_dim=0), vae=tiny_vae(), latent_scale=EDM2_LATENT_SCALE,
                 latent_bias=EDM2_LATENT_BIAS).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


@pytest.mark.parametrize("component, changes", [
    ("unet", {"model_kwargs.model_channels": 1 << 16}),
    ("vae", {"block_out_channels": [1 << 14] * 2}),
    ("vae", {"layers_per_block": 1_000_000}),
])
def test_pipeline_components_whose_config_outgrows_their_weights_are_refused(latent_pipeline, component, changes,
                                                                              bounded):
    edit_config(latent_pipeline / component / "config.json", **changes)
    refused(SiDAPipeline.from_pretrained, latent_pipeline, f"{component}/config.json",
            "describes a network of at least")


def test_component_weights_that_do_not_match_their_config_are_listed(latent_pipeline, bounded):
    weights = {k: v.clone() for k, v in tiny_edm(channels=4, augment_dim=0).state_dict().items()}
    weights["model.extra"] = torch.zeros(3)
    weights["model.enc.8x8_conv.bias"] = torch.zeros(9)
    save_file(weights, latent_pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    refused(SiDAPipeline.from_pretrained, latent_pipeline, "unet/config.json", "unexpected keys ['model.extra'] (1)",
            "shape mismatches ['model.enc.8x8_conv.bias: (9,) vs (8,)'] (1)")


def test_the_exported_latent_pipeline_still_loads(latent_pipeline):
    pipe = SiDAPipeline.from_pretrained(latent_pipeline)
    assert pipe.vae.config.block_out_channels == [8, 16] and pipe.unet.img_channels == 4
