"""Pre-emption: a warning signal saves the run at the next step boundary and exits with
:data:`PREEMPTED_EXIT_CODE`, so that the identical command with ``ckpt_path=auto`` resumes it.

Lightning's own signal handling is switched off for the run it guards: it saves inside the signal
handler (in the middle of a step), its SIGTERM path exits with status 0 (a pre-empted job looks
finished to its scheduler), and under DDP it carries rank zero's flag only. Here the handler only
records the signal; at every optimizer-step boundary (and every validation or test batch) the ranks
agree on it with one all-reduce, so a signal delivered to any one rank stops all of them after the
same step, and :class:`Preempted` is raised on every rank after ``last.ckpt`` is written:

* during training: after the current optimizer step, the state of that step (as a periodic
  ``last.ckpt``);
* during validation: the validation is abandoned, and the checkpoint holds the state after the last
  optimizer step with the validation marked as not yet run, so the resumed run runs it in full
  (partial accumulators are never saved);
* during the final test: nothing new is saved (the fit is complete); the resumed run tests again.

Under SLURM (``SLURM_JOB_ID`` set) with ``requeue`` on, rank zero then runs
``scontrol requeue <job id>``; the requeued job keeps its id, hence its run folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "PreemptionHandler", "parse_signals", "slurm_requeue"]

# EX_TEMPFAIL (sysexits.h): "try again later"; neither success nor a failure of the run.
PREEMPTED_EXIT_CODE = 75


class Preempted(RuntimeError):
    """The run stopped on a pre-emption signal; ``last.ckpt`` holds its state (``ckpt_path=auto`` resumes)."""

    def __init__(self, signame: str, step: int, checkpoint: Path | None) -> None:
        where = f"{checkpoint} holds step {step}" if checkpoint is not None else "nothing new saved"
        super().__init__(f"pre-empted by {signame} at step {step}: {where}; resubmit the same command "
                         "with ckpt_path=auto to resume")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


def parse_signals(names: Sequence[str | int] | None) -> list[signal.Signals]:
    """``["SIGTERM", "USR1", 10]`` -> signals; an unknown name is a one-line error naming the key."""
    out = []
    for name in names or []:
        try:
            if isinstance(name, int):
                out.append(signal.Signals(name))
            else:
                text = str(name).upper()
                out.append(signal.Signals[text if text.startswith("SIG") else f"SIG{text}"])
        except (KeyError, ValueError):
            raise ValueError(f"trainer.preemption_signals: unknown signal {name!r}") from None
    return out


def slurm_job_id() -> str | None:
    """The SLURM job to requeue (``<array job>_<task>`` for an array task), or ``None`` outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_requeue(job_id: str) -> bool:
    """``scontrol requeue JOB``; ``False`` (logged) when it fails or ``scontrol`` is missing."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("scontrol requeue %s failed: %s", job_id, err)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("SLURM job %s requeued", job_id)
    return True


class PreemptionHandler(Callback):
    """Save ``last.ckpt`` and raise :class:`Preempted` on every rank after a pre-emption signal.

    Args:
        signals: signal names (``trainer.preemption_signals``: SIGTERM and SIGUSR1 by default).
        dirpath, filename: where ``last.ckpt`` is written (the :class:`LastCheckpoint`'s).
        requeue: under SLURM, requeue the job after saving (rank zero).
    """

    def __init__(self, signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1"), dirpath: str | os.PathLike = "checkpoints",
                 filename: str = "last.ckpt", requeue: bool = True) -> None:
        super().__init__()
        self.signals = parse_signals(signals)
        self.path = Path(dirpath) / filename
        self.requeue = bool(requeue)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._held = False  # installed by :meth:`installed` for a whole task: kept between fit and test

    # ------------------------------------------------------------------ the signal itself
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:  # a second signal (while saving, say) changes nothing
            self.received = signal.Signals(signum)
            log.warning("%s received: stopping at the next step boundary", self.received.name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[PreemptionHandler]:
        """The handlers installed for the block (before any data is read), the previous ones restored after."""
        self.install()
        self._held = True
        try:
            yield self
        finally:
            self._held = False
            self.uninstall()

    def install(self) -> None:
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Lightning would replace the handlers with its own when the stage starts: keep ours.
        trainer._signal_connector.register_signal_handlers = lambda: None
        self.install()

    # ------------------------------------------------------------------ the decision, on every rank
    def _agreed(self, pl_module: Any) -> signal.Signals | None:
        """The signal any rank received (the smallest number), agreed by all ranks in one all-reduce."""
        mine = int(self.received) if self.received is not None else 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([mine if mine else 1 << 30], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            mine = int(flag.item()) if int(flag.item()) != 1 << 30 else 0
        return signal.Signals(mine) if mine else None

    def _stop(self, trainer: Any, received: signal.Signals, save: str | None) -> None:
        checkpoint = None
        if save is not None:
            checkpoint = self.path
            # weights_only here is Lightning's save flag (write optimizer and loop states too), not
            # torch.load's: every read of last.ckpt goes through safe_load (weights_only=True, allow-list).
            if save == "abandon_validation":
                state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                _mark_validation_not_run(state)
                trainer.strategy.save_checkpoint(state, str(self.path))
                trainer.strategy.barrier("laps-preempted")
            else:
                trainer.save_checkpoint(str(self.path), weights_only=False)
            if save == "step":  # the step's logged row, which Lightning writes only after this hook
                trainer._logger_connector.update_train_step_metrics()
            log.warning("pre-empted: %s written at step %d", self.path, trainer.global_step)
        job = slurm_job_id()
        if self.requeue and job is not None and trainer.is_global_zero:
            slurm_requeue(job)
        raise Preempted(received.name, trainer.global_step, checkpoint)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)) and not _last_batch(trainer):
            return  # inside an accumulation: the optimizer step is not done yet
        if _last_batch(trainer):
            return  # validation or the epoch's end come next: they check (the epoch-end state resumes cleanly)
        received = self._agreed(pl_module)
        if received is not None:
            self._stop(trainer, received, "step")

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        # one all-reduce a batch: every rank has as many (Lightning's DistributedSampler pads the split)
        received = self._agreed(pl_module)
        if received is not None:
            fitting = trainer.state.fn == "fit"
            self._stop(trainer, received, "abandon_validation" if fitting else None)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        received = self._agreed(pl_module)
        if received is not None:  # after the epoch's validation: the epoch-end state
            self._stop(trainer, received, "epoch")

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        received = self._agreed(pl_module)
        if received is not None:
            self._stop(trainer, received, None)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self._held:
            self.uninstall()


def _last_batch(trainer: Any) -> bool:
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def _mark_validation_not_run(checkpoint: dict[str, Any]) -> None:
    """Rewrite the fit loop's validation progress of ``checkpoint`` to "started, no batch done": the
    resumed run restarts that validation from its first batch (Lightning's restart mid-evaluation)
    instead of skipping it, and no partial accumulator is carried over."""
    loops = checkpoint["loops"]["fit_loop"]
    progress = loops["epoch_loop.val_loop.batch_progress"]
    done = int(progress["total"]["completed"]) - int(progress["current"]["completed"])
    progress["total"].update(ready=done + 1, started=done + 1, processed=done, completed=done)
    progress["current"].update(ready=1, started=1, processed=0, completed=0)
    progress["is_last_batch"] = False
