"""`sida-export SRC DST`: a trained generator -> a SiDAPipeline folder with a model card, optionally pushed to the Hub.

SRC is a training checkpoint folder (`checkpoint-*/` with `generator_ema/` and `run_info.json`), a trainer output
directory (its latest checkpoint is used), or an official SiD/SiDA generator (.pkl file, URL, known name or Hub
reference: anything `sida_diffusers.load_denoiser` reads).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sida_diffusers.cli import INPUT_ERRORS, CommandParser
from sida_diffusers.hub import export_pipeline, push_to_hub
from sida_diffusers.pipelines.publishing import MAX_RUN_INFO_BYTES
from sida_diffusers.pretrained import load_denoiser
from sida_diffusers.safe_io.files import read_json
from sida_diffusers.safe_io.paths import check_folder_files
from sida_diffusers.schedule import INIT_SIGMA


def latest_checkpoint(folder: Path) -> Path:
    """`folder` itself if it is a checkpoint, else its newest `checkpoint-N` (in `checkpoints/` or directly in it)."""
    if (folder / "generator_ema").is_dir() and (folder / "run_info.json").is_file():
        return folder
    found = [p for p in (*folder.glob("checkpoints/checkpoint-*"), *folder.glob("checkpoint-*"))
             if re.fullmatch(r"checkpoint-\d+", p.name) and (p / "generator_ema").is_dir()]
    if not found:
        raise FileNotFoundError(f"{folder} is neither a checkpoint folder (generator_ema/ + run_info.json) nor a "
                                "trainer output directory with checkpoints/checkpoint-*/; pass one of those or an "
                                "official generator .pkl.")
    return max(found, key=lambda p: int(p.name.split("-")[1]))


def _guess_method(src: str) -> str:
    name = src.lower()
    return next((m for m in ("sid2a", "sida") if m in name), "sid")


def load_source(src: str, method=None, teacher=None) -> tuple:
    """(generator, run_info, description) for a checkpoint folder, trainer output dir or official generator."""
    path = Path(src)
    # a checkpoint folder or a trainer output dir (whose config.json is the run's TrainConfig, not a model config)
    if path.is_dir() and ((path / "generator_ema").is_dir() or (path / "checkpoints").is_dir()
                          or not (path / "config.json").is_file()):
        ckpt = latest_checkpoint(path)
        if not (ckpt / "run_info.json").is_file():
            raise FileNotFoundError(f"{ckpt} has no run_info.json (the trainer writes it with every checkpoint).")
        check_folder_files(ckpt, ["run_info.json"])  # a link out of the checkpoint would be published
        run_info = read_json(ckpt / "run_info.json", max_bytes=MAX_RUN_INFO_BYTES)
        if not isinstance(run_info, dict):
            raise ValueError(f"{ckpt / 'run_info.json'} holds no JSON object; the checkpoint is damaged.")
        return load_denoiser(ckpt / "generator_ema"), run_info, f"checkpoint {ckpt}"
    generator = load_denoiser(src)
    run_info = {"method": method or _guess_method(src), "teacher": teacher, "source": src, "init_sigma": INIT_SIGMA,
                "label_dim": generator.label_dim, "resolution": generator.img_resolution,
                "channels": generator.img_channels, "latent": generator.family == "edm2"}
    return generator, run_info, f"generator {src}"


def build_parser() -> CommandParser:
    parser = CommandParser(prog="sida-export", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="checkpoint folder, trainer output dir, or official generator .pkl/URL/name")
    parser.add_argument("dst", help="output pipeline folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="then upload DST to this Hub repo (owner/name)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--dataset", help="dataset name or Hub id for the model card (overrides run_info)")
    parser.add_argument("--id2label", metavar="FILE.json", help="JSON {index: name} of class names")
    parser.add_argument("--teacher", help="teacher of an official generator (model card, base_model, licence)")
    parser.add_argument("--method", choices=("sid", "sida", "sid2a"), help="method of an official generator "
                                                                          "(default: guessed from its name)")
    parser.add_argument("--vae", help="AutoencoderKL folder or Hub id for latent (EDM2) models, e.g. "
                                      "stabilityai/sd-vae-ft-mse")
    parser.add_argument("--no-grid", action="store_true", help="skip the 64-image sample grid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for the sample grid")
    return parser


def main(argv=None) -> int:
    """Export (and optionally push) a generator; `argv` defaults to the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.check_writable_folder("DST", args.dst)
    parser.check_device("--device", args.device)

    try:
        generator, run_info, what = load_source(args.src, args.method, args.teacher)
        if args.dataset:
            run_info["dataset"] = args.dataset
        if args.id2label:
            id2label = read_json(args.id2label, max_bytes=MAX_RUN_INFO_BYTES)  # a regular file, bounded
            if not isinstance(id2label, dict) or not all(isinstance(v, str) and str(k).isdigit() and len(str(k)) < 7
                                                         for k, v in id2label.items()):
                raise ValueError(f"{args.id2label} must hold a JSON object {{class index: class name}}.")
            run_info["id2label"] = {int(k): v for k, v in id2label.items()}
        vae = None
        if args.vae:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True).to(args.device).eval()  # no pickles
        pipe = export_pipeline(generator.to(args.device), args.dst, run_info, vae=vae, grid=not args.no_grid,
                               repo_id=args.push_to_hub)
    except INPUT_ERRORS as error:
        parser.fail(error)
    print(f"exported {what} as {type(pipe).__name__} to {args.dst}:")
    for path in sorted(p for p in Path(args.dst).rglob("*") if p.is_file()):
        print(f"  {path.relative_to(args.dst)}  ({path.stat().st_size:,} bytes)")
    if args.push_to_hub:
        try:
            commit = push_to_hub(args.dst, args.push_to_hub, private=args.private)
        except INPUT_ERRORS as error:  # network, token, repo name: the export above stays on disk
            parser.fail(f"exported to {args.dst}, but pushing to {args.push_to_hub} failed: {error}")
        print(f"pushed to https://huggingface.co/{args.push_to_hub} ({getattr(commit, 'commit_url', commit)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
