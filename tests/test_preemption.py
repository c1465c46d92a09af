"""Pre-emption and resubmission: a signal saves ``last.ckpt`` at the next step boundary and exits 75;
the identical command with ``ckpt_path=auto`` ends as an uninterrupted run (metrics, weights, the
CSV log). The runs signal themselves at a chosen point (``helpers.signals.SignalAt``), so each test
knows the step; one external SIGTERM shows the real path. Runs go side by side, one thread each."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from laps.compat.serialization import safe_load
from laps.training.preemption import PREEMPTED_EXIT_CODE

TESTS = Path(__file__).parent
STEPS_PER_EPOCH = 6
SYNTHETIC = {"seed": 0, "n_train": 96, "n_dev": 12, "n_test": 12, "image_size": 64}
RUN = [
    *(f"dataset.synthetic.{k}={v}" for k, v in SYNTHETIC.items()),
    "dataset.batch_size=8", "dataset.eval_batch_size=16",
    "trainer.max_epochs=2", f"+trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "callbacks.last_checkpoint.every_n_train_steps=0",  # only the epoch ends and the signal save
    "trainer.deterministic=true", "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0",
    "model.vse_mean_warmup_epochs=1", "logger=csv", "seed=7",
]
SIGNAL = "+callbacks.signal_at._target_=helpers.signals.SignalAt"


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def _cmd(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "laps.cli.train", *RUN,
            f"paths.root_dir={run_dir.parent}", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *extra]


def _start(run_dir: Path, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The run, its logs and errors in ``<run_dir>.out``: a file, not a pipe, so that a child left behind
    (a DDP run's rank 1) cannot keep the test waiting once the run itself has exited."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    out = run_dir.parent / f"{run_dir.name}.out"
    with open(out, "a") as log:
        proc = subprocess.Popen(_cmd(run_dir, data_dir, *extra), env=env or _env(), cwd=run_dir.parent,
                                stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its children (rank 1) in its process group
    proc.out_path, proc.out_start = out, out.stat().st_size  # type: ignore[attr-defined]
    return proc


def _output(proc: subprocess.Popen) -> str:
    with open(proc.out_path) as f:  # type: ignore[attr-defined]
        f.seek(proc.out_start)  # type: ignore[attr-defined]
        return f.read()


def _finish(procs: dict[str, subprocess.Popen], timeout: float = 600) -> dict[str, tuple[int, str]]:
    """Every process's exit status and output; a process still running after ``timeout`` seconds (a
    hang) fails the test. Whatever a run left behind is killed with its process group."""
    out, deadline = {}, time.monotonic() + timeout
    try:
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: still running after {timeout:.0f} s (a hang?): {_output(proc)[-3000:]}")
            out[name] = (proc.returncode, _output(proc))
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    return out


def _free_ports(n: int) -> list[str]:
    """``n`` distinct ports free now (all held open until the last is found)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [str(s.getsockname()[1]) for s in socks]


def _step(run_dir: Path) -> int:
    return int(safe_load(run_dir / "checkpoints" / "last.ckpt")["global_step"])


def _metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


