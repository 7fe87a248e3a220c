"""SiDA from a Diffusers UNet2DModel teacher (ALGORITHM.md §12): the fake score and generator are copies of the wrapped
teacher, the run summary compares the student with the teacher's own Diffusers sampler and with EDM Heun on the same
seeds, a resumed run continues bit for bit, and two gloo processes end with identical parameters."""

import dataclasses
import json

import pytest
import torch

from sida_diffusers.networks import UNet2DDenoiser
from sida_diffusers.pipelines import SiDAPipeline
from sida_diffusers.pretrained import load_denoiser
from sida_diffusers.training import SiDATrainer, parse_args

from conftest import RANK_PARAMETERS_SCRIPT, params, save_ddpm_folder, tiny_config, tiny_unet2d, torchrun


@pytest.fixture(scope="module")
def ddpm_teacher(tmp_path_factory):
    """A class-conditional DDPM pipeline folder at 8x8x1 with dropout (it must resume exactly too)."""
    folder = tmp_path_factory.mktemp("teacher") / "ddpm"
    save_ddpm_folder(folder, tiny_unet2d(label_dim=10, dropout=0.1), beta_schedule="squaredcos_cap_v2")
    return folder


def losses(out):
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


def test_the_students_are_copies_of_the_wrapped_teacher_and_the_generator_exports_as_a_unet2dmodel(
        tmp_path, ddpm_teacher, digits8):
    trainer = SiDATrainer(tiny_config(tmp_path, teacher=str(ddpm_teacher), dropout=0.2), dataset=digits8)
    teacher, fake, gen = trainer.teacher, trainer.unwrap(trainer.fake_score), trainer.unwrap(trainer.generator)
    assert all(type(net) is UNet2DDenoiser for net in (teacher, fake, gen))
    assert fake.unet.config.dropout == gen.unet.config.dropout == 0.2 and teacher.unet.config.dropout == 0.1
    assert torch.equal(params(gen), params(teacher)) and fake.unet is not teacher.unet
    assert fake.config.scheduler_config == teacher.config.scheduler_config
    pipeline_dir = trainer.train()
    assert not torch.equal(params(trainer.unwrap(trainer.generator)), params(teacher))
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipe = SiDAPipeline.from_pretrained(pipeline_dir)
    assert torch.equal(params(pipe.denoiser), params(trainer.generator_ema))
    assert pipe(batch_size=2, class_labels=[3, 7], output_type="pt").images.shape == (2, 1, 8, 8)


def test_the_run_summary_has_the_teachers_diffusers_sampler_and_edm_heun_on_the_students_seeds(tmp_path, digits16):
    teacher_dir = tmp_path / "teacher16"
    save_ddpm_folder(teacher_dir, tiny_unet2d(label_dim=10, resolution=16))
    cfg = tiny_config(tmp_path, teacher=str(teacher_dir), resolution=None, max_train_kimg=0.008, warmup_kimg=0.008,
                      eval_metrics=["fd_digits"], eval_every_kimg=0.008, eval_num_samples=80, eval_batch_size=40,
                      teacher_scheduler="DDIMScheduler", teacher_num_inference_steps=5)
    trainer = SiDATrainer(cfg, dataset=digits16)
    trainer.train()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    heun, ddim = summary["teacher_evals"]
    assert (heun["sampler"], heun["nfe"], ddim["sampler"], ddim["nfe"]) == ("cifar10", 35, "DDIMScheduler-5", 5)
    assert summary["teacher_eval"] == heun and summary["fd_digits_teacher"] == heun["metrics"]["fd_digits_80"]
    assert heun["metrics"]["fd_digits_80"] != ddim["metrics"]["fd_digits_80"]
    # the same seeds and labels as the student: what DDIM gives through the pipelines' one generation path
    from sida_diffusers.evaluation import pipeline_sample_fn
    from sida_diffusers.pipelines.scheduler_sampler import SchedulerSamplerPipeline, scheduler_for

    pipe = SchedulerSamplerPipeline(unet=trainer.teacher, scheduler=scheduler_for(trainer.teacher, "DDIMScheduler"))
    pipe.set_progress_bar_config(disable=True)
    again = trainer.suite.evaluate(pipeline_sample_fn(pipe, 0, trainer.label_pool, num_inference_steps=5))
    assert again == ddim["metrics"]
    # a resumed run that finishes again reuses both figures instead of sampling the teacher again
    from sida_diffusers.training import summary as run_summary

    def must_not_sample(net):
        raise AssertionError("a teacher figure held by summary.json was sampled again")

    samplers = [dataclasses.replace(s, make_pipeline=must_not_sample)
                for s in run_summary.teacher_samplers(trainer.teacher, "DDIMScheduler", 5)]
    cached = run_summary.teacher_baseline(tmp_path / "run", cfg.teacher, trainer.suite, trainer.teacher,
                                          trainer.label_pool, samplers)
    assert [e["metrics"] for e in cached] == [heun["metrics"], ddim["metrics"]]


