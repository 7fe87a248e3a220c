"""The small-scale version of the paper's table and convergence figure, on the embedded digits default (2 CPU cores).

    OMP_NUM_THREADS=1 python benchmarks/digits_table.py                 # ~30 min on a 2-core CPU
    python benchmarks/digits_table.py --kimg 2 --seeds 0 --eval_seeds 1 --workers 1   # a quick look

Rows (one-step generators distilled from the shipped class-conditional digits teacher, `digits` preset otherwise):
  teacher  EDM Heun sampler, 18 steps = 35 NFE, the 3 evaluation seed sets only (no distillation seed)
  SiD      alpha = 1.2, data-free, KIMG thousand generated images
  SiDA     alpha = 1, KIMG thousand images
  SiD²A    SiDA whose generator starts from the SiD run's EMA generator at KIMG/2; it is counted with the SiD images
           that made its initialisation: KIMG/2 (SiD) + KIMG/2 (SiDA) = KIMG, so all rows use equal training images.
Each student: 3 distillation seeds x 3 evaluation seeds (noise seeds r*1797 .. r*1797+1796, labels drawn from the
dataset labels as during training), FD-digits against all 1,797 real digits; mean +- sample std over the 9 values.
Writes digits_table.{json,md} and digits_curves.png (FD-digits vs kimg of SiD, SiDA and SiD²A, mean +- std over the
distillation seeds, from each run's metrics.jsonl) into --out_dir. A benchmark, not a test.
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


# ---- distillation runs (one fresh process each: torch threads and Accelerate state stay per run) ----------------------

def _train(method: str, seed: int, kimg: float, out: Path, eval_every: float, num_samples: int, init_dir=None):
    torch.set_num_threads(1)
    from sida_diffusers.training import SiDATrainer
    from sida_diffusers.training.config import make_config

    overrides = dict(method=method, seed=seed, max_train_kimg=kimg, output_dir=str(out), eval_every_kimg=eval_every,
                     checkpointing_kimg=kimg / 2 if method == "sid" else kimg, checkpoints_total_limit=None,
                     log_every_kimg=eval_every, eval_num_samples=num_samples)
    if init_dir is not None:
        overrides["generator_init"] = str(init_dir)
    SiDATrainer(make_config("digits", **overrides)).train()


def _job(args) -> dict:
    """One chain: 'sida' (a SiDA run) or 'sid' (a SiD run, then SiD²A from its half-way EMA generator)."""
    from sida_diffusers.training.trainer import list_checkpoints

    kind, seed, kimg, root, eval_every, n = args
    t0, runs = time.time(), {}
    if kind == "sida":
        runs["sida"] = root / f"sida-seed{seed}"
        _train("sida", seed, kimg, runs["sida"], eval_every, n)
    else:
        runs["sid"] = root / f"sid-seed{seed}"
        _train("sid", seed, kimg, runs["sid"], eval_every, n)
        half = next(c for c in list_checkpoints(runs["sid"]) if int(c.name.split("-")[1]) >= kimg * 500)
        init_kimg = int(half.name.split("-")[1]) / 1000  # the first checkpoint at or past KIMG/2 (64 images a step)
        runs["sid2a"] = root / f"sid2a-seed{seed}"
        _train("sid2a", seed, kimg / 2, runs["sid2a"], eval_every, n, init_dir=half / "generator_ema")
    return {"kind": kind, "seed": seed, "runs": {k: str(v) for k, v in runs.items()}, "wall_s": time.time() - t0,
            "sid2a_init_kimg": init_kimg if kind == "sid" else None}


# ---- evaluation -------------------------------------------------------------------------------------------------------

def _key(suite) -> str:
    return f"fd_digits_{suite.num_samples}"


def _suite(num_samples: int):
    from sida_diffusers.digits import load_digits_tensors, register_digits_metric
    from sida_diffusers.evaluation import MetricSuite, Reference

    register_digits_metric()
    images, labels = load_digits_tensors()
    opts = dict(batch_size=300, device="cpu", image_shape=tuple(images.shape[1:]), progress=False)
    entries, meta = MetricSuite(["fd_digits"], **opts).reference_entries(lambda s, n: images[s:s + n], len(images))
    suite = MetricSuite(["fd_digits"], Reference("sklearn digits (all 1,797)", entries, meta), num_samples=num_samples,
                        **opts)
    return suite, labels


def _student_sample_fn(generator, labels_pool, first_seed: int, init_sigma: float = 2.5):
    from sida_diffusers.latents import pixels_to_uint8
    from sida_diffusers.pipelines import seed_noise
    from sida_diffusers.training.summary import eval_labels

    shape = (generator.img_channels, generator.img_resolution, generator.img_resolution)

    @torch.no_grad()
    def sample_fn(start: int, count: int) -> torch.Tensor:
        s = first_seed + start
        z = seed_noise(range(s, s + count), shape)
        labels = eval_labels(generator, labels_pool, s, count, "cpu")
        return pixels_to_uint8(generator(z * init_sigma, torch.full([count, 1, 1, 1], init_sigma), labels))

    return sample_fn


def teacher_values(suite, labels, first_set: int, sets: int) -> list:
    """The teacher's FD-digits (Heun, 35 NFE) on evaluation seed sets ``first_set .. first_set+sets-1``."""
    from sida_diffusers.digits import load_digits_teacher
    from sida_diffusers.evaluation import evaluate_repeats
    from sida_diffusers.training.summary import heun_sample_fn

    if sets < 1:
        return []
    teacher = load_digits_teacher(conditional=True)
    make = lambda first: heun_sample_fn(teacher, labels, "cpu", first)
    return evaluate_repeats(suite, make, sets, seeds_start=first_set * suite.num_samples)[_key(suite)]["values"]


