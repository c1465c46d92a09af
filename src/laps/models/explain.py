"""What the LAPS head did with an image-caption pair: kept patches, fusion and aggregation weights.

:func:`explain_pair` runs the steps of :mod:`laps.models.reference` (the math of
``docs/algorithm.md`` stated once) caption by caption and keeps every intermediate: the selection
scores, the kept patches, the fusion and aggregation weights spread back over the ``N`` patches,
the alignment. It is meant for inspection and pictures (``laps-visualize``), not for scoring many
pairs. Its ``similarity`` reproduces ``head.similarity`` to float precision and its ``keep`` the
``score_mask`` of the head's train-mode ``forward`` (``tests/test_visualize.py`` checks both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from laps.models.head import LAPSHead
from laps.models.reference import aggregate, align, image_rows, relevance, salience, select, split_cls

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
          ``t2i`` and ``i2t`` ``(V, T)``: its two terms (``docs/algorithm.md``, step 8);
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
    lens = head.check_inputs(img_embs, cap_embs, cap_lens)  # the head's own validation, one place
    n_keep = int(head.num_keep)
    with torch.autocast(img_embs.device.type, enabled=False):
        tokens, words = img_embs.float(), cap_embs.float()
        cls_tok, patches, patches_n = split_cls(head, tokens, F.normalize(tokens, dim=-1))
        words_n = F.normalize(words, dim=-1)
        sal = salience(patches, patches_n)  # (V, N)
        dtype = _param_dtype(head)
        steps = [_explain_caption(head, cls_tok, patches, patches_n, sal, words[t, :n], words_n[t, :n], n_keep,
                                  dtype, words.shape[1])
                 for t, n in enumerate(lens.tolist())]
    out = {key: torch.stack([step[key] for step in steps], dim=1) for key in steps[0]} if steps else {}
    out["salience"] = sal
    return out


def _explain_caption(head: LAPSHead, cls_tok: Tensor | None, patches: Tensor, patches_n: Tensor, sal: Tensor,
                     words: Tensor, words_n: Tensor, n_keep: int, dtype: torch.dtype,
                     max_len: int) -> dict[str, Tensor]:
    """One caption's intermediates over the ``V`` images, each without the caption axis."""
    n_img, n_patch, _ = patches.shape
    rel = relevance(words, patches_n)
    score = sal + rel
    sel = select(patches, score, n_keep)
    kept_idx, dropped_idx = sel.order[:, :n_keep], sel.order[:, n_keep:]
    aggregated, weight = aggregate(head, sel.kept.to(dtype))
    aggregated, weight = aggregated.float(), weight.float()  # (V, M, C), (V, M, K)
    t2i, i2t, sim = align(image_rows(cls_tok, aggregated, sel.fusion),
                          words_n.unsqueeze(0).expand(n_img, -1, -1))
    fuse = torch.zeros_like(score).scatter_(1, dropped_idx, sel.drop_weight)
    agg_w = weight.new_zeros(n_img, weight.shape[1], n_patch)
    agg_w.scatter_(2, kept_idx[:, None].expand(-1, weight.shape[1], -1), weight)
    alignment = sim.new_zeros(n_img, sim.shape[2], max_len)
    alignment[..., : sim.shape[1]] = sim.transpose(1, 2)
    return {
        "similarity": (t2i + i2t)[:, 0], "t2i": t2i[:, 0], "i2t": i2t[:, 0], "relevance": rel, "score": score,
        "kept_indices": kept_idx, "keep": sel.score_mask.bool(), "fuse_weights": fuse,
        "aggregation_weights": agg_w, "alignment": alignment,
    }


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32
