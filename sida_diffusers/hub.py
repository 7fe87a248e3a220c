"""Publish a distilled generator as a SiDAPipeline folder with a model card, and push that folder to the Hub.

`publish` writes everything that is published (weights as safetensors, model_index.json, the standalone module that
lets plain Diffusers load the folder, the sample grid, the README.md model card and run_info.json) for a pipeline
that already exists, through `SiDAPipeline.save_pretrained`, so a pipeline loaded from the folder saves and pushes
the same files again. The trainer publishes the pipeline it samples every figure with; `export_pipeline` is the
same for a user who holds a generator (it builds the pipeline once, from the run record). The card is written from
the `RunRecord` by `sida_diffusers.model_card`; the grid is `pipelines.sample_grid`, the one grid path.

`push_to_hub` uploads an exported folder as it is, through `publishing.upload_pipeline_folder`, the one upload path
(`SiDAPipeline.push_to_hub` uses it too). `check_push_access` refuses, before a run or an export starts, a push that
could not succeed (a bad repo id, offline, no token or a read-only one, an endpoint that cannot be reached).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

from sida_diffusers.model_card import (  # noqa: F401  (the card API is also reached through this module)
    CITATION,
    METHOD_NAMES,
    METRIC_NAMES,
    describe_metric,
    make_model_card,
    usage_snippet,
)
from sida_diffusers.networks import Denoiser
from sida_diffusers.pipelines import SiDAPipeline, sample_grid
from sida_diffusers.pipelines.publishing import GRID_NAME, upload_pipeline_folder
from sida_diffusers.run_record import RunRecord, as_record
from sida_diffusers.schedule import INIT_SIGMA


DEFAULT_GRID_SIZE = 64  # an 8 x 8 grid


def publish(pipe: SiDAPipeline, out_dir: Union[str, os.PathLike], record: Union[RunRecord, dict],
            grid_seeds: Optional[Iterable[int]] = None, repo_id: Optional[str] = None,
            batch_size: int = 64) -> SiDAPipeline:
    """Write `pipe` as a published folder: its weights and standalone module, `samples_grid.png` (`sample_grid` of
    `grid_seeds`, default seeds 0 .. `record.grid_size` - 1, else 0-63; none when empty), the README.md model card of
    `record` and run_info.json. Returns `pipe`, which now carries the card, grid and run record (so
    `pipe.push_to_hub(repo)` publishes them too)."""
    record = as_record(record)
    seeds = list(range(record.grid_size or DEFAULT_GRID_SIZE) if grid_seeds is None else grid_seeds)
    record = record.replace(grid_size=len(seeds) or None)
    pipe.sample_grid = sample_grid(pipe, seeds, batch_size) if seeds else None
    pipe.model_card = make_model_card(record, repo_id=repo_id, grid_image=GRID_NAME if seeds else None)
    pipe.run_info = record.to_dict()
    pipe.save_pretrained(Path(out_dir), safe_serialization=True)
    return pipe


def pipeline_for(generator: Denoiser, record: Union[RunRecord, dict], vae=None) -> SiDAPipeline:
    """The `SiDAPipeline` that `record` describes around `generator` (init_sigma, class names, latent settings)."""
    record = as_record(record)
    if record.latent and vae is None:
        raise ValueError("the run record says this is a latent (EDM2) model but no vae was given; pass "
                         "vae=AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-mse').")
    latent = record.latent
    return SiDAPipeline(unet=generator, vae=vae, init_sigma=record.init_sigma or INIT_SIGMA, id2label=record.id2label,
                        latent_scale=record.latent_scale if latent else None,
                        latent_bias=record.latent_bias if latent else None)


def export_pipeline(generator: Denoiser, out_dir: Union[str, os.PathLike], run_info: Union[RunRecord, dict], vae=None,
                    grid: bool = True, grid_seeds: Optional[Iterable[int]] = None, repo_id: Optional[str] = None,
                    batch_size: int = 16) -> SiDAPipeline:
    """Write the SiDAPipeline folder of `generator` as `publish` does, the pipeline built once from `run_info` (a
    `RunRecord` or its dict). Returns the pipeline, which carries the card, grid and run_info."""
    pipe = pipeline_for(generator, run_info, vae)
    pipe.set_progress_bar_config(disable=True)
    return publish(pipe, out_dir, run_info, grid_seeds if grid else (), repo_id, batch_size)


def push_to_hub(folder: Union[str, os.PathLike], repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Upload SiDA one-step generator"):
    """Create `repo_id` if needed and upload the exported `folder` as it is (training checkpoints excluded); a card
    exported before the repo id was known gets it in its usage snippets first."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not an exported pipeline folder (no model_index.json); run "
                                "export_pipeline(...) or `sida-export SRC DST` first and push DST.")
    return upload_pipeline_folder(folder, repo_id, token=token, private=private, commit_message=commit_message)


def check_push_access(repo_id: str, token: Optional[str] = None) -> str:
    """Check, before anything is trained or written, that a push to `repo_id` can succeed; returns the token to
    push with (`token`, else the stored one). Raises ValueError with the way forward: a repo id that is not one,
    offline mode (HF_HUB_OFFLINE=1), no token, a read-only token, or an endpoint that cannot be reached."""
    from huggingface_hub import constants, get_token, is_offline_mode, whoami
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a Hub repo id ({error}); pass 'owner/name' or 'name'.") from None
    if is_offline_mode():
        raise ValueError(f"the Hub is offline here (HF_HUB_OFFLINE=1), so the pipeline could not be pushed to "
                         f"{repo_id}; unset HF_HUB_OFFLINE, or drop the push and upload the pipeline folder later.")
    token = token or get_token()
    if not token:
        raise ValueError(f"no Hugging Face token to push to {repo_id} with: pass --hub_token, run `hf auth login` "
                         "(or set HF_TOKEN), or drop the push.")
    try:
        info = whoami(token=token)
    except Exception as error:  # httpx's connection errors are no OSError; every failure means the same
        raise ValueError(f"the Hub at {constants.ENDPOINT} did not accept the token or could not be reached "
                         f"({type(error).__name__}: {' '.join(str(error).split())[:200]}); check the network, "
                         "HF_ENDPOINT and the token, or drop the push.") from None
    role = ((info or {}).get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise ValueError(f"the Hugging Face token can only read; pushing to {repo_id} needs a write token "
                         "(--hub_token, or `hf auth login` with one).")
    return token


def push_later_hint(folder: Union[str, os.PathLike], repo_id: str) -> str:
    """How to push an exported folder by hand, for the one line that reports a failed push."""
    return f"the pipeline is kept in {folder}; push it later with `hf upload {repo_id} {folder}`"
