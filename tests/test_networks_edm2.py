"""EDM2 UNet and EDM2Precond: official parity, state-dict layout, forced normalisation, SiDA training patterns."""

import numpy as np
import pytest
import torch

from sida_diffusers.networks import denoiser_from_official
from sida_diffusers.networks.edm2 import MPConv, UNet, normalize, normalize_mpconv_weights_, resample
from sida_diffusers.networks.precond_edm2 import EDM2Precond

from conftest import fixture_info, fixture_io, fixture_state_dict, full_size_shapes


FIXTURES = ["edm2_latent_cond", "edm2_pixel_cond", "edm2_latent_uncond"]
TINY = dict(img_resolution=8, img_channels=3, label_dim=4, use_fp16=False, model_channels=8,
            channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=8)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_fixture(name, class_name="Precond"):
    model = denoiser_from_official(class_name, fixture_info(name)["init_kwargs"])
    state = fixture_state_dict(name)
    if not model.has_logvar:
        state = {k: v for k, v in state.items() if not k.startswith("logvar_")}
    model.load_state_dict(state, strict=True)
    return model.eval(), fixture_io(name)


def assert_close_per_sample(actual, ref):
    assert actual.shape == ref.shape and actual.dtype == torch.float32
    for a, r in zip(actual, ref):
        torch.testing.assert_close(a, r, atol=1e-5 * r.abs().max().item(), rtol=1e-5)


def tiny_model(**overrides):
    return EDM2Precond(**{**TINY, **overrides})


def tiny_inputs(n=3):
    return torch.randn(n, 3, 8, 8), torch.tensor([0.05, 1.0, 20.0])[:n], torch.eye(4)[torch.arange(n) % 4]


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_official_outputs_for_every_return_flag(name):
    model, io = load_fixture(name)
    x, sigma, labels = io["x"], io["sigma"], io.get("class_labels")
    with torch.no_grad():
        denoised, logvar = model(x, sigma, labels, return_logvar=True)
        logits = model(x, sigma, labels, return_flag="encoder")
        denoised_ed, logits_ed = model(x, sigma, labels, return_flag="encoder_decoder")
    assert_close_per_sample(denoised, io["denoised"])
    assert_close_per_sample(logvar, io["logvar"])
    assert_close_per_sample(logits, io["disc_logits"])
    assert_close_per_sample(denoised_ed, io["denoised_ed"])
    assert_close_per_sample(logits_ed, io["disc_logits_ed"])


def test_generator_variant_has_no_logvar_head_and_denoises_identically():
    model, io = load_fixture("edm2_latent_cond", class_name="EDM_2_Precond_Generator")
    assert not model.has_logvar
    assert not any(k.startswith("logvar_") for k in model.state_dict())
    with torch.no_grad():
        denoised = model(io["x"], io["sigma"], io["class_labels"])
    assert_close_per_sample(denoised, io["denoised"])
    with pytest.raises(ValueError, match="no logvar head"):
        model(io["x"], io["sigma"], io["class_labels"], return_logvar=True)


def test_full_size_configs_have_official_state_dict_layout():
    configs = full_size_shapes()
    edm2 = {name: c for name, c in configs.items() if c["official_class"].endswith("networks_edm2.Precond")}
    assert {"edm2-img512-xs", "edm2-img512-xxl", "edm2-img512-s-uncond", "edm2-img64-s"} <= set(edm2)
    for name, config in edm2.items():
        with torch.device("meta"):
            model = denoiser_from_official("Precond", config["init_kwargs"])
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert list(shapes) == list(config["state_dict"]), name
        assert shapes == config["state_dict"], name
        assert sum(p.numel() for p in model.parameters()) == config["num_params"], name


def test_unet_output_shapes_per_return_flag():
    unet = UNet(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2, 2],
                num_blocks=1, attn_resolutions=[4], channels_per_head=8)
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2)
    f_x = unet(x, noise, None)
    logits = unet(x, noise, None, return_flag="encoder")
    f_x_ed, logits_ed = unet(x, noise, None, return_flag="encoder_decoder")
    assert f_x.shape == (2, 3, 8, 8) and logits.shape == (2, 1, 2, 2)
    torch.testing.assert_close(f_x_ed, f_x, rtol=0, atol=0)
    torch.testing.assert_close(logits_ed, logits, rtol=0, atol=0)


