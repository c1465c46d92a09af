"""The head's forward kernels: patch selection, and the similarities of blocks of pairs.

See :mod:`laps.models.head` for the arrangement (what is computed once per image, what per pair)
and ``docs/algorithm.md`` for the math. Shapes: ``V`` images of ``L_v`` tokens (``N`` patches,
[CLS] first when there is one), ``T`` captions of ``L`` words, width ``C``, ``M`` aggregated
tokens. Everything but the large GEMMs runs in the precise dtype (fp32, float64 for float64
inputs); the GEMMs in ``mm_dtype`` (the autocast dtype under autocast).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from laps.models.gemm import bmm_nt, mm_nt
from laps.models.head.common import LEAKY_SLOPE, NORM_EPS, PreparedImages
from laps.models.head.plan import HeadPlan, ScoreConfig, cache_bytes, proj_bytes


class PatchSelection(NamedTuple):
    """Hard selection for a block of pairs: ``keep`` (V, T, N) in {0, 1}; ``fuse`` weights (V, T, N)."""

    keep: Tensor
    fuse: Tensor


def matmul_dtype(device_type: str, precise: torch.dtype) -> torch.dtype:
    """The dtype of the large GEMMs: the autocast dtype when autocast is on, else ``precise``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return precise


def _length_mask(lens: Tensor, max_len: int) -> Tensor:
    """``(B, max_len)`` boolean mask of the first ``lens[b]`` positions."""
    return torch.arange(max_len, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)


@torch.no_grad()
def select_patches(tokens: Tensor, patch_norm: Tensor, salience: Tensor, query: Tensor, num_keep: int) -> PatchSelection:
    """Top-K selection and fusion weights of V images and T captions, ``(V, T, N)`` each.

    ``tokens`` (V, L_v, C) are the image tokens in fp32 (float64), the last N of them patches with
    norms ``patch_norm`` (V, N) and ``salience`` (V, N); ``query`` is (T, C). The caption relevance
    ``<query, P_k> / ||P_k||`` is one GEMM over all tokens (the [CLS] column is dropped after, which
    avoids copying the patches out). Always in fp32, also under autocast, so that rounding cannot
    change which patches are kept.
    """
    with torch.autocast(tokens.device.type, enabled=False):
        n_img, n_tok, dim = tokens.shape
        n_patch = patch_norm.shape[1]
        rel = mm_nt(query.to(tokens.dtype), tokens.reshape(n_img * n_tok, dim))  # (T, V * L_v)
        rel = rel.view(-1, n_img, n_tok)[:, :, n_tok - n_patch :].transpose(0, 1)  # (V, T, N)
        score = torch.addcdiv(salience.unsqueeze(1), rel, patch_norm.unsqueeze(1))
        kept = score.topk(num_keep, dim=-1, sorted=False).indices
        keep = torch.zeros_like(score).scatter_(-1, kept, 1.0)
        if num_keep == score.shape[-1]:
            fuse = torch.zeros_like(score)
        else:
            fuse = torch.softmax(score.masked_fill(keep.bool(), float("-inf")), dim=-1)
    return PatchSelection(keep, fuse)


class Workspace:
    """Reusable scratch buffers, one per name, for the temporaries of successive blocks.

    Blocks of a call have the same (or smaller) shapes, so after the first block nothing is
    allocated: on CPU this avoids page-faulting fresh memory for every block.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def new_scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scratch tensor from ``ws``, or a fresh one when there is no workspace (it is kept)."""
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ws.get(name, shape, dtype, device)


