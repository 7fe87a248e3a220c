"""EDM-family networks: parity with the official NVlabs/edm + SiDA outputs, state-dict layout, and the call contract."""

import math

import numpy as np
import pytest
import torch

from sida_diffusers.networks import denoiser_from_official
from sida_diffusers.networks.edm import DhariwalUNet, SongUNet
from sida_diffusers.networks.edm_layers import UNetBlock
from sida_diffusers.networks.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond

from conftest import fixture_info, fixture_io, fixture_state_dict, full_size_shapes


EDM_FIXTURES = ["edm_ddpmpp_uncond", "edm_ddpmpp_cond", "vp_ddpmpp_uncond", "ve_ncsnpp_uncond", "edm_adm_cond"]
TINY_SONG = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                 augment_dim=9, dropout=0.0)
TINY_ADM = dict(model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 4], num_blocks=1,
                attn_resolutions=[4], dropout=0.0)


def assert_close_per_sample(actual, expected, what):
    """The fixture tolerance: per sample, atol = 1e-5 * max|ref_i| and rtol = 1e-5 (fixtures README)."""
    assert actual.shape == expected.shape, what
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=1e-5 * float(e.abs().max()), rtol=1e-5, msg=f"{what}, sample {i}")


def tiny(cls=EDMPrecond, label_dim=0, model=TINY_SONG, **kwargs):
    net = cls.from_official_kwargs(dict(img_resolution=8, img_channels=3, label_dim=label_dim, **model, **kwargs))
    return net.eval()


def official_fixture(name):
    meta = fixture_info(name)
    net = denoiser_from_official(meta["official_class"].split(".")[-1], meta["init_kwargs"])
    net.load_state_dict(fixture_state_dict(name), strict=True)
    return net.eval(), fixture_io(name)


# ---- parity with the official code ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EDM_FIXTURES)
def test_official_weights_reproduce_official_outputs_in_every_return_flag(name):
    net, io = official_fixture(name)
    checked = set()
    for suffix, augment in [("", None), ("_aug", io.get("augment_labels"))]:
        if suffix and augment is None:
            continue
        kwargs = dict(class_labels=io.get("class_labels"), augment_labels=augment)
        with torch.no_grad():
            outputs = {
                "denoised": net(io["x"], io["sigma"], **kwargs),
                "disc_logits": net(io["x"], io["sigma"], return_flag="encoder", **kwargs),
            }
            outputs["denoised_ed"], outputs["disc_logits_ed"] = net(io["x"], io["sigma"], return_flag="encoder_decoder",
                                                                    **kwargs)
        for key, value in outputs.items():
            assert value.dtype == torch.float32
            assert_close_per_sample(value, io[key + suffix], f"{name}: {key + suffix}")
            checked.add(key + suffix)
    assert checked == set(io) - {"x", "sigma", "class_labels", "augment_labels"}


def test_unet_block_with_four_attention_heads_matches_official_block():
    meta = fixture_info("edm_unetblock_mh")
    block = UNetBlock(**meta["init_kwargs"]).eval()
    assert block.num_heads == meta["num_heads"] == 4
    block.load_state_dict(fixture_state_dict("edm_unetblock_mh"), strict=True)
    io = fixture_io("edm_unetblock_mh")
    with torch.no_grad():
        assert_close_per_sample(block(io["x"], io["emb"]), io["y"], "UNetBlock")


def test_full_size_official_configs_have_official_state_dict_keys_and_shapes():
    configs = full_size_shapes()
    edm = {k: v for k, v in configs.items() if v["official_class"].startswith("training.networks.")}
    assert len(edm) == 6
    for name, config in edm.items():
        with torch.device("meta"):
            net = denoiser_from_official(config["official_class"].split(".")[-1], config["init_kwargs"])
        shapes = {key: list(value.shape) for key, value in net.state_dict().items()}
        assert shapes == config["state_dict"], name
        assert sum(p.numel() for p in net.parameters()) == config["num_params"], name
        assert sorted(key for key, _ in net.named_buffers()) == sorted(config["buffers"]), name


# ---- the call contract ---------------------------------------------------------------------------------------------


def test_save_and_load_pretrained_round_trip_gives_identical_outputs(tmp_path):
    net = tiny(label_dim=4, use_fp16=np.bool_(False), model=dict(TINY_SONG, channel_mult=(1, np.int64(2))))
    net.save_pretrained(tmp_path)
    loaded = EDMPrecond.from_pretrained(tmp_path).eval()
    assert loaded.config.model_kwargs["channel_mult"] == [1, 2]
    assert loaded.config.sigma_max is None and loaded.sigma_max == math.inf
    x, labels = torch.randn(2, 3, 8, 8), torch.eye(4)[[0, 3]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.7, labels), net(x, 0.7, labels), rtol=0, atol=0)


