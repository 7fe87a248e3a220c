"""Distil an EDM/EDM2 teacher into a one-step generator with SiD, SiDA or SiD²A.

    python examples/train_sida.py                                   # offline default: the shipped digits teacher
    python examples/train_sida.py --preset cifar10-uncond --output_dir runs/c10
    accelerate launch --num_processes 4 examples/train_sida.py --preset ffhq64 --train_data ffhq-64x64.zip
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/train_sida.py --cpu   # 2 CPU processes

Every flag is a field of `sida_diffusers.training.TrainConfig`; `--preset NAME` loads ALGORITHM.md §7's settings
from `sida_diffusers/training/presets.json`, and flags given explicitly override them. `--help` lists them all.
"""

from sida_diffusers.cli.train import main


if __name__ == "__main__":
    main()
