"""The paper's differentiable patch selection (``model.selection=gumbel``), which the release left out.

The paper describes it in words only; this is the definition implemented here
(``docs/algorithm.md`` repeats it):

* a score-aware prediction network over each patch, ``LayerNorm -> Linear(C, C/4) -> GELU ->
  Linear(C/4, 2) -> log_softmax``, gives the keep probability ``p_i`` (caption-independent);
* the text-relevance and salience scores of the top-k path (no gradient), each min-max
  normalised over the image's patches, are mixed in:
  ``s_i = (1 - w) * p_i + w * (s_txt_i + s_img_i) / 2`` with ``w = attention_weight``;
* training: a Gumbel-softmax over the keep/drop logits ``(log s_i, log(1 - s_i))`` with
  temperature ``tau`` and straight-through hard decisions, so the decision is 0/1 in the
  forward pass and differentiable in the backward pass (at least one patch is always kept);
* inference: the top ``ceil(N * sparse_ratio)`` patches by ``s``;
* the decision enters the head multiplicatively: the aggregation softmax runs over kept patches
  (``exp(logit) * keep``), the fusion token over dropped ones with ``softmax(s)`` weights times
  ``1 - keep``; the ratio loss ``(mean(keep) - sparse_ratio)^2`` then has a gradient.

This path materialises per-pair tensors (it needs autograd through the decision), so it is
slower and hungrier than the default top-k head; chunks of captions are checkpointed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from laps.models.head.common import LEAKY_SLOPE, PreparedCaptions
from laps.models.reference import alignment_terms

EPS = 1e-6


class ScorePredictor(nn.Module):
    """Per-patch keep probability: ``(..., N, C)`` -> ``(..., N)`` in (0, 1)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        hidden = max(1, embed_dim // 4)
        self.net = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 2)
        )

    def forward(self, patches: Tensor) -> Tensor:
        return torch.log_softmax(self.net(patches).float(), dim=-1)[..., 0].exp()


def _minmax(x: Tensor) -> Tensor:
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(EPS)


def decision_scores(p: Tensor, s_txt: Tensor, s_img: Tensor, attention_weight: float) -> Tensor:
    """``s`` ``(B_v, B_t, N)`` from ``p`` ``(B_v, N)``, ``s_txt`` ``(B_v, B_t, N)``, ``s_img`` ``(B_v, N)``."""
    attention = (_minmax(s_txt) + _minmax(s_img).unsqueeze(1)) / 2
    return (1 - attention_weight) * p.unsqueeze(1) + attention_weight * attention


def decide(s: Tensor, num_keep: int, tau: float, training: bool) -> Tensor:
    """Keep decisions ``(B_v, B_t, N)`` in {0, 1}: straight-through Gumbel in training, top-k otherwise."""
    if not training:
        kept = s.topk(num_keep, dim=-1).indices
        return torch.zeros_like(s).scatter_(-1, kept, 1.0)
    s = s.clamp(EPS, 1 - EPS)
    logits = torch.stack([s.log(), (1 - s).log()], dim=-1)
    keep = F.gumbel_softmax(logits, tau=tau, hard=True)[..., 0]
    # A pair that would keep nothing keeps its best patch (the aggregation needs one).
    empty = keep.detach().sum(-1, keepdim=True) == 0
    best = torch.zeros_like(s).scatter_(-1, s.argmax(-1, keepdim=True), 1.0)
    return torch.where(empty, best, keep)


def gumbel_similarity(head, img_embs: Tensor, caption: PreparedCaptions) -> tuple[Tensor, Tensor]:
    """Similarities ``(B_v, B_t)`` and keep decisions ``(B_v, B_t, N)`` with the Gumbel selection.

    ``head`` is a :class:`~laps.models.head.LAPSHead` built with ``selection="gumbel"``; ``caption``
    (words ``(B_t, L_t, C)``) comes from its ``prepare_captions``.
    """
    words_n, cap_lens, query, _ = caption
    n_cls = int(head.has_cls)
    cls, patches = img_embs[:, :n_cls], img_embs[:, n_cls:]
    real = words_n.dtype  # fp32, float64 for float64 inputs (prepare_captions)
    p32 = patches.to(real)
    patches_n = F.normalize(p32, dim=-1)
    with torch.no_grad():
        s_img = torch.einsum("vnc,vc->vn", patches_n, F.normalize(p32.mean(1), dim=-1))
    p = head.predictor(patches)
    logits = head.aggregation(patches).to(real)  # (B_v, N, M)
    n_rows = head.num_aggregated + 1 + n_cls
    pair_bytes = (n_rows * (patches.shape[2] + words_n.shape[1]) + head.num_aggregated * patches.shape[1]) * real.itemsize
    pairs = head.plan_for(img_embs.device.type).block_pairs(head.chunk_pairs, pair_bytes)
    step = max(1, pairs // max(img_embs.shape[0], 1))
    sims, keeps = [], []
    for t0 in range(0, words_n.shape[0], step):
        args = (p32, patches_n, s_img, p, logits, cls.to(real), words_n[t0 : t0 + step],
                cap_lens[t0 : t0 + step], query[t0 : t0 + step])
        fn = functools.partial(_block, head)
        if torch.is_grad_enabled():
            out, keep = checkpoint(fn, *args, use_reentrant=False)
        else:
            out, keep = fn(*args)
        sims.append(out)
        keeps.append(keep)
    return torch.cat(sims, dim=1), torch.cat(keeps, dim=1)


def _block(head, patches, patches_n, s_img, p, logits, cls, words_n, lens, query) -> tuple[Tensor, Tensor]:
    n_img, _, dim = patches.shape
    n_cap = words_n.shape[0]
    with torch.no_grad():
        s_txt = torch.einsum("vnc,tc->vtn", patches_n, query)
    s = decision_scores(p, s_txt, s_img, head.attention_weight)
    keep = decide(s, head.num_keep, head.gumbel_tau, head.training)  # (B_v, b_t, N)

    weights = torch.exp(logits - logits.amax(dim=1, keepdim=True).detach())  # (B_v, N, M)
    agg = weights.unsqueeze(1) * keep.unsqueeze(-1)  # (B_v, b_t, N, M)
    agg = agg / agg.sum(dim=2, keepdim=True).clamp_min(1e-30)
    drop = 1 - keep
    fuse = torch.exp(s - s.amax(-1, keepdim=True).detach()) * drop
    fuse = fuse / fuse.sum(-1, keepdim=True).clamp_min(1e-30)  # zeros when nothing is dropped
    mix = torch.cat([agg.transpose(2, 3), fuse.unsqueeze(2)], dim=2)  # (B_v, b_t, M+1, N)
    rows = torch.bmm(mix.reshape(n_img, -1, patches.shape[1]), patches).reshape(n_img, n_cap, -1, dim)
    if cls.shape[1]:
        rows = torch.cat([cls.unsqueeze(1).expand(-1, n_cap, -1, -1), rows], dim=2)
    rows_n = F.normalize(rows, dim=-1)
    align = F.leaky_relu(torch.einsum("vtrc,twc->vtwr", rows_n, words_n), LEAKY_SLOPE)  # (B_v, b_t, L_t, R)
    valid = torch.arange(words_n.shape[1], device=lens.device)[None] < lens[:, None]  # (b_t, L_t)
    t2i, i2t = alignment_terms(align, valid)
    return t2i + i2t, keep
