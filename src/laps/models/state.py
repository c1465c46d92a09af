"""Comparing a model's ``state_dict`` with one read from a file (checkpoint or safetensors)."""

from __future__ import annotations

from typing import Any

__all__ = ["state_mismatch"]


def state_mismatch(expected: dict[str, Any], found: dict[str, Any], source: str = "file") -> str | None:
    """What keeps ``found`` from loading into a model whose state is ``expected``, in words, or ``None``.

    Names the first tensor of another shape (with both shapes), else the first missing or unexpected
    tensor (with the counts of both).
    """
    for key, tensor in expected.items():
        if key in found and tuple(found[key].shape) != tuple(tensor.shape):
            return f"tensor {key!r} has shape {tuple(found[key].shape)} in the {source}, the model needs {tuple(tensor.shape)}"
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if not (missing or extra):
        return None
    first = f"tensor {missing[0]!r} is missing" if missing else f"unexpected tensor {extra[0]!r}"
    return f"{first} ({len(missing)} missing, {len(extra)} unexpected tensors)"
