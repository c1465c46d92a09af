"""Overrides and comparisons that several test files share."""

from __future__ import annotations

import torch

# backbone=tiny (the demo's ViT + BERT) at width 32, one layer each; its 8 px patches give a 4 x 4
# grid at 32 px. The tiny backbone's configs list these keys, so no ``+`` is needed.
TINY_WIDTH32 = [
    "backbone.embed_size=32", "backbone.image_size=32",
    "backbone.vision.config_overrides.hidden_size=32", "backbone.vision.config_overrides.num_hidden_layers=1",
    "backbone.vision.config_overrides.intermediate_size=64",
    "backbone.text.config_overrides.hidden_size=32", "backbone.text.config_overrides.num_hidden_layers=1",
    "backbone.text.config_overrides.intermediate_size=64",
]
# BERT at width 32 and depth 1, for the full-size backbone configs (whose overrides start empty).
TINY_BERT = [
    "+backbone.text.config_overrides.hidden_size=32", "+backbone.text.config_overrides.num_hidden_layers=1",
    "+backbone.text.config_overrides.num_attention_heads=2", "+backbone.text.config_overrides.intermediate_size=64",
]
# backbone=vit at width 32, depth 1, 32 px images and 8 px patches: 16 patches and [CLS] (no text part).
TINY_VIT = [
    "backbone=vit", "backbone.pretrained=false", "backbone.embed_size=32", "backbone.image_size=32",
    "+backbone.vision.config_overrides.patch_size=8", "+backbone.vision.config_overrides.hidden_size=32",
    "+backbone.vision.config_overrides.num_hidden_layers=1", "+backbone.vision.config_overrides.num_attention_heads=2",
    "+backbone.vision.config_overrides.intermediate_size=64", "+backbone.vision.config_overrides.image_size=32",
]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``||ours - ref|| / ||ref||`` in float64."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-300))
