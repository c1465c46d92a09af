"""Where the package finds its Hydra configs."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """The configs folder: ``laps/configs`` in an installed wheel, else the repository's ``configs/``."""
    here = Path(__file__).resolve()
    for candidate in (here.parent / "configs", here.parents[2] / "configs"):
        if candidate.is_dir():
            return str(candidate)
    raise FileNotFoundError(f"no configs folder next to {here.parent} or in the repository root")
