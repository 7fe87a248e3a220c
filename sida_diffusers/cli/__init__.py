"""Console scripts: sida-convert, sida-export, sida-sample, sida-eval, sida-ref-stats (entry points in setup.cfg).

Every script answers bad input the same way: one line on stderr, ``PROG: error: what is wrong``, and exit code 2,
never a traceback and never a report of success that did not happen.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# What bad input raises in our code (ValueError, FileNotFoundError and other OSErrors, TypeError for wrong kinds).
INPUT_ERRORS = (ValueError, OSError, TypeError)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors, its own and `fail`'s, are one line and exit code 2."""

    def error(self, message):
        self.fail(f"{message} (see {self.prog} --help)")

    def fail(self, message) -> None:
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")

    def check_writable_file(self, option: str, path) -> None:
        """`path` will be written as a file: it must not be a folder, nor lie in something that is not a folder."""
        path = Path(path)
        if path.is_dir():
            self.fail(f"{option} {path} is an existing folder; pass a file name.")
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            self.fail(f"{option} {path} cannot be written: {parent} is a file, not a folder.")

    def check_writable_folder(self, option: str, path) -> None:
        """`path` will be created or filled as a folder: it must not be an existing file or lie inside one."""
        path = Path(path)
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            self.fail(f"{option} {path} cannot be a folder: {blocker} is an existing file.")
