"""``laps-estimate``: will a ``laps-train`` configuration fit on a GPU, estimated on this CPU.

:func:`estimate` builds the configured module with random weights (no dataset, no network),
simulates one steady-state training step on fake tensors (:mod:`laps.estimate.step`) for the
dense step (the warm-up's sum over negatives) and the hardest-negative step, and reports the
larger peak per GPU; with ``estimate.max_memory_gib`` it also finds the largest batch per GPU
that fits (:func:`max_batch`). The method and what it leaves out: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from laps.data import synthetic
from laps.estimate.step import Simulator, StepMemory, StepShape, measured_peak
from laps.models.backbones import TEXT_VOCAB_SIZE
from laps.models.head.plan import HeadPlan
from laps.training.tasks import build_module

log = logging.getLogger(__name__)
GiB = 2**30

# precision -> (parameter dtype, autocast dtype), as Lightning's precision plugins
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "32-true": (torch.float32, None), "32": (torch.float32, None),
    "bf16-mixed": (torch.float32, torch.bfloat16), "16-mixed": (torch.float32, torch.float16),
    "bf16-true": (torch.bfloat16, None), "16-true": (torch.float16, None),
    "64-true": (torch.float64, None), "64": (torch.float64, None),
}

NOT_COUNTED = (
    "allocator fragmentation and caching (estimate.fragmentation)",
    "the CUDA context, cuBLAS/cuDNN workspaces (estimate.overhead_gib)",
    "NCCL buffers under DDP",
)


@dataclass(frozen=True)
class Target:
    """What is estimated: the device type, precision, GPUs per run, caption tokens and vocabulary."""

    device: str
    precision: str
    world_size: int
    caption_length: int
    vocab_size: int


def target_of(cfg: DictConfig) -> Target:
    """The estimate's target from a ``laps-train`` configuration; ``ValueError`` naming the key."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator") or "auto")
    device = "cpu" if accelerator == "cpu" else "cuda"  # auto / gpu / cuda: the GPU it is run on
    precision = str(OmegaConf.select(cfg, "trainer.precision") or "32-true")
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    devices = OmegaConf.select(cfg, "trainer.devices")
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        per_node = len(devices)
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    else:  # auto / -1: one, unless said
        per_node = 1
    world = per_node * int(OmegaConf.select(cfg, "trainer.num_nodes") or 1)
    length = OmegaConf.select(cfg, "estimate.caption_length")
    if length is None:
        length = int(cfg.dataset.max_words) + 2  # the longest caption: [CLS] words [SEP]
    if int(length) < 2:
        raise ValueError(f"estimate.caption_length must be at least 2 ([CLS] and [SEP]), got {length}")
    vocab = OmegaConf.select(cfg, "backbone.text.vocab_size")
    if vocab is None:
        vocab = synthetic.vocab_size() if cfg.dataset.get("name") == "synthetic" else TEXT_VOCAB_SIZE
    return Target(device, precision, world, int(length), int(vocab))


def build_simulator(cfg: DictConfig, target: Target) -> Simulator:
    """The configured module with random weights, as a :class:`Simulator` for ``target``."""
    module = _random_module(cfg, target)
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val")
    return Simulator(module, HeadPlan.for_device(target.device), cuda=target.device == "cuda",
                     clip_norm=float(clip) if clip else None)


def measure_on_gpu(cfg: DictConfig, target: Target) -> dict[str, float]:
    """The measured peak of the same steps on this machine's GPU (``estimate.measure=true``), in GiB."""
    if not torch.cuda.is_available():
        raise ValueError("estimate.measure=true needs a CUDA GPU on this machine")
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val")
    out = {}
    for name, hardest in (("dense", False), ("hardest", True)):
        module = _random_module(cfg, target)
        shape = shape_for(cfg, target, int(cfg.dataset.batch_size), hardest)
        out[f"measured_peak_{name}_gib"] = measured_peak(module, shape, "cuda", float(clip) if clip else None) / GiB
        del module
        torch.cuda.empty_cache()
    out["measured_peak_gib"] = max(out.values())
    return out


def _random_module(cfg: DictConfig, target: Target):
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.backbone.pretrained = False  # random weights of the same architecture: nothing downloaded
        cfg.model.init_from = None
        cfg.compile = False
    module = build_module(cfg, target.vocab_size)
    param_dtype = PRECISIONS[target.precision][0]
    if param_dtype != torch.float32:
        module.to(param_dtype)
    return module


