"""Named metrics over generated images, validated before anything is generated (ALGORITHM.md §9.1).

Metrics: ``fid`` (Inception pool features), ``is`` (Inception class probabilities, 10 splits), ``kid``, ``pr``
(precision and recall, k=3, Inception features as in SiD), ``fd_dinov2`` (DINOv2 ViT-L/14), and any Fréchet distance
on a custom feature network registered with ``register_feature_metric`` (``fd_digits`` by ``sida_diffusers.digits``)
or passed as ``MetricSuite(extractors={name: module})``.

Result names always carry the sample count, ``{metric}_{count}`` with ``count`` written ``50k`` for multiples of
1000 (``fid_50k``, ``fid_10k``, ``is_50k``, ``kid_50k``, ``fd_dinov2_50k``, ``fd_digits_2k``; ``pr`` gives
``precision_50k`` and ``recall_50k``). Only the 50k values are the paper's protocol; anything fewer is a proxy and its
name says so. A custom network's distance is never called FID.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sida_diffusers.evaluation.features import DINOV2_DEFAULT, DINOv2Features, InceptionFeatures
from sida_diffusers.evaluation.references import Reference, load_reference
from sida_diffusers.evaluation.stats import (
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


@dataclasses.dataclass(frozen=True)
class _Metric:
    space: str              # feature network: "inception", "dinov2" or the custom metric's own name
    entry: str | None       # reference entry it reads, named after the Fréchet metric of that feature space
    needs: tuple = ()       # fields of that entry it reads


_BUILTIN = {
    "fid": _Metric("inception", "fid", ("mu", "sigma")),
    "is": _Metric("inception", None),
    "kid": _Metric("inception", "fid", ("features",)),
    "pr": _Metric("inception", "fid", ("features",)),
    "fd_dinov2": _Metric("dinov2", "fd_dinov2", ("mu", "sigma")),
}
_FEATURE_METRICS: dict[str, Callable[[], torch.nn.Module]] = {}


def register_feature_metric(name: str, factory: Callable[[], torch.nn.Module]) -> None:
    """Register a Fréchet-distance metric ``name`` on the features of ``factory()``, an ``nn.Module`` mapping images
    ``[N,C,H,W]`` in [0,255] to ``[N, D]`` (give it a ``feature_dim`` attribute so references can be checked without
    a probe). Re-registering a name replaces it; built-in names are refused."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in metric; register the custom feature network under its own name, "
                         f"e.g. 'fd_{name}'.")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be a zero-argument callable returning an nn.Module, "
                        f"got {type(factory).__name__}.")
    _FEATURE_METRICS[name] = factory


def available_metrics() -> list[str]:
    """Names ``MetricSuite`` accepts without extra ``extractors``."""
    return sorted(_BUILTIN) + sorted(_FEATURE_METRICS)


def count_tag(num_samples: int) -> str:
    """``50000 -> '50k'``, ``1797 -> '1797'``: the sample count carried by every result name."""
    return f"{num_samples // 1000}k" if num_samples % 1000 == 0 else str(num_samples)


def result_keys(metric: str, num_samples: int) -> tuple[str, ...]:
    """Names under which ``MetricSuite.evaluate`` reports ``metric``: ``('fid_10k',)``, or precision and recall."""
    tag = count_tag(num_samples)
    return (f"precision_{tag}", f"recall_{tag}") if metric == "pr" else (f"{metric}_{tag}",)


def parse_result_key(key: str) -> tuple[str, int]:
    """The inverse of ``result_keys``: ``'fid_50k' -> ('fid', 50000)``, ``'fd_digits_1797' -> ('fd_digits', 1797)``,
    ``'precision_10k' -> ('precision', 10000)``. Model cards, run summaries and plots read result names with this,
    so a name is parsed the way the suite wrote it. Raises ValueError for anything else."""
    match = re.fullmatch(r"([a-z][a-z0-9_]*?)_(\d+)(k?)", key)
    if match is None:
        raise ValueError(f"{key!r} is not a metric result name; MetricSuite reports '{{metric}}_{{count}}', e.g. "
                         "'fid_50k' or 'fd_digits_1797'.")
    metric, number, thousands = match.groups()
    return metric, int(number) * (1000 if thousands else 1)


def step_result_key(key: str, steps: int) -> str:
    """The name of result `key` for a generator sampled with `steps` steps (ALGORITHM.md §11): `key` itself for one
    step (so one-step runs keep their names), ``'fd_digits_1797@4steps'`` otherwise."""
    return key if steps == 1 else f"{key}@{steps}steps"


