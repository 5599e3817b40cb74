"""One training run per output directory.

`memft train` creates `run_dir/.memft.lock` before it touches anything else in the directory, and
removes it when the run ends (finished, failed or interrupted). The file is created with
`O_CREAT | O_EXCL`, so of two runs started together exactly one gets it, and it holds
`{"pid", "host", "started"}` so the refusal can say who is training there.

A lock whose process is gone (same host, no such PID) is stale: a run killed with SIGKILL or a
power cut leaves one, and the next run takes it over with a note. A lock written on another host
cannot be checked from here, so it is refused with how to remove it. Readers (`--dry-run`,
`memft eval`, `memft export`) never take the lock.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
import uuid
from pathlib import Path

from memft.errors import UserError

LOCK_FILE = ".memft.lock"
# An unreadable lock younger than this may be one another run is writing right now.
_BEING_WRITTEN_S = 5.0


class RunLock:
    """The lock this process holds on a run directory; `release()` removes it (idempotent)."""

    def __init__(self, path: Path, token: str):
        self.path = path
        self.token = token  # our own mark in the file: release never removes a lock another run took over

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError, AttributeError):
            pass  # already gone (released, or its directory deleted): nothing to do


def acquire(run_dir: Path, notes: list[str]) -> RunLock:
    """Take the lock on `run_dir` (which must exist), taking over a stale one with a note in `notes`.

    Raises:
        UserError: a live run holds the lock, or one on another host whose state cannot be checked.
    """
    path = Path(run_dir) / LOCK_FILE
    token = uuid.uuid4().hex
    content = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "token": token}
    for _ in range(3):  # a takeover can race with another run's; a few tries settle it
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path, notes)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        held = RunLock(path, token)
        atexit.register(held.release)  # a backup: the trainer releases it when `train()` ends
        return held
    raise UserError(f"could not lock {path}: other memft runs keep taking it; start one run at a time")


def holder(run_dir: Path) -> str | None:
    """Who holds a live (or unverifiable) lock on `run_dir`, in words, or None; reads only (for `--dry-run`)."""
    path = Path(run_dir) / LOCK_FILE
    info = _read(path)
    if info is None:
        return None if not path.exists() or _age_s(path) > _BEING_WRITTEN_S else f"a memft run starting ({path})"
    if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
        return None
    return f"a run (pid {info.get('pid')} on {info.get('host')}, lock file {path})"


def _take_over_if_stale(path: Path, notes: list[str]) -> None:
    """Remove the lock at `path` if its run is gone; otherwise refuse with who holds it."""
    info = _read(path)
    if info is None:
        if path.exists() and _age_s(path) <= _BEING_WRITTEN_S:
            raise UserError(f"another memft run is starting in {path.parent} right now (lock file {path}); "
                            "run one at a time, or choose another `output.dir`")
        notes.append(f"took over the unreadable lock file {path}")
    else:
        pid, host = info.get("pid"), info.get("host")
        if host != socket.gethostname():
            raise UserError(f"{path.parent} is locked by a run on host {host} (pid {pid}, started "
                            f"{info.get('started')}), which cannot be checked from here; if that run is no longer "
                            f"running, delete {path}, or choose another `output.dir`")
        if _alive(pid):
            raise UserError(f"{path.parent} is in use by another memft run (pid {pid} on {host}, started "
                            f"{info.get('started')}; lock file {path}); wait for it to finish, or choose another "
                            "`output.dir`")
        notes.append(f"took over the stale lock of pid {pid} (no longer running) in {path}")
    path.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")
