"""`--fsdp`: the networks sharded with FSDP2 over 2 CPU processes (gloo) train exactly like DDP, and a checkpoint does
not care which of the two wrote it or reads it (ALGORITHM.md §13)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_edm2, tiny_teacher, tiny_vae, torchrun, write_latents


LOSSES = ("fake_score_loss", "d_loss", "g_loss", "g_gan_loss")
NETWORKS = ("generator", "generator_ema", "fake_score")

# One launch of two processes trains four runs of three iterations each, one after the other: DDP and FSDP from the
# same state, then each continued from the other's first checkpoint, saved again as loaded before its first step.
CROSS_RUNS = """
import sys
from pathlib import Path
from accelerate.state import PartialState
from sida_diffusers.training import SiDATrainer, parse_args

PartialState.destroy_process_group = lambda self, group=None: None  # runs 2-4 reuse the group run 1 ends with

root, flags = Path(sys.argv[1]), sys.argv[2:]
first = "checkpoints/checkpoint-000000016"
for name, extra in [("ddp", []), ("fsdp", ["--fsdp"]),
                    ("fsdp_from_ddp", ["--fsdp", "--resume_from_checkpoint", str(root / "ddp" / first)]),
                    ("ddp_from_fsdp", ["--resume_from_checkpoint", str(root / "fsdp" / first)])]:
    trainer = SiDATrainer(parse_args([*flags, *extra, "--output_dir", str(root / name)]))
    if extra[-2:-1] == ["--resume_from_checkpoint"]:
        trainer.save_checkpoint()  # the state as this layout loaded it
    trainer.train()
