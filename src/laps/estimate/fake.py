"""Fake tensors: a model's parameters without storage, CUDA autocast under the fake mode, the peak.

``torch._subclasses.fake_tensor.FakeTensorMode`` runs operators on tensors that carry a shape, a
dtype and a device but no data, so a training step of any size runs on this CPU and allocates
nothing; ``torch.distributed._tools.mem_tracker.MemTracker`` adds up what such a step would
allocate (``../shared/notes/fake-tensor-memory.md`` gives the method and its calibration).
Forward passes run on fake CUDA tensors; the autograd engine needs a real CUDA device for a
backward, so backward runs on fake CPU tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode


def new_fake_mode() -> FakeTensorMode:
    """A fake mode that admits real tensors made outside it (the caption lengths, whose values the
    head plans with on the host); an operator that takes one turns it into a fake tensor. Tensors
    made inside it are fake, so a CPU tensor a CUDA branch creates meets the CUDA ones as a device
    mismatch (``FakeTensorDeviceMismatchError``)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_module_(module: nn.Module, mode: FakeTensorMode, device: str | torch.device = "cpu") -> nn.Module:
    """Replace, in place, every parameter and buffer of ``module`` by a fake tensor on ``device``
    (same shape, dtype and ``requires_grad``); the real values are dropped. Returns ``module``."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(_fake(param.detach(), mode, device),
                                                     requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = _fake(buf, mode, device)
    return module


def _fake(tensor: torch.Tensor, mode: FakeTensorMode, device: str | torch.device) -> torch.Tensor:
    fake = mode.from_tensor(tensor)
    if fake.device == torch.device(device):
        return fake
    with mode:
        return fake.to(device)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """CUDA autocast in ``dtype`` (``None``: off) for fake CUDA tensors. ``torch.autocast("cuda")``
    turns itself off on a machine without CUDA; the thread-local switches below do not."""
    if dtype is None:
        yield
        return
    enabled, old_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", old_dtype)
        torch.clear_autocast_cache()


@contextlib.contextmanager
def cpu_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """CPU autocast in ``dtype`` (``None``: off), for the step on fake CPU tensors."""
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        yield
