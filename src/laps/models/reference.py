"""A plain per-caption loop of the official LAPS head math: the test oracle and the benchmark baseline.

It is written from the algorithm description (``LAPS.md``), independently of the vectorised
:class:`laps.models.head.LAPSHead`, and keeps the structure of the official release: a Python
loop over captions, and for each caption the scores of every image, a sort, gathers of the
kept and dropped patches, the softmax fusion token, the aggregation MLP applied to the
gathered kept tokens ``(B_v, K, C)``, normalisation and the patch-word alignment. Only the
head's parameters (``aggregation.mlp``, ``aggregation.scale``) and its sizes are used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from laps.models.head import LAPSHead

__all__ = ["reference_similarity"]


def _select(
    patches: Tensor, salience: Tensor, relevance: Tensor, num_keep: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Official ``TokenSparse``: kept tokens ``(B_v, K, C)``, fusion token ``(B_v, 1, C)``, mask ``(B_v, N)``."""
    dim = patches.shape[-1]
    score = salience + relevance
    score_sort, score_index = torch.sort(score, dim=1, descending=True)
    keep_policy = score_index[:, :num_keep]
    score_mask = torch.zeros_like(score).scatter(1, keep_policy, 1)
    kept = torch.gather(patches, 1, keep_policy.unsqueeze(-1).expand(-1, -1, dim))
    drop_policy = score_index[:, num_keep:]
    dropped = torch.gather(patches, 1, drop_policy.unsqueeze(-1).expand(-1, -1, dim))
    drop_weight = F.softmax(score_sort[:, num_keep:], dim=1).unsqueeze(-1)
    fusion = torch.sum(dropped * drop_weight, dim=1, keepdim=True)
    return kept, fusion, score_mask


def _aggregate(head: LAPSHead, kept: Tensor) -> Tensor:
    """Official ``TokenAggregation`` on gathered kept tokens: ``(B_v, K, C)`` -> ``(B_v, M, C)``."""
    weight = head.aggregation.mlp(kept)  # (B_v, K, M)
    weight = weight.transpose(2, 1) * head.aggregation.scale  # (B_v, M, K)
    weight = F.softmax(weight, dim=2)
    return torch.bmm(weight, kept)


def _align_one_text(img_tokens_n: Tensor, words_n: Tensor) -> Tensor:
    """Official ``mask_xattn_one_text``: ``(B_v, R, C)`` x ``(B_v, n, C)`` -> ``(B_v, 1)``."""
    sim = F.leaky_relu(torch.bmm(words_n, img_tokens_n.transpose(1, 2)), negative_slope=0.1)  # (B_v, n, R)
    t2i = sim.max(dim=2)[0].mean(dim=1, keepdim=True)
    i2t = sim.max(dim=1)[0].mean(dim=1, keepdim=True)
    return t2i + i2t


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
    if head.has_cls:
        cls_tok, patches, patches_n = img_embs[:, :1], img_embs[:, 1:], img_n[:, 1:]
    else:
        cls_tok, patches, patches_n = None, img_embs, img_n
    with torch.no_grad():
        glob = F.normalize(patches.mean(dim=1, keepdim=True), dim=-1)  # (B_v, 1, C)
        salience = (glob * patches_n).sum(dim=-1)  # (B_v, N)

    n_img = img_embs.shape[0]
    sims, masks = [], []
    for i in range(len(cap_lens)):
        n_word = int(cap_lens[i])
        cap_i = cap_embs[i, :n_word]
        words_n = cap_n[i, :n_word].unsqueeze(0).repeat(n_img, 1, 1)  # (B_v, n, C)
        with torch.no_grad():
            query = F.normalize(cap_i.mean(0, keepdim=True).unsqueeze(0), dim=-1)  # (1, 1, C)
            relevance = (query * patches_n).sum(dim=-1)  # (B_v, N)
        kept, fusion, score_mask = _select(patches, salience, relevance, num_keep)
        aggregated = _aggregate(head, kept)
        tokens = torch.cat([aggregated, fusion], dim=1)
        if cls_tok is not None:
            tokens = torch.cat([cls_tok, tokens], dim=1)
        tokens = F.normalize(tokens, dim=-1)
        sims.append(_align_one_text(tokens, words_n))
        masks.append(score_mask)
    sims_t = torch.cat(sims, dim=1) if sims else img_embs.new_zeros(n_img, 0)
    if not return_mask:
        return sims_t
    mask_t = torch.stack(masks, dim=0) if masks else img_embs.new_zeros(0, n_img, head.num_patches)
    return sims_t, mask_t
