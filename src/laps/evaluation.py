"""Scoring a whole split and turning the similarity matrix into the paper's protocols.

Embeddings are computed once per image and once per caption; the head then scores
blocks of images against all captions (its caption-independent work done once per
block). Under ``torch.distributed`` the image blocks are shared out between ranks and
the rows summed back, so each pair is scored exactly once.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from laps.metrics import coco_1k_metrics, retrieval_metrics
from laps.models.head import LAPSHead
from laps.models.vse import PoolingHead

log = logging.getLogger(__name__)

PROTOCOLS = ("f30k", "coco")


@torch.no_grad()
def score_matrix(
    head: LAPSHead | PoolingHead,
    img_embs: Tensor,
    cap_embs: Tensor,
    cap_lens: Tensor,
    image_block: int = 128,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """The head's similarities ``(N_img, N_cap)`` (fp32, on the CPU) of every image with every caption.

    Args:
        img_embs: ``(N_img, L_v, C)``; cap_embs: ``(N_cap, L_t, C)``; cap_lens: ``(N_cap,)``.
        image_block: images scored per step (the head chunks captions inside a step). Each step's
            images are cast to the head's dtype (fp32 for a head without parameters, such as mean
            pooling), so ``img_embs`` may be stored in float16.
        device: where to compute (default: the head's device; the captions' for a head without parameters).
    """
    param = next(head.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = torch.device(device) if device is not None else param.device if param is not None else cap_embs.device
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    n_img, n_cap = img_embs.shape[0], cap_embs.shape[0]
    out = torch.zeros(n_img, n_cap, dtype=torch.float32)
    caption = head.prepare_captions(cap_embs.to(device), cap_lens)  # lengths read once, on the host
    starts = list(range(0, n_img, image_block))[rank::world]
    bar = tqdm(starts, desc="Scoring pairs", unit="block", disable=not progress or rank != 0, leave=False)
    for start in bar:
        block = img_embs[start : start + image_block].to(device=device, dtype=dtype)
        sims, _ = head.score_prepared(head.prepare_images(block), caption)
        out[start : start + block.shape[0]] = sims.float().cpu()
    if world > 1:
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        full = out.to(backend_device)
        dist.all_reduce(full)  # blocks are disjoint: the sum assembles the matrix exactly
        out = full.cpu()
    return out


def protocol_metrics(sims: Tensor, cap_to_img: Tensor, protocol: str, prefix: str) -> dict[str, float]:
    """Metrics keyed ``{prefix}/...``; COCO adds the 5-fold 1K mean as ``{prefix}_1k/...``.

    ``f30k``: one matrix (F30K 1K test, or any split scored at once). ``coco``: the 5K
    matrix as the main figures, plus the mean over five folds of 1,000 images.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    out = {f"{prefix}/{k}": v for k, v in retrieval_metrics(sims, cap_to_img).items()}
    if protocol == "coco":
        if sims.shape[0] % 5:
            log.warning("COCO 1K protocol skipped: %d images do not split into 5 folds", sims.shape[0])
        else:
            out.update({f"{prefix}_1k/{k}": v for k, v in coco_1k_metrics(sims, cap_to_img).items()})
    return out
