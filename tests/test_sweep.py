"""Hydra multirun sweeps of the ratios: one run directory, one metrics.json and one logger run per
job, in one process and with ``trainer=ddp_sim`` (two gloo processes per job, the second started
by Lightning re-running the command line), plus the sweep summary."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers.common import TINY_WIDTH32
from laps.training.callbacks import collect_sweep, summarize_sweep, swept_keys
from laps.training.launch import child_argv

REPO = Path(__file__).resolve().parents[1]

TINY = TINY_WIDTH32
FEW_STEPS = [
    "dataset.synthetic.n_train=16", "dataset.synthetic.n_dev=5", "dataset.synthetic.n_test=5",
    "dataset.synthetic.image_size=32", "dataset.batch_size=8", "dataset.eval_batch_size=3",
    "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "trainer.log_every_n_steps=1", "test=true",
]
SWEEP = ["ratios.sparse_ratio=0.4,0.6", "ratios.aggr_ratio=0.3,0.4"]


def laps_train() -> list[str]:
    """The ``laps-train`` console script of this environment (``python -m laps.cli.train`` without one)."""
    script = Path(sys.executable).with_name("laps-train")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "laps.cli.train"]


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweep_data")


def run_sweep(root: Path, data: Path, extra: list[str], timeout: int = 500, sweep: list[str] = SWEEP) -> Path:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "LAPS_RUN_STAMP": "sweep"}
    cmd = [*laps_train(), "-m", f"paths.root_dir={root}", f"paths.data_dir={data}", *TINY, *FEW_STEPS, *extra, *sweep]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return root / "logs" / "train" / "multiruns" / "sweep"


def wandb_run_ids(job_dir: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[-1] for p in (job_dir / "wandb").glob("offline-run-*"))


def check_sweep(root: Path, sweep_dir: Path, ddp: bool) -> None:
    # Every job in its own folder, nothing anywhere else (no stray single-run folders from the ranks).
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    assert not (root / "logs" / "train" / "runs").exists()
    seen, run_ids = set(), []
    for job in sorted(sweep_dir.iterdir()):
        if not job.is_dir():
            continue
        overrides = [str(o) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")]
        ratios = tuple(o for o in overrides if o.startswith("ratios."))
        seen.add(ratios)
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert f"ratios.sparse_ratio={config.ratios.sparse_ratio}" in ratios  # the job ran its own values
        metrics = json.loads((job / "metrics.json").read_text())
        assert {"val/rsum", "test/rsum", "test/i2t_R@1"} <= set(metrics)
        assert (job / "csv" / "metrics.csv").is_file()
        ids = wandb_run_ids(job)
        assert len(ids) == 1, f"job {job.name}: {ids}"  # one wandb run per job, started by rank 0 only
        run_ids += ids
        ranks = {p.name for p in job.glob("train_ddp_process_*.log")}
        assert ranks == ({"train_ddp_process_1.log"} if ddp else set())
    assert len(seen) == 4 and len(set(run_ids)) == 4  # four distinct jobs, four distinct wandb runs

    with (sweep_dir / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"] and all(r["status"] == "ok" for r in rows)
    assert {(r["ratios.sparse_ratio"], r["ratios.aggr_ratio"]) for r in rows} == {
        ("0.4", "0.3"), ("0.4", "0.4"), ("0.6", "0.3"), ("0.6", "0.4")}
    for r in rows:
        written = json.loads((sweep_dir / r["job"] / "metrics.json").read_text())
        assert float(r["test/rsum"]) == pytest.approx(written["test/rsum"])
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "| job | ratios.sparse_ratio | ratios.aggr_ratio |" in md and md.count("\n| ") >= 5


@pytest.mark.slow
def test_ratio_sweep_one_process(tmp_path: Path, sweep_data: Path) -> None:
    root = tmp_path / "single"
    root.mkdir()
    sweep_dir = run_sweep(root, sweep_data, ["trainer=cpu", "logger=[csv,wandb]"])
    check_sweep(root, sweep_dir, ddp=False)


@pytest.mark.slow
def test_ratio_sweep_ddp_sim(tmp_path: Path, sweep_data: Path) -> None:
    """Each job starts rank 1 by re-running the job's own command line: no job runs twice, no job
    hangs on the previous job's process group, every job keeps one folder and one wandb run."""
    root = tmp_path / "ddp"
    root.mkdir()
    sweep_dir = run_sweep(root, sweep_data, ["trainer=ddp_sim", "logger=[csv,wandb]"])
    check_sweep(root, sweep_dir, ddp=True)


