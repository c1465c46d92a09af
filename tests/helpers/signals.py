"""A callback for the pre-emption tests: the run signals itself at a chosen point, so the test knows
which step the signal arrived in (``+callbacks.signal_at._target_=helpers.signals.SignalAt``)."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send ``signame`` to this process once: at the start of training step ``step`` (``where=train``),
    of the first batch of the first validation of the fit (``where=validation``) or of the test
    (``where=test``); only on rank ``rank``."""

    def __init__(self, signame: str = "SIGTERM", where: str = "train", step: int = 0, rank: int = 0) -> None:
        self.signum = signal.Signals[signame]
        self.where, self.step, self.rank = where, int(step), int(rank)
        self.sent = False

    def _send(self, trainer: Any) -> None:
        if not self.sent and trainer.global_rank == self.rank:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.where == "train" and trainer.global_step == self.step:
            self._send(trainer)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self.where == "validation" and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._send(trainer)

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        if self.where == "test":
            self._send(trainer)
