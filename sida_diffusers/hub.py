"""Export a distilled generator as a SiDAPipeline folder with a model card, and push that folder to the Hub.

`export_pipeline` writes everything that is published (weights as safetensors, model_index.json, a sample grid, the
README.md model card and run_info.json); `push_to_hub` uploads that folder unchanged, so what is pushed is what was
saved and checked locally. The card is written from `run_info` (docs/ARCHITECTURE.md §3).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, upload_folder

from sida_diffusers.evaluation import parse_result_key
from sida_diffusers.latents import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE
from sida_diffusers.networks import Denoiser
from sida_diffusers.pipelines.pipeline_sida import (
    SiDAPipeline,
    image_grid,
    seed_generators,
)

GRID_NAME = "samples_grid.png"
METHOD_NAMES = {"sid": "SiD", "sida": "SiDA", "sid2a": "SiD²A"}
# Hub dataset ids of the benchmark datasets, matched against the run's dataset name or path.
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar-10": "uoft-cs/cifar10", "imagenet": "ILSVRC/imagenet-1k",
                "img512": "ILSVRC/imagenet-1k", "img64": "ILSVRC/imagenet-1k"}
# Display names of the metrics the evaluation code reports; fd_digits is a proxy by construction.
METRIC_NAMES = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "is": "Inception Score", "kid": "KID",
                "precision": "Precision", "recall": "Recall", "fd_digits": "FD-digits"}
# Files that never belong in a published pipeline folder.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "checkpoints/**", ".tmp-*", "**/.tmp-*", "*.pt", "logs/**"]


# ---- licence, base model, dataset ---------------------------------------------------------------------------------
def teacher_license(teacher: Optional[str]) -> tuple:
    """(Hub licence id, note) inherited from the teacher's weights.

    NVIDIA's EDM/EDM2 weights, and the SiD/SiDA generators distilled from them, are CC BY-NC-SA 4.0; our shipped
    digits teacher is Apache-2.0; anything else is "other" with a note asking the publisher to check.
    """
    from sida_diffusers.checkpoints import KNOWN_CHECKPOINTS

    name = str(teacher or "").lower()
    stem = Path(name.split("?")[0]).name
    if "digits" in name:
        return "apache-2.0", "The teacher is the tiny digits EDM model shipped with sida_diffusers (Apache-2.0)."
    if ("nvlabs" in name or "ut-austin-pml" in name or stem.startswith(("edm-", "edm2-"))
            or name in KNOWN_CHECKPOINTS):
        return "cc-by-nc-sa-4.0", ("The teacher weights are NVIDIA's EDM/EDM2 models, licensed CC BY-NC-SA 4.0 "
                                   "(non-commercial, share-alike); this derived generator inherits that licence.")
    return "other", (f"The licence of the teacher `{teacher}` is unknown to the exporter: check it and set the licence "
                     "of this repository to match before using or sharing the weights.")


def _hub_id(value: Optional[str]) -> Optional[str]:
    """`value` if it reads as an 'owner/name' Hub id (not a URL, not an existing local path), else None."""
    if not value or "://" in value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return None
    return value if re.fullmatch(r"[\w.-]+/[\w.-]+", value) else None


def _hub_dataset(dataset: Optional[str]) -> Optional[str]:
    if not dataset:
        return None
    if _hub_id(dataset):
        return dataset
    stem = Path(str(dataset)).name.lower()
    return next((hub for key, hub in HUB_DATASETS.items() if key in stem), None)


# ---- metrics ------------------------------------------------------------------------------------------------------
def describe_metric(key: str, num_samples: Optional[int] = None) -> tuple:
    """(metric type, honest display name) of a metric result name, as `MetricSuite` writes them: 'fid_50k',
    'fid_10k', 'fd_digits_1797', 'precision_50k' (`evaluation.parse_result_key`). A bare metric name ('fid') takes
    its sample count from `num_samples`.

    Fewer than 50k samples makes an FID-style number a proxy, not comparable to published 50k values; FD-digits is
    always a proxy (a Fréchet distance in a small digits classifier's feature space, not FID).
    """
    try:
        metric, count = parse_result_key(key)
    except ValueError:
        metric, count = key, num_samples
    display = METRIC_NAMES.get(metric, metric)
    notes = []
    if count:
        notes.append(f"{count:,} samples")
    if metric == "fd_digits":
        notes.append("proxy metric in a digits-classifier feature space, not FID")
    elif metric in ("fid", "fd_dinov2", "kid", "is") and count and count < 50_000:
        notes.append("proxy, not comparable to 50k-sample values")
    return metric, display + (f" ({'; '.join(notes)})" if notes else "")


def _metric_rows(run_info: dict) -> list:
    num_samples = (run_info.get("sampling") or {}).get("num_samples")
    rows = []
    for key, value in (run_info.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            rows.append((key, *describe_metric(key, num_samples), float(value)))
    return rows


# ---- the model card -----------------------------------------------------------------------------------------------
def usage_snippet(repo_id: str, conditional: bool = False) -> str:
    """The three lines that load the pipeline and generate images."""
    labels = ", class_labels=0" if conditional else ""
    return (f"from sida_diffusers import SiDAPipeline\n"
            f"pipe = SiDAPipeline.from_pretrained(\"{repo_id}\")\n"
            f"images = pipe(batch_size=16{labels}).images  # one network evaluation per image")


def make_model_card(run_info: dict, repo_id: Optional[str] = None, grid_image: Optional[str] = GRID_NAME,
                    license: Optional[str] = None) -> ModelCard:
    """Model card (YAML metadata + body) for a distilled generator, written from `run_info`.

    Metadata: library_name diffusers, pipeline_tag, tags, base_model (the teacher, when it is a Hub id), datasets,
    licence inherited from the teacher (`license` overrides it) and a model-index with the recorded metrics.
    """
    method = str(run_info.get("method", "sida")).lower()
    method_name = METHOD_NAMES.get(method, method)
    teacher = run_info.get("teacher")
    dataset = run_info.get("dataset")
    family = "edm2" if run_info.get("latent") else "edm"
    source = run_info.get("source")  # an official generator converted by sida-export
    inherited, license_note = teacher_license(teacher or source)
    license = license or inherited
    hub_dataset = _hub_dataset(dataset)
    rows = _metric_rows(run_info)
    model_name = (repo_id or "").split("/")[-1] or f"{method_name} one-step generator"
    eval_results = [
        EvalResult(task_type="unconditional-image-generation", dataset_type=hub_dataset or str(dataset or "unknown"),
                   dataset_name=str(dataset or "unknown"), metric_type=base, metric_name=display, metric_value=value)
        for _, base, display, value in rows
    ] or None
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="unconditional-image-generation", license=license,
        tags=list(dict.fromkeys(["sida", "one-step", "distillation", family, method])),
        base_model=_hub_id(teacher), datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_name if eval_results else None, eval_results=eval_results)

    batch_gpu, total, processes = (run_info.get(k) for k in ("train_batch_size", "total_batch_size", "num_processes"))
    facts = [("method", method_name), ("alpha", run_info.get("alpha")), ("teacher", teacher and f"`{teacher}`"),
             ("converted from", source and f"`{source}`"),
             ("dataset", dataset), ("training images", f"{run_info['kimg']} kimg" if "kimg" in run_info else None),
             ("batch per GPU", batch_gpu), ("processes", processes), ("total batch", total),
             ("init_sigma", run_info.get("init_sigma")), ("tmax", run_info.get("tmax")),
             ("resolution", run_info.get("resolution")), ("classes", run_info.get("label_dim"))]
    origin = f"the diffusion model `{teacher}`" if teacher else "an EDM/EDM2 diffusion model"
    lines = [f"# {model_name}", "",
             f"A one-step image generator distilled from {origin} with **{method_name}** "
             "(Score identity Distillation; Zhou et al., *Adversarial Score Identity Distillation: Rapidly Surpassing "
             "the Teacher in One Step*, ICLR 2025), trained with `sida_diffusers`. It needs one network evaluation "
             "per image.", ""]
    if grid_image:
        lines += [f"![samples from the one-step generator]({grid_image})", ""]
    lines += ["## Usage", "", "```python", usage_snippet(repo_id or "path/to/this/folder",
                                                          bool(run_info.get("label_dim"))), "```", "",
              "Pass `generator=[torch.Generator().manual_seed(s) for s in seeds]` for EDM-style per-seed "
              "reproducibility; `output_type=\"np\"` gives float32 arrays in [0, 1] (Diffusers' convention), "
              "exactly EDM's uint8 image / 255.", "",
              "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts if v is not None]
    if method in ("sida", "sid2a"):
        lines += ["", f"The adversarial loss of {method_name} is normalised over each GPU's own batch, so the "
                  f"objective depends on the batch per GPU ({batch_gpu}); changing the number of GPUs at a fixed "
                  "batch per GPU does not change it. Keep it when reproducing this run."]
    lines += ["", "## Metrics", ""]
    if rows:
        lines += ["| metric | value |", "|---|---|"] + [f"| {display} | {value:.4g} |" for _, _, display, value in rows]
    else:
        lines += ["No metrics were recorded for this checkpoint."]
    lines += ["", "## License", "", f"`{license}`. {license_note}", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ---- export and push ----------------------------------------------------------------------------------------------
def _latent_config(run_info: dict, vae) -> tuple:
    """(latent_scale, latent_bias) for an EDM2 latent run (ALGORITHM.md §6.1), (None, None) for pixels."""
    latent = run_info.get("latent")
    if not latent:
        return None, None
    if vae is None:
        raise ValueError("run_info says this is a latent (EDM2) model but no vae was given; pass "
                         "vae=AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-mse').")
    if isinstance(latent, dict) and "scale" in latent:
        return list(latent["scale"]), list(latent["bias"])
    return EDM2_LATENT_SCALE.tolist(), EDM2_LATENT_BIAS.tolist()


def export_pipeline(generator: Denoiser, out_dir: Union[str, os.PathLike], run_info: dict, vae=None,
                    grid: bool = True, grid_seeds: Iterable[int] = range(64), repo_id: Optional[str] = None,
                    batch_size: int = 16) -> SiDAPipeline:
    """Write the SiDAPipeline folder of `generator`: safetensors weights, model_index.json, `samples_grid.png`
    (seeds `grid_seeds`), README.md model card and run_info.json. Returns the pipeline."""
    scale, bias = _latent_config(run_info, vae)
    pipe = SiDAPipeline(unet=generator, vae=vae, init_sigma=run_info.get("init_sigma") or 2.5,
                        id2label=run_info.get("id2label"), latent_scale=scale, latent_bias=bias)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if grid:
        seeds = list(grid_seeds)
        device = next(generator.parameters()).device
        was_training = generator.training
        generator.eval()  # dropout off, as for evaluation (ALGORITHM.md §9.1)
        pipe.set_progress_bar_config(disable=True)
        try:
            images = [image for i in range(0, len(seeds), batch_size)
                      for image in pipe(batch_size=len(seeds[i:i + batch_size]),
                                        generator=seed_generators(seeds[i:i + batch_size], device)).images]
        finally:
            generator.train(was_training)
        image_grid(images).save(out_dir / GRID_NAME)
    make_model_card(run_info, repo_id=repo_id, grid_image=GRID_NAME if grid else None).save(out_dir / "README.md")
    (out_dir / "run_info.json").write_text(json.dumps(run_info, indent=2, default=str))
    return pipe


def push_to_hub(folder: Union[str, os.PathLike], repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Upload SiDA one-step generator"):
    """Create `repo_id` if needed and upload the exported `folder` as it is (training checkpoints excluded)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not an exported pipeline folder (no model_index.json); run "
                                "export_pipeline(...) or `sida-export SRC DST` first and push DST.")
    create_repo(repo_id, private=private, token=token, exist_ok=True)
    return upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token,
                         ignore_patterns=HUB_IGNORE_PATTERNS)
