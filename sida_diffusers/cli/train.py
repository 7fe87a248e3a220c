"""`sida-train` / `examples/train_sida.py`: parse the flags (presets applied) and run the distillation (`--plan`:
print the memory plan instead)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


def main(argv=None) -> Optional[Path]:
    """Console entry; bad input exits with code 2 and one line on stderr, before anything is written. With `--plan`
    it prints the memory plan of the launch instead (`sida-plan`) and trains nothing."""
    from sida_diffusers.training import SiDATrainer, parse_args

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plan" in argv:
        from sida_diffusers.cli.plan import main as plan

        plan([a for a in argv if a != "--plan"])
        return None
    try:
        trainer = SiDATrainer(parse_args(argv))  # every input check runs here, before any training
    except (ValueError, FileNotFoundError) as error:
        print(f"train_sida: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return trainer.train()


if __name__ == "__main__":
    main()
