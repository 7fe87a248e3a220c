"""The optimised trainer step (channels-last, torch.compile, fused Adam) is the plain step, faster; CPU only.

torch.compile runs with the "aot_eager" backend here: it captures the same Dynamo graphs and AOTAutograd joint
graphs as inductor (so recompilation behaves the same) without a C++ compile on a 2-core CI machine. Compilation and
fused Adam are checked for identical results; channels-last convolutions sum in another order, so they are checked
within rounding.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from sida_diffusers.data.datasets import build_dataset
from sida_diffusers.networks.precond import EDMPrecond
from sida_diffusers.training import SiDATrainer, Stage, make_config
from sida_diffusers.training.augment import AugmentPipe

from conftest import params


# cur_nimg 0 (stage 1: G held), 4 (stage 2: SiD), 8 and 12 (stage 3: SiDA) with 4 images per iteration.
STAGES = [(False, False), (True, False), (True, True), (True, True)]


def one_level_teacher():
    """A one-resolution DDPM++ with augment labels and dropout: every trainer path, and a quick graph capture."""
    torch.manual_seed(0)
    return EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet",
                      model_kwargs=dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                                        augment_dim=9, dropout=0.1)).eval()


@pytest.fixture(scope="module")
def digits8():
    return build_dataset("digits", resolution=8)


def trainer_for(tmp_path, dataset, **speed):
    cfg = make_config(teacher="tiny", method="sida", train_data="digits", resolution=8, train_batch_size=4,
                      total_batch_size=4, warmup_kimg=0.002, adversarial_start_kimg=0.006, augment_p=0.5,
                      lr=1e-4, glr=1e-4, ema_halflife_kimg=0.05, sample_grid_size=0, seed=3, cpu=True,
                      output_dir=str(tmp_path / "run"), **speed)
    return SiDATrainer(cfg, teacher=one_level_teacher(), dataset=dataset)


def run_stages(trainer):
    """Step through every stage; returns the logged losses per iteration and the Dynamo compile count after each."""
    losses, compiled = [], []
    for stage in STAGES:
        step = trainer.step()
        assert (step.step_generator, step.adversarial) == stage
        losses.append({k: v.clone() for k, v in trainer.last_losses.items()})
        compiled.append(counters["frames"]["total"])
    return losses, compiled


def updates(trainer, name):
    return params(trainer.unwrap(getattr(trainer, name))) - params(one_level_teacher())


@pytest.fixture(scope="module")
def plain_and_compiled(tmp_path_factory, digits8):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # both runs use the same kernels with the same thread partitioning
    plain = trainer_for(tmp_path_factory.mktemp("plain"), digits8, adam_fused=False)
    plain_losses, _ = run_stages(plain)
    torch._dynamo.reset()
    counters.clear()
    fast = trainer_for(tmp_path_factory.mktemp("fast"), digits8, compile=True, compile_backend="aot_eager",
                       adam_fused=True)
    fast_losses, compiled = run_stages(fast)
    yield plain, plain_losses, fast, fast_losses, compiled
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def test_compiled_step_with_fused_adam_computes_the_plain_losses_in_every_stage(plain_and_compiled):
    _, plain_losses, _, fast_losses, _ = plain_and_compiled
    assert [set(d) for d in fast_losses] == [set(d) for d in plain_losses]
    assert set(plain_losses[-1]) == {"fake_score_loss", "d_loss", "g_loss", "g_gan_loss"}
    for plain, fast in zip(plain_losses, fast_losses):
        for name in plain:
            torch.testing.assert_close(fast[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_step_with_fused_adam_makes_the_plain_parameter_updates(plain_and_compiled):
    plain, _, fast, _, _ = plain_and_compiled
    for name in ("fake_score", "generator"):
        moved = updates(plain, name)
        assert moved.abs().max() > 1e-4  # the iterations really trained this network
        # Adam's first steps are about lr * sign(grad): elementwise they flip on rounding noise of near-zero
        # gradients (compiled backward sums in its own order), so compare the whole update.
        assert (updates(fast, name) - moved).norm() < 1e-4 * moved.norm(), name
    torch.testing.assert_close(params(fast.generator_ema), params(plain.generator_ema), rtol=1e-5, atol=1e-7)
    assert fast.opt_gen.defaults["fused"] and not fast.opt_fake.defaults["foreach"]


def test_compiled_networks_never_recompile_after_the_first_iteration(plain_and_compiled):
    compiled = plain_and_compiled[-1]
    # The first iteration captures every (network, phase) graph: fake score on fakes and on reals in the D step and
    # frozen in the G step, G under no_grad and in the G step, the teacher. Stages 2 and 3 reuse all of them.
    assert compiled[0] >= 6
    assert compiled == [compiled[0]] * len(STAGES)


def stage3_phases(trainer):
    trainer.cur_nimg = 8  # stage 3: every loss term
    step = trainer.opt_fake.step  # the fake score's gradients, as its optimizer step sees them (freed right after)
    params = list(trainer.unwrap(trainer.fake_score).parameters())
    trainer.opt_fake.step = lambda: (setattr(trainer, "fake_grads", torch.cat([p.grad.flatten() for p in params])),
                                     step())
    trainer.fake_score_phase()
    trainer.generator_phase(Stage(step_generator=True, adversarial=True))
    return trainer


def test_channels_last_step_matches_the_plain_losses_and_gradients(tmp_path, digits8):
    # Dropout draws its mask in memory order, so channels-last drops other (equally likely) elements: compare
    # without dropout. Each trainer seeds the global RNG, so the two run one after the other.
    plain = stage3_phases(trainer_for(tmp_path / "plain", digits8, dropout=0.0))
    fast = stage3_phases(trainer_for(tmp_path / "fast", digits8, dropout=0.0, channels_last=True))
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in fast.unwrap(fast.fake_score).parameters() if p.ndim == 4)
    for name in ("fake_score_loss", "d_loss"):
        torch.testing.assert_close(fast.last_losses[name], plain.last_losses[name], rtol=1e-5, atol=0, msg=name)
    # The SiD loss multiplies teacher - fake score, two nets that start equal: rounding is amplified by cancellation.
    for name in ("g_loss", "g_gan_loss"):
        torch.testing.assert_close(fast.last_losses[name], plain.last_losses[name], rtol=2e-3, atol=0, msg=name)
    # Adam's first step is about lr * sign(grad), which flips on rounding noise for near-zero gradients, so the
    # gradients of the fake-score update are the meaningful comparison.
    assert (fast.fake_grads - plain.fake_grads).norm() < 1e-4 * plain.fake_grads.norm()


def test_adam_defaults_to_foreach_off_cuda(tmp_path, digits8):
    trainer = trainer_for(tmp_path, digits8)
    assert trainer.opt_fake.defaults["foreach"] and not trainer.opt_fake.defaults["fused"]


def test_augment_pipe_keeps_untransformed_images_exact_next_to_warped_ones():
    images = torch.rand(64, 3, 8, 8) * 2 - 1
    out, labels = AugmentPipe(0.3, xflip=0, yflip=0, aniso=0)(images, generator=torch.Generator().manual_seed(0))
    untouched = (labels == 0).all(dim=1)
    assert 0 < untouched.sum() < 64
    assert torch.equal(out[untouched], images[untouched])
    assert not torch.allclose(out[~untouched], images[~untouched])
