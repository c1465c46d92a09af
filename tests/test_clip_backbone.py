"""CLIP and other timm ViTs through the backbone adapter (``configs/backbone/clip_vit_b16.yaml``)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from helpers.common import TINY_BERT
from laps.training.tasks import train

# The CLIP ViT-B/16 architecture at width 32 and depth 1 (random weights, no download).
TINY_CLIP = [
    "backbone=clip_vit_b16", "backbone.pretrained=false", "backbone.embed_size=32",
    "+backbone.vision.model_kwargs.depth=1", "+backbone.vision.model_kwargs.embed_dim=32",
    "+backbone.vision.model_kwargs.num_heads=2", *TINY_BERT,
]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_clip_config_composes_and_builds(make_cfg) -> None:
    cfg = make_cfg(TINY_CLIP, name="clip")
    assert cfg.backbone.name == "clip_vit_b16" and cfg.backbone.image_size == 224
    assert cfg.backbone.vision.model_name == "vit_base_patch16_clip_224.openai"
    assert (cfg.ratios.sparse_ratio, cfg.ratios.aggr_ratio) == (0.5, 0.4)
    assert tuple(cfg.backbone.image_mean) == pytest.approx(CLIP_MEAN)
    assert tuple(cfg.backbone.image_std) == pytest.approx(CLIP_STD)

    model = instantiate(cfg.model.net, text={"vocab_size": 64}).eval()
    vision = model.vision
    # timm's CLIP tower: one prefix token (the class token), pre-norm, 14 x 14 patches of 16 px
    assert vision.backbone.num_prefix_tokens == 1 and vision.backbone.cls_token is not None
    assert vision.has_cls is True and vision.num_patches == 196 and vision.image_size == 224
    assert model.head.has_cls and model.head.num_patches == 196 and model.head.num_keep == 98
    assert model.head.num_aggregated == 39
    # the config's normalisation is CLIP's, as timm's pretrained config says
    assert tuple(vision.backbone.pretrained_cfg["mean"]) == pytest.approx(CLIP_MEAN)
    assert tuple(vision.backbone.pretrained_cfg["std"]) == pytest.approx(CLIP_STD)

    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.encode_image(images)
        features = vision.backbone.forward_features(images)
        ids = torch.randint(5, 60, (3, 7))
        sims = model.similarity(tokens, model.encode_text(ids, torch.tensor([7, 4, 2])), torch.tensor([7, 4, 2]))
    assert tokens.shape == (2, 197, 32)
    assert torch.allclose(tokens[:, 0], vision.proj(features[:, 0]))  # token 0 is timm's class token
    assert sims.shape == (2, 3) and torch.isfinite(sims).all()


def test_clip_image_size_follows_the_backbone_config(make_cfg) -> None:
    cfg = make_cfg([*TINY_CLIP, "backbone.image_size=64"], name="clip64")
    model = instantiate(cfg.model.net, text={"vocab_size": 64})
    assert model.vision.image_size == 64 and model.vision.num_patches == 16 and model.vision.has_cls
    assert cfg.dataset.image_size == 64


def test_clip_fast_dev_run(make_cfg) -> None:
    cfg = make_cfg([*TINY_CLIP, "backbone.image_size=64", "trainer=cpu", "logger=csv", "debug=fdr"], name="clip_fdr")
    metrics = train(cfg)
    assert "val/rsum" in metrics


@pytest.mark.parametrize(
    ("model_name", "kwargs", "outcome"),
    [
        # DeiT: one class token
        ("deit_tiny_patch16_224", {}, (True, 16)),
        # CLIP without a class token (average pooling): every token is a patch
        ("vit_base_patch16_clip_224.openai", {"class_token": False, "global_pool": "avg"}, (False, 16)),
        # a distillation token or registers: refused, naming the prefix tokens
        ("deit_tiny_distilled_patch16_224", {}, "2 prefix tokens"),
        ("vit_small_patch14_reg4_dinov2", {"img_size": 56}, "5 prefix tokens"),
    ],
)
def test_timm_prefix_tokens(model_name: str, kwargs: dict, outcome) -> None:
    from laps.models.encoders import TimmVisionEncoder

    model_kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 64, **kwargs}
    if isinstance(outcome, str):
        with pytest.raises(ValueError, match=outcome):
            TimmVisionEncoder(model_name, 32, pretrained=False, model_kwargs=model_kwargs)
        return
    enc = TimmVisionEncoder(model_name, 32, pretrained=False, model_kwargs=model_kwargs)
    has_cls, num_patches = outcome
    assert (enc.has_cls, enc.num_patches) == (has_cls, num_patches)
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 64, 64)).shape == (1, num_patches + int(has_cls), 32)
