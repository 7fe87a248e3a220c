"""Noise-level constants and the Karras schedule, shared by the losses, the teacher's sampler and the generator.

Defined once here so that the generator losses (ALGORITHM.md §4.3), EDM's Heun sampler and the one-step generator's
input noise (§2) can never drift apart.
"""

from __future__ import annotations


SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # Karras et al. 2022, Eq. 5 (EDM's sampler; SiD's generator losses)
SIGMA_DATA = 0.5                              # standard deviation of the data, EDM and EDM2 (ALGORITHM.md §1.1)
INIT_SIGMA = 2.5                              # sigma_init of the one-step generator, z = sigma_init * eps (§2)


def karras_interpolate(u, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """sigma at the fraction `u` (a tensor) of the way from sigma_max (u=0) to sigma_min (u=1), Karras Eq. 5."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho
