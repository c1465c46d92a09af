"""The LAPS head math stated once, step by step, and a plain per-caption loop of it: the test
oracle, the benchmark baseline and the basis of :func:`laps.models.explain.explain_pair`.

The steps are those of ``docs/algorithm.md``. It is written independently of the vectorised
:class:`laps.models.head.LAPSHead`, and keeps the structure of the official release: a Python
loop over captions, and for each caption the scores of every image, a sort, gathers of the
kept and dropped patches, the softmax fusion token, the aggregation MLP applied to the
gathered kept tokens ``(B_v, K, C)``, normalisation and the patch-word alignment. Only the
head's parameters (``aggregation.mlp``, ``aggregation.scale``) and its sizes are used.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from laps.models.head import LEAKY_SLOPE, LAPSHead

__all__ = ["Selection", "aggregate", "align", "alignment_terms", "image_rows", "reference_similarity", "relevance", "salience",
           "select", "split_cls"]


class Selection(NamedTuple):
    """One caption's selection over ``B_v`` images (official ``TokenSparse``)."""

    kept: Tensor  # (B_v, K, C) the kept patches, by selection score descending
    fusion: Tensor  # (B_v, 1, C) the softmax-weighted sum of the dropped patches
    score_mask: Tensor  # (B_v, N) 1 on kept patches
    order: Tensor  # (B_v, N) long: patch indices by selection score, descending
    drop_weight: Tensor  # (B_v, N - K) the fusion weights of order[:, K:]


def salience(patches: Tensor, patches_n: Tensor) -> Tensor:
    """Step 1: cosine of each patch with the mean patch, ``(B_v, N)`` (no gradient)."""
    with torch.no_grad():
        glob = F.normalize(patches.mean(dim=1, keepdim=True), dim=-1)  # (B_v, 1, C)
        return (glob * patches_n).sum(dim=-1)


def relevance(words: Tensor, patches_n: Tensor) -> Tensor:
    """Steps 2-3: cosine of each patch with the caption's mean word ``words`` ``(n, C)``, ``(B_v, N)``."""
    with torch.no_grad():
        query = F.normalize(words.mean(0, keepdim=True).unsqueeze(0), dim=-1)  # (1, 1, C)
        return (query * patches_n).sum(dim=-1)


def select(patches: Tensor, score: Tensor, num_keep: int) -> Selection:
    """Steps 4-5: keep the ``num_keep`` top-scoring patches, fuse the rest by a softmax of their scores."""
    dim = patches.shape[-1]
    score_sort, order = torch.sort(score, dim=1, descending=True)
    keep_policy = order[:, :num_keep]
    score_mask = torch.zeros_like(score).scatter(1, keep_policy, 1)
    kept = torch.gather(patches, 1, keep_policy.unsqueeze(-1).expand(-1, -1, dim))
    dropped = torch.gather(patches, 1, order[:, num_keep:].unsqueeze(-1).expand(-1, -1, dim))
    drop_weight = F.softmax(score_sort[:, num_keep:], dim=1)
    fusion = torch.sum(dropped * drop_weight.unsqueeze(-1), dim=1, keepdim=True)
    return Selection(kept, fusion, score_mask, order, drop_weight)


def aggregate(head: LAPSHead, kept: Tensor) -> tuple[Tensor, Tensor]:
    """Step 6, official ``TokenAggregation``: kept ``(B_v, K, C)`` -> aggregated tokens ``(B_v, M, C)``
    and their softmax weights over the kept patches ``(B_v, M, K)``."""
    weight = head.aggregation.mlp(kept)  # (B_v, K, M)
    weight = weight.transpose(2, 1) * head.aggregation.scale  # (B_v, M, K)
    weight = F.softmax(weight, dim=2)
    return torch.bmm(weight, kept), weight


def image_rows(cls_tok: Tensor | None, aggregated: Tensor, fusion: Tensor) -> Tensor:
    """Step 7: the normalised rows ``[CLS]`` (if any), the ``M`` aggregated tokens, the fusion token."""
    tokens = torch.cat([aggregated, fusion], dim=1)
    if cls_tok is not None:
        tokens = torch.cat([cls_tok, tokens], dim=1)
    return F.normalize(tokens, dim=-1)


