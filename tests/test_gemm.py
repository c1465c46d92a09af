"""laps.models.gemm: oneDNN products agree with torch's, fall back where they must, and the head
gives the same scores and gradients with either kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from laps.models import gemm
from laps.models.head import LAPSHead

needs_onednn = pytest.mark.skipif(gemm._LINEAR is None, reason="this PyTorch build has no oneDNN linear kernel")


@pytest.fixture
def backend():
    """Yields gemm.set_cpu_backend and restores the backend afterwards."""
    before = gemm.cpu_backend()
    yield gemm.set_cpu_backend
    gemm.set_cpu_backend(before)


def _onednn_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if "linear_pointwise" in e.key)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@needs_onednn
@pytest.mark.parametrize("layout", ["contiguous", "a_transposed", "a_row_slice", "b_transposed", "b_row_slice"])
def test_mm_nt_onednn_matches_float64(backend, layout):
    backend("onednn")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 256, generator=gen)
    b = torch.randn(160, 256, generator=gen)
    if layout == "a_transposed":
        a = a.t().contiguous().t()
    elif layout == "a_row_slice":
        a = torch.randn(300, 512, generator=gen)[:, 100:356]
    elif layout == "b_transposed":
        b = b.t().contiguous().t()
    elif layout == "b_row_slice":
        b = torch.randn(160, 300, generator=gen)[:, :256]
    expected = a.double() @ b.double().t()
    assert _onednn_calls(lambda: gemm.mm_nt(a, b)) == 1
    out = gemm.mm_nt(a, b)
    assert out.shape == (300, 160) and out.dtype == torch.float32
    assert _rel(out, expected) < 1e-6


@needs_onednn
def test_bmm_nt_writes_out_and_matches(backend):
    backend("onednn")
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 200, 128, generator=gen)
    b = torch.randn(3, 100, 128, generator=gen)
    out = torch.full((3, 200, 100), float("nan"))
    assert _onednn_calls(lambda: gemm.bmm_nt(a, b, out=out)) == 3
    res = gemm.bmm_nt(a, b, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert _rel(out, torch.bmm(a.double(), b.double().transpose(1, 2))) < 1e-6


def test_small_float64_and_graph_inputs_use_torch(backend):
    gen = torch.Generator().manual_seed(2)
    small = torch.randn(4, 8, generator=gen)
    assert _onednn_calls(lambda: gemm.mm_nt(small, small)) == 0
    a64 = torch.randn(300, 256, dtype=torch.float64, generator=gen)
    b64 = torch.randn(160, 256, dtype=torch.float64, generator=gen)
    assert _onednn_calls(lambda: gemm.mm_nt(a64, b64)) == 0
    assert torch.equal(gemm.mm_nt(a64, b64), torch.mm(a64, b64.t()))
    # an input that records a graph takes torch's differentiable kernels
    a = torch.randn(300, 256, generator=gen, requires_grad=True)
    b = torch.randn(160, 256, generator=gen)
    assert _onednn_calls(lambda: gemm.mm_nt(a, b)) == 0
    gemm.mm_nt(a, b).sum().backward()
    torch.testing.assert_close(a.grad, b.sum(0).expand(300, 256))


@needs_onednn
def test_linear_forward_and_gradients_match_f_linear(backend):
    backend("onednn")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 197, 256, generator=gen, requires_grad=True)
    w = torch.randn(96, 256, generator=gen, requires_grad=True)
    bias = torch.randn(96, generator=gen, requires_grad=True)
    g = torch.randn(4, 197, 96, generator=gen)
    assert _onednn_calls(lambda: gemm.linear(x, w, bias)) == 1
    y = gemm.linear(x, w, bias)
    grads = torch.autograd.grad(y, (x, w, bias), g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, bias))
    y64 = F.linear(x64, w64, b64)
    grads64 = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    assert _rel(y, y64) < 1e-6
    for got, want in zip(grads, grads64):
        assert _rel(got, want) < 1e-6


@needs_onednn
def test_linear_under_autocast_is_f_linear(backend):
    backend("onednn")
    x = torch.randn(4, 197, 256)
    w = torch.randn(96, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _onednn_calls(lambda: gemm.linear(x, w)) == 0
        assert gemm.linear(x, w).dtype == torch.bfloat16


def test_set_cpu_backend_rejects_unknown(backend):
    with pytest.raises(ValueError, match="onednn"):
        backend("mkl")


@needs_onednn
@pytest.mark.parametrize("loss", ["sum", "hardest"])
def test_head_same_scores_and_gradients_with_either_kernels(backend, loss):
    """ViT-B/16 shapes (every product above the oneDNN threshold): oneDNN vs torch kernels, fp32."""
    gen = torch.Generator().manual_seed(4)
    img = torch.randn(12, 197, 512, generator=gen)
    cap = torch.randn(10, 20, 512, generator=gen)
    lens = torch.randint(4, 21, (10,), generator=gen)
    head = LAPSHead(512, 196, 0.5, 0.4)
    results = {}
    for name in ("onednn", "torch"):
        backend(name)
        head.zero_grad(set_to_none=True)
        x, c = img.clone().requires_grad_(), cap.clone().requires_grad_()
        sims, _ = head.similarity(x, c, lens, return_mask=True)
        if loss == "sum":
            sims.sum().backward()
        else:  # a few pairs carry a gradient: the per-image recomputation path
            sims.max(dim=1).values.sum().backward()
        with torch.no_grad():
            scores, _ = head.similarity(img, cap, lens)
        params = [p.grad for p in head.parameters()]
        results[name] = (sims.detach(), scores, x.grad, c.grad, *params)
        if name == "onednn":
            assert _onednn_calls(lambda: head.similarity(img, cap, lens)) > 0
    for got, want in zip(results["onednn"], results["torch"]):
        # an absolute floor for gradients that vanish analytically (the last bias of the aggregation
        # MLP: a per-column shift does not change a softmax over patches), where both are rounding
        err = float((got.double() - want.double()).abs().max())
        assert err <= 1e-5 * float(want.abs().max()) + 1e-6
