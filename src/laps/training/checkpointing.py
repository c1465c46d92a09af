"""Checkpoints that survive interruptions and hostile files.

* :class:`AtomicCheckpointIO` -- the Trainer's ``CheckpointIO`` (``trainer.plugins`` in the trainer
  config): every checkpoint is written to a temporary file beside its target, flushed to disk and
  renamed over the target with :func:`os.replace`, so a run killed at any moment leaves either the
  previous complete file or the new complete file, never a truncated one. Every checkpoint Lightning
  reads (``ckpt_path=...`` on resume, the best checkpoint before testing) goes through
  :func:`laps.compat.serialization.safe_load`: ``weights_only=True`` and the project's allow-list.
* :class:`LastCheckpoint` -- writes ``last.ckpt`` every ``every_n_train_steps`` optimizer steps and at
  the end of every training epoch (after validation, so it also holds the best-checkpoint state).
* :func:`capture_rng_state` / :func:`restore_rng_state` -- the global random generators (torch CPU and
  CUDA, Python ``random``, NumPy) as plain tensors and ints, so that they load under ``weights_only``;
  :class:`laps.training.module.LAPSLitModule` stores them in every checkpoint and restores them when a
  fit resumes.

The training order that a resumed run continues exactly is :class:`laps.data.sampler.SeededShuffleSampler`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Checkpoint

from laps.paths import new_file_mode
from laps.training.runlock import holder_alive

log = logging.getLogger(__name__)

__all__ = [
    "AtomicCheckpointIO",
    "LastCheckpoint",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "capture_rng_state",
    "last_validation",
    "restore_rng_state",
]

_TMP_SUFFIX = ".tmp"
VALIDATION_KEY = "laps_last_validation"  # in every checkpoint: the metrics of the validation before it


# ---------------------------------------------------------------------------------------------- atomic files
def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def _own_prefix(path: Path) -> str:
    """The prefix of this process's temporaries of ``path``: ``.{name}.{host}-{pid}.``."""
    return f"{_tmp_prefix(path)}{socket.gethostname()}-{os.getpid()}."


