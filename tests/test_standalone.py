"""Saved SiDAPipeline folders load with plain Diffusers (remote code) where sida_diffusers is not installed, and with
SiDAPipeline.from_pretrained, which resolves every class from the installed package and never runs the folder's code."""

import ast
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from sida_diffusers.networks import EDM2Precond
from sida_diffusers.pipelines import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE, SiDAPipeline, seed_generators
from sida_diffusers.pipelines.standalone import STANDALONE_SOURCES, component_source, standalone_source

from conftest import ID2LABEL, tiny_edm, tiny_vae


torch.set_num_threads(1)
SEEDS = [0, 1, 2, 3]


def tiny_edm2(label_dim=4):
    """A random EDM2Precond on 4x8x8 latents (SiDA's EDM2 generator has no logvar head)."""
    torch.manual_seed(2)
    return EDM2Precond(img_resolution=8, img_channels=4, label_dim=label_dim, model_channels=16, channel_mult=[1, 2],
                       num_blocks=1, attn_resolutions=[4], channels_per_head=8, logvar_channels=0,
                       use_fp16=False).eval()


def pipelines():
    return {
        "edm-cond": SiDAPipeline(unet=tiny_edm(label_dim=3), id2label=ID2LABEL),
        "edm-2step": SiDAPipeline(unet=tiny_edm(), step_sigmas=[2.5, 0.6]),  # a few-step generator (ALGORITHM.md §11)
        "edm2-latent": SiDAPipeline(unet=tiny_edm2(), vae=tiny_vae(), latent_scale=EDM2_LATENT_SCALE,
                                    latent_bias=EDM2_LATENT_BIAS),
    }


# The class_labels of each call (one generator per seed; None draws the labels from the generators).
CALLS = {"edm-cond": [[0, 2, 1, 1], None], "edm-2step": [None], "edm2-latent": [None, [3, 0, 1, 2]]}