def shape_for(cfg: DictConfig, target: Target, batch_size: int, hardest: bool) -> StepShape:
    """The :class:`StepShape` of ``batch_size`` pairs per GPU for ``target``."""
    positions = int(getattr(cfg.backbone.text, "config_overrides", {}).get("max_position_embeddings", 512))
    return StepShape(
        batch_size=batch_size,
        caption_length=min(target.caption_length, positions),
        image_size=int(cfg.backbone.image_size),
        vocab_size=target.vocab_size,
        world_size=target.world_size,
        hardest=hardest,
        autocast=PRECISIONS[target.precision][1],
    )


def measure(sim: Simulator, cfg: DictConfig, target: Target, batch_size: int) -> dict[str, Any]:
    """The figures of one batch size per GPU: both steps, the larger peak, in GiB."""
    steps: dict[str, StepMemory] = {}
    corrections: dict[str, float] = {}
    for name, hardest in (("dense", False), ("hardest", True)):
        shape = shape_for(cfg, target, batch_size, hardest)
        steps[name] = sim.step(shape)
        cuda = sim.cuda_forward(shape)
        # the activations under CUDA's autocast op lists, against the CPU's the step ran with
        corrections[name] = 0.0 if cuda is None else float(cuda - steps[name].forward_activations)
    buckets = _ddp_bucket_bytes(sim) if target.world_size > 1 else 0
    peaks = {name: (step.peak + corrections[name] + buckets) / GiB for name, step in steps.items()}
    worst = max(peaks, key=peaks.get)
    at_peak = steps[worst]
    hardest = steps["hardest"]
    return {
        "peak_gib": peaks[worst],
        "peak_dense_gib": peaks["dense"],
        "peak_hardest_gib": peaks["hardest"],
        "peak_step": worst,
        "batch_size": batch_size,
        "global_batch": batch_size * target.world_size,
        "params_gib": at_peak.params / GiB,
        "grads_gib": at_peak.grads / GiB,
        "optimizer_gib": at_peak.optimizer / GiB,
        "activations_gib": (at_peak.activations + corrections[worst]) / GiB,
        "autocast_correction_gib": corrections[worst] / GiB,
        "ddp_buckets_gib": buckets / GiB,
        "flops_per_step": hardest.flops,
        "flops_per_step_dense": steps["dense"].flops,
        "flops_per_pair": hardest.flops / batch_size,
    }


def _ddp_bucket_bytes(sim: Simulator) -> int:
    """DDP's gradient buckets: a copy of every trainable parameter's gradient (``gradient_as_bucket_view``
    off, Lightning's default)."""
    return sum(p.numel() * p.element_size() for p in sim.module.parameters() if p.requires_grad)


