"""Pooled (one vector per image or caption) embeddings: the cheap first stage of two-stage search.

LAPS aligns tokens, not pooled vectors: the mean of a LAPS-trained model's image tokens is not, in
general, close to the mean of its caption's words. ``model.pooled_weight`` trains them to be (a
hinge loss on the cosine of these vectors beside the LAPS loss); ``laps-retrieve --rerank`` ranks
by them before re-scoring with the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _real(x: Tensor) -> Tensor:
    """``x`` in float64 if it is float64, else in float32."""
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def pool_image(tokens: Tensor) -> Tensor:
    """``(B, L_v, C)`` image tokens -> ``(B, C)``: the mean over all tokens, L2-normalised (fp32,
    float64 for float64 inputs)."""
    return F.normalize(_real(tokens).mean(dim=1), dim=-1)


def pool_text(words: Tensor, lens: Tensor) -> Tensor:
    """``(B, L_t, C)`` word tokens and lengths ``(B,)`` -> ``(B, C)``: the mean of the valid words,
    L2-normalised (fp32, float64 for float64 inputs). Also the head's caption query (text relevance)."""
    words = _real(words)
    lens = lens.to(words.device)
    valid = torch.arange(words.shape[1], device=words.device)[None, :] < lens[:, None]
    return F.normalize((words * valid[..., None]).sum(1) / lens[:, None].to(words.dtype), dim=-1)


def pooled_similarity(img_tokens: Tensor, words: Tensor, lens: Tensor) -> Tensor:
    """Cosine of pooled vectors for every pair: ``(B_v, L_v, C)``, ``(B_t, L_t, C)``, ``(B_t,)`` -> ``(B_v, B_t)``."""
    return pool_image(img_tokens) @ pool_text(words, lens).t()
