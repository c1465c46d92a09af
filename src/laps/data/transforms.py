"""Image transforms of the official LAPS recipe (PIL image in, normalised float tensor out)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_transform"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def build_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """The image pipeline: RGB PIL image -> float tensor ``(3, image_size, image_size)``, normalised.

    mean/std: the backbone's normalisation (default ImageNet's; CLIP backbones set their own).

    train: ``RandomResizedCrop(image_size, scale=(0.6, 1.0), bicubic)`` + horizontal flip;
    eval: resize to ``(image_size, image_size)``, bicubic (aspect ratio not kept, as the official code).
    Resizing runs on the PIL image (PIL's bicubic, always antialiased; ``antialias=True`` is set so a
    tensor input would behave the same).
    """
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    mean = tuple(float(m) for m in (IMAGENET_MEAN if mean is None else mean))
    std = tuple(float(s) for s in (IMAGENET_STD if std is None else std))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image mean and std need 3 values each, got {mean} and {std}")
    size = int(image_size)
    if train:
        geometry: list[Callable] = [
            T.RandomResizedCrop(
                size, scale=(0.6, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            T.RandomHorizontalFlip(),
        ]
    else:
        geometry = [T.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)]
    return T.Compose(
        [
            *geometry,
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=mean, std=std),
            T.ToPureTensor(),
        ]
    )
