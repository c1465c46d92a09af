"""A CSV logger that a resumed run continues: ``metrics.csv`` keeps the rows of the runs before.

Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` deletes an existing ``metrics.csv`` when
its writer starts, so a run resumed in its folder (``ckpt_path=auto``) would lose the curves of every
step before the restart. :class:`ResumableCSVLogger` keeps them; when training starts,
:class:`ContinueCSV` drops the rows logged after the resumed checkpoint's step (the resumed run logs
those steps again), or every row when the run starts from scratch.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["ContinueCSV", "ResumableCSVLogger"]


class _ContinuingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv``; :meth:`keep_until` trims it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):  # the columns of the rows kept
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        pass

    def keep_until(self, step: int) -> None:
        """Drop the rows whose ``step`` is after ``step`` (all rows for a negative ``step``)."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            kept = [row for row in reader if step >= 0 and (not row.get("step") or int(float(row["step"])) <= step)]
        self.metrics_keys = keys if kept else []
        if not kept:  # a fresh start, as Lightning's logger
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)


class ResumableCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` whose ``metrics.csv`` continues across resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def keep_until(self, step: int) -> None:
        """Drop the logged rows after ``step`` (every row when ``step`` is negative), pending ones first."""
        self.experiment.metrics = [m for m in self.experiment.metrics if step >= 0 and int(m.get("step", 0)) <= step]
        self.experiment.keep_until(step)


class ContinueCSV(Callback):
    """When training starts, trim every :class:`ResumableCSVLogger` to the resumed checkpoint's step.

    The step is the loop's logging step as restored (``_batches_that_stepped``): the rows up to it were
    logged before the checkpoint was written, the later ones are logged again by the resumed run.
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped if trainer.ckpt_path else -1
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.keep_until(step)
