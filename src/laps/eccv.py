"""ECCV Caption and CxC (Crisscrossed Captions) figures of a COCO 5K similarity matrix.

Computed by the ``eccv-caption`` package (its ground truth ships inside its wheel: no download),
from ranked lists keyed by COCO ids: each image's captions and each caption's images, by
similarity. Its metrics read at most the first 48 items of a list (R of ECCV i2t), so the top
:data:`TOP` suffice. The caption ids of the 25,000 COCO 5K test captions come from the package
(``coco_test_ids.npy``) by line: line ``i`` of the split is caption ``coco_test_ids[i]``, which
:func:`caption_ids_of` checks against the image id on each line (the package ships ids, not texts:
the order of an image's captions is assumed to be Karpathy's, as in the official files).
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["TOP", "EccvSplitMismatch", "caption_ids_of", "eccv_cxc_metrics", "line_image_ids", "split_eccv_metrics"]

TOP = 50
# metrics.json key suffix -> the package's metric name, per group
_KEYS = {
    "eccv": {"mAP@R": "eccv_map_at_r", "R-P": "eccv_rprecision", "R@1": "eccv_r1"},
    "cxc": {"R@1": "cxc_r1", "R@5": "cxc_r5", "R@10": "cxc_r10"},
}


class EccvSplitMismatch(ValueError):
    """The split is not ECCV Caption's COCO 5K test set, line for line."""


@functools.cache
def _package() -> Any:
    """``eccv_caption.Metrics()`` with its ground truth, loaded once (quietly: it warns when
    ``ujson`` is missing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics

        return Metrics(verbose=False)


def caption_ids_of(line_image_ids: Sequence[str | int]) -> list[int]:
    """The COCO caption id of each caption line of the split whose image ids are ``line_image_ids``.

    Raises :class:`EccvSplitMismatch` naming the first line whose image is not that of the
    package's caption on that line (another order or another split), or when the counts differ.
    """
    metrics = _package()
    caption_ids = [int(c) for c in metrics.coco_ids]
    if len(line_image_ids) != len(caption_ids):
        raise EccvSplitMismatch(
            f"the split has {len(line_image_ids)} caption lines, ECCV Caption's COCO 5K test set "
            f"{len(caption_ids)}: ECCV Caption and CxC apply to COCO's testall split only"
        )
    truth = metrics.coco_gts["t2i"]
    for line, (image_id, caption_id) in enumerate(zip(line_image_ids, caption_ids), start=1):
        expected = truth[caption_id][0]
        if str(image_id).strip() != str(expected):
            raise EccvSplitMismatch(
                f"line {line} of the split's ids names image {image_id}, but ECCV Caption's caption "
                f"{caption_id} on that line is of image {expected}: not the official COCO 5K test order"
            )
    return caption_ids


def _ranked(sims: Tensor, keys: Sequence[int], items: Sequence[int]) -> dict[int, list[int]]:
    """``{keys[r]: the TOP items of row r by similarity}`` for ``sims`` (len(keys), len(items))."""
    top = sims.topk(min(TOP, sims.shape[1]), dim=1).indices.tolist()
    return {key: [items[j] for j in row] for key, row in zip(keys, top)}


def eccv_cxc_metrics(sims: Tensor, image_ids: Sequence[int], caption_ids: Sequence[int],
                     prefix: str = "test") -> dict[str, float]:
    """ECCV mAP@R, R-Precision and R@1 and CxC R@1/5/10, both directions, in percent.

    ``sims`` (5000, 25000): rows the images ``image_ids``, columns the captions ``caption_ids``
    (COCO ids, :func:`caption_ids_of`). Keys ``{prefix}_eccv/i2t_mAP@R`` ... ``{prefix}_cxc/t2i_R@10``.
    """
    if sims.shape != (len(image_ids), len(caption_ids)):
        raise ValueError(f"sims has shape {tuple(sims.shape)} for {len(image_ids)} images and "
                         f"{len(caption_ids)} captions")
    sims = sims.float()
    i2t = _ranked(sims, [int(i) for i in image_ids], [int(c) for c in caption_ids])
    t2i = _ranked(sims.t(), [int(c) for c in caption_ids], [int(i) for i in image_ids])
    wanted = [name for group in _KEYS.values() for name in group.values() if name.startswith("eccv")]
    # the package draws progress bars on stderr even when asked not to
    with contextlib.redirect_stderr(io.StringIO()):
        scores = _package().compute_all_metrics(i2t, t2i, target_metrics=(*wanted, "cxc_recalls"),
                                                Ks=(1, 5, 10), verbose=False)
    return {
        f"{prefix}_{group}/{direction}_{suffix}": 100.0 * float(scores[name][direction])
        for group, names in _KEYS.items()
        for suffix, name in names.items()
        for direction in ("i2t", "t2i")
    }


def line_image_ids(image_ids: Sequence[str], caption_image: Sequence[int]) -> list[str]:
    """The image id of each caption line, from a split's unique image ids and each line's image index."""
    return [image_ids[k] for k in caption_image]


@torch.no_grad()
def split_eccv_metrics(sims: Tensor, image_ids: Sequence[str], caption_image: Sequence[int],
                       prefix: str = "test") -> dict[str, float]:
    """:func:`eccv_cxc_metrics` of a split given as its unique ``image_ids`` (the rows of ``sims``) and
    each caption line's image index ``caption_image`` (the columns); :class:`EccvSplitMismatch` when
    the split is not ECCV Caption's COCO 5K test set."""
    caption_ids = caption_ids_of(line_image_ids(image_ids, caption_image))
    return eccv_cxc_metrics(sims, [int(i) for i in image_ids], caption_ids, prefix)
