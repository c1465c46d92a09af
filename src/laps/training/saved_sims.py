"""Evaluating saved similarity matrices, alone or averaged (an ensemble), without a model.

Two formats are read: ours, ``sims_test.pt`` (written with ``save_sims=true`` by
:class:`laps.training.module.LAPSLitModule`: the matrix with the dataset, split and image ids it was
computed on), read with the allow-list of
:func:`laps.compat.serialization.safe_load`; and the official release's ``results_{dataset}.npy``
(:mod:`laps.compat.official_results`), which records only ``npts``, so there only the shape is
checked. The split needs only its id file (``{split}_ids.txt``): no images, no id mapping.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from laps.compat.official_results import load_official_results
from laps.compat.serialization import safe_load
from laps.data.splits import SplitIndex, read_split_ids
from laps.eccv import EccvSplitMismatch, split_eccv_metrics
from laps.evaluation import protocol_metrics

log = logging.getLogger(__name__)

__all__ = ["SavedSims", "ensemble", "evaluate_saved", "load_sims"]


@dataclass
class SavedSims:
    """A saved matrix ``sims`` (images, captions) and, for our files, where it was computed."""

    path: Path
    sims: Tensor
    dataset: str | None = None
    split: str | None = None
    image_ids: list[str] | None = None


def load_sims(path: str | os.PathLike) -> SavedSims:
    """A saved matrix: ``.npy`` is the official format, anything else ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sims={path}: no such file")
    if path.suffix == ".npy":
        _, sims = load_official_results(path)
        return SavedSims(path, torch.from_numpy(sims).float())
    saved = safe_load(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("sims"), Tensor) or saved["sims"].dim() != 2:
        raise ValueError(f"sims={path}: not a saved similarity matrix (sims_test.pt of save_sims=true)")
    ids = saved.get("image_ids")
    return SavedSims(path, saved["sims"].float(), saved.get("dataset"), saved.get("split"),
                     [str(i) for i in ids] if ids is not None else None)


def _check(saved: SavedSims, index: SplitIndex, dataset: str, split: str) -> None:
    """Refuse a matrix of another split, naming both."""
    shape = (index.num_images, index.num_captions)
    if tuple(saved.sims.shape) != shape:
        raise ValueError(f"sims={saved.path} is {tuple(saved.sims.shape)}, but the {dataset} {split} split has "
                         f"{shape[0]} images and {shape[1]} captions")
    if saved.split is not None and (saved.split, saved.dataset) != (split, dataset):
        raise ValueError(f"sims={saved.path} was computed on {saved.dataset} {saved.split}, not {dataset} {split}")
    if saved.image_ids is not None and saved.image_ids != index.image_ids:
        row = next(k for k, (a, b) in enumerate(zip(saved.image_ids, index.image_ids)) if a != b)
        raise ValueError(f"sims={saved.path}: row {row} is image {saved.image_ids[row]}, the split's image "
                         f"{row} is {index.image_ids[row]}: another split or order")


def ensemble(saved: Sequence[SavedSims], index: SplitIndex, dataset: str, split: str) -> Tensor:
    """The mean of the matrices ``saved`` (each checked against the split), ``(images, captions)``."""
    if not saved:
        raise ValueError("sims=: no similarity matrix given")
    for item in saved:
        _check(item, index, dataset, split)
    return torch.stack([item.sims for item in saved]).mean(dim=0)


def evaluate_saved(paths: Sequence[str | os.PathLike], root: str | os.PathLike, split: str, protocol: str,
                   dataset: str, eccv: bool | None = None) -> dict[str, float]:
    """``test/...`` metrics of the mean of the matrices at ``paths`` on ``split`` of ``root``, under
    ``protocol``; ECCV Caption and CxC as ``eccv`` says (``None``: when the split is theirs)."""
    index = SplitIndex.from_ids(read_split_ids(root, split))
    sims = ensemble([load_sims(p) for p in paths], index, dataset, split)
    metrics = protocol_metrics(sims, index.caption_image_tensor(), protocol, "test")
    if eccv or (eccv is None and protocol == "coco"):
        try:
            metrics.update(split_eccv_metrics(sims, index.image_ids, index.caption_image))
        except EccvSplitMismatch as err:
            if eccv:
                raise
            log.warning("ECCV Caption and CxC skipped: %s", err)
    return metrics
