"""``laps-eval ckpt_path=...``: test a checkpoint on its dataset's test split and write ``metrics.json``."""

from __future__ import annotations

import logging

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from laps.cli.common import metrics_table, one_line_errors, register_resolvers, write_metrics
from laps.cli.train import build_datamodule, build_module, checkpoint_file, fit_caption_length
from laps.inference import disable_pretrained
from laps.paths import config_dir

log = logging.getLogger("laps")


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


def evaluate(cfg: DictConfig) -> dict[str, float]:
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
        metrics_table(metrics, f"{datamodule.name} {datamodule.splits['test']} ({datamodule.protocol} protocol)")
        write_metrics(metrics, cfg.paths.output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@one_line_errors
def _main(cfg: DictConfig) -> float | None:
    return evaluate(cfg).get("test/rsum")


def main() -> None:
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
