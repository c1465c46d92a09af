"""``laps-train``: train LAPS, validate on the dev split each epoch, test the best checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from laps.cli.common import metrics_table, one_line_errors, register_resolvers, validate_config, write_metrics
from laps.models.hub import check_pretrained_available
from laps.paths import config_dir
from laps.training.callbacks import finish_loggers
from laps.training.launch import hydra_job

log = logging.getLogger("laps")


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    datamodule = hydra.utils.instantiate(cfg.dataset)
    datamodule.prepare_data()
    return datamodule


def build_module(cfg: DictConfig, vocab_size: int) -> L.LightningModule:
    """The LightningModule; a random text model without a set vocabulary gets the tokenizer's size."""
    extra = {} if cfg.backbone.text.get("vocab_size") else {"net": {"text": {"vocab_size": vocab_size}}}
    module = hydra.utils.instantiate(cfg.model, **extra)
    model_vocab = int(module.net.text.backbone.config.vocab_size)
    if vocab_size > model_vocab:
        raise ValueError(
            f"the tokenizer ({cfg.dataset.tokenizer}) has {vocab_size} tokens but the text model only "
            f"{model_vocab}: use the model's own tokenizer (dataset.tokenizer)"
        )
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


def train(cfg: DictConfig) -> dict[str, float]:
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
        if trainer.is_global_zero:
            metrics_table(test, f"{datamodule.name} {datamodule.splits['test']} ({datamodule.protocol} protocol)")
    if trainer.is_global_zero:
        write_metrics(metrics, cfg.paths.output_dir)
    finish_loggers(loggers, metrics)  # wandb: the final metrics table, then the job's run is finished
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@one_line_errors
def _main(cfg: DictConfig) -> float | None:
    with hydra_job():  # multirun x DDP: children run this job only, in its folder; clean state after it
        metrics = train(cfg)
    if cfg.get("optimized_metric"):  # hparams_search: what the sweeper optimizes (never the test split)
        return metrics.get(cfg.optimized_metric)
    return metrics.get("test/rsum", metrics.get("val/rsum"))


def main() -> None:
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
