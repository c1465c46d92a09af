"""``laps-eval sims=...``: saved similarity matrices (ours, the official results file) evaluated without a
model, alone or averaged, and refused when they belong to another split."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from laps.compat.official_results import save_official_results
from laps.metrics import retrieval_metrics
from laps.training.saved_sims import evaluate_saved
from test_official_results import _Hostile, _npy_object

# two images, two captions each: captions 0, 1 of image "a", 2, 3 of image "b"
IDS = ["a", "a", "b", "b"]
CAP_TO_IMG = torch.tensor([0, 0, 1, 1])
# i2t: each image's best caption is its own (R@1 100); t2i: captions 0 and 3 find their image, 1 and 2 do not
KNOWN = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.3, 0.7, 0.6, 0.95]])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "f30k"
    folder.mkdir()
    (folder / "test_ids.txt").write_text("\n".join(IDS) + "\n")  # the id file only: no captions, no images
    return folder


def _ours(path: Path, sims: torch.Tensor, split: str = "test", image_ids: list[str] | None = None) -> Path:
    torch.save({"sims": sims, "cap_to_img": CAP_TO_IMG, "dataset": "f30k", "split": split,
                "image_ids": image_ids or ["a", "b"]}, path)
    return path


def test_one_matrix_gives_the_figures_computed_by_hand(root: Path, tmp_path: Path) -> None:
    metrics = evaluate_saved([_ours(tmp_path / "sims_test.pt", KNOWN)], root, "test", "f30k", "f30k")
    assert metrics["test/i2t_R@1"] == 100.0 and metrics["test/t2i_R@1"] == 50.0
    assert metrics["test/t2i_R@5"] == 100.0 and metrics["test/rsum"] == 550.0


def test_two_matrices_are_averaged_and_the_official_format_reads_the_same(root: Path, tmp_path: Path) -> None:
    other = torch.tensor([[0.1, 0.9, 0.0, 0.3], [0.8, 0.2, 0.9, 0.1]])
    first, second = _ours(tmp_path / "a.pt", KNOWN), _ours(tmp_path / "b.pt", other)
    mean = evaluate_saved([first, second], root, "test", "f30k", "f30k")
    expected = {f"test/{k}": v for k, v in retrieval_metrics((KNOWN + other) / 2, CAP_TO_IMG).items()}
    assert mean == pytest.approx(expected)
    assert mean != evaluate_saved([first], root, "test", "f30k", "f30k")  # the second one counts
    official = save_official_results(tmp_path / "results_f30k.npy", other.numpy())
    assert evaluate_saved([first, official], root, "test", "f30k", "f30k") == pytest.approx(mean)


@pytest.mark.parametrize(("make", "match"), [
    (lambda d: _ours(d / "s.pt", torch.rand(3, 4)), r"is \(3, 4\), but the f30k test split has 2 images and 4 captions"),
    (lambda d: _ours(d / "s.pt", KNOWN, split="dev"), "computed on f30k dev, not f30k test"),
    (lambda d: _ours(d / "s.pt", KNOWN, image_ids=["b", "a"]), "row 0 is image b, the split's image 0 is a"),
    (lambda d: save_official_results(d / "r.npy", np.zeros((4, 4), dtype=np.float32)),
     r"is \(4, 4\), but the f30k test split"),
])
def test_a_matrix_of_another_split_is_refused_naming_both(root: Path, tmp_path: Path, make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_saved([make(tmp_path)], root, "test", "f30k", "f30k")


def _laps_eval(tmp_path: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from laps.cli.eval import main; main()", "dataset=f30k", f"dataset.root={root}",
         f"hydra.run.dir={tmp_path / 'eval'}", *args],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )


def test_laps_eval_sims_writes_metrics_without_a_model(root: Path, tmp_path: Path) -> None:
    ours = _ours(tmp_path / "sims_test.pt", KNOWN)
    result = _laps_eval(tmp_path, root, f"sims=[{ours},{ours}]")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["test/i2t_R@1"] == 100.0 and written["test/t2i_R@1"] == 50.0


def test_laps_eval_refuses_a_hostile_results_file_and_runs_nothing(root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = tmp_path / "results_f30k.npy"
    hostile.write_bytes(_npy_object(pickle.dumps(np.array({"npts": 2, "sims": _Hostile(marker)}, dtype=object),
                                                 protocol=3)))
    result = _laps_eval(tmp_path, root, f"sims={hostile}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {hostile}: refused"), result.stderr[-3000:]
    assert not marker.exists()
