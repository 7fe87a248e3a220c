"""The distillation trainer on tiny EDM teachers (8x8 SongUNets) and the 8x8 digits data, CPU only."""

import json
import math

import pytest
import torch

from sida_diffusers.data.datasets import build_dataset
from sida_diffusers.training import HalfLifeEMA, SiDATrainer, Stage, TrainConfig, load_presets, make_config, parse_args

from conftest import params, pixel_features, tiny_config, tiny_teacher


# ---- config and presets ------------------------------------------------------------------------------------------------

def test_explicit_flags_override_the_preset_and_its_method_entry():
    cfg = parse_args(["--preset", "cifar10-uncond", "--method", "sid", "--lr", "3e-5", "--no-allow_tf32"])
    assert (cfg.teacher, cfg.alpha, cfg.max_train_kimg) == ("edm-cifar10-32x32-uncond-vp", 1.2, 500000)  # SiD row
    assert (cfg.lr, cfg.glr, cfg.augment_p, cfg.dropout, cfg.allow_tf32) == (3e-5, 1e-5, 0.12, 0.13, False)
    sid2a = parse_args(["--preset", "cifar10-uncond", "--method", "sid2a", "--alpha", "1.2"])
    assert (sid2a.generator_init, sid2a.alpha, sid2a.max_train_kimg) == ("sid-cifar10-uncond-alpha1.2", 1.2, 100000)


def test_no_teacher_and_no_preset_means_the_offline_digits_preset():
    cfg = parse_args(["--max_train_kimg", "5"])
    assert (cfg.preset, cfg.teacher, cfg.train_data, cfg.max_train_kimg) == ("digits", "digits", "digits", 5)
    assert parse_args(["--teacher", "my/teacher"]).preset is None


def test_every_preset_builds_a_config_for_every_method():
    for name, preset in load_presets().items():
        for method in ("sid", "sida", "sid2a"):
            cfg = make_config(preset=name, method=method)
            assert isinstance(cfg, TrainConfig) and cfg.method == method
            # SiD²A starts from a published SiD generator; the digits and DDPM teachers have none (pass the
            # pipeline/unet of a SiD run from them)
            unpublished = name in ("digits", "digits-ddpm", "ddpm-cifar10")
            assert (cfg.generator_init is not None) == (method == "sid2a" and not unpublished)
    edm2_s = make_config(preset="edm2-s")
    assert (edm2_s.force_normalization, edm2_s.use_logvar, edm2_s.discriminator_loss_scale, edm2_s.P_mean) == (False, False, 100, -0.4)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'cifar100'.*cifar10-cond.*edm2-xxl"):
        parse_args(["--preset", "cifar100"])


# ---- EMA -----------------------------------------------------------------------------------------------------------------

def test_half_life_ema_ramps_up_and_averages_parameters_only():
    model, ema_model = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    ema = HalfLifeEMA(model, ema_model, halflife_kimg=0.5, rampup_ratio=0.05)
    assert ema.update(cur_nimg=0, batch_size=8) == 0.0  # h = 0 at the start: the EMA copies the model
    torch.testing.assert_close(ema_model.weight, model.weight)
    assert ema_model.running_mean.abs().max() == 0  # buffers are not averaged
    assert ema.beta(cur_nimg=1000, batch_size=10) == pytest.approx(0.5 ** (10 / 50))     # ramp-up: 0.05 * 1000
    assert ema.beta(cur_nimg=10 ** 6, batch_size=10) == pytest.approx(0.5 ** (10 / 500))  # the 0.5 kimg half-life
    with torch.no_grad():
        model.weight.fill_(4.0)
    beta = ema.update(cur_nimg=10 ** 6, batch_size=500)
    assert beta == pytest.approx(0.5)
    torch.testing.assert_close(ema_model.weight, torch.full([3], 3.0))


# ---- bad input stops before training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, teacher, data, message", [
    (dict(total_batch_size=12, train_batch_size=8), tiny_teacher(), "digits8", "not divisible by --train_batch_size 8"),
    (dict(method="sid2a"), tiny_teacher(), "digits8", "--generator_init"),
    (dict(train_data=None), tiny_teacher(), None, "--train_data"),
    (dict(), tiny_teacher(), "digits16", r"1x16x16 images but the teacher expects 1x8x8.*--resolution 8"),
    (dict(), tiny_teacher(channels=3), "digits8", r"1x8x8 images but the teacher expects 3x8x8"),
    (dict(), tiny_teacher(label_dim=5), "digits8", "the data has 10 classes but the teacher label_dim=5"),
    (dict(), tiny_teacher(label_dim=0), "digits8", "teacher is unconditional but labels were requested"),
    (dict(augment_p=0.1), tiny_teacher(), "digits8", "augment_dim=9"),
])
def test_bad_input_raises_before_training_with_the_fix(tmp_path, request, overrides, teacher, data, message):
    dataset = request.getfixturevalue(data) if data else None
    with pytest.raises(ValueError, match=message):
        SiDATrainer(tiny_config(tmp_path, **overrides), teacher=teacher, dataset=dataset)
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_is_not_installed_is_refused(tmp_path, monkeypatch):
    from sida_diffusers.training import validation

    monkeypatch.setattr(validation, "installed", lambda module: module != "wandb")
    with pytest.raises(ValueError, match="pip install wandb"):
        SiDATrainer(tiny_config(tmp_path, report_to="wandb"), teacher=tiny_teacher())


