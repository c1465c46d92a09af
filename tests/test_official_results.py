"""The official results file (``np.save`` of ``{"npts", "sims"}``, a pickle) is read through an
allow-list: numpy 1.x and numpy 2 files load, a hostile file is refused and runs nothing."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from laps.compat.official_results import UnsafeResultsError, load_official_results, save_official_results


def _npy_object(payload: bytes) -> bytes:
    """A .npy file of one object whose pickle is ``payload``, as ``np.save`` writes it."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|O", "fortran_order": False, "shape": ()})
    return out.getvalue() + payload


def _sims(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((5, 25), dtype=np.float32)


def test_official_format_round_trips(tmp_path: Path) -> None:
    sims = _sims()
    np.save(tmp_path / "results_coco.npy", {"npts": 5, "sims": sims})  # as the official eval.py writes it
    npts, loaded = load_official_results(tmp_path / "results_coco.npy")
    assert npts == 5 and loaded.dtype == np.float32 and np.array_equal(loaded, sims)
    ours = save_official_results(tmp_path / "ours.npy", sims.astype(np.float64))
    assert np.array_equal(load_official_results(ours)[1], sims.astype(np.float64))
    assert np.load(ours, allow_pickle=True).item()["npts"] == 5  # readable by the official code too


def test_a_numpy_1_file_loads(tmp_path: Path) -> None:
    """numpy 1.x names ``numpy.core.multiarray._reconstruct`` (numpy 2: ``numpy._core``): written by hand."""
    sims = _sims(1)
    modern = pickle.dumps(np.array({"npts": 5, "sims": sims}, dtype=object), protocol=3)
    legacy = modern.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")  # protocol 3: GLOBAL
    assert legacy != modern and b"numpy._core" not in legacy
    (tmp_path / "old.npy").write_bytes(_npy_object(legacy))
    assert np.array_equal(load_official_results(tmp_path / "old.npy")[1], sims)


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_file_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "results_f30k.npy"
    path.write_bytes(_npy_object(pickle.dumps(np.array({"npts": 5, "sims": _Hostile(marker)}, dtype=object),
                                              protocol=3)))
    with pytest.raises(UnsafeResultsError, match=r"refused (posix|os|nt)\.system"):
        load_official_results(path)
    assert not marker.exists()


@pytest.mark.parametrize(("write", "match"), [
    (lambda p: np.save(p, np.zeros((5, 25), dtype=np.float32)), "not the official results"),
    (lambda p: np.save(p, {"sims": np.zeros((5, 25))}), "not a dict of npts and sims"),
    (lambda p: np.save(p, {"npts": 5, "sims": np.zeros(25)}), "not a 2-D float matrix"),
    (lambda p: p.write_text("npts: 5\n"), "not a .npy file"),
    (lambda p: p.write_bytes(_npy_object(pickle.dumps(np.array({"npts": 5, "sims": _sims()}, dtype=object),
                                                      protocol=3)[:200])), "damaged or truncated"),
])
def test_wrong_files_are_refused_naming_the_file(tmp_path: Path, write, match: str) -> None:
    path = tmp_path / "results.npy"
    write(path)
    with pytest.raises(UnsafeResultsError, match=match) as info:
        load_official_results(path)
    assert str(info.value).startswith(str(path))
