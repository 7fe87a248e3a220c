"""SiDAPipeline: one (or a few) network evaluations per image from a SiD / SiDA / SiD²A generator (ALGORITHM.md §2, §11).

`EDMFamilyPipeline` holds what every pipeline over an EDM/EDM2 denoiser shares (the teacher's Heun sampler in
`edm_sampler.py` subclasses it too): class-label parsing, noise drawing with EDM-style per-seed generators, the EDM2
latent decode and the exact uint8 conversion, and Hub loading for our third-party component classes.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import UNet2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from sida_diffusers.images import pixels_to_uint8, unit_to_uint8
from sida_diffusers.latents import decode_latents
from sida_diffusers.networks import Denoiser, one_hot
from sida_diffusers.pipelines.components import DenoiserView, split_components
from sida_diffusers.pipelines.conventions import PipelineConventionsMixin, check_floats, check_id2label
from sida_diffusers.pipelines.few_step import check_grid, few_step_generate, inference_sigmas
from sida_diffusers.pipelines.loading import check_pipeline_folder, download_patterns
from sida_diffusers.pipelines.publishing import PublishingMixin
from sida_diffusers.schedule import INIT_SIGMA


# Diffusers 0.42 resolves a component library named in model_index.json only through `sys.modules`
# (`pipeline_loading_utils._get_library_or_raise`): importing sida_diffusers.networks registers our denoiser modules.

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

GeneratorLike = Union[torch.Generator, Sequence[torch.Generator], None]
LabelsLike = Union[int, str, Sequence[Union[int, str]], torch.Tensor, np.ndarray, None]


def seed_generators(seeds: Sequence[int], device: Union[str, torch.device] = "cpu") -> list:
    """One generator per seed, as EDM's StackedRandomGenerator: image i then depends only on seeds[i]."""
    return [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]


