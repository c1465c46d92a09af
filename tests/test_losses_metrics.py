"""Losses and retrieval metrics against the official release's golden outputs."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES, needs_fixtures
from laps.losses import contrastive_loss, ratio_loss
from laps.metrics import coco_1k_metrics, retrieval_metrics, retrieval_ranks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_fixtures
@pytest.mark.parametrize("case", [0, 1], ids=["sum", "hardest"])
def test_contrastive_loss_matches_official(case: int) -> None:
    ref = torch.load(FIXTURES / "contrastive_loss.pt", weights_only=True)[case]
    scores = ref["scores"].clone().requires_grad_(True)
    loss = contrastive_loss(scores, ref["img_ids"], ref["margin"], ref["max_violation"])
    loss.backward()
    assert abs(float(loss) - float(ref["loss"])) <= 1e-5 * abs(float(ref["loss"]))
    assert _rel(scores.grad, ref["grad_scores"]) <= 1e-5


def test_pairs_sharing_an_image_are_never_negatives() -> None:
    sims = torch.zeros(3, 3)
    sims[0, 1] = sims[1, 0] = 5.0  # captions 0 and 1 describe the same image: no violation
    ids = torch.tensor([7, 7, 8])
    assert float(contrastive_loss(sims, ids, margin=0.2)) == pytest.approx(0.2 * 8)  # only pairs with image 8
    assert float(contrastive_loss(sims, torch.tensor([1, 2, 3]), margin=0.2)) > 10


def test_ratio_loss() -> None:
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert float(ratio_loss(mask, 0.5)) == pytest.approx(0.0625)


@needs_fixtures
@pytest.mark.parametrize("case", [0, 1, 2])
def test_recall_matches_official(case: int) -> None:
    ref = torch.load(FIXTURES / "recall.pt", weights_only=True)[case]
    metrics = retrieval_metrics(ref["sims"])
    names = {"r1": "R@1", "r5": "R@5", "r10": "R@10", "medr": "medr", "meanr": "meanr"}
    for direction in ("i2t", "t2i"):
        for key, ours in names.items():
            assert metrics[f"{direction}_{ours}"] == pytest.approx(ref[direction][key], abs=1e-9), (direction, key)
    expected_rsum = sum(ref[d][k] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10"))
    assert metrics["rsum"] == pytest.approx(expected_rsum)


@needs_fixtures
def test_ranks_follow_an_explicit_caption_to_image_map() -> None:
    ref = torch.load(FIXTURES / "recall.pt", weights_only=True)[1]
    sims = ref["sims"]
    n_img = sims.shape[0]
    perm = torch.randperm(sims.shape[1], generator=torch.Generator().manual_seed(0))
    shuffled = sims[:, perm]
    cap_to_img = (torch.arange(sims.shape[1]) // 5)[perm]
    assert retrieval_metrics(shuffled, cap_to_img) == pytest.approx(retrieval_metrics(sims))
    i2t, t2i = retrieval_ranks(sims)
    assert i2t.shape == (n_img,) and t2i.shape == (5 * n_img,)


def test_coco_1k_is_the_mean_of_five_folds() -> None:
    sims = torch.randn(50, 250, generator=torch.Generator().manual_seed(1))
    folds = [retrieval_metrics(sims[f * 10 : (f + 1) * 10, f * 50 : (f + 1) * 50]) for f in range(5)]
    got = coco_1k_metrics(sims)
    for key in folds[0]:
        assert got[key] == pytest.approx(sum(m[key] for m in folds) / 5)
    assert got["rsum"] != pytest.approx(retrieval_metrics(sims)["rsum"])


def test_metrics_reject_mismatched_maps() -> None:
    with pytest.raises(ValueError, match="cap_to_img"):
        retrieval_metrics(torch.zeros(2, 10), torch.zeros(9, dtype=torch.long))


def test_pooled_similarity_is_the_cosine_of_mean_tokens_and_mean_valid_words() -> None:
    from laps.models.pooling import pooled_similarity

    gen = torch.Generator().manual_seed(0)
    img, cap = torch.randn(3, 5, 8, generator=gen), torch.randn(4, 6, 8, generator=gen)
    lens = torch.tensor([6, 1, 3, 4])
    sims = pooled_similarity(img, cap, lens)
    for v in range(3):
        for t in range(4):
            expected = torch.cosine_similarity(img[v].mean(0), cap[t, : lens[t]].mean(0), dim=0)
            assert sims[v, t] == pytest.approx(expected.item(), abs=1e-6)
