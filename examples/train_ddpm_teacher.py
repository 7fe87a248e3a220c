"""Train the tiny Diffusers DDPM digits teacher shipped in `sida_diffusers/assets/digits_ddpm` (`--teacher digits-ddpm`).

Reproduce the shipped weights (one CPU thread, about 15 minutes):

    OMP_NUM_THREADS=1 python examples/train_ddpm_teacher.py

The recipe is Diffusers' own `examples/unconditional_image_generation/train_unconditional.py`, in one process: a
`UNet2DModel`, a `DDPMScheduler` (1,000 linear betas, epsilon prediction), uniform integer timesteps, the MSE between
predicted and true noise, AdamW (beta1 0.95, weight decay 1e-6), a cosine learning rate with warm-up, gradient norm
clipping at 1 and Diffusers' `EMAModel` with warm-up (inv_gamma 1, power 3/4, max decay 0.9999); the EMA weights are
saved as a `DDPMPipeline` folder (unet/ + scheduler/ + model_index.json), which `DDPMPipeline.from_pretrained` and
`sida_diffusers.load_denoiser` both read. What differs from the script's defaults is sized for a 16x16 grey teacher
on a CPU: a 3-level UNet of (16, 32, 32) channels with attention at 8x8, batch 64 and learning rate 1e-3 (the script:
6 levels up to 512 channels, batch 16, 1e-4), no random flips (digits are not mirror-symmetric). The data is
scikit-learn's digits as `sida_diffusers.data.digits` loads them, scaled to [-1, 1] as the script's Normalize([0.5],
[0.5]) does. A DDIM-50 sanity grid (Diffusers' `DDIMPipeline`) goes to `--grid_path`.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image

from sida_diffusers.data.digits import load_digits_tensors
from sida_diffusers.pipelines import image_grid
from sida_diffusers.shipped import ASSETS_DIR, SHIPPED_TEACHERS


def build_unet(channels, layers_per_block: int, attention_level: int) -> UNet2DModel:
    """A UNet2DModel for 16x16x1 images: one block per entry of `channels`, attention at level `attention_level`."""
    down = ["AttnDownBlock2D" if i == attention_level else "DownBlock2D" for i in range(len(channels))]
    up = [name.replace("Down", "Up") for name in reversed(down)]
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=tuple(channels),
                       layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
                       norm_num_groups=8, attention_head_dim=8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", type=Path, default=ASSETS_DIR / SHIPPED_TEACHERS["digits-ddpm"])
    parser.add_argument("--grid_path", type=Path, default=Path("outputs/digits_ddpm_teacher.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_train_steps", type=int, default=6000)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_warmup_steps", type=int, default=300)
    parser.add_argument("--adam_beta1", type=float, default=0.95)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-6)
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0)
    parser.add_argument("--ema_power", type=float, default=3 / 4)
    parser.add_argument("--ema_max_decay", type=float, default=0.9999)
    parser.add_argument("--ddpm_num_steps", type=int, default=1000)
    parser.add_argument("--ddpm_beta_schedule", default="linear")
    parser.add_argument("--prediction_type", default="epsilon", choices=("epsilon", "sample", "v_prediction"))
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 32])
    parser.add_argument("--layers_per_block", type=int, default=1)
    parser.add_argument("--attention_level", type=int, default=1, help="index of the block with self-attention")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args()

    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    images, _ = load_digits_tensors()
    data = images.float() / 127.5 - 1

    unet = build_unet(args.block_out_channels, args.layers_per_block, args.attention_level).train()
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
                                    prediction_type=args.prediction_type)
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                   power=args.ema_power, model_cls=UNet2DModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    print(f"DDPM digits teacher: {sum(p.numel() for p in unet.parameters()):,} parameters, {len(data)} digits, "
          f"{args.max_train_steps} steps of {args.train_batch_size}", flush=True)

    start, cpu_start, losses = time.time(), time.process_time(), []
    order, pos = torch.randperm(len(data)), 0
    for step in range(args.max_train_steps):
        if pos + args.train_batch_size > len(data):  # new epoch: reshuffle, drop the ragged tail
            order, pos = torch.randperm(len(data)), 0
        clean = data[order[pos:pos + args.train_batch_size]]
        pos += args.train_batch_size
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),))
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        output = unet(noisy, timesteps).sample
        if args.prediction_type == "epsilon":
            target = noise
        elif args.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(clean, noise, timesteps)
        else:
            target = clean
        loss = F.mse_loss(output.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == args.max_train_steps:
            print(f"step {step + 1:5d}  loss {np.mean(losses[-250:]):.4f}  lr {lr_scheduler.get_last_lr()[0]:.2e}  "
                  f"ema decay {ema.cur_decay_value or 0:.5f}  {time.time() - start:.0f} s wall, "
                  f"{time.process_time() - cpu_start:.0f} s CPU", flush=True)

    ema.copy_to(unet.parameters())
    unet.eval()
    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(args.output_dir, safe_serialization=True)
    size = sum(f.stat().st_size for f in args.output_dir.rglob("*") if f.is_file()) / 2 ** 20
    print(f"saved the EMA teacher as a DDPMPipeline folder to {args.output_dir} ({size:.2f} MiB)")

    ddim = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    samples = ddim(batch_size=100, generator=torch.Generator().manual_seed(args.seed), num_inference_steps=50).images
    grid = image_grid(samples, cols=10)
    args.grid_path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(args.grid_path)
    print(f"wrote 100 DDIM samples (50 steps) to {args.grid_path}; {math.ceil(time.time() - start)} s in all")


if __name__ == "__main__":
    main()
