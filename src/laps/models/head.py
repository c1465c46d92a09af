"""The LAPS slimming head: patch selection, fusion, aggregation and patch-word alignment.

The math follows the official release (see ``docs/algorithm.md``); the arrangement does not.
Everything that depends on the image alone (normalised patches, salience scores and the
aggregation MLP applied to every patch) is computed once per image, and every
image-caption pair is then handled with large batched matrix products over chunks of
captions. Inside a chunk, selection is expressed as masks over all patches instead of
gathers, so the aggregation and fusion become ``(pairs x N) @ (N x C)`` products.
When gradients are needed each chunk is checkpointed, so memory is bounded by the
chunk size rather than by ``B_v * B_t``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LEAKY_SLOPE = 0.1


def keep_count(num_patches: int, sparse_ratio: float) -> int:
    """Number of kept patches, ``ceil(num_patches * sparse_ratio)``."""
    return math.ceil(num_patches * sparse_ratio)


def aggregated_count(num_patches: int, sparse_ratio: float, aggr_ratio: float) -> int:
    """Number of aggregated tokens, ``int(num_patches * aggr_ratio * sparse_ratio)`` (left to right)."""
    return int(num_patches * aggr_ratio * sparse_ratio)


def check_ratios(num_patches: int, sparse_ratio: float, aggr_ratio: float) -> None:
    """Raise ``ValueError`` naming the argument when the ratios are unusable."""
    for name, value in (("sparse_ratio", sparse_ratio), ("aggr_ratio", aggr_ratio)):
        if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
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
        return self.mlp(tokens) * self.scale


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
        chunk_pairs: image-caption pairs scored at once; bounds memory of forward and backward.
    """

    def __init__(
        self,
        embed_dim: int,
        num_patches: int,
        sparse_ratio: float = 0.5,
        aggr_ratio: float = 0.4,
        has_cls: bool = True,
        chunk_pairs: int = 2048,
    ) -> None:
        super().__init__()
        check_ratios(num_patches, sparse_ratio, aggr_ratio)
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        if chunk_pairs < 1:
            raise ValueError(f"chunk_pairs must be positive, got {chunk_pairs}")
        self.embed_dim = embed_dim
        self.num_patches = num_patches
        self.sparse_ratio = float(sparse_ratio)
        self.aggr_ratio = float(aggr_ratio)
        self.has_cls = bool(has_cls)
        self.chunk_pairs = chunk_pairs
        self.num_keep = keep_count(num_patches, sparse_ratio)
        self.num_aggregated = aggregated_count(num_patches, sparse_ratio, aggr_ratio)
        self.aggregation = TokenAggregation(embed_dim, self.num_aggregated)

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
        """``sims`` ``(B_v, B_t)`` and, on request, the keep mask ``(B_v, B_t, N)``."""
        cap_lens = self._check_inputs(img_embs, cap_embs, cap_lens)
        image = self.prepare_images(img_embs)
        caption = self.prepare_captions(cap_embs, cap_lens)
        return self.score_prepared(image, caption, return_mask=return_mask)

    def score_prepared(
        self, image: dict[str, Tensor], caption: dict[str, Tensor], return_mask: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Score outputs of :meth:`prepare_images` against :meth:`prepare_captions`, in chunks."""
        n_img, n_cap = image["patches"].shape[0], caption["words_n"].shape[0]
        step = max(1, self.chunk_pairs // max(n_img, 1))
        inputs = list(image.values())
        sims, masks = [], []
        for start in range(0, n_cap, step):
            args = inputs + [v[start : start + step] for v in caption.values()]
            if torch.is_grad_enabled() and any(a.requires_grad for a in args):
                out, keep = checkpoint(self._score_block, *args, use_reentrant=False)
            else:
                out, keep = self._score_block(*args)
            sims.append(out)
            if return_mask:
                masks.append(keep)
        ref = image["patches"]
        sims_t = torch.cat(sims, dim=1) if sims else ref.new_zeros(n_img, 0, dtype=torch.float32)
        mask_t = None
        if return_mask:
            mask_t = torch.cat(masks, dim=1) if masks else ref.new_zeros(n_img, 0, self.num_patches)
        return sims_t, mask_t

    # ------------------------------------------------------------------ per-image / per-caption work
    def prepare_images(self, img_embs: Tensor) -> dict[str, Tensor]:
        """Caption-independent work, once per image.

        Returns ``patches`` (B_v, N, C) unnormalised, ``patches_n`` normalised, ``salience``
        (B_v, N), ``logits`` (B_v, N, M) of the aggregation MLP, and ``cls`` (B_v, R_c, C)
        with R_c = 1 when there is a [CLS] token, else 0.
        """
        cls = img_embs[:, :1] if self.has_cls else img_embs[:, :0]
        patches = img_embs[:, 1:] if self.has_cls else img_embs
        patches_n = F.normalize(patches.float(), dim=-1)
        with torch.no_grad():
            glob = F.normalize(patches.float().mean(dim=1), dim=-1)
            salience = torch.einsum("vnc,vc->vn", patches_n, glob)
        logits = self.aggregation(patches)
        return {"patches": patches, "patches_n": patches_n, "salience": salience, "logits": logits, "cls": cls}

    @staticmethod
    def prepare_captions(cap_embs: Tensor, cap_lens: Tensor) -> dict[str, Tensor]:
        """Image-independent work, once per caption: normalised words (B_t, L_t, C), lengths."""
        words_n = F.normalize(cap_embs.float(), dim=-1)
        valid = _length_mask(cap_lens, cap_embs.shape[1])
        with torch.no_grad():
            mean = (cap_embs.float() * valid.unsqueeze(-1)).sum(1) / cap_lens.unsqueeze(-1)
            query = F.normalize(mean, dim=-1)
        return {"words_n": words_n, "lens": cap_lens, "query": query}

    # ------------------------------------------------------------------ a block of pairs
    @torch.no_grad()
    def _select(self, patches_n: Tensor, salience: Tensor, query: Tensor) -> PatchSelection:
        """Top-K selection and fusion weights for every (image, caption) pair of the block.

        Always in fp32, also under autocast, so that bf16 rounding cannot change which
        patches are kept.
        """
        with torch.autocast(patches_n.device.type, enabled=False):
            return self._select_fp32(patches_n.float(), salience.float(), query.float())

    def _select_fp32(self, patches_n: Tensor, salience: Tensor, query: Tensor) -> PatchSelection:
        relevance = torch.einsum("vnc,tc->vtn", patches_n, query)
        score = relevance + salience.unsqueeze(1)
        kept = score.topk(self.num_keep, dim=-1).indices
        keep = torch.zeros_like(score).scatter_(-1, kept, 1.0)
        if self.num_keep == self.num_patches:
            fuse = torch.zeros_like(score)
        else:
            fuse = torch.softmax(score.masked_fill(keep.bool(), float("-inf")), dim=-1)
        return PatchSelection(keep, fuse)

    def _score_block(
        self,
        patches: Tensor,
        patches_n: Tensor,
        salience: Tensor,
        logits: Tensor,
        cls: Tensor,
        words_n: Tensor,
        lens: Tensor,
        query: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Similarities ``(B_v, b_t)`` and keep mask ``(B_v, b_t, N)`` for a chunk of ``b_t`` captions."""
        n_img, n_patch, dim = patches.shape
        n_cap = words_n.shape[0]
        sel = self._select(patches_n, salience, query)
        keep = sel.keep.bool()

        # Aggregation: softmax over the kept patches of each logit column, as (M x N) weights.
        lg = logits.float().transpose(1, 2).unsqueeze(1)  # (B_v, 1, M, N)
        lg = lg.masked_fill(~keep.unsqueeze(2), float("-inf"))
        weights = torch.softmax(lg, dim=-1)  # (B_v, b_t, M, N)
        fuse = sel.fuse.unsqueeze(2)  # (B_v, b_t, 1, N)
        mix = torch.cat([weights, fuse], dim=2).to(patches.dtype)  # (B_v, b_t, M+1, N)
        rows = torch.bmm(mix.reshape(n_img, -1, n_patch), patches).reshape(n_img, n_cap, -1, dim)
        if cls.shape[1]:
            rows = torch.cat([cls.unsqueeze(1).expand(-1, n_cap, -1, -1).to(rows.dtype), rows], dim=2)
        rows_n = F.normalize(rows.float(), dim=-1)  # (B_v, b_t, R, C)

        # Alignment: (b_t) x (B_v * R, C) @ (C, L_t), batched over captions.
        n_rows = rows_n.shape[2]
        lhs = rows_n.transpose(0, 1).reshape(n_cap, n_img * n_rows, dim)
        align = torch.bmm(lhs.to(words_n.dtype), words_n.transpose(1, 2)).float()
        align = F.leaky_relu(align, LEAKY_SLOPE).reshape(n_cap, n_img, n_rows, -1)  # (b_t, B_v, R, L_t)
        valid = _length_mask(lens, words_n.shape[1])[:, None, None, :]  # (b_t, 1, 1, L_t)
        lens_f = lens.to(align.dtype)[:, None]
        t2i = align.masked_fill(~valid, float("-inf")).amax(dim=2)  # (b_t, B_v, L_t)
        t2i = t2i.masked_fill(~valid[:, :, 0], 0.0).sum(-1) / lens_f
        i2t = align.masked_fill(~valid, float("-inf")).amax(dim=3).mean(-1)  # (b_t, B_v)
        return (t2i + i2t).transpose(0, 1), sel.keep


def _length_mask(lens: Tensor, max_len: int) -> Tensor:
    """``(B, max_len)`` boolean mask of the first ``lens[b]`` positions."""
    return torch.arange(max_len, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)
