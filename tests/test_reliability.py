"""Faults in, nothing lost: bad images and captions, bad settings, NaN/Inf steps, hostile checkpoint files.

Every test drives the real training code (``laps.training.tasks.train`` or the Trainer built from the same
configuration) on the tiny synthetic set; faults are injected from the test only (a corrupted copy of the
data, a monkeypatched loss), never through test-only branches in the library.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY_SYNTHETIC
from laps.compat.serialization import UnsafeCheckpointError, safe_load
from laps.data.datasets import open_image
from laps.data.sampler import SeededShuffleSampler
from laps.data.splits import DataError, load_split
from laps.training.checkpointing import AtomicCheckpointIO, LastCheckpoint
from laps.training.module import LAPSLitModule, NonFiniteLossError
from laps.training.tasks import build_datamodule, build_module, build_trainer, evaluate, train

SYNTHETIC = {"seed": 0, "n_train": 96, "n_dev": 12, "n_test": 12, "image_size": 64}  # = conftest's TINY_SYNTHETIC
BASE = ["trainer=cpu", "logger=csv", "trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0", "test=false",
        "dataset.batch_size=8"]
QUICK = [*BASE, "+trainer.limit_train_batches=3"]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clean_set(synthetic_root: Path) -> Path:
    """The shared tiny synthetic set (generated here if no test did it yet)."""
    from laps.data.synthetic import SyntheticParams, ensure_synthetic

    return ensure_synthetic(synthetic_root / "synthetic", SyntheticParams(**SYNTHETIC))


@pytest.fixture
def copy_set(clean_set: Path, tmp_path: Path):
    """``copy_set()`` -> a private copy of the set to damage, and its ``dataset.*`` overrides."""

    def _copy(name: str = "damaged") -> tuple[Path, list[str]]:
        root = tmp_path / name
        shutil.copytree(clean_set, root)
        return root, [f"dataset.root={root}", "dataset.synthetic=null"]

    return _copy


class _Steps(Callback):
    """Counts training steps (to show that a configuration error stopped everything before the first)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: v for k, v in batch.items()})


