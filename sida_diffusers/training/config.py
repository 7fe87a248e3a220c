"""Every hyper-parameter of a distillation run (`TrainConfig`), the per-experiment presets and the command line.

Precedence: dataclass defaults < preset (`presets.json`) < the preset's `by_method[method]` entry < flags given on the
command line. Without `--preset` and without `--teacher`, the offline `digits` preset applies. The precision also
listens to Accelerate (`resolve_mixed_precision`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from sida_diffusers.schedule import INIT_SIGMA, RENOISE_MODES, STEP_SIGMA_MIN


PRESETS_FILE = Path(__file__).resolve().parent / "presets.json"
METHODS = ("sid", "sida", "sid2a")
LR_SCHEDULERS = ("constant", "linear", "cosine")
STEP_SAMPLINGS = ("uniform", "all")
DEFAULT_PRESET = "digits"
SECRET_FIELDS = ("hub_token",)


def _f(default, help: str, **kw):
    """A config field with its --help text (and argparse extras such as `choices`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Hyper-parameters of one SiD / SiDA / SiD²A run. Field names are the command-line flags."""

    # what to distil, from what
    preset: Optional[str] = _f(None, "named preset from presets.json (flags given explicitly override it)")
    teacher: Optional[str] = _f(None, "teacher denoiser: anything load_denoiser reads, or 'digits' / 'digits-uncond'",
                                aliases=["pretrained_model_name_or_path"])
    generator_init: Optional[str] = _f(None, "SiD²A: the pre-distilled SiD generator that initialises G")
    method: str = _f("sida", "sid (data-free), sida or sid2a", choices=METHODS)
    train_data: Optional[str] = _f(None, "real data: HF dataset, image folder, EDM/EDM2 zip or 'digits'",
                                   aliases=["dataset_name", "train_data_dir"])
    image_column: Optional[str] = _f(None, "image column of a HF dataset")
    label_column: Optional[str] = _f(None, "label column of a HF dataset (conditional teachers)")
    resolution: Optional[int] = _f(None, "resize the real images to this resolution (must equal the teacher's)")
    vae: str = _f("stabilityai/sd-vae-ft-mse", "EDM2 only: the VAE that decodes latents for sample grids, "
                                               "evaluation and the exported pipeline (§6.1)")
    teacher_scheduler: str = _f("DDIMScheduler", "Diffusers UNet2DModel teachers: the Diffusers scheduler of the "
                                                 "teacher's own baseline in the run summary, built from the teacher's "
                                                 "scheduler config (EDM Heun, 35 NFE, is always measured too; §12.5)")
    teacher_num_inference_steps: int = _f(50, "Diffusers UNet2DModel teachers: steps of --teacher_scheduler")
    # the method (ALGORITHM.md §4, §5)
    alpha: float = _f(1.0, "SiD alpha (§4.3)")
    tmax: float = _f(800, "generator losses use t ~ U(0, tmax/1000) on the Karras schedule (§4.3)")
    init_sigma: float = _f(INIT_SIGMA, "noise level of the one-step generator's input (§2)")
    # few-step generators (ALGORITHM.md §11)
    num_steps: int = _f(1, "K: train the generator to be applied K times along --step_sigmas (1 = the one-step "
                           "generator); the pipeline then samples with any 1..K steps (§11)")
    step_sampling: str = _f("uniform", "K > 1: uniform = each iteration trains the k-th output, k drawn uniformly from "
                                       "1..K (the same k on every process; earlier steps without gradient); all = "
                                       "always K steps with gradient through all of them (the official multistep "
                                       "loop) (§11.2)", choices=STEP_SAMPLINGS)
    step_sigmas: str = _f("linear", "the K noise levels of the steps: linear (init_sigma (K-k)/K, the official grid), "
                                    "karras (init_sigma down to --step_sigma_min, Karras rho=7 spacing) or explicit "
                                    "comma-separated levels starting at init_sigma, e.g. 2.5,1.0,0.3 (§11.1)")
    step_sigma_min: float = _f(STEP_SIGMA_MIN, "the last noise level of the karras step grid (§11.1)")
    renoise: str = _f("fresh", "noise added between steps: fresh draws, or fixed = the first step's noise again "
                               "(§11.3)", choices=RENOISE_MODES)
    best_steps: Optional[int] = _f(None, "K > 1: best_pipeline/ is the best generator sampled with this many steps "
                                         "(default K; evaluation always scores 1 and K steps)")
    P_mean: float = _f(-1.2, "lognormal sigma of the fake-score / D losses: mean of log sigma (§4.1)")
    P_std: float = _f(1.2, "lognormal sigma of the fake-score / D losses: std of log sigma (§4.1)")
    # The paper's names of the four fixed loss multipliers (ls, lsd, lsg, lsg_gan) are their command-line flags.
    fake_score_loss_scale: float = _f(1.0, "fixed multiplier of the fake-score loss (§4.5)", flag="ls")
    discriminator_loss_scale: float = _f(1.0, "fixed multiplier of the discriminator loss (§4.5)", flag="lsd")
    sid_loss_scale: float = _f(100.0, "fixed multiplier of the SiD generator loss (§4.5)", flag="lsg")
    adversarial_loss_scale: float = _f(0.01, "fixed multiplier of the adversarial generator loss (§4.5)",
                                       flag="lsg_gan")
    warmup_kimg: float = _f(100, "sida/sid2a: G is not stepped while cur_nimg <= this (§5.2)")
    adversarial_start_kimg: float = _f(200, "sida/sid2a: the adversarial G term is on once cur_nimg > this (§5.2)")
    augment_p: float = _f(0.0, "EDM augmentation probability on fake and real images in the D step (§5.7); "
                               "needs a teacher with augment_dim=9")
    dropout: Optional[float] = _f(None, "dropout of G and the fake score (default: the teacher's)")
    force_normalization: bool = _f(False, "EDM2: forced weight normalisation once per phase (§1.3)")
    use_logvar: bool = _f(False, "EDM2: uncertainty (logvar) weighting from the fake score's head (§4.7)")
    # optimisation
    lr: float = _f(1e-5, "Adam learning rate of the fake score / discriminator")
    glr: float = _f(1e-5, "Adam learning rate of the generator")
    g_beta1: float = _f(0.0, "Adam beta1 of the generator (the fake score always uses 0)")
    lr_scheduler: str = _f("constant", "how --lr and --glr evolve over --max_train_kimg: constant (the paper), or "
                                       "linear / cosine decay to zero at the end (Diffusers' names); a function of the "
                                       "images seen, so resuming continues it exactly", choices=LR_SCHEDULERS)
    adam_fused: Optional[bool] = _f(None, "Adam kernel: fused (one multi-tensor kernel per step, the fastest on CUDA) or "
                                          "foreach; default: fused on CUDA, foreach otherwise. Same update up to "
                                          "rounding")
    ema_halflife_kimg: float = _f(500, "EMA half-life of the generator in kimg (§5.6)")
    ema_rampup_ratio: Optional[float] = _f(0.05, "EMA ramp-up: half-life <= ratio * cur_nimg (§5.6)")
    # batch and precision
    train_batch_size: int = _f(32, "micro-batch per process per accumulation round (B, the paper's per-GPU batch: it "
                                   "is part of SiDA's objective)")
    total_batch_size: Optional[int] = _f(None, "global batch per iteration (default B x processes)")
    mixed_precision: str = _f("no", "default: Accelerate's setting (`accelerate launch --mixed_precision` or "
                                    "`accelerate config`), else the preset's, else no. no: float32 everywhere (the "
                                    "official CIFAR-10 numerics); fp16: the UNets run in "
                                    "float16 through the networks' own use_fp16 path, fp32 master weights (the "
                                    "official ImageNet/EDM2 numerics); bf16: autocasts every network call to "
                                    "bfloat16 (losses, preconditioning, attention softmax and Adam stay fp32): "
                                    "tensor-core speed without fp16's overflow risk", choices=("no", "fp16", "bf16"))
    allow_tf32: bool = _f(False, "CUDA: let float32 matmuls/convolutions use TF32 tensor cores (about 1.7x faster "
                                 "fp32 steps, 10-bit mantissa products); off by default and in the official runs, "
                                 "so fp32 means IEEE fp32")
    channels_last: bool = _f(False, "store the networks' 4-d weights channels-last (NHWC), so cuDNN picks its "
                                    "tensor-core NHWC convolutions (mostly a bf16/fp16 win); same math, but dropout draws its "
                                    "(equally distributed) masks in memory order, so they differ from NCHW's")
    compile: bool = _f(False, "torch.compile the generator, the fake score and the teacher (fuses the many small "
                              "element-wise ops; the first iteration compiles one graph per network and phase, "
                              "later iterations never recompile). Same math up to rounding; keep batch sizes fixed")
    compile_backend: str = _f("inductor", "torch.compile backend: inductor (fused kernels, the fast one); aot_eager "
                                          "or eager only to debug graph capture, or on machines without a compiler")
    cpu: bool = _f(False, "run on CPU even if a GPU is present")
    # memory (ALGORITHM.md §13)
    fsdp: bool = _f(False, "shard the generator, fake score, teacher and EMA over the processes with torch's FSDP2 "
                           "instead of replicating them (DDP): per-process weights, gradients and Adam states "
                           "shrink about N-fold; same losses, checkpoints and exported pipeline as DDP. `accelerate "
                           "launch --use_fsdp` turns it on")
    gradient_checkpointing: bool = _f(False, "recompute each UNet block in backward instead of keeping its "
                                             "activations (generator, fake score and teacher): far less activation "
                                             "memory per image for about one more forward pass; same gradients")
    gpu_memory_gb: Optional[float] = _f(None, "memory per process (GB) the run must fit in (default: the GPU's "
                                              "own); the run stops before step 1 when the memory plan clearly "
                                              "exceeds it. `--plan` prints the plan and the largest batch that fits")
    num_threads: Optional[int] = _f(None, "torch intra-op threads per process (default: torch's choice). The digits "
                                          "preset uses 1: its tiny networks gain nothing from a second thread, and the "
                                          "second core then computes the teacher's baseline during the training")
    # run length, checkpoints, logging
    output_dir: str = _f("runs/sida", "where checkpoints, samples, logs and the final pipeline go")
    seed: Optional[int] = _f(None, "run seed (default: random, broadcast from the main process)")
    max_train_kimg: float = _f(300000, "stop after this many thousand generated images")
    checkpointing_kimg: float = _f(500, "write a checkpoint every this many kimg (and at the end)")
    checkpoints_total_limit: Optional[int] = _f(None, "keep at most this many checkpoints")
    resume_from_checkpoint: Optional[str] = _f(None, "'latest', a checkpoint name (checkpoint-000000192, looked up in "
                                                     "OUTPUT_DIR/checkpoints) or a checkpoint folder")
    overwrite_output_dir: bool = _f(False, "delete the run files an earlier run left in --output_dir before starting "
                                           "(a used --output_dir is refused without this flag or "
                                           "--resume_from_checkpoint)")
    resume_optimizer_settings_from_checkpoint: bool = _f(False, "when resuming, continue with the Adam settings saved "
                                                                "in the checkpoint (betas, eps, weight_decay, amsgrad) "
                                                                "where they differ from this run's flags; without it "
                                                                "such a checkpoint is refused")
    log_every_kimg: float = _f(10, "tick length in kimg: log losses, timing and memory")
    report_to: str = _f("none", "Accelerate tracker: none, tensorboard, wandb, ...")
    tracker_project_name: str = _f("sida", "project name of the --report_to tracker run")
    logging_dir: str = _f("logs", "tracker folder, relative to output_dir")
    sample_grid_size: int = _f(8, "side of the EMA sample grid written at every checkpoint (0 = none)")
    # evaluation
    eval_every_kimg: float = _f(0, "evaluate the EMA generator every this many kimg (0 = never)")
    eval_metrics: list = _f([], "metrics to evaluate, e.g. fid fd_digits", nargs="*")
    eval_num_samples: int = _f(10000, "generated images per evaluation")
    eval_reference: Optional[str] = _f(None, "reference statistics for the metrics")
    eval_batch_size: int = _f(100, "generation batch during evaluation")
    # export
    push_to_hub: bool = _f(False, "upload the final pipeline to the Hub")
    hub_model_id: Optional[str] = _f(None, "Hub repository of the pipeline (default: output_dir's name)")
    hub_token: Optional[str] = _f(None, "Hub token for --push_to_hub (default: the stored one, `hf auth login`); never "
                                        "written to the run's files")

    @property
    def is_adversarial(self) -> bool:
        return self.method != "sid"

    def to_dict(self) -> dict:
        """The values as written to the run's config.json, checkpoints and trackers (secrets left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in SECRET_FIELDS}


    def __post_init__(self):
        for name in ("method", "mixed_precision", "lr_scheduler", "step_sampling", "renoise"):
            choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}.")
        if self.train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {self.train_batch_size}.")
        if self.teacher_num_inference_steps < 1:
            raise ValueError(f"teacher_num_inference_steps must be >= 1, got {self.teacher_num_inference_steps}.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}.")
        if self.gpu_memory_gb is not None and not self.gpu_memory_gb > 0:
            raise ValueError(f"gpu_memory_gb must be a positive number of GB, got {self.gpu_memory_gb}.")