"""


def losses(run) -> list:
    return [{k: r[k] for k in LOSSES} for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines())]


def assert_same_losses(a: list, b: list, rel=1e-5):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for name in LOSSES:
            assert y[name] == pytest.approx(x[name], rel=rel), (name, x, y)


def training_tensors(checkpoint) -> dict:
    """Every tensor a checkpoint holds except the RNG states (written when the save happens, restored from the
    checkpoint's own record when training starts)."""
    state = load_file(str(checkpoint / "training_state.safetensors"))
    tensors = {k: v for k, v in state.items() if not k.startswith("state/rng/")}
    for name in NETWORKS:
        tensors.update({f"{name}/{k}": v for k, v in
                        load_file(str(checkpoint / name / "diffusion_pytorch_model.safetensors")).items()})
    return tensors


def edm_flags(tmp_path):
    tiny_teacher().save_pretrained(tmp_path / "teacher")
    return ["--teacher", tmp_path / "teacher", "--train_data", "digits", "--resolution", 8, "--dropout", 0.1]


def edm2_flags(tmp_path):
    tiny_edm2().save_pretrained(tmp_path / "teacher")
    tiny_vae().save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    moments = np.concatenate([rng.standard_normal((32, 4, 8, 8)) * 4, rng.random((32, 4, 8, 8))], 1)
    write_latents(tmp_path / "latents", moments.astype(np.float32), labels=np.arange(32) % 10)
    return ["--teacher", tmp_path / "teacher", "--train_data", tmp_path / "latents", "--vae", tmp_path / "vae",
            "--force_normalization", "--use_logvar", "--P_mean", -0.4, "--P_std", 1.0, "--dropout", 0.1]


def edm_two_step_flags(tmp_path):
    """A 2-step generator trained through both steps (ALGORITHM.md §11.2, `all`): two forwards of the sharded
    generator before one backward."""
    return [*edm_flags(tmp_path), "--num_steps", 2, "--step_sampling", "all", "--step_sigmas", "2.5,0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("family_flags", [edm_flags, edm2_flags, edm_two_step_flags],
                         ids=["EDM DDPM++", "EDM2", "EDM DDPM++ 2 steps"])
def test_fsdp_trains_like_ddp_and_resumes_across_layouts(tmp_path, family_flags):
    # B=4 per process, 2 rounds: 3 iterations of 16 images, the discriminator from the start, G stepped from the
    # first iteration, the adversarial term from the second; a checkpoint after every iteration.
    flags = [*family_flags(tmp_path), "--method", "sida", "--train_batch_size", 4, "--total_batch_size", 16,
             "--warmup_kimg", 0, "--adversarial_start_kimg", 0.016, "--max_train_kimg", 0.048,
             "--checkpointing_kimg", 0.016, "--log_every_kimg", 0.016, "--lr", 1e-3, "--glr", 1e-3,
             "--sample_grid_size", 2, "--seed", 3]
    runs = tmp_path / "runs"
    torchrun(tmp_path, CROSS_RUNS, runs, *flags)
    ddp, fsdp = losses(runs / "ddp"), losses(runs / "fsdp")
    assert len(ddp) == 3 and all(np.isfinite(list(r.values())).all() for r in ddp)
    assert_same_losses(ddp, fsdp)  # the four losses of every iteration, from identical state

    # A checkpoint loads exactly into the other layout: saved again before any step, it holds the same bits.
    for source, loaded in (("ddp", "fsdp_from_ddp"), ("fsdp", "ddp_from_fsdp")):
        a, b = (training_tensors(runs / run / "checkpoints" / "checkpoint-000000016") for run in (source, loaded))
        assert a.keys() == b.keys() and any(k.startswith("state/opt_fake/") for k in a)
        for key in a:
            assert torch.equal(a[key], b[key]), key
        # and training continues as it would have: the last two iterations' losses
        assert_same_losses(losses(runs / source)[1:], losses(runs / loaded))

    # The exported pipelines are the same files. The weights differ only through the order of the gradient sums
    # (FSDP reduces every round, DDP once), which Adam's first steps (about lr * sign(gradient)) can turn into an lr
    # -sized difference where a gradient is near zero: almost every weight agrees to rounding, none by more than one
    # lr per iteration.
    fsdp_dir, ddp_dir = runs / "fsdp" / "pipeline", runs / "ddp" / "pipeline"
    names = sorted(p.relative_to(ddp_dir) for p in ddp_dir.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(fsdp_dir) for p in fsdp_dir.rglob("*") if p.is_file())
    for name in names:
        if name.suffix == ".safetensors":
            a, b = load_file(str(ddp_dir / name)), load_file(str(fsdp_dir / name))
            assert a.keys() == b.keys()
            same = [torch.isclose(b[k], a[k], rtol=1e-4, atol=1e-6).float().mean().item() for k in a]
            assert np.mean(same) > 0.99 and max((b[k] - a[k]).abs().max().item() for k in a) <= 3 * 1e-3
        else:
            assert (ddp_dir / name).read_bytes() == (fsdp_dir / name).read_bytes(), name


# ---- one process, and the launch options ---------------------------------------------------------------------------

@pytest.fixture
def one_process_group():
    """`--fsdp` without a launcher makes its own one-process group; end it so later tests see none."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_fsdp_on_one_process_trains_like_the_unsharded_run_and_checkpoints_the_same_tensors(tmp_path, digits8,
                                                                                          one_process_group):
    from sida_diffusers.training import SiDATrainer
    from sida_diffusers.training.sharding import is_sharded

    from conftest import tiny_config

    runs = {}
    for name, fsdp in (("plain", False), ("sharded", True)):
        trainer = SiDATrainer(tiny_config(tmp_path / name, fsdp=fsdp, warmup_kimg=0, adversarial_start_kimg=0),
                              teacher=tiny_teacher(), dataset=digits8)
        assert all(is_sharded(n) == fsdp for n in (trainer.generator, trainer.fake_score, trainer.teacher,
                                                  trainer.generator_ema))
        recorded = []
        for _ in range(2):
            trainer.step()
            recorded.append({k: float(v) for k, v in trainer.last_losses.items()})
        runs[name] = (recorded, trainer.save_checkpoint())
    assert_same_losses(runs["plain"][0], runs["sharded"][0], rel=1e-6)
    plain, sharded = (training_tensors(path) for _, path in runs.values())
    assert plain.keys() == sharded.keys()
    for key in plain:
        if not key.startswith("state/data"):
            torch.testing.assert_close(sharded[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_diffusers_unet2d_teacher_shards_by_its_resnet_and_attention_blocks(tmp_path, digits8, one_process_group):
    from diffusers import DDPMScheduler

    from sida_diffusers.networks.unet2d import UNet2DDenoiser
    from sida_diffusers.training import SiDATrainer
    from sida_diffusers.training.sharding import is_sharded, unsharded_class

    from conftest import tiny_config, tiny_unet2d

    teacher = UNet2DDenoiser.over(tiny_unet2d(label_dim=10), DDPMScheduler())
    trainer = SiDATrainer(tiny_config(tmp_path, fsdp=True, warmup_kimg=0, adversarial_start_kimg=0, augment_p=0),
                          teacher=teacher, dataset=digits8)
    units = [unsharded_class(m).__name__ for m in trainer.unwrap(trainer.generator).modules() if is_sharded(m)]
    assert {"ResnetBlock2D", "Attention"} <= set(units)
    trainer.step()
    assert all(torch.isfinite(v) for v in trainer.last_losses.values())


def test_accelerate_launch_use_fsdp_maps_onto_fsdp(monkeypatch):
    from sida_diffusers.training import make_config

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert make_config().fsdp and not make_config().gradient_checkpointing
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert make_config().gradient_checkpointing
    for variable, value, problem in (("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params is not supported"),
                                     ("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP", "SHARD_GRAD_OP is not supported")):
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValueError, match=problem):
            make_config()
        monkeypatch.delenv(variable)
    with pytest.raises(ValueError, match="--no-fsdp disagrees with `accelerate launch --use_fsdp`"):
        make_config(fsdp=False)


def test_a_launcher_that_starts_one_of_several_processes_is_recognised():
    from sida_diffusers.training.launch import requested_processes

    assert requested_processes(["/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "t.py"]) == 2
    assert requested_processes(["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num-processes=4", "t.py"]) == 4
    assert requested_processes(["/venv/bin/accelerate", "launch", "t.py", "--num_machines", "1"]) == 1
    assert requested_processes(["python", "-m", "accelerate.commands.launch", "--num_processes", "2", "t.py"]) == 2
    assert requested_processes(["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "t.py"]) == 1


def test_the_trainer_refuses_to_run_one_process_of_the_two_asked_for(tmp_path, monkeypatch):
    from sida_diffusers.training import SiDATrainer, launch

    from conftest import tiny_config

    monkeypatch.setattr(launch, "requested_processes", lambda: 2)
    with pytest.raises(ValueError, match=r"asked for 2 processes but started one .* --multi_gpu --num_processes 2"):
        SiDATrainer(tiny_config(tmp_path), teacher=tiny_teacher())
    assert not (tmp_path / "run").exists()
