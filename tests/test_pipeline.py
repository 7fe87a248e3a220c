"""SiDAPipeline: one-step sampling, labels, per-seed reproducibility, outputs, loading, multistep, sida-sample."""

from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL

from sida_diffusers.cli import sample as sample_cli
from sida_diffusers.pipelines import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE, SiDAPipeline, np_to_uint8, seed_generators

from conftest import ID2LABEL, edm_np, edm_uint8, tiny_edm, tiny_vae


def make_pipe(**kwargs):
    pipe = SiDAPipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def cond_pipe():
    return make_pipe(unet=tiny_edm(label_dim=3), id2label=ID2LABEL)


def test_one_step_output_is_generator_at_init_sigma_with_edm_per_seed_noise():
    net = tiny_edm()
    pipe = make_pipe(unet=net)
    images = pipe(batch_size=2, generator=seed_generators([3, 4]), output_type="np").images
    # EDM's StackedRandomGenerator: one torch.randn(shape[1:]) per seed.
    eps = torch.stack([torch.randn([3, 8, 8], generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    with torch.no_grad():
        x = net(2.5 * eps, torch.full([2, 1, 1, 1], 2.5), None, augment_labels=torch.zeros(2, 9))
    np.testing.assert_array_equal(images, edm_np(x))


def test_per_seed_images_do_not_depend_on_batch_composition(cond_pipe):
    together = cond_pipe(batch_size=3, generator=seed_generators([5, 6, 7]), output_type="np").images
    alone = cond_pipe(batch_size=1, generator=seed_generators([6]), output_type="np").images
    np.testing.assert_array_equal(together[1], alone[0])
    assert not np.array_equal(together[0], together[1])


def test_random_labels_are_drawn_from_each_seed_generator_after_its_noise(cond_pipe):
    seeds = [11, 12, 13, 14]
    expected_labels = []
    for seed in seeds:  # EDM generate script order: noise first, then the label, from the same generator
        g = torch.Generator().manual_seed(seed)
        torch.randn([3, 8, 8], generator=g)
        expected_labels.append(int(torch.randint(3, (), generator=g)))
    drawn = cond_pipe(batch_size=4, generator=seed_generators(seeds), output_type="np").images
    given = cond_pipe(batch_size=4, class_labels=expected_labels, generator=seed_generators(seeds),
                      output_type="np").images
    np.testing.assert_array_equal(drawn, given)


def test_random_labels_with_one_generator_are_reproducible(cond_pipe):
    a = cond_pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = cond_pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(a, b)


def test_class_labels_as_int_name_synonym_list_tensor_and_one_hot_agree(cond_pipe):
    def run(labels):
        return cond_pipe(batch_size=2, class_labels=labels, generator=seed_generators([0, 1]), output_type="np").images

    reference = run([0, 0])
    for labels in (0, "zero", "nought", ["zero", 0], torch.tensor([0, 0]), np.array([0, 0]),
                   torch.tensor([[1.0, 0.0, 0.0]] * 2)):
        np.testing.assert_array_equal(run(labels), reference)
    assert cond_pipe.get_label_ids(["one", "two"]) == [1, 2]
    assert not np.array_equal(run("two"), reference)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_output_types_shapes_dtypes_and_ranges(output_type):
    pipe = make_pipe(unet=tiny_edm())
    images = pipe(batch_size=3, generator=torch.manual_seed(0), output_type=output_type).images
    if output_type == "pil":
        assert len(images) == 3 and images[0].mode == "RGB" and images[0].size == (8, 8)
    elif output_type == "np":  # Diffusers' convention: float32 in [0, 1], NHWC
        assert images.dtype == np.float32 and images.shape == (3, 8, 8, 3)
        assert images.min() >= 0 and images.max() <= 1
    else:
        assert images.dtype == torch.float32 and images.shape == (3, 3, 8, 8)
        assert images.min() >= 0 and images.max() <= 1


def test_np_output_is_edm_bytes_over_255_and_rounds_back_to_the_pil_image():
    pipe = make_pipe(unet=tiny_edm())
    arrays = pipe(batch_size=3, generator=seed_generators([0, 1, 2]), output_type="np").images
    pils = pipe(batch_size=3, generator=seed_generators([0, 1, 2]), output_type="pil").images
    uint8 = np.stack([np.asarray(image) for image in pils])
    np.testing.assert_array_equal(arrays, uint8.astype(np.float32) / 255)
    np.testing.assert_array_equal(np.round(arrays * 255).astype(np.uint8), uint8)  # EDM's exact bytes come back
    np.testing.assert_array_equal(np_to_uint8(arrays), uint8)
    assert [np.asarray(im).tolist() for im in pipe.numpy_to_pil(arrays)] == [u.tolist() for u in uint8]
    every_byte = np.arange(256, dtype=np.uint8)  # the round trip holds for all 256 values, not just these images
    np.testing.assert_array_equal(np_to_uint8(every_byte.astype(np.float32) / 255), every_byte)


def test_pt_output_is_the_unquantised_version_of_the_uint8_output():
    pipe = make_pipe(unet=tiny_edm())
    pt = pipe(batch_size=2, generator=seed_generators([0, 1]), output_type="pt").images
    uint8 = np_to_uint8(pipe(batch_size=2, generator=seed_generators([0, 1]), output_type="np").images)
    # x*127.5 + 128 == pt*255 + 0.5, so truncation of one is rounding of the other
    expected = np.floor(pt.permute(0, 2, 3, 1).double().numpy() * 255 + 0.5).clip(0, 255)
    assert np.abs(expected - uint8).max() <= 1


def test_grey_models_give_mode_L_images_and_hwc_arrays():
    pipe = make_pipe(unet=tiny_edm(channels=1, augment_dim=0))
    image = pipe(generator=torch.manual_seed(0)).images[0]
    assert isinstance(image, PIL.Image.Image) and image.mode == "L" and image.size == (8, 8)
    assert pipe(output_type="np").images.shape == (1, 8, 8, 1)


def test_user_latents_are_the_unit_noise():
    pipe = make_pipe(unet=tiny_edm())
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    from_latents = pipe(batch_size=2, latents=eps, output_type="np").images
    from_seed = pipe(batch_size=2, generator=torch.Generator().manual_seed(9), output_type="np").images
    np.testing.assert_array_equal(from_latents, from_seed)


def test_an_explicit_schedule_renoises_at_its_sigmas_and_reapplies_the_generator():
    net = tiny_edm(augment_dim=0)
    pipe = make_pipe(unet=net)  # a one-step generator: more steps only through explicit (untrained) sigmas
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), sigmas=[2.5, 2.5 * 2 / 3, 2.5 / 3],
                  output_type="np").images
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = net(2.5 * torch.randn(2, 3, 8, 8, generator=g), 2.5)
        for k in (1, 2):  # sigma_k = init_sigma (K - k) / K, the official multistep grid (ALGORITHM.md §2, §11.1)
            sigma_k = 2.5 * (3 - k) / 3
            x = net(x + sigma_k * torch.randn(2, 3, 8, 8, generator=g), sigma_k)
    np.testing.assert_array_equal(images, edm_np(x))


def test_latent_model_is_decoded_through_the_vae_in_the_edm2_convention():
    net, vae = tiny_edm(channels=4, augment_dim=0), tiny_vae()
    pipe = make_pipe(unet=net, vae=vae, latent_scale=EDM2_LATENT_SCALE, latent_bias=EDM2_LATENT_BIAS)
    images = pipe(batch_size=2, generator=seed_generators([0, 1]), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.float32
    eps = torch.stack([torch.randn([4, 8, 8], generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    scale = EDM2_LATENT_SCALE.reshape(1, 4, 1, 1)
    bias = EDM2_LATENT_BIAS.reshape(1, 4, 1, 1)
    with torch.no_grad():  # ALGORITHM.md §6.1: (x - bias) / scale -> decode -> clamp(0, 1) * 255 -> uint8
        decoded = vae.decode((net(2.5 * eps, 2.5) - bias) / scale).sample
    uint8 = (decoded.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(images, uint8.astype(np.float32) / 255)
    np.testing.assert_allclose(EDM2_LATENT_SCALE, [0.119904, 0.108225, 0.134771, 0.152439], atol=1e-6)
    np.testing.assert_allclose(EDM2_LATENT_BIAS, [-0.696643, -0.351732, -0.016173, 0.327744], atol=1e-6)


def test_save_load_round_trip_gives_identical_images_and_int_label_keys(tmp_path, cond_pipe):
    cond_pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = SiDAPipeline.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config.id2label == ID2LABEL and loaded.config.init_sigma == 2.5
    assert loaded.labels["nought"] == 0
    kwargs = dict(batch_size=3, class_labels=["one", "two", 0], output_type="np")
    np.testing.assert_array_equal(loaded(generator=seed_generators([1, 2, 3]), **kwargs).images,
                                  cond_pipe(generator=seed_generators([1, 2, 3]), **kwargs).images)


def test_latent_pipeline_round_trip_keeps_the_vae_and_latent_config(tmp_path):
    pipe = make_pipe(unet=tiny_edm(channels=4, augment_dim=0), vae=tiny_vae(), latent_scale=EDM2_LATENT_SCALE,
                     latent_bias=EDM2_LATENT_BIAS)
    pipe.save_pretrained(tmp_path)
    loaded = SiDAPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.vae, AutoencoderKL) and loaded.config.latent_scale == EDM2_LATENT_SCALE.tolist()
    np.testing.assert_array_equal(loaded(generator=seed_generators([4]), output_type="np").images,
                                  pipe(generator=seed_generators([4]), output_type="np").images)


def test_loading_with_dtype_casts_the_generator(tmp_path):
    make_pipe(unet=tiny_edm()).save_pretrained(tmp_path)
    loaded = SiDAPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16
    assert loaded(batch_size=2, output_type="np").images.shape == (2, 8, 8, 3)


def test_hub_loading_goes_through_snapshot_download(tmp_path, cond_pipe):
    cond_pipe.save_pretrained(tmp_path)
    with mock.patch("huggingface_hub.snapshot_download", return_value=str(tmp_path)) as snapshot:
        loaded = SiDAPipeline.from_pretrained("someone/sida-tiny", revision="v1")
    snapshot.assert_called_once()
    assert snapshot.call_args.args == ("someone/sida-tiny",) and snapshot.call_args.kwargs["revision"] == "v1"
    np.testing.assert_array_equal(loaded(class_labels=2, generator=seed_generators([0]), output_type="np").images,
                                  cond_pipe(class_labels=2, generator=seed_generators([0]), output_type="np").images)


@pytest.mark.parametrize("kwargs, message", [
    (dict(class_labels=3), "out of range"),
    (dict(class_labels="three"), "unknown class name"),
    (dict(class_labels=torch.ones(1, 5)), r"shape \[N, 3\]"),
    (dict(class_labels=[0, 1, 2], batch_size=2), "3 class labels for batch_size=2"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(batch_size=2, generator=seed_generators([0])), "1 generators for batch_size=2"),
    (dict(output_type="jpg"), "output_type must be one of"),
    (dict(latents=torch.zeros(1, 3, 4, 4)), r"latents must have shape \[1, 3, 8, 8\]"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
])
def test_bad_input_to_a_conditional_pipeline_raises_a_clear_error(cond_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cond_pipe(**kwargs)


def test_labels_for_an_unconditional_model_are_rejected():
    with pytest.raises(ValueError, match="unconditional"):
        make_pipe(unet=tiny_edm())(class_labels=1)


def test_latent_model_without_vae_is_rejected():
    pipe = make_pipe(unet=tiny_edm(channels=4), latent_scale=EDM2_LATENT_SCALE, latent_bias=EDM2_LATENT_BIAS)
    with pytest.raises(ValueError, match="no vae"):
        pipe()


def test_non_denoiser_unet_and_bad_init_sigma_are_rejected():
    with pytest.raises(ValueError, match="Denoiser"):
        SiDAPipeline(unet=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="init_sigma must be positive"):
        SiDAPipeline(unet=tiny_edm(), init_sigma=0)


# ---- sida-sample ------------------------------------------------------------------------------------------------
def test_sida_sample_writes_pngs_named_by_seed_independent_of_batch_size(tmp_path, cond_pipe):
    cond_pipe.save_pretrained(tmp_path / "pipe")
    for batch_size in (2, 3):
        assert sample_cli.main([str(tmp_path / "pipe"), "--seeds", "0-4", "--outdir", str(tmp_path / f"b{batch_size}"),
                                "--batch-size", str(batch_size), "--device", "cpu"]) == 0
    names = sorted(p.name for p in (tmp_path / "b2").iterdir())
    assert names == [f"{s:06d}.png" for s in range(5)]
    for name in names:
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "b2" / name)),
                                      np.asarray(PIL.Image.open(tmp_path / "b3" / name)))
    expected = np_to_uint8(cond_pipe(batch_size=1, generator=seed_generators([3]), output_type="np").images[0])
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "b2" / "000003.png")), expected)


def test_sida_sample_npz_grid_and_class_names(tmp_path, cond_pipe):
    cond_pipe.save_pretrained(tmp_path / "pipe")
    assert sample_cli.main([str(tmp_path / "pipe"), "--seeds", "0-3,7", "--outdir", str(tmp_path / "out"), "--npz",
                            "--grid", str(tmp_path / "grid.png"), "--class-labels", "two", "1",
                            "--device", "cpu"]) == 0
    data = np.load(tmp_path / "out" / "samples.npz")
    assert data["arr_0"].shape == (5, 8, 8, 3) and data["seeds"].tolist() == [0, 1, 2, 3, 7]
    expected = cond_pipe(batch_size=5, class_labels=[2, 1, 2, 1, 2], generator=seed_generators([0, 1, 2, 3, 7]),
                         output_type="np").images
    np.testing.assert_array_equal(data["arr_0"], np_to_uint8(expected))
    # 5 images -> 3 columns x 2 rows of 8x8, enlarged 11x (the smallest integer factor reaching 256 px)
    assert PIL.Image.open(tmp_path / "grid.png").size == (24 * 11, 16 * 11)


def test_sida_sample_files_are_edm_uint8_bytes_of_the_generator(tmp_path):
    """The PNGs and the npz hold exactly EDM's uint8 conversion of G(init_sigma * eps), whatever "np" returns."""
    net = tiny_edm()
    make_pipe(unet=net).save_pretrained(tmp_path / "pipe")
    for extra in ([], ["--npz"]):
        assert sample_cli.main([str(tmp_path / "pipe"), "--seeds", "4-6", "--outdir", str(tmp_path / "out"),
                                "--device", "cpu", *extra]) == 0
    eps = torch.stack([torch.randn([3, 8, 8], generator=torch.Generator().manual_seed(s)) for s in (4, 5, 6)])
    with torch.no_grad():
        expected = edm_uint8(net(2.5 * eps, 2.5, augment_labels=torch.zeros(3, 9)))
    npz = np.load(tmp_path / "out" / "samples.npz")
    assert npz["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(npz["arr_0"], expected)
    pngs = np.stack([np.asarray(PIL.Image.open(tmp_path / "out" / f"{s:06d}.png")) for s in (4, 5, 6)])
    np.testing.assert_array_equal(pngs, expected)


def test_sida_sample_rejects_bad_seeds_and_unknown_folders(tmp_path, capsys):
    with pytest.raises(ValueError, match="bad seed list"):
        sample_cli.parse_seeds("5-2")
    assert sample_cli.parse_seeds("0-2,9") == [0, 1, 2, 9]
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main([str(tmp_path), "--outdir", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_info.value.code == 2 and "model_index.json" in capsys.readouterr().err


def test_a_missing_local_folder_is_named_instead_of_asking_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing pipeline folder nor a Hub repo id"):
        SiDAPipeline.download(str(tmp_path / "no" / "such" / "pipeline"))
