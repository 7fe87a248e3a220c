"""`sida-sample PIPELINE --seeds 0-49999 --outdir DIR`: one PNG per seed (or one .npz) from a saved pipeline.

Every image gets its own generator seeded with its seed (EDM's convention, ALGORITHM.md §9.1), so an image depends
only on its seed, never on the batch size or on which other seeds are generated. Images come from the pipelines' one
generation path (`generate_uint8`), and `--grid` is the one grid path (`pipelines.grid_image`): the grid of seeds
0-63 is the exported model card's grid and the training run's, pixel for pixel.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

from sida_diffusers.cli import INPUT_ERRORS, CommandParser
from sida_diffusers.pipelines import EDMHeunPipeline, SiDAPipeline, grid_image, heun_nfe, uint8_to_pil
from sida_diffusers.pipelines.few_step import inference_sigmas
from sida_diffusers.safe_io.files import read_json
from sida_diffusers.safe_io.model_files import MAX_CONFIG_BYTES
from sida_diffusers.safe_io.paths import check_folder_files


PIPELINES = {cls.__name__: cls for cls in (SiDAPipeline, EDMHeunPipeline)}
GRID_SIZE = 64
MAX_BATCH = 1 << 16
MAX_STEPS = 10_000  # EDM's Heun presets take at most 256 steps (ImageNet, 511 NFE)


MAX_SEED = (1 << 32) - 1   # seeds are taken modulo 2**32 by the generators (EDM's convention)
MAX_SEEDS = 1 << 32        # images one command may be asked for


class Seeds(Sequence):
    """The seeds of a `--seeds` list, kept as ranges: 0-999999999 is three numbers, not a billion ints."""

    def __init__(self, ranges):
        self.ranges = list(ranges)
        self._starts = list(itertools.accumulate((len(r) for r in self.ranges), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        part = bisect.bisect_right(self._starts, index) - 1
        return self.ranges[part][index - self._starts[part]]

    def __iter__(self):
        return itertools.chain.from_iterable(self.ranges)

    def __eq__(self, other):
        return list(self) == list(other) if len(self) == len(other) else False


def parse_seeds(spec: str) -> Seeds:
    """'0-3,10,20-21' -> the seeds 0, 1, 2, 3, 10, 20, 21 (ranges inclusive, as EDM's --seeds), as lazy ranges."""
    ranges = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d{1,20})\s*(?:-\s*(\d{1,20})\s*)?", part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise ValueError(f"bad seed list {spec[:80]!r}: use comma-separated seeds and inclusive ranges, e.g. "
                             "0-49999,7.")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last > MAX_SEED:
            raise ValueError(f"seed {last} is above {MAX_SEED} (seeds are 32-bit, as EDM's).")
        ranges.append(range(first, last + 1))
    seeds = Seeds(ranges)
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"{spec[:80]!r} asks for {len(seeds):,} images, more than {MAX_SEEDS:,}.")
    return seeds


def _seeds_argument(spec: str) -> Seeds:
    try:
        return parse_seeds(spec)
    except ValueError as error:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(error)) from None


def load_pipeline(src: str, device="cpu"):
    """A SiDAPipeline or EDMHeunPipeline (whichever model_index.json names) from a folder or a Hub repo id."""
    folder = Path(src) if Path(src).is_dir() else Path(SiDAPipeline.download(src))
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; pass a folder written by export_pipeline / "
                                "sida-export (or save_pretrained), or its Hub repo id.")
    check_folder_files(folder, ["model_index.json"])
    index = read_json(index, max_bytes=MAX_CONFIG_BYTES)
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    if isinstance(class_name, list) and class_name:  # [module, class] of a folder that carries its standalone module
        class_name = class_name[-1]
    if not isinstance(class_name, str) or class_name not in PIPELINES:
        raise ValueError(f"{src} holds a {class_name}; sida-sample runs {sorted(PIPELINES)}.")
    shown = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a command's stderr is for its own progress and one-line errors
    try:
        return PIPELINES[class_name].from_pretrained(str(folder)).to(device)
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()


def check_steps(pipe, steps) -> None:
    """A SiDAPipeline samples at most the K steps it was trained for (ALGORITHM.md §11.4): refuse more now, before
    anything is generated or written."""
    if steps is not None and isinstance(pipe, SiDAPipeline):
        inference_sigmas(pipe.config.step_sigmas or [pipe.config.init_sigma], steps)


def image_shape(pipe) -> tuple:
    """``(C, H, W)`` of the uint8 images the pipeline returns (EDM2 latents decode to RGB at 8x the latent size)."""
    _, channels, res, _ = pipe.sample_shape(1)
    if pipe.config.latent_scale is None:
        return channels, res, res
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return 3, res * factor, res * factor


def network_evaluations(pipe, steps) -> int:
    """Network evaluations per image: the steps of a SiDAPipeline (default its trained K, ALGORITHM.md §11), 2N-1 for
    the (unguided) Heun sampler."""
    if isinstance(pipe, EDMHeunPipeline):
        return heun_nfe(pipe.sampler_settings(num_steps=steps)["num_steps"])
    return steps or getattr(pipe, "num_steps", 1)


