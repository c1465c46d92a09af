"""The Hugging Face folder format of a :class:`~laps.models.LAPSModel` (or of the baseline
:class:`~laps.models.vse.VSEModel`): ``save_pretrained``, ``from_pretrained`` and ``push_to_hub``
through ``huggingface_hub``'s ``ModelHubMixin``.

A folder holds ``config.json`` (everything needed to rebuild the model without Hydra or
Lightning), ``model.safetensors`` (the weights only), ``vision/config.json`` and
``text/config.json`` (the transformers configs of the encoders; a timm vision encoder is named by
its model name and keywords instead), and the model card ``README.md``. Nothing in it is a pickle
and nothing in it is executed: loading is strict (a missing, extra or wrongly shaped tensor is
refused by name) and reads safetensors only. ``config.json``'s ``kind`` (``laps``, the default of
folders written before it existed, or ``vse``) names the model, ``head`` its head's options
(``pooling`` for ``vse``): ``from_pretrained`` of either class returns the folder's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelHubMixin

from laps.models.state import state_mismatch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
VISION_KINDS = ("hf", "timm")
MODEL_KINDS = ("laps", "vse")


class PretrainedFormatError(ValueError):
    """A folder or file that is not a loadable LAPS model; the message names the file and the key or tensor."""


def model_config(model: Any) -> dict[str, Any]:
    """The ``config.json`` content of ``model`` (a :class:`LAPSModel` or a :class:`VSEModel`)."""
    from laps.models.encoders import HFVisionEncoder, TimmVisionEncoder
    from laps.models.vse import VSEModel

    vision, head = model.vision, model.head
    if isinstance(vision, HFVisionEncoder):
        vision_cfg = {"kind": "hf", "config": "vision/config.json"}
    elif isinstance(vision, TimmVisionEncoder):
        vision_cfg = {"kind": "timm", "model_name": vision.model_name, "model_kwargs": dict(vision.model_kwargs)}
    else:
        raise PretrainedFormatError(f"cannot export a vision encoder of class {type(vision).__name__}")
    vision_cfg.update(projection=vision.projection, image_size=int(vision.image_size),
                      num_patches=int(vision.num_patches), has_cls=bool(vision.has_cls))
    if isinstance(model, VSEModel):
        kind, head_cfg = "vse", {"pooling": head.pooling}
    else:
        kind, head_cfg = "laps", {
            "sparse_ratio": head.sparse_ratio, "aggr_ratio": head.aggr_ratio, "chunk_pairs": head.chunk_pairs,
            "selection": head.selection, "attention_weight": head.attention_weight, "gumbel_tau": head.gumbel_tau,
        }
    return {
        "laps_format_version": FORMAT_VERSION,
        "kind": kind,
        "embed_size": int(model.embed_size),
        "vision": vision_cfg,
        "text": {"config": "text/config.json", "projection": model.text.projection,
                 "vocab_size": int(model.text.backbone.config.vocab_size)},
        "head": head_cfg,
    }


class PretrainedMixin(ModelHubMixin, library_name="laps", tags=["image-text-retrieval", "laps"]):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for :class:`LAPSModel`.

    The mixin's defaults are replaced where they do not fit: the model is rebuilt through
    :func:`laps.models.create_model` from ``config.json`` (it takes modules, not JSON), loading is
    strict and from safetensors only, and the card is ours (:attr:`model_card` when set).
    """

    model_card: str | None = None  # README.md text written by save_pretrained; None: a short generic card

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        config = model_config(self)
        if config["vision"]["kind"] == "hf":
            self.vision.backbone.config.save_pretrained(save_directory / "vision")
        self.text.backbone.config.save_pretrained(save_directory / "text")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        text = self.model_card or (
            "---\nlibrary_name: laps\ntags: [image-text-retrieval, laps]\n---\n\n# LAPS model\n\n"
            "A LAPS (Linguistic-Aware Patch Slimming) image-text retrieval model.\n\n"
            "```python\nfrom laps.models import LAPSModel\nmodel = LAPSModel.from_pretrained(\"PATH_OR_ID\")\n```\n"
        )
        return ModelCard(text)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any):
        """The model of a folder or hub id (see :func:`load_folder`); one :class:`PretrainedFormatError`
        naming the id when it is offline and not cached."""
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except LocalEntryNotFoundError:
            raise PretrainedFormatError(
                f"{pretrained_model_name_or_path}: not a folder, and not in the local Hugging Face cache "
                "(offline, or the hub could not be reached)"
            ) from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: Any, force_download: bool,
                         local_files_only: bool, token: Any, **model_kwargs: Any):
        folder = resolve_folder(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                local_files_only=local_files_only, token=token)
        # The mixin fills model_kwargs from config.json's keys named like LAPSModel's arguments:
        # only the placement is the caller's to choose.
        return load_folder(folder, device=model_kwargs.get("device"), dtype=model_kwargs.get("dtype"))


