"""Official LAPS checkpoints: loading reproduces the official release's outputs; bad files fail loudly."""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES
from helpers.common import rel_err
from laps.compat import (
    UnsafeCheckpointError,
    build_official_model,
    load_head_state_dict,
    load_official_checkpoint,
    load_official_state_dict,
    official_hparams,
    safe_load,
)
from laps.losses import contrastive_loss, ratio_loss
from laps.models.head import LAPSHead

CASES = ["official_tiny", "official_tiny_swin"]
TOL = 1e-4

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures missing: {FIXTURES}")


def case_dir(name: str) -> Path:
    return FIXTURES / name


def load_case(name: str, path: Path | None = None):
    folder = case_dir(name)
    return load_official_checkpoint(path or folder / "model_best.pth", folder / "vision", folder / "text")


@pytest.fixture(scope="module")
def loaded():
    """Each official fixture loaded once: ``{name: (model, expected)}``."""
    return {name: (load_case(name), torch.load(case_dir(name) / "expected.pt", weights_only=True)) for name in CASES}


@pytest.fixture(scope="module")
def raw():
    """The official checkpoints as stored: ``{name: dict}``."""
    return {name: safe_load(case_dir(name) / "model_best.pth") for name in CASES}


@pytest.fixture(scope="module")
def blank():
    """Random models of each fixture's architecture, for checks that must fail before loading."""
    models = {}
    for name in CASES:
        ckpt = safe_load(case_dir(name) / "model_best.pth")
        models[name] = build_official_model(
            official_hparams(ckpt["opt"]), case_dir(name) / "vision", case_dir(name) / "text"
        )
    return models


# ---------------------------------------------------------------------------- reproduction


@pytest.mark.parametrize("name", CASES)
def test_eval_outputs_match_official(loaded, name):
    model, exp = loaded[name]
    model.eval()
    assert not model.training
    with torch.no_grad():
        img = model.encode_image(exp["images"])
        cap = model.encode_text(exp["captions"], exp["lengths"])
        sims = model(exp["images"], exp["captions"], exp["lengths"])
    assert img.shape == exp["img_emb"].shape and cap.shape == exp["cap_emb"].shape
    assert rel_err(img, exp["img_emb"]) < TOL
    assert rel_err(cap, exp["cap_emb"]) < TOL
    assert sims.shape == exp["sims_eval"].shape
    assert rel_err(sims, exp["sims_eval"]) < TOL


@pytest.mark.parametrize("name", CASES)
def test_train_loss_matches_official(loaded, raw, name):
    model, exp = loaded[name]
    opt = raw[name]["opt"]
    model.train()
    try:
        sims, score_mask = model(exp["images"], exp["captions"], exp["lengths"])
        loss = contrastive_loss(sims, exp["img_ids"], margin=0.2, max_violation=True) + 2.0 * ratio_loss(
            score_mask, opt.sparse_ratio
        )
    finally:
        model.eval()
    ref = exp["train_loss_max_violation"]
    assert abs(loss.item() - ref.item()) <= TOL * abs(ref.item())


@pytest.mark.parametrize("name", CASES)
def test_every_weight_comes_from_the_file(loaded, raw, name):
    """Name-independent: each model tensor equals a file tensor and vice versa (pooler and
    Swin's relative_position_index buffers aside)."""
    model, _ = loaded[name]
    theirs = [
        v
        for k, v in raw[name]["model"].items()
        if ".pooler." not in k and not k.endswith("relative_position_index")
    ]
    ours = list(model.state_dict().values())
    ours = [v for v in ours if v.is_floating_point()]
    assert len(ours) == len(theirs)
    unmatched = [t for t in theirs if not any(o.shape == t.shape and torch.equal(o, t) for o in ours)]
    assert not unmatched
    unmatched = [o for o in ours if not any(o.shape == t.shape and torch.equal(o, t) for t in theirs)]
    assert not unmatched


def test_loaded_model_is_in_eval_mode():
    model = load_case("official_tiny")
    assert not model.training and not model.vision.backbone.training


