"""Peak memory of real training steps against the memory plan (`sida-plan`), on the CPU, under DDP and FSDP.

    python benchmarks/bench_memory.py --all                      # every config x layout below, prints a Markdown table
    torchrun --nproc_per_node 2 benchmarks/bench_memory.py --config medium-edm --fsdp      # one measurement

One measurement builds the real `SiDATrainer` (teacher included) under torch's profiler with memory events, the CPU
allocator's analogue of `torch.cuda.max_memory_allocated` (every byte the process allocates through torch, DDP's
buckets and FSDP's gathered blocks included), runs `--iters` stage-3 iterations and reports the peak per process, the peak
resident set size of the process, and the bytes of weights + Adam states each process holds; the plan's prediction
for the same launch is printed next to it. Networks have random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sida_diffusers.networks import denoiser_from_official
from sida_diffusers.training import SiDATrainer, make_config
from sida_diffusers.training.memory_plan import GB, make_plan, rounds_for


# EDM SongUNet (DDPM++) and EDM2 configurations: "tiny" is the test-suite size, "medium" a few million parameters.
CONFIGS = {
    "tiny-edm": ("EDMPrecond", dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                    attn_resolutions=[8], dropout=0.1, img_resolution=16, img_channels=3,
                                    label_dim=10), 8),
    "medium-edm": ("EDMPrecond", dict(model_type="SongUNet", model_channels=64, channel_mult=[1, 2, 2],
                                      num_blocks=2, attn_resolutions=[16], dropout=0.1, img_resolution=32,
                                      img_channels=3, label_dim=10), 8),
    "medium-edm2": ("Precond", dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8],
                                    channels_per_head=32, dropout=0.1, use_fp16=False, img_resolution=16,
                                    img_channels=4, label_dim=10), 8),
}


def teacher_for(name: str):
    class_name, kwargs, _ = CONFIGS[name]
    return denoiser_from_official(class_name, kwargs)


def config_for(args, output_dir: str, world: int):
    _, kwargs, batch = CONFIGS[args.config]
    edm2 = CONFIGS[args.config][0] == "Precond"
    return make_config(teacher=args.config, train_data="synthetic", method="sida", train_batch_size=batch,
                       total_batch_size=batch * world * args.rounds, warmup_kimg=0, adversarial_start_kimg=0,
                       fsdp=args.fsdp, gradient_checkpointing=args.gradient_checkpointing, cpu=True,
                       sample_grid_size=0, eval_every_kimg=0, seed=0, output_dir=output_dir, dropout=0.1,
                       force_normalization=edm2, use_logvar=edm2, adam_fused=False)


def synthetic(teacher):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train import synthetic_dataset

    return synthetic_dataset(teacher, n=256)


def allocator_peak(prof, mark_ns: int) -> tuple:
    """The peak of the bytes the CPU allocator held during the profile, and the bytes held at `mark_ns`, from its
    allocation and free events (frees of storages resized in place, as FSDP does, included)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = at_mark = 0
    for start, nbytes in events:
        held += nbytes
        peak = max(peak, held)
        at_mark = held if start <= mark_ns else at_mark
    return peak, at_mark


def measure(args) -> dict:
    """One launch: the peak live tensor bytes of `--iters` iterations on this process, and the plan's prediction."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            teacher = teacher_for(args.config)
            cfg = config_for(args, tmp, world)
            trainer = SiDATrainer(cfg, teacher=teacher, dataset=synthetic(teacher))
            setup_done = time.time_ns()
            for _ in range(args.iters):
                trainer.step()
        peak, built = allocator_peak(prof, setup_done)
        nets = [trainer.unwrap(n) for n in (trainer.generator, trainer.fake_score)] + [trainer.teacher,
                                                                                       trainer.generator_ema]
        held = lambda ts: sum(t.to_local().untyped_storage().nbytes() if hasattr(t, "to_local")
                              else t.untyped_storage().nbytes() for t in ts)
        weights = held(p for net in nets for p in net.parameters())
        adam = held(v for opt in (trainer.opt_fake, trainer.opt_gen) for s in opt.state.values()
                    for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
        plan = make_plan(cfg, lambda: teacher_for(args.config), fused_adam=False)
        predicted = plan.peak(cfg.fsdp, world, cfg.train_batch_size, rounds_for(cfg, world))
    return {"config": args.config, "layout": "FSDP" if args.fsdp else "DDP", "processes": world,
            "gradient_checkpointing": args.gradient_checkpointing, "rank": trainer.rank,
            "train_batch_size": cfg.train_batch_size, "rounds": trainer.rounds,
            "params_per_net": plan.sizes.generator, "measured_peak_gb": peak / GB,
            "after_setup_gb": built / GB, "planned_peak_gb": predicted / GB,
            "plan_error": predicted / peak - 1, "weights_and_adam_gb": (weights + adam) / GB,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
            "activations_planned_gb": plan.activations(cfg.train_batch_size) / GB}


def launch(config: str, processes: int, fsdp: bool, checkpointing: bool, iters: int) -> dict:
    """Run one measurement in its own process(es) (torchrun for more than one); returns rank 0's record."""
    flags = ["--config", config, "--iters", str(iters), "--fsdp" if fsdp else "--no-fsdp"]
    flags += ["--gradient_checkpointing"] if checkpointing else []
    script = str(Path(__file__).resolve())
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), script]
           if processes > 1 else [sys.executable, script]) + flags
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return next(r for r in records if r["rank"] == 0)


def table(records) -> str:
    lines = ["| config (params per net) | layout | B x R | measured peak GB | planned GB | plan error | "
             "weights + Adam GB | peak RSS GB |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        layout = f"{r['layout']} x{r['processes']}" + (" + ckpt" if r["gradient_checkpointing"] else "")
        lines.append(f"| {r['config']} ({r['params_per_net'] / 1e6:.2f} M) | {layout} | {r['train_batch_size']} x "
                     f"{r['rounds']} | {r['measured_peak_gb']:.4f} | {r['planned_peak_gb']:.4f} | "
                     f"{100 * r['plan_error']:+.1f} % | {r['weights_and_adam_gb']:.4f} | {r['peak_rss_gb']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny-edm")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="accumulation rounds per iteration")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--all", action="store_true", help="every config under DDP x1, DDP x2 and FSDP x2")
    args = p.parse_args(argv)
    if not args.all:
        record = measure(args)
        print(json.dumps(record), flush=True)
        return record
    records = [launch(config, n, fsdp, False, args.iters) for config in CONFIGS
               for n, fsdp in ((1, False), (2, False), (2, True))]
    records.append(launch("medium-edm", 2, True, True, args.iters))
    print(json.dumps(records))
    print(table(records))
    return records


if __name__ == "__main__":
    main()
