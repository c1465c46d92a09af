"""A Hydra callback that refuses a run folder that cannot be written, in one line, before Hydra writes there."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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


class RunFolderCheck(Callback):
    """``hydra.run.dir`` / ``hydra.sweep.dir`` must be writable: else ``error: ...`` and exit 2, before
    Hydra's own ``OSError`` traceback (a read-only mount, a file in the way)."""

    def _check(self, folder: Any, key: str) -> None:
        blocked = unwritable(str(folder))
        if blocked is not None:
            what = ("not a folder" if not blocked.is_dir()
                    else "not writable (a read-only file system or no permission)")
            print(f"error: {key}={folder}: {blocked} is {what}; choose another {key}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
