"""`sida-export SRC DST`: a trained generator -> a SiDAPipeline folder with a model card, optionally pushed to the Hub.

SRC is a training checkpoint folder (`checkpoints/checkpoint-*/`), a trainer output directory (its latest checkpoint
is used), or an official SiD/SiDA generator (.pkl file, URL, known name or Hub reference: anything
`sida_diffusers.load_denoiser` reads). A run's export carries the run's own record: when the run already exported
its final pipeline from that checkpoint, its card (the teacher's baseline included) is what DST gets.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sida_diffusers.cli import INPUT_ERRORS, CommandParser
from sida_diffusers.hub import check_push_access, export_pipeline, push_later_hint, push_to_hub
from sida_diffusers.pretrained import declared_license, load_denoiser
from sida_diffusers.run_record import MAX_RECORD_BYTES, RUN_INFO_NAME, RunRecord
from sida_diffusers.safe_io.files import read_json
from sida_diffusers.schedule import INIT_SIGMA
from sida_diffusers.training.checkpointing import latest_checkpoint


def _guess_method(src: str) -> str:
    name = src.lower()
    return next((m for m in ("sid2a", "sida") if m in name), "sid")


def checkpoint_record(ckpt: Path) -> RunRecord:
    """The record of checkpoint `ckpt`; the run's exported `pipeline/` record instead when it was exported from the
    same point of the run (it also holds the teacher's baseline, measured after the last checkpoint)."""
    record = RunRecord.read(ckpt / RUN_INFO_NAME)
    exported = ckpt.parent.parent / "pipeline" / RUN_INFO_NAME
    if exported.is_file():
        final = RunRecord.read(exported)
        if final.cur_nimg == record.cur_nimg:
            return final
    return record


def load_source(src: str, method=None, teacher=None) -> tuple:
    """(generator, run record, description) for a checkpoint folder, trainer output dir or official generator."""
    path = Path(src)
    # a checkpoint folder or a trainer output dir (whose config.json is the run's TrainConfig, not a model config)
    if path.is_dir() and ((path / "generator_ema").is_dir() or (path / "checkpoints").is_dir()
                          or not (path / "config.json").is_file()):
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint folder (generator_ema/ + training state) nor a "
                                    "trainer output directory with checkpoints/checkpoint-*/; pass one of those or an "
                                    "official generator .pkl.")
        return load_denoiser(ckpt / "generator_ema"), checkpoint_record(ckpt), f"checkpoint {ckpt}"
    generator = load_denoiser(src)
    license = declared_license(teacher or src) or (None, None, None)
    record = RunRecord(method=method or _guess_method(src), teacher=teacher, source=src, init_sigma=INIT_SIGMA,
                       teacher_license=license[0], teacher_license_name=license[1], teacher_license_link=license[2],
                       label_dim=generator.label_dim, resolution=generator.img_resolution,
                       channels=generator.img_channels, latent=generator.family == "edm2")
    return generator, RunRecord.from_dict(record.to_dict(), f"generator {src}"), f"generator {src}"


def read_id2label(path: str) -> dict:
    id2label = read_json(path, max_bytes=MAX_RECORD_BYTES)  # a regular file (not /dev/zero), bounded
    if not isinstance(id2label, dict) or not all(isinstance(v, str) for v in id2label.values()) or not all(
            re.fullmatch(r"\d{1,6}", str(k)) for k in id2label):
        raise ValueError(f"{path} must hold a JSON object {{class index: class name}}.")
    return {int(k): v for k, v in id2label.items()}


def build_parser() -> CommandParser:
    parser = CommandParser(prog="sida-export", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="checkpoint folder, trainer output dir, or official generator .pkl/URL/name")
    parser.add_argument("dst", help="output pipeline folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="then upload DST to this Hub repo (owner/name)")
    parser.add_argument("--hub-token", help="Hub token for --push-to-hub (default: the stored one, `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--dataset", help="dataset name or Hub id for the model card (overrides the run's)")
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
        token = check_push_access(args.push_to_hub, args.hub_token) if args.push_to_hub else None
        generator, record, what = load_source(args.src, args.method, args.teacher)
        if args.dataset:
            record.dataset = args.dataset
        if args.id2label:
            record = RunRecord.from_dict({**record.to_dict(), "id2label": read_id2label(args.id2label)}, args.id2label)
        vae = None
        if args.vae:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True).to(args.device).eval()  # no pickles
            record.vae = args.vae
        pipe = export_pipeline(generator.to(args.device), args.dst, record, vae=vae, grid=not args.no_grid,
                               repo_id=args.push_to_hub)
    except INPUT_ERRORS as error:
        parser.fail(error)
    print(f"exported {what} as {type(pipe).__name__} to {args.dst}:")
    for path in sorted(p for p in Path(args.dst).rglob("*") if p.is_file()):
        print(f"  {path.relative_to(args.dst)}  ({path.stat().st_size:,} bytes)")
    if args.push_to_hub:
        try:
            commit = push_to_hub(args.dst, args.push_to_hub, private=args.private, token=token)
        except Exception as error:  # network, token, repo: the export above stays on disk either way
            parser.fail(f"pushing to {args.push_to_hub} failed ({type(error).__name__}: {error}); "
                        f"{push_later_hint(args.dst, args.push_to_hub)}")
        print(f"pushed to https://huggingface.co/{args.push_to_hub} ({getattr(commit, 'commit_url', commit)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
