"""The head's hand-written backward: :class:`PairScores`, block by block, dense or sparse.

A block's intermediates are kept from forward to backward within ``max_saved_mb`` and recomputed
beyond it; the word-token gradients of an image range's blocks are gathered side by side, so that
the tokens' and the words' gradients are one GEMM each; at the end the gradients of the Gram
matrices and the [CLS] norms are added to the tokens'. When few pairs carry a gradient, only those
are recomputed, image by image, and :class:`~laps.models.head.plan.GradientFeedback` tells the next
forward to keep nothing. Shapes as in :mod:`laps.models.head.kernels`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from laps.models.gemm import bmm_nt, cpu_backend_scope, mm_nt, onednn_for
from laps.models.head.common import LEAKY_SLOPE, NORM_EPS, PreparedImages
from laps.models.head.kernels import Workspace, new_scratch, norm_rows_t, pair_forward, products, score_blocks
from laps.models.head.plan import HeadPlan, ScoreConfig


def norms_backward(
    images: PreparedImages, keep: Tensor, fuse: Tensor, total: Tensor, d_sq: Tensor, mm_dtype: torch.dtype,
    plan: HeadPlan, d_gram: Tensor, ws: Workspace | None, proj: list[Tensor] | None = None,
) -> Tensor:
    """Backward of :func:`token_norms` for V images and T captions: given ``d loss / d sq`` (V, T, M + 1),
    adds the Gram matrices' gradient to ``d_gram`` (V, N, N) and returns the weights' (V, N, M)
    (through the squared norms only; ``Z`` is held fixed). ``proj`` are :func:`token_norms`' products,
    recomputed when not given. Images go as in :func:`token_norms`; everything is patch-major here, so
    that the Gram gradient is one product ``a @ b^T`` of contiguous rows per image.
    """
    n_img, n_cap, n_patch = keep.shape
    n_aggr = images.weights.shape[2]
    precise, device = images.gram.dtype, keep.device
    n_rows = n_cap * (n_aggr + 1)
    d_w = torch.empty_like(images.weights)
    d_sq_t = d_sq.transpose(1, 2).contiguous()  # (V, M + 1, T): broadcast along T below
    step = plan.image_step(n_rows * n_patch * precise.itemsize)
    for chunk, v0 in enumerate(range(0, n_img, step)):
        v1 = min(v0 + step, n_img)
        n = v1 - v0
        part = products(images, keep, fuse, total, v0, v1, mm_dtype, ws) if proj is None else proj[chunk]
        rows_t = norm_rows_t(images.weights[v0:v1], keep[v0:v1], fuse[v0:v1], total[v0:v1],
                             new_scratch(ws, "rows_t", (n, n_patch, n_aggr + 1, n_cap), precise, device))
        scaled = torch.mul(rows_t, d_sq_t[v0:v1].unsqueeze(1),
                           out=new_scratch(ws, "scaled", rows_t.shape, precise, device))
        # d sq / d w = 2 G w^T; through w = E keep / Z: d E = 2 d_sq (G w^T) keep / Z = 2 (G w^T) scaled / E.
        prod = torch.mul(part.view(rows_t.shape)[:, :, :n_aggr], scaled[:, :, :n_aggr],
                         out=new_scratch(ws, "proj_scaled", (n, n_patch, n_aggr, n_cap), precise, device))
        torch.sum(prod, dim=-1, out=d_w[v0:v1])
        # d sq / d G = w^T w: the scaled rows' outer products
        d_gram[v0:v1] += bmm_nt(scaled.view(n, n_patch, n_rows).to(mm_dtype),
                                rows_t.view(n, n_patch, n_rows).to(mm_dtype)).to(precise)
    return d_w.mul_(2.0).div_(images.weights)


def _pair_backward(
    grad: Tensor,
    images: PreparedImages,
    words: Tensor,
    keep: Tensor,
    fuse: Tensor,
    lens: Tensor,
    n_cls: int,
    mm_dtype: torch.dtype,
    c: dict[str, Tensor],
    d_dots: Tensor,
    ws: Workspace | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of a block, given ``d loss / d sims`` and its intermediates ``c`` from :func:`pair_forward`.

    Writes the gradient of the word-token dots into ``d_dots`` (V, L_v, T, L) (``mm_dtype``; a view
    of a larger buffer is fine). Returns the gradients wrt weights (V, N, M) (through the dots and
    the softmax totals), cls_norm (V, R_c) and the squared norms (V, T, M + 1), which
    :func:`laps.models.head.backward.norms_backward` takes on; the tokens' and words' follow from ``d_dots``
    (:func:`_token_word_grads`), for several blocks at once.
    """
    tokens, weights, cls_norm = images.tokens, images.weights, images.cls_norm
    with torch.autocast(tokens.device.type, enabled=False):
        n_img = tokens.shape[0]
        n_cap, n_word = words.shape[-3], words.shape[-2]
        n_patch, n_aggr = weights.shape[1], weights.shape[2]
        precise, device = images.gram.dtype, tokens.device
        sim = c["sim"]
        n_rows = sim.shape[1]
        g = grad.to(precise)
        # the two max-then-mean directions, then the leaky ReLU.
        d_sim = torch.zeros_like(sim)
        t2i_w = g.unsqueeze(-1) * c["valid"] / lens.unsqueeze(-1)  # (V, T, L)
        d_sim.scatter_(1, c["t2i_idx"].unsqueeze(1), t2i_w.unsqueeze(1))
        i2t_w = (g / n_rows).view(n_img, 1, n_cap, 1).expand(n_img, n_rows, n_cap, 1)
        d_sim.scatter_add_(3, c["i2t_idx"].unsqueeze(-1), i2t_w)
        d_sim = torch.ops.aten.leaky_relu_backward(d_sim, sim, LEAKY_SLOPE, False)

        # aggregated rows: s = numer / (Z * ||A||).
        total, norm, sq, denom = c["total"], c["norm"], c["sq"], c["denom"]
        d_agg = d_sim[:, n_cls : n_cls + n_aggr]  # (V, M, T, L)
        d_numer = d_agg / denom.transpose(1, 2).unsqueeze(-1)
        d_denom = -(d_agg * c["s_agg"]).sum(-1).transpose(1, 2) / denom  # (V, T, M)
        live = sq.clamp_min(0.0).sqrt() >= NORM_EPS
        d_sq = torch.where(live, d_denom * total / (2.0 * norm), 0.0)
        # Z cancels out of s while ||A|| is not clamped (s is homogeneous of degree 0 in E[:, m]).
        d_total = torch.where(live, 0.0, d_denom * norm)
        d_weights = torch.bmm(keep.transpose(1, 2), d_total)  # (V, N, M)
        d_numer_mm = d_numer.view(n_img, n_aggr, n_cap * n_word).to(mm_dtype)
        dots_kept = c["dots_kept"].reshape(n_img, n_patch, n_cap * n_word)
        d_weights += torch.bmm(dots_kept, d_numer_mm.transpose(1, 2)).to(precise)

        # word-token dots: d dots = keep * (E @ d numer), plus the [CLS] row.
        d_kept = new_scratch(ws, "d_kept", (n_img, n_patch, n_cap * n_word), mm_dtype, device)
        torch.bmm(weights.to(mm_dtype), d_numer_mm, out=d_kept)
        torch.mul(d_kept.view(n_img, n_patch, n_cap, n_word), keep.transpose(1, 2).unsqueeze(-1).to(mm_dtype),
                  out=d_dots[:, n_cls:])
        del d_kept
        d_cls_norm = torch.zeros_like(cls_norm)
        if n_cls:
            d_cls_row = d_sim[:, 0]  # (V, T, L)
            d_dots[:, 0] = d_cls_row / cls_norm.view(n_img, 1, 1)
            d_cls_norm = -(d_cls_row * c["s_cls"]).sum(dim=(1, 2)).unsqueeze(-1) / cls_norm

        # fusion row: s = (fuse . dots) / ||f||, ||f||^2 = fuse G fuse^T.
        f_norm = c["f_norm"]
        d_fuse_row = d_sim[:, n_cls + n_aggr]  # (V, T, L)
        d_f_num = d_fuse_row / f_norm.unsqueeze(-1)
        d_f_norm = -(d_fuse_row * c["s_fuse"]).sum(-1) / f_norm  # (V, T)
        d_f_sq = torch.where(c["f_len"] >= NORM_EPS, d_f_norm / (2.0 * f_norm), 0.0)
        d_dots[:, n_cls:].addcmul_(fuse.transpose(1, 2).unsqueeze(-1).to(mm_dtype), d_f_num.unsqueeze(1).to(mm_dtype))
    return d_weights, d_cls_norm, torch.cat([d_sq, d_f_sq.unsqueeze(-1)], dim=-1)


