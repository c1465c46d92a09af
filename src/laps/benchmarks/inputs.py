"""What every benchmark shares: the settings, the presets, random inputs, the head, timing."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from laps.inference import synchronize
from laps.models.backbones import get_backbone
from laps.models.gemm import cpu_backend, set_cpu_backend

BACKBONES: dict[str, dict[str, Any]] = {  # --train-step / --backbone presets, from the backbone list
    name: {"vision": spec.vision_id, "tokens": spec.num_tokens, "has_cls": spec.has_cls,
           "sparse_ratio": spec.sparse_ratio, "aggr_ratio": spec.aggr_ratio, "image_size": spec.image_size}
    for name, spec in ((n, get_backbone(n)) for n in ("vit", "swin", "vit_384"))
}
# Caption lengths of the F30K 1K test split (5,000 captions): tokens from BERT's basic tokenizer
# plus [CLS] and [SEP], counts for lengths 4, 5, ..., 32 (longer ones counted at 32). Mean 15.5.
F30K_LENGTHS = (4, [2, 2, 10, 28, 111, 237, 329, 437, 442, 471, 435, 396, 382, 330, 268, 194, 185, 133,
                    91, 87, 80, 71, 41, 34, 34, 24, 26, 29, 91])
CPU_SCORING = (96, 96)
GPU_SCORING = (1000, 5000)
# The settings written under "config" in the result, in this order.
RECORDED = ("batch", "tokens", "dim", "has_cls", "sparse_ratio", "aggr_ratio", "words", "min_words", "lengths",
            "autocast", "chunk_pairs", "score_images", "score_captions", "reference_captions", "memory_batch",
            "repeats", "train_step", "seed")


@dataclass
class BenchSettings:
    """What ``laps-bench`` measures and at which sizes, every default already resolved.

    The fields are ``laps-bench``'s options (``docs/tools.md``); ``head_train``, ``scoring`` and
    ``memory`` switch those measurements on, ``reference`` times the reference loop beside the head,
    ``threads`` and ``cpu_gemm`` (``None``: torch's and :mod:`laps.models.gemm`'s defaults) are
    applied for the run, ``vision_overrides`` / ``text_overrides`` are encoder config fields for
    ``train_step``.
    """

    batch: int = 32
    tokens: int = BACKBONES["vit"]["tokens"]
    dim: int = 512
    has_cls: bool = BACKBONES["vit"]["has_cls"]
    sparse_ratio: float = BACKBONES["vit"]["sparse_ratio"]
    aggr_ratio: float = BACKBONES["vit"]["aggr_ratio"]
    words: int = 32
    min_words: int = 4
    lengths: str = "f30k"
    chunk_pairs: int | None = None
    autocast: str = "off"
    score_images: int = CPU_SCORING[0]
    score_captions: int = CPU_SCORING[1]
    reference_captions: int | None = None
    image_block: int = 128
    memory_batch: int = 48
    repeats: int = 3
    threads: int | None = None
    cpu_gemm: str | None = None
    reference: bool = True
    head_train: bool = True
    scoring: bool = True
    memory: bool = True
    train_step: str | None = None
    train_steps: int = 3
    vision_overrides: dict[str, Any] = field(default_factory=dict)
    text_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def recorded(self) -> dict[str, Any]:
        """The settings a result records under ``config``."""
        return {key: getattr(self, key) for key in RECORDED}


def make_embeddings(
    n_img: int, n_cap: int, settings: BenchSettings, device: torch.device, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Random image tokens ``(n_img, tokens, dim)``, caption tokens ``(n_cap, words, dim)`` and lengths ``(n_cap,)``.

    Lengths follow F30K's (``lengths="f30k"``, clipped to ``[min_words, words]``) or are uniform in
    ``[min_words, words]``; the tensor is ``words`` long.
    """
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, settings.tokens, settings.dim, generator=gen)
    cap = torch.randn(n_cap, settings.words, settings.dim, generator=gen)
    return img.to(device), cap.to(device), caption_lengths(n_cap, settings, gen).to(device)


def caption_lengths(n: int, settings: BenchSettings, gen: torch.Generator) -> Tensor:
    """``(n,)`` caption lengths drawn as ``settings.lengths`` says."""
    if settings.lengths == "uniform":
        return torch.randint(settings.min_words, settings.words + 1, (n,), generator=gen)
    first, counts = F30K_LENGTHS
    draw = torch.multinomial(torch.tensor(counts, dtype=torch.float), n, replacement=True, generator=gen) + first
    return draw.clamp(settings.min_words, settings.words)


def build_head(settings: BenchSettings, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A :class:`LAPSHead` at the benchmark's shapes, parameters perturbed from their initial values."""
    from laps.models.head import LAPSHead

    torch.manual_seed(seed)
    head = LAPSHead(
        settings.dim, settings.tokens - int(settings.has_cls), settings.sparse_ratio, settings.aggr_ratio,
        settings.has_cls, chunk_pairs=settings.chunk_pairs,
    )
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head.to(device)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Best wall-clock seconds of each function, calls interleaved so that load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@contextlib.contextmanager
def applied(settings: BenchSettings) -> Iterator[None]:
    """Run with ``settings.threads`` and ``settings.cpu_gemm`` (where set); both restored afterwards."""
    threads, kernels = torch.get_num_threads(), cpu_backend()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.cpu_gemm:
        set_cpu_backend(settings.cpu_gemm)
    try:
        yield
    finally:
        set_cpu_backend(kernels)
        if settings.threads:
            torch.set_num_threads(threads)
