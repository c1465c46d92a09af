"""The torch datasets over a split (:class:`laps.data.splits.SplitData`), image opening and collate.

* :class:`PairDataset` (training: one item per caption line), :class:`ImageDataset` and
  :class:`CaptionDataset` (evaluation) and their collate functions.

Bad images (missing, unreadable, corrupt) follow ``on_bad_image``: ``error`` raises :class:`DataError`
naming the file and the caption line; ``skip`` logs each bad file once, drops the *pair* from the
training batch (captions and images never shift) and gives a black image in :class:`ImageDataset`
(so evaluation indices stay aligned). Each dataset keeps the bad files it met in ``bad_files`` (this
process only); every batch lists its skipped files in ``batch["skipped"]``, to be summed up across
DataLoader workers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from laps.data.splits import DataError, SplitData
from laps.data.tokenization import CaptionTokenizer

__all__ = [
    "IMAGE_ERRORS",
    "ON_BAD_IMAGE",
    "BadImageError",
    "CaptionDataset",
    "ImageDataset",
    "PairDataset",
    "check_on_bad_image",
    "collate_captions",
    "collate_images",
    "collate_pairs",
    "open_image",
    "pad_input_ids",
]

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("error", "skip")


def check_on_bad_image(value: str) -> str:
    """``value`` if it is one of :data:`ON_BAD_IMAGE`, else a ``ValueError`` naming ``dataset.on_bad_image``."""
    if value not in ON_BAD_IMAGE:
        allowed = " or ".join(repr(v) for v in ON_BAD_IMAGE)
        raise ValueError(f"dataset.on_bad_image must be {allowed}, got {value!r}")
    return value


class BadImageError(DataError):
    """An image file is missing, unreadable or corrupt."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"Image {self.path} is {reason}")


# ---------------------------------------------------------------------------------------------- images
IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and truncated files
    Image.DecompressionBombError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
)


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB.

    Raises:
        BadImageError: missing, unreadable or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "missing")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except IMAGE_ERRORS as err:
        raise BadImageError(path, f"unreadable ({type(err).__name__}: {err})") from err


class _ImageLoading:
    """Set-up and bad-image policy shared by the image datasets."""

    data: SplitData

    def _init_images(
        self,
        data: SplitData,
        transform: Callable[[Image.Image], Tensor] | None,
        image_size: int,
        train: bool,
        on_bad_image: str,
    ) -> None:
        """Set the split, the transform (default: :func:`_default_transform`) and the bad-image policy."""
        self.data = data
        self.image_size = int(image_size)
        self.transform = transform if transform is not None else _default_transform(self.image_size, train)
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.bad_files: set[str] = set()

    def _load(self, image_index: int, line: int) -> Image.Image | None:
        """The RGB image, or None for a bad image under ``skip`` (logged once per file)."""
        path = self.data.image_paths[image_index]
        try:
            return open_image(path)
        except BadImageError as err:
            where = self.data.line_ref(line)
            if self.on_bad_image == "error":
                raise DataError(
                    f"{err}; it is the image of caption {where}. Set dataset.on_bad_image=skip to skip bad "
                    f"images, or list them all with `laps-check-data`."
                ) from err
            if err.path not in self.bad_files:
                self.bad_files.add(err.path)
                log.warning("Skipping image %s (%s), the image of caption %s", err.path, err.reason, where)
            return None


def _default_transform(image_size: int, train: bool) -> Callable[[Image.Image], Tensor]:
    from laps.data.transforms import build_transform  # torchvision: imported only when needed

    return build_transform(image_size, train=train)


def _item_rng() -> random.Random:
    """A fresh RNG drawn from torch's generator: seeded by ``seed_everything`` in the main process and
    distinct in each DataLoader worker (torch seeds workers with ``base_seed + worker_id``)."""
    return random.Random(int(torch.randint(0, 2**62, (1,)).item()))


class PairDataset(Dataset, _ImageLoading):
    """Training pairs: one item per caption line, with its image.

    Item: ``dict(image=Tensor (3,H,W) or None when skipped, input_ids=list[int], image_index=int,
    index=int caption line)``, plus ``bad_file=str`` for a skipped image. Use :meth:`collate`.

    Args:
        data: the split. tokenizer: the caption tokenizer. transform: PIL -> tensor (default: the training
        transform at ``image_size``). augment: size augmentation of the captions (``dataset.size_augment``).
        on_bad_image: ``error`` or ``skip``.
    """

    def __init__(
        self,
        data: SplitData,
        tokenizer: CaptionTokenizer,
        transform: Callable[[Image.Image], Tensor] | None = None,
        image_size: int = 224,
        augment: bool = False,
        on_bad_image: str = "error",
    ) -> None:
        self._init_images(data, transform, image_size, True, on_bad_image)
        self.tokenizer = tokenizer
        self.augment = bool(augment)

    def __len__(self) -> int:
        return self.data.num_captions

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item of caption line ``key``, or of ``key = (line, seed)`` (what
        :class:`laps.data.sampler.SeededShuffleSampler` yields): the random crop, flip and caption
        augmentation of the item then come from ``seed`` alone, the same in any process or worker and after
        a restart, and the global generators are left untouched."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_index = self.data.index.caption_image[index]
        image = self._load(image_index, index)
        if image is None:
            return {
                "image": None, "input_ids": [], "image_index": image_index, "index": index,
                "bad_file": str(self.data.image_paths[image_index]),
            }
        truncated_before = self.tokenizer.num_truncated
        rng = None
        if self.augment:
            rng = _item_rng() if seed is None else random.Random(seed)
        input_ids = self.tokenizer(self.data.captions[index], augment=self.augment, rng=rng)
        if seed is None:
            pixels = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):  # CPU generator only, restored on exit
                torch.random.default_generator.manual_seed(seed)
                pixels = self.transform(image)
        truncated = self.tokenizer.num_truncated > truncated_before  # counted per batch, across workers
        return {"image": pixels, "input_ids": input_ids, "image_index": image_index, "index": index,
                "truncated": truncated}

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """:func:`collate_pairs` with this tokenizer's pad id."""
        return collate_pairs(items, pad_id=self.tokenizer.pad_id, image_size=self.image_size)