def parse_step_result_key(name: str) -> tuple[str, int]:
    """The inverse of ``step_result_key``: ``'fid_10k@2steps' -> ('fid_10k', 2)``, ``'fid_10k' -> ('fid_10k', 1)``."""
    key, sep, steps = name.partition("@")
    if not sep:
        return name, 1
    if not (steps.endswith("steps") and steps[:-5].isdigit() and int(steps[:-5]) > 1):
        raise ValueError(f"{name!r} is not a step-tagged result name; expected e.g. 'fd_digits_1797@4steps'.")
    return key, int(steps[:-5])


class MetricSuite:
    """Computes ``metrics`` on ``num_samples`` generated images against ``reference`` (see ``load_reference``).

    ``inception``: path of ``inception-2015-12-05.pt`` or a module (default: our download cache, ``$SIDA_CACHE`` or
    ~/.cache/sida_diffusers, see ``resolve_inception_path``); ``dinov2``: ``Dinov2Model`` folder / Hub id or a module;
    ``extractors``: ``{metric_name: module}`` adding or overriding custom Fréchet metrics; ``image_shape``
    ``(C,H,W)`` lets ``validate`` probe extractors that have no ``feature_dim`` attribute. ``validate()`` raises on every bad input before any image is generated.
    """

    def __init__(self, metrics, reference: str | os.PathLike | Reference | None = None, num_samples: int = 50000,
                 batch_size: int = 64, device: str | torch.device | None = None,
                 inception: str | os.PathLike | torch.nn.Module | None = None,
                 inception_mode: str = "legacy_tensorflow",    # legacy_tensorflow = EDM/SiD-comparable FID
                 dinov2: str | os.PathLike | torch.nn.Module | None = None,
                 extractors: dict[str, torch.nn.Module] | None = None,
                 image_shape: tuple[int, int, int] | None = None,
                 pr_k: int = 3,                                 # neighbourhood size of precision/recall
                 is_splits: int = 10,                           # IS splits
                 progress: bool = True):
        self.metrics = [m.strip() for m in metrics.split(",")] if isinstance(metrics, str) else list(metrics)
        self.reference, self.num_samples, self.batch_size = reference, num_samples, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.inception, self.inception_mode, self.dinov2 = inception, inception_mode, dinov2
        self.extractors = dict(extractors or {})
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.pr_k, self.is_splits, self.progress = pr_k, is_splits, progress
        self._nets: dict[str, torch.nn.Module] = {}
        self._dims: dict[str, int] = {}
        self._ref: Reference | None = reference if isinstance(reference, Reference) else None

    # ---- metric and network lookup ----------------------------------------------------------------------------------

    def _metric(self, name: str) -> _Metric:
        if name in _BUILTIN:
            return _BUILTIN[name]
        if name in self.extractors or name in _FEATURE_METRICS:
            return _Metric(name, name, ("mu", "sigma"))
        known = available_metrics() + sorted(set(self.extractors) - set(_FEATURE_METRICS))
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(known)}. Register a custom feature "
                         "network with register_feature_metric(name, factory) or pass extractors={name: module}.")

    def _build_net(self, space: str) -> torch.nn.Module:
        if space == "inception":
            net = self.inception if isinstance(self.inception, torch.nn.Module) else InceptionFeatures(
                self.inception, self.inception_mode)
        elif space == "dinov2":
            net = self.dinov2 if isinstance(self.dinov2, torch.nn.Module) else DINOv2Features(
                self.dinov2 or DINOV2_DEFAULT)
        else:
            net = self.extractors[space] if space in self.extractors else _FEATURE_METRICS[space]()
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"the feature network of {space!r} must be a torch.nn.Module, got {type(net).__name__}.")
        return net.eval().requires_grad_(False).to(self.device)

    def _net(self, space: str) -> torch.nn.Module:
        if space not in self._nets:
            self._nets[space] = self._build_net(space)
        return self._nets[space]

    def feature_dim(self, space: str) -> int:
        """Feature dimension of a feature network: its ``feature_dim`` attribute, else a probe on ``image_shape``."""
        if space not in self._dims:
            net = self._net(space)
            dim = getattr(net, "feature_dim", None)
            if dim is None:
                if self.image_shape is None:
                    raise ValueError(f"cannot tell the feature dimension of the {space!r} network before generating: "
                                     "give the module a `feature_dim` attribute or pass image_shape=(C, H, W).")
                with torch.no_grad():
                    dim = net(torch.zeros(2, *self.image_shape, device=self.device)).shape[1]
            self._dims[space] = int(dim)
        return self._dims[space]

    @property
    def loaded_reference(self) -> Reference | None:
        """The reference as loaded by ``validate`` (None before, or when no metric needs one)."""
        return self._ref

    @property
    def _spaces(self) -> list[str]:
        return list(dict.fromkeys(self._metric(m).space for m in self.metrics))

    # ---- validation -------------------------------------------------------------------------------------------------

    def _load_reference(self) -> Reference:
        if self._ref is None:
            if self.reference is None:
                raise ValueError(f"metrics {self.metrics} need reference statistics; pass reference= an EDM .npz, an "
                                 "EDM2 .pkl, a cleanfid:NAME/RES/SPLIT spec, or one built with sida-ref-stats.")
            with_features = any("features" in self._metric(m).needs for m in self.metrics)
            self._ref = load_reference(self.reference, self.inception_mode, with_features)
        return self._ref

    def _check_entry(self, name: str, metric: _Metric) -> None:
        ref = self._load_reference()
        if metric.entry not in ref.entries:
            raise ValueError(f"reference {ref.source} has no {metric.entry!r} entry (it holds {sorted(ref.entries)}), "
                             f"which metric {name!r} needs; build one with `sida-ref-stats DATA OUT.npz --metrics "
                             f"{name}`.")
        for field in metric.needs:
            if field not in ref.entries[metric.entry]:
                raise ValueError(f"reference {ref.source} entry {metric.entry!r} lacks raw {field!r}, which "
                                 f"{name!r} needs; rebuild it with `sida-ref-stats DATA OUT.npz --features`.")

    def _check_entry_matches_net(self, metric: _Metric) -> None:
        ref, dim = self._ref, self.feature_dim(metric.space)
        for field in metric.needs:
            ref_dim = ref.entries[metric.entry][field].shape[-1]
            if ref_dim != dim:
                raise ValueError(f"reference {ref.source} entry {metric.entry!r} has {ref_dim}-d {field} but the "
                                 f"{metric.space!r} network gives {dim}-d features; use a reference built with the "
                                 "same feature network.")
        ref_mode = ref.meta.get(metric.entry, {}).get("inception_mode")
        net_mode = getattr(self._net(metric.space), "mode", None) if metric.space == "inception" else None
        if ref_mode and net_mode and ref_mode != net_mode:
            raise ValueError(f"reference {ref.source} holds Inception {ref_mode} statistics but the suite extracts "
                             f"{net_mode} features; pass inception_mode={ref_mode!r} (CLI: --inception-mode).")

    def validate(self, require_reference: bool = True) -> None:
        """Raise (ValueError / FileNotFoundError / TypeError) on any bad input, before any image is generated.

        Checks, cheapest first: arguments, metric names, the reference file and its entries, the feature networks
        (loading their weights), sample counts against feature dimensions, reference dimensions and Inception mode.
        """
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if not self.metrics:
            raise ValueError(f"no metrics requested; choose from {', '.join(available_metrics())}.")
        for name in self.extractors:
            if name in _BUILTIN:
                raise ValueError(f"extractors may not replace the network of built-in metric {name!r}; pass "
                                 "inception=/dinov2= modules, or register the custom network under its own name.")
        metrics = {name: self._metric(name) for name in self.metrics}
        with_ref = {name: m for name, m in metrics.items() if require_reference and m.entry is not None}
        for name, metric in with_ref.items():
            self._check_entry(name, metric)
        n = self.num_samples
        for name, metric in metrics.items():
            dim = self.feature_dim(metric.space)
            if "sigma" in metric.needs and n <= dim:
                raise ValueError(f"{name} fits a covariance to {dim}-d features, which needs more samples than "
                                 f"dimensions; got num_samples={n}. Use num_samples > {dim} (50000 for the paper's "
                                 "protocol).")
            if name == "is":
                if n < self.is_splits:
                    raise ValueError(f"is with {self.is_splits} splits needs num_samples >= {self.is_splits}, got {n}.")
                if not hasattr(self._net("inception"), "class_probs"):
                    raise TypeError("metric 'is' needs an Inception module with a class_probs(features) method; pass "
                                    "an InceptionFeatures or a path to the weights.")
            if name == "pr" and n <= self.pr_k:
                raise ValueError(f"pr with k={self.pr_k} needs num_samples > {self.pr_k}, got {n}.")
            if name == "kid" and n < 2:
                raise ValueError(f"kid needs num_samples >= 2, got {n}.")
        for metric in with_ref.values():
            self._check_entry_matches_net(metric)

    # ---- generation and features ------------------------------------------------------------------------------------

    def _check_batch(self, images, count: int) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != count:
            raise ValueError(f"sample_fn(start, count={count}) must return a uint8 tensor [count, C, H, W], got "
                             f"{images.dtype} of shape {list(images.shape)}; convert with (x * 127.5 + 128).clamp(0, "
                             "255).to(torch.uint8) (ALGORITHM.md §10 item 18).")
        if self.image_shape is not None and tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"sample_fn returned images of shape {list(images.shape[1:])}, the suite was set up for "
                             f"{list(self.image_shape)}; pass the generator's image_shape.")
        return images

    @torch.no_grad()
    def extract(self, sample_fn, num_images: int, desc: str = "features") -> dict[str, np.ndarray]:
        """Features ``{space: float32 [num_images, D]}`` of ``sample_fn(start, count)`` batches, for every feature
        network the metrics need, plus ``inception_probs`` when IS is requested."""
        want_probs = "is" in self.metrics
        feats = {space: [] for space in self._spaces} | ({"inception_probs": []} if want_probs else {})
        with tqdm(total=num_images, desc=desc, unit="img", disable=not self.progress) as bar:
            for start in range(0, num_images, self.batch_size):
                count = min(self.batch_size, num_images - start)
                x = self._check_batch(sample_fn(start, count), count).to(self.device).float()
                for space in self._spaces:
                    f = self._net(space)(x).float()
                    feats[space].append(f.cpu())
                    if space == "inception" and want_probs:
                        feats["inception_probs"].append(self._net(space).class_probs(f).float().cpu())
                bar.update(count)
        return {k: torch.cat(v).numpy() for k, v in feats.items()}

    def evaluate(self, sample_fn) -> dict[str, float]:
        """``{result_name: value}`` for ``sample_fn(start, count) -> uint8 [count,C,H,W]`` (see ``result_keys``)."""
        self.validate()
        feats = self.extract(sample_fn, self.num_samples, desc="generate+features")
        ref, out = self._ref, {}
        for name in self.metrics:
            metric, keys = self._metric(name), result_keys(name, self.num_samples)
            f = feats[metric.space]
            entry = ref.entries[metric.entry] if metric.entry else None
            if name == "is":
                values = inception_score(feats["inception_probs"], self.is_splits)[:1]
            elif name == "kid":
                values = (kernel_inception_distance(f, entry["features"]),)
            elif name == "pr":
                values = precision_recall(entry["features"], f, k=self.pr_k, device=self.device)
            else:
                values = (frechet_distance(*feature_statistics(f), entry["mu"], entry["sigma"]),)
            out.update(zip(keys, values))
        return out

    def reference_entries(self, sample_fn, num_images: int, with_features: bool = False) -> tuple[dict, dict]:
        """``(entries, meta)`` of reference statistics for ``save_reference``: one entry per feature network the
        metrics use (``fid`` for Inception), with raw ``features`` if asked for or if ``kid``/``pr`` are requested."""
        self.num_samples = num_images
        self.validate(require_reference=False)
        feats = self.extract(sample_fn, num_images, desc="reference features")
        entries, meta = {}, {}
        for name in self.metrics:
            metric = self._metric(name)
            if metric.entry is None or metric.entry in entries:
                continue
            f = feats[metric.space]
            mu, sigma = feature_statistics(f)
            entries[metric.entry] = {"mu": mu, "sigma": sigma}
            if with_features or any("features" in self._metric(m).needs for m in self.metrics):
                entries[metric.entry]["features"] = f
            net = self._net(metric.space)
            meta[metric.entry] = {"extractor": metric.space, "network": type(net).__name__,
                                  "num_images": num_images, "feature_dim": int(f.shape[1])}
            if metric.space == "inception":
                meta[metric.entry]["inception_mode"] = getattr(net, "mode", None)
        return entries, meta


