"""What a run writes besides checkpoints: sample grids, in-training evaluation, run_info, loss curves, the exported
pipeline. Every image here comes from one `SiDAPipeline` over the EMA generator (`sampling_pipeline`), through
`generate_uint8`, the same path as `sida-eval`, `sida-sample` and the benchmarks (docs/ARCHITECTURE.md §5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sida_diffusers.networks.base import Denoiser
from sida_diffusers.pipelines import SiDAPipeline
from sida_diffusers.training.config import TrainConfig


LOSS_NAMES = ("fake_score_loss", "d_loss", "g_loss", "g_gan_loss")  # logged as in ALGORITHM.md §5.11
GRID_BATCH = 64


def load_vae(name: str, device: torch.device):
    """EDM2's `AutoencoderKL` (frozen, eval mode) that decodes latents for grids, evaluation and export (§6.1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(name).to(device).eval().requires_grad_(False)


def sampling_pipeline(generator_ema: Denoiser, init_sigma: float, vae=None, id2label: Optional[dict] = None):
    """The `SiDAPipeline` of the EMA generator (progress bar off): every figure of the run is sampled through it."""
    from sida_diffusers.latents import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE

    latent = vae is not None
    pipe = SiDAPipeline(unet=generator_ema, vae=vae, init_sigma=init_sigma, id2label=id2label,
                        latent_scale=EDM2_LATENT_SCALE.tolist() if latent else None,
                        latent_bias=EDM2_LATENT_BIAS.tolist() if latent else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sample_grid(pipe: SiDAPipeline, path: Path, side: int) -> Path:
    """A `side` x `side` grid of seeds 0.. (classes cycle along the rows for conditional models) as a PNG."""
    from PIL import Image
    from torchvision.utils import make_grid

    n, label_dim = side * side, pipe.denoiser.label_dim
    labels = torch.arange(n) % label_dim if label_dim else None
    images = pipe.generate_uint8(range(n), class_labels=labels, batch_size=GRID_BATCH)
    grid = make_grid(images, nrow=side, padding=0).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def log_image(accelerator, name: str, path: Path, cur_nimg: int) -> None:
    """The PNG at `path` to every Accelerate tracker that takes images (TensorBoard, W&B, ...), stepped by images
    seen like every other logged value."""
    trackers = [t for t in accelerator.trackers if hasattr(t, "log_images")]
    if not trackers:
        return
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    for tracker in trackers:
        # TensorBoard's add_images wants the layout named; the others take a list of HWC arrays as they are.
        extra = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
        tracker.log_images({name: image[None]}, step=cur_nimg, **extra)


# ---- evaluation -------------------------------------------------------------------------------------------------------

def evaluation_label_pool(dataset, teacher: Denoiser) -> Optional[np.ndarray]:
    """The class labels evaluation draws from: the training set's (ALGORITHM.md §9.1), None when unconditional or when
    there is no data (uniform classes)."""
    return dataset.labels if teacher.is_conditional and dataset is not None else None


def data_reference(suite, dataset, source: str):
    """Reference statistics of the training images themselves, when no --eval_reference is given."""
    from sida_diffusers.evaluation import Reference

    if dataset is None or dataset.is_latent:
        raise ValueError("evaluation needs reference statistics: pass --eval_reference (e.g. an EDM fid-refs .npz or "
                         "one written by sida-ref-stats); without it they are computed from --train_data, which must "
                         "then be pixel data.")
    sample_fn = lambda start, count: torch.from_numpy(dataset.get_batch(np.arange(start, start + count))[0])
    entries, meta = suite.reference_entries(sample_fn, len(dataset))
    return Reference(source=f"train_data:{source}", entries=entries, meta=meta)


def make_evaluation(cfg: TrainConfig, dataset, image_shape: tuple, device, is_main_process: bool):
    """``(suite, tracker)`` of the in-training evaluation, ``(None, None)`` when it is off. The suite (and its
    reference) exists on the main process only; the best-value tracker on every process."""
    if not (cfg.eval_metrics and cfg.eval_every_kimg > 0):
        return None, None
    from sida_diffusers.evaluation import BestTracker, MetricSuite, result_keys

    if "fd_digits" in cfg.eval_metrics:
        from sida_diffusers.digits import register_digits_metric

        register_digits_metric()
    suite = None
    if is_main_process:
        options = dict(batch_size=cfg.eval_batch_size, device=device, image_shape=image_shape, progress=False)
        reference = cfg.eval_reference
        if reference is None:
            reference = data_reference(MetricSuite(cfg.eval_metrics, **options), dataset, cfg.train_data)
        suite = MetricSuite(cfg.eval_metrics, reference, num_samples=cfg.eval_num_samples, **options)
        suite.validate()
    first = cfg.eval_metrics[0]
    return suite, BestTracker(result_keys(first, cfg.eval_num_samples)[0], "max" if first == "is" else "min")


def evaluate(suite, pipe, label_pool) -> dict:
    """The suite's metrics of `pipe` on seeds 0..N-1, labels drawn per seed from `label_pool` (§9.1): exactly what
    ``sida-eval PIPELINE --num-samples N --repeats 1`` computes for the exported pipeline."""
    from sida_diffusers.evaluation import pipeline_sample_fn

    return suite.evaluate(pipeline_sample_fn(pipe, 0, label_pool))


def log_record(accelerator, path: Path, record: dict, cur_nimg: int) -> None:
    """One line of `stats.jsonl` / `metrics.jsonl` (main process), the same values to the Accelerate trackers
    (stepped by images seen) and to the console."""
    accelerator.log({k: v for k, v in record.items() if k != "kimg"}, step=cur_nimg)
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        from sida_diffusers.evaluation import append_metrics_jsonl

        append_metrics_jsonl(path, record)
        tqdm.write(f"kimg {record['kimg']:.3f} " + " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "kimg"))


# ---- run description, curves, export ----------------------------------------------------------------------------------

def run_info(cfg: TrainConfig, teacher: Denoiser, dataset, cur_nimg: int, total_batch_size: int, num_processes: int,
             seed: int, metrics: Optional[dict] = None, teacher_metrics: Optional[dict] = None,
             teacher_nfe: Optional[int] = None) -> dict:
    """The run description shared by checkpoints, the export and the model card (docs/ARCHITECTURE.md §3)."""
    return {"method": cfg.method, "alpha": cfg.alpha, "teacher": cfg.teacher, "dataset": cfg.train_data,
            "kimg": cur_nimg / 1000, "cur_nimg": cur_nimg, "train_batch_size": cfg.train_batch_size,
            "total_batch_size": total_batch_size, "num_processes": num_processes,
            "init_sigma": cfg.init_sigma, "tmax": cfg.tmax, "lr": cfg.lr, "glr": cfg.glr,
            "ema_halflife_kimg": cfg.ema_halflife_kimg, "warmup_kimg": cfg.warmup_kimg,
            "adversarial_start_kimg": cfg.adversarial_start_kimg, "dropout": cfg.dropout,
            "lr_scheduler": cfg.lr_scheduler, "ls": cfg.fake_score_loss_scale, "lsd": cfg.discriminator_loss_scale,
            "lsg": cfg.sid_loss_scale, "lsg_gan": cfg.adversarial_loss_scale,
            "mixed_precision": cfg.mixed_precision,
            "id2label": getattr(dataset, "id2label", None) if teacher.is_conditional else None,
            "label_dim": teacher.label_dim, "resolution": teacher.img_resolution, "channels": teacher.img_channels,
            "latent": teacher.family == "edm2", "metrics": dict(metrics or {}),
            "teacher_metrics": dict(teacher_metrics) if teacher_metrics else None,
            "teacher_nfe": teacher_nfe if teacher_metrics else None,
            "sampling": {"init_sigma": cfg.init_sigma, "num_steps": 1, "num_samples": cfg.eval_num_samples},
            "generator_init": cfg.generator_init, "seed": seed}


def plot_loss_curves(output_dir: Path) -> Optional[Path]:
    """`loss_curves.png` from the run's stats.jsonl."""
    path = output_dir / "stats.jsonl"
    if not path.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = [n for n in LOSS_NAMES if any(n in r for r in records)]
    if not names:
        return None
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ax.plot([r["kimg"] for r in records if name in r], [r[name] for r in records if name in r])
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("kimg")
    fig.tight_layout()
    fig.savefig(output_dir / "loss_curves.png", dpi=100)
    plt.close(fig)
    return output_dir / "loss_curves.png"


def export(pipe: SiDAPipeline, out_dir: Path, info: dict, grid_side: int, repo_id: Optional[str] = None) -> Path:
    """Write the pipeline folder of the EMA generator (model card included) via `hub.export_pipeline`."""
    from sida_diffusers.hub import export_pipeline

    export_pipeline(pipe.denoiser, out_dir, info, vae=pipe.vae, grid=grid_side > 0, grid_seeds=range(grid_side ** 2),
                    repo_id=repo_id)
    return out_dir
