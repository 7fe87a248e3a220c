"""The Hub model card of a distilled generator, written from the run's `run_info` (docs/ARCHITECTURE.md §3).

Metadata as the Hub reads it: `library_name`, `pipeline_tag`, `tags`, `license` (inherited from the teacher),
`base_model` and `datasets` where they are Hub ids, and a `model-index` of the recorded metrics. The body: the sample
grid, how to install and load the pipeline (with sida_diffusers, and with plain Diffusers through the standalone
module shipped in the folder), the student's metrics beside the teacher's, the training settings that matter, the
citation and the licence. Metric names are read with `evaluation.parse_result_key`, as the metric suite writes them.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sida_diffusers.evaluation import parse_result_key
from sida_diffusers.pipelines.publishing import GRID_NAME, REPO_PLACEHOLDER


METHOD_NAMES = {"sid": "SiD", "sida": "SiDA", "sid2a": "SiD²A"}
# Hub dataset ids of the benchmark datasets, matched against the run's dataset name or path.
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar-10": "uoft-cs/cifar10", "imagenet": "ILSVRC/imagenet-1k",
                "img512": "ILSVRC/imagenet-1k", "img64": "ILSVRC/imagenet-1k"}
# Display names of the metrics the evaluation code reports; fd_digits is a proxy by construction.
METRIC_NAMES = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "is": "Inception Score", "kid": "KID",
                "precision": "Precision", "recall": "Recall", "fd_digits": "FD-digits"}
# run_info key -> row of the training table; absent keys are left out (older runs do not record them all).
TRAINING_SETTINGS = (
    ("alpha", "alpha"), ("lr", "learning rate, fake score / discriminator"), ("glr", "learning rate, generator"),
    ("ema_halflife_kimg", "EMA half-life (kimg)"), ("warmup_kimg", "generator warm-up (kimg)"),
    ("adversarial_start_kimg", "adversarial loss from (kimg)"), ("dropout", "dropout"),
    ("lr_scheduler", "learning-rate schedule"), ("ls", "fake-score loss scale (ls)"),
    ("lsd", "discriminator loss scale (lsd)"), ("lsg", "SiD generator loss scale (lsg)"),
    ("lsg_gan", "adversarial generator loss scale (lsg_gan)"),
    ("train_batch_size", "batch per GPU"), ("num_processes", "processes"), ("total_batch_size", "total batch"),
    ("init_sigma", "init_sigma"), ("tmax", "tmax"),
)
CITATION = """@inproceedings{zhou2025sida,
  title     = {Adversarial Score Identity Distillation: Rapidly Surpassing the Teacher in One Step},
  author    = {Zhou, Mingyuan and Zheng, Huangjie and Gu, Yi and Wang, Zhendong and Huang, Hai},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2410.14919}
}"""


# ---- licence, base model, dataset ---------------------------------------------------------------------------------
def teacher_license(teacher: Optional[str]) -> tuple:
    """(Hub licence id, note) inherited from the teacher's weights.

    NVIDIA's EDM/EDM2 weights, and the SiD/SiDA generators distilled from them, are CC BY-NC-SA 4.0; our shipped
    digits teacher is Apache-2.0; anything else is "other" with a note asking the publisher to check.
    """
    from sida_diffusers.pretrained import KNOWN_NETWORKS

    name = str(teacher or "").lower()
    stem = Path(name.split("?")[0]).name
    if "digits" in name:
        return "apache-2.0", "The teacher is a tiny digits model shipped with sida_diffusers (Apache-2.0)."
    if name.startswith("google/ddpm-"):
        return "apache-2.0", ("The teacher is one of Google's DDPM checkpoints on the Hub (Apache-2.0); this derived "
                              "generator inherits that licence.")
    if ("nvlabs" in name or "ut-austin-pml" in name or stem.startswith(("edm-", "edm2-"))
            or name in KNOWN_NETWORKS):
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


def _finite(values: Optional[dict]) -> dict:
    return {k: float(v) for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _metrics_section(run_info: dict) -> list:
    """The student's metrics, with the teacher's beside them when the run measured it."""
    num_samples = (run_info.get("sampling") or {}).get("num_samples")
    student, teacher = _finite(run_info.get("metrics")), _finite(run_info.get("teacher_metrics"))
    keys = list(dict.fromkeys([*student, *teacher]))
    if not keys:
        return ["No metrics were recorded for this checkpoint."]
    if not teacher:
        return (["| metric | value |", "|---|---|"]
                + [f"| {describe_metric(k, num_samples)[1]} | {student[k]:.4g} |" for k in keys])
    nfe = run_info.get("teacher_nfe")
    teacher_label = f"teacher ({nfe} NFE)" if nfe else "teacher (multi-step sampler)"
    def cell(values, key):
        return f"{values[key]:.4g}" if key in values else "—"

    return ([f"| metric | this model (1 NFE) | {teacher_label} |", "|---|---|---|"]
            + [f"| {describe_metric(k, num_samples)[1]} | {cell(student, k)} | {cell(teacher, k)} |" for k in keys]
            + ["", "The teacher column is the teacher itself, sampled with its multi-step (Heun) sampler and scored "
                   "with the same metric."])


# ---- usage --------------------------------------------------------------------------------------------------------
def usage_snippet(repo_id: str, conditional: bool = False) -> str:
    """Loading with sida_diffusers, and generating one image per seed."""
    labels = ", class_labels=0" if conditional else ""
    return (f"from sida_diffusers import SiDAPipeline, seed_generators\n"
            f"pipe = SiDAPipeline.from_pretrained(\"{repo_id}\")\n"
            f"images = pipe(batch_size=16{labels}, generator=seed_generators(range(16))).images  "
            "# one network evaluation per image")


def remote_code_snippet(repo_id: str, conditional: bool = False) -> str:
    """Loading with plain Diffusers, through the standalone module shipped in the folder."""
    labels = ", class_labels=0" if conditional else ""
    return (f"import torch\nfrom diffusers import DiffusionPipeline\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"{repo_id}\", trust_remote_code=True)\n"
            f"generator = [torch.Generator().manual_seed(seed) for seed in range(16)]\n"
            f"images = pipe(batch_size=16{labels}, generator=generator).images")


# ---- the card -----------------------------------------------------------------------------------------------------
def make_model_card(run_info: dict, repo_id: Optional[str] = None, grid_image: Optional[str] = GRID_NAME,
                    license: Optional[str] = None) -> ModelCard:
    """Model card (YAML metadata + body) for a distilled generator, written from `run_info`.

    `repo_id` goes into the usage snippets (a placeholder that `SiDAPipeline.push_to_hub` replaces when None);
    `license` overrides the licence inherited from the teacher.
    """
    method = str(run_info.get("method", "sida")).lower()
    method_name = METHOD_NAMES.get(method, method)
    teacher, dataset = run_info.get("teacher"), run_info.get("dataset")
    source = run_info.get("source")  # an official generator converted by sida-export
    inherited, license_note = teacher_license(teacher or source)
    license = license or inherited
    hub_dataset = _hub_dataset(dataset)
    num_samples = (run_info.get("sampling") or {}).get("num_samples")
    model_name = (repo_id or "").split("/")[-1] or f"{method_name} one-step generator"
    eval_results = [
        EvalResult(task_type="unconditional-image-generation", dataset_type=hub_dataset or str(dataset or "unknown"),
                   dataset_name=str(dataset or "unknown"), metric_type=metric, metric_name=display,
                   metric_value=value)
        for key, value in _finite(run_info.get("metrics")).items()
        for metric, display in [describe_metric(key, num_samples)]
    ] or None
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="unconditional-image-generation", license=license,
        tags=list(dict.fromkeys(["sida", "one-step", "distillation", "edm2" if run_info.get("latent") else "edm",
                                 method])),
        base_model=_hub_id(teacher), datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_name if eval_results else None, eval_results=eval_results)

    repo = repo_id or REPO_PLACEHOLDER
    conditional = bool(run_info.get("label_dim"))
    origin = f"the diffusion model `{teacher}`" if teacher else "an EDM/EDM2 diffusion model"
    lines = [f"# {model_name}", "",
             f"A one-step image generator distilled from {origin} with **{method_name}** "
             "(Score identity Distillation; Zhou et al., *Adversarial Score Identity Distillation: Rapidly Surpassing "
             "the Teacher in One Step*, ICLR 2025), trained with `sida_diffusers`. It needs one network evaluation "
             "per image.", ""]
    if grid_image:
        lines += [f"![samples from the one-step generator]({grid_image})", "",
                  "*One network evaluation per image, one seed per image (enlarged with nearest-neighbour "
                  "upsampling, so every pixel is the model's).*", ""]
    lines += ["## Usage", "", "```bash", "pip install sida_diffusers", "```", "",
              "```python", usage_snippet(repo, conditional), "```", "",
              "Without `sida_diffusers`, plain Diffusers loads the same pipeline from the standalone module shipped "
              "in this repository (`sida_standalone.py`, generated from the package when it was saved) and gives "
              "the same images for the same generators:", "",
              "```python", remote_code_snippet(repo, conditional), "```", "",
              "A list of generators, one per image, makes image *i* depend on seed *i* only (EDM's `--seeds`). "
              "`output_type=\"np\"` gives float32 arrays in [0, 1] (Diffusers' convention), exactly EDM's uint8 "
              "image / 255: `np.round(images * 255)` gives back its bytes.", "",
              "## Results", "", *_metrics_section(run_info), "",
              "## Training", "", *_training_table(run_info, method_name, source)]
    if method in ("sida", "sid2a"):
        lines += ["", f"The adversarial loss of {method_name} is normalised over each GPU's own batch, so the "
                  f"objective depends on the batch per GPU ({run_info.get('train_batch_size')}); changing the number "
                  "of GPUs at a fixed batch per GPU does not change it. Keep it when reproducing this run."]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", "",
              "## License", "", f"`{license}`. {license_note}", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _training_table(run_info: dict, method_name: str, source: Optional[str]) -> list:
    teacher = run_info.get("teacher")
    rows = [("method", method_name), ("teacher", teacher and f"`{teacher}`"),
            ("converted from", source and f"`{source}`"), ("dataset", run_info.get("dataset")),
            ("training images", f"{run_info['kimg']} kimg" if "kimg" in run_info else None)]
    rows += [(label, run_info.get(key)) for key, label in TRAINING_SETTINGS]
    rows += [("resolution", run_info.get("resolution")), ("classes", run_info.get("label_dim"))]
    return ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
