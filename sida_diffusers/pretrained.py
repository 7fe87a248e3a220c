"""Load official EDM / EDM2 / SiD / SiDA network pickles safely, and convert them to Diffusers model folders.

Official checkpoints are `torch_utils.persistence` pickles whose network objects carry the source code that defined
them; `sida_diffusers.safe_io.pickles` reads them without ever executing it (ALGORITHM.md §8). The `ema` network tree is
walked into a state dict with the official key names, and the matching `Denoiser` (`networks.denoiser_from_official`)
is built on the meta device, checked shape by shape against it, and only then allocated and loaded, strictly
(`sida_diffusers.safe_io.model_files`). Diffusers folders get the same check from their config.json and safetensors headers.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union
from urllib.request import urlopen

import torch
from huggingface_hub import hf_hub_download, snapshot_download

from sida_diffusers.networks import Denoiser, denoiser_classes, denoiser_from_official
from sida_diffusers.safe_io.model_files import (
    MODEL_FOLDER_FILES,
    build_within,
    check_model_folder,
    check_shapes,
    read_model_config,
)
from sida_diffusers.safe_io.paths import folder_root
from sida_diffusers.safe_io.pickles import PickledModule, UnsafeCheckpointError, load_official_pickle, plain
from sida_diffusers.safe_io.unet2d_files import SCHEDULER_FILE, find_unet2d, load_unet2d_denoiser
from sida_diffusers.shipped import SHIPPED_TEACHERS, shipped_teacher_path


__all__ = [
    "KNOWN_NETWORKS", "OfficialPickle", "UnsafeCheckpointError",
    "read_official_pickle", "load_denoiser", "convert_official", "cached_download", "declared_license",
]

# ---------------------------------------------------------------------------------------------------------------------
# Known checkpoints (ALGORITHM.md §8): short name -> URL, or Hub path "owner/repo/path/in/repo.pkl".

_EDM = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
_EDM2 = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"
_SID = "UT-Austin-PML/SiD/"
_SIDA = "UT-Austin-PML/SiDA/EDM_distillation/"
_SIDA2 = "UT-Austin-PML/SiDA/EDM2_distillation/edm2_img512_"

KNOWN_NETWORKS = {
    # EDM teachers (§8.1)
    "edm-cifar10-32x32-uncond-vp": _EDM + "edm-cifar10-32x32-uncond-vp.pkl",
    "edm-cifar10-32x32-cond-vp": _EDM + "edm-cifar10-32x32-cond-vp.pkl",
    "edm-ffhq-64x64-uncond-vp": _EDM + "edm-ffhq-64x64-uncond-vp.pkl",
    "edm-afhqv2-64x64-uncond-vp": _EDM + "edm-afhqv2-64x64-uncond-vp.pkl",
    "edm-imagenet-64x64-cond-adm": _EDM + "edm-imagenet-64x64-cond-adm.pkl",
    # EDM2 teachers: the FID-optimal post-hoc EMA reconstructions (§8.2)
    "edm2-img512-xs": _EDM2 + "edm2-img512-xs-2147483-0.135.pkl",
    "edm2-img512-s": _EDM2 + "edm2-img512-s-2147483-0.130.pkl",
    "edm2-img512-m": _EDM2 + "edm2-img512-m-2147483-0.100.pkl",
    "edm2-img512-l": _EDM2 + "edm2-img512-l-1879048-0.085.pkl",
    "edm2-img512-xl": _EDM2 + "edm2-img512-xl-1342177-0.085.pkl",
    "edm2-img512-xxl": _EDM2 + "edm2-img512-xxl-0939524-0.070.pkl",
    # The same files under the preset names of EDM2's generate_images.py, and its FD_DINOv2-optimal presets, which
    # are other post-hoc EMA lengths of the same training runs.
    "edm2-img512-xs-fid": _EDM2 + "edm2-img512-xs-2147483-0.135.pkl",
    "edm2-img512-s-fid": _EDM2 + "edm2-img512-s-2147483-0.130.pkl",
    "edm2-img512-m-fid": _EDM2 + "edm2-img512-m-2147483-0.100.pkl",
    "edm2-img512-l-fid": _EDM2 + "edm2-img512-l-1879048-0.085.pkl",
    "edm2-img512-xl-fid": _EDM2 + "edm2-img512-xl-1342177-0.085.pkl",
    "edm2-img512-xxl-fid": _EDM2 + "edm2-img512-xxl-0939524-0.070.pkl",
    "edm2-img512-xs-dino": _EDM2 + "edm2-img512-xs-2147483-0.200.pkl",
    "edm2-img512-s-dino": _EDM2 + "edm2-img512-s-2147483-0.190.pkl",
    "edm2-img512-m-dino": _EDM2 + "edm2-img512-m-2147483-0.155.pkl",
    "edm2-img512-l-dino": _EDM2 + "edm2-img512-l-1879048-0.155.pkl",
    "edm2-img512-xl-dino": _EDM2 + "edm2-img512-xl-1342177-0.155.pkl",
    "edm2-img512-xxl-dino": _EDM2 + "edm2-img512-xxl-0939524-0.150.pkl",
    # SiD generators (§8.3); the AFHQ file is alpha=1.0 although the README says 1.2
    "sid-cifar10-uncond-alpha1.2": _SID + "cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl",
    "sid-cifar10-cond-alpha1.2": _SID + "cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl",
    "sid-imagenet64-alpha1.2": _SID + "imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl",
    "sid-ffhq64-alpha1.2": _SID + "ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl",
    "sid-afhq64-alpha1": _SID + "afhq64/alpha1/network-snapshot-1.000000-371712.pkl",
    # SiDA (alpha=1) and SiD²A generators, EDM (§8.3)
    "sida-cifar10-uncond": _SIDA + "cifar10_uncond_sida_alpha1-217920.pkl",
    "sid2a-cifar10-uncond-alpha1": _SIDA + "cifar10_uncond_sid2a_alpha1-028160.pkl",
    "sid2a-cifar10-uncond-alpha1.2": _SIDA + "cifar10_uncond_sid2a_alpha1.2-022528.pkl",
    "sida-cifar10-cond": _SIDA + "cifar10_cond_sida_alpha1-293184.pkl",
    "sid2a-cifar10-cond-alpha1": _SIDA + "cifar10_cond_sid2a_alpha1-038912.pkl",
    "sid2a-cifar10-cond-alpha1.2": _SIDA + "cifar10_cond_sid2a_alpha1.2-053760.pkl",
    "sida-imagenet64": _SIDA + "imgnet64_sida_alpha1-249167.pkl",
    "sid2a-imagenet64-alpha1": _SIDA + "imgnet64_sid2a_alpha1-029499.pkl",
    "sid2a-imagenet64-alpha1.2": _SIDA + "imgnet64_sid2a_alpha1.2-021471.pkl",
    "sida-ffhq64": _SIDA + "ffhq64_sida_alpha1-185856.pkl",
    "sid2a-ffhq64-alpha1": _SIDA + "ffhq64_sid2a_alpha1-168960.pkl",
    "sid2a-ffhq64-alpha1.2": _SIDA + "ffhq64_sid2a_alpha1.2-080896.pkl",
    "sida-afhq64": _SIDA + "afhq64-v2_sida_alpha1-127488.pkl",
    "sid2a-afhq64-alpha1": _SIDA + "afhq64-v2_sid2a_alpha1-175104.pkl",
    "sid2a-afhq64-alpha1.2": _SIDA + "afhq64-v2_sid2a_alpha1.2-175104.pkl",
    # EDM2 generators, alpha=1 (§8.3). Two file names disagree with the README's method column (sida-edm2-xl points
    # at an "xl_sid2a" file, sid-edm2-xxl at an "xxl_sida" file); these are the files the README links.
    "sid-edm2-xs": _SIDA2 + "xs_sid_alpha1-249360.pkl",
    "sida-edm2-xs": _SIDA2 + "xs_sida_alpha1-166410.pkl",
    "sid2a-edm2-xs": _SIDA2 + "xs_sid2a_alpha1-028674.pkl",
    "sid-edm2-s": _SIDA2 + "s_sid_alpha1-192010.pkl",
    "sida-edm2-s": _SIDA2 + "s_sida_alpha1-117764.pkl",
    "sid2a-edm2-s": _SIDA2 + "s_sid2a_alpha1-075268.pkl",
    "sid-edm2-m": _SIDA2 + "m_sid_alpha1-226830.pkl",
    "sida-edm2-m": _SIDA2 + "m_sida_alpha1-115716.pkl",
    "sid2a-edm2-m": _SIDA2 + "m_sid2a_alpha1-044036.pkl",
    "sid-edm2-l": _SIDA2 + "l_sid_alpha1-203788.pkl",
    "sida-edm2-l": _SIDA2 + "l_sida_alpha1-166918.pkl",
    "sid2a-edm2-l": _SIDA2 + "l_sid2a_alpha1-050182.pkl",
    "sid-edm2-xl": _SIDA2 + "xl_sid_alpha1-234004.pkl",
    "sida-edm2-xl": _SIDA2 + "xl_sid2a_alpha1-024578.pkl",
    "sid2a-edm2-xl": _SIDA2 + "xl_sid2a_alpha1-079495.pkl",
    "sid-edm2-xxl": _SIDA2 + "xxl_sida_alpha1-077932.pkl",
    "sida-edm2-xxl": _SIDA2 + "xxl_sida_alpha1-089816.pkl",
    "sid2a-edm2-xxl": _SIDA2 + "xxl_sid2a_alpha1-029812.pkl",
}



# ---------------------------------------------------------------------------------------------------------------------
# Official pickles as plain data

@dataclass
class OfficialPickle:
    """What an official network pickle holds, as plain data.

    `class_name` and `init_kwargs` identify and configure the network (`networks.denoiser_from_official`),
    `state_dict` holds its tensors under the official key names (float16 cast to float32). `dataset_kwargs` and
    `encoder` (EDM2: class name, `vae_name`, latent `scale`/`bias`) are copied from the top level when present;
    `extras` has the remaining top-level entries (e.g. `loss_fn`, `augment_pipe`) as dicts of their attributes.
    """

    class_name: str
    init_kwargs: dict
    state_dict: dict
    dataset_kwargs: Optional[dict] = None
    encoder: Optional[dict] = None
    extras: dict = field(default_factory=dict)


def _collect_state_dict(module: PickledModule, prefix: str, out: dict, seen: set) -> dict:
    # Key = path of _modules names + parameter/buffer name, as Module.state_dict() builds it (fixtures README).
    if id(module) in seen or prefix.count(".") > 64:  # real networks nest < 10 deep and never share a submodule
        raise ValueError(f"module tree is cyclic, shared or implausibly deep at '{prefix[:200]}'")
    seen.add(id(module))
    state = module.state
    if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise ValueError(f"'{prefix.rstrip('.')}' ({module.class_name}) is not a torch module (no _modules)")
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    tensors = list((state.get("_parameters") or {}).items())
    tensors += [(k, v) for k, v in (state.get("_buffers") or {}).items() if k not in non_persistent]
    for name, tensor in tensors:
        if tensor is None:  # e.g. resample_filter of a convolution without resampling
            continue
        if not torch.is_tensor(tensor):
            raise ValueError(f"'{prefix}{name}' is a {type(tensor).__name__}, expected a tensor")
        # EDM2 pickles are float16 throughout; float16 gains change the outputs (fixtures README, "Quirks").
        out[prefix + name] = tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(child, PickledModule):
            raise ValueError(f"'{prefix}{name}' is a {type(child).__name__}, expected a module")
        _collect_state_dict(child, f"{prefix}{name}.", out, seen)
    return out


def read_official_pickle(path: Union[str, os.PathLike], key: str = "ema") -> OfficialPickle:
    """Read an official EDM/EDM2/SiD/SiDA `.pkl` without executing anything in it; the network is entry `key`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    top = load_official_pickle(path)
    if isinstance(top, PickledModule):  # a network pickled on its own
        top = {key: top}
    if not isinstance(top, dict):
        raise ValueError(f"{path} holds a {type(top).__name__}, not an official checkpoint (a dict with an "
                         f"'{key}' network entry).")
    nets = [k for k, v in top.items()
            if isinstance(v, PickledModule) and isinstance(v.state, dict) and "_modules" in v.state]
    if key not in top:
        hint = f"pass key= one of {nets}" if nets else "none of its entries is a network"
        raise ValueError(f"{path} has no '{key}' entry; its top-level keys are {list(top)[:20]} ({hint}).")
    if key not in nets:
        what = (f"class {top[key].class_name}" if isinstance(top[key], PickledModule)
                else f"type {type(top[key]).__name__}")
        raise ValueError(f"entry '{key}' of {path} has {what}, not a network module"
                         + (f"; entries holding a network: {nets}" if nets else "; the file holds no network."))
    net = top[key]
    try:
        state_dict = _collect_state_dict(net, "", {}, set())
        init_kwargs = plain(net.state.get("_init_kwargs") or {})
        rest = {k: plain(v) for k, v in top.items() if k != key}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return OfficialPickle(class_name=net.class_name, init_kwargs=init_kwargs, state_dict=state_dict,
                              dataset_kwargs=rest.pop("dataset_kwargs", None), encoder=rest.pop("encoder", None),
                              extras=rest)


