"""`from_pretrained` loads only this package's denoisers and Diffusers' AutoencoderKL, whatever a folder names.

model_index.json names the library and class of each component, and Diffusers would import it (or a `.py` file the
folder ships). A pipeline folder from the Hub is someone else's file: unknown components, other libraries or classes,
custom pipeline code and pickled weights are refused with an error naming the file, and nothing named is imported.
"""

import json
import pickle
import sys

import pytest

from sida_diffusers.pipelines import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE, EDMHeunPipeline, SiDAPipeline

from conftest import tiny_edm, tiny_vae


EVIL = "evil_module_for_sida_tests"


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that leaves a marker file when imported: it must never be."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / f"{EVIL}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                                  "class Checker: pass\nclass EDMPrecond: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "evil"))
    yield marker
    assert not marker.exists() and EVIL not in sys.modules, "a module named by a pipeline folder was imported"


@pytest.fixture
def pipeline_folder(tmp_path):
    SiDAPipeline(unet=tiny_edm(label_dim=3), id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def edit_index(folder, **entries):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(entries)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def refused(folder, *problem, cls=SiDAPipeline, **kwargs):
    with pytest.raises(ValueError) as error:
        cls.from_pretrained(folder, **kwargs)
    message = str(error.value)
    assert all(word in message for word in problem), message


def test_an_unknown_component_is_refused_and_its_module_never_imported(pipeline_folder, evil_module):
    edit_index(pipeline_folder, safety_checker=[EVIL, "Checker"])
    refused(pipeline_folder, f"{pipeline_folder}/model_index.json lists an unknown component 'safety_checker'",
            "has only ['scheduler', 'unet', 'vae']. Remove the entry.")


@pytest.mark.parametrize("component, entry", [
    ("unet", [EVIL, "EDMPrecond"]),                     # our class name, another module
    ("unet", ["diffusers", "UNet2DConditionModel"]),    # a real Diffusers model, but not one we can distil
    ("unet", ["sida_diffusers.networks.edm", "SongUNet"]),  # ours, but not a Denoiser
    ("vae", ["transformers", "CLIPTextModel"]),
    ("vae", ["sida_diffusers.networks.precond", "EDMPrecond"]),  # a denoiser where the VAE belongs
])
def test_components_naming_other_libraries_or_classes_are_refused(pipeline_folder, evil_module, component, entry):
    edit_index(pipeline_folder, **{component: entry})
    refused(pipeline_folder, f"component {component!r} is {entry}", "sida_diffusers loads only",
            "never imports other modules a folder names")


def test_custom_pipeline_code_is_refused(pipeline_folder, evil_module):
    (pipeline_folder / f"{EVIL}.py").write_text("raise SystemExit('custom pipeline code ran')\n")
    refused(edit_index(pipeline_folder, _class_name=[EVIL, "EvilPipeline"]), "does not name a pipeline class",
            "custom pipeline code, which sida_diffusers never imports")
    for option in ("custom_pipeline", "trust_remote_code"):
        refused(pipeline_folder, f"{option} is refused", **{option: EVIL if option == "custom_pipeline" else True})


def test_code_shipped_inside_a_component_folder_is_refused(pipeline_folder, evil_module):
    (pipeline_folder / "unet" / "sida_diffusers.networks.precond.py").write_text("raise SystemExit('ran')\n")
    refused(pipeline_folder, f"{pipeline_folder / 'unet'} ships code (sida_diffusers.networks.precond.py)")


def test_a_folder_of_another_pipeline_names_the_class_to_use(pipeline_folder):
    refused(edit_index(pipeline_folder, _class_name="EDMHeunPipeline"),
            "describes a EDMHeunPipeline, not a SiDAPipeline; load it with EDMHeunPipeline.from_pretrained")
    refused(edit_index(pipeline_folder, _class_name="SiDAPipeline"), "describes a SiDAPipeline, not a EDMHeunPipeline",
            cls=EDMHeunPipeline)


def test_pickled_weights_are_never_unpickled(pipeline_folder, tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "unpickled.txt"), "w"))

    (pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (pipeline_folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(FileNotFoundError, match="pickled weights, which sida_diffusers never loads"):
        SiDAPipeline.from_pretrained(pipeline_folder)
    assert not (tmp_path / "unpickled.txt").exists()


def test_the_folders_the_package_writes_still_load(tmp_path):
    SiDAPipeline(unet=tiny_edm(channels=4, augment_dim=0), vae=tiny_vae(), latent_scale=EDM2_LATENT_SCALE,
                 latent_bias=EDM2_LATENT_BIAS).save_pretrained(tmp_path / "latent")
    assert SiDAPipeline.from_pretrained(tmp_path / "latent").vae is not None
    EDMHeunPipeline(unet=tiny_edm(), guide=tiny_edm(seed=1)).save_pretrained(tmp_path / "heun")
    heun = EDMHeunPipeline.from_pretrained(tmp_path / "heun")
    assert type(heun.guide).__name__ == "EDMPrecond" and heun.vae is None


# ---- links out of the folder ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["README.md", "run_info.json", "samples_grid.png", "model_index.json",
                                  "unet/config.json", "unet/diffusion_pytorch_model.safetensors"])