def _fit(cfg, *callbacks: Callback):
    """What ``laps-train`` does up to ``trainer.fit``, with extra callbacks; returns (trainer, module, dm)."""
    datamodule = build_datamodule(cfg)
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, datamodule.vocab_size)
    trainer = build_trainer(cfg.trainer, callbacks=list(callbacks), logger=False,
                                      enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, datamodule


# ---------------------------------------------------------------------------------------------- bad images
def _damage_images(root: Path, first: int = 3, second: int = 10) -> tuple[list[Path], set[str]]:
    """Remove training image ``first`` and corrupt ``second``; returns their paths and their image ids."""
    data = load_split(root, "train", "images")
    k_missing, k_corrupt = first, second
    missing, corrupt = data.image_paths[k_missing], data.image_paths[k_corrupt]
    missing.unlink()
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return [missing, corrupt], {data.index.image_ids[k_missing], data.index.image_ids[k_corrupt]}


def test_bad_image_error_names_file_and_caption_line(make_cfg, copy_set) -> None:
    root, ds = copy_set()
    cfg = make_cfg([*ds, *BASE])
    data = load_split(root, "train", "images")
    order = list(SeededShuffleSampler(data.captions, seed=cfg.seed))
    bad, _ = _damage_images(root, data.index.caption_image[order[0]], data.index.caption_image[order[1]])
    with pytest.raises(DataError) as info:
        train(cfg)
    msg = str(info.value)
    assert any(str(p) in msg for p in bad), msg
    m = re.search(r"caption line (\d+) of (\S+train_caps\.txt) \(image id (\S+)\)", msg)
    assert m, msg
    line, image_id = int(m.group(1)), m.group(3)
    ids = (root / "train_ids.txt").read_text().splitlines()
    assert ids[line - 1] == image_id  # the line named is a caption of that image
    assert "dataset.on_bad_image=skip" in msg


def test_bad_image_skip_logs_each_once_counts_and_keeps_pairs(make_cfg, copy_set, caplog, monkeypatch) -> None:
    from laps.data import datasets

    # Evaluation transform for training too (test only), so each batch image can be checked against its file.
    monkeypatch.setattr(datasets, "_default_transform", lambda size, train: _eval_transform(size))
    from laps.data import datamodule as datamodule_module

    monkeypatch.setattr(datamodule_module, "build_transform", lambda size, train, mean=None, std=None: _eval_transform(size))
    root, ds = copy_set()
    cfg = make_cfg([*ds, *BASE, "dataset.on_bad_image=skip", "+trainer.limit_train_batches=4",
                    "+trainer.limit_val_batches=1"])
    data = load_split(root, "train", "images")
    # the epoch's order is known in advance (seed + epoch): damage images met in its 1st and 3rd batches
    order = list(SeededShuffleSampler(data.captions, seed=cfg.seed))
    bs = int(cfg.dataset.batch_size)
    first, third = data.index.caption_image[order[0]], data.index.caption_image[order[2 * bs]]
    assert first != third
    bad, bad_ids = _damage_images(root, first, third)
    steps = _Steps()
    caplog.set_level(logging.INFO)
    trainer, _, dm = _fit(cfg, steps)

    transform = _eval_transform(dm.image_size)
    seen: list[int] = []
    for batch in steps.batches:
        for row, (line, img) in enumerate(zip(batch["indices"].tolist(), batch["image_indices"].tolist())):
            # the ids file pairs caption line `line` with image `img`, and the pixels are that image's file
            assert data.ids[line] == data.index.image_ids[img]
            if row < 2:
                expected = transform(open_image(data.image_paths[img]))
                torch.testing.assert_close(batch["images"][row], expected)
            seen.append(line)
        assert batch["images"].shape[0] == batch["input_ids"].shape[0] == batch["image_indices"].shape[0]
    expected = [n for n in order[: 4 * dm.batch_size] if data.ids[n] not in bad_ids]
    assert seen == expected  # the good pairs of those batches, in order, none shifted, no bad one
    assert len(seen) < 4 * dm.batch_size and len(steps.batches) == 4
    skip_logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping image")]
    for path in bad:
        assert sum(str(path) in m for m in skip_logs) == 1, skip_logs  # each file once
    totals = [r.getMessage() for r in caplog.records if "unreadable or missing images skipped" in r.getMessage()]
    assert totals and totals[-1].startswith("epoch 0: 2 unreadable"), totals
    assert float(trainer.callback_metrics["train/skipped_images"]) == 2.0


def _eval_transform(size: int):
    from laps.data.transforms import build_transform

    return build_transform(size, train=False)


# ---------------------------------------------------------------------------------------------- captions
def test_long_captions_truncated_and_counted(make_cfg, caplog) -> None:
    caplog.set_level(logging.INFO)
    cfg = make_cfg([*QUICK, "dataset.max_words=3", "dataset.size_augment=false", "+trainer.limit_val_batches=1"])
    steps = _Steps()
    trainer, _, _ = _fit(cfg, steps)
    assert all(int(b["lengths"].max()) <= 3 + 2 for b in steps.batches)  # [CLS] + 3 pieces + [SEP]
    n = sum(int(b["truncated"]) for b in steps.batches)
    assert n > 0 and float(trainer.callback_metrics["train/truncated_captions"]) == n
    assert any(f"epoch 0: {n} training captions truncated to dataset.max_words=3" in r.getMessage()
               for r in caplog.records)


def test_max_words_beyond_the_text_encoder_is_cut_to_fit(make_cfg, caplog) -> None:
    """dataset.max_words beyond the text encoder's positions: laps-train cuts captions to fit (a
    longer caption would index past the position embeddings), says so, counts the cut ones, and
    stores the fitted length, so laps-eval tokenizes the same way, also with a dataset group on its
    command line (which brings the dataset's own max_words back)."""
    caplog.set_level(logging.WARNING)
    positions = 8  # [CLS] + 6 word pieces + [SEP]; the synthetic captions have 10 to 17 words
    cfg = make_cfg([*BASE, "test=true", "dataset.max_words=40",
                    f"backbone.text.config_overrides.max_position_embeddings={positions}"], name="short")
    metrics = train(cfg)
    assert any("dataset.max_words=40" in r.getMessage() and f"truncated to {positions - 2}" in r.getMessage()
               for r in caplog.records)
    out = Path(cfg.paths.output_dir)
    rows = csv.DictReader((out / "csv" / "metrics.csv").open())
    assert max(float(r["train/truncated_captions"]) for r in rows if r.get("train/truncated_captions")) > 0
    best = next((out / "checkpoints").glob("epoch_*.ckpt"))
    assert safe_load(best)["laps_config"]["dataset"]["max_words"] == positions - 2

    eval_cfg = make_cfg(["trainer=cpu", f"ckpt_path={best}", "dataset=synthetic", *TINY_SYNTHETIC,
                         "dataset.max_words=40"], name="eval_short", config_name="eval")
    assert evaluate(eval_cfg)["test/rsum"] == pytest.approx(metrics["test/rsum"], abs=1e-4)


# ---------------------------------------------------------------------------------------------- clear errors first
def _latin1_captions(root: Path) -> str:
    path = root / "train_caps.txt"
    lines = path.read_bytes().split(b"\n")
    lines[6] = "a caf\u00e9 sc\u00e8ne".encode("latin-1")
    path.write_bytes(b"\n".join(lines))
    return r"train_caps\.txt, line 7: not valid UTF-8"


def _empty_dev(root: Path) -> str:
    (root / "dev_caps.txt").write_text("")
    (root / "dev_ids.txt").write_text("")
    return r"Split 'dev' of .* is empty"


@pytest.mark.parametrize(
    ("damage", "overrides", "pattern"),
    [
        (_latin1_captions, [], None),
        (_empty_dev, [], None),
        (None, ["dataset.batch_size=1"], r"dataset\.batch_size must be at least 2"),
        (None, ["dataset.batch_size=100000"], r"fewer than dataset\.batch_size=100000"),
        (None, ["ratios.sparse_ratio=0.05", "ratios.aggr_ratio=0.05"], r"leave no aggregated token"),
        (None, ["ratios.sparse_ratio=0"], r"ratios\.sparse_ratio must be in \(0, 1\]"),
    ],
    ids=["non-utf8-captions", "empty-split", "batch-1", "batch-over-split", "ratios-no-token", "ratio-zero"],
)
def test_bad_settings_stop_before_training(make_cfg, copy_set, monkeypatch, damage, overrides, pattern) -> None:
    ds: list[str] = []
    if damage is not None:
        root, ds = copy_set()
        pattern = damage(root)
    calls: list[int] = []
    original = LAPSLitModule.training_step
    monkeypatch.setattr(LAPSLitModule, "training_step",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    cfg = make_cfg([*ds, *QUICK, *overrides])
    with pytest.raises(Exception) as info:
        train(cfg)
    err: BaseException | None = info.value
    messages = []
    while err is not None:  # Hydra wraps errors raised while instantiating
        messages.append(str(err))
        err = err.__cause__
    assert any(re.search(pattern, m) for m in messages), messages
    assert not calls, "a training step ran before the error"
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [(["ratios.sparse_ratio=0.05", "ratios.aggr_ratio=0.05"], "leave no aggregated token"),
     (["dataset.batch_size=100000"], "fewer than dataset.batch_size=100000")],
)
def test_bad_settings_are_one_line_from_the_cli(tmp_path: Path, clean_set: Path, args: list[str], needle: str) -> None:
    code = "from laps.cli.train import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", code, *[f"dataset.synthetic.{k}={v}" for k, v in SYNTHETIC.items()],
         f"paths.root_dir={tmp_path}", f"paths.data_dir={clean_set.parent}", *args],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and err[-1].startswith("error: ") and needle in err[-1], result.stderr


