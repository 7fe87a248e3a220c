"""What few-step training (ALGORITHM.md §11) adds around the loop: the step grid of a config, the step count k* of an
iteration, and the per-k throughput and memory of a tick.

The generation itself is the pipelines' `few_step_generate`, called from `SiDATrainer.generate`, so the trainer and
`SiDAPipeline` run the very same steps.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch

from sida_diffusers.pipelines.few_step import few_step_generate  # noqa: F401  (the trainer's sampler, §11.1)
from sida_diffusers.schedule import step_sigmas
from sida_diffusers.training.config import TrainConfig


# Mixed into the seed of the k* draw so that it can never coincide with a stream seeded by the run seed alone.
_STEP_DRAW_SALT = 0x5E_11  # "§11"


def config_step_sigmas(cfg: TrainConfig) -> list:
    """The K noise levels of the run (§11.1); raises ValueError with the fix for a bad --step_sigmas."""
    return step_sigmas(cfg.step_sigmas, cfg.num_steps, cfg.init_sigma, cfg.step_sigma_min)


def check_config(cfg: TrainConfig) -> list:
    """Every few-step flag, before anything is built; returns the step grid."""
    if cfg.num_steps < 1:
        raise ValueError(f"--num_steps must be >= 1 (1 = the one-step generator), got {cfg.num_steps}.")
    sigmas = config_step_sigmas(cfg)
    if cfg.best_steps is not None and not 1 <= cfg.best_steps <= cfg.num_steps:
        raise ValueError(f"--best_steps must lie in 1..--num_steps ({cfg.num_steps}), got {cfg.best_steps}.")
    return sigmas


def record_fields(cfg: TrainConfig) -> dict:
    """The few-step fields of the run's `RunRecord` (None for a one-step generator) and its `sampling` entry: how the
    recorded metrics were sampled (`evaluated_steps`: the step counts of the metric names, §11.4)."""
    few = cfg.num_steps > 1
    return {"num_steps": cfg.num_steps if few else None, "step_sigmas": config_step_sigmas(cfg) if few else None,
            "renoise": cfg.renoise if few else None, "step_sampling": cfg.step_sampling if few else None,
            "sampling": {"init_sigma": cfg.init_sigma, "num_steps": cfg.num_steps,
                         "evaluated_steps": list(evaluation_steps(cfg)), "num_samples": cfg.eval_num_samples}}


def evaluation_steps(cfg: TrainConfig) -> tuple:
    """The step counts each evaluation scores: 1 and K (and --best_steps), ascending."""
    return tuple(sorted({1, cfg.num_steps, best_steps(cfg)}))


def best_steps(cfg: TrainConfig) -> int:
    """The step count best_pipeline/ is selected on: --best_steps, else K."""
    return cfg.best_steps if cfg.best_steps is not None else cfg.num_steps


def draw_num_steps(seed: int, cur_nimg: int, num_steps: int, step_sampling: str) -> int:
    """k*, the steps whose output this iteration trains (§11.2): K for `all`; for `uniform`, uniform on 1..K from a
    generator of its own seeded with (run seed, cur_nimg). So every process draws the same k* (same run seed, same
    cur_nimg), a resumed run draws the same k* again, and no global RNG stream is touched."""
    if num_steps == 1 or step_sampling == "all":
        return num_steps
    return int(np.random.default_rng([_STEP_DRAW_SALT, int(seed), int(cur_nimg)]).integers(1, num_steps + 1))


class StepTally:
    """The iterations of a tick by k*: how many drew each k, their training seconds per kimg and (CUDA) peak memory.

    Only for K > 1 (`enabled`); on CUDA each iteration is then synchronised at its end, so that its time is its own.
    """

    def __init__(self, num_steps: int, device: torch.device):
        self.enabled = num_steps > 1
        self.cuda = device.type == "cuda"
        self.device = device
        self.rows: dict = {}

    @contextlib.contextmanager
    def iteration(self, steps: Callable[[], int], nimg: int):
        """Times the iteration run inside the block; `steps()` gives its k* once it has run."""
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.time()
        yield
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds, k = time.time() - start, steps()
        count, total, images, peak = self.rows.get(k, (0, 0.0, 0, 0.0))
        memory = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.cuda else 0.0
        self.rows[k] = (count + 1, total + seconds, images + nimg, max(peak, memory))

    def pop(self) -> dict:
        """`steps_k{k}` (iterations that drew k), `sec_per_kimg_k{k}` and, on CUDA, `peak_memory_gb_k{k}` of the
        tick, then start a new tick."""
        stats = {}
        for k, (count, seconds, images, peak) in sorted(self.rows.items()):
            stats[f"steps_k{k}"] = count
            stats[f"sec_per_kimg_k{k}"] = seconds / (images / 1000)
            if self.cuda:
                stats[f"peak_memory_gb_k{k}"] = peak
        if self.cuda and self.rows:  # the peaks were reset every iteration: the tick's peak is the largest of them
            stats["peak_memory_gb"] = max(row[3] for row in self.rows.values())
        self.rows = {}
        return stats
