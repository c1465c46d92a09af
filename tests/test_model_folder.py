"""An exported model folder (laps-export) taken where a checkpoint is: ``laps-eval ckpt_path=DIR``
and ``laps-train model.init_from=DIR``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from conftest import TINY_SYNTHETIC, compose_train
from helpers.common import TINY_BERT, TINY_VIT
from laps.cli.export import main as export_main
from laps.models.pretrained import PretrainedFormatError
from laps.training.tasks import build_module, evaluate, train
from test_visualize import write_checkpoint

CPU_FAST = ["trainer=cpu", "logger=csv"]
WORDS = "text.backbone.embeddings.word_embeddings.weight"
# Data settings unlike the synthetic group's defaults: laps-eval of the folder must take them from it.
RUN_DATA = ["dataset.max_words=8", "dataset.image_mean=[0.5,0.5,0.5]", "dataset.image_std=[0.25,0.25,0.25]"]
SHORT_FIT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> tuple[Path, Path]:
    """A tiny ViT + BERT trained for one epoch (its last.ckpt) and the folder laps-export made of it."""
    run = tmp_path_factory.mktemp("trained")
    cfg = compose_train([*TINY_SYNTHETIC, *TINY_VIT, *TINY_BERT, *CPU_FAST, *RUN_DATA, "trainer.max_epochs=1",
                         "test=false"],
                        run / "run", synthetic_root)
    train(cfg)
    ckpt = run / "run" / "checkpoints" / "last.ckpt"
    out = run / "hf"
    export_main([str(ckpt), "--out", str(out)])  # returns on success, exits 2 on an error
    return ckpt, out


def test_eval_of_the_folder_writes_the_checkpoints_metrics(trained, make_cfg) -> None:
    """laps-eval ckpt_path=DIR (the dataset named on the command line, everything else from the folder)
    writes the same metrics.json as ckpt_path=CKPT."""
    ckpt, out = trained
    from_ckpt = make_cfg(["trainer=cpu", f"ckpt_path={ckpt}"], name="eval_ckpt", config_name="eval")
    evaluate(from_ckpt)
    from_dir = make_cfg(["trainer=cpu", f"ckpt_path={out}", "dataset=synthetic", *TINY_SYNTHETIC], name="eval_dir",
                        config_name="eval")
    metrics = evaluate(from_dir)
    assert "test/rsum" in metrics
    written = (Path(from_dir.paths.output_dir) / "metrics.json").read_text()
    assert written == (Path(from_ckpt.paths.output_dir) / "metrics.json").read_text()


def test_eval_of_a_folder_needs_the_dataset_named(trained, make_cfg) -> None:
    _, out = trained
    with pytest.raises(ValueError, match=r"is a model folder, which records no dataset location: name it with dataset="):
        evaluate(make_cfg(["trainer=cpu", f"ckpt_path={out}"], name="eval_nodata", config_name="eval"))


class FirstStepProbe(Callback):
    """Records the model's weights and the optimizer's state just before the first training step."""

    seen: ClassVar[dict[str, object]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            FirstStepProbe.seen = {
                "weights": {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()},
                "optimizer_state": len(trainer.optimizers[0].state),
            }


def test_init_from_starts_the_fit_from_the_exported_weights(trained, make_cfg) -> None:
    _, out = trained
    FirstStepProbe.seen = {}
    cfg = make_cfg([*TINY_VIT, *TINY_BERT, *CPU_FAST, *SHORT_FIT, f"model.init_from={out}",
                    "+callbacks.probe._target_=test_model_folder.FirstStepProbe"], name="tune")
    train(cfg)
    exported = load_file(str(out / "model.safetensors"))
    weights = FirstStepProbe.seen["weights"]
    assert set(weights) == set(exported)
    assert all(torch.equal(weights[k], exported[k]) for k in exported)
    assert FirstStepProbe.seen["optimizer_state"] == 0  # weights only: the optimizer starts fresh
    fresh = build_module(cfg, int(exported[WORDS].shape[0])).net
    assert not all(torch.equal(v, exported[k]) for k, v in fresh.state_dict().items())  # without init_from


def test_init_from_a_folder_of_another_size_names_the_tensor(make_cfg, tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = make_cfg([*TINY_VIT, *TINY_BERT, "backbone.embed_size=16"], name="other")
    ckpt = write_checkpoint(other, tmp_path / "other" / "checkpoints" / "last.ckpt")
    folder = tmp_path / "hf16"
    export_main([str(ckpt), "--out", str(folder)])
    cfg = make_cfg([*TINY_VIT, *TINY_BERT, *CPU_FAST, *SHORT_FIT, f"model.init_from={folder}"], name="mismatch")
    with pytest.raises(PretrainedFormatError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder / "model.safetensors"))
    found = re.search(r"tensor '([\w.]+)'", message)
    assert found is not None, message
    key = found.group(1)
    exported = load_file(str(folder / "model.safetensors"))
    ours = build_module(cfg, int(exported[WORDS].shape[0])).net.state_dict()
    assert key not in ours or key not in exported or ours[key].shape != exported[key].shape  # the named one differs


def test_the_runs_checkpoints_do_not_need_the_folder(trained, make_cfg, tmp_path: Path) -> None:
    """init_from is applied before fitting: with the folder gone, the run's checkpoint is tested and
    resumed (ckpt_path holds every weight, so init_from is not read)."""
    _, out = trained
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    tune = [*TINY_VIT, *TINY_BERT, *CPU_FAST, "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
            "test=false", f"model.init_from={folder}"]
    cfg = make_cfg([*tune, "trainer.max_epochs=1"], name="tune")
    train(cfg)
    shutil.rmtree(folder)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    tested = evaluate(make_cfg(["trainer=cpu", f"ckpt_path={last}"], name="eval_tuned", config_name="eval"))
    assert "test/rsum" in tested
    resumed = make_cfg([*tune, "trainer.max_epochs=2", f"ckpt_path={last}"], name="tune")
    assert "val/rsum" in train(resumed)


def test_a_folder_as_ckpt_path_of_laps_train_says_what_to_use(trained, make_cfg) -> None:
    _, out = trained
    with pytest.raises(FileNotFoundError, match=r"is a folder, not a checkpoint .*model.init_from="):
        train(make_cfg([*CPU_FAST, f"ckpt_path={out}"], name="resume_folder"))


@pytest.mark.parametrize("case, match", [
    ("missing", r"model.init_from=\S+/nowhere: no such folder"),
    ("file", r"model.init_from=\S+/model.ckpt is a file, not an exported model folder"),
])
def test_init_from_what_is_not_a_folder_is_one_line(make_cfg, tmp_path: Path, case: str, match: str) -> None:
    target = tmp_path / ("nowhere" if case == "missing" else "model.ckpt")
    if case == "file":
        target.write_bytes(b"not a folder")
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        train(make_cfg([*CPU_FAST, f"model.init_from={target}"], name="bad_init"))


def test_eval_of_a_list_of_checkpoints_scores_the_mean_of_their_matrices(trained, make_cfg, tmp_path: Path) -> None:
    """``laps-eval ckpt_path=[A,B]``: each model's matrix is saved in members/<i>/, and metrics.json
    holds the figures of their mean, computed here from the two matrices."""
    from laps.compat.serialization import safe_load
    from laps.data.splits import SplitIndex, read_split_ids
    from laps.evaluation import protocol_metrics
    from laps.training.saved_sims import load_sims

    ckpt, _ = trained
    state = safe_load(ckpt)
    g = torch.Generator().manual_seed(0)
    for name, tensor in state["state_dict"].items():  # a second, different model of the same shape
        if tensor.is_floating_point() and tensor.numel() > 1:
            state["state_dict"][name] = tensor + 0.05 * tensor.std() * torch.randn(tensor.shape, generator=g)
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    cfg = make_cfg(["trainer=cpu", f"ckpt_path=[{ckpt},{other}]"], name="eval_ensemble", config_name="eval")
    metrics = evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    mats = [load_sims(out / "members" / str(i) / "sims_test.pt") for i in range(2)]
    assert not torch.equal(mats[0].sims, mats[1].sims)
    root = Path(cfg.paths.data_dir) / "synthetic"
    index = SplitIndex.from_ids(read_split_ids(root, "test"))
    want = protocol_metrics((mats[0].sims + mats[1].sims) / 2, index.caption_image_tensor(), "f30k", "test")
    assert metrics.keys() == want.keys()
    for key, value in want.items():
        assert metrics[key] == pytest.approx(float(value), abs=1e-4), key
    singles = [json.loads((out / "members" / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert all(s.keys() == metrics.keys() for s in singles)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