# ---------------------------------------------------------------------------------------------- NaN / Inf
def _poison(monkeypatch, steps: set[int] | None, value: float = float("nan")) -> None:
    """The module's loss becomes ``value`` at the given global steps (all steps when ``steps`` is None)."""
    original = LAPSLitModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        if steps is None or self.global_step in steps:
            loss = loss * torch.tensor(value)
        return loss

    monkeypatch.setattr(LAPSLitModule, "training_step", training_step)


class _OptimizerWatch(Callback):
    """Snapshots parameters and optimizer state around the step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.before: dict[str, Any] | None = None
        self.after: dict[str, Any] | None = None
        self.next_after: dict[str, Any] | None = None

    @staticmethod
    def _snapshot(trainer, module) -> dict[str, Any]:
        opt = trainer.optimizers[0]
        state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                 for g in opt.param_groups for p in g["params"] if p in opt.state}
        return {"params": [p.detach().clone() for p in module.parameters()], "opt": state,
                "nonfinite": module.nonfinite_steps}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            self.before = self._snapshot(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at + 1 and self.after is None:
            self.after = self._snapshot(trainer, module)
        elif trainer.global_step == self.at + 2:
            self.next_after = self._snapshot(trainer, module)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_one_nonfinite_step_is_skipped_counted_and_training_goes_on(make_cfg, monkeypatch, value) -> None:
    _poison(monkeypatch, {2}, value)
    cfg = make_cfg([*BASE, "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=1"])
    watch = _OptimizerWatch(at=2)
    trainer, module, _ = _fit(cfg, watch)
    assert trainer.global_step == 5 and module.nonfinite_steps == 1 and module._nonfinite_in_a_row == 0
    before, after = watch.before, watch.after
    assert before is not None and after is not None and watch.next_after is not None
    assert after["nonfinite"] == before["nonfinite"] + 1
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)  # no parameter moved (nor weight decay)
    assert before["opt"].keys() == after["opt"].keys() and before["opt"]
    for key, state in before["opt"].items():
        for name, v in state.items():  # exp_avg, exp_avg_sq, step: untouched
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["opt"][key][name])), name
    # the next (finite) step moves the weights and the optimizer state again
    assert any(not torch.equal(a, b) for a, b in zip(after["params"], watch.next_after["params"]))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_nonfinite_steps_in_a_row_stop_the_run(make_cfg, monkeypatch) -> None:
    _poison(monkeypatch, None)
    cfg = make_cfg([*BASE, "model.max_nonfinite_steps=3", "+trainer.limit_train_batches=10"])
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row had a NaN/Inf loss or gradient "
                                                 r"\(model\.max_nonfinite_steps=3\)"):
        train(cfg)


# ---------------------------------------------------------------------------------------------- checkpoint files
def test_last_ckpt_every_n_steps_and_epoch_and_weights_only(make_cfg, monkeypatch) -> None:
    saves: list[tuple[int, int]] = []
    original = LastCheckpoint.save
    monkeypatch.setattr(LastCheckpoint, "save",
                        lambda self, trainer: saves.append((trainer.current_epoch, trainer.global_step))
                        or original(self, trainer))
    cfg = make_cfg(["trainer=cpu", "logger=many_loggers", "trainer.max_epochs=2", "+trainer.limit_train_batches=3",
                    "+trainer.limit_val_batches=1", "callbacks.last_checkpoint.every_n_train_steps=2",
                    "dataset.batch_size=8", "callbacks.progress_bar.refresh_rate=0", "test=false"])
    train(cfg)
    assert saves == [(0, 2), (0, 3), (1, 4), (1, 6), (1, 6)]  # every 2 steps, and at each epoch end
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    # what the default callbacks and loggers put in a checkpoint needs no global beyond torch's own
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(last)) == []
    ckpt = safe_load(last)
    assert ckpt["global_step"] == 6 and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert not list(last.parent.glob("*.tmp"))


def test_checkpoint_io_refuses_a_hostile_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, hostile)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(hostile))):
        AtomicCheckpointIO().load_checkpoint(hostile, weights_only=False)  # weights_only=False is not obeyed
    assert not marker.exists()
