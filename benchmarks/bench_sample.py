"""One-step SiDAPipeline throughput against the teacher's Heun sampler, same network size, precision and device.

    python benchmarks/bench_sample.py --preset cifar10 --precision bf16 --channels_last   # batch 256, 35-NFE Heun
    python benchmarks/bench_sample.py --tiny                                               # CPU regression check

Both pipelines hold random weights of the preset's architecture (the generator has the teacher's). EDM2 presets time
latents only (no VAE decode), as the official SiDA timing of the training step does. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from bench_train import PRECISIONS, PRESETS, build_teacher

from sida_diffusers.pipelines.edm_sampler import HEUN_PRESETS, EDMHeunPipeline, heun_nfe
from sida_diffusers.pipelines.pipeline_sida import SiDAPipeline


HEUN_PRESET = {"cifar10": "cifar10", "imagenet64": "imagenet64", "edm2-xs": "edm2", "edm2-s": "edm2"}


def throughput(call, batch_size: int, iters: int, warmup: int, cuda: bool) -> float:
    """Images per second of `call()` (one batch each), after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    if cuda:
        torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - start)


def run(args) -> dict:
    """Time both samplers; returns the JSON record."""
    cuda = args.device == "cuda"
    mixed, tf32 = PRECISIONS[args.precision]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32 or args.allow_tf32
        torch.backends.cudnn.benchmark = True
    net = build_teacher(args.preset, args.tiny).eval().requires_grad_(False)
    net.register_to_config(use_fp16=mixed == "fp16")
    net = net.to(args.device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if args.compile:
        net.compile(backend=args.compile_backend)
    autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if mixed == "bf16" else contextlib.nullcontext())
    one_step = SiDAPipeline(unet=net)
    heun = EDMHeunPipeline(unet=net, preset=HEUN_PRESET[args.preset])
    for pipe in (one_step, heun):
        pipe.set_progress_bar_config(disable=True)
    label = 0 if net.is_conditional else None
    b = args.batch_size

    def sample(pipe, **kw):
        with autocast:
            return pipe(batch_size=b, class_labels=label, output_type="pt", **kw).images

    one_step_img_s = throughput(lambda: sample(one_step), b, args.iters, args.warmup, cuda)
    steps = args.heun_steps or HEUN_PRESETS[HEUN_PRESET[args.preset]]["num_steps"]
    heun_img_s = throughput(lambda: sample(heun, num_inference_steps=steps), b, args.heun_iters, 1, cuda)
    return dict(preset=args.preset, tiny=args.tiny, device=torch.cuda.get_device_name() if cuda else "cpu",
                device_type=args.device, torch=torch.__version__, precision=args.precision,
                channels_last=args.channels_last, compile=args.compile, batch_size=b,
                one_step_img_per_s=round(one_step_img_s, 2), heun_nfe=heun_nfe(steps),
                heun_img_per_s=round(heun_img_s, 3), speedup_vs_heun=round(one_step_img_s / heun_img_s, 2),
                params=sum(p.numel() for p in net.parameters()))


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cifar10")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    p.add_argument("--allow_tf32", action="store_true", help="also allow TF32 for fp32 ops left under bf16/fp16")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (both samplers use it)")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--iters", type=int, default=20, help="timed one-step batches")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--heun_iters", type=int, default=1, help="timed Heun batches (each is NFE network calls)")
    p.add_argument("--heun_steps", type=int, default=None, help="Heun steps (default: the preset's: 18 = 35 NFE)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny network, batch 16, 3-step Heun, on the CPU")
    return p


def main(argv=None) -> dict:
    """Parse flags, run, print the JSON record."""
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.device, args.batch_size, args.iters = "cpu", min(args.batch_size, 16), min(args.iters, 3)
        args.heun_steps = args.heun_steps or 3
        if args.compile and args.compile_backend == "inductor":
            args.compile_backend = "aot_eager"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible; pass --device cpu (or --tiny) to run here.")
    record = run(args)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
