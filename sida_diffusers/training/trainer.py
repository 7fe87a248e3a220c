"""The Accelerate distillation loop: SiD / SiDA / SiD²A from an EDM or EDM2 teacher (ALGORITHM.md §5).

One iteration (`SiDATrainer.step`) = a fake-score/discriminator phase, a generator phase, the EMA update and
``cur_nimg += total_batch_size``. Each phase runs R accumulation rounds of B samples per process, backpropagates every
round with DDP gradient sync only on the last one, and divides every loss by B_tot = B*R (§4.5, §5.3). Per-process
batch statistics (the pooled BCE of §4.2/§4.4) are never gathered across processes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, gather_object
from tqdm.auto import tqdm

from sida_diffusers.latents import decode_latents, pixels_to_uint8, unit_to_uint8
from sida_diffusers.losses import (discriminator_loss, fake_score_loss, generator_sigma, lognormal_sigma,
                                   nan_sample_mask, sid_generator_loss, sida_adversarial_loss)
from sida_diffusers.networks.base import Denoiser
from sida_diffusers.training.config import TrainConfig
from sida_diffusers.training.ema import HalfLifeEMA

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.pt"
NETWORKS = ("generator", "generator_ema", "fake_score")
LOSS_NAMES = ("fake_score_loss", "d_loss", "g_loss", "g_gan_loss")  # logged as in ALGORITHM.md §5.11


# ---- small helpers ----------------------------------------------------------------------------------------------------

def _nimg(kimg: float) -> int:
    return int(round(kimg * 1000))


def list_checkpoints(output_dir) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders of an interrupted save are ignored)."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(spec: str, output_dir) -> Optional[Path]:
    """`--resume_from_checkpoint`: 'latest' (None when the run has none yet) or an explicit checkpoint folder."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no {STATE_FILE}); pass 'latest' or a "
                                f"{CHECKPOINT_PREFIX}NNNNNNNNN folder under OUTPUT_DIR/checkpoints.")
    return path


def load_network(source: str) -> Denoiser:
    """A `--teacher` / `--generator_init` source: 'digits' / 'digits-uncond' (the shipped teachers, offline) or anything
    `load_denoiser` reads (official .pkl, URL, known name, Diffusers folder, Hub repo)."""
    if source in ("digits", "digits-uncond"):
        from sida_diffusers.digits import digits_teacher_path

        source = digits_teacher_path(conditional=source == "digits")
    from sida_diffusers.checkpoints import load_denoiser

    return load_denoiser(source, dtype=torch.float32)


