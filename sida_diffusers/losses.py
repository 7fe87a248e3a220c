"""SiD / SiDA / SiD²A losses as pure functions of denoiser outputs and noise levels (ALGORITHM.md §4).

Conventions, as in the official code: every per-sample quantity is a SUM over the C*H*W elements (never a mean), the
functions return per-sample terms (or the scalar D loss) for ONE micro-batch of B samples, and the trainer sums them and
divides by the per-process batch over all accumulation rounds, B_tot (§4.5). Every loss takes `keep` (bool ``[B]``) to
drop NaN samples (§4.6). Shapes: images ``[B,C,H,W]``, sigma and
logvar ``[B,1,1,1]``, discriminator logits ``[B,1,h,w]``. ``logvar`` (EDM2, §4.7) is the fake-score net's u(sigma).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sida_diffusers.schedule import RHO, SIGMA_MAX, SIGMA_MIN, karras_interpolate


LOGIT_CLAMP = 10.0                            # the generator's adversarial logits are clamped to +-10 (§4.4)
OMEGA_MIN = 1e-5                              # floor of the SiD normaliser omega (§4.3 step 3)


# ---- noise levels -----------------------------------------------------------------------------------------------------

def lognormal_sigma(n: int, P_mean: float = -1.2, P_std: float = 1.2, device=None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fake-score / discriminator noise levels sigma = exp(P_mean + P_std xi), ``[n,1,1,1]`` (ALGORITHM.md §4.1)."""
    xi = torch.randn([n, 1, 1, 1], device=device, generator=generator)
    return (P_mean + P_std * xi).exp()


def karras_sigma(t: torch.Tensor, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = RHO) -> torch.Tensor:
    """Continuous Karras schedule: t=0 -> sigma_min, t=1 -> sigma_max (ALGORITHM.md §4.3 step 1)."""
    return karras_interpolate(1 - t, sigma_min, sigma_max, rho)