def load_presets() -> dict:
    """All presets of presets.json: name -> values (each may hold `by_method` overrides)."""
    return json.loads(PRESETS_FILE.read_text())


def preset_values(name: str, method: Optional[str] = None) -> dict:
    """The flat values of preset `name` for `method` (default: the preset's own method)."""
    presets = load_presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(presets))}. Pick one of them, "
                         "or omit --preset and pass --teacher (and the other flags) yourself.")
    values = dict(presets[name])
    by_method = values.pop("by_method", {})
    method = method or values.get("method", TrainConfig.method)
    return {**values, **by_method.get(method, {}), "method": method}


# Flags of the Diffusers training examples. Where the meaning is the same the name is an alias of our flag (the
# `aliases` of the TrainConfig field: --pretrained_model_name_or_path, --dataset_name, --train_data_dir). The ones
# below mean something else here (length and batching are counted in images, as in the paper; SiD trains two
# networks; there is no text prompt), so each is refused with a pointer to our equivalent rather than silently
# reinterpreted.
DIFFUSERS_FLAGS = {
    "learning_rate": "SiD/SiDA trains two networks: pass --lr (fake score / discriminator) and --glr (generator)",
    "gradient_accumulation_steps": "pass --total_batch_size; accumulation rounds = total_batch_size / "
                                   "(train_batch_size x processes)",
    "max_train_steps": "training length is counted in images: pass --max_train_kimg (= steps x total_batch_size / "
                       "1000)",
    "num_train_epochs": "training length is counted in images: pass --max_train_kimg",
    "checkpointing_steps": "pass --checkpointing_kimg (= steps x total_batch_size / 1000)",
    "validation_steps": "the EMA generator is evaluated every --eval_every_kimg and drawn as a sample grid at every "
                        "checkpoint (--checkpointing_kimg)",
    "validation_epochs": "the EMA generator is evaluated every --eval_every_kimg and drawn as a sample grid at every "
                         "checkpoint (--checkpointing_kimg)",
    "num_validation_images": "pass --sample_grid_size (the side of the grid drawn at every checkpoint) or "
                             "--eval_num_samples (images per evaluation)",
    "validation_prompt": "SiD generators take class labels, not text: the grids draw one label per seed",
    "max_grad_norm": "SiDA does not clip the gradient norm: the fake score's gradients are value-clipped at 1 for "
                     "EDM teachers (ALGORITHM.md §5.4), with no flag",
    "lr_warmup_steps": "the learning rates have no warm-up; the generator is held for the first --warmup_kimg "
                       "instead (ALGORITHM.md §5.2)",
    "dataloader_num_workers": "real images are read by one in-process stream per process (no DataLoader workers): "
                              "nothing to set",
    "use_ema": "the generator's EMA is always kept; set its half-life with --ema_halflife_kimg",
    "adam_beta1": "the fake score uses beta1 = 0 (ALGORITHM.md §5.5); the generator's is --g_beta1",
}
ACCELERATE_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
ACCELERATE_FSDP_ENV = "ACCELERATE_USE_FSDP"


