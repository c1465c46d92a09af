"""The tasks beneath ``laps-train`` and ``laps-eval``: :func:`train` fits and tests a model,
:func:`evaluate` tests a checkpoint. Each returns its metrics and writes ``metrics.json`` in the
run directory (rank zero); the command prints them (``report``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from laps.models.hub import check_pretrained_available, disable_pretrained
from laps.training.callbacks import finish_loggers

log = logging.getLogger("laps")

# The command's printer of the test metrics: ``report(metrics, title)``, called on rank zero only.
Report = Callable[[dict[str, float], str], None]

_NUMBERS = ("model.optimizer.lr", "model.optimizer.weight_decay", "model.margin", "model.ratio_weight",
            "model.backbone_lr_mult", "model.pooled_weight", "trainer.gradient_clip_val")


# ---------------------------------------------------------------------------- building blocks
def validate_config(cfg: DictConfig) -> None:
    """Checks that need no model or data, naming the key at fault (``dataset.batch_size`` is the
    data module's, checked when it is built, before any data is read)."""
    for key in ("ratios.sparse_ratio", "ratios.aggr_ratio"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{key} must be in (0, 1], got {value!r}")
    for key in _NUMBERS:
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key} must be a number, got {value!r}")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator") or "")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: "
                         "use trainer=cpu or trainer=default")


def write_metrics(metrics: dict[str, float], output_dir: str | Path) -> Path:
    """``metrics.json`` in ``output_dir``: every metric, keys sorted."""
    path = Path(output_dir) / "metrics.json"
    path.write_text(json.dumps({k: float(v) for k, v in sorted(metrics.items())}, indent=2))
    log.info("metrics written to %s", path)
    return path


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The run's data module (``cfg.dataset``), its data prepared (the synthetic set generated)."""
    datamodule = hydra.utils.instantiate(cfg.dataset)
    datamodule.prepare_data()
    return datamodule


def _check_vocab(tokenizer: Any, vocab_size: int, net: Any) -> None:
    model_vocab = int(net.text.backbone.config.vocab_size)
    if vocab_size > model_vocab:
        raise ValueError(
            f"the tokenizer ({tokenizer}) has {vocab_size} tokens but the text model only "
            f"{model_vocab}: use the model's own tokenizer (dataset.tokenizer)"
        )


def build_module(cfg: DictConfig, vocab_size: int) -> L.LightningModule:
    """The LightningModule; a random text model without a set vocabulary gets the tokenizer's size."""
    extra = {} if cfg.backbone.text.get("vocab_size") else {"net": {"text": {"vocab_size": vocab_size}}}
    module = hydra.utils.instantiate(cfg.model, **extra)
    _check_vocab(cfg.dataset.tokenizer, vocab_size, module.net)
    module.config_snapshot = OmegaConf.to_container(cfg, resolve=True)
    module.output_dir = Path(cfg.paths.output_dir)
    if cfg.get("compile"):  # in place: parameter names (optimizer groups, checkpoints) stay as they are
        module.net.vision.compile()
        module.net.text.compile()
    return module


def fit_caption_length(datamodule: Any, module: L.LightningModule) -> None:
    """Cut captions to the text encoder's positions ([CLS] and [SEP] included) when dataset.max_words
    asks for more; the truncations are counted and logged every epoch."""
    positions = int(getattr(module.net.text, "max_length", 0) or 0)
    max_words = getattr(datamodule, "max_words", None)
    if positions <= 2 or max_words is None or int(max_words) <= positions - 2:
        return
    log.warning(
        "dataset.max_words=%d word pieces plus [CLS]/[SEP] exceed the text encoder's %d positions: "
        "captions are truncated to %d word pieces", max_words, positions, positions - 2,
    )
    datamodule.max_words = positions - 2
    datamodule.tokenizer.max_words = positions - 2
    snapshot = getattr(module, "config_snapshot", None) or {}
    if isinstance(snapshot.get("dataset"), dict):
        snapshot["dataset"]["max_words"] = positions - 2  # laps-eval then tokenizes the same way


def checkpoint_file(ckpt_path: str | None, output_dir: str) -> Path | None:
    """``last`` -> the run directory's ``checkpoints/last.ckpt``, else the path; it must exist."""
    if not ckpt_path:
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no checkpoint at {path}")
    return path


