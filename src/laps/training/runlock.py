"""One run per run folder: a lock file with the holder's pid and host.

``laps-train`` holds ``<run folder>/.laps-run.lock`` while it trains and tests. A second run on the
same folder (the same ``hydra.run.dir``) is refused with :class:`RunFolderLockedError` naming the
holder, before it reads or deletes anything there: ``laps.cli.run_folder.RunFolderCheck`` takes the
lock before Hydra writes its ``.hydra`` files, and the task keeps it. A lock whose holder is gone (the same host, no
such process: a run that was killed) is stale and taken over, with a warning; so is one held on
another host by an earlier incarnation of the same requeued SLURM job. Any other lock held from
another host cannot be checked from here: it is honoured, and the message says which file to delete
once that run is known to be over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from laps.paths import new_file_mode

log = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RunFolderLockedError", "acquire_run_lock", "holder_alive", "is_first_process",
           "release_run_lock", "run_folder_lock"]

LOCK_NAME = ".laps-run.lock"
# A lock file younger than this with no holder written yet is being created: not stale.
_WRITING_GRACE_S = 10.0


class RunFolderLockedError(OSError):
    """Another live run holds the run folder."""


def _slurm_incarnation() -> str | None:
    """``<job id>.<restart count>`` under SLURM: a requeued job keeps its id, its restart count grows."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


def _me() -> dict[str, Any]:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if _slurm_incarnation():
        me["slurm"] = _slurm_incarnation()
    return me


def holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the process named by a lock's ``holder`` may still run: checked on this host; on another,
    assumed, except for an earlier incarnation of this requeued SLURM job (SLURM requeues a job only
    once it has ended)."""
    if holder.get("host") != socket.gethostname():
        mine, theirs = _slurm_incarnation(), holder.get("slurm")
        earlier_incarnation = bool(mine and theirs and mine.split(".")[0] == theirs.split(".")[0] and mine != theirs)
        return not earlier_incarnation
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's holder, or ``None`` when the file is empty or not a lock (a crash while writing it)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def _create(path: Path) -> bool:
    """Create the lock file holding this process; ``False`` when one exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, new_file_mode())
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(_me(), f)
    return True


def _refusal(path: Path, holder: dict[str, Any] | None) -> RunFolderLockedError:
    who = "another run" if holder is None else (
        f"pid {holder['pid']} on {holder.get('host', '?')} (since {holder.get('started', '?')})")
    return RunFolderLockedError(
        f"the run folder {path.parent} is in use by {who}: wait for it, choose another hydra.run.dir, "
        f"or delete {path} if that run is over",
    )


def is_first_process() -> bool:
    """Whether this is the process that started the run (rank zero of its launcher, or no launcher):
    the other ranks share its run folder and its lock."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def acquire_run_lock(folder: str | os.PathLike) -> Path:
    """Take ``folder``'s lock (kept if this process holds it already); :class:`RunFolderLockedError`
    when a live run holds it. Release it with :func:`release_run_lock`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    for _ in range(3):
        if _create(path):
            return path
        holder = _read(path)
        if holder is not None and _is_me(holder):
            return path
        if holder is None:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime < _WRITING_GRACE_S:
                    raise _refusal(path, None)
        elif holder_alive(holder):
            raise _refusal(path, holder)
        log.warning("taking over the stale lock %s (%s)", path,
                    "unreadable" if holder is None else f"pid {holder['pid']} on {holder.get('host')} is gone")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    raise _refusal(path, _read(path))


def _is_me(holder: dict[str, Any]) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def release_run_lock(path: str | os.PathLike) -> None:
    """Remove the lock file ``path`` if it is still this process's."""
    path = Path(path)
    holder = _read(path)
    if holder is not None and _is_me(holder):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike, enabled: bool = True) -> Iterator[Path | None]:
    """Hold ``folder``'s run lock for the block (``enabled=False``: do nothing, e.g. on ranks other than
    zero, which share rank zero's folder). Raises :class:`RunFolderLockedError` when a live run holds it."""
    if not enabled:
        yield None
        return
    path = acquire_run_lock(folder)
    try:
        yield path
    finally:
        release_run_lock(path)