# ---------------------------------------------------------------------------------------------------------------------
# Sources: files, URLs, known names, Diffusers folders, the Hub

def _cache_dir(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("SIDA_CACHE") or Path.home() / ".cache" / "sida_diffusers").expanduser()


def cached_download(url: str, cache_dir=None) -> Path:
    """Download `url` once into the cache (`$SIDA_CACHE` or ~/.cache/sida_diffusers); the file appears atomically."""
    parsed = urllib.parse.urlparse(url)
    dst = _cache_dir(cache_dir) / (parsed.netloc or "url") / Path(urllib.parse.unquote(parsed.path)).name
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dst)  # readers never see a half-written file
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"could not download {url}: {e}. Check the network, or download the file yourself and "
                          "pass its local path.") from e
        raise
    return dst


def _load_diffusers_folder(folder: Path, dtype, root: Optional[Path] = None) -> Denoiser:
    root = folder_root(folder) if root is None else root  # links may only point inside it
    unet2d = find_unet2d(folder, root)  # a DDPM/DDIM teacher: a UNet2DModel and its scheduler config (ALGORITHM.md §12)
    if unet2d is not None:
        return _move(load_unet2d_denoiser(*unet2d, root=root), None, dtype)
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"  # a SiDAPipeline folder: its denoiser lives in unet/
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is a folder without config.json; pass a Diffusers model folder "
                                "(config.json + diffusion_pytorch_model.safetensors) or an official .pkl file.")
    class_name = read_model_config(folder, root=root).get("_class_name")  # bounded; links out refused
    classes = denoiser_classes()
    if not isinstance(class_name, str) or class_name not in classes:
        raise ValueError(f"{folder}/config.json names class {str(class_name)[:80]!r}, which is not a sida_diffusers "
                         f"denoiser; known classes: {sorted(classes)}. Point at the folder of a saved denoiser.")
    check_model_folder(classes[class_name], folder, root=root)  # on meta: the config must describe its weights
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return classes[class_name].from_pretrained(folder, use_safetensors=True, **kwargs)