def score_blocks(
    images: PreparedImages,
    words: Tensor,
    lens: Tensor,
    query: Tensor,
    lengths: tuple[int, ...],
    config: ScoreConfig,
    save: bool,
) -> tuple[Tensor, Tensor | None, dict | None]:
    """All pairs, block by block: ``sims`` (V, T), keep mask (V, T, N) or None, and saved state.

    ``words`` (T, L, C) normalised, ``lens`` (T,), ``query`` (T, C) and the host-side ``lengths``
    are the captions' (:class:`~laps.models.head.common.PreparedCaptions`); blocks as
    ``config.plan`` says.

    Captions are visited sorted by length so that each block is padded only to its own longest
    caption. The patch selection and the norms of the aggregated and fusion tokens (which do not
    depend on the words) are computed for all images and a run of captions at once. With ``save``
    the state for :meth:`PairScores.backward` is returned: the plan, the sorted order, keep and
    fusion weights and norms of every pair and, within ``max_saved_bytes``, the products ``G w^T``
    of the runs' norms and each block's intermediates.
    """
    tokens = images.tokens
    n_img, n_cap = tokens.shape[0], words.shape[0]
    n_tok, n_patch, n_aggr = tokens.shape[1], images.weights.shape[1], images.weights.shape[2]
    # planned on the host (a stable sort, as torch.argsort(stable=True)): no device-to-host copy
    order_host = sorted(range(n_cap), key=lengths.__getitem__)
    widths = [lengths[t] for t in order_host]
    order = torch.tensor(order_host, dtype=torch.long, device=tokens.device)
    lens_s = lens.index_select(0, order)
    words_s = words.index_select(0, order)
    query_s = query.index_select(0, order)
    precise = images.gram.dtype
    select_tokens = tokens.detach().to(precise)
    sims = torch.empty(n_img, n_cap, dtype=precise, device=tokens.device)
    need_sel = save or config.return_mask
    keep_all = tokens.new_empty(n_img, n_cap, n_patch, dtype=precise) if need_sel else None
    fuse_all = tokens.new_empty(n_img, n_cap, n_patch, dtype=precise) if save else None
    # softmax totals Z (V, T, M) and squared norms of the aggregated and fusion tokens (V, T, M + 1):
    # of every pair for backward, else of a run of captions at a time
    total_all = tokens.new_empty(n_img, n_cap, n_aggr, dtype=precise) if save else None
    sq_all = tokens.new_empty(n_img, n_cap, n_aggr + 1, dtype=precise) if save else None
    plan, caches, runs, saved = [], [], [], 0
    ws = Workspace()
    blocks = config.plan.blocks(n_img, n_cap, config.block_pairs)
    # Selection for all images and a run of captions at once (a wide GEMM instead of thin ones), and
    # so are the norms (larger products per image).
    span = blocks[0][3] - blocks[0][2]
    span *= max(1, config.plan.select_captions // span)
    run, sel = (0, 0), None
    for v0, v1, t0, t1 in blocks:
        if not run[0] <= t0 < t1 <= run[1]:
            run = (t0, min(n_cap, t0 + span))
            s0, s1 = run
            sel = select_patches(select_tokens, images.patch_norm, images.salience, query_s[s0:s1], config.num_keep)
            if keep_all is not None:
                keep_all[:, s0:s1] = sel.keep
            if fuse_all is not None:
                fuse_all[:, s0:s1] = sel.fuse
            total = torch.bmm(sel.keep, images.weights)
            size = proj_bytes(n_img, s1 - s0, n_aggr, n_patch, precise)
            proj = None
            if save and saved + size <= config.max_saved_bytes:
                saved += size
                proj = []
            sq = token_norms(images, sel.keep, sel.fuse, total, config.mm_dtype, config.plan, ws, proj)
            if save:
                total_all[:, s0:s1], sq_all[:, s0:s1] = total, sq
                runs.append((s0, s1, proj))
        a, b = t0 - run[0], t1 - run[0]
        width = max(widths[t0:t1])
        size = cache_bytes(v1 - v0, n_tok, t1 - t0, width, n_aggr, config.mm_dtype, precise)
        keep_cache = save and saved + size <= config.max_saved_bytes
        saved += size if keep_cache else 0
        out, cache = pair_forward(
            images.take(slice(v0, v1)), words_s[t0:t1, :width], sel.keep[v0:v1, a:b], sel.fuse[v0:v1, a:b],
            lens_s[t0:t1], config.n_cls, config.mm_dtype, (total[v0:v1, a:b], sq[v0:v1, a:b]),
            ws=None if keep_cache else ws, for_backward=keep_cache,
        )
        sims[v0:v1, t0:t1] = out
        plan.append((v0, v1, t0, t1, width))
        caches.append(cache)  # None unless kept
    inverse = torch.argsort(order)
    sims = sims.index_select(1, inverse)
    mask = keep_all.index_select(1, inverse) if config.return_mask else None
    state = None
    if save:
        state = {"plan": plan, "caches": caches, "runs": runs, "order": order, "order_host": order_host,
                 "widths": widths, "lens_s": lens_s, "words_s": words_s,
                 "keep_s": keep_all, "fuse_s": fuse_all, "total_s": total_all, "sq_s": sq_all}
    return sims, mask, state


def pair_forward(
    images: PreparedImages,
    words: Tensor,
    keep: Tensor,
    fuse: Tensor,
    lens: Tensor,
    n_cls: int,
    mm_dtype: torch.dtype,
    norms: tuple[Tensor, Tensor],
    ws: Workspace | None = None,
    for_backward: bool = True,
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Similarities ``(V, T)`` of a block and, with ``for_backward``, the intermediates its backward needs.

    Shapes: ``images`` of V images (:class:`PreparedImages`); keep, fuse (V, T, N); ``norms`` the softmax
    totals (V, T, M) and the squared norms of the aggregated and fusion tokens (V, T, M + 1) (see
    :func:`token_norms`). Captions are either shared by all images of the block, words (T, L, C)
    normalised and lens (T,), or given per image, words (V, T, L, C) and lens (V, T). The large
    intermediates are taken from ``ws`` when given (they are then only valid until the next
    block). Without ``for_backward`` the maxima are taken without their positions.
    """
    tokens, weights, cls_norm = images.tokens, images.weights, images.cls_norm
    with torch.autocast(tokens.device.type, enabled=False):
        n_img, n_tok, dim = tokens.shape
        shared = words.dim() == 3
        n_cap, n_word = words.shape[-3], words.shape[-2]
        n_patch, n_aggr = weights.shape[1], weights.shape[2]
        precise, device = images.gram.dtype, tokens.device
        tok = tokens.to(mm_dtype)
        wrd = words.to(mm_dtype)
        # <word_j, token_k>: one GEMM (V * L_v, C) @ (C, T * L) for shared captions, else one per image.
        # the workspace's buffer where there is one (torch's kernels write there, oneDNN returns its own)
        buf = None if ws is None else ws.get("dots", (n_img, n_tok, n_cap * n_word), mm_dtype, device)
        if shared:
            flat = None if buf is None else buf.flatten(0, 1)
            dots = mm_nt(tok.reshape(n_img * n_tok, dim), wrd.reshape(n_cap * n_word, dim), out=flat)
        else:
            dots = bmm_nt(tok, wrd.reshape(n_img, n_cap * n_word, dim), out=buf)
        dots = dots.view(n_img, n_tok, n_cap, n_word)
        dots_kept = dots[:, n_cls:]
        total, sq_all = norms
        sq, f_sq = sq_all[..., :n_aggr], sq_all[..., n_aggr]
        # fusion token f = fuse @ P: <word_j, f> = sum_k fuse_k <word_j, P_k> (dropped k), ||f||^2 = fuse G fuse^T.
        f_num = fusion_dots(fuse.to(mm_dtype), dots_kept).to(precise)  # (V, T, L)
        f_len = f_sq.clamp_min(0.0).sqrt()  # (V, T)
        f_norm = f_len.clamp_min(NORM_EPS)
        s_fuse = f_num.div_(f_norm.unsqueeze(-1))
        dots_kept.mul_(keep.transpose(1, 2).unsqueeze(-1).to(mm_dtype))  # (V, N, T, L), zero at dropped patches
        # softmax over the kept patches, w = E * keep / Z: <word_j, sum_k E_km keep_k P_k>, a GEMM per image.
        numer = torch.bmm(images.weights_t.to(mm_dtype), dots_kept.reshape(n_img, n_patch, n_cap * n_word))
        numer = numer.to(precise).view(n_img, n_aggr, n_cap, n_word)
        norm = sq.clamp_min(0.0).sqrt().clamp_min(NORM_EPS)
        denom = total * norm
        s_agg = numer.div_(denom.transpose(1, 2).unsqueeze(-1))  # (V, M, T, L)
        rows = [s_agg, s_fuse.unsqueeze(1)]
        s_cls = None
        if n_cls:
            s_cls = dots[:, 0].to(precise) / cls_norm.view(n_img, 1, 1)  # (V, T, L)
            rows.insert(0, s_cls.unsqueeze(1))
        sim = torch.cat(rows, dim=1)  # (V, R, T, L)
        valid = _length_mask(lens.reshape(-1), n_word).view(*lens.shape, n_word)  # ([V,] T, L)
        row_valid = valid if shared else valid.unsqueeze(1)
        # The leaky ReLU is increasing, so it commutes with the maxima: applied to them, not to sim.
        # Padding words are filled with -inf in place; backward sees zero gradient there.
        if for_backward:
            t2i_val, t2i_idx = sim.max(dim=1)  # (V, T, L)
            i2t_val, i2t_idx = sim.masked_fill_(~row_valid, float("-inf")).max(dim=3)  # (V, R, T)
        else:
            t2i_val = sim.amax(dim=1)
            i2t_val = sim.masked_fill_(~row_valid, float("-inf")).amax(dim=3)
        t2i = (F.leaky_relu(t2i_val, LEAKY_SLOPE) * valid).sum(-1) / lens
        sims = t2i + F.leaky_relu(i2t_val, LEAKY_SLOPE).mean(dim=1)
    if not for_backward:
        return sims, None
    cache = {
        "dots_kept": dots_kept, "sq": sq, "norm": norm, "total": total, "denom": denom, "s_agg": s_agg,
        "f_len": f_len, "f_norm": f_norm, "s_fuse": s_fuse, "sim": sim, "valid": valid, "t2i_idx": t2i_idx,
        "i2t_idx": i2t_idx,
    }
    if s_cls is not None:
        cache["s_cls"] = s_cls
    return sims, cache


def token_norms(
    images: PreparedImages, keep: Tensor, fuse: Tensor, total: Tensor, mm_dtype: torch.dtype, plan: HeadPlan,
    ws: Workspace | None, proj: list[Tensor] | None = None,
) -> Tensor:
    """Squared norms of the aggregated tokens and the fusion token, ``(V, T, M + 1)`` (the fusion
    token's last), for keep and fusion weights (V, T, N) and softmax totals ``Z = keep E`` (V, T, M).

    ``||A||^2 = w G w^T`` with the aggregated tokens' weights ``w = E * keep / Z`` (normalised
    before the product: ``E`` may be as small as ``exp(-LOGIT_FLOOR)``, its square underflows), and
    likewise for the fusion weights: per image, ``G`` times the rows of all T captions
    (:func:`_norm_rows`), one product as large as the captions allow. With a list ``proj`` the products
    ``G w^T`` are appended to it for backward, (V_c, N, (M + 1) * T) for each chunk of V_c images.
    Images go as many at a time as :meth:`HeadPlan.image_step` says: on CPU one at a time when they
    have many captions (the rows stay in cache from one step to the next), more otherwise.
    """
    n_img, n_cap, n_patch = keep.shape
    n_aggr = images.weights.shape[2]
    precise, device = images.gram.dtype, keep.device
    n_rows = n_cap * (n_aggr + 1)
    sq = keep.new_empty(n_img, n_cap, n_aggr + 1)
    step = plan.image_step(n_rows * n_patch * precise.itemsize)
    for v0 in range(0, n_img, step):
        v1 = min(v0 + step, n_img)
        part = products(images, keep, fuse, total, v0, v1, mm_dtype, ws)
        if proj is not None:
            proj.append(part)
        # w G w^T = sum_n (G w^T) w^T, with w^T built patch-major (cheaper than reading G w^T transposed)
        rows_t = norm_rows_t(images.weights[v0:v1], keep[v0:v1], fuse[v0:v1], total[v0:v1],
                             new_scratch(ws, "rows_t", (v1 - v0, n_patch, n_aggr + 1, n_cap), precise, device))
        prod = torch.mul(part, rows_t.view(part.shape), out=new_scratch(ws, "proj_rows", part.shape, precise, device))
        sq[v0:v1] = prod.sum(1).view(v1 - v0, n_aggr + 1, n_cap).transpose(1, 2)
    return sq


def products(
    images: PreparedImages, keep: Tensor, fuse: Tensor, total: Tensor, v0: int, v1: int, mm_dtype: torch.dtype,
    ws: Workspace | None,
) -> Tensor:
    """``G w^T`` (v1 - v0, N, (M + 1) * T) of the images ``v0:v1``, with their rows ``w`` from :func:`_norm_rows`
    (patch-major, as :func:`laps.models.head.backward.norms_backward` wants it; ``G`` is symmetric: ``G w^T = (w G)^T``)."""
    n_cap, n_patch = keep.shape[1], keep.shape[2]
    precise = images.gram.dtype
    rows = _norm_rows(images.weights_t[v0:v1], keep[v0:v1], fuse[v0:v1], total[v0:v1],
                      new_scratch(ws, "rows", (v1 - v0, total.shape[2] + 1, n_cap, n_patch), precise, keep.device))
    return bmm_nt(images.gram[v0:v1].to(mm_dtype), rows.flatten(1, 2).to(mm_dtype)).to(precise)


def fusion_dots(fuse: Tensor, dots: Tensor, group: int = 16) -> Tensor:
    """``sum_k fuse[v, t, k] dots[v, k, t, l]``: fuse (V, T, N), dots (V, N, T, L) -> (V, T, L).

    For a group of captions, every caption's weights against every caption's dots is one GEMM per
    image, of which the diagonal (each caption with its own words) is kept: ``group`` times a small
    cost, instead of two passes over ``dots``. Groups bound the ``group x group`` waste.
    """
    n_img, n_cap, n_patch = fuse.shape
    n_word = dots.shape[-1]
    parts = []
    for t0 in range(0, n_cap, group):
        t1 = min(t0 + group, n_cap)
        cross = torch.bmm(fuse[:, t0:t1], dots[:, :, t0:t1].reshape(n_img, n_patch, (t1 - t0) * n_word))
        parts.append(cross.view(n_img, t1 - t0, t1 - t0, n_word).diagonal(dim1=1, dim2=2).transpose(1, 2))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _norm_rows(w_t: Tensor, keep: Tensor, fuse: Tensor, total: Tensor, out: Tensor) -> Tensor:
    """The rows of the norms' quadratic forms for V images and T captions: ``out`` (V, M + 1, T, N)
    gets the aggregation weights ``E * keep / Z`` in ``[:, :M]`` and the fusion weights in
    ``[:, M]``, from ``E^T`` ``w_t`` (V, M, N), keep and fuse (V, T, N) and ``Z`` (V, T, M)."""
    n_aggr = w_t.shape[1]
    agg = out[:, :n_aggr]
    torch.mul(w_t.unsqueeze(2), keep.unsqueeze(1), out=agg)
    agg.div_(total.transpose(1, 2).unsqueeze(-1))
    out[:, n_aggr] = fuse
    return out


def norm_rows_t(weights: Tensor, keep: Tensor, fuse: Tensor, total: Tensor, out: Tensor) -> Tensor:
    """:func:`_norm_rows` patch-major: ``out`` (V, N, M + 1, T), from ``E`` ``weights`` (V, N, M), keep
    and fuse (V, T, N) and ``Z`` (V, T, M)."""
    n_aggr = weights.shape[2]
    agg = out[:, :, :n_aggr]
    # the small factors transposed contiguous, so that the broadcasts run along T
    torch.mul(weights.unsqueeze(-1), keep.transpose(1, 2).contiguous().unsqueeze(2), out=agg)
    agg.div_(total.transpose(1, 2).contiguous().unsqueeze(1))
    out[:, :, n_aggr] = fuse.transpose(1, 2)
    return out
