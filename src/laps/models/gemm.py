"""Matrix products of the head: oneDNN for float32 on AVX-512 CPUs, ``torch.mm``/``torch.bmm`` elsewhere.

PyTorch's float32 ``torch.mm`` on CPU calls MKL, which on AMD processors runs its AVX2 kernels;
oneDNN, which ships inside PyTorch and serves its compiler's linear layers, runs AVX-512 there, about
twice as fast (``docs/benchmarks.md`` has the figures). Both are exact float32 arithmetic (no
reduced-precision math mode); only the order of the sums differs. oneDNN is the default where
PyTorch reports AVX-512 (the only kind of CPU it was timed on)
and ``torch.backends.mkldnn`` is enabled; other dtypes (bf16 under autocast, float64), small
products, inputs that record a graph and other devices go to torch, which picks its own kernels.

:func:`set_cpu_backend` switches between the two for the process, for instance to time the head
with the same kernels as a reference implementation (``laps-bench --cpu-gemm torch``);
:func:`cpu_backend_scope` for a block of code in the current thread (a head's
:class:`~laps.models.head.HeadPlan` that names its kernels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bmm_nt", "cpu_backend", "cpu_backend_scope", "linear", "mm_nt", "onednn_for", "set_cpu_backend"]

CPU_BACKENDS = ("onednn", "torch")
# Below this many multiply-adds a call's fixed cost (primitive lookup, weight reorder) outweighs
# the faster kernel; per batch item for bmm_nt, which calls oneDNN once per item.
MIN_MACS = 1 << 21


def _onednn_linear():
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _default_backend() -> str:
    if _LINEAR is None:
        return "torch"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return "torch"
    return "onednn" if capability.startswith("AVX512") else "torch"


_LINEAR = _onednn_linear()
_default = {"backend": _default_backend()}
# set by cpu_backend_scope: the backend of the current thread's block, over the process default
_scoped: ContextVar[str | None] = ContextVar("laps_cpu_gemm_backend", default=None)


def cpu_backend() -> str:
    """The kernels of float32 CPU products here and now: ``onednn`` or ``torch``."""
    scoped = _scoped.get()
    return _default["backend"] if scoped is None else scoped


def _check_backend(name: str) -> None:
    if name not in CPU_BACKENDS:
        raise ValueError(f"CPU GEMM backend must be one of {CPU_BACKENDS}, got {name!r}")
    if name == "onednn" and _LINEAR is None:
        raise RuntimeError("this PyTorch build has no oneDNN linear kernel (torch.ops.mkldnn._linear_pointwise)")


def set_cpu_backend(name: str) -> None:
    """Use ``onednn`` (the default on AVX-512 CPUs) or ``torch`` kernels for float32 CPU products."""
    _check_backend(name)
    _default["backend"] = name


@contextlib.contextmanager
def cpu_backend_scope(name: str | None) -> Iterator[None]:
    """Use the ``name`` kernels in the current thread within the block; ``None`` changes nothing."""
    if name is None:
        yield
        return
    _check_backend(name)
    token = _scoped.set(name)
    try:
        yield
    finally:
        _scoped.reset(token)


def onednn_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether large products of tensors of this device and dtype go to oneDNN: float32 on CPU,
    outside autocast (which computes them in its own dtype), with ``torch.backends.mkldnn`` on."""
    return (
        cpu_backend() == "onednn"
        and device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def _onednn(a: Tensor, b: Tensor, macs: int) -> bool:
    return (
        macs >= MIN_MACS
        and onednn_for(a.device, a.dtype)
        and b.dtype == torch.float32
        # the kernel has no autograd formula: only where nothing records a graph
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    )


def _linear(a: Tensor, b: Tensor) -> Tensor:
    # oneDNN takes a strided (also a transposed) left-hand side, but a strided right-hand side (even
    # a row-padded one) sends it to a reference kernel thousands of times slower than a copy
    return _LINEAR(a, b.contiguous(), None, "none", [], "")


def mm_nt(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b^T`` for ``a`` (m, k) and ``b`` (n, k): (m, n).

    ``out`` (m, n) is a buffer the product may be written to; use the returned tensor (oneDNN
    returns a new one, which is cheaper than copying it over).
    """
    if _onednn(a, b, a.shape[0] * a.shape[1] * b.shape[0]):
        return _linear(a, b)
    return torch.mm(a, b.t(), out=out)


def bmm_nt(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b^T`` per batch item for ``a`` (B, m, k) and ``b`` (B, n, k): (B, m, n).

    With ``out`` the result is written there; on the oneDNN path items are computed one by one.
    """
    batch, m, k = a.shape
    n = b.shape[1]
    if not _onednn(a, b, m * n * k):
        return torch.bmm(a, b.transpose(1, 2), out=out)
    if out is None:
        if batch == 1:
            return _linear(a[0], b[0]).unsqueeze(0)
        out = a.new_empty(batch, m, n)
    for i in range(batch):
        out[i] = _linear(a[i], b[i])
    return out


class _OneDNNLinear(torch.autograd.Function):
    """``x W^T + b`` with the forward and the input gradient in oneDNN (the weight gradient, whose
    factors are both transposed, in torch's kernels)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.backend = cpu_backend()  # backward may run outside the forward's cpu_backend_scope
        flat = x.reshape(-1, x.shape[-1])
        return _LINEAR(flat, weight.contiguous(), bias, "none", [], "").view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Under create_graph the factors record a graph, so mm_nt takes torch's differentiable kernels.
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[0]:
            with cpu_backend_scope(ctx.backend):
                d_x = mm_nt(g, weight.t()).view_as(x)
        if ctx.needs_input_grad[1]:
            d_w = torch.mm(g.t(), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_b = g.sum(0)
        return d_x, d_w, d_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``; through oneDNN (forward and input gradient) for large float32 CPU inputs."""
    if (
        onednn_for(x.device, x.dtype)
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.numel() * weight.shape[0] >= MIN_MACS
    ):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
