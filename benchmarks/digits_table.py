"""The small-scale version of the paper's table and convergence figure, on the embedded digits default (CPU).

    OMP_NUM_THREADS=1 python benchmarks/digits_table.py --long        # the claims: SiD, SiDA, SiD²A curves, 3 seeds
    OMP_NUM_THREADS=1 python benchmarks/digits_table.py               # the short table, at the default run's length
    python benchmarks/digits_table.py --kimg 1 --seeds 0 --eval_sets 1 --workers 1   # a quick look

Rows (one-step generators distilled from the shipped class-conditional digits teacher, `digits` preset otherwise):
  teacher  EDM Heun sampler, 18 steps = 35 NFE, on the evaluation seed sets
  SiD      alpha = 1.2 (the paper's SiD setting), data-free, KIMG thousand generated images
  SiDA     alpha = 1, KIMG thousand images
  SiD²A    SiDA whose generator starts from the SiD run's EMA generator at KIMG/2, trained KIMG/2 more; it is counted
           with the SiD images that made its initialisation, so every row uses KIMG thousand training images.
Every image, the teacher's included, is generated through the pipelines' one generation path (`generate_uint8`):
sample i of evaluation set r uses seed r*1797 + i for its noise and for its class label (drawn from the dataset's
labels), exactly as the trainer's in-training evaluation (set 0) and `sida-eval` draw them. FD-digits against all
1,797 real digits; a student's table value is its final EMA generator, mean +- sample std over distillation seeds x
evaluation sets. The curves are the runs' in-training evaluations (set 0), mean +- std over the distillation seeds.

Writes digits_table.json (rows.{teacher,sid,sida,sid2a}.mean/std/values, kimg, sid_images,
sida_images_to_reach_sid_final, the curves, the wall time and the machine), digits_table.md and digits_curves.png into
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


LABELS = {"teacher": "Teacher (EDM Heun, 35 NFE)", "sid": "SiD, alpha=1.2 (1 step)", "sida": "SiDA, alpha=1 (1 step)",
          "sid2a": "SiD²A, alpha=1 (1 step)"}
NUM_DIGITS = 1797
LONG_KIMG = 100  # long mode: twice the length at which every searched curve bottoms out (benchmarks/RESULTS.md)
LONG_EVAL_EVERY = 4  # long mode: curve resolution (kimg), the resolution of sida_images_to_reach_sid_final


# ---- distillation runs (one fresh single-thread process each: torch threads and Accelerate state stay per run) -------

def _train(method: str, seed: int, kimg: float, out: Path, eval_every: float, init_dir=None) -> None:
    torch.set_num_threads(1)
    from sida_diffusers.training import SiDATrainer, make_config

    overrides = dict(method=method, seed=seed, max_train_kimg=kimg, output_dir=str(out), eval_every_kimg=eval_every,
                     checkpointing_kimg=kimg / 2 if method == "sid" else kimg, checkpoints_total_limit=None,
                     log_every_kimg=eval_every, eval_num_samples=NUM_DIGITS)
    if init_dir is not None:
        overrides["generator_init"] = str(init_dir)
    SiDATrainer(make_config("digits", **overrides)).train()


def _job(args) -> dict:
    """One chain: 'sida' (a SiDA run) or 'sid' (a SiD run, then SiD²A from its half-way EMA generator)."""
    from sida_diffusers.training import list_checkpoints

    kind, seed, kimg, root, eval_every = args
    t0, runs, init_kimg = time.time(), {}, None
    if kind == "sida":
        runs["sida"] = root / f"sida-seed{seed}"
        _train("sida", seed, kimg, runs["sida"], eval_every)
    else:
        runs["sid"] = root / f"sid-seed{seed}"
        _train("sid", seed, kimg, runs["sid"], eval_every)
        half = next(c for c in list_checkpoints(runs["sid"]) if int(c.name.split("-")[1]) >= kimg * 500)
        init_kimg = int(half.name.split("-")[1]) / 1000  # the first checkpoint at or past KIMG/2
        runs["sid2a"] = root / f"sid2a-seed{seed}"
        _train("sid2a", seed, kimg / 2, runs["sid2a"], eval_every, init_dir=half / "generator_ema")
    return {"kind": kind, "seed": seed, "runs": {k: str(v) for k, v in runs.items()}, "wall_s": time.time() - t0,
            "sid2a_init_kimg": init_kimg}


# ---- evaluation -------------------------------------------------------------------------------------------------------

def digits_suite():
    """FD-digits of 1,797 samples against all real digits, and the labels evaluation draws from: what the trainer
    sets up for a digits run (`training.outputs`)."""
    from sida_diffusers.data.datasets import build_dataset
    from sida_diffusers.digits import register_digits_metric
    from sida_diffusers.evaluation import MetricSuite
    from sida_diffusers.training.outputs import data_reference

    register_digits_metric()
    digits = build_dataset("digits", use_labels=True)
    options = dict(batch_size=300, device="cpu", image_shape=(1, 16, 16), progress=False)
    reference = data_reference(MetricSuite(["fd_digits"], **options), digits, "digits")
    return MetricSuite(["fd_digits"], reference, num_samples=NUM_DIGITS, **options), digits.labels


def evaluate_sets(suite, pipe, label_pool, sets: int) -> list:
    """FD-digits of `pipe` on evaluation seed sets 0 .. sets-1."""
    from sida_diffusers.evaluation import evaluate_repeats, pipeline_sample_fn

    pipe.set_progress_bar_config(disable=True)
    result = evaluate_repeats(suite, lambda first: pipeline_sample_fn(pipe, first, label_pool), sets)
    return result[f"fd_digits_{NUM_DIGITS}"]["values"]


def teacher_values(suite, label_pool, sets: int) -> list:
    from sida_diffusers.digits import load_digits_teacher
    from sida_diffusers.training.summary import teacher_pipeline

    return evaluate_sets(suite, teacher_pipeline(load_digits_teacher(conditional=True)), label_pool, sets)


def prepare_run_dirs(run_dirs, teacher_set0: float) -> None:
    """Empty every run folder and give it the teacher's set-0 FD-digits in the form the run summary reuses (same
    teacher, sampler, samples, seeds and labels), so that the 35-NFE teacher is evaluated once for the whole table."""
    from sida_diffusers.training.summary import teacher_cache_key

    cache = {"teacher_eval": {**teacher_cache_key("digits", NUM_DIGITS), "metrics": {f"fd_digits_{NUM_DIGITS}": teacher_set0}}}
    for run in run_dirs:
        shutil.rmtree(run, ignore_errors=True)
        Path(run).mkdir(parents=True)
        (Path(run) / "summary.json").write_text(json.dumps(cache))


def student_values(jobs: list, suite, label_pool, sets: int) -> dict:
    """``{row: [..]}``: each student's final EMA generator (its exported pipeline) over runs x evaluation sets."""
    from sida_diffusers.pipelines import SiDAPipeline

    values = {}
    for job in jobs:
        for row, run in job["runs"].items():
            pipe = SiDAPipeline.from_pretrained(Path(run) / "pipeline")
            values.setdefault(row, []).extend(evaluate_sets(suite, pipe, label_pool, sets))
    return values