def _token_word_grads(
    d_dots: Tensor, tokens: Tensor, words: Tensor, precise: torch.dtype, tokens_t: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gradients wrt the tokens (V, L_v, C) and the words from the gradient of their dots ``d_dots``.

    Captions shared by all images: ``d_dots`` (V * L_v, K) for ``words`` (K, C) (the flattened
    words of one block or of several side by side), giving d_words (K, C); ``tokens_t`` (C, V * L_v),
    the tokens transposed and contiguous, lets that product run in :func:`mm_nt`. Captions per
    image: ``d_dots`` (V, L_v, K) for ``words`` (V, K, C). All factors in ``d_dots``' dtype.
    """
    n_img, n_tok, dim = tokens.shape
    if words.dim() == 2:
        d_tokens = mm_nt(d_dots, words.t()).to(precise).view(n_img, n_tok, dim)
        if tokens_t is not None:
            d_words = mm_nt(d_dots.t(), tokens_t)
        else:
            d_words = torch.mm(d_dots.t(), tokens.reshape(n_img * n_tok, dim))
    else:
        d_tokens = bmm_nt(d_dots, words.transpose(1, 2)).to(precise)
        d_words = torch.bmm(d_dots.transpose(1, 2), tokens)
    return d_tokens, d_words.to(precise)


class PairScores(torch.autograd.Function):
    """All-pairs similarities with a hand-written, block-by-block backward.

    The inputs are the fields of :class:`PreparedImages` in order, then the captions' words
    (T, L, C), lens (T,) and query (T, C). Those with gradients: tokens (V, L_v, C), weights
    (V, N, M) and words. ``gram`` (V, N, N) and ``cls_norm`` (V, R_c) must be
    :meth:`LAPSHead.prepare_images`'s, computed from ``tokens`` without a graph: backward adds
    their gradients to the tokens' itself (without the full-size gradient tensors that autograd's
    slicing of the tokens would add up). Outputs: sims (V, T) and the keep mask (V, T, N) (or None).
    Backward sets ``config.feedback`` (:class:`~laps.models.head.plan.GradientFeedback`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        tokens: Tensor,
        patch_norm: Tensor,
        salience: Tensor,
        gram: Tensor,
        weights: Tensor,
        weights_t: Tensor,
        cls_norm: Tensor,
        words: Tensor,
        lens: Tensor,
        query: Tensor,
        lengths: tuple[int, ...],
        config: ScoreConfig,
    ) -> tuple[Tensor, Tensor | None]:
        images = PreparedImages(tokens, patch_norm, salience, gram, weights, weights_t, cls_norm)
        sims, mask, state = score_blocks(images, words, lens, query, lengths, config, save=True)
        ctx.save_for_backward(tokens, weights, words, gram, cls_norm)
        # no gradients: kept as they are
        ctx.selection, ctx.weights_t = (patch_norm, salience), weights_t
        ctx.state, ctx.config = state, config
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        return sims, mask

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_mask: Tensor | None):  # type: ignore[override]
        with cpu_backend_scope(ctx.config.plan.gemm):  # backward runs outside the forward's scope
            d_tokens, d_weights, d_words = _pair_scores_backward(ctx, grad)
        return d_tokens, None, None, None, d_weights, None, None, d_words, None, None, None, None


