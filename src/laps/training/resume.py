"""Resubmission: ``ckpt_path=auto`` and the run folder's record of its configuration and loggers.

A run folder of ``laps-train`` holds ``laps_config.yaml`` (the resolved configuration, written when
the run starts), ``checkpoints/last.ckpt`` while it trains and ``metrics.json`` once it has tested.
The identical command resubmitted (``run_name=NAME ckpt_path=auto``, the same folder) then:

* trains from scratch when the folder holds no ``last.ckpt``;
* resumes ``last.ckpt`` when it does, after checking that the configuration is the stored one
  (:class:`ConfigChangedError` names the keys that differ);
* does nothing when ``metrics.json`` is there: the run is finished (:func:`finished_metrics`).

A wandb run continues through the id kept in ``wandb_id`` (:func:`wandb_run_id`).
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "ConfigChangedError", "config_differences", "finished_metrics", "record_config",
           "resolve_auto", "wandb_run_id"]

CONFIG_NAME = "laps_config.yaml"
WANDB_ID_NAME = "wandb_id"
# Keys a resubmission may change: where it runs from and what watches it, not what it computes.
_FREE = ("ckpt_path", "paths.", "hydra.", "logger.", "callbacks.", "trainer.enable_progress_bar", "trainer.preemption_signals")


class ConfigChangedError(ValueError):
    """The run folder holds a run of another configuration."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _compared(cfg: DictConfig | dict) -> dict[str, Any]:
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return {k: v for k, v in _flat(tree).items() if not k.startswith(_FREE) and k != "ckpt_path"}


def config_differences(stored: dict, current: DictConfig | dict) -> list[str]:
    """``key: stored -> current`` for every key that differs (paths, loggers, callbacks and ``ckpt_path`` excepted)."""
    old, new = _compared(stored), _compared(current)
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]


def record_config(cfg: DictConfig, folder: str | Path) -> None:
    """Write ``laps_config.yaml`` in the run folder (rank zero, at the start of a run)."""
    from laps.training.checkpointing import atomic_write_text

    atomic_write_text(Path(folder) / CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.create(
        OmegaConf.to_container(cfg, resolve=True))))


def check_same_config(cfg: DictConfig, folder: str | Path) -> None:
    """:class:`ConfigChangedError` when the folder's ``laps_config.yaml`` differs from ``cfg``."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return
    stored = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    diff = config_differences(stored, cfg)
    if diff:
        shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
        raise ConfigChangedError(f"ckpt_path=auto: {folder} holds a run of another configuration ({shown}): "
                                 "resubmit it unchanged, or choose another run_name")


def finished_metrics(folder: str | Path) -> dict[str, float] | None:
    """The metrics of a finished run in ``folder`` (its ``metrics.json``), else ``None``."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return None
    try:
        return {k: float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a metrics file ({err}); delete it to train the run again") from None


def resolve_auto(folder: str | Path) -> str | None:
    """``ckpt_path=auto``: the folder's ``checkpoints/last.ckpt`` when there is one, else ``None`` (fresh)."""
    path = Path(folder) / "checkpoints" / "last.ckpt"
    if path.is_file():
        log.info("ckpt_path=auto: resuming %s", path)
        return "last"
    log.info("ckpt_path=auto: no checkpoint in %s, training from scratch", path.parent)
    return None


def wandb_run_id(folder: str | Path, create: bool) -> str | None:
    """The wandb run id kept in the run folder (``wandb_id``); with ``create``, a new one is written
    when there is none (rank zero)."""
    path = Path(folder) / WANDB_ID_NAME
    if path.is_file():
        return path.read_text().strip() or None
    if not create:
        return None
    run_id = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id