def test_dataparallel_prefix_is_accepted(raw, tmp_path, loaded):
    ckpt = dict(raw["official_tiny"])
    ckpt["model"] = {f"module.{k}": v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "ddp.pth")
    model = load_case("official_tiny", tmp_path / "ddp.pth")
    ref, _ = loaded["official_tiny"]
    theirs = ref.state_dict()
    assert model.state_dict().keys() == theirs.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, theirs[k]), k


# ---------------------------------------------------------------------------- failing loudly


def _edited(raw, name, edit) -> dict:
    state = dict(raw[name]["model"])
    edit(state)
    return state


def test_extra_key_in_file_fails(raw, tmp_path):
    ckpt = copy.copy(raw["official_tiny"])
    ckpt["model"] = {**ckpt["model"], "cross_net.bogus.weight": torch.zeros(3)}
    torch.save(ckpt, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"cross_net\.bogus\.weight"):
        load_case("official_tiny", tmp_path / "extra.pth")


@pytest.mark.parametrize(
    ("name", "key", "pattern"),
    [
        ("official_tiny", "foo.bar", r"Unknown keys.*foo\.bar"),
        ("official_tiny", "img_enc.visual_encoder.encoder.layer.0.bogus.weight", r"unexpected.*bogus"),
        (
            "official_tiny_swin",
            "img_enc.visual_encoder.encoder.layers.0.blocks.0.bogus",
            r"unexpected.*bogus",
        ),
        (
            "official_tiny",
            "txt_enc.bert.encoder.layer.9.output.dense.weight",
            r"txt_enc\.bert.*unexpected.*layer\.9",
        ),
        ("official_tiny", "img_enc.vision_proj.extra", r"vision_proj.*extra"),
        ("official_tiny", "cross_net.aggr_net.weight.5.weight", r"unknown keys.*aggr_net\.weight\.5\.weight"),
    ],
)
def test_unknown_key_fails(raw, blank, name, key, pattern):
    state = _edited(raw, name, lambda sd: sd.__setitem__(key, torch.zeros(2)))
    with pytest.raises(ValueError, match=pattern):
        load_official_state_dict(blank[name], state)


@pytest.mark.parametrize(
    ("name", "key", "pattern"),
    [
        (
            "official_tiny",
            "txt_enc.bert.encoder.layer.1.output.dense.weight",
            r"missing.*encoder\.layer\.1\.output",
        ),
        # Swin's query weight reappears under its transformers-5 name in the report
        (
            "official_tiny_swin",
            "img_enc.visual_encoder.encoder.layers.2.blocks.0.attention.self.query.weight",
            r"missing.*layers\.2\.blocks\.0\.attention\.q_proj\.weight",
        ),
        ("official_tiny", "img_enc.visual_encoder.embeddings.cls_token", r"missing.*cls_token"),
        ("official_tiny", "cross_net.aggr_net.scale", r"missing.*aggr_net\.scale"),
        ("official_tiny", "txt_enc.fc.bias", r"txt_enc\.fc"),
    ],
)
def test_missing_key_fails(raw, blank, name, key, pattern):
    state = _edited(raw, name, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=pattern):
        load_official_state_dict(blank[name], state)


