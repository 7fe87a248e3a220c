"""Few-step generators on the digits default (ALGORITHM.md §11): SiDA with K = 1, 2, 4, each sampled with 1, 2 and 4
steps where defined, against the teacher's 35-NFE Heun sampler on the same seeds and labels (CPU).

    OMP_NUM_THREADS=1 python benchmarks/few_step_table.py --set step_sigmas=karras           # the table, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/few_step_table.py --all_vs_uniform 0 --set ...        # `all` vs `uniform`, K=4
    OMP_NUM_THREADS=1 python benchmarks/few_step_table.py --ks 1 --reuse ...      # rows ahead; --reuse keeps them
    python benchmarks/few_step_table.py --replot                      # figure and markdown from few_step_table.json
    python benchmarks/few_step_table.py --ks 1 2 --seeds 0 --eval_sets 1 --kimg 1 --workers 1  # a quick look

Every run is the `digits` preset (SiDA, alpha 1) with `num_steps=K` and the `--set` overrides for K > 1 (the few-step
settings; K = 1 is the preset as it is). Each run evaluates its EMA generator every `--eval_every_kimg` with 1 and K
steps (the curves, evaluation set 0); its exported pipeline is then scored on `--eval_sets` evaluation seed sets of
1,797 samples with every step count in {1, 2, 4} up to its K. Seeds and labels are those of `digits_table.py` (sample i
of set r: seed r*1797 + i, its label drawn from the dataset's labels), so the teacher line is the same.

Writes few_step_table.json (rows.{teacher,k1,k2,k4}.{mean,std,values,nfe}: k2 and k4 sampled with their own K; every
(K, steps) pair under by_steps; training images and wall time per row; the curves; the machine), few_step_table.md
and few_step_curves.png into --out_dir; `--all_vs_uniform SEED` writes few_step_all_vs_uniform.json. A benchmark,
not a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_search import parse_overrides  # noqa: E402
from digits_table import NUM_DIGITS, digits_suite, prepare_run_dirs, teacher_values  # noqa: E402


STEP_COUNTS = (1, 2, 4)
KEY = f"fd_digits_{NUM_DIGITS}"


def settings_for(k: int, pairs) -> dict:
    """The `--set` overrides of a K-step row: every `FIELD=VALUE`, and `kK:FIELD=VALUE` for this K only (K = 1 is the
    preset as it is)."""
    if k == 1:
        return {}
    mine = [p.split(":", 1)[1] for p in pairs if p.startswith(f"k{k}:")]
    return parse_overrides([p for p in pairs if not p.startswith("k") or ":" not in p.split("=")[0]] + mine)


def _describe(task) -> dict:
    k, seed, kimg, eval_every, out, overrides = task
    return {"k": k, "seed": seed, "kimg": kimg, "eval_every": eval_every, "overrides": dict(overrides)}


def finished(task) -> bool:
    """A run of exactly this task already finished in its folder (`--reuse`): its job.json says so."""
    job = Path(task[4]) / "job.json"
    return job.is_file() and {k: v for k, v in json.loads(job.read_text()).items() if k in _describe(task)} == \
        _describe(task) and (Path(task[4]) / "pipeline" / "model_index.json").is_file()


def _train(task) -> dict:
    """One distillation run in a fresh single-thread process; returns where it went and how long it took."""
    k, seed, kimg, eval_every, out, overrides = task
    if finished(task):
        return json.loads((Path(out) / "job.json").read_text())
    torch.set_num_threads(1)
    from sida_diffusers.training import SiDATrainer, make_config

    settings = _describe(task)["overrides"]
    cfg = make_config("digits", method="sida", seed=seed, num_steps=k, max_train_kimg=kimg, output_dir=str(out),
                      eval_every_kimg=eval_every, log_every_kimg=eval_every, checkpointing_kimg=kimg,
                      eval_num_samples=NUM_DIGITS, **settings)
    start = time.time()
    SiDATrainer(cfg).train()
    job = {**_describe(task), "run": str(out), "wall_s": time.time() - start, "step_sampling": cfg.step_sampling}
    (Path(out) / "job.json").write_text(json.dumps(job))
    return job


def run_all(tasks: list, workers: int) -> list:
    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        return pool.map(_train, tasks, chunksize=1)


def score_runs(jobs: list, suite, label_pool, sets: int) -> dict:
    """``{K: {steps: [values over seeds x evaluation sets]}}`` of each run's exported (final EMA) pipeline."""
    from sida_diffusers.pipelines import SiDAPipeline

    values = {}
    for job in jobs:
        pipe = SiDAPipeline.from_pretrained(Path(job["run"]) / "pipeline")
        for steps in (s for s in STEP_COUNTS if s <= pipe.num_steps):
            values.setdefault(job["k"], {}).setdefault(steps, []).extend(
                evaluate_with_steps(suite, pipe, label_pool, sets, steps))
    return values