def _pair_scores_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
    """The gradients of :class:`PairScores`' tokens, weights and words: dense (block by block, as in
    forward) or sparse (only the pairs with a gradient, image by image), whichever costs less."""
    tokens, weights, words, gram, cls_norm = ctx.saved_tensors
    state, config = ctx.state, ctx.config
    grad_s = grad.to(gram.dtype).index_select(1, state["order"])
    images = PreparedImages(tokens, *ctx.selection, gram, weights, ctx.weights_t, cls_norm)
    acc = _GradAccumulator(tokens, gram, weights, cls_norm, state["words_s"])
    ws = Workspace()
    nonzero = _gradient_pattern(grad_s, config, state["order_host"])
    dense_cost = sum(
        (v1 - v0) * (t1 - t0) * (1 if cache is not None else 2)
        for (v0, v1, t0, t1, _), cache in zip(state["plan"], state["caches"])
    )
    groups = _sparse_groups(nonzero, config.block_pairs)
    sparse_cost = 2 * sum(rows.size * slots.shape[1] for rows, slots in groups)
    config.feedback.sparse = sparse_cost < nonzero.size
    if sparse_cost < dense_cost:
        _sparse_backward(images, state, config, grad_s, groups, acc, ws)
    else:
        _dense_backward(images, state, config, grad_s, nonzero, acc, ws)
    # (the Gram matrices' part is a product per image: skipped when the tokens need no gradient)
    d_tokens = acc.token_grad(tokens, config.n_cls).to(tokens.dtype) if ctx.needs_input_grad[0] else None
    d_words = torch.empty_like(acc.words).index_copy_(0, state["order"], acc.words)
    return d_tokens, acc.weights, d_words.to(words.dtype)