@pytest.mark.parametrize("overrides, message", [
    ({"teacher_scheduler": "FlowMatchEulerDiscreteScheduler"}, "--teacher_scheduler FlowMatchEulerDiscreteScheduler"),
    ({"teacher_num_inference_steps": 5000}, "--teacher_num_inference_steps must be in 1..1000"),
    ({"augment_p": 0.1}, "augment_dim=9"),
])
def test_options_a_unet2dmodel_teacher_cannot_take_are_refused_before_training(tmp_path, ddpm_teacher, digits8,
                                                                                 overrides, message):
    with pytest.raises(ValueError, match=message):
        SiDATrainer(tiny_config(tmp_path, teacher=str(ddpm_teacher), **overrides), dataset=digits8)
    assert not (tmp_path / "run").exists()


def flags(teacher, out, max_kimg, seed=5):
    return ["--teacher", str(teacher), "--method", "sida", "--train_data", "digits", "--resolution", "8",
            "--train_batch_size", "4", "--total_batch_size", "8", "--warmup_kimg", "0.008",
            "--adversarial_start_kimg", "0.016", "--max_train_kimg", str(max_kimg), "--checkpointing_kimg", "0.016",
            "--log_every_kimg", "0.008", "--lr", "1e-3", "--glr", "1e-3", "--ema_halflife_kimg", "0.05",
            "--sample_grid_size", "0", "--seed", str(seed), "--cpu", "--output_dir", str(out)]


@pytest.mark.slow
def test_a_run_stopped_at_a_checkpoint_and_resumed_equals_the_uninterrupted_run(tmp_path, ddpm_teacher):
    whole = SiDATrainer(parse_args(flags(ddpm_teacher, tmp_path / "whole", 0.032)))
    whole.train()
    SiDATrainer(parse_args(flags(ddpm_teacher, tmp_path / "halves", 0.016))).train()
    resumed = SiDATrainer(parse_args(flags(ddpm_teacher, tmp_path / "halves", 0.032)
                                     + ["--resume_from_checkpoint", "latest"]))
    assert resumed.cur_nimg == 16
    resumed.train()
    for name in ("generator", "generator_ema", "fake_score"):
        torch.testing.assert_close(params(resumed.unwrap(getattr(resumed, name))),
                                   params(whole.unwrap(getattr(whole, name))), rtol=0, atol=0)
    logged = {round(s["kimg"], 3): s for s in losses(tmp_path / "halves")}
    for s in losses(tmp_path / "whole"):
        for key in ("fake_score_loss", "d_loss", "g_loss", "g_gan_loss"):
            assert logged[round(s["kimg"], 3)][key] == s[key], (s["kimg"], key)


@pytest.mark.slow
def test_two_gloo_processes_distil_a_unet2dmodel_teacher_to_identical_parameters(tmp_path, ddpm_teacher):
    out = tmp_path / "run"
    run_flags = flags(ddpm_teacher, out, 0.048, seed=3)
    run_flags[run_flags.index("--total_batch_size") + 1] = "16"
    proc = torchrun(tmp_path, RANK_PARAMETERS_SCRIPT, *run_flags, timeout=300)
    assert "2 process(es) x B=4 x R=2 rounds = 16 images" in proc.stdout
    rank0, rank1 = (torch.load(out / f"params_rank{r}.pt") for r in (0, 1))
    teacher = params(load_denoiser(ddpm_teacher))
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    assert not torch.equal(rank0["generator"], teacher) and not torch.equal(rank0["fake_score"], teacher)
    assert json.loads((out / "pipeline" / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