def test_sigma_as_number_vector_or_image_shaped_tensor_gives_the_same_result():
    net, x = tiny(), torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = net(x, 1.5)
        torch.testing.assert_close(net(x, torch.full([3], 1.5)), ref, rtol=0, atol=0)
        torch.testing.assert_close(net(x, torch.full([3, 1, 1, 1], 1.5)), ref, rtol=0, atol=0)


def test_edm_preconditioning_matches_the_generator_coefficients_of_the_spec():
    # ALGORITHM.md §2: at sigma_init = 2.5, D = 0.038462 z + 0.490290 F(0.392232 z, 0.229073).
    c_skip, c_out, c_in, c_noise = tiny().preconditioning(torch.full([1, 1, 1, 1], 2.5))
    expected = [0.038462, 0.490290, 0.392232, 0.229073]
    assert [round(float(c), 6) for c in (c_skip, c_out, c_in, c_noise)] == expected
    assert c_noise.shape == (1,)


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond])
def test_denoiser_is_skip_plus_scaled_raw_unet_output(cls):
    net = tiny(cls, model=TINY_ADM if cls is iDDPMPrecond else TINY_SONG)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 20.0])
    c_skip, c_out, c_in, c_noise = net.preconditioning(sigma.reshape(-1, 1, 1, 1))
    with torch.no_grad():
        f_x = net.model(c_in * x, c_noise, None)
        torch.testing.assert_close(net(x, sigma), c_skip * x + c_out * f_x[:, :3])


def test_vp_ve_iddpm_use_their_official_constants():
    vp, ve, iddpm = tiny(VPPrecond), tiny(VEPrecond), tiny(iDDPMPrecond, model=TINY_ADM)
    sigma = torch.tensor([0.5, 5.0]).reshape(-1, 1, 1, 1)
    # VP: c_noise = (M - 1) t(sigma) with t inverting sigma(t); sigma range sigma(1e-5) .. sigma(1).
    assert vp.preconditioning(sigma)[3] == pytest.approx((999 * vp.sigma_inv(sigma)).flatten().tolist())
    assert float(vp.sigma_inv(vp.sigma(0.3))) == pytest.approx(0.3, rel=1e-5)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)), rel=1e-5)
    assert vp.sigma_min == 2 ** -10  # sigma(1e-5) ~ 1.0005e-3, evaluated in float32 exactly as the official code
    # VE: c_out = sigma, c_in = 1, c_noise = ln(sigma / 2).
    c_skip, c_out, c_in, c_noise = ve.preconditioning(sigma)
    assert c_noise.tolist() == pytest.approx([math.log(0.25), math.log(2.5)])
    assert torch.equal(c_out, sigma) and torch.equal(c_in, torch.ones_like(sigma))
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    # iDDPM: the model predicts 2 * img_channels; sigma snaps to the table u kept as a top-level buffer.
    assert iddpm.model.out_conv.out_channels == 6 and iddpm.state_dict()["u"].shape == (1001,)
    assert iddpm.u[-1] == 0 and iddpm.sigma_min == pytest.approx(float(iddpm.u[999]))
    snapped = iddpm.round_sigma(torch.tensor([0.5, 5.0]))
    assert torch.isin(snapped, iddpm.u).all() and torch.allclose(snapped, torch.tensor([0.5, 5.0]), rtol=0.02)
    index = iddpm.round_sigma(torch.tensor([0.5, 5.0]), return_index=True)
    assert iddpm.preconditioning(sigma)[3].tolist() == (999 - index).tolist()


TINY_NCSN = dict(TINY_SONG, encoder_type="residual", embedding_type="fourier", channel_mult_noise=2,
                 resample_filter=[1, 3, 3, 1])


@pytest.mark.parametrize("model", [TINY_SONG, TINY_ADM, TINY_NCSN])
def test_encoder_mode_returns_logits_without_running_the_decoder(model):
    net, x = tiny(model=model), torch.randn(2, 3, 8, 8)
    called = []
    decoder_parts = [net.model.dec] + [getattr(net.model, name) for name in ("out_norm", "out_conv") if
                                       hasattr(net.model, name)]
    hooks = [m.register_forward_hook(lambda *_: called.append(1)) for part in decoder_parts for m in part.modules()]
    with torch.no_grad():
        logits = net(x, 1.0, return_flag="encoder")
    for hook in hooks:
        hook.remove()
    assert logits.shape == (2, 1, 4, 4) and logits.dtype == torch.float32 and not called
    with torch.no_grad():
        denoised, logits_ed = net(x, 1.0, return_flag="encoder_decoder")
        torch.testing.assert_close(logits_ed, logits, rtol=0, atol=0)
        torch.testing.assert_close(denoised, net(x, 1.0), rtol=0, atol=0)


