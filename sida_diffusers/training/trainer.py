"""The Accelerate distillation loop: SiD / SiDA / SiD²A from an EDM or EDM2 teacher (ALGORITHM.md §5).

One iteration (`SiDATrainer.step`) = a fake-score/discriminator phase, a generator phase, the EMA update and
``cur_nimg += total_batch_size``. Each phase runs R accumulation rounds of B samples per process, backpropagates every
round with DDP gradient sync only on the last one, and divides every loss by the per-process batch B*R (§4.5, §5.3).
Per-process batch statistics (the pooled BCE of §4.2/§4.4) are never gathered across processes.

Around the loop: input checks (`validation`), the networks (`models`; DDP or FSDP: `sharding`, ALGORITHM.md §13),
checkpoints and resume (`checkpointing`), and grids, evaluation and export (`outputs`, `summary`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from sida_diffusers.evaluation import plot_curves
from sida_diffusers.losses import (
    discriminator_loss,
    fake_score_loss,
    generator_sigma,
    lognormal_sigma,
    nan_sample_mask,
    sid_generator_loss,
    sida_adversarial_loss,
)
from sida_diffusers.networks.base import Denoiser
from sida_diffusers.pretrained import declared_license
from sida_diffusers.training import checkpointing, few_step, launch, models, outputs, sharding, summary, validation
from sida_diffusers.training.batches import RealBatches
from sida_diffusers.training.config import TrainConfig


NETWORKS = ("generator", "generator_ema", "fake_score")
PRECISION_NAMES = {"no": "fp32", "fp16": "fp16 networks", "bf16": "bf16 autocast"}


@dataclasses.dataclass(frozen=True)
class Stage:
    """Where the schedule is (ALGORITHM.md §5.2): 1 = fake score only (G held), 2 = + SiD generator loss, 3 = + the
    adversarial generator term. Plain SiD is always stage 2."""

    step_generator: bool
    adversarial: bool

    @property
    def number(self) -> int:
        return 1 + int(self.step_generator) + int(self.adversarial)


def _nimg(kimg: float) -> int:
    return int(round(kimg * 1000))


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
        validation.check_config(cfg, generator_init, dataset)
        self.step_sigmas = few_step.check_config(cfg)  # the K noise levels of the generator's steps (§11.1)
        self.accelerator = acc = accelerator or launch.make_accelerator(cfg)
        self.cfg = cfg = launch.effective_precision(cfg, acc.device, acc.print)  # fp16 on a CPU trains in fp32
        self.device, self.world_size, self.rank = acc.device, acc.num_processes, acc.process_index
        self.total_batch_size, self.rounds = validation.batch_layout(cfg, self.world_size)
        self.batch_per_process = cfg.train_batch_size * self.rounds  # B_tot, the divisor of every loss (§4.5)
        launch.set_device_numerics(self.device, cfg.allow_tf32, cfg.num_threads)
        self.seed = launch.run_seed(cfg.seed, self.world_size)
        checkpointing.seed_everything((self.seed * self.world_size + self.rank) % (1 << 31))  # per-rank seed (§5.9)

        self.teacher = (teacher if teacher is not None else models.load_network(cfg.teacher)).eval().requires_grad_(False)
        self.teacher_license = declared_license(cfg.teacher)  # what the model card inherits
        init = generator_init
        if init is None and cfg.generator_init is not None:
            init = models.load_network(cfg.generator_init)
        self.dataset = dataset if dataset is not None else self._build_dataset()
        validation.check_networks(cfg, self.teacher, init, self.device)
        validation.check_data(self.dataset, self.teacher)

        self.layout = sharding.NetworkLayout(acc, cfg.fsdp)
        self.fake_score, self.generator, self.generator_ema, self.ema, self.opt_fake, self.opt_gen = \
            models.setup_networks(cfg, self.layout, self.teacher, init, self.device)

        self.augment_pipe = models.augment_pipe(cfg.augment_p)
        self.batches = RealBatches(self.dataset, cfg.train_batch_size, self.img_shape, self.teacher.label_dim,
                                   self.rank, self.world_size, self.seed, self.device)
        self.suite, self.tracker = outputs.make_evaluation(cfg, self.dataset, self.pixel_shape, self.device,
                                                           acc.is_main_process)
        self.label_pool = outputs.evaluation_label_pool(self.dataset, self.teacher)
        self._pipeline, self._sampling_ema = None, self.generator_ema  # --fsdp: a gathered copy, in maintenance only
        self.push_error: Optional[str] = None  # the one line a failed end-of-run push leaves
        self.cur_nimg = 0
        self.k_star = cfg.num_steps  # the steps whose output the current iteration trains (§11.2)
        self.step_tally = few_step.StepTally(cfg.num_steps, self.device)
        self.last_losses: dict[str, torch.Tensor] = {}
        self.last_metrics: dict = {}
        self._resume_rng: Optional[dict] = None
        self._maybe_resume()

    # ---- setup --------------------------------------------------------------------------------------------------------
    def _build_dataset(self):
        cfg = self.cfg
        if cfg.train_data is None:
            return None
        from sida_diffusers.data.datasets import build_dataset

        return build_dataset(cfg.train_data, resolution=cfg.resolution, image_column=cfg.image_column,
                             label_column=cfg.label_column,
                             use_labels=self.teacher.is_conditional or cfg.label_column is not None)

    @property
    def is_edm2(self) -> bool:
        return self.teacher.family == "edm2"

    @property
    def img_shape(self) -> tuple:
        return (self.teacher.img_channels, self.teacher.img_resolution, self.teacher.img_resolution)

    @property
    def pixel_shape(self) -> tuple:
        """Shape of the uint8 images the run reports (EDM2 latents decode to RGB at 8x)."""
        return (3, self.img_shape[1] * 8, self.img_shape[2] * 8) if self.is_edm2 else self.img_shape

    @property
    def pipeline(self):
        """The `SiDAPipeline` over the EMA generator that samples every grid, evaluation and export of the run."""
        if self._pipeline is None:
            vae = outputs.load_vae(self.cfg.vae, self.device) if self.is_edm2 else None
            self._pipeline = outputs.sampling_pipeline(self._sampling_ema, self.teacher, self.cfg.init_sigma, vae,
                                                       getattr(self.dataset, "id2label", None), self.step_sigmas,
                                                       self.cfg.renoise)
        self._pipeline.use_denoiser(self._sampling_ema)
        return self._pipeline

    @contextlib.contextmanager
    def gathered_ema(self, active: bool = True):
        """Collective: under `--fsdp` an unsharded EMA copy (main process) samples one maintenance step (§13.2)."""
        with self.layout.gathered(self.generator_ema, self.device, active) as self._sampling_ema:
            yield
        self._sampling_ema = None if self.layout.sharded else self.generator_ema  # the copy goes with its last reference
        if self._pipeline is not None:
            self._pipeline.use_denoiser(self._sampling_ema)

    @property
    def final_nimg(self) -> int:
        """cur_nimg at the end of the run: whole iterations up to --max_train_kimg."""
        return math.ceil(_nimg(self.cfg.max_train_kimg) / self.total_batch_size) * self.total_batch_size

    def unwrap(self, net):
        return self.accelerator.unwrap_model(net)

    # ---- generation -----------------------------------------------------------------------------------------------
    def _augment_zeros(self, n: int):
        return torch.zeros([n, self.teacher.augment_dim], device=self.device) if self.teacher.augment_dim else None

    def generate(self, net, labels, n: int) -> torch.Tensor:
        """x_g: the k*-th output of G along the step grid from z = init_sigma * eps, zero augment labels (ALGORITHM.md
        §2, §11.1; K = 1: exactly G(z; init_sigma, c)); `uniform` runs the steps before the k*-th without gradient."""
        eps, zeros = torch.randn([n, *self.img_shape], device=self.device), self._augment_zeros(n)
        at = lambda x, sigma: net(x, torch.full([n, 1, 1, 1], sigma, device=self.device), labels, zeros)
        return few_step.few_step_generate(at, eps, self.step_sigmas[:self.k_star], self.cfg.renoise,
                                          lambda: torch.randn_like(eps), grad_last_only=self.cfg.step_sampling == "uniform")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.mixed_precision == "bf16")

    def _sync(self, model, last_round: bool):
        """DDP gradient all-reduce only on the last accumulation round (§5.3); FSDP reduces every round (§13.1)."""
        return contextlib.nullcontext() if last_round else self.layout.no_sync(model)

    def _augment(self, x: torch.Tensor):
        if self.augment_pipe is None:
            return x, self._augment_zeros(x.shape[0])
        return self.augment_pipe(x)

    # ---- the two phases -----------------------------------------------------------------------------------------------
    def _enter_phase(self, trained: torch.nn.Module, frozen: torch.nn.Module, optimizer) -> None:
        """Train mode and parameter gradients for `trained` only, forced weight normalisation of `trained` (EDM2,
        once per phase: ALGORITHM.md §1.3) and cleared gradients. Every network call then sees the same mode and
        requires_grad state in every iteration whatever the stage, so compiled graphs are built in the first
        iteration and never again (a frozen net's graph computes no weight gradients)."""
        trained.train().requires_grad_(True)
        frozen.eval().requires_grad_(False).zero_grad(set_to_none=True)  # not kept through the other phase (§13.4)
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
            x_real, labels = self.batches.next()
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
                total = cfg.fake_score_loss_scale * loss_score
                self.last_losses["fake_score_loss"] = (total / self.batch_per_process).detach()
                if adversarial:
                    loss_d = discriminator_loss(logits_real, logits_fake, sigma, logvar, fake.sigma_data, keep=keep)
                    total = total + cfg.discriminator_loss_scale * loss_d
                    self.last_losses["d_loss"] = (cfg.discriminator_loss_scale * loss_d / self.batch_per_process).detach()
                self.accelerator.backward(total / self.batch_per_process)
        clip = 1.0 if adversarial and not self.is_edm2 else None  # value clip: EDM SiDA only (§5.4)
        models.sanitize_grads(self.layout.gradients(fake), clip)
        self.opt_fake.step()

    def generator_phase(self, stage: Stage) -> None:
        """Generator update: §4.3, §4.4 and the stage objective of §4.5, §5.1 step 2."""
        cfg = self.cfg
        fake, gen = self.unwrap(self.fake_score), self.unwrap(self.generator)
        self._enter_phase(gen, fake, self.opt_gen)
        b = cfg.train_batch_size
        for r in range(self.rounds):
            _, labels = self.batches.next(images=False)  # only the labels of the real batch are used (§5.8)
            with self._sync(self.generator, r == self.rounds - 1), self._autocast():
                x_g = self.generate(self.generator, labels, b)
                sigma = generator_sigma(b, cfg.tmax, device=self.device)
                x_t = x_g + torch.randn_like(x_g) * sigma
                zeros = self._augment_zeros(b)
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
                self.last_losses["g_loss"] = (cfg.sid_loss_scale * loss_sid / self.batch_per_process).detach()
                if cfg.is_adversarial:
                    loss_adv = sida_adversarial_loss(logits, x_g, denoised_teacher, logvar, keep=keep).sum()
                    self.last_losses["g_gan_loss"] = (cfg.adversarial_loss_scale * loss_adv
                                                      / self.batch_per_process).detach()
                if not stage.step_generator:  # warm-up: the losses are logged but G is held, so no backward; this
                    x_g = x_t = denoised_teacher = out = denoised_fake = logits = logvar = loss_sid = loss_adv = None
                    continue  # round's graph is released before the next round builds its own (§13.4)
                if stage.adversarial:
                    objective = 0.5 * cfg.sid_loss_scale * loss_sid + 0.5 * cfg.adversarial_loss_scale * loss_adv
                else:
                    objective = cfg.sid_loss_scale * loss_sid
                self.accelerator.backward(objective / self.batch_per_process)
        if stage.step_generator:
            models.sanitize_grads(self.layout.gradients(gen), None)
            self.opt_gen.step()
        self.opt_gen.zero_grad(set_to_none=True)

    def stage(self, cur_nimg: Optional[int] = None) -> Stage:
        """The `Stage` at `cur_nimg` (before the increment); strict thresholds, counted in images (§5.2)."""
        cur = self.cur_nimg if cur_nimg is None else cur_nimg
        if not self.cfg.is_adversarial:
            return Stage(step_generator=True, adversarial=False)
        return Stage(cur > _nimg(self.cfg.warmup_kimg), cur > _nimg(self.cfg.adversarial_start_kimg))

    def step(self) -> Stage:
        """One iteration: fake-score/D phase, generator phase, EMA, ``cur_nimg += total_batch_size`` (§5.1)."""
        stage = self.stage()
        # k* from the run seed and cur_nimg: the same on every process and after a resume; both phases use it (§11.2)
        self.k_star = few_step.draw_num_steps(self.seed, self.cur_nimg, self.cfg.num_steps, self.cfg.step_sampling)
        models.set_learning_rates(self.cfg, self.opt_fake, self.opt_gen, self.cur_nimg, _nimg(self.cfg.max_train_kimg))
        self.fake_score_phase()
        self.generator_phase(stage)
        self.ema.update(self.cur_nimg, self.total_batch_size)
        self.cur_nimg += self.total_batch_size
        return stage

    # ---- the loop -----------------------------------------------------------------------------------------------------
    def train(self) -> Optional[Path]:
        """Run to `max_train_kimg`; returns the exported `pipeline/` folder (main process) or None."""
        cfg, acc = self.cfg, self.accelerator
        if self._resume_rng is not None:
            checkpointing.set_rng_state(self._resume_rng)
            self._resume_rng = None
        if acc.is_main_process:
            if cfg.overwrite_output_dir and self.cur_nimg == 0:
                checkpointing.clear_output_dir(self.output_dir, cfg.logging_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        acc.wait_for_everyone()
        acc.init_trackers(cfg.tracker_project_name, config={k: v for k, v in cfg.to_dict().items()
                                                            if isinstance(v, (int, float, str, bool))})
        acc.print(f"{cfg.method}: {self.world_size} process(es) x B={cfg.train_batch_size} x R={self.rounds} rounds "
                  f"= {self.total_batch_size} images per iteration, {PRECISION_NAMES[cfg.mixed_precision]}"
                  f"{', networks sharded (FSDP)' if self.layout.sharded else ''}, to {cfg.max_train_kimg:g} kimg")
        max_nimg = _nimg(cfg.max_train_kimg)
        bar = tqdm(total=self.final_nimg, initial=self.cur_nimg, unit_scale=1e-3, disable=not acc.is_main_process,
                   bar_format="{l_bar}{bar}| {n:.3f}/{total:g} kimg [{elapsed}<{remaining}]")
        baseline = None
        wanted = self.tracker is not None and summary.evaluates_teacher(cfg.eval_metrics)  # same on every process
        teacher = self.layout.full_copy(self.teacher, self.device) if wanted else self.teacher
        if acc.is_main_process:  # the teacher's multi-step figures, meanwhile on the idle core of a CPU run
            samplers = summary.teacher_samplers(teacher, cfg.teacher_scheduler, cfg.teacher_num_inference_steps)
            baseline = summary.start_teacher_baseline(self.output_dir, cfg.teacher, self.suite, teacher,
                                                      self.label_pool, background=self.device.type == "cpu"
                                                      and not cfg.compile, samplers=samplers)
        tick = {"start": time.time(), "nimg": self.cur_nimg, "maintenance": 0.0}
        first = True
        while self.cur_nimg < max_nimg:
            prev = self.cur_nimg
            with self.step_tally.iteration(lambda: self.k_star, self.total_batch_size):
                stage = self.step()
            bar.update(self.total_batch_size)
            done = self.cur_nimg >= max_nimg
            if first or done or self._crossed(prev, cfg.log_every_kimg):  # the first iteration ends tick 0 (§5.10)
                self._log_tick(tick, stage)
                tick, first = {"start": time.time(), "nimg": self.cur_nimg, "maintenance": 0.0}, False
            maintenance_start = time.time()
            with self.gathered_ema(done or self._crossed(prev, cfg.eval_every_kimg, cfg.checkpointing_kimg)):
                if self.tracker is not None and (done or self._crossed(prev, cfg.eval_every_kimg)):
                    self._evaluate_and_track()
                if done or self._crossed(prev, cfg.checkpointing_kimg):
                    if acc.is_main_process and cfg.sample_grid_size > 0:
                        grid = outputs.save_sample_grid(self.pipeline, self.output_dir / "samples" /
                                                        f"fakes_{self.cur_nimg // 1000:06d}.png", cfg.sample_grid_size)
                        outputs.log_image(acc, "samples", grid, self.cur_nimg)
                    self.save_checkpoint()
            tick["maintenance"] += time.time() - maintenance_start
        bar.close()
        with self.gathered_ema():
            pipeline_dir = self._finish(baseline()) if acc.is_main_process else None
        acc.wait_for_everyone()
        acc.end_training()
        return pipeline_dir

    def _crossed(self, prev_nimg: int, *every_kimg: float) -> bool:
        return any(0 < every and self.cur_nimg // every > prev_nimg // every for every in map(_nimg, every_kimg))

    def _log_tick(self, tick: dict, stage: Stage) -> None:
        """Losses and timing of the tick: `sec_per_kimg` counts training only; evaluation, checkpoints and grids are
        `maintenance_sec`, as in EDM2's status line."""
        stats = {name: float(v.item()) for name, v in self.last_losses.items()}  # the only host syncs of the loop
        train_s = time.time() - tick["start"] - tick["maintenance"]
        stats.update(kimg=self.cur_nimg / 1000, sec_per_kimg=train_s / max((self.cur_nimg - tick["nimg"]) / 1000, 1e-9),
                     maintenance_sec=tick["maintenance"], stage=stage.number,
                     peak_memory_gb=(torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                                     if self.device.type == "cuda" else 0.0))
        stats.update(self.step_tally.pop())  # K > 1: the k* drawn in the tick, and time (and memory) per k
        outputs.log_record(self.accelerator, self.output_dir / "stats.jsonl", stats, self.cur_nimg)

    def _evaluate_and_track(self) -> None:
        if self.accelerator.is_main_process:
            results = self.last_metrics = outputs.evaluate(self.suite, self.pipeline, self.label_pool,
                                                           few_step.evaluation_steps(self.cfg))
            outputs.log_record(self.accelerator, self.output_dir / "metrics.jsonl",
                               {"kimg": self.cur_nimg / 1000, **results}, self.cur_nimg)
            plot_curves(self.output_dir / "metrics.jsonl", self.output_dir / "metric_curve.png")
            if self.tracker.update_from(results, self.cur_nimg / 1000):
                self.export(self.output_dir / "best_pipeline", self.record(results))
        self.accelerator.wait_for_everyone()

    def _finish(self, teacher_evals: Optional[list]) -> Path:
        """Main process, after the last iteration: loss curves, the exported pipeline (with the teacher's Heun
        baseline in its card), the run summary (every teacher sampler) and the optional Hub push."""
        outputs.plot_loss_curves(self.output_dir)
        teacher_metrics = teacher_evals[0]["metrics"] if teacher_evals else None
        record = self.record(self.last_metrics, teacher_metrics)
        pipeline_dir = self.export(self.output_dir / "pipeline", record)
        summary.write_run_summary(self.output_dir, record, self.tracker.state_dict() if self.tracker else None,
                                  teacher_evals)
        if self.cfg.push_to_hub:
            self.push_error = summary.push_pipeline(pipeline_dir, validation.hub_repo_id(self.cfg), self.cfg.hub_token)
        return pipeline_dir

    def record(self, metrics: Optional[dict] = None, teacher_metrics: Optional[dict] = None):
        """The `RunRecord` of the run as it stands (run_info.json of checkpoints and exports, the model card)."""
        return outputs.run_record(self.cfg, self.teacher, self.dataset, self.cur_nimg, self.total_batch_size,
                                  self.world_size, self.seed, self.teacher_license, metrics, teacher_metrics,
                                  summary.TEACHER_NFE)

    def export(self, out_dir: Path, record=None) -> Path:
        """Publish the run's pipeline (the EMA generator) with the model card of `record` (default: the run now)."""
        return outputs.export(self.pipeline, out_dir, record or self.record(self.last_metrics),
                              self.cfg.sample_grid_size, self.cfg.hub_model_id)

    # ---- checkpoints --------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write `checkpoints/checkpoint-{cur_nimg:09d}` atomically, from full tensors (§13.3), and prune old ones."""
        per_rank = gather_object([{"rng": checkpointing.rng_state(),
                                   "data": self.batches.state_dict()}])
        networks, optimizers = self.layout.full_states(self._networks(), opt_fake=self.opt_fake, opt_gen=self.opt_gen)
        if self.accelerator.is_main_process:
            state = {"cur_nimg": self.cur_nimg, "seed": self.seed, "num_processes": self.world_size,
                     **optimizers, "ema": self.ema.state_dict(), "rng": [s["rng"] for s in per_rank],
                     "data": [s["data"] for s in per_rank], "best": self.tracker.state_dict() if self.tracker else None,
                     "config": self.cfg.to_dict()}
            checkpointing.save_checkpoint(self.output_dir, self.cur_nimg, networks, state,
                                          self.record(self.last_metrics).to_dict(), self.cfg.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()
        return checkpointing.checkpoint_path(self.output_dir, self.cur_nimg)

    def _networks(self) -> dict:
        return {name: self.unwrap(getattr(self, name)) for name in NETWORKS}

    def _maybe_resume(self) -> None:
        spec = self.cfg.resume_from_checkpoint
        path = checkpointing.resolve_checkpoint(spec, self.output_dir) if spec else None
        if path is None:
            if spec:
                self.accelerator.print(f"no checkpoint under {self.output_dir / 'checkpoints'}; starting a new run")
            return
        limits = checkpointing.RunLimits(self.final_nimg, self.total_batch_size,
                                         self.cfg.resume_optimizer_settings_from_checkpoint)
        nets, opts = self.layout.checkpoint_views(self._networks(), opt_fake=self.opt_fake, opt_gen=self.opt_gen)
        state = checkpointing.load_checkpoint(path, nets, opts, self.ema, limits)  # full tensors in, any layout (§13.3)
        self.cur_nimg, self.seed = state["cur_nimg"], state["seed"]  # range-checked integers
        if state["num_processes"] == self.world_size:  # exact continuation needs the same process layout
            self._resume_rng = state["rng"][self.rank]  # applied when train() starts, after any other setup work
            self.batches.load_state_dict(state["data"][self.rank])
        else:  # another process count: fresh per-rank streams, seeded as the official resume does (§5.9)
            seed = (self.seed + self.cur_nimg // 1000) % (1 << 31)
            checkpointing.seed_everything((seed * self.world_size + self.rank) % (1 << 31))
        if self.tracker is not None and state["best"] is not None:
            self.tracker.load_state_dict(state["best"])
        self.accelerator.print(f"resumed from {path} at {self.cur_nimg / 1000:g} kimg")
