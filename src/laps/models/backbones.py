"""The one list of backbones: each is defined here once and looked up by name.

A :class:`BackboneSpec` says everything the rest of the package needs to know about a backbone
without loading it: the vision encoder (its kind, hub id or timm name, and transformers config
fields for an offline random init), the text encoder, the token geometry (spatial tokens, [CLS]),
image size and normalisation, and the official ratios. ``configs/backbone/<name>.yaml`` are the
Hydra side of the same entries; ``tests/test_backbones.py`` checks them against this list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # transformers ViT/Swin image processors' normalisation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TEXT_ENCODER = "bert-base-uncased"
"""The text encoder of every LAPS backbone (hub id; its tokenizer is the datasets' default)."""

TEXT_VOCAB_SIZE = 30522
"""The vocabulary of :data:`TEXT_ENCODER`'s tokenizer (a random text model's, without a dataset)."""

_SWIN_B = {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]}

# transformers config fields of the known hub ids, so that random-init models and official
# checkpoints need no download.
HUB_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "google/vit-base-patch16-224-in21k": {"model_type": "vit"},
    "google/vit-base-patch16-384": {"model_type": "vit", "image_size": 384},
    "microsoft/swin-base-patch4-window7-224": {"model_type": "swin", **_SWIN_B, "window_size": 7,
                                               "image_size": 224},
    "microsoft/swin-base-patch4-window12-384": {"model_type": "swin", **_SWIN_B, "window_size": 12,
                                                "image_size": 384},
    TEXT_ENCODER: {"model_type": "bert"},
    "google-bert/" + TEXT_ENCODER: {"model_type": "bert"},
})


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: the vision and text encoders and the geometry the head is built for.

    Attributes:
        name: the registry key and the file ``configs/backbone/<name>.yaml``.
        vision_kind: ``hf`` (transformers ``ViTModel``/``SwinModel``) or ``timm``.
        vision_id: hub id (``hf``), a bare transformers model type with ``vision_overrides`` (the
            tiny random backbone), or the timm model name (``timm``).
        num_patches: spatial tokens the vision encoder returns (without [CLS]).
        has_cls: whether token 0 is a [CLS] token.
        image_size: input side in pixels.
        model_type: ``vit`` or ``swin`` (the official ``vit_type``).
        sparse_ratio, aggr_ratio: the official ratios for this family (``configs/ratios/``).
        embed_size: the joint embedding width of the recipe.
        pretrained: whether the recipe loads pretrained weights.
        text_id: the text encoder's hub id or bare model type.
        vision_overrides, text_overrides: config fields replaced in the encoders' configs.
    """

    name: str
    vision_kind: str
    vision_id: str
    num_patches: int
    has_cls: bool
    image_size: int
    model_type: str
    sparse_ratio: float
    aggr_ratio: float
    embed_size: int = 512
    pretrained: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    text_id: str = TEXT_ENCODER
    vision_overrides: Mapping[str, Any] = field(default_factory=dict)
    text_overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Tokens per image the head sees: the patches plus [CLS] when there is one."""
        return self.num_patches + int(self.has_cls)

    @property
    def ratios(self) -> str:
        """The ``configs/ratios`` option of this family."""
        return "swin" if self.model_type == "swin" else "vit"


_VIT = {"model_type": "vit", "sparse_ratio": 0.5, "aggr_ratio": 0.4, "has_cls": True}
_SWIN = {"model_type": "swin", "sparse_ratio": 0.8, "aggr_ratio": 0.6, "has_cls": False}

_SPECS = (
    BackboneSpec("vit", "hf", "google/vit-base-patch16-224-in21k", 196, image_size=224, **_VIT),
    BackboneSpec("vit_384", "hf", "google/vit-base-patch16-384", 576, image_size=384, **_VIT),
    BackboneSpec("swin", "hf", "microsoft/swin-base-patch4-window7-224", 49, image_size=224, **_SWIN),
    BackboneSpec("swin_384", "hf", "microsoft/swin-base-patch4-window12-384", 144, image_size=384, **_SWIN),
    BackboneSpec("timm_vit", "timm", "vit_base_patch16_224.augreg2_in21k_ft_in1k", 196, image_size=224,
                 **_VIT),
    BackboneSpec("clip_vit_b16", "timm", "vit_base_patch16_clip_224.openai", 196, image_size=224,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, **_VIT),
    BackboneSpec(
        "tiny", "hf", "vit", 64, image_size=64, embed_size=128, pretrained=False, text_id="bert",
        vision_overrides={"patch_size": 8, "hidden_size": 128, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "intermediate_size": 256,
                          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        text_overrides={"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 256, "max_position_embeddings": 128},
        **_VIT,
    ),
)

BACKBONES: Mapping[str, BackboneSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""Every backbone by name, in the order above."""


def get_backbone(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` called ``name``; a ``KeyError`` naming the known ones otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def backbone_for_vision(vision_id: str) -> BackboneSpec:
    """The backbone whose vision encoder is ``vision_id`` (a hub id or timm name)."""
    for spec in _SPECS:
        if spec.vision_id == vision_id:
            return spec
    raise KeyError(f"no backbone uses the vision encoder {vision_id!r}; known: "
                   + ", ".join(s.vision_id for s in _SPECS))

