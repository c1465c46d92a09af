"""One steady-state training step of :class:`laps.training.module.LAPSLitModule` on fake tensors.

The step is the module's own ``training_step`` (encoders, gathered batch, head, hinge and ratio
losses), then backward, gradient clipping and the optimizer step, as Lightning runs them; the
optimizer's states exist beforehand (steady state). Which pairs carry a gradient is declared
(:func:`gradient_pattern`), not read from values, which fake tensors do not have.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

from laps.estimate.fake import cpu_autocast, cuda_autocast, fake_module_, gpu_attention, new_fake_mode
from laps.models.head import LAPSHead
from laps.models.head.plan import HeadPlan

TOTAL = "Total"


class PeakTracker(MemTracker):
    """``MemTracker`` that keeps the peak per device only. Its per-module peaks, which the estimate
    does not read, walk every module of the model at every operator: most of a simulation's time."""

    def _update_peak_stats(self, peak_state) -> None:  # one peak, forward or backward
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[TOTAL]:
                self._peak_mem[device] = snapshot[TOTAL]
                self._peak_mem_snap[device] = dict(snapshot)


@dataclass(frozen=True)
class StepShape:
    """What one simulated step is: ``batch_size`` pairs per GPU of ``world_size``, images of
    ``image_size`` px, captions of ``caption_length`` tokens ([CLS] and [SEP] included), a vocabulary
    of ``vocab_size``, hardest negatives (``hardest``) or the sum over negatives, and the autocast
    dtype (``None``: none)."""

    batch_size: int
    caption_length: int
    image_size: int
    vocab_size: int
    world_size: int = 1
    hardest: bool = False
    autocast: torch.dtype | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size


@dataclass(frozen=True)
class StepMemory:
    """A step's tensor memory in bytes, at its peak (``peak`` and what it holds then), and its FLOPs.

    ``forward_activations``: held at the end of the forward (what backward will read)."""

    peak: int
    params: int
    grads: int
    optimizer: int
    activations: int
    forward_activations: int
    flops: int


def gradient_pattern(n: int, hardest: bool) -> np.ndarray:
    """The pairs of an ``n x n`` batch whose similarity gets a gradient from the hinge loss.

    The sum over negatives (the warm-up): every pair. Hardest negatives: the positive pair, the
    hardest caption of each image and the hardest image of each caption, three per row; which
    ones is arbitrary (the memory depends on their number, not on where they are).
    """
    if not hardest:
        return np.ones((n, n), dtype=bool)
    pattern = np.zeros((n, n), dtype=bool)
    rows = np.arange(n)
    pattern[rows, rows] = True
    pattern[rows, (rows + 1) % n] = True  # the hardest caption of image i
    pattern[(rows + 2) % n, rows] = True  # the hardest image of caption j
    return pattern


def fake_batch(shape: StepShape, device: str, mode: FakeTensorMode) -> dict[str, torch.Tensor]:
    """A training batch of random values on fake ``device`` tensors; the caption lengths are real
    (the head plans its blocks from them on the host) and all ``caption_length`` long: the worst batch."""
    b = shape.batch_size
    lengths = torch.full((b,), shape.caption_length, dtype=torch.long)
    with mode:
        return {
            "images": torch.empty(b, 3, shape.image_size, shape.image_size, device=device),
            "input_ids": torch.randint(0, shape.vocab_size, (b, shape.caption_length), device=device),
            "lengths": lengths,
            "image_indices": torch.arange(b, device=device),
        }


def simulated_gather(world_size: int, lengths: torch.Tensor):
    """A replacement for ``LAPSLitModule.gather_batch`` on one process standing for ``world_size``:
    the other ranks' embeddings are new tensors of the same shape (as ``all_gather`` returns), the
    concatenation keeps the gradient path to this rank's; ``lengths`` (real) are the global batch's."""

    def gather(img: torch.Tensor, cap: torch.Tensor, lens: torch.Tensor, ids: torch.Tensor) -> tuple:
        if world_size > 1:
            img = torch.cat([img] + [torch.empty_like(img.detach()) for _ in range(world_size - 1)])
            cap = torch.cat([cap] + [torch.empty_like(cap.detach()) for _ in range(world_size - 1)])
            ids = torch.arange(img.shape[0], device=ids.device)
        return img, cap, lengths, ids

    return gather