def _gradient_pattern(grad_s: Tensor, config: ScoreConfig, order: list[int]) -> np.ndarray:
    """The pairs (V, T) with a gradient, captions in the sorted order, on the host: the head's
    ``declared_gradients`` (given in the callers' caption order) when set, else read from ``grad_s``."""
    if config.declared_gradients is not None:
        return np.asarray(config.declared_gradients, dtype=bool)[:, order]
    return (grad_s != 0).cpu().numpy()


def _sparse_backward(images: PreparedImages, state: dict, config: ScoreConfig, grad_s: Tensor,
                     groups: list[tuple[np.ndarray, np.ndarray]], acc: _GradAccumulator, ws: Workspace) -> None:
    """Few pairs carry a gradient (e.g. hardest negatives): recompute just those, a group of images
    with their captions at a time (:func:`_sparse_groups`), and add their gradients to ``acc``."""
    lens_s, words_s, keep_s, fuse_s, total_s, sq_s = (
        state[k] for k in ("lens_s", "words_s", "keep_s", "fuse_s", "total_s", "sq_s"))
    precise, mm_dtype, device = images.gram.dtype, config.mm_dtype, images.tokens.device
    n_tok, dim, n_patch = images.tokens.shape[1], images.tokens.shape[2], images.gram.shape[1]
    widths = np.asarray(state["widths"])
    for rows_host, slots_host in groups:
        width = int(widths[slots_host].max())
        n_rows, n_slots = slots_host.shape
        rows = torch.as_tensor(rows_host, device=device)
        slots = torch.as_tensor(slots_host, device=device)
        pairs = (rows.unsqueeze(1), slots)
        group = images.take(rows)
        words_g, keep_g, fuse_g, total_g = words_s[slots, :width], keep_s[pairs], fuse_s[pairs], total_s[pairs]
        args = (group, words_g, keep_g, fuse_g, lens_s[slots], config.n_cls, mm_dtype)
        with torch.no_grad():
            cache = pair_forward(*args, (total_g, sq_s[pairs]), ws=ws)[1]
        d_dots = new_scratch(ws, "d_dots", (n_rows, n_tok, n_slots, width), mm_dtype, device)
        d_w, d_cls, d_sq = _pair_backward(grad_s[pairs], *args, cache, d_dots, ws=ws)
        d_gram = images.gram.new_zeros(n_rows, n_patch, n_patch)
        d_w += norms_backward(group, keep_g, fuse_g, total_g, d_sq, mm_dtype, config.plan, d_gram, ws)
        d_tok, d_words = _token_word_grads(
            d_dots.view(n_rows, n_tok, n_slots * width), group.tokens.detach().to(mm_dtype),
            words_g.to(mm_dtype).reshape(n_rows, n_slots * width, dim), precise,
        )
        acc.add_rows(rows, slots, width, (d_tok, d_gram, d_w, d_cls, d_words.view(n_rows, n_slots, width, dim)))


