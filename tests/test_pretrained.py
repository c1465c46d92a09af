"""Pretrained backbones with no network: one clear, fast error offline; local folders and files load.

* ``laps-train experiment=f30k_vit`` offline (``HF_HUB_OFFLINE=1``, an empty Hugging Face cache) stops within
  seconds with one ``error:`` line naming ``google/vit-base-patch16-224-in21k`` and the three ways out.
* ``backbone=vit`` with ``name_or_path`` pointing at local ``save_pretrained`` folders (and the tokenizer at a
  local ``vocab.txt`` folder) trains, and the model holds exactly the saved weights.
* ``backbone=timm_vit`` with ``backbone.vision.checkpoint_path`` loads a local weights file offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers.standins import build_wordpiece_vocab, make_f30k_standin, read_lines, shared_data
from laps.training.tasks import build_datamodule, build_module, train

VIT_TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}
BERT_TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}
LOCAL_COMMON = ["backbone.image_size=32", "backbone.embed_size=32", "trainer=cpu", "logger=csv"]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No network and an empty Hugging Face cache, whatever this machine has cached."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home"), WANDB_MODE="offline")
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


# Failing fast is the feature: no download attempts, no retries, nothing built or written before the
# check. The subprocess timeout only catches hangs; speed is not asserted here.


def run_train_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``laps-train ARGS`` offline, in ``tmp_path``."""
    return subprocess.run(
        [sys.executable, "-c", "from laps.cli.train import main; main()", *args, f"paths.root_dir={tmp_path}"],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=offline_env(tmp_path),
    )


def assert_nothing_written(root: Path) -> None:
    """No checkpoint, logged metric or metrics file: the run stopped before building anything."""
    for pattern in ("*.ckpt", "metrics.csv", "metrics.json", "events.out.tfevents.*"):
        assert not list(root.rglob(pattern)), pattern


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error: ...`` line of a failed command (asserting it is short and has no traceback)."""
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) <= 3, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def f30k_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in F30K folder: the first 10 images of the real test split."""
    return make_f30k_standin(tmp_path_factory.mktemp("f30k"), "test", images=slice(0, 10))


def test_offline_pretrained_vit_fails_fast_with_one_message(tmp_path: Path, f30k_small: Path) -> None:
    result = run_train_cli(["experiment=f30k_vit", f"dataset.root={f30k_small}", "trainer=cpu"], tmp_path)
    msg = error_line(result)
    assert "google/vit-base-patch16-224-in21k" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "backbone.vision.name_or_path=" in msg  # (1) a local folder
    assert "HF_HOME" in msg  # (2) the cache
    assert "backbone.pretrained=false" in msg  # (3) random initialisation
    assert_nothing_written(tmp_path)


def test_offline_random_init_still_needs_a_local_tokenizer(tmp_path: Path, f30k_small: Path) -> None:
    """Way out (3) leaves the bert-base-uncased vocabulary to find: its own one-line message."""
    result = run_train_cli(
        ["experiment=f30k_vit", f"dataset.root={f30k_small}", "trainer=cpu", "backbone.pretrained=false"], tmp_path
    )
    msg = error_line(result)
    assert "'bert-base-uncased'" in msg and "dataset.tokenizer=" in msg
    assert_nothing_written(tmp_path)


