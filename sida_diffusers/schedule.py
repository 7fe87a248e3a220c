"""Noise-level constants and the Karras schedule, shared by the losses, the teacher's sampler and the generator.

Defined once here so that the generator losses (ALGORITHM.md §4.3), EDM's Heun sampler and the one-step generator's
input noise (§2) can never drift apart.
"""

from __future__ import annotations

import math


SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # Karras et al. 2022, Eq. 5 (EDM's sampler; SiD's generator losses)
SIGMA_DATA = 0.5                              # standard deviation of the data, EDM and EDM2 (ALGORITHM.md §1.1)
INIT_SIGMA = 2.5                              # sigma_init of the one-step generator, z = sigma_init * eps (§2)


def karras_interpolate(u, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """sigma at the fraction `u` (a tensor) of the way from sigma_max (u=0) to sigma_min (u=1), Karras Eq. 5."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho


# ---- few-step generators (ALGORITHM.md §11) ---------------------------------------------------------------------------

STEP_GRIDS = ("linear", "karras")
STEP_SIGMA_MIN = 0.15  # floor of the "karras" step grid (§11.1): at K = 4, [2.5, 1.10, 0.44, 0.15]
RENOISE_MODES = ("fresh", "fixed")


def step_sigmas(grid, num_steps: int, init_sigma: float = INIT_SIGMA, sigma_min: float = STEP_SIGMA_MIN) -> list:
    """The K noise levels a K-step generator is applied at, highest first (ALGORITHM.md §11.1): step k (k = 0..K-1)
    maps ``x_k + sigma_k * noise`` to x_{k+1}, and sigma_0 = init_sigma is the one-step generator's input level.

    `grid`: "linear" (the official multistep grid, sigma_k = init_sigma (K - k) / K), "karras" (K levels from
    init_sigma down to `sigma_min`, spaced as Karras Eq. 5 with rho = 7), or an explicit sequence of K levels (or its
    comma-separated text, "2.5,1.0,0.3"), which must start at init_sigma and strictly decrease.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    init_sigma = float(init_sigma)
    if isinstance(grid, str) and grid not in STEP_GRIDS:
        try:
            grid = [float(s) for s in grid.split(",")]
        except ValueError:
            raise ValueError(f"step_sigmas must be {' or '.join(STEP_GRIDS)} or comma-separated noise levels such as "
                             f"'2.5,1.0,0.3', got {grid!r}.") from None
    if grid == "linear":
        return [init_sigma * (num_steps - k) / num_steps for k in range(num_steps)]
    if grid == "karras":
        if not 0 < sigma_min < init_sigma:
            raise ValueError(f"step_sigma_min must lie in (0, init_sigma={init_sigma:g}), got {sigma_min!r}.")
        if num_steps == 1:
            return [init_sigma]
        inner = [float(karras_interpolate(k / (num_steps - 1), sigma_min, init_sigma)) for k in range(1, num_steps - 1)]
        return [init_sigma, *inner, float(sigma_min)]
    return check_step_sigmas(grid, num_steps, init_sigma)


def check_step_sigmas(sigmas, num_steps: int, init_sigma: float) -> list:
    """An explicit grid as floats, or ValueError naming what is wrong with it and the fix."""
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) != num_steps:
        raise ValueError(f"step_sigmas lists {len(sigmas)} noise level(s) but num_steps is {num_steps}; pass "
                         f"--num_steps {len(sigmas)}, or as many levels as steps.")
    if not all(math.isfinite(s) and s > 0 for s in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"step_sigmas must be positive and strictly decreasing, got {sigmas}.")
    if sigmas[0] != float(init_sigma):
        raise ValueError(f"the first step noise level is the generator's input level init_sigma={init_sigma:g}, got "
                         f"{sigmas[0]:g}; start the list at {init_sigma:g} (or pass --init_sigma {sigmas[0]:g}).")
    return sigmas
