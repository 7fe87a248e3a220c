"""Saving, loading and pushing a SiDAPipeline folder as it is published: weights, model card, sample grid, run_info and
the standalone module that lets plain Diffusers load it.

`PublishingMixin` gives `SiDAPipeline`:
* `save_pretrained`: Diffusers' folder, then the remote-code layout (docs/ARCHITECTURE.md §4): `sida_standalone.py` at
  the root and `unet/sida_unet.py` (see `standalone`), named in `model_index.json`, so that
  `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works without this package; then the pipeline's
  `model_card` (README.md), `sample_grid` (samples_grid.png) and `run_info` (run_info.json) when it has them. Local
  paths (`_name_or_path`) are not written: a published folder does not name the publisher's file system.
* `from_pretrained`: reads old folders (components named by their `sida_diffusers.*` module) and new ones alike. The
  remote-code names are mapped back onto the installed package in `load_config`, so no `.py` file of the folder is
  ever executed; the card, grid and run_info of the folder come back on the pipeline.
* `push_to_hub`: uploads what `save_pretrained` writes, through `upload_pipeline_folder`, the one upload path of the
  package (`hub.push_to_hub` uploads an exported folder through it too), so the Hub gets this package's card and grid,
  not Diffusers' generic card (which remains the fallback for a pipeline without a card).

This module is also part of the standalone module (`standalone.STANDALONE_SOURCES`): a pipeline that plain Diffusers
loaded with `trust_remote_code=True` saves and pushes the same folder, card included (the card, grid and run_info are
then taken from the folder or repo it was loaded from, `take_published_files_of_origin`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import PIL.Image
from diffusers.utils import logging
from huggingface_hub import ModelCard, create_repo, snapshot_download, upload_folder
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from sida_diffusers.pipelines.standalone import (
    COMPONENT_MODULE,
    STANDALONE_MODULE,
    STANDALONE_SOURCES,
    component_source,
    denoiser_classes,
    standalone_source,
)
from sida_diffusers.safe_io.files import check_image_size, parse_yaml, read_bytes, read_json
from sida_diffusers.safe_io.paths import check_folder_files


logger = logging.get_logger(__name__)

GRID_NAME = "samples_grid.png"
MAX_CARD_BYTES = 8 << 20  # a model card is text of a few kB
MAX_RUN_INFO_BYTES = 64 << 20  # run_info.json: as run_record.MAX_RECORD_BYTES (an ImageNet-21k id2label is ~1 MB)
MAX_INDEX_BYTES = 32 << 20  # model_index.json: a few kB, or a few MB with the id2label of ImageNet-21k
CARD_NAME = "README.md"
RUN_INFO_NAME = "run_info.json"
PUBLISHED_FILES = (CARD_NAME, GRID_NAME, RUN_INFO_NAME)
# What a card written before the repo id was known says in its usage snippet; the upload puts the repo id there.
REPO_PLACEHOLDER = "path/to/this/folder"
# Files that never belong in a published pipeline folder.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "checkpoints/**", ".tmp-*", "**/.tmp-*", "*.pt", "logs/**"]
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def upload_pipeline_folder(folder, repo_id: str, token: Optional[str] = None, private: Optional[bool] = None,
                           commit_message: Optional[str] = None, create_pr: bool = False,
                           subfolder: Optional[str] = None):
    """Create `repo_id` if needed and upload the saved pipeline `folder` as it is (training leftovers excluded).

    A card written before the repo id was known gets it in its usage snippets; a folder without a card gets
    Diffusers' generic one, as `DiffusionPipeline.push_to_hub` writes it.
    """
    folder = Path(folder)
    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card_path = folder / CARD_NAME
    if card_path.is_file():
        card_path.write_text(card_path.read_text(encoding="utf-8").replace(REPO_PLACEHOLDER, repo_id),
                             encoding="utf-8")
    elif not subfolder:
        from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

        populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True)).save(card_path)
    return upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, create_pr=create_pr,
                         commit_message=commit_message or "Upload SiDA one-step generator", path_in_repo=subfolder,
                         ignore_patterns=HUB_IGNORE_PATTERNS)


def forget_local_paths(folder: Path) -> None:
    """Drop `_name_or_path` (where each part was loaded from) from model_index.json and the components' configs."""
    for path in [folder / "model_index.json", *folder.glob("*/config.json")]:
        if path.is_file():
            config = json.loads(path.read_text())
            if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as Diffusers' save_config


def package_denoiser_module(class_name: str) -> str:
    """The `sida_diffusers.networks.*` module that defines the denoiser `class_name` (e.g. 'EDMPrecond')."""
    classes = denoiser_classes()
    if class_name not in classes:
        raise ValueError(f"model_index.json names the denoiser class {class_name!r} of the folder's standalone module, "
                         f"but this sida_diffusers has no such class (it has {', '.join(classes)}); upgrade "
                         "sida_diffusers, or load the folder with DiffusionPipeline.from_pretrained(folder, "
                         "trust_remote_code=True) to use the code shipped with it.")
    return classes[class_name].__module__


