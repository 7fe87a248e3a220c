"""Diffusers `UNet2DModel` teachers (discrete-time VP: DDPM / DDIM checkpoints) as EDM denoiser (ALGORITHM.md §12).

A DDPM network predicts (epsilon, v or x0) from x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at an integer step t.
Written in EDM's variables, x = x_t / sqrt(abar_t) = x_0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t), it
is a denoiser D(x; sigma) = c_skip x + c_out F(c_in x, t(sigma)) like every other (the conversion of k-diffusion's
`DiscreteEpsDDPMDenoiser` and Diffusers' `EulerDiscreteScheduler`):

* `DiscreteVPDenoiser` owns the conversion: the sigma ladder of the scheduler configuration (§12.1), the input scale
  and the fractional timestep of any sigma (§12.2), and c_skip / c_out of each prediction type (§12.3). It knows
  nothing of the network, so a conditional UNet (`UNet2DConditionModel`) can slot in by supplying `run_backbone`.
* `UNet2DDenoiser` runs a `UNet2DModel` held as `self.unet`: its decoder output is `UNet2DModel.forward`'s, and its
  discriminator map is the channel mean of the mid-block output, computed by the encoder half alone (§12.4).

Configuration: `unet_config` (the UNet2DModel config.json) and `scheduler_config` (the scheduler's
scheduler_config.json: betas and prediction type), so `save_pretrained` / `from_pretrained` round-trip, and
`UNet2DDenoiser.from_unet(unet, scheduler_config)` wraps an existing UNet2DModel without copying it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Optional

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (Diffusers' loader looks the base class up here)
from diffusers.schedulers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from sida_diffusers.networks.base import Denoiser, autocast_enabled


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")  # DDPMScheduler's names
# Diffusers' discrete-time schedulers of the VP family (EDMEulerScheduler is for EDM-native networks, not these).
SCHEDULER_CLASSES = tuple(s.name for s in KarrasDiffusionSchedulers if s.name != "EDMEulerScheduler")
MAX_TRAIN_TIMESTEPS = 100_000  # DDPM uses 1,000 and iDDPM 4,000; a table beyond this is not a training schedule
MAX_SAMPLE_SIZE = 8192         # the largest image any reader of the package accepts (safe_io.files)
UNET_KEYS = tuple(p for p in inspect.signature(UNet2DModel.__init__).parameters if p != "self")
_LEARNED_VARIANCE = ("learned", "learned_range")


def _number(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {str(value)[:80]!r}.")
    return float(value)


def check_scheduler_config(config, where: str = "scheduler config") -> dict:
    """The scheduler configuration with every value the conversion reads checked (ALGORITHM.md §12.1).

    Refuses, naming the key: another class than Diffusers' VP schedulers, a step count outside 2..100,000, a beta
    schedule DDPMScheduler does not know, betas that are not finite numbers in (0, 1), an unknown prediction type.
    """
    if not isinstance(config, dict):
        raise ValueError(f"{where} is a {type(config).__name__}, not a scheduler configuration (a JSON object).")
    name = config.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"{where} names the scheduler {name!r}; sida_diffusers converts discrete-time VP (DDPM-type) "
                         f"schedules only, from {', '.join(SCHEDULER_CLASSES)}.")
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"{where}: num_train_timesteps must be an integer in 2..{MAX_TRAIN_TIMESTEPS:,}, got "
                         f"{str(steps)[:40]}; it is not a DDPM training schedule.")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{where}: prediction_type {str(prediction)[:40]!r} is unknown; Diffusers' VP schedulers "
                         f"predict one of {', '.join(PREDICTION_TYPES)}.")
    betas = config.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != steps:
            raise ValueError(f"{where}: trained_betas must be a list of num_train_timesteps={steps} numbers.")
        if not all(0 < _number(b, "every value of trained_betas", where) < 1 for b in betas):
            raise ValueError(f"{where}: every trained beta must lie in (0, 1).")
    else:
        schedule = config.get("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"{where}: beta_schedule {str(schedule)[:40]!r} is unknown; use one of "
                             f"{', '.join(BETA_SCHEDULES)} or explicit trained_betas.")
        start = _number(config.get("beta_start", 0.0001), "beta_start", where)
        end = _number(config.get("beta_end", 0.02), "beta_end", where)
        if schedule != "squaredcos_cap_v2" and not 0 < start <= end < 1:
            raise ValueError(f"{where}: beta_start={start} and beta_end={end} must satisfy 0 < start <= end < 1.")
    return dict(config)


def discrete_sigmas(scheduler_config: dict) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1 (increasing), float32 on the CPU (ALGORITHM.md §12.1).

    abar comes from Diffusers' own DDPMScheduler, so every beta schedule it names (and explicit trained_betas) gives
    exactly its betas; like EulerDiscreteScheduler, a zero-terminal-SNR schedule ends at abar = 2^-24, not 0.
    """
    config = check_scheduler_config(scheduler_config)
    keys = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    with torch.device("cpu"):  # also when a network is being built on the meta device
        abar = DDPMScheduler(**{k: v for k, v in config.items() if k in keys}).alphas_cumprod.clone()
    if config.get("rescale_betas_zero_snr"):
        abar[-1] = 2.0 ** -24
    sigmas = ((1 - abar) / abar) ** 0.5
    if not (torch.isfinite(sigmas).all() and (sigmas > 0).all() and (sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError("the scheduler configuration gives noise levels that are not finite, positive and strictly "
                         "increasing in t (betas too small or too large for float32); it is not a usable schedule.")
    return sigmas


def sigma_to_timestep(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of each sigma: linear in log sigma between the discrete steps, clamped to [0, T-1]
    (EulerDiscreteScheduler._sigma_to_t in torch; ALGORITHM.md §12.2). `log_sigmas` increasing, float64."""
    log_sigma = sigma.to(log_sigmas.dtype).clamp(min=1e-10).log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


class DiscreteVPDenoiser(Denoiser):
    """EDM view of a network trained on a discrete-time VP schedule; subclasses supply the network (`run_backbone`).

    The configuration must hold `scheduler_config`. D(x; sigma) = c_skip x + c_out F(x / sqrt(sigma^2 + 1), t(sigma))
    with c_skip, c_out from the prediction type (ALGORITHM.md §12.3); sigma outside the ladder is clamped for the
    timestep only (§12.2).
    """

    family = "vp-discrete"
    distillable = True

    def _init_schedule(self) -> None:
        sigmas = discrete_sigmas(self.config.scheduler_config)
        self._log_sigmas = {torch.device("cpu"): sigmas.to(torch.float64).log()}  # per device, never a buffer
        self._sigma_range = (float(sigmas[0]), float(sigmas[-1]))

    @property
    def prediction_type(self) -> str:
        return self.config.scheduler_config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def sigma_min(self) -> float:
        """sigma of step 0, the smallest the network was trained at (EDM's sampler clamps its ladder to it)."""
        return self._sigma_range[0]

    @property
    def sigma_max(self) -> float:
        return self._sigma_range[1]

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional training step t(sigma), float32 ``[N]``, for sigma of any shape with N elements."""
        device = sigma.device
        if device not in self._log_sigmas:
            self._log_sigmas[device] = self._log_sigmas[torch.device("cpu")].to(device)
        return sigma_to_timestep(sigma.flatten(), self._log_sigmas[device]).to(torch.float32)

    def preconditioning(self, sigma: torch.Tensor):
        """c_in = 1/sqrt(sigma^2+1) gives the network x_t exactly; c_noise is the fractional timestep (§12.2, §12.3)."""
        scale = (sigma ** 2 + 1).sqrt()
        if self.prediction_type == "epsilon":    # x_0 = x - sigma eps
            c_skip, c_out = torch.ones_like(sigma), -sigma
        elif self.prediction_type == "v_prediction":  # x_0 = x / (sigma^2+1) - sigma / sqrt(sigma^2+1) v
            c_skip, c_out = 1 / scale ** 2, -sigma / scale
        else:                                    # the network predicts x_0 itself
            c_skip, c_out = torch.zeros_like(sigma), torch.ones_like(sigma)
        return c_skip, c_out, 1 / scale, self.timestep(sigma)

    def make_scheduler(self):
        """The Diffusers scheduler of the configuration (its class, or DDPMScheduler), for pipelines and export."""
        import diffusers

        config = dict(self.config.scheduler_config)
        return getattr(diffusers, config.get("_class_name", "DDPMScheduler")).from_config(config)


def check_unet_config(config, where: str = "UNet2DModel config") -> dict:
    """The UNet2DModel keywords of `config` (other keys dropped, as Diffusers ignores them), with what the conversion
    needs checked: a square `sample_size`, sinusoidal timesteps, labels through `num_class_embeds` only."""
    if not isinstance(config, dict):
        raise ValueError(f"{where} is a {type(config).__name__}, not a UNet2DModel configuration (a JSON object).")
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"{where} describes a {str(name)[:60]}, not a UNet2DModel; "
                         + ("text-to-image (UNet2DConditionModel) teachers are not supported yet."
                            if name == "UNet2DConditionModel" else "pass a DDPM/DDIM UNet2DModel folder."))
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SAMPLE_SIZE:
        raise ValueError(f"{where}: sample_size must be one square resolution in 1..{MAX_SAMPLE_SIZE}, got "
                         f"{str(config.get('sample_size'))[:40]}.")
    if config.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"{where}: time_embedding_type {str(config.get('time_embedding_type'))[:40]!r} is not "
                         "supported; DDPM/DDIM UNets use 'positional' timesteps (score-SDE VE UNets are not VP).")
    if config.get("class_embed_type") is not None:
        raise ValueError(f"{where}: class_embed_type {str(config.get('class_embed_type'))[:40]!r} is not supported; "
                         "class-conditional UNets are read through num_class_embeds.")
    classes = config.get("num_class_embeds")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise ValueError(f"{where}: num_class_embeds must be a positive integer or null, got {str(classes)[:40]}.")
    return {k: v for k, v in config.items() if k in UNET_KEYS}


class UNet2DDenoiser(DiscreteVPDenoiser):
    """A Diffusers `UNet2DModel` with its noise schedule, as an EDM denoiser (call contract: `base.Denoiser`).

    `return_flag="decoder"` is `UNet2DModel.forward` preconditioned; `"encoder"` the channel mean of the mid-block
    output ``[N,1,h,w]`` from conv_in, the down blocks and the mid block only; `"encoder_decoder"` both from one
    pass (ALGORITHM.md §12.4). Class labels are one-hot rows: their embedding is ``labels @ class_embedding.weight``,
    the very row `nn.Embedding` looks up (an all-zero row, a conditional model called without labels, adds nothing).
    """

    backbone_name = "unet"
    _no_split_modules = ["ResnetBlock2D", "Attention"]  # Diffusers' blocks: the units of sharding (ALGORITHM.md §13.1)

    @register_to_config
    def __init__(
        self,
        unet_config: dict,            # UNet2DModel keywords (its config.json).
        scheduler_config: dict,       # The training scheduler's configuration (betas, prediction_type).
        sigma_data: float = 0.5,      # Standard deviation of the data in [-1, 1] (the SiD losses' weighting).
        use_fp16: bool = False,       # Run the UNet under float16 autocast on CUDA.
    ):
        super().__init__()
        unet_config = check_unet_config(unet_config)
        check_scheduler_config(scheduler_config)
        learned = scheduler_config.get("variance_type") in _LEARNED_VARIANCE
        c_in, c_out = unet_config.get("in_channels", 3), unet_config.get("out_channels", 3)
        if c_out != c_in * (2 if learned else 1):
            raise ValueError(f"the UNet maps {c_in} to {c_out} channels; a denoiser needs out_channels = in_channels "
                             "(or twice that with a learned variance_type in the scheduler config).")
        self.unet = UNet2DModel(**unet_config)
        self._init_schedule()

    @classmethod
    def from_unet(cls, unet: UNet2DModel, scheduler_config: dict, **kwargs) -> "UNet2DDenoiser":
        """Wrap an existing UNet2DModel (its parameters are shared, not copied) with its scheduler configuration."""
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        with torch.device("meta"):  # the UNet built by __init__ is replaced at once: nothing to allocate
            denoiser = cls(unet_config=config, scheduler_config=dict(scheduler_config), **kwargs)
        denoiser.unet = unet
        return denoiser

    @classmethod
    def over(cls, unet: UNet2DModel, scheduler) -> "UNet2DDenoiser":
        """`from_unet` with the noise schedule of a Diffusers scheduler object (its class name included)."""
        return cls.from_unet(unet, {**scheduler.config, "_class_name": type(scheduler).__name__})

    @property
    def img_resolution(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def img_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def label_dim(self) -> int:
        return int(self.unet.config.num_class_embeds or 0)

    def unet_dtype(self, x: torch.Tensor) -> torch.dtype:
        # UNet2DModel's layers do not cast their weights: the input takes the weights' dtype, and `use_fp16` runs
        # float32 weights under float16 autocast (run_backbone) instead of casting the input.
        return torch.float32 if autocast_enabled(x.device.type) else self.unet.dtype

    def select_output(self, f_x: torch.Tensor) -> torch.Tensor:
        return f_x[:, : self.img_channels]  # a learned-variance UNet also predicts the variance

    def run_backbone(self, x_in, c_noise, class_labels, augment_labels, return_flag):
        fp16 = (self.config.use_fp16 and x_in.device.type == "cuda" and self.unet.dtype == torch.float32
                and not torch.is_autocast_enabled("cuda"))
        with torch.autocast("cuda", dtype=torch.float16) if fp16 else contextlib.nullcontext():  # (meta: planning)
            h, emb, skips = self.encode(x_in, c_noise, class_labels)
            logits = h.mean(dim=1, keepdim=True) if return_flag != "decoder" else None
            if return_flag == "encoder":
                return logits
            out = self.decode(h, emb, skips)
        return out if return_flag == "decoder" else (out, logits)

    def unet_forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        """The raw UNet output at (possibly fractional) timesteps ``[N]``, labels one-hot: `UNet2DModel.forward`."""
        return self.decode(*self.encode(sample, timestep, class_labels))

    def encode(self, sample, timesteps, class_labels):
        """UNet2DModel.forward steps 0-4: embeddings, conv_in, down blocks, mid block (diffusers models/unets/unet_2d.py)."""
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=sample.device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
        if unet.class_embedding is not None:
            labels = torch.zeros(1, self.label_dim, device=sample.device) if class_labels is None else class_labels
            emb = emb + (labels.to(unet.class_embedding.weight.dtype) @ unet.class_embedding.weight).to(unet.dtype)
        skip_sample = sample
        sample = unet.conv_in(sample)
        skips = (sample,)
        for block in unet.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, res, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if unet.mid_block is not None:
            sample = unet.mid_block(sample, emb)
        return sample, emb, skips  # like UNet2DModel.forward, the decoder starts without the down blocks' skip_sample

    def decode(self, sample, emb, skips):
        """UNet2DModel.forward steps 5-6: up blocks and the output head."""
        unet, skip_sample = self.unet, None
        for block in unet.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            if hasattr(block, "skip_conv"):
                sample, skip_sample = block(sample, res, emb, skip_sample)
            else:
                sample = block(sample, res, emb)
        sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
        return sample + skip_sample if skip_sample is not None else sample
