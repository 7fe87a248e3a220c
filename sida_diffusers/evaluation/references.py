"""Reference statistics: reading every format the official evaluations use, and writing our own (ALGORITHM.md §9.1).

A reference is a set of *entries* named after the Fréchet metric of their feature space, as in EDM2's ``img512.pkl``:
``fid`` holds Inception statistics (also used by ``kid`` and ``pr``, which need the raw ``features``), ``fd_dinov2``
DINOv2 statistics, and a custom metric such as ``fd_digits`` its own. Each entry has ``mu`` and ``sigma`` and
optionally ``features`` ``[N, D]``. Accepted sources:

* EDM ``.npz`` (``mu``, ``sigma``), e.g. ``cifar10-32x32.npz``: one ``fid`` entry, Inception ``legacy_tensorflow``;
* EDM2 ``.pkl`` (``{'fid': {mu, sigma}, 'fd_dinov2': {mu, sigma}}``), read with an unpickler that can only rebuild
  numeric numpy arrays (`sida_diffusers.safe_io.pickles`), so a malicious pickle cannot run code;
* clean-fid built-in stats, ``cleanfid:NAME/RES/SPLIT`` (e.g. ``cleanfid:cifar10/32/train``), in the suite's
  Inception mode; clean-fid downloads them into its package folder on first use;
* our ``.npz`` written by ``save_reference`` / ``sida-ref-stats``: keys ``{entry}.{field}``, a JSON ``meta`` string
  (per-entry extractor, mode, image count, feature dim) and optionally the dataset ``labels``;
* an ``http(s)://`` URL of any of the file formats, downloaded once into ``$SIDA_CACHE`` (~/.cache/sida_diffusers).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from sida_diffusers.safe_io.files import load_npz, read_json
from sida_diffusers.safe_io.pickles import load_arrays_pickle


FIELDS = ("mu", "sigma", "features")


@dataclasses.dataclass
class Reference:
    """Loaded reference statistics: ``entries[name][field]`` arrays, ``meta[name]`` dicts, optional dataset labels."""

    source: str
    entries: dict
    meta: dict = dataclasses.field(default_factory=dict)
    labels: np.ndarray | None = None


def _entry(fields: dict, where: str) -> dict:
    out = {}
    for key, value in fields.items():
        if key in FIELDS:
            # Arrays or numbers only: nested lists would let a pickle share one list many times over (memo).
            if not isinstance(value, (np.ndarray, int, float)) or np.asarray(value).dtype.kind not in "biuf":
                kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(f"{where}[{key!r}] is {str(kind)[:40]}, not a numeric array.")
            out[key] = np.asarray(value, dtype=np.float64 if key != "features" else np.float32)
    if not out:
        raise ValueError(f"{where} holds none of {FIELDS}; it is not a reference-statistics file.")
    mu, sigma, features = (out.get(k) for k in FIELDS)
    square = sigma is None or (sigma.ndim == 2 and sigma.shape[0] == sigma.shape[1])
    if (mu is not None and mu.ndim != 1) or not square or (features is not None and features.ndim != 2):
        shapes = {k: list(v.shape) for k, v in out.items()}
        raise ValueError(f"{where} holds arrays of shapes {shapes}; a reference has mu [D], sigma [D, D] and "
                         "features [N, D].")
    return out


def _load_npz(path: Path) -> Reference:
    data = load_npz(path)  # headers checked against the archive before any array is allocated
    if "meta" not in data:  # EDM / clean-fid layout: one Inception Gaussian
        return Reference(str(path), {"fid": _entry(data, str(path))}, {"fid": {"extractor": "inception",
                                                                               "inception_mode": "legacy_tensorflow"}})
    entries = {}
    for key, value in data.items():
        name, _, field = key.rpartition(".")
        if name and field in FIELDS:
            entries.setdefault(name, {})[field] = value
    try:
        meta = read_json(str(data["meta"]).encode(), f"{path}[meta]")  # bounded in values and nesting
    except ValueError as e:
        raise ValueError(f"{e} Write the file again with sida-ref-stats.") from None
    labels = data.get("labels")
    if not isinstance(meta, dict) or (labels is not None and (labels.ndim != 1 or labels.dtype.kind not in "iu")):
        raise ValueError(f"{path}: 'meta' must be a JSON object and 'labels' a 1-d integer array; write the file "
                         "again with sida-ref-stats.")
    return Reference(str(path), {k: _entry(v, f"{path}[{k}]") for k, v in entries.items()}, meta, labels)


def _load_pkl(path: Path) -> Reference:
    try:
        data = load_arrays_pickle(path)
    except ValueError as e:  # the message names the file and the problem
        raise ValueError(f"{e} Reference pickles must be EDM2-style dicts of numpy arrays, never pickled code.") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path} must hold a dict {{metric: {{'mu': array, 'sigma': array}}}} like EDM2's "
                         f"img512.pkl, got {type(data).__name__}.")
    meta = {"fid": {"extractor": "inception", "inception_mode": "legacy_tensorflow"}} if "fid" in data else {}
    return Reference(str(path), {k: _entry(v, f"{path}[{k}]") for k, v in data.items()}, meta)


def _load_cleanfid(spec: str, inception_mode: str, with_features: bool) -> Reference:
    from cleanfid.features import get_reference_statistics

    try:
        name, res, split = spec.split(":", 1)[1].split("/")
    except ValueError:
        raise ValueError(f"clean-fid reference {spec!r} must read cleanfid:NAME/RES/SPLIT, e.g. "
                         "cleanfid:cifar10/32/train.") from None
    try:
        mu, sigma = get_reference_statistics(name, res, mode=inception_mode, split=split)
        entry = {"mu": mu, "sigma": sigma}
        if with_features:
            entry["features"] = get_reference_statistics(name, res, mode=inception_mode, split=split, metric="KID")
    except OSError as e:
        raise FileNotFoundError(f"clean-fid statistics for {spec!r} (mode {inception_mode}) are neither in clean-fid's "
                                f"stats folder nor downloadable ({e}); check the name against clean-fid's list or "
                                "build your own with sida-ref-stats.") from e
    return Reference(spec, {"fid": _entry(entry, spec)}, {"fid": {"extractor": "inception",
                                                                  "inception_mode": inception_mode}})


def load_reference(source: str | os.PathLike, inception_mode: str = "legacy_tensorflow",
                   with_features: bool = False) -> Reference:
    """Read reference statistics from any supported source (see the module docstring).

    ``inception_mode`` and ``with_features`` only matter for ``cleanfid:`` specs (which mode's stats, and whether to
    also fetch the raw features KID and precision/recall need).
    """
    source = str(source)
    if source.startswith("cleanfid:"):
        return _load_cleanfid(source, inception_mode, with_features)
    if source.startswith(("http://", "https://")):
        from sida_diffusers.pretrained import cached_download

        try:
            path = cached_download(source)
        except OSError as e:
            raise FileNotFoundError(str(e)) from e
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found; pass an EDM .npz, an EDM2 .pkl, a "
                                "cleanfid:NAME/RES/SPLIT spec, or build one with `sida-ref-stats DATA OUT.npz`.")
    if path.suffix == ".npz":
        return _load_npz(path)
    if path.suffix == ".pkl":
        return _load_pkl(path)
    raise ValueError(f"unsupported reference file {path}: expected .npz (EDM / sida-ref-stats) or .pkl (EDM2).")


def save_reference(path: str | os.PathLike, entries: dict, meta: dict, labels=None) -> Path:
    """Write ``entries {name: {mu, sigma[, features]}}`` and per-entry ``meta`` as our ``.npz`` (read by
    ``load_reference``); ``labels`` (the dataset's class labels) lets ``sida-eval`` draw labels as the data does."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference output {path} must end in .npz.")
    arrays = {f"{name}.{field}": np.asarray(value) for name, fields in entries.items()
              for field, value in fields.items() if field in FIELDS}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)
    return path
