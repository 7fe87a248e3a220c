"""The end-of-run report: where everything was written, and the one-step student against its multi-step teacher.

When the run evaluated FD-digits (the embedded digits default), `teacher_baseline` evaluates the teacher with each of
its `teacher_samplers` through their pipelines' `generate_uint8`, on exactly the seeds and per-seed labels of the
student's evaluation, so the numbers are paired comparisons (the paper's headline: a one-step student that matches or
beats its teacher). Every teacher gets EDM's Heun sampler (18 steps = 35 NFE, the "cifar10" preset); a Diffusers
UNet2DModel teacher also gets its own Diffusers sampler, e.g. DDIM with 50 steps (ALGORITHM.md §12.5). Each teacher
value is computed once per run and reused from `summary.json` when a resumed run finishes again.
`write_run_summary` takes everything it reports as arguments.
"""

from __future__ import annotations

import functools
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from sida_diffusers.digits import FD_DIGITS
from sida_diffusers.evaluation import parse_result_key, pipeline_sample_fn, plot_curves, step_result_key
from sida_diffusers.pipelines import EDMHeunPipeline
from sida_diffusers.pipelines.edm_sampler import HEUN_PRESETS, heun_nfe
from sida_diffusers.run_record import RunRecord
from sida_diffusers.safe_io.files import read_json


SUMMARY_FILE = "summary.json"
TEACHER_SAMPLER = "cifar10"  # 18 Heun steps, 35 NFE, deterministic (EDM's CIFAR-10 setting)
METRIC_LABEL = "FD-digits"  # a Frechet distance in the digits classifier's features, never FID
TEACHER_NFE = heun_nfe(HEUN_PRESETS[TEACHER_SAMPLER]["num_steps"])


def _is_fd_digits(key) -> bool:
    try:
        return parse_result_key(str(key))[0] == FD_DIGITS
    except ValueError:
        return False


def fd_digits_key(metrics: dict) -> Optional[str]:
    """The FD-digits result name among `metrics` (e.g. ``fd_digits_1797``), None when FD-digits was not evaluated."""
    return next((k for k in metrics if _is_fd_digits(k)), None)


def evaluates_teacher(metrics) -> bool:
    """Whether a run evaluating `metrics` also evaluates its teacher (`teacher_baseline`: FD-digits runs)."""
    return FD_DIGITS in metrics


