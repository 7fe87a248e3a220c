"""Best-checkpoint tracking and the metric log (ALGORITHM.md §5.10, §10 item 16).

The official loop keeps the best-``fid50k_full`` snapshot and silently saves nothing when that metric is not
computed; ``BestTracker`` makes the tracked metric explicit and refuses a record that lacks it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional


class BestTracker:
    """Remembers the best value of one metric (``mode="min"`` for FID-like, ``"max"`` for IS-like) and its kimg."""

    def __init__(self, metric: str, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.metric, self.mode = metric, mode
        self.best: float | None = None
        self.best_kimg: float | None = None

    def update(self, value: float, kimg: float) -> bool:
        """Record ``value`` at ``kimg``; True when it is a strict new best (NaN/inf never is)."""
        value = float(value)
        if not math.isfinite(value):
            return False
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if better:
            self.best, self.best_kimg = value, float(kimg)
        return better

    def update_from(self, results: dict, kimg: float) -> bool:
        """``update`` with ``results[self.metric]``; raises if the tracked metric was not computed (§10 item 16)."""
        if self.metric not in results:
            raise KeyError(f"tracked metric {self.metric!r} is not among the computed results {sorted(results)}; "
                           "evaluate it, or track one of those names.")
        return self.update(results[self.metric], kimg)

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_kimg": self.best_kimg}

    def load_state_dict(self, state: dict) -> None:
        if state["metric"] != self.metric or state["mode"] != self.mode:
            raise ValueError(f"saved tracker follows {state['metric']!r} ({state['mode']}), this one {self.metric!r} "
                             f"({self.mode}); resume with the same tracked metric or start a new run.")
        self.best, self.best_kimg = state["best"], state["best_kimg"]


def append_metrics_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` (e.g. ``{"kimg": 12.5, "fid_10k": 3.2}``) as one JSON line, creating the file if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_curves(jsonl_path: str | os.PathLike, png_path: str | os.PathLike, names=None,
                baselines: Optional[dict] = None, label: Optional[str] = "one-step generator (EMA)") -> Path:
    """The one plotter of a run's logs: every numeric field of a JSONL log (or only `names`) against ``kimg``, one
    panel per field; the metric curve (metrics.jsonl) and the loss curves (stats.jsonl) are both drawn here.

    ``baselines`` maps a field to ``(value, label)``, drawn as a dashed line (e.g. the teacher's multi-step value);
    `label` names the curve in the legend (None: no legend, as for losses).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(jsonl_path).read_text().splitlines() if line.strip()]
    records = [r for r in records if "kimg" in r]
    numeric = sorted({k for r in records for k, v in r.items()
                      if k != "kimg" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    names = [n for n in names if n in numeric] if names is not None else numeric
    if not names:
        raise ValueError(f"{jsonl_path} has no records with 'kimg' and a numeric field to plot.")
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.5 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(r["kimg"], r[name]) for r in records if name in r]
        if points:
            ax.plot(*zip(*points), marker="o" if label else None, label=label)
        if name in (baselines or {}):
            value, baseline_label = baselines[name]
            ax.axhline(value, color="k", ls="--", label=baseline_label)
        if label or name in (baselines or {}):
            ax.legend()
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("kimg")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
