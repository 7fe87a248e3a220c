"""The Accelerate distillation trainer: config and presets, half-life EMA, the SiD/SiDA/SiD²A loop."""

from sida_diffusers.training.checkpointing import latest_checkpoint, list_checkpoints, resolve_checkpoint
from sida_diffusers.training.config import TrainConfig, build_parser, load_presets, make_config, parse_args
from sida_diffusers.training.ema import HalfLifeEMA
from sida_diffusers.training.trainer import SiDATrainer, Stage


__all__ = ["HalfLifeEMA", "SiDATrainer", "Stage", "TrainConfig", "build_parser", "latest_checkpoint", "list_checkpoints", "load_presets",
           "make_config", "parse_args", "resolve_checkpoint"]
