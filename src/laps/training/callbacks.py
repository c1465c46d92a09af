"""Callbacks around a training job: the sweep summary (Hydra) and the wandb run's final metrics.

``SweepSummary`` is a Hydra callback (registered in ``configs/hydra/default.yaml``): at the end of
``laps-train -m ...`` it collects every job's ``metrics.json`` and overrides into
``sweep_summary.csv`` and ``sweep_summary.md`` in the sweep directory and prints a table. It works
with any sweeper (the basic one, Optuna). This module imports neither torch nor Lightning at
import time: Hydra loads it before every job.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("laps")

KEY_METRICS = ("val/rsum_best", "val/rsum", "test/rsum", "test/i2t_R@1", "test/t2i_R@1", "test_1k/rsum")


# ---------------------------------------------------------------------------- sweeps


def _job_sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _parse_override(text: str) -> tuple[str, str]:
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), value


def collect_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One entry per job directory under ``sweep_dir``: ``job``, ``dir``, ``overrides``, ``metrics``.

    A job is a folder holding ``.hydra/overrides.yaml`` or ``metrics.json``; a job without
    ``metrics.json`` (failed, or still running) has ``metrics`` empty.
    """
    sweep_dir = Path(sweep_dir)
    dirs = {p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")}
    dirs |= {p.parent for p in sweep_dir.glob("**/metrics.json")}
    jobs = []
    for d in sorted(dirs, key=lambda p: _job_sort_key(str(p.relative_to(sweep_dir)))):
        overrides_file = d / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        metrics_file = d / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        jobs.append({"job": str(d.relative_to(sweep_dir)), "dir": str(d), "overrides": overrides, "metrics": metrics})
    return jobs


def swept_keys(jobs: Sequence[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs (all of them for a single job)."""
    values: dict[str, set[str]] = {}
    order: list[str] = []
    for job in jobs:
        for key, value in map(_parse_override, job["overrides"]):
            if key not in values:
                values[key] = set()
                order.append(key)
            values[key].add(value)
    if len(jobs) <= 1:
        return order
    present = [k for k in order if all(any(_parse_override(o)[0] == k for o in j["overrides"]) for j in jobs)]
    return [k for k in order if len(values[k]) > 1 or k not in present]


def summarize_sweep(
    sweep_dir: str | Path, key_metrics: Sequence[str] = KEY_METRICS, sort_by: str | None = None,
    filename: str = "sweep_summary", print_table: bool = True,
) -> tuple[Path, Path] | None:
    """Write ``{filename}.csv`` (every metric) and ``{filename}.md`` (key metrics) in ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_sweep(sweep_dir)
    if not jobs:
        log.warning("sweep summary: no job directories under %s", sweep_dir)
        return None
    keys = swept_keys(jobs)
    all_metrics = sorted({m for j in jobs for m in j["metrics"]})
    shown = [m for m in key_metrics if m in all_metrics] or all_metrics[:6]
    rows = []
    for job in jobs:
        over = dict(map(_parse_override, job["overrides"]))
        rows.append({
            "job": job["job"],
            "status": "ok" if job["metrics"] else "no metrics.json",
            **{k: over.get(k, "") for k in keys},
            **{m: job["metrics"].get(m, "") for m in all_metrics},
        })
    best = None
    sort_by = sort_by or next((m for m in ("val/rsum_best", "val/rsum", "test/rsum") if m in all_metrics), None)
    scored = [r for r in rows if isinstance(r.get(sort_by), (int, float))] if sort_by else []
    if scored:
        best = max(scored, key=lambda r: r[sort_by])["job"]

    csv_path = sweep_dir / f"{filename}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", "status", *keys, *all_metrics])
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    header = ["job", *keys, *shown, "status"]
    lines = [f"# Sweep summary: {sweep_dir}", ""]
    if best is not None:
        lines += [f"Best by `{sort_by}`: job {best} (marked *).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        job = f"{r['job']} *" if r["job"] == best else r["job"]
        lines.append("| " + " | ".join([job, *(fmt(r[c]) for c in header[1:])]) + " |")
    md_path = sweep_dir / f"{filename}.md"
    md_path.write_text("\n".join(lines) + "\n")

    if print_table:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"sweep {sweep_dir.name}: {len(rows)} jobs" + (f", best by {sort_by}: {best}" if best else ""))
        for c in header:
            table.add_column(c, justify="right" if c in shown else "left")
        for r in rows:
            style = "bold green" if r["job"] == best else None
            table.add_row(*(fmt(r[c]) for c in header), style=style)
        Console().print(table)
    log.info("sweep summary written to %s and %s", csv_path, md_path)
    return csv_path, md_path


class SweepSummary(Callback):
    """Hydra callback: a table of every job's metrics at the end of a multirun (rank 0 only).

    Args:
        filename: stem of the files written in the sweep directory.
        key_metrics: the metrics of the Markdown and printed tables (the CSV has all of them).
        sort_by: the metric that picks the best job (default ``val/rsum_best``, the best epoch's, else
            ``val/rsum``, else ``test/rsum``).
    """

    def __init__(self, filename: str = "sweep_summary", key_metrics: Sequence[str] = KEY_METRICS,
                 sort_by: str | None = None) -> None:
        self.filename = filename
        self.key_metrics = tuple(key_metrics)
        self.sort_by = sort_by

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from laps.training.launch import global_rank_from_env

        if global_rank_from_env() != 0:  # torchrun/SLURM: every rank ran the sweep; one writes the summary
            return
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if sweep_dir.is_dir():
                summarize_sweep(sweep_dir, self.key_metrics, self.sort_by, self.filename)
        except Exception as err:  # noqa: BLE001 - a summary never fails the sweep
            log.warning("sweep summary failed: %s", err)


# ---------------------------------------------------------------------------- wandb


def _wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_api_key() -> str | None:
    """``WANDB_API_KEY``, or the key ``wandb login`` stored in ``~/.netrc`` (``NETRC``)."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    import netrc

    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        auth = netrc.netrc(path).authenticators(_wandb_host()[0])
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


@functools.lru_cache(maxsize=4)
def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_offline() -> bool:
    """Offline unless ``WANDB_MODE=online`` with an API key and a reachable server; never uploads by surprise."""
    if os.environ.get("WANDB_MODE", "offline").lower() != "online":
        return True
    if not wandb_api_key():
        log.warning("WANDB_MODE=online but no wandb API key (WANDB_API_KEY or `wandb login`): logging offline")
        return True
    host, port = _wandb_host()
    if not _reachable(host, port):
        log.warning("WANDB_MODE=online but %s:%d cannot be reached: logging offline", host, port)
        return True
    return False


def finish_loggers(loggers: Iterable[Any], metrics: dict[str, float]) -> None:
    """End of a job: each wandb run gets the final metrics (a table and its summary) and is finished.

    Only runs that exist are touched (rank 0; other ranks' loggers have none).
    """
    from laps.metrics import metrics_rows
    from laps.training.launch import finish_wandb

    for lg in loggers:
        run = getattr(lg, "_experiment", None)
        if type(lg).__name__ != "WandbLogger" or run is None or not hasattr(run, "summary"):
            continue
        import wandb

        columns, rows = metrics_rows(metrics)
        if rows:
            run.log({"final/metrics": wandb.Table(columns=columns, data=rows)})
        for key, value in metrics.items():
            run.summary[f"final/{key}"] = float(value)
        finish_wandb(run)
