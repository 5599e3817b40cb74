"""Check an output path before slow work starts, and write output files, with one sentence when it cannot be.

`check_writable_file` and `check_writable_dir` raise a `UserError` for a path that is the wrong kind (a
directory where a file goes, a file where a directory goes), lies under a file, or sits in a folder memft
may not write. A path that does not exist yet is fine when its nearest existing folder is writable: the
writers create the missing folders. Permissions are read with `os.access`, so for root (who may write
anywhere) only the kind of path is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

from memft.errors import UserError


def check_writable_file(path: Path, what: str) -> None:
    """A `UserError` unless `path` is a file memft may (over)write, or one it can create.

    Args:
        path: where the file goes.
        what: how the message names it, e.g. "`--json`".
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file; name a file to write, e.g. {path / 'out.json'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UserError(f"{what} {path} is not writable (permission denied); choose another path")
        return
    _check_creatable(path, what)


def check_writable_dir(path: Path, what: str) -> None:
    """A `UserError` unless `path` is a directory memft may write in, or one it can create."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory; choose a new directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{what} {path} is not writable (permission denied); choose another directory")
        return
    _check_creatable(path, what)


def write_text(path: Path, text: str, what: str) -> None:
    """Write `text` to `path` (creating its folders); an `OSError` (disk full, permissions) is a `UserError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise UserError(f"could not write {what} {path}: {exc.strerror or exc}; choose another path") from None


def _check_creatable(path: Path, what: str) -> None:
    """`path` does not exist: its nearest existing ancestor must be a folder memft may write in."""
    nearest = path.parent
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise UserError(f"{what} {path} cannot be created: {nearest} is a file; choose another path")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable (permission denied on {nearest}); choose another path")
