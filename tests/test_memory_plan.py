"""The memory plan (`sida-plan`, `train_sida --plan`, the check before step 1): built without allocating the networks,
its activations are what the real networks keep, and a launch that clearly cannot fit stops with one line."""

import json
import subprocess
import sys
import time

import pytest
import torch

from sida_diffusers.networks import denoiser_from_official
from sida_diffusers.shipped import SHIPPED_TEACHERS
from sida_diffusers.training import SiDATrainer, make_config
from sida_diffusers.training.config import load_presets
from sida_diffusers.training.memory_plan import (
    LiveTensorBytes,
    _generator_phase_bytes,
    _largest_block_bytes,
    load_architectures,
    make_plan,
    teacher_factory,
)
from sida_diffusers.training.students import student_networks

from conftest import REPO_ROOT, tiny_config, tiny_edm2, tiny_teacher, tiny_unet2d


def test_every_preset_teacher_architecture_builds_on_meta_with_its_official_parameter_count():
    architectures = load_architectures()
    teachers = {values["teacher"] for values in load_presets().values()} - set(SHIPPED_TEACHERS)
    assert teachers <= set(architectures)
    for name, spec in architectures.items():
        with torch.device("meta"):
            net = teacher_factory(name)()
        assert sum(p.numel() for p in net.parameters()) == spec["num_params"], name
        assert all(p.is_meta for p in net.parameters())


@pytest.mark.parametrize("precision,checkpointing", [("no", False), ("no", True), ("bf16", False)],
                         ids=["fp32", "fp32 + gradient checkpointing", "bf16 autocast"])
@pytest.mark.parametrize("family", ["EDM", "EDM2", "UNet2DModel"])
def test_planned_activations_are_what_the_real_networks_keep(family, precision, checkpointing):
    # The plan runs the generator phase's forward passes on meta (or fake) tensors; the same passes on real CPU
    # tensors keep those bytes alive for backward, at every batch size (the plan extrapolates from batches 1 and 2).
    if family == "EDM":
        kwargs = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                      attn_resolutions=[8], augment_dim=9, dropout=0.1, img_resolution=16, img_channels=3,
                      label_dim=10)
        factory, extra = lambda: denoiser_from_official("EDMPrecond", kwargs), {}
    elif family == "EDM2":
        factory, extra = lambda: tiny_edm2(dropout=0.1), dict(use_logvar=True, force_normalization=True)
    else:
        from diffusers import DDPMScheduler

        from sida_diffusers.networks.unet2d import UNet2DDenoiser

        factory = lambda: UNet2DDenoiser.over(tiny_unet2d(label_dim=10, resolution=16, dropout=0.1), DDPMScheduler())
        extra = {}
    cfg = make_config(teacher="tiny", train_data="tiny", mixed_precision=precision,
                      gradient_checkpointing=checkpointing, **extra)
    plan = make_plan(cfg, factory)
    teacher = factory().eval().requires_grad_(False)
    fake, gen = student_networks(cfg, teacher, None)
    fake.eval().requires_grad_(False)
    gen.train()
    for net in (teacher, fake, gen):
        if checkpointing:
            net.enable_gradient_checkpointing()
    for batch in (1, 3):
        real = _generator_phase_bytes(cfg, teacher, fake, gen, batch, "cpu")
        if checkpointing:  # and, in backward, the largest block recomputed at once
            real += _largest_block_bytes(gen, batch, "cpu")
        assert plan.activations(batch) == pytest.approx(real, rel=0.05), batch
    assert plan.act_per_image > 0


