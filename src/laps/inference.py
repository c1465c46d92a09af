"""A trained LAPS checkpoint for inference: the model, its tokenizer and its evaluation transform.

:func:`load_for_inference` reads a laps checkpoint (written by ``laps-train`` or
``laps-import-official``: ``state_dict`` plus ``laps_config``) with
:func:`laps.compat.serialization.safe_load`, rebuilds the model exactly as ``laps-eval`` does
(:func:`build_network` on the stored configuration) and loads the weights. The
backbones are built without downloading pretrained weights (they all come from the checkpoint)
and without ``torch.compile``. The tokenizer and the image transform are those of the run's
dataset configuration (``dataset.tokenizer``, ``dataset.max_words``, ``dataset.image_size`` and,
when the configuration has them, ``dataset.image_mean``/``dataset.image_std``), so images and
captions are prepared as in evaluation.

Example::

    engine = load_for_inference("run/checkpoints/last.ckpt", device="auto")
    img = engine.encode_images(["cat.jpg"])            # (1, L_v, C)
    cap, lens = engine.encode_captions(["a cat", "a dog"])
    sims = engine.similarity(img, cap, lens)           # (1, 2)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "InferenceModel",
    "eval_transform",
    "inference_config",
    "load_for_inference",
    "model_fingerprint",
    "resolve_device",
    "synchronize",
]

_WORD_EMBEDDINGS = "text.backbone.embeddings.word_embeddings.weight"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or ``None``) -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device``
    (``ValueError`` for CUDA on a machine without it)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA device is available")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so that wall-clock timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_config(stored: dict[str, Any], overrides: dict[str, Any] | None = None):
    """The run configuration of a checkpoint, set up for inference (a ``DictConfig``).

    Both backbones are built with ``pretrained=false`` (the checkpoint holds every weight, so nothing
    is downloaded) and ``compile`` is off. ``overrides`` (a nested dict) is merged last.
    """
    from omegaconf import OmegaConf, open_dict

    from laps.models.hub import disable_pretrained

    cfg = OmegaConf.create(stored)
    with open_dict(cfg):
        disable_pretrained(cfg)
        cfg.compile = False
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    return cfg


def eval_transform(
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[Image.Image], Tensor]:
    """The evaluation transform (:func:`laps.data.transforms.build_transform`, ``train=False``);
    ``mean``/``std`` default to ImageNet's."""
    from laps.data.transforms import build_transform

    return build_transform(image_size, train=False, mean=mean, std=std)



