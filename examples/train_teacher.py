"""Train the tiny EDM digits teacher shipped in `sida_diffusers/assets/` (the offline default of `train_sida.py`).

Reproduce the shipped weights (one CPU thread each; the conditional one is the default teacher):

    OMP_NUM_THREADS=1 python examples/train_teacher.py --conditional
    OMP_NUM_THREADS=1 python examples/train_teacher.py --unconditional

The teacher is an EDMPrecond + SongUNet DDPM++ at 16x16x1 trained with the EDM denoising loss (ALGORITHM.md §4.1:
lognormal sigma, weight (sigma^2+sigma_d^2)/(sigma sigma_d)^2) on scikit-learn's digits as loaded by
`sida_diffusers.data.datasets`. Only the EMA weights are written, as a Diffusers folder (config.json + safetensors).
A sanity grid from EDM's deterministic 18-step Heun sampler (35 NFE, `EDMHeunPipeline`) goes to `--grid_path`, and
the shipped classifier reports how often the conditional samples are recognised as the class they were drawn for.
"""

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sida_diffusers.digits import ASSETS_DIR, DIGITS_ID2LABEL, load_digits_classifier, load_digits_tensors
from sida_diffusers.losses import fake_score_loss, lognormal_sigma
from sida_diffusers.networks import one_hot
from sida_diffusers.networks.precond import EDMPrecond
from sida_diffusers.pipelines import EDMHeunPipeline, image_grid
from sida_diffusers.training.ema import HalfLifeEMA


def build_teacher(conditional: bool, model_channels: int, channel_mult, num_blocks: int, attn_resolutions,
                  dropout: float) -> EDMPrecond:
    """SongUNet DDPM++ at 16x16x1 as official init_kwargs; no augment labels (digits are not flip-invariant)."""
    return EDMPrecond.from_official_kwargs(dict(
        img_resolution=16, img_channels=1, label_dim=10 if conditional else 0, model_type="SongUNet",
        embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
        resample_filter=[1, 1], model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=num_blocks,
        attn_resolutions=list(attn_resolutions), augment_dim=0, dropout=dropout))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--conditional", dest="conditional", action="store_true", default=True,
                       help="class-conditional teacher (label_dim=10), the default")
    group.add_argument("--unconditional", dest="conditional", action="store_false")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="default: sida_diffusers/assets/digits_teacher_{cond,uncond}")
    parser.add_argument("--grid_path", type=Path, default=None,
                        help="default: outputs/digits_teacher_{cond,uncond}.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_train_steps", type=int, default=2500)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--lr_warmup_steps", type=int, default=200)
    parser.add_argument("--ema_halflife_kimg", type=float, default=10.0)
    parser.add_argument("--model_channels", type=int, default=16)
    parser.add_argument("--channel_mult", type=int, nargs="+", default=[1, 2, 2])
    parser.add_argument("--num_blocks", type=int, default=1)
    parser.add_argument("--attn_resolutions", type=int, nargs="*", default=[8])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args()
    tag = "cond" if args.conditional else "uncond"
    output_dir = args.output_dir or ASSETS_DIR / f"digits_teacher_{tag}"
    grid_path = args.grid_path or Path("outputs") / f"digits_teacher_{tag}.png"

    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    images, labels = load_digits_tensors()
    data = images.float() / 127.5 - 1
    onehot = one_hot(labels, 10) if args.conditional else None

    net = build_teacher(args.conditional, args.model_channels, args.channel_mult, args.num_blocks,
                        args.attn_resolutions, args.dropout).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    ema_tracker = HalfLifeEMA(net, ema, halflife_kimg=args.ema_halflife_kimg)
    opt = torch.optim.Adam(net.parameters(), lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    # Linear warm-up, then cosine decay to 0 so the last steps refine instead of bouncing at full learning rate.
    def lr_factor(step):
        return min(1.0, (step + 1) / args.lr_warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / args.max_train_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    print(f"{tag} teacher: {sum(p.numel() for p in net.parameters()):,} parameters, {len(data)} digits, "
          f"{args.max_train_steps} steps of {args.train_batch_size}")

    start, cpu_start, losses = time.time(), time.process_time(), []
    order = torch.randperm(len(data))
    for step in range(args.max_train_steps):
        pos = step * args.train_batch_size % len(data)
        if pos + args.train_batch_size > len(data):  # new epoch: reshuffle, drop the ragged tail
            order, pos = torch.randperm(len(data)), 0
        batch = order[pos:pos + args.train_batch_size]
        x = data[batch]
        sigma = lognormal_sigma(len(x))  # EDM training noise levels, P_mean=-1.2, P_std=1.2
        denoised = net(x + torch.randn_like(x) * sigma, sigma, None if onehot is None else onehot[batch])
        loss = fake_score_loss(x, denoised, sigma, sigma_data=net.sigma_data).mean()  # the EDM loss (§4.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in net.parameters():
            torch.nan_to_num_(p.grad, nan=0, posinf=1e5, neginf=-1e5)
        opt.step()
        sched.step()
        ema_tracker.update(step * args.train_batch_size, args.train_batch_size)
        losses.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == args.max_train_steps:
            print(f"step {step + 1:5d}  loss {np.mean(losses[-250:]):.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU", flush=True)

    ema.save_pretrained(output_dir)
    size = sum(f.stat().st_size for f in output_dir.iterdir()) / 2 ** 20
    print(f"saved EMA teacher to {output_dir} ({size:.2f} MiB)")

    pipe = EDMHeunPipeline(unet=ema, id2label=DIGITS_ID2LABEL if args.conditional else None, preset="cifar10")
    pipe.set_progress_bar_config(disable=True)
    sample_labels = torch.arange(10).repeat_interleave(10) if args.conditional else None
    out = pipe(100, class_labels=sample_labels, generator=torch.Generator().manual_seed(args.seed), output_type="pil")
    grid = image_grid(out.images, cols=10)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(grid_path)
    print(f"wrote 100 Heun samples ({out.nfe} NFE) to {grid_path}" + (" (row k = class k)" if args.conditional else ""))
    if args.conditional:
        samples = torch.from_numpy(np.stack([np.asarray(im) for im in out.images]))[:, None]
        with torch.no_grad():
            predicted = load_digits_classifier()(samples.float()).argmax(1)
        agreement = (predicted == sample_labels).float().mean()
        print(f"the shipped classifier recognises the requested class in {agreement:.0%} of the samples")


if __name__ == "__main__":
    main()