def test_generic_resample_filter_path_matches_box_filter_fast_path():
    x = torch.randn(2, 5, 8, 8)
    for mode in ("down", "up"):
        # [2, 2] normalises to the same box filter as [1, 1] but runs through the depthwise-convolution path.
        torch.testing.assert_close(resample(x, [2, 2], mode), resample(x, [1, 1], mode), rtol=1e-6, atol=1e-6)
    assert resample(x, [1, 3, 3, 1], "down").shape == (2, 5, 4, 4)
    assert resample(x, [1, 3, 3, 1], "up").shape == (2, 5, 16, 16)


def test_normalize_weights_is_idempotent_up_to_eps_and_keeps_outputs():
    model = tiny_model().eval()
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        before = model(x, sigma, labels)
    model.normalize_weights_()
    once = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in model.modules():
        if isinstance(layer, MPConv):
            rms = layer.weight.flatten(1).pow(2).mean(1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=0)
    model.normalize_weights_()
    for key, value in model.state_dict().items():
        if key.endswith(".weight"):  # every EDM2 weight is an MPConv weight
            torch.testing.assert_close(value, once[key], rtol=1e-3, atol=0)
        else:
            assert torch.equal(value, once[key]), key
    with torch.no_grad():
        after = model(x, sigma, labels)
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-4)


def test_forced_normalisation_of_a_unit_rms_weight_is_the_eps_factor():
    layer = MPConv(16, 4, kernel=[3, 3])
    with torch.no_grad():
        layer.weight.div_(layer.weight.flatten(1).pow(2).mean(1).sqrt()[:, None, None, None])
    unit = layer.weight.detach().clone()
    normalize_mpconv_weights_(layer)
    torch.testing.assert_close(layer.weight.detach(), unit / (1 + 1e-4), rtol=1e-6, atol=0)


def test_train_mode_forward_never_writes_parameters():
    model = tiny_model(dropout=0.1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, sigma, labels = tiny_inputs()
    model(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_two_forwards_and_one_backward_in_train_mode_sida_d_step():
    model = tiny_model().train()
    model.normalize_weights_()
    x_fake, sigma, labels = tiny_inputs()
    x_real = torch.randn_like(x_fake)
    fake, fake_logits, logvar = model(x_fake, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    real_logits = model(x_real, sigma, labels, return_flag="encoder")
    loss = ((fake - x_fake) ** 2 / logvar.exp()).mean() + logvar.mean()
    loss = loss + torch.nn.functional.softplus(fake_logits).mean() + torch.nn.functional.softplus(-real_logits).mean()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["logvar_linear.weight"].abs().sum() > 0 and grads["unet.out_gain"].abs() > 0


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(logvar_channels=16).eval()
    model.save_pretrained(tmp_path)
    loaded = EDM2Precond.from_pretrained(tmp_path).eval()
    assert loaded.config.channel_mult == [1, 2] and loaded.config.logvar_channels == 16
    assert loaded.has_logvar and loaded.img_resolution == 8 and loaded.label_dim == 4
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, labels, return_logvar=True),
                                   model(x, sigma, labels, return_logvar=True), rtol=0, atol=0)


def test_from_official_kwargs_accepts_numpy_scalars_and_tuples():
    kwargs = dict(TINY, model_channels=np.int64(8), dropout=np.float64(0.0), channel_mult=(1, 2))
    model = EDM2Precond.from_official_kwargs(kwargs, logvar=False)
    assert type(model.config.model_channels) is int and model.config.channel_mult == [1, 2]
    assert not model.has_logvar and model.config.logvar_channels == 0


def test_autocast_bfloat16_returns_float32():
    model = tiny_model().eval()
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        reference = model(x, sigma, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            denoised, logits, logvar = model(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    assert denoised.dtype == logits.dtype == logvar.dtype == torch.float32
    assert (denoised - reference).abs().max() < 0.1 * reference.abs().max()


def test_normalize_computes_in_float32_for_half_inputs():
    x = torch.full([1, 4096], 300.0, dtype=torch.float16)  # sum of squares overflows float16
    torch.testing.assert_close(normalize(x), torch.ones_like(x), rtol=1e-3, atol=0)


def test_bad_input_gives_clear_errors():
    model = tiny_model()
    x, sigma, labels = tiny_inputs()
    with pytest.raises(ValueError, match="img_resolution=8"):
        model(torch.randn(2, 3, 16, 16), 1.0, labels[:2])
    with pytest.raises(ValueError, match="return_flag"):
        model(x, sigma, labels, return_flag="discriminator")
    with pytest.raises(ValueError, match="unknown EDM2 Precond option"):
        EDM2Precond.from_official_kwargs(dict(TINY, attn_resolution=[4]))
    with pytest.raises(ValueError, match="channels_per_head"):
        tiny_model(channels_per_head=5)
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(img_resolution=7)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_model(label_dim=0)(x, sigma, labels)
