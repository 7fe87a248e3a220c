"""Train the small digits classifier whose penultimate features define FD-digits (`sida_diffusers.digits`).

Reproduce the shipped weights (about a minute on one CPU core):

    OMP_NUM_THREADS=1 python examples/train_digits_classifier.py

Trains on the stratified 80% split of `digits_holdout_split` (seed 0), reports accuracy on the 20% held out, and writes
a Diffusers folder (config.json + safetensors) to sida_diffusers/assets/digits_classifier/.
"""

import argparse
import time
from pathlib import Path

import torch

from sida_diffusers.digits import ASSETS_DIR, DigitsFeatureNet, digits_holdout_split, load_digits_tensors


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill): the one augmentation digits tolerate."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, [max_shift] * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(net: DigitsFeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    return (net(images.float()).argmax(1) == labels).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", type=Path, default=ASSETS_DIR / "digits_classifier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_shift", type=int, default=1, help="random translation in pixels (0 disables it)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_tensors()
    train_idx, heldout_idx = digits_holdout_split(labels)
    x_train, y_train = images[train_idx].float(), labels[train_idx]

    net = DigitsFeatureNet()
    opt = torch.optim.Adam(net.parameters(), lr=args.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    print(f"DigitsFeatureNet: {sum(p.numel() for p in net.parameters()):,} parameters; "
          f"{len(train_idx)} train / {len(heldout_idx)} held-out digits")
    start = time.time()
    for epoch in range(args.epochs):
        net.train()
        for batch in torch.randperm(len(train_idx), generator=gen).split(args.train_batch_size):
            x = random_shift(x_train[batch], args.max_shift, gen) if args.max_shift else x_train[batch]
            loss = torch.nn.functional.cross_entropy(net(x), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  "
                  f"held-out accuracy {accuracy(net, images[heldout_idx], labels[heldout_idx]):.4f}")

    acc = accuracy(net, images[heldout_idx], labels[heldout_idx])
    net.save_pretrained(args.output_dir)
    print(f"held-out accuracy {acc:.4f} ({len(heldout_idx)} digits); train accuracy "
          f"{accuracy(net, x_train, y_train):.4f}; {time.time() - start:.0f} s; saved to {args.output_dir}")


if __name__ == "__main__":
    main()