# ---- curves, claims, table ------------------------------------------------------------------------------------------

def _curve(run: str, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return np.array([r["kimg"] + offset for r in recs]), np.array([r[f"fd_digits_{NUM_DIGITS}"] for r in recs])


def mean_curves(jobs: list) -> dict:
    """``{row: (kimg, mean, std)}`` over distillation seeds; SiD²A's kimg include the SiD images of its init."""
    out = {}
    for row in ("sid", "sida", "sid2a"):
        curves = [_curve(j["runs"][row], j["sid2a_init_kimg"] if row == "sid2a" else 0.0)
                  for j in jobs if row in j["runs"]]
        n = min(len(c[0]) for c in curves)
        ys = np.stack([c[1][:n] for c in curves])
        out[row] = (curves[0][0][:n], ys.mean(0), ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(n))
    return out


def claims(curves: dict, stats: dict) -> dict:
    """The two statements of the paper this table checks, with the numbers that decide them."""
    k_sid, m_sid, _ = curves["sid"]
    k_sida, m_sida, _ = curves["sida"]
    sid_final = float(m_sid[-1])
    hit = np.nonzero(m_sida <= sid_final)[0]
    reach = int(round(k_sida[hit[0]] * 1000)) if len(hit) else None
    sid_images = int(round(k_sid[-1] * 1000))
    return {"sid_images": sid_images, "sid_final_curve_fd": sid_final, "sida_images_to_reach_sid_final": reach,
            "sida_reaches_sid_final_with_le_third": reach is not None and reach <= sid_images / 3,
            "sida_le_teacher": stats["sida"]["mean"] <= stats["teacher"]["mean"]}


def plot_curves(curves: dict, teacher: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for row, color in (("sid", "tab:blue"), ("sida", "tab:red"), ("sid2a", "tab:green")):
        k, m, s = curves[row]
        ax.plot(k, m, marker="o", ms=2.5, color=color, label=LABELS[row])
        ax.fill_between(k, m - s, m + s, color=color, alpha=0.2)
    ax.axhline(teacher["mean"], color="k", ls="--", label=f"{LABELS['teacher']}, mean of {teacher['n']} sets")
    ax.axhspan(teacher["mean"] - teacher["std"], teacher["mean"] + teacher["std"], color="k", alpha=0.08)
    # The curves are scored on evaluation set 0: the teacher on those very seeds is the like-for-like line.
    ax.axhline(teacher["values"][0], color="k", ls=":", label=f"{LABELS['teacher']}, set 0 (the curves' seeds)")
    ax.set(xlabel="training images (kimg); SiD²A includes its SiD initialisation",
           ylabel="FD-digits (lower is better)", yscale="log",
           title="Digits 16x16, class-conditional: FD-digits vs training images (mean ± std over seeds)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    """The table as markdown (FD-digits mean ± std, lower is better) and the two claims."""
    k = result["kimg"]
    lines = ["| Generator | NFE | training images | FD-digits ↓ (mean ± std) | n |", "|---|---|---|---|---|"]
    for row in ("teacher", "sid", "sida", "sid2a"):
        s = result["rows"][row]
        images = {"teacher": "—", "sid2a": f"{k / 2:g}k SiD (its init) + {k / 2:g}k SiDA"}.get(row, f"{k:g}k")
        lines.append(f"| {LABELS[row]} | {35 if row == 'teacher' else 1} | {images} | {s['mean']:.2f} ± {s['std']:.2f} "
                     f"| {s['n']} |")
    c = result["claims"]
    reach = c["sida_images_to_reach_sid_final"]
    reach = "never" if reach is None else f"{reach / 1000:g}k"
    lines += ["", f"SiDA ≤ teacher: {'yes' if c['sida_le_teacher'] else 'no'}. SiD's final FD-digits "
              f"{c['sid_final_curve_fd']:.2f} (seed-mean curve) is reached by SiDA at {reach} of SiD's "
              f"{c['sid_images'] / 1000:g}k images (≤ 1/3: {'yes' if c['sida_reaches_sid_final_with_le_third'] else 'no'})."
              f" Training wall time {result['train_wall_s'] / 60:.1f} min, total {result['total_wall_s'] / 60:.1f} min "
              f"({result['machine']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--long", action="store_true", help=f"the claims run: {LONG_KIMG} kimg per row, curves every "
                                                              f"{LONG_EVAL_EVERY} kimg")
    p.add_argument("--kimg", type=float, help="training images per row (thousands; default: the digits preset's "
                                              f"length, or {LONG_KIMG} with --long)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distillation seeds")
    p.add_argument("--eval_sets", type=int, default=3, help="evaluation seed sets of 1,797 samples per generator")
    p.add_argument("--eval_every_kimg", type=float, help=f"curve resolution (default kimg/15, at least 1; "
                                                          f"{LONG_EVAL_EVERY} with --long)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (one thread each)")
    p.add_argument("--work_dir", default="runs/digits_table", help="where the distillation runs go")
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="where table and figure go")
    p.add_argument("--replot", action="store_true", help="redraw digits_curves.png and digits_table.md from the "
                                                         "digits_table.json in --out_dir, without training")
    args = p.parse_args(argv)
    if args.replot:
        if not (Path(args.out_dir) / "digits_table.json").is_file():
            p.error(f"--replot needs {Path(args.out_dir) / 'digits_table.json'} (written by a run of this script); "
                    "point --out_dir at the folder that holds it")
        return replot(Path(args.out_dir))
    from sida_diffusers.training import make_config

    kimg = args.kimg or (LONG_KIMG if args.long else make_config("digits").max_train_kimg)
    eval_every = args.eval_every_kimg or (LONG_EVAL_EVERY if args.long else max(1.0, round(kimg / 15)))
    root, out = Path(args.work_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one line per loaded pipeline would drown the report
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    suite, label_pool = digits_suite()
    teacher = teacher_values(suite, label_pool, args.eval_sets)
    prepare_run_dirs([root / f"{m}-seed{s}" for s in args.seeds for m in ("sid", "sida", "sid2a")], teacher[0])
    t1 = time.time()
    tasks = [(kind, s, kimg, root, eval_every) for s in args.seeds for kind in ("sid", "sida")]
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        jobs = pool.map(_job, tasks, chunksize=1)
    train_s = time.time() - t1
    values = {"teacher": teacher, **student_values(jobs, suite, label_pool, args.eval_sets)}
    stats = {row: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                   "values": [float(x) for x in v]} for row, v in values.items()}
    curves = mean_curves(jobs)
    verdict = claims(curves, stats)
    preset = make_config("digits")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
                   f"{torch.__version__}, {args.workers} parallel run(s) x 1 thread",
        "kimg": kimg, "seeds": args.seeds, "eval_sets": args.eval_sets,
        "metric": f"FD-digits ({NUM_DIGITS} samples vs all {NUM_DIGITS} real digits, per-seed noise and labels)",
        "preset": {k: getattr(preset, k) for k in ("train_batch_size", "lr", "glr", "dropout", "ema_halflife_kimg",
                                                   "ema_rampup_ratio", "warmup_kimg", "adversarial_start_kimg",
                                                   "sid_loss_scale", "discriminator_loss_scale", "adversarial_loss_scale",
                                                   "alpha", "tmax", "lr_scheduler")},
        "rows": stats, **verdict, "claims": verdict,
        "train_wall_s": train_s, "total_wall_s": time.time() - t0,
        "run_wall_s": {f"{j['kind']}-seed{j['seed']}": j["wall_s"] for j in jobs}, "jobs": jobs,
        "curves": {row: {"kimg": c[0].tolist(), "mean": c[1].tolist(), "std": c[2].tolist()}
                   for row, c in curves.items()},
    }
    (out / "digits_table.json").write_text(json.dumps(result, indent=2))
    return replot(out)


def replot(out: Path) -> dict:
    """Figure and markdown table from `out`/digits_table.json (what a run wrote, or `--replot` of an earlier run)."""
    result = json.loads((out / "digits_table.json").read_text())
    curves = {row: tuple(np.array(c[key]) for key in ("kimg", "mean", "std")) for row, c in result["curves"].items()}
    plot_curves(curves, result["rows"]["teacher"], out / "digits_curves.png")
    md = markdown_table(result)
    (out / "digits_table.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
