"""Training data: one loader for every source, and the infinite, resumable, rank-strided batch stream.

`build_dataset(source)` accepts ``"digits"`` (scikit-learn's digits, the offline default), a Hugging Face dataset (a
Hub id such as ``uoft-cs/cifar10`` or ``name:split``, a local ``save_to_disk`` folder, or a ``datasets.Dataset``), an
image folder, an EDM ``dataset_tool`` zip, or an EDM2 latent zip/folder of ``img-mean-std-*.npy`` files. Every source
becomes a `TrainingDataset` of uint8 CHW images (or float32 2CxHxW latent moments) plus integer class labels.

`sida_diffusers.training.batches` turns it into training batches (ALGORITHM.md §5.8).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import PIL.Image
import torch

from sida_diffusers.data.image_files import MAX_CLASSES, Archive, archive_labels, image_array, open_image
from sida_diffusers.latents import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE, encode_latents  # noqa: F401 (re-exported)
from sida_diffusers.safe_io.files import read_npy
from sida_diffusers.safe_io.paths import check_regular_file


# ---- the dataset -----------------------------------------------------------------------------------------------------

MAX_RESOLUTION = 4096  # resolution= resizes every image to this side; 4096^2 RGB is 48 MiB per image


def cache_budget() -> int:
    """Bytes a dataset may hold in memory: half of the machine's physical memory (16 GiB where that is unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 16 << 30


