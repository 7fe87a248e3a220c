"""Diffusers' pipeline habits on SiDAPipeline: the step-end callback, output_type="latent", the VAE switches, batch
sizes of any integer type."""

import numpy as np
import pytest
import torch
from diffusers.callbacks import PipelineCallback

from sida_diffusers.pipelines import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE, SiDAPipeline, np_to_uint8, seed_generators

from conftest import tiny_edm, tiny_vae


def make_pipe(**kwargs):
    pipe = SiDAPipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_pipe():
    return make_pipe(unet=tiny_edm(channels=4, augment_dim=0), vae=tiny_vae(), latent_scale=EDM2_LATENT_SCALE,
                     latent_bias=EDM2_LATENT_BIAS)


def test_callback_on_step_end_sees_every_step_and_may_replace_the_sample():
    pipe = make_pipe(unet=tiny_edm(), step_sigmas=[2.5, 2.5 * 2 / 3, 2.5 / 3])  # a 3-step generator (§11)
    seen = []

    def record(pipeline, step, sigma, callback_kwargs):
        seen.append((pipeline is pipe, step, round(sigma, 4), tuple(callback_kwargs["latents"].shape)))
        return {}

    plain = pipe(batch_size=2, generator=seed_generators([0, 1]), num_inference_steps=3, output_type="np").images
    images = pipe(batch_size=2, generator=seed_generators([0, 1]), num_inference_steps=3, output_type="np",
                  callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"]).images
    np.testing.assert_array_equal(images, plain)  # a callback that returns nothing changes nothing
    assert seen == [(True, 0, 2.5, (2, 3, 8, 8)), (True, 1, 1.6667, (2, 3, 8, 8)), (True, 2, 0.8333, (2, 3, 8, 8))]

    def to_grey(pipeline, step, sigma, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    grey = pipe(batch_size=1, generator=seed_generators([0]), output_type="np", callback_on_step_end=to_grey).images
    assert np.all(np_to_uint8(grey) == 128)  # x = 0 is mid-grey: (0 * 127.5 + 128)


def test_a_diffusers_pipeline_callback_object_names_its_own_tensor_inputs():
    class Halve(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": callback_kwargs["latents"] * 0.5}

    pipe = make_pipe(unet=tiny_edm())
    halved = pipe(generator=seed_generators([3]), output_type="latent", callback_on_step_end=Halve()).images
    full = pipe(generator=seed_generators([3]), output_type="latent").images
    torch.testing.assert_close(halved, full * 0.5)
    with pytest.raises(ValueError, match=r"\['prompt_embeds'\] are not among this pipeline's \['latents'\]"):
        pipe(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_output_type_latent_is_the_generator_output_before_the_vae():
    pipe = latent_pipe()
    latents = pipe(batch_size=2, generator=seed_generators([0, 1]), output_type="latent").images
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == torch.float32
    eps = torch.stack([torch.randn([4, 8, 8], generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    with torch.no_grad():
        torch.testing.assert_close(latents, pipe.unet(2.5 * eps, 2.5))
    decoded = pipe.postprocess(latents, "np")  # the same decode the pipeline would have run
    np.testing.assert_array_equal(decoded, pipe(batch_size=2, generator=seed_generators([0, 1]),
                                                output_type="np").images)


def test_vae_slicing_and_tiling_switch_the_vae_of_a_latent_pipeline():
    pipe = latent_pipe()
    before = pipe(batch_size=3, generator=seed_generators([0, 1, 2]), output_type="np").images
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    sliced = pipe(batch_size=3, generator=seed_generators([0, 1, 2]), output_type="np").images
    np.testing.assert_allclose(sliced, before, atol=1 / 255)  # one image at a time: the same images
    pipe.disable_vae_slicing()
    pipe.enable_vae_tiling()
    assert pipe.vae.use_tiling and not pipe.vae.use_slicing
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_tiling
    with pytest.raises(ValueError, match="no vae"):
        make_pipe(unet=tiny_edm()).enable_vae_slicing()


@pytest.mark.parametrize("batch_size", [np.int64(2), np.int32(2), torch.tensor(2).item()])
def test_a_batch_size_of_any_integer_type_is_taken(batch_size):
    pipe = make_pipe(unet=tiny_edm())
    images = pipe(batch_size=batch_size, generator=seed_generators([0, 1]), output_type="np").images
    np.testing.assert_array_equal(images, pipe(batch_size=2, generator=seed_generators([0, 1]),
                                               output_type="np").images)


@pytest.mark.parametrize("batch_size", [True, 2.0, 0, np.float64(2)])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        make_pipe(unet=tiny_edm())(batch_size=batch_size)
