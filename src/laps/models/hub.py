"""Loading backbones from a hub name, a local folder or the local cache, with one clear error offline."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from laps.models.backbones import HUB_CONFIGS

log = logging.getLogger(__name__)

# Architectures of the known hub ids (random init and official checkpoints need no download).
BASE_CONFIGS: Mapping[str, Mapping[str, Any]] = HUB_CONFIGS


class BackboneUnavailableError(RuntimeError):
    """Pretrained weights or a config could not be found locally or downloaded."""


def _offline_message(name: str, cause: BaseException | None, option: str) -> str:
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub could not be reached"
    return (
        f"Cannot load {name!r}: it is not in the local cache and {why}"
        f"{f' ({type(cause).__name__})' if cause else ''}. Ways out: "
        f"(1) download it elsewhere and point to the folder, e.g. {option}=/path/to/{Path(name).name}; "
        f"(2) fill the Hugging Face cache (HF_HOME) on a machine with network and copy it here; "
        f"(3) train from random initialisation with backbone.pretrained=false."
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE"))


def _locally_available(name_or_path: str) -> bool:
    """A local path, or a hub name whose ``config.json`` is in the Hugging Face cache."""
    if Path(name_or_path).expanduser().exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name_or_path, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id, ...
        return False


def check_pretrained_available(backbone: Any) -> None:
    """Before any data is read: offline, every pretrained transformers backbone of the ``backbone``
    config must be a local folder or in the cache, else one :class:`BackboneUnavailableError`."""
    if not _hub_offline():
        return  # a download will be tried (and fail with the same message if it cannot)
    for part in ("vision", "text"):
        node = backbone.get(part) if backbone is not None else None
        if not node or not node.get("pretrained") or not node.get("name_or_path"):
            continue
        name = str(node.get("name_or_path"))
        if not _locally_available(name):
            raise BackboneUnavailableError(_offline_message(name, None, f"backbone.{part}.name_or_path"))


def disable_pretrained(cfg: Any) -> None:
    """Set ``pretrained: false`` on every backbone node of a run configuration, in place: rebuilt
    from a checkpoint, which holds every weight, nothing is downloaded."""
    from omegaconf import OmegaConf

    for key in ("backbone", "backbone.vision", "backbone.text", "model.net.vision", "model.net.text"):
        node = OmegaConf.select(cfg, key)
        if node is not None and "pretrained" in node:
            node.pretrained = False


def hf_config(name_or_path: str, overrides: dict[str, Any] | None = None, option: str = "backbone.vision"):
    """A transformers config from a local folder/file, a known base architecture, or the hub/cache."""
    from transformers import AutoConfig

    overrides = dict(overrides or {})
    path = Path(name_or_path)
    if path.exists():
        folder = path.parent if path.is_file() else path
        return AutoConfig.from_pretrained(str(folder), **overrides)
    if name_or_path in BASE_CONFIGS:
        fields = {**BASE_CONFIGS[name_or_path], **overrides}
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if name_or_path in _model_types():  # a bare architecture, e.g. "vit" with the sizes in overrides
        return AutoConfig.for_model(name_or_path, **overrides)
    try:
        return AutoConfig.from_pretrained(name_or_path, **overrides)
    except OSError as err:
        raise BackboneUnavailableError(_offline_message(name_or_path, err, option)) from err


def _model_types() -> set[str]:
    from transformers import CONFIG_MAPPING

    return set(CONFIG_MAPPING.keys())


def load_hf_model(
    name_or_path: str,
    pretrained: bool = True,
    config_overrides: dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    option: str = "backbone",
    **model_kwargs: Any,
) -> nn.Module:
    """A transformers ``AutoModel``: pretrained from a hub name, folder or cache, or random from its config."""
    from transformers import AutoModel

    kwargs = dict(model_kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if not pretrained:
        config = hf_config(name_or_path, config_overrides, option)
        return AutoModel.from_config(config, **kwargs)
    try:
        return AutoModel.from_pretrained(name_or_path, **dict(config_overrides or {}), **kwargs)
    except OSError as err:
        raise BackboneUnavailableError(_offline_message(name_or_path, err, option)) from err


def create_timm_model(
    model_name: str, pretrained: bool = True, checkpoint_path: str | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` with ``num_classes=0``; a local ``checkpoint_path`` overlays the pretrained file."""
    import timm

    if checkpoint_path:
        kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained or "connect" not in str(err).lower() and not isinstance(err, OSError):
            raise
        raise BackboneUnavailableError(
            _offline_message(model_name, err, "backbone.vision.checkpoint_path")
        ) from err
