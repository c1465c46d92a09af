"""What every model of the library shares: a vision and a text encoder projecting to one width,
and a head that scores their tokens. :class:`~laps.models.LAPSModel` and the baseline
:class:`~laps.models.vse.VSEModel` differ only in the head they build."""

from __future__ import annotations

from torch import Tensor, nn

from laps.models.encoders import TextEncoder, VisionEncoder
from laps.models.pretrained import PretrainedMixin


class DualEncoder(nn.Module, PretrainedMixin):
    """``encode_image``, ``encode_text`` and ``similarity``: the one path for training, evaluation and
    tools. A subclass sets ``self.head`` (``similarity(img, cap, lens) -> (sims, mask)``, and a
    ``forward``) in its ``__init__``.

    Args:
        vision: a :class:`VisionEncoder` projecting to ``embed_size``.
        text: a :class:`TextEncoder` projecting to the same ``embed_size``.
    """

    head: nn.Module

    def __init__(self, vision: VisionEncoder, text: TextEncoder) -> None:
        super().__init__()
        if vision.embed_size != text.embed_size:
            raise ValueError(
                f"embedding sizes disagree: vision embed_size={vision.embed_size}, text embed_size={text.embed_size}"
            )
        self.vision = vision
        self.text = text

    @property
    def embed_size(self) -> int:
        return self.vision.embed_size

    def encode_image(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` -> tokens ``(B, L_v, C)``."""
        return self.vision(images)

    def encode_text(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Token ids ``(B, L_t)`` and lengths ``(B,)`` -> word tokens ``(B, L_t, C)``."""
        return self.text(input_ids, lengths)

    def similarity(self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor) -> Tensor:
        """The head's similarities ``(B_v, B_t)`` between encoded images and captions."""
        sims, _ = self.head.similarity(img_embs, cap_embs, cap_lens)
        return sims

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of both encoders: less memory in training, a second forward of
        their blocks in backward (the head keeps its own memory bounds)."""
        self.vision.set_gradient_checkpointing(enabled)
        self.text.set_gradient_checkpointing(enabled)

    def forward(self, images: Tensor, input_ids: Tensor, lengths: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Encode and score a batch: the head's ``forward`` of the encoded images and captions."""
        return self.head(self.encode_image(images), self.encode_text(input_ids, lengths), lengths)