def prepare_run_dirs(run_dirs, value: float, num_samples: int) -> None:
    """Empty every run folder and give it the teacher's set-0 FD-digits in the form `write_run_summary` reuses (same teacher, sampler,
    sample count and seeds), so that the 35-NFE teacher is evaluated once for the whole table, not once per run."""
    from sida_diffusers.training.summary import TEACHER_SAMPLER

    cache = {"teacher_eval": {"teacher": "digits", "sampler": TEACHER_SAMPLER, "num_samples": num_samples,
                              "first_seed": 0, "metrics": {f"fd_digits_{num_samples}": value}}}
    for run in run_dirs:
        shutil.rmtree(run, ignore_errors=True)
        Path(run).mkdir(parents=True)
        (Path(run) / "summary.json").write_text(json.dumps(cache))


def evaluate_students(jobs: list, suite, labels, eval_seeds: int) -> dict:
    """FD-digits values ``{row: [..]}`` of each student's final EMA generator over runs x evaluation seed sets."""
    from sida_diffusers.evaluation import evaluate_repeats
    from sida_diffusers.pipelines import SiDAPipeline

    values = {}
    for job in jobs:
        for row, run in job["runs"].items():
            gen = SiDAPipeline.from_pretrained(Path(run) / "pipeline").unet.eval()
            res = evaluate_repeats(suite, lambda first: _student_sample_fn(gen, labels, first), eval_seeds)
            values.setdefault(row, []).extend(res[_key(suite)]["values"])
    return values


# ---- curves, table ----------------------------------------------------------------------------------------------------

