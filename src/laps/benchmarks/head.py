"""The head against the reference loop: a training step (forward, loss, backward) and scoring."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from laps.benchmarks.inputs import BenchSettings, build_head, make_embeddings, time_interleaved
from laps.benchmarks.recipe import TrainRecipe, training_recipe

LOSSES = ("hardest", "dense")


def training_loss(
    sims: Tensor, mask: Tensor, sparse_ratio: float, loss: str, recipe: TrainRecipe | None = None
) -> Tensor:
    """``hardest``: the recipe's loss of the head from epoch 1 on (:meth:`TrainRecipe.head_loss`, on
    the square top-left block of pairs); ``dense``: ``sims.sum()`` (every pair a gradient).

    ``sims`` ``(B_v, B_t)``, ``mask`` the head's keep mask; a scalar.
    """
    if loss == "dense":
        return sims.sum()
    if recipe is None:
        raise ValueError("the hardest-negative loss needs the training recipe")
    n = min(sims.shape)
    return recipe.head_loss(sims[:n, :n], mask, torch.arange(n, device=sims.device), sparse_ratio)


def head_step(
    impl: str, head: torch.nn.Module, img: Tensor, cap: Tensor, lens: Tensor, loss: str, amp: bool = False,
    recipe: TrainRecipe | None = None,
) -> None:
    """One forward (train mode) + loss + backward of ``head`` (``impl="head"``) or of the reference loop.

    ``img`` ``(B_v, L_v, C)``, ``cap`` ``(B_t, L_t, C)``, ``lens`` ``(B_t,)``.
    """
    from laps.models.reference import reference_similarity

    img = img.detach().requires_grad_()
    cap = cap.detach().requires_grad_()
    head.train()
    head.zero_grad(set_to_none=True)
    with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=amp):
        if impl == "head":
            sims, mask = head(img, cap, lens)
        else:
            sims, mask = reference_similarity(head, img, cap, lens, return_mask=True)
        value = training_loss(sims.float(), mask, head.sparse_ratio, loss, recipe)
    value.backward()


def bench_head_train(settings: BenchSettings, device: torch.device) -> dict[str, Any]:
    """Head forward + backward at ``batch x batch`` pairs, both losses (:data:`LOSSES`), head and reference."""
    head = build_head(settings, device)
    img, cap, lens = make_embeddings(settings.batch, settings.batch, settings, device, settings.seed)
    out: dict[str, Any] = {"batch": settings.batch, "pairs": settings.batch**2}
    amp = settings.autocast == "bf16"
    recipe = training_recipe()
    for loss in LOSSES:
        fns = {"head": lambda loss=loss: head_step("head", head, img, cap, lens, loss, amp, recipe)}
        if settings.reference:
            fns["reference"] = lambda loss=loss: head_step("reference", head, img, cap, lens, loss, amp, recipe)
        times = time_interleaved(fns, device, settings.repeats)
        entry = {"head_s": times["head"]}
        if settings.reference:
            entry["reference_s"] = times["reference"]
            entry["speedup"] = times["reference"] / times["head"]
        out[loss] = entry
    return out


@torch.no_grad()
def _reference_scores(head: torch.nn.Module, img: Tensor, cap: Tensor, lens: Tensor, image_block: int) -> Tensor:
    from laps.models.reference import reference_similarity

    head.eval()
    return torch.cat(
        [reference_similarity(head, img[i : i + image_block], cap, lens) for i in range(0, img.shape[0], image_block)]
    )


def bench_scoring(settings: BenchSettings, device: torch.device) -> dict[str, Any]:
    """Scoring ``score_images x score_captions`` pairs from cached embeddings, as evaluation does.

    The reference is timed on the first ``reference_captions`` captions (all when ``None``) and
    scaled per pair.
    """
    from laps.evaluation import score_matrix

    head = build_head(settings, device).eval()
    n_img, n_cap = settings.score_images, settings.score_captions
    img, cap, lens = make_embeddings(n_img, n_cap, settings, device, settings.seed + 1)
    amp = settings.autocast == "bf16"

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def run_head() -> Tensor:
        with autocast():
            return score_matrix(head, img, cap, lens, image_block=settings.image_block, progress=False)

    n_ref = min(n_cap, settings.reference_captions or n_cap)

    def run_reference() -> Tensor:
        with autocast():
            return _reference_scores(head, img, cap[:n_ref], lens[:n_ref], settings.image_block)

    fns: dict[str, Callable[[], Any]] = {"head": run_head}
    if settings.reference:
        fns["reference"] = run_reference
    times = time_interleaved(fns, device, settings.repeats)
    out: dict[str, Any] = {
        "images": n_img, "captions": n_cap, "pairs": n_img * n_cap, "head_s": times["head"],
        "head_pairs_per_s": n_img * n_cap / times["head"],
    }
    if settings.reference:
        scale = n_cap / n_ref
        out.update({
            "reference_captions_timed": n_ref,
            "reference_s": times["reference"] * scale,
            "speedup": times["reference"] * scale / times["head"],
        })
    return out
