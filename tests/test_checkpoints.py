"""Reading official EDM/EDM2 network pickles safely, loading them as denoisers, converting them to Diffusers folders.

The official-format pickles are written from the parity fixtures by tests/official_pickles.py; their embedded module
source appends to $EDM_PICKLE_PAYLOAD_MARKER if executed, so every test that loads one checks that file never appears.
"""

import collections
import io
import json
import pickle
import pickletools
import re
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sida_diffusers import pretrained as checkpoints
from sida_diffusers.cli.convert import main as convert_main
from sida_diffusers.pretrained import (
    KNOWN_NETWORKS,
    UnsafeCheckpointError,
    convert_official,
    load_denoiser,
    read_official_pickle,
)

from conftest import fixture_info, fixture_io, fixture_state_dict, official_pickle


NETWORK_FIXTURES = ["edm_ddpmpp_cond", "edm_ddpmpp_uncond", "vp_ddpmpp_uncond", "ve_ncsnpp_uncond", "edm_adm_cond",
                    "edm2_latent_cond", "edm2_pixel_cond", "edm2_latent_uncond"]


@pytest.fixture(scope="module")
def official_pkl(tmp_path_factory):
    """official_pkl(NAME) -> path of NAME.pkl in the official persistence format (written once per module)."""
    folder, written = tmp_path_factory.mktemp("official"), {}

    def make(name):
        if name not in written:
            written[name] = official_pickle(folder, name)
        return written[name]
    return make


@pytest.fixture
def payload_marker(tmp_path, monkeypatch):
    """The file the pickles' embedded code (and our hand-made malicious pickles) would create if ever executed."""
    marker = tmp_path / "payload-was-executed.txt"
    monkeypatch.setenv("EDM_PICKLE_PAYLOAD_MARKER", str(marker))
    yield marker
    assert not marker.exists(), f"code embedded in a checkpoint was executed: {marker.read_text()}"


def test_the_source_embedded_in_the_test_pickles_leaves_a_trace_when_executed(official_pkl, tmp_path, monkeypatch):
    # What makes every `payload_marker` check meaningful: the official loader would run exactly these strings.
    data = official_pkl("edm_ddpmpp_cond").read_bytes()
    sources = {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str) and arg.startswith('"""Stand-in')}
    assert len(sources) == 3  # training.networks, training.loss and training.augment, each written once
    assert all(data.count(source.encode()) == 1 for source in sources)  # later objects refer to it through the memo
    monkeypatch.setenv("EDM_PICKLE_PAYLOAD_MARKER", str(tmp_path / "trace.txt"))
    for source in sources:
        exec(compile(source, "embedded module_src", "exec"), {})
    assert sorted((tmp_path / "trace.txt").read_text().splitlines()) == [
        f"executed the embedded source of training.{module} (edm_ddpmpp_cond)"
        for module in ("augment", "loss", "networks")]


def assert_matches_fixture(out, ref):
    # Per-sample tolerance relative to the sample's scale (tests/fixtures/README.md).
    for out_i, ref_i in zip(out, ref):
        torch.testing.assert_close(out_i, ref_i, rtol=1e-5, atol=1e-5 * ref_i.abs().max().item())


def denoise(model, io):
    with torch.no_grad():
        return model(io["x"], io["sigma"], io.get("class_labels"))


