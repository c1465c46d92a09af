"""What the LAPS head did with an image-caption pair: kept patches, fusion and aggregation weights.

:func:`explain_pair` recomputes the head's math of ``LAPS.md`` (steps 1-8) pair by pair with
every intermediate formed explicitly (the kept tokens, the softmax weights, the aggregated tokens
``A``, the fusion token ``f``), using only the head's public attributes (``num_keep``,
``num_patches``, ``has_cls``) and its ``aggregation`` module. It is meant for inspection and
pictures (``laps-visualize``), not for scoring many pairs: it holds ``M x N`` weights and
``M x C`` aggregated tokens per pair. Its ``similarity`` reproduces ``head.similarity`` to float
precision and its ``keep`` the ``score_mask`` of the head's train-mode ``forward``
(``tests/test_visualize.py`` checks both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from laps.models.head import LEAKY_SLOPE, NORM_EPS, LAPSHead

__all__ = ["explain_pair"]



@torch.no_grad()
def explain_pair(head: LAPSHead, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor | list[int]) -> dict[str, Tensor]:
    """Explain every (image, caption) pair of a block.

    Args:
        head: a :class:`LAPSHead` (only ``num_keep``, ``num_patches``, ``has_cls`` and ``aggregation``
            are used).
        img_embs: ``(B_v, L_v, C)`` image tokens ([CLS] first when ``head.has_cls``); ``B_v`` is
            usually 1.
        cap_embs: ``(B_t, L_t, C)`` word tokens, the first ``cap_lens[t]`` valid.
        cap_lens: ``(B_t,)`` caption lengths ([CLS] and [SEP] included).

    Returns:
        A dict of fp32 CPU-or-input-device tensors, pair axes first (``V = B_v``, ``T = B_t``,
        ``N = num_patches``, ``K = num_keep``, ``M = num_aggregated``):

        * ``similarity`` ``(V, T)``: the LAPS score (equals ``head.similarity``);
          ``t2i`` and ``i2t`` ``(V, T)``: its two terms (LAPS.md step 8);
        * ``salience`` ``(V, N)``: ``s_img``; ``relevance`` ``(V, T, N)``: ``s_txt``;
          ``score`` ``(V, T, N)``: ``s_img + s_txt``, the selection score;
        * ``kept_indices`` ``(V, T, K)`` long: the kept patches by selection score,
          descending (the official order); ``keep`` ``(V, T, N)`` bool: the ``score_mask``;
        * ``fuse_weights`` ``(V, T, N)``: softmax weights of the dropped patches in the fusion
          token, zeros on kept patches (all zeros when nothing is dropped);
        * ``aggregation_weights`` ``(V, T, M, N)``: for each aggregated token the softmax over the
          kept patches, zeros on dropped ones (each row sums to 1);
        * ``alignment`` ``(V, T, R, L_t)``: ``leaky_relu`` similarities of the image rows ([CLS]
          if any, the ``M`` aggregated tokens, the fusion token) with the words (zeros past a
          caption's length).
    """
    if head.selection != "topk":
        raise ValueError(f"explain_pair draws the top-k selection; this head uses selection={head.selection!r}")
    lens = head._check_inputs(img_embs, cap_embs, cap_lens)  # the head's own validation, one place
    n_cls = int(head.has_cls)
    n_patch, n_keep = int(head.num_patches), int(head.num_keep)

    with torch.autocast(img_embs.device.type, enabled=False):
        tokens = img_embs.float()
        words = cap_embs.float()
        patches = tokens[:, n_cls:]  # P (V, N, C), unnormalised
        n_img, _, dim = patches.shape
        n_cap, n_word, _ = words.shape

        # 1-3: salience and text relevance on normalised patches.
        patches_n = F.normalize(patches, dim=-1, eps=NORM_EPS)
        glob = F.normalize(patches.mean(dim=1), dim=-1, eps=NORM_EPS)  # (V, C)
        salience = torch.einsum("vnc,vc->vn", patches_n, glob)
        valid = torch.arange(n_word, device=words.device)[None, :] < lens[:, None]  # (T, L)
        query = (words * valid[..., None]).sum(1) / lens[:, None].float()
        query = F.normalize(query, dim=-1, eps=NORM_EPS)  # (T, C)
        relevance = torch.einsum("vnc,tc->vtn", patches_n, query)

        # 4: selection.
        score = salience[:, None, :] + relevance  # (V, T, N)
        order = torch.sort(score, dim=-1, descending=True).indices
        kept_idx = order[..., :n_keep]
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, kept_idx, True)

        # 5: fusion token of the dropped patches.
        if n_keep == n_patch:
            fuse = torch.zeros_like(score)
        else:
            fuse = torch.softmax(score.masked_fill(keep, float("-inf")), dim=-1)
        fused = torch.einsum("vtn,vnc->vtc", fuse, patches)  # (V, T, C)

        # 6: aggregation, a softmax over the kept patches per aggregated token.
        logits = head.aggregation(patches.to(_param_dtype(head))).float()  # (V, N, M)
        logits = logits[:, None].expand(n_img, n_cap, n_patch, logits.shape[-1])
        logits = logits.masked_fill(~keep[..., None], float("-inf"))
        agg_w = torch.softmax(logits, dim=2).transpose(2, 3).contiguous()  # (V, T, M, N)
        aggregated = torch.einsum("vtmn,vnc->vtmc", agg_w, patches)  # (V, T, M, C)

        # 7: the image rows [CLS]; A; f, normalised.
        rows = [aggregated, fused[:, :, None]]
        if n_cls:
            rows.insert(0, tokens[:, None, :1].expand(n_img, n_cap, 1, dim))
        rows_n = F.normalize(torch.cat(rows, dim=2), dim=-1, eps=NORM_EPS)  # (V, T, R, C)

        # 8: patch-word alignment.
        words_n = F.normalize(words, dim=-1, eps=NORM_EPS)
        align = F.leaky_relu(torch.einsum("vtrc,tlc->vtrl", rows_n, words_n), LEAKY_SLOPE)
        t2i = (align.max(dim=2).values * valid).sum(-1) / lens.float()
        i2t = align.masked_fill(~valid[None, :, None, :], float("-inf")).max(dim=3).values.mean(dim=2)
        align = align * valid[None, :, None, :]

    return {
        "similarity": t2i + i2t,
        "t2i": t2i,
        "i2t": i2t,
        "salience": salience,
        "relevance": relevance,
        "score": score,
        "kept_indices": kept_idx,
        "keep": keep,
        "fuse_weights": fuse,
        "aggregation_weights": agg_w,
        "alignment": align,
    }


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32