def evaluate_with_steps(suite, pipe, label_pool, sets: int, steps: int) -> list:
    """FD-digits of `pipe` sampled with `steps` steps on evaluation sets 0 .. sets-1 (`digits_table.evaluate_sets`'s
    seeds)."""
    from sida_diffusers.evaluation import evaluate_repeats, pipeline_sample_fn

    pipe.set_progress_bar_config(disable=True)
    result = evaluate_repeats(suite, lambda first: pipeline_sample_fn(pipe, first, label_pool,
                                                                      num_inference_steps=steps), sets)
    return result[KEY]["values"]


def cached_teacher_values(suite, label_pool, sets: int, work_dir: Path) -> list:
    """`digits_table.teacher_values` (35-NFE Heun, evaluation sets 0 .. sets-1), kept in work_dir/teacher.json: the
    teacher and the seeds never change, and each invocation (rows run ahead with --reuse) would otherwise redo it."""
    path = Path(work_dir) / "teacher.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if str(sets) not in cached:
        cached[str(sets)] = teacher_values(suite, label_pool, sets)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached))
    return cached[str(sets)]


def stats(values: list, nfe: int) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values), "values": [float(v) for v in values], "nfe": nfe}


def curves(jobs: list) -> dict:
    """``{f"k{K}@{steps}": {"kimg", "mean", "std"}}``: the in-training evaluations (set 0) over seeds, for 1 and K
    steps."""
    from sida_diffusers.evaluation import step_result_key

    out = {}
    for k in sorted({j["k"] for j in jobs}):
        runs = [j for j in jobs if j["k"] == k]
        for steps in sorted({1, k}):
            series = []
            for job in runs:
                recs = [json.loads(line) for line in (Path(job["run"]) / "metrics.jsonl").read_text().splitlines()]
                series.append(([r["kimg"] for r in recs], [r[step_result_key(KEY, steps)] for r in recs]))
            n = min(len(s[0]) for s in series)
            ys = np.array([s[1][:n] for s in series])
            out[f"k{k}@{steps}"] = {"kimg": series[0][0][:n], "mean": ys.mean(0).tolist(),
                                    "std": (ys.std(0, ddof=1) if len(series) > 1 else np.zeros(n)).tolist()}
    return out


def machine(workers: int) -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{workers} parallel run(s) x 1 thread")


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {1: "tab:blue", 2: "tab:orange", 4: "tab:red"}
    for name, c in result["curves"].items():
        k, steps = (int(v) for v in name[1:].split("@"))
        m, s = np.array(c["mean"]), np.array(c["std"])
        style = "-" if steps == k else "--"
        label = f"K = {k}, sampled with {steps} step{'s' if steps > 1 else ''}"
        ax.plot(c["kimg"], m, style, marker="o", ms=2.5, color=colors.get(k, "tab:gray"), label=label)
        ax.fill_between(c["kimg"], m - s, m + s, color=colors.get(k, "tab:gray"), alpha=0.12)
    teacher = result["rows"]["teacher"]
    ax.axhline(teacher["values"][0], color="k", ls=":", label="teacher, Heun 35 NFE, set 0 (the curves' seeds)")
    ax.set(xlabel="training images (kimg)", ylabel="FD-digits (lower is better)", yscale="log",
           title="Digits: few-step SiDA, FD-digits vs training images (EMA, mean ± std over seeds)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = ["| Generator | trained K | sampled steps (NFE) | training images | train wall time (min, per run) | "
             "FD-digits ↓ (mean ± std) | n |", "|---|---|---|---|---|---|---|"]
    t = result["rows"]["teacher"]
    lines.append(f"| Teacher (EDM Heun) | — | {t['nfe']} | — | — | {t['mean']:.2f} ± {t['std']:.2f} | {t['n']} |")
    for k, by in result["by_steps"].items():
        wall = result["wall_min"][k]
        for steps, s in by.items():
            lines.append(f"| SiDA, K = {k[1:]} | {k[1:]} | {steps} | {result['kimg']:g}k | {wall} | "
                         f"{s['mean']:.2f} ± {s['std']:.2f} | {s['n']} |")
    lines += ["", f"Machine: {result['machine']}; few-step settings {result['few_step_settings']}."]
    return "\n".join(lines) + "\n"


def replot(out: Path) -> dict:
    result = json.loads((out / "few_step_table.json").read_text())
    plot(result, out / "few_step_curves.png")
    md = markdown(result)
    (out / "few_step_table.md").write_text(md)
    print(md)
    return result


