"""A full training step (random-weight encoders, head, loss, AdamW) in pairs/s."""

from __future__ import annotations

import time
from typing import Any

import torch

from laps.benchmarks.inputs import BACKBONES, BenchSettings, caption_lengths
from laps.inference import synchronize
from laps.models.backbones import get_backbone


def bench_train_step(settings: BenchSettings, device: torch.device) -> dict[str, Any]:
    """A full training step of ``settings.train_step`` at ``batch``; pairs/s."""
    from laps.losses import contrastive_loss, ratio_loss
    from laps.models import create_model

    preset = BACKBONES[settings.train_step]
    model = create_model(settings.train_step, embed_size=settings.dim, pretrained=False,
                         vision_overrides=settings.vision_overrides, text_overrides=settings.text_overrides,
                         sparse_ratio=settings.sparse_ratio, aggr_ratio=settings.aggr_ratio,
                         chunk_pairs=settings.chunk_pairs).to(device).train()
    vision, text = model.vision, model.text
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(settings.seed)
    size = vision.image_size
    images = torch.randn(settings.batch, 3, size, size, generator=gen).to(device)
    vocab = int(text.backbone.config.vocab_size)
    ids = torch.randint(1000 % vocab, vocab, (settings.batch, settings.words), generator=gen)
    lengths = caption_lengths(settings.batch, settings, gen)
    ids = ids.masked_fill(torch.arange(settings.words)[None] >= lengths[:, None], 0).to(device)
    lengths = lengths.to(device)
    img_ids = torch.arange(settings.batch, device=device)
    amp = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            sims, mask = model(images, ids, lengths)
            loss = contrastive_loss(sims, img_ids, 0.2, max_violation=True) + 2.0 * ratio_loss(mask, settings.sparse_ratio)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()

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
        "backbone": settings.train_step, "vision": preset["vision"], "text": get_backbone(settings.train_step).text_id,
        "batch": settings.batch, "image_size": size, "num_patches": vision.num_patches, "amp": "bf16" if amp else "off",
        "step_s": best, "mean_step_s": sum(times) / len(times),
        "pairs_per_s": settings.batch**2 / best, "images_per_s": settings.batch / best,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out
