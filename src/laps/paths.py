"""Where the package finds its Hydra configs, and the mode new files get."""

from __future__ import annotations

import os
from pathlib import Path


def config_dir() -> str:
    """The configs folder: ``laps/configs`` in an installed wheel, else the repository's ``configs/``."""
    here = Path(__file__).resolve()
    for candidate in (here.parent / "configs", here.parents[2] / "configs"):
        if candidate.is_dir():
            return str(candidate)
    raise FileNotFoundError(f"no configs folder next to {here.parent} or in the repository root")


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (``mkstemp`` gives ``0600``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