def _abandoned(path: Path, tmp: Path) -> bool:
    """Whether ``tmp`` is a temporary of ``path`` that no live save will finish: this process's, one of a
    process of this host that is gone, or one without an owner in its name (an earlier release's)."""
    owner = re.match(rf"^(?P<host>.+)-(?P<pid>\d+)\.[^.]+{re.escape(_TMP_SUFFIX)}$",
                     tmp.name[len(_tmp_prefix(path)):])
    if owner is None:
        return True
    if owner["host"] != socket.gethostname():
        return False  # another host's save, perhaps running: not ours to judge
    return int(owner["pid"]) == os.getpid() or not holder_alive({"pid": owner["pid"], "host": owner["host"]})


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_torch_save` of ``path`` left behind; returns them.

    Only temporaries no live process will finish are touched (:func:`_abandoned`): a concurrent save
    of the same file by another process keeps its own.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tmp in path.parent.glob(f"{_tmp_prefix(path)}*{_TMP_SUFFIX}"):
        if not _abandoned(path, tmp):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    if removed:
        log.info("removed %d unfinished temporary file(s) of %s (an interrupted save)", len(removed), path)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial ``path`` (:func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    """Call ``write(file)`` on a new binary file that replaces ``path`` only once complete.

    The data is written to ``.{name}.{host}-{pid}.XXXX.tmp`` in the same folder, flushed and fsync-ed,
    then renamed over ``path`` (:func:`os.replace`, atomic on POSIX and Windows within one file system).
    Readers see the old file until the rename and the complete new file after it. Temporaries of
    ``path`` left by an earlier, killed save are removed first. A full disk raises ``OSError``
    (``ENOSPC``) naming ``path``; the previous file is left as it was, and no temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_own_prefix(path), suffix=_TMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            writer = _WriteErrors(f)
            try:
                write(writer)
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as err:
                cause = writer.error if writer.error is not None else err
                if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
                    raise OSError(errno.ENOSPC, "No space left on device while saving (the previous file, "
                                  "if any, is unchanged)", str(path)) from err
                raise
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class _WriteErrors:
    """A binary file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch's zip writer
    reports it only as ``unexpected pos``, which names neither the disk nor the file."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self._file.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic writes (:func:`atomic_torch_save`), allow-listed reads.

    Set it on the Trainer with ``plugins: [{_target_: laps.training.checkpointing.AtomicCheckpointIO}]``
    (``configs/trainer/default.yaml``). Remote paths (``s3://`` and other fsspec URLs) are written by
    Lightning's own writer, which is not atomic.

    Loading always uses :func:`laps.compat.serialization.safe_load` (``weights_only=True`` with
    :data:`laps.compat.serialization.ALLOWED_GLOBALS`), whatever ``weights_only`` Lightning passes: a
    file that needs any other global is refused with
    :class:`laps.compat.serialization.UnsafeCheckpointError` naming it, and nothing in it runs.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        from laps.compat.serialization import safe_load

        if weights_only is not None and not weights_only:
            log.warning("a full unpickling of %s was asked for: refused, it is loaded with the allow-list", path)
        if not _is_local_file_protocol(path):
            raise ValueError(f"{path}: only local checkpoint files are loaded (copy it to a local disk first)")
        return safe_load(path)


# ---------------------------------------------------------------------------------------------- last.ckpt
class LastCheckpoint(Checkpoint):
    """Keep ``dirpath/filename`` (``last.ckpt``) current, for ``laps-train ... ckpt_path=last``.

    Written every ``every_n_train_steps`` optimizer steps (``null``/0: never mid-epoch) and at the end of
    every training epoch, after validation and after the best-checkpoint callback (checkpoint callbacks
    run last, in their configuration order). Writes go through the Trainer's ``CheckpointIO``
    (:class:`AtomicCheckpointIO`). The checkpoint holds what Lightning saves (weights, optimizer and
    scheduler states, loop progress, the training DataLoader's position, callback states) plus the
    module's own state (random generators, non-finite step counters).

    Args:
        dirpath: checkpoint folder (``${paths.output_dir}/checkpoints``).
        filename: file name in ``dirpath``.
        every_n_train_steps: save every this many optimizer steps.
        every_epoch: also save at the end of every training epoch.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        filename: str = "last.ckpt",
        every_n_train_steps: int | None = None,
        every_epoch: bool = True,
    ) -> None:
        super().__init__()
        n = int(every_n_train_steps or 0)
        if n < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (0 or null: only at epoch ends), got {n}")
        self.dirpath = Path(dirpath)
        self.filename = str(filename)
        self.every_n_train_steps = n
        self.every_epoch = bool(every_epoch)
        self._last_step_saved: int | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename, every_n_train_steps=self.every_n_train_steps)

    def _skip(self, trainer: Any) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def save(self, trainer: Any) -> None:
        # Lightning's save flag, not torch.load's: write the full state (optimizer, loops, RNG), everything
        # to resume. Every read of it goes through safe_load (weights_only=True, see above).
        trainer.save_checkpoint(str(self.path), weights_only=False)
        self._last_step_saved = trainer.global_step
        log.debug("saved %s at step %d", self.path, trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        if n and step > 0 and step % n == 0 and step != self._last_step_saved and not self._skip(trainer):
            self.save(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every_epoch and not self._skip(trainer):
            self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": str(self.dirpath), "filename": self.filename}

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # a run resumed with nothing left to fit (stopped in its final test) reports these
        checkpoint[VALIDATION_KEY] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def last_validation(checkpoint: dict[str, Any]) -> dict[str, float]:
    """The validation metrics at the time ``checkpoint`` was saved (empty when it holds none)."""
    return {str(k): float(v) for k, v in checkpoint.get(VALIDATION_KEY, {}).items()}


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """The global random generators, as tensors, ints and lists only (loadable with ``weights_only=True``).

    Keys: ``torch`` (CPU generator state), ``cuda`` (one state per device, when CUDA is initialised),
    ``python`` (``random.getstate()`` as a list), ``numpy`` (``numpy.random.get_state()`` with the key
    array as a tensor).
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = random.getstate()
    state["python"] = [int(version), list(internal), gauss]
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [str(name), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is a dependency of torch's ecosystem here
        pass
    return state


def restore_rng_state(state: dict[str, Any] | None) -> None:
    """Set the global random generators from :func:`capture_rng_state` output (missing keys are skipped)."""
    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint holds %d CUDA RNG states for %d devices: CUDA RNG not restored",
                        len(cuda), torch.cuda.device_count())
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
