"""A Diffusers UNet2DModel with its scheduler config is an EDM denoiser (ALGORITHM.md §12): D(x, sigma_t) is the
scheduler's own x0 prediction, arbitrary sigmas map to Euler's fractional timesteps, the decoder is
UNet2DModel.forward, the discriminator map comes from the encoder half alone, and EDM's Heun sampler on the converted
ladder reaches what Diffusers' Euler scheduler reaches."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from sida_diffusers.networks import UNet2DDenoiser
from sida_diffusers.networks.unet2d import check_scheduler_config
from sida_diffusers.pipelines import edm_sampler

from conftest import tiny_unet2d


PREDICTIONS = ("epsilon", "v_prediction", "sample")
SCHEDULES = ("linear", "squaredcos_cap_v2", "scaled_linear", "trained_betas")
STEPS = (0, 1, 17, 500, 998, 999)


def scheduler_config(schedule, prediction="epsilon", **extra):
    if schedule == "trained_betas":  # explicit betas: a sigmoid ramp no named schedule gives
        betas = (1e-4 + 0.02 * torch.sigmoid(torch.linspace(-6, 6, 1000))).tolist()
        return DDPMScheduler(trained_betas=betas, prediction_type=prediction, clip_sample=False, **extra).config
    return DDPMScheduler(beta_schedule=schedule, prediction_type=prediction, clip_sample=False, **extra).config


def one_hot_rows(labels, label_dim):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), label_dim).float()


@pytest.mark.parametrize("label_dim", [0, 3], ids=["unconditional", "class-conditional"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
def test_denoiser_at_the_schedulers_own_sigmas_is_its_pred_original_sample(label_dim, prediction, schedule,
                                                                             scheduler_class):
    unet = tiny_unet2d(label_dim=label_dim, channels=2)
    scheduler = scheduler_class.from_config(scheduler_config(schedule, prediction))
    scheduler.set_timesteps(1000)  # DDIM steps need it; every training step is then one of its timesteps
    denoiser = UNet2DDenoiser.from_unet(unet, scheduler.config)
    labels = [0, 2, 1, 2] if label_dim else None
    x0 = torch.randn(4, 2, 8, 8)
    for t in STEPS:
        x_t = scheduler.add_noise(x0, torch.randn_like(x0), torch.tensor([t]))
        with torch.no_grad():
            expected = scheduler.step(unet(x_t, t, class_labels=None if labels is None else torch.tensor(labels)).sample,
                                      t, x_t).pred_original_sample
            abar = scheduler.alphas_cumprod[t]
            sigma = ((1 - abar) / abar) ** 0.5  # sigma_t, and x = x_t / sqrt(abar_t) in EDM's variables
            denoised = denoiser(x_t / abar ** 0.5, sigma, None if labels is None else one_hot_rows(labels, 3))
        torch.testing.assert_close(denoised, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_fractional_timesteps_are_eulers_log_sigma_interpolation_clamped_to_the_ladder():
    config = scheduler_config("linear")
    denoiser = UNet2DDenoiser.from_unet(tiny_unet2d(), config)
    euler = EulerDiscreteScheduler.from_config(config)
    ladder = (((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5).numpy()
    sigmas = np.concatenate([np.exp(np.linspace(-8, 7, 301)), ladder[[0, 1, 500, 999]], [1e-12, 1e4]])
    sigmas = sigmas.astype(np.float32)
    expected = euler._sigma_to_t(sigmas, np.log(ladder))
    ours = denoiser.timestep(torch.from_numpy(sigmas)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)  # Euler computes in float32, we in float64
    assert ours.min() == 0 and ours.max() == 999 and denoiser.sigma_min == pytest.approx(float(ladder[0]))
    assert np.all(ours[[301, 302, 303, 304]] == [0, 1, 500, 999])  # the ladder's own sigmas: integer steps


@pytest.mark.parametrize("label_dim", [0, 3])
def test_decoder_is_unet2dmodel_forward_exactly_and_the_encoder_stops_at_the_mid_block(label_dim):
    unet = tiny_unet2d(label_dim=label_dim)
    denoiser = UNet2DDenoiser.from_unet(unet, scheduler_config("linear"))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([3.0, 250.5, 998.25])  # fractional timesteps too
    labels = torch.tensor([2, 0, 1]) if label_dim else None
    one_hot = None if labels is None else one_hot_rows(labels, 3)
    with torch.no_grad():
        assert torch.equal(denoiser.unet_forward(x, t, one_hot), unet(x, t, class_labels=labels).sample)
        mid = {}
        unet.mid_block.register_forward_hook(lambda module, args, out: mid.update(h=out))
        ran_up_blocks = []
        hooks = [block.register_forward_hook(lambda *a: ran_up_blocks.append(1)) for block in unet.up_blocks]
        logits = denoiser(x, torch.tensor([0.5, 2.5, 40.0]), one_hot, return_flag="encoder")
        assert logits.shape == (3, 1, 4, 4) and not ran_up_blocks  # the encoder half only
        torch.testing.assert_close(logits, mid["h"].mean(dim=1, keepdim=True), rtol=0, atol=0)
        for hook in hooks:
            hook.remove()
        denoised, both = denoiser(x, torch.tensor([0.5, 2.5, 40.0]), one_hot, return_flag="encoder_decoder")
        assert torch.equal(both, logits)
        assert torch.equal(denoised, denoiser(x, torch.tensor([0.5, 2.5, 40.0]), one_hot))


def test_class_labels_condition_the_denoiser_and_an_all_zero_row_adds_no_class():
    unet = tiny_unet2d(label_dim=3)
    denoiser = UNet2DDenoiser.from_unet(unet, scheduler_config("linear"))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        by_class = [denoiser(x, 2.5, one_hot_rows([k, k], 3)) for k in range(3)]
        assert not torch.allclose(by_class[0], by_class[1])
        torch.testing.assert_close(denoiser(x, 2.5, torch.tensor([1, 1])), by_class[1], rtol=0, atol=0)  # indices
        unconditional = denoiser(x, 2.5)  # a conditional model called without labels: a zero label row
        torch.testing.assert_close(unconditional, denoiser(x, 2.5, torch.zeros(2, 3)), rtol=0, atol=0)


def test_edm_heun_on_the_converted_ladder_and_diffusers_euler_scheduler_reach_the_same_images():
    """The same ODE solved two ways on the same noise: EDM's Heun (2nd order) on the Karras ladder of the schedule's
    sigma range, and EulerDiscreteScheduler (1st order, use_karras_sigmas) stepping the UNet at Euler's own
    fractional timesteps. At 200 steps they agree to 1e-3 of the image scale (Euler's error is O(1/steps))."""
    unet = tiny_unet2d(channels=1, scale=0.05)
    config = scheduler_config("linear")
    denoiser = UNet2DDenoiser.from_unet(unet, config)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    euler = EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    euler.set_timesteps(200)
    x = noise * euler.init_noise_sigma
    with torch.no_grad():
        for t in euler.timesteps:
            x = euler.step(unet(euler.scale_model_input(x, t), t).sample, t, x).prev_sample
        heun = edm_sampler(denoiser, noise, num_steps=200, sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max)
    assert float(euler.sigmas[0]) == pytest.approx(denoiser.sigma_max, rel=1e-6)
    scale = heun.abs().max().item()
    assert (x.double() - heun).abs().max().item() <= 1e-3 * scale


def test_v_prediction_and_sample_flags_follow_the_scheduler_config():
    unet = tiny_unet2d()
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 7.0])
    with torch.no_grad():
        f = {p: UNet2DDenoiser.from_unet(unet, scheduler_config("linear", p)) for p in PREDICTIONS}
        t = f["epsilon"].timestep(sigma)
        raw = unet(x / (sigma ** 2 + 1).sqrt().view(-1, 1, 1, 1), t).sample
        s = sigma.view(-1, 1, 1, 1)
        torch.testing.assert_close(f["epsilon"](x, sigma), x - s * raw)
        torch.testing.assert_close(f["v_prediction"](x, sigma), x / (s ** 2 + 1) - s / (s ** 2 + 1).sqrt() * raw)
        torch.testing.assert_close(f["sample"](x, sigma), raw)


