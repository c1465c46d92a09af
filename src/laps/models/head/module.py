"""The public head: :class:`LAPSHead` and its aggregation MLP, :class:`TokenAggregation`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from laps.models.gemm import bmm_nt, cpu_backend_scope, linear
from laps.models.head.backward import PairScores
from laps.models.head.common import (
    LOGIT_FLOOR,
    NORM_EPS,
    PreparedCaptions,
    PreparedImages,
    aggregated_count,
    check_ratios,
    host_lengths,
    keep_count,
    precise_dtype,
)
from laps.models.head.kernels import matmul_dtype, score_blocks
from laps.models.head.plan import GradientFeedback, HeadPlan, ScoreConfig, pair_bytes
from laps.models.pooling import pool_text


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
            temporary of a block stays near the plan's ``block_bytes``. On CPU blocks never exceed
            that size, also with a larger ``chunk_pairs``.
        max_saved_mb: in training, the intermediates kept from forward to backward, in MiB. Blocks
            beyond it are recomputed in backward instead, so memory stays bounded by this plus one
            block; 0 recomputes every block.
        selection: ``topk`` (the official hard selection, the default) or ``gumbel`` (the paper's
            learned, differentiable decision; see :mod:`laps.models.gumbel`).
        attention_weight: ``gumbel`` only: weight of the attention scores against the prediction.
        gumbel_tau: ``gumbel`` only: the Gumbel-softmax temperature.
        plan: block sizes and kernels (:class:`~laps.models.head.plan.HeadPlan`); ``None`` (the
            default) takes ``HeadPlan.for_device`` of the tensors' device at each call.

    State: ``feedback`` (:class:`~laps.models.head.plan.GradientFeedback`) is written by each
    backward and read by the next training forward: after a backward in which few pairs carried a
    gradient, the forward keeps no intermediates (backward recomputes those pairs anyway).
    ``declared_gradients`` (``None`` by default): a ``(B_v, B_t)`` boolean array of the pairs whose
    similarity gets a gradient, which backward then takes instead of reading them from the
    gradient's values; a simulation on fake tensors (``laps-estimate``), which have no values, sets
    it. Pairs outside it get no gradient.
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
        plan: HeadPlan | None = None,
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
        self.plan = plan
        self.feedback = GradientFeedback()
        self.declared_gradients = None
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
    def check_inputs(self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor | Sequence[int]) -> Tensor:
        """The caption lengths as a long tensor ``(B_t,)`` on the words' device, after checking the
        shapes; ``ValueError`` naming the tensor."""
        return self._check_inputs(img_embs, cap_embs, cap_lens)[0]

    def _check_inputs(
        self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor | Sequence[int]
    ) -> tuple[Tensor, tuple[int, ...]]:
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
        lengths = host_lengths(cap_lens)
        if len(lengths) != cap_embs.shape[0]:
            raise ValueError(f"cap_lens has {len(lengths)} entries for {cap_embs.shape[0]} captions")
        if lengths and (min(lengths) < 1 or max(lengths) > cap_embs.shape[1]):
            raise ValueError(
                f"cap_lens must lie in [1, {cap_embs.shape[1]}] (the caption tensor's length), "
                f"got min {min(lengths)}, max {max(lengths)}"
            )
        return _device_lengths(cap_lens, lengths, cap_embs.device), lengths

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
        caption = self._prepare_captions(cap_embs, *self._check_inputs(img_embs, cap_embs, cap_lens))
        if self.selection == "gumbel":
            return self._gumbel(img_embs, caption, return_mask)
        return self.score_prepared(self.prepare_images(img_embs), caption, return_mask=return_mask)

    def plan_for(self, device_type: str) -> HeadPlan:
        """The plan of a call on tensors of ``device_type``: the head's own, else the device's."""
        return self.plan if self.plan is not None else HeadPlan.for_device(device_type)

    def score_prepared(
        self, image: PreparedImages, caption: PreparedCaptions, return_mask: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Score outputs of :meth:`prepare_images` against :meth:`prepare_captions`, in blocks of pairs.

        Returns ``sims`` ``(B_v, B_t)`` (fp32) and, with ``return_mask``, the keep mask
        ``(B_v, B_t, N)``. Gradients flow to ``image.tokens`` (also through ``gram`` and
        ``cls_norm``, which must be the ones :meth:`prepare_images` computed from them) and
        ``image.weights``, and to the words. A ``gumbel`` head scores with its own selection
        (only ``image.tokens`` is used then).
        """
        if self.selection == "gumbel":
            return self._gumbel(image.tokens, caption, return_mask)
        tokens, words, precise = image.tokens, caption.words_n, image.gram.dtype
        n_img, n_cap = tokens.shape[0], words.shape[0]
        if n_img == 0 or n_cap == 0:
            sims = tokens.new_zeros(n_img, n_cap, dtype=precise)
            mask = tokens.new_zeros(n_img, n_cap, self.num_patches, dtype=precise)
            return sims, (mask if return_mask else None)
        if any(t.requires_grad for t in (image.gram, image.weights_t, image.cls_norm)):
            raise ValueError(
                "image.gram, image.weights_t and image.cls_norm must carry no graph (as prepare_images returns "
                "them): the scoring's backward computes their gradients from image.tokens and image.weights"
            )
        plan = self.plan_for(tokens.device.type)
        config = ScoreConfig(
            n_cls=int(self.has_cls),
            num_keep=self.num_keep,
            mm_dtype=matmul_dtype(tokens.device.type, precise),
            block_pairs=plan.block_pairs(
                self.chunk_pairs, pair_bytes(tokens.shape[1], words.shape[1], self.num_aggregated, precise)
            ),
            max_saved_bytes=0 if self.feedback.sparse else int(self.max_saved_mb * 2**20),
            feedback=self.feedback,
            return_mask=return_mask,
            plan=plan,
            declared_gradients=self.declared_gradients,
        )
        with cpu_backend_scope(plan.gemm):
            if torch.is_grad_enabled() and any(t.requires_grad for t in (tokens, image.weights, words)):
                sims, mask = PairScores.apply(*image, *caption, config)
            else:
                sims, mask, _ = score_blocks(image, *caption, config, save=False)
        return sims, (mask if return_mask else None)

    def _gumbel(
        self, img_embs: Tensor, caption: PreparedCaptions, return_mask: bool
    ) -> tuple[Tensor, Tensor | None]:
        from laps.models.gumbel import gumbel_similarity

        sims, keep = gumbel_similarity(self, img_embs, caption)
        return sims, (keep if return_mask else None)

    # ------------------------------------------------------------------ per-image / per-caption work
    def prepare_images(self, img_embs: Tensor) -> PreparedImages:
        """Caption-independent work, once per image: :class:`~laps.models.head.common.PreparedImages`
        of the image tokens ``img_embs`` ``(B_v, L_v, C)``."""
        with cpu_backend_scope(self.plan_for(img_embs.device.type).gemm):
            return self._prepare_images(img_embs)

    def _prepare_images(self, img_embs: Tensor) -> PreparedImages:
        n_cls = int(self.has_cls)
        patches = img_embs[:, n_cls:]
        device_type = img_embs.device.type
        with torch.autocast(device_type, enabled=False):
            precise = precise_dtype(img_embs.dtype)
            p32 = patches.to(precise)
            with torch.no_grad():
                # cosines as dots with the unnormalised patches over their norms: no normalised copy
                patch_norm = p32.norm(dim=-1).clamp_min(NORM_EPS)
                glob = F.normalize(p32.mean(dim=1), dim=-1)
                salience = torch.bmm(p32, glob.unsqueeze(-1)).squeeze(-1).div_(patch_norm)
                # without a graph: the scoring's backward adds their gradients to the tokens' (PairScores)
                gram = bmm_nt(p32, p32)
                cls_norm = img_embs[:, :n_cls].to(precise).norm(dim=-1).clamp_min(NORM_EPS)
        # On all tokens (a contiguous input; the [CLS] row is dropped after): the MLP acts token-wise.
        logits = self.aggregation(img_embs)[:, n_cls:]
        with torch.autocast(device_type, enabled=False):
            logits = logits.to(precise)
            shifted = logits - logits.detach().amax(dim=1, keepdim=True)
            weights = torch.exp(shifted.clamp_min(-LOGIT_FLOOR))
            # detached: a view (one aggregated token makes the transpose contiguous) would keep the graph
            weights_t = weights.detach().transpose(1, 2).contiguous()
        return PreparedImages(img_embs, patch_norm, salience, gram, weights, weights_t, cls_norm)

    @staticmethod
    def prepare_captions(cap_embs: Tensor, cap_lens: Tensor | Sequence[int]) -> PreparedCaptions:
        """Image-independent work, once per caption: :class:`~laps.models.head.common.PreparedCaptions`
        of the word tokens ``cap_embs`` ``(B_t, L_t, C)`` with lengths ``cap_lens`` ``(B_t,)`` (a
        tensor on any device, or a list of ints)."""
        lengths = host_lengths(cap_lens)
        return LAPSHead._prepare_captions(cap_embs, _device_lengths(cap_lens, lengths, cap_embs.device), lengths)

    @staticmethod
    def _prepare_captions(cap_embs: Tensor, lens: Tensor, lengths: tuple[int, ...]) -> PreparedCaptions:
        with torch.autocast(cap_embs.device.type, enabled=False):
            precise = precise_dtype(cap_embs.dtype)
            words_n = F.normalize(cap_embs.to(precise), dim=-1)
            with torch.no_grad():
                query = pool_text(cap_embs, lens)
        return PreparedCaptions(words_n, lens, query, lengths)


def _device_lengths(cap_lens: Tensor | Sequence[int], lengths: tuple[int, ...], device: torch.device) -> Tensor:
    """The lengths as a long tensor on ``device``: ``cap_lens`` itself when it is already there."""
    if isinstance(cap_lens, Tensor) and cap_lens.device == device:
        return cap_lens.long().reshape(-1)
    return torch.tensor(lengths, dtype=torch.long, device=device)