class TrainingDataset(torch.utils.data.Dataset):
    """Items of one source, addressed by index: ``dataset[i] -> (array, label)`` with label a class index or -1.

    Images are uint8 ``[C,H,W]`` (C = 1 grey or 3 RGB); latents are the float32 VAE moments ``[8,H,W]``, encoded to
    ``num_channels = 4`` channels by the batch stream. ``cache=True`` reads every item once, at construction, into
    one in-memory array (which also validates every item up front); ``cache=False`` reads items on demand.
    """

    def __init__(
        self,
        name: str,                          # what the data is, for messages and run_info
        read_items: Callable[[list], list],  # raw indices -> their arrays (already converted and resized)
        item_names: Sequence[str],          # one per raw item (file name or row), for error messages
        labels: Optional[np.ndarray] = None,  # int64 class indices [num_raw], or None for an unlabeled source
        id2label: Optional[dict] = None,    # class names, when the source has them
        is_latent: bool = False,            # items are EDM2 VAE moments rather than pixels
        resolution: Optional[int] = None,   # required height and width; None accepts the data's own
        max_size: Optional[int] = None,     # keep a fixed random subset of this many items (seed 0, as EDM)
        cache: bool = True,                 # read everything into memory now (False: read on demand)
        cache_limit: Optional[int] = None,  # cache only up to this many bytes (default: half the machine's memory)
    ):
        num_raw = len(item_names)
        if num_raw == 0:
            raise FileNotFoundError(f"{name}: no training items found; point the source at a folder, zip or dataset "
                                    f"that contains images (or img-mean-std-*.npy latents).")
        self.name, self.is_latent, self._read, self._names = name, bool(is_latent), read_items, list(item_names)
        self._raw_idx = np.arange(num_raw, dtype=np.int64)
        if max_size is not None:
            if max_size < 1:
                raise ValueError(f"max_size must be a positive number of items or None (all), got {max_size}.")
            if max_size < num_raw:
                np.random.RandomState(0).shuffle(self._raw_idx)
                self._raw_idx = np.sort(self._raw_idx[:max_size])

        first = read_items([int(self._raw_idx[0])])[0]
        self.item_shape = tuple(first.shape)
        self._dtype = first.dtype
        if first.ndim != 3 or first.shape[1] != first.shape[2]:
            raise ValueError(f"{name}: item {self._names[self._raw_idx[0]]} has shape {list(first.shape)}; training "
                             f"needs square [C, H, W] items (crop/resize the data, or pass resolution=).")
        if resolution is not None and first.shape[1] != resolution:
            raise ValueError(f"{name}: items are {first.shape[1]}x{first.shape[2]} but resolution={resolution} was "
                             f"requested; latents cannot be resized, so drop resolution= or re-encode the data.")
        if self.is_latent and (first.dtype != np.float32 or first.shape[0] != 2 * len(EDM2_LATENT_SCALE)):
            raise ValueError(f"{name}: latent item {self._names[self._raw_idx[0]]} is {first.dtype} "
                             f"{list(first.shape)}; EDM2 latents are float32 [8, H, W] (4 mean + 4 std channels).")
        if not self.is_latent and (first.dtype != np.uint8 or first.shape[0] not in (1, 3)):
            raise ValueError(f"{name}: image {self._names[self._raw_idx[0]]} is {first.dtype} {list(first.shape)}; "
                             f"expected uint8 grey [1, H, W] or RGB [3, H, W].")

        self._labels = None
        self.id2label = dict(id2label) if id2label else None
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (num_raw,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
                raise ValueError(f"{name}: labels must be one non-negative integer class index per item; got "
                                 f"{labels.dtype} of shape {list(labels.shape)}. Fix the label column / dataset.json, "
                                 f"or pass use_labels=False to train unconditionally.")
            if labels.max() >= MAX_CLASSES:
                raise ValueError(f"{name}: class index {int(labels.max())} is absurd (at most {MAX_CLASSES:,} classes "
                                 "are supported); fix the labels, or pass use_labels=False.")
            self._labels = labels.astype(np.int64)
        self.label_dim = 0 if self._labels is None else max(int(self._labels.max()) + 1, len(self.id2label or {}))

        self._cache = None
        total = len(self._raw_idx) * first.nbytes
        if cache and total > (cache_budget() if cache_limit is None else cache_limit):
            if cache_limit is None:  # a caller's own limit is a choice; the machine's is worth a word
                warnings.warn(f"{name}: {len(self._raw_idx):,} items of {first.nbytes:,} bytes would take "
                              f"{total / 2**30:.1f} GiB in memory, more than half of this machine's; reading them on "
                              "demand instead (pass resolution= / --resolution to store smaller images).", stacklevel=2)
            cache = False
        if cache:
            self._cache = np.empty((len(self._raw_idx), *self.item_shape), dtype=first.dtype)
            for start in range(0, len(self._raw_idx), 1024):
                self._cache[start:start + 1024] = self._read_checked(self._raw_idx[start:start + 1024])

    def _read_checked(self, raw_indices: np.ndarray) -> np.ndarray:
        items = self._read([int(i) for i in raw_indices])
        for raw, item in zip(raw_indices, items):
            if tuple(item.shape) != self.item_shape or item.dtype != self._dtype:
                raise ValueError(f"{self.name}: item {self._names[raw]} is {item.dtype} {list(item.shape)} but the "
                                 f"dataset holds {self._dtype} {list(self.item_shape)}; every item must share one "
                                 f"shape and channel count (convert the odd ones, or pass resolution= to resize).")
        return np.stack(items)

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int):
        item = self._cache[idx] if self._cache is not None else self._read_checked(self._raw_idx[[idx]])[0]
        return item.copy(), int(self.labels[idx])

    def get_batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Stacked items ``[B, ...]`` and int64 labels ``[B]`` (-1 when unlabeled) of the given dataset indices."""
        indices = np.asarray(indices, dtype=np.int64)
        items = self._cache[indices] if self._cache is not None else self._read_checked(self._raw_idx[indices])
        return items, self.labels[indices]

    @property
    def labels(self) -> np.ndarray:
        """Int64 class index of every item (-1 for an unlabeled dataset), e.g. to draw evaluation labels."""
        if self._labels is None:
            return np.full(len(self), -1, dtype=np.int64)
        return self._labels[self._raw_idx]

    @property
    def has_labels(self) -> bool:
        return self.label_dim > 0

    @property
    def resolution(self) -> int:
        return self.item_shape[1]

    @property
    def num_channels(self) -> int:
        """Channels of a training batch: 1 or 3 for pixels, 4 for latents (the stored moments have 8)."""
        return self.item_shape[0] // 2 if self.is_latent else self.item_shape[0]

    def __repr__(self) -> str:
        kind = "latents" if self.is_latent else "images"
        return (f"TrainingDataset({self.name!r}, {len(self)} {kind} {list(self.item_shape)}, label_dim="
                f"{self.label_dim})")




# ---- Hugging Face datasets -------------------------------------------------------------------------------------------

def _from_hf(ds, name, resolution, image_column, label_column, use_labels, max_size, cache,
             cache_limit=None) -> TrainingDataset:
    import datasets

    features = ds.features
    if image_column is None:
        image_column = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
        if image_column is None:
            raise ValueError(f"{name}: no Image feature among the columns {list(features)}; pass image_column= "
                             f"(--image_column) naming the column that holds the images.")
    elif image_column not in features:
        raise ValueError(f"{name}: image_column {image_column!r} is not a column; the columns are {list(features)}.")
    elif not isinstance(features[image_column], datasets.Image):
        raise ValueError(f"{name}: column {image_column!r} is {features[image_column]}, not an Image feature; pick "
                         f"an image column or cast it with ds.cast_column({image_column!r}, datasets.Image()).")

    labels, id2label = None, None
    if use_labels:
        if label_column is None:
            label_column = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        elif label_column not in features:
            raise ValueError(f"{name}: label_column {label_column!r} is not a column; the columns are "
                             f"{list(features)} (pass use_labels=False to train unconditionally).")
        if label_column is not None:
            feature = features[label_column]
            if isinstance(feature, datasets.ClassLabel):
                id2label = dict(enumerate(feature.names))
            elif not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
                raise ValueError(f"{name}: label column {label_column!r} is {feature}; class labels must be a "
                                 f"ClassLabel or integer column (or pass use_labels=False).")
            labels = np.asarray(ds.select_columns([label_column]).with_format("numpy")[label_column])

    images = ds.select_columns([image_column])
    read = lambda rows: [image_array(image, resolution, f"{name} row {i}")
                         for i, image in zip(rows, images[rows][image_column])]
    return TrainingDataset(name, read, [f"row {i}" for i in range(len(ds))], labels, id2label, False, resolution,
                           max_size, cache, cache_limit)


def _load_hf(source: str, cache_dir):
    """A local save_to_disk folder or a Hub dataset, with an optional ``:split`` suffix (default ``train``)."""
    import datasets

    path, split = source, None
    if not os.path.exists(source) and ":" in source:
        path, split = source.rsplit(":", 1)
    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
    else:
        try:
            return datasets.load_dataset(path, split=split or "train", cache_dir=cache_dir)
        except Exception as err:
            raise FileNotFoundError(f"{source!r} is not a local folder, zip or image folder, and loading it from the "
                                    f"Hugging Face Hub failed ({type(err).__name__}: {err}); check the path or the "
                                    f"dataset id (add ':split' for a split other than 'train').") from err
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise ValueError(f"{path} holds the splits {list(ds)}, not {split!r}; pick one with '{path}:<split>'.")
        ds = ds[split]
    elif split is not None:
        raise ValueError(f"{path} is a single saved split; drop the ':{split}' suffix.")
    return ds


# ---- image folders, EDM zips and EDM2 latents ------------------------------------------------------------------------

def _from_archive(path: Path, resolution, use_labels, max_size, cache, cache_limit=None) -> TrainingDataset:
    archive = Archive(path)
    PIL.Image.init()
    images = [n for n in archive.names if os.path.splitext(n)[1].lower() in PIL.Image.EXTENSION]
    latents = [n for n in archive.names if n.lower().endswith(".npy")]
    if images and latents:
        raise ValueError(f"{path} mixes image files and .npy latents; keep one kind per dataset.")
    files = latents or images
    if not files:
        raise FileNotFoundError(f"{path} contains no image files ({', '.join(sorted(set(PIL.Image.EXTENSION))[:6])}, "
                                f"...) and no img-mean-std-*.npy latents; point the source at the data itself.")
    labels, id2label = archive_labels(archive, files) if use_labels else (None, None)

    def read_one(i: int) -> np.ndarray:
        where = f"{path}/{files[i]}"
        if not latents:
            return open_image(archive.read(files[i]), resolution, where)
        data = archive.read(files[i])
        return read_npy(io.BytesIO(data), len(data), where)  # its header is checked against the bytes it holds

    return TrainingDataset(str(path), lambda rows: [read_one(i) for i in rows], files, labels, id2label, bool(latents),
                           resolution, max_size,
                           cache=(not latents) if cache is None else cache, cache_limit=cache_limit)


# ---- the entry point -------------------------------------------------------------------------------------------------

def build_dataset(
    source,                                  # "digits", a path, a Hub id ("name" or "name:split") or a datasets.Dataset
    resolution: Optional[int] = None,        # resize square images to this size; latents must already have it
    image_column: Optional[str] = None,      # HF datasets: image column; default the first Image feature
    label_column: Optional[str] = None,      # HF datasets: label column; default the first ClassLabel feature
    use_labels: bool = True,                 # False: unconditional (label_dim 0) even if the source has labels
    max_size: Optional[int] = None,          # keep a fixed random subset of this many items
    cache_dir: Optional[str] = None,         # Hugging Face datasets cache for Hub downloads
    cache: Optional[bool] = None,            # hold all items in memory; default: pixels yes, latents no
    cache_limit: Optional[int] = None,       # ... unless they take more bytes (default: half the machine's memory)
) -> TrainingDataset:
    """Open any supported training source as a `TrainingDataset` (see the module docstring for the sources)."""
    import datasets

    keep = True if cache is None else cache
    if resolution is not None and not (isinstance(resolution, int) and 1 <= resolution <= MAX_RESOLUTION):
        raise ValueError(f"resolution must be an integer from 1 to {MAX_RESOLUTION} pixels, got {resolution!r}.")
    if isinstance(source, datasets.Dataset):
        return _from_hf(source, "dataset", resolution, image_column, label_column, use_labels, max_size, keep,
                        cache_limit)
    source = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be 'digits', a path, a Hugging Face dataset id or a datasets.Dataset, got "
                         f"{source!r}.")
    if source == "digits":
        from sida_diffusers.data.digits import DIGITS_RESOLUTION, load_digits_dataset

        ds = load_digits_dataset(resolution or DIGITS_RESOLUTION)
        return _from_hf(ds, "digits", None, image_column, label_column, use_labels, max_size, keep, cache_limit)
    saved = Path(source if os.path.exists(source) else source.rsplit(":", 1)[0])  # "folder:split" names a split
    if (saved / "state.json").is_file() or (saved / "dataset_dict.json").is_file():
        return _from_hf(_load_hf(source, cache_dir), source, resolution, image_column, label_column, use_labels,
                        max_size, keep, cache_limit)
    if os.path.exists(source):
        if not os.path.isdir(source):
            check_regular_file(source, "training data")  # /dev/zero or a pipe would be read without end
        return _from_archive(Path(source), resolution, use_labels, max_size, cache, cache_limit)
    if source.startswith(("/", "./", "../", "~")) or source.lower().endswith(".zip"):
        raise FileNotFoundError(f"dataset path {source!r} does not exist; check the path (or pass 'digits' or a "
                                f"Hugging Face dataset id such as 'uoft-cs/cifar10').")
    return _from_hf(_load_hf(source, cache_dir), source, resolution, image_column, label_column, use_labels, max_size,
                    keep, cache_limit)
