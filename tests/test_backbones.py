"""Contract tests over the backbone list: every ``configs/backbone`` file agrees with
:mod:`laps.models.backbones`, and a tiny random instance of each (smaller width and depth, the
same geometry) encodes, scores and back-propagates with the token counts the list states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from laps.models import BACKBONES, LAPSModel, create_model, get_backbone
from laps.paths import config_dir

CONFIGS = Path(config_dir()) / "backbone"
BACKBONE_FILES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))

# Small widths and depths; image size, patch size and windows stay the registry's.
_HF_VIT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
_HF_SWIN = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}
_TIMM = {"embed_dim": 32, "depth": 1, "num_heads": 2}
_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(Path(config_dir())), version_base="1.3"):
        return compose("train", overrides=overrides)


def _small(name: str) -> dict:
    spec = get_backbone(name)
    if spec.vision_kind == "timm":
        return _TIMM
    return _HF_SWIN if spec.model_type == "swin" else _HF_VIT


def _dotted(prefix: str, fields: dict) -> list[str]:
    return [f"++{prefix}.{key}={value}".replace(" ", "") for key, value in fields.items()]


def test_every_config_file_is_registered() -> None:
    assert set(BACKBONE_FILES) == set(BACKBONES), "configs/backbone and laps.models.backbones disagree"


@pytest.mark.parametrize("name", BACKBONE_FILES)
def test_config_matches_registry(name: str) -> None:
    spec = get_backbone(name)
    cfg = _compose([f"backbone={name}"])
    vision, text = cfg.backbone.vision, cfg.backbone.text
    kind = {"laps.models.encoders.HFVisionEncoder": "hf", "laps.models.encoders.TimmVisionEncoder": "timm"}
    assert kind[vision._target_] == spec.vision_kind
    assert (vision.model_name if spec.vision_kind == "timm" else vision.name_or_path) == spec.vision_id
    assert text.name_or_path == spec.text_id
    assert cfg.backbone.image_size == spec.image_size
    assert cfg.backbone.embed_size == spec.embed_size
    assert cfg.backbone.pretrained == spec.pretrained
    assert (cfg.ratios.sparse_ratio, cfg.ratios.aggr_ratio) == (spec.sparse_ratio, spec.aggr_ratio)
    mean = cfg.backbone.get("image_mean")
    assert tuple(mean) == spec.image_mean if mean is not None else spec.image_mean == (0.485, 0.456, 0.406)
    if spec.vision_kind == "hf":
        overrides = OmegaConf.to_container(vision.config_overrides, resolve=True)
        overrides.pop("image_size", None)
        assert overrides == dict(spec.vision_overrides)
    assert OmegaConf.to_container(text.config_overrides, resolve=True) == dict(spec.text_overrides)


def _tiny_from_config(name: str) -> LAPSModel:
    prefix = "backbone.vision.model_kwargs" if get_backbone(name).vision_kind == "timm" \
        else "backbone.vision.config_overrides"
    cfg = _compose([f"backbone={name}", "backbone.pretrained=false", "backbone.embed_size=32",
                    "backbone.text.vocab_size=100", *_dotted(prefix, _small(name)),
                    *_dotted("backbone.text.config_overrides", _TEXT)])
    model = instantiate(cfg.model.net)
    assert isinstance(model, LAPSModel)
    return model


@pytest.mark.parametrize("name", BACKBONE_FILES)
def test_tiny_instance_contract(name: str) -> None:
    """encode_image / encode_text / similarity forward and backward, token counts and [CLS] as listed."""
    spec = get_backbone(name)
    torch.manual_seed(0)
    model = _tiny_from_config(name).train()
    assert model.vision.num_patches == spec.num_patches
    assert model.vision.has_cls == spec.has_cls
    assert model.vision.image_size == spec.image_size
    images = torch.randn(2, 3, spec.image_size, spec.image_size)
    ids = torch.randint(1, 100, (3, 7))
    lengths = torch.tensor([7, 5, 4])
    img = model.encode_image(images)
    cap = model.encode_text(ids, lengths)
    assert img.shape == (2, spec.num_tokens, 32)
    assert cap.shape == (3, 7, 32)
    sims = model.similarity(img, cap, lengths)
    assert sims.shape == (2, 3) and torch.isfinite(sims).all()
    sims.sum().backward()
    grads = [p.grad for p in model.vision.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is not None for p in model.text.proj.parameters())


def test_create_model_by_name_matches_config() -> None:
    """The factory by name builds the same architecture as the Hydra config of the same backbone."""
    torch.manual_seed(0)
    by_name = create_model("tiny", vocab_size=100)
    torch.manual_seed(0)
    cfg = _compose(["backbone=tiny", "backbone.text.vocab_size=100"])
    by_config = instantiate(cfg.model.net)
    left, right = by_name.state_dict(), by_config.state_dict()
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left)
    assert (by_name.head.sparse_ratio, by_name.head.aggr_ratio) == (0.5, 0.4)


def test_create_model_refuses_unknown_and_incomplete() -> None:
    with pytest.raises(KeyError, match="unknown backbone 'vitt'"):
        create_model("vitt")
    with pytest.raises(ValueError, match="both the vision and the text encoder"):
        create_model()


def test_check_data_tokenizer_is_the_text_encoder() -> None:
    from laps.models.backbones import TEXT_ENCODER

    cfg = OmegaConf.load(Path(config_dir()) / "check_data.yaml")
    assert cfg.backbone.text.name_or_path == TEXT_ENCODER