def build_parser() -> CommandParser:
    parser = CommandParser(prog="sida-sample", description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", help="pipeline folder or Hub repo id (SiDAPipeline or EDMHeunPipeline)")
    parser.add_argument("--seeds", type=_seeds_argument, default=parse_seeds("0-63"),
                        help="e.g. 0-49999 (default 0-63)")
    parser.add_argument("--outdir", help="where the PNGs named by seed (or samples.npz) go")
    parser.add_argument("--class-labels", nargs="+", help="class index or name per image, cycled over the seeds; "
                                                         "default: drawn from each seed's generator")
    parser.add_argument("--grid", help=f"also write a grid of the first {GRID_SIZE} images to this PNG (enlarged "
                                       "with nearest-neighbour upsampling to at least 256 px wide)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per network call (results do not depend "
                                                                   "on it)")
    parser.add_argument("--npz", action="store_true", help="write one samples.npz (arr_0 uint8 NHWC, seeds) instead "
                                                           "of PNGs")
    parser.add_argument("--steps", type=int, help="num_inference_steps (SiDA: 1..K along the trained step grid, "
                                                  "default K, 1 for a one-step generator; Heun: the preset's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv=None) -> int:
    """Generate images for a list of seeds; `argv` defaults to the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.outdir and not args.grid:
        parser.fail("nothing to write: pass --outdir DIR and/or --grid FILE.png")
    if args.npz and not args.outdir:
        parser.fail("--npz writes DIR/samples.npz: pass --outdir DIR too")
    if args.batch_size < 1:
        parser.fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        parser.fail(f"--steps must be >= 1 (1 = one step), got {args.steps}")
    parser.check_range("--batch-size", args.batch_size, 1, MAX_BATCH)
    parser.check_range("--steps", args.steps, 1, MAX_STEPS)
    parser.check_device("--device", args.device)
    if args.outdir:
        parser.check_writable_folder("--outdir", args.outdir)
        if args.npz:
            parser.check_writable_file("--outdir", Path(args.outdir) / "samples.npz")
    if args.grid:
        parser.check_writable_file("--grid", args.grid)

    try:
        pipe = load_pipeline(args.pipeline, args.device)
        labels = None
        if args.class_labels:
            labels = [int(v) if v.isdigit() else pipe.get_label_ids(v)[0] for v in args.class_labels]
        # Everything the first batch would refuse (labels out of range or for an unconditional model, a latent
        # model without its VAE) is refused now, before any image is written.
        pipe.check_common_inputs(1, "np", None)
        pipe.prepare_class_labels(labels, len(labels or [None]), None, "cpu")
        check_steps(pipe, args.steps)
        if args.npz:  # samples.npz holds every image in memory until it is written
            from sida_diffusers.data.datasets import cache_budget

            need = len(args.seeds) * math.prod(image_shape(pipe))
            if need > cache_budget():
                raise ValueError(f"--npz keeps all {len(args.seeds):,} images ({need / 2**30:.1f} GiB) in memory, more "
                                 "than half of this machine's; write PNGs (drop --npz) or fewer --seeds per command.")
    except INPUT_ERRORS as error:
        parser.fail(error)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if args.steps is None else {"num_inference_steps": args.steps}
    outdir = Path(args.outdir) if args.outdir else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)

    seeds, kept = args.seeds, []
    for start in tqdm(range(0, len(seeds), args.batch_size), unit="batch"):
        batch = seeds[start:start + args.batch_size]
        batch_labels = None if labels is None else [labels[(start + j) % len(labels)] for j in range(len(batch))]
        # EDM's exact uint8 bytes, each image from a CPU generator of its own seed, as sida-eval and the trainer
        images = pipe.generate_uint8(batch, class_labels=batch_labels, batch_size=args.batch_size, **extra)
        batch_images = images.permute(0, 2, 3, 1).numpy()
        if args.npz or args.grid:
            kept.append(batch_images if args.npz else batch_images[: max(0, GRID_SIZE - sum(map(len, kept)))])
        if outdir and not args.npz:
            for seed, image in zip(batch, uint8_to_pil(batch_images), strict=True):
                image.save(outdir / f"{seed:06d}.png")
    images = np.concatenate(kept) if kept else None
    if outdir and args.npz:
        np.savez(outdir / "samples.npz", arr_0=images, seeds=np.fromiter(seeds, dtype=np.int64, count=len(seeds)))
    if args.grid:
        grid_image(torch.from_numpy(images[:GRID_SIZE]).permute(0, 3, 1, 2)).save(args.grid)
    where = ", ".join(str(p) for p in ((outdir / "samples.npz") if args.npz else outdir, args.grid) if p)
    print(f"wrote {len(seeds)} images ({network_evaluations(pipe, args.steps)} network evaluations each) to {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
