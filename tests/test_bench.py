"""``laps-bench`` at tiny sizes: it runs, prints, and writes JSON with the documented fields; the training
step benchmark takes the recipe from the Hydra configs and computes the LightningModule's loss."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from laps.benchmarks import BenchSettings, training_recipe
from laps.benchmarks.head import training_loss
from laps.benchmarks.train_step import batch_loss, make_train_step, random_batch
from laps.cli.bench import main, run
from laps.paths import config_dir

TINY = [
    "--device", "cpu", "--batch", "5", "--tokens", "17", "--dim", "16", "--words", "7", "--min-words", "2",
    "--score-images", "6", "--score-captions", "7", "--memory-batch", "4", "--repeats", "1",
]


def test_tiny_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    result = run([*TINY, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["device"] == "cpu" and data["threads"] >= 1 and data["command"].startswith("laps-bench")
    assert data["config"]["tokens"] == 17 and data["config"]["lengths"] == "f30k"
    res = data["results"]
    train = res["head_train"]
    assert train["batch"] == 5 and train["pairs"] == 25
    for loss in ("hardest", "dense"):
        assert train[loss]["head_s"] > 0 and train[loss]["reference_s"] > 0
        assert train[loss]["speedup"] == pytest.approx(train[loss]["reference_s"] / train[loss]["head_s"])
    scoring = res["scoring"]
    assert (scoring["images"], scoring["captions"], scoring["pairs"]) == (6, 7, 42)
    assert scoring["head_s"] > 0 and scoring["reference_s"] > 0 and scoring["speedup"] > 0
    assert scoring["reference_captions_timed"] == 7 and scoring["head_pairs_per_s"] > 0
    memory = res["memory"]
    assert memory["batch"] == 4 and "RSS" in memory["method"]
    assert memory["head_bytes"] >= 0 and memory["reference_bytes"] >= 0 and memory["ratio"] >= 0
    printed = capsys.readouterr().out
    assert "scoring" in printed and "reference" in printed


def test_without_reference_and_uniform_lengths(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = run([*TINY, "--no-reference", "--no-memory", "--lengths", "uniform", "--no-cls",
                  "--sparse-ratio", "0.8", "--aggr-ratio", "0.6", "--out", str(out)])
    assert result["config"]["has_cls"] is False and result["config"]["lengths"] == "uniform"
    assert "reference_s" not in result["results"]["head_train"]["dense"]
    assert "speedup" not in result["results"]["scoring"]
    assert "memory" not in result["results"]


def test_cpu_gemm_choice_is_recorded_and_restored(capsys: pytest.CaptureFixture) -> None:
    from laps.models import gemm

    before = gemm.cpu_backend()
    # start from the other kernels where there are two, so that restoring them is not a no-op
    start = "onednn" if gemm._LINEAR is not None else "torch"
    gemm.set_cpu_backend(start)
    try:
        result = run([*TINY, "--no-reference", "--no-memory", "--cpu-gemm", "torch"])
        assert result["cpu_gemm"] == "torch"
        assert "head's CPU GEMMs: torch" in " ".join(capsys.readouterr().out.split())
        assert gemm.cpu_backend() == start
    finally:
        gemm.set_cpu_backend(before)


TINY_ENCODER = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def _override_options(flag: str, fields: dict) -> list[str]:
    return [item for key, value in fields.items() for item in (flag, f"{key}={value}")]


def test_full_training_step_tiny_backbones(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    result = run([
        "--device", "cpu", "--no-head-train", "--no-scoring", "--no-memory", "--train-step", "vit",
        "--batch", "3", "--dim", "16", "--words", "6", "--train-steps", "1", "--out", str(out),
        *_override_options("--vision-override", {**TINY_ENCODER, "image_size": 64}),
        *_override_options("--text-override", TINY_ENCODER),
    ])
    step = json.loads(out.read_text())["results"]["train_step"]
    assert step == result["results"]["train_step"]
    assert step["backbone"] == "vit" and step["batch"] == 3 and step["image_size"] == 64
    assert step["num_patches"] == 16 and step["amp"] == "off"
    assert step["step_s"] > 0 and step["pairs_per_s"] == pytest.approx(9 / step["step_s"])


def test_bad_arguments_exit_with_message(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as err:
        main(["--device", "cpu", "--words", "8", "--min-words", "9"])
    assert err.value.code == 2
    assert "--min-words" in capsys.readouterr().err


def test_console_script_help() -> None:
    exe = shutil.which("laps-bench")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "laps.cli.bench", "--help"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "--train-step" in res.stdout and "--out" in res.stdout


# ---------------------------------------------------------------------------- the training recipe
def _tiny_model(recipe):
    """A one-layer ViT/BERT pair at the vit backbone's geometry (64 px), dropout off so two passes agree."""
    from laps.models import create_model

    quiet = {**TINY_ENCODER, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    return create_model("vit", embed_size=16, pretrained=False, vision_overrides={**quiet, "image_size": 64},
                        text_overrides=quiet, **recipe.head_options()).train()


def _tiny_batch(model):
    settings = BenchSettings(batch=4, words=6, min_words=3)
    return random_batch(settings, model.vision.image_size, int(model.text.backbone.config.vocab_size),
                        torch.device("cpu"))


def test_recipe_is_the_configs() -> None:
    """Read independently of Hydra's composition: configs/model/laps.yaml and configs/trainer/default.yaml."""
    model_yaml = OmegaConf.load(Path(config_dir()) / "model" / "laps.yaml")
    trainer_yaml = OmegaConf.load(Path(config_dir()) / "trainer" / "default.yaml")
    recipe = training_recipe("vit")
    assert (recipe.margin, recipe.ratio_weight, recipe.pooled_weight) == (
        model_yaml.margin, model_yaml.ratio_weight, model_yaml.pooled_weight)
    assert recipe.trainer.gradient_clip_val == trainer_yaml.gradient_clip_val
    model = _tiny_model(recipe)
    opt = recipe.optimizer(model)
    from hydra.utils import get_class

    assert type(opt) is get_class(model_yaml.optimizer._target_)
    lrs = sorted(group["lr"] for group in opt.param_groups)
    assert lrs == pytest.approx(sorted([model_yaml.optimizer.lr, model_yaml.optimizer.lr * model_yaml.backbone_lr_mult]))
    assert {group["weight_decay"] for group in opt.param_groups} == {model_yaml.optimizer.weight_decay}


def test_recipe_overrides_reach_the_training_step() -> None:
    """An SGD step of lr 1 moves the parameters by exactly the clipped gradient: the optimizer, its
    learning rate, the backbone factor and the clipping all come from the overrides."""
    recipe = training_recipe("vit", [
        "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1.0", "model.optimizer.weight_decay=0.0",
        "model.backbone_lr_mult=1.0", "trainer.gradient_clip_val=0.001",
    ])
    model = _tiny_model(recipe)
    batch = _tiny_batch(model)
    step = make_train_step(model, recipe, batch, amp=False)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.linalg.vector_norm(after - before).item() == pytest.approx(0.001, rel=1e-3)


def test_training_step_loss_is_the_lightning_modules() -> None:
    """The benchmark's loss equals ``LAPSLitModule.training_step``'s for the same config, overrides included
    (hardest negatives from epoch 0, so that the module outside a trainer is past its warm-up too)."""
    import warnings

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = ["model.margin=0.35", "model.ratio_weight=3.0", "model.pooled_weight=0.5",
                 "model.vse_mean_warmup_epochs=0"]
    recipe = training_recipe("vit", overrides)
    model = _tiny_model(recipe)
    images, input_ids, lengths, img_ids = batch = _tiny_batch(model)
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["~experiment", "backbone=vit", *overrides])
    module = instantiate(cfg.model, net=None, _partial_=True)(net=model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a trainer
        expected = module.training_step(
            {"images": images, "input_ids": input_ids, "lengths": lengths, "image_indices": img_ids}, 0)
    assert batch_loss(model, recipe, *batch).item() == pytest.approx(expected.item(), rel=1e-5)
    assert make_train_step(model, recipe, batch, amp=False)().item() == pytest.approx(expected.item(), rel=1e-5)
    default = training_recipe("vit", ["model.pooled_weight=0.5"])
    assert batch_loss(model, default, *batch).item() != pytest.approx(expected.item(), rel=1e-3)


def test_head_benchmark_loss_follows_the_recipe() -> None:
    from laps.losses import contrastive_loss, ratio_loss

    gen = torch.Generator().manual_seed(0)
    sims, mask = torch.randn(5, 7, generator=gen), torch.rand(7, 5, 3, generator=gen) > 0.5
    recipe = training_recipe("vit", ["model.margin=0.45", "model.ratio_weight=5.0"])
    expected = contrastive_loss(sims[:5, :5], torch.arange(5), 0.45, True) + 5.0 * ratio_loss(mask, 0.5)
    assert training_loss(sims, mask, 0.5, "hardest", recipe) == pytest.approx(expected.item())
    assert training_loss(sims, mask, 0.5, "dense") == pytest.approx(sims.sum().item())