def align(rows_n: Tensor, words_n: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Step 8, official ``mask_xattn_one_text``: rows ``(B_v, R, C)`` x words ``(B_v, n, C)`` ->
    ``t2i`` and ``i2t`` ``(B_v, 1)`` (the score is their sum) and the alignment ``(B_v, n, R)``."""
    sim = F.leaky_relu(torch.bmm(words_n, rows_n.transpose(1, 2)), negative_slope=LEAKY_SLOPE)
    t2i, i2t = alignment_terms(sim)
    return t2i.unsqueeze(1), i2t.unsqueeze(1), sim


def alignment_terms(sim: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Step 8's two terms from the alignment ``sim`` ``(..., L, R)`` of ``L`` words with ``R`` image
    rows (after the leaky ReLU): ``t2i`` ``(...)``, each word's best row averaged over the words, and
    ``i2t`` ``(...)``, each row's best word averaged over the rows. ``valid`` ``(..., L)`` marks the
    real words of padded captions (all words when ``None``)."""
    if valid is None:
        return sim.max(dim=-1)[0].mean(dim=-1), sim.max(dim=-2)[0].mean(dim=-1)
    t2i = sim.max(dim=-1)[0].masked_fill(~valid, 0.0).sum(dim=-1) / valid.sum(dim=-1)
    i2t = sim.masked_fill(~valid.unsqueeze(-1), float("-inf")).max(dim=-2)[0].mean(dim=-1)
    return t2i, i2t


def split_cls(head: LAPSHead, img_embs: Tensor, img_n: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
    """The [CLS] token ``(B_v, 1, C)`` (``None`` without one), the patches and the normalised patches."""
    if head.has_cls:
        return img_embs[:, :1], img_embs[:, 1:], img_n[:, 1:]
    return None, img_embs, img_n


def reference_similarity(
    head: LAPSHead,
    img_embs: Tensor,
    cap_embs: Tensor,
    cap_lens: Tensor,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Official-style similarities, one caption at a time.

    Args:
        head: supplies ``num_patches``, ``has_cls``, ``num_keep`` and the aggregation parameters.
        img_embs: ``(B_v, L_v, C)`` image tokens, [CLS] first when ``head.has_cls``.
        cap_embs: ``(B_t, L_t, C)`` word tokens.
        cap_lens: ``(B_t,)`` valid lengths.
        return_mask: also return the keep mask.

    Returns:
        ``sims`` ``(B_v, B_t)``; with ``return_mask`` also ``score_mask`` ``(B_t, B_v, N)``.
    """
    num_keep = math.ceil(head.num_patches * head.sparse_ratio)
    img_n = F.normalize(img_embs, dim=-1)
    cap_n = F.normalize(cap_embs, dim=-1)
    cls_tok, patches, patches_n = split_cls(head, img_embs, img_n)
    sal = salience(patches, patches_n)

    n_img = img_embs.shape[0]
    sims, masks = [], []
    for i in range(len(cap_lens)):
        n_word = int(cap_lens[i])
        words_n = cap_n[i, :n_word].unsqueeze(0).repeat(n_img, 1, 1)  # (B_v, n, C)
        sel = select(patches, sal + relevance(cap_embs[i, :n_word], patches_n), num_keep)
        aggregated, _ = aggregate(head, sel.kept)
        t2i, i2t, _ = align(image_rows(cls_tok, aggregated, sel.fusion), words_n)
        sims.append(t2i + i2t)
        masks.append(sel.score_mask)
    sims_t = torch.cat(sims, dim=1) if sims else img_embs.new_zeros(n_img, 0)
    if not return_mask:
        return sims_t
    mask_t = torch.stack(masks, dim=0) if masks else img_embs.new_zeros(0, n_img, head.num_patches)
    return sims_t, mask_t