def teacher_pipeline(teacher) -> EDMHeunPipeline:
    """The teacher's 35-NFE Heun sampler as a pipeline (progress bar off)."""
    pipe = EDMHeunPipeline(unet=teacher, preset=TEACHER_SAMPLER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class TeacherSampler:
    """One multi-step sampler of the teacher's baseline: its cache name, printed label, NFE and pipeline."""

    sampler: str                 # the name summary.json records it under, e.g. "cifar10" (Heun) or "DDIMScheduler-50"
    label: str                   # e.g. "Heun 35 NFE", "DDIM 50 steps"
    nfe: int
    num_steps: int
    make_pipeline: Callable      # teacher -> pipeline with generate_uint8
    call_kwargs: dict = field(default_factory=dict)


HEUN_SAMPLER = TeacherSampler(TEACHER_SAMPLER, f"Heun {TEACHER_NFE} NFE", TEACHER_NFE,
                              HEUN_PRESETS[TEACHER_SAMPLER]["num_steps"], teacher_pipeline)


def teacher_samplers(teacher, scheduler: Optional[str] = None, num_inference_steps: int = 50) -> list:
    """The samplers of the teacher's baseline: EDM Heun (35 NFE) for every teacher, on the teacher's own sigma range;
    for a Diffusers UNet2DModel teacher also Diffusers scheduler `scheduler` (default DDIMScheduler) with
    `num_inference_steps` steps over its own schedule (ALGORITHM.md §12.5)."""
    if teacher.family != "vp-discrete":
        return [HEUN_SAMPLER]
    from sida_diffusers.pipelines.scheduler_sampler import SchedulerSamplerPipeline, scheduler_for

    name = scheduler or "DDIMScheduler"
    scheduler_for(teacher, name)  # an unknown name fails now, not at the end of the run

    def make_pipeline(net):
        pipe = SchedulerSamplerPipeline(unet=net, scheduler=scheduler_for(net, name))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    steps = int(num_inference_steps)
    nfe = 2 * steps - 1 if name in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler") else steps
    label = f"{name.removesuffix('Scheduler')} {steps} steps"
    return [HEUN_SAMPLER, TeacherSampler(f"{name}-{steps}", label, nfe, steps, make_pipeline,
                                         {"num_inference_steps": steps})]


def teacher_cache_key(teacher_name: str, num_samples: int, sampler: str = TEACHER_SAMPLER) -> dict:
    return {"teacher": teacher_name, "sampler": sampler, "num_samples": num_samples, "first_seed": 0,
            "labels": "per-seed"}


def teacher_baseline(output_dir: Path, teacher_name: str, suite, teacher, label_pool,
                     samplers: Optional[list] = None) -> Optional[list]:
    """The suite's metrics of the teacher with each of `samplers` (default: Heun, 35 NFE) on the student's evaluation
    seeds and labels: one summary entry per sampler (its cache key, label, steps, NFE and metrics), or None when the
    run evaluated no FD-digits. An entry of `output_dir/summary.json` for the same evaluation is reused."""
    if suite is None or not evaluates_teacher(suite.metrics):
        return None
    path = Path(output_dir) / SUMMARY_FILE
    cached = []
    if path.is_file():
        old = read_json(path)
        cached = [e for e in [old.get("teacher_eval"), *(old.get("teacher_evals") or [])] if isinstance(e, dict)]
    entries = []
    for s in samplers or [HEUN_SAMPLER]:
        key = teacher_cache_key(teacher_name, suite.num_samples, s.sampler)
        metrics = next((e["metrics"] for e in cached if {k: e.get(k) for k in key} == key and e.get("metrics")), None)
        if metrics is None:
            metrics = suite.evaluate(pipeline_sample_fn(s.make_pipeline(teacher), 0, label_pool, **s.call_kwargs))
        entries.append({**key, "label": s.label, "num_steps": s.num_steps, "nfe": s.nfe, "metrics": metrics})
    return entries


def start_teacher_baseline(output_dir: Path, teacher_name: str, suite, teacher, label_pool,
                           background: bool, samplers: Optional[list] = None) -> Callable[[], Optional[list]]:
    """`teacher_baseline`, to be collected by calling the returned function. With `background`, it runs on a thread
    started with the training: it depends on nothing the training changes (a frozen teacher, fixed seeds and labels,
    per-seed generators that leave the global RNG alone), and on a CPU the multi-step teacher then uses the core a
    one-step step of a tiny network leaves idle. Otherwise it is computed when called (GPU runs, compiled networks)."""
    compute = functools.partial(teacher_baseline, output_dir, teacher_name, suite, teacher, label_pool, samplers)
    if not background:
        return compute
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-baseline")
    future = executor.submit(compute)
    executor.shutdown(wait=False)
    return future.result


def write_run_summary(output_dir: Path, record: RunRecord, best: Optional[dict],
                      teacher_evals: Optional[list] = None) -> dict:
    """Write ``summary.json`` (and the metric curve with the teacher's Heun line) into `output_dir` from the run's final
    record (the student's metrics, the teacher's Heun baseline) and `teacher_baseline`'s entries of every teacher
    sampler (Heun first), print where everything is, and return the summary. A few-step generator (record.num_steps
    K > 1) is reported with 1 and with K steps (its metrics hold both, named by `evaluation.step_result_key`)."""
    out = Path(output_dir)
    student_metrics, teacher_metrics = record.metrics, record.teacher_metrics
    key = fd_digits_key(student_metrics)
    num_steps = record.num_steps or 1
    steps = sorted({1, num_steps})
    by_steps = {k: student_metrics.get(step_result_key(key, k)) for k in steps} if key else {}
    curve = None
    if key is not None and (out / "metrics.jsonl").is_file():
        label = f"teacher (Heun, {TEACHER_NFE} NFE)"
        baseline = {step_result_key(key, k): (teacher_metrics[key], label) for k in steps} if teacher_metrics else None
        curve = plot_curves(out / "metrics.jsonl", out / "metric_curve.png", baselines=baseline)
    pipeline = out / "pipeline"
    grid = pipeline / "samples_grid.png"
    summary = {
        "output_dir": str(out), "pipeline": str(pipeline), "best_pipeline": str(out / "best_pipeline")
        if (out / "best_pipeline").is_dir() else None, "sample_grid": str(grid) if grid.is_file() else None,
        "fd_curve": str(curve) if curve else None, "metrics_jsonl": str(out / "metrics.jsonl")
        if (out / "metrics.jsonl").is_file() else None, "loss_curves": str(out / "loss_curves.png"),
        "method": record.method, "alpha": record.alpha, "teacher": record.teacher, "kimg": record.kimg,
        "metric": METRIC_LABEL if key else None, "metric_key": key,
        "student": {"num_steps": num_steps, "metrics": dict(student_metrics)},
        "best": best,
        "teacher_eval": teacher_evals[0] if teacher_evals else None if teacher_metrics is None else {
            **teacher_cache_key(record.teacher, record.num_samples), "num_steps": HEUN_PRESETS[TEACHER_SAMPLER]["num_steps"],
            "nfe": TEACHER_NFE, "metrics": teacher_metrics},
        "teacher_evals": list(teacher_evals or []),  # every sampler of the baseline (§12.5), Heun first
        "fd_digits_student": student_metrics.get(key) if key else None,
        "fd_digits_student_by_steps": {str(k): v for k, v in by_steps.items()} if num_steps > 1 else None,
        "fd_digits_teacher": teacher_metrics.get(key) if teacher_metrics and key else None,
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
        name = METRIC_LABEL if _is_fd_digits(best.get("metric")) else best.get("metric")
        note = f"   ({name} {best['best']:.3f} at {best['best_kimg']:g} kimg)" if best.get("best") is not None else ""
        lines.append(f"best pipeline {summary['best_pipeline']}{note}")
    for name, label in (("sample_grid", "sample grid"), ("fd_curve", "metric curve"), ("metrics_jsonl", "metrics")):
        if summary.get(name):
            lines.append(f"{label:<14}{summary[name]}")
    if summary["fd_digits_student"] is not None:
        n = parse_result_key(summary["metric_key"])[1]
        lines.append(f"FD-digits     student, 1 step:           {summary['fd_digits_student']:.3f}   ({n} samples)")
        for k, value in (summary.get("fd_digits_student_by_steps") or {}).items():
            if k != "1" and value is not None:
                lines.append(f"FD-digits     student, {k} steps:{' ' * (11 - len(k))}{value:.3f}   (same seeds, "
                             "trained step grid)")
        for t in summary.get("teacher_evals") or ([summary["teacher_eval"]] if summary["teacher_eval"] else []):
            value = t["metrics"].get(summary["metric_key"])
            if value is not None:
                label = t.get("label") or f"Heun {t['nfe']} NFE"
                lines.append(f"FD-digits     teacher, {label + ':':<17} {value:.3f}   (same {n} seeds and labels)")
    lines += [f"summary       {Path(summary['output_dir']) / SUMMARY_FILE}", "=" * 72]
    return "\n".join(lines)


def push_pipeline(folder: Path, repo_id: str, token: Optional[str]) -> Optional[str]:
    """Push the exported pipeline at the end of a run. A push that fails keeps the local folder and returns (and
    prints) one line saying how to push it later, instead of ending hours of training with a traceback."""
    from sida_diffusers.hub import push_later_hint, push_to_hub

    try:
        commit = push_to_hub(folder, repo_id, token=token)
    except Exception as error:  # network libraries raise their own classes; each means the same here
        line = (f"train_sida: error: pushing to {repo_id} failed ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:200]}); {push_later_hint(folder, repo_id)}")
        print(line, file=sys.stderr)
        return line
    print(f"pushed {folder} to {getattr(commit, 'commit_url', None) or repo_id}")
    return None
