"""`sida-ref-stats DATA OUT.npz`: reference statistics of a dataset for `sida-eval` and the trainer's metrics.

DATA is any source `sida_diffusers.data.datasets.build_dataset` reads (HF dataset, image folder, EDM zip, digits).
OUT.npz holds, per metric, the Gaussian fit (mu, sigma) of the dataset's features, the raw features with --features
(or when kid/pr are asked for), metadata (extractor, Inception mode, image count, feature dimension) and the
dataset's class labels, which `sida-eval` draws generation labels from (ALGORITHM.md §9.1).
"""

from __future__ import annotations

import numpy as np
import torch

from sida_diffusers.cli import INPUT_ERRORS, CommandParser
from sida_diffusers.data.datasets import MAX_RESOLUTION
from sida_diffusers.digits import register_digits_metric
from sida_diffusers.evaluation import MetricSuite, available_metrics, save_reference


MAX_BATCH_BYTES = 1 << 30  # decoded images held at once


def build_parser() -> CommandParser:
    register_digits_metric()  # fd_digits is always available by name on the command line
    parser = CommandParser(prog="sida-ref-stats", description=__doc__.splitlines()[0])
    parser.add_argument("data", help="dataset source (anything build_dataset reads, e.g. an image folder)")
    parser.add_argument("out", help="output .npz")
    parser.add_argument("--metrics", default="fid", help=f"comma-separated, from {', '.join(available_metrics())} "
                                                         "or a registered custom metric (default fid)")
    parser.add_argument("--features", action="store_true", help="also store raw features (needed by kid and pr)")
    parser.add_argument("--max-images", type=int, help="use only the first N images (default all)")
    parser.add_argument("--resolution", type=int, help="resolution passed to build_dataset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--inception", help="local inception-2015-12-05.pt (default: downloaded once into $SIDA_CACHE "
                                            "or ~/.cache/sida_diffusers)")
    parser.add_argument("--inception-mode", default="legacy_tensorflow",
                        choices=("legacy_tensorflow", "clean"))
    parser.add_argument("--dinov2", help="Dinov2Model folder or Hub id (default facebook/dinov2-large)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv=None) -> int:
    """Compute and write reference statistics; `argv` defaults to the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out.endswith(".npz"):
        parser.fail(f"OUT must end in .npz, got {args.out}")
    parser.check_writable_file("OUT", args.out)  # checked now, not after the whole dataset has been featurised
    if args.batch_size < 1 or (args.max_images is not None and args.max_images < 1):
        parser.fail(f"--batch-size and --max-images must be >= 1, got {args.batch_size} and {args.max_images}")
    parser.check_range("--batch-size", args.batch_size, 1, 1 << 16)
    parser.check_range("--workers", args.workers, 0, 256)
    parser.check_range("--resolution", args.resolution, 1, MAX_RESOLUTION)
    parser.check_device("--device", args.device)

    from sida_diffusers.data.datasets import build_dataset

    try:
        # Items are held decoded only up to MAX_BATCH_BYTES in all (then every item is checked before any feature
        # is computed); beyond, they are decoded a batch at a time: a folder of a few thousand 8192^2 PNGs is
        # megabytes on disk but hundreds of gigabytes decoded.
        dataset = build_dataset(args.data, resolution=args.resolution, cache_limit=MAX_BATCH_BYTES)
        num_images = min(len(dataset), args.max_images or len(dataset))
        first = np.asarray(dataset[0][0])
        if first.dtype != np.uint8:
            raise ValueError(f"{args.data} yields {first.dtype} items, not uint8 images (EDM2 latents?); compute "
                             "reference statistics from the pixel images.")
        batch_bytes = args.batch_size * first.nbytes
        if batch_bytes > MAX_BATCH_BYTES:
            fits = max(1, MAX_BATCH_BYTES // first.nbytes)
            raise ValueError(f"a batch of {args.batch_size} decoded {list(first.shape)} images takes "
                             f"{batch_bytes / 2**20:,.0f} MiB (at most {MAX_BATCH_BYTES >> 20} MiB); pass --batch-size "
                             f"{fits} or less, or --resolution to resize the images.")
        suite = MetricSuite(args.metrics, None, num_samples=num_images, batch_size=args.batch_size,
                            device=args.device, inception=args.inception, inception_mode=args.inception_mode,
                            dinov2=args.dinov2, image_shape=first.shape)
        suite.validate(require_reference=False)
    except INPUT_ERRORS as error:
        parser.fail(error)

    subset = torch.utils.data.Subset(dataset, range(num_images))
    loader = iter(torch.utils.data.DataLoader(subset, batch_size=args.batch_size, num_workers=args.workers,
                                              collate_fn=list))
    labels = []

    def sample_fn(start, count):
        items = next(loader)
        labels.extend(int(label) for _, label in items)
        return torch.stack([torch.as_tensor(np.asarray(image)) for image, _ in items])

    try:  # items read on demand (latents, cache=False) can still turn out unusable
        entries, meta = suite.reference_entries(sample_fn, num_images, with_features=args.features)
        for entry in meta.values():
            entry["source"] = args.data
        labels = np.asarray(labels, dtype=np.int64)
        labels = labels if (labels >= 0).all() else None  # build_dataset marks unlabelled items with -1
        save_reference(args.out, entries, meta, labels=labels)
    except INPUT_ERRORS as error:
        parser.fail(error)
    dims = ", ".join(f"{name}: {m['feature_dim']}-d" for name, m in meta.items())
    print(f"wrote {args.out}: {num_images} images, {dims}" + (f", {len(labels)} labels" if labels is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
