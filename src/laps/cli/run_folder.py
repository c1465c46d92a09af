"""A Hydra callback that refuses, in one line and before Hydra writes there, a run folder that cannot
be written or that another live run holds (:mod:`laps.training.runlock`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from laps.training.runlock import RunFolderLockedError, acquire_run_lock, is_first_process, release_run_lock


def unwritable(folder: str | os.PathLike) -> Path | None:
    """The folder that keeps ``folder`` from being created or written (itself or its nearest existing
    parent, when that is read-only or not a folder), or ``None``."""
    path = Path(folder).absolute()
    while not path.exists():
        if path.parent == path:
            return None
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        return path
    return None


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class RunFolderCheck(Callback):
    """``hydra.run.dir`` / ``hydra.sweep.dir`` must be writable: else ``error: ...`` and exit 2, before
    Hydra's own ``OSError`` traceback (a read-only mount, a file in the way). A single run also takes
    the run folder's lock here, before Hydra writes its ``.hydra`` files, and gives it back at the end
    (the task holds it meanwhile); a run folder in use by another live run is refused."""

    def __init__(self) -> None:
        self._lock: Path | None = None

    def _check(self, folder: Any, key: str) -> None:
        blocked = unwritable(str(folder))
        if blocked is not None:
            what = ("not a folder" if not blocked.is_dir()
                    else "not writable (a read-only file system or no permission)")
            _refuse(f"{key}={folder}: {blocked} is {what}; choose another {key}")

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")
        if is_first_process():  # the other ranks share rank zero's folder
            try:
                self._lock = acquire_run_lock(str(config.hydra.run.dir))
            except RunFolderLockedError as err:
                _refuse(str(err))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._lock is not None:
            release_run_lock(self._lock)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
