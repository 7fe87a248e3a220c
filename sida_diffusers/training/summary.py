"""The end-of-run report: where everything was written, and the one-step student against its multi-step teacher.

`write_run_summary(trainer)` runs once at the end of `SiDATrainer.train()` (main process). When the run evaluated
FD-digits (the embedded digits default), it also evaluates the teacher with EDM's Heun sampler (18 steps = 35 NFE,
the "cifar10" preset) on exactly the noise seeds and class labels the student's evaluation used, so the two numbers
are a paired comparison (the paper's headline: a one-step student that matches or beats its teacher). The teacher
value is computed once per run and reused from `summary.json` when a resumed run finishes again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from sida_diffusers.evaluation import plot_metric_curve
from sida_diffusers.latents import pixels_to_uint8
from sida_diffusers.pipelines import seed_noise
from sida_diffusers.pipelines.edm_sampler import HEUN_PRESETS, edm_sampler, heun_nfe

SUMMARY_FILE = "summary.json"
TEACHER_SAMPLER = "cifar10"  # 18 Heun steps, 35 NFE, deterministic (EDM's CIFAR-10 setting)
METRIC_LABEL = "FD-digits"  # a Frechet distance in the digits classifier's features, never FID


def eval_labels(teacher, labels_pool: Optional[torch.Tensor], start: int, count: int, device) -> Optional[torch.Tensor]:
    """One-hot labels of evaluation samples ``start .. start+count-1``: dataset labels at indices drawn from a generator
    seeded with `start` (uniform classes without data), as `SiDATrainer.evaluate` draws them (ALGORITHM.md §9.1)."""
    if not teacher.is_conditional:
        return None
    g = torch.Generator().manual_seed(start)
    idx = (labels_pool[torch.randint(len(labels_pool), [count], generator=g)] if labels_pool is not None
           else torch.randint(teacher.label_dim, [count], generator=g))
    return torch.eye(teacher.label_dim, device=device)[idx.to(device)]


def heun_sample_fn(teacher, labels_pool: Optional[torch.Tensor], device, first_seed: int = 0,
                   preset: str = TEACHER_SAMPLER) -> Callable:
    """``sample_fn(start, count) -> uint8 images`` of the teacher's Heun sampler; sample ``i`` uses noise seed
    ``first_seed + i`` and the labels of `eval_labels`, the pairing of the student's evaluation."""
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)

    @torch.no_grad()
    def sample_fn(start: int, count: int) -> torch.Tensor:
        s = first_seed + start
        z = seed_noise(range(s, s + count), shape)
        labels = eval_labels(teacher, labels_pool, s, count, device)
        return pixels_to_uint8(edm_sampler(teacher, z.to(device), labels, **HEUN_PRESETS[preset]))

    return sample_fn


def evaluation_label_pool(trainer) -> Optional[torch.Tensor]:
    """The class labels evaluation draws from: the training set's (ALGORITHM.md §9.1), None when unconditional."""
    ds = trainer.dataset
    return torch.from_numpy(ds.labels) if trainer.teacher.is_conditional and ds is not None else None


def teacher_metrics(trainer) -> dict:
    """The run's evaluation metrics for the teacher (Heun, 35 NFE) on the student's evaluation seeds and labels."""
    sample_fn = heun_sample_fn(trainer.teacher, evaluation_label_pool(trainer), trainer.device)
    return trainer.suite.evaluate(sample_fn)


def _cached_teacher(path: Path, key: dict) -> Optional[dict]:
    if not path.is_file():
        return None
    old = json.loads(path.read_text()).get("teacher_eval") or {}
    return old.get("metrics") if {k: old.get(k) for k in key} == key else None


