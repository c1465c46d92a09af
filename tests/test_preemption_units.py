"""The pieces of pre-emption and resubmission, in process: signal names, the configuration check,
the continuing CSV log, the stable run folder of ``run_name``."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from laps.cli.common import register_resolvers
from laps.paths import config_dir
from laps.training.csv_logger import ResumableCSVLogger
from laps.training.preemption import parse_signals
from laps.training.resume import ConfigChangedError, check_same_config, config_differences, record_config


def test_signal_names_numbers_and_an_unknown_one() -> None:
    assert parse_signals(["SIGTERM", "usr1", int(signal.SIGINT)]) == [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
    with pytest.raises(ValueError, match="trainer.preemption_signals: unknown signal 'SIGFOO'"):
        parse_signals(["SIGFOO"])


def test_config_differences_name_keys_and_skip_where_and_what_watches() -> None:
    stored = {"model": {"margin": 0.2, "ratios": [0.5, 0.3]}, "paths": {"output_dir": "/a"}, "ckpt_path": None,
              "logger": {"csv": {}}, "seed": 1}
    current = {"model": {"margin": 0.3, "ratios": [0.5, 0.3]}, "paths": {"output_dir": "/b"}, "ckpt_path": "auto",
               "callbacks": {"x": {}}, "seed": 1, "extra": True}
    assert config_differences(stored, current) == ["extra: '<unset>' -> True", "model.margin: 0.2 -> 0.3"]


def test_check_same_config_refuses_in_one_line(tmp_path: Path) -> None:
    record_config(OmegaConf.create({"model": {"lr": 1e-4}, "seed": 3}), tmp_path)
    check_same_config(OmegaConf.create({"model": {"lr": 1e-4}, "seed": 3, "ckpt_path": "auto"}), tmp_path)
    with pytest.raises(ConfigChangedError, match=r"model.lr: 0.0001 -> 0.001; seed: 3 -> 4") as err:
        check_same_config(OmegaConf.create({"model": {"lr": 1e-3}, "seed": 4}), tmp_path)
    assert "\n" not in str(err.value)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_log_keeps_the_rows_up_to_the_checkpoint_and_continues(tmp_path: Path) -> None:
    first = ResumableCSVLogger(tmp_path, name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.log_metrics({"val/rsum": 100.0}, step=3)
    first.save()
    resumed = ResumableCSVLogger(tmp_path, name="csv", version="")
    resumed.keep_until(3)  # the checkpoint's step: rows 4 and 5 are logged again
    resumed.log_metrics({"train/loss": 40.0, "train/extra": 1.0}, step=4)
    resumed.save()
    rows = _rows(tmp_path / "csv" / "metrics.csv")
    assert [(r["step"], r["train/loss"], r["val/rsum"], r["train/extra"]) for r in rows] == [
        ("0", "0.0", "", ""), ("1", "1.0", "", ""), ("2", "2.0", "", ""), ("3", "3.0", "", ""),
        ("3", "", "100.0", ""), ("4", "40.0", "", "1.0")]


def test_csv_log_of_a_fresh_start_in_the_folder_starts_over(tmp_path: Path) -> None:
    old = ResumableCSVLogger(tmp_path, name="csv", version="")
    old.log_metrics({"train/loss": 1.0}, step=0)
    old.save()
    new = ResumableCSVLogger(tmp_path, name="csv", version="")
    new.keep_until(-1)
    new.log_metrics({"train/loss": 2.0}, step=0)
    new.save()
    assert [r["train/loss"] for r in _rows(tmp_path / "csv" / "metrics.csv")] == ["2.0"]


@pytest.mark.parametrize("multirun", [False, True])
def test_run_name_gives_a_folder_without_timestamp(multirun: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAPS_RUN_STAMP", raising=False)
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            named = compose("train", overrides=["run_name=f30k-vit"], return_hydra_config=True)
            plain = compose("train", return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    folder = OmegaConf.select(named, key)
    kind = "multiruns" if multirun else "runs"
    assert folder.endswith(f"train/{kind}/f30k-vit"), folder
    assert OmegaConf.select(plain, key) != folder and "f30k-vit" not in OmegaConf.select(plain, key)


def test_the_handler_records_the_first_signal_and_restores_the_previous_handlers() -> None:
    from laps.training.preemption import PreemptionHandler

    previous = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler(signals=["SIGUSR1", "SIGTERM"])
    with handler.installed():
        os.kill(os.getpid(), signal.SIGUSR1)  # SIGUSR1's default action would end this process
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal (while saving, say) changes nothing
        assert handler.received is signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_a_resumed_run_continues_the_wandb_run_of_its_folder(tmp_path: Path) -> None:
    from laps.training.tasks import continue_wandb

    def logger_cfg():
        return OmegaConf.create({"wandb": {"_target_": "lightning.pytorch.loggers.wandb.WandbLogger", "project": "p"},
                                 "csv": {"_target_": "laps.training.csv_logger.ResumableCSVLogger"}})

    first, resumed, elsewhere = logger_cfg(), logger_cfg(), logger_cfg()
    continue_wandb(first, str(tmp_path / "run"))
    continue_wandb(resumed, str(tmp_path / "run"))
    continue_wandb(elsewhere, str(tmp_path / "other"))
    assert first.wandb.id and first.wandb.id == resumed.wandb.id != elsewhere.wandb.id
    assert resumed.wandb.resume == "allow" and "id" not in resumed.csv
    assert (tmp_path / "run" / "wandb_id").read_text().strip() == first.wandb.id