# ---- official pickles -> denoisers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NETWORK_FIXTURES)
def test_official_pickle_loads_to_the_official_outputs_without_running_its_code(name, official_pkl, payload_marker):
    model = load_denoiser(official_pkl(name))
    io = fixture_io(name)
    assert not model.training
    assert_matches_fixture(denoise(model, io), io["denoised"])
    with torch.no_grad():
        if "augment_labels" in io:
            out = model(io["x"], io["sigma"], io.get("class_labels"), augment_labels=io["augment_labels"])
            assert_matches_fixture(out, io["denoised_aug"])
        if "logvar" in io:
            _, logvar = model(io["x"], io["sigma"], io.get("class_labels"), return_logvar=True)
            torch.testing.assert_close(logvar, io["logvar"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["edm_ddpmpp_cond", "edm_adm_cond", "ve_ncsnpp_uncond", "edm2_latent_cond"])
def test_parsed_state_dict_and_config_equal_the_official_ones(name, official_pkl, payload_marker):
    ckpt = read_official_pickle(official_pkl(name))
    reference = fixture_state_dict(name)
    info = fixture_info(name)
    assert ckpt.class_name == info["official_class"].rsplit(".", 1)[1]
    assert ckpt.init_kwargs == info["init_kwargs"]
    assert sorted(ckpt.state_dict) == sorted(reference)  # official key names
    for key, value in reference.items():
        assert ckpt.state_dict[key].dtype == torch.float32  # EDM2 pickles are float16: cast back exactly
        assert torch.equal(ckpt.state_dict[key], value), key


def test_edm2_pickle_keeps_its_latent_encoder_and_dataset_settings(official_pkl, payload_marker):
    ckpt = read_official_pickle(official_pkl("edm2_latent_cond"))
    assert ckpt.encoder["class_name"] == "StabilityVAEEncoder"
    assert ckpt.encoder["vae_name"] == "stabilityai/sd-vae-ft-mse"
    np.testing.assert_allclose(ckpt.encoder["scale"], [0.1199041, 0.1082251, 0.1347709, 0.1524390], rtol=1e-6)
    np.testing.assert_allclose(ckpt.encoder["bias"], [-0.6966426, -0.3517316, -0.0161725, 0.3277439], rtol=1e-5)
    assert ckpt.dataset_kwargs["use_labels"] is True
    assert ckpt.extras["loss_fn"] == {"class_name": "EDM2Loss", "init_kwargs": {"P_mean": -0.4, "P_std": 1.0},
                                      "P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5}


# ---- conversion to Diffusers folders -----------------------------------------------------------------------------

def test_converted_folder_loads_back_to_the_same_network(official_pkl, tmp_path, payload_marker):
    name = "edm_adm_cond"
    convert_official(official_pkl(name), tmp_path / "converted")
    written = {p.name for p in (tmp_path / "converted").iterdir()}
    assert written >= {"config.json", "diffusion_pytorch_model.safetensors"}
    model = load_denoiser(tmp_path / "converted")
    io = fixture_io(name)
    assert type(model).__name__ == "EDMPrecond" and not model.training
    assert_matches_fixture(denoise(model, io), io["denoised"])


def test_cli_writes_float16_weights_that_load_back(official_pkl, tmp_path, capsys, payload_marker):
    # EDM2 fixture weights are float16 values, so a float16 folder read back in float32 is the official network.
    name, dst = "edm2_latent_cond", tmp_path / "edm2-fp16"
    assert convert_main([str(official_pkl(name)), str(dst), "--dtype", "float16"]) == 0
    printed = capsys.readouterr().out
    assert "EDM2Precond" in printed and "float16" in printed and "511,616 parameters" in printed
    stored = load_file(str(dst / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    io = fixture_io(name)
    model = load_denoiser(dst, dtype=torch.float32)
    assert_matches_fixture(denoise(model, io), io["denoised"])
    assert load_denoiser(dst, dtype=torch.float16).unet.out_conv.weight.dtype == torch.float16


def test_cli_reads_another_entry_with_key(official_pkl, tmp_path, payload_marker, capsys):
    with pytest.raises(SystemExit) as exited:
        convert_main([str(official_pkl("edm_ddpmpp_cond")), str(tmp_path / "out"), "--key", "loss_fn"])
    assert exited.value.code == 2
    assert re.search(r"sida-convert: error: entry 'loss_fn' .* has class EDMLoss, not a network module; .*\['ema'\]",
                     capsys.readouterr().err)


# ---- malicious and bad input -------------------------------------------------------------------------------------

class _Exploit:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


@pytest.mark.parametrize("make_exploit, global_name", [
    (lambda marker: _Exploit(__import__("os").system, f"touch {marker}"), "posix.system"),
    (lambda marker: _Exploit(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
    (lambda marker: torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
    # inside a tensor's storage blob, where only storage types are allowed
    (lambda marker: _Exploit(torch.storage._load_from_bytes,
                             pickle.dumps(_Exploit(eval, f"open({str(marker)!r}, 'w')"), protocol=2)),
     "__builtin__.eval"),
])
def test_pickle_with_a_foreign_global_is_refused_without_side_effects(make_exploit, global_name, tmp_path,
                                                                      payload_marker):
    path = _write_pickle(tmp_path / "evil.pkl", {"ema": make_exploit(payload_marker)})
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load global '{global_name}'"):
        load_denoiser(path)


def test_numpy_object_arrays_and_tensors_outside_their_storage_are_refused(tmp_path, payload_marker):
    objects = _write_pickle(tmp_path / "objects.pkl", {"ema": np.array([1, "a"], dtype=object)})
    with pytest.raises(UnsafeCheckpointError, match="object arrays"):
        read_official_pickle(objects)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation: the legacy pickling official files use
        storage = torch.zeros(4).storage()
    oob = _Exploit(torch._utils._rebuild_tensor_v2, storage, 2, (10,), (1,), False, collections.OrderedDict())
    with pytest.raises(ValueError, match=r"size \[10\] reaches outside its storage of 4 elements"):
        read_official_pickle(_write_pickle(tmp_path / "oob.pkl", {"ema": oob}))


def test_files_that_are_not_pickles_are_named_as_such(tmp_path):
    png = tmp_path / "image.pkl"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError, match="is a PNG image, not an official EDM/EDM2 network pickle"):
        load_denoiser(png)
    archive = tmp_path / "model.pkl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data.pkl", b"0")
    with pytest.raises(ValueError, match="is a zip archive"):
        load_denoiser(archive)
    text = tmp_path / "notes.pkl"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a pickle"):
        load_denoiser(text)


def test_truncated_pickle_asks_for_a_new_download(official_pkl, tmp_path):
    data = official_pkl("edm_ddpmpp_cond").read_bytes()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is truncated .*download it again"):
        load_denoiser(cut)


def test_pickle_without_a_network_lists_what_it_holds(official_pkl, tmp_path):
    with pytest.raises(ValueError, match=r"no 'ema' entry; its top-level keys are \['a', 'b'\] \(none of its"):
        load_denoiser(_write_pickle(tmp_path / "ints.pkl", {"a": 1, "b": 2}))
    with pytest.raises(ValueError, match=r"holds a list, not an official checkpoint"):
        load_denoiser(_write_pickle(tmp_path / "list.pkl", [1, 2]))
    with pytest.raises(ValueError, match=r"no 'generator' entry; .*'ema', 'loss_fn'.* \(pass key= one of \['ema'\]\)"):
        load_denoiser(official_pkl("edm_ddpmpp_cond"), key="generator")


def test_unknown_network_class_is_reported_with_the_supported_ones(official_pkl, tmp_path, payload_marker):
    data = official_pkl("edm_ddpmpp_cond").read_bytes()
    assert data.count(b"EDMPrecond") == 1
    renamed = tmp_path / "renamed.pkl"
    renamed.write_bytes(data.replace(b"EDMPrecond", b"NewPrecond"))  # same length: the pickle stays valid
    assert read_official_pickle(renamed).class_name == "NewPrecond"
    with pytest.raises(ValueError, match=r"unknown official network class 'NewPrecond'; supported classes: .*EDMP"):
        load_denoiser(renamed)


def test_weights_that_do_not_fit_the_network_are_listed(official_pkl, tmp_path, payload_marker):
    data = official_pkl("edm_ddpmpp_cond").read_bytes()
    assert data.count(b"map_label") == 1
    renamed = tmp_path / "renamed.pkl"
    renamed.write_bytes(data.replace(b"map_label", b"map_class"))
    with pytest.raises(ValueError, match=r"do not fit EDMPrecond\(\*\*init_kwargs\): missing keys "
                                         r"\['model.map_label.bias', 'model.map_label.weight'\] \(2\), unexpected "
                                         r"keys \['model.map_class.bias', 'model.map_class.weight'\] \(2\)\. "):
        load_denoiser(renamed)


def test_missing_sources_and_foreign_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing file or folder.*Known names: .*edm2-img512-xs"):
        load_denoiser(str(tmp_path / "nothing-here.pkl"))
    with pytest.raises(FileNotFoundError, match="not an existing file or folder"):
        load_denoiser("no such model!")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_denoiser(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match=r"names class 'AutoencoderKL', which is not a sida_diffusers denoiser; "
                                         r"known classes: .*'EDM2Precond'"):
        load_denoiser(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))  # a DDPM UNet needs its schedule
    with pytest.raises(FileNotFoundError, match=r"UNet2DModel folder without its noise schedule"):
        load_denoiser(tmp_path)


# ---- remote sources (download functions patched: nothing leaves the machine) ---------------------------------------

def test_hub_pickle_path_and_known_name_request_the_right_file(official_pkl, monkeypatch, payload_marker):
    requests = []

    def fake_hf_hub_download(repo_id, filename, cache_dir=None):
        requests.append((repo_id, filename))
        return str(official_pkl("edm_ddpmpp_uncond"))
    monkeypatch.setattr(checkpoints, "hf_hub_download", fake_hf_hub_download)
    hub_path = "UT-Austin-PML/SiDA/EDM_distillation/cifar10_uncond_sida_alpha1-217920.pkl"
    assert KNOWN_NETWORKS["sida-cifar10-uncond"] == hub_path
    model = load_denoiser(hub_path)
    load_denoiser("sid-edm2-xxl")
    assert requests == [("UT-Austin-PML/SiDA", "EDM_distillation/cifar10_uncond_sida_alpha1-217920.pkl"),
                        ("UT-Austin-PML/SiDA", "EDM2_distillation/edm2_img512_xxl_sida_alpha1-077932.pkl")]
    io = fixture_io("edm_ddpmpp_uncond")
    assert_matches_fixture(denoise(model, io), io["denoised"])


def test_hub_repo_with_a_diffusers_subfolder_is_snapshot_downloaded(official_pkl, tmp_path, monkeypatch):
    convert_official(official_pkl("edm_ddpmpp_uncond"), tmp_path / "repo" / "unet")
    requests = []

    def fake_snapshot_download(repo_id, allow_patterns=None, cache_dir=None):
        requests.append((repo_id, allow_patterns))
        return str(tmp_path / "repo")
    monkeypatch.setattr(checkpoints, "snapshot_download", fake_snapshot_download)
    assert type(load_denoiser("someone/sida-cifar10:unet")).__name__ == "EDMPrecond"
    assert type(load_denoiser("someone/sida-cifar10")).__name__ == "EDMPrecond"  # a pipeline root: unet/ is used
    model_files = ["config.json", "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.safetensors.index.json",
                   "scheduler_config.json"]  # a DDPM teacher's scheduler config may sit in the model folder too
    assert requests == [("someone/sida-cifar10", [f"unet/{f}" for f in model_files]  # nothing else is fetched
                         + ["scheduler/scheduler_config.json"]),
                        ("someone/sida-cifar10", ["model_index.json"] + model_files + [f"unet/{f}" for f in model_files]
                         + ["scheduler/scheduler_config.json"])]


def test_hub_failures_say_what_was_tried(monkeypatch):
    def offline(repo_id, filename, cache_dir=None):
        raise ConnectionError("no network")
    monkeypatch.setattr(checkpoints, "hf_hub_download", offline)
    with pytest.raises(OSError, match=r"could not fetch 'sida-ffhq64' \(UT-Austin-PML/SiDA/EDM_distillation/ffhq64_sida"
                                      r"_alpha1-185856.pkl\) from the Hugging Face Hub \(ConnectionError: no network"):
        load_denoiser("sida-ffhq64")


def test_url_is_downloaded_once_into_the_cache(official_pkl, tmp_path, monkeypatch, payload_marker):
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(official_pkl("edm_ddpmpp_uncond").read_bytes())
    monkeypatch.setattr(checkpoints, "urlopen", fake_urlopen)
    monkeypatch.setenv("SIDA_CACHE", str(tmp_path / "cache"))
    first = load_denoiser("edm-cifar10-32x32-uncond-vp")
    second = load_denoiser(KNOWN_NETWORKS["edm-cifar10-32x32-uncond-vp"])
    assert urls == ["https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl"]
    cached = tmp_path / "cache" / "nvlabs-fi-cdn.nvidia.com" / "edm-cifar10-32x32-uncond-vp.pkl"
    assert cached.read_bytes() == official_pkl("edm_ddpmpp_uncond").read_bytes()
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no partial download left behind
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_a_denoiser_is_returned_as_is(official_pkl):
    model = load_denoiser(official_pkl("edm2_latent_uncond"))
    assert load_denoiser(model) is model


def test_known_checkpoints_point_at_official_pickles():
    assert len(KNOWN_NETWORKS) == 5 + 6 + 12 + 5 + 15 + 18
    assert KNOWN_NETWORKS["edm2-img512-xxl"] == ("https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"
                                                    "edm2-img512-xxl-0939524-0.070.pkl")
    for name, where in KNOWN_NETWORKS.items():
        assert where.endswith(".pkl"), name
        if not where.startswith("https://nvlabs-fi-cdn.nvidia.com/"):
            repo_id, filename = checkpoints._split_hub_source(where)
            assert repo_id in ("UT-Austin-PML/SiD", "UT-Austin-PML/SiDA") and filename.endswith(".pkl"), name


def test_edm2_teachers_answer_to_the_official_fid_and_dino_preset_names(official_pkl, tmp_path, monkeypatch):
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return io.BytesIO(official_pkl("edm2_latent_cond").read_bytes())
    monkeypatch.setattr(checkpoints, "urlopen", fake_urlopen)
    monkeypatch.setenv("SIDA_CACHE", str(tmp_path / "cache"))
    for size in ("xs", "s", "m", "l", "xl", "xxl"):  # "-fid" is EDM2's name for the FID-optimal EMA we default to
        assert KNOWN_NETWORKS[f"edm2-img512-{size}-fid"] == KNOWN_NETWORKS[f"edm2-img512-{size}"]
    assert type(load_denoiser("edm2-img512-s-dino")).__name__ == "EDM2Precond"
    assert urls == ["https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-s-2147483-0.190.pkl"]


def test_shipped_digits_teachers_load_by_name_as_on_the_trainer_command_line():
    from sida_diffusers.digits import load_digits_teacher

    for name, conditional in (("digits", True), ("digits-uncond", False)):
        by_name, shipped = load_denoiser(name), load_digits_teacher(conditional=conditional)
        assert by_name.label_dim == shipped.label_dim == (10 if conditional else 0)
        assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), shipped.state_dict().values()))