def write_run_summary(trainer) -> Optional[dict]:
    """Write ``summary.json`` (and the FD-digits curve) into the run's output dir, print where everything is, and
    return the summary. Only the main process writes; other processes return None."""
    if not trainer.accelerator.is_main_process:
        return None
    cfg, out = trainer.cfg, trainer.output_dir
    student = dict(trainer._last_metrics)
    key = next((k for k in student if k.startswith("fd_digits_")), None)
    teacher = None
    if key is not None and trainer.suite is not None:
        cache_key = {"teacher": cfg.teacher, "sampler": TEACHER_SAMPLER, "num_samples": cfg.eval_num_samples,
                     "first_seed": 0}
        teacher = _cached_teacher(out / SUMMARY_FILE, cache_key) or teacher_metrics(trainer)
    curve = None
    if key is not None and (out / "metrics.jsonl").is_file():
        nfe = heun_nfe(HEUN_PRESETS[TEACHER_SAMPLER]["num_steps"])
        baseline = {key: (teacher[key], f"teacher (Heun, {nfe} NFE)")} if teacher else None
        curve = plot_metric_curve(out / "metrics.jsonl", out / "metric_curve.png", baselines=baseline)
    pipeline = out / "pipeline"
    grid = pipeline / "samples_grid.png"
    summary = {
        "output_dir": str(out), "pipeline": str(pipeline), "best_pipeline": str(out / "best_pipeline")
        if (out / "best_pipeline").is_dir() else None, "sample_grid": str(grid) if grid.is_file() else None,
        "fd_curve": str(curve) if curve else None, "metrics_jsonl": str(out / "metrics.jsonl")
        if (out / "metrics.jsonl").is_file() else None, "loss_curves": str(out / "loss_curves.png"),
        "method": cfg.method, "alpha": cfg.alpha, "teacher": cfg.teacher, "kimg": trainer.cur_nimg / 1000,
        "metric": METRIC_LABEL if key else None, "metric_key": key,
        "student": {"num_steps": 1, "metrics": student},
        "best": None if trainer.tracker is None else trainer.tracker.state_dict(),
        "teacher_eval": None if teacher is None else {
            "teacher": cfg.teacher, "sampler": TEACHER_SAMPLER, "num_steps": HEUN_PRESETS[TEACHER_SAMPLER]["num_steps"],
            "nfe": heun_nfe(HEUN_PRESETS[TEACHER_SAMPLER]["num_steps"]), "num_samples": cfg.eval_num_samples,
            "first_seed": 0, "metrics": teacher},
        "fd_digits_student": student.get(key) if key else None,
        "fd_digits_teacher": teacher.get(key) if teacher and key else None,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    """The printed end-of-run block."""
    lines = ["", "=" * 72, f"{summary['method']} run finished at {summary['kimg']:g} kimg", "=" * 72,
             f"pipeline      {summary['pipeline']}   (SiDAPipeline.from_pretrained(...))"]
    best = summary.get("best") or {}
    if summary.get("best_pipeline"):
        name = METRIC_LABEL if str(best.get("metric")).startswith("fd_digits_") else best.get("metric")
        note = f"   ({name} {best['best']:.3f} at {best['best_kimg']:g} kimg)" if best.get("best") is not None else ""
        lines.append(f"best pipeline {summary['best_pipeline']}{note}")
    for name, label in (("sample_grid", "sample grid"), ("fd_curve", "metric curve"), ("metrics_jsonl", "metrics")):
        if summary.get(name):
            lines.append(f"{label:<14}{summary[name]}")
    if summary["fd_digits_student"] is not None:
        n = summary["metric_key"].rsplit("_", 1)[1]
        lines.append(f"FD-digits     student, 1 step:           {summary['fd_digits_student']:.3f}   ({n} samples)")
        if summary["fd_digits_teacher"] is not None:
            t = summary["teacher_eval"]
            lines.append(f"FD-digits     teacher, Heun {t['nfe']} NFE:      {summary['fd_digits_teacher']:.3f}   "
                         f"(same {n} seeds and labels)")
    lines += [f"summary       {Path(summary['output_dir']) / SUMMARY_FILE}", "=" * 72]
    return "\n".join(lines)
