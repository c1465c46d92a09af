"""The caption and id files of a split in the official LAPS layout, and the images they name.

A dataset folder ``root`` holds, per split, ``{split}_caps.txt`` (one caption a line) and
``{split}_ids.txt`` (the image id of each caption line, normally 5 consecutive lines per id), plus
``id_mapping.json`` (image id as a string -> image path relative to the images folder ``images_dir``).
COCO may go without the mapping: its ids are COCO image ids, whose files are
``val2014/COCO_val2014_%012d.jpg`` or ``train2014/COCO_train2014_%012d.jpg``.

* :func:`read_split` reads and checks the two text files of a split;
* :class:`SplitIndex` numbers the unique images of a split (order of first appearance);
* :func:`load_split` / :func:`load_split_from_config` add the image paths (:class:`SplitData`).

The torch datasets over a :class:`SplitData` are in :mod:`laps.data.datasets`.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DataError",
    "SplitData",
    "SplitIndex",
    "coco_image_path",
    "image_path",
    "load_id_mapping",
    "load_split",
    "load_split_from_config",
    "read_json",
    "read_split",
    "resolve_id_mapping",
    "resolve_image_paths",
    "resolve_images_root",
    "split_files",
]

log = logging.getLogger(__name__)

_MAKE_HINT = (
    "Convert a Karpathy split file with `laps-prepare-data karpathy --json dataset_flickr30k.json --out DIR` "
    "(or dataset_coco.json), or generate a synthetic dataset with `laps-make-synthetic`, then set "
    "dataset.root=DIR."
)


class DataError(ValueError):
    """A dataset file is missing or malformed; the message names the file (and line) and the fix."""


# ---------------------------------------------------------------------------------------------- text files
def split_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """Paths ``(root/{split}_caps.txt, root/{split}_ids.txt)``."""
    root = Path(root)
    return root / f"{split}_caps.txt", root / f"{split}_ids.txt"


def _read_lines(path: Path, what: str) -> list[str]:
    """Lines of a UTF-8 text file (empty lines at the end, ``\\r`` and a BOM dropped); errors name file and line."""
    if not path.is_file():
        raise DataError(f"Missing {what} file {path}. {_MAKE_HINT}")
    data = path.read_bytes()
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 ({err.reason} at byte {err.start}); "
            f"re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from err
    if not text:
        return []
    lines = [ln.removesuffix("\r") for ln in text.split("\n")]
    while lines and not lines[-1].strip():  # the final newline, and stray empty lines after it
        lines.pop()
    return lines


def read_split(root: str | Path, split: str) -> tuple[list[str], list[str]]:
    """Read ``{split}_caps.txt`` and ``{split}_ids.txt`` of ``root``.

    Returns:
        ``(captions, image_ids)``: two lists of length N (caption lines), captions stripped, ids as
        strings (stripped).

    Raises:
        DataError: a missing file, a non-UTF-8 caption file (file and line), an empty caption or id line
        (file and 1-based line), files of different lengths (both counts), or an empty split.
    """
    caps_path, ids_path = split_files(root, split)
    captions = _read_lines(caps_path, f"caption ({split!r} split)")
    ids = _read_lines(ids_path, f"image-id ({split!r} split)")
    if len(captions) != len(ids):
        raise DataError(
            f"Split {split!r} of {root}: {caps_path.name} has {len(captions)} lines but {ids_path.name} has "
            f"{len(ids)}; there must be one image id per caption line."
        )
    if not captions:
        raise DataError(f"Split {split!r} of {root} is empty: {caps_path} has no lines. {_MAKE_HINT}")
    captions = [c.strip() for c in captions]
    ids = [i.strip() for i in ids]
    for what, path, values in (("caption", caps_path, captions), ("image id", ids_path, ids)):
        if not all(values):
            line = next(n for n, v in enumerate(values, 1) if not v)
            raise DataError(f"{path}, line {line}: empty {what} line.")
    return captions, ids


def read_split_ids(root: str | Path, split: str) -> list[str]:
    """The image id of each caption line of ``split`` (``{split}_ids.txt`` only: no captions, no
    images), stripped; ``DataError`` naming the file for a missing file or an empty line."""
    _, ids_path = split_files(root, split)
    ids = [i.strip() for i in _read_lines(ids_path, f"image-id ({split!r} split)")]
    if not ids:
        raise DataError(f"Split {split!r} of {root} is empty: {ids_path} has no lines. {_MAKE_HINT}")
    if not all(ids):
        line = next(n for n, v in enumerate(ids, 1) if not v)
        raise DataError(f"{ids_path}, line {line}: empty image id line.")
    return ids


def read_json(path: Path) -> Any:
    """The parsed UTF-8 JSON file ``path``; ``DataError`` naming the file when it does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a valid UTF-8 JSON file ({err}).") from err


