"""The tasks beneath ``laps-train`` and ``laps-eval``: :func:`train` fits and tests a model,
:func:`evaluate` tests a checkpoint or an exported model folder. Each returns its metrics and
writes ``metrics.json`` in the run directory (rank zero); the command prints them (``report``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from laps.models.head import check_ratio
from laps.models.hub import check_pretrained_available, disable_pretrained
from laps.training.callbacks import finish_loggers
from laps.training.checkpointing import atomic_write_text, last_validation
from laps.training.csv_logger import ContinueCSV, ResumableCSVLogger
from laps.training.preemption import PreemptionHandler
from laps.training.resume import (
    check_same_config,
    finished_metrics,
    record_config,
    resolve_auto,
    wandb_run_id,
)
from laps.training.runlock import is_first_process, run_folder_lock

log = logging.getLogger("laps")

# The command's printer of the test metrics: ``report(metrics, title)``, called on rank zero only.
Report = Callable[[dict[str, float], str], None]

_NUMBERS = ("model.optimizer.lr", "model.optimizer.weight_decay", "model.margin", "model.ratio_weight",
            "model.backbone_lr_mult", "model.pooled_weight", "trainer.gradient_clip_val")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Settings of an exported folder's ``config.json`` ``data`` that replace the dataset group's.
_FOLDER_DATA = ("max_words", "image_size", "image_mean", "image_std", "protocol")


# ---------------------------------------------------------------------------- building blocks
def validate_config(cfg: DictConfig) -> None:
    """Checks that need no model or data, naming the key at fault (``dataset.batch_size`` is the
    data module's, checked when it is built, before any data is read)."""
    for key in ("ratios.sparse_ratio", "ratios.aggr_ratio"):
        check_ratio(key, OmegaConf.select(cfg, key))
    for key in _NUMBERS:
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key} must be a number, got {value!r}")
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator") or "")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU: "
                         "use trainer=cpu or trainer=default")


def write_metrics(metrics: dict[str, float], output_dir: str | Path) -> Path:
    """``metrics.json`` in ``output_dir``: every metric, keys sorted; written atomically (its presence
    marks a finished run for ``ckpt_path=auto``)."""
    path = Path(output_dir) / "metrics.json"
    atomic_write_text(path, json.dumps({k: float(v) for k, v in sorted(metrics.items())}, indent=2))
    log.info("metrics written to %s", path)
    return path


def build_trainer(trainer_cfg: DictConfig, **kwargs: Any) -> L.Trainer:
    """The Trainer of ``cfg.trainer``; ``preemption_signals`` is the pre-emption callback's, not the Trainer's."""
    options = {k: v for k, v in trainer_cfg.items() if k != "preemption_signals"}
    return hydra.utils.instantiate(OmegaConf.create(options), **kwargs)


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
    """The LightningModule; a random text model without a set vocabulary gets the tokenizer's size.
    ``model.init_from`` is recorded by the module; :func:`train` loads it."""
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
    if ckpt_path == "auto":
        raise ValueError("ckpt_path=auto resumes a training run (laps-train); give a checkpoint's path here")
    if not ckpt_path:
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if path.is_dir():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: {path} is a folder, not a checkpoint (an exported model "
                                "folder: fine-tune from it with model.init_from=..., test it with laps-eval)")
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


# ---------------------------------------------------------------------------- fine-tuning from a folder
def init_from_folder(init_from: str) -> Path:
    """The folder (or hub id ``owner/name``, through the cache) of ``model.init_from``, its
    ``config.json`` checked, before any data is read."""
    from laps.models.pretrained import read_config, resolve_folder

    local = Path(str(init_from)).expanduser()
    if local.is_file():
        raise ValueError(f"model.init_from={init_from} is a file, not an exported model folder "
                         "(resume or test a checkpoint with ckpt_path=...)")
    if not local.is_dir() and not _HUB_ID.fullmatch(str(init_from)):
        raise FileNotFoundError(f"model.init_from={init_from}: no such folder (nor a hub id owner/name)")
    folder = resolve_folder(str(init_from))
    read_config(folder)
    return folder


def load_initial_weights(module: L.LightningModule, folder: Path) -> None:
    """Copy the weights of an exported model folder into ``module.net``, strictly: a missing, extra
    or wrongly shaped tensor is one :class:`~laps.models.pretrained.PretrainedFormatError` naming it
    and the folder. Weights only: the optimizer and the schedule start fresh."""
    from laps.models.pretrained import WEIGHTS_NAME, check_state, load_folder

    # Building the folder's model draws a random initialisation: the run keeps its own random streams.
    with torch.random.fork_rng(devices=[]):
        state = load_folder(folder).state_dict()
    check_state(folder / WEIGHTS_NAME, module.net.state_dict(), state)
    module.net.load_state_dict(state, strict=True)
    log.info("model.init_from: the weights of %s (the optimizer starts fresh)", folder)