def test_a_file_linked_from_outside_the_folder_is_refused_and_never_republished(pipeline_folder, tmp_path, name):
    """A folder from elsewhere may link README.md or run_info.json to any file of the user's (~/.ssh/id_rsa): loading
    it would put that file on the pipeline, and save_pretrained / push_to_hub would publish it."""
    secret = tmp_path / "secret" / name.replace("/", "_")
    secret.parent.mkdir(exist_ok=True)
    if (pipeline_folder / name).exists():
        (pipeline_folder / name).replace(secret)
    else:
        secret.write_text("the user's private file")
    (pipeline_folder / name).symlink_to(secret)
    refused(pipeline_folder, f"{pipeline_folder / name} is a link to {secret}", "outside")


def test_a_component_folder_linked_from_elsewhere_is_refused(pipeline_folder, tmp_path):
    (pipeline_folder / "unet").replace(tmp_path / "elsewhere")
    (pipeline_folder / "unet").symlink_to(tmp_path / "elsewhere")
    refused(pipeline_folder, "is a link to", "outside")


def test_a_hub_cache_snapshot_linking_into_its_own_blobs_loads(pipeline_folder, tmp_path):
    """huggingface_hub's cache: snapshots/REV/file -> ../../blobs/HASH, links that stay inside the repository."""
    repo = tmp_path / "models--someone--pipe"
    snapshot = repo / "snapshots" / "0123abc"
    for i, file in enumerate(sorted(p for p in pipeline_folder.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        file.replace(blob)
        target = snapshot / file.relative_to(pipeline_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(blob)
    assert SiDAPipeline.from_pretrained(snapshot).labels == {"a": 0, "b": 1, "c": 2}


# ---- values of model_index.json and config.json ---------------------------------------------------------------------------

@pytest.mark.parametrize("entries, problem", [
    ({"id2label": ["a", "b", "c"]}, "id2label must be a dict {class index: name}"),
    ({"id2label": {"x": "a"}}, "its entry 'x' does not"),
    ({"init_sigma": float("inf")}, "init_sigma must be positive and finite"),
    ({"init_sigma": float("nan")}, "init_sigma must be positive and finite"),
    ({"latent_scale": [float("inf")] * 4, "latent_bias": [0.0] * 4}, "latent_scale must be a short list of finite"),
])
def test_absurd_pipeline_settings_are_refused_as_values_not_tracebacks(pipeline_folder, entries, problem):
    refused(edit_index(pipeline_folder, **entries), problem)


def test_a_quantized_component_config_is_refused_before_diffusers_looks_for_a_gpu(pipeline_folder):
    config = json.loads((pipeline_folder / "unet" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (pipeline_folder / "unet" / "config.json").write_text(json.dumps(config))
    refused(pipeline_folder, "unet/config.json sets 'quantization_config'", "does not load")


# ---- what a Hub download fetches --------------------------------------------------------------------------------------------

def test_a_hub_download_fetches_only_the_files_a_pipeline_is_read_from(pipeline_folder, monkeypatch):
    import fnmatch

    import huggingface_hub

    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(pipeline_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert SiDAPipeline.from_pretrained("someone/pipe").labels == {"a": 0, "b": 1, "c": 2}
    fetched = lambda name: any(fnmatch.fnmatch(name, p) for p in asked["patterns"])  # noqa: E731
    assert asked["repo_id"] == "someone/pipe"
    assert all(fetched(str(p.relative_to(pipeline_folder))) for p in pipeline_folder.rglob("*")
               if p.is_file() and p.suffix != ".py")
    assert not any(fetched(name) for name in ("sida_standalone.py", "unet/sida_unet.py", "unet/diffusion_pytorch_model.bin",
                                              "evil.pkl", "data/train.zip", ".gitattributes", "unet/evil.py"))
