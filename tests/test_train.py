"""The framework end to end: fast_dev_run per backbone, train -> checkpoint -> laps-eval, one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.common import TINY_BERT, TINY_VIT
from laps.training.tasks import evaluate, train

TINY_SWIN = [
    "backbone=swin", "backbone.pretrained=false", "backbone.embed_size=32",
    "+backbone.vision.config_overrides.embed_dim=8", "+backbone.vision.config_overrides.depths=[1,1,1,1]",
    "+backbone.vision.config_overrides.num_heads=[1,1,1,1]",
]
CPU_FAST = ["trainer=cpu", "logger=csv"]


@pytest.mark.parametrize(
    ("name", "overrides", "has_cls", "num_patches"),
    [("tiny", ["backbone=tiny"], True, 64), ("vit", TINY_VIT + TINY_BERT, True, 16),
     ("swin", TINY_SWIN + TINY_BERT, False, 49)],
)
def test_fast_dev_run(make_cfg, name: str, overrides: list[str], has_cls: bool, num_patches: int) -> None:
    cfg = make_cfg([*overrides, *CPU_FAST, "debug=fdr"], name=name)
    metrics = train(cfg)
    assert "val/rsum" in metrics  # one validation batch ran and was scored
    from hydra.utils import instantiate

    model = instantiate(cfg.model.net, text={"vocab_size": 64})
    assert model.vision.has_cls is has_cls and model.head.num_patches == num_patches


@pytest.mark.slow
def test_train_then_eval_round_trip(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg([*CPU_FAST, "trainer.max_epochs=2", "model.vse_mean_warmup_epochs=1"], name="train")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    written = json.loads((out / "metrics.json").read_text())
    for key in ("test/rsum", "test/i2t_R@1", "test/t2i_R@10", "test/i2t_medr", "val/rsum"):
        assert key in written
    assert written["test/rsum"] == pytest.approx(metrics["test/rsum"])
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    best = next(p for p in (out / "checkpoints").glob("epoch_*.ckpt"))

    eval_cfg = make_cfg(["trainer=cpu", f"ckpt_path={best}"], name="eval", config_name="eval")
    again = evaluate(eval_cfg)
    for key, value in written.items():
        if key.startswith("test"):
            assert again[key] == pytest.approx(value, abs=1e-6), key
    assert json.loads((Path(eval_cfg.paths.output_dir) / "metrics.json").read_text())["test/rsum"] == pytest.approx(
        written["test/rsum"]
    )
    # the monitored metric's best epoch, beside the last epoch's val/...
    logged = [float(r["val/rsum"]) for r in csv.DictReader((out / "csv" / "metrics.csv").open()) if r.get("val/rsum")]
    assert len(logged) == 2 and written["val/rsum_best"] == pytest.approx(max(logged))
    assert written["val/rsum"] == pytest.approx(logged[-1])
    # train=false tests the given checkpoint, as laps-eval does
    only_test = train(make_cfg([*CPU_FAST, "train=false", f"ckpt_path={best}"], name="test_only"))
    assert only_test["test/rsum"] == pytest.approx(written["test/rsum"], abs=1e-4)
    with pytest.raises(ValueError, match="ckpt_path"):
        train(make_cfg([*CPU_FAST, "train=false"], name="nothing_to_test"))


def _run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    code = "from laps.cli.train import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args, f"paths.root_dir={tmp_path}"],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["backbone=nope"], "backbone"),
        (["dataset=f30k", "dataset.root=/nonexistent/f30k"], "/nonexistent/f30k"),
        (["ratios.sparse_ratio=1.5"], "ratios.sparse_ratio"),
        (["ratios.aggr_ratio=0"], "ratios.aggr_ratio"),
        (["dataset.batch_size=1"], "dataset.batch_size"),
    ],
)
def test_wrong_override_is_one_clear_line(tmp_path: Path, args: list[str], needle: str) -> None:
    result = _run_cli(args, tmp_path)
    assert result.returncode != 0
    err = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert needle in err[0], result.stderr  # the first line says what is wrong (Hydra then lists the options)


def test_pooled_weight_trains_the_pooled_loss(make_cfg) -> None:
    """model.pooled_weight adds its weighted hinge loss on pooled vectors to the training loss (and
    logs it); at 0 there is no such term."""
    steps = [*CPU_FAST, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
             "trainer.log_every_n_steps=1", "test=false", "model.embedding_warmup_epochs=-1"]  # no ramp: alpha 1
    logged = {}
    for name, weight in (("pooled", 0.5), ("plain", 0.0)):
        cfg = make_cfg([*steps, f"model.pooled_weight={weight}"], name=name)
        train(cfg)
        rows = [r for r in csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open())
                if r.get("train/loss")]
        assert len(rows) == 2
        for r in rows:
            pooled = weight * float(r["train/pooled_loss"]) if weight else 0.0
            expected = float(r["train/contrastive"]) + 2.0 * float(r["train/ratio_loss"]) + pooled
            assert float(r["train/loss"]) == pytest.approx(expected, rel=1e-4)
        logged[name] = [float(r["train/pooled_loss"]) for r in rows if r.get("train/pooled_loss")]
    assert len(logged["pooled"]) == 2 and all(v > 0 for v in logged["pooled"])  # random vectors: violations
    assert logged["plain"] == []


def test_compile_keeps_parameter_names(make_cfg) -> None:
    """compile=true compiles the encoders in place: the optimizer's backbone group (0.1x lr) and the
    checkpoint keys still find ``net.vision.backbone.*`` and ``net.text.backbone.*``."""
    from laps.training.tasks import build_module

    plain = build_module(make_cfg(["backbone=tiny"], name="plain"), 64)
    compiled = build_module(make_cfg(["backbone=tiny", "compile=true"], name="compiled"), 64)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert any(k.startswith("net.vision.backbone.") for k in compiled.state_dict())
    for part in ("vision", "text"):  # compiled indeed, in place
        assert getattr(compiled.net, part)._compiled_call_impl is not None
        assert getattr(plain.net, part)._compiled_call_impl is None

    def group_sizes(module) -> list[int]:
        opt = module.configure_optimizers()
        opt = opt["optimizer"] if isinstance(opt, dict) else opt
        return [len(g["params"]) for g in opt.param_groups]

    assert group_sizes(compiled) == group_sizes(plain) and group_sizes(plain)[0] > 0  # the backbone group
