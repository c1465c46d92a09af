"""The paper's Gumbel selection (``selection="gumbel"``): trains, and its ratio loss has a gradient."""

from __future__ import annotations

import math

import pytest
import torch

from laps.losses import ratio_loss
from laps.models.gumbel import decide, decision_scores
from laps.models.head import LAPSHead


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(6, 50, 32, generator=g)
    cap = torch.randn(6, 9, 32, generator=g)
    return img, cap, torch.tensor([9, 5, 7, 3, 9, 4])


def test_ratio_loss_moves_kept_fraction_toward_sparse_ratio() -> None:
    torch.manual_seed(0)
    head = LAPSHead(32, 49, sparse_ratio=0.3, aggr_ratio=0.6, has_cls=True, selection="gumbel").train()
    img, cap, lens = _inputs()
    opt = torch.optim.AdamW(head.parameters(), lr=5e-3)
    fractions = []
    for _ in range(40):
        sims, mask = head(img, cap, lens)
        loss = 2.0 * ratio_loss(mask, head.sparse_ratio) - 1e-3 * sims.mean()
        opt.zero_grad()
        loss.backward()
        assert head.predictor.net[1].weight.grad is not None
        assert head.predictor.net[1].weight.grad.abs().sum() > 0  # the ratio loss reaches the predictor
        opt.step()
        fractions.append(float(mask.mean()))
    start, end = sum(fractions[:5]) / 5, sum(fractions[-5:]) / 5
    assert abs(end - 0.3) < abs(start - 0.3) - 0.03, (start, end)


def test_inference_keeps_top_k_by_decision_score(monkeypatch: pytest.MonkeyPatch) -> None:
    from laps.models import gumbel

    torch.manual_seed(0)
    head = LAPSHead(32, 49, sparse_ratio=0.3, aggr_ratio=0.6, has_cls=True, selection="gumbel").eval()
    img, cap, lens = _inputs(1)
    scores = []
    monkeypatch.setattr(gumbel, "decision_scores", lambda *a: scores.append(decision_scores(*a)) or scores[-1])
    with torch.no_grad():
        sims, mask = head.similarity(img, cap, lens, return_mask=True)
    assert sims.shape == (6, 6) and torch.isfinite(sims).all()
    k = math.ceil(49 * 0.3)
    assert (mask.sum(-1) == k).all()
    s = torch.cat(scores, dim=1)  # (B_v, B_t, N), blocks of captions in order
    assert torch.equal(mask, torch.zeros_like(s).scatter_(-1, s.topk(k, dim=-1).indices, 1.0))


def test_straight_through_decisions_are_hard_and_never_empty() -> None:
    torch.manual_seed(0)
    s = torch.full((2, 3, 10), 1e-4, requires_grad=True)  # nearly always keeps nothing: the fallback
    keep = decide(s, num_keep=3, tau=1.0, training=True)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    assert (keep.detach().sum(-1) >= 1).all()
    keep.sum().backward()
    assert s.grad is not None
    # the straight-through estimator: hard decisions forward, a gradient backward
    s = torch.full((2, 3, 10), 0.5, requires_grad=True)
    keep = decide(s, num_keep=3, tau=1.0, training=True)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    keep.sum().backward()
    assert s.grad.abs().sum() > 0


def test_decision_score_mixes_prediction_and_normalised_attention() -> None:
    p = torch.tensor([[0.0, 1.0, 0.5]])
    s_img = torch.tensor([[1.0, 2.0, 3.0]])  # min-max -> 0, 0.5, 1
    s_txt = torch.tensor([[[3.0, 2.0, 1.0]]])  # min-max -> 1, 0.5, 0
    s = decision_scores(p, s_txt, s_img, attention_weight=0.8)
    expected = 0.2 * p.unsqueeze(1) + 0.8 * torch.tensor([[[0.5, 0.5, 0.5]]])
    torch.testing.assert_close(s, expected)


def test_topk_stays_the_default_and_has_no_predictor() -> None:
    head = LAPSHead(32, 49)
    assert head.selection == "topk" and not hasattr(head, "predictor")
    with pytest.raises(ValueError, match="selection"):
        LAPSHead(32, 49, selection="soft")


def test_model_selection_gumbel_trains_through_the_framework(make_cfg) -> None:
    from laps.training.tasks import train

    cfg = make_cfg(["model.selection=gumbel", "model.gumbel_tau=0.5", "trainer=cpu", "logger=csv", "debug=fdr"])
    metrics = train(cfg)
    assert "val/rsum" in metrics
    from hydra.utils import instantiate

    net = instantiate(cfg.model.net, text={"vocab_size": 64})
    assert net.head.selection == "gumbel" and net.head.gumbel_tau == 0.5 and hasattr(net.head, "predictor")


def test_evaluation_scores_a_gumbel_head_with_its_own_selection() -> None:
    """score_matrix (validation, test, laps-retrieve) goes through prepare/score_prepared: for a
    gumbel head that must be the gumbel selection, as in head.similarity, not the top-k one."""
    from laps.evaluation import score_matrix

    torch.manual_seed(0)
    head = LAPSHead(32, 49, 0.3, 0.5, has_cls=True, selection="gumbel").eval()
    topk = LAPSHead(32, 49, 0.3, 0.5, has_cls=True)
    topk.aggregation.load_state_dict(head.aggregation.state_dict())
    img, cap, lens = _inputs()
    with torch.no_grad():
        direct = head.similarity(img, cap, lens)[0]
        scored = score_matrix(head, img, cap, lens, image_block=4, progress=False)
        assert not torch.allclose(direct, topk.similarity(img, cap, lens)[0], atol=1e-3)  # the selections differ
    assert torch.allclose(scored, direct, atol=1e-6)


def test_float64_inputs_score_in_float64() -> None:
    """Like the top-k head, a gumbel head computes in float64 for float64 inputs (the caption side
    comes from prepare_captions, which keeps float64), and agrees with its float32 scores."""
    torch.manual_seed(0)
    head = LAPSHead(32, 49, 0.3, 0.5, has_cls=True, selection="gumbel").eval()
    img, cap, lens = _inputs()
    with torch.no_grad():
        sims64 = head.double().similarity(img.double(), cap.double(), lens)[0]
        sims32 = head.float().similarity(img, cap, lens)[0]
    assert sims64.dtype == torch.float64
    assert torch.allclose(sims64.float(), sims32, atol=1e-4)


def test_explain_pair_refuses_a_gumbel_head() -> None:
    from laps.models.explain import explain_pair

    head = LAPSHead(32, 49, 0.3, 0.5, has_cls=True, selection="gumbel")
    img, cap, lens = _inputs()
    with pytest.raises(ValueError, match="selection='gumbel'"):
        explain_pair(head, img[:1], cap, lens)
