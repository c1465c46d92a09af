"""Image-text retrieval metrics with several captions per image (as the official VSE/LAPS code).

``sims`` is ``(N_img, N_cap)``; ``cap_to_img[k]`` is the image of caption ``k`` (``k // 5``
in the standard layout). Image-to-text rank of image ``i`` is the best rank among its
captions; text-to-image rank of caption ``k`` is the rank of its image. Ranks are 0-based:
R@K counts ranks below K, median rank is ``floor(median) + 1``, mean rank ``mean + 1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RECALL_KS = (1, 5, 10)


def default_cap_to_img(n_img: int, n_cap: int) -> Tensor:
    """``k // (n_cap / n_img)``: the standard layout of consecutive captions per image."""
    if n_img == 0 or n_cap % n_img:
        raise ValueError(f"{n_cap} captions do not split evenly over {n_img} images; pass cap_to_img")
    return torch.arange(n_cap) // (n_cap // n_img)


@torch.no_grad()
def retrieval_ranks(sims: Tensor, cap_to_img: Tensor | None = None, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """0-based ranks: ``i2t`` ``(N_img,)`` and ``t2i`` ``(N_cap,)``."""
    sims = torch.as_tensor(sims).float()
    n_img, n_cap = sims.shape
    cap_to_img = default_cap_to_img(n_img, n_cap) if cap_to_img is None else torch.as_tensor(cap_to_img).long()
    cap_to_img = cap_to_img.to(sims.device)
    if cap_to_img.numel() != n_cap:
        raise ValueError(f"cap_to_img has {cap_to_img.numel()} entries for {n_cap} captions")
    own = torch.zeros(n_img, n_cap, dtype=torch.bool, device=sims.device)
    own[cap_to_img, torch.arange(n_cap, device=sims.device)] = True
    if not bool(own.any(dim=1).all()):
        raise ValueError("some images have no caption")
    i2t = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk):
        block = sims[s : s + chunk]
        best_own = block.masked_fill(~own[s : s + chunk], float("-inf")).amax(dim=1, keepdim=True)
        i2t[s : s + chunk] = (block > best_own).sum(dim=1).cpu()
    t2i = torch.empty(n_cap, dtype=torch.long)
    for s in range(0, n_cap, chunk * 4):
        block = sims[:, s : s + chunk * 4]
        true = block.gather(0, cap_to_img[s : s + chunk * 4].unsqueeze(0))
        t2i[s : s + chunk * 4] = (block > true).sum(dim=0).cpu()
    return i2t, t2i


def _summary(ranks: Tensor) -> dict[str, float]:
    r = ranks.double()
    out = {f"R@{k}": 100.0 * float((r < k).double().mean()) for k in RECALL_KS}
    out["medr"] = float(math.floor(float(r.median() if r.numel() % 2 else r.quantile(0.5))) + 1)
    out["meanr"] = float(r.mean()) + 1.0
    return out


def retrieval_metrics(sims: Tensor, cap_to_img: Tensor | None = None) -> dict[str, float]:
    """Keys ``i2t_R@1/5/10``, ``i2t_medr``, ``i2t_meanr``, the same for ``t2i``, and ``rsum``."""
    i2t, t2i = retrieval_ranks(sims, cap_to_img)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out.update({f"{name}_{k}": v for k, v in _summary(ranks).items()})
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out


def coco_1k_metrics(sims: Tensor, cap_to_img: Tensor | None = None, folds: int = 5) -> dict[str, float]:
    """COCO 1K: the mean of :func:`retrieval_metrics` over ``folds`` consecutive image folds."""
    sims = torch.as_tensor(sims)
    n_img, n_cap = sims.shape
    cap_to_img = default_cap_to_img(n_img, n_cap) if cap_to_img is None else torch.as_tensor(cap_to_img).long()
    if n_img % folds:
        raise ValueError(f"{n_img} images do not split into {folds} folds")
    size = n_img // folds
    results = []
    for f in range(folds):
        caps = ((cap_to_img >= f * size) & (cap_to_img < (f + 1) * size)).nonzero().squeeze(1)
        sub = sims[f * size : (f + 1) * size][:, caps]
        results.append(retrieval_metrics(sub, cap_to_img[caps] - f * size))
    return {k: sum(r[k] for r in results) / folds for k in results[0]}


def metrics_rows(metrics: dict[str, float]) -> tuple[list[str], list[list[float | str | None]]]:
    """Metrics keyed ``{split}/{name}`` (``test/i2t_R@1``, ``test_1k/rsum``, ...) as table rows: split,
    direction, R@1, R@5, R@10, medr, meanr, rsum (the split's, on its first row; None elsewhere or where
    absent); and the column names."""
    cols = ["R@1", "R@5", "R@10", "medr", "meanr"]
    groups: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        prefix, _, name = key.partition("/")
        groups.setdefault(prefix, {})[name] = float(value)
    rows = []
    for prefix, vals in sorted(groups.items()):
        rsum = vals.get("rsum")
        for direction in ("i2t", "t2i"):
            if f"{direction}_R@1" in vals:
                rows.append([prefix, direction, *(vals.get(f"{direction}_{c}") for c in cols), rsum])
                rsum = None
    return ["split", "direction", *cols, "rsum"], rows
