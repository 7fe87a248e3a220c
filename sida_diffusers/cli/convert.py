"""`sida-convert SRC DST`: an official EDM/EDM2/SiD/SiDA checkpoint -> a Diffusers model folder (safetensors)."""

from __future__ import annotations

import torch

from sida_diffusers.cli import INPUT_ERRORS, CommandParser
from sida_diffusers.pretrained import KNOWN_NETWORKS, convert_official
from sida_diffusers.shipped import SHIPPED_TEACHERS


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="sida-convert",
        description="Convert an official network pickle (never executing code from it) into a Diffusers model folder "
                    "that sida_diffusers.load_denoiser and save_pretrained-style tools read.",
        epilog="known checkpoint names: " + ", ".join(sorted([*KNOWN_NETWORKS, *SHIPPED_TEACHERS])) + ".")
    parser.add_argument("src", help="official .pkl file, http(s) URL, known checkpoint name, Diffusers folder or "
                                    "Hub reference (owner/repo[/path.pkl][:subfolder])")
    parser.add_argument("dst", help="output folder (config.json + diffusion_pytorch_model.safetensors)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    parser.add_argument("--key", default="ema", help="top-level entry of the pickle that holds the network")
    parser.add_argument("--cache-dir", default=None, help="where downloads are cached (default $SIDA_CACHE or "
                                                          "~/.cache/sida_diffusers)")
    return parser


def main(argv=None) -> int:
    """Run the converter; `argv` defaults to the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.check_writable_folder("DST", args.dst)  # before reading a possibly large checkpoint
    try:
        model = convert_official(args.src, args.dst, dtype=DTYPES[args.dtype], key=args.key, cache_dir=args.cache_dir)
    except INPUT_ERRORS as error:  # bad input: one clear line, no traceback
        parser.fail(error)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {type(model).__name__}, {num_params:,} parameters, {args.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