# ---------------------------------------------------------------------------- train
def train(cfg: DictConfig, report: Report | None = None) -> dict[str, float]:
    """Fit, then test the best checkpoint; returns every logged metric (``val/...`` of the last epoch,
    ``val/..._best`` the monitored metric's best value, ``test/...``). With ``train=false`` the
    ``ckpt_path`` checkpoint is tested. ``model.init_from`` (an exported folder) gives the initial
    weights of a fit that does not resume a checkpoint. The run folder is locked while it runs
    (:mod:`laps.training.runlock`): a second run on it is refused before it reads or changes anything.

    ``ckpt_path=auto`` (:mod:`laps.training.resume`): resume the folder's ``last.ckpt`` if any, else
    start fresh; a finished run (its ``metrics.json``) is not trained again, its metrics are returned.
    A pre-emption signal raises :class:`~laps.training.preemption.Preempted` once ``last.ckpt`` is saved."""
    validate_config(cfg)
    with run_folder_lock(cfg.paths.output_dir, enabled=is_first_process()):
        return _train(cfg, report)


def _resume_point(cfg: DictConfig) -> tuple[str | None, dict[str, float] | None]:
    """``ckpt_path`` with ``auto`` resolved, or the metrics of the finished run in the folder."""
    folder, ckpt_path = cfg.paths.output_dir, cfg.get("ckpt_path")
    if ckpt_path != "auto":
        return ckpt_path, None
    done = finished_metrics(folder)
    if done is not None:
        return None, done
    check_same_config(cfg, folder)
    return resolve_auto(folder), None


def continue_wandb(logger_cfg: DictConfig | None, folder: str) -> None:
    """A wandb logger gets the run folder's wandb run id (created on the first run) and ``resume="allow"``."""
    for entry in (logger_cfg or {}).values():
        if isinstance(entry, DictConfig) and str(entry.get("_target_", "")).endswith("WandbLogger"):
            with open_dict(entry):
                entry.id = entry.get("id") or wandb_run_id(folder, create=is_first_process())
                entry.resume = entry.get("resume") or "allow"


def _train(cfg: DictConfig, report: Report | None) -> dict[str, float]:
    check_pretrained_available(cfg.get("backbone"))  # offline: fail before reading any data
    ckpt_path, done = _resume_point(cfg)
    if done is not None:
        log.info("%s holds a finished run (metrics.json): not trained again", cfg.paths.output_dir)
        if report is not None:
            report({k: v for k, v in done.items() if k.startswith("test")}, f"{cfg.paths.output_dir} (finished)")
        return done
    callbacks = instantiate_list(cfg.get("callbacks"))
    handlers = [c for c in callbacks if isinstance(c, PreemptionHandler)]
    with contextlib.ExitStack() as stack:
        for handler in handlers:  # from here on a signal is recorded, not fatal
            stack.enter_context(handler.installed())
        return _fit_and_test(cfg, report, ckpt_path, callbacks)


def _fit_and_test(cfg: DictConfig, report: Report | None, ckpt_path: str | None,
                  callbacks: list[Any]) -> dict[str, float]:
    ckpt = resolve_ckpt(ckpt_path, cfg.paths.output_dir)
    fitting = cfg.get("train", True)
    if not fitting and cfg.get("test", True) and ckpt is None:
        raise ValueError("train=false tests a checkpoint: set ckpt_path=... (or use laps-eval)")
    init_from = OmegaConf.select(cfg, "model.init_from")
    initial = init_from_folder(init_from) if init_from and fitting and ckpt is None else None
    if init_from and ckpt is not None:
        log.info("ckpt_path=%s holds every weight: model.init_from=%s is not read", ckpt, init_from)
    datamodule = build_datamodule(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, datamodule.vocab_size)
    fit_caption_length(datamodule, module)
    if initial is not None:
        load_initial_weights(module, initial)
    if fitting and is_first_process():
        record_config(cfg, cfg.paths.output_dir)  # what a resubmission with ckpt_path=auto is checked against
    continue_wandb(cfg.get("logger"), cfg.paths.output_dir)
    loggers = instantiate_list(cfg.get("logger"))
    if any(isinstance(logger, ResumableCSVLogger) for logger in loggers):
        callbacks = [*callbacks, ContinueCSV()]
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(module.config_snapshot)  # the resolved config, caption length fitted

    saved: dict[str, Any] = {}
    if ckpt is not None:  # another model size: name the parameter and both shapes, before Lightning reads it
        from laps.compat.serialization import check_state_shapes, safe_load

        saved = safe_load(ckpt, mmap=True)
        check_state_shapes(ckpt, module.state_dict(), saved["state_dict"])
    if fitting:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if fitting and not metrics:  # the checkpoint's fit was complete (the run stopped in its test)
        metrics = last_validation(saved)
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


