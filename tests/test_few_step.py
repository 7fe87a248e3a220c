"""Few-step generators (ALGORITHM.md §11): the step grid, the shared sampler, k* drawn per iteration, the pipeline's
prefix of the trained grid, and one-step training unchanged bit for bit."""

import hashlib
import json
import logging

import numpy as np
import pytest
import torch

from sida_diffusers.pipelines import SiDAPipeline, seed_generators
from sida_diffusers.pipelines.few_step import few_step_generate, inference_sigmas
from sida_diffusers.schedule import step_sigmas
from sida_diffusers.training import SiDATrainer
from sida_diffusers.training.few_step import draw_num_steps, evaluation_steps

from conftest import edm_np, params, tiny_config, tiny_edm, tiny_teacher


# ---- the step grid (§11.1) ------------------------------------------------------------------------------------------

def test_linear_grid_is_the_official_multistep_grid():
    assert step_sigmas("linear", 4, 2.5) == [2.5, 1.875, 1.25, 0.625]  # init_sigma (K - k) / K, k = 0..K-1
    assert step_sigmas("linear", 1, 2.5) == [2.5]


def test_karras_grid_runs_from_init_sigma_to_its_floor_with_rho_7_spacing():
    sigmas = step_sigmas("karras", 4, 2.5, sigma_min=0.15)
    assert sigmas[0] == 2.5 and sigmas[-1] == 0.15
    roots = np.array(sigmas) ** (1 / 7)
    np.testing.assert_allclose(np.diff(roots), np.diff(roots)[0], rtol=1e-9)  # equal steps in sigma^(1/7)
    assert step_sigmas("karras", 1, 2.5) == [2.5]


