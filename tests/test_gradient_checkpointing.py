"""Activation checkpointing of the encoders (``LAPSModel.set_gradient_checkpointing``), over every
backbone config: the blocks run again in backward, the gradients are those without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_backbones import BACKBONE_FILES, _tiny_from_config


def _step(model, images, ids, lens) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Gradients of a training step and the forward calls of each encoder's linear layers."""
    calls = {"vision": 0, "text": 0}
    hooks = [
        layer.register_forward_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
        for part, encoder in (("vision", model.vision.backbone), ("text", model.text.backbone))
        for layer in encoder.modules() if isinstance(layer, nn.Linear)
    ]
    model.zero_grad(set_to_none=True)
    sims, _ = model(images, ids, lens)
    sims.sum().backward()
    for hook in hooks:
        hook.remove()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return grads, calls


@pytest.mark.parametrize("name", BACKBONE_FILES)
def test_checkpointed_encoders_recompute_and_give_the_same_gradients(name: str) -> None:
    torch.manual_seed(0)
    model = _tiny_from_config(name).train()
    size = model.vision.image_size
    images = torch.randn(2, 3, size, size)
    ids = torch.randint(5, 100, (3, 7))
    lens = torch.tensor([7, 5, 4])
    torch.manual_seed(1)
    plain, plain_calls = _step(model, images, ids, lens)
    model.set_gradient_checkpointing(True)
    torch.manual_seed(1)
    checkpointed, calls = _step(model, images, ids, lens)
    assert calls["vision"] > plain_calls["vision"] and calls["text"] > plain_calls["text"], (calls, plain_calls)
    assert plain.keys() == checkpointed.keys()
    for key, grad in plain.items():
        assert torch.allclose(checkpointed[key], grad, rtol=1e-5, atol=1e-7), key
    model.set_gradient_checkpointing(False)
    assert _step(model, images, ids, lens)[1] == plain_calls