def seed_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Unit Gaussian noise ``[len(seeds), *shape]`` on the CPU, sample i drawn from its own generator seeded with
    seeds[i] (the same numbers as the pipelines' per-seed generators)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in seed_generators(seeds)])


def check_label_pool(label_pool, label_dim: int) -> torch.Tensor:
    """The class labels to draw from (e.g. a dataset's labels) as an int64 tensor ``[M]``, checked against the model."""
    pool = torch.as_tensor(np.asarray(label_pool)).reshape(-1)
    if pool.numel() == 0 or pool.is_floating_point() or pool.dtype == torch.bool:
        raise ValueError(f"label_pool must be a non-empty list of integer class labels, got {pool.numel()} values "
                         f"of dtype {pool.dtype}.")
    pool = pool.long()
    if pool.min() < 0 or pool.max() >= label_dim:
        raise ValueError(f"label_pool spans classes {int(pool.min())}..{int(pool.max())} but the model has "
                         f"label_dim={label_dim}; pass the labels of the dataset the model was trained on.")
    return pool


def uint8_to_pil(images: np.ndarray) -> list:
    """uint8 images [N, H, W, C] -> PIL images ("L" for one channel, "RGB" for three)."""
    return [PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in images]


def np_to_uint8(images: np.ndarray) -> np.ndarray:
    """The exact uint8 bytes behind an `output_type="np"` array (float32 in [0, 1], uint8 / 255): round(x * 255)."""
    return np.round(np.asarray(images, dtype=np.float32) * 255).astype(np.uint8)


def _as_generators(generator: GeneratorLike, batch_size: int):
    """Validate `generator`: None, one generator for the batch, or a list with one generator per image."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    generator = list(generator)
    if len(generator) != batch_size:
        raise ValueError(
            f"got a list of {len(generator)} generators for batch_size={batch_size}; pass one generator per image "
            "(e.g. sida_diffusers.pipelines.seed_generators(seeds)) or a single torch.Generator."
        )
    return generator


class EDMFamilyPipeline(DenoiserView, PipelineConventionsMixin, DiffusionPipeline):
    """Shared machinery of the pipelines over an EDM/EDM2 `Denoiser` with an optional `vae`.

    The denoiser is the `unet` component, or for a Diffusers UNet2DModel a view over `unet` and `scheduler`
    (`pipelines.components`); `denoiser` is what every sampler uses.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae", "scheduler"]

    def _register_common(self, unet, vae, id2label, latent_scale, latent_bias, scheduler=None):
        denoiser, unet, scheduler = split_components(unet, scheduler)
        if (latent_scale is None) != (latent_bias is None):
            raise ValueError("latent_scale and latent_bias go together (ALGORITHM.md §6.1); pass both or neither.")
        id2label = check_id2label(id2label)
        latent_scale, latent_bias = (check_floats(name, v) for name, v in (("latent_scale", latent_scale),
                                                                            ("latent_bias", latent_bias)))
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.register_to_config(id2label=id2label, latent_scale=latent_scale, latent_bias=latent_bias)
        self._remember_denoiser(denoiser, scheduler)  # the denoiser given, e.g. the trainer's EMA generator
        # name -> class index; comma-separated synonyms (ImageNet's "tench, Tinca tinca") each map to the index, as DiT.
        self.labels = {}
        for index, names in (id2label or {}).items():
            for name in names.split(","):
                self.labels[name.strip()] = index

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """Fetch a Hub snapshot with `huggingface_hub.snapshot_download`, restricted to the files this pipeline reads
        (`pipelines.loading.download_patterns`).

        Diffusers' own `download` rejects component classes from third-party packages unless the repo ships their
        source in the repo; loading from the local snapshot then resolves `sida_diffusers.*` classes.
        """
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(str(pretrained_model_name))
        except HFValidationError:
            raise FileNotFoundError(f"{pretrained_model_name} is neither an existing pipeline folder nor a Hub repo id "
                                    "('owner/name'); check the path.") from None
        keys = ("cache_dir", "force_download", "local_files_only", "token", "revision")
        # Only the files a pipeline folder is read from: a repository may hold anything else (code, pickles, data).
        return snapshot_download(pretrained_model_name, allow_patterns=download_patterns(cls),
                                 **{k: kwargs[k] for k in keys if kwargs.get(k) is not None})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`DiffusionPipeline.from_pretrained` of a folder or Hub repo that holds only what this pipeline loads.

        Before Diffusers reads the folder, `pipelines.loading.check_pipeline_folder` refuses other pipelines, custom
        code and components other than this package's denoisers and `AutoencoderKL`, and checks each component's
        config.json against its safetensors weights on the meta device; weights are read from safetensors only.
        """
        for option in ("custom_pipeline", "trust_remote_code"):
            if kwargs.get(option):
                raise ValueError(f"{option} is refused: sida_diffusers pipelines never import code from a folder.")
        source = os.fspath(pretrained_model_name_or_path)
        folder = Path(source if os.path.isdir(source) else cls.download(source, **kwargs))
        check_pipeline_folder(cls, folder, passed=kwargs, variant=kwargs.get("variant"))
        kwargs["use_safetensors"] = True  # never Diffusers' fallback to pickled .bin weights
        return super().from_pretrained(str(folder), **kwargs)

    # ---- labels ------------------------------------------------------------------------------------------------
    def get_label_ids(self, label: Union[str, Sequence[str]]) -> list:
        """Map class names (any synonym of `id2label`) to class indices."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name.strip() not in self.labels]
        if unknown:
            if not self.labels:
                raise ValueError(f"class names {unknown} given but this pipeline has no id2label; pass class indices.")
            known = ", ".join(list(self.labels)[:20]) + (", ..." if len(self.labels) > 20 else "")
            raise ValueError(f"unknown class name(s) {unknown}; use one of pipe.labels ({known}) or class indices.")
        return [self.labels[name.strip()] for name in names]

    def prepare_class_labels(self, class_labels: LabelsLike, batch_size: int, generator: GeneratorLike, device,
                             label_pool: Optional[Sequence[int]] = None):
        """One-hot labels ``[batch_size, label_dim]`` (None for an unconditional model).

        `class_labels`: an index, a class name, a list of those (one per image, or one for all), a tensor of indices,
        or a one-hot / soft-label tensor ``[N, label_dim]``. None on a conditional model draws the labels from
        `generator`: uniformly over the classes, or, given `label_pool` (e.g. the training set's labels), the label
        at a uniformly drawn index of the pool (ALGORITHM.md §9.1). With per-image generators each label comes from
        that image's generator after its noise, as in EDM's generate script, so image i depends only on generator i
        whatever the batch size.
        """
        label_dim = self.denoiser.label_dim
        if label_dim == 0:
            if class_labels is not None or label_pool is not None:
                raise ValueError("this model is unconditional (label_dim=0) but class_labels were given; pass None.")
            return None
        if class_labels is None:
            pool = None if label_pool is None else check_label_pool(label_pool, label_dim)
            size = label_dim if pool is None else len(pool)
            if isinstance(generator, list):
                index = torch.stack([torch.randint(size, (), generator=g, device=g.device) for g in generator])
            else:
                gen_device = generator.device if generator is not None else "cpu"
                index = torch.randint(size, (batch_size,), generator=generator, device=gen_device)
            index = index.cpu()
            return one_hot(index if pool is None else pool[index], label_dim).to(device)

        if isinstance(class_labels, (str, int, np.integer)):
            class_labels = [class_labels]
        if isinstance(class_labels, np.ndarray):
            class_labels = torch.from_numpy(class_labels)
        if not torch.is_tensor(class_labels):
            class_labels = [self.get_label_ids(v)[0] if isinstance(v, str) else v for v in class_labels]
            class_labels = torch.as_tensor(class_labels)
        labels = class_labels.to(device)
        if labels.is_floating_point() and labels.ndim == 2:
            if labels.shape[1] != label_dim:
                raise ValueError(
                    f"one-hot class_labels must have shape [N, {label_dim}] (label_dim={label_dim}), got "
                    f"{list(labels.shape)}; pass class indices or one-hot rows of width {label_dim}."
                )
        elif not labels.is_floating_point() and labels.ndim <= 1:
            labels = labels.reshape(-1).long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= label_dim):
                raise ValueError(f"class index out of range: {labels.tolist()} (valid: 0..{label_dim - 1} for "
                                 f"label_dim={label_dim}).")
            labels = one_hot(labels, label_dim)
        else:
            raise ValueError(
                f"class_labels tensor of dtype {labels.dtype} and shape {list(labels.shape)} not understood; pass "
                f"integer indices [N] or float one-hot rows [N, {label_dim}]."
            )
        if labels.shape[0] == 1:
            labels = labels.expand(batch_size, -1)
        if labels.shape[0] != batch_size:
            raise ValueError(
                f"got {labels.shape[0]} class labels for batch_size={batch_size}; pass one label per image or a "
                "single label for all of them."
            )
        return labels.to(torch.float32)

    # ---- the one generation path behind every reported figure -------------------------------------------------
    @torch.no_grad()
    def generate_uint8(self, seeds: Sequence[int], class_labels: LabelsLike = None,
                       label_pool: Optional[Sequence[int]] = None, batch_size: int = 64, **call_kwargs) -> torch.Tensor:
        """uint8 images ``[len(seeds), C, H, W]`` on the CPU, image i made from ``seeds[i]`` alone.

        Each image's noise, then (with `class_labels=None`) its label, come from a CPU generator seeded with its seed
        (EDM's `--seeds` convention; labels from `label_pool` or uniform), so an image, and every figure computed from
        it, is the same whatever the batch size or device. The training grids and evaluation, the run summary, the
        digits tables, `sida-eval` and `sida-sample` all generate through here, i.e. through the pipeline's own
        `__call__`; `call_kwargs` go to it (e.g. `num_inference_steps`).
        """
        seeds = [int(s) for s in seeds]
        if class_labels is not None:
            class_labels = self.prepare_class_labels(class_labels, len(seeds), None, "cpu")
        chunks = []
        for i in range(0, len(seeds), batch_size):
            part = seeds[i:i + batch_size]
            labels = None if class_labels is None else class_labels[i:i + batch_size]
            images = self(batch_size=len(part), class_labels=labels, label_pool=label_pool,
                          generator=seed_generators(part), output_type="np", **call_kwargs)[0]
            chunks.append(torch.from_numpy(np_to_uint8(images)).permute(0, 3, 1, 2))  # EDM's exact bytes
        return torch.cat(chunks)

    # ---- noise -------------------------------------------------------------------------------------------------
    def check_common_inputs(self, batch_size: int, output_type: str, generator: GeneratorLike):
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if (self.config.latent_scale is not None) and self.vae is None:
            raise ValueError(
                "this is a latent (EDM2) model (latent_scale is set) but the pipeline has no vae; pass "
                "vae=AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-mse') to from_pretrained or the constructor."
            )
        return _as_generators(generator, batch_size)

    def sample_shape(self, batch_size: int) -> tuple:
        unet = self.denoiser
        return (batch_size, unet.img_channels, unet.img_resolution, unet.img_resolution)

    def prepare_noise(self, batch_size: int, generator: GeneratorLike, latents: Optional[torch.Tensor], device):
        """Unit Gaussian noise eps of the network's shape (the user's `latents` if given), float32 on `device`.

        Drawn with `randn_tensor`, which with per-image CPU generators is bit-identical to EDM's
        StackedRandomGenerator (each image's noise is one `torch.randn` call on its own generator).
        """
        shape = self.sample_shape(batch_size)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {list(shape)} (unit Gaussian noise), got {list(latents.shape)}.")
        return latents.to(device=device, dtype=torch.float32)

    # ---- output ------------------------------------------------------------------------------------------------
    def postprocess(self, x: torch.Tensor, output_type: str):
        """Network output -> images.

        Pixel models (x in [-1, 1]): uint8 = (x*127.5 + 128).clamp(0, 255), truncated (ALGORITHM.md §2).
        Latent models: vae.decode((x - bias) / scale) is an image in [0, 1]; uint8 = clamp(0, 1)*255, truncated
        (ALGORITHM.md §6.1). "pil" -> list of PIL images ("L" for one channel); "np" -> float32 array [N, H, W, C]
        in [0, 1] as in Diffusers, equal to uint8 / 255 so that `np_to_uint8` (round(x*255)) gives EDM's bytes back;
        "pt" -> float tensor [N, C, H, W] in [0, 1] before quantisation; "latent" -> the network output x itself
        (EDM2: the normalised latents, before the VAE; pixel models: the image in [-1, 1]).
        """
        if output_type == "latent":
            return x
        if self.config.latent_scale is not None:
            image = decode_latents(self.vae, x, self.config.latent_scale, self.config.latent_bias)
            uint8 = unit_to_uint8(image)
        else:
            image = (x * 0.5 + 0.5).clamp(0, 1).to(torch.float32)
            uint8 = pixels_to_uint8(x)
        if output_type == "pt":
            return image
        array = uint8.permute(0, 2, 3, 1).cpu().numpy()
        # Diffusers' "np" is float in [0, 1]; dividing the quantised image keeps EDM's exact bytes recoverable.
        return array.astype(np.float32) / 255 if output_type == "np" else uint8_to_pil(array)

    def run_generator(self, z: torch.Tensor, sigma: float, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """x = G(z; sigma, c) with zero augment labels for nets that take them (ALGORITHM.md §2, §10 item 8)."""
        unet = self.denoiser
        augment = torch.zeros(z.shape[0], unet.augment_dim, device=z.device) if unet.augment_dim else None
        sigma = torch.full((z.shape[0], 1, 1, 1), float(sigma), device=z.device)
        return unet(z, sigma, labels, augment_labels=augment)


class SiDAPipeline(PublishingMixin, EDMFamilyPipeline):
    r"""One-step (or few-step) generation with a generator distilled by SiD, SiDA or SiD²A.

    Components: `unet`, the generator (a `sida_diffusers.networks.Denoiser`, e.g. `EDMPrecond` or
    `EDM2Precond`), and for EDM2 latent models a `vae` (`AutoencoderKL`, the SD VAE in EDM2's [0, 1] convention).
    A generator distilled from a Diffusers UNet2DModel teacher is stored as that: `unet` is a plain `UNet2DModel`
    and `scheduler` carries its noise schedule (ALGORITHM.md §12); `pipe.denoiser` is the generator either way.
    Config: `init_sigma` (`INIT_SIGMA` = 2.5), `id2label` (class index -> name, comma-separated synonyms allowed),
    `latent_scale`/`latent_bias` (per-channel EDM2 latent normalisation, `EDM2_LATENT_SCALE`/`EDM2_LATENT_BIAS`;
    None for pixel models), `step_sigmas` and `renoise` (the trained step grid, ALGORITHM.md §11; `[init_sigma]` for a
    one-step generator and for folders saved without one). Saved folders also load with
    `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` where this package is not installed, and keep
    their model card (`PublishingMixin`).

    ```py
    pipe = SiDAPipeline.from_pretrained("user/sida-cifar10-uncond", dtype=torch.float32).to("cuda")
    images = pipe(batch_size=16, generator=seed_generators(range(16), "cuda")).images
    ```
    """

    def __init__(
        self,
        unet: Union[Denoiser, UNet2DModel],
        vae=None,
        scheduler=None,                     # the noise schedule of a UNet2DModel unet (§12); None otherwise
        init_sigma: float = INIT_SIGMA,    # sigma of the generator's input noise z = init_sigma * eps (§2)
        id2label: Optional[dict] = None,    # class index -> name(s)
        latent_scale: Optional[list] = None,  # EDM2: per-channel latent scale (§6.1); None for pixel models
        latent_bias: Optional[list] = None,   # EDM2: per-channel latent bias (§6.1)
        step_sigmas: Optional[list] = None,   # the trained step grid, highest first (§11.1); None: [init_sigma]
        renoise: str = "fresh",               # noise between steps: "fresh" draws, or "fixed" = the first draw (§11.3)
    ):
        super().__init__()
        try:
            valid = not isinstance(init_sigma, (bool, str)) and 0 < float(init_sigma) < math.inf
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"init_sigma must be positive and finite (the official value is {INIT_SIGMA}), got "
                             f"{str(init_sigma)[:40]} (in model_index.json when the pipeline was loaded).")
        step_sigmas = check_grid(step_sigmas, renoise, init_sigma)
        self._register_common(unet, vae, id2label, latent_scale, latent_bias, scheduler)
        self.register_to_config(init_sigma=float(init_sigma), step_sigmas=step_sigmas, renoise=renoise)

    @property
    def num_steps(self) -> int:
        """K, the number of steps the generator was trained for (1 for a one-step generator)."""
        return len(self.config.step_sigmas or [self.config.init_sigma])

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: LabelsLike = None,
        generator: GeneratorLike = None,
        latents: Optional[torch.Tensor] = None,
        num_inference_steps: Optional[int] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        label_pool: Optional[Sequence[int]] = None,
        sigmas: Optional[Sequence[float]] = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        r"""Generate `batch_size` images.

        Args:
            batch_size: number of images.
            class_labels: for conditional models: an index, a class name (see `pipe.labels`), a list with one per
                image, a tensor of indices, or one-hot rows `[N, label_dim]`; None draws uniform labels from
                `generator` (see `label_pool`). Must be None for unconditional models.
            generator: a `torch.Generator`, or a list with one per image (EDM-style per-seed reproducibility: image
                i then depends only on generator i, whatever the batch composition).
            latents: unit Gaussian noise `[N, C, H, W]` to use instead of drawing it; the generator sees
                `init_sigma * latents`.
            num_inference_steps: k network evaluations per image, along the first k levels of the trained grid
                `step_sigmas` (ALGORITHM.md §11.4); default: all K the generator was trained for (1 for a one-step
                generator). More than K is refused: pass `sigmas` for an untrained schedule.
            output_type: "pil", "np" (float32 `[N, H, W, C]` in [0, 1], Diffusers' convention: the exact EDM uint8
                image / 255, so `np_to_uint8(images)` gives its bytes), "pt" (float `[N, C, H, W]` in [0, 1], not
                quantised) or "latent" (the generator's output before decoding: EDM2's normalised latents).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.
            label_pool: with `class_labels=None`, draw each image's label from these class labels (e.g. the training
                set's, as the paper's evaluation does) instead of uniformly over the classes.
            sigmas: an explicit, strictly decreasing schedule of noise levels to run instead of the trained grid (as
                Diffusers' `sigmas` argument); a warning says so when it is not what the generator was trained on.
            callback_on_step_end: called as `callback(pipe, step, sigma, callback_kwargs)` after each generator
                evaluation (Diffusers' convention); `callback_kwargs` holds `callback_on_step_end_tensor_inputs`
                ("latents": the sample so far), and a "latents" entry of the returned dict replaces it.
        """
        # 1. Check inputs; the noise levels to run: a prefix of the trained grid, or the caller's `sigmas` (§11.4)
        generator = self.check_common_inputs(batch_size, output_type, generator)
        callback, tensor_inputs = self.check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        sigmas = inference_sigmas(self.config.step_sigmas or [self.config.init_sigma], num_inference_steps, sigmas)
        # 2. Noise, then (per image, from the same generator) the labels
        device = self._execution_device
        eps = self.prepare_noise(batch_size, generator, latents, device)
        labels = self.prepare_class_labels(class_labels, batch_size, generator, device, label_pool)
        # 3. The generator along the grid; fresh noise between steps comes from the same generators, after the labels
        bar = self.progress_bar(total=len(sigmas)) if len(sigmas) > 1 else None

        def on_step(k, sigma, x):  # the progress bar of a multistep call, and Diffusers' callback_on_step_end
            if bar is not None:
                bar.update()
            return self.step_end(callback, tensor_inputs, k, sigma, x)

        draw = lambda: randn_tensor(eps.shape, generator=generator, device=device, dtype=torch.float32)
        x = few_step_generate(lambda x, sigma: self.run_generator(x, sigma, labels), eps, sigmas,
                              self.config.renoise or "fresh", draw, on_step=on_step)
        if bar is not None:
            bar.close()
        # 4. Decode (EDM2 latents: once, after the last step) and convert
        images = self.postprocess(x, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
