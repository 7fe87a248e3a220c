"""Export a distilled generator as a SiDAPipeline folder with a model card, and push that folder to the Hub.

`export_pipeline` writes everything that is published (weights as safetensors, model_index.json, the standalone module
that lets plain Diffusers load the folder, a sample grid, the README.md model card and run_info.json) through
`SiDAPipeline.save_pretrained`, so a pipeline loaded from the folder saves and pushes the same files again.
`push_to_hub` uploads the exported folder as it is (only a card exported without a repo id gets it in its usage
snippets): what is pushed is what was saved and checked locally. The card is written from `run_info`
(docs/ARCHITECTURE.md §3) by `sida_diffusers.model_card`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import PIL.Image
from huggingface_hub import create_repo, upload_folder

from sida_diffusers.latents import EDM2_LATENT_BIAS, EDM2_LATENT_SCALE
from sida_diffusers.model_card import (  # noqa: F401  (the card API is also reached through this module)
    CITATION,
    METHOD_NAMES,
    METRIC_NAMES,
    describe_metric,
    make_model_card,
    teacher_license,
    usage_snippet,
)
from sida_diffusers.networks import Denoiser
from sida_diffusers.pipelines.pipeline_sida import SiDAPipeline, image_grid, seed_generators
from sida_diffusers.pipelines.publishing import CARD_NAME, GRID_NAME, REPO_PLACEHOLDER
from sida_diffusers.schedule import INIT_SIGMA


# A 16-32 px grid is a smudge on a model page: it is enlarged to at least this width, by an integer factor.
GRID_MIN_WIDTH = 256
# Files that never belong in a published pipeline folder.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "checkpoints/**", ".tmp-*", "**/.tmp-*", "*.pt", "logs/**"]


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


def upscale_nearest(image: PIL.Image.Image, min_width: int = GRID_MIN_WIDTH) -> PIL.Image.Image:
    """`image` enlarged by the smallest integer factor that makes it at least `min_width` wide, nearest-neighbour, so
    every pixel stays one of the model's (a factor of 1 returns it unchanged)."""
    factor = max(1, math.ceil(min_width / image.width))
    return image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST) if factor > 1 else image


def sample_grid(pipe: SiDAPipeline, seeds: Iterable[int], batch_size: int = 16) -> PIL.Image.Image:
    """One image per seed from `pipe`'s generator in eval mode (dropout off, as for evaluation, ALGORITHM.md §9.1),
    tiled in seed order."""
    seeds, generator = list(seeds), pipe.denoiser
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    pipe.set_progress_bar_config(disable=True)
    try:
        images = [image for i in range(0, len(seeds), batch_size)
                  for image in pipe(batch_size=len(seeds[i:i + batch_size]),
                                    generator=seed_generators(seeds[i:i + batch_size], device)).images]
    finally:
        generator.train(was_training)
    return image_grid(images)


def export_pipeline(generator: Denoiser, out_dir: Union[str, os.PathLike], run_info: dict, vae=None,
                    grid: bool = True, grid_seeds: Iterable[int] = range(64), repo_id: Optional[str] = None,
                    batch_size: int = 16) -> SiDAPipeline:
    """Write the SiDAPipeline folder of `generator`: safetensors weights, model_index.json with the standalone module,
    `samples_grid.png` (seeds `grid_seeds`, enlarged with `upscale_nearest`), README.md model card and run_info.json.
    Returns the pipeline, which carries the card, grid and run_info (so `pipe.push_to_hub(repo)` publishes them)."""
    scale, bias = _latent_config(run_info, vae)
    pipe = SiDAPipeline(unet=generator, vae=vae, init_sigma=run_info.get("init_sigma") or INIT_SIGMA,
                        id2label=run_info.get("id2label"), latent_scale=scale, latent_bias=bias)
    if grid:
        pipe.sample_grid = upscale_nearest(sample_grid(pipe, grid_seeds, batch_size))
    pipe.model_card = make_model_card(run_info, repo_id=repo_id, grid_image=GRID_NAME if grid else None)
    pipe.run_info = run_info
    pipe.save_pretrained(Path(out_dir), safe_serialization=True)
    return pipe


def push_to_hub(folder: Union[str, os.PathLike], repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Upload SiDA one-step generator"):
    """Create `repo_id` if needed and upload the exported `folder` as it is (training checkpoints excluded); a card
    exported before the repo id was known gets it in its usage snippets first."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not an exported pipeline folder (no model_index.json); run "
                                "export_pipeline(...) or `sida-export SRC DST` first and push DST.")
    card = folder / CARD_NAME
    if card.is_file() and REPO_PLACEHOLDER in (text := card.read_text(encoding="utf-8")):
        card.write_text(text.replace(REPO_PLACEHOLDER, repo_id), encoding="utf-8")
    create_repo(repo_id, private=private, token=token, exist_ok=True)
    return upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token,
                         ignore_patterns=HUB_IGNORE_PATTERNS)
