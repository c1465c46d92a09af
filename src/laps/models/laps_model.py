"""The LAPS model: vision encoder, text encoder and slimming head behind one API."""

from __future__ import annotations

from torch import Tensor, nn

from laps.models.encoders import TextEncoder, VisionEncoder
from laps.models.head import LAPSHead
from laps.models.pretrained import PretrainedMixin


class LAPSModel(nn.Module, PretrainedMixin):
    """``encode_image``, ``encode_text`` and ``similarity``: the one path for training, evaluation and tools.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (:mod:`laps.models.pretrained`) give
    it the Hugging Face folder format; build one with :func:`laps.models.create_model`.

    Args:
        vision: a :class:`VisionEncoder` projecting to ``embed_size``.
        text: a :class:`TextEncoder` projecting to ``embed_size``.
        sparse_ratio: fraction of patches kept by the head.
        aggr_ratio: aggregated tokens as a fraction of the kept ones.
        chunk_pairs: image-caption pairs scored at once by the head (bounds memory); ``None`` sizes
            the head's blocks by memory (see :class:`LAPSHead`).
        selection: ``topk`` (the official hard selection) or ``gumbel`` (the paper's learned decision).
        attention_weight: with ``gumbel``, the weight of the attention scores against the prediction.
        gumbel_tau: with ``gumbel``, the Gumbel-softmax temperature.
    """

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder,
        sparse_ratio: float = 0.5,
        aggr_ratio: float = 0.4,
        chunk_pairs: int | None = None,
        selection: str = "topk",
        attention_weight: float = 0.8,
        gumbel_tau: float = 1.0,
    ) -> None:
        super().__init__()
        if vision.embed_size != text.embed_size:
            raise ValueError(
                f"embedding sizes disagree: vision embed_size={vision.embed_size}, text embed_size={text.embed_size}"
            )
        self.vision = vision
        self.text = text
        self.head = LAPSHead(
            embed_dim=vision.embed_size,
            num_patches=vision.num_patches,
            sparse_ratio=sparse_ratio,
            aggr_ratio=aggr_ratio,
            has_cls=vision.has_cls,
            chunk_pairs=chunk_pairs,
            selection=selection,
            attention_weight=attention_weight,
            gumbel_tau=gumbel_tau,
        )

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
        """LAPS similarities ``(B_v, B_t)`` between encoded images and captions."""
        sims, _ = self.head.similarity(img_embs, cap_embs, cap_lens)
        return sims

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of both encoders: less memory in training, a second forward of
        their blocks in backward. The head keeps its own bounded memory (``max_saved_mb``)."""
        self.vision.set_gradient_checkpointing(enabled)
        self.text.set_gradient_checkpointing(enabled)

    def forward(self, images: Tensor, input_ids: Tensor, lengths: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Encode and score a batch; as :meth:`LAPSHead.forward` (``(sims, score_mask)`` in train mode)."""
        return self.head(self.encode_image(images), self.encode_text(input_ids, lengths), lengths)
