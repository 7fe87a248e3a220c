"""EDM's Heun sampler (the teacher baseline): schedule, hand-computed steps, NFE, stochastic determinism, pipeline."""

import math

import numpy as np
import pytest
import torch

from sida_diffusers.pipelines import (
    HEUN_PRESETS,
    EDMHeunPipeline,
    edm_sampler,
    heun_nfe,
    karras_sigmas,
    seed_generators,
)

from conftest import tiny_edm


def heun_pipe(**kwargs):
    pipe = EDMHeunPipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_calls(net):
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_karras_sigmas_span_sigma_max_to_sigma_min_then_zero():
    t = karras_sigmas(18)
    assert t.dtype == torch.float64 and t.shape == (19,)
    assert t[0].item() == pytest.approx(80.0) and t[17].item() == pytest.approx(0.002) and t[18].item() == 0
    assert bool((t[:-1] > t[1:]).all())
    middle = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # EDM Eq. 5 at i/(N-1) = 1/2
    assert karras_sigmas(3)[1].item() == pytest.approx(middle)
    with pytest.raises(ValueError, match="num_steps >= 2"):
        karras_sigmas(1)


def test_two_step_heun_matches_the_formulas_with_explicit_net_calls():
    net = tiny_edm(augment_dim=0)
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = None
    t0, t1 = 80.0, 0.002  # two steps: t = [sigma_max, sigma_min, 0]

    def D(x, t):
        return net(x, t, labels).to(torch.float64)

    with torch.no_grad():
        x0 = latents.double() * t0
        d0 = (x0 - D(x0, t0)) / t0
        x1 = x0 + (t1 - t0) * d0
        d1 = (x1 - D(x1, t1)) / t1
        x1 = x0 + (t1 - t0) * (0.5 * d0 + 0.5 * d1)  # 2nd-order correction on the first step
        expected = x1 + (0 - t1) * (x1 - D(x1, t1)) / t1  # last step: Euler only
        result = edm_sampler(net, latents, labels, num_steps=2)
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_steps", [2, 5])
def test_network_evaluations_are_2n_minus_1(num_steps):
    net = tiny_edm(augment_dim=0)
    calls = count_calls(net)
    with torch.no_grad():
        edm_sampler(net, torch.randn(1, 3, 8, 8), num_steps=num_steps)
    assert len(calls) == heun_nfe(num_steps) == 2 * num_steps - 1


def test_presets_give_edm_published_nfe():
    nfe = {name: heun_nfe({**{"num_steps": 18}, **preset}["num_steps"]) for name, preset in HEUN_PRESETS.items()}
    assert nfe == {"cifar10": 35, "ffhq": 79, "afhq": 79, "imagenet64": 511, "edm2": 63}
    assert HEUN_PRESETS["imagenet64"]["S_churn"] == 40 and HEUN_PRESETS["imagenet64"]["S_noise"] == 1.003


def test_stochastic_sampling_is_deterministic_per_seed_and_independent_of_the_batch():
    pipe = heun_pipe(unet=tiny_edm(label_dim=3, augment_dim=0))
    kwargs = dict(preset="imagenet64", num_inference_steps=4, S_min=0.0, S_max=math.inf, output_type="np")
    a = pipe(batch_size=2, generator=seed_generators([3, 4]), **kwargs)
    b = pipe(batch_size=2, generator=seed_generators([3, 4]), **kwargs)
    alone = pipe(batch_size=1, generator=seed_generators([4]), **kwargs)
    deterministic = pipe(batch_size=2, generator=seed_generators([3, 4]), **{**kwargs, "S_churn": 0.0})
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.images[1], alone.images[0])
    assert not np.array_equal(a.images, deterministic.images)  # churn noise changes the path
    assert a.nfe == 7