def field_names() -> dict:
    """Every accepted name -> TrainConfig field: the field names and the paper's flags (`lsg` -> `sid_loss_scale`)."""
    names = {f.name: f.name for f in dataclasses.fields(TrainConfig)}
    names.update({f.metadata["flag"]: f.name for f in dataclasses.fields(TrainConfig) if "flag" in f.metadata})
    names.update({alias: f.name for f in dataclasses.fields(TrainConfig) for alias in f.metadata.get("aliases", ())})
    return names


def resolve_mixed_precision(explicit: Optional[str], fallback: str, accelerate_value: Optional[str]) -> str:
    """The run's precision: the train flag if given, else Accelerate's launch setting (`accelerate launch
    --mixed_precision`, `accelerate config`), else the preset's or default `fallback`.

    `accelerate launch` always exports a value and writes "no" when nothing was chosen, so "no" from Accelerate
    counts as no choice; a train flag that disagrees with a real Accelerate choice is an error."""
    accelerate_value = None if accelerate_value in (None, "", "no") else accelerate_value
    if accelerate_value is not None and accelerate_value not in ("fp16", "bf16"):
        raise ValueError(f"Accelerate's mixed precision is {accelerate_value!r}, which the trainer does not support; "
                         "launch with --mixed_precision no, fp16 or bf16.")
    if explicit is not None and accelerate_value is not None and explicit != accelerate_value:
        raise ValueError(f"--mixed_precision {explicit} disagrees with Accelerate's mixed precision "
                         f"{accelerate_value!r} (accelerate launch / accelerate config); give one of them, or the "
                         "same value to both.")
    return explicit or accelerate_value or fallback