def test_explicit_grid_is_checked_against_the_steps_and_init_sigma():
    assert step_sigmas("2.5,1.0,0.3", 3, 2.5) == [2.5, 1.0, 0.3]
    with pytest.raises(ValueError, match="lists 3 noise level.*num_steps is 2; pass --num_steps 3"):
        step_sigmas("2.5,1.0,0.3", 2, 2.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        step_sigmas("2.5,1.0,1.0", 3, 2.5)
    with pytest.raises(ValueError, match="first step noise level is the generator's input level init_sigma=2.5"):
        step_sigmas("2.0,1.0", 2, 2.5)
    with pytest.raises(ValueError, match="linear or karras or comma-separated"):
        step_sigmas("cosine", 2, 2.5)


# ---- the sampler (§11.1-§11.3) -------------------------------------------------------------------------------------

def test_one_sigma_is_exactly_the_one_step_generator():
    net, eps = tiny_edm(augment_dim=0), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(eps * 2.5, torch.full([2, 1, 1, 1], 2.5))
        got = few_step_generate(lambda x, s: net(x, torch.full([2, 1, 1, 1], s)), eps, [2.5])
    assert torch.equal(got, expected)


def test_fresh_renoise_draws_new_noise_and_fixed_reuses_the_first_draw():
    calls = []
    generate_at = lambda x, sigma: calls.append((x.clone(), sigma)) or torch.zeros_like(x)
    eps, fresh = torch.randn(1, 4), torch.randn(1, 4)
    few_step_generate(generate_at, eps, [2.5, 1.0], "fresh", lambda: fresh)
    few_step_generate(generate_at, eps, [2.5, 1.0], "fixed", lambda: pytest.fail("fixed draws no noise"))
    assert [s for _, s in calls] == [2.5, 1.0, 2.5, 1.0]
    torch.testing.assert_close(calls[1][0], 1.0 * fresh)  # x_1 = 0 here, so the input is sigma_1 * noise
    torch.testing.assert_close(calls[3][0], 1.0 * eps)


def test_uniform_mixture_backpropagates_through_the_last_step_only():
    weight = torch.tensor(2.0, requires_grad=True)
    grads = []
    def generate_at(x, sigma):
        grads.append(torch.is_grad_enabled())
        return weight * x
    out = few_step_generate(generate_at, torch.ones(1), [2.5, 1.0, 0.5], "fixed", grad_last_only=True)
    out.sum().backward()
    assert grads == [False, False, True]
    # only the last application is differentiated: d(w * (x_2 + 0.5))/dw = x_2 + 0.5 with x_2 held fixed
    x2 = 2.0 * (2.0 * 2.5 + 1.0)
    assert weight.grad.item() == pytest.approx(x2 + 0.5)


# ---- k* per iteration (§11.2) ---------------------------------------------------------------------------------------

def test_k_star_depends_on_the_run_seed_and_images_seen_only_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state(), np.random.get_state()[1].copy()
    draws = [draw_num_steps(seed=3, cur_nimg=64 * i, num_steps=4, step_sampling="uniform") for i in range(400)]
    assert torch.equal(torch.get_rng_state(), state[0]) and np.array_equal(np.random.get_state()[1], state[1])
    assert draws == [draw_num_steps(3, 64 * i, 4, "uniform") for i in range(400)]  # again: identical
    counts = np.bincount(draws, minlength=5)[1:]
    assert counts.min() > 70 and set(draws) == {1, 2, 3, 4}  # uniform on 1..K
    assert draws != [draw_num_steps(4, 64 * i, 4, "uniform") for i in range(400)]
    assert {draw_num_steps(3, n, 4, "all") for n in range(0, 6400, 64)} == {4}
    assert {draw_num_steps(3, n, 1, "uniform") for n in range(0, 6400, 64)} == {1}


def calls_per_phase(trainer):
    """(phase, grad enabled, sigma) of every generator call in one `trainer.step()`."""
    record = []
    phase = {"name": None}
    for name in ("fake_score_phase", "generator_phase"):
        original = getattr(trainer, name)
        def wrapped(*args, _original=original, _name=name):
            phase["name"] = _name
            return _original(*args)
        setattr(trainer, name, wrapped)
    hook = lambda module, args: record.append((phase["name"], torch.is_grad_enabled(),
                                                 round(float(args[1].flatten()[0]), 5)))
    handles = [trainer.unwrap(trainer.generator).register_forward_pre_hook(hook)]
    trainer.step()
    for handle in handles:
        handle.remove()
    return record


@pytest.mark.parametrize("sampling", ["uniform", "all"])
def test_both_phases_run_the_k_star_steps_of_the_iteration(tmp_path, digits8, sampling):
    cfg = tiny_config(tmp_path, num_steps=3, step_sigmas="2.5,1.0,0.4", step_sampling=sampling, train_batch_size=8,
                      warmup_kimg=0, adversarial_start_kimg=0, seed=3)  # seed 3 draws k* = 3, 3, 1, 3, 2, 3
    trainer = SiDATrainer(cfg, teacher=tiny_teacher(), dataset=digits8)
    seen = set()
    for _ in range(6):
        record = calls_per_phase(trainer)
        k = trainer.k_star
        seen.add(k)
        sigmas = [2.5, 1.0, 0.4][:k]
        assert record[:k] == [("fake_score_phase", False, s) for s in sigmas]  # x_g without gradient
        grad = [s == sigmas[-1] or sampling == "all" for s in sigmas]
        assert record[k:] == [("generator_phase", g, s) for g, s in zip(grad, sigmas)]
    assert seen == ({3} if sampling == "all" else {1, 2, 3})


# ---- the pipeline runs a prefix of the trained grid (§11.4) -------------------------------------------------------

def manual_steps(net, seeds, sigmas):
    """EDM's per-seed noise, then G along `sigmas` with fresh per-seed noise between steps."""
    gens = seed_generators(seeds)
    eps = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
    with torch.no_grad():
        x = net(sigmas[0] * eps, sigmas[0])
        for sigma in sigmas[1:]:
            noise = torch.stack([torch.randn(3, 8, 8, generator=g) for g in gens])
            x = net(x + sigma * noise, sigma)
    return edm_np(x)


@pytest.fixture
def k3_pipe():
    pipe = SiDAPipeline(unet=tiny_edm(augment_dim=0), step_sigmas=[2.5, 1.0, 0.4])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_k_step_pipeline_runs_its_trained_steps_by_default_and_any_prefix_on_request(k3_pipe):
    run = lambda **kw: k3_pipe(batch_size=2, generator=seed_generators([0, 1]), output_type="np", **kw).images
    np.testing.assert_array_equal(run(), manual_steps(k3_pipe.unet, [0, 1], [2.5, 1.0, 0.4]))
    np.testing.assert_array_equal(run(num_inference_steps=2), manual_steps(k3_pipe.unet, [0, 1], [2.5, 1.0]))
    np.testing.assert_array_equal(run(num_inference_steps=1), manual_steps(k3_pipe.unet, [0, 1], [2.5]))
    assert k3_pipe.num_steps == 3


def test_more_steps_than_trained_are_refused_and_an_explicit_schedule_is_run_with_a_warning(k3_pipe, caplog):
    with pytest.raises(ValueError, match=r"num_inference_steps=4 but this generator was trained for at most 3 step"
                                         r".*sigmas=\[\.\.\.\]"):
        k3_pipe(num_inference_steps=4)
    with caplog.at_level(logging.WARNING):
        images = k3_pipe(batch_size=2, generator=seed_generators([0, 1]), output_type="np",
                         sigmas=[2.5, 1.5, 0.8, 0.2]).images
    assert "not a prefix of the grid this generator was trained on" in caplog.text
    np.testing.assert_array_equal(images, manual_steps(k3_pipe.unet, [0, 1], [2.5, 1.5, 0.8, 0.2]))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        k3_pipe(sigmas=[2.5, 1.0])  # the trained prefix: nothing to warn about
    assert "not a prefix" not in caplog.text
    with pytest.raises(ValueError, match="num_inference_steps=3 but 2 sigmas were given"):
        k3_pipe(sigmas=[2.5, 1.0], num_inference_steps=3)


def test_a_folder_without_a_grid_is_a_one_step_generator(tmp_path):
    SiDAPipeline(unet=tiny_edm(augment_dim=0)).save_pretrained(tmp_path / "old")
    index = json.loads((tmp_path / "old" / "model_index.json").read_text())
    for key in ("step_sigmas", "renoise"):  # as written before few-step generators existed
        index.pop(key)
    (tmp_path / "old" / "model_index.json").write_text(json.dumps(index))
    pipe = SiDAPipeline.from_pretrained(tmp_path / "old")
    assert pipe.num_steps == 1 and pipe.config.step_sigmas == [2.5]
    with pytest.raises(ValueError, match="trained for at most 1 step"):
        pipe(num_inference_steps=2)


def test_the_grid_and_renoise_travel_with_the_saved_pipeline(tmp_path, k3_pipe):
    fixed = SiDAPipeline(unet=k3_pipe.unet, step_sigmas=[2.5, 1.0, 0.4], renoise="fixed")
    fixed.save_pretrained(tmp_path / "k3")
    loaded = SiDAPipeline.from_pretrained(tmp_path / "k3")
    assert (loaded.config.step_sigmas, loaded.config.renoise) == ([2.5, 1.0, 0.4], "fixed")
    run = lambda pipe: pipe(batch_size=2, generator=seed_generators([5, 6]), output_type="np").images
    np.testing.assert_array_equal(run(loaded), run(fixed))
    assert not np.array_equal(run(loaded), run(k3_pipe))  # fixed reuses the first draw: other images than fresh


def test_a_grid_that_does_not_start_at_init_sigma_is_refused():
    with pytest.raises(ValueError, match="init_sigma=2.5"):
        SiDAPipeline(unet=tiny_edm(augment_dim=0), step_sigmas=[2.0, 1.0])
    with pytest.raises(ValueError, match="renoise must be one of"):
        SiDAPipeline(unet=tiny_edm(augment_dim=0), renoise="sometimes")


def test_inference_sigmas_takes_the_prefix_or_the_explicit_schedule():
    assert inference_sigmas([2.5, 1.0, 0.4]) == [2.5, 1.0, 0.4]
    assert inference_sigmas([2.5, 1.0, 0.4], 2) == [2.5, 1.0]
    with pytest.raises(ValueError, match="positive integer"):
        inference_sigmas([2.5], 0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        inference_sigmas([2.5], sigmas=[1.0, 2.0])


def test_the_model_card_of_a_four_step_generator_gives_k_its_grid_and_a_column_per_step_count():
    from sida_diffusers.model_card import make_model_card

    info = {"method": "sida", "teacher": "digits", "teacher_metrics": {"fd_digits_1797": 6.63}, "teacher_nfe": 35,
            "metrics": {"fd_digits_1797": 9.1, "fd_digits_1797@4steps": 7.2}, "num_steps": 4,
            "step_sigmas": [2.5, 1.1, 0.44, 0.15], "renoise": "fresh", "step_sampling": "uniform",
            "sampling": {"num_steps": 4, "evaluated_steps": [1, 4], "num_samples": 1797}}
    card = make_model_card(info)
    assert "few-step" in card.data.tags and "one-step" not in card.data.tags
    assert "| metric | this model (1 NFE) | this model (4 NFE) | teacher (35 NFE) |" in card.text
    assert "| 9.1 | 7.2 | 6.63 |" in card.text
    assert "| step noise levels | \\[2.5, 1.1, 0.44, 0.15\\] |" in card.text and "| steps (K) | 4 |" in card.text
    assert "# SiDA 4-step generator" in card.text
    assert "num_inference_steps=1" in card.text  # the usage snippet shows the dial
    assert {r.metric_name for r in card.data.eval_results} >= {"FD-digits (1,797 samples; proxy metric in a "
                                                               "digits-classifier feature space, not FID), 4 steps"}


# ---- the trainer with K > 1 ---------------------------------------------------------------------------------------

def test_a_few_step_run_scores_1_and_k_steps_tracks_k_and_exports_its_grid(tmp_path, digits8):
    from sida_diffusers.evaluation import register_feature_metric

    from conftest import pixel_features

    register_feature_metric("fd_pixels8", pixel_features)
    cfg = tiny_config(tmp_path, num_steps=2, step_sigmas="2.5,0.5", eval_metrics=["fd_pixels8"],
                      eval_every_kimg=0.016, eval_num_samples=16, eval_batch_size=16, sample_grid_size=0)
    assert evaluation_steps(cfg) == (1, 2)
    trainer = SiDATrainer(cfg, teacher=tiny_teacher(), dataset=digits8)
    out = trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(m) for m in metrics] == [["fd_pixels8_16", "fd_pixels8_16@2steps", "kimg"]] * 2
    assert trainer.tracker.metric == "fd_pixels8_16@2steps"  # best_pipeline/ by the K-step figure by default
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert sum(v for s in stats for k, v in s.items() if k.startswith("steps_k")) == 4  # every iteration counted
    assert all(f"sec_per_kimg_k{k[7:]}" in s for s in stats for k in s if k.startswith("steps_k"))
    pipe = SiDAPipeline.from_pretrained(out)
    assert pipe.config.step_sigmas == [2.5, 0.5] and pipe.run_info["sampling"]["num_steps"] == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student"]["num_steps"] == 2


def test_best_steps_must_be_a_trained_step_count(tmp_path):
    with pytest.raises(ValueError, match="--best_steps must lie in 1..--num_steps"):
        SiDATrainer(tiny_config(tmp_path, num_steps=2, best_steps=3), teacher=tiny_teacher())
    with pytest.raises(ValueError, match="pass --num_steps 3"):
        SiDATrainer(tiny_config(tmp_path, step_sigmas="2.5,1,0.3"), teacher=tiny_teacher())
    assert not (tmp_path / "run").exists()


# Recorded on the commit before few-step training existed (d45fcce), same config: one-step training must not move
# by one bit. 2-core x86_64, torch 2.14.1, one thread.
ONE_STEP_LOSSES = [
    {"d_loss": 10.799020767211914, "fake_score_loss": 23.504661560058594, "g_gan_loss": 14.64980411529541,
     "g_loss": 0.3508799374103546},
    {"d_loss": 201.12930297851562, "fake_score_loss": 20.570432662963867, "g_gan_loss": 4.26306676864624,
     "g_loss": 14.452875137329102},
    {"d_loss": 43.53084945678711, "fake_score_loss": 24.26221466064453, "g_gan_loss": 28.526641845703125,
     "g_loss": 9.847248077392578},
    {"d_loss": 166.63330078125, "fake_score_loss": 25.756977081298828, "g_gan_loss": 15.705025672912598,
     "g_loss": 14.870654106140137},
]
ONE_STEP_SHA256 = {
    "generator": "ec0ccd227a80a14013b3dc78efc824680b2cb1b8c7047556082e7651f43f4215",
    "generator_ema": "ccf436ecefc03aac45c8f819ec91619650cc81b9bf5adc90c56a3637ade35530",
    "fake_score": "dc6e1a7bf557015d34b356795166f97c3414fb8270b4d97a6d69ba2e69b67788",
}


@pytest.mark.parametrize("sampling", ["uniform", "all"])
def test_one_step_training_is_bit_for_bit_what_it_was_before_few_step_generators(tmp_path, digits8, sampling):
    trainer = SiDATrainer(tiny_config(tmp_path, seed=7, step_sampling=sampling), teacher=tiny_teacher(),
                          dataset=digits8)
    losses = []
    for _ in range(4):  # warm-up, SiD stage, SiDA stage
        trainer.step()
        losses.append({k: float(v) for k, v in sorted(trainer.last_losses.items())})
    assert losses == ONE_STEP_LOSSES
    for name, digest in ONE_STEP_SHA256.items():
        weights = params(trainer.unwrap(getattr(trainer, name))).numpy().tobytes()
        assert hashlib.sha256(weights).hexdigest() == digest, name