@pytest.mark.slow
def test_model_sweep_compares_laps_with_its_baseline(tmp_path: Path, sweep_data: Path) -> None:
    """``laps-train -m model=laps,vse``: a LAPS job and a VSE job, each trained and tested, side by side
    in the summary; each job's CSV log has its time per epoch."""
    sweep_dir = run_sweep(tmp_path, sweep_data, ["trainer=cpu"], sweep=["model=laps,vse"])
    configs = {job: OmegaConf.load(sweep_dir / job / ".hydra" / "config.yaml") for job in ("0", "1")}
    kinds = {job: OmegaConf.select(c, "model.net.kind", default="laps") for job, c in configs.items()}  # laps: the default
    assert kinds == {"0": "laps", "1": "vse"}
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [(r["model"], r["status"]) for r in rows] == [("laps", "ok"), ("vse", "ok")]
    for r in rows:
        written = json.loads((sweep_dir / r["job"] / "metrics.json").read_text())
        assert {"val/rsum", "test/rsum"} <= set(written)
        assert float(r["test/rsum"]) == pytest.approx(written["test/rsum"])
        with (sweep_dir / r["job"] / "csv" / "metrics.csv").open() as f:
            times = [float(row["train/epoch_time_s"]) for row in csv.DictReader(f) if row.get("train/epoch_time_s")]
        assert len(times) == 1 and times[0] > 0  # one epoch


def test_child_argv_runs_one_job() -> None:
    argv = ["laps-train", "-m", "--config-name", "train", "trainer=ddp", "ratios.sparse_ratio=0.4,0.5"]
    job = ["trainer=ddp", "ratios.sparse_ratio=0.5"]
    assert child_argv(argv, job) == ["laps-train", "--config-name", "train", "trainer=ddp", "ratios.sparse_ratio=0.5"]


def test_summary_of_a_partial_sweep(tmp_path: Path) -> None:
    """A failed job (no metrics.json) is listed, not fatal; the best job is picked by val/rsum."""
    for num, (sparse, rsum) in enumerate([(0.4, 300.0), (0.5, 320.0), (0.6, None)]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- ratios.sparse_ratio={sparse}\n- trainer=cpu\n")
        if rsum is not None:
            (job / "metrics.json").write_text(json.dumps({"val/rsum": rsum, "test/rsum": rsum - 10}))
    jobs = collect_sweep(tmp_path)
    assert [j["job"] for j in jobs] == ["0", "1", "2"] and swept_keys(jobs) == ["ratios.sparse_ratio"]
    csv_path, md_path = summarize_sweep(tmp_path, print_table=False)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "no metrics.json"]
    assert "Best by `val/rsum`: job 1" in md_path.read_text()


def test_optuna_search_config() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from laps.paths import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=laps_optuna"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/rsum_best"
    assert set(cfg.hydra.sweeper.params) >= {"ratios.sparse_ratio", "ratios.aggr_ratio"}
    assert cfg.hydra.callbacks.sweep_summary._target_ == "laps.training.callbacks.SweepSummary"


@pytest.mark.slow
def test_optuna_search_runs(tmp_path: Path, sweep_data: Path) -> None:
    """Two Optuna trials: each a job folder with its metrics; the sweeper gets val/rsum_best back."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "LAPS_RUN_STAMP": "optuna"}
    cmd = [*laps_train(), "hparams_search=laps_optuna", "hydra.sweeper.n_trials=2", f"paths.root_dir={tmp_path}",
           f"paths.data_dir={sweep_data}", "trainer=cpu", *TINY, *FEW_STEPS[:-1]]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    sweep_dir = tmp_path / "logs" / "train" / "multiruns" / "optuna"
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.name == "optuna" and isinstance(results.best_value, float)
    best = max(json.loads((sweep_dir / j / "metrics.json").read_text())["val/rsum_best"] for j in ("0", "1"))
    assert results.best_value == pytest.approx(best)
    assert not any(k.startswith("test/") for k in json.loads((sweep_dir / "0" / "metrics.json").read_text()))
    assert len(list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))) == 2


def test_ranks_started_by_a_launcher_share_one_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """srun/torchrun ranks each run Hydra: they name the folder after their job, not their clock."""
    from laps.training.launch import run_stamp

    for key in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert run_stamp("2026-01-01_00-00-00") == "2026-01-01_00-00-00"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id: no shared name
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert run_stamp("t") == "t"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "f30k-2x4")
    assert run_stamp("t") == "torchrun-f30k-2x4"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert run_stamp("t") == "slurm-4242"