def _env_true(env, name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def resolve_fsdp(explicit_fsdp: Optional[bool], explicit_checkpointing: Optional[bool], env) -> dict:
    """`accelerate launch --use_fsdp` (or `distributed_type: FSDP` in `accelerate config`) mapped onto `--fsdp`, and
    its `fsdp_activation_checkpointing` onto `--gradient_checkpointing`; options the trainer does not implement are
    refused. The trainer shards with FSDP2 itself (ALGORITHM.md §13.1): Accelerate's plugin does not shard on CPU."""
    if not _env_true(env, ACCELERATE_FSDP_ENV):
        return {}
    if explicit_fsdp is False:
        raise ValueError("--no-fsdp disagrees with `accelerate launch --use_fsdp` (or distributed_type: FSDP in "
                         "`accelerate config`); drop one of them.")
    if _env_true(env, "FSDP_OFFLOAD_PARAMS"):
        raise ValueError("Accelerate's fsdp_offload_params is not supported: the trainer keeps the shards on the GPU; "
                         "launch without it (`--plan` shows what fits).")
    strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if strategy not in ("FULL_SHARD", "1"):
        raise ValueError(f"Accelerate's fsdp_sharding_strategy {strategy} is not supported: --fsdp shards fully "
                         "(FULL_SHARD); launch with that strategy, or without --use_fsdp for DDP.")
    values = {"fsdp": True}
    if _env_true(env, "FSDP_ACTIVATION_CHECKPOINTING"):
        if explicit_checkpointing is False:
            raise ValueError("--no-gradient_checkpointing disagrees with Accelerate's fsdp_activation_checkpointing; "
                             "drop one of them.")
        values["gradient_checkpointing"] = True
    return values


def make_config(preset: Optional[str] = None, **overrides) -> TrainConfig:
    """A `TrainConfig` from a preset plus explicit values (the programmatic twin of `parse_args`).

    Without a preset and without a teacher, the offline `digits` preset is used. Keys may be field names or the
    paper's flags (`lsg`, `lsd`, ...). The precision follows `resolve_mixed_precision`, sharding `resolve_fsdp`.
    """
    names = field_names()
    refused = sorted(set(overrides) & set(DIFFUSERS_FLAGS))
    if refused:
        raise ValueError(f"--{refused[0]} is not a flag of the SiD/SiDA trainer: {DIFFUSERS_FLAGS[refused[0]]}.")
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields are the command-line flags: "
                         f"{', '.join(sorted(names))}.")
    overrides = {names[k]: v for k, v in overrides.items()}
    if preset is None and overrides.get("teacher") is None:
        preset = DEFAULT_PRESET
    values = {names.get(k, k): v for k, v in (preset_values(preset, overrides.get("method")) if preset else {}).items()}
    unknown = sorted(set(values) - set(names.values()))
    if unknown:
        raise ValueError(f"preset {preset!r} sets unknown field(s) {unknown}; fix presets.json.")
    explicit_precision = overrides.pop("mixed_precision", None)
    values.update(overrides)
    values["mixed_precision"] = resolve_mixed_precision(explicit_precision,
                                                        values.get("mixed_precision", TrainConfig.mixed_precision),
                                                        os.environ.get(ACCELERATE_PRECISION_ENV))
    values.update(resolve_fsdp(overrides.get("fsdp"), overrides.get("gradient_checkpointing"), os.environ))
    return TrainConfig(**{**values, "preset": preset})


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per `TrainConfig` field (the paper's name where it has one, e.g. --lsg, with the
    field name as an alias). Defaults are suppressed so that presets can tell which flags were given explicitly."""
    parser = argparse.ArgumentParser(
        description="One-step distillation of an EDM/EDM2 teacher with SiD, SiDA or SiD²A. Flags are written with "
                    "underscores, as in the Diffusers training examples; hyphens work too (--train-batch-size).",
        argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        kind = str(f.type).replace("Optional[", "").rstrip("]")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        # one default per help line: a help text that already says what the default is keeps its own words
        text = f.metadata["help"]
        kw = dict(help=text if "default" in text else f"{text} (default: {default})", dest=f.name)
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == "list":
            kw["nargs"] = f.metadata.get("nargs", "*")
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[kind]
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        flags = [f"--{f.metadata['flag']}", f"--{f.name}"] if "flag" in f.metadata else [f"--{f.name}"]
        flags += [f"--{alias}" for alias in f.metadata.get("aliases", ())]
        parser.add_argument(*flags, **kw)
    return parser


def _normalize_flag(arg: str) -> str:
    """``--train-batch-size=8`` -> ``--train_batch_size=8``, ``--no-allow-tf32`` -> ``--no-allow_tf32`` (the
    negation prefix of boolean flags keeps its hyphen; values are untouched)."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    prefix, name = ("no-", name[3:]) if name.startswith("no-") else ("", name)
    return "--" + prefix + name.replace("-", "_") + sep + value


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse command-line flags (default: sys.argv) into a `TrainConfig`, presets applied. A Diffusers-example flag
    that has no meaning here (--learning_rate, --max_train_steps, ...) raises ValueError naming our equivalent."""
    argv = [_normalize_flag(a) for a in (sys.argv[1:] if argv is None else argv)]
    for arg in argv:
        name = arg[2:].partition("=")[0] if arg.startswith("--") else None
        if name in DIFFUSERS_FLAGS:
            raise ValueError(f"--{name} is not a flag of the SiD/SiDA trainer: {DIFFUSERS_FLAGS[name]}.")
    return make_config(**vars(build_parser().parse_args(argv)))
