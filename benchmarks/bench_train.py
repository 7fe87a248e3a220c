"""Throughput and memory of the real SiDA trainer step on the full-size networks of a preset (random weights).

    python benchmarks/bench_train.py --preset cifar10 --precision fp32               # the official CIFAR-10 numerics
    python benchmarks/bench_train.py --preset edm2-s --precision bf16 --channels_last --compile
    python benchmarks/bench_train.py --preset cifar10 --tiny                         # CPU regression check, seconds

One timed iteration is `SiDATrainer.step()` in stage 3 (fake-score + discriminator update, generator update with the
SiD and adversarial terms, EMA), B = --train_batch_size images per GPU, one accumulation round, on a synthetic
in-memory dataset of the teacher's shape. Prints one JSON object; img/s counts generated images per second per GPU,
as the official SiDA timing of the training step does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from sida_diffusers.data.datasets import TrainingDataset
from sida_diffusers.networks import denoiser_from_official
from sida_diffusers.training import SiDATrainer, make_config


# Architectures of the official teachers (init_kwargs of the official pickles) and the trainer preset of each.
PRESETS = {
    "cifar10": dict(official="edm-cifar10-32x32-uncond-vp", train_preset="cifar10-uncond", class_name="EDMPrecond",
                    init_kwargs=dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                                     decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
                                     model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13,
                                     use_fp16=False, img_resolution=32, img_channels=3, label_dim=0)),
    "imagenet64": dict(official="edm-imagenet-64x64-cond-adm", train_preset="imagenet64", class_name="EDMPrecond",
                       init_kwargs=dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4],
                                        dropout=0.1, use_fp16=True, img_resolution=64, img_channels=3,
                                        label_dim=1000)),
    "edm2-xs": dict(official="edm2-img512-xs", train_preset="edm2-xs", class_name="Precond",
                    init_kwargs=dict(model_channels=128, dropout=0.0, use_fp16=True, img_resolution=64,
                                     img_channels=4, label_dim=1000)),
    "edm2-s": dict(official="edm2-img512-s", train_preset="edm2-s", class_name="Precond",
                   init_kwargs=dict(model_channels=192, dropout=0.0, use_fp16=True, img_resolution=64,
                                    img_channels=4, label_dim=1000)),
}
# --tiny: the same families, small enough for a CPU step in well under a second.
TINY_KWARGS = {
    "EDMPrecond": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], img_resolution=16),
    "Precond": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], channels_per_head=8,
                    img_resolution=16, label_dim=10),
}
# --precision -> (trainer mixed_precision, TF32 allowed)
PRECISIONS = {"fp32": ("no", False), "tf32": ("no", True), "fp16": ("fp16", False), "bf16": ("bf16", False)}


def build_teacher(preset: str, tiny: bool = False):
    """The preset's teacher with random weights, built through `denoiser_from_official` from the official kwargs."""
    spec = PRESETS[preset]
    kwargs = dict(spec["init_kwargs"])
    if tiny:
        kwargs.update(TINY_KWARGS[spec["class_name"]])
    return denoiser_from_official(spec["class_name"], kwargs)


def synthetic_dataset(teacher, n: int = 64) -> TrainingDataset:
    """In-memory random data of the teacher's shape: uint8 images, or EDM2 latent moments (4 means + 4 stds)."""
    rng = np.random.default_rng(0)
    c, r, latent = teacher.img_channels, teacher.img_resolution, teacher.backbone_name == "unet"
    if latent:
        items = np.concatenate([rng.standard_normal((n, c, r, r)) * 4, rng.random((n, c, r, r))], 1).astype(np.float32)
    else:
        items = rng.integers(0, 256, (n, c, r, r), dtype=np.uint8)
    labels = None
    if teacher.is_conditional:
        labels = rng.integers(0, teacher.label_dim, n)
        labels[0] = teacher.label_dim - 1  # the label count is read off the data
    return TrainingDataset("synthetic", lambda idx: [items[i] for i in idx], [f"item{i}" for i in range(n)],
                           labels=labels, is_latent=latent)