def _dense_backward(images: PreparedImages, state: dict, config: ScoreConfig, grad_s: Tensor, nonzero: np.ndarray,
                    acc: _GradAccumulator, ws: Workspace) -> None:
    """Block by block as planned in forward (recomputing blocks whose intermediates were not kept),
    the word-token gradients of an image range's blocks gathered side by side; then the norms, a run
    of captions at a time as in forward. Blocks and runs without a gradient are skipped."""
    lens_s, words_s, keep_s, fuse_s, total_s, sq_s = (
        state[k] for k in ("lens_s", "words_s", "keep_s", "fuse_s", "total_s", "sq_s"))
    precise, mm_dtype, device = images.gram.dtype, config.mm_dtype, images.tokens.device
    n_tok, dim = images.tokens.shape[1], images.tokens.shape[2]
    d_sq_s = torch.zeros_like(sq_s)
    # oneDNN wants the word gradient's right-hand factor, the tokens transposed, contiguous
    use_t = onednn_for(device, mm_dtype)
    for (v0, v1), blocks in _image_ranges(state["plan"], state["caches"], nonzero):
        block_images = images.take(slice(v0, v1))
        tok = block_images.tokens.detach().to(mm_dtype)
        tokens_t = tok.flatten(0, 1).t().contiguous() if use_t else None
        for group in _column_groups(blocks, (v1 - v0) * n_tok * mm_dtype.itemsize, config.plan.gather_bytes):
            # the blocks' word-token gradients side by side: the tokens' and the words' gradients
            # are then one GEMM each
            cols = sum((t1 - t0) * width for t0, t1, width, _ in group)
            d_dots = torch.empty((v1 - v0) * n_tok, cols, dtype=mm_dtype, device=device)
            words_cat = torch.empty(cols, dim, dtype=mm_dtype, device=device)
            col = 0
            for t0, t1, width, cache in group:
                args = (
                    block_images, words_s[t0:t1, :width], keep_s[v0:v1, t0:t1],
                    fuse_s[v0:v1, t0:t1], lens_s[t0:t1], config.n_cls, mm_dtype,
                )
                if cache is None:
                    with torch.no_grad():
                        cache = pair_forward(*args, (total_s[v0:v1, t0:t1], sq_s[v0:v1, t0:t1]), ws=ws)[1]
                n_cols = (t1 - t0) * width
                out = d_dots[:, col : col + n_cols].view(v1 - v0, n_tok, t1 - t0, width)
                words_cat[col : col + n_cols] = words_s[t0:t1, :width].reshape(n_cols, dim)
                col += n_cols
                d_w, d_cls, d_sq = _pair_backward(grad_s[v0:v1, t0:t1], *args, cache, out, ws=ws)
                acc.weights[v0:v1] += d_w
                acc.cls_norm[v0:v1] += d_cls
                d_sq_s[v0:v1, t0:t1] = d_sq
            d_tok, d_words = _token_word_grads(d_dots, tok, words_cat, precise, tokens_t)
            acc.add_tokens(v0, v1, d_tok)
            col = 0
            for t0, t1, width, _ in group:
                n_cols = (t1 - t0) * width
                acc.words[t0:t1, :width] += d_words[col : col + n_cols].view(t1 - t0, width, dim)
                col += n_cols
    for s0, s1, proj in state["runs"]:  # (with the runs' products G w^T where forward kept them)
        if nonzero[:, s0:s1].any():
            acc.weights += norms_backward(images, keep_s[:, s0:s1], fuse_s[:, s0:s1], total_s[:, s0:s1],
                                          d_sq_s[:, s0:s1], mm_dtype, config.plan, acc.gram, ws, proj)


