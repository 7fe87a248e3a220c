"""The SiD/SiDA losses against numbers worked out by hand (ALGORITHM.md §4)."""

import math

import pytest
import torch

from sida_diffusers.losses import (
    discriminator_loss,
    edm_weight,
    fake_score_loss,
    generator_sigma,
    karras_sigma,
    lognormal_sigma,
    nan_sample_mask,
    sid_generator_loss,
    sid_normalizer,
    sida_adversarial_loss,
)


def img(*values):
    """One sample per row of `values`, each a 1x1xW image."""
    return torch.tensor(values, dtype=torch.float32)[:, None, None, :]


def test_lognormal_sigma_is_exp_of_a_gaussian_draw():
    xi = torch.randn([4, 1, 1, 1], generator=torch.Generator().manual_seed(3))
    sigma = lognormal_sigma(4, P_mean=-0.4, P_std=1.0, generator=torch.Generator().manual_seed(3))
    assert sigma.shape == (4, 1, 1, 1)
    torch.testing.assert_close(sigma, (-0.4 + xi).exp())


def test_karras_sigma_end_points_and_generator_range():
    t = torch.tensor([0.0, 0.8, 1.0])
    torch.testing.assert_close(karras_sigma(t), torch.tensor([0.002, 24.408, 80.0]), rtol=1e-4, atol=1e-6)
    sigma = generator_sigma(1000, tmax=800, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (1000, 1, 1, 1)
    assert 0.002 <= sigma.min() and sigma.max() <= 24.409 and sigma.max() > 15  # the low-noise 80% only


def test_edm_weight():
    torch.testing.assert_close(edm_weight(torch.tensor([0.5, 1.0])), torch.tensor([8.0, 5.0]))


def test_fake_score_loss_sums_weighted_squared_error_over_pixels():
    x, denoised, sigma = img([0, 0]), img([1, 2]), torch.full([1, 1, 1, 1], 0.5)
    torch.testing.assert_close(fake_score_loss(x, denoised, sigma), torch.tensor([8.0 * 5]))
    # EDM2 logvar form: w e^{-u} * sum + C*H*W * u, with u = ln 2 and C*H*W = 2.
    u = torch.full([1, 1, 1, 1], math.log(2))
    torch.testing.assert_close(fake_score_loss(x, denoised, sigma, logvar=u), torch.tensor([20 + 2 * math.log(2)]))


def test_discriminator_loss_weights_the_batch_mean_bce_by_the_sum_of_weights():
    real = img([math.log(3)], [0.0])           # BCE(l, 1) = softplus(-l): ln(4/3) and ln 2
    fake = img([0.0], [0.0])                   # BCE(l, 0) = softplus(l): ln 2 each
    sigma = torch.tensor([0.5, 1.0]).reshape(2, 1, 1, 1)   # w = 8 and 5
    expected = 13 * 0.5 * ((math.log(4 / 3) + math.log(2)) / 2 + math.log(2))
    assert discriminator_loss(real, fake, sigma).item() == pytest.approx(expected, rel=1e-6)
    u = torch.tensor([math.log(2), 0.0]).reshape(2, 1, 1, 1)    # e^{-u} = 1/2 and 1
    assert discriminator_loss(real, fake, sigma, logvar=u).item() == pytest.approx(expected * 9 / 13, rel=1e-6)


def test_discriminator_loss_does_not_clamp_logits():
    big = img([30.0])
    logits = big.clone().requires_grad_(True)
    discriminator_loss(big, logits, torch.full([1, 1, 1, 1], 0.5)).backward()
    assert logits.grad.item() == pytest.approx(8 * 0.5 * 1.0, rel=1e-6)  # d softplus(l)/dl = sigmoid(30) ~ 1


def test_sid_generator_loss_values_for_two_alphas():
    x_gen, teacher, fake = img([0, 0]), img([1, 3]), img([0, 1])  # omega = mean|x_g - r| = 2
    assert sid_normalizer(x_gen, teacher).item() == 2.0
    # alpha=1: sum (r-s)(s-x_g) = [1,2].[0,1] = 2, / omega = 1.
    torch.testing.assert_close(sid_generator_loss(x_gen, teacher, fake, alpha=1.0), torch.tensor([1.0]))
    # alpha=1.2: sum (r-s)((r-x_g) - 1.2(r-s)) = [1,2].[-0.2,0.6] = 1.0, / omega = 0.5.
    torch.testing.assert_close(sid_generator_loss(x_gen, teacher, fake, alpha=1.2), torch.tensor([0.5]))
    u = torch.full([1, 1, 1, 1], math.log(4.0))
    torch.testing.assert_close(sid_generator_loss(x_gen, teacher, fake, alpha=1.0, logvar=u), torch.tensor([0.25]))


def test_sid_generator_loss_treats_omega_as_a_constant():
    x_gen = img([0.0, 0.0]).requires_grad_(True)
    teacher, fake = img([1, 3]), img([0, 1])
    sid_generator_loss(x_gen, teacher, fake, alpha=1.0).sum().backward()
    # Only the explicit x_g term has a gradient: d/dx_g [(r-s).(s-x_g)] / omega = -(r-s)/omega.
    torch.testing.assert_close(x_gen.grad, img([-0.5, -1.0]))


def test_sida_adversarial_loss_pools_bce_over_the_micro_batch():
    x_gen, teacher = img([0, 0], [0, 0]), img([1, 1], [2, -2])     # omega = 1 and 2, C*H*W = 2
    logits = torch.zeros([2, 1, 1, 1], requires_grad=True)
    loss = sida_adversarial_loss(logits, x_gen, teacher)
    torch.testing.assert_close(loss, torch.tensor([2 * math.log(2), math.log(2)]), rtol=1e-6, atol=1e-7)
    loss.sum().backward()
    # Each logit's gradient: C*H*W * sum_i(1/omega_i) * (-sigmoid(0)) / (B*h*w) = 2 * 1.5 * -0.5 / 2, the same for
    # both samples: it scales with the batch mean of 1/omega, not the sample's own omega.
    torch.testing.assert_close(logits.grad.reshape(-1), torch.tensor([-0.75, -0.75]))


def test_sida_adversarial_loss_clamps_logits_at_ten():
    x_gen, teacher = img([0, 0], [0, 0]), img([1, 1], [1, 1])
    logits = torch.tensor([12.0, -11.0]).reshape(2, 1, 1, 1).requires_grad_(True)
    loss = sida_adversarial_loss(logits, x_gen, teacher)
    pooled = (math.log1p(math.exp(-10)) + math.log1p(math.exp(10))) / 2
    torch.testing.assert_close(loss, torch.tensor([2 * pooled, 2 * pooled]))
    loss.sum().backward()
    assert logits.grad.abs().max().item() == 0.0
    u = torch.full([2, 1, 1, 1], math.log(2.0))
    torch.testing.assert_close(sida_adversarial_loss(logits, x_gen, teacher, logvar=u), torch.tensor([pooled, pooled]))


def test_nan_sample_mask_flags_samples_with_any_nan():
    a = torch.zeros([3, 1, 2, 2])
    b = torch.zeros([3, 1, 1, 1])
    a[1, 0, 1, 1] = float("nan")
    b[2] = float("nan")
    assert nan_sample_mask(a, None, b).tolist() == [False, True, True]
    assert nan_sample_mask(torch.ones([2, 3])).tolist() == [False, False]


def test_keep_mask_equals_dropping_the_nan_samples():
    torch.manual_seed(1)
    x, r, s = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    d_real, d_fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    sigma, u = torch.rand(3, 1, 1, 1) + 0.1, torch.randn(3, 1, 1, 1)
    bad = [t.clone() for t in (s, d_fake)]
    bad[0][1, 0, 0, 0] = float("nan")
    bad[1][1, 0, 1, 1] = float("nan")
    keep = ~nan_sample_mask(x, r, *bad)
    assert keep.tolist() == [True, False, True]
    idx = keep.nonzero().flatten()
    pick = lambda *ts: [t[idx] for t in ts]

    torch.testing.assert_close(fake_score_loss(x, bad[0], sigma, u, keep=keep).sum(),
                               fake_score_loss(*pick(x, s, sigma, u)).sum())
    torch.testing.assert_close(discriminator_loss(d_real, bad[1], sigma, u, keep=keep),
                               discriminator_loss(*pick(d_real, d_fake, sigma, u)))
    torch.testing.assert_close(sid_generator_loss(x, r, bad[0], 1.2, u, keep=keep).sum(),
                               sid_generator_loss(*pick(x, r, s), 1.2, *pick(u)).sum())
    torch.testing.assert_close(sida_adversarial_loss(bad[1], x, r, u, keep=keep).sum(),
                               sida_adversarial_loss(*pick(d_fake, x, r, u)).sum())
    logits = bad[1].clone().requires_grad_(True)
    sida_adversarial_loss(logits, x, r, keep=keep).sum().backward()
    assert logits.grad.isfinite().all() and logits.grad[1].abs().max() == 0
