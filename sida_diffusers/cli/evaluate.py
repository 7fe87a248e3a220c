"""`sida-eval PIPELINE --metrics fid,is --ref REF`: the paper's evaluation protocol on a pipeline (ALGORITHM.md §9.1).

Each run draws `--num-samples` fresh images, image i of run r from seed `seeds_start + r*num_samples + i` (so images
match `sida-sample` for the same seeds); `--repeats 10` runs give the reported mean ± std. Conditional models get
labels drawn from the dataset's label list (`--labels`, else the reference's stored labels) at a per-seed random
index, or, with neither, uniformly from each seed's generator. Everything is validated before the first image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sida_diffusers.cli import CommandParser
from sida_diffusers.digits import register_digits_metric
from sida_diffusers.evaluation import MetricSuite, available_metrics, evaluate_repeats


def load_label_pool(path: str | Path) -> np.ndarray:
    """Dataset class labels (int array) from ``.npy``, ``.npz`` (``labels`` or ``arr_0``), a JSON list, or EDM's
    ``dataset.json`` (``{"labels": [[filename, label], ...]}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} not found; pass the dataset's labels (.npy, .npz or EDM "
                                "dataset.json) or omit --labels.")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        data = data["labels"] if isinstance(data, dict) else data
        labels = [row[1] if isinstance(row, (list, tuple)) else row for row in data]
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"] if "labels" in z.files else z["arr_0"]
    else:
        labels = np.load(path, allow_pickle=False)
    labels = np.asarray(labels)
    if labels.ndim == 2:  # one-hot rows
        labels = labels.argmax(1)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path} must hold a non-empty list of integer class labels, got dtype {labels.dtype} and "
                         f"shape {list(labels.shape)}.")
    return labels


def make_sample_fn_factory(pipe, label_pool, device, steps=None):
    """``make_sample_fn(first_seed)`` for ``evaluate_repeats``: sample i uses seed ``first_seed + i``, its label
    (if any) is ``label_pool[RandomState(seed).randint(len)]``."""
    extra = {} if steps is None else {"num_inference_steps": steps}

    def make_sample_fn(first_seed):
        from sida_diffusers.pipelines import np_to_uint8, seed_generators

        def sample_fn(start, count):
            seeds = range(first_seed + start, first_seed + start + count)
            labels = None if label_pool is None else [
                int(label_pool[np.random.RandomState(s % (1 << 32)).randint(len(label_pool))]) for s in seeds]
            images = pipe(batch_size=count, class_labels=labels, generator=seed_generators(seeds, device),
                          output_type="np", **extra).images
            return torch.from_numpy(np_to_uint8(images)).permute(0, 3, 1, 2)  # the suite scores uint8 images

        return sample_fn

    return make_sample_fn


def image_shape(pipe) -> tuple:
    """``(C, H, W)`` of the uint8 images the pipeline returns (EDM2 latents decode to RGB at 8x the latent size)."""
    _, channels, res, _ = pipe.sample_shape(1)
    if pipe.config.latent_scale is None:
        return channels, res, res
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return 3, res * factor, res * factor


def format_table(results: dict) -> str:
    width = max(len(k) for k in results)
    return "\n".join(f"{k:<{width}}  {v['mean']:.4f} ± {v['std']:.4f}  (n={len(v['values'])})"
                     for k, v in results.items())


def build_parser() -> CommandParser:
    register_digits_metric()  # fd_digits is always available by name on the command line
    parser = CommandParser(prog="sida-eval", description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", help="pipeline folder or Hub repo id (SiDAPipeline or EDMHeunPipeline)")
    parser.add_argument("--metrics", default="fid", help=f"comma-separated, from {', '.join(available_metrics())} "
                                                         "or a registered custom metric (default fid)")
    parser.add_argument("--ref", help="reference: EDM .npz, EDM2 .pkl, cleanfid:NAME/RES/SPLIT, a URL, or a "
                                      "sida-ref-stats .npz (not needed for is alone)")
    parser.add_argument("--num-samples", type=int, default=50000, help="images per run (50000 = "
                                                                                       "the paper's protocol)")
    parser.add_argument("--repeats", type=int, default=10, help="independent runs of fresh samples (default 10)")
    parser.add_argument("--seeds-start", type=int, default=0, help="first seed of the first run")
    parser.add_argument("--batch-size", type=int, default=64, help="images per generator call")
    parser.add_argument("--labels", help="dataset class labels to draw from (.npy, .npz or EDM dataset.json)")
    parser.add_argument("--inception", help="local inception-2015-12-05.pt (default: clean-fid's /tmp copy, "
                                            "downloaded if online)")
    parser.add_argument("--inception-mode", default="legacy_tensorflow",
                        choices=("legacy_tensorflow", "clean"), help="legacy_tensorflow matches EDM/SiD numbers")
    parser.add_argument("--dinov2", help="Dinov2Model folder or Hub id for fd_dinov2 (default facebook/dinov2-large)")
    parser.add_argument("--steps", type=int, help="num_inference_steps passed to the pipeline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv=None) -> int:
    """Evaluate a pipeline; `argv` defaults to the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    from sida_diffusers.cli.sample import load_pipeline

    try:
        pipe = load_pipeline(args.pipeline, args.device)
        unet = pipe.unet
        suite = MetricSuite(args.metrics, args.ref, num_samples=args.num_samples, batch_size=args.batch_size,
                            device=args.device, inception=args.inception, inception_mode=args.inception_mode,
                            dinov2=args.dinov2, image_shape=image_shape(pipe))
        suite.validate()
        label_pool = None
        if unet.label_dim:
            ref = suite.loaded_reference
            label_pool = load_label_pool(args.labels) if args.labels else (ref.labels if ref else None)
            if label_pool is not None and (label_pool.min() < 0 or label_pool.max() >= unet.label_dim):
                raise ValueError(f"dataset labels span {label_pool.min()}..{label_pool.max()} but the model has "
                                 f"label_dim={unet.label_dim}; pass the labels of the dataset it was trained on.")
    except (ValueError, FileNotFoundError, TypeError, OSError) as error:
        parser.exit(2, f"sida-eval: error: {error}\n")
    pipe.set_progress_bar_config(disable=True)
    if unet.label_dim:
        print("labels: " + (f"drawn from {len(label_pool)} dataset labels" if label_pool is not None
                            else "uniform over classes (no --labels and the reference stores none)"))

    results = evaluate_repeats(suite, make_sample_fn_factory(pipe, label_pool, args.device, args.steps),
                               repeats=args.repeats, seeds_start=args.seeds_start)
    print(format_table(results))
    if args.out:
        record = {"pipeline": args.pipeline, "reference": args.ref, "num_samples": args.num_samples,
                  "repeats": args.repeats, "seeds_start": args.seeds_start, "inception_mode": args.inception_mode,
                  "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
