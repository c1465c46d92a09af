"""The CUDA code path on a machine without a GPU: fake CUDA tensors (``laps.estimate.fake``).

Forward passes run on fake CUDA tensors with CUDA's bf16 autocast switched on the way that works
under the fake mode; a tensor a CUDA branch leaves on the CPU, or in the wrong dtype, fails them
(a device mismatch, or the dtype asserts). The autograd engine needs a real device for a
backward through CUDA tensors, so the head's backward with the GPU plan runs on fake CPU tensors.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from torch import nn

from laps.estimate.fake import cuda_autocast, fake_module_, new_fake_mode
from laps.evaluation import score_matrix
from laps.models import create_model
from laps.models.head import HeadPlan, LAPSHead

GPU_PLAN = HeadPlan.for_device("cuda")


def _tiny_on(device: str, mode):
    torch.manual_seed(0)
    model = create_model("tiny", vocab_size=100)
    model.head.plan = GPU_PLAN
    return fake_module_(model, mode, device)


def _linear_dtypes(model: nn.Module) -> list[torch.dtype]:
    """Output dtypes of every nn.Linear of the encoders, recorded by hooks while the model runs."""
    seen: list[torch.dtype] = []
    for module in (model.vision, model.text):
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                sub.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("training", [True, False])
def test_encoders_and_head_forward_on_fake_cuda_under_bf16_autocast(training: bool) -> None:
    mode = new_fake_mode()
    model = _tiny_on("cuda", mode).train(training)
    dtypes = _linear_dtypes(model)
    lengths = torch.tensor([12, 5, 9, 12])  # real: the head plans its blocks from them
    with mode, cuda_autocast(torch.bfloat16):
        images = torch.empty(3, 3, 64, 64, device="cuda")
        ids = torch.randint(0, 100, (4, 12), device="cuda")
        img = model.encode_image(images)
        cap = model.encode_text(ids, lengths)
        sims, mask = model.head.similarity(img, cap, lengths, return_mask=True)
    assert dtypes and set(dtypes) == {torch.bfloat16}, "CUDA autocast was not in effect"
    assert img.device.type == cap.device.type == sims.device.type == mask.device.type == "cuda"
    assert sims.shape == (3, 4) and sims.dtype == torch.float32  # the head scores in fp32
    assert mask.shape == (3, 4, model.head.num_patches)


def test_f30k_size_scoring_on_fake_cuda_with_the_gpu_plan() -> None:
    """1,000 images x 5,000 captions, ViT-B/16 geometry, through the evaluation's scoring."""
    mode = new_fake_mode()
    head = fake_module_(LAPSHead(embed_dim=512, num_patches=196, plan=GPU_PLAN), mode, "cuda").eval()
    lengths = torch.randint(8, 40, (5000,), generator=torch.Generator().manual_seed(0))
    with mode, cuda_autocast(torch.bfloat16):
        img = torch.empty(1000, 197, 512, device="cuda", dtype=torch.float16)  # stored half, as evaluation may
        cap = torch.empty(5000, 40, 512, device="cuda")
        sims = score_matrix(head, img, cap, lengths, image_block=128, progress=False)
    assert sims.shape == (1000, 5000) and sims.dtype == torch.float32 and sims.device.type == "cpu"


@pytest.mark.parametrize("hardest", [False, True])
def test_head_backward_with_the_gpu_plan_on_fake_cpu(hardest: bool) -> None:
    from laps.estimate.step import gradient_pattern

    mode = new_fake_mode()
    head = fake_module_(LAPSHead(embed_dim=64, num_patches=49, plan=GPU_PLAN), mode, "cpu").train()
    n = 12
    head.declared_gradients = gradient_pattern(n, hardest)
    lengths = torch.randint(4, 16, (n,), generator=torch.Generator().manual_seed(1))
    with mode:
        img = torch.empty(n, 50, 64, requires_grad=True)
        cap = torch.empty(n, 16, 64, requires_grad=True)
        sims, _ = head.similarity(img, cap, lengths, return_mask=True)
        sims.sum().backward()
    assert img.grad.shape == img.shape and img.grad.dtype == img.dtype
    assert cap.grad.shape == cap.shape and cap.grad.dtype == cap.dtype
    assert all(p.grad is not None and p.grad.shape == p.shape for p in head.aggregation.parameters())
    assert head.feedback.sparse == hardest  # three pairs per image: the sparse backward


def test_declared_gradient_pattern_gives_the_gradients_read_from_values() -> None:
    """On real tensors, declaring the pairs that carry a gradient changes nothing."""
    torch.manual_seed(0)
    head = LAPSHead(embed_dim=32, num_patches=16, has_cls=True).train()
    img = torch.randn(6, 17, 32)
    cap = torch.randn(6, 9, 32)
    lengths = torch.tensor([9, 4, 7, 9, 5, 6])
    weights = torch.zeros(6, 6)
    weights[torch.arange(6), torch.arange(6)] = 1.0
    weights[torch.arange(6), (torch.arange(6) + 1) % 6] = -0.5
    grads = []
    for declared in (None, (weights != 0).numpy()):
        head.declared_gradients = declared
        head.feedback.sparse = False
        a, c = img.clone().requires_grad_(), cap.clone().requires_grad_()
        sims, _ = head.similarity(a, c, lengths, return_mask=True)
        (sims * weights).sum().backward()
        grads.append((a.grad, c.grad, head.aggregation.mlp[1].weight.grad.clone()))
        head.zero_grad()
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_gpu_attention_runs_the_fused_kernel_on_fake_cuda() -> None:
    """Without it the fused attention falls back to the math path on fake CUDA tensors (it cannot ask
    the device), which keeps attention matrices a GPU never holds."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from laps.estimate.fake import gpu_attention

    class Ops(TorchDispatchMode):
        seen: ClassVar[set[str]] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    mode = new_fake_mode()
    model = _tiny_on("cuda", mode).train()
    for fused in (False, True):
        Ops.seen = set()
        with mode, Ops(), cuda_autocast(torch.bfloat16), (gpu_attention() if fused else _nothing()):
            model.encode_image(torch.empty(2, 3, 64, 64, device="cuda"))
            model.encode_text(torch.randint(0, 100, (2, 10), device="cuda"), torch.tensor([10, 6]))
        efficient = "aten._scaled_dot_product_efficient_attention.default" in Ops.seen
        assert efficient == fused and ("aten._safe_softmax.default" in Ops.seen) != fused


def _nothing():
    import contextlib

    return contextlib.nullcontext()
