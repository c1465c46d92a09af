"""``create_model``: the one way to build a model (a :class:`LAPSModel`, or the global-embedding
baseline :class:`~laps.models.vse.VSEModel`), from a backbone name or from encoders."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from laps.models.backbones import BackboneSpec, get_backbone
from laps.models.encoders import HFVisionEncoder, TextEncoder, TimmVisionEncoder, VisionEncoder
from laps.models.laps_model import LAPSModel
from laps.models.vse import POOLINGS, VSEModel

KINDS = ("laps", "vse")
LAPS_HEAD_OPTIONS = ("chunk_pairs", "max_saved_mb", "selection", "attention_weight", "gumbel_tau")


def create_vision_encoder(
    spec: BackboneSpec,
    embed_size: int | None = None,
    pretrained: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> VisionEncoder:
    """The vision encoder of ``spec``; ``overrides`` replace config fields (transformers) or
    ``timm.create_model`` keywords (timm) on top of the spec's own."""
    embed = spec.embed_size if embed_size is None else int(embed_size)
    load = spec.pretrained if pretrained is None else bool(pretrained)
    fields = {**spec.vision_overrides, **dict(overrides or {})}
    if spec.vision_kind == "timm":
        return TimmVisionEncoder(spec.vision_id, embed, pretrained=load, model_kwargs=fields or None)
    if spec.vision_kind == "hf":
        if spec.vision_id == spec.model_type:  # a bare architecture: its geometry comes from the spec
            fields = {"image_size": spec.image_size, **fields}
        return HFVisionEncoder(spec.vision_id, embed, pretrained=load, config_overrides=fields or None)
    raise ValueError(f"backbone {spec.name!r}: unknown vision_kind {spec.vision_kind!r} (hf or timm)")


def create_text_encoder(
    spec: BackboneSpec,
    embed_size: int | None = None,
    pretrained: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
    vocab_size: int | None = None,
) -> TextEncoder:
    """The text encoder of ``spec`` (``vocab_size`` for a random init with a dataset's tokenizer)."""
    embed = spec.embed_size if embed_size is None else int(embed_size)
    load = spec.pretrained if pretrained is None else bool(pretrained)
    fields = {**spec.text_overrides, **dict(overrides or {})}
    return TextEncoder(spec.text_id, embed, pretrained=load, config_overrides=fields or None,
                       vocab_size=vocab_size)


def create_model(
    backbone: str | BackboneSpec | None = None,
    *,
    vision: VisionEncoder | None = None,
    text: TextEncoder | None = None,
    embed_size: int | None = None,
    pretrained: bool | None = None,
    vision_overrides: Mapping[str, Any] | None = None,
    text_overrides: Mapping[str, Any] | None = None,
    vocab_size: int | None = None,
    sparse_ratio: float | None = None,
    aggr_ratio: float | None = None,
    kind: str = "laps",
    pooling: str | None = None,
    **head_options: Any,
) -> LAPSModel | VSEModel:
    """A :class:`LAPSModel` (``kind="laps"``) or :class:`~laps.models.vse.VSEModel` (``kind="vse"``)
    from a registered backbone (:mod:`laps.models.backbones`) or given encoders.

    Args:
        backbone: a registry name (``vit``, ``swin``, ``tiny``, ...) or spec; the encoders not given
            are built from it. Without it both ``vision`` and ``text`` are needed.
        vision, text: ready encoders (Hydra instantiates them from ``configs/backbone``).
        embed_size, pretrained: replace the spec's.
        vision_overrides, text_overrides: encoder config fields (smaller widths for tests, ...).
        vocab_size: the text encoder's vocabulary for a random init.
        sparse_ratio, aggr_ratio: the head's ratios; default the backbone's official ones (unused by ``vse``).
        kind: ``laps`` (the slimming head) or ``vse`` (cosine of pooled vectors).
        pooling: ``vse`` only: ``mean`` (the default) or ``gpo``.
        head_options: the rest of :class:`LAPSModel`'s options (``chunk_pairs``, ``max_saved_mb``,
            ``selection``, ``attention_weight``, ``gumbel_tau``); ``vse`` has no patch selection, so it refuses a
            ``selection`` other than ``topk`` and does not use the others.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (model.net.kind), got {kind!r}")
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS} (model.pooling), got {pooling!r}")
    if kind == "laps" and pooling is not None:
        raise ValueError(f"pooling={pooling!r} is an option of kind='vse' (model=vse), not of the LAPS head")
    unknown = sorted(set(head_options) - set(LAPS_HEAD_OPTIONS))
    if unknown:
        raise TypeError(f"create_model got unexpected options {unknown}")
    if kind == "vse" and head_options.get("selection", "topk") != "topk":
        raise ValueError(f"model.selection={head_options['selection']!r} selects patches for the LAPS head: "
                         "model=vse has no patch selection")
    spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
    if spec is None and (vision is None or text is None):
        raise ValueError("create_model needs a backbone name, or both the vision and the text encoder")
    if vision is None:
        vision = create_vision_encoder(spec, embed_size, pretrained, vision_overrides)
    if text is None:
        text = create_text_encoder(spec, embed_size, pretrained, text_overrides, vocab_size)
    if kind == "vse":
        return VSEModel(vision, text, pooling=pooling or "mean")
    if sparse_ratio is None or aggr_ratio is None:
        if spec is None:
            raise ValueError("create_model needs sparse_ratio and aggr_ratio when no backbone is named")
        sparse_ratio = spec.sparse_ratio if sparse_ratio is None else sparse_ratio
        aggr_ratio = spec.aggr_ratio if aggr_ratio is None else aggr_ratio
    return LAPSModel(vision, text, sparse_ratio=sparse_ratio, aggr_ratio=aggr_ratio, **head_options)
