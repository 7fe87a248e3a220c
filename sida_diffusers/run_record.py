"""The one description of a distillation run: `RunRecord`, stored as `run_info.json` (docs/ARCHITECTURE.md §3).

The trainer writes it into every checkpoint and exported pipeline; the model card, the run summary, the export and
`sida-export` read it. It is defined here once, typed and versioned. Reading a `run_info.json` goes through
`safe_io.files.read_json` with a size bound; every known key is type-checked; keys this version does not know (a newer
sida_diffusers wrote them) are kept aside in `extras` with a warning and written back unchanged. Files written before
the record was versioned (no `record_version`) still load.

Adding a field is one edit: a line in `RunRecord`. A field with `card="..."` metadata becomes a row of the model
card's training table by itself (absent values are left out).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from sida_diffusers.latents import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE
from sida_diffusers.safe_io.files import read_json
from sida_diffusers.safe_io.paths import check_folder_files


RECORD_VERSION = 1
RUN_INFO_NAME = "run_info.json"
MAX_RECORD_BYTES = 64 << 20  # a 21,841-class id2label is ~1 MB; a record is otherwise a few kB
MAX_ENTRIES = 1 << 17        # classes of id2label, metrics, sampling settings
MAX_TEXT = 4096              # characters of one string (a class name, a teacher path)


def _f(default=None, card: Optional[str] = None):
    """A record field; `card` is its row label in the model card's training table."""
    meta = {"card": card} if card else {}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunRecord:
    """What a run was and what it reached. Field names are the keys of `run_info.json`."""

    record_version: int = RECORD_VERSION
    # what was distilled, from what
    method: str = _f("sida", "method")
    teacher: Optional[str] = _f(None, "teacher")
    # the teacher's declared licence: a Hub licence id ("cc-by-nc-sa-4.0", "apache-2.0", "other", ...) with, for
    # "other", its name and link; None when nothing declared one (the card then says it is unknown)
    teacher_license: Optional[str] = _f()
    teacher_license_name: Optional[str] = _f()
    teacher_license_link: Optional[str] = _f()
    source: Optional[str] = _f(None, "converted from")  # an official generator that sida-export converted
    generator_init: Optional[str] = _f(None, "generator initialised from")
    dataset: Optional[str] = _f(None, "dataset")
    # progress
    kimg: Optional[float] = _f(None, "training images (kimg)")
    cur_nimg: Optional[int] = _f()
    # the TrainConfig values that matter for reproducing the run (train_batch_size is the per-GPU batch)
    alpha: Optional[float] = _f(None, "alpha")
    lr: Optional[float] = _f(None, "learning rate, fake score / discriminator")
    glr: Optional[float] = _f(None, "learning rate, generator")
    ema_halflife_kimg: Optional[float] = _f(None, "EMA half-life (kimg)")
    warmup_kimg: Optional[float] = _f(None, "generator warm-up (kimg)")
    adversarial_start_kimg: Optional[float] = _f(None, "adversarial loss from (kimg)")
    dropout: Optional[float] = _f(None, "dropout")
    lr_scheduler: Optional[str] = _f(None, "learning-rate schedule")
    ls: Optional[float] = _f(None, "fake-score loss scale (ls)")
    lsd: Optional[float] = _f(None, "discriminator loss scale (lsd)")
    lsg: Optional[float] = _f(None, "SiD generator loss scale (lsg)")
    lsg_gan: Optional[float] = _f(None, "adversarial generator loss scale (lsg_gan)")
    train_batch_size: Optional[int] = _f(None, "batch per GPU")
    num_processes: Optional[int] = _f(None, "processes")
    total_batch_size: Optional[int] = _f(None, "total batch")
    mixed_precision: Optional[str] = _f(None, "precision (what ran)")
    init_sigma: Optional[float] = _f(None, "init_sigma")
    tmax: Optional[float] = _f(None, "tmax")
    seed: Optional[int] = _f()
    # the generator's data
    resolution: Optional[int] = _f(None, "resolution")
    channels: Optional[int] = _f()
    label_dim: Optional[int] = _f(None, "classes")
    id2label: Optional[dict[int, str]] = _f()
    latent: bool = _f(False)                      # EDM2: the generator makes VAE latents (ALGORITHM.md §6.1)
    latent_scale: Optional[list[float]] = _f()    # their per-channel normalisation
    latent_bias: Optional[list[float]] = _f()
    vae: Optional[str] = _f(None, "VAE")
    # results: metric result names as the metric suite writes them (fid_50k, fd_digits_1797, ...)
    metrics: dict[str, float] = _f({})
    teacher_metrics: Optional[dict[str, float]] = _f()  # the teacher, multi-step, same metrics and samples
    teacher_nfe: Optional[int] = _f()
    # a few-step generator (ALGORITHM.md §11); None for a one-step generator
    num_steps: Optional[int] = _f(None, "steps (K)")
    step_sigmas: Optional[list[float]] = _f(None, "step noise levels")
    renoise: Optional[str] = _f(None, "noise between steps")
    step_sampling: Optional[str] = _f(None, "step sampling in training")
    sampling: dict[str, Any] = _f({})            # how the metrics were sampled (init_sigma, num_steps, num_samples)
    grid_size: Optional[int] = _f()              # images of the card's sample grid: seeds 0 .. grid_size - 1
    # keys of a newer record this version does not know, written back unchanged
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- reading ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data, where: str = "run_info") -> "RunRecord":
        """A record from the parsed JSON of a `run_info.json` (or a dict of the same keys), every value checked."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} holds a {type(data).__name__}, not a run record (a JSON object); the file is "
                             "damaged or not a sida_diffusers run_info.json.")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        values, extras = {}, {}
        for key, value in data.items():
            if key in known:
                values[key] = _checked(value, hints[key], f"{where}: {key!r}")
            else:
                extras[key] = value
        version = values.setdefault("record_version", 0)  # written before the record was versioned
        if extras:
            warnings.warn(f"{where}: keys {sorted(extras)[:8]} are not part of run record version {RECORD_VERSION} "
                          f"(the file says version {version}); they are kept aside and written back unchanged.",
                          stacklevel=2)
        record = cls(**values, extras=extras)
        if record.latent and record.latent_scale is None:  # older records: EDM2's fixed normalisation
            record.latent_scale, record.latent_bias = EDM2_LATENT_SCALE.tolist(), EDM2_LATENT_BIAS.tolist()
        record.check()
        return record

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> "RunRecord":
        """The record of a `run_info.json` file, or of the folder (checkpoint, pipeline) that holds one."""
        path = Path(path)
        if path.is_dir():
            path = path / RUN_INFO_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; a checkpoint or exported pipeline holds its run record "
                                    f"there ({RUN_INFO_NAME}).")
        check_folder_files(path.parent, [path.name])  # a link out of its folder would be read, then published
        return cls.from_dict(read_json(path, max_bytes=MAX_RECORD_BYTES), str(path))

    def check(self) -> None:
        """Relations between fields that a type check cannot see."""
        if (self.latent_scale is None) != (self.latent_bias is None):
            raise ValueError("run record: latent_scale and latent_bias go together (ALGORITHM.md §6.1).")
        if self.step_sigmas is not None and self.num_steps != len(self.step_sigmas):
            raise ValueError(f"run record: num_steps is {self.num_steps} but step_sigmas lists "
                             f"{len(self.step_sigmas)} noise levels (ALGORITHM.md §11.1).")
        if self.id2label and self.label_dim and max(self.id2label) >= self.label_dim:
            raise ValueError(f"run record: id2label names class {max(self.id2label)} but label_dim is "
                             f"{self.label_dim}.")

    # ---- writing ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON object of `run_info.json` (extras included, after the known keys)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extras"}
        return {**data, **{k: v for k, v in self.extras.items() if k not in data}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, folder: Union[str, os.PathLike]) -> Path:
        path = Path(folder) / RUN_INFO_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def replace(self, **changes) -> "RunRecord":
        return dataclasses.replace(self, **changes)

    # ---- what readers ask of it -----------------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        return bool(self.label_dim)

    @property
    def num_samples(self) -> Optional[int]:
        """Sample count of the recorded metrics (`sampling["num_samples"]`), when recorded."""
        value = self.sampling.get("num_samples")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @staticmethod
    def card_fields() -> list:
        """(field name, row label) of the training table, in field order."""
        return [(f.name, f.metadata["card"]) for f in dataclasses.fields(RunRecord) if "card" in f.metadata]


def as_record(info: Union[RunRecord, dict, None], where: str = "run_info") -> RunRecord:
    """`info` as a `RunRecord` (a dict is checked as `from_dict` does; None is an empty record)."""
    if isinstance(info, RunRecord):
        return info
    return RunRecord.from_dict({} if info is None else info, where)


# ---- type checks -------------------------------------------------------------------------------------------------------
def _checked(value, hint, where: str):
    """`value` as the annotated type `hint` (JSON's string keys of an int-keyed dict become ints), or ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # as written: 500 stays 500 on the card, 2e-05 stays 2e-05
    elif hint is str:
        if isinstance(value, str):
            if len(value) > MAX_TEXT:
                raise ValueError(f"{where} is a string of {len(value):,} characters (at most {MAX_TEXT:,}).")
            return value
    elif origin is list:
        if isinstance(value, list) and len(value) <= MAX_ENTRIES:
            return [_checked(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and len(value) <= MAX_ENTRIES:
            key_type, value_type = args
            return {_key(k, key_type, where): _checked(v, value_type, f"{where}[{k!r}]") for k, v in value.items()}
    else:  # pragma: no cover - a field annotated with a type this checker does not know
        raise TypeError(f"RunRecord cannot check the type {hint} of {where}")
    name = getattr(hint, "__name__", str(hint))
    raise ValueError(f"{where} must be {name} (at most {MAX_ENTRIES:,} entries for a list or mapping), got "
                     f"{type(value).__name__}; the run_info.json is damaged or was not written by sida_diffusers.")


def _key(key: str, key_type, where: str):
    if key_type is int:
        try:
            return int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{where} has the key {key!r}, not a class index.") from None
    return key


def finite_metrics(values: Optional[dict]) -> dict:
    """The finite numbers of a metric mapping (NaN and infinities left out)."""
    return {k: float(v) for k, v in (values or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}