def max_batch(
    fits: Callable[[int], float], limit: float, start: int, floor: int = 2, ceiling: int = 1 << 16,
    known: dict[int, float] | None = None,
) -> dict[str, Any]:
    """The largest batch ``b`` in ``[floor, ceiling]`` with ``fits(b) <= limit`` (``fits``: the peak at
    ``b``). Each next batch is the secant's prediction through the two batches tried whose peaks lie
    nearest the limit (a little beyond it while nothing too large has been tried, strictly inside the
    bracket after), bisection when that fails to halve the bracket twice in a row: a nearly linear peak
    takes 3 or 4 simulations. ``known`` (batch -> peak) are batches already simulated. It assumes the
    peak grows with the batch and checks that on the batches it tried. Returns ``max_batch`` (0 when
    ``floor`` does not fit; the data module's smallest batch is 2), ``tried`` (batch -> peak, ``known``
    included) and ``monotone``."""
    tried: dict[int, float] = dict(known or {})

    def fit(b: int) -> None:
        if b not in tried:
            tried[b] = fits(b)

    fit(min(max(floor, start), ceiling))
    width, slow = None, 0
    while True:
        low = max((b for b, p in tried.items() if p <= limit), default=0)
        high = min((b for b, p in tried.items() if p > limit), default=None)
        if (high is not None and high - low <= 1) or (high is None and low >= ceiling) or (not low and high <= floor):
            break
        if high is not None and width is not None:
            slow = slow + 1 if high - low > width / 2 else 0
        width = None if high is None else high - low
        guess = _secant(tried, limit)
        if high is None:  # overshoot a little, to bracket the limit with the next batch
            grow = 2 * low if guess is None else math.ceil(1.02 * guess)
            b = min(max(low + 1, grow), 16 * low, ceiling)
        elif low == 0:
            b = max(floor, high // 2)
        elif guess is None or slow >= 2:
            b, slow = (low + high) // 2, 0
        else:
            b = min(max(low + 1, math.floor(guess)), high - 1)
        fit(b)
    order = sorted(tried)
    monotone = all(tried[a] <= tried[b] for a, b in itertools.pairwise(order))
    return {"max_batch": low, "tried": {b: tried[b] for b in order}, "monotone": monotone}


def _secant(tried: dict[int, float], limit: float) -> float | None:
    """Where the line through the two tried batches whose peaks are nearest ``limit`` reaches it
    (``None`` with fewer than two, or a line that does not rise)."""
    near = sorted(tried, key=lambda b: abs(tried[b] - limit))[:2]
    if len(near) < 2:
        return None
    a, b = sorted(near)
    slope = (tried[b] - tried[a]) / (b - a)
    return b + (limit - tried[b]) / slope if slope > 0 else None


def estimate(cfg: DictConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every figure of ``estimate.json`` for the configuration ``cfg`` (``laps-train``'s, plus ``estimate``)."""
    target = target_of(cfg)
    say = progress or (lambda _msg: None)
    say(f"building {cfg.backbone.name} with random weights")
    sim = build_simulator(cfg, target)
    batch = int(cfg.dataset.batch_size)
    say(f"simulating a step at batch {batch} per GPU")
    result = measure(sim, cfg, target, batch)
    n_params = sum(p.numel() for p in sim.module.parameters())
    result.update({
        "device": target.device,
        "memory": "GPU memory allocated by tensors" if target.device == "cuda"
        else "tensor memory at the peak (not the process's RSS)",
        "backbone": str(cfg.backbone.name),
        "precision": target.precision,
        "world_size": target.world_size,
        "caption_length": shape_for(cfg, target, batch, False).caption_length,
        "gradient_checkpointing": bool(OmegaConf.select(cfg, "model.gradient_checkpointing")),
        "params": n_params,
        "overhead_gib": float(cfg.estimate.overhead_gib),
        "fragmentation": float(cfg.estimate.fragmentation),
        "not_counted": list(NOT_COUNTED),
    })
    if OmegaConf.select(cfg, "estimate.measure"):
        say("measuring the same steps on this machine's GPU")
        result.update(measure_on_gpu(cfg, target))
    cards = OmegaConf.select(cfg, "estimate.max_memory_gib")
    if cards is not None:
        known = {batch: result["peak_gib"]}  # one simulation per batch, shared by the cards

        def peak_at(b: int) -> float:
            if b not in known:
                say(f"  batch {b}")
                known[b] = measure(sim, cfg, target, b)["peak_gib"]
            return known[b]

        listed = not isinstance(cards, (int, float))
        found = {float(card): _search(cfg, float(card), peak_at, batch, say, known) for card in (cards if listed else [cards])}
        result.update(found[float(cards)] if not listed else {
            "max_memory_gib": list(found), "max_batch": {f"{card:g}": f["max_batch"] for card, f in found.items()},
            "max_batch_tried": {str(b): known[b] for b in sorted(known)},
            "max_batch_monotone": all(f["max_batch_monotone"] for f in found.values())})
    return result


def _search(cfg: DictConfig, card: float, peak_at: Callable[[int], float], start: int,
            say: Callable[[str], None], known: dict[int, float]) -> dict[str, Any]:
    """``max_batch`` within a card of ``card`` GiB, less the overhead and the fragmentation (``known``:
    the peaks already simulated, for another card say)."""
    limit = (1.0 - float(cfg.estimate.fragmentation)) * card - float(cfg.estimate.overhead_gib)
    say(f"searching the largest batch within {card:g} GiB")
    found = max_batch(peak_at, limit, start=start, known=known)
    if not found["monotone"]:
        log.warning("the peak did not grow with the batch on the batches tried (%s): max_batch may be off",
                    found["tried"])
    return {"max_memory_gib": card, "max_batch": found["max_batch"],
            "max_batch_tried": {str(b): p for b, p in found["tried"].items()}, "max_batch_monotone": found["monotone"]}


def write_estimate(result: dict[str, Any], output_dir: str | Path) -> Path:
    """``estimate.json`` in ``output_dir``."""
    path = Path(output_dir) / "estimate.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path
