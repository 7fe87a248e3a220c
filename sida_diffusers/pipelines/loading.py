"""What a pipeline folder may make `from_pretrained` load: this package's denoisers and Diffusers' AutoencoderKL.

Diffusers resolves each component of `model_index.json` by the library and class the file names, imports custom
code a folder ships, and builds every network at the size its config.json asks for. A folder from the Hub is someone
else's file, so before Diffusers reads it every entry is checked against an allow-list, and every component's
config against the shapes its safetensors weights really hold, on the meta device (`sida_diffusers.safe_io.model_files`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from diffusers import AutoencoderKL, SchedulerMixin, UNet2DModel

from sida_diffusers.networks import denoiser_classes
from sida_diffusers.networks.unet2d import SCHEDULER_CLASSES, check_scheduler_config, check_unet_config
from sida_diffusers.pipelines.publishing import (
    MAX_INDEX_BYTES,
    PUBLISHED_FILES,
    PublishingMixin,
    package_denoiser_module,
)
from sida_diffusers.pipelines.standalone import COMPONENT_MODULE, STANDALONE_MODULE
from sida_diffusers.safe_io.files import read_json
from sida_diffusers.safe_io.model_files import (
    MAX_CONFIG_BYTES,
    MODEL_FOLDER_FILES,
    check_model_folder,
    read_model_config,
)
from sida_diffusers.safe_io.paths import check_folder_files, folder_root, inside_folder


__all__ = ["allowed_components", "check_pipeline_folder", "download_patterns"]

_ABSENT = (None, None)  # how model_index.json records an optional component that was not saved


def allowed_components(name: str) -> dict:
    """(library, class name) -> class that component `name` may name: the VAE is AutoencoderKL, the scheduler one of
    Diffusers' VP schedulers, the rest denoisers or, for `unet`, Diffusers' UNet2DModel (ALGORITHM.md §12)."""
    import diffusers

    if name == "vae":
        return {("diffusers", "AutoencoderKL"): AutoencoderKL}
    if name == "scheduler":
        return {("diffusers", cls): getattr(diffusers, cls) for cls in SCHEDULER_CLASSES}
    allowed = {(cls.__module__, cls.__name__): cls for cls in denoiser_classes().values()}
    return {**allowed, ("diffusers", "UNet2DModel"): UNet2DModel} if name == "unet" else allowed


def _check_component(cls, folder: Path, variant: Optional[str], root: Path) -> None:
    """A scheduler's config is checked value by value; a network's config against its weights, on meta."""
    if issubclass(cls, SchedulerMixin):
        path = folder / cls.config_name
        inside_folder(path, root)
        check_scheduler_config(read_json(path, max_bytes=MAX_CONFIG_BYTES), str(path))
        return
    if cls is UNet2DModel:
        check_unet_config(read_model_config(folder, "UNet2DModel", root), f"{folder}/config.json")
    check_model_folder(cls, folder, variant, root)


def _is_component_entry(entry) -> bool:
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and all(v is None or isinstance(v, str) for v in entry)


def download_patterns(pipeline_cls) -> list:
    """What a Hub download of a `pipeline_cls` folder fetches (`snapshot_download(allow_patterns=...)`): the files it
    reads (model_index.json, the card, grid and run_info, each component's config and safetensors weights), nothing
    else a repository may hold."""
    components, _ = pipeline_cls._get_signature_keys(pipeline_cls)
    scheduler = ["scheduler/scheduler_config.json"] if "scheduler" in components else []  # ALGORITHM.md §12
    return ["model_index.json", *PUBLISHED_FILES, *scheduler, *(f"{name}/{file}" for name in sorted(components)
                                                                if name != "scheduler" for file in MODEL_FOLDER_FILES)]


def check_pipeline_folder(pipeline_cls, folder: Path, passed: Iterable[str] = (), variant: Optional[str] = None):
    """Refuse a folder that names another pipeline, custom code, or components other than those of `pipeline_cls`
    with allowed classes; check each component that will be loaded (not in `passed`) against its weights. No file
    that is read may be a link out of the folder (for a Hugging Face cache snapshot, out of its repository folder)."""
    root = folder_root(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; pass a folder written by save_pretrained / "
                                "export_pipeline, or its Hub repo id.")
    check_folder_files(folder, ["model_index.json", *PUBLISHED_FILES], root)
    index = read_json(index_file, max_bytes=MAX_INDEX_BYTES)  # the id2label of ImageNet-21k is a few MB
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    remote_layout = issubclass(pipeline_cls, PublishingMixin)  # its load_config maps the remote-code entries
    if remote_layout and _is_component_entry(class_name) and class_name[0] == STANDALONE_MODULE:
        class_name = class_name[1]  # the remote-code layout save_pretrained writes; its module is never imported here
    if not isinstance(class_name, str):
        raise ValueError(f"{index_file} does not name a pipeline class (or names custom pipeline code, which "
                         "sida_diffusers never imports).")
    if class_name != pipeline_cls.__name__:
        raise ValueError(f"{index_file} describes a {class_name}, not a {pipeline_cls.__name__}; load it with "
                         f"{class_name}.from_pretrained if it is one of ours.")
    components, _ = pipeline_cls._get_signature_keys(pipeline_cls)
    for name, entry in index.items():
        if name.startswith("_") or (name not in components and not _is_component_entry(entry)):
            continue  # bookkeeping and configuration values, which Diffusers passes to __init__ or ignores
        if name not in components:
            raise ValueError(f"{index_file} lists an unknown component {name!r} ({entry}); a {pipeline_cls.__name__} "
                             f"has only {sorted(components)}. Remove the entry.")
        if name in passed or tuple(entry or _ABSENT) == _ABSENT:
            continue
        allowed = allowed_components(name)
        standalone = remote_layout and _is_component_entry(entry) and entry[0] == COMPONENT_MODULE
        if standalone:  # ["sida_unet", "EDMPrecond"]: load_config maps it to the installed class, the file stays unread
            entry = (package_denoiser_module(entry[1]), entry[1])
        if not _is_component_entry(entry) or tuple(entry) not in allowed:
            raise ValueError(f"{index_file}: component {name!r} is {entry}; sida_diffusers loads only "
                             f"{sorted(allowed)} there and never imports other modules a folder names.")
        if (folder / name / f"{entry[0]}.py").exists():  # Diffusers would import this file as the component's code
            raise ValueError(f"{folder / name} ships code ({entry[0]}.py); sida_diffusers never imports code from a "
                             "pipeline folder. Remove the file.")
        if (folder / name).is_dir():
            inside_folder(folder / name, root)
            check_folder_files(folder / name, sorted(p.name for p in (folder / name).iterdir()), root)
        _check_component(allowed[tuple(entry)], folder / name, variant, root)