def test_gradient_checkpointing_and_fsdp_shrink_what_the_plan_needs():
    cfg = dict(teacher="tiny", train_data="tiny", use_logvar=True, mixed_precision="fp16")
    plain = make_plan(make_config(**cfg), tiny_edm2)
    checked = make_plan(make_config(**cfg, gradient_checkpointing=True), tiny_edm2)
    assert checked.act_per_image < 0.5 * plain.act_per_image
    ddp, fsdp = plain.components(False, 8, 64), plain.components(True, 8, 64)
    for part in ("generator + fake score", "Adam states", "EMA", "teacher"):
        assert fsdp[part] == pytest.approx(ddp[part] / 8)
    assert fsdp["peak"] < ddp["peak"] and ddp["DDP buckets"] > 0 == fsdp["DDP buckets"]
    memory = ddp["peak"]  # exactly what DDP needs at B=64: FSDP fits a larger batch in it
    assert plain.max_batch(False, 8, memory) == 64 < plain.max_batch(True, 8, memory)


def test_plan_command_prints_every_part_for_the_largest_preset_quickly(capsys):
    from sida_diffusers.cli.plan import main

    start = time.perf_counter()
    text = main(["--preset", "edm2-xxl", "--processes", "1", "8", "--gpu_memory_gb", "24", "80"])
    assert time.perf_counter() - start < 10
    assert capsys.readouterr().out.strip().startswith("memory plan for edm2-xxl")
    for part in ("generator + fake score", "gradients", "Adam states", "EMA", "teacher", "DDP buckets",
                 "FSDP gathered", "activations (B=2)", "peak", "largest B on 24 GB", "largest B on 80 GB"):
        assert part in text
    assert "1523.2 M generator" in text and "DDP x8" in text and "FSDP x8" in text


def test_train_sida_plan_flag_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    from sida_diffusers.cli.train import main

    assert main(["--plan", "--preset", "cifar10-uncond", "--output_dir", str(tmp_path / "run"),
                 "--processes", "4"]) is None
    assert "memory plan for cifar10-uncond" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_plan_of_every_preset_runs_in_under_ten_seconds():
    for preset in load_presets():
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "sida_diffusers.cli.plan", "--preset", preset],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"memory plan for {preset}" in proc.stdout
        planned = float(proc.stdout.rsplit("(planned in ", 1)[1].split(" s")[0])
        assert planned < 10, (preset, planned, time.perf_counter() - start)


def test_plan_refuses_a_teacher_it_cannot_see_without_weights(tmp_path, capsys):
    from sida_diffusers.cli.plan import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--teacher", str(tmp_path / "teacher.pkl"), "--method", "sid"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sida-plan: error:") and "sida-convert" in err and "\n" not in err


def test_a_launch_that_clearly_cannot_fit_stops_before_step_one(tmp_path):
    cfg = tiny_config(tmp_path, gpu_memory_gb=1e-4)
    with pytest.raises(ValueError, match=r"this launch will not fit: the memory plan needs .* GB per process .* "
                                         r"try .*--train_batch_size|this launch will not fit"):
        SiDATrainer(cfg, teacher=tiny_teacher())
    assert not (tmp_path / "run").exists()
    # enough memory: no complaint
    SiDATrainer(tiny_config(tmp_path, gpu_memory_gb=8.0), teacher=tiny_teacher())


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path, capsys):
    from sida_diffusers.cli.train import main

    teacher = tiny_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    with pytest.raises(SystemExit) as exit_info:
        main(["--teacher", str(tmp_path / "teacher"), "--train_data", "digits", "--resolution", "8", "--cpu",
              "--gpu_memory_gb", "0.0001", "--output_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_sida: error: this launch will not fit") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_live_tensor_bytes_counts_what_is_alive_and_ignores_existing_weights():
    weight = torch.randn(100)
    with LiveTensorBytes(ignore=[weight]) as tracker:
        view = weight[:10] * 1.0  # a new 40-byte tensor; the view of the weight itself is not counted
        a = torch.empty(1000)
        del a
        b = torch.empty(500)
    assert tracker.peak == 40 + 4000 and tracker.current == 40 + 2000
    del view, b
    assert json.dumps(tracker.current) == "0"
