"""Diffusers DDPM / DDIM folders (a `UNet2DModel` and its scheduler config) read as a `UNet2DDenoiser`, within bounds.

The layouts a Diffusers user has (ALGORITHM.md §12): a pipeline folder (`model_index.json`, `unet/`, `scheduler/`, as
`DDPMPipeline.save_pretrained` writes it, or a SiDAPipeline exported from such a teacher), or a bare `unet/` folder
with `scheduler_config.json` in it or in a `scheduler/` folder beside it. Both JSON files are read with a size
bound and checked value by value (`networks.unet2d`); the network is built on the meta device under the budget of the
safetensors weights, compared tensor by tensor with their headers (`model_files`), and only then allocated and
loaded, strictly. Nothing is imported from the folder and pickled `.bin` weights are never read. What the package
cannot distil yet is refused with one line that names it: text-to-image UNets (`UNet2DConditionModel`) and latent
DDPMs (a `vqvae`/`vae` component).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError
from safetensors.torch import load_file

from sida_diffusers.networks.unet2d import UNet2DDenoiser, check_scheduler_config, check_unet_config
from sida_diffusers.safe_io.files import read_json
from sida_diffusers.safe_io.model_files import (
    MAX_CONFIG_BYTES,
    _weight_files,
    build_within,
    check_shapes,
    read_model_config,
    safetensors_shapes,
)
from sida_diffusers.safe_io.paths import check_regular_file, folder_root, inside_folder


__all__ = ["find_unet2d", "load_unet2d_denoiser", "CONVERT_HINT"]

SCHEDULER_FILE = "scheduler_config.json"
CONVERT_HINT = ("convert it once with Diffusers: DDPMPipeline.from_pretrained(src).save_pretrained(dst, "
                "safe_serialization=True) (DDIMPipeline for a DDIM folder)")
_LATENT_COMPONENTS = ("vqvae", "vae")
_TEXT_COMPONENTS = ("text_encoder", "tokenizer")


def _checked(path: Path, root: Path) -> Path:
    """`path`, a regular file that (links followed) stays inside `root`; a scheduler config beside a bare unet/
    folder, outside that folder, may only link inside the folder that holds both."""
    if not Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root)):
        root = path.parent.parent
    inside_folder(path, root)
    check_regular_file(path)
    return path


def _config(path: Path, root: Path) -> dict:
    config = read_json(_checked(path, root), max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a configuration (a JSON object).")
    return config


def _component_class(index: dict, name: str) -> Optional[str]:
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None


def find_unet2d(folder: Path, root: Optional[Path] = None) -> Optional[tuple[Path, Path]]:
    """``(unet_dir, scheduler_config_file)`` when `folder` holds a Diffusers UNet2DModel teacher, None when it is
    another kind of folder (e.g. a denoiser of this package). Unsupported Diffusers models raise a one-line
    ValueError naming what is not supported. No file read may link out of `root` (default `folder_root(folder)`)."""
    folder = Path(folder)
    root = folder_root(folder) if root is None else Path(root)
    index_file = folder / "model_index.json"
    if index_file.is_file():
        index = _config(index_file, root)
        unet_class = _component_class(index, "unet")
        if unet_class == "UNet2DConditionModel" or any(_component_class(index, n) for n in _TEXT_COMPONENTS):
            raise ValueError(f"{index_file} describes a text-to-image pipeline ({index.get('_class_name')}); "
                             "UNet2DConditionModel teachers are not supported yet: pass a DDPM/DDIM UNet2DModel "
                             "pipeline.")
        if unet_class == "UNet2DModel" and any(_component_class(index, n) for n in _LATENT_COMPONENTS):
            raise ValueError(f"{index_file} describes a latent DDPM ({index.get('_class_name')}, a UNet2DModel over "
                             "VQ/VAE latents); latent DDPM teachers are not supported yet (only EDM2's latent "
                             "convention is): pass a pixel-space DDPM/DDIM pipeline.")
        if unet_class != "UNet2DModel":
            return None
        if _component_class(index, "scheduler") is None:
            raise ValueError(f"{index_file} has a UNet2DModel but no scheduler component; the noise schedule of a "
                             "DDPM teacher lives in scheduler/scheduler_config.json.")
        return folder / "unet", folder / "scheduler" / SCHEDULER_FILE
    config_file = folder / "config.json"
    if not config_file.is_file():
        if (folder / "unet" / "config.json").is_file():  # unet/ (+ scheduler/) without model_index.json: a
            return find_unet2d(folder / "unet", root)       # UNet2DModel there without its schedule is named as such
        return None
    name = _config(config_file, root).get("_class_name")
    if name == "UNet2DConditionModel":
        raise ValueError(f"{config_file} describes a UNet2DConditionModel; text-to-image teachers are not supported "
                         "yet: pass a DDPM/DDIM UNet2DModel folder.")
    if name != "UNet2DModel":
        return None
    for scheduler in (folder / SCHEDULER_FILE, folder.parent / "scheduler" / SCHEDULER_FILE):
        if scheduler.is_file():
            return folder, scheduler
    raise FileNotFoundError(f"{folder} is a UNet2DModel folder without its noise schedule; pass the pipeline folder "
                            f"(with scheduler/{SCHEDULER_FILE}), or put the scheduler's {SCHEDULER_FILE} beside "
                            "config.json.")


def load_unet2d_denoiser(unet_dir: Path, scheduler_file: Path, root: Optional[Path] = None) -> UNet2DDenoiser:
    """The float32 `UNet2DDenoiser` of a UNet2DModel folder and its scheduler config, checked on meta before
    anything is allocated; no file may link out of `root` (default `folder_root(unet_dir)`)."""
    unet_dir, scheduler_file = Path(unet_dir), Path(scheduler_file)
    root = folder_root(unet_dir) if root is None else Path(root)
    for path in (unet_dir / "config.json", scheduler_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; a DDPM teacher needs the UNet's config.json and the "
                                    f"scheduler's {SCHEDULER_FILE}.")
    label = f"{unet_dir}/config.json"
    scheduler_config = check_scheduler_config(_config(scheduler_file, root), str(scheduler_file))
    unet_config = check_unet_config(read_model_config(unet_dir, None, root), label)
    if not any(unet_dir.glob("diffusion_pytorch_model*.safetensors*")):
        pickled = sorted(p.name for p in unet_dir.glob("diffusion_pytorch_model*.bin"))
        held = f"only pickled weights ({', '.join(pickled)})" if pickled else "no safetensors weights"
        raise ValueError(f"{unet_dir} holds {held}; sida_diffusers loads safetensors only and never unpickles, so "
                         f"{CONVERT_HINT}.")
    files = [inside_folder(file, root) for file in _weight_files(unet_dir, None, root)]
    factory = lambda: UNet2DDenoiser(unet_config=unet_config, scheduler_config=scheduler_config)  # noqa: E731
    model = build_within(factory, safetensors_shapes(files), label)
    # Checkpoints older than Diffusers' attention refactor name attention weights query/key/value/proj_attn: renamed
    # the way UNet2DModel.from_pretrained renames them.
    shapes = model.unet._fix_state_dict_keys_on_load(safetensors_shapes(files))
    check_shapes(model, {f"unet.{k}": v for k, v in shapes.items()}, label, "**config.json")
    try:
        weights = {k: v for file in files for k, v in load_file(str(file)).items()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{unet_dir}: unreadable safetensors weights ({error}); download or save them again.") from None
    model.to_empty(device="cpu")  # memory is allocated only now, for exactly the tensors the files hold
    model.unet.load_state_dict(model.unet._fix_state_dict_keys_on_load(weights), strict=True)
    return model