def test_stochastic_churn_matches_algorithm_2_by_hand():
    net = tiny_edm(augment_dim=0)
    S_churn, S_noise, N = 10.0, 1.003, 2
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 3, 8, 8, generator=g)
    result = edm_sampler(net, latents, num_steps=N, S_churn=S_churn, S_noise=S_noise, generator=g)

    g = torch.Generator().manual_seed(5)
    torch.randn(1, 3, 8, 8, generator=g)
    gamma = min(S_churn / N, math.sqrt(2) - 1)
    t = karras_sigmas(N)
    x = latents.double() * t[0]
    with torch.no_grad():
        for i in range(N):
            t_hat = t[i] * (1 + gamma)
            x_hat = x + (t_hat ** 2 - t[i] ** 2).sqrt() * S_noise * torch.randn(1, 3, 8, 8, generator=g,
                                                                                  dtype=torch.float64)
            d = (x_hat - net(x_hat, t_hat).double()) / t_hat
            x = x_hat + (t[i + 1] - t_hat) * d
            if i < N - 1:
                x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * (x - net(x, t[i + 1]).double()) / t[i + 1])
    torch.testing.assert_close(result, x, rtol=1e-9, atol=1e-9)


def test_pipeline_uses_the_same_noise_labels_and_uint8_conversion_as_the_function():
    net = tiny_edm(label_dim=3, augment_dim=0)
    pipe = heun_pipe(unet=net, id2label={0: "a", 1: "b", 2: "c"})
    out = pipe(batch_size=2, class_labels=["b", 2], generator=seed_generators([0, 1]), num_inference_steps=3,
               output_type="np")
    eps = torch.stack([torch.randn([3, 8, 8], generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    with torch.no_grad():
        x = edm_sampler(net, eps, torch.eye(3)[[1, 2]], num_steps=3)
    expected = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(out.images, expected.astype(np.float32) / 255)  # "np": uint8 / 255, as SiDA
    assert out.nfe == 5


def test_guidance_interpolates_guide_and_net_and_doubles_nfe():
    net, guide = tiny_edm(augment_dim=0, seed=0), tiny_edm(augment_dim=0, seed=1)
    latents = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    net_calls, guide_calls = count_calls(net), count_calls(guide)
    with torch.no_grad():
        guided = edm_sampler(net, latents, num_steps=2, guide=guide, guidance=2.0)
    assert len(net_calls) == len(guide_calls) == 3 and heun_nfe(2, guided=True) == 6
    with torch.no_grad():
        # with guidance 1 the guide cancels: D = guide + 1 * (net - guide) = net
        plain = edm_sampler(net, latents, num_steps=2)
        same = edm_sampler(net, latents, num_steps=2, guide=guide, guidance=1.0)
    torch.testing.assert_close(same, plain, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(guided, plain)
    pipe = heun_pipe(unet=net, guide=guide)
    assert pipe(guidance=2.0, num_inference_steps=2, output_type="np").nfe == 6
    assert pipe(num_inference_steps=2, output_type="np").nfe == 3
    with pytest.raises(ValueError, match="needs a guide network"):
        heun_pipe(unet=net)(guidance=2.0)


def test_heun_pipeline_round_trip_keeps_preset_and_images(tmp_path):
    pipe = heun_pipe(unet=tiny_edm(channels=1, augment_dim=0), preset="ffhq")
    pipe.save_pretrained(tmp_path)
    loaded = EDMHeunPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.preset == "ffhq" and loaded.guide is None
    a = loaded(generator=seed_generators([2]), num_inference_steps=3)
    b = pipe(generator=seed_generators([2]), num_inference_steps=3)
    assert a.images[0].mode == "L" and a.nfe == 5
    np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert loaded.sampler_settings()["num_steps"] == 40


def test_bad_sampler_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown Heun sampler preset"):
        heun_pipe(unet=tiny_edm(), preset="cifar100")
    pipe = heun_pipe(unet=tiny_edm())
    with pytest.raises(ValueError, match="unknown Heun sampler preset"):
        pipe(preset="lsun")
    with pytest.raises(ValueError, match="num_steps >= 2"):
        pipe(num_inference_steps=1)
