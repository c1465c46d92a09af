"""Shared plumbing of the command-line tasks: resolvers, one-line errors, result tables."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

# Errors a user can fix from the command line: reported in one line, not as a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, OSError, KeyError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """:data:`USER_ERRORS` plus the project's own RuntimeErrors that name their fix (no weights or
    tokenizer offline, a refused checkpoint)."""
    from laps.compat.serialization import UnsafeCheckpointError
    from laps.data.tokenization import TokenizerUnavailableError
    from laps.models.hub import BackboneUnavailableError

    return (*USER_ERRORS, BackboneUnavailableError, TokenizerUnavailableError, UnsafeCheckpointError)


def _wandb_offline() -> bool:
    """wandb runs offline unless WANDB_MODE=online was asked for, with an API key and the server
    reachable (never uploads by surprise)."""
    from laps.training.callbacks import wandb_offline

    return wandb_offline()


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("laps_wandb_offline"):
        OmegaConf.register_new_resolver("laps_wandb_offline", _wandb_offline)
    if not OmegaConf.has_resolver("laps_job_label"):  # a logger run per job: names and sweep groups
        from laps.training.launch import job_label, run_group, run_stamp

        OmegaConf.register_new_resolver("laps_job_label", job_label)
        OmegaConf.register_new_resolver("laps_run_group", run_group)
        OmegaConf.register_new_resolver("laps_run_stamp", run_stamp)  # one folder for all ranks
    if not OmegaConf.has_resolver("laps_first"):  # run_name=NAME, else the job's stamp
        OmegaConf.register_new_resolver("laps_first", _first_set)


def _first_set(*values: object) -> object:
    """The first value that is set (not ``None`` nor empty)."""
    return next((v for v in values if v not in (None, "")), None)


def user_error(err: BaseException) -> BaseException | None:
    """The exception to report in one line, unwrapping Hydra's instantiation wrapper, or None."""
    from hydra.errors import InstantiationException

    seen = err
    while isinstance(seen, InstantiationException) and seen.__cause__ is not None:
        seen = seen.__cause__
    return seen if isinstance(seen, _user_errors()) else None


def error_message(err: BaseException) -> str:
    """The first line of ``err``'s message; for an error re-raised from a DataLoader worker (``Caught X in
    DataLoader worker process N. Original Traceback ...``), the first line of the original message."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        prefix = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type(err).__name__)}: ")
        for line in lines[1:]:
            if prefix.match(line):
                return prefix.sub("", line, count=1).strip()
    return lines[0]


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Report user errors as ``error: ...`` and exit 2; ``HYDRA_FULL_ERROR=1`` shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # filtered just below
            cause = user_error(err)
            if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {error_message(cause)}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def metrics_table(metrics: dict[str, float], title: str) -> None:
    """Print a rich table of retrieval metrics grouped by prefix (``test/``, ``test_1k/``)."""
    from rich.console import Console
    from rich.table import Table

    from laps.metrics import metrics_rows

    columns, rows = metrics_rows(metrics)
    table = Table(title=title)
    for i, name in enumerate(columns):
        table.add_column(name, justify="right" if i >= 2 else "left")
    for row in rows:
        table.add_row(*row[:2], *("" if v is None else f"{v:.1f}" for v in row[2:]))
    Console().print(table)