def _curve(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def _same_run(got: Path, want: Path) -> None:
    a, b = _metrics(want), _metrics(got)
    assert set(a) == set(b) and "test/rsum" in a
    for key, value in a.items():
        assert b[key] == pytest.approx(value, abs=1e-6), key
    wa, wb = safe_load(want / "checkpoints" / "last.ckpt"), safe_load(got / "checkpoints" / "last.ckpt")
    assert wa["global_step"] == wb["global_step"] == 2 * STEPS_PER_EPOCH
    for name, tensor in wa["state_dict"].items():
        torch.testing.assert_close(wb["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
    # the CSV log continues: every step's loss and both validations, as without the restart
    for key, points in (("train/loss", 2 * STEPS_PER_EPOCH), ("val/rsum", 2)):
        curve_a, curve_b = _curve(want, key), _curve(got, key)
        assert sorted(curve_b) == sorted(curve_a) and len(curve_a) == points, key
        for s, value in curve_a.items():
            assert curve_b[s] == pytest.approx(value, abs=1e-6), (key, s)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from laps.data.synthetic import SyntheticParams, ensure_synthetic

    root = tmp_path_factory.mktemp("preempt_data")
    ensure_synthetic(root / "synthetic", SyntheticParams(**SYNTHETIC))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """The uninterrupted run (``ckpt_path=auto`` on an empty folder) and four interrupted ones, side by
    side; then the interrupted ones resubmitted unchanged but for the signal, side by side."""
    root = tmp_path_factory.mktemp("preempt")
    stub = root / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {root / 'scontrol.log'}\n")
    (stub / "scontrol").chmod(0o755)
    slurm = _env(SLURM_JOB_ID="4242", PATH=f"{stub}{os.pathsep}{os.environ['PATH']}")
    cases = {
        "sigterm": [SIGNAL, "+callbacks.signal_at.step=8"],                       # mid epoch 1
        "sigusr1": [SIGNAL, "+callbacks.signal_at.step=3", "+callbacks.signal_at.signame=SIGUSR1"],
        "validation": [SIGNAL, "+callbacks.signal_at.where=validation"],          # epoch 0's validation
        "test": [SIGNAL, "+callbacks.signal_at.where=test"],
    }
    procs = {"full": _start(root / "full", data_dir, "ckpt_path=auto")}
    for name, extra in cases.items():
        procs[name] = _start(root / name, data_dir, *extra, env=slurm if name == "sigusr1" else None)
    first = _finish(procs)
    state = {name: {"rc": first[name][0], "err": first[name][1],
                    "step": _step(root / name) if (root / name / "checkpoints" / "last.ckpt").is_file() else None,
                    "metrics_after_signal": (root / name / "metrics.json").exists()} for name in cases}
    requeued = (root / "scontrol.log").read_text() if (root / "scontrol.log").exists() else ""
    again = _finish({name: _start(root / name, data_dir, "ckpt_path=auto") for name in cases})
    return {"root": root, "full": first["full"], "first": state, "resumed": again, "scontrol": requeued}


def _check_case(runs: dict, name: str, step: int) -> None:
    first = runs["first"][name]
    assert first["rc"] == PREEMPTED_EXIT_CODE, first["err"][-3000:]
    assert "pre-empted by" in first["err"] and "ckpt_path=auto" in first["err"]
    assert not first["metrics_after_signal"]
    assert first["step"] == step
    rc, err = runs["resumed"][name]
    assert rc == 0, err[-3000:]
    assert runs["full"][0] == 0, runs["full"][1][-3000:]
    _same_run(runs["root"] / name, runs["root"] / "full")


def test_auto_on_an_empty_folder_trains_from_scratch(runs: dict) -> None:
    rc, err = runs["full"]
    assert rc == 0, err[-3000:]
    assert "no checkpoint" in err and "training from scratch" in err
    assert (runs["root"] / "full" / "laps_config.yaml").is_file()


def test_sigterm_mid_epoch_saves_the_step_and_resumes_exactly(runs: dict) -> None:
    _check_case(runs, "sigterm", step=9)  # signalled in step 8: that step finishes, then the save


def test_sigusr1_under_slurm_saves_requeues_and_resumes_exactly(runs: dict) -> None:
    _check_case(runs, "sigusr1", step=4)
    assert runs["scontrol"].split() == ["requeue", "4242"]


def test_signal_during_validation_abandons_it_and_the_resumed_run_validates_in_full(runs: dict) -> None:
    _check_case(runs, "validation", step=STEPS_PER_EPOCH)  # the state after epoch 0's last step


def test_signal_during_the_test_exits_and_the_resumed_run_tests_again(runs: dict) -> None:
    _check_case(runs, "test", step=2 * STEPS_PER_EPOCH)


def test_auto_on_a_finished_run_does_not_train_again(runs: dict, data_dir: Path) -> None:
    folder = runs["root"] / "full"
    before = {p: p.stat().st_mtime_ns for p in (folder / "metrics.json", folder / "checkpoints" / "last.ckpt")}
    done = subprocess.run(_cmd(folder, data_dir, "ckpt_path=auto"), env=_env(), cwd=folder.parent,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished run" in done.stdout + done.stderr and "not trained again" in done.stdout + done.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_auto_refuses_a_changed_configuration_naming_the_keys(runs: dict, data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "changed"
    folder.mkdir()
    (folder / "laps_config.yaml").write_text((runs["root"] / "full" / "laps_config.yaml").read_text())
    done = subprocess.run(_cmd(folder, data_dir, "ckpt_path=auto", "model.margin=0.3"), env=_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    assert "model.margin: 0.2 -> 0.3" in done.stderr and "another configuration" in done.stderr
    assert not (folder / "checkpoints").exists()


def test_external_sigterm_exits_75_with_a_checkpoint_of_that_step(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ext"
    proc = _start(run_dir, data_dir, "trainer.max_epochs=20", "callbacks.last_checkpoint.every_n_train_steps=1")
    ckpt, deadline = run_dir / "checkpoints" / "last.ckpt", time.monotonic() + 300
    while not ckpt.is_file():  # training has started
        assert proc.poll() is None and time.monotonic() < deadline, _output(proc)[-3000:]
        time.sleep(0.05)
    seen = _step(run_dir)
    proc.send_signal(signal.SIGTERM)
    err = _finish({"ext": proc}, timeout=120)["ext"][1]
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert _step(run_dir) >= seen and f"at step {_step(run_dir)}" in err
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / ".laps-run.lock").exists()  # released: a resubmission is not refused


def test_ddp_signal_to_one_rank_stops_both_after_the_same_step(data_dir: Path, tmp_path: Path) -> None:
    """``trainer=ddp_sim``: rank 1 alone receives SIGTERM in step 3; both ranks finish that step and
    exit 75, rank 0's ``last.ckpt`` holds step 4, and the resumed run ends as the uninterrupted one."""
    ddp = ["trainer=ddp_sim", "dataset.batch_size=4"]  # two ranks of 4: the global batch of 8
    signalled = [SIGNAL, "+callbacks.signal_at.step=3", "+callbacks.signal_at.rank=1"]
    ports = _free_ports(3)  # one after the other, each with its own rendezvous port
    first = _finish({"full": _start(tmp_path / "full", data_dir, *ddp, "ckpt_path=auto", env=_env(MASTER_PORT=ports[0]))},
                    timeout=600)
    first |= _finish({"ddp": _start(tmp_path / "ddp", data_dir, *ddp, *signalled, env=_env(MASTER_PORT=ports[1]))},
                     timeout=600)
    rc, out = first["ddp"]
    assert rc == PREEMPTED_EXIT_CODE, out[-3000:]
    assert out.count("pre-empted by SIGTERM at step 4") == 2  # each rank stopped after step 3
    assert _step(tmp_path / "ddp") == 4
    assert first["full"][0] == 0, first["full"][1][-3000:]
    again = _finish({"ddp": _start(tmp_path / "ddp", data_dir, *ddp, "ckpt_path=auto", env=_env(MASTER_PORT=ports[2]))},
                    timeout=600)
    assert again["ddp"][0] == 0, again["ddp"][1][-3000:]
    _same_run(tmp_path / "ddp", tmp_path / "full")
