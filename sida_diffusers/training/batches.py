"""Training batches: the infinite, resumable, rank-strided stream over a `TrainingDataset`, and the real micro-batches
the two training phases draw (ALGORITHM.md §5.8).

Pixels come as ``uint8 / 127.5 - 1`` (§1.1), latents encoded stochastically on every use,
``(mean + std * eps) * scale + bias`` (§6.1, §10 item 11); labels one-hot.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from sida_diffusers.data.datasets import TrainingDataset
from sida_diffusers.latents import encode_latents
from sida_diffusers.networks import one_hot


class InfiniteBatchStream:
    """Endless seeded batches for one rank: ``next(stream) -> (x, class_labels)`` on ``device``.

    The global order is a fresh permutation of the dataset per epoch (``seed``, epoch); rank ``r`` takes every
    ``world_size``-th element from offset ``r``, so ranks are disjoint within an epoch, every rank gets full batches,
    and epochs wrap around without dropping anything. ``position`` counts global samples consumed; `state_dict` holds
    it, so a resumed run sees exactly the batches an uninterrupted one would have. ``x`` is float32 pixels in [-1, 1]
    or freshly sampled latents; ``class_labels`` is one-hot ``[B, label_dim]`` (``[B, 0]`` when unlabeled).
    """

    def __init__(self, dataset: TrainingDataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_position: int = 0, device: Union[str, torch.device] = "cpu"):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_position < 0:
            raise ValueError(f"need batch_size >= 1, world_size >= 1, 0 <= rank < world_size and start_position >= 0; "
                             f"got batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"start_position={start_position}.")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, int(batch_size), int(rank), int(world_size)
        self.seed, self.position, self.device = int(seed), int(start_position), torch.device(device)
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep at most the previous epoch
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return self._perms[epoch]

    def indices(self, position: Optional[int] = None) -> np.ndarray:
        """Dataset indices of this rank's batch that starts at global ``position`` (default: the next batch)."""
        position = self.position if position is None else position
        stream = position + self.rank + self.world_size * np.arange(self.batch_size)
        epochs, offsets = np.divmod(stream, len(self.dataset))
        return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        items, labels = self.dataset.get_batch(self.indices())
        x = torch.from_numpy(items).to(self.device)
        if self.dataset.is_latent:
            # eps depends on (seed, rank, position) only, so resumed runs redraw the same latents.
            key = np.random.SeedSequence([self.seed, self.rank, self.position]).generate_state(1)[0]
            x = encode_latents(x, torch.Generator(self.device).manual_seed(int(key)))
        else:
            x = x.to(torch.float32) / 127.5 - 1  # ALGORITHM.md §1.1
        self.position += self.batch_size * self.world_size
        return x, one_hot(torch.from_numpy(labels), self.dataset.label_dim).to(self.device)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])


class RealBatches:
    """The real micro-batches of one process: ``next(images=True) -> (x [B,C,H,W] or None, labels [B,label_dim] or
    None)`` on `device`.

    With a dataset, batches come from its `InfiniteBatchStream`, assembled on the host and copied asynchronously (a
    blocking host-to-device copy would wait for every queued kernel twice per iteration). Without one (data-free
    SiD), x is zeros and labels are drawn uniformly (§5.8).
    """

    def __init__(self, dataset: Optional[TrainingDataset], batch_size: int, img_shape: tuple, label_dim: int,
                 rank: int, world_size: int, seed: int, device: torch.device):
        self.batch_size, self.img_shape, self.label_dim, self.device = batch_size, tuple(img_shape), label_dim, device
        self.stream = None if dataset is None else InfiniteBatchStream(dataset, batch_size, rank=rank,
                                                                       world_size=world_size, seed=seed, device="cpu")

    def next(self, images: bool = True):
        """One micro-batch; ``images=False`` (the generator phase uses only the labels) still consumes the batch but
        returns ``x=None`` without copying it to the device."""
        if self.stream is None:
            x = torch.zeros([self.batch_size, *self.img_shape], device=self.device) if images else None
            labels = None
            if self.label_dim:
                labels = one_hot(torch.randint(self.label_dim, [self.batch_size], device=self.device), self.label_dim)
            return x, labels
        x, labels = next(self.stream)
        return (self._to_device(x) if images else None), (self._to_device(labels) if self.label_dim else None)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return x.to(self.device, torch.float32)
        return x.to(torch.float32).pin_memory().to(self.device, non_blocking=True)  # no wait for queued kernels

    def state_dict(self) -> Optional[dict]:
        return None if self.stream is None else self.stream.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.stream is not None and state is not None:
            self.stream.load_state_dict(state)
