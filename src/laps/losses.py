"""Losses of the official recipe, and the distributed gathering they need.

``contrastive_loss`` is the VSE hinge loss over a (global) batch; ``ratio_loss`` keeps the
fraction of kept patches near ``sparse_ratio``. ``gather_pairs`` collects every rank's pairs
(embeddings with gradients), so that each rank scores its captions against the global batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F


def negative_mask(img_ids: Tensor, cap_img_ids: Tensor | None = None) -> Tensor:
    """``(B_v, B_t)`` bool, True where image ``i`` and caption ``j`` share an image id (never negatives)."""
    cap_img_ids = img_ids if cap_img_ids is None else cap_img_ids
    return img_ids.reshape(-1, 1) == cap_img_ids.reshape(1, -1)


def contrastive_loss(
    sims: Tensor, img_ids: Tensor, margin: float = 0.2, max_violation: bool = False
) -> Tensor:
    """Hinge loss of a square ``(B, B)`` batch of pairs (image ``i`` with caption ``i``).

    Pairs whose image ids are equal (the diagonal and other captions of the same image)
    are never negatives. Sum over negatives, or the hardest one per row/column.
    """
    if sims.dim() != 2 or sims.shape[0] != sims.shape[1]:
        raise ValueError(f"sims must be square (B, B), got shape {tuple(sims.shape)}")
    if img_ids.numel() != sims.shape[0]:
        raise ValueError(f"img_ids has {img_ids.numel()} entries for a batch of {sims.shape[0]}")
    diag = sims.diagonal().reshape(-1, 1)
    cost_c = (margin + sims - diag).clamp(min=0)  # captions ranked for image i (row i)
    cost_i = (margin + sims - diag.t()).clamp(min=0)  # images ranked for caption j (column j)
    positive = negative_mask(img_ids.to(sims.device))
    cost_c = cost_c.masked_fill(positive, 0.0)
    cost_i = cost_i.masked_fill(positive, 0.0)
    if max_violation:
        return cost_c.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()
    return cost_c.sum() + cost_i.sum()


def ratio_loss(score_mask: Tensor, sparse_ratio: float) -> Tensor:
    """``(mean(score_mask) - sparse_ratio) ** 2``; constant (no gradient) with hard top-k masks."""
    return (score_mask.float().mean() - sparse_ratio) ** 2


# ---------------------------------------------------------------------------- distributed


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, gradients flowing back to each rank's part.

    Every rank's part must have the same shape. Every rank computes the same global loss;
    ``torch.distributed.nn.all_gather`` sums the gradients that all ranks send back to each
    part, so each rank's parameters receive ``world_size`` times their share, and DDP's
    averaging divides that back: the result equals the single-process gradient, with no
    extra scaling.
    """
    world, _ = _world()
    if world == 1:
        return x
    from torch.distributed.nn import all_gather

    with warnings.catch_warnings():  # deprecated (not removed) in favour of the functional collectives;
        warnings.simplefilter("ignore", FutureWarning)  # same gradient semantics, tested on gloo
        return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient)."""
    world, _ = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_pairs(img: Tensor, cap: Tensor, lens: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every rank's image-caption pairs, concatenated in rank order: the global batch.

    Args:
        img: ``(B, L_v, C)`` image embeddings; cap: ``(B, L_t, C)`` caption embeddings;
            lens: ``(B,)`` caption lengths; ids: ``(B,)`` image ids. ``B`` and ``L_t`` may differ
            between ranks (skipped images, caption widths).

    Returns:
        The same four, over all ranks' pairs; embeddings with gradients (see
        :func:`gather_with_grad`), captions zero-padded to the widest rank's. One exchange of
        sizes, then three gathers (lengths and ids travel together, without gradient).
    """
    world, _ = _world()
    if world == 1:
        return img, cap, lens, ids
    sizes = gather_no_grad(torch.tensor([[img.shape[0], cap.shape[1]]], device=img.device)).tolist()
    counts = [n for n, _ in sizes]
    largest, width = max(counts), max(w for _, w in sizes)
    # collectives need equal shapes: pad every part to the largest count, then drop the padding rows
    keep = torch.cat([torch.arange(n, device=img.device) + r * largest for r, n in enumerate(counts)])
    img = gather_with_grad(pad_to(img, largest, dim=0))[keep]
    cap = gather_with_grad(pad_to(pad_to(cap, width, dim=1), largest, dim=0))[keep]
    meta = gather_no_grad(pad_to(torch.stack([lens.long(), ids.long()], dim=1), largest, dim=0))[keep]
    return img, cap, meta[:, 0].to(lens.dtype), meta[:, 1].to(ids.dtype)


def pad_to(x: Tensor, length: int, dim: int = 1) -> Tensor:
    """Zero-pad ``x`` along ``dim`` up to ``length``."""
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, missing]
    return F.pad(x, pad)


def max_across_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks."""
    world, _ = _world()
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