# ------------------------------------------------------------------------------------------ local folders
@pytest.fixture(scope="module")
def local_models(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny random ViTModel and BertModel saved with ``save_pretrained``; the BERT folder also holds a
    WordPiece ``vocab.txt`` (from the real F30K captions), so it is the tokenizer folder too."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    base = tmp_path_factory.mktemp("local_models")
    vocab = build_wordpiece_vocab(read_lines(shared_data("f30k") / "test_caps.txt"), base / "bert", vocab_size=500)
    vocab_size = len(read_lines(vocab / "vocab.txt"))
    torch.manual_seed(123)
    vit = ViTModel(ViTConfig(**VIT_TINY), add_pooling_layer=False)
    bert = BertModel(BertConfig(vocab_size=vocab_size, **BERT_TINY), add_pooling_layer=False)
    with torch.no_grad():  # away from any initialisation scheme: equality can only come from the files
        for p in [*vit.parameters(), *bert.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    vit.save_pretrained(base / "vit")
    bert.save_pretrained(base / "bert")
    return SimpleNamespace(vit_dir=base / "vit", bert_dir=base / "bert", vit=vit.state_dict(),
                           bert=bert.state_dict(), vocab_size=vocab_size)


def same_weights(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    ours = module.state_dict()
    assert set(ours) == set(saved), sorted(set(ours) ^ set(saved))[:10]
    return all(torch.equal(ours[k], saved[k]) for k in saved)


def test_local_hf_folders_load_and_train(make_cfg, local_models: SimpleNamespace) -> None:
    local = [
        "backbone=vit", f"backbone.vision.name_or_path={local_models.vit_dir}",
        f"backbone.text.name_or_path={local_models.bert_dir}", f"dataset.tokenizer={local_models.bert_dir}",
        *LOCAL_COMMON,
    ]
    cfg = make_cfg([*local, "debug=fdr"], name="local")
    assert cfg.backbone.pretrained is True and os.environ.get("HF_HUB_OFFLINE") == "1"
    datamodule = build_datamodule(cfg)
    assert datamodule.vocab_size == local_models.vocab_size
    module = build_module(cfg, datamodule.vocab_size)
    assert same_weights(module.net.vision.backbone, local_models.vit)
    assert same_weights(module.net.text.backbone, local_models.bert)
    assert module.net.head.num_patches == 16  # from the saved config: 32 px, patch 8

    metrics = train(cfg)  # fast_dev_run: one training and one validation batch
    assert "val/rsum" in metrics

    # Control: the same folders with random initialisation give other weights.
    control = build_module(make_cfg([*local, "backbone.pretrained=false"], name="control"), datamodule.vocab_size)
    assert not same_weights(control.net.vision.backbone, local_models.vit)
    assert not same_weights(control.net.text.backbone, local_models.bert)


def test_timm_backbone_from_local_file(make_cfg, local_models: SimpleNamespace, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    saved = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(saved, str(tmp_path / "vit_tiny.safetensors"))
    overrides = [
        "backbone=timm_vit", "backbone.vision.model_name=vit_tiny_patch16_224",
        f"backbone.vision.checkpoint_path={tmp_path / 'vit_tiny.safetensors'}",
        f"backbone.text.name_or_path={local_models.bert_dir}", f"dataset.tokenizer={local_models.bert_dir}",
        "backbone.image_size=224", "backbone.embed_size=32", "trainer=cpu",
    ]
    cfg = make_cfg(overrides, name="timm")
    module = build_module(cfg, local_models.vocab_size)
    ours = module.net.vision.backbone.state_dict()
    assert set(saved) - set(ours) == {"head.weight", "head.bias"}  # the classifier is dropped (num_classes=0)
    assert all(torch.equal(ours[k], saved[k]) for k in ours)
    assert module.net.head.num_patches == 196 and module.net.vision.has_cls

    control = build_module(make_cfg([*overrides, "backbone.pretrained=false"], name="timm_control"),
                           local_models.vocab_size)
    assert not torch.equal(control.net.vision.backbone.state_dict()["patch_embed.proj.weight"],
                           saved["patch_embed.proj.weight"])


def test_timm_without_file_offline_is_one_clear_error(make_cfg, local_models: SimpleNamespace) -> None:
    timm = pytest.importorskip("timm")
    from huggingface_hub import try_to_load_from_cache

    from laps.models.hub import BackboneUnavailableError

    hub_id = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    if isinstance(try_to_load_from_cache(hub_id, "model.safetensors"), str):
        pytest.skip(f"{hub_id} is in this machine's Hugging Face cache")

    cfg = make_cfg(["backbone=timm_vit", "backbone.vision.model_name=vit_tiny_patch16_224",
                    f"backbone.text.name_or_path={local_models.bert_dir}", "backbone.image_size=224"], name="t")
    from laps.cli.common import user_error

    with pytest.raises(Exception) as err:
        build_module(cfg, local_models.vocab_size)
    cause = user_error(err.value)  # what laps-train reports in one line
    assert isinstance(cause, BackboneUnavailableError), repr(err.value)
    assert "'vit_tiny_patch16_224'" in str(cause) and "backbone.vision.checkpoint_path=" in str(cause)