def read_model_card(path: Path) -> ModelCard:
    """A README.md model card read as hostile text: its YAML front matter goes through `parse_yaml` (no aliases or
    tags, bounded values and nesting) before huggingface_hub parses it; any problem is a ValueError naming the file."""
    try:
        text = read_bytes(path, MAX_CARD_BYTES, "a model card needs").decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); fix or delete the model "
                         "card.") from None
    match = REGEX_YAML_BLOCK.search(text)
    try:
        if match:
            parse_yaml(match.group(2), str(path))
        return ModelCard(text, ignore_metadata_errors=True)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:  # what card-data parsing raises
        message = " ".join(str(e).split())
        problem = (message if message.startswith(str(path))
                   else f"{path}: its metadata is not a model card's ({message[:200]})")
        raise ValueError(f"{problem}; fix or delete the model card (the pipeline does not need it).") from None


def read_published_files(folder) -> dict:
    """``{"model_card", "sample_grid", "run_info"}`` from README.md, samples_grid.png and run_info.json of `folder`
    (those that exist), each read as hostile: regular files inside the folder (a link out of it is refused, or a
    folder could make us re-publish any file of the user's), bounded in bytes, values, nesting and pixels."""
    folder = Path(folder)
    check_folder_files(folder, PUBLISHED_FILES)
    found = {}
    if (folder / CARD_NAME).is_file():
        found["model_card"] = read_model_card(folder / CARD_NAME)
    if (folder / GRID_NAME).is_file():
        try:
            with PIL.Image.open(folder / GRID_NAME) as grid:
                check_image_size(grid, str(folder / GRID_NAME))
                grid.load()
                found["sample_grid"] = grid.copy()
        except (OSError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as e:
            raise ValueError(f"{folder / GRID_NAME} is not a readable image ({e}); delete it or save it "
                             "again.") from None
    if (folder / RUN_INFO_NAME).is_file():
        run_info = read_json(folder / RUN_INFO_NAME, max_bytes=MAX_RUN_INFO_BYTES)
        if not isinstance(run_info, dict):
            raise ValueError(f"{folder / RUN_INFO_NAME} holds a JSON {type(run_info).__name__}, not a run record "
                             "(an object); delete it or export the pipeline again.")
        found["run_info"] = run_info
    return found


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
        published = read_published_files(folder)  # before the weights: a bad card costs no loading time
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=source)  # the name the caller used, as Diffusers records it
        for name, value in published.items():
            setattr(pipe, name, value)
        pipe._published_files_taken = True
        return pipe

    def load_published_files(self, folder) -> None:
        """Take README.md, samples_grid.png and run_info.json of `folder` (those that exist) onto the pipeline."""
        self._published_files_taken = True
        for name, value in read_published_files(folder).items():
            setattr(self, name, value)

    def take_published_files_of_origin(self) -> None:
        """Once, for a pipeline that carries no card, grid or run_info: take them from the folder or Hub repo it was
        loaded from (`_name_or_path`). A pipeline that Diffusers itself built (`DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)`) never passed through `from_pretrained` above; this keeps its card when it is saved
        or pushed again. Where the origin cannot be read, the pipeline is saved without them, with a warning."""
        if getattr(self, "_published_files_taken", False):
            return
        self._published_files_taken = True
        origin = self.config.get("_name_or_path")
        if any(v is not None for v in (self.model_card, self.sample_grid, self.run_info)) or not origin:
            return
        try:
            folder = origin if os.path.isdir(origin) else snapshot_download(origin, allow_patterns=list(PUBLISHED_FILES))
            self.load_published_files(folder)
        except Exception as error:  # offline, no access, a card that is not one: httpx's errors are no OSError
            logger.warning(f"the model card, grid and run_info of {origin} could not be read ({error}); the folder "
                           "is saved without them.")

    # ---- saving ------------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Diffusers' `save_pretrained`, then the standalone module and the published files (see the module docstring).

        With `push_to_hub=True` the folder is then uploaded as it was written (`repo_id`, `private`, `token`,
        `commit_message`, `create_pr` as in Diffusers).
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "create_pr", "token")
                      if k in kwargs}
        self.take_published_files_of_origin()
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        self.write_standalone_module(folder)
        forget_local_paths(folder)
        size = (folder / "model_index.json").stat().st_size
        if size > MAX_INDEX_BYTES:
            raise ValueError(f"{folder / 'model_index.json'} came out at {size:,} bytes, more than the "
                             f"{MAX_INDEX_BYTES:,} that from_pretrained reads; shorten the class names of id2label.")
        if self.model_card is not None:
            (folder / CARD_NAME).write_text(str(self.model_card), encoding="utf-8")  # a ModelCard or its text
        if self.sample_grid is not None:
            self.sample_grid.save(folder / GRID_NAME)
        if self.run_info is not None:
            (folder / RUN_INFO_NAME).write_text(json.dumps(self.run_info, indent=2, default=str) + "\n")
        if push_to_hub:
            upload_pipeline_folder(folder, hub_kwargs.pop("repo_id", folder.name), **hub_kwargs)

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
        with tempfile.TemporaryDirectory() as tmpdir:
            self.save_pretrained(tmpdir, safe_serialization=safe_serialization, variant=variant)
            return upload_pipeline_folder(tmpdir, repo_id, token=token, private=private,
                                          commit_message=commit_message, create_pr=create_pr, subfolder=subfolder)
