"""Paths others hand us: inputs that must be regular files, folders whose files must stay inside them, and outputs
that must be writable before any work starts.

* `open_regular` opens a file only if it is a regular file: `/dev/zero`, `/dev/urandom`, a FIFO or a socket given as
  data, labels or a reference would otherwise be read without end (a FIFO is opened without blocking).
* `inside_folder` refuses a file of a loaded folder (a pipeline's README.md, run_info.json, samples_grid.png,
  configs, weights; a checkpoint's state) that is a symbolic link to something outside the folder: a folder from
  elsewhere could otherwise make us read, and then re-publish, any file of the user's.
* `output_problem` says why an output path cannot be written (an existing file where a folder goes, a name longer
  than the file system takes, no permission, a read-only file system), so that a command stops before the work
  rather than after it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Optional, Union


PathLike = Union[str, os.PathLike]
NAME_MAX = 255  # bytes of one path component on every common file system


def check_regular_file(path: PathLike, what: str = "") -> os.stat_result:
    """The stat of `path` (links followed); ValueError if it is a device, pipe, socket or folder."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "a pipe" if stat.S_ISFIFO(st.st_mode) else "not a regular file")
        raise ValueError(f"{what + ' ' if what else ''}{path} is {kind}, not a regular file; pass a file.")
    return st


def open_regular(path: PathLike, what: str = "") -> BinaryIO:
    """`path` opened for binary reading, refused unless it is a regular file (checked before and after opening)."""
    check_regular_file(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)  # non-blocking: a FIFO swapped in after the check cannot hang the open
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{what + ' ' if what else ''}{path} is not a regular file; pass a file.")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def inside_folder(path: PathLike, root: PathLike) -> Path:
    """`path` if it (with every link followed) lies inside `root`; ValueError naming the link otherwise."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != base and base not in real.parents:
        raise ValueError(f"{path} is a link to {real}, outside {root}; a loaded folder may only link to files inside "
                         "itself (copy the file into the folder instead of linking it).")
    return Path(path)


def folder_root(folder: PathLike) -> Path:
    """The folder that links inside `folder` may point into: `folder` itself, or for a snapshot of the Hugging Face
    cache (``models--owner--name/snapshots/REVISION``) the repository's cache folder, whose ``blobs/`` its files link
    to."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        return folder.parent.parent
    return folder


def check_folder_files(folder: PathLike, names, root: Optional[PathLike] = None) -> None:
    """Every existing `folder/name` lies inside `root` (default `folder_root(folder)`) and is a regular file."""
    folder = Path(folder)
    root = folder_root(folder) if root is None else root
    for name in names:
        path = folder / name
        if path.is_symlink() or path.exists():
            inside_folder(path, root)
            check_regular_file(path)


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())


def _can_create_in(folder: Path) -> Optional[str]:
    """None if a file can be created in `folder` (probed with a temporary file that is removed at once)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return error.strerror or type(error).__name__


def output_problem(path: PathLike, folder: bool) -> Optional[str]:
    """Why `path` cannot be written as a folder (`folder=True`) or a file, as the rest of a sentence that starts with
    the path ("is an existing folder; ...", "cannot be written: ..."), or None when it can.

    Checked: name lengths, an existing file where a folder must go (or the reverse), and, by creating and removing a
    temporary file, that the nearest existing folder really takes new files (permissions, read-only mounts, /proc).
    """
    path = Path(path)
    verb = "cannot be a folder" if folder else "cannot be written"
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            return (f"{verb}: its name {part[:40]}... is {len(os.fsencode(part))} bytes, more than the {NAME_MAX} a "
                    "file name may have")
    full = path.absolute()
    existing = _nearest_existing(full)
    if existing == full and not folder:
        if existing.is_dir():
            return "is an existing folder; pass a file name"
        if not existing.is_file():
            return f"{verb}: it is not a regular file"
        try:
            os.close(os.open(existing, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0)))
        except OSError as error:
            return f"{verb}: {error.strerror}"
        return None
    if not existing.is_dir():
        shown = path if existing == full else existing
        return f"{verb}: {shown} is {'an existing file' if folder else 'a file, not a folder'}"
    problem = _can_create_in(existing)
    return None if problem is None else f"{verb}: nothing can be created in {existing} ({problem})"


def check_output(path: PathLike, folder: bool, option: str) -> None:
    """ValueError naming `option` when `output_problem` finds one."""
    problem = output_problem(path, folder)
    if problem:
        raise ValueError(f"{option} {path} {problem}.")