@pytest.mark.parametrize("change, problem", [
    ({"num_train_timesteps": 10 ** 9}, "num_train_timesteps must be an integer in 2..100,000"),
    ({"trained_betas": [float("nan")] * 1000}, "every value of trained_betas must be a finite number"),
    ({"beta_start": float("nan")}, "beta_start must be a finite number"),
    ({"prediction_type": "flow"}, "prediction_type 'flow' is unknown"),
    ({"beta_schedule": "cubic"}, "beta_schedule 'cubic' is unknown"),
    ({"_class_name": "ScoreSdeVeScheduler"}, "discrete-time VP"),
])
def test_a_scheduler_config_the_conversion_cannot_use_is_refused_with_the_reason(change, problem):
    config = {**scheduler_config("linear"), **change}
    with pytest.raises(ValueError, match=problem):
        check_scheduler_config(config)
    with pytest.raises(ValueError, match=problem):
        UNet2DDenoiser.from_unet(tiny_unet2d(), config)


def test_save_pretrained_round_trips_and_a_zero_terminal_snr_schedule_ends_at_a_finite_sigma(tmp_path):
    denoiser = UNet2DDenoiser.from_unet(tiny_unet2d(label_dim=3), scheduler_config("scaled_linear",
                                                                                  rescale_betas_zero_snr=True))
    assert denoiser.sigma_max == pytest.approx(((1 - 2.0 ** -24) / 2.0 ** -24) ** 0.5)  # as EulerDiscreteScheduler
    denoiser.save_pretrained(tmp_path)
    loaded = UNet2DDenoiser.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 1.5, torch.tensor([0, 2])), denoiser(x, 1.5, torch.tensor([0, 2])))
    assert loaded.family == "vp-discrete" and loaded.distillable and loaded.label_dim == 3
