"""scikit-learn's 1,797 digits as training data: the offline real data of the default run, loaded through the same
`datasets` path as CIFAR-10 (`data.datasets.build_dataset("digits")`), and the held-out split of the FD-digits
classifier. The shipped teacher and the FD-digits metric live in `sida_diffusers.digits`.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch


DIGITS_RESOLUTION = 16  # scikit-learn's 8x8 digits are upsampled to this by default


def load_digits_dataset(resolution: int = DIGITS_RESOLUTION):
    """scikit-learn's 1,797 digits as a ``datasets.Dataset``: grey PIL ``image`` (R x R) and ``ClassLabel`` ``label``.

    Values 0..16 are mapped to 0..255 and upsampled from 8x8 with PIL bicubic; the result is deterministic.
    """
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = [PIL.Image.fromarray(p, mode="L").resize((resolution, resolution), PIL.Image.BICUBIC) for p in pixels]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.astype(np.int64)}, features=features)


def load_digits_tensors(resolution: int = DIGITS_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``(images, labels)``: uint8 ``[1797, 1, R, R]`` in [0,255], int64 ``[1797]``, dataset order."""
    ds = load_digits_dataset(resolution=resolution)
    images = np.stack([np.asarray(im.convert("L"), dtype=np.uint8) for im in ds["image"]])
    return torch.from_numpy(images)[:, None], torch.as_tensor(ds["label"], dtype=torch.long)


def digits_holdout_split(labels, holdout: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified ``(train_idx, heldout_idx)`` (sorted int64) the FD-digits classifier is trained and tested on."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout}.")
    train_idx, heldout_idx = train_test_split(np.arange(len(labels)), test_size=holdout, stratify=labels,
                                              random_state=seed)
    return torch.as_tensor(np.sort(train_idx)), torch.as_tensor(np.sort(heldout_idx))
