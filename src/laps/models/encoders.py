"""Vision and text encoders: backbones from transformers or timm, projected to ``embed_size``.

Every vision encoder says explicitly whether its token 0 is a [CLS] token and how many
spatial tokens it returns; nothing is guessed from the token count.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


PROJECTIONS = ("auto", "linear")


def _check_projection(projection: str) -> None:
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")


def _projection(width: int, embed_size: int, projection: str) -> nn.Module:
    """``auto``: the identity between equal widths (as the official code), else a Linear; ``linear``: always."""
    if width == embed_size and projection == "auto":
        return nn.Identity()
    return nn.Linear(width, embed_size)


class VisionEncoder(nn.Module):
    """Images ``(B, 3, H, W)`` -> tokens ``(B, L, embed_size)``, [CLS] first when ``has_cls``.

    Subclasses set ``backbone``, ``width``, ``has_cls``, ``num_patches``, ``image_size`` and
    implement :meth:`tokens`.
    """

    backbone: nn.Module
    width: int
    has_cls: bool
    num_patches: int
    image_size: int

    def __init__(self, embed_size: int, projection: str = "auto") -> None:
        super().__init__()
        _check_projection(projection)  # before any backbone is loaded
        self.embed_size = embed_size
        self.projection = projection

    def _finish_init(self) -> None:
        self.proj = _projection(self.width, self.embed_size, self.projection)

    def tokens(self, images: Tensor) -> Tensor:
        """Backbone output tokens ``(B, L, width)``."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(self.tokens(images))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the backbone's blocks in backward instead of keeping their activations (training only)."""
        raise NotImplementedError


def _hf_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """A transformers model's activation checkpointing, with the non-reentrant ``torch.utils.checkpoint``
    (``activation_checkpointing_*`` in recent releases, ``gradient_checkpointing_*`` before)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


class HFVisionEncoder(VisionEncoder):
    """A transformers ``ViTModel`` or ``SwinModel`` (or any model with ``last_hidden_state``).

    Args:
        name_or_path: hub name or local folder of a ``config.json`` (and weights when ``pretrained``).
        embed_size: output width.
        pretrained: load the weights; otherwise build a randomly initialised model from the config.
        config_overrides: fields replaced in the config (e.g. ``image_size: 384``).
        projection: ``auto`` (the identity when the backbone's width equals ``embed_size``, as the
            official code) or ``linear`` (always a Linear).
    """

    def __init__(
        self,
        name_or_path: str,
        embed_size: int,
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        projection: str = "auto",
    ) -> None:
        super().__init__(embed_size, projection)
        from laps.models.hub import load_hf_model

        self.backbone = load_hf_model(
            name_or_path,
            pretrained=pretrained,
            config_overrides=config_overrides,
            attn_implementation=attn_implementation,
            option="backbone.vision.name_or_path",
            add_pooling_layer=False,
        )
        cfg = self.backbone.config
        self.model_type = cfg.model_type
        if cfg.model_type == "swin" or hasattr(cfg, "depths"):
            self.has_cls = False
            self.width = int(cfg.hidden_size)
            side = int(cfg.image_size) // int(cfg.patch_size) // (2 ** (len(cfg.depths) - 1))
            self.num_patches = side * side
        else:
            self.has_cls = True
            self.width = int(cfg.hidden_size)
            self.num_patches = (int(cfg.image_size) // int(cfg.patch_size)) ** 2
        self.image_size = int(cfg.image_size)
        self._finish_init()

    def tokens(self, images: Tensor) -> Tensor:
        return self.backbone(pixel_values=images).last_hidden_state

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        _hf_gradient_checkpointing(self.backbone, enabled)


class TimmVisionEncoder(VisionEncoder):
    """Any timm ViT-like (prefix tokens) or Swin-like (NHWC feature map) model.

    Args:
        model_name: timm architecture name, e.g. ``vit_base_patch16_224``.
        embed_size: output width.
        pretrained: load pretrained weights (from the hub, the cache, or ``checkpoint_path``).
        checkpoint_path: a local weights file (``pretrained_cfg_overlay`` is set to it).
        model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``).
        projection: as for :class:`HFVisionEncoder`.
    """

    def __init__(
        self,
        model_name: str,
        embed_size: int,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        projection: str = "auto",
    ) -> None:
        super().__init__(embed_size, projection)
        from laps.models.hub import create_timm_model

        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})

        self.backbone = create_timm_model(
            model_name, pretrained=pretrained, checkpoint_path=checkpoint_path, **(model_kwargs or {})
        )
        self.width = int(self.backbone.num_features)
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 0))
        if prefix > 1:
            raise ValueError(
                f"timm model {model_name!r} has {prefix} prefix tokens (registers or distillation "
                "tokens); LAPS expects at most one [CLS] token"
            )
        self.has_cls = prefix == 1
        size = self.backbone.pretrained_cfg.get("input_size", (3, 224, 224))
        self.image_size = int(getattr(self.backbone.patch_embed, "img_size", size[1:])[0])
        with torch.no_grad():
            probe = self.backbone.forward_features(torch.zeros(1, 3, self.image_size, self.image_size))
        self.num_patches = self._flatten(probe).shape[1] - int(self.has_cls)
        self._finish_init()

    @staticmethod
    def _flatten(features: Tensor) -> Tensor:
        return features.flatten(1, 2) if features.dim() == 4 else features

    def tokens(self, images: Tensor) -> Tensor:
        return self._flatten(self.backbone.forward_features(images))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the backbone's blocks in backward instead of keeping their activations (training only)."""
        self.backbone.set_grad_checkpointing(enabled)


class TextEncoder(nn.Module):
    """A BERT-family transformers model: ``input_ids`` ``(B, L)``, ``lengths`` ``(B,)`` -> ``(B, L, embed_size)``.

    The attention mask is built from the lengths (positions past a caption's length are padding).
    ``vocab_size`` sets the vocabulary of a randomly initialised model (``pretrained=False``)
    to the tokenizer's; a pretrained model's vocabulary must already cover it. ``projection``: as for
    :class:`HFVisionEncoder`.
    """

    def __init__(
        self,
        name_or_path: str,
        embed_size: int,
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: str | None = None,
        vocab_size: int | None = None,
        projection: str = "auto",
    ) -> None:
        super().__init__()
        _check_projection(projection)
        from laps.models.hub import load_hf_model

        overrides = dict(config_overrides or {})
        if vocab_size is not None and not pretrained:
            overrides["vocab_size"] = int(vocab_size)
        self.backbone = load_hf_model(
            name_or_path,
            pretrained=pretrained,
            config_overrides=overrides,
            attn_implementation=attn_implementation,
            option="backbone.text.name_or_path",
            add_pooling_layer=False,
        )
        model_vocab = int(self.backbone.config.vocab_size)
        if vocab_size is not None and vocab_size > model_vocab:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but text model {name_or_path!r} only {model_vocab}: "
                "use the model's own tokenizer (dataset.tokenizer) or backbone.pretrained=false"
            )
        self.width = int(self.backbone.config.hidden_size)
        self.max_length = int(getattr(self.backbone.config, "max_position_embeddings", 512))
        self.embed_size = embed_size
        self.projection = projection
        self.proj = _projection(self.width, embed_size, projection)

    def forward(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        lengths = torch.as_tensor(lengths, device=input_ids.device)
        mask = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None]
        out = self.backbone(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        return self.proj(out)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the backbone's layers in backward instead of keeping their activations (training only)."""
        _hf_gradient_checkpointing(self.backbone, enabled)