def pipeline_sample_fn(pipe, first_seed: int = 0, label_pool=None, **call_kwargs):
    """``sample_fn(start, count)`` for `MetricSuite`: the uint8 images of seeds ``first_seed + start`` onwards from
    ``pipe.generate_uint8``, the one generation path (labels of a conditional model drawn per seed, from
    `label_pool` or uniformly), so a figure depends on the seeds only, never on who samples or the batch size."""
    def sample_fn(start: int, count: int) -> torch.Tensor:
        seeds = range(first_seed + start, first_seed + start + count)
        return pipe.generate_uint8(seeds, label_pool=label_pool, batch_size=count, **call_kwargs)

    return sample_fn


def evaluate_repeats(suite: MetricSuite, make_sample_fn, repeats: int = 10, seeds_start: int = 0) -> dict[str, dict]:
    """Evaluate ``repeats`` independent runs of fresh samples (ALGORITHM.md §9.1: 10 runs of 50k).

    Run ``r`` uses ``make_sample_fn(seeds_start + r * suite.num_samples)``, whose sample ``i`` must use seed
    ``first_seed + i``, so runs never share a seed. Returns ``{result_name: {"mean", "std", "values"}}`` with the
    sample standard deviation (ddof=1; 0 for a single run).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    suite.validate()
    runs = [suite.evaluate(make_sample_fn(seeds_start + r * suite.num_samples)) for r in range(repeats)]
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
            for k in runs[0] for v in [[run[k] for run in runs]]}
