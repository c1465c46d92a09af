"""How the head splits its work into blocks, and which kernels it uses: :class:`HeadPlan`.

A plan holds the head's tuning knobs. With no plan (the default) the head takes
:meth:`HeadPlan.for_device` of the tensors' device at each call; an explicit plan overrides that
choice, so that, for instance, the CUDA plan runs on CPU tensors. The figures behind the CPU
values are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from laps.models.gemm import CPU_BACKENDS

MiB = 2**20


@dataclass(frozen=True)
class HeadPlan:
    """The head's block sizes and matrix-product kernels.

    Attributes:
        block_bytes: bytes of the largest temporary of a block of pairs (the word-token dots). On
            CPU about the last-level cache, so that GEMMs stay large while the temporaries, reused
            from block to block, stay warm; elsewhere larger blocks mean fewer kernel launches.
        block_captions: captions of a block; ``None`` takes as many as ``block_bytes`` allows with
            all images (at least 8). Few captions pad a block only to the longest of similar lengths.
        select_captions: captions whose patch selection (and the norms of their aggregated and
            fusion tokens) is computed in one go, against all images of the call.
        image_bytes: bytes of the rows of the norms' quadratic forms processed at once (images x
            their captions' rows). On CPU about the L2 cache, so that one image's rows stay there
            from step to step.
        gather_bytes: bytes of the word-token gradients of several blocks that backward gathers
            side by side, so that the tokens' and the words' gradients are one wide GEMM each.
        cap_chunk_pairs: whether a given ``chunk_pairs`` is capped at the ``block_bytes`` budget.
        gemm: the float32 CPU matrix-product kernels, ``onednn`` or ``torch``
            (:mod:`laps.models.gemm`); ``None`` uses the process default
            (:func:`laps.models.gemm.cpu_backend`).
    """

    block_bytes: int
    block_captions: int | None
    select_captions: int
    image_bytes: int
    gather_bytes: int
    cap_chunk_pairs: bool
    gemm: str | None = None

    def __post_init__(self) -> None:
        for name in ("block_bytes", "select_captions", "image_bytes", "gather_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadPlan.{name} must be positive, got {getattr(self, name)}")
        if self.block_captions is not None and self.block_captions < 1:
            raise ValueError(f"HeadPlan.block_captions must be positive or None, got {self.block_captions}")
        if self.gemm is not None and self.gemm not in CPU_BACKENDS:
            raise ValueError(f"HeadPlan.gemm must be one of {CPU_BACKENDS} or None, got {self.gemm!r}")

    @classmethod
    def for_device(cls, device_type: str) -> HeadPlan:
        """The plan the head uses by default for tensors on ``device_type`` (``cpu``, ``cuda``, ...)."""
        return PLANS.get(device_type, PLANS["default"])

    def replace(self, **changes: object) -> HeadPlan:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def block_pairs(self, chunk_pairs: int | None, pair_bytes: int) -> int:
        """Pairs per block: ``chunk_pairs`` when given (capped at the budget where the plan says so),
        else the budget of ``block_bytes`` for pairs of ``pair_bytes``."""
        budget = max(1, self.block_bytes // max(pair_bytes, 1))
        if chunk_pairs is None:
            return budget
        return min(chunk_pairs, budget) if self.cap_chunk_pairs else chunk_pairs

    def blocks(self, n_img: int, n_cap: int, block_pairs: int) -> list[tuple[int, int, int, int]]:
        """``(v0, v1, t0, t1)`` blocks of at most ``block_pairs`` pairs, covering images x captions.

        Captions (sorted by length) go ``block_captions`` to a block, or as many as the budget allows
        with all images; images fill the rest of the budget. Splits are balanced.
        """
        n_t = self.block_captions or max(8, block_pairs // max(n_img, 1))
        n_t = max(1, min(n_cap, n_t, block_pairs))
        n_v = max(1, min(n_img, block_pairs // n_t))
        n_t = -(-n_cap // -(-n_cap // n_t))  # balance: same number of blocks, as even as possible
        n_v = -(-n_img // -(-n_img // n_v))
        return [
            (v0, min(v0 + n_v, n_img), t0, min(t0 + n_t, n_cap))
            for t0 in range(0, n_cap, n_t)
            for v0 in range(0, n_img, n_v)
        ]

    def image_step(self, image_bytes: int) -> int:
        """Images whose rows (``image_bytes`` each) the norms process at once (at least one)."""
        return max(1, self.image_bytes // max(image_bytes, 1))


PLANS = {
    "cpu": HeadPlan(block_bytes=16 * MiB, block_captions=8, select_captions=64, image_bytes=1 * MiB,
                    gather_bytes=64 * MiB, cap_chunk_pairs=True),
    # oneDNN serves CPU float32 only: the GPU plan fixes torch's kernels, also when run on CPU tensors.
    # 128 MiB still holds thousands of pairs at ViT-B/16 shapes; what it saves is in docs/benchmarks.md.
    "default": HeadPlan(block_bytes=128 * MiB, block_captions=None, select_captions=64, image_bytes=256 * MiB,
                        gather_bytes=256 * MiB, cap_chunk_pairs=False, gemm="torch"),
}


@dataclass
class GradientFeedback:
    """What the head's last backward saw, read by its next forward.

    ``sparse`` is set when few pairs carried a gradient (the hardest-negative loss gives about three
    per image): backward then recomputes just those pairs, so the next training forward keeps no
    intermediates for it (``max_saved_mb`` is not spent). A loss with dense gradients clears it at
    the next backward. Assign ``head.feedback.sparse = False`` to reset it.
    """

    sparse: bool = False


class ScoreConfig(NamedTuple):
    """What the scoring of one call needs besides its tensors."""

    n_cls: int
    num_keep: int
    mm_dtype: torch.dtype
    block_pairs: int
    max_saved_bytes: int
    feedback: GradientFeedback
    return_mask: bool
    plan: HeadPlan
    declared_gradients: object = None  # (V, T) bool array-like: LAPSHead.declared_gradients


def pair_bytes(n_tok: int, n_word: int, n_aggr: int, precise: torch.dtype) -> int:
    """Bytes per pair of a block's largest temporaries: the word-token dots (or the rows of word
    scores, with fewer tokens than aggregated rows). The norms' temporaries are per image, not per pair."""
    return max(n_tok, n_aggr + 2) * n_word * precise.itemsize


def cache_bytes(n_img: int, n_tok: int, n_cap: int, n_word: int, n_aggr: int, mm_dtype: torch.dtype,
                precise: torch.dtype) -> int:
    """Bytes a block keeps for backward: the word-token dots dominate."""
    rows = n_aggr + 2
    per_pair = n_tok * n_word * mm_dtype.itemsize + 3 * rows * n_word * precise.itemsize
    return n_img * n_cap * per_pair


def proj_bytes(n_img: int, n_cap: int, n_aggr: int, n_patch: int, precise: torch.dtype) -> int:
    """Bytes of the products ``G w^T`` that the norms keep for backward."""
    return n_img * n_cap * (n_aggr + 1) * n_patch * precise.itemsize