def make_trainer(args, output_dir: str) -> SiDATrainer:
    """The real trainer for `args`, moved to stage 3 (both thresholds passed)."""
    teacher = build_teacher(args.preset, args.tiny)
    mixed, tf32 = PRECISIONS[args.precision]
    cfg = make_config(preset=PRESETS[args.preset]["train_preset"], teacher=PRESETS[args.preset]["official"],
                      train_data="synthetic", train_batch_size=args.train_batch_size,
                      total_batch_size=args.train_batch_size, mixed_precision=mixed, allow_tf32=tf32 or args.allow_tf32,
                      channels_last=args.channels_last, compile=args.compile, compile_backend=args.compile_backend,
                      cpu=args.device == "cpu", sample_grid_size=0, eval_every_kimg=0, seed=0, output_dir=output_dir)
    trainer = SiDATrainer(cfg, teacher=teacher, dataset=synthetic_dataset(teacher))
    trainer.cur_nimg = int(max(cfg.warmup_kimg, cfg.adversarial_start_kimg) * 1000) + 1
    return trainer


class PhaseTimer:
    """Wraps the trainer's phase methods with CUDA events (no synchronisation until `totals`) or wall clocks."""

    def __init__(self, trainer, names=("fake_score_phase", "generator_phase")):
        self.cuda = trainer.device.type == "cuda"
        self.marks: dict[str, list] = {name: [] for name in (*names, "ema")}
        for name in names:
            setattr(trainer, name, self._wrap(getattr(trainer, name), name))
        trainer.ema.update = self._wrap(trainer.ema.update, "ema")
        self.enabled = False

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _wrap(self, fn, name):
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            start = self._now()
            out = fn(*args, **kwargs)
            self.marks[name].append((start, self._now()))
            return out
        return timed

    def totals_ms(self, iters: int) -> dict:
        elapsed = (lambda a, b: a.elapsed_time(b)) if self.cuda else (lambda a, b: (b - a) * 1000)
        return {name: round(sum(elapsed(a, b) for a, b in marks) / iters, 2) for name, marks in self.marks.items()}


def run(args) -> dict:
    """Build, warm up, time; returns the JSON record."""
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args, tmp)
        timer = PhaseTimer(trainer)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.warmup):  # the first iteration compiles every graph (with --compile)
            trainer.step()
        if cuda:
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - start
        timer.enabled = True
        nimg_before = trainer.cur_nimg
        start = time.perf_counter()
        for _ in range(args.iters):
            stage = trainer.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.iters
        losses = {k: float(v) for k, v in trainer.last_losses.items()}
        params = sum(p.numel() for p in trainer.unwrap(trainer.generator).parameters())
        images = args.train_batch_size
        record = dict(
            preset=args.preset, official_teacher=PRESETS[args.preset]["official"], tiny=args.tiny,
            device=torch.cuda.get_device_name() if cuda else "cpu", device_type=args.device,
            torch=torch.__version__, precision=args.precision, mixed_precision=trainer.cfg.mixed_precision,
            tf32=trainer.cfg.allow_tf32, channels_last=args.channels_last, compile=args.compile,
            compile_backend=args.compile_backend if args.compile else None,
            adam_fused=trainer.opt_gen.defaults["fused"], train_batch_size=images, warmup=args.warmup,
            iters=args.iters, warmup_s=round(warmup_s, 2), s_per_iter=round(seconds, 4),
            img_per_s=round(images / seconds, 2), s_per_kimg=round(seconds * 1000 / images, 3),
            phase_ms=timer.totals_ms(args.iters), phase_calls={k: len(v) for k, v in timer.marks.items()},
            stage=stage.number, timed_nimg=trainer.cur_nimg - nimg_before, params_per_net=params,
            peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
            peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2 ** 30, 2) if cuda else None,
            losses=losses, finite=all(np.isfinite(v) for v in losses.values()))
    return record


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cifar10")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="fp32: IEEE fp32 (TF32 off); tf32: fp32 with TF32; fp16: the networks' own float16 path "
                        "(the official ImageNet/EDM2 numerics); bf16: bf16 autocast")
    p.add_argument("--allow_tf32", action="store_true", help="also allow TF32 for fp32 ops left under bf16/fp16")
    p.add_argument("--channels_last", action="store_true", help="channels-last networks")
    p.add_argument("--compile", action="store_true", help="torch.compile G, fake score and teacher")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--train_batch_size", type=int, default=32, help="images per GPU per iteration")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation, cuDNN autotune)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny networks, batch 4, on the CPU: a regression check")
    return p


def main(argv=None) -> dict:
    """Parse flags, run, print the JSON record."""
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.device, args.train_batch_size = "cpu", min(args.train_batch_size, 4)
        if args.compile and args.compile_backend == "inductor":
            args.compile_backend = "aot_eager"  # no C++ compile in a seconds-long CPU check
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; pass --device cpu (or --tiny) to run here.")
    if args.iters < 1 or args.warmup < 1:
        raise ValueError("--iters and --warmup must be >= 1 (the first iteration builds graphs and autotunes).")
    record = run(args)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
