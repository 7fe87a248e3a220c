"""The few-step sampler of a SiD/SiDA generator, shared by the trainer and `SiDAPipeline` (ALGORITHM.md §11).

One function, `few_step_generate`, runs the generator along a step grid (`schedule.step_sigmas`); the trainer calls it
with the global RNG's noise and the pipeline with per-image generators, so what a pipeline samples with k steps is
exactly what the training optimised for its k-th output. `inference_sigmas` decides what a pipeline call runs.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence

import torch
from diffusers.utils import logging

from sida_diffusers.schedule import RENOISE_MODES, check_step_sigmas


logger = logging.get_logger(__name__)


def few_step_generate(generate_at: Callable, eps: torch.Tensor, sigmas: Sequence[float], renoise: str = "fresh",
                      draw_noise: Optional[Callable[[], torch.Tensor]] = None, grad_last_only: bool = False,
                      on_step: Optional[Callable] = None) -> torch.Tensor:
    """x_1 = G(sigma_0 eps; sigma_0), then x_{k+1} = G(x_k + sigma_k n_k; sigma_k) for k = 1..len(sigmas)-1
    (ALGORITHM.md §11.1); returns the last x.

    `generate_at(x, sigma)` applies the generator at noise level `sigma`. `eps` is the unit noise of the first step;
    n_k is `draw_noise()` (fresh unit noise, `renoise="fresh"`) or `eps` again (`renoise="fixed"`, §11.3).
    `grad_last_only` runs every step but the last under no_grad (the uniform mixture of §11.2: the earlier steps
    only make the last step's input). `on_step(k, sigma, x)`, if given, sees (and may replace) each step's output
    (a pipeline's progress bar and callback). With one sigma this is exactly the one-step generator.
    """
    x = None
    for k, sigma in enumerate(sigmas):
        frozen = grad_last_only and k < len(sigmas) - 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            if k == 0:
                x = generate_at(eps * sigma, sigma)
            else:
                noise = eps if renoise == "fixed" else draw_noise()
                x = generate_at(x + sigma * noise, sigma)
        if on_step is not None:
            x = on_step(k, sigma, x)
    return x


def check_grid(step_sigmas, renoise, init_sigma: float) -> list:
    """A pipeline's trained grid (`step_sigmas`, None: the one-step [init_sigma]) and `renoise`, checked as values a
    loaded model_index.json may hold; returns the grid as floats (ALGORITHM.md §11.1, §11.3)."""
    if renoise not in RENOISE_MODES:
        raise ValueError(f"renoise must be one of {RENOISE_MODES}, got {str(renoise)[:40]}.")
    if step_sigmas is None:
        return [float(init_sigma)]
    if not isinstance(step_sigmas, (list, tuple)) or not all(
            isinstance(s, numbers.Real) and not isinstance(s, bool) for s in step_sigmas):
        raise ValueError(f"step_sigmas must be a list of noise levels, got {str(step_sigmas)[:60]} (in "
                         "model_index.json when the pipeline was loaded).")
    return check_step_sigmas(step_sigmas, len(step_sigmas), float(init_sigma))


def inference_sigmas(trained: Sequence[float], num_inference_steps: Optional[int] = None,
                     sigmas: Optional[Sequence[float]] = None) -> list:
    """The noise levels a pipeline call runs (ALGORITHM.md §11.4): the first k levels of the trained grid
    (`num_inference_steps` = k, default all K), or the caller's explicit `sigmas`, with a warning when they are not
    what the generator was trained for. k > K is refused: the generator never learned a (K+1)-th step."""
    trained = [float(s) for s in trained]
    if num_inference_steps is not None and (not isinstance(num_inference_steps, int)
                                            or isinstance(num_inference_steps, bool) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
    if sigmas is not None:
        sigmas = [float(s) for s in sigmas]
        if not sigmas or any(not s > 0 for s in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"sigmas must be a non-empty list of positive, strictly decreasing noise levels, got "
                             f"{sigmas}.")
        if num_inference_steps is not None and num_inference_steps != len(sigmas):
            raise ValueError(f"num_inference_steps={num_inference_steps} but {len(sigmas)} sigmas were given; pass "
                             "one of them (the steps are the sigmas).")
        if sigmas != trained[:len(sigmas)]:
            logger.warning("sigmas=%s is not a prefix of the grid this generator was trained on (%s): an untrained "
                           "schedule, whose quality was never optimised.", sigmas, trained)
        return sigmas
    steps = len(trained) if num_inference_steps is None else num_inference_steps
    if steps > len(trained):
        raise ValueError(f"num_inference_steps={steps} but this generator was trained for at most {len(trained)} "
                         f"step(s) (step_sigmas {trained}); pass num_inference_steps <= {len(trained)}, or an explicit "
                         "untrained schedule as sigmas=[...].")
    return trained[:steps]