def test_conditional_teacher_with_unlabeled_data_is_refused(tmp_path):
    unlabeled = build_dataset("digits", resolution=8, use_labels=False)
    with pytest.raises(ValueError, match="class-conditional .* no labels; pass --label_column"):
        SiDATrainer(tiny_config(tmp_path), teacher=tiny_teacher(), dataset=unlabeled)


# ---- the loop ------------------------------------------------------------------------------------------------------------

def test_generator_is_held_during_warm_up_and_the_adversarial_term_starts_after_the_second_threshold(tmp_path, digits8):
    # lsg=0 leaves only the adversarial term able to move G: G must stay put until cur_nimg > 16 (stage 3).
    cfg = tiny_config(tmp_path, lsg=0.0, total_batch_size=8, train_batch_size=8)
    trainer = SiDATrainer(cfg, teacher=tiny_teacher(), dataset=digits8)
    g = trainer.unwrap(trainer.generator)
    history = []
    for _ in range(4):  # cur_nimg 0, 8 (warm-up), 16 (SiD stage), 24 (SiDA stage)
        before = params(g)
        info = trainer.step()
        history.append((trainer.cur_nimg - 8, info.step_generator, info.adversarial,
                        not torch.equal(before, params(g))))
    assert history == [(0, False, False, False), (8, False, False, False), (16, True, False, False),
                       (24, True, True, True)]
    assert {"fake_score_loss", "d_loss", "g_loss", "g_gan_loss"} <= set(trainer.last_losses)


def test_generator_first_steps_right_after_warm_up(tmp_path, digits8):
    trainer = SiDATrainer(tiny_config(tmp_path, train_batch_size=8), teacher=tiny_teacher(), dataset=digits8)
    g = trainer.unwrap(trainer.generator)
    trainer.cur_nimg = 8  # == warmup: not past the strict threshold
    before = params(g)
    trainer.step()
    assert torch.equal(before, params(g))
    trainer.step()  # cur_nimg 16 > 8: the SiD objective moves G
    assert not torch.equal(before, params(g))


def test_fake_score_and_generator_start_from_the_teacher_with_the_requested_dropout(tmp_path, digits8):
    teacher = tiny_teacher()
    trainer = SiDATrainer(tiny_config(tmp_path, dropout=0.3), teacher=teacher, dataset=digits8)
    for net in (trainer.unwrap(trainer.fake_score), trainer.unwrap(trainer.generator), trainer.generator_ema):
        torch.testing.assert_close(params(net), params(teacher), rtol=0, atol=0)
        assert net.config.model_kwargs["dropout"] == 0.3
    assert all(not p.requires_grad for p in teacher.parameters())