def init_optimizer_state(module, optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's states (one step with zero gradients): the steady state of training."""
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _step_settings(module, shape: StepShape, lengths: torch.Tensor) -> Iterator[None]:
    """The module set up for a step of ``shape``, restored after."""
    head, hparams = module.net.head, module.hparams
    # A LAPS head's backward reads which pairs carry a gradient; a pooling head's (model=vse) is
    # one GEMM whatever they are: it needs no declared pattern.
    laps_head = isinstance(head, LAPSHead)
    saved = (module.gather_batch, hparams.vse_mean_warmup_epochs)
    saved_head = (head.declared_gradients, head.feedback.sparse) if laps_head else None
    module.gather_batch = simulated_gather(shape.world_size, lengths)
    if laps_head:
        head.declared_gradients = gradient_pattern(shape.global_batch, shape.hardest)
        # the steady state: after a hardest-negative backward the forward keeps no intermediates
        head.feedback.sparse = shape.hardest
    hparams.vse_mean_warmup_epochs = 0 if shape.hardest else 10**9
    try:
        with warnings.catch_warnings():  # self.log() without a Trainer: a warning, nothing logged
            warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
            yield
    finally:
        module.gather_batch, hparams.vse_mean_warmup_epochs = saved
        if laps_head:
            head.declared_gradients, head.feedback.sparse = saved_head


def simulate_step(
    module, optimizer: torch.optim.Optimizer, shape: StepShape, mode: FakeTensorMode,
    clip_norm: float | None = None,
) -> StepMemory:
    """One training step of ``module`` (its parameters fake CPU tensors, :func:`fake_module_`) with
    ``optimizer`` (states created: :func:`init_optimizer_state`): its tensor memory and FLOPs."""
    batch = fake_batch(shape, "cpu", mode)
    lengths = batch["lengths"].repeat(shape.world_size)
    module.train()
    tracker = PeakTracker()
    tracker.track_external(module, optimizer)
    flops = FlopCounterMode(display=False)
    with _step_settings(module, shape, lengths), mode, tracker, flops:
        with cpu_autocast(shape.autocast):
            loss = module.training_step(batch, 0)
        after_forward = tracker.get_tracker_snapshot("current")
        loss.backward()
        params = [p for p in module.parameters() if p.grad is not None]
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _memory(tracker.get_tracker_snapshot("peak"), after_forward, flops.get_total_flops())


def forward_activations_cuda(module, shape: StepShape, mode: FakeTensorMode) -> int:
    """Bytes the forward of a training step holds at its end on fake CUDA tensors, under CUDA's
    autocast (the module's parameters must be fake CUDA tensors): the CUDA code path of every
    part of the step, and the activations under CUDA's op lists and with its attention kernels
    (:func:`~laps.estimate.fake.gpu_attention`)."""
    batch = fake_batch(shape, "cuda", mode)
    lengths = batch["lengths"].repeat(shape.world_size)
    module.train()
    tracker = PeakTracker()
    tracker.track_external(module)
    with _step_settings(module, shape, lengths), mode, tracker:
        with cuda_autocast(shape.autocast), gpu_attention():
            loss = module.training_step(batch, 0)
        snapshot = tracker.get_tracker_snapshot("current")
        del loss
    return _activation_bytes(snapshot, "cuda")


def _device_snapshot(snapshot: dict, device_type: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for device, parts in snapshot.items():
        if torch.device(device).type == device_type:
            for key, value in parts.items():
                name = str(getattr(key, "value", key))
                out[name] = out.get(name, 0) + int(value)
    return out


def _activation_bytes(snapshot: dict, device_type: str) -> int:
    parts = _device_snapshot(snapshot, device_type)
    return parts.get("Activation", 0) + parts.get("Temp", 0)


def _memory(peak: dict, after_forward: dict, flops: int) -> StepMemory:
    parts = _device_snapshot(peak, "cpu")
    return StepMemory(
        peak=parts.get(TOTAL, 0),
        params=parts.get("Parameter", 0) + parts.get("Buffer", 0),
        grads=parts.get("Gradient", 0),
        optimizer=parts.get("Optstate", 0),
        activations=parts.get("Activation", 0) + parts.get("Temp", 0) + parts.get("Other", 0),
        forward_activations=_activation_bytes(after_forward, "cpu"),
        flops=int(flops),
    )


class Simulator:
    """Simulated training steps of one module at any batch size.

    ``module`` (a :class:`~laps.training.module.LAPSLitModule` with real, random weights) is
    consumed: its parameters become fake CPU tensors, with the optimizer of its
    ``configure_optimizers`` in steady state; with ``cuda`` a copy on fake CUDA tensors runs the
    forward on the CUDA code path. The head takes ``plan`` (the GPU's :class:`HeadPlan` for GPU
    trainers); ``clip_norm`` is the trainer's ``gradient_clip_val``.
    """

    def __init__(self, module, plan: HeadPlan, cuda: bool, clip_norm: float | None = None) -> None:
        self.mode = new_fake_mode()
        self.clip_norm = clip_norm
        if isinstance(module.net.head, LAPSHead):  # a pooling head (model=vse) has no blocks to plan
            module.net.head.plan = plan
        self.cuda_module = fake_module_(copy.deepcopy(module), self.mode, "cuda") if cuda else None
        self.module = fake_module_(module, self.mode, "cpu")
        configured = module.configure_optimizers()
        self.optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        for group in self.optimizer.param_groups:
            if "foreach" in group and group.get("fused") is not True:
                group["foreach"] = True  # torch's default on CUDA (temporaries the size of the parameters)
        with self.mode:
            init_optimizer_state(self.module, self.optimizer)

    def step(self, shape: StepShape) -> StepMemory:
        """The memory and FLOPs of a step of ``shape`` (on fake CPU tensors)."""
        return simulate_step(self.module, self.optimizer, shape, self.mode, self.clip_norm)

    def cuda_forward(self, shape: StepShape) -> int | None:
        """:func:`forward_activations_cuda` of ``shape``; ``None`` without the CUDA copy."""
        if self.cuda_module is None:
            return None
        return forward_activations_cuda(self.cuda_module, shape, self.mode)


def measured_peak(module, shape: StepShape, device: str = "cuda", clip_norm: float | None = None) -> int:
    """``torch.cuda.max_memory_allocated`` of the same step on a real device (random values; the
    optimizer's states created first), in bytes: the check of :class:`Simulator` on hardware.
    ``module`` (real weights) is moved to ``device``."""
    module.to(device)
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    init_optimizer_state(module, optimizer)
    lengths = torch.full((shape.global_batch,), shape.caption_length, dtype=torch.long)
    b = shape.batch_size
    batch = {
        "images": torch.randn(b, 3, shape.image_size, shape.image_size, device=device),
        "input_ids": torch.randint(0, shape.vocab_size, (b, shape.caption_length), device=device),
        "lengths": lengths[:b].to(device),
        "image_indices": torch.arange(b, device=device),
    }
    module.train()
    peak = 0
    with _step_settings(module, shape, lengths):
        for _ in range(2):  # the second step is the steady state
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast("cuda", dtype=shape.autocast or torch.float32, enabled=shape.autocast is not None):
                loss = module.training_step(batch, 0)
            loss.backward()
            if clip_norm:
                torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
    return int(peak)
