"""The LAPS slimming head: patch selection, fusion, aggregation and patch-word alignment.

The math follows the official release (``LAPS.md``); the arrangement does not. Per image-caption
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
backward is hand-written (:class:`_PairScores`): a block's intermediates (and the norms' products
``G w^T``) are kept from forward to backward within ``max_saved_mb`` and recomputed beyond it, so
memory stays bounded; the word-token gradients of an image range's blocks are gathered side by
side, so that the tokens' and the words' gradients are one GEMM each, and at the end the gradients
of ``G`` and the [CLS] norm are added to the tokens'. When few pairs carry a gradient (the
hardest-negative loss gives about three per image), backward recomputes only those, image by
image, and the next forward keeps nothing. Selection, softmax
weights and normalisation run in fp32 (float64 for float64 inputs); under autocast the large
GEMMs run in the autocast dtype. On CPU the large float32 GEMMs go to oneDNN rather than MKL
(:mod:`laps.models.gemm`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from laps.models.gemm import bmm_nt, linear, mm_nt, onednn_for
from laps.models.pooling import pool_text

LEAKY_SLOPE = 0.1
NORM_EPS = 1e-12  # as F.normalize
# Aggregation logits more than this below the maximum of their column (over an image's patches)
# are floored there before exponentiation, so that exp() never underflows to zero. Results are
# unchanged unless all kept patches of a pair sit that far below a dropped one: then the official
# softmax is one-hot anyway, and this gives near-uniform weights instead of NaN.
LOGIT_FLOOR = 80.0


def keep_count(num_patches: int, sparse_ratio: float) -> int:
    """Number of kept patches, ``ceil(num_patches * sparse_ratio)``."""
    return math.ceil(num_patches * sparse_ratio)


def aggregated_count(num_patches: int, sparse_ratio: float, aggr_ratio: float) -> int:
    """Number of aggregated tokens, ``int(num_patches * aggr_ratio * sparse_ratio)`` (left to right)."""
    return int(num_patches * aggr_ratio * sparse_ratio)


def check_ratios(num_patches: int, sparse_ratio: float, aggr_ratio: float) -> None:
    """Raise ``ValueError`` naming the argument when the ratios are unusable."""
    for name, value in (("sparse_ratio", sparse_ratio), ("aggr_ratio", aggr_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    if num_patches < 1:
        raise ValueError(f"num_patches must be positive, got {num_patches}")
    if aggregated_count(num_patches, sparse_ratio, aggr_ratio) < 1:
        raise ValueError(
            f"sparse_ratio={sparse_ratio} and aggr_ratio={aggr_ratio} leave no aggregated token "
            f"for num_patches={num_patches} (int({num_patches} * {aggr_ratio} * {sparse_ratio}) = 0)"
        )


class TokenAggregation(nn.Module):
    """Per-token MLP giving ``M`` aggregation logits: LayerNorm -> Linear -> GELU -> Linear, times ``scale``."""

    def __init__(self, embed_dim: int, num_aggregated: int, hidden_ratio: float = 0.2) -> None:
        super().__init__()
        hidden = int(embed_dim * hidden_ratio)
        self.mlp = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, num_aggregated),
        )
        self.scale = nn.Parameter(torch.ones(1, 1, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        """``(..., N, C)`` -> logits ``(..., N, M)``."""
        norm, fc1, act, fc2 = self.mlp
        if not (_plain_linear(fc1) and _plain_linear(fc2)):  # replaced or hooked layers run as modules
            return self.mlp(tokens) * self.scale
        hidden = act(linear(norm(tokens), fc1.weight, fc1.bias))
        return linear(hidden, fc2.weight, fc2.bias) * self.scale


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (not a subclass or a wrapper) without hooks: :func:`linear` computes its forward."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


class PatchSelection(NamedTuple):
    """Hard selection for a block of pairs: ``keep`` (B_v, B_t, N) in {0, 1}; ``fuse`` weights (B_v, B_t, N)."""

    keep: Tensor
    fuse: Tensor


class LAPSHead(nn.Module):
    """Linguistic-aware patch slimming and patch-word alignment.

    Args:
        embed_dim: width ``C`` of image and caption tokens (the configuration's ``embed_size``).
        num_patches: number of spatial tokens ``N`` (196 for ViT-B/16 at 224 px, 49 for Swin).
        sparse_ratio: fraction of patches kept, ``K = ceil(N * sparse_ratio)``.
        aggr_ratio: aggregated tokens ``M = int(N * aggr_ratio * sparse_ratio)``.
        has_cls: whether token 0 of the image tokens is a [CLS] token.
        chunk_pairs: image-caption pairs scored at once (a block); bounds the working memory of
            forward and backward. ``None`` (the default) sizes blocks by memory instead: the largest
            temporary of a block stays near :data:`BLOCK_BYTES` of its device type
            (:data:`DEFAULT_BLOCK_BYTES` for types it does not list). On CPU blocks never exceed
            that size, also with a larger ``chunk_pairs``.
        max_saved_mb: in training, the intermediates kept from forward to backward, in MiB. Blocks
            beyond it are recomputed in backward instead, so memory stays bounded by this plus one
            block; 0 recomputes every block.
        selection: ``topk`` (the official hard selection, the default) or ``gumbel`` (the paper's
            learned, differentiable decision; see :mod:`laps.models.gumbel`).
        attention_weight: ``gumbel`` only: weight of the attention scores against the prediction.
        gumbel_tau: ``gumbel`` only: the Gumbel-softmax temperature.
    """

    SELECTIONS = ("topk", "gumbel")

    def __init__(
        self,
        embed_dim: int,
        num_patches: int,
        sparse_ratio: float = 0.5,
        aggr_ratio: float = 0.4,
        has_cls: bool = True,
        chunk_pairs: int | None = None,
        max_saved_mb: float = 1024.0,
        selection: str = "topk",
        attention_weight: float = 0.8,
        gumbel_tau: float = 1.0,
    ) -> None:
        super().__init__()
        check_ratios(num_patches, sparse_ratio, aggr_ratio)
        if selection not in self.SELECTIONS:
            raise ValueError(f"selection must be one of {self.SELECTIONS}, got {selection!r}")
        if not 0.0 <= attention_weight <= 1.0:
            raise ValueError(f"attention_weight must be in [0, 1], got {attention_weight}")
        if not gumbel_tau > 0:
            raise ValueError(f"gumbel_tau must be positive, got {gumbel_tau}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        if chunk_pairs is not None and chunk_pairs < 1:
            raise ValueError(f"chunk_pairs must be positive, got {chunk_pairs}")
        if not max_saved_mb >= 0:
            raise ValueError(f"max_saved_mb must be >= 0, got {max_saved_mb}")
        self.embed_dim = embed_dim
        self.num_patches = num_patches
        self.sparse_ratio = float(sparse_ratio)
        self.aggr_ratio = float(aggr_ratio)
        self.has_cls = bool(has_cls)
        self.chunk_pairs = chunk_pairs
        self.max_saved_mb = float(max_saved_mb)
        # Set by the last backward: whether few pairs carried a gradient (hardest negatives). Then
        # the next forward keeps no intermediates, since backward recomputes just those pairs.
        self._grad_feedback: dict[str, bool] = {"sparse": False}
        self.num_keep = keep_count(num_patches, sparse_ratio)
        self.num_aggregated = aggregated_count(num_patches, sparse_ratio, aggr_ratio)
        self.aggregation = TokenAggregation(embed_dim, self.num_aggregated)
        self.selection = selection
        self.attention_weight = float(attention_weight)
        self.gumbel_tau = float(gumbel_tau)
        if selection == "gumbel":
            from laps.models.gumbel import ScorePredictor

            self.predictor = ScorePredictor(embed_dim)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_patches={self.num_patches}, keep={self.num_keep}, "
            f"aggregated={self.num_aggregated}, has_cls={self.has_cls}"
        )

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor) -> Tensor:
        if img_embs.dim() != 3:
            raise ValueError(f"img_embs must be (B_v, L_v, C), got shape {tuple(img_embs.shape)}")
        if cap_embs.dim() != 3:
            raise ValueError(f"cap_embs must be (B_t, L_t, C), got shape {tuple(cap_embs.shape)}")
        expected_tokens = self.num_patches + int(self.has_cls)
        if img_embs.shape[1] != expected_tokens:
            raise ValueError(
                f"img_embs has {img_embs.shape[1]} tokens, expected num_patches={self.num_patches}"
                f"{' + 1 [CLS]' if self.has_cls else ''} = {expected_tokens}"
            )
        if img_embs.shape[2] != self.embed_dim or cap_embs.shape[2] != self.embed_dim:
            raise ValueError(
                f"embedding sizes disagree: img_embs has {img_embs.shape[2]}, cap_embs has "
                f"{cap_embs.shape[2]}, the head expects embed_dim={self.embed_dim}"
            )
        cap_lens = torch.as_tensor(cap_lens, device=cap_embs.device).long().reshape(-1)
        if cap_lens.numel() != cap_embs.shape[0]:
            raise ValueError(f"cap_lens has {cap_lens.numel()} entries for {cap_embs.shape[0]} captions")
        if cap_lens.numel() and (int(cap_lens.min()) < 1 or int(cap_lens.max()) > cap_embs.shape[1]):
            raise ValueError(
                f"cap_lens must lie in [1, {cap_embs.shape[1]}] (the caption tensor's length), "
                f"got min {int(cap_lens.min())}, max {int(cap_lens.max())}"
            )
        return cap_lens

    # ------------------------------------------------------------------ public API
    def forward(
        self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Score every image against every caption.

        Args:
            img_embs: ``(B_v, L_v, C)`` image tokens, [CLS] first when ``has_cls``.
            cap_embs: ``(B_t, L_t, C)`` word tokens, the first ``cap_lens[t]`` valid.
            cap_lens: ``(B_t,)`` caption lengths ([CLS] and [SEP] included).

        Returns:
            ``sims`` ``(B_v, B_t)`` in eval mode; ``(sims, score_mask)`` in train mode, with
            ``score_mask`` ``(B_t, B_v, num_patches)`` marking the kept patches.
        """
        sims, keep = self.similarity(img_embs, cap_embs, cap_lens, return_mask=self.training)
        if keep is None:
            return sims
        return sims, keep.transpose(0, 1)

    def similarity(
        self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor, return_mask: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``sims`` ``(B_v, B_t)`` (fp32) and, on request, the keep mask ``(B_v, B_t, N)``."""
        cap_lens = self._check_inputs(img_embs, cap_embs, cap_lens)
        caption = self.prepare_captions(cap_embs, cap_lens)
        if self.selection == "gumbel":
            return self._gumbel(img_embs, caption, return_mask)
        return self.score_prepared(self.prepare_images(img_embs), caption, return_mask=return_mask)

    def score_prepared(
        self, image: dict[str, Tensor], caption: dict[str, Tensor], return_mask: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Score outputs of :meth:`prepare_images` against :meth:`prepare_captions`, in blocks of pairs.

        Returns ``sims`` ``(B_v, B_t)`` (fp32) and, with ``return_mask``, the keep mask
        ``(B_v, B_t, N)``. Gradients flow to ``image["tokens"]`` (also through ``gram`` and
        ``cls_norm``, which must be the ones :meth:`prepare_images` computed from them) and
        ``image["weights"]``, and to the words. A ``gumbel`` head scores with its own selection
        (only ``image["tokens"]`` is used then).
        """
        if self.selection == "gumbel":
            return self._gumbel(image["tokens"], caption, return_mask)
        tokens = image["tokens"]
        words = caption["words_n"]
        n_img, n_cap = tokens.shape[0], words.shape[0]
        if n_img == 0 or n_cap == 0:
            real = image["gram"].dtype
            sims = tokens.new_zeros(n_img, n_cap, dtype=real)
            mask = tokens.new_zeros(n_img, n_cap, self.num_patches, dtype=real)
            return sims, (mask if return_mask else None)
        config = _ScoreConfig(
            n_cls=int(self.has_cls),
            num_keep=self.num_keep,
            mm_dtype=_matmul_dtype(tokens.device.type, image["gram"].dtype),
            block_pairs=block_pairs(
                self.chunk_pairs, tokens.device.type,
                _pair_bytes(tokens.shape[1], words.shape[1], self.num_aggregated, image["gram"].dtype),
            ),
            max_saved_bytes=0 if self._grad_feedback["sparse"] else int(self.max_saved_mb * 2**20),
            feedback=self._grad_feedback,
            return_mask=return_mask,
        )
        selection = (image["patch_norm"], image["salience"], caption["query"])
        per_image = (image["gram"], image["cls_norm"])
        if any(t.requires_grad for t in per_image):
            raise ValueError(
                "image['gram'] and image['cls_norm'] must carry no graph (as prepare_images returns them): "
                "the scoring's backward computes their gradients from image['tokens']"
            )
        if torch.is_grad_enabled() and any(t.requires_grad for t in (tokens, image["weights"], words)):
            sims, mask = _PairScores.apply(tokens, image["weights"], words, *per_image, caption["lens"], *selection,
                                           config)
        else:
            images = _Images.build(tokens, image["gram"], image["weights"], image["cls_norm"])
            sims, mask, _ = _score_blocks(images, words, caption["lens"], *selection, config, save=False)
        return sims, (mask if return_mask else None)

    def _gumbel(
        self, img_embs: Tensor, caption: dict[str, Tensor], return_mask: bool
    ) -> tuple[Tensor, Tensor | None]:
        from laps.models.gumbel import gumbel_similarity

        sims, keep = gumbel_similarity(self, img_embs, caption["words_n"], caption["lens"], caption["query"])
        return sims, (keep if return_mask else None)

    # ------------------------------------------------------------------ per-image / per-caption work
    def prepare_images(self, img_embs: Tensor) -> dict[str, Tensor]:
        """Caption-independent work, once per image.

        Returns ``tokens`` (B_v, L_v, C) as given; for the selection (no gradient) ``patch_norm``
        (B_v, N), the patches' norms (at least the normalisation's eps), and ``salience`` (B_v, N),
        the cosine of each patch with the patches' mean; ``gram`` (B_v, N, N) ``P P^T``;
        ``weights`` (B_v, N, M), the aggregation logits exponentiated after subtracting their
        per-image column maximum; ``cls_norm`` (B_v, R_c), the [CLS] norm (R_c = 1 with a [CLS]
        token, else 0). All but ``tokens`` are fp32 (float64 for float64 inputs). ``gram`` and
        ``cls_norm`` carry no graph: the scoring's backward adds their gradients to the tokens'.
        """
        n_cls = int(self.has_cls)
        patches = img_embs[:, n_cls:]
        device_type = img_embs.device.type
        with torch.autocast(device_type, enabled=False):
            real = _real_dtype(img_embs.dtype)
            p32 = patches.to(real)
            with torch.no_grad():
                # cosines as dots with the unnormalised patches over their norms: no normalised copy
                patch_norm = p32.norm(dim=-1).clamp_min(NORM_EPS)
                glob = F.normalize(p32.mean(dim=1), dim=-1)
                salience = torch.bmm(p32, glob.unsqueeze(-1)).squeeze(-1).div_(patch_norm)
                # without a graph: the scoring's backward adds their gradients to the tokens' (_PairScores)
                gram = bmm_nt(p32, p32)
                cls_norm = img_embs[:, :n_cls].to(real).norm(dim=-1).clamp_min(NORM_EPS)
        # On all tokens (a contiguous input; the [CLS] row is dropped after): the MLP acts token-wise.
        logits = self.aggregation(img_embs)[:, n_cls:]
        with torch.autocast(device_type, enabled=False):
            logits = logits.to(real)
            shifted = logits - logits.detach().amax(dim=1, keepdim=True)
            weights = torch.exp(shifted.clamp_min(-LOGIT_FLOOR))
        return {
            "tokens": img_embs,
            "patch_norm": patch_norm,
            "salience": salience,
            "gram": gram,
            "weights": weights,
            "cls_norm": cls_norm,
        }

    @staticmethod
    def prepare_captions(cap_embs: Tensor, cap_lens: Tensor) -> dict[str, Tensor]:
        """Image-independent work, once per caption: normalised words ``words_n`` (B_t, L_t, C) in fp32,
        ``lens`` (B_t,), and ``query`` (B_t, C), the normalised mean of the valid words (no gradient)."""
        with torch.autocast(cap_embs.device.type, enabled=False):
            real = _real_dtype(cap_embs.dtype)
            words_n = F.normalize(cap_embs.to(real), dim=-1)
            with torch.no_grad():
                query = pool_text(cap_embs, cap_lens)
        return {"words_n": words_n, "lens": cap_lens, "query": query}


# ---------------------------------------------------------------------- scoring blocks of pairs
# Bytes of the largest temporary of a block of pairs, by device type. On CPU about the last-level
# cache (ViT-B/16 shapes: about 500 pairs), so that GEMMs stay large while the temporaries, reused
# from block to block (_Workspace), stay warm: page-faulting fresh memory costs more than the
# element-wise arithmetic on it. Elsewhere larger blocks mean fewer kernel launches.
BLOCK_BYTES = {"cpu": 16 * 2**20}
DEFAULT_BLOCK_BYTES = 256 * 2**20
CPU_BLOCK_CAPTIONS = 8
# Captions whose patch selection is computed in one go, against all images of the call.
SELECT_CAPTIONS = 64
# Bytes of the rows of the norms' quadratic forms processed at once (images x their captions'
# rows): on CPU about the L2 cache, so that one image's rows (ViT-B/16, 32 or more captions) stay
# there from step to step; fewer captions (retrieval) put many images in a step, saving per-call
# overhead. Elsewhere DEFAULT_BLOCK_BYTES.
IMAGE_BYTES = {"cpu": 2**20}
# Bytes of the word-token gradients of several blocks that backward gathers side by side, so that
# the tokens' and the words' gradients are one wide GEMM each (rather than narrow ones per block).
GATHER_BYTES = {"cpu": 64 * 2**20}
DEFAULT_GATHER_BYTES = DEFAULT_BLOCK_BYTES


class _ScoreConfig(NamedTuple):
    n_cls: int
    num_keep: int
    mm_dtype: torch.dtype
    block_pairs: int
    max_saved_bytes: int
    feedback: dict[str, bool]
    return_mask: bool


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of everything but the large GEMMs: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matmul_dtype(device_type: str, real: torch.dtype) -> torch.dtype:
    """The dtype of the large GEMMs: the autocast dtype when autocast is on, else ``real``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return real


def _pair_bytes(n_tok: int, n_word: int, n_aggr: int, real: torch.dtype) -> int:
    """Bytes per pair of a block's largest temporaries: the word-token dots (or the rows of word
    scores, with fewer tokens than aggregated rows). The norms' temporaries are per image
    (:func:`_image_step`), not per pair."""
    return max(n_tok, n_aggr + 2) * n_word * real.itemsize


def block_pairs(chunk_pairs: int | None, device_type: str, pair_bytes: int) -> int:
    """Pairs per block: ``chunk_pairs`` when given (on CPU at most the memory budget), else the
    budget of :data:`BLOCK_BYTES` for pairs of ``pair_bytes``."""
    budget = max(1, BLOCK_BYTES.get(device_type, DEFAULT_BLOCK_BYTES) // max(pair_bytes, 1))
    if chunk_pairs is None:
        return budget
    return min(chunk_pairs, budget) if device_type == "cpu" else chunk_pairs


def _plan_blocks(n_img: int, n_cap: int, block_pairs: int, device_type: str) -> list[tuple[int, int, int, int]]:
    """``(v0, v1, t0, t1)`` blocks of at most ``block_pairs`` pairs, covering images x captions.

    On CPU captions (sorted by length) go 8 to a block: few enough that a block is padded only to
    the longest of similar lengths, enough for wide GEMMs. Elsewhere a block takes as many
    captions as the budget allows with all images (fewer, larger kernels), at least 8. Images fill
    the rest of the budget. Splits are balanced.
    """
    n_t = CPU_BLOCK_CAPTIONS if device_type == "cpu" else max(8, block_pairs // max(n_img, 1))
    n_t = max(1, min(n_cap, n_t, block_pairs))
    n_v = max(1, min(n_img, block_pairs // n_t))
    n_t = -(-n_cap // -(-n_cap // n_t))  # balance: same number of blocks, as even as possible
    n_v = -(-n_img // -(-n_img // n_v))
    return [
        (v0, min(v0 + n_v, n_img), t0, min(t0 + n_t, n_cap))
        for t0 in range(0, n_cap, n_t)
        for v0 in range(0, n_img, n_v)
    ]


def _length_mask(lens: Tensor, max_len: int) -> Tensor:
    """``(B, max_len)`` boolean mask of the first ``lens[b]`` positions."""
    return torch.arange(max_len, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)


@torch.no_grad()
def _select(tokens: Tensor, patch_norm: Tensor, salience: Tensor, query: Tensor, num_keep: int) -> PatchSelection:
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


class _Workspace:
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


def _new(ws: _Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scratch tensor from ``ws``, or a fresh one when there is no workspace (it is kept)."""
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ws.get(name, shape, dtype, device)


def _cache_bytes(n_img: int, n_tok: int, n_cap: int, n_word: int, n_aggr: int, mm_dtype: torch.dtype,
                 real: torch.dtype) -> int:
    """Bytes a block keeps for backward: the word-token dots dominate."""
    rows = n_aggr + 2
    per_pair = n_tok * n_word * mm_dtype.itemsize + 3 * rows * n_word * real.itemsize
    return n_img * n_cap * per_pair


def _proj_bytes(n_img: int, n_cap: int, n_aggr: int, n_patch: int, real: torch.dtype) -> int:
    """Bytes of the products ``G w^T`` that :func:`_norms` keeps for backward."""
    return n_img * n_cap * (n_aggr + 1) * n_patch * real.itemsize


class _Images(NamedTuple):
    """Per-image inputs of the pair scoring: tokens (V, L_v, C), gram (V, N, N), weights (V, N, M)
    and cls_norm (V, R_c), and ``weights_t`` (V, M, N), the weights transposed, contiguous."""

    tokens: Tensor
    gram: Tensor
    weights: Tensor
    cls_norm: Tensor
    weights_t: Tensor

    @classmethod
    def build(cls, tokens: Tensor, gram: Tensor, weights: Tensor, cls_norm: Tensor) -> _Images:
        with torch.no_grad():
            weights_t = weights.transpose(1, 2).contiguous()
        return cls(tokens, gram, weights, cls_norm, weights_t)

    def take(self, index: slice | Tensor) -> _Images:
        """The images at ``index`` (a slice, or a tensor of image indices)."""
        return _Images(*(t[index] for t in self))


def _score_blocks(
    images: _Images,
    words: Tensor,
    lens: Tensor,
    patch_norm: Tensor,
    salience: Tensor,
    query: Tensor,
    config: _ScoreConfig,
    save: bool,
) -> tuple[Tensor, Tensor | None, dict | None]:
    """All pairs, block by block: ``sims`` (V, T), keep mask (V, T, N) or None, and saved state.

    Captions are visited sorted by length so that each block is padded only to its own longest
    caption. The patch selection and the norms of the aggregated and fusion tokens (which do not
    depend on the words) are computed for all images and a run of captions at once. With ``save``
    the state for :meth:`_PairScores.backward` is returned: the plan, the sorted order, keep and
    fusion weights and norms of every pair and, within ``max_saved_bytes``, the products ``G w^T``
    of the runs' norms and each block's intermediates.
    """
    tokens = images.tokens
    n_img, n_cap = tokens.shape[0], words.shape[0]
    n_tok, n_patch, n_aggr = tokens.shape[1], images.weights.shape[1], images.weights.shape[2]
    order = torch.argsort(lens, stable=True)
    lens_s = lens.index_select(0, order)
    widths = lens_s.tolist()
    words_s = words.index_select(0, order)
    query_s = query.index_select(0, order)
    real = images.gram.dtype
    select_tokens = tokens.detach().to(real)
    sims = torch.empty(n_img, n_cap, dtype=real, device=tokens.device)
    need_sel = save or config.return_mask
    keep_all = tokens.new_empty(n_img, n_cap, n_patch, dtype=real) if need_sel else None
    fuse_all = tokens.new_empty(n_img, n_cap, n_patch, dtype=real) if save else None
    # softmax totals Z (V, T, M) and squared norms of the aggregated and fusion tokens (V, T, M + 1):
    # of every pair for backward, else of a run of captions at a time
    total_all = tokens.new_empty(n_img, n_cap, n_aggr, dtype=real) if save else None
    sq_all = tokens.new_empty(n_img, n_cap, n_aggr + 1, dtype=real) if save else None
    plan, caches, runs, saved = [], [], [], 0
    ws = _Workspace()
    blocks = _plan_blocks(n_img, n_cap, config.block_pairs, tokens.device.type)
    # Selection for all images and a run of captions at once (a wide GEMM instead of thin ones), and
    # so are the norms (larger products per image).
    span = blocks[0][3] - blocks[0][2]
    span *= max(1, SELECT_CAPTIONS // span)
    run, sel = (0, 0), None
    for v0, v1, t0, t1 in blocks:
        if not run[0] <= t0 < t1 <= run[1]:
            run = (t0, min(n_cap, t0 + span))
            s0, s1 = run
            sel = _select(select_tokens, patch_norm, salience, query_s[s0:s1], config.num_keep)
            if keep_all is not None:
                keep_all[:, s0:s1] = sel.keep
            if fuse_all is not None:
                fuse_all[:, s0:s1] = sel.fuse
            total = torch.bmm(sel.keep, images.weights)
            size = _proj_bytes(n_img, s1 - s0, n_aggr, n_patch, real)
            proj = None
            if save and saved + size <= config.max_saved_bytes:
                saved += size
                proj = []
            sq = _norms(images, sel.keep, sel.fuse, total, config.mm_dtype, ws, proj)
            if save:
                total_all[:, s0:s1], sq_all[:, s0:s1] = total, sq
                runs.append((s0, s1, proj))
        a, b = t0 - run[0], t1 - run[0]
        width = max(widths[t0:t1])
        size = _cache_bytes(v1 - v0, n_tok, t1 - t0, width, n_aggr, config.mm_dtype, real)
        keep_cache = save and saved + size <= config.max_saved_bytes
        saved += size if keep_cache else 0
        out, cache = _pair_forward(
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
        state = {"plan": plan, "caches": caches, "runs": runs, "order": order, "lens_s": lens_s, "words_s": words_s,
                 "keep_s": keep_all, "fuse_s": fuse_all, "total_s": total_all, "sq_s": sq_all}
    return sims, mask, state


def _pair_forward(
    images: _Images,
    words: Tensor,
    keep: Tensor,
    fuse: Tensor,
    lens: Tensor,
    n_cls: int,
    mm_dtype: torch.dtype,
    norms: tuple[Tensor, Tensor],
    ws: _Workspace | None = None,
    for_backward: bool = True,
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Similarities ``(V, T)`` of a block and, with ``for_backward``, the intermediates its backward needs.

    Shapes: ``images`` of V images (:class:`_Images`); keep, fuse (V, T, N); ``norms`` the softmax
    totals (V, T, M) and the squared norms of the aggregated and fusion tokens (V, T, M + 1) (see
    :func:`_norms`). Captions are either shared by all images of the block, words (T, L, C)
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
        real, device = images.gram.dtype, tokens.device
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
        f_num = _fusion_dots(fuse.to(mm_dtype), dots_kept).to(real)  # (V, T, L)
        f_len = f_sq.clamp_min(0.0).sqrt()  # (V, T)
        f_norm = f_len.clamp_min(NORM_EPS)
        s_fuse = f_num.div_(f_norm.unsqueeze(-1))
        dots_kept.mul_(keep.transpose(1, 2).unsqueeze(-1).to(mm_dtype))  # (V, N, T, L), zero at dropped patches
        # softmax over the kept patches, w = E * keep / Z: <word_j, sum_k E_km keep_k P_k>, a GEMM per image.
        numer = torch.bmm(images.weights_t.to(mm_dtype), dots_kept.reshape(n_img, n_patch, n_cap * n_word))
        numer = numer.to(real).view(n_img, n_aggr, n_cap, n_word)
        norm = sq.clamp_min(0.0).sqrt().clamp_min(NORM_EPS)
        denom = total * norm
        s_agg = numer.div_(denom.transpose(1, 2).unsqueeze(-1))  # (V, M, T, L)
        rows = [s_agg, s_fuse.unsqueeze(1)]
        s_cls = None
        if n_cls:
            s_cls = dots[:, 0].to(real) / cls_norm.view(n_img, 1, 1)  # (V, T, L)
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


def _norms(
    images: _Images, keep: Tensor, fuse: Tensor, total: Tensor, mm_dtype: torch.dtype, ws: _Workspace | None,
    proj: list[Tensor] | None = None,
) -> Tensor:
    """Squared norms of the aggregated tokens and the fusion token, ``(V, T, M + 1)`` (the fusion
    token's last), for keep and fusion weights (V, T, N) and softmax totals ``Z = keep E`` (V, T, M).

    ``||A||^2 = w G w^T`` with the aggregated tokens' weights ``w = E * keep / Z`` (normalised
    before the product: ``E`` may be as small as ``exp(-LOGIT_FLOOR)``, its square underflows), and
    likewise for the fusion weights: per image, ``G`` times the rows of all T captions
    (:func:`_rows`), one product as large as the captions allow. With a list ``proj`` the products
    ``G w^T`` are appended to it for backward, (V_c, N, (M + 1) * T) for each chunk of V_c images.
    Images go one at a time on CPU when they have many captions (the rows stay in cache from one
    step to the next), more at a time otherwise and elsewhere (:func:`_image_step`).
    """
    n_img, n_cap, n_patch = keep.shape
    n_aggr = images.weights.shape[2]
    real, device = images.gram.dtype, keep.device
    n_rows = n_cap * (n_aggr + 1)
    sq = keep.new_empty(n_img, n_cap, n_aggr + 1)
    step = _image_step(n_rows * n_patch * real.itemsize, device)
    for v0 in range(0, n_img, step):
        v1 = min(v0 + step, n_img)
        part = _products(images, keep, fuse, total, v0, v1, mm_dtype, ws)
        if proj is not None:
            proj.append(part)
        # w G w^T = sum_n (G w^T) w^T, with w^T built patch-major (cheaper than reading G w^T transposed)
        rows_t = _rows_t(images.weights[v0:v1], keep[v0:v1], fuse[v0:v1], total[v0:v1],
                         _new(ws, "rows_t", (v1 - v0, n_patch, n_aggr + 1, n_cap), real, device))
        prod = torch.mul(part, rows_t.view(part.shape), out=_new(ws, "proj_rows", part.shape, real, device))
        sq[v0:v1] = prod.sum(1).view(v1 - v0, n_aggr + 1, n_cap).transpose(1, 2)
    return sq


def _norms_backward(
    images: _Images, keep: Tensor, fuse: Tensor, total: Tensor, d_sq: Tensor, mm_dtype: torch.dtype,
    d_gram: Tensor, ws: _Workspace | None, proj: list[Tensor] | None = None,
) -> Tensor:
    """Backward of :func:`_norms` for V images and T captions: given ``d loss / d sq`` (V, T, M + 1),
    adds the Gram matrices' gradient to ``d_gram`` (V, N, N) and returns the weights' (V, N, M)
    (through the squared norms only; ``Z`` is held fixed). ``proj`` are :func:`_norms`' products,
    recomputed when not given. Images go as in :func:`_norms`; everything is patch-major here, so
    that the Gram gradient is one product ``a @ b^T`` of contiguous rows per image.
    """
    n_img, n_cap, n_patch = keep.shape
    n_aggr = images.weights.shape[2]
    real, device = images.gram.dtype, keep.device
    n_rows = n_cap * (n_aggr + 1)
    d_w = torch.empty_like(images.weights)
    d_sq_t = d_sq.transpose(1, 2).contiguous()  # (V, M + 1, T): broadcast along T below
    step = _image_step(n_rows * n_patch * real.itemsize, device)
    for chunk, v0 in enumerate(range(0, n_img, step)):
        v1 = min(v0 + step, n_img)
        n = v1 - v0
        part = _products(images, keep, fuse, total, v0, v1, mm_dtype, ws) if proj is None else proj[chunk]
        rows_t = _rows_t(images.weights[v0:v1], keep[v0:v1], fuse[v0:v1], total[v0:v1],
                         _new(ws, "rows_t", (n, n_patch, n_aggr + 1, n_cap), real, device))
        scaled = torch.mul(rows_t, d_sq_t[v0:v1].unsqueeze(1),
                           out=_new(ws, "scaled", rows_t.shape, real, device))
        # d sq / d w = 2 G w^T; through w = E keep / Z: d E = 2 d_sq (G w^T) keep / Z = 2 (G w^T) scaled / E.
        prod = torch.mul(part.view(rows_t.shape)[:, :, :n_aggr], scaled[:, :, :n_aggr],
                         out=_new(ws, "proj_scaled", (n, n_patch, n_aggr, n_cap), real, device))
        torch.sum(prod, dim=-1, out=d_w[v0:v1])
        # d sq / d G = w^T w: the scaled rows' outer products
        d_gram[v0:v1] += bmm_nt(scaled.view(n, n_patch, n_rows).to(mm_dtype),
                                rows_t.view(n, n_patch, n_rows).to(mm_dtype)).to(real)
    return d_w.mul_(2.0).div_(images.weights)


def _products(
    images: _Images, keep: Tensor, fuse: Tensor, total: Tensor, v0: int, v1: int, mm_dtype: torch.dtype,
    ws: _Workspace | None,
) -> Tensor:
    """``G w^T`` (v1 - v0, N, (M + 1) * T) of the images ``v0:v1``, with their rows ``w`` from :func:`_rows`
    (patch-major, as :func:`_norms_backward` wants it; ``G`` is symmetric: ``G w^T = (w G)^T``)."""
    n_cap, n_patch = keep.shape[1], keep.shape[2]
    real = images.gram.dtype
    rows = _rows(images.weights_t[v0:v1], keep[v0:v1], fuse[v0:v1], total[v0:v1],
                 _new(ws, "rows", (v1 - v0, total.shape[2] + 1, n_cap, n_patch), real, keep.device))
    return bmm_nt(images.gram[v0:v1].to(mm_dtype), rows.flatten(1, 2).to(mm_dtype)).to(real)


def _image_step(image_bytes: int, device: torch.device) -> int:
    """Images whose rows (``image_bytes`` each) are processed at once by :func:`_norms` and
    :func:`_norms_backward`: as many as :data:`IMAGE_BYTES` holds (at least one)."""
    return max(1, IMAGE_BYTES.get(device.type, DEFAULT_BLOCK_BYTES) // max(image_bytes, 1))


def _fusion_dots(fuse: Tensor, dots: Tensor, group: int = 16) -> Tensor:
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


def _rows(w_t: Tensor, keep: Tensor, fuse: Tensor, total: Tensor, out: Tensor) -> Tensor:
    """The rows of the norms' quadratic forms for V images and T captions: ``out`` (V, M + 1, T, N)
    gets the aggregation weights ``E * keep / Z`` in ``[:, :M]`` and the fusion weights in
    ``[:, M]``, from ``E^T`` ``w_t`` (V, M, N), keep and fuse (V, T, N) and ``Z`` (V, T, M)."""
    n_aggr = w_t.shape[1]
    agg = out[:, :n_aggr]
    torch.mul(w_t.unsqueeze(2), keep.unsqueeze(1), out=agg)
    agg.div_(total.transpose(1, 2).unsqueeze(-1))
    out[:, n_aggr] = fuse
    return out


def _rows_t(weights: Tensor, keep: Tensor, fuse: Tensor, total: Tensor, out: Tensor) -> Tensor:
    """:func:`_rows` patch-major: ``out`` (V, N, M + 1, T), from ``E`` ``weights`` (V, N, M), keep
    and fuse (V, T, N) and ``Z`` (V, T, M)."""
    n_aggr = weights.shape[2]
    agg = out[:, :, :n_aggr]
    # the small factors transposed contiguous, so that the broadcasts run along T
    torch.mul(weights.unsqueeze(-1), keep.transpose(1, 2).contiguous().unsqueeze(2), out=agg)
    agg.div_(total.transpose(1, 2).contiguous().unsqueeze(1))
    out[:, :, n_aggr] = fuse.transpose(1, 2)
    return out


def _pair_backward(
    grad: Tensor,
    images: _Images,
    words: Tensor,
    keep: Tensor,
    fuse: Tensor,
    lens: Tensor,
    n_cls: int,
    mm_dtype: torch.dtype,
    c: dict[str, Tensor],
    d_dots: Tensor,
    ws: _Workspace | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of a block, given ``d loss / d sims`` and its intermediates ``c`` from :func:`_pair_forward`.

    Writes the gradient of the word-token dots into ``d_dots`` (V, L_v, T, L) (``mm_dtype``; a view
    of a larger buffer is fine). Returns the gradients wrt weights (V, N, M) (through the dots and
    the softmax totals), cls_norm (V, R_c) and the squared norms (V, T, M + 1), which
    :func:`_norms_backward` takes on; the tokens' and words' follow from ``d_dots``
    (:func:`_token_word_grads`), for several blocks at once.
    """
    tokens, weights, cls_norm = images.tokens, images.weights, images.cls_norm
    with torch.autocast(tokens.device.type, enabled=False):
        n_img = tokens.shape[0]
        n_cap, n_word = words.shape[-3], words.shape[-2]
        n_patch, n_aggr = weights.shape[1], weights.shape[2]
        real, device = images.gram.dtype, tokens.device
        sim = c["sim"]
        n_rows = sim.shape[1]
        g = grad.to(real)
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
        d_weights += torch.bmm(dots_kept, d_numer_mm.transpose(1, 2)).to(real)

        # word-token dots: d dots = keep * (E @ d numer), plus the [CLS] row.
        d_kept = _new(ws, "d_kept", (n_img, n_patch, n_cap * n_word), mm_dtype, device)
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
    d_dots: Tensor, tokens: Tensor, words: Tensor, real: torch.dtype, tokens_t: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gradients wrt the tokens (V, L_v, C) and the words from the gradient of their dots ``d_dots``.

    Captions shared by all images: ``d_dots`` (V * L_v, K) for ``words`` (K, C) (the flattened
    words of one block or of several side by side), giving d_words (K, C); ``tokens_t`` (C, V * L_v),
    the tokens transposed and contiguous, lets that product run in :func:`mm_nt`. Captions per
    image: ``d_dots`` (V, L_v, K) for ``words`` (V, K, C). All factors in ``d_dots``' dtype.
    """
    n_img, n_tok, dim = tokens.shape
    if words.dim() == 2:
        d_tokens = mm_nt(d_dots, words.t()).to(real).view(n_img, n_tok, dim)
        if tokens_t is not None:
            d_words = mm_nt(d_dots.t(), tokens_t)
        else:
            d_words = torch.mm(d_dots.t(), tokens.reshape(n_img * n_tok, dim))
    else:
        d_tokens = bmm_nt(d_dots, words.transpose(1, 2)).to(real)
        d_words = torch.bmm(d_dots.transpose(1, 2), tokens)
    return d_tokens, d_words.to(real)


class _PairScores(torch.autograd.Function):
    """All-pairs similarities with a hand-written, block-by-block backward.

    Inputs with gradients: tokens (V, L_v, C), weights (V, N, M), words (T, L, C). ``gram``
    (V, N, N) and ``cls_norm`` (V, R_c) must be :meth:`LAPSHead.prepare_images`'s, computed from
    ``tokens`` without a graph: backward adds their gradients to the tokens' itself (without the
    full-size gradient tensors that autograd's slicing of the tokens would add up). Outputs: sims
    (V, T) and the keep mask (V, T, N) (or None).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        tokens: Tensor,
        weights: Tensor,
        words: Tensor,
        gram: Tensor,
        cls_norm: Tensor,
        lens: Tensor,
        patch_norm: Tensor,
        salience: Tensor,
        query: Tensor,
        config: _ScoreConfig,
    ) -> tuple[Tensor, Tensor | None]:
        images = _Images.build(tokens, gram, weights, cls_norm)
        sims, mask, state = _score_blocks(images, words, lens, patch_norm, salience, query, config, save=True)
        ctx.save_for_backward(tokens, weights, words, gram, cls_norm)
        ctx.weights_t = images.weights_t  # derived by _Images.build (no gradient), built once a step
        ctx.state, ctx.config = state, config
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        return sims, mask

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_mask: Tensor | None):  # type: ignore[override]
        tokens, weights, words, gram, cls_norm = ctx.saved_tensors
        state, config = ctx.state, ctx.config
        order, lens_s, words_s = state["order"], state["lens_s"], state["words_s"]
        keep_s, fuse_s, total_s, sq_s = state["keep_s"], state["fuse_s"], state["total_s"], state["sq_s"]
        real, mm_dtype, device = gram.dtype, config.mm_dtype, tokens.device
        n_tok, dim = tokens.shape[1], tokens.shape[2]
        n_patch = gram.shape[1]
        grad_s = grad.to(real).index_select(1, order)
        images = _Images(tokens, gram, weights, cls_norm, ctx.weights_t)
        acc = _GradAccumulator(tokens, gram, weights, cls_norm, words_s)
        ws = _Workspace()
        nonzero = grad_s != 0
        dense_cost = sum(
            (v1 - v0) * (t1 - t0) * (1 if cache is not None else 2)
            for (v0, v1, t0, t1, _), cache in zip(state["plan"], state["caches"])
        )
        groups = _sparse_groups(nonzero, config.block_pairs)
        sparse_cost = 2 * sum(rows.numel() * slots.shape[1] for rows, slots in groups)
        config.feedback["sparse"] = sparse_cost < nonzero.numel()
        if sparse_cost < dense_cost:
            # Few pairs carry a gradient (e.g. hardest negatives): recompute just those, per image.
            for rows, slots in groups:
                width = int(lens_s[slots].max())
                n_rows, n_slots = slots.shape
                pairs = (rows.unsqueeze(1), slots)
                group = images.take(rows)
                words_g, keep_g, fuse_g, total_g = words_s[slots, :width], keep_s[pairs], fuse_s[pairs], total_s[pairs]
                args = (group, words_g, keep_g, fuse_g, lens_s[slots], config.n_cls, mm_dtype)
                with torch.no_grad():
                    cache = _pair_forward(*args, (total_g, sq_s[pairs]), ws=ws)[1]
                d_dots = _new(ws, "d_dots", (n_rows, n_tok, n_slots, width), mm_dtype, device)
                d_w, d_cls, d_sq = _pair_backward(grad_s[pairs], *args, cache, d_dots, ws=ws)
                d_gram = gram.new_zeros(n_rows, n_patch, n_patch)
                d_w += _norms_backward(group, keep_g, fuse_g, total_g, d_sq, mm_dtype, d_gram, ws)
                d_tok, d_words = _token_word_grads(
                    d_dots.view(n_rows, n_tok, n_slots * width), group.tokens.detach().to(mm_dtype),
                    words_g.to(mm_dtype).reshape(n_rows, n_slots * width, dim), real,
                )
                acc.add_rows(rows, slots, width, (d_tok, d_gram, d_w, d_cls, d_words.view(n_rows, n_slots, width, dim)))
        else:
            d_sq_s = torch.zeros_like(sq_s)
            # oneDNN wants the word gradient's right-hand factor, the tokens transposed, contiguous
            use_t = onednn_for(device, mm_dtype)
            budget = GATHER_BYTES.get(device.type, DEFAULT_GATHER_BYTES)
            for (v0, v1), blocks in _image_ranges(state["plan"], state["caches"], nonzero):
                block_images = images.take(slice(v0, v1))
                tok = block_images.tokens.detach().to(mm_dtype)
                tokens_t = tok.flatten(0, 1).t().contiguous() if use_t else None
                for group in _column_groups(blocks, (v1 - v0) * n_tok * mm_dtype.itemsize, budget):
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
                                cache = _pair_forward(*args, (total_s[v0:v1, t0:t1], sq_s[v0:v1, t0:t1]), ws=ws)[1]
                        n_cols = (t1 - t0) * width
                        out = d_dots[:, col : col + n_cols].view(v1 - v0, n_tok, t1 - t0, width)
                        words_cat[col : col + n_cols] = words_s[t0:t1, :width].reshape(n_cols, dim)
                        col += n_cols
                        d_w, d_cls, d_sq = _pair_backward(grad_s[v0:v1, t0:t1], *args, cache, out, ws=ws)
                        acc.weights[v0:v1] += d_w
                        acc.cls_norm[v0:v1] += d_cls
                        d_sq_s[v0:v1, t0:t1] = d_sq
                    d_tok, d_words = _token_word_grads(d_dots, tok, words_cat, real, tokens_t)
                    acc.add_tokens(v0, v1, d_tok)
                    col = 0
                    for t0, t1, width, _ in group:
                        n_cols = (t1 - t0) * width
                        acc.words[t0:t1, :width] += d_words[col : col + n_cols].view(t1 - t0, width, dim)
                        col += n_cols
            # the norms, a run of captions at a time as in forward (with its products G w^T when kept)
            for s0, s1, proj in state["runs"]:
                if bool(nonzero[:, s0:s1].any()):
                    acc.weights += _norms_backward(images, keep_s[:, s0:s1], fuse_s[:, s0:s1], total_s[:, s0:s1],
                                                   d_sq_s[:, s0:s1], mm_dtype, acc.gram, ws, proj)
        # (the Gram matrices' part is a product per image: skipped when the tokens need no gradient)
        d_tokens = acc.token_grad(tokens, config.n_cls).to(tokens.dtype) if ctx.needs_input_grad[0] else None
        d_words = torch.empty_like(acc.words).index_copy_(0, order, acc.words)
        return d_tokens, acc.weights, d_words.to(words.dtype), None, None, None, None, None, None, None


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
        real = self.gram.dtype
        patches = tokens[:, n_cls:].to(real)
        self.tokens[:, n_cls:] += bmm_nt(self.gram + self.gram.transpose(1, 2), patches.transpose(1, 2))
        if n_cls:
            cls = tokens[:, :n_cls].to(real)
            raw = cls.norm(dim=-1, keepdim=True)  # (V, R_c, 1); the norm is clamped at NORM_EPS
            self.tokens[:, :n_cls] += torch.where(raw >= NORM_EPS, self.cls_norm.unsqueeze(-1) / raw, 0.0) * cls
        return self.tokens


def _image_ranges(plan: list, caches: list, nonzero: Tensor) -> list[tuple[tuple[int, int], list]]:
    """The blocks of ``plan`` with a nonzero gradient, grouped by their image range:
    ``[((v0, v1), [(t0, t1, width, cache), ...]), ...]``."""
    ranges: dict[tuple[int, int], list] = {}
    for (v0, v1, t0, t1, width), cache in zip(plan, caches):
        if bool(nonzero[v0:v1, t0:t1].any()):
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


def _sparse_groups(nonzero: Tensor, block_pairs: int) -> list[tuple[Tensor, Tensor]]:
    """Images with a nonzero gradient for some caption, grouped with their captions.

    ``nonzero`` is (V, T) bool. Returns ``(rows, slots)`` pairs: image indices (V_g,) and, per
    image, ``S_g`` caption indices (V_g, S_g) listing its nonzero captions first (then captions
    with zero gradient as padding, which add nothing). Images are grouped by their count so that
    padding stays small, with at most ``block_pairs`` pairs per group.
    """
    counts = nonzero.sum(dim=1)
    by_count = torch.argsort(counts, descending=True, stable=True)
    sorted_counts = counts.index_select(0, by_count).tolist()
    # nonzero captions first in every row (stable, so in caption order)
    ranked = torch.argsort((~nonzero).to(torch.uint8), dim=1, stable=True)
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
        groups.append((rows, ranked.index_select(0, rows)[:, :n_slots]))
        start = stop
    return groups