def _load_official(path: Path, key: str, label: str) -> Denoiser:
    ckpt = read_official_pickle(path, key=key)
    shapes = {k: tuple(v.shape) for k, v in ckpt.state_dict.items()}
    model = build_within(lambda: denoiser_from_official(ckpt.class_name, ckpt.init_kwargs), shapes, label)
    check_shapes(model, shapes, label, "**init_kwargs")
    model.to_empty(device="cpu")  # memory is allocated only now, for exactly the tensors the file holds
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model


def _move(model: Denoiser, device, dtype) -> Denoiser:
    # torch's Module.to: diffusers 0.42's ModelMixin.to logs a spurious fp32-modules warning on every dtype cast
    # even when no module is kept in fp32; nothing else differs.
    return torch.nn.Module.to(model, device=device, dtype=dtype) if device is not None or dtype is not None else model


def _split_hub_source(src: str):
    """'owner/repo[/path][:subfolder]' -> (repo_id, path in repo), or None if `src` cannot be a Hub reference."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    spec, _, subfolder = src.partition(":")
    parts = spec.split("/")
    if len(parts) < 2 or src.startswith((".", "/", "~")) or (len(parts) == 2 and spec.endswith(".pkl")):
        return None
    try:
        validate_repo_id("/".join(parts[:2]))
    except HFValidationError:
        return None
    return "/".join(parts[:2]), "/".join(p for p in (*parts[2:], subfolder) if p)


def _folder_patterns(inner: str) -> list:
    """The files of a Hub folder that loading reads: a model folder's config and safetensors weights (a pipeline's
    denoiser in unet/), and for a DDPM/DDIM teacher its model_index.json and scheduler config, inside the folder or in
    a scheduler/ folder beside it (ALGORITHM.md §12). Pickled .bin weights, never loaded, are never downloaded."""
    prefixes = [f"{inner}/"] if inner else ["", "unet/"]
    patterns = [p + name for p in prefixes for name in (*MODEL_FOLDER_FILES, SCHEDULER_FILE)]
    parent = Path(inner).parent.as_posix() if inner else "."
    patterns.append(f"scheduler/{SCHEDULER_FILE}" if parent == "." else f"{parent}/scheduler/{SCHEDULER_FILE}")
    return patterns if inner else ["model_index.json", *patterns]


def load_denoiser(src, dtype: Optional[torch.dtype] = None, key: str = "ema", device=None,
                  cache_dir=None) -> Denoiser:
    """Load a denoiser in eval mode from any of the places official or converted weights live.

    `src`: a `Denoiser` (returned as is, moved to `device`/`dtype` if given), an official `.pkl` file, an http(s)
    URL of one (cached in `cache_dir`, `$SIDA_CACHE` or ~/.cache/sida_diffusers), a name in `KNOWN_NETWORKS`, a
    shipped teacher ('digits', 'digits-uncond', 'digits-ddpm', as `--teacher`), a Diffusers model folder (a denoiser
    of this package, or a DDPM/DDIM `UNet2DModel` with its scheduler config: a pipeline folder, or a bare unet/
    folder with the config beside it), or a Hub reference to either: `owner/repo`, `owner/repo:subfolder` or
    `owner/repo/path/file.pkl`.
    `key` names the network entry of an official pickle. Official weights are loaded key for key (strict).
    """
    if isinstance(src, Denoiser):
        return _move(src, device, dtype)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"load_denoiser expects a path, URL, checkpoint name, repo id or Denoiser, got {type(src)}")
    name = os.fspath(src)
    src = os.fspath(shipped_teacher_path(name)) if name in SHIPPED_TEACHERS else KNOWN_NETWORKS.get(name, name)
    path = Path(src).expanduser()
    if src.startswith(("http://", "https://")):
        model = _load_official(cached_download(src, cache_dir), key, src)
    elif path.is_file():
        model = _load_official(path, key, src)
    elif path.is_dir():
        return _move(_load_diffusers_folder(path, dtype), device, None).eval()
    elif (hub := _split_hub_source(src)) is not None:
        repo_id, inner = hub
        try:
            if inner.endswith(".pkl"):
                local = Path(hf_hub_download(repo_id, filename=inner, cache_dir=cache_dir))
            else:
                patterns = _folder_patterns(inner)  # nothing else is fetched
                snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
                local = snapshot / inner
        except Exception as e:  # network, auth, missing repo/file: all end the same way for the caller
            shown = repr(src) if name == src else f"{name!r} ({src})"
            raise OSError(f"could not fetch {shown} from the Hugging Face Hub ({type(e).__name__}: {e}), and it is "
                          "no local file or folder either. Check the path, or the repo id, network and token.") from e
        if not local.is_file():
            return _move(_load_diffusers_folder(local, dtype, folder_root(snapshot)), device, None).eval()
        model = _load_official(local, key, src)
    else:
        raise FileNotFoundError(
            f"{src!r} is not an existing file or folder, an http(s) URL, a known checkpoint name or a Hub repo id "
            f"('owner/repo', 'owner/repo:subfolder' or 'owner/repo/path/file.pkl'). Known names: "
            f"{', '.join(sorted([*KNOWN_NETWORKS, *SHIPPED_TEACHERS]))}.")
    return _move(model, device, dtype).eval()


def convert_official(src, dst: Union[str, os.PathLike], dtype: torch.dtype = torch.float32, key: str = "ema",
                     cache_dir=None) -> Denoiser:
    """Write the denoiser of `src` (anything `load_denoiser` reads) as a Diffusers model folder `dst`; returns it."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():  # save_pretrained would log an error and write nothing
        raise FileExistsError(f"{dst} is an existing file, not a folder; pass a new or existing folder for the "
                              "converted model (config.json + diffusion_pytorch_model.safetensors).")
    model = load_denoiser(src, dtype=dtype, key=key, cache_dir=cache_dir)
    model.save_pretrained(os.fspath(dst))
    if not (dst / "diffusion_pytorch_model.safetensors").is_file():
        raise OSError(f"saving the converted model to {dst} wrote no diffusion_pytorch_model.safetensors.")
    return model


