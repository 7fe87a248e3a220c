"""Saving, loading and pushing a SiDAPipeline folder as it is published: weights, model card, sample grid, run_info and
the standalone module that lets plain Diffusers load it.

`PublishingMixin` gives `SiDAPipeline`:
* `save_pretrained`: Diffusers' folder, then the remote-code layout (docs/ARCHITECTURE.md §4): `sida_standalone.py` at
  the root and `unet/sida_unet.py` (see `standalone`), named in `model_index.json`, so that
  `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works without this package; then the pipeline's
  `model_card` (README.md), `sample_grid` (samples_grid.png) and `run_info` (run_info.json) when it has them.
* `from_pretrained`: reads old folders (components named by their `sida_diffusers.*` module) and new ones alike. The
  remote-code names are mapped back onto the installed package in `load_config`, so no `.py` file of the folder is
  ever executed; the card, grid and run_info of the folder come back on the pipeline.
* `push_to_hub`: uploads what `save_pretrained` writes, so the Hub gets this package's card and grid, not Diffusers'
  generic card (which remains the fallback for a pipeline without a card).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import PIL.Image
from huggingface_hub import ModelCard, create_repo, upload_folder

from sida_diffusers.pipelines.standalone import (
    COMPONENT_MODULE,
    STANDALONE_MODULE,
    STANDALONE_SOURCES,
    component_source,
    denoiser_classes,
    standalone_source,
)
from sida_diffusers.safe_io.files import check_image_size, read_json


GRID_NAME = "samples_grid.png"
MAX_CARD_BYTES = 8 << 20  # a model card is text of a few kB
CARD_NAME = "README.md"
RUN_INFO_NAME = "run_info.json"
# What a card written before the repo id was known says in its usage snippet; push_to_hub puts the repo id there.
REPO_PLACEHOLDER = "path/to/this/folder"
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def package_denoiser_module(class_name: str) -> str:
    """The `sida_diffusers.networks.*` module that defines the denoiser `class_name` (e.g. 'EDMPrecond')."""
    classes = denoiser_classes()
    if class_name not in classes:
        raise ValueError(f"model_index.json names the denoiser class {class_name!r} of the folder's standalone module, "
                         f"but this sida_diffusers has no such class (it has {', '.join(classes)}); upgrade "
                         "sida_diffusers, or load the folder with DiffusionPipeline.from_pretrained(folder, "
                         "trust_remote_code=True) to use the code shipped with it.")
    return classes[class_name].__module__


class PublishingMixin:
    """Save, load and push a pipeline folder together with its model card, sample grid and standalone module."""

    model_card: Optional[ModelCard] = None        # written as README.md (a ModelCard or its text)
    sample_grid: Optional[PIL.Image.Image] = None  # written as samples_grid.png
    run_info: Optional[dict] = None               # written as run_info.json (docs/ARCHITECTURE.md §3)

    # ---- loading -----------------------------------------------------------------------------------------------------
    @classmethod
    def load_config(cls, *args, **kwargs):
        """Diffusers' `load_config`, with the remote-code entries of `model_index.json` resolved to this package.

        `["sida_standalone", "SiDAPipeline"]` becomes "SiDAPipeline" and `["sida_unet", "EDMPrecond"]` the module
        of the installed EDMPrecond, so Diffusers takes every class from `sys.modules` and never imports a file
        of the folder. Old folders already name the package modules and pass through unchanged.
        """
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][-1]
        for name, value in config.items():
            if isinstance(value, list) and len(value) == 2 and value[0] in (STANDALONE_MODULE, COMPONENT_MODULE):
                config[name] = [package_denoiser_module(value[1]), value[1]]
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Diffusers' `from_pretrained` (a local folder or a Hub repo id), plus the folder's model card, sample grid and
        run_info on the returned pipeline, so that saving or pushing it again keeps them."""
        source = os.fspath(pretrained_model_name_or_path)
        folder = source if os.path.isdir(source) else cls.download(
            source, **{k: kwargs[k] for k in _DOWNLOAD_KWARGS if kwargs.get(k) is not None})
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=source)  # the name the caller used, as Diffusers records it
        pipe.load_published_files(folder)
        return pipe

    def load_published_files(self, folder) -> None:
        """Take README.md, samples_grid.png and run_info.json of `folder` (those that exist) onto the pipeline."""
        folder = Path(folder)
        card = folder / CARD_NAME
        if card.is_file():
            if card.stat().st_size > MAX_CARD_BYTES:
                raise ValueError(f"{card} is {card.stat().st_size:,} bytes, far more than a model card; remove it.")
            self.model_card = ModelCard(card.read_text(encoding="utf-8"), ignore_metadata_errors=True)
        if (folder / GRID_NAME).is_file():
            with PIL.Image.open(folder / GRID_NAME) as grid:
                check_image_size(grid, str(folder / GRID_NAME))
                self.sample_grid = grid.copy()
        if (folder / RUN_INFO_NAME).is_file():
            self.run_info = read_json(folder / RUN_INFO_NAME)

    # ---- saving ------------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Diffusers' `save_pretrained`, then the standalone module and the published files (see the module docstring).

        With `push_to_hub=True` the folder is then uploaded as it was written (`repo_id`, `private`, `token`,
        `commit_message`, `create_pr` as in Diffusers).
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "create_pr", "token")
                      if k in kwargs}
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        self.write_standalone_module(folder)
        if self.model_card is not None:
            (folder / CARD_NAME).write_text(str(self.model_card), encoding="utf-8")  # a ModelCard or its text
        if self.sample_grid is not None:
            self.sample_grid.save(folder / GRID_NAME)
        if self.run_info is not None:
            (folder / RUN_INFO_NAME).write_text(json.dumps(self.run_info, indent=2, default=str))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", folder.name)
            private, token = hub_kwargs.pop("private", None), hub_kwargs.get("token")
            repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
            self._upload(folder, repo_id, **hub_kwargs)

    def write_standalone_module(self, folder: Path) -> bool:
        """Write `sida_standalone.py` to `folder` and `unet/sida_unet.py` and name them in model_index.json. False
        (nothing written) when the unet's class is not one of the package's own, which the standalone module could
        not build. A Diffusers UNet2DModel unet stays Diffusers' own component: only the pipeline module is written."""
        unet_class = type(getattr(self.unet, "_orig_mod", self.unet))  # a torch.compile'd unet saves its module
        plain = unet_class.__module__.split(".")[0] == "diffusers"
        if unet_class.__module__ not in STANDALONE_SOURCES and not plain:
            return False
        (folder / f"{STANDALONE_MODULE}.py").write_text(standalone_source(), encoding="utf-8")
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [STANDALONE_MODULE, type(self).__name__]
        if not plain:
            (folder / "unet" / f"{COMPONENT_MODULE}.py").write_text(component_source(), encoding="utf-8")
            index["unet"] = [COMPONENT_MODULE, unet_class.__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")  # as Diffusers' save_config
        return True

    # ---- the Hub -----------------------------------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: Optional[str] = None, subfolder: Optional[str] = None):
        """Upload the pipeline to `repo_id` as `save_pretrained` writes it (Diffusers' arguments), with this pipeline's
        model card and sample grid; a card written without a repo id gets `repo_id` in its usage snippet."""
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmpdir:
            self.save_pretrained(tmpdir, safe_serialization=safe_serialization, variant=variant)
            return self._upload(Path(tmpdir), repo_id, commit_message=commit_message, token=token,
                                create_pr=create_pr, subfolder=subfolder)

    def _upload(self, folder: Path, repo_id: str, commit_message=None, token=None, create_pr=False, subfolder=None):
        card_path = folder / CARD_NAME
        if card_path.is_file():
            card_path.write_text(card_path.read_text(encoding="utf-8").replace(REPO_PLACEHOLDER, repo_id),
                                 encoding="utf-8")
        elif not subfolder:  # no card of ours: Diffusers' generic one, as DiffusionPipeline.push_to_hub writes
            from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

            populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True)).save(card_path)
        return upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, create_pr=create_pr,
                             commit_message=commit_message or f"Upload {type(self).__name__}", path_in_repo=subfolder)