def generate(pipe, name):
    pipe.set_progress_bar_config(disable=True)
    return [pipe(batch_size=len(SEEDS), class_labels=labels, generator=seed_generators(SEEDS),
                 output_type="np").images for labels in CALLS[name]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    for name, pipe in pipelines().items():
        pipe.save_pretrained(root / name)
    return root


# ---- the layout and its source --------------------------------------------------------------------------------------
def test_a_saved_folder_names_the_standalone_module_in_model_index(saved):
    index = json.loads((saved / "edm2-latent" / "model_index.json").read_text())
    assert index["_class_name"] == ["sida_standalone", "SiDAPipeline"]
    assert index["unet"] == ["sida_unet", "EDM2Precond"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    # regenerated now from the package: the folder holds exactly this, once
    assert (saved / "edm2-latent" / "sida_standalone.py").read_text() == standalone_source()
    assert (saved / "edm2-latent" / "unet" / "sida_unet.py").read_text() == component_source()
    assert sorted(p.name for p in (saved / "edm2-latent").rglob("*.py")) == ["sida_standalone.py", "sida_unet.py"]


def test_the_standalone_module_is_the_package_source_with_nothing_of_the_package_imported():
    source = standalone_source()
    for module_name in STANDALONE_SOURCES:  # every definition of every inlined module, verbatim
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module_name:
                assert inspect.getsource(obj) in source, f"{module_name}.{name}"
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    # yaml: the bounded reading of a model card's front matter (PyYAML is a dependency of huggingface_hub)
    assert imported - set(sys.stdlib_module_names) <= {"PIL", "diffusers", "huggingface_hub", "numpy", "torch", "yaml"}


def test_the_generated_module_makes_the_same_images_as_the_package(saved):
    """The standalone classes, imported from the saved file, reproduce SiDAPipeline bit for bit."""
    for name, pipe in pipelines().items():
        spec = importlib.util.spec_from_file_location(f"standalone_{name.replace('-', '_')}",
                                                      saved / name / "sida_standalone.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        unet = getattr(module, type(pipe.unet).__name__).from_pretrained(saved / name / "unet").eval()
        copy = module.SiDAPipeline(unet=unet, vae=pipe.vae, **{k: pipe.config[k] for k in (
            "init_sigma", "id2label", "latent_scale", "latent_bias", "step_sigmas", "renoise")})
        for ours, theirs in zip(generate(copy, name), generate(pipe, name)):
            np.testing.assert_array_equal(ours, theirs)


# ---- loading with sida_diffusers -------------------------------------------------------------------------------------
def test_sida_pipeline_never_runs_the_python_files_of_a_folder(saved, tmp_path):
    folder = tmp_path / "poisoned"
    pipelines()["edm-cond"].save_pretrained(folder)
    marker = tmp_path / "executed"
    poison = f"open({str(marker)!r}, 'w').close()\nraise RuntimeError('the folder code was executed')\n"
    for path in folder.rglob("*.py"):
        path.write_text(poison)
    loaded = SiDAPipeline.from_pretrained(folder)
    assert not marker.exists()
    assert type(loaded.unet).__module__ == "sida_diffusers.networks.precond"
    np.testing.assert_array_equal(generate(loaded, "edm-cond")[0], generate(pipelines()["edm-cond"], "edm-cond")[0])


def test_folders_saved_before_the_standalone_module_still_load(tmp_path):
    pipe = pipelines()["edm-cond"]
    DiffusionPipeline.save_pretrained(pipe, tmp_path)  # Diffusers' own save: today's package-module layout
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "SiDAPipeline" and index["unet"] == ["sida_diffusers.networks.precond", "EDMPrecond"]
    loaded = SiDAPipeline.from_pretrained(tmp_path)
    for ours, theirs in zip(generate(loaded, "edm-cond"), generate(pipe, "edm-cond")):
        np.testing.assert_array_equal(ours, theirs)


def test_a_standalone_name_this_package_does_not_know_is_a_clear_error(saved, tmp_path):
    import shutil

    shutil.copytree(saved / "edm-cond", tmp_path / "future")
    index = json.loads((tmp_path / "future" / "model_index.json").read_text())
    index["unet"] = ["sida_unet", "EDM3Precond"]
    (tmp_path / "future" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'EDM3Precond' .* no such class .* trust_remote_code=True"):
        SiDAPipeline.from_pretrained(tmp_path / "future")


# ---- loading without sida_diffusers ----------------------------------------------------------------------------------
REMOTE_SCRIPT = textwrap.dedent("""
    import contextlib, fnmatch, json, shutil, sys, types
    from pathlib import Path
    from unittest import mock
    sys.modules["sida_diffusers"] = None  # sida_diffusers is not importable in this process
    try:
        import sida_diffusers  # noqa: F401
        raise SystemExit("sida_diffusers could be imported")
    except ImportError:
        pass
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    def as_hub_repo(folder, cache):
        \"\"\"Serve `folder` as a Hub repo: Diffusers' own download logic picks the files, which land in `cache`.\"\"\"
        files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())
        info = types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=f) for f in files], sha="0" * 40)

        def fetch(name):
            (Path(cache) / name).parent.mkdir(parents=True, exist_ok=True)
            return shutil.copyfile(Path(folder) / name, Path(cache) / name)

        def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
            return str(fetch(f"{subfolder}/{filename}" if subfolder else filename))

        def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
            for f in files:
                if any(fnmatch.fnmatch(f, p) for p in allow_patterns) and not any(
                        fnmatch.fnmatch(f, p) for p in ignore_patterns or []):
                    fetch(f)
            return str(cache)

        utils, dynamic = "diffusers.pipelines.pipeline_utils", "diffusers.utils.dynamic_modules_utils"
        return [mock.patch(f"{utils}.model_info", return_value=info),
                mock.patch(f"{dynamic}.model_info", return_value=info),
                mock.patch(f"{utils}._resolve_revision", return_value=None, create=True),  # Diffusers >= 0.41
                mock.patch(f"{utils}.hf_hub_download", hf_hub_download),
                mock.patch(f"{dynamic}.hf_hub_download", hf_hub_download),
                mock.patch(f"{utils}.snapshot_download", snapshot_download)]

    root, calls, seeds = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    arrays, report = {}, {}
    for name, labels in calls.items():
        for where in ("folder", "hub"):
            with contextlib.ExitStack() as stack:
                if where == "hub":
                    cache = Path(root) / "hub-cache" / name
                    for patch in as_hub_repo(Path(root) / name, cache):
                        stack.enter_context(patch)
                pipe = DiffusionPipeline.from_pretrained(f"{root}/{name}" if where == "folder" else f"me/{name}",
                                                         trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            report[f"{name}/{where}"] = [type(pipe).__module__, type(pipe.unet).__name__, type(pipe.vae).__name__]
            for i, label in enumerate(labels):
                generator = [torch.Generator().manual_seed(s) for s in seeds]
                arrays[f"{name}/{where}/{i}"] = pipe(batch_size=len(seeds), class_labels=label, generator=generator,
                                                     output_type="np").images
    np.savez(f"{root}/remote.npz", **arrays)
    assert not [m for m in sys.modules if m.startswith("sida_diffusers.")]
    print(json.dumps(report))
""")


def test_plain_diffusers_loads_the_folder_and_the_hub_repo_without_sida_diffusers_and_makes_the_same_images(
        saved, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(saved), json.dumps(CALLS), json.dumps(SEEDS)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for where in ("folder", "hub"):
        assert report[f"edm-cond/{where}"] == ["diffusers_modules.local.sida_standalone", "EDMPrecond", "NoneType"]
        assert report[f"edm2-latent/{where}"] == ["diffusers_modules.local.sida_standalone", "EDM2Precond",
                                                  "AutoencoderKL"]
    assert "Expected types" not in run.stderr  # the pipeline and its unet share one Denoiser class
    fetched = sorted(p.relative_to(saved / "hub-cache" / "edm-cond").as_posix()
                     for p in (saved / "hub-cache" / "edm-cond").rglob("*") if p.is_file())
    assert fetched == ["model_index.json", "sida_standalone.py", "unet/config.json",  # what Diffusers downloads
                       "unet/diffusion_pytorch_model.safetensors", "unet/sida_unet.py"]
    remote = np.load(saved / "remote.npz")
    for name in CALLS:
        ours = generate(SiDAPipeline.from_pretrained(saved / name), name)
        for i, images in enumerate(ours):
            for where in ("folder", "hub"):
                assert remote[f"{name}/{where}/{i}"].dtype == np.float32
                np.testing.assert_array_equal(remote[f"{name}/{where}/{i}"], images)


# ---- saving again what plain Diffusers loaded -----------------------------------------------------------------------
SAVE_AGAIN_SCRIPT = textwrap.dedent("""
    import json, sys, types
    from pathlib import Path
    sys.modules["sida_diffusers"] = None  # sida_diffusers is not importable in this process
    import huggingface_hub
    import numpy as np
    import torch

    pushed = {}
    def upload_folder(folder_path, **kwargs):
        pushed.update({p.relative_to(folder_path).as_posix(): p.read_bytes().decode("latin-1")
                       for p in Path(folder_path).rglob("*") if p.is_file()})
    huggingface_hub.create_repo = lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id)
    huggingface_hub.upload_folder = upload_folder  # the standalone module imports these names when it is loaded
    from diffusers import DiffusionPipeline

    src, dst = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(src, trust_remote_code=True)
    pipe.save_pretrained(dst)
    pipe.push_to_hub("me/again")
    again = DiffusionPipeline.from_pretrained(dst, trust_remote_code=True)
    again.set_progress_bar_config(disable=True)
    generator = [torch.Generator().manual_seed(s) for s in range(4)]
    np.save(Path(dst).parent / "again.npy", again(batch_size=4, generator=generator, output_type="np").images)
    print(json.dumps({"pushed_card": pushed.get("README.md"), "pushed": sorted(pushed)}))
""")


def test_a_pipeline_plain_diffusers_loaded_saves_a_folder_both_loaders_read_and_keeps_its_card(tmp_path):
    from sida_diffusers.hub import export_pipeline

    run_info = {"method": "sida", "teacher": "edm-cifar10-32x32-cond-vp", "label_dim": 3, "id2label": ID2LABEL,
                "train_batch_size": 32, "metrics": {"fid_50k": 1.5}}
    export_pipeline(tiny_edm(label_dim=3), tmp_path / "src", run_info, grid_seeds=range(4))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", SAVE_AGAIN_SCRIPT, str(tmp_path / "src"), str(tmp_path / "dst")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    for name in ("README.md", "samples_grid.png", "run_info.json", "sida_standalone.py", "unet/sida_unet.py",
                 "model_index.json"):  # the very folder sida_diffusers wrote
        assert (tmp_path / "dst" / name).read_bytes() == (tmp_path / "src" / name).read_bytes(), name
    assert "_name_or_path" not in (tmp_path / "dst" / "unet" / "config.json").read_text()
    ours = SiDAPipeline.from_pretrained(tmp_path / "dst")  # and the package reads it, card included
    assert ours.model_card.data.license == "cc-by-nc-sa-4.0" and ours.run_info["metrics"] == {"fid_50k": 1.5}
    ours.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), ours(
        batch_size=4, generator=seed_generators(range(4)), output_type="np").images)
    # its push uploads the package's card (with the repo id), not Diffusers' generic one
    assert {"README.md", "samples_grid.png", "sida_standalone.py"} <= set(report["pushed"])
    assert 'SiDAPipeline.from_pretrained("me/again")' in report["pushed_card"] and "## Citation" in report["pushed_card"]
