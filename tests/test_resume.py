"""Interrupted runs lose nothing: a ``laps-train`` killed with SIGKILL mid-epoch and resumed with
``ckpt_path=last`` ends exactly where an uninterrupted run ends; ``last.ckpt`` is written atomically and
loads under the weights-only allow-list."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from laps.compat.serialization import safe_load
from laps.training.checkpointing import (
    AtomicCheckpointIO,
    atomic_torch_save,
    capture_rng_state,
    restore_rng_state,
)

STEPS_PER_EPOCH = 6
EVERY = 2
SYNTHETIC = {"seed": 0, "n_train": 96, "n_dev": 12, "n_test": 12, "image_size": 64}
RUN = [
    *(f"dataset.synthetic.{k}={v}" for k, v in SYNTHETIC.items()),
    "dataset.batch_size=8", "dataset.eval_batch_size=16",
    "trainer.max_epochs=2", f"+trainer.limit_train_batches={STEPS_PER_EPOCH}",
    f"callbacks.last_checkpoint.every_n_train_steps={EVERY}",
    "trainer.deterministic=true", "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0",
    "model.vse_mean_warmup_epochs=1",  # hardest negatives from epoch 1: the switch must survive the restart
    "logger=csv", "seed=7",
]


def _env() -> dict[str, str]:
    # One thread per run: the two runs can go side by side, and reductions keep one order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _cmd(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    code = "from laps.cli.train import main; main()"
    return [sys.executable, "-c", code, *RUN, f"paths.root_dir={run_dir.parent}", f"paths.data_dir={data_dir}",
            f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from laps.data.synthetic import SyntheticParams, ensure_synthetic

    root = tmp_path_factory.mktemp("resume_data")
    ensure_synthetic(root / "synthetic", SyntheticParams(**SYNTHETIC))
    return root


def _kill_when(proc: subprocess.Popen, ckpt: Path, min_step: int, timeout: float = 240.0) -> int:
    """SIGKILL ``proc`` as soon as ``ckpt`` holds ``global_step >= min_step``; returns that step."""
    seen: int | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc={proc.returncode}) before step {min_step} was saved")
        try:
            inode = ckpt.stat().st_ino
        except FileNotFoundError:
            inode = None
        if inode is not None and inode != seen:
            seen = inode
            step = int(safe_load(ckpt)["global_step"])  # a complete file whenever it is there
            if step >= min_step:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return step
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no checkpoint of step >= {min_step} within {timeout}s")


def _train_rows(run_dir: Path) -> dict[int, dict[str, str]]:
    """Per-step training rows of the CSV log (the last one written for each step)."""
    rows: dict[int, dict[str, str]] = {}
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                rows[int(row["step"])] = row
    return rows


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)], ids=["workers0", "workers2"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path, data_dir: Path, workers: int) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    loader = f"dataset.num_workers={workers}"
    # Both runs side by side (one thread each): the uninterrupted one and the one to be killed.
    ref = subprocess.Popen(_cmd(full, data_dir, loader), env=_env(), cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Kill in epoch 1 (after a validation and a best checkpoint), a few steps before its end. The
    # poller can miss the two mid-epoch saves on a loaded machine (the kill then lands on the epoch's
    # end): the killed run is started again, up to three times.
    for _attempt in range(3):
        shutil.rmtree(cut, ignore_errors=True)
        victim = subprocess.Popen(_cmd(cut, data_dir, loader), env=_env(), cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed_at = _kill_when(victim, cut / "checkpoints" / "last.ckpt", min_step=STEPS_PER_EPOCH + EVERY)
        assert victim.returncode == -signal.SIGKILL
        assert not (cut / "metrics.json").exists()
        saved = safe_load(cut / "checkpoints" / "last.ckpt")
        step = int(saved["global_step"])
        if step % STEPS_PER_EPOCH != 0:
            break
    assert step >= killed_at and step % STEPS_PER_EPOCH != 0, "the kill must land mid-epoch"
    assert saved["epoch"] == 1
    # What a resume needs is in the file: optimizer, scheduler, loop position, the loader's position, RNG.
    assert saved["optimizer_states"][0]["state"] and saved["lr_schedulers"]
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert set(saved["laps_rng"]) >= {"torch", "python", "numpy"}

    resumed = subprocess.run(_cmd(cut, data_dir, loader, "ckpt_path=last"), env=_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]

    want = json.loads((full / "metrics.json").read_text())
    got = json.loads((cut / "metrics.json").read_text())
    assert set(got) == set(want) and "test/rsum" in got and "val/rsum" in got
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key

    # Stronger than the metrics: the final weights and every per-step loss after the restart agree.
    a = safe_load(full / "checkpoints" / "last.ckpt")
    b = safe_load(cut / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
    rows_a, rows_b = _train_rows(full), _train_rows(cut)
    after = [s for s in rows_a if s >= step]
    assert after, rows_a.keys()
    for s in after:
        assert float(rows_b[s]["train/loss"]) == pytest.approx(float(rows_a[s]["train/loss"]), abs=1e-6), s
        # the hardest-negative switch comes from the epoch: on after the restart as without it
        assert rows_b[s]["train/max_violation"] == rows_a[s]["train/max_violation"] == "1.0"


def test_last_ckpt_is_replaced_atomically_under_sigkill(tmp_path: Path) -> None:
    """A writer killed in the middle of a save leaves the previous complete file."""
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"version": 1, "w": torch.arange(10)}, target)
    code = (
        "import torch, sys\n"
        "from laps.training.checkpointing import atomic_torch_save\n"
        "big = torch.zeros(16 * 2**20, dtype=torch.uint8)\n"
        "while True:\n"
        "    atomic_torch_save({'version': 2, 'w': big}, sys.argv[1])\n"
    )
    for _attempt in range(5):  # the kill must land inside a save: its temporary file is left behind
        proc = subprocess.Popen([sys.executable, "-c", code, str(target)], env=_env())
        try:
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob(".last.ckpt.*.tmp")):  # a save is under way
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        if list(tmp_path.glob(".last.ckpt.*.tmp")):
            break
    assert list(tmp_path.glob(".last.ckpt.*.tmp")), "no kill landed inside a save in 5 attempts"
    loaded = safe_load(target)  # old (version 1) or new (version 2), complete either way
    assert loaded["version"] in (1, 2)
    # The next save clears what the killed one left.
    AtomicCheckpointIO().save_checkpoint({"version": 3}, target)
    assert safe_load(target) == {"version": 3}
    assert not list(tmp_path.glob(".last.ckpt.*.tmp"))
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_rng_state_round_trip_is_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.save({"rng": state}, tmp_path / "s.pt")
    torch.rand(5), random.random(), np.random.rand()  # move every stream on
    restore_rng_state(safe_load(tmp_path / "s.pt")["rng"])  # no extra globals needed
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1] == expected[1] and again[2] == expected[2]
