"""Where a few-step digits generator loses quality: its later steps, probed one at a time (ALGORITHM.md §11; CPU).

    OMP_NUM_THREADS=1 python benchmarks/few_step_probe.py PIPELINE_DIR --out probe.json

For a K-step `SiDAPipeline` distilled on the digits default, FD-digits (1,797 samples, evaluation set 0 as in
`digits_table.py`) of:
  student_k          the pipeline sampled with k = 1..K steps;
  teacher_finish_k   the student's k-step output re-noised at sigma_k (fresh per-seed noise), then finished by the
                     teacher's Heun sampler from sigma_k down (`--heun_steps` steps): what a perfect step k+1.. would
                     give from the student's own k-step samples;
  student_on_real_k  one student step at sigma_k (k >= 1) applied to the real digits + sigma_k noise (their own
                     labels): the student's step from perfect inputs;
  teacher_mean_k     one call of the teacher's denoiser on the same inputs (the posterior mean E[x | x + noise]),
                     the point the student's later steps start from at initialisation.
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_table import NUM_DIGITS, digits_suite  # noqa: E402


KEY = f"fd_digits_{NUM_DIGITS}"
RENOISE_SEED = 1 << 20  # seeds of the probe's re-noising: seed + RENOISE_SEED, never a sample's own seed


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pipeline", help="a K-step SiDAPipeline folder distilled on digits")
    p.add_argument("--heun_steps", type=int, default=10, help="Heun steps of the teacher's finish from sigma_k")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from sida_diffusers.data.datasets import build_dataset
    from sida_diffusers.digits import load_digits_teacher
    from sida_diffusers.images import pixels_to_uint8
    from sida_diffusers.networks import one_hot
    from sida_diffusers.pipelines import SiDAPipeline, seed_noise
    from sida_diffusers.pipelines.edm_sampler import edm_sampler

    suite, label_pool = digits_suite()
    pipe = SiDAPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    teacher, student = load_digits_teacher(conditional=True), pipe.unet
    sigmas = pipe.config.step_sigmas
    real = build_dataset("digits", use_labels=True)
    x_real = torch.from_numpy(real.get_batch(np.arange(len(real)))[0]).float() / 127.5 - 1
    real_labels = one_hot(torch.as_tensor(real.labels), 10)
    seeds = range(NUM_DIGITS)
    noise = seed_noise([s + RENOISE_SEED for s in seeds], x_real.shape[1:])
    fd = lambda images: suite.evaluate(lambda start, count: images[start:start + count])[KEY]
    call = lambda net, x, sigma, labels: net(x, torch.full([x.shape[0], 1, 1, 1], sigma), labels)
    results = {}
    with torch.no_grad():
        for k in range(1, len(sigmas) + 1):
            images = pipe.generate_uint8(seeds, label_pool=label_pool, batch_size=300, num_inference_steps=k)
            results[f"student_{k}"] = fd(images)
            if k < len(sigmas):  # re-noise the k-step samples at sigma_k and let the teacher finish
                sigma = sigmas[k]
                labels = pipe.prepare_class_labels(None, len(seeds), seed_generators_after_noise(seeds, images),
                                                   "cpu", label_pool)
                x = images.float() / 127.5 - 1
                finished = edm_sampler(teacher, x / sigma + noise, labels, num_steps=args.heun_steps, sigma_max=sigma)
                results[f"teacher_finish_{k}"] = fd(pixels_to_uint8(finished.float()))
        for k, sigma in enumerate(sigmas[1:], start=1):
            x_t = x_real + sigma * noise
            results[f"student_on_real_{k}"] = fd(pixels_to_uint8(call(student, x_t, sigma, real_labels)))
            results[f"teacher_mean_{k}"] = fd(pixels_to_uint8(call(teacher, x_t, sigma, real_labels)))
    record = {"pipeline": args.pipeline, "step_sigmas": sigmas, "heun_steps": args.heun_steps, "fd_digits": results}
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))
    return record


def seed_generators_after_noise(seeds, images):
    """Per-seed generators advanced past each sample's noise draw, so that drawing a label from them gives the label
    `generate_uint8` gave that sample (noise first, then the label, ALGORITHM.md §9.1)."""
    from sida_diffusers.pipelines import seed_generators

    gens = seed_generators(seeds)
    for g in gens:
        torch.randn(tuple(images.shape[1:]), generator=g)
    return gens


if __name__ == "__main__":
    main()