def test_end_to_end_sida_with_augmentation_and_evaluation_on_digits(tmp_path, digits8):
    from sida_diffusers.evaluation import register_feature_metric
    from sida_diffusers.pipelines.pipeline_sida import SiDAPipeline

    register_feature_metric("fd_pixels8", pixel_features)
    cfg = tiny_config(tmp_path, augment_p=0.5, checkpoints_total_limit=1, eval_metrics=["fd_pixels8"],
                      eval_every_kimg=0.016, eval_num_samples=64, eval_batch_size=32)
    trainer = SiDATrainer(cfg, teacher=tiny_teacher(augment_dim=9), dataset=digits8)
    pipeline_dir = trainer.train()
    run = tmp_path / "run"
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stats] == [1, 1, 2, 3]  # cur_nimg before each step: 0, 8, 16, 24
    assert all(math.isfinite(s[k]) for s in stats for k in ("fake_score_loss", "d_loss", "g_loss", "g_gan_loss"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-000000032"]  # limit 1 pruned 16
    ckpt = run / "checkpoints" / "checkpoint-000000032"
    assert {p.name for p in ckpt.iterdir()} == {"generator", "generator_ema", "fake_score", "training_state.json",
                                                "training_state.safetensors", "run_info.json"}
    info = json.loads((ckpt / "run_info.json").read_text())
    assert (info["method"], info["cur_nimg"], info["total_batch_size"], info["label_dim"]) == ("sida", 32, 8, 10)
    assert (run / "samples" / "fakes_000000.png").is_file() and (run / "loss_curves.png").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["kimg"] for m in metrics] == [0.016, 0.032] and all(m["fd_pixels8_64"] > 0 for m in metrics)
    assert info["metrics"] == {"fd_pixels8_64": metrics[-1]["fd_pixels8_64"]}  # the last evaluation
    assert (run / "best_pipeline" / "model_index.json").is_file() and (run / "metric_curve.png").is_file()
    pipe = SiDAPipeline.from_pretrained(pipeline_dir)
    out = pipe(batch_size=3, class_labels=[0, 1, 2], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape[0] == 3 and torch.isfinite(torch.as_tensor(out.images)).all()


def tiny_latents(n=32, resolution=8):
    """An EDM2-style latent dataset: float32 [8,H,W] moments (4 means, 4 stds) with 10 classes."""
    from sida_diffusers.data.datasets import TrainingDataset

    g = torch.Generator().manual_seed(0)
    moments = torch.cat([torch.randn(n, 4, resolution, resolution, generator=g) * 4,
                         torch.rand(n, 4, resolution, resolution, generator=g)], dim=1).numpy()
    return TrainingDataset("tiny-latents", lambda i: moments[i], [f"img-mean-std-{i:08d}.npy" for i in range(n)],
                           labels=torch.arange(n).remainder(10).numpy(), is_latent=True)


def test_edm2_sida_step_trains_the_logvar_head_and_the_generator_has_none(tmp_path):
    from sida_diffusers.networks.precond_edm2 import EDM2Precond

    torch.manual_seed(0)
    teacher = EDM2Precond(img_resolution=8, img_channels=4, label_dim=10, model_channels=16, channel_mult=[1, 2],
                          num_blocks=1, attn_resolutions=[], channels_per_head=8, logvar_channels=16,
                          use_fp16=False).eval()
    cfg = tiny_config(tmp_path, warmup_kimg=0, adversarial_start_kimg=0, P_mean=-0.4, P_std=1.0, lsd=100,
                      force_normalization=True, use_logvar=True, train_data="latents")
    trainer = SiDATrainer(cfg, teacher=teacher, dataset=tiny_latents())
    fake, gen = trainer.unwrap(trainer.fake_score), trainer.unwrap(trainer.generator)
    assert fake.has_logvar and not gen.has_logvar and not trainer.generator_ema.has_logvar
    head, g_before = params(fake.logvar_linear), params(gen)
    assert trainer.step() == Stage(step_generator=False, adversarial=False)  # cur_nimg 0 is never > 0
    assert trainer.step() == Stage(step_generator=True, adversarial=True)
    assert not torch.equal(head, params(fake.logvar_linear)) and not torch.equal(g_before, params(gen))
    assert all(torch.isfinite(v) for v in trainer.last_losses.values())


def test_edm2_teacher_refuses_pixel_data(tmp_path, digits8):
    from sida_diffusers.networks.precond_edm2 import EDM2Precond

    teacher = EDM2Precond(img_resolution=8, img_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 2],
                          num_blocks=1, attn_resolutions=[], channels_per_head=8, logvar_channels=0,
                          use_fp16=False)
    with pytest.raises(ValueError, match="EDM2 teachers need EDM2 latent data"):
        SiDATrainer(tiny_config(tmp_path), teacher=teacher, dataset=digits8)


def test_data_free_sid_with_bf16_autocast_and_channels_last(tmp_path):
    cfg = tiny_config(tmp_path, method="sid", train_data=None, mixed_precision="bf16", channels_last=True)
    trainer = SiDATrainer(cfg, teacher=tiny_teacher())
    g = trainer.unwrap(trainer.generator)
    before = params(g)
    assert trainer.step() == Stage(step_generator=True, adversarial=False)  # plain SiD is always stage 2
    assert not torch.equal(before, params(g))
    assert set(trainer.last_losses) == {"fake_score_loss", "g_loss"}
    assert all(torch.isfinite(v) for v in trainer.last_losses.values())


def test_lr_scheduler_decays_both_learning_rates_with_the_images_seen(tmp_path, digits8):
    from sida_diffusers.training.models import lr_factor

    assert [lr_factor("cosine", p) for p in (0, 0.5, 1)] == pytest.approx([1, 0.5, 0])
    assert [lr_factor("linear", p) for p in (0, 0.25, 1)] == pytest.approx([1, 0.75, 0])
    assert lr_factor("constant", 0.9) == 1
    cfg = tiny_config(tmp_path, lr_scheduler="linear", max_train_kimg=0.032, lr=1e-3, glr=2e-4)
    trainer = SiDATrainer(cfg, teacher=tiny_teacher(), dataset=digits8)
    seen = []
    for _ in range(4):  # cur_nimg 0, 8, 16, 24 of 32: factors 1, 0.75, 0.5, 0.25 during each step
        trainer.step()
        seen += [trainer.opt_fake.param_groups[0]["lr"], trainer.opt_gen.param_groups[0]["lr"]]
    # flat list: pytest >= 9 refuses approx() of nested sequences
    assert seen == pytest.approx([lr * f for f in (1, 0.75, 0.5, 0.25) for lr in (1e-3, 2e-4)])
    with pytest.raises(ValueError, match="lr_scheduler must be one of constant, linear, cosine"):
        make_config(lr_scheduler="polynomial")


def test_num_threads_must_be_positive():
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        make_config(num_threads=0)
