"""The regime search behind the `digits` preset: one training trajectory, several EMA half-lives scored side by side.

    OMP_NUM_THREADS=1 python benchmarks/digits_search.py --name lr1e-4_glr3e-5 --set lr=1e-4 glr=3e-5 --kimg 48
    OMP_NUM_THREADS=1 python benchmarks/digits_search.py --name k2 --set num_steps=2 step_sigmas=2.5,0.5 --emas 5 10
    python benchmarks/digits_search.py --summarize                  # one line per run: best and last FD-digits

A run trains the `digits` preset with the `--set` overrides (any TrainConfig field or the paper's flag names) and
keeps, next to the trainer's own EMA, one extra EMA of the generator per `--emas` half-life (same ramp-up), so the EMA
length is searched without re-training. Every `--eval_every` kimg each EMA and the raw generator are scored with
FD-digits exactly as the trainer scores its EMA (1,797 samples, per-seed noise and labels, `training.outputs`); a
few-step run (`num_steps=K`) scores each EMA sampled with 1, 2 and K steps (ALGORITHM.md §11) and skips the raw
generator unless `--raw`. Results go to runs/digits_search/NAME.jsonl (one record per evaluation) and the final EMA generators to
runs/digits_search/NAME/ema{h}/. Run two at a time, one thread each, on a 2-core machine. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path("runs/digits_search")


def parse_overrides(pairs) -> dict:
    """``["lr=1e-4", "seed=1", "lr_scheduler=cosine"]`` -> ``{"lr": 1e-4, "seed": 1, "lr_scheduler": "cosine"}``
    (JSON values; anything that is not JSON is a string)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def search_run(name: str, overrides: dict, kimg: float, eval_every: float, emas: list, root: Path = ROOT,
               raw: bool = True) -> Path:
    from sida_diffusers.evaluation import step_result_key
    from sida_diffusers.training import SiDATrainer, make_config
    from sida_diffusers.training.ema import HalfLifeEMA
    from sida_diffusers.training.outputs import evaluate, sampling_pipeline

    torch.set_num_threads(1)
    cfg = make_config("digits", output_dir=tempfile.mkdtemp(prefix="digits_search_"), eval_every_kimg=kimg,
                      max_train_kimg=kimg, checkpointing_kimg=1e9, sample_grid_size=0, **overrides)
    trainer = SiDATrainer(cfg)
    gen = trainer.unwrap(trainer.generator)
    extra = {h: HalfLifeEMA(gen, copy.deepcopy(trainer.generator_ema), h, cfg.ema_rampup_ratio) for h in emas}
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}.jsonl"
    with open(log, "a") as f:
        f.write(json.dumps({"name": name, "overrides": overrides, "emas": emas,
                            "ema_rampup_ratio": cfg.ema_rampup_ratio}) + "\n")
    every, start = int(eval_every * 1000), time.time()
    key = f"fd_digits_{cfg.eval_num_samples}"
    steps = sorted({1, min(2, cfg.num_steps), cfg.num_steps})

    def score(net):
        """One step: the FD-digits; few-step: {steps: FD-digits} for 1, 2 and K steps along the trained grid."""
        pipe = sampling_pipeline(net.eval(), cfg.init_sigma, step_sigmas=trainer.step_sigmas, renoise=cfg.renoise)
        values = evaluate(trainer.suite, pipe, trainer.label_pool, steps)
        by_steps = {str(k): values[step_result_key(key, k)] for k in steps}
        return by_steps["1"] if cfg.num_steps == 1 else by_steps
    while trainer.cur_nimg < kimg * 1000:
        prev = trainer.cur_nimg
        trainer.step()
        for ema in extra.values():
            ema.update(prev, trainer.total_batch_size)
        if trainer.cur_nimg // every > prev // every or trainer.cur_nimg >= kimg * 1000:
            record = {"kimg": trainer.cur_nimg / 1000, "train_s": round(time.time() - start, 1)}
            record.update({f"ema{h:g}": score(e.ema_model) for h, e in extra.items()})
            if raw or cfg.num_steps == 1:
                record["raw"] = score(copy.deepcopy(gen))
            record["losses"] = {k: float(v) for k, v in trainer.last_losses.items()}
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
    for h, ema in extra.items():
        ema.ema_model.save_pretrained(root / name / f"ema{h:g}")
    return log


def summarize(root: Path = ROOT) -> str:
    """One line per run: its overrides, and per EMA the best (kimg) and the last FD-digits."""
    lines = []
    for log in sorted(root.glob("*.jsonl")):
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        head, evals = records[0], [r for r in records if "kimg" in r]
        if not evals:
            continue
        parts = []
        for key in [k for k in evals[-1] if k.startswith("ema") or k == "raw"]:
            # one-step runs record a number, few-step runs {steps: number}
            series = {"": [r[key] for r in evals]} if not isinstance(evals[-1][key], dict) else {
                f"/{k}": [r[key][k] for r in evals] for k in evals[-1][key]}
            for steps, values in series.items():
                best = min(range(len(values)), key=values.__getitem__)
                parts.append(f"{key}{steps} best {values[best]:.2f}@{evals[best]['kimg']:g} last {values[-1]:.2f}")
        lines.append(f"{log.stem} {head['overrides']} to {evals[-1]['kimg']:g} kimg: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", help="run name (the log file's stem)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="overrides of the digits preset")
    p.add_argument("--kimg", type=float, default=48, help="training length")
    p.add_argument("--eval_every", type=float, default=4, help="kimg between evaluations")
    p.add_argument("--emas", type=float, nargs="*", default=[2, 5, 10, 20], help="EMA half-lives (kimg) to score")
    p.add_argument("--root", default=str(ROOT), help="where logs and final generators go")
    p.add_argument("--raw", action=argparse.BooleanOptionalAction, default=None,
                   help="also score the raw generator (default: for one-step runs only)")
    p.add_argument("--summarize", action="store_true", help="print one line per run and exit")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(Path(args.root)))
        return
    if not args.name:
        p.error("--name is required for a run")
    print(search_run(args.name, parse_overrides(args.set), args.kimg, args.eval_every, args.emas, Path(args.root),
                     raw=bool(args.raw)))


if __name__ == "__main__":
    main()