def model_fingerprint(model: torch.nn.Module, prefix: str = "vision.") -> str:
    """A short hash of the parameters under ``prefix`` (their names, shapes and first values).

    Embeddings made with one model are only comparable with that model: ``laps-retrieve`` stores
    this with an index and checks it before a search.
    """
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(prefix):
            continue
        flat = tensor.detach().reshape(-1)[:4096].float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class InferenceModel:
    """A loaded checkpoint: ``model`` (a :class:`laps.models.LAPSModel` in eval mode on ``device``),
    the evaluation ``transform`` (PIL image -> ``(3, S, S)``), the tokenizer (loaded on first use) and
    the run ``config`` (``DictConfig``)."""

    model: Any
    transform: Callable[[Image.Image], Tensor]
    config: Any
    device: torch.device
    checkpoint: Path
    tokenizer_name: str
    max_words: int
    image_size: int
    _tokenizer: Any = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ parts
    @property
    def head(self):
        """The :class:`laps.models.head.LAPSHead`."""
        return self.model.head

    @property
    def tokenizer(self):
        """The run's :class:`laps.data.tokenization.CaptionTokenizer` (no augmentation)."""
        if self._tokenizer is None:
            from laps.data.tokenization import CaptionTokenizer

            tok = CaptionTokenizer(self.tokenizer_name, max_words=self.max_words)
            model_vocab = int(self.model.text.backbone.config.vocab_size)
            if tok.vocab_size > model_vocab:
                raise ValueError(
                    f"the tokenizer {self.tokenizer_name!r} has {tok.vocab_size} tokens but the checkpoint's "
                    f"text model only {model_vocab}: pass the tokenizer the model was trained with"
                )
            self._tokenizer = tok
        return self._tokenizer

    def fingerprint(self) -> str:
        """:func:`model_fingerprint` of the vision encoder (computed once: inference does not change it)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, "vision.")
        return self._fingerprint

    # ------------------------------------------------------------------ encoding
    def load_image(self, image: Image.Image | str | Path) -> Tensor:
        """A PIL image or a path -> the transformed ``(3, S, S)`` tensor."""
        if not isinstance(image, Image.Image):
            from laps.data.datasets import open_image

            image = open_image(image)
        return self.transform(image.convert("RGB"))

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image | str | Path] | Tensor) -> Tensor:
        """Images (PIL, paths, or an already transformed ``(B, 3, S, S)`` tensor) -> tokens ``(B, L_v, C)``
        (fp32, on ``device``)."""
        if not isinstance(images, Tensor):
            images = torch.stack([self.load_image(im) for im in images])
        return self.model.encode_image(images.to(self.device)).float()

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions -> ``(input_ids (B, L), lengths (B,))`` on the CPU, as in evaluation."""
        from laps.data.datasets import pad_input_ids

        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of strings, not a single string")
        empty = [i for i, c in enumerate(captions) if not str(c).strip()]
        if empty:
            raise ValueError(f"caption {empty[0] + 1} of {len(captions)} is empty: there is nothing to score")
        tok = self.tokenizer
        return pad_input_ids([tok(c, augment=False) for c in captions], tok.pad_id)

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions -> ``(word tokens (B, L_t, C) fp32, lengths (B,))``, both on ``device``."""
        ids, lens = self.tokenize(captions)
        ids, lens = ids.to(self.device), lens.to(self.device)
        return self.model.encode_text(ids, lens).float(), lens

    @torch.no_grad()
    def similarity(self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor) -> Tensor:
        """LAPS similarities ``(B_v, B_t)`` (fp32) of encoded images and captions."""
        dev = self.device
        return self.model.similarity(img_embs.to(dev).float(), cap_embs.to(dev).float(), cap_lens.to(dev))


def build_network(cfg: Any, vocab_size: int):
    """The run's :class:`laps.models.LAPSModel` alone (``cfg.model.net``, through
    :func:`laps.models.create_model`), without the LightningModule; a random text model without a set
    vocabulary gets ``vocab_size``."""
    import hydra

    extra = {} if cfg.backbone.text.get("vocab_size") else {"text": {"vocab_size": vocab_size}}
    return hydra.utils.instantiate(cfg.model.net, **extra)


def load_for_inference(
    path: str | Path,
    device: str | torch.device | None = "auto",
    tokenizer: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> InferenceModel:
    """Rebuild the model of a laps checkpoint and load its weights, for inference.

    Args:
        path: a checkpoint with ``state_dict`` and ``laps_config`` (``laps-train``, ``laps-import-official``),
            or a Hugging Face model folder (``laps-export``, :mod:`laps.models.pretrained`).
        device: ``auto`` (GPU when present), ``cpu``, ``cuda:1``, ...
        tokenizer: replaces ``dataset.tokenizer`` of the run (a folder holding ``vocab.txt`` or a hub
            name), e.g. when the run's folder is not on this machine.
        overrides: nested dict merged onto the stored configuration.

    Raises:
        ValueError: the file holds no laps configuration or its weights do not fit it.
        laps.compat.serialization.UnsafeCheckpointError: the file needs globals outside the allow-list.
    """
    from laps.compat.serialization import safe_load

    path = Path(path)
    if path.is_dir():
        return _load_folder(path, device, tokenizer)
    checkpoint = safe_load(path)
    if not isinstance(checkpoint, dict) or not checkpoint.get("laps_config") or "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} holds no laps configuration and weights: it was not written by laps-train "
            "(official LAPS checkpoints: convert them with laps-import-official first)"
        )
    cfg = inference_config(checkpoint["laps_config"], overrides)
    state = checkpoint["state_dict"]
    vocab_key = next((k for k in state if k.endswith(_WORD_EMBEDDINGS)), None)
    if vocab_key is None:
        raise ValueError(f"{path}: no text word embeddings ({_WORD_EMBEDDINGS}) in the state dict")
    model = build_network(cfg, int(state[vocab_key].shape[0]))
    weights = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    unexpected += [k for k in state if not k.startswith("net.")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not fit the stored configuration (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    dev = resolve_device(device)
    model = model.to(dev).eval()
    data = cfg.dataset
    image_size = int(data.get("image_size") or cfg.backbone.image_size)
    transform = eval_transform(image_size, data.get("image_mean"), data.get("image_std"))
    log.info("loaded %s (%s vision tokens, embed size %d) on %s", path, model.head.num_patches, model.embed_size, dev)
    return InferenceModel(
        model=model,
        transform=transform,
        config=cfg,
        device=dev,
        checkpoint=path,
        tokenizer_name=str(tokenizer or data.tokenizer),
        max_words=int(data.get("max_words", 90)),
        image_size=image_size,
    )


def _load_folder(path: Path, device: Any, tokenizer: str | None) -> InferenceModel:
    """:func:`load_for_inference` of a Hugging Face model folder: its ``config.json``'s ``data`` gives
    the tokenizer (the folder's own files), ``max_words``, image size and normalisation."""
    from omegaconf import OmegaConf

    from laps.models.pretrained import load_folder, read_config

    stored = read_config(path)
    data = dict(stored.get("data") or {})
    dev = resolve_device(device)
    model = load_folder(path).to(dev).eval()
    image_size = int(data.get("image_size") or model.vision.image_size)
    config = OmegaConf.create({"dataset": {**data, "tokenizer": str(path)}, "model": stored.get("training", {})})
    log.info("loaded %s (%s vision tokens, embed size %d) on %s", path, model.head.num_patches, model.embed_size, dev)
    return InferenceModel(
        model=model,
        transform=eval_transform(image_size, data.get("image_mean"), data.get("image_std")),
        config=config,
        device=dev,
        checkpoint=path,
        tokenizer_name=str(tokenizer or path),
        max_words=int(data.get("max_words", 90)),
        image_size=image_size,
    )
