"""SiDA from a Diffusers DDPM teacher on the digits (CPU): the one-step student vs the teacher's own DDIM-50 and EDM
Heun-35 samples (ALGORITHM.md §12).

    OMP_NUM_THREADS=1 python benchmarks/unet2d_digits.py --runs_dir runs/unet2d_digits     # 3 seeds, 2 at a time
    python benchmarks/unet2d_digits.py --kimg 1 --seeds 0 --eval_sets 1 --workers 1          # a quick look

The teacher is the shipped `digits-ddpm` (a UNet2DModel + DDPMScheduler folder trained by
examples/train_ddpm_teacher.py with Diffusers' train_unconditional.py recipe). Each student is a run of the
`digits-ddpm` preset (SiDA, alpha = 1) with its own seed, in a fresh single-thread process. Rows:
  DDIM-50   the teacher sampled by Diffusers' DDIMScheduler, 50 steps (its own Diffusers sampler)
  Heun-35   the teacher sampled by EDM's Heun sampler, 18 steps = 35 NFE, on the converted sigma ladder
  SiDA      the final EMA generator of each run, 1 step
Every image is generated through the pipelines' one generation path (`generate_uint8`): sample i of evaluation set r
uses seed r*1797 + i, exactly as the trainer's in-training evaluation (set 0) and `sida-eval` draw them. FD-digits
against all 1,797 real digits (not FID); mean +- sample std over evaluation sets (teacher rows) and over distillation
seeds x evaluation sets (students). The teacher's set-0 figures are handed to every run's summary, so each run reports
the paired comparison without sampling the teacher again. Writes unet2d_digits.json and unet2d_digits.md into
--out_dir. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from digits_table import NUM_DIGITS, digits_suite, evaluate_sets


TEACHER = "digits-ddpm"
PRESET = "digits-ddpm"


def _train(args) -> dict:
    seed, kimg, out = args
    torch.set_num_threads(1)
    from sida_diffusers.training import SiDATrainer, make_config

    t0 = time.time()
    overrides = dict(seed=seed, output_dir=str(out), eval_num_samples=NUM_DIGITS)
    if kimg is not None:
        overrides.update(max_train_kimg=kimg, checkpointing_kimg=kimg)
    SiDATrainer(make_config(PRESET, **overrides)).train()
    return {"seed": seed, "run": str(out), "wall_s": time.time() - t0}


def teacher_rows(suite, sets: int) -> tuple[dict, list]:
    """``({row: values over sets}, [summary entries of set 0])`` for the teacher's DDIM-50 and Heun-35 samplers."""
    from sida_diffusers.pretrained import load_denoiser
    from sida_diffusers.training.summary import teacher_cache_key, teacher_samplers

    teacher = load_denoiser(TEACHER)
    rows, entries = {}, []
    for sampler in teacher_samplers(teacher, "DDIMScheduler", 50):
        t0 = time.time()
        values = evaluate_sets(suite, sampler.make_pipeline(teacher), None, sets)  # DDIM: its 50 steps by default
        rows[sampler.sampler] = {"label": sampler.label, "nfe": sampler.nfe, "values": values,
                                 "wall_s": time.time() - t0}
        entries.append({**teacher_cache_key(TEACHER, NUM_DIGITS, sampler.sampler), "label": sampler.label,
                        "num_steps": sampler.num_steps, "nfe": sampler.nfe,
                        "metrics": {f"fd_digits_{NUM_DIGITS}": values[0]}})
    return rows, entries


def stats(values) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def markdown(result: dict) -> str:
    lines = ["| Generator | NFE | FD-digits ↓ (mean ± std) | n |", "|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {row['label']} | {row['nfe']} | {row['mean']:.2f} ± {row['std']:.2f} | {row['n']} |")
    per_seed = ", ".join(f"seed {r['seed']}: {r['final_set0']:.2f}" for r in result["runs"])
    lines += ["", f"Students, set 0 (the runs' own final evaluation): {per_seed}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs_dir", type=Path, default=Path("runs/unet2d_digits"))
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kimg", type=float, default=None, help="training length (default: the preset's)")
    parser.add_argument("--eval_sets", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="distillation runs at a time (one thread each)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()

    suite, _ = digits_suite()
    teacher, entries = teacher_rows(suite, args.eval_sets)
    runs = [args.runs_dir / f"sida-seed{seed}" for seed in args.seeds]
    for run in runs:  # each run's summary reuses the teacher's set-0 figures (same seeds, samplers and samples)
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({"teacher_eval": entries[0], "teacher_evals": entries}))
    jobs = [(seed, args.kimg, run) for seed, run in zip(args.seeds, runs)]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        done = pool.map(_train, jobs)

    from sida_diffusers.pipelines import SiDAPipeline

    students = []
    for job in done:
        pipe = SiDAPipeline.from_pretrained(Path(job["run"]) / "pipeline")
        job["values"] = evaluate_sets(suite, pipe, None, args.eval_sets)
        summary = json.loads((Path(job["run"]) / "summary.json").read_text())
        job["final_set0"] = summary["fd_digits_student"]
        job["best"] = summary.get("best")
        students += job["values"]
    rows = {name: {**stats(row["values"]), "label": f"Teacher, {row['label']}", "nfe": row["nfe"],
                   "wall_s": row["wall_s"]} for name, row in teacher.items()}
    rows["sida"] = {**stats(students), "label": "SiDA, alpha=1 (1 step)", "nfe": 1}
    result = {"teacher": TEACHER, "preset": PRESET, "kimg": args.kimg, "seeds": args.seeds, "eval_sets": args.eval_sets,
              "rows": rows, "runs": done, "wall_s": time.time() - start,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}, {args.workers} run(s) at a time, 1 thread each"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "unet2d_digits.json").write_text(json.dumps(result, indent=2))
    (args.out_dir / "unet2d_digits.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