def folder_config(cfg: DictConfig, folder: Path) -> DictConfig:
    """The evaluation configuration of an exported model folder: the command line's dataset group
    (``dataset=f30k dataset.root=...``) with the folder's data settings (``config.json``'s ``data``:
    the tokenizer is the folder's, ``max_words``, image size, normalisation, protocol), then ``overrides``.
    A ``dataset.KEY=`` on the command line wins over the folder's setting."""
    from laps.models.pretrained import CONFIG_NAME, PretrainedFormatError, read_config

    stored = read_config(folder)
    if not cfg.get("dataset"):
        raise ValueError(f"ckpt_path={cfg.ckpt_path} is a model folder, which records no dataset location: "
                         "name it with dataset=f30k|coco|synthetic dataset.root=/path/to/data")
    data = stored.get("data")
    if not data:
        raise PretrainedFormatError(f"{folder / CONFIG_NAME}: no data section (tokenizer, max_words, image size): "
                                    "write the folder with laps-export")
    settings = {k: data[k] for k in _FOLDER_DATA if k in data}
    settings["tokenizer"] = str(folder / str(data.get("tokenizer", ".")))
    settings.setdefault("image_size", int(stored["vision"]["image_size"]))
    dataset = OmegaConf.to_container(cfg.dataset, resolve=False)
    dataset.update({k: v for k, v in settings.items() if not _on_command_line(f"dataset.{k}")})
    training = stored.get("training") or {}
    run = OmegaConf.create({
        # the folder's geometry, for what a dataset group reads from the backbone (the synthetic set's size)
        "backbone": {"image_size": settings["image_size"], "image_mean": settings.get("image_mean"),
                     "image_std": settings.get("image_std")},
        "paths": OmegaConf.to_container(cfg.paths, resolve=True),
        "dataset": dataset,
        "model": {"pooled_weight": float(training.get("pooled_weight", 0.0))},
    })
    merged = OmegaConf.merge(run, cfg.get("overrides") or {})
    merged.paths.output_dir = cfg.paths.output_dir
    merged.model.save_sims = bool(cfg.get("save_sims", False))
    return merged


def folder_module(run_cfg: DictConfig, folder: Path, vocab_size: int) -> L.LightningModule:
    """The LightningModule around the model of an exported folder (``LAPSModel.from_pretrained``), for testing."""
    from laps.models import LAPSModel
    from laps.training.module import LAPSLitModule

    net = LAPSModel.from_pretrained(folder)
    _check_vocab(run_cfg.dataset.tokenizer, vocab_size, net)
    head = net.head
    module = LAPSLitModule(
        net, optimizer=torch.optim.AdamW,  # never stepped: the module only tests
        **{k: getattr(head, k) for k in ("selection", "attention_weight", "gumbel_tau", "pooling") if hasattr(head, k)},
        **OmegaConf.to_container(run_cfg.model, resolve=True),
    )
    module.config_snapshot = OmegaConf.to_container(run_cfg, resolve=True)
    module.output_dir = Path(run_cfg.paths.output_dir)
    return module


def _seeded_datamodule(cfg: DictConfig, run_cfg: DictConfig) -> L.LightningDataModule:
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    return build_datamodule(run_cfg)


def evaluate(cfg: DictConfig, report: Report | None = None) -> dict[str, float]:
    """Rebuild the model of ``ckpt_path`` (a checkpoint, or a model folder written by ``laps-export``),
    test it, return the ``test/...`` metrics; a list of them: their ensemble (:func:`evaluate_ensemble`);
    with ``sims`` evaluate saved matrices instead."""
    if cfg.get("sims"):
        return evaluate_sims(cfg, report)
    if OmegaConf.select(cfg, "ckpt_path") is None:
        raise ValueError("laps-eval needs ckpt_path=... (a checkpoint or an exported folder) or sims=...")
    if OmegaConf.is_list(cfg.ckpt_path):
        return evaluate_ensemble(cfg, report)
    metrics, datamodule, is_zero = _test_model(cfg)
    if is_zero:
        if report is not None:
            report(metrics, _test_title(datamodule))
        write_metrics(metrics, cfg.paths.output_dir)
    return metrics


