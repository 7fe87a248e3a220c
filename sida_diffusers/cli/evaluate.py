"""`sida-eval PIPELINE --metrics fid,is --ref REF`: the paper's evaluation protocol on a pipeline (ALGORITHM.md §9.1).

Each run draws `--num-samples` fresh images, image i of run r from seed `seeds_start + r*num_samples + i` (so images
match `sida-sample` for the same seeds); `--repeats 10` runs give the reported mean ± std. Conditional models get
labels drawn from the dataset's label list (`--labels`, else the reference's stored labels) at a random index drawn
from each seed's own generator after its noise, or, with neither, uniformly from it: the convention of the trainer's
in-training evaluation, so the same pipeline, seeds and reference give the same figure. Pipelines distilled on the
embedded digits default (their run_info.json says so) default to the digits set's FD-digits reference and labels, as
the trainer does. Everything is validated before the first image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sida_diffusers.cli import INPUT_ERRORS, CommandParser
from sida_diffusers.cli.sample import MAX_BATCH, MAX_SEED, MAX_STEPS, image_shape
from sida_diffusers.data.image_files import MAX_LABEL_VALUES
from sida_diffusers.digits import register_digits_metric
from sida_diffusers.evaluation import MetricSuite, available_metrics, evaluate_repeats, pipeline_sample_fn
from sida_diffusers.run_record import RUN_INFO_NAME, RunRecord
from sida_diffusers.safe_io.files import load_npy, load_npz, read_json


def load_label_pool(path: str | Path) -> np.ndarray:
    """Dataset class labels (int array) from ``.npy``, ``.npz`` (``labels`` or ``arr_0``), a JSON list, or EDM's
    ``dataset.json`` (``{"labels": [[filename, label], ...]}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} not found; pass the dataset's labels (.npy, .npz or EDM "
                                "dataset.json) or omit --labels.")
    if path.suffix == ".json":
        data = read_json(path, max_nodes=MAX_LABEL_VALUES)
        data = data.get("labels") if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise ValueError(f"{path} holds no list of labels; expected EDM's dataset.json or a JSON list.")
        labels = [row[1] if isinstance(row, list) and len(row) == 2 else row for row in data]
        if not all(type(label) is int for label in labels):
            raise ValueError(f"{path} must list integer class labels (or EDM's [file name, label] rows).")
    elif path.suffix == ".npz":
        arrays = load_npz(path)
        labels = arrays.get("labels", arrays.get("arr_0"))
        if labels is None:
            raise ValueError(f"{path} has neither a 'labels' nor an 'arr_0' array.")
    else:
        labels = load_npy(path)
    labels = np.asarray(labels)
    if labels.ndim == 2:  # one-hot rows
        labels = labels.argmax(1)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path} must hold a non-empty list of integer class labels, got dtype {labels.dtype} and "
                         f"shape {list(labels.shape)}.")
    return labels


def trained_on_digits(src: str) -> bool:
    """True for a pipeline folder exported from a run on the embedded digits data (its run record says so)."""
    info = Path(src) / RUN_INFO_NAME
    try:
        return info.is_file() and RunRecord.read(info).dataset == "digits"
    except (ValueError, OSError):
        return False


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
    parser.add_argument("--inception", help="local inception-2015-12-05.pt (default: downloaded once into "
                                            "$SIDA_CACHE or ~/.cache/sida_diffusers)")
    parser.add_argument("--inception-mode", default="legacy_tensorflow",
                        choices=("legacy_tensorflow", "clean"), help="legacy_tensorflow matches EDM/SiD numbers")
    parser.add_argument("--dinov2", help="Dinov2Model folder or Hub id for fd_dinov2 (default facebook/dinov2-large)")
    parser.add_argument("--steps", type=int, help="num_inference_steps passed to the pipeline (SiDA: 1..K along the "
                                                  "trained step grid, default K)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv=None) -> int:
    """Evaluate a pipeline; `argv` defaults to the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.fail(f"--repeats must be >= 1, got {args.repeats}")
    if args.steps is not None and args.steps < 1:
        parser.fail(f"--steps must be >= 1, got {args.steps}")
    parser.check_range("--repeats", args.repeats, 1, 1000)
    parser.check_range("--num-samples", args.num_samples, 1, 10_000_000)
    parser.check_range("--batch-size", args.batch_size, 1, MAX_BATCH)
    parser.check_range("--steps", args.steps, 1, MAX_STEPS)
    parser.check_range("--seeds-start", args.seeds_start, 0, MAX_SEED)
    parser.check_device("--device", args.device)
    if args.out:
        parser.check_writable_file("--out", args.out)  # checked now, not after hours of evaluation

    from sida_diffusers.cli.sample import check_steps, load_pipeline

    try:
        pipe = load_pipeline(args.pipeline, args.device)
        check_steps(pipe, args.steps)
        unet = pipe.denoiser
        options = dict(batch_size=args.batch_size, device=args.device, inception=args.inception,
                       inception_mode=args.inception_mode, dinov2=args.dinov2, image_shape=image_shape(pipe))
        reference, digits_labels = args.ref, None
        if trained_on_digits(args.pipeline):  # the digits set's reference and labels, built as the trainer does
            from sida_diffusers.data.datasets import build_dataset
            from sida_diffusers.training.outputs import data_reference

            digits = build_dataset("digits", use_labels=True)
            digits_labels = digits.labels
            if reference is None:
                reference = data_reference(MetricSuite(args.metrics, **options), digits, "digits")
        suite = MetricSuite(args.metrics, reference, num_samples=args.num_samples, **options)
        suite.validate()
        label_pool = None
        if unet.label_dim:
            ref = suite.loaded_reference
            label_pool = (load_label_pool(args.labels) if args.labels else digits_labels if digits_labels is not None
                          else ref.labels if ref else None)
            if label_pool is not None and (label_pool.min() < 0 or label_pool.max() >= unet.label_dim):
                raise ValueError(f"dataset labels span {label_pool.min()}..{label_pool.max()} but the model has "
                                 f"label_dim={unet.label_dim}; pass the labels of the dataset it was trained on.")
    except INPUT_ERRORS as error:
        parser.fail(error)
    pipe.set_progress_bar_config(disable=True)
    if unet.label_dim:
        print("labels: " + (f"drawn per seed from {len(label_pool)} dataset labels" if label_pool is not None
                            else "uniform over classes (no --labels and the reference stores none)"))

    extra = {} if args.steps is None else {"num_inference_steps": args.steps}
    results = evaluate_repeats(suite, lambda first: pipeline_sample_fn(pipe, first, label_pool, **extra),
                               repeats=args.repeats, seeds_start=args.seeds_start)
    print(format_table(results))
    if args.out:
        record = {"pipeline": args.pipeline, "reference": args.ref, "num_samples": args.num_samples,
                  "repeats": args.repeats, "seeds_start": args.seeds_start, "inception_mode": args.inception_mode,
                  "num_inference_steps": args.steps or getattr(pipe, "num_steps", None),
                  "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
