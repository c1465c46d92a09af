"""The LAPS model: vision encoder, text encoder and slimming head behind one API."""

from __future__ import annotations

from torch import Tensor

from laps.models.dual_encoder import DualEncoder
from laps.models.encoders import TextEncoder, VisionEncoder
from laps.models.head import LAPSHead


class LAPSModel(DualEncoder):
    """The encoders and the slimming head (:class:`LAPSHead`); ``encode_image``, ``encode_text`` and
    ``similarity`` as :class:`~laps.models.dual_encoder.DualEncoder`'s.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (:mod:`laps.models.pretrained`) give
    it the Hugging Face folder format; build one with :func:`laps.models.create_model`.

    Args:
        vision: a :class:`VisionEncoder` projecting to ``embed_size``.
        text: a :class:`TextEncoder` projecting to ``embed_size``.
        sparse_ratio: fraction of patches kept by the head.
        aggr_ratio: aggregated tokens as a fraction of the kept ones.
        chunk_pairs: image-caption pairs scored at once by the head (bounds memory); ``None`` sizes
            the head's blocks by memory (see :class:`LAPSHead`).
        max_saved_mb: MiB of the head's intermediates kept from forward to backward in training;
            blocks beyond it are recomputed in backward.
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
        max_saved_mb: float = 1024.0,
        selection: str = "topk",
        attention_weight: float = 0.8,
        gumbel_tau: float = 1.0,
    ) -> None:
        super().__init__(vision, text)
        self.head = LAPSHead(
            embed_dim=vision.embed_size,
            num_patches=vision.num_patches,
            sparse_ratio=sparse_ratio,
            aggr_ratio=aggr_ratio,
            has_cls=vision.has_cls,
            chunk_pairs=chunk_pairs,
            max_saved_mb=max_saved_mb,
            selection=selection,
            attention_weight=attention_weight,
            gumbel_tau=gumbel_tau,
        )

    def forward(self, images: Tensor, input_ids: Tensor, lengths: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Encode and score a batch; as :meth:`LAPSHead.forward` (``(sims, score_mask)`` in train mode)."""
        return self.head(self.encode_image(images), self.encode_text(input_ids, lengths), lengths)