class _GradAccumulator:
    """Full-size gradient buffers (``gram``'s dtype) that blocks of pairs add into; the Gram
    matrices' and [CLS] norms' gradients are folded into the tokens' by :meth:`token_grad`."""

    def __init__(self, tokens: Tensor, gram: Tensor, weights: Tensor, cls_norm: Tensor, words: Tensor) -> None:
        # the tokens' rows are written by their first addition (zeroed at the end if there is none)
        self.tokens = torch.empty(tokens.shape, dtype=gram.dtype, device=tokens.device)
        self._unset = [True] * tokens.shape[0]
        self.gram = torch.zeros_like(gram)
        self.weights = torch.zeros_like(weights)
        self.cls_norm = torch.zeros_like(cls_norm)
        self.words = torch.zeros_like(words)

    def _zero_unset(self, v0: int, v1: int) -> None:
        for v in range(v0, v1):
            if self._unset[v]:
                self.tokens[v].zero_()
                self._unset[v] = False

    def add_tokens(self, v0: int, v1: int, d_tokens: Tensor) -> None:
        """Add ``d_tokens`` (v1 - v0, L_v, C) to the tokens ``v0:v1``."""
        if all(self._unset[v0:v1]):
            self.tokens[v0:v1] = d_tokens
            self._unset[v0:v1] = [False] * (v1 - v0)
        else:
            self._zero_unset(v0, v1)
            self.tokens[v0:v1] += d_tokens

    def add_rows(self, rows: Tensor, slots: Tensor, width: int, grads: tuple[Tensor, ...]) -> None:
        """Add the gradients of a group of images ``rows`` (V_g,) with their captions ``slots`` (V_g, S_g)."""
        d_tok, d_gram, d_w, d_cls, d_words = grads
        self._zero_unset(0, len(self._unset))  # rows come in any order: all written (zero) first
        self.tokens.index_add_(0, rows, d_tok)
        self.gram.index_add_(0, rows, d_gram)
        self.weights.index_add_(0, rows, d_w)
        self.cls_norm.index_add_(0, rows, d_cls)
        self.words[:, :width].index_add_(0, slots.reshape(-1), d_words.reshape(-1, width, d_words.shape[-1]))

    @torch.no_grad()
    def token_grad(self, tokens: Tensor, n_cls: int) -> Tensor:
        """The tokens' full gradient: what was added, plus that of ``G = P P^T``, ``(dG + dG^T) P``,
        and of the [CLS] norm."""
        self._zero_unset(0, len(self._unset))
        precise = self.gram.dtype
        patches = tokens[:, n_cls:].to(precise)
        self.tokens[:, n_cls:] += bmm_nt(self.gram + self.gram.transpose(1, 2), patches.transpose(1, 2))
        if n_cls:
            cls = tokens[:, :n_cls].to(precise)
            raw = cls.norm(dim=-1, keepdim=True)  # (V, R_c, 1); the norm is clamped at NORM_EPS
            self.tokens[:, :n_cls] += torch.where(raw >= NORM_EPS, self.cls_norm.unsqueeze(-1) / raw, 0.0) * cls
        return self.tokens


def _image_ranges(plan: list, caches: list, nonzero: np.ndarray) -> list[tuple[tuple[int, int], list]]:
    """The blocks of ``plan`` with a nonzero gradient, grouped by their image range:
    ``[((v0, v1), [(t0, t1, width, cache), ...]), ...]``."""
    ranges: dict[tuple[int, int], list] = {}
    for (v0, v1, t0, t1, width), cache in zip(plan, caches):
        if nonzero[v0:v1, t0:t1].any():
            ranges.setdefault((v0, v1), []).append((t0, t1, width, cache))
    return list(ranges.items())


def _column_groups(blocks: list, column_bytes: int, budget: int) -> list[list]:
    """``blocks`` (of one image range) in runs whose word-token gradients, ``column_bytes`` per
    column (a caption's word), take at most ``budget`` bytes side by side (at least one block a run)."""
    groups: list[list] = []
    size = 0
    for block in blocks:
        t0, t1, width, _ = block
        cost = (t1 - t0) * width * column_bytes
        if groups and size + cost <= budget:
            groups[-1].append(block)
            size += cost
        else:
            groups.append([block])
            size = cost
    return groups


def _sparse_groups(nonzero: np.ndarray, block_pairs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Images with a nonzero gradient for some caption, grouped with their captions (on the host).

    ``nonzero`` is (V, T) bool. Returns ``(rows, slots)`` pairs: image indices (V_g,) and, per
    image, ``S_g`` caption indices (V_g, S_g) listing its nonzero captions first (then captions
    with zero gradient as padding, which add nothing). Images are grouped by their count so that
    padding stays small, with at most ``block_pairs`` pairs per group.
    """
    counts = nonzero.sum(axis=1)
    by_count = np.argsort(-counts, kind="stable")
    sorted_counts = counts[by_count].tolist()
    # nonzero captions first in every row (stable, so in caption order)
    ranked = np.argsort(~nonzero, axis=1, kind="stable")
    groups, start = [], 0
    n_rows = len(sorted_counts)
    while start < n_rows and sorted_counts[start] > 0:
        n_slots = sorted_counts[start]
        limit = min(n_rows, start + max(1, block_pairs // n_slots))
        stop = start + 1
        # a new group once padding to n_slots would waste more than a quarter of a row
        while stop < limit and 4 * sorted_counts[stop] >= 3 * n_slots:
            stop += 1
        rows = by_count[start:stop]
        groups.append((rows, ranked[rows, :n_slots]))
        start = stop
    return groups
