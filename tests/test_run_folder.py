"""The run folder: read-only or blocked, full, or in use by another run: one ``error:`` line (exit 2),
nothing on disk changed. The read-only and full cases mount a file system (skipped without the right)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from laps.training.checkpointing import atomic_torch_save
from laps.training.runlock import LOCK_NAME, RunFolderLockedError, run_folder_lock
from test_reliability import QUICK, SYNTHETIC, clean_set  # noqa: F401 - clean_set is a fixture


def _mount(args: list[str]) -> bool:
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def _mounted(target: Path, args: list[str], remount_ro: bool = False) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    if not _mount([*args, str(target)]):
        pytest.skip("mounting a file system needs privileges this machine does not give")
    try:
        if remount_ro and not _mount(["-o", "remount,bind,ro", str(target)]):
            pytest.skip("a read-only bind mount needs privileges this machine does not give")
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True, check=False)


def _train(tmp_path: Path, data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from laps.cli.train import main; main()",
         *[f"dataset.synthetic.{k}={v}" for k, v in SYNTHETIC.items()], f"paths.root_dir={tmp_path}",
         f"paths.data_dir={data.parent}", f"hydra.run.dir={run_dir}", *QUICK, *extra],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- read-only
def test_a_file_in_place_of_the_run_folder_is_one_line(tmp_path: Path, clean_set: Path) -> None:  # noqa: F811
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    line = _one_error_line(_train(tmp_path, clean_set, blocker / "run"))
    assert f"{blocker} is not a folder" in line and "hydra.run.dir" in line
    assert blocker.read_text() == "not a folder"


def test_a_read_only_run_folder_is_one_line(tmp_path: Path, clean_set: Path) -> None:  # noqa: F811
    source = tmp_path / "source"
    source.mkdir()
    (source / "kept.txt").write_text("kept")
    with _mounted(tmp_path / "ro", ["--bind", str(source)], remount_ro=True) as ro:
        line = _one_error_line(_train(tmp_path, clean_set, ro / "runs" / "one"))
        assert f"{ro} is not writable" in line
    assert _snapshot(source) == {"kept.txt": b"kept"}


# ---------------------------------------------------------------------------------------------- full disk
def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path: Path) -> None:
    with _mounted(tmp_path / "small", ["-t", "tmpfs", "-o", "size=1m", "tmpfs"]) as small:
        target = small / "last.ckpt"
        atomic_torch_save({"step": 1, "x": torch.zeros(16)}, target)
        before = target.read_bytes()
        with pytest.raises(OSError, match="No space left on device") as info:
            atomic_torch_save({"step": 2, "x": torch.zeros(1 << 20)}, target)
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
        assert target.read_bytes() == before and [p.name for p in small.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_training_on_a_full_disk_is_one_line(tmp_path: Path, clean_set: Path) -> None:  # noqa: F811
    with _mounted(tmp_path / "small", ["-t", "tmpfs", "-o", "size=2m", "tmpfs"]) as small:
        line = _one_error_line(_train(tmp_path, clean_set, small / "run"))
        assert "No space left on device" in line and str(small / "run") in line, line
        assert not list(small.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------- the lock
def _write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}))
    return lock


@contextlib.contextmanager
def _live_process() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_keeps_the_folder(tmp_path: Path) -> None:
    with _live_process() as pid:
        lock = _write_lock(tmp_path, pid)
        with pytest.raises(RunFolderLockedError, match=f"in use by pid {pid} on {socket.gethostname()}"), \
                run_folder_lock(tmp_path):
            pass
        assert json.loads(lock.read_text())["pid"] == pid


def test_another_hosts_lock_is_honoured_and_names_the_file(tmp_path: Path) -> None:
    lock = _write_lock(tmp_path, 12345, host="elsewhere.example")
    with pytest.raises(RunFolderLockedError, match=f"delete {lock}"), run_folder_lock(tmp_path):
        pass


def test_a_lock_of_an_earlier_incarnation_of_the_slurm_job_is_stale(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A requeued job (same id, restart count 1) on another node takes over the lock its first
    incarnation left; another job's lock, or this incarnation's own, is honoured."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for holder, refused in (("4242.0", False), ("4243.0", True), ("4242.1", True)):
        lock = _write_lock(tmp_path, 12345, host="node-17.example")
        lock.write_text(json.dumps({**json.loads(lock.read_text()), "slurm": holder}))
        if refused:
            with pytest.raises(RunFolderLockedError, match="node-17.example"), run_folder_lock(tmp_path):
                pass
        else:
            with run_folder_lock(tmp_path) as held:
                assert json.loads(held.read_text())["slurm"] == "4242.1"
            assert not lock.exists()
        lock.unlink(missing_ok=True)


def test_a_stale_lock_is_taken_over_and_released(tmp_path: Path) -> None:
    lock = _write_lock(tmp_path, _dead_pid())
    with run_folder_lock(tmp_path) as held:
        assert held == lock and json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path: Path) -> None:
    with run_folder_lock(tmp_path) as held, _live_process() as pid:
        _write_lock(tmp_path, pid)  # another run took it over meanwhile
    assert held.exists() and json.loads(held.read_text())["pid"] == pid


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_and_changes_nothing(tmp_path: Path,
                                                                       clean_set: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    with _live_process() as pid:
        _write_lock(run_dir, pid)
        ckpt = run_dir / "checkpoints"
        ckpt.mkdir()
        (ckpt / "last.ckpt").write_bytes(b"the first run's checkpoint")
        # the first run's save in progress: a second run must not clean it up
        (ckpt / f".last.ckpt.{socket.gethostname()}-{pid}.abc123.tmp").write_bytes(b"being written")
        before = _snapshot(run_dir)
        line = _one_error_line(_train(tmp_path, clean_set, run_dir))
        assert f"in use by pid {pid}" in line and str(run_dir) in line, line
        assert _snapshot(run_dir) == before
    # the holder is gone: the next run takes the stale lock over, trains, and releases it
    (ckpt / "last.ckpt").unlink()
    result = _train(tmp_path, clean_set, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run_dir / LOCK_NAME).exists() and (ckpt / "last.ckpt").is_file()