# ---------------------------------------------------------------------------------------------------------------------
# The licence a teacher declares (the model card inherits it)

NVIDIA_LICENSE = ("cc-by-nc-sa-4.0", None, None)  # EDM/EDM2 weights, and the SiD/SiDA generators distilled from them
SHIPPED_LICENSE = ("apache-2.0", None, None)      # the digits teachers shipped with this package
_OFFICIAL_URL_PREFIXES = (_EDM, _EDM2)
MAX_TEACHER_CARD_BYTES = 1 << 20


def declared_license(src, online: bool = True) -> Optional[tuple]:
    """``(licence id, licence name, licence link)`` that the teacher `src` declares, or None when nothing does.

    Declared means: our table of known networks (a shipped teacher's name; a `KNOWN_NETWORKS` name or one of its
    files, or a file of NVIDIA's EDM/EDM2 download folders), or the `license` / `license_name` / `license_link`
    of the teacher's own model card (README.md of its Diffusers folder, or of the pipeline folder that holds it; of a
    Hub repo when `online`). A name that merely contains "digits" or "edm" declares nothing.
    """
    name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
    if not name:
        return None
    if name in SHIPPED_TEACHERS:
        return SHIPPED_LICENSE
    if name in KNOWN_NETWORKS or name in KNOWN_NETWORKS.values() or name.startswith(_OFFICIAL_URL_PREFIXES):
        return NVIDIA_LICENSE
    path = Path(name).expanduser()
    if path.is_dir():
        for folder in (path, path.parent):
            card = folder / "README.md"
            if card.is_file() and card.stat().st_size <= MAX_TEACHER_CARD_BYTES:
                return _card_license(card.read_text(encoding="utf-8", errors="replace"))
        return None
    hub = _split_hub_source(name) if online and not path.exists() else None
    if hub is None:
        return None
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(hub[0], ignore_metadata_errors=True)
    except Exception:  # offline, no card, no access: the licence is then unknown, which the card says
        return None
    return _card_license(str(card))


def _card_license(text: str) -> Optional[tuple]:
    from huggingface_hub import ModelCard

    data = ModelCard(text, ignore_metadata_errors=True).data
    license = getattr(data, "license", None)
    if not isinstance(license, str) or not license:
        return None
    extra = [getattr(data, key, None) for key in ("license_name", "license_link")]
    return (license, *(value if isinstance(value, str) else None for value in extra))
