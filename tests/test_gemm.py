"""laps.models.gemm: oneDNN products agree with torch's, fall back where they must, and the head
gives the same scores and gradients with either kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from laps.models import gemm
from laps.models.head import HeadPlan, LAPSHead

needs_onednn = pytest.mark.skipif(gemm._LINEAR is None, reason="this PyTorch build has no oneDNN linear kernel")


@pytest.fixture
def backend(monkeypatch):
    """Yields gemm.set_cpu_backend and restores the backend afterwards. Every oneDNN call of the test
    is checked for a contiguous right-hand factor (a strided one runs a reference kernel thousands of
    times slower, with the same values)."""
    before = gemm.cpu_backend()
    if gemm._LINEAR is not None:
        kernel = gemm._LINEAR

        def checked(a, b, *args):
            assert b.is_contiguous(), f"oneDNN right-hand factor with strides {b.stride()}"
            return kernel(a, b, *args)

        monkeypatch.setattr(gemm, "_LINEAR", checked)
    yield gemm.set_cpu_backend
    gemm.set_cpu_backend(before)


def _onednn_calls(fn) -> int:
    """oneDNN linear kernels run by ``fn()``."""
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


@needs_onednn
@pytest.mark.parametrize("grad_of", ["a", "b"])
def test_small_float64_and_graph_inputs_use_torch(backend, grad_of):
    backend("onednn")
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(300, 256, generator=gen)
    b = torch.randn(160, 256, generator=gen)
    assert _onednn_calls(lambda: gemm.mm_nt(a, b)) == 1  # the control: these sizes go to oneDNN
    small = torch.randn(4, 8, generator=gen)
    assert _onednn_calls(lambda: gemm.mm_nt(small, small)) == 0
    a64, b64 = a.double(), b.double()
    assert _onednn_calls(lambda: gemm.mm_nt(a64, b64)) == 0
    assert torch.equal(gemm.mm_nt(a64, b64), torch.mm(a64, b64.t()))
    # an input that records a graph takes torch's differentiable kernels
    leaf = (a if grad_of == "a" else b).requires_grad_()
    assert _onednn_calls(lambda: gemm.mm_nt(a, b)) == 0
    gemm.mm_nt(a, b).sum().backward()
    expected = b.detach().sum(0).expand(300, 256) if grad_of == "a" else a.detach().sum(0).expand(160, 256)
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_forward_and_gradients_match_f_linear(backend, with_bias):
    """Forward and input gradient in oneDNN (one call each), all gradients as F.linear's in float64."""
    backend("onednn")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 197, 256, generator=gen, requires_grad=True)
    w = torch.randn(96, 256, generator=gen, requires_grad=True)
    bias = torch.randn(96, generator=gen, requires_grad=True) if with_bias else None
    g = torch.randn(4, 197, 96, generator=gen)
    inputs = (x, w, bias) if with_bias else (x, w)
    assert _onednn_calls(lambda: gemm.linear(x, w, bias)) == 1
    y = gemm.linear(x, w, bias)
    grads = []
    assert _onednn_calls(lambda: grads.extend(torch.autograd.grad(y, inputs, g, retain_graph=True))) == 1
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    y64 = F.linear(*inputs64)
    grads64 = torch.autograd.grad(y64, inputs64, g.double())
    assert _rel(y, y64) < 1e-6
    for got, want in zip(grads, grads64):
        assert _rel(got, want) < 1e-6


@needs_onednn
def test_linear_gradient_of_the_weight_only_and_double_backward(backend):
    backend("onednn")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 197, 256, generator=gen)
    w = torch.randn(96, 256, generator=gen, requires_grad=True)
    (d_w,) = torch.autograd.grad(gemm.linear(x, w).sum(), (w,))
    torch.testing.assert_close(d_w, x.sum(dim=(0, 1)).expand(96, 256), rtol=1e-5, atol=1e-3)
    # create_graph: the backward's products take torch's differentiable kernels
    x.requires_grad_()
    (d_x,) = torch.autograd.grad(gemm.linear(x, w).pow(2).sum(), (x,), create_graph=True)
    (dd_w,) = torch.autograd.grad(d_x.sum(), (w,))
    x64, w64 = x.detach().double(), w.detach().double().requires_grad_()
    (d_x64,) = torch.autograd.grad(F.linear(x64.requires_grad_(), w64).pow(2).sum(), (x64,), create_graph=True)
    (dd_w64,) = torch.autograd.grad(d_x64.sum(), (w64,))
    assert _rel(dd_w, dd_w64) < 1e-5


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
@pytest.mark.parametrize("chunk_pairs", [None, 16])
@pytest.mark.parametrize("loss", ["sum", "hardest"])
def test_head_same_scores_and_gradients_with_either_kernels(backend, loss, chunk_pairs):
    """ViT-B/16 shapes (the large products above the oneDNN threshold), one or several image blocks:
    oneDNN vs torch kernels, fp32. A fresh head per kernel, so both run the same forward paths."""
    gen = torch.Generator().manual_seed(4)
    img = torch.randn(12, 197, 512, generator=gen)
    cap = torch.randn(10, 20, 512, generator=gen)
    lens = torch.randint(4, 21, (10,), generator=gen)
    state = LAPSHead(512, 196, 0.5, 0.4).state_dict()
    results = {}
    for name in ("onednn", "torch"):
        backend(name)
        head = LAPSHead(512, 196, 0.5, 0.4, chunk_pairs=chunk_pairs)
        head.load_state_dict(state)
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
            assert _onednn_calls(lambda head=head: head.similarity(img, cap, lens)) > 0
    for got, want in zip(results["onednn"], results["torch"]):
        # an absolute floor for gradients that vanish analytically (the last bias of the aggregation
        # MLP: a per-column shift does not change a softmax over patches), where both are rounding
        err = float((got.double() - want.double()).abs().max())
        assert err <= 1e-5 * float(want.abs().max()) + 1e-6


@needs_onednn
def test_aggregation_with_hooked_or_replaced_layers_runs_them(backend):
    """A forward hook on the MLP's Linear (or a Linear replaced by a wrapper) still runs."""
    backend("onednn")
    head = LAPSHead(512, 196, 0.5, 0.4)
    tokens = torch.randn(3, 197, 512)
    plain = head.aggregation(tokens)
    seen = []
    head.aggregation.mlp[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    hooked = head.aggregation(tokens)
    assert seen == [torch.Size([3, 197, 102])]
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize(("process", "planned"), [("onednn", "torch"), ("torch", "onednn")])
def test_head_plan_fixes_the_kernels_in_forward_and_backward(backend, process, planned):
    """A head whose plan names its kernels uses them whatever the process default is, also in the
    backward (which autograd runs outside the forward's scope); the default is unchanged after."""
    backend(process)
    gen = torch.Generator().manual_seed(5)
    img = torch.randn(6, 197, 512, generator=gen).requires_grad_()
    cap = torch.randn(8, 20, 512, generator=gen).requires_grad_()
    lens = torch.randint(4, 21, (8,), generator=gen)
    head = LAPSHead(512, 196, 0.5, 0.4, plan=HeadPlan.for_device("cpu").replace(gemm=planned))
    sims, _ = head.similarity(img, cap, lens)
    assert gemm.cpu_backend() == process
    backward_calls = _onednn_calls(lambda: sims.sum().backward())
    assert (backward_calls > 0) == (planned == "onednn")
    assert (_onednn_calls(lambda: head.similarity(img, cap, lens)) > 0) == (planned == "onednn")
    assert gemm.cpu_backend() == process