def test_all_problems_reported_together_and_nothing_loaded(raw, blank):
    model = blank["official_tiny"]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def edit(sd):
        sd.pop("txt_enc.bert.embeddings.word_embeddings.weight")
        sd["img_enc.visual_encoder.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(97, 48)

    with pytest.raises(ValueError) as info:
        load_official_state_dict(model, _edited(raw, "official_tiny", edit))
    assert "word_embeddings" in str(info.value) and "(97, 48)" in str(info.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wrong_architecture_fails(raw, blank):
    # the Swin checkpoint's head does not fit the ViT model (39 vs 23 aggregated tokens)
    swin_head = {k: v for k, v in raw["official_tiny_swin"]["model"].items() if k.startswith("cross_net.")}
    state = {
        **{k: v for k, v in raw["official_tiny"]["model"].items() if not k.startswith("cross_net.")},
        **swin_head,
    }
    with pytest.raises(ValueError, match=r"shape"):
        load_official_state_dict(blank["official_tiny"], state)


def test_hostile_pickle_refused(raw, tmp_path):
    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    ckpt = dict(raw["official_tiny"])
    ckpt["opt"] = Payload()
    torch.save(ckpt, tmp_path / "hostile.pth")
    with pytest.raises(UnsafeCheckpointError, match="hostile.pth"):
        load_case("official_tiny", tmp_path / "hostile.pth")
    assert not target.exists()


def test_not_an_official_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an official LAPS checkpoint"):
        load_official_checkpoint(tmp_path / "other.pth")


# ---------------------------------------------------------------------------- the head alone


def _head_case(file: str):
    data = torch.load(FIXTURES / file, weights_only=True)
    cfg = data["config"]
    head = LAPSHead(
        cfg["embed_size"], cfg["num_patches"], cfg["sparse_ratio"], cfg["aggr_ratio"], cfg["has_cls"]
    )
    return head.eval(), data


@pytest.mark.parametrize("file", ["head_vit_like.pt", "head_swin_like.pt"])
@pytest.mark.parametrize("prefix", ["", "cross_net."])
def test_load_head_state_dict_key_styles(file, prefix):
    head, data = _head_case(file)
    state = {prefix + k: v for k, v in data["state_dict"].items()}
    load_head_state_dict(head, state)
    with torch.no_grad():
        sims = head(data["img_embs"], data["cap_embs"], data["cap_lens"])
    assert rel_err(sims, data["sims_eval"]) < TOL
    assert torch.equal(head.aggregation.scale, data["state_dict"]["aggr_net.scale"])


def test_load_head_state_dict_lists_bad_keys():
    head, data = _head_case("head_vit_like.pt")
    state = dict(data["state_dict"])
    state.pop("aggr_net.weight.1.bias")
    state["aggr_net.weight.2.weight"] = torch.zeros(1)
    state["aggr_net.sparse.score"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        load_head_state_dict(head, state)
    message = str(info.value)
    assert "aggr_net.weight.1.bias" in message
    assert "aggr_net.weight.2.weight" in message and "aggr_net.sparse.score" in message
    both = {**{f"cross_net.{k}": v for k, v in data["state_dict"].items()}, **data["state_dict"]}
    with pytest.raises(ValueError, match="twice"):
        load_head_state_dict(head, both)


# ---------------------------------------------------------------------------- options


def test_official_hparams(raw):
    vit = official_hparams(raw["official_tiny"]["opt"])
    assert (vit["embed_size"], vit["sparse_ratio"], vit["aggr_ratio"]) == (32, 0.5, 0.4)
    assert (vit["margin"], vit["ratio_weight"], vit["vit_type"], vit["img_res"]) == (0.2, 2.0, "vit", 224)
    assert vit["vision_backbone"] == "google/vit-base-patch16-224-in21k"
    assert vit["text_backbone"] == "bert-base-uncased"
    assert vit["lr_schedules"] == [9, 15, 20, 25] and vit["num_patches"] == 196
    swin = official_hparams(raw["official_tiny_swin"]["opt"])
    assert (swin["sparse_ratio"], swin["aggr_ratio"]) == (0.8, 0.6)
    assert swin["vision_backbone"] == "microsoft/swin-base-patch4-window7-224"
    opt384 = argparse.Namespace(**{**vars(raw["official_tiny_swin"]["opt"]), "img_res": 384})
    assert official_hparams(opt384)["vision_backbone"] == "microsoft/swin-base-patch4-window12-384"
    assert (
        official_hparams({**vars(opt384), "vit_type": "vit"})["vision_backbone"]
        == "google/vit-base-patch16-384"
    )
    with pytest.raises(ValueError, match="sparse_ratio"):
        official_hparams({"embed_size": 512, "aggr_ratio": 0.4, "vit_type": "vit"})
    with pytest.raises(ValueError, match="vit_type"):
        official_hparams({**vars(opt384), "vit_type": "resnet"})


def test_official_hparams_are_plain(raw, tmp_path):
    torch.save(official_hparams(raw["official_tiny"]["opt"]), tmp_path / "h.pt")
    torch.load(tmp_path / "h.pt", weights_only=True)  # no globals needed
