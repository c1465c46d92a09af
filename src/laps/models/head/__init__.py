"""The LAPS slimming head: patch selection, fusion, aggregation and patch-word alignment.

The math follows the official release (``docs/algorithm.md``); the arrangement does not. Per image-caption
pair the official code gathers the kept patches, runs the aggregation MLP on them and forms the
``M`` aggregated tokens ``A = softmax(scale * MLP(S)^T) @ S``. Here:

* everything that depends on the image alone is computed once per image: the patches' norms and
  their salience, the aggregation MLP on every patch, the exponentiated logits ``E`` (``N x M``)
  and the patch Gram matrix ``G = P P^T`` (``N x N``);
* the aggregated tokens are never formed. A pair only needs, for every aggregated token ``m``,
  its dot products with the caption's words and its norm. With the softmax weights over the kept
  patches ``w_m = E[:, m] * keep / Z_m`` (``Z_m = E[:, m] . keep``):
  ``<word_j, A_m> = sum_k w_mk <word_j, P_k>`` and ``||A_m||^2 = w_m G w_m^T``.
  The word-token products ``<word_j, token_k>`` of a block of pairs are one large GEMM
  (``(B_v * L_v, C) @ (C, b_t * L_t)``; the [CLS] row is one of its columns) and the aggregated
  tokens' dots a GEMM per image with ``E``. The norms do not depend on the words: per image,
  ``G`` times the weights of all aggregated and fusion tokens of a run of up to 64 captions is one
  GEMM. Per pair this is about ``L_v L_t C + (M + 1) N^2`` multiply-adds in large GEMMs, against
  ``K C h + M K C`` (MLP of width ``h`` on the ``K`` kept tokens, aggregation) plus gathers in the
  official loop;
* the fusion token ``f = softmax(dropped scores) @ P``: its dots are a small GEMM per image.

Pairs are scored in blocks (captions sorted by length, so that a block is padded only to its own
longest caption; on CPU blocks stay small enough for the allocator to reuse their memory). The
backward is hand-written (:class:`~laps.models.head.backward.PairScores`): a block's intermediates (and the norms' products
``G w^T``) are kept from forward to backward within ``max_saved_mb`` and recomputed beyond it, so
memory stays bounded; the word-token gradients of an image range's blocks are gathered side by
side, so that the tokens' and the words' gradients are one GEMM each, and at the end the gradients
of ``G`` and the [CLS] norm are added to the tokens'. When few pairs carry a gradient (the
hardest-negative loss gives about three per image), backward recomputes only those, image by
image, and the next forward keeps nothing. Selection, softmax
weights and normalisation run in fp32 (float64 for float64 inputs); under autocast the large
GEMMs run in the autocast dtype. On CPU the large float32 GEMMs go to oneDNN rather than MKL
(:mod:`laps.models.gemm`).

The package: :mod:`~laps.models.head.module` (the public :class:`LAPSHead`),
:mod:`~laps.models.head.plan` (block sizes and kernels, :class:`HeadPlan`),
:mod:`~laps.models.head.kernels` (selection and the forward of blocks of pairs),
:mod:`~laps.models.head.backward` (the hand-written backward), :mod:`~laps.models.head.common`
(constants, sizes, the prepared inputs).
"""

from __future__ import annotations

from laps.models.head.common import (
    LEAKY_SLOPE,
    LOGIT_FLOOR,
    NORM_EPS,
    PreparedCaptions,
    PreparedImages,
    aggregated_count,
    check_ratio,
    check_ratios,
    keep_count,
)
from laps.models.head.kernels import PatchSelection
from laps.models.head.module import LAPSHead, TokenAggregation
from laps.models.head.plan import GradientFeedback, HeadPlan

__all__ = [
    "LEAKY_SLOPE",
    "LOGIT_FLOOR",
    "NORM_EPS",
    "GradientFeedback",
    "HeadPlan",
    "LAPSHead",
    "PatchSelection",
    "PreparedCaptions",
    "PreparedImages",
    "TokenAggregation",
    "aggregated_count",
    "check_ratio",
    "check_ratios",
    "keep_count",
]
