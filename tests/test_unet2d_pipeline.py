"""Pipelines over a Diffusers UNet2DModel (ALGORITHM.md §12): the exported SiDAPipeline of such a generator is a plain
UNet2DModel folder plus its scheduler, loaded by SiDAPipeline.from_pretrained and by plain Diffusers
(trust_remote_code, without sida_diffusers) to the same images; the teacher's own Diffusers sampler is exactly
Diffusers' DDPM/DDIM pipelines on the same per-seed noise."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from sida_diffusers.networks import UNet2DDenoiser
from sida_diffusers.pipelines import EDMHeunPipeline, SiDAPipeline, seed_generators
from sida_diffusers.pipelines.scheduler_sampler import SchedulerSamplerPipeline, scheduler_for

from conftest import ID2LABEL, tiny_edm, tiny_unet2d


SEEDS = [0, 1, 2, 3]


def generator(label_dim=0):
    """A one-step generator distilled from a UNet2DModel teacher: a UNet2DDenoiser (v-prediction, cosine betas)."""
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return UNet2DDenoiser.from_unet(tiny_unet2d(label_dim=label_dim, channels=3),
                                    {**scheduler.config, "_class_name": "DDPMScheduler"})


def images(pipe, class_labels=None, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=len(SEEDS), class_labels=class_labels, generator=seed_generators(SEEDS),
                output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet2d")
    SiDAPipeline(unet=generator(label_dim=3), id2label=ID2LABEL).save_pretrained(root / "cond")
    SiDAPipeline(unet=generator()).save_pretrained(root / "uncond")
    return root


def test_the_exported_generator_is_a_plain_unet2dmodel_and_its_scheduler(saved):
    index = json.loads((saved / "cond" / "model_index.json").read_text())
    assert index["_class_name"] == ["sida_standalone", "SiDAPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    files = sorted(p.relative_to(saved / "cond").as_posix() for p in (saved / "cond").rglob("*") if p.is_file())
    assert files == ["model_index.json", "scheduler/scheduler_config.json", "sida_standalone.py", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    unet = UNet2DModel.from_pretrained(saved / "cond" / "unet")  # Diffusers alone reads the generator's weights
    scheduler = DDPMScheduler.from_pretrained(saved / "cond" / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and unet.config.num_class_embeds == 3
    expected = generator(label_dim=3).unet
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), expected.state_dict().values()))


@pytest.mark.parametrize("name, labels", [("cond", [0, 2, 1, 1]), ("cond", None), ("uncond", None)])
def test_sida_pipeline_loads_the_folder_back_to_the_same_images(saved, name, labels):
    loaded = SiDAPipeline.from_pretrained(saved / name)
    assert type(loaded.unet) is UNet2DModel and isinstance(loaded.denoiser, UNet2DDenoiser)
    original = SiDAPipeline(unet=generator(label_dim=3 if name == "cond" else 0))
    np.testing.assert_array_equal(images(loaded, labels), images(original, labels))


def test_a_unet2dmodel_and_its_scheduler_make_the_same_pipeline_as_the_denoiser():
    net = generator(label_dim=3)
    from_parts = SiDAPipeline(unet=net.unet, scheduler=net.make_scheduler())
    from_denoiser = SiDAPipeline(unet=net)
    assert from_denoiser.denoiser is net and from_parts.unet is net.unet  # shared, never copied
    np.testing.assert_array_equal(images(from_parts, [1, 1, 0, 2]), images(from_denoiser, [1, 1, 0, 2]))
    with pytest.raises(ValueError, match="needs the scheduler that carries its noise schedule"):
        SiDAPipeline(unet=net.unet)
    with pytest.raises(ValueError, match="a scheduler goes with a Diffusers UNet2DModel"):
        SiDAPipeline(unet=tiny_edm(), scheduler=DDPMScheduler())


REMOTE = textwrap.dedent("""
    import json, sys
    sys.modules["sida_diffusers"] = None  # not importable here: plain Diffusers only
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    root, seeds = sys.argv[1], json.loads(sys.argv[2])
    out = {}
    for name, labels in (("cond", [0, 2, 1, 1]), ("uncond", None)):
        pipe = DiffusionPipeline.from_pretrained(f"{root}/{name}", trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe(batch_size=len(seeds), class_labels=labels, output_type="np",
                         generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        print(type(pipe).__module__, type(pipe.unet).__module__, type(pipe.scheduler).__name__)
    np.savez(f"{root}/remote.npz", **out)
""")


def test_plain_diffusers_loads_the_folder_without_sida_diffusers_to_the_same_images(saved, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", REMOTE, str(saved), json.dumps(SEEDS)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[0] == ("diffusers_modules.local.sida_standalone "
                                         "diffusers.models.unets.unet_2d DDPMScheduler")
    assert "Expected types" not in run.stderr
    remote = np.load(saved / "remote.npz")
    for name, labels in (("cond", [0, 2, 1, 1]), ("uncond", None)):
        np.testing.assert_array_equal(remote[name], images(SiDAPipeline.from_pretrained(saved / name), labels))


def test_a_hostile_scheduler_or_unet_config_in_a_pipeline_folder_is_refused_before_loading(saved, tmp_path, bounded):
    import shutil

    for name, file, changes, problem in (
            ("scheduler", "scheduler_config.json", {"num_train_timesteps": 10 ** 9}, "num_train_timesteps must be"),
            ("scheduler", "scheduler_config.json", {"_class_name": "ScoreSdeVeScheduler"}, "discrete-time VP"),
            ("unet", "config.json", {"block_out_channels": [1 << 20, 1 << 20]}, "describes a network of at least")):
        folder = tmp_path / f"{name}-{len(changes)}-{problem[:5]}"
        shutil.copytree(saved / "cond", folder)
        path = folder / name / file
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        with pytest.raises(ValueError, match=problem) as error:
            SiDAPipeline.from_pretrained(folder)
        assert str(path) in str(error.value)


# ---- the teacher's baselines ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("diffusers_pipeline, scheduler_class", [(DDIMPipeline, DDIMScheduler),
                                                                 (DDPMPipeline, DDPMScheduler)])
def test_the_scheduler_sampler_is_diffusers_own_pipeline_on_the_same_noise(diffusers_pipeline, scheduler_class):
    teacher = UNet2DDenoiser.from_unet(tiny_unet2d(channels=3), {**DDPMScheduler().config,
                                                                 "_class_name": "DDPMScheduler"})
    ours = SchedulerSamplerPipeline(unet=teacher, scheduler=scheduler_for(teacher, scheduler_class.__name__))
    ours.set_progress_bar_config(disable=True)
    out = ours(batch_size=4, generator=seed_generators(SEEDS), num_inference_steps=20, output_type="pt")
    theirs = diffusers_pipeline(unet=teacher.unet, scheduler=scheduler_class.from_config(teacher.make_scheduler().config))
    theirs.set_progress_bar_config(disable=True)
    reference = theirs(batch_size=4, generator=seed_generators(SEEDS), num_inference_steps=20, output_type="np").images
    assert out.nfe == 20
    np.testing.assert_array_equal(out.images.permute(0, 2, 3, 1).numpy(), reference)  # the [0, 1] image, unquantised


def test_teacher_figures_depend_on_the_seeds_only_for_a_conditional_teacher():
    teacher = generator(label_dim=3)
    for pipe, kwargs in ((SchedulerSamplerPipeline(unet=teacher), {"num_inference_steps": 10}),
                         (EDMHeunPipeline(unet=teacher), {"num_inference_steps": 6})):
        pipe.set_progress_bar_config(disable=True)
        together = pipe.generate_uint8(range(6), label_pool=[0, 1, 1, 2], batch_size=6, **kwargs)
        apart = pipe.generate_uint8(range(6), label_pool=[0, 1, 1, 2], batch_size=4, **kwargs)
        assert together.shape == (6, 3, 8, 8) and torch.equal(together, apart)
    assert type(SchedulerSamplerPipeline(unet=teacher).scheduler).__name__ == "DDPMScheduler"  # the teacher's own
    with pytest.raises(ValueError, match="unknown teacher scheduler 'FlowMatchEulerDiscreteScheduler'"):
        scheduler_for(teacher, "FlowMatchEulerDiscreteScheduler")
    with pytest.raises(ValueError, match="use EDMHeunPipeline"):
        SchedulerSamplerPipeline(unet=tiny_edm())
