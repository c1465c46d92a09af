"""``laps.compat.serialization.safe_load``: weights-only loading with an explicit allow-list."""

from __future__ import annotations

import argparse
import builtins
import os
from collections import Counter, OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES
from helpers.pickles import unrestricted_unpickle
from laps.compat.serialization import ALLOWED_GLOBALS, UnsafeCheckpointError, safe_load


class _ShellPayload:
    """Unpickling calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _OpenPayload:
    """Unpickling calls ``open(target, "w")``, creating the file."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (builtins.open, (self.target, "w"))


class Point:
    """A harmless class, allowed only through ``extra_globals``."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


def test_error_type_and_allow_list():
    assert issubclass(UnsafeCheckpointError, RuntimeError)
    assert argparse.Namespace in ALLOWED_GLOBALS


def test_plain_objects_round_trip(tmp_path):
    obj = {
        "state_dict": OrderedDict(w=torch.randn(3, 2), b=torch.zeros(2, dtype=torch.float16)),
        "hyper_parameters": {"lr": 2e-4, "milestones": [9, 15], "name": "laps", "flags": (True, None)},
        "counter": Counter({9: 1, 15: 1}),
        "ids": {1, 2, 3},
        "step": 7,
    }
    torch.save(obj, tmp_path / "plain.pt")
    loaded = safe_load(tmp_path / "plain.pt")
    assert torch.equal(loaded["state_dict"]["w"], obj["state_dict"]["w"])
    assert loaded["state_dict"]["b"].dtype == torch.float16
    assert loaded["hyper_parameters"] == obj["hyper_parameters"]
    assert loaded["counter"] == obj["counter"] and loaded["ids"] == obj["ids"]


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_shell_payload_refused_and_not_run(tmp_path, zip_format):
    target = tmp_path / "pwned_shell"
    path = tmp_path / "hostile.pt"
    torch.save(
        {"model": {}, "opt": _ShellPayload(f"touch {target}")},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load(path)
    assert not target.exists()
    message = str(info.value)
    assert str(path) in message
    assert f"{os.system.__module__}.system" in message  # posix.system on Linux
    assert info.value.refused == [f"{os.system.__module__}.system"]


def test_open_payload_is_live_but_refused(tmp_path):
    # Control: an unrestricted load of the same kind of file does create its target,
    # so the refusal below is what keeps the file from being written.
    control = tmp_path / "control"
    torch.save({"x": _OpenPayload(control)}, tmp_path / "control.pt")
    unrestricted_unpickle(tmp_path / "control.pt")["x"].close()
    assert control.exists()

    target = tmp_path / "pwned_open"
    torch.save({"x": _OpenPayload(target)}, tmp_path / "hostile.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open"):
        safe_load(tmp_path / "hostile.pt")
    assert not target.exists()


def test_extra_globals_only_when_asked(tmp_path):
    torch.save({"p": Point(1, 2)}, tmp_path / "point.pt")
    with pytest.raises(UnsafeCheckpointError, match="Point"):
        safe_load(tmp_path / "point.pt")
    loaded = safe_load(tmp_path / "point.pt", extra_globals=[Point])
    assert (loaded["p"].x, loaded["p"].y) == (1, 2)
    with pytest.raises(UnsafeCheckpointError):  # the allowance does not outlive the call
        safe_load(tmp_path / "point.pt")


def test_omegaconf_containers_refused(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    torch.save({"hyper_parameters": omegaconf.OmegaConf.create({"lr": 1.0})}, tmp_path / "cfg.pt")
    with pytest.raises(UnsafeCheckpointError, match="omegaconf"):
        safe_load(tmp_path / "cfg.pt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        safe_load(tmp_path / "nothere.pt")


def test_official_checkpoint_needs_only_namespace():
    path = FIXTURES / "official_tiny" / "model_best.pth"
    if not path.is_file():
        pytest.skip(f"fixtures missing: {path}")
    ckpt = safe_load(path)
    assert isinstance(ckpt["opt"], argparse.Namespace)
    assert ckpt["opt"].vit_type == "vit"
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_lightning_checkpoint_loads(tmp_path):
    """A checkpoint as Lightning writes it (AdamW, MultiStepLR, ModelCheckpoint, plain-dict hparams)."""
    L = pytest.importorskip("lightning.pytorch")

    class Tiny(L.LightningModule):
        def __init__(self, hparams: dict) -> None:
            super().__init__()
            self.save_hyperparameters(hparams)
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-4)
            return [opt], [torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[9, 15], gamma=0.3)]

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)
    trainer = L.Trainer(
        max_steps=2,
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[L.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="train_loss")],
    )
    trainer.fit(Tiny({"lr": 1e-3, "ratios": [0.5, 0.4], "vision": {"name": "vit"}}), data)
    ckpt = safe_load(next(tmp_path.glob("*.ckpt")))
    assert ckpt["hyper_parameters"]["vision"] == {"name": "vit"}
    assert "layer.weight" in ckpt["state_dict"]
    assert ckpt["lr_schedulers"][0]["milestones"] == Counter({9: 1, 15: 1})
