"""Console scripts: sida-convert, sida-export, sida-sample, sida-eval, sida-ref-stats (entry points in setup.cfg).

Every long flag of these commands is accepted in both spellings, `--batch-size` and `--batch_size`: Diffusers'
training scripts use underscores, most command-line tools hyphens, and neither habit should cost a failed run.
"""

from __future__ import annotations

import argparse
import copy

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
    """`argparse.ArgumentParser` whose long flags also answer to their hyphen/underscore twin."""

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