def generator_sigma(n: int, tmax: float = 800, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Generator-loss noise levels: t ~ U(0, tmax/1000) mapped through `karras_sigma`, ``[n,1,1,1]`` (§4.3)."""
    t = torch.rand([n, 1, 1, 1], device=device, generator=generator) * (tmax / 1000)
    return karras_sigma(t)


def edm_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM loss weight w(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (ALGORITHM.md §1.1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def nan_sample_mask(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """Boolean ``[B]``: True for samples with a NaN in any of `tensors` (None skipped), ALGORITHM.md §4.6.

    Pass ``keep=~mask`` to the losses: they then drop those samples (B' = kept count in the batch means) without the
    host-device sync that boolean indexing costs.
    """
    present = [t for t in tensors if t is not None]
    mask = torch.zeros(present[0].shape[0], dtype=torch.bool, device=present[0].device)
    for t in present:
        mask |= t.detach().reshape(t.shape[0], -1).isnan().any(dim=1)
    return mask


def _per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def _zero_dropped(keep: Optional[torch.Tensor], *tensors: Optional[torch.Tensor]):
    """Zero the samples that `keep` drops, so their NaNs reach neither the sums nor the gradients (§4.6)."""
    if keep is None:
        return tensors
    return tuple(None if t is None else torch.where(keep.reshape(-1, *[1] * (t.ndim - 1)), t, torch.zeros_like(t))
                 for t in tensors)


def _kept(keep: Optional[torch.Tensor], per_sample: torch.Tensor) -> torch.Tensor:
    return per_sample if keep is None else per_sample * keep


def _pooled_bce(logits: torch.Tensor, target: float, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """BCE-with-logits averaged over all logits of the kept samples (the B'*h*w mean of §4.2 / §4.4)."""
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    if keep is None:
        return bce.mean()
    return _kept(keep, _per_sample_sum(bce)).sum() / (keep.sum() * logits[0].numel())


def _uncertainty_scale(logvar: Optional[torch.Tensor]) -> torch.Tensor | float:
    return 1.0 if logvar is None else torch.exp(-logvar).reshape(-1)


# ---- fake score and discriminator (psi) --------------------------------------------------------------------------------

def fake_score_loss(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, logvar: Optional[torch.Tensor] = None,
                    sigma_data: float = 0.5, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Denoising loss of the fake score on (augmented) generated images `x`, per sample ``[B]``.

    ALGORITHM.md §4.1: w_i * sum_pix (D_psi - x)^2; EDM2 with logvar (§4.7): w_i e^{-u_i} * sum_pix (.)^2 + CHW u_i.
    `keep` (bool ``[B]``, see `nan_sample_mask`) zeroes the dropped samples' terms.
    """
    x, denoised, logvar = _zero_dropped(keep, x, denoised, logvar)
    w = edm_weight(sigma, sigma_data).reshape(-1)
    sq = _per_sample_sum((denoised - x) ** 2)
    if logvar is None:
        return _kept(keep, w * sq)
    return _kept(keep, w * torch.exp(-logvar).reshape(-1) * sq + x[0].numel() * logvar.reshape(-1))


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, sigma: torch.Tensor,
                       logvar: Optional[torch.Tensor] = None, sigma_data: float = 0.5,
                       keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Discriminator loss of the fake score's encoder, a scalar for the micro-batch.

    ALGORITHM.md §4.2: (sum_i w_i) * (BCE_mean(real, 1) + BCE_mean(fake, 0)) / 2, batch-mean BCE over all logits,
    no clamping; EDM2 with logvar (§4.7): the weights become w_i e^{-u_i} (not detached, so u learns from D too).
    """
    logits_real, logits_fake, logvar = _zero_dropped(keep, logits_real, logits_fake, logvar)
    w = _kept(keep, edm_weight(sigma, sigma_data).reshape(-1) * _uncertainty_scale(logvar))
    return w.sum() * 0.5 * (_pooled_bce(logits_real, 1.0, keep) + _pooled_bce(logits_fake, 0.0, keep))


# ---- generator (theta) -----------------------------------------------------------------------------------------------

@torch.no_grad()
def sid_normalizer(x_gen: torch.Tensor, denoised_teacher: torch.Tensor) -> torch.Tensor:
    """omega_i = max(mean_pix |x_g - f_phi|, 1e-5) in fp32, a detached constant ``[B]`` (ALGORITHM.md §4.3 step 3)."""
    diff = (x_gen.float() - denoised_teacher.float()).abs()
    return diff.reshape(diff.shape[0], -1).mean(dim=1).clamp(min=OMEGA_MIN)


def sid_generator_loss(x_gen: torch.Tensor, denoised_teacher: torch.Tensor, denoised_fake: torch.Tensor,
                       alpha: float = 1.0, logvar: Optional[torch.Tensor] = None,
                       keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SiD generator loss per sample ``[B]``.

    ALGORITHM.md §4.3: (1/omega_i) sum_pix (r - s) * ((r - x_g) - alpha (r - s)) with r = teacher, s = fake score and a
    detached omega; EDM2 with logvar (§4.7): times e^{-u_i}, u with no gradient.
    """
    x_gen, denoised_teacher, denoised_fake, logvar = _zero_dropped(keep, x_gen, denoised_teacher, denoised_fake, logvar)
    r_minus_s = denoised_teacher - denoised_fake
    per_sample = _per_sample_sum(r_minus_s * ((denoised_teacher - x_gen) - alpha * r_minus_s))
    scale = _uncertainty_scale(None if logvar is None else logvar.detach())
    return _kept(keep, per_sample / sid_normalizer(x_gen, denoised_teacher) * scale)


def sida_adversarial_loss(logits_fake: torch.Tensor, x_gen: torch.Tensor, denoised_teacher: torch.Tensor,
                          logvar: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SiDA non-saturating adversarial generator loss per sample ``[B]``.

    ALGORITHM.md §4.4: one BCE(clamp(d, +-10), 1) pooled over the whole micro-batch ("average fakeness per GPU batch"),
    spread onto every element of each sample: C*H*W * BCE / omega_i. EDM2 with logvar (§4.7): times e^{-u_i}.
    """
    logits_fake, x_gen, denoised_teacher, logvar = _zero_dropped(keep, logits_fake, x_gen, denoised_teacher, logvar)
    pooled = _pooled_bce(logits_fake.clamp(-LOGIT_CLAMP, LOGIT_CLAMP), 1.0, keep)
    scale = _uncertainty_scale(None if logvar is None else logvar.detach())
    return _kept(keep, x_gen[0].numel() * pooled / sid_normalizer(x_gen, denoised_teacher) * scale)
