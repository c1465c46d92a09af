"""Reading checkpoints of the official LAPS release into :class:`~laps.models.LAPSModel`.

An official ``model_best.pth`` is ``{'model': state_dict, 'opt': argparse.Namespace,
'epoch', 'best_rsum', 'Eiters'}``, saved with transformers 4.x parameter names:

===============================  ==========================================
official prefix                  here
===============================  ==========================================
``img_enc.visual_encoder.``      ``vision.backbone.`` (ViTModel / SwinModel)
``img_enc.vision_proj.``         ``vision.proj.``
``txt_enc.bert.``                ``text.backbone.`` (BertModel)
``txt_enc.fc.``                  ``text.proj.``
``cross_net.aggr_net.``          ``head.aggregation.`` (see :func:`load_head_state_dict`)
===============================  ==========================================

Inside the backbones, transformers 5 renamed many parameters (ViT ``layers.N.attention.q_proj``,
Swin ``attention.relative_position_bias.relative_position_bias_table``, ``mlp.fc1`` ...). No
rename table lives here: each backbone's part of the checkpoint goes through transformers' own
loader, ``from_pretrained(None, config=..., state_dict=...)``, which applies the library's
registered legacy-checkpoint conversions (``transformers.conversion_mapping``) exactly as for a
hub checkpoint. The pooler weights (unused here) and Swin's ``relative_position_index`` buffers
(recomputed by the model) are dropped; any other key left over or missing raises ``ValueError``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from laps.compat.serialization import safe_load
from laps.models.backbones import BACKBONES, HUB_CONFIGS, TEXT_ENCODER
from laps.models.encoders import HFVisionEncoder, TextEncoder
from laps.models.factory import create_model
from laps.models.head import LAPSHead
from laps.models.laps_model import LAPSModel

log = logging.getLogger(__name__)

OFFICIAL_TEXT_BACKBONE = TEXT_ENCODER
# (opt.vit_type, opt.img_res) of the official release -> hub id, from the backbone list.
OFFICIAL_VISION_BACKBONES: dict[tuple[str, int], str] = {
    (spec.model_type, spec.image_size): spec.vision_id
    for spec in BACKBONES.values()
    if spec.vision_kind == "hf" and spec.vision_id in HUB_CONFIGS
}

# Official state-dict prefix -> part of the model.
_PARTS: tuple[tuple[str, str], ...] = (
    ("img_enc.visual_encoder.", "vision_backbone"),
    ("img_enc.vision_proj.", "vision_proj"),
    ("txt_enc.bert.", "text_backbone"),
    ("txt_enc.fc.", "text_proj"),
    ("cross_net.", "head"),
)

# Options of the official ``opt`` copied by :func:`official_hparams` when present.
_REQUIRED_OPTIONS = ("embed_size", "sparse_ratio", "aggr_ratio", "vit_type")
_OPTIONAL_OPTIONS: dict[str, Any] = {
    "img_res": 224,
    "margin": 0.2,
    "ratio_weight": 2.0,
    "max_violation": False,
    "vse_mean_warmup_epochs": 1,
    "embedding_warmup_epochs": 0,
    "attention_weight": 0.8,
    "learning_rate": 2e-4,
    "batch_size": 128,
    "num_epochs": 30,
    "grad_clip": 2.0,
    "lr_schedules": [9, 15, 20, 25],
    "decay_rate": 0.3,
    "dataset": None,
    "max_word": 90,
    "size_augment": 1,
    "seed": 0,
    "num_patches": None,
}


_MAX_LISTED = 25


def _listing(keys: Any) -> str:
    """Sorted keys, at most ``_MAX_LISTED`` of them, for error messages."""
    keys = sorted(map(str, keys))
    more = len(keys) - _MAX_LISTED
    shown = ", ".join(keys[:_MAX_LISTED])
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}] ({len(keys)})"


# ---------------------------------------------------------------------------- options


def _opt_dict(opt: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(opt, argparse.Namespace):
        return dict(vars(opt))
    if isinstance(opt, Mapping):
        return dict(opt)
    raise TypeError(f"opt must be an argparse.Namespace or a mapping, got {type(opt).__name__}")


def _plain(value: Any) -> Any:
    """Plain Python containers (lists for tuples) so the result pickles without extra globals."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return value


