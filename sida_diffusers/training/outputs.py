"""What a run writes besides checkpoints: sample grids, in-training evaluation, the run record, loss curves, the
exported pipeline. Every image here comes from one `SiDAPipeline` over the EMA generator (`sampling_pipeline`),
through `generate_uint8`, the same path as `sida-eval`, `sida-sample` and the benchmarks; the grids are
`pipelines.sample_grid`, as the exported card's and `sida-sample --grid`'s; the export publishes that same pipeline
(`hub.publish`) with the `RunRecord` of the run (docs/ARCHITECTURE.md §3, §5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sida_diffusers.evaluation import plot_curves
from sida_diffusers.networks.base import Denoiser
from sida_diffusers.pipelines import SiDAPipeline, sample_grid
from sida_diffusers.run_record import RunRecord
from sida_diffusers.training import few_step
from sida_diffusers.training.config import TrainConfig


LOSS_NAMES = ("fake_score_loss", "d_loss", "g_loss", "g_gan_loss")  # logged as in ALGORITHM.md §5.11


def load_vae(name: str, device: torch.device):
    """EDM2's `AutoencoderKL` (frozen, eval mode) that decodes latents for grids, evaluation and export (§6.1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(name).to(device).eval().requires_grad_(False)


def latent_config(teacher: Denoiser) -> tuple:
    """(latent_scale, latent_bias) of the run's pipeline and record: EDM2's normalisation for an EDM2 teacher
    (ALGORITHM.md §6.1), (None, None) for pixels."""
    from sida_diffusers.latents import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE

    return (EDM2_LATENT_SCALE.tolist(), EDM2_LATENT_BIAS.tolist()) if teacher.family == "edm2" else (None, None)


def sampling_pipeline(generator_ema: Denoiser, teacher: Denoiser, init_sigma: float, vae=None,
                      id2label: Optional[dict] = None, step_sigmas: Optional[list] = None, renoise: str = "fresh"):
    """The `SiDAPipeline` of the EMA generator (progress bar off): every figure and export of the run uses it. It
    carries the run's step grid (ALGORITHM.md §11), so a call without `num_inference_steps` runs all K steps."""
    scale, bias = latent_config(teacher)
    pipe = SiDAPipeline(unet=generator_ema, vae=vae, init_sigma=init_sigma, id2label=id2label, latent_scale=scale,
                        latent_bias=bias, step_sigmas=step_sigmas, renoise=renoise)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sample_grid(pipe: SiDAPipeline, path: Path, side: int) -> Path:
    """The `side` x `side` `sample_grid` of seeds 0.. as a PNG (the exported card shows the same grid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(pipe, range(side * side)).save(path)
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
    from sida_diffusers.evaluation import step_result_key
    first = cfg.eval_metrics[0]
    tracked = step_result_key(result_keys(first, cfg.eval_num_samples)[0], few_step.best_steps(cfg))  # §11: k = K by default
    return suite, BestTracker(tracked, "max" if first == "is" else "min")


def evaluate(suite, pipe, label_pool, steps=(1,)) -> dict:
    """The suite's metrics of `pipe` on seeds 0..N-1, labels drawn per seed from `label_pool` (§9.1), sampled with each
    of `steps` (ALGORITHM.md §11; names from `evaluation.step_result_key`: `fd_digits_1797` for one step,
    `fd_digits_1797@4steps` for four): exactly what ``sida-eval PIPELINE --num-samples N --repeats 1 [--steps k]``
    computes for the exported pipeline."""
    from sida_diffusers.evaluation import pipeline_sample_fn, step_result_key

    return {step_result_key(key, k): value for k in steps
            for key, value in suite.evaluate(pipeline_sample_fn(pipe, 0, label_pool, num_inference_steps=k)).items()}


def log_record(accelerator, path: Path, record: dict, cur_nimg: int) -> None:
    """One line of `stats.jsonl` / `metrics.jsonl` (main process), the same values to the Accelerate trackers
    (stepped by images seen) and to the console."""
    accelerator.log({k: v for k, v in record.items() if k != "kimg"}, step=cur_nimg)
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        from sida_diffusers.evaluation import append_metrics_jsonl

        append_metrics_jsonl(path, record)
        tqdm.write(f"kimg {record['kimg']:.3f} " + " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "kimg"))


# ---- the run record, curves, export --------------------------------------------------------------------------------

def run_record(cfg: TrainConfig, teacher: Denoiser, dataset, cur_nimg: int, total_batch_size: int, num_processes: int,
               seed: int, teacher_license: Optional[tuple] = None, metrics: Optional[dict] = None,
               teacher_metrics: Optional[dict] = None, teacher_nfe: Optional[int] = None) -> RunRecord:
    """The `RunRecord` of the run at `cur_nimg`, shared by checkpoints, the export and the model card; class names and
    latent settings as `sampling_pipeline` gives them to the pipeline."""
    license, license_name, license_link = teacher_license or (None, None, None)
    scale, bias = latent_config(teacher)
    latent = scale is not None
    return RunRecord(
        method=cfg.method, teacher=cfg.teacher, teacher_license=license, teacher_license_name=license_name,
        teacher_license_link=license_link, generator_init=cfg.generator_init, dataset=cfg.train_data,
        kimg=cur_nimg / 1000, cur_nimg=cur_nimg, alpha=cfg.alpha, lr=cfg.lr, glr=cfg.glr,
        ema_halflife_kimg=cfg.ema_halflife_kimg, warmup_kimg=cfg.warmup_kimg,
        adversarial_start_kimg=cfg.adversarial_start_kimg, dropout=cfg.dropout, lr_scheduler=cfg.lr_scheduler,
        ls=cfg.fake_score_loss_scale, lsd=cfg.discriminator_loss_scale, lsg=cfg.sid_loss_scale,
        lsg_gan=cfg.adversarial_loss_scale, train_batch_size=cfg.train_batch_size, num_processes=num_processes,
        total_batch_size=total_batch_size, mixed_precision=cfg.mixed_precision, init_sigma=cfg.init_sigma,
        tmax=cfg.tmax, seed=seed, resolution=teacher.img_resolution, channels=teacher.img_channels,
        label_dim=teacher.label_dim, id2label=getattr(dataset, "id2label", None) if teacher.is_conditional else None,
        latent=latent, latent_scale=scale, latent_bias=bias,
        vae=cfg.vae if latent else None, metrics=dict(metrics or {}),
        teacher_metrics=dict(teacher_metrics) if teacher_metrics else None,
        teacher_nfe=teacher_nfe if teacher_metrics else None,
        grid_size=cfg.sample_grid_size ** 2 or None, **few_step.record_fields(cfg))


def plot_loss_curves(output_dir: Path) -> Optional[Path]:
    """`loss_curves.png` from the run's stats.jsonl (None before the first logged loss)."""
    path = output_dir / "stats.jsonl"
    if not path.is_file() or not any(name in path.read_text() for name in LOSS_NAMES):
        return None
    return plot_curves(path, output_dir / "loss_curves.png", names=LOSS_NAMES, label=None)


def export(pipe: SiDAPipeline, out_dir: Path, record: RunRecord, grid_side: int, repo_id: Optional[str] = None) -> Path:
    """Publish the run's own pipeline (the EMA generator, its VAE and latent config) with its model card and grid."""
    from sida_diffusers.hub import publish

    publish(pipe, out_dir, record, grid_seeds=range(grid_side ** 2), repo_id=repo_id)
    return out_dir
