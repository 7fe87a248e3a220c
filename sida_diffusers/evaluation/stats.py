"""Metric math on feature arrays: Gaussian fits, Fréchet distance, precision/recall, IS and KID (ALGORITHM.md §9.1).

Everything here is a pure function of numpy arrays or torch tensors; no network, no weights.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch


def _as_2d(features, name: str = "features") -> np.ndarray:
    x = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [num_samples, feature_dim], got shape {list(x.shape)}; "
                         "flatten per-sample features before calling.")
    return x


def feature_statistics(features, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of ``features [N, D]``, accumulated in chunks like EDM's ``fid.py``.

    Raises for N < 2; warns when N <= D because the covariance is then rank-deficient and any Fréchet distance on it
    is biased (``MetricSuite.validate`` turns this into an error before generation).
    """
    x = _as_2d(features)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}; pass more images.")
    if n <= d:
        warnings.warn(f"{n} samples for {d}-dimensional features: the covariance is rank-deficient (rank <= {n - 1}) "
                      f"and Fréchet distances on it are unreliable; use more than {d} samples.", stacklevel=2)
    total, outer = np.zeros(d), np.zeros((d, d))
    for i in range(0, n, chunk_size):
        c = x[i:i + chunk_size].astype(np.float64)
        total += c.sum(0)
        outer += c.T @ c
    mu = total / n
    sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, max_imag: float = 1e-3) -> float:
    """Fréchet distance ``|mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` between two Gaussians.

    When ``sqrtm(S1 S2)`` is non-finite or inaccurate (near-singular product), retries with ``eps*I`` added to both
    covariances. A small imaginary part from round-off is dropped; a large one (> ``max_imag`` on the diagonal) raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-d vectors of equal length, got {list(mu1.shape)} and {list(mu2.shape)}; "
                         "both statistics must come from the same feature extractor.")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}] to match the means, got {list(sigma1.shape)} and "
                         f"{list(sigma2.shape)}; both statistics must come from the same feature extractor.")

    def sqrt_product(a, b):
        prod = a @ b
        with warnings.catch_warnings():  # scipy's singularity warning: the residual check below decides instead
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm(prod)
        if not np.isfinite(root).all():
            return None
        residual = np.linalg.norm(root @ root - prod) / max(np.linalg.norm(prod), 1e-30)
        return root if residual < 1e-3 else None

    covmean = sqrt_product(sigma1, sigma2)
    if covmean is None:
        offset = eps * np.eye(d)
        covmean = sqrt_product(sigma1 + offset, sigma2 + offset)
        if covmean is None:
            raise ValueError("the product of the covariances has no accurate square root even with an "
                             f"eps={eps} offset; the statistics are degenerate: use more samples or check for NaNs.")
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > max_imag:
            raise ValueError(f"sqrt(S1 S2) has an imaginary diagonal part of {imag:.3g} (> {max_imag}); the "
                             "covariances are ill-conditioned: use more samples.")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _kth_neighbour_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    # Distance to the k-th nearest neighbour inside the set; index k+1 because each point is its own 0-th neighbour.
    return torch.cat([torch.cdist(x[i:i + batch_size], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(x), batch_size)])


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([(torch.cdist(points[i:i + batch_size], centres) <= radii[None]).any(dim=1)
                      for i in range(0, len(points), batch_size)])


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 10000,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls, k=3 as in ALGORITHM.md §9.1.

    Precision: share of fake samples inside some real k-NN ball; recall: share of real samples inside some fake
    k-NN ball. Distances are computed in row batches of ``batch_size`` on ``device`` (default: where the input is).
    """
    real = torch.as_tensor(_as_2d(real_features, "real_features"), dtype=torch.float32, device=device)
    fake = torch.as_tensor(_as_2d(fake_features, "fake_features"), dtype=torch.float32, device=device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in dimension ({real.shape[1]} vs {fake.shape[1]}); "
                         "extract both with the same network.")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(real)} real and "
                         f"{len(fake)} fake.")
    real_radii, fake_radii = (_kth_neighbour_radii(x, k, batch_size) for x in (real, fake))
    precision = _inside_any_ball(fake, real, real_radii, batch_size).float().mean().item()
    recall = _inside_any_ball(real, fake, fake_radii, batch_size).float().mean().item()
    return precision, recall


def inception_score(outputs, splits: int = 10, from_logits: bool = False) -> tuple[float, float]:
    """Inception score ``exp(E_x KL(p(y|x) || p(y)))``: mean and std over ``splits`` consecutive chunks.

    ``outputs [N, classes]`` are class probabilities, or logits with ``from_logits=True``. The official metric uses
    softmax probabilities of the Inception logits *without* the output bias (``InceptionFeatures.class_probs``).
    """
    x = _as_2d(outputs, "outputs").astype(np.float64)
    if from_logits:
        x = scipy.special.softmax(x, axis=1)
    elif (x < 0).any() or not np.allclose(x.sum(1), 1, atol=1e-3):
        raise ValueError("outputs are not probabilities (negative entries or rows not summing to 1); pass "
                         "from_logits=True for logits.")
    n = len(x)
    if n < splits:
        raise ValueError(f"inception score with {splits} splits needs at least {splits} samples, got {n}.")
    scores = []
    for i in range(splits):
        p = x[i * n // splits:(i + 1) * n // splits]
        p_y = p.mean(0, keepdims=True)
        kl = (scipy.special.xlogy(p, p) - scipy.special.xlogy(p, p_y)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(features1, features2, num_subsets: int = 100, max_subset_size: int = 1000,
                              seed: int = 0) -> float:
    """KID: unbiased MMD^2 with the cubic polynomial kernel ``(x.y/d + 1)^3``, averaged over random subsets.

    Subsets of ``min(N1, N2, max_subset_size)`` samples are drawn without replacement from a ``seed``-ed generator,
    so the value is reproducible (Bińkowski et al. 2018; same estimator as clean-fid and StyleGAN's ``kid``).
    """
    x1, x2 = _as_2d(features1, "features1").astype(np.float64), _as_2d(features2, "features2").astype(np.float64)
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"feature dimensions differ ({x1.shape[1]} vs {x2.shape[1]}); extract both with the same "
                         "network.")
    d, m = x1.shape[1], min(len(x1), len(x2), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x1)} and {len(x2)}.")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        a = x1[rng.choice(len(x1), m, replace=False)]
        b = x2[rng.choice(len(x2), m, replace=False)]
        k_aa, k_bb, k_ab = ((u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        total += within - 2 * k_ab.mean()
    return float(total / num_subsets)
