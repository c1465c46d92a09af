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


def _memory_efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False):
    """``scaled_dot_product_attention`` through the CUDA memory-efficient kernel's operator, whose
    fake implementation gives its outputs and what autograd keeps (the output and the log-sum-exp,
    not the attention matrix). (GQA, which the encoders here do not use, is not supported.)"""
    if enable_gqa:
        raise ValueError("the fake-CUDA attention does not implement enable_gqa")
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, float("-inf"))
        attn_mask = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def gpu_attention() -> Iterator[None]:
    """Attention as a GPU runs it, on fake CUDA tensors. Without a device to ask, the fused
    ``scaled_dot_product_attention`` falls back to the math path, which keeps the attention
    matrices; a GPU takes the flash or memory-efficient kernel, which keep the output and the
    log-sum-exp only. Inside this context the memory-efficient kernel's operator is called."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _memory_efficient_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