def load_id_mapping(path: str | Path) -> dict[str, str]:
    """Read ``id_mapping.json``: image id (string) -> image path relative to the images folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"Missing id mapping {path} (image id -> image file). For COCO build it with "
            f"`laps-prepare-data coco-mapping --root DIR`; a Karpathy split file gives it with "
            f"`laps-prepare-data karpathy`; or point dataset.id_mapping to it."
        )
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{image id: file}}, got {type(data).__name__}.")
    bad = next((k for k, v in data.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise DataError(f"{path}: the entry for id {bad!r} is {data[bad]!r}, not a file name.")
    return {str(k): v for k, v in data.items()}


def coco_image_path(images_root: str | Path, image_id: str | int) -> Path:
    """COCO naming: ``val2014/COCO_val2014_%012d.jpg`` if it exists, else the ``train2014`` file if that
    exists, else the ``val2014`` path (so it is reported as missing)."""
    images_root = Path(images_root)
    try:
        num = int(image_id)
    except ValueError as err:
        raise DataError(f"COCO image id {image_id!r} is not an integer.") from err
    val = images_root / "val2014" / f"COCO_val2014_{num:012d}.jpg"
    if val.is_file():
        return val
    train = images_root / "train2014" / f"COCO_train2014_{num:012d}.jpg"
    return train if train.is_file() else val


# ---------------------------------------------------------------------------------------------- index
@dataclass(frozen=True)
class SplitIndex:
    """Unique images of a split and the image of each caption line.

    Attributes:
        image_ids: ``(M,)`` unique image ids, in order of first appearance.
        caption_image: ``(N,)`` image index (into ``image_ids``) of each caption line.
        first_line: ``(M,)`` 0-based first caption line of each image.
    """

    image_ids: list[str]
    caption_image: list[int]
    first_line: list[int]

    @classmethod
    def from_ids(cls, ids: Sequence[str]) -> SplitIndex:
        """Index the per-caption image ids ``ids`` (length N)."""
        position: dict[str, int] = {}
        image_ids: list[str] = []
        first_line: list[int] = []
        caption_image: list[int] = []
        for line, image_id in enumerate(ids):
            k = position.get(image_id)
            if k is None:
                k = position[image_id] = len(image_ids)
                image_ids.append(image_id)
                first_line.append(line)
            caption_image.append(k)
        return cls(image_ids=image_ids, caption_image=caption_image, first_line=first_line)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.caption_image)

    def captions_per_image(self) -> Counter[int]:
        """Distribution: number of captions -> number of images with that many."""
        return Counter(Counter(self.caption_image).values())

    def caption_image_tensor(self) -> Tensor:
        """``(N,)`` long tensor of ``caption_image`` (ground truth for retrieval metrics)."""
        return torch.tensor(self.caption_image, dtype=torch.long)

    def is_contiguous(self) -> bool:
        """Whether the captions of each image are on consecutive lines."""
        return all(b >= a for a, b in zip(self.caption_image, self.caption_image[1:])) and all(
            self.caption_image[i] == k for k, i in enumerate(self.first_line)
        )


@dataclass
class SplitData:
    """A split read from disk: captions, index and the path of each unique image.

    Attributes:
        root, split: where it was read from; caps_file: ``root/{split}_caps.txt``.
        captions, ids: ``(N,)`` per caption line.
        index: the :class:`SplitIndex`; image_paths: ``(M,)`` one path per unique image.
    """

    root: Path
    split: str
    captions: list[str]
    ids: list[str]
    index: SplitIndex
    image_paths: list[Path]
    caps_file: Path = field(default=Path())

    @property
    def num_captions(self) -> int:
        return self.index.num_captions

    @property
    def num_images(self) -> int:
        return self.index.num_images

    def line_ref(self, line: int) -> str:
        """``"line L of .../{split}_caps.txt (image id X)"`` for the 0-based caption line ``line``."""
        return f"line {line + 1} of {self.caps_file} (image id {self.ids[line]})"

    def __repr__(self) -> str:
        return (
            f"SplitData({str(self.root)!r}, split={self.split!r}, captions={self.num_captions}, "
            f"images={self.num_images})"
        )


def resolve_images_root(root: Path, images_dir: str | Path | None) -> Path:
    """The images folder: ``images_dir`` if absolute, else ``root / images_dir`` (``root`` if empty)."""
    if images_dir is None or str(images_dir) == "":
        return root
    p = Path(images_dir).expanduser()
    return p if p.is_absolute() else root / p


def resolve_id_mapping(root: Path, images_root: Path, id_mapping: str | Path | None) -> dict[str, str] | None:
    """The id mapping of ``id_mapping`` (relative to ``root`` or absolute), or None for the COCO file names
    (``id_mapping`` empty/None, or the file missing while ``images_root`` has ``val2014/``/``train2014/``)."""
    if id_mapping is None or str(id_mapping) == "":
        return None
    path = Path(id_mapping).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file() and any((images_root / d).is_dir() for d in ("val2014", "train2014")):
        log.warning(
            "%s not found; using the COCO file names val2014/COCO_val2014_%%012d.jpg and "
            "train2014/COCO_train2014_%%012d.jpg under %s (build the mapping with "
            "`laps-prepare-data coco-mapping --root %s` to silence this).", path, images_root, root,
        )
        return None
    return load_id_mapping(path)


def image_path(image_id: str, mapping: Mapping[str, str] | None, images_root: Path) -> Path | None:
    """The file of ``image_id``: its mapping entry (relative to ``images_root`` unless absolute), or
    the COCO file name when ``mapping`` is None; None when the mapping lacks the id.

    Raises:
        DataError: a COCO file name asked for an id that is not a COCO image number.
    """
    if mapping is None:
        return coco_image_path(images_root, image_id)
    rel = mapping.get(image_id)
    if rel is None:
        return None
    p = Path(rel)
    return p if p.is_absolute() else images_root / p


def resolve_image_paths(
    index: SplitIndex,
    mapping: Mapping[str, str] | None,
    images_root: Path,
    caps_file: Path,
    ids_file: Path | None = None,
) -> list[Path]:
    """One path per unique image of ``index``; ``mapping=None`` uses the COCO naming.

    Raises:
        DataError: an id missing from the mapping, naming the id and its first caption line.
    """
    paths: list[Path] = []
    for image_id, line in zip(index.image_ids, index.first_line):
        path = image_path(image_id, mapping, images_root)
        if path is None:
            raise DataError(
                f"Image id {image_id!r} (first used on line {line + 1} of {caps_file}"
                f"{f' / {ids_file.name}' if ids_file else ''}) is not in the id mapping "
                f"({len(mapping or {})} entries). Rebuild id_mapping.json or fix the ids file."
            )
        paths.append(path)
    return paths


def load_split(
    root: str | Path,
    split: str,
    images_dir: str | Path | None = ".",
    id_mapping: str | Path | None = "id_mapping.json",
) -> SplitData:
    """Read a split and resolve its image paths.

    Args:
        root: dataset folder. images_dir: images folder, relative to ``root`` or absolute.
        id_mapping: mapping file, relative to ``root`` or absolute; ``None`` = COCO file names (also the
            fallback, with a warning, when the file is missing but ``val2014/`` or ``train2014/`` exist).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Dataset folder {root} does not exist (dataset.root). {_MAKE_HINT}")
    captions, ids = read_split(root, split)
    caps_file, ids_file = split_files(root, split)
    index = SplitIndex.from_ids(ids)
    images_root = resolve_images_root(root, images_dir)
    mapping = resolve_id_mapping(root, images_root, id_mapping)
    paths = resolve_image_paths(index, mapping, images_root, caps_file, ids_file)
    return SplitData(
        root=root, split=split, captions=captions, ids=ids, index=index, image_paths=paths,
        caps_file=caps_file,
    )


def load_split_from_config(cfg: Any, split: str) -> SplitData:
    """:func:`load_split` with ``root``, ``images_dir``, ``id_mapping`` of a dataset config."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    root = get("root")
    if root is None:
        raise DataError("dataset.root is not set.")
    return load_split(
        root, split, images_dir=get("images_dir", "."), id_mapping=get("id_mapping", "id_mapping.json")
    )
