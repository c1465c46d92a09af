"""ECCV Caption and CxC figures: equal to the eccv-caption package's own on a COCO 5K-shaped matrix,
right on matrices whose answer is known by construction, and refused on another split."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers.standins import read_lines, shared_data
from laps.eccv import TOP, EccvSplitMismatch, caption_ids_of, eccv_cxc_metrics, split_eccv_metrics

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from eccv_caption import Metrics

METRICS = Metrics()
CAPTIONS = [int(c) for c in METRICS.coco_ids]
IMAGES = list(dict.fromkeys(METRICS.coco_gts["t2i"][c][0] for c in CAPTIONS))  # first appearance, as a split


def _ranked(sims: torch.Tensor, keys: list[int], items: list[int], k: int) -> dict[int, list[int]]:
    top = sims.topk(k, dim=1).indices.tolist()
    return {key: [items[j] for j in row] for key, row in zip(keys, top)}


def test_the_split_file_maps_onto_the_package_line_by_line() -> None:
    lines = read_lines(shared_data("coco") / "testall_ids.txt")
    assert caption_ids_of(lines) == CAPTIONS


def test_another_order_is_refused_naming_the_line() -> None:
    lines = read_lines(shared_data("coco") / "testall_ids.txt")
    lines[6], lines[0] = lines[0], lines[6]  # two images' captions exchanged
    with pytest.raises(EccvSplitMismatch, match="line 1 of the split's ids"):
        caption_ids_of(lines)
    with pytest.raises(EccvSplitMismatch, match="1000 caption lines"):
        caption_ids_of(lines[:1000])


def test_random_matrix_equals_the_package() -> None:
    """Our top-50 lists against the package on top-200 lists (the metrics read no further than 48)."""
    sims = torch.rand(len(IMAGES), len(CAPTIONS), generator=torch.Generator().manual_seed(0))
    ours = eccv_cxc_metrics(sims, IMAGES, CAPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = METRICS.compute_all_metrics(
            _ranked(sims, IMAGES, CAPTIONS, 4 * TOP), _ranked(sims.t(), CAPTIONS, IMAGES, 4 * TOP),
            target_metrics=("eccv_map_at_r", "eccv_rprecision", "eccv_r1", "cxc_recalls"), Ks=(1, 5, 10),
            verbose=False)
    names = {"eccv/{d}_mAP@R": "eccv_map_at_r", "eccv/{d}_R-P": "eccv_rprecision", "eccv/{d}_R@1": "eccv_r1",
             "cxc/{d}_R@1": "cxc_r1", "cxc/{d}_R@5": "cxc_r5", "cxc/{d}_R@10": "cxc_r10"}
    assert len(ours) == 12
    for key, name in names.items():
        for d in ("i2t", "t2i"):
            assert ours["test_" + key.format(d=d)] == pytest.approx(100 * direct[name][d], abs=1e-9), key


def _positives_first(gts: dict[int, list[int]], keys: list[int], items: list[int]) -> torch.Tensor:
    """A (len(keys), len(items)) matrix with each key's positives (in ``gts``) above everything else."""
    column = {item: j for j, item in enumerate(items)}
    sims = torch.rand(len(keys), len(items), generator=torch.Generator().manual_seed(1))
    for row, key in enumerate(keys):
        cols = [column[i] for i in gts.get(key, []) if i in column]
        sims[row, cols] += 2.0
    return sims


def test_perfect_rankings_score_what_their_positives_allow() -> None:
    """Both directions, each on a matrix that ranks its own positives first: t2i scores 100; i2t's
    mAP@R and R-Precision fall short only by the ECCV positives missing from the 25,000 captions."""
    eccv, cxc = METRICS.eccv_gts, METRICS.cxc_gts
    i2t_sims = _positives_first(eccv["i2t"], IMAGES, CAPTIONS)
    t2i_sims = _positives_first(eccv["t2i"], CAPTIONS, IMAGES).t()
    i2t, t2i = eccv_cxc_metrics(i2t_sims, IMAGES, CAPTIONS), eccv_cxc_metrics(t2i_sims, IMAGES, CAPTIONS)
    present = set(CAPTIONS)
    found = [sum(c in present for c in set(pos)) / len(set(pos)) for pos in eccv["i2t"].values()]
    assert i2t["test_eccv/i2t_mAP@R"] == pytest.approx(100 * sum(found) / len(found))
    assert i2t["test_eccv/i2t_R-P"] == pytest.approx(100 * sum(found) / len(found))
    assert 99.0 < i2t["test_eccv/i2t_mAP@R"] < 100.0 and i2t["test_eccv/i2t_R@1"] == 100.0
    assert t2i["test_eccv/t2i_mAP@R"] == t2i["test_eccv/t2i_R-P"] == t2i["test_eccv/t2i_R@1"] == 100.0
    cxc_t2i = eccv_cxc_metrics(_positives_first(cxc["t2i"], CAPTIONS, IMAGES).t(), IMAGES, CAPTIONS)
    assert cxc_t2i["test_cxc/t2i_R@1"] == 100.0
    assert i2t["test_eccv/i2t_R@1"] > 0 and t2i["test_eccv/i2t_R@1"] < 100.0  # the other direction is not


def test_split_metrics_take_the_split_as_the_data_module_holds_it() -> None:
    sims = torch.rand(len(IMAGES), len(CAPTIONS), generator=torch.Generator().manual_seed(2))
    caption_image = [IMAGES.index(METRICS.coco_gts["t2i"][c][0]) for c in CAPTIONS[:10]]
    assert caption_image == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    index = {image: k for k, image in enumerate(IMAGES)}
    rows = [index[METRICS.coco_gts["t2i"][c][0]] for c in CAPTIONS]
    assert split_eccv_metrics(sims, [str(i) for i in IMAGES], rows) == eccv_cxc_metrics(sims, IMAGES, CAPTIONS)