class ImageDataset(Dataset, _ImageLoading):
    """Evaluation images: one item per unique image of the split, ``dict(image=Tensor (3,H,W), index=int)``.

    A bad image under ``skip`` becomes a black image (logged; ``bad_file`` in the item) so that image
    indices stay aligned with :attr:`SplitIndex.caption_image`.
    """

    def __init__(
        self,
        data: SplitData,
        transform: Callable[[Image.Image], Tensor] | None = None,
        image_size: int = 224,
        on_bad_image: str = "error",
    ) -> None:
        self._init_images(data, transform, image_size, False, on_bad_image)

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self._load(index, self.data.index.first_line[index])
        if image is None:
            black = Image.new("RGB", (self.image_size, self.image_size))
            bad_file = str(self.data.image_paths[index])
            return {"image": self.transform(black), "index": index, "bad_file": bad_file}
        return {"image": self.transform(image), "index": index}

    @staticmethod
    def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_images(items)


class CaptionDataset(Dataset):
    """Evaluation captions: ``dict(input_ids=list[int], index=int caption line, image_index=int)``."""

    def __init__(self, data: SplitData, tokenizer: CaptionTokenizer) -> None:
        self.data = data
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.data.num_captions

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "input_ids": self.tokenizer(self.data.captions[index], augment=False),
            "index": index,
            "image_index": self.data.index.caption_image[index],
        }

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return collate_captions(items, pad_id=self.tokenizer.pad_id)


# ---------------------------------------------------------------------------------------------- collate
def pad_input_ids(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists: ``(input_ids (B, L) long, lengths (B,) long)``, ``L = max length``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = int(lengths.max()) if len(seqs) else 0
    out = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


def _caption_fields(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    """``input_ids (B,L)`` padded with ``pad_id``, ``lengths (B,)``, ``image_indices (B,)`` (image index
    in the split), ``indices (B,)`` (caption line), all long."""
    input_ids, lengths = pad_input_ids([it["input_ids"] for it in items], pad_id)
    return {
        "input_ids": input_ids,
        "lengths": lengths,
        "image_indices": torch.tensor([it["image_index"] for it in items], dtype=torch.long),
        "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


def collate_pairs(
    items: Sequence[dict[str, Any]], pad_id: int = 0, image_size: int | None = None
) -> dict[str, Any]:
    """Training batch; pairs whose image was skipped are dropped.

    Returns:
        ``images (B,3,H,W)``, ``input_ids (B,L)`` padded with ``pad_id``, ``lengths (B,)``,
        ``image_indices (B,)`` (image index in the split), ``indices (B,)`` (caption line), all long but
        images; ``skipped``: list of the bad image files dropped; ``truncated``: how many kept captions
        were cut to ``max_words``.
        ``B`` may be 0 when all were skipped (images then ``(0,3,S,S)`` with ``S = image_size or 0``).
    """
    kept = [it for it in items if it["image"] is not None]
    skipped = [it["bad_file"] for it in items if it["image"] is None]
    if kept:
        images = torch.stack([it["image"] for it in kept])
    else:
        s = int(image_size or 0)
        images = torch.empty((0, 3, s, s))
    return {
        "images": images,
        **_caption_fields(kept, pad_id),
        "skipped": skipped,
        "truncated": sum(bool(it.get("truncated", False)) for it in kept),
    }


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Evaluation images: ``images (B,3,H,W)``, ``indices (B,)`` long, ``skipped`` (files shown black)."""
    return {
        "images": torch.stack([it["image"] for it in items]),
        "indices": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "skipped": [it["bad_file"] for it in items if "bad_file" in it],
    }


def collate_captions(items: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Evaluation captions: ``input_ids (B,L)``, ``lengths (B,)``, ``image_indices (B,)`` (image
    index of each caption), ``indices (B,)`` (caption line), all long."""
    return _caption_fields(items, pad_id)