def official_vision_backbone(vit_type: str, img_res: int) -> str:
    """Hub name of the official vision backbone for ``vit_type`` ('vit' or 'swin') at ``img_res`` px."""
    key = (str(vit_type).lower(), int(img_res))
    if key not in OFFICIAL_VISION_BACKBONES:
        known = ", ".join(f"vit_type={t!r} img_res={r}" for t, r in OFFICIAL_VISION_BACKBONES)
        raise ValueError(
            f"Unknown official backbone vit_type={vit_type!r}, img_res={img_res}; known: {known}"
        )
    return OFFICIAL_VISION_BACKBONES[key]


def official_hparams(opt: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of an official run, from its ``opt``, as a plain dict.

    Keys: ``embed_size``, ``sparse_ratio``, ``aggr_ratio``, ``vit_type``, ``img_res``, ``margin``,
    ``ratio_weight``, ``max_violation``, the warm-up epochs, optimiser and schedule settings
    (``learning_rate``, ``batch_size``, ``num_epochs``, ``grad_clip``, ``lr_schedules``,
    ``decay_rate``), ``dataset``, ``max_word``, ``size_augment``, ``seed``, ``num_patches``, and
    the backbones ``vision_backbone`` / ``text_backbone`` (hub names). Options missing from
    ``opt`` take the official defaults, except the four that fix the architecture
    (``embed_size``, ``sparse_ratio``, ``aggr_ratio``, ``vit_type``): those raise ``ValueError``.
    """
    options = _opt_dict(opt)
    missing = [name for name in _REQUIRED_OPTIONS if options.get(name) is None]
    if missing:
        raise ValueError(f"The official options lack {', '.join(missing)}; cannot tell the architecture")
    hparams: dict[str, Any] = {
        "embed_size": int(options["embed_size"]),
        "sparse_ratio": float(options["sparse_ratio"]),
        "aggr_ratio": float(options["aggr_ratio"]),
        "vit_type": str(options["vit_type"]).lower(),
    }
    for name, default in _OPTIONAL_OPTIONS.items():
        hparams[name] = _plain(options.get(name, default))
    hparams["img_res"] = int(hparams["img_res"])
    hparams["max_violation"] = bool(hparams["max_violation"])
    hparams["vision_backbone"] = official_vision_backbone(hparams["vit_type"], hparams["img_res"])
    hparams["text_backbone"] = OFFICIAL_TEXT_BACKBONE
    return hparams


# ---------------------------------------------------------------------------- the file


@dataclass
class OfficialCheckpoint:
    """Contents of an official ``model_best.pth``/``checkpoint.pth``."""

    state_dict: dict[str, Tensor]
    opt: dict[str, Any]
    epoch: int | None = None
    best_rsum: float | None = None
    eiters: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def hparams(self) -> dict[str, Any]:
        """:func:`official_hparams` of :attr:`opt`."""
        return official_hparams(self.opt)


def read_official_checkpoint(path: str | os.PathLike) -> OfficialCheckpoint:
    """Read an official checkpoint with :func:`~laps.compat.serialization.safe_load` (no code runs).

    Raises ``UnsafeCheckpointError`` for a file needing unknown globals and ``ValueError`` for a
    file without the official layout (a dict with ``model`` and ``opt``).
    """
    raw = safe_load(path)
    if not isinstance(raw, Mapping) or "model" not in raw or "opt" not in raw:
        keys = sorted(map(str, raw)) if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(
            f"{path} is not an official LAPS checkpoint (expected keys 'model' and 'opt', got {keys})"
        )
    state_dict = raw["model"]
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: 'model' is not a state dict of tensors")
    extra = {k: v for k, v in raw.items() if k not in ("model", "opt", "epoch", "best_rsum", "Eiters")}
    return OfficialCheckpoint(
        state_dict=dict(state_dict),
        opt=_opt_dict(raw["opt"]),
        epoch=_plain(raw.get("epoch")),
        best_rsum=_plain(raw.get("best_rsum")),
        eiters=_plain(raw.get("Eiters")),
        extra=extra,
    )


# ---------------------------------------------------------------------------- the head


def _head_key(key: str) -> str | None:
    """Official head key (``cross_net.aggr_net.*`` or ``aggr_net.*``) -> ours, or None if not one."""
    bare = key.removeprefix("cross_net.")
    if bare == "aggr_net.scale":
        return "aggregation.scale"
    if bare.startswith("aggr_net.weight."):
        return "aggregation.mlp." + bare.removeprefix("aggr_net.weight.")
    return None


def _official_head_key(key: str) -> str:
    """Our head key -> the official (bare) name, for messages."""
    return "aggr_net." + key.removeprefix("aggregation.").replace("mlp.", "weight.", 1)


def _convert_head_state_dict(head: LAPSHead, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    expected = head.state_dict()
    converted: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    unknown, duplicated, mismatched = [], [], []
    for key, value in state_dict.items():
        ours = _head_key(key)
        if ours is None or ours not in expected:
            unknown.append(key)
        elif ours in converted:
            duplicated.append(f"{source[ours]} and {key}")
        elif tuple(value.shape) != tuple(expected[ours].shape):
            mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(expected[ours].shape)} expected")
            source[ours] = key
        else:
            converted[ours] = value
            source[ours] = key
    missing = [_official_head_key(k) for k in expected if k not in source]
    problems = []
    if unknown:
        problems.append(f"unknown keys: {_listing(unknown)}")
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if duplicated:
        problems.append(f"keys given twice: {duplicated}")
    if mismatched:
        problems.append(
            f"shape mismatches (check embed_size, sparse_ratio, aggr_ratio and num_patches): {mismatched}"
        )
    if problems:
        raise ValueError("Cannot load the official head: " + "; ".join(problems))
    return converted


def load_head_state_dict(head: LAPSHead, state_dict: Mapping[str, Tensor]) -> None:
    """Load an official head (``cross_net.aggr_net.*`` or bare ``aggr_net.*`` keys) into ``head``.

    ``aggr_net.scale`` -> ``aggregation.scale`` (1, 1, 1); ``aggr_net.weight.{0,1,3}.*`` ->
    ``aggregation.mlp.{0,1,3}.*`` (LayerNorm, Linear(C, C/5), Linear(C/5, M)). Unknown, missing,
    duplicated or wrongly shaped keys raise ``ValueError`` listing them; nothing is loaded then.
    """
    head.load_state_dict(_convert_head_state_dict(head, state_dict), strict=True)


# ---------------------------------------------------------------------------- backbones


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bar and no load report from transformers: our own checks report everything."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()


def _drop_unused(backbone: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove what official checkpoints carry but the backbone does not keep.

    The pooler (when the backbone has none: nothing in LAPS uses it) and Swin's
    ``relative_position_index`` buffers (recomputed from the window size, not learned).
    """
    has_pooler = getattr(backbone, "pooler", None) is not None
    keeps_index = any(k.endswith("relative_position_index") for k in backbone.state_dict())
    kept, dropped = {}, []
    for key, value in state_dict.items():
        if (key.startswith("pooler.") and not has_pooler) or (
            key.endswith("relative_position_index") and not keeps_index
        ):
            dropped.append(key)
        else:
            kept[key] = value
    if dropped:
        log.debug("Dropped %d unused official keys: %s", len(dropped), dropped)
    return kept


def convert_backbone_state_dict(backbone: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers-4.x state dict of ``backbone`` (keys without any prefix) in ``backbone``'s own names.

    Uses transformers' loader (``type(backbone).from_pretrained(None, config=backbone.config,
    state_dict=...)``), so the library's registered legacy conversions apply, then checks its
    loading report: missing, unexpected or wrongly shaped keys raise ``ValueError`` listing them.
    """
    cls = type(backbone)
    if not hasattr(cls, "from_pretrained") or not hasattr(backbone, "config"):
        raise TypeError(f"{cls.__name__} is not a transformers model")
    kwargs: dict[str, Any] = {}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        kwargs["add_pooling_layer"] = getattr(backbone, "pooler", None) is not None
    param = next(backbone.parameters(), None)
    if param is not None:
        kwargs["dtype"] = param.dtype
    with _quiet_transformers():
        loaded, info = cls.from_pretrained(
            None,
            config=backbone.config,
            state_dict=_drop_unused(backbone, state_dict),
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            local_files_only=True,
            **kwargs,
        )
    problems = []
    if info.get("unexpected_keys"):
        problems.append(f"unexpected keys (as renamed by transformers): {_listing(info['unexpected_keys'])}")
    if info.get("missing_keys"):
        problems.append(f"missing keys: {_listing(info['missing_keys'])}")
    if info.get("mismatched_keys"):
        shapes = [
            f"{k}: {tuple(a)} in the file vs {tuple(b)} expected"
            for k, a, b in sorted(info["mismatched_keys"])
        ]
        problems.append(f"shape mismatches (is the config right?): {_listing(shapes)}")
    problems += [str(m) for m in info.get("error_msgs") or []]
    problems += [f"{k}: {v}" for k, v in (info.get("conversion_errors") or {}).items()]
    if problems:
        raise ValueError("; ".join(problems))
    expected = backbone.state_dict()
    converted = loaded.state_dict()
    if set(converted) != set(expected):  # both built from the same config and class
        raise ValueError(
            f"the converted keys differ from the model's: {_listing(set(converted) ^ set(expected))}"
        )
    return converted


# ---------------------------------------------------------------------------- the whole model


def _strip_wrappers(key: str) -> str:
    """Drop ``module.`` path components left by (Distributed)DataParallel wrappers."""
    return re.sub(r"(^|\.)module\.", r"\1", key)


def split_official_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Group official keys by part: ``vision_backbone``, ``vision_proj``, ``text_backbone``,
    ``text_proj`` (prefixes stripped) and ``head`` (keys kept). Unknown keys raise ``ValueError``."""
    parts: dict[str, dict[str, Tensor]] = {name: {} for _, name in _PARTS}
    unknown = []
    for raw_key, value in state_dict.items():
        key = _strip_wrappers(raw_key)
        for prefix, name in _PARTS:
            if key.startswith(prefix):
                parts[name][key if name == "head" else key.removeprefix(prefix)] = value
                break
        else:
            unknown.append(raw_key)
    if unknown:
        known = ", ".join(p for p, _ in _PARTS)
        raise ValueError(
            f"Unknown keys in the official checkpoint (known prefixes: {known}): {_listing(unknown)}"
        )
    return parts