def _curve(run: str, key: str, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    recs = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return np.array([r["kimg"] + offset for r in recs]), np.array([r[key] for r in recs])


def mean_curves(jobs: list, key: str) -> dict:
    """``{row: (kimg, mean, std)}`` over distillation seeds; SiD²A's kimg include the SiD images of its init."""
    out = {}
    for row in ("sid", "sida", "sid2a"):
        curves = [_curve(j["runs"][row], key, j["sid2a_init_kimg"] if row == "sid2a" else 0.0)
                  for j in jobs if row in j["runs"]]
        n = min(len(c[0]) for c in curves)
        ys = np.stack([c[1][:n] for c in curves])
        out[row] = (curves[0][0][:n], ys.mean(0), ys.std(0))
    return out


def images_to_reach(curves: dict, target: float) -> float | None:
    """First kimg at which the SiDA mean curve is at or below `target` (None if never)."""
    k, m, _ = curves["sida"]
    hit = np.nonzero(m <= target)[0]
    return float(k[hit[0]]) if len(hit) else None


def plot_curves(curves: dict, teacher_fd: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for row, color in (("sid", "tab:blue"), ("sida", "tab:red"), ("sid2a", "tab:green")):
        k, m, s = curves[row]
        ax.plot(k, m, marker="o", ms=3, color=color, label=LABELS[row])
        ax.fill_between(k, m - s, m + s, color=color, alpha=0.2)
    ax.axhline(teacher_fd, color="k", ls="--", label=LABELS["teacher"])
    ax.set(xlabel="training images (kimg); SiD²A includes its SiD initialisation", ylabel="FD-digits (lower is better)",
           yscale="log", title="Digits 16x16, class-conditional: FD-digits vs training images")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kimg", type=float, default=6.0, help="training images per row (thousands)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distillation seeds")
    p.add_argument("--eval_seeds", type=int, default=3, help="evaluation seed sets of 1,797 samples")
    p.add_argument("--eval_every_kimg", type=float, default=0.5, help="curve resolution")
    p.add_argument("--num_samples", type=int, default=1797, help="samples per FD-digits evaluation")
    p.add_argument("--workers", type=int, default=2, help="parallel runs (one thread each)")
    p.add_argument("--work_dir", default="runs/digits_table", help="where the distillation runs go")
    p.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="where table and figure go")
    args = p.parse_args(argv)
    root, out = Path(args.work_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    suite, labels = _suite(args.num_samples)
    values = {"teacher": teacher_values(suite, labels, 0, 1)}
    prepare_run_dirs([root / f"{m}-seed{s}" for s in args.seeds for m in ("sid", "sida", "sid2a")],
                       values["teacher"][0], args.num_samples)
    t1 = time.time()
    tasks = [(kind, s, args.kimg, root, args.eval_every_kimg, args.num_samples) for s in args.seeds
             for kind in ("sid", "sida")]
    with multiprocessing.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
        jobs = pool.map(_job, tasks, chunksize=1)
    train_s = time.time() - t1
    values["teacher"] += teacher_values(suite, labels, 1, args.eval_seeds - 1)
    values.update(evaluate_students(jobs, suite, labels, args.eval_seeds))
    curves = mean_curves(jobs, _key(suite))
    stats = {row: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                   "n": len(v), "values": [float(x) for x in v]} for row, v in values.items()}
    sid_final = float(curves["sid"][1][-1])
    reach = images_to_reach(curves, sid_final)
    plot_curves(curves, stats["teacher"]["mean"], out / "digits_curves.png")
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
                   f"{torch.__version__}, {args.workers} parallel run(s) x 1 thread",
        "kimg": args.kimg, "seeds": args.seeds, "eval_seeds": args.eval_seeds, "metric": f"FD-digits ({args.num_samples} samples "
        "vs all 1,797 real digits)", "sid2a_images": f"{jobs[0]['sid2a_init_kimg']:g} kimg SiD (its init) + {args.kimg / 2:g} kimg "
        "SiDA; every run stops at the first 64-image iteration at or past its target",
        "rows": stats, "train_wall_s": train_s, "total_wall_s": time.time() - t0,
        "run_wall_s": {f"{j['kind']}-seed{j['seed']}": j["wall_s"] for j in jobs}, "jobs": jobs,
        "targets": {"sida_le_teacher": stats["sida"]["mean"] <= stats["teacher"]["mean"],
                    "sid_final_curve_fd": sid_final, "sida_kimg_to_reach_sid_final": reach,
                    "sida_reaches_sid_final_with_le_third": reach is not None and reach <= args.kimg / 3},
        "curves": {row: {"kimg": c[0].tolist(), "mean": c[1].tolist(), "std": c[2].tolist()}
                   for row, c in curves.items()},
    }
    (out / "digits_table.json").write_text(json.dumps(result, indent=2))
    md = markdown_table(result)
    (out / "digits_table.md").write_text(md)
    print(md)
    return result


def markdown_table(result: dict) -> str:
    """The table as markdown (FD-digits mean ± std, lower is better)."""
    k = result["kimg"]
    lines = ["| Generator | NFE | training images | FD-digits ↓ (mean ± std) | n |", "|---|---|---|---|---|"]
    for row in ("teacher", "sid", "sida", "sid2a"):
        s = result["rows"][row]
        images = {"teacher": "—", "sid2a": f"{k / 2:g}k SiD (its init) + {k / 2:g}k SiDA"}.get(row, f"{k:g}k")
        lines.append(f"| {LABELS[row]} | {35 if row == 'teacher' else 1} | {images} | {s['mean']:.2f} ± {s['std']:.2f} "
                     f"| {s['n']} |")
    t = result["targets"]
    reach = "never" if t["sida_kimg_to_reach_sid_final"] is None else f"{t['sida_kimg_to_reach_sid_final']:g}k"
    lines += ["", f"SiDA ≤ teacher: {'yes' if t['sida_le_teacher'] else 'no'}. SiD's final curve FD-digits "
              f"{t['sid_final_curve_fd']:.2f} reached by SiDA (seed-mean curve) at {reach} of {k:g}k images "
              f"(≤ 1/3: {'yes' if t['sida_reaches_sid_final_with_le_third'] else 'no'}). "
              f"Training wall time {result['train_wall_s'] / 60:.1f} min, total {result['total_wall_s'] / 60:.1f} min "
              f"({result['machine']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
