"""A full training step (random-weight encoders, head, the recipe's loss and optimizer) in pairs/s."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from laps.benchmarks.inputs import BACKBONES, BenchSettings, caption_lengths
from laps.benchmarks.recipe import TrainRecipe, training_recipe
from laps.inference import synchronize
from laps.models import LAPSModel, create_model
from laps.models.backbones import get_backbone


def batch_loss(model: LAPSModel, recipe: TrainRecipe, images: Tensor, input_ids: Tensor, lengths: Tensor,
               img_ids: Tensor) -> Tensor:
    """The training loss of a batch as the LightningModule computes it, past the warm-ups.

    ``images`` ``(B, 3, H, W)``, ``input_ids`` ``(B, L)``, ``lengths`` and ``img_ids`` ``(B,)``.
    """
    from laps.models.pooling import pooled_similarity

    img = model.encode_image(images)
    cap = model.encode_text(input_ids, lengths)
    sims, mask = model.head.similarity(img, cap, lengths, return_mask=True)
    pooled = pooled_similarity(img, cap, lengths) if recipe.pooled_weight > 0 else None
    return recipe.loss(sims, mask, img_ids, model.head.sparse_ratio, pooled)


def make_train_step(model: LAPSModel, recipe: TrainRecipe, batch: tuple[Tensor, ...], amp: bool) -> Callable[[], Tensor]:
    """One optimizer step on ``batch`` (images, input ids, lengths, image ids) per call; returns the loss.

    The recipe's optimizer, loss and gradient clipping; bf16 autocast around forward and loss when ``amp``.
    """
    opt = recipe.optimizer(model)
    device_type = batch[0].device.type

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            loss = batch_loss(model, recipe, *batch)
        loss.backward()
        recipe.clip_gradients(model.parameters())
        opt.step()
        return loss.detach()

    return step


def random_batch(settings: BenchSettings, image_size: int, vocab: int, device: torch.device) -> tuple[Tensor, ...]:
    """``batch`` random images ``(B, 3, S, S)``, token ids ``(B, words)`` (padded after each length),
    lengths and image ids ``(B,)``."""
    gen = torch.Generator().manual_seed(settings.seed)
    images = torch.randn(settings.batch, 3, image_size, image_size, generator=gen).to(device)
    ids = torch.randint(1000 % vocab, vocab, (settings.batch, settings.words), generator=gen)
    lengths = caption_lengths(settings.batch, settings, gen)
    ids = ids.masked_fill(torch.arange(settings.words)[None] >= lengths[:, None], 0).to(device)
    return images, ids, lengths.to(device), torch.arange(settings.batch, device=device)


def bench_train_step(
    settings: BenchSettings, device: torch.device, recipe: TrainRecipe | None = None
) -> dict[str, Any]:
    """A full training step of ``settings.train_step`` at ``batch``; pairs/s.

    ``recipe``: default ``laps-train``'s (:func:`training_recipe`) for that backbone.
    """
    name = settings.train_step
    if name is None:
        raise ValueError("bench_train_step needs settings.train_step (a backbone name)")
    recipe = recipe or training_recipe(name)
    model = create_model(name, embed_size=settings.dim, pretrained=False,
                         vision_overrides=settings.vision_overrides, text_overrides=settings.text_overrides,
                         sparse_ratio=settings.sparse_ratio, aggr_ratio=settings.aggr_ratio,
                         chunk_pairs=settings.chunk_pairs, **recipe.head_options()).to(device).train()
    vision, text = model.vision, model.text
    batch = random_batch(settings, vision.image_size, int(text.backbone.config.vocab_size), device)
    amp = device.type == "cuda"
    step = make_train_step(model, recipe, batch, amp)
    for _ in range(2):
        step()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, settings.train_steps)):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    best = min(times)
    out = {
        "backbone": name, "vision": BACKBONES[name]["vision"], "text": get_backbone(name).text_id,
        "batch": settings.batch, "image_size": vision.image_size, "num_patches": vision.num_patches,
        "amp": "bf16" if amp else "off", "step_s": best, "mean_step_s": sum(times) / len(times),
        "pairs_per_s": settings.batch**2 / best, "images_per_s": settings.batch / best,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out