def _convert_projection(
    proj: nn.Module, state_dict: Mapping[str, Tensor], width: int, name: str
) -> dict[str, Tensor]:
    """Check an official projection: ``weight`` (C, width), ``bias`` (C,), C = ``proj``'s outputs."""
    if set(state_dict) != {"weight", "bias"}:
        raise ValueError(f"{name}: expected keys weight and bias, got {sorted(state_dict)}")
    weight, bias = state_dict["weight"], state_dict["bias"]
    if weight.dim() != 2 or weight.shape[1] != width or tuple(bias.shape) != tuple(weight.shape[:1]):
        raise ValueError(f"{name}: shapes {tuple(weight.shape)}/{tuple(bias.shape)} do not fit width {width}")
    out_features = getattr(proj, "out_features", width)  # an identity keeps the width
    if weight.shape[0] != out_features:
        raise ValueError(f"{name}: {weight.shape[0]} outputs in the file vs embed_size {out_features}")
    return {"weight": weight, "bias": bias}


def _load_projection(encoder: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load into ``encoder.proj``; an identity (width == embed_size) becomes the official Linear."""
    if not isinstance(encoder.proj, nn.Linear):
        weight = state_dict["weight"]
        ref = next(encoder.parameters())
        encoder.proj = nn.Linear(weight.shape[1], weight.shape[0], device=ref.device, dtype=ref.dtype)
        encoder.projection = "linear"
        log.info(
            "%s: width == embed_size, but the official checkpoint projects: using a Linear",
            type(encoder).__name__,
        )
    encoder.proj.load_state_dict(dict(state_dict), strict=True)


def load_official_state_dict(model: LAPSModel, state_dict: Mapping[str, Tensor]) -> None:
    """Load an official state dict into ``model`` (built with the matching architecture).

    Every part is converted and checked before anything is loaded; all problems are reported
    together in one ``ValueError`` and ``model`` is left untouched. An official projection loaded
    where ``model`` has an identity (width equal to ``embed_size``) becomes an ``nn.Linear``.
    """
    parts = split_official_state_dict(state_dict)
    problems: list[str] = []
    converted: dict[str, Any] = {}
    plan = (
        (
            "vision_backbone",
            "img_enc.visual_encoder.",
            lambda sd: convert_backbone_state_dict(model.vision.backbone, sd),
        ),
        ("text_backbone", "txt_enc.bert.", lambda sd: convert_backbone_state_dict(model.text.backbone, sd)),
        ("head", "cross_net.", lambda sd: _convert_head_state_dict(model.head, sd)),
        (
            "vision_proj",
            "img_enc.vision_proj.",
            lambda sd: _convert_projection(model.vision.proj, sd, model.vision.width, "img_enc.vision_proj"),
        ),
        (
            "text_proj",
            "txt_enc.fc.",
            lambda sd: _convert_projection(model.text.proj, sd, model.text.width, "txt_enc.fc"),
        ),
    )
    for name, prefix, convert in plan:
        if not parts[name]:
            if name.endswith("proj") and isinstance(getattr(model, name.split("_")[0]).proj, nn.Identity):
                continue  # neither side projects
            problems.append(f"{prefix}*: missing from the checkpoint")
            continue
        try:
            converted[name] = convert(parts[name])
        except ValueError as err:
            problems.append(f"{prefix}*: {err}")
    if problems:
        raise ValueError(
            "Cannot load the official checkpoint (does the model's architecture match it? see "
            "vision_config/text_config):\n  " + "\n  ".join(problems)
        )
    model.vision.backbone.load_state_dict(converted["vision_backbone"], strict=True)
    model.text.backbone.load_state_dict(converted["text_backbone"], strict=True)
    model.head.load_state_dict(converted["head"], strict=True)
    if "vision_proj" in converted:
        _load_projection(model.vision, converted["vision_proj"])
    if "text_proj" in converted:
        _load_projection(model.text, converted["text_proj"])


def build_official_model(
    hparams: Mapping[str, Any],
    vision_config: str | os.PathLike | None = None,
    text_config: str | os.PathLike | None = None,
) -> LAPSModel:
    """A randomly initialised :class:`LAPSModel` with the architecture of :func:`official_hparams`.

    ``vision_config``/``text_config`` (a ``config.json`` or a folder holding one) replace the
    official base configurations. Nothing is downloaded.
    """
    vision_name = str(vision_config) if vision_config is not None else hparams["vision_backbone"]
    text_name = str(text_config) if text_config is not None else hparams["text_backbone"]
    embed = int(hparams["embed_size"])
    vision = HFVisionEncoder(vision_name, embed, pretrained=False)
    text = TextEncoder(text_name, embed, pretrained=False)
    img_res = hparams.get("img_res")
    if img_res is not None and vision.image_size != int(img_res):
        log.warning(
            "The official run used img_res=%s but the vision config has image_size=%d",
            img_res,
            vision.image_size,
        )
    if hparams.get("vit_type") and vision.model_type != hparams["vit_type"]:
        log.warning(
            "The official run used vit_type=%r but the vision config is a %r model",
            hparams["vit_type"],
            vision.model_type,
        )
    num_patches = hparams.get("num_patches")
    if num_patches is not None and int(num_patches) != vision.num_patches:
        raise ValueError(
            f"The official run had num_patches={num_patches}, the vision backbone {vision_name!r} "
            f"gives {vision.num_patches}; pass the matching vision_config"
        )
    return create_model(vision=vision, text=text, sparse_ratio=hparams["sparse_ratio"],
                        aggr_ratio=hparams["aggr_ratio"])


def load_official_checkpoint(
    path: str | os.PathLike,
    vision_config: str | os.PathLike | None = None,
    text_config: str | os.PathLike | None = None,
) -> LAPSModel:
    """An official LAPS checkpoint as a :class:`LAPSModel` in eval mode.

    Args:
        path: the official ``model_best.pth`` (read with ``safe_load``: no code in it runs).
        vision_config: ``config.json`` (or its folder) of the vision backbone; default the
            official one for ``opt.vit_type``/``opt.img_res``.
        text_config: likewise for the text backbone; default the official text encoder (:data:`laps.models.backbones.TEXT_ENCODER`).

    Raises:
        UnsafeCheckpointError: the file needs globals outside the allow-list.
        ValueError: unknown, missing or wrongly shaped parameters (all listed).
    """
    return model_from_official(read_official_checkpoint(path), vision_config, text_config, source=path)


def model_from_official(
    ckpt: OfficialCheckpoint,
    vision_config: str | os.PathLike | None = None,
    text_config: str | os.PathLike | None = None,
    source: str | os.PathLike = "",
) -> LAPSModel:
    """:func:`load_official_checkpoint` of a checkpoint already read (:func:`read_official_checkpoint`)."""
    hparams = ckpt.hparams
    model = build_official_model(hparams, vision_config, text_config)
    load_official_state_dict(model, ckpt.state_dict)
    log.info(
        "Loaded official LAPS checkpoint %s (epoch %s, rsum %s): %s, embed_size %d, ratios %s/%s",
        source,
        ckpt.epoch,
        ckpt.best_rsum,
        hparams["vision_backbone"] if vision_config is None else vision_config,
        hparams["embed_size"],
        hparams["sparse_ratio"],
        hparams["aggr_ratio"],
    )
    return model.eval()