def resolve_folder(model_id: str, **download: Any) -> Path:
    """A local folder, or the snapshot of hub id ``model_id`` (through the cache; ``HF_HUB_OFFLINE``
    is honoured) holding the files of the format."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=model_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.md"],
                                      **{k: v for k, v in download.items() if v is not None}))
    except LocalEntryNotFoundError as err:
        raise PretrainedFormatError(
            f"{model_id}: not a folder, and not in the local Hugging Face cache while offline ({err.__class__.__name__})"
        ) from None


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of ``folder``, checked for the format version and the vision kind."""
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PretrainedFormatError(f"{path}: missing (not a LAPS model folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedFormatError(f"{path}: not valid JSON ({err})") from None
    version = config.get("laps_format_version")
    if not isinstance(version, int):
        raise PretrainedFormatError(f"{path}: no laps_format_version (not a LAPS model folder)")
    if version > FORMAT_VERSION:
        raise PretrainedFormatError(f"{path}: laps_format_version {version} is newer than this laps reads "
                                    f"({FORMAT_VERSION}); upgrade laps")
    kind = config.get("vision", {}).get("kind")
    if kind not in VISION_KINDS:
        raise PretrainedFormatError(f"{path}: vision.kind {kind!r} is not one of {VISION_KINDS}")
    model_kind = config.get("kind", "laps")
    if model_kind not in MODEL_KINDS:
        raise PretrainedFormatError(f"{path}: kind {model_kind!r} is not one of {MODEL_KINDS}")
    return config


def build_from_config(folder: Path, config: dict[str, Any]):
    """A randomly initialised model (``config``'s ``kind``) of the architecture it describes (no download)."""
    from laps.models.encoders import HFVisionEncoder, TextEncoder, TimmVisionEncoder
    from laps.models.factory import create_model

    embed, vis, txt = int(config["embed_size"]), config["vision"], config["text"]
    if vis["kind"] == "hf":
        vision = HFVisionEncoder(str(folder / vis["config"]), embed, pretrained=False, projection=vis["projection"])
    else:
        vision = TimmVisionEncoder(vis["model_name"], embed, pretrained=False, model_kwargs=vis["model_kwargs"],
                                   projection=vis["projection"])
    text = TextEncoder(str(folder / txt["config"]), embed, pretrained=False, projection=txt["projection"],
                       vocab_size=int(txt["vocab_size"]))
    return create_model(vision=vision, text=text, kind=config.get("kind", "laps"), **config["head"])


def load_folder(folder: str | Path, device: Any = None, dtype: Any = None):
    """The model saved in ``folder`` (a :class:`LAPSModel` or a :class:`VSEModel`, as its ``config.json``
    says), in eval mode, its weights loaded strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_config(folder)
    model = build_from_config(folder, config)
    path = folder / WEIGHTS_NAME
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise PretrainedFormatError(f"{path}: missing") from None
    except (SafetensorError, OSError) as err:
        raise PretrainedFormatError(f"{path}: damaged or truncated ({err})") from None
    check_state(path, model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def check_state(path: Path, expected: dict[str, Any], found: dict[str, Any]) -> None:
    """Refuse a missing, extra or wrongly shaped tensor, naming it (:func:`laps.models.state.state_mismatch`)."""
    mismatch = state_mismatch(expected, found, source="file")
    if mismatch is not None:
        raise PretrainedFormatError(f"{path}: {mismatch}")