def _test_model(cfg: DictConfig) -> tuple[dict[str, float], L.LightningDataModule, bool]:
    """Test the model of ``cfg.ckpt_path``: its ``test/...`` metrics, the data module, whether this is rank zero."""
    from laps.compat.serialization import check_state_shapes, safe_load

    if Path(str(cfg.ckpt_path)).is_dir():
        folder = Path(str(cfg.ckpt_path))
        run_cfg = folder_config(cfg, folder)
        datamodule = _seeded_datamodule(cfg, run_cfg)
        module = folder_module(run_cfg, folder, datamodule.vocab_size)
    else:
        path = checkpoint_file(cfg.ckpt_path, cfg.paths.output_dir)
        checkpoint = safe_load(path)
        run_cfg = run_config(cfg, checkpoint)
        datamodule = _seeded_datamodule(cfg, run_cfg)
        module = build_module(run_cfg, datamodule.vocab_size)
        check_state_shapes(path, module.state_dict(), checkpoint["state_dict"])
        module.load_state_dict(checkpoint["state_dict"])
    fit_caption_length(datamodule, module)  # a dataset from the command line may ask for longer captions
    trainer = build_trainer(cfg.trainer, logger=False, callbacks=[])
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}
    return metrics, datamodule, trainer.is_global_zero


def evaluate_ensemble(cfg: DictConfig, report: Report | None = None) -> dict[str, float]:
    """``ckpt_path=[A,B,...]``: each checkpoint (or model folder) is tested with its similarity matrix
    saved in ``members/<i>/`` of the run folder (its own ``metrics.json`` beside it), then the mean of
    the matrices is evaluated under the test split's protocols (``test/...``, as ``sims=[...]``)."""
    from laps.training.saved_sims import evaluate_saved

    members = [str(p) for p in cfg.ckpt_path]
    if not members:
        raise ValueError("ckpt_path=[]: name the checkpoints (or model folders) to ensemble")
    saved, datamodule, is_zero = [], None, True
    for i, ckpt in enumerate(members):
        member = copy.deepcopy(cfg)
        with open_dict(member):
            member.ckpt_path, member.save_sims = ckpt, True
            member.paths.output_dir = str(Path(cfg.paths.output_dir) / "members" / str(i))
        Path(member.paths.output_dir).mkdir(parents=True, exist_ok=True)
        log.info("ensemble member %d of %d: %s", i + 1, len(members), ckpt)
        metrics, datamodule, is_zero = _test_model(member)
        if is_zero:
            write_metrics(metrics, member.paths.output_dir)
        saved.append(Path(member.paths.output_dir) / "sims_test.pt")
    if not is_zero:  # rank zero saved the matrices and evaluates their mean
        return {}
    dm = datamodule
    metrics = evaluate_saved(saved, dm.root, dm.splits["test"], dm.protocol, dm.name, dm.eccv)
    if report is not None:
        report(metrics, f"{_test_title(datamodule)}, the mean of {len(members)} models")
    write_metrics(metrics, cfg.paths.output_dir)
    return metrics


def evaluate_sims(cfg: DictConfig, report: Report | None = None) -> dict[str, float]:
    """``laps-eval sims=PATH`` (or ``sims=[A,B]``, their mean): the ``test/...`` metrics of saved
    similarity matrices on the test split of ``dataset`` (its id file only: no model, no images)."""
    from laps.training.saved_sims import evaluate_saved

    data = cfg.get("dataset")
    if not data or data.get("root") is None:
        raise ValueError("sims=... is evaluated on a dataset's test split: give dataset=NAME dataset.root=DIR")
    sims, protocol = cfg.sims, data.get("protocol", "f30k")
    paths = [str(p) for p in sims] if OmegaConf.is_list(sims) else [str(sims)]
    metrics = evaluate_saved(paths, data.root, data.test_split, protocol, data.name, data.get("eccv"))
    if report is not None:
        report(metrics, f"{data.name} {data.test_split} ({protocol} protocol), "
                        f"{len(paths)} saved matri{'ces' if len(paths) > 1 else 'x'}")
    write_metrics(metrics, cfg.paths.output_dir)
    return metrics