def resolve_ckpt(ckpt_path: str | None, output_dir: str) -> str | None:
    """:func:`checkpoint_file`, checked as safe to load before any data is read."""
    from laps.compat.serialization import safe_load

    path = checkpoint_file(ckpt_path, output_dir)
    if path is None:
        return None
    # refuses anything but tensors and plain containers before Lightning reads it; the tensors are
    # only mapped, not read (Lightning's own read goes through the same allow-list)
    checkpoint = safe_load(path, mmap=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a laps-train checkpoint (no state_dict)")
    return str(path)


def _test_title(datamodule: Any) -> str:
    return f"{datamodule.name} {datamodule.splits['test']} ({datamodule.protocol} protocol)"


# ---------------------------------------------------------------------------- train
def train(cfg: DictConfig, report: Report | None = None) -> dict[str, float]:
    """Fit, then test the best checkpoint; returns every logged metric (``val/...`` of the last epoch,
    ``val/..._best`` the monitored metric's best value, ``test/...``). With ``train=false`` the
    ``ckpt_path`` checkpoint is tested."""
    validate_config(cfg)
    check_pretrained_available(cfg.get("backbone"))  # offline: fail before reading any data
    ckpt = resolve_ckpt(cfg.get("ckpt_path"), cfg.paths.output_dir)
    fitting = cfg.get("train", True)
    if not fitting and cfg.get("test", True) and ckpt is None:
        raise ValueError("train=false tests a checkpoint: set ckpt_path=... (or use laps-eval)")
    datamodule = build_datamodule(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, datamodule.vocab_size)
    fit_caption_length(datamodule, module)
    loggers = instantiate_list(cfg.get("logger"))
    callbacks = instantiate_list(cfg.get("callbacks"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(module.config_snapshot)  # the resolved config, caption length fitted

    if ckpt is not None:  # another model size: name the parameter and both shapes, before Lightning reads it
        from laps.compat.serialization import check_state_shapes, safe_load

        check_state_shapes(ckpt, module.state_dict(), safe_load(ckpt, mmap=True)["state_dict"])
    if fitting:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    checkpointing = trainer.checkpoint_callback
    if fitting and checkpointing is not None and checkpointing.best_model_score is not None:
        metrics[f"{checkpointing.monitor}_best"] = float(checkpointing.best_model_score)

    if cfg.get("test", True) and not trainer.fast_dev_run:
        best = (checkpointing.best_model_path if checkpointing else "") if fitting else ckpt
        if best:
            log.info("testing %s", best)  # read with the allow-list by the trainer's checkpoint IO
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        test = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}
        metrics.update(test)
        if trainer.is_global_zero and report is not None:
            report(test, _test_title(datamodule))
    if trainer.is_global_zero:
        write_metrics(metrics, cfg.paths.output_dir)
    finish_loggers(loggers, metrics)  # wandb: the final metrics table, then the job's run is finished
    return metrics


# ---------------------------------------------------------------------------- evaluate
def _on_command_line(key: str) -> bool:
    """Whether this Hydra run's overrides set ``key`` (``key=``, ``+key=`` or ``++key=``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    return any(o.lstrip("+").split("=", 1)[0] == key for o in HydraConfig.get().overrides.task)


def run_config(cfg: DictConfig, checkpoint: dict) -> DictConfig:
    """The training run's configuration stored in the checkpoint, with ``overrides`` applied.

    A dataset group on the command line (``dataset=f30k``) replaces the stored dataset config, except
    its ``tokenizer``, which stays the checkpoint's unless ``dataset.tokenizer=`` is given too.
    """
    stored = checkpoint.get("laps_config")
    if not stored:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path} holds no laps configuration: it was not written by laps-train "
            "(official LAPS checkpoints: convert them with laps-import-official first)"
        )
    replace: dict = {}
    if cfg.get("dataset"):
        replace["dataset"] = OmegaConf.to_container(cfg.dataset, resolve=False)
        stored_tokenizer = OmegaConf.select(OmegaConf.create(stored), "dataset.tokenizer")
        if stored_tokenizer is not None and not _on_command_line("dataset.tokenizer"):
            # the vocabulary belongs to the model's word embeddings, not to the dataset
            replace["dataset"]["tokenizer"] = stored_tokenizer
    merged = OmegaConf.merge(OmegaConf.create(stored), replace, cfg.get("overrides") or {})
    merged.paths.output_dir = cfg.paths.output_dir
    disable_pretrained(merged)
    merged.model.save_sims = bool(cfg.get("save_sims", False))
    return merged


def evaluate(cfg: DictConfig, report: Report | None = None) -> dict[str, float]:
    """Rebuild the model from the checkpoint, test it, return the ``test/...`` metrics."""
    from laps.compat.serialization import check_state_shapes, safe_load

    path = checkpoint_file(cfg.ckpt_path, cfg.paths.output_dir)
    checkpoint = safe_load(path)
    run_cfg = run_config(cfg, checkpoint)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(run_cfg)
    module = build_module(run_cfg, datamodule.vocab_size)
    fit_caption_length(datamodule, module)  # a dataset from the command line may ask for longer captions
    check_state_shapes(path, module.state_dict(), checkpoint["state_dict"])
    module.load_state_dict(checkpoint["state_dict"])
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}
    if trainer.is_global_zero:
        if report is not None:
            report(metrics, _test_title(datamodule))
        write_metrics(metrics, cfg.paths.output_dir)
    return metrics
