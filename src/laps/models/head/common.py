"""What the head's modules share: its constants, its sizes and checks, and the prepared inputs.

:class:`PreparedImages` and :class:`PreparedCaptions` are the caption-independent and the
image-independent work of :meth:`laps.models.head.LAPSHead.prepare_images` and
:meth:`~laps.models.head.LAPSHead.prepare_captions`, done once per image and once per caption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

LEAKY_SLOPE = 0.1
NORM_EPS = 1e-12  # as F.normalize
# Aggregation logits more than this below the maximum of their column (over an image's patches)
# are floored there before exponentiation, so that exp() never underflows to zero. Results are
# unchanged unless all kept patches of a pair sit that far below a dropped one: then the official
# softmax is one-hot anyway, and this gives near-uniform weights instead of NaN.
LOGIT_FLOOR = 80.0


def precise_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of everything but the large GEMMs: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class PreparedImages(NamedTuple):
    """Per-image inputs of the pair scoring, ``V`` images of ``N`` patches and ``M`` aggregated tokens.

    ``tokens`` (V, L_v, C) as given, [CLS] first when there is one; for the selection (no gradient)
    ``patch_norm`` (V, N), the patches' norms (at least the normalisation's eps), and ``salience``
    (V, N), the cosine of each patch with the patches' mean; ``gram`` (V, N, N) ``P P^T``;
    ``weights`` (V, N, M), the aggregation logits exponentiated after subtracting their per-image
    column maximum, and ``weights_t`` (V, M, N) the same transposed, contiguous, without a graph;
    ``cls_norm`` (V, R_c), the [CLS] norm (R_c = 1 with a [CLS] token, else 0). All but ``tokens``
    are fp32 (float64 for float64 inputs). ``gram`` and ``cls_norm`` carry no graph: the scoring's
    backward adds their gradients to the tokens'.
    """

    tokens: Tensor
    patch_norm: Tensor
    salience: Tensor
    gram: Tensor
    weights: Tensor
    weights_t: Tensor
    cls_norm: Tensor

    def take(self, index: slice | Tensor) -> PreparedImages:
        """The images at ``index`` (a slice, or a tensor of image indices)."""
        return PreparedImages(*(t[index] for t in self))

    @staticmethod
    def cat(parts: list[PreparedImages]) -> PreparedImages:
        """The images of ``parts`` one after the other."""
        return PreparedImages(*(torch.cat(ts) for ts in zip(*parts)))


class PreparedCaptions(NamedTuple):
    """Per-caption inputs: normalised words ``words_n`` (T, L_t, C) in fp32 (float64 for float64
    inputs), ``lens`` (T,) on the words' device, ``query`` (T, C), the normalised mean of the valid
    words (no gradient), and ``lengths``, the same lengths as Python ints: the block planning reads
    them on the host, so that it needs no device-to-host copy (and runs on fake tensors)."""

    words_n: Tensor
    lens: Tensor
    query: Tensor
    lengths: tuple[int, ...]

    def take(self, index: slice | Tensor) -> PreparedCaptions:
        """The captions at ``index`` (a slice, or a tensor of caption indices)."""
        if isinstance(index, slice):
            lengths = self.lengths[index]
        else:
            lengths = tuple(self.lengths[i] for i in index.tolist())
        return PreparedCaptions(self.words_n[index], self.lens[index], self.query[index], lengths)


def host_lengths(lengths: Tensor | Sequence[int], name: str = "cap_lens") -> tuple[int, ...]:
    """Caption lengths as Python ints, from a tensor ``(B,)`` (one copy to the host) or a sequence.

    Under fake tensors (``laps-estimate``) the lengths must be real: a real tensor or a list."""
    if isinstance(lengths, Tensor):
        try:
            values = lengths.tolist()  # no operator: also from a real tensor under a fake mode
            return tuple(int(n) for n in (values if isinstance(values, list) else [values]))
        except RuntimeError as err:  # a fake tensor has no values
            raise ValueError(f"{name} must hold real values (a list, or a tensor that is not fake): {err}") from err
    return tuple(int(n) for n in lengths)


def keep_count(num_patches: int, sparse_ratio: float) -> int:
    """Number of kept patches, ``ceil(num_patches * sparse_ratio)``."""
    return math.ceil(num_patches * sparse_ratio)


def aggregated_count(num_patches: int, sparse_ratio: float, aggr_ratio: float) -> int:
    """Number of aggregated tokens, ``int(num_patches * aggr_ratio * sparse_ratio)`` (left to right)."""
    return int(num_patches * aggr_ratio * sparse_ratio)


def check_ratio(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def check_ratios(num_patches: int, sparse_ratio: float, aggr_ratio: float) -> None:
    """Raise ``ValueError`` naming the argument when the ratios are unusable."""
    check_ratio("sparse_ratio", sparse_ratio)
    check_ratio("aggr_ratio", aggr_ratio)
    if num_patches < 1:
        raise ValueError(f"num_patches must be positive, got {num_patches}")
    if aggregated_count(num_patches, sparse_ratio, aggr_ratio) < 1:
        raise ValueError(
            f"sparse_ratio={sparse_ratio} and aggr_ratio={aggr_ratio} leave no aggregated token "
            f"for num_patches={num_patches} (int({num_patches} * {aggr_ratio} * {sparse_ratio}) = 0)"
        )
