"""A global-embedding baseline (``model=vse``): one pooled vector per image and per caption, scored
by their cosine (VSE++ / VSE-infinity), behind the same API as :class:`~laps.models.LAPSModel`.

* :class:`GPO`, the generalized pooling operator of VSE-infinity (Chen et al., CVPR 2021): every
  coordinate of a set of vectors is sorted, descending, and the pooled coordinate is a weighted sum
  of the sorted values, the weights depending on the rank ``k`` and the set size only;
* :class:`PoolingHead`, mean or GPO pooling of the image tokens (all of them, [CLS] included) and
  of the valid words of a caption, then the cosine of the L2-normalised vectors; it offers the
  head interface the training module, :func:`laps.evaluation.score_matrix` and ``laps-retrieve``
  use (``similarity``, ``prepare_images``, ``prepare_captions``, ``score_prepared``);
* :class:`VSEModel`, the encoders and a :class:`PoolingHead`; build it with
  :func:`laps.models.create_model` (``kind="vse"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from laps.models.dual_encoder import DualEncoder
from laps.models.encoders import TextEncoder, VisionEncoder
from laps.models.head.common import host_lengths, precise_dtype
from laps.models.pooling import pool_image, pool_text

POOLINGS = ("mean", "gpo")


def positional_encoding(n: int, dim: int, device: torch.device | str | None = None) -> Tensor:
    """The sinusoidal encoding of positions ``0 .. n-1`` (rank ``k = 1 .. n``): ``(n, dim)`` fp32,
    ``pe[k, 2i] = sin(k / 10000^(2i/dim))``, ``pe[k, 2i+1] = cos(k / 10000^(2i/dim))``."""
    if dim % 2:
        raise ValueError(f"the positional encoding's width must be even, got {dim}")
    pos = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.empty(n, dim, dtype=torch.float32, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def _set_sizes(lengths: Tensor | Sequence[int] | None, batch: int, size: int) -> tuple[int, ...]:
    """The sizes of ``batch`` sets padded to ``size``, as Python ints (all ``size`` when ``None``)."""
    host = (size,) * batch if lengths is None else host_lengths(lengths, "lengths")
    if len(host) != batch:
        raise ValueError(f"lengths has {len(host)} entries for {batch} sets")
    if host and (min(host) < 1 or max(host) > size):
        raise ValueError(f"lengths must lie in [1, {size}], got min {min(host)}, max {max(host)}")
    return host


class GPO(nn.Module):
    """Generalized pooling operator: a set of ``n`` vectors -> one vector, per coordinate
    ``sum_k theta_k * v_(k)`` over the values sorted descending, the weights ``theta`` shared by
    all coordinates and given by the rank ``k`` (and ``n``) alone.

    ``theta`` comes from the sinusoidal encoding of ``k`` (``pe_dim``) through a bidirectional GRU
    (``hidden`` per direction, the two directions averaged) over the ranks ``1 .. n`` and a linear
    map to one score per rank, then a softmax over the ``n`` valid ranks at ``temperature``.
    Padding gets weight 0 and its values never reach the result (they are sorted last and
    zeroed), so any set size works. The sizes are read on the host (one copy of a lengths tensor)
    and no operator depends on values, so it also runs on fake tensors (``laps-estimate``).
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"GPO temperature must be positive, got {temperature}")
        self.pe_dim, self.hidden, self.temperature = int(pe_dim), int(hidden), float(temperature)
        self.gru = nn.GRU(self.pe_dim, self.hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(self.hidden, 1)

    def extra_repr(self) -> str:
        return f"pe_dim={self.pe_dim}, hidden={self.hidden}, temperature={self.temperature}"

    def scores(self, lengths: Tensor | Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """The rank scores ``(B, n_max)`` (fp32) of sets of ``lengths`` ``(B,)``; padding ``-inf``.

        One GRU call for all distinct sizes: row 0 holds the ranks ``1 .. n_max`` (its forward
        direction, causal, serves every size), row ``u`` the ranks ``1 .. n_u`` right-aligned (its
        backward direction starts at rank ``n_u``: the padding in front never reaches it)."""
        host = host_lengths(lengths, "lengths")
        device = torch.device(device) if device is not None else self.linear.weight.device
        if not host:
            return torch.zeros(0, 0, device=device)
        if min(host) < 1:
            raise ValueError(f"GPO needs sets of at least one vector, got a length of {min(host)}")
        sizes = sorted(set(host))
        n_max, h = sizes[-1], self.hidden
        pe = positional_encoding(n_max, self.pe_dim, device).to(self.linear.weight.dtype)  # (n_max, pe_dim)
        pos = torch.arange(n_max, device=device)
        offset = n_max - torch.tensor(sizes, dtype=torch.long, device=device)[:, None]  # (U, 1)
        right = pe[(pos[None, :] - offset).clamp(min=0)]  # (U, n_max, pe_dim): rank k at k + offset
        out = self.gru(torch.cat([pe[None], right]))[0]  # (1 + U, n_max, 2 * hidden)
        fwd = out[:1, :, :h]
        bwd = out[1:, :, h:].gather(1, (pos[None, :] + offset).clamp(max=n_max - 1)[..., None].expand(-1, -1, h))
        scores = self.linear((fwd + bwd) / 2).squeeze(-1).float()  # (U, n_max)
        scores = scores.masked_fill(pos[None, :] >= n_max - offset, float("-inf"))
        row = {n: u for u, n in enumerate(sizes)}
        return scores[torch.tensor([row[n] for n in host], dtype=torch.long, device=device)]

    def weights(self, lengths: Tensor | Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """``theta`` ``(B, n_max)`` (fp32): softmax of the scores over the valid ranks, 0 on padding."""
        return torch.softmax(self.scores(lengths, device) / self.temperature, dim=1)

    def forward(self, features: Tensor, lengths: Tensor | Sequence[int] | None = None) -> Tensor:
        """``(B, L, C)`` sets, the first ``lengths[b]`` vectors of each valid (all when ``None``)
        -> ``(B, C)`` pooled vectors (fp32, float64 for float64 inputs; not normalised)."""
        b, n, c = features.shape
        host = _set_sizes(lengths, b, n)
        if not host:
            return features.new_zeros(0, c, dtype=precise_dtype(features.dtype))
        with torch.autocast(features.device.type, enabled=False):
            n_max = max(host)
            x = features[:, :n_max].to(precise_dtype(features.dtype))
            lens = torch.tensor(host, dtype=torch.long, device=x.device)
            valid = (torch.arange(n_max, device=x.device)[None, :] < lens[:, None])[..., None]
            # padding sorts last: the smallest finite value, then zeroed (a 0 weight times -inf is NaN)
            ordered = x.masked_fill(~valid, torch.finfo(x.dtype).min).sort(dim=1, descending=True).values
            ordered = ordered.masked_fill(~valid, 0.0)
            theta = self.weights(host, x.device).to(x.dtype)
            return (ordered * theta[..., None]).sum(dim=1)


class PoolingHead(nn.Module):
    """Cosine of pooled vectors: the head of a :class:`VSEModel`.

    The image's set is all its tokens ([CLS] included), the caption's its ``cap_lens`` valid words
    ([CLS] and [SEP] included). ``mean`` pooling is :func:`laps.models.pooling.pool_image` /
    :func:`~laps.models.pooling.pool_text` (no parameters); ``gpo`` has one :class:`GPO` per
    modality. Pooling and cosine run in fp32 (float64 for float64 inputs).

    Args:
        embed_dim: the width ``C`` of the tokens.
        pooling: ``mean`` or ``gpo``.
        num_patches, has_cls: the vision encoder's geometry (recorded for the tools that report it;
            the pooling itself takes any number of tokens).
    """

    def __init__(self, embed_dim: int, pooling: str = "mean", num_patches: int = 0, has_cls: bool = True) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} (model.pooling), got {pooling!r}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        self.embed_dim, self.pooling = int(embed_dim), pooling
        self.num_patches, self.has_cls = int(num_patches), bool(has_cls)
        if pooling == "gpo":
            self.image_pool = GPO()
            self.text_pool = GPO()

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, pooling={self.pooling}"

    def _check(self, x: Tensor, name: str) -> None:
        if x.dim() != 3 or x.shape[2] != self.embed_dim:
            raise ValueError(f"{name} must be (B, L, {self.embed_dim}), got shape {tuple(x.shape)}")

    def prepare_images(self, img_embs: Tensor) -> Tensor:
        """Image tokens ``(B_v, L_v, C)`` -> L2-normalised pooled vectors ``(B_v, C)`` (fp32)."""
        self._check(img_embs, "img_embs")
        if self.pooling == "mean":
            return pool_image(img_embs)
        return F.normalize(self.image_pool(img_embs), dim=-1)

    def prepare_captions(self, cap_embs: Tensor, cap_lens: Tensor | Sequence[int]) -> Tensor:
        """Word tokens ``(B_t, L_t, C)`` and lengths ``(B_t,)`` -> normalised pooled vectors ``(B_t, C)``."""
        self._check(cap_embs, "cap_embs")
        lengths = host_lengths(cap_lens)
        if len(lengths) != cap_embs.shape[0]:
            raise ValueError(f"cap_lens has {len(lengths)} entries for {cap_embs.shape[0]} captions")
        if lengths and (min(lengths) < 1 or max(lengths) > cap_embs.shape[1]):
            raise ValueError(f"cap_lens must lie in [1, {cap_embs.shape[1]}], got min {min(lengths)}, "
                             f"max {max(lengths)}")
        if self.pooling == "mean":
            lens = cap_lens if isinstance(cap_lens, Tensor) else torch.tensor(lengths, dtype=torch.long)
            return pool_text(cap_embs, lens)
        return F.normalize(self.text_pool(cap_embs, lengths), dim=-1)

    @staticmethod
    def score_prepared(image: Tensor, caption: Tensor, return_mask: bool = False) -> tuple[Tensor, None]:
        """Cosines ``(B_v, B_t)`` of :meth:`prepare_images` ``(B_v, C)`` and :meth:`prepare_captions`
        ``(B_t, C)``, and ``None`` (no patch mask, whatever ``return_mask``)."""
        with torch.autocast(image.device.type, enabled=False):
            return image @ caption.to(image.dtype).t(), None

    def similarity(
        self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor | Sequence[int], return_mask: bool = False
    ) -> tuple[Tensor, None]:
        """``(sims (B_v, B_t) fp32, None)``: as :meth:`LAPSHead.similarity <laps.models.head.LAPSHead.similarity>`,
        without a keep mask (there is no selection)."""
        return self.score_prepared(self.prepare_images(img_embs), self.prepare_captions(cap_embs, cap_lens))

    def forward(self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Tensor) -> Tensor:
        """``sims`` ``(B_v, B_t)`` (in train and eval mode alike)."""
        return self.similarity(img_embs, cap_embs, cap_lens)[0]


class VSEModel(DualEncoder):
    """The encoders and a :class:`PoolingHead`: ``encode_image``, ``encode_text`` and ``similarity``
    as :class:`~laps.models.LAPSModel`'s, and the same folder format (``save_pretrained`` /
    ``from_pretrained``; ``config.json`` records ``kind: vse`` and the pooling).

    Args:
        vision, text: encoders projecting to the same ``embed_size``.
        pooling: ``mean`` or ``gpo`` (:class:`GPO`).
    """

    def __init__(self, vision: VisionEncoder, text: TextEncoder, pooling: str = "mean") -> None:
        super().__init__(vision, text)
        self.head = PoolingHead(vision.embed_size, pooling, num_patches=vision.num_patches, has_cls=vision.has_cls)