def derive_network(source: Denoiser, dropout: Optional[float] = None, logvar: Optional[bool] = None) -> Denoiser:
    """A trainable copy of `source` (ALGORITHM.md §2): same class, config and weights, optionally with another dropout
    and, for EDM2, with or without the logvar head (missing head weights keep their initialisation)."""
    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    if dropout is not None:
        if "model_kwargs" in config:  # EDM family: the UNet keywords hold the dropout
            config["model_kwargs"] = {**(config["model_kwargs"] or {}), "dropout": dropout}
        else:
            config["dropout"] = dropout
    if logvar is not None and "logvar_channels" in config:
        config["logvar_channels"] = (config["logvar_channels"] or 128) if logvar else 0
    if config == {k: v for k, v in source.config.items() if not k.startswith("_")}:
        return copy.deepcopy(source).train().requires_grad_(True)
    net = type(source).from_config(config)
    own = net.state_dict()
    net.load_state_dict({k: v for k, v in source.state_dict().items() if k in own}, strict=False)
    return net.train().requires_grad_(True)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _allow_phase_graphs() -> None:
    """Room in Dynamo's per-code cache for every (network, phase) graph of one iteration.

    All compiled modules share `Module._call_impl`'s cache: the fake score holds 3 graphs (D step on fakes and reals,
    frozen in the G step), G 2 (no_grad sample, G step), the teacher 1. Past the limit Dynamo would silently run eager.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)


# ---- the trainer ------------------------------------------------------------------------------------------------------

class SiDATrainer:
    """Distils `config.teacher` into a one-step generator. ``SiDATrainer(config).train()`` runs the whole schedule.

    Everything that can be wrong with the input (shapes, labels, batch sizes, method requirements) raises in
    ``__init__``, before any training step. `teacher` / `generator_init` / `dataset` may be passed as objects instead
    of being loaded from the config's sources.
    """

    def __init__(self, config: TrainConfig, accelerator: Optional[Accelerator] = None,
                 teacher: Optional[Denoiser] = None, generator_init: Optional[Denoiser] = None, dataset=None):
        self.cfg = cfg = config
        self.output_dir = Path(cfg.output_dir)
        self._check_method_inputs(generator_init, dataset)
        self._check_trackers()
        self.accelerator = accelerator or Accelerator(
            cpu=cfg.cpu, mixed_precision="no",  # precision is handled by the networks themselves (ALGORITHM.md §1.4)
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / cfg.logging_dir)),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)])
        acc = self.accelerator
        self.device, self.world_size, self.rank = acc.device, acc.num_processes, acc.process_index
        self._setup_batching()
        self._setup_precision()
        self.seed = self._run_seed()
        _seed_everything((self.seed * self.world_size + self.rank) % (1 << 31))  # per-rank seed (§5.9)

        self.teacher = (teacher if teacher is not None else load_network(cfg.teacher)).to(self.device).eval()
        self.teacher.requires_grad_(False)
        init = generator_init
        if init is None and cfg.generator_init is not None:
            init = load_network(cfg.generator_init)
        self.dataset = dataset if dataset is not None else self._build_dataset()
        self._check_networks(init)
        self._check_data()

        # Fake score and generator start from the teacher; SiD²A's generator from the SiD generator (§2, §10.14).
        fake = derive_network(self.teacher, cfg.dropout, logvar=cfg.use_logvar if self.is_edm2 else None)
        gen = derive_network(init if init is not None else self.teacher, cfg.dropout,
                             logvar=False if self.is_edm2 else None)
        for net in (fake, gen, self.teacher):
            net.register_to_config(use_fp16=cfg.mixed_precision == "fp16")
        self.generator_ema = copy.deepcopy(gen).eval().requires_grad_(False).to(self.device)
        fake, gen = fake.to(self.device), gen.to(self.device)
        if cfg.channels_last:
            for net in (fake, gen, self.teacher, self.generator_ema):
                net.to(memory_format=torch.channels_last)
        eps = 1e-6 if cfg.mixed_precision == "fp16" else 1e-8  # §5.5
        fused = cfg.adam_fused if cfg.adam_fused is not None else self.device.type == "cuda"
        adam = dict(eps=eps, fused=fused, foreach=not fused)
        self.opt_fake = torch.optim.Adam(fake.parameters(), lr=cfg.lr, betas=(0.0, 0.999), **adam)
        self.opt_gen = torch.optim.Adam(gen.parameters(), lr=cfg.glr, betas=(cfg.g_beta1, 0.999), **adam)
        if cfg.compile:
            _allow_phase_graphs()
            for net in (fake, gen, self.teacher):
                net.compile(backend=cfg.compile_backend)
        self.fake_score, self.generator = acc.prepare(fake, gen)
        self.ema = HalfLifeEMA(gen, self.generator_ema, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)

        self.augment_pipe = None
        if cfg.augment_p > 0:
            from sida_diffusers.training.augment import AugmentPipe

            self.augment_pipe = AugmentPipe(cfg.augment_p)
        self.stream = self._make_stream()
        self.suite, self.tracker = self._setup_evaluation()
        self.cur_nimg = 0
        self.last_losses: dict[str, torch.Tensor] = {}
        self._last_metrics: dict = {}
        self._resume_rng: Optional[dict] = None
        self._maybe_resume()

    # ---- properties ---------------------------------------------------------------------------------------------------
    @property
    def is_edm2(self) -> bool:
        return self.teacher.backbone_name == "unet"

    @property
    def img_shape(self) -> tuple:
        t = self.teacher
        return (t.img_channels, t.img_resolution, t.img_resolution)

    @property
    def max_nimg(self) -> int:
        return _nimg(self.cfg.max_train_kimg)

    def unwrap(self, net):
        return self.accelerator.unwrap_model(net)

    # ---- input validation (all before training) ---------------------------------------------------------------------
    def _check_method_inputs(self, generator_init, dataset) -> None:
        cfg = self.cfg
        if cfg.teacher is None:
            raise ValueError("no teacher: pass --teacher (an official .pkl, URL, known name, Diffusers folder or Hub "
                             "repo) or a --preset that names one.")
        if cfg.method == "sid2a" and cfg.generator_init is None and generator_init is None:
            raise ValueError("--method sid2a initialises the generator from a pre-distilled SiD generator; pass "
                             "--generator_init (e.g. sid-cifar10-uncond-alpha1.2), or use --method sida.")
        if cfg.is_adversarial and cfg.train_data is None and dataset is None:
            raise ValueError(f"--method {cfg.method} trains a discriminator on real images; pass --train_data (HF "
                             "dataset, image folder or EDM/EDM2 zip), or use the data-free --method sid.")
        for name, least in (("max_train_kimg", 1e-9), ("checkpointing_kimg", 1e-9), ("log_every_kimg", 1e-9),
                            ("warmup_kimg", 0), ("adversarial_start_kimg", 0)):
            if getattr(cfg, name) < least:
                raise ValueError(f"--{name} must be {'> 0' if least else '>= 0'} (kimg), got {getattr(cfg, name)}.")

    def _check_trackers(self) -> None:
        import importlib.util

        needs = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow"}
        module = needs.get(self.cfg.report_to)
        if module and importlib.util.find_spec(module) is None:
            raise ValueError(f"--report_to {self.cfg.report_to} needs the '{module}' package; `pip install {module}` "
                             "or pass --report_to none (stats.jsonl and the loss-curve PNG are always written).")

    def _setup_batching(self) -> None:
        cfg, w = self.cfg, self.world_size
        b = cfg.train_batch_size
        total = cfg.total_batch_size or b * w
        if total % (b * w):
            raise ValueError(f"--total_batch_size {total} is not divisible by --train_batch_size {b} x {w} "
                             f"process(es) = {b * w}; use a multiple of {b * w} (accumulation rounds R = total / "
                             "(B x processes) must be an integer).")
        self.total_batch_size, self.rounds = total, total // (b * w)
        self.batch_gpu_total = b * self.rounds  # B_tot: the per-process batch over all rounds (§4.5)

    def _setup_precision(self) -> None:
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.cfg.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.cfg.allow_tf32
            torch.backends.cudnn.benchmark = True

    def _run_seed(self) -> int:
        seed = [self.cfg.seed if self.cfg.seed is not None else random.randrange(1 << 31)]
        if self.world_size > 1:
            broadcast_object_list(seed, from_process=0)
        return int(seed[0])

    def _check_networks(self, init: Optional[Denoiser]) -> None:
        cfg, t = self.cfg, self.teacher
        name = type(t).__name__
        if name not in ("EDMPrecond", "EDM2Precond"):
            raise ValueError(f"the teacher is a {name}; SiD/SiDA support only EDM- and EDM2-preconditioned teachers "
                             "(ALGORITHM.md §1.2). Use an EDMPrecond teacher (every official edm-*.pkl is one).")
        if not self.is_edm2 and (cfg.use_logvar or cfg.force_normalization):
            raise ValueError("--use_logvar and --force_normalization are EDM2 options; drop them for an EDM teacher.")
        if cfg.use_logvar and not t.has_logvar:
            raise ValueError("--use_logvar needs a teacher with a logvar head (official EDM2 Precond); drop the flag.")
        if cfg.augment_p > 0 and t.augment_dim != 9:
            raise ValueError(f"--augment_p {cfg.augment_p} needs a teacher conditioned on the 9-d augment label "
                             f"(augment_dim=9), this one has augment_dim={t.augment_dim}; pass --augment_p 0.")
        if init is not None:
            got = (type(init).__name__, init.img_channels, init.img_resolution, init.label_dim)
            want = (name, t.img_channels, t.img_resolution, t.label_dim)
            if got != want:
                raise ValueError(f"--generator_init is a {got[0]} for {got[1]}x{got[2]}x{got[2]} images with "
                                 f"label_dim={got[3]}, the teacher a {want[0]} for {want[1]}x{want[2]}x{want[2]} with "
                                 f"label_dim={want[3]}; pass the SiD generator distilled from this teacher.")

    def _build_dataset(self):
        cfg = self.cfg
        if cfg.train_data is None:
            return None
        from sida_diffusers.training.data import build_dataset

        return build_dataset(cfg.train_data, resolution=cfg.resolution, image_column=cfg.image_column,
                             label_column=cfg.label_column,
                             use_labels=self.teacher.is_conditional or cfg.label_column is not None)

    def _check_data(self) -> None:
        ds, t = self.dataset, self.teacher
        if ds is None:
            return
        channels = ds.num_channels
        if (channels, ds.resolution) != (t.img_channels, t.img_resolution):
            raise ValueError(f"the training data holds {channels}x{ds.resolution}x{ds.resolution} "
                             f"{'latents' if ds.is_latent else 'images'} but the teacher expects "
                             f"{t.img_channels}x{t.img_resolution}x{t.img_resolution}; pass --resolution "
                             f"{t.img_resolution} (images), convert the data, or pick the matching teacher.")
        if ds.is_latent != self.is_edm2:
            raise ValueError("EDM2 teachers need EDM2 latent data (img-mean-std-*.npy) and EDM teachers pixel data; "
                             "pass the matching --train_data.")
        if t.is_conditional and not ds.has_labels:
            raise ValueError(f"the teacher is class-conditional (label_dim={t.label_dim}) but the training data has "
                             "no labels; pass --label_column (HF datasets) or data with dataset.json labels.")
        if not t.is_conditional and ds.has_labels:
            raise ValueError("the teacher is unconditional but labels were requested from the data; drop "
                             "--label_column or use a class-conditional teacher.")
        if t.is_conditional and ds.label_dim != t.label_dim:
            raise ValueError(f"the data has {ds.label_dim} classes but the teacher label_dim={t.label_dim}; use data "
                             "with the teacher's classes (or the teacher trained on this data).")

    def _make_stream(self):
        if self.dataset is None:
            return None
        from sida_diffusers.training.data import InfiniteBatchStream

        # Batches are assembled on the host and copied asynchronously in `next_batch`: a blocking host-to-device copy
        # would wait for every queued kernel twice per iteration.
        return InfiniteBatchStream(self.dataset, self.cfg.train_batch_size, rank=self.rank,
                                   world_size=self.world_size, seed=self.seed, device="cpu")

    def _setup_evaluation(self):
        cfg = self.cfg
        if not (cfg.eval_metrics and cfg.eval_every_kimg > 0):
            return None, None
        from sida_diffusers.evaluation import BestTracker, MetricSuite, result_keys

        if "fd_digits" in cfg.eval_metrics:
            from sida_diffusers.digits import register_digits_metric

            register_digits_metric()
        options = dict(batch_size=cfg.eval_batch_size, device=self.device, image_shape=self._pixel_shape(),
                       progress=False)
        reference = cfg.eval_reference
        if self.accelerator.is_main_process:
            if reference is None:
                reference = self._data_reference(MetricSuite(cfg.eval_metrics, **options))
            suite = MetricSuite(cfg.eval_metrics, reference, num_samples=cfg.eval_num_samples, **options)
            suite.validate()
        else:
            suite = None  # evaluation runs on the main process only
        first = cfg.eval_metrics[0]
        return suite, BestTracker(result_keys(first, cfg.eval_num_samples)[0], "max" if first == "is" else "min")

    def _data_reference(self, suite):
        """Reference statistics of the training images themselves, when no --eval_reference is given."""
        from sida_diffusers.evaluation import Reference

        ds = self.dataset
        if ds is None or ds.is_latent:
            raise ValueError("evaluation needs reference statistics: pass --eval_reference (e.g. an EDM fid-refs .npz "
                             "or one written by sida-ref-stats); without it they are computed from --train_data, "
                             "which must then be pixel data.")
        sample_fn = lambda start, count: torch.from_numpy(ds.get_batch(np.arange(start, start + count))[0])
        entries, meta = suite.reference_entries(sample_fn, len(ds))
        return Reference(source=f"train_data:{self.cfg.train_data}", entries=entries, meta=meta)

    def _pixel_shape(self) -> tuple:
        if self.is_edm2:
            return (3, self.teacher.img_resolution * 8, self.teacher.img_resolution * 8)
        return self.img_shape

    # ---- data ---------------------------------------------------------------------------------------------------------
    def next_batch(self, images: bool = True):
        """One real micro-batch ``(x [B,C,H,W] in [-1,1] or latents, one-hot labels [B,label_dim] or None)``.

        Data-free SiD draws uniform class labels instead (ALGORITHM.md §5.8). ``images=False`` (the generator phase
        uses only the labels) still consumes the batch but returns ``x=None`` without copying it to the device."""
        b, t = self.cfg.train_batch_size, self.teacher
        if self.stream is None:
            x = torch.zeros([b, *self.img_shape], device=self.device) if images else None
            labels = None
            if t.is_conditional:
                labels = torch.eye(t.label_dim, device=self.device)[torch.randint(t.label_dim, [b], device=self.device)]
            return x, labels
        x, labels = next(self.stream)
        return (self._to_device(x) if images else None), (self._to_device(labels) if t.is_conditional else None)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return x.to(self.device, torch.float32)
        return x.to(torch.float32).pin_memory().to(self.device, non_blocking=True)  # no wait for queued kernels

    def _augment_zeros(self, net: Denoiser, n: int):
        return torch.zeros([n, net.augment_dim], device=self.device) if net.augment_dim else None

    def generate(self, net, labels, n: int) -> torch.Tensor:
        """x_g = G(z; init_sigma, c) with z = init_sigma * eps and zero augment labels (ALGORITHM.md §2)."""
        z = torch.randn([n, *self.img_shape], device=self.device) * self.cfg.init_sigma
        return net(z, torch.full([n, 1, 1, 1], self.cfg.init_sigma, device=self.device), labels,
                   self._augment_zeros(self.teacher, n))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.mixed_precision == "bf16")

    def _sync(self, model, last_round: bool):
        """DDP gradient all-reduce only on the last accumulation round (§5.3)."""
        return contextlib.nullcontext() if last_round else self.accelerator.no_sync(model)

    def _augment(self, x: torch.Tensor):
        if self.augment_pipe is None:
            return x, self._augment_zeros(self.teacher, x.shape[0])
        return self.augment_pipe(x)

    # ---- the two phases -----------------------------------------------------------------------------------------------
    def _enter_phase(self, trained: torch.nn.Module, frozen: torch.nn.Module, optimizer) -> None:
        """Train mode and parameter gradients for `trained` only, forced weight normalisation of `trained` (EDM2,
        once per phase: ALGORITHM.md §1.3) and cleared gradients. Every network call then sees the same mode and
        requires_grad state in every iteration whatever the stage, so compiled graphs are built in the first
        iteration and never again (a frozen net's graph computes no weight gradients)."""
        trained.train().requires_grad_(True)
        frozen.eval().requires_grad_(False)
        if self.cfg.force_normalization:
            trained.normalize_weights_()
        optimizer.zero_grad(set_to_none=True)

    def fake_score_phase(self) -> None:
        """Fake-score (and, for SiDA, discriminator) update: §4.1, §4.2, §5.1 step 1."""
        cfg, adversarial = self.cfg, self.cfg.is_adversarial
        fake, gen = self.unwrap(self.fake_score), self.unwrap(self.generator)
        self._enter_phase(fake, gen, self.opt_fake)
        b = cfg.train_batch_size
        for r in range(self.rounds):
            x_real, labels = self.next_batch()
            with torch.no_grad(), self._autocast():
                x_g = self.generate(gen, labels, b)
            with self._sync(self.fake_score, r == self.rounds - 1), self._autocast():
                sigma = lognormal_sigma(b, cfg.P_mean, cfg.P_std, device=self.device)
                noise = torch.randn_like(x_g) * sigma  # shared by the fake and the real pass (§4.2)
                x_aug, aug = self._augment(x_g)
                out = self.fake_score(x_aug + noise, sigma, labels, aug,
                                      return_flag="encoder_decoder" if adversarial else "decoder",
                                      return_logvar=cfg.use_logvar)
                out = out if isinstance(out, tuple) else (out,)
                denoised, logits_fake = out[0], (out[1] if adversarial else None)
                logvar = out[-1] if cfg.use_logvar else None
                logits_real = None
                if adversarial:
                    x_real_aug, aug_real = self._augment(x_real)  # independent draw for the real images
                    logits_real = self.fake_score(x_real_aug + noise, sigma, labels, aug_real, return_flag="encoder")
                keep = ~nan_sample_mask(x_aug, denoised, logits_fake, logits_real, logvar)
                loss_score = fake_score_loss(x_aug, denoised, sigma, logvar, fake.sigma_data, keep=keep).sum()
                total = cfg.ls * loss_score
                self.last_losses["fake_score_loss"] = (cfg.ls * loss_score / self.batch_gpu_total).detach()
                if adversarial:
                    loss_d = discriminator_loss(logits_real, logits_fake, sigma, logvar, fake.sigma_data, keep=keep)
                    total = total + cfg.lsd * loss_d
                    self.last_losses["d_loss"] = (cfg.lsd * loss_d / self.batch_gpu_total).detach()
                self.accelerator.backward(total / self.batch_gpu_total)
        clip = 1.0 if adversarial and not self.is_edm2 else None  # value clip: EDM SiDA only (§5.4)
        self._sanitize_grads(fake, clip)
        self.opt_fake.step()

    def generator_phase(self, step_generator: bool, use_adversarial: bool) -> None:
        """Generator update: §4.3, §4.4 and the stage objective of §4.5, §5.1 step 2."""
        cfg = self.cfg
        fake, gen = self.unwrap(self.fake_score), self.unwrap(self.generator)
        self._enter_phase(gen, fake, self.opt_gen)
        b = cfg.train_batch_size
        for r in range(self.rounds):
            _, labels = self.next_batch(images=False)  # only the labels of the real batch are used (§5.8)
            with self._sync(self.generator, r == self.rounds - 1), self._autocast():
                x_g = self.generate(self.generator, labels, b)
                sigma = generator_sigma(b, cfg.tmax, device=self.device)
                x_t = x_g + torch.randn_like(x_g) * sigma
                zeros = self._augment_zeros(self.teacher, b)
                # The teacher is frozen but NOT under no_grad: gradients flow through it to x_g (§10 item 7).
                denoised_teacher = self.teacher(x_t, sigma, labels, zeros)
                out = fake(x_t, sigma, labels, zeros, return_flag="encoder_decoder" if cfg.is_adversarial else "decoder",
                           return_logvar=cfg.use_logvar)
                out = out if isinstance(out, tuple) else (out,)
                denoised_fake = out[0]
                logits = out[1] if cfg.is_adversarial else None
                logvar = out[-1] if cfg.use_logvar else None
                keep = ~nan_sample_mask(x_g, denoised_teacher, denoised_fake, logits, logvar)
                loss_sid = sid_generator_loss(x_g, denoised_teacher, denoised_fake, cfg.alpha, logvar, keep=keep).sum()
                self.last_losses["g_loss"] = (cfg.lsg * loss_sid / self.batch_gpu_total).detach()
                if cfg.is_adversarial:
                    loss_adv = sida_adversarial_loss(logits, x_g, denoised_teacher, logvar, keep=keep).sum()
                    self.last_losses["g_gan_loss"] = (cfg.lsg_gan * loss_adv / self.batch_gpu_total).detach()
                if not step_generator:
                    continue  # warm-up: the losses are logged but G is held, so its gradients would be thrown away
                if use_adversarial:
                    objective = 0.5 * cfg.lsg * loss_sid + 0.5 * cfg.lsg_gan * loss_adv
                else:
                    objective = cfg.lsg * loss_sid
                self.accelerator.backward(objective / self.batch_gpu_total)
        if step_generator:
            self._sanitize_grads(gen, None)
            self.opt_gen.step()
        self.opt_gen.zero_grad(set_to_none=True)

    @staticmethod
    def _sanitize_grads(net: torch.nn.Module, clip: Optional[float]) -> None:
        """nan_to_num on every gradient, then optional value clipping (ALGORITHM.md §5.4)."""
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        for g in grads:
            torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
        if clip is not None and grads:  # one multi-tensor kernel per bound instead of two kernels per parameter
            torch._foreach_clamp_min_(grads, -clip)
            torch._foreach_clamp_max_(grads, clip)

    def stage(self, cur_nimg: Optional[int] = None) -> tuple[bool, bool]:
        """``(step_generator, use_adversarial)`` at `cur_nimg` (before the increment); strict thresholds (§5.2)."""
        cur = self.cur_nimg if cur_nimg is None else cur_nimg
        if not self.cfg.is_adversarial:
            return True, False
        return cur > _nimg(self.cfg.warmup_kimg), cur > _nimg(self.cfg.adversarial_start_kimg)

    def step(self) -> dict:
        """One iteration: fake-score/D phase, generator phase, EMA, ``cur_nimg += total_batch_size`` (§5.1)."""
        step_generator, use_adversarial = self.stage()
        self.fake_score_phase()
        self.generator_phase(step_generator, use_adversarial)
        self.ema.update(self.cur_nimg, self.total_batch_size)
        self.cur_nimg += self.total_batch_size
        return {"step_generator": step_generator, "use_adversarial": use_adversarial}

    # ---- sampling, evaluation, export -------------------------------------------------------------------------------
    def _vae(self):
        if not self.is_edm2:
            return None
        if not hasattr(self, "_vae_model"):
            from diffusers import AutoencoderKL

            self._vae_model = AutoencoderKL.from_pretrained(self.cfg.vae).to(self.device).eval().requires_grad_(False)
        return self._vae_model

    @torch.no_grad()
    def sample_images(self, seeds, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """uint8 images ``[N,C,H,W]`` of the EMA generator, one noise seed per image (decoded for EDM2, §6.1)."""
        n = len(seeds)
        from sida_diffusers.pipelines import seed_noise

        z = seed_noise(seeds, self.img_shape)
        z = z.to(self.device) * self.cfg.init_sigma
        x = self.generator_ema(z, torch.full([n, 1, 1, 1], self.cfg.init_sigma, device=self.device), labels,
                               self._augment_zeros(self.teacher, n))
        if not self.is_edm2:
            return pixels_to_uint8(x)
        return unit_to_uint8(decode_latents(self._vae(), x))  # the VAE works in [0,1] (§10 item 11)

    def _grid_labels(self, n: int) -> Optional[torch.Tensor]:
        t = self.teacher
        return torch.eye(t.label_dim, device=self.device)[torch.arange(n) % t.label_dim] if t.is_conditional else None

    def save_sample_grid(self) -> Optional[Path]:
        """`samples/fakes_{kimg:06d}.png`: a fixed-seed grid of the EMA generator (classes cycle along rows)."""
        side = self.cfg.sample_grid_size
        if side <= 0:
            return None
        from PIL import Image
        from torchvision.utils import make_grid

        n, labels = side * side, self._grid_labels(side * side)
        images = torch.cat([self.sample_images(range(i, min(i + 64, n)), None if labels is None else labels[i:i + 64])
                            for i in range(0, n, 64)])
        grid = make_grid(images.cpu(), nrow=side, padding=0).permute(1, 2, 0).numpy()
        path = self.output_dir / "samples" / f"fakes_{self.cur_nimg // 1000:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
        return path

    def evaluate(self) -> dict:
        """Metrics of the EMA generator; labels drawn from the dataset's labels at random indices (§9.1), by the same
        `eval_labels` that pairs the teacher's baseline with these samples in `summary.py`."""
        from sida_diffusers.training.summary import eval_labels, evaluation_label_pool

        pool = evaluation_label_pool(self)
        return self.suite.evaluate(lambda start, count: self.sample_images(
            range(start, start + count), eval_labels(self.teacher, pool, start, count, self.device)))

    def run_info(self, metrics: Optional[dict] = None) -> dict:
        """The run description shared by checkpoints, the export and the model card (ARCHITECTURE.md §3)."""
        cfg, t, ds = self.cfg, self.teacher, self.dataset
        return {"method": cfg.method, "alpha": cfg.alpha, "teacher": cfg.teacher, "dataset": cfg.train_data,
                "kimg": self.cur_nimg / 1000, "cur_nimg": self.cur_nimg, "train_batch_size": cfg.train_batch_size,
                "total_batch_size": self.total_batch_size, "num_processes": self.world_size,
                "init_sigma": cfg.init_sigma, "tmax": cfg.tmax,
                "id2label": getattr(ds, "id2label", None) if t.is_conditional else None, "label_dim": t.label_dim,
                "resolution": t.img_resolution, "channels": t.img_channels, "latent": self.is_edm2,
                "metrics": dict(metrics or {}),
                "sampling": {"init_sigma": cfg.init_sigma, "num_steps": 1, "num_samples": cfg.eval_num_samples},
                "generator_init": cfg.generator_init, "seed": self.seed}

    # ---- checkpoints --------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write `checkpoints/checkpoint-{cur_nimg:09d}` atomically (temporary folder, then os.replace) and prune."""
        per_rank = gather_object([{"rng": _rng_state(), "data": self.stream.state_dict() if self.stream else None}])
        final = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.cur_nimg:09d}"
        if self.accelerator.is_main_process:
            tmp = final.parent / f".tmp-{final.name}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._write_checkpoint(tmp, per_rank)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints()
        self.accelerator.wait_for_everyone()
        return final

    def _write_checkpoint(self, folder: Path, per_rank: list) -> None:
        for name in NETWORKS:
            self.unwrap(getattr(self, name)).save_pretrained(folder / name, safe_serialization=True)
        state = {"cur_nimg": self.cur_nimg, "seed": self.seed, "num_processes": self.world_size,
                 "opt_fake": self.opt_fake.state_dict(), "opt_gen": self.opt_gen.state_dict(),
                 "ema": self.ema.state_dict(), "rng": [s["rng"] for s in per_rank],
                 "data": [s["data"] for s in per_rank], "best": self.tracker.state_dict() if self.tracker else None,
                 "config": dataclasses.asdict(self.cfg)}
        torch.save(state, folder / STATE_FILE)
        (folder / "run_info.json").write_text(json.dumps(self.run_info(self._last_metrics), indent=2, default=str))

    def _prune_checkpoints(self) -> None:
        limit = self.cfg.checkpoints_total_limit
        if limit is None:
            return
        for old in list_checkpoints(self.output_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old)

    def _maybe_resume(self) -> None:
        spec = self.cfg.resume_from_checkpoint
        path = resolve_checkpoint(spec, self.output_dir) if spec else None
        if path is None:
            if spec:
                self.accelerator.print(f"no checkpoint under {self.output_dir / 'checkpoints'}; starting a new run")
            return
        from sida_diffusers.checkpoints import load_denoiser

        for name in NETWORKS:
            self.unwrap(getattr(self, name)).load_state_dict(load_denoiser(path / name).state_dict())
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        self.opt_fake.load_state_dict(state["opt_fake"])
        self.opt_gen.load_state_dict(state["opt_gen"])
        self.ema.load_state_dict(state["ema"])
        self.cur_nimg, self.seed = int(state["cur_nimg"]), int(state["seed"])
        if state["num_processes"] == self.world_size:  # exact continuation needs the same process layout
            self._resume_rng = state["rng"][self.rank]  # applied when train() starts, after any other setup work
            if self.stream is not None and state["data"][self.rank] is not None:
                self.stream.load_state_dict(state["data"][self.rank])
        else:  # another process count: fresh per-rank streams, seeded as the official resume does (§5.9)
            seed = (self.seed + self.cur_nimg // 1000) % (1 << 31)
            _seed_everything((seed * self.world_size + self.rank) % (1 << 31))
        if self.tracker is not None and state["best"] is not None:
            self.tracker.load_state_dict(state["best"])
        self.accelerator.print(f"resumed from {path} at {self.cur_nimg / 1000:g} kimg")

    # ---- logging ------------------------------------------------------------------------------------------------------
    def _log_tick(self, tick_start: float, tick_nimg: int) -> None:
        kimg = self.cur_nimg / 1000
        stats = {name: float(v.item()) for name, v in self.last_losses.items()}  # the only host syncs of the loop
        step_generator, use_adversarial = self.stage(self.cur_nimg - self.total_batch_size)
        elapsed = time.time() - tick_start
        stats.update(kimg=kimg, sec_per_kimg=elapsed / max(tick_nimg / 1000, 1e-9),
                     stage=1 + int(step_generator) + int(use_adversarial),  # §5.2; plain SiD is always 2
                     peak_memory_gb=(torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                                     if self.device.type == "cuda" else 0.0))
        self.accelerator.log(stats, step=self.cur_nimg)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "stats.jsonl", "a") as f:
                f.write(json.dumps(stats) + "\n")
            parts = " ".join(f"{k} {v:.4g}" for k, v in stats.items() if k != "kimg")
            tqdm.write(f"kimg {kimg:.3f} {parts}")

    def plot_loss_curves(self) -> Optional[Path]:
        """`loss_curves.png` from stats.jsonl (main process)."""
        path = self.output_dir / "stats.jsonl"
        if not path.is_file():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        names = [n for n in LOSS_NAMES if any(n in r for r in records)]
        fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.2 * len(names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            ax.plot([r["kimg"] for r in records if name in r], [r[name] for r in records if name in r])
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("kimg")
        fig.tight_layout()
        fig.savefig(self.output_dir / "loss_curves.png", dpi=100)
        plt.close(fig)
        return self.output_dir / "loss_curves.png"

    # ---- the loop -----------------------------------------------------------------------------------------------------
    def _crossed(self, prev_nimg: int, every_kimg: float) -> bool:
        every = _nimg(every_kimg)
        return every > 0 and self.cur_nimg // every > prev_nimg // every

    def train(self) -> Optional[Path]:
        """Run to `max_train_kimg`; returns the exported `pipeline/` folder (main process) or None."""
        cfg, acc = self.cfg, self.accelerator
        if self._resume_rng is not None:
            _set_rng_state(self._resume_rng)
            self._resume_rng = None
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        acc.init_trackers("sida", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                          if isinstance(v, (int, float, str, bool))})
        acc.print(f"{cfg.method}: {self.world_size} process(es) x B={cfg.train_batch_size} x R={self.rounds} rounds "
                  f"= {self.total_batch_size} images per iteration, to {cfg.max_train_kimg:g} kimg")
        final_nimg = math.ceil(self.max_nimg / self.total_batch_size) * self.total_batch_size  # whole iterations
        # counted in images (exact integers), shown in kimg
        bar = tqdm(total=final_nimg, initial=self.cur_nimg, unit_scale=1e-3, disable=not acc.is_main_process,
                   bar_format="{l_bar}{bar}| {n:.3f}/{total:g} kimg [{elapsed}<{remaining}]")
        tick_start, tick_nimg, first = time.time(), self.cur_nimg, True
        while self.cur_nimg < self.max_nimg:
            prev = self.cur_nimg
            self.step()
            bar.update(self.total_batch_size)
            done = self.cur_nimg >= self.max_nimg
            if first or done or self._crossed(prev, cfg.log_every_kimg):  # the first iteration ends tick 0 (§5.10)
                self._log_tick(tick_start, self.cur_nimg - tick_nimg)
                tick_start, tick_nimg, first = time.time(), self.cur_nimg, False
            if self.tracker is not None and (done or self._crossed(prev, cfg.eval_every_kimg)):
                self._evaluate_and_track()
            if done or self._crossed(prev, cfg.checkpointing_kimg):
                if acc.is_main_process:
                    self.save_sample_grid()
                self.save_checkpoint()
        bar.close()
        pipeline_dir = None
        if acc.is_main_process:
            self.plot_loss_curves()
            pipeline_dir = self.export(self.output_dir / "pipeline")
            from sida_diffusers.training.summary import write_run_summary

            write_run_summary(self)  # summary.json; the teacher's 35-NFE FD-digits next to the student's
            if cfg.push_to_hub:
                from sida_diffusers.hub import push_to_hub

                push_to_hub(pipeline_dir, cfg.hub_model_id or self.output_dir.resolve().name)
        acc.wait_for_everyone()
        acc.end_training()
        return pipeline_dir

    def _evaluate_and_track(self) -> None:
        if self.accelerator.is_main_process:
            from sida_diffusers.evaluation import append_metrics_jsonl, plot_metric_curve

            results = self.evaluate()
            self._last_metrics = results
            append_metrics_jsonl(self.output_dir / "metrics.jsonl", {"kimg": self.cur_nimg / 1000, **results})
            plot_metric_curve(self.output_dir / "metrics.jsonl", self.output_dir / "metric_curve.png")
            self.accelerator.log(results, step=self.cur_nimg)
            tqdm.write(f"kimg {self.cur_nimg / 1000:.3f} " + " ".join(f"{k} {v:.4g}" for k, v in results.items()))
            if self.tracker.update_from(results, self.cur_nimg / 1000):
                self.export(self.output_dir / "best_pipeline", metrics=results)
        self.accelerator.wait_for_everyone()

    def export(self, out_dir: Path, metrics: Optional[dict] = None) -> Path:
        """Write the SiDAPipeline folder of the EMA generator (model card included) via hub.export_pipeline."""
        from sida_diffusers.hub import export_pipeline

        export_pipeline(self.generator_ema, out_dir, self.run_info(metrics or self._last_metrics), vae=self._vae(),
                        grid=self.cfg.sample_grid_size > 0, grid_seeds=range(self.cfg.sample_grid_size ** 2),
                        repo_id=self.cfg.hub_model_id)
        return out_dir


def main(argv=None) -> Optional[Path]:
    """Console entry: parse flags (presets applied) and train."""
    from sida_diffusers.training.config import parse_args

    try:
        trainer = SiDATrainer(parse_args(argv))  # every input check runs here, before any training
    except (ValueError, FileNotFoundError) as error:
        print(f"train_sida: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return trainer.train()
