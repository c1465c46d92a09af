"""The official release's saved similarities, ``results_{dataset}.npy``, read without running pickle code.

The official ``eval.py --save_results`` writes ``np.save(path, {"npts": npts, "sims": sims})``: a
``.npy`` file of one object, a pickle. ``np.load(..., allow_pickle=True)`` would run whatever a
hostile file holds; :func:`load_official_results` unpickles with an allow-list that admits only
what such a file needs (numpy's array reconstruction, ``ndarray``, ``dtype``, numpy scalars, under
numpy 1.x's and numpy 2's module names) and refuses anything else before it is created.
:func:`save_official_results` writes the same format, so our runs can be ensembled with official
outputs.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

try:  # numpy 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

__all__ = ["UnsafeResultsError", "load_official_results", "save_official_results"]

_ALLOWED = {
    **{(module, "_reconstruct"): _multiarray._reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _multiarray.scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class UnsafeResultsError(ValueError):
    """A results file that needs more than the allow-list, or is not an official results file."""


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeResultsError(
                f"{self._path}: refused {module}.{name}: an official results file needs only numpy arrays "
                "(nothing in the file was run)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeResultsError(f"{self._path}: a persistent id in the pickle: not an official results file")


def load_official_results(path: str | os.PathLike) -> tuple[int, np.ndarray]:
    """``(npts, sims)`` of an official ``results_{dataset}.npy``: ``sims`` ``(images, captions)``."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"format version {version}, not 1.0 or 2.0 as np.save writes an object")
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as err:
            raise UnsafeResultsError(f"{path}: not a .npy file ({err})") from None
        if dtype != np.dtype(object) or shape != ():
            raise UnsafeResultsError(f"{path}: a .npy array of {dtype} {shape}, not the official results "
                                     "(one pickled dict of npts and sims)")
        try:
            payload = _AllowListUnpickler(f, path).load()
        except UnsafeResultsError:
            raise
        except Exception as err:  # noqa: BLE001 - any damage of the pickle stream
            raise UnsafeResultsError(f"{path}: damaged or truncated results file ({type(err).__name__})") from None
    results = payload.item() if isinstance(payload, np.ndarray) and payload.shape == () else payload
    if not isinstance(results, dict) or set(results) != {"npts", "sims"}:
        raise UnsafeResultsError(f"{path}: holds {type(results).__name__}, not a dict of npts and sims")
    sims = np.asarray(results["sims"])
    if sims.ndim != 2 or not np.issubdtype(sims.dtype, np.floating):
        raise UnsafeResultsError(f"{path}: sims is {sims.dtype} of shape {sims.shape}, not a 2-D float matrix")
    return int(results["npts"]), sims


def save_official_results(path: str | os.PathLike, sims: np.ndarray, npts: int | None = None) -> Path:
    """Write ``sims`` ``(images, captions)`` as the official ``results_{dataset}.npy`` (``npts``: the images)."""
    path = Path(path)
    np.save(path, {"npts": int(sims.shape[0] if npts is None else npts), "sims": np.asarray(sims)},
            allow_pickle=True)
    return path
