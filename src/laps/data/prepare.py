"""Converters into the official LAPS layout.

* :func:`convert_karpathy`: the widely used Karpathy split files (``dataset_flickr30k.json``,
  ``dataset_coco.json``) -> ``{split}_caps.txt``, ``{split}_ids.txt`` and ``id_mapping.json``.
* :func:`build_coco_mapping`: ``id_mapping.json`` of a COCO folder from the files in ``train2014/`` and
  ``val2014/``.

Karpathy format: ``{"dataset": "coco"|"flickr30k"|..., "images": [{"split": "train"|"val"|"test"|"restval",
"filename", "filepath" (COCO: "train2014"/"val2014"), "imgid", "cocoid" (COCO), "sentences": [{"raw",
"tokens", ...}, ...]}, ...]}``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from laps.data.splits import DataError, read_json
from laps.paths import new_file_mode

__all__ = [
    "KARPATHY_SPLITS",
    "SplitStats",
    "build_coco_mapping",
    "convert_karpathy",
    "detect_dataset",
    "karpathy_to_splits",
    "write_id_mapping",
    "write_split",
]

log = logging.getLogger(__name__)

# Karpathy split -> output split, per dataset kind. restval is merged into train.
KARPATHY_SPLITS: dict[str, dict[str, str]] = {
    "f30k": {"train": "train", "restval": "train", "val": "dev", "test": "test"},
    "coco": {"train": "train", "restval": "train", "val": "dev", "test": "testall"},
}
# Images kept in the dev split by default (the official COCO dev: the first 1,000 val images, 5,000 captions).
DEFAULT_DEV_IMAGES: dict[str, int | None] = {"f30k": None, "coco": 1000}


@dataclass
class SplitStats:
    """What one output split holds."""

    split: str
    captions: int
    images: int
    short_images: int = 0  # images with fewer captions than captions_per_image


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, new_file_mode())  # mkstemp makes 0600: others could not read a shared dataset
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_split(out_dir: str | Path, split: str, captions: Sequence[str], ids: Sequence[str]) -> None:
    """Write ``{split}_caps.txt`` and ``{split}_ids.txt`` (one line each, UTF-8, ``\\n``)."""
    if len(captions) != len(ids):
        raise ValueError(f"{len(captions)} captions but {len(ids)} ids for split {split!r}")
    for n, c in enumerate(captions, 1):
        if not c.strip() or "\n" in c or "\r" in c:
            raise ValueError(f"caption {n} of split {split!r} is empty or spans lines: {c!r}")
    out = Path(out_dir)
    _atomic_write(out / f"{split}_caps.txt", "".join(c + "\n" for c in captions))
    _atomic_write(out / f"{split}_ids.txt", "".join(f"{i}\n" for i in ids))


def write_id_mapping(path: str | Path, mapping: dict[str, str]) -> None:
    """Write ``id_mapping.json`` (keys sorted numerically when all are integers)."""
    keys = list(mapping)
    if all(k.isdigit() for k in keys):
        keys.sort(key=int)
    _atomic_write(Path(path), json.dumps({k: mapping[k] for k in keys}, ensure_ascii=False))


def detect_dataset(data: dict[str, Any]) -> str:
    """``"coco"`` or ``"f30k"`` from the ``dataset`` field, else from the presence of ``cocoid``."""
    name = str(data.get("dataset", "")).lower()
    if name == "coco":
        return "coco"
    if name.startswith("flickr"):
        return "f30k"
    images = data.get("images") or [{}]
    return "coco" if "cocoid" in images[0] else "f30k"


def _caption_text(sentence: dict[str, Any], text: str) -> str:
    if text == "tokens":
        s = " ".join(str(t) for t in sentence.get("tokens") or [])
    else:
        s = str(sentence.get("raw") or "")
        if not s.strip():
            s = " ".join(str(t) for t in sentence.get("tokens") or [])
    return " ".join(s.split())  # stripped, one line


def karpathy_to_splits(
    data: dict[str, Any],
    dataset: str = "auto",
    text: str = "raw",
    captions_per_image: int = 5,
    dev_images: int | None | str = "auto",
) -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, str], dict[str, SplitStats]]:
    """Split a loaded Karpathy JSON.

    Args:
        dataset: ``auto``, ``f30k`` or ``coco`` (output split names and id field: F30K ``imgid``,
            COCO ``cocoid``).
        text: ``raw`` (the raw sentence, whitespace-collapsed) or ``tokens`` (the tokens joined by spaces).
        captions_per_image: keep the first K captions of each image (0: all); COCO has images with 6-7.
        dev_images: keep the first N images of the dev split (``auto``: 1,000 for COCO as the official
            release, all for F30K; ``None``/0: all).

    Returns:
        ``(splits, id_mapping, stats)``: ``splits[name] = (captions, ids)``; ``id_mapping`` covers every
        image of the file (id -> ``filepath/filename`` or ``filename``).
    """
    if "images" not in data or not isinstance(data["images"], list):
        raise DataError('Not a Karpathy split file: no "images" list at the top level.')
    kind = detect_dataset(data) if dataset == "auto" else dataset
    if kind not in KARPATHY_SPLITS:
        raise DataError(f"dataset must be auto, f30k or coco, got {dataset!r}")
    if text not in ("raw", "tokens"):
        raise DataError(f"text must be raw or tokens, got {text!r}")
    if dev_images == "auto":
        dev_images = DEFAULT_DEV_IMAGES[kind]
    split_map = KARPATHY_SPLITS[kind]
    id_field = "cocoid" if kind == "coco" else "imgid"

    splits: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in dict.fromkeys(split_map.values())}
    stats = {s: SplitStats(s, 0, 0) for s in splits}
    mapping: dict[str, str] = {}
    for n, img in enumerate(data["images"]):
        if id_field not in img or "filename" not in img:
            raise DataError(f"images[{n}] has no {id_field!r} or 'filename' field (dataset={kind}).")
        image_id = str(img[id_field])
        if image_id in mapping:
            raise DataError(f"images[{n}]: {id_field} {image_id} appears twice.")
        filepath = str(img.get("filepath") or "")
        mapping[image_id] = f"{filepath}/{img['filename']}" if filepath else str(img["filename"])
        karpathy_split = str(img.get("split", ""))
        if karpathy_split not in split_map:
            raise DataError(f"images[{n}] ({img['filename']}): unknown split {karpathy_split!r}.")
        out = split_map[karpathy_split]
        if out == "dev" and dev_images and stats[out].images >= dev_images:
            continue
        captions = [c for c in (_caption_text(s, text) for s in img.get("sentences") or []) if c]
        if captions_per_image:
            if len(captions) < captions_per_image:
                stats[out].short_images += 1
            captions = captions[:captions_per_image]
        if not captions:
            log.warning("images[%d] (%s) has no caption; left out of %s", n, img["filename"], out)
            continue
        caps, ids = splits[out]
        caps.extend(captions)
        ids.extend([image_id] * len(captions))
        stats[out].captions += len(captions)
        stats[out].images += 1
    for s in stats.values():
        if s.short_images:
            log.warning(
                "%s: %d images have fewer than %d captions", s.split, s.short_images, captions_per_image
            )
    return splits, mapping, stats


def convert_karpathy(
    json_path: str | Path,
    out_dir: str | Path,
    dataset: str = "auto",
    text: str = "raw",
    captions_per_image: int = 5,
    dev_images: int | None | str = "auto",
    overwrite: bool = False,
) -> dict[str, SplitStats]:
    """Convert a Karpathy split file into ``out_dir`` in the official layout (see :func:`karpathy_to_splits`).

    Writes F30K ``train/dev/test`` or COCO ``train/dev/testall`` caption and id files and
    ``id_mapping.json``. Refuses to replace existing files unless ``overwrite``.
    """
    json_path, out_dir = Path(json_path), Path(out_dir)
    if not json_path.is_file():
        raise DataError(
            f"Karpathy split file {json_path} not found (dataset_flickr30k.json / dataset_coco.json)."
        )
    data = read_json(json_path)
    splits, mapping, stats = karpathy_to_splits(data, dataset, text, captions_per_image, dev_images)
    targets = [out_dir / "id_mapping.json"] + [
        out_dir / f"{s}_{kind}.txt" for s in splits for kind in ("caps", "ids")
    ]
    if not any(caps for caps, _ in splits.values()):
        raise DataError(f"{json_path}: no image has a caption ('sentences'); nothing to write.")
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise DataError(
            f"{existing[0]} exists ({len(existing)} output files do); pass --overwrite to replace."
        )
    for split, (caps, ids) in splits.items():
        if not caps:
            log.warning("split %s is empty in %s; not written", split, json_path)
            continue
        write_split(out_dir, split, caps, ids)
        log.info("wrote %s: %d captions, %d images", split, stats[split].captions, stats[split].images)
    write_id_mapping(out_dir / "id_mapping.json", mapping)
    return stats


_COCO_FILE = re.compile(r"(\d+)\.(jpe?g|png)$", re.IGNORECASE)


def build_coco_mapping(
    root: str | Path,
    folders: Iterable[str] = ("train2014", "val2014"),
    out: str | Path | None = None,
) -> dict[str, str]:
    """Scan ``root/<folder>`` for COCO image files (``COCO_val2014_%012d.jpg``, ``%012d.jpg``) and write
    ``id_mapping.json`` (id -> ``folder/file``, relative to ``root``) to ``out`` (default
    ``root/id_mapping.json``). Returns the mapping."""
    root = Path(root)
    mapping: dict[str, str] = {}
    found = []
    for folder in folders:
        d = root / folder
        if not d.is_dir():
            log.warning("%s not found; skipped", d)
            continue
        found.append(folder)
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            m = _COCO_FILE.search(entry.name)
            if not m or not entry.is_file():
                continue
            image_id = str(int(m.group(1)))
            rel = f"{folder}/{entry.name}"
            if image_id in mapping:
                raise DataError(f"COCO image id {image_id} has two files: {mapping[image_id]} and {rel}.")
            mapping[image_id] = rel
    if not found:
        where = ", ".join(str(root / f) for f in folders)
        raise DataError(f"None of {where} exists; is {root} the COCO folder?")
    if not mapping:
        raise DataError(f"No image files (*NNN.jpg) in {', '.join(str(root / f) for f in found)}.")
    write_id_mapping(Path(out) if out is not None else root / "id_mapping.json", mapping)
    return mapping
