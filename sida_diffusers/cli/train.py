"""`sida-train` / `examples/train_sida.py`: parse the flags (presets applied) and run the distillation (`--plan`:
print the memory plan instead)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


def main(argv=None) -> Optional[Path]:
    """Console entry; bad input exits with code 2 and one line on stderr, before anything is written. With `--plan`
    it prints the memory plan of the launch instead (`sida-plan`) and trains nothing."""
    from sida_diffusers.cli import INPUT_ERRORS
    from sida_diffusers.training import SiDATrainer, parse_args

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plan" in argv:
        from sida_diffusers.cli.plan import main as plan

        plan([a for a in argv if a != "--plan"])
        return None
    try:
        trainer = SiDATrainer(parse_args(argv))  # every input check runs here, before any training
    except INPUT_ERRORS as error:  # a flag, a file, or a teacher that cannot be downloaded: one line
        print(f"train_sida: error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    pipeline_dir = trainer.train()
    if trainer.push_error:  # training and the local pipeline are done; the one line saying so is printed
        raise SystemExit(1)
    return pipeline_dir


if __name__ == "__main__":
    main()