def all_vs_uniform(args, overrides: dict) -> dict:
    """K = 4 trained with `uniform` and with `all` on one seed, same images: FD-digits (1 and 4 steps, evaluation set
    0 .. sets-1) and seconds per kimg of the training."""
    root = Path(args.work_dir)
    suite, label_pool = digits_suite()
    tasks = [(4, args.all_vs_uniform, args.kimg, args.eval_every_kimg, root / f"k4-{mode}-seed{args.all_vs_uniform}",
              {**overrides, "step_sampling": mode}) for mode in ("uniform", "all")]
    teacher = cached_teacher_values(suite, label_pool, args.eval_sets, args.work_dir)
    prepare_run_dirs([t[4] for t in tasks if not (args.reuse and finished(t))], teacher[0])
    jobs = run_all(tasks, args.workers)
    result = {"machine": machine(args.workers), "kimg": args.kimg, "seed": args.all_vs_uniform, "modes": {}}
    for job, task in zip(jobs, tasks):
        values = score_runs([job], suite, label_pool, args.eval_sets)[4]
        ticks = [json.loads(line) for line in (Path(job["run"]) / "stats.jsonl").read_text().splitlines()]
        result["modes"][task[5]["step_sampling"]] = {
            "fd_digits": {str(s): stats(v, s) for s, v in values.items()},
            "sec_per_kimg_mean": float(np.mean([t["sec_per_kimg"] for t in ticks[1:]])), "wall_s": job["wall_s"]}
    (Path(args.out_dir) / "few_step_all_vs_uniform.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="trained step counts K (one row each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distillation seeds")
    p.add_argument("--eval_sets", type=int, default=3, help="evaluation seed sets of 1,797 samples per generator")
    p.add_argument("--kimg", type=float, default=48, help="training images per run (thousands)")
    p.add_argument("--eval_every_kimg", type=float, default=4, help="curve resolution (kimg)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="few-step settings for the K > 1 runs (e.g. step_sigmas=karras renoise=fixed); prefix one "
                        "with kK: for the K-step row only (k2:step_sigmas=2.5,0.5)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (one thread each)")
    p.add_argument("--work_dir", default="runs/few_step_table", help="where the distillation runs go")
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="where table and figure go")
    p.add_argument("--all_vs_uniform", type=int, metavar="SEED", help="instead of the table: K = 4 trained with "
                                                                      "`all` and with `uniform` on this seed")
    p.add_argument("--reuse", action="store_true", help="keep runs of --work_dir that finished with the same settings "
                                                        "(e.g. the K = 1 rows run ahead) instead of training them again")
    p.add_argument("--replot", action="store_true", help="redraw the figure and table from few_step_table.json")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    if args.replot:
        if not (out / "few_step_table.json").is_file():
            p.error(f"--replot needs {out / 'few_step_table.json'} (written by a run of this script)")
        return replot(out)
    if any(k < 1 for k in args.ks):
        p.error(f"--ks must be positive step counts, got {args.ks}")
    out.mkdir(parents=True, exist_ok=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    torch.set_num_threads(1)
    if args.all_vs_uniform is not None:
        return all_vs_uniform(args, settings_for(4, args.set))
    t0 = time.time()
    suite, label_pool = digits_suite()
    teacher = cached_teacher_values(suite, label_pool, args.eval_sets, args.work_dir)
    root = Path(args.work_dir)
    tasks = [(k, s, args.kimg, args.eval_every_kimg, root / f"k{k}-seed{s}", settings_for(k, args.set))
             for k in args.ks for s in args.seeds]
    prepare_run_dirs([t[4] for t in tasks if not (args.reuse and finished(t))], teacher[0])
    jobs = run_all(tasks, args.workers)
    values = score_runs(jobs, suite, label_pool, args.eval_sets)
    by_steps = {f"k{k}": {str(s): stats(v, s) for s, v in sorted(per.items())} for k, per in sorted(values.items())}
    rows = {"teacher": stats(teacher, 35), **{f"k{k}": by_steps[f"k{k}"][str(k)] for k in sorted(values)}}
    result = {
        "machine": machine(args.workers), "kimg": args.kimg, "seeds": args.seeds, "eval_sets": args.eval_sets,
        "metric": f"FD-digits ({NUM_DIGITS} samples vs all {NUM_DIGITS} real digits, per-seed noise and labels)",
        "few_step_settings": {f"k{k}": settings_for(k, args.set) for k in args.ks if k > 1}, "rows": rows, "by_steps": by_steps,
        "training_images_per_run": int(round(args.kimg * 1000)),
        "wall_min": {f"k{k}": ", ".join(f"{j['wall_s'] / 60:.1f}" for j in jobs if j["k"] == k) for k in sorted(values)},
        "run_wall_s": {f"k{j['k']}-seed{j['seed']}": j["wall_s"] for j in jobs},
        "train_s_sum_over_runs": sum(j["wall_s"] for j in jobs), "this_invocation_wall_s": time.time() - t0,
        "jobs": jobs, "curves": curves(jobs),
    }
    (out / "few_step_table.json").write_text(json.dumps(result, indent=2))
    return replot(out)


if __name__ == "__main__":
    main()
