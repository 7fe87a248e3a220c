"""Console scripts: sida-convert, sida-export, sida-sample, sida-eval, sida-ref-stats (entry points in setup.cfg).

Every script answers bad input the same way: one line on stderr, ``PROG: error: what is wrong``, and exit code 2,
never a traceback and never a report of success that did not happen. Every long flag is accepted in both spellings,
`--batch-size` and `--batch_size`: Diffusers' training scripts use underscores, most command-line tools hyphens, and
neither habit should cost a failed run.
"""

from __future__ import annotations

import argparse
import copy

from sida_diffusers.safe_io.paths import output_problem


# What bad input raises in our code (ValueError, FileNotFoundError and other OSErrors, TypeError for wrong kinds).
INPUT_ERRORS = (ValueError, OSError, TypeError)
SPELLING_NOTE = "Every --flag-name is also accepted as --flag_name (and the reverse)."


def _other_spelling(option: str) -> str:
    body = option[2:]
    return "--" + (body.replace("-", "_") if "-" in body else body.replace("_", "-"))


class _OneSpellingHelpFormatter(argparse.HelpFormatter):
    """Lists each flag under the spelling it was declared with; the epilog says the other one works too."""

    def _format_action_invocation(self, action):
        hidden = getattr(action, "other_spellings", ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose long flags also answer to their hyphen/underscore twin, and whose errors, its own and
    `fail`'s, are one line and exit code 2."""

    def __init__(self, *args, epilog: str | None = None, **kwargs):
        epilog = f"{epilog} {SPELLING_NOTE}" if epilog else SPELLING_NOTE
        super().__init__(*args, epilog=epilog, formatter_class=_OneSpellingHelpFormatter, **kwargs)

    def add_argument(self, *names, **kwargs):
        if not names or not names[0].startswith("--"):
            return super().add_argument(*names, **kwargs)
        twins = [_other_spelling(name) for name in names if name.startswith("--")]
        added = [twin for twin in dict.fromkeys(twins) if twin not in names]
        # The first name stays first, so argparse derives the same `dest` as before.
        action = super().add_argument(*names, *added, **kwargs)
        action.other_spellings = tuple(added)
        return action

    def _get_option_tuples(self, option_string):
        # An abbreviation such as --batch matches both spellings of one flag: that is one flag, not an ambiguity.
        unique = {}
        for option_tuple in super()._get_option_tuples(option_string):
            unique.setdefault(option_tuple[0], option_tuple)
        return list(unique.values())

    def error(self, message):
        self.fail(f"{message} (see {self.prog} --help)")

    def fail(self, message) -> None:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")

    def check_writable_file(self, option: str, path) -> None:
        """`path` will be written as a file: not a folder, not inside a file, a name the file system takes, in a
        folder that really takes new files (`safe_io.paths.output_problem`); checked before the work, not after."""
        problem = output_problem(path, folder=False)
        if problem:
            self.fail(f"{option} {path} {problem}.")

    def check_writable_folder(self, option: str, path) -> None:
        """`path` will be created or filled as a folder: not an existing file or inside one, and writable."""
        problem = output_problem(path, folder=True)
        if problem:
            self.fail(f"{option} {path} {problem}.")

    def check_device(self, option: str, name: str) -> None:
        """`name` is a torch device this machine has (`cpu`, `cuda`, `cuda:1`, `mps`)."""
        import torch

        try:
            device = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            self.fail(f"{option} {name!r} is not a device; pass cpu, cuda, cuda:N or mps.")
        available = {"cpu": 1, "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                     "mps": int(torch.backends.mps.is_available())}
        count = available.get(device.type, 0)
        if count == 0 or (device.index or 0) >= count:
            have = ", ".join(kind if n == 1 else f"{kind}:0..{n - 1}" for kind, n in available.items() if n)
            self.fail(f"{option} {name}: this machine has no such device (it has {have}); pass one of those.")

    def check_range(self, option: str, value, low: int, high: int) -> None:
        """An integer option within [low, high] (None passes: the option was not given)."""
        if value is not None and not low <= value <= high:
            self.fail(f"{option} must be from {low:,} to {high:,}, got {value:,}.")