def test_skip_encoder_and_skip_decoder_variants_run_in_every_mode():
    net = tiny(model=dict(TINY_SONG, encoder_type="skip", decoder_type="skip", channel_mult=[1, 2, 2]))
    assert "model.enc.4x4_aux_skip.weight" in net.state_dict() and "model.dec.4x4_aux_conv.weight" in net.state_dict()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        denoised, logits = net(x, 2.0, return_flag="encoder_decoder")
        torch.testing.assert_close(net(x, 2.0), denoised, rtol=0, atol=0)
        torch.testing.assert_close(net(x, 2.0, return_flag="encoder"), logits, rtol=0, atol=0)
    assert logits.shape == (2, 1, 2, 2)


def test_bf16_autocast_runs_and_returns_float32_close_to_float32():
    net, x = tiny(model=TINY_ADM), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref_d, ref_l = net(x, 1.0, return_flag="encoder_decoder")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d, logits = net(x, 1.0, return_flag="encoder_decoder")
    assert d.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(d, ref_d, atol=0.05 * float(ref_d.abs().max()), rtol=0.05)
    torch.testing.assert_close(logits, ref_l, atol=0.05 * float(ref_l.abs().max()), rtol=0.05)


@pytest.mark.parametrize("model", [TINY_SONG, TINY_ADM])
def test_raw_unet_runs_in_the_activation_dtype_with_float32_weights(model):
    # The official use_fp16 path: the preconditioner casts c_in * x, every layer casts its weights to match.
    net, x = tiny(model=model), torch.randn(2, 3, 8, 8)
    c_noise = torch.tensor([0.1, -0.3])
    with torch.no_grad():
        ref, ref_logits = net.model(x, c_noise, None, return_flag="encoder_decoder")
        out, logits = net.model(x.to(torch.bfloat16), c_noise, None, return_flag="encoder_decoder")
    assert out.dtype == logits.dtype == torch.bfloat16 and net.model.map_layer0.weight.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=0.05 * float(ref.abs().max()), rtol=0.05)
    torch.testing.assert_close(logits.float(), ref_logits, atol=0.05 * float(ref_logits.abs().max()), rtol=0.05)


def test_channels_last_inputs_and_weights_give_the_same_output():
    net, x = tiny(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        augment = torch.randn(2, 9)
        ref = net(x, 0.5, augment_labels=augment)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.to(memory_format=torch.channels_last), 0.5, augment_labels=augment)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_conditional_model_without_labels_uses_an_all_zero_label_row():
    net, x = tiny(label_dim=5), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x, 0.8), net(x, 0.8, torch.zeros(2, 5)), rtol=0, atol=0)
        # The official init makes the output layer ~1e-5, so see the labels reach the network through the encoder.
        logits = net(x, 0.8, return_flag="encoder")
        torch.testing.assert_close(logits, net(x, 0.8, torch.zeros(2, 5), return_flag="encoder"), rtol=0, atol=0)
        assert not torch.allclose(logits, net(x, 0.8, torch.eye(5)[:2], return_flag="encoder"))


def test_only_resampling_convolutions_own_a_resample_filter_buffer():
    unet = DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2],
                        num_blocks=1, attn_resolutions=[])
    assert unet.enc["8x8_conv"].resample_filter is None and not dict(unet.enc["8x8_conv"].named_buffers())
    assert unet.enc["4x4_down"].skip.weight is None  # ADM skips a same-width downsample without projection
    assert unet.enc["4x4_down"].skip.resample_filter.tolist() == [[[[0.25, 0.25], [0.25, 0.25]]]]


def test_bad_inputs_raise_errors_that_name_the_fix():
    uncond, cond, x = tiny(), tiny(label_dim=4), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="img_channels=3"):
        uncond(torch.randn(2, 1, 8, 8), 1.0)
    with pytest.raises(ValueError, match="img_resolution=8"):
        uncond(torch.randn(2, 3, 16, 16), 1.0)
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        cond(x, 1.0, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="unconditional.*pass None"):
        uncond(x, 1.0, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="return_flag"):
        uncond(x, 1.0, return_flag="discriminator")
    with pytest.raises(ValueError, match="model_type"):
        EDMPrecond(img_resolution=8, img_channels=3, model_type="UNet2DModel")
    with pytest.raises(ValueError, match="does not take.*num_res_blocks"):
        EDMPrecond(img_resolution=8, img_channels=3, model_type="SongUNet", model_kwargs=dict(num_res_blocks=2))
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(img_resolution=8, in_channels=3, out_channels=3, encoder_type="fancy")
