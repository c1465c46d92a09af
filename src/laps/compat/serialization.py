"""Loading ``torch.save`` files without running code from them.

Every checkpoint this project reads goes through :func:`safe_load`: ``torch.load`` with
``weights_only=True`` and an explicit, short allow-list of globals. A file whose pickle
names anything else (a function to call, a class to build) is refused before that object
is created, with :class:`UnsafeCheckpointError` naming the file and the refused globals.

What is allowed, on top of torch's own weights-only set (tensors, dtypes, ``OrderedDict``,
``Counter``, ``set``, ...):

* ``argparse.Namespace``: the ``opt`` entry of official LAPS checkpoints.

Lightning checkpoints of this project need nothing more: hyper-parameters are saved as
plain dicts, and optimizer, scheduler, loop and callback states are dicts of primitives
and tensors. OmegaConf containers are deliberately *not* allowed (save ``to_container``
output instead).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from laps.models.state import state_mismatch

log = logging.getLogger(__name__)

ALLOWED_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)
"""Globals (beyond torch's weights-only defaults) that :func:`safe_load` accepts."""

_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL\s+([\w.]+)")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs globals outside the allow-list; nothing from it was executed.

    Attributes:
        path: the refused file.
        refused: the refused globals as ``module.name`` strings (may be empty when torch
            refused the file for another weights-only reason, given in the message).
    """

    def __init__(self, path: str | os.PathLike, refused: list[str], detail: str = "") -> None:
        self.path = str(path)
        self.refused = list(refused)
        names = ", ".join(self.refused) if self.refused else "(see detail)"
        message = (
            f"Refusing to load {self.path}: it needs global(s) outside the allow-list: {names}. "
            "Nothing from the file was executed. Only load files you trust; to allow a known, "
            "harmless class pass it in safe_load(..., extra_globals=[...])."
        )
        if detail:
            message += f" Detail: {detail}"
        super().__init__(message)


class DamagedCheckpointError(ValueError):
    """A file that is no readable checkpoint: empty, truncated, text, or a pickle of something else.
    The message starts with the path and says which."""


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def _check_readable(path: Path) -> None:
    """Refuse, before torch reads it, a file that cannot be a checkpoint."""
    with path.open("rb") as f:
        head = f.read(4)
    if not head:
        raise DamagedCheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if head != _ZIP_MAGIC and head[0] != _PICKLE_PROTO:
        raise DamagedCheckpointError(f"{path}: not a checkpoint (neither a torch zip archive nor a pickle)")


def check_state_shapes(path: str | os.PathLike, expected: dict[str, Any], found: dict[str, Any]) -> None:
    """Refuse a checkpoint's ``state_dict`` whose tensors do not fit the model: the first parameter of
    another shape with both shapes (another model size), or the first missing or unexpected key."""
    mismatch = state_mismatch(expected, found, source="checkpoint")
    if mismatch is not None:
        raise DamagedCheckpointError(f"{path}: another architecture: {mismatch}")


def _global_name(entry: Any) -> str:
    obj = entry[0] if isinstance(entry, tuple) else entry
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _refused_globals(path: Path, allowed: list[Any], error: BaseException) -> list[str]:
    """Names of the globals torch refused: a static scan of the pickle, else the error message."""
    allowed_names = {_global_name(a) for a in allowed}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) format or unreadable archive: fall back to the message
        found = []
    names = [n for n in found if n not in allowed_names]
    if not names:
        names = sorted(set(_GLOBAL_IN_MESSAGE.findall(str(error))))
    return names


def _unpickler_detail(error: BaseException) -> str:
    """The weights-only unpickler's own reason, without torch's advice to disable the check."""
    match = re.search(r"WeightsUnpickler error:\s*([^\n]*)", str(error))
    if match:
        return match.group(1).split(". Please use")[0].strip()
    return type(error).__name__


def safe_load(path: str | os.PathLike, extra_globals: Iterable[Any] = (), mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with :data:`ALLOWED_GLOBALS`.

    Args:
        path: a file written by ``torch.save``.
        extra_globals: further classes/functions to allow for this call only (entries as for
            ``torch.serialization.safe_globals``: the object, or ``(object, "module.name")``).
        mmap: map the tensors' storage instead of reading it (zip-format files only): a check
            of the pickle that costs next to nothing for large checkpoints.

    Returns:
        The unpickled object, tensors on the CPU.

    Raises:
        UnsafeCheckpointError: the file needs a global outside the allow-list.
        DamagedCheckpointError: an empty, truncated or text file, or a pickle of something else.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    _check_readable(path)
    allowed = [*ALLOWED_GLOBALS, *extra_globals]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            refused = _refused_globals(path, allowed, err)
            if not refused:
                raise DamagedCheckpointError(
                    f"{path}: not a checkpoint (a pickle torch cannot read without running code: "
                    f"{_unpickler_detail(err)})"
                ) from None
            log.warning("Refused unsafe checkpoint %s (globals: %s)", path, refused)
            raise UnsafeCheckpointError(path, refused, detail=_unpickler_detail(err)) from None
        except (EOFError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err) \
                    and "zip archive" not in str(err):
                raise
            raise DamagedCheckpointError(f"{path}: truncated or damaged (torch cannot read it: "
                                         f"{str(err).split('. ')[0] or type(err).__name__})") from None
