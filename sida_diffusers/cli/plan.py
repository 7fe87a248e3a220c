"""`sida-plan [TRAIN FLAGS]` (also `train_sida ... --plan`): the memory plan of a training launch, before anything is
allocated (ALGORITHM.md §13.4).

Takes every flag of `train_sida` (preset, teacher, precision, batch, `--gradient_checkpointing`) and prints, per
process: the weights of the generator and the fake score, their gradients and Adam states, the EMA, the teacher,
DDP's buckets or FSDP's gathered blocks, and the activations of the generator phase, under DDP and under FSDP for
each `--processes` count, then the largest per-process batch that fits each `--gpu_memory_gb` size. The networks
are built as fake tensors: a 1.5 B-parameter teacher is planned on a laptop, and nothing is downloaded.
"""

from __future__ import annotations

import time

from sida_diffusers.cli import INPUT_ERRORS, CommandParser


def build_parser() -> CommandParser:
    from sida_diffusers.training.memory_plan import MEMORY_SIZES_GB

    parser = CommandParser(prog="sida-plan", description=__doc__.split("\n\n")[0],
                           epilog="Every other flag is a train_sida flag (see train_sida --help).")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="process counts to plan for (default 1 2 4 8)")
    parser.add_argument("--gpu_memory_gb", type=float, nargs="+", default=list(MEMORY_SIZES_GB),
                        help="memory sizes per GPU for the largest-batch rows (default 24 48 80 141)")
    return parser


def main(argv=None) -> str:
    """Print the plan; bad input exits with code 2 and one line on stderr."""
    from sida_diffusers.training import parse_args
    from sida_diffusers.training.memory_plan import format_plan, make_plan, teacher_factory

    parser = build_parser()
    own, train_flags = parser.parse_known_args(argv)
    start = time.perf_counter()
    try:
        if any(n < 1 for n in own.processes) or any(not gb > 0 for gb in own.gpu_memory_gb):
            raise ValueError("--processes must be >= 1 and --gpu_memory_gb > 0.")
        cfg = parse_args(train_flags)
        if cfg.teacher is None:
            raise ValueError("no teacher: pass --preset NAME or --teacher (a preset teacher or a Diffusers folder).")
        text = format_plan(cfg, make_plan(cfg, teacher_factory(cfg.teacher)), own.processes, own.gpu_memory_gb)
    except INPUT_ERRORS as error:
        parser.fail(error)
    text += f"\n(planned in {time.perf_counter() - start:.1f} s; nothing was allocated)"
    print(text)
    return text


if __name__ == "__main__":
    main()
