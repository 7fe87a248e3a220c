"""The Hub model card of a distilled generator, written from the run's `RunRecord` (docs/ARCHITECTURE.md §3).

Metadata as the Hub reads it: `library_name`, `pipeline_tag` (unconditional models; class-conditional ones are
tagged so), `tags`, `license` (the teacher's declared licence; `other` with `license_name`/`license_link` when it is
unknown), `base_model` and `datasets` where they are Hub ids, and a `model-index` of the recorded metrics. The body:
the sample grid, how to install and load the pipeline (with sida_diffusers, and with plain Diffusers through the
standalone module shipped in the folder), the student's metrics beside the teacher's, the training table (the
`RunRecord` fields with a `card` label), the citation and the licence.

Every string of the record is someone's input (a teacher path, a dataset name, metric names): the card escapes each
one for Markdown and HTML before it reaches the body or the front matter, and shows local paths by their last part
only. Metric names are read with `evaluation.parse_result_key`, as the metric suite writes them.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sida_diffusers.evaluation import parse_result_key, parse_step_result_key
from sida_diffusers.pipelines.publishing import GRID_NAME, REPO_PLACEHOLDER
from sida_diffusers.run_record import RunRecord, as_record, finite_metrics


METHOD_NAMES = {"sid": "SiD", "sida": "SiDA", "sid2a": "SiD²A"}
# Hub dataset ids of the benchmark datasets, matched against the last part of the run's dataset name or path.
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar-10": "uoft-cs/cifar10", "imagenet": "ILSVRC/imagenet-1k",
                "img512": "ILSVRC/imagenet-1k", "img64": "ILSVRC/imagenet-1k"}
# Display names of the metrics the evaluation code reports; fd_digits is a proxy by construction.
METRIC_NAMES = {"fid": "FID", "fd_dinov2": "FD_DINOv2", "is": "Inception Score", "kid": "KID",
                "precision": "Precision", "recall": "Recall", "fd_digits": "FD-digits"}
UNKNOWN_LICENSE_NAME = "unknown-teacher-license"
CITATION = """@inproceedings{zhou2025sida,
  title     = {Adversarial Score Identity Distillation: Rapidly Surpassing the Teacher in One Step},
  author    = {Zhou, Mingyuan and Zheng, Huangjie and Gu, Yi and Wang, Zhendong and Huang, Hai},
  booktitle = {The Thirteenth International Conference on Learning Representations (ICLR)},
  year      = {2025},
  url       = {https://arxiv.org/abs/2410.14919}
}"""

_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]#!|~$])")  # emphasis, code, links, images, tables, math
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
_SAFE_LINK = re.compile(r"https://[\w.-]+(/[\w./%~+-]*)?")


# ---- escaping -----------------------------------------------------------------------------------------------------
def escape(value, markdown: bool = True) -> str:
    """`value` as text that renders as itself in HTML and (with `markdown`, for the body) Markdown: one line, HTML
    special characters as entities, Markdown punctuation backslash-escaped, and ':' as an entity so that no autolink
    is made. Front-matter strings take `markdown=False` (YAML shows backslashes as they are)."""
    text = " ".join(str(value).split())
    text = html.escape(text, quote=True).replace(":", "&#58;")
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text) if markdown else text


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(value))[:64] or "unknown"


def public_name(value: Optional[str]) -> Optional[str]:
    """A Hub id or URL as it is; a local path by its last part (a card never shows someone's file system)."""
    if not value:
        return None
    value = str(value)
    if "://" in value or hub_id(value):
        return value
    return Path(value.rstrip("/\\")).name or value


def hub_id(value: Optional[str]) -> Optional[str]:
    """`value` if it reads as an 'owner/name' Hub id (not a URL, not an existing local path), else None."""
    if not value or "://" in value or value.startswith((".", "/", "~")) or os.path.exists(value):
        return None
    return value if _HUB_ID.fullmatch(value) else None


def hub_dataset(dataset: Optional[str]) -> Optional[str]:
    if not dataset:
        return None
    if hub_id(dataset):
        return dataset
    stem = Path(str(dataset)).name.lower()
    return next((hub for key, hub in HUB_DATASETS.items() if key in stem), None)


# ---- licence ------------------------------------------------------------------------------------------------------
def card_license(record: RunRecord) -> tuple:
    """``(license, license_name, license_link, note)`` from the teacher's declared licence only.

    The record carries what the teacher declared when the run started (`RunRecord.teacher_license`); an older record
    without it is looked up in our table of known teachers (`pretrained.declared_license`, no network). Unknown means
    ``other`` with a licence name that says so, and a note asking the publisher to check.
    """
    declared = None
    if record.teacher_license:
        declared = (record.teacher_license, record.teacher_license_name, record.teacher_license_link)
    else:
        from sida_diffusers.pretrained import declared_license

        declared = declared_license(record.teacher or record.source, online=False)
    teacher = escape(public_name(record.teacher or record.source) or "unknown")
    if declared is None or not _LICENSE_ID.fullmatch(declared[0]):
        return ("other", UNKNOWN_LICENSE_NAME, None,
                f"The licence of the teacher {teacher} is unknown to sida_diffusers: check the teacher's licence and "
                "set the licence of this repository to match before using or sharing the weights.")
    license, name, link = declared
    name = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-")[:64] if name else None
    link = link if link and _SAFE_LINK.fullmatch(link) else None
    if license == "other":
        name = name or UNKNOWN_LICENSE_NAME
        return license, name, link, (f"The teacher {teacher} declares its own licence ({escape(name)}); this derived "
                                     "generator inherits it.")
    return license, None, None, (f"The teacher {teacher} is licensed `{license}`; this derived generator inherits "
                                 "that licence.")


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


def split_steps(name: str) -> tuple:
    """(result name, sampling steps) of a recorded metric name (`fd_digits_1797@4steps` -> 4 steps; ALGORITHM.md §11)."""
    try:
        return parse_step_result_key(name)
    except ValueError:
        return name, 1


def _metrics_section(record: RunRecord) -> list:
    """The student's metrics (a column per number of sampling steps of a few-step generator), with the teacher's
    beside them when the run measured it."""
    student, teacher = {}, finite_metrics(record.teacher_metrics)
    for key, value in finite_metrics(record.metrics).items():
        result, steps = split_steps(key)
        student.setdefault(steps, {})[result] = value
    steps = sorted(student) or [1]
    keys = list(dict.fromkeys([*(key for k in steps for key in student.get(k, {})), *teacher]))
    if not keys:
        return ["No metrics were recorded for this checkpoint."]

    def name(key):
        return escape(describe_metric(key, record.num_samples)[1])

    def cell(values, key):
        return f"{values[key]:.4g}" if key in values else "—"

    if not teacher and steps == [1]:
        return ["| metric | value |", "|---|---|"] + [f"| {name(k)} | {student[1][k]:.4g} |" for k in keys]
    nfe = record.teacher_nfe
    columns = [f"this model ({k} NFE)" for k in steps]
    columns += [f"teacher ({nfe} NFE)" if nfe else "teacher (multi-step sampler)"] if teacher else []
    lines = [f"| metric | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name(key)} | " + " | ".join([cell(student.get(k, {}), key) for k in steps]
                                                + ([cell(teacher, key)] if teacher else [])) + " |" for key in keys]
    if len(steps) > 1:
        lines += ["", "A column per number of steps the generator was sampled with (`num_inference_steps`), along the "
                      "step grid it was trained on."]
    if teacher:
        lines += ["", "The teacher column is the teacher itself, sampled with its multi-step (Heun) sampler and scored "
                      "with the same metric."]
    return lines


# ---- usage --------------------------------------------------------------------------------------------------------
def usage_snippet(repo_id: str, conditional: bool = False, num_steps: int = 1) -> str:
    """Loading with sida_diffusers, and generating one image per seed (a few-step generator: with K and 1 step)."""
    labels = ", class_labels=0" if conditional else ""
    snippet = (f"from sida_diffusers import SiDAPipeline, seed_generators\n"
               f"pipe = SiDAPipeline.from_pretrained(\"{repo_id}\")\n"
               f"images = pipe(batch_size=16{labels}, generator=seed_generators(range(16))).images  ")
    if num_steps == 1:
        return snippet + "# one network evaluation per image"
    return (snippet + f"# {num_steps} steps, the trained number\n"
            f"images = pipe(batch_size=16{labels}, generator=seed_generators(range(16)), num_inference_steps=1).images"
            f"  # any 1..{num_steps}")


def remote_code_snippet(repo_id: str, conditional: bool = False) -> str:
    """Loading with plain Diffusers, through the standalone module shipped in the folder."""
    labels = ", class_labels=0" if conditional else ""
    return (f"import torch\nfrom diffusers import DiffusionPipeline\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"{repo_id}\", trust_remote_code=True)\n"
            f"generator = [torch.Generator().manual_seed(seed) for seed in range(16)]\n"
            f"images = pipe(batch_size=16{labels}, generator=generator).images")


# ---- the card -----------------------------------------------------------------------------------------------------
def make_model_card(record: Union[RunRecord, dict], repo_id: Optional[str] = None,
                    grid_image: Optional[str] = GRID_NAME, license: Optional[str] = None) -> ModelCard:
    """Model card (YAML metadata + body) for a distilled generator, written from its run record.

    `repo_id` goes into the usage snippets (a placeholder that `SiDAPipeline.push_to_hub` replaces when None);
    `license` (a Hub licence id) overrides the licence inherited from the teacher.
    """
    record = as_record(record)
    if repo_id is not None and not _HUB_ID.fullmatch(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id; pass 'owner/name'.")
    method_name = METHOD_NAMES.get(record.method.lower()) or escape(record.method)
    card_license_id, license_name, license_link, license_note = card_license(record)
    if license:
        if not _LICENSE_ID.fullmatch(license):
            raise ValueError(f"{license!r} is not a Hub licence id (e.g. apache-2.0, cc-by-nc-sa-4.0, other).")
        card_license_id, license_note = license, "Set by the publisher."
        license_name = (license_name or UNKNOWN_LICENSE_NAME) if license == "other" else None
    dataset = hub_dataset(record.dataset)
    dataset_shown = escape(public_name(record.dataset) or "unknown", markdown=False)
    num_steps = record.num_steps or 1  # a few-step generator (ALGORITHM.md §11)
    model_name = (repo_id or "").split("/")[-1] or f"{method_name} {'one' if num_steps == 1 else num_steps}-step generator"
    task = "class-conditional-image-generation" if record.conditional else "unconditional-image-generation"
    eval_results = [
        EvalResult(task_type=task, dataset_type=dataset or "custom", dataset_name=dataset_shown,
                   metric_type=_slug(metric), metric_value=value,
                   metric_name=escape(display if steps == 1 else f"{display}, {steps} steps", markdown=False))
        for name, value in finite_metrics(record.metrics).items()
        for key, steps in [split_steps(name)]
        for metric, display in [describe_metric(key, record.num_samples)]
    ] or None
    data = ModelCardData(
        library_name="diffusers", pipeline_tag=None if record.conditional else "unconditional-image-generation",
        license=card_license_id, license_name=license_name if card_license_id == "other" else None,
        license_link=license_link if card_license_id == "other" else None,
        tags=list(dict.fromkeys(["sida", "one-step" if num_steps == 1 else "few-step", "distillation", "edm2" if record.latent else "edm",
                                 "class-conditional" if record.conditional else "unconditional",
                                 _slug(record.method.lower())])),
        base_model=hub_id(record.teacher), datasets=[dataset] if dataset else None,
        model_name=escape(model_name, markdown=False) if eval_results else None, eval_results=eval_results)

    repo = repo_id or REPO_PLACEHOLDER
    teacher = public_name(record.teacher)
    origin = f"the diffusion model {escape(teacher)}" if teacher else "an EDM/EDM2 diffusion model"
    kind = "class-conditional " if record.conditional else ""
    steps_kind = "one-step" if num_steps == 1 else f"few-step ({num_steps}-step)"
    cost = "It needs one network evaluation per image." if num_steps == 1 else (
        f"It was trained to be sampled with any 1 to {num_steps} network evaluations per image "
        f"(`num_inference_steps`, default {num_steps}), along the step grid in the training table.")
    lines = [f"# {escape(model_name)}", "",
             f"A {steps_kind} {kind}image generator distilled from {origin} with **{method_name}** "
             "(Score identity Distillation; Zhou et al., *Adversarial Score Identity Distillation: Rapidly Surpassing "
             f"the Teacher in One Step*, ICLR 2025), trained with `sida_diffusers`. {cost}", ""]
    if grid_image:
        alt = "one-step generator" if num_steps == 1 else f"{num_steps}-step generator"
        evaluations = "One network evaluation" if num_steps == 1 else f"{num_steps} network evaluations"
        lines += [f"![samples from the {alt}]({grid_image})", "",
                  f"*{evaluations} per image, one seed per image, each image's class label drawn from its "
                  "seed (enlarged with nearest-neighbour upsampling, so every pixel is the model's).*", ""]
    lines += ["## Usage", "", "```bash", "pip install sida_diffusers", "```", "",
              "```python", usage_snippet(repo, record.conditional, num_steps), "```", "",
              "Without `sida_diffusers`, plain Diffusers loads the same pipeline from the standalone module shipped "
              "in this repository (`sida_standalone.py`, generated from the package when it was saved) and gives "
              "the same images for the same generators:", "",
              "```python", remote_code_snippet(repo, record.conditional), "```", "",
              "A list of generators, one per image, makes image *i* depend on seed *i* only (EDM's `--seeds`). "
              "`output_type=\"np\"` gives float32 arrays in [0, 1] (Diffusers' convention), exactly EDM's uint8 "
              "image / 255: `np.round(images * 255)` gives back its bytes.", "",
              "## Results", "", *_metrics_section(record), "",
              "## Training", "", *_training_table(record, method_name)]
    if record.method in ("sida", "sid2a"):
        batch = f" ({record.train_batch_size})" if record.train_batch_size else ""
        lines += ["", f"The adversarial loss of {method_name} is normalised over each GPU's own batch, so the "
                  f"objective depends on the batch per GPU{batch}; changing the number of GPUs at a fixed batch per "
                  "GPU does not change it. Keep it when reproducing this run."]
    shown_license = f"{card_license_id} ({license_name})" if license_name else card_license_id
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", "",
              "## License", "", f"`{shown_license}`. {license_note}", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _training_table(record: RunRecord, method_name: str) -> list:
    """One row per `RunRecord` field with a `card` label and a value."""
    shown = {"method": method_name, "teacher": public_name(record.teacher), "source": public_name(record.source),
             "generator_init": public_name(record.generator_init), "dataset": public_name(record.dataset),
             "step_sigmas": record.step_sigmas and "[" + ", ".join(f"{s:g}" for s in record.step_sigmas) + "]"}
    rows = []
    for name, label in RunRecord.card_fields():
        value = shown[name] if name in shown else getattr(record, name)
        if value is not None:
            rows.append(f"| {label} | {value if name == 'method' else escape(value)} |")
    return ["| setting | value |", "|---|---|", *rows]
