"""``laps.models.explain`` against the head and the official golden outputs, ``laps.inference`` and
``laps-visualize`` on a tiny checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import FIXTURES
from helpers.common import TINY_BERT, TINY_VIT, rel_err
from laps.models.explain import explain_pair
from laps.models.head import LAPSHead

REL_TOL = 1e-5

# 32 px images, 8 px patches: a 4 x 4 grid (16 patches) and [CLS]; one layer each, width 32.
VIT_AND_BERT = [*TINY_VIT, *TINY_BERT]


def _random_head(dim: int, n_patch: int, sparse: float, aggr: float, has_cls: bool, seed: int = 0) -> LAPSHead:
    torch.manual_seed(seed)
    head = LAPSHead(dim, n_patch, sparse, aggr, has_cls=has_cls)
    with torch.no_grad():  # away from the initial values (scale 1, zero biases)
        for p in head.aggregation.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head


@pytest.mark.parametrize(
    ("has_cls", "n_patch", "sparse", "aggr"),
    [(True, 196, 0.5, 0.4), (False, 49, 0.8, 0.6), (True, 16, 1.0, 0.5), (True, 16, 0.3, 0.5)],
)
def test_explain_reproduces_the_head(has_cls: bool, n_patch: int, sparse: float, aggr: float) -> None:
    head = _random_head(48, n_patch, sparse, aggr, has_cls)
    img = torch.randn(3, n_patch + int(has_cls), 48) * 2.0
    cap = torch.randn(4, 11, 48)
    lens = torch.tensor([11, 2, 7, 5])
    head.eval()
    with torch.no_grad():
        sims, _ = head.similarity(img, cap, lens)
        head.train()
        sims_train, score_mask = head(img, cap, lens)
    expl = explain_pair(head, img, cap, lens)

    assert rel_err(expl["similarity"], sims) <= REL_TOL
    assert (expl["similarity"] - sims).abs().max() <= REL_TOL * sims.abs().max()
    assert rel_err(expl["similarity"], sims_train) <= REL_TOL
    assert torch.equal(expl["keep"], score_mask.transpose(0, 1).bool())
    assert torch.allclose(expl["t2i"] + expl["i2t"], expl["similarity"])

    k, n_m = math.ceil(n_patch * sparse), head.num_aggregated
    keep, fuse, agg, score = expl["keep"], expl["fuse_weights"], expl["aggregation_weights"], expl["score"]
    assert k == head.num_keep and bool((keep.sum(-1) == k).all())
    assert expl["kept_indices"].shape == (3, 4, k)
    assert torch.equal(keep, torch.zeros_like(keep).scatter(-1, expl["kept_indices"], True))
    kept_scores = score.gather(-1, expl["kept_indices"])  # in the head's order: score descending
    assert bool((kept_scores[..., :-1] >= kept_scores[..., 1:]).all())
    assert torch.allclose(score, expl["salience"][:, None] + expl["relevance"])
    # fusion: a softmax over the dropped patches, zeros on kept ones (all zeros when none is dropped)
    assert bool((fuse[keep] == 0).all())
    expected_total = 0.0 if k == n_patch else 1.0
    assert torch.allclose(fuse.sum(-1), torch.full((3, 4), expected_total))
    # aggregation: per aggregated token a softmax over the kept patches, zeros elsewhere
    assert agg.shape == (3, 4, n_m, n_patch)
    assert bool((agg.masked_select(~keep[:, :, None, :].expand_as(agg)) == 0).all())
    assert torch.allclose(agg.sum(-1), torch.ones(3, 4, n_m))


def test_explain_one_image_against_many_captions_matches_pairs() -> None:
    head = _random_head(32, 49, 0.5, 0.4, True, seed=1).eval()
    img = torch.randn(1, 50, 32)
    cap = torch.randn(3, 9, 32)
    lens = torch.tensor([9, 4, 6])
    block = explain_pair(head, img, cap, lens)
    for t in range(3):
        one = explain_pair(head, img, cap[t : t + 1, : int(lens[t])], lens[t : t + 1])
        assert torch.equal(one["keep"][0, 0], block["keep"][0, t])
        assert torch.allclose(one["similarity"][0, 0], block["similarity"][0, t], rtol=1e-6)
        assert torch.allclose(one["aggregation_weights"][0, 0], block["aggregation_weights"][0, t])


def test_explain_rejects_wrong_token_count() -> None:
    head = _random_head(16, 16, 0.5, 0.5, True)
    with pytest.raises(ValueError, match="tokens"):
        explain_pair(head, torch.randn(1, 16, 16), torch.randn(1, 3, 16), torch.tensor([3]))


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures missing: {FIXTURES}")
@pytest.mark.parametrize("file", ["head_vit_like.pt", "head_swin_like.pt", "head_vit_b16_shape.pt"])
def test_explain_matches_the_official_release(file: str) -> None:
    """The explanation's similarity and kept patches are the official code's (golden outputs)."""
    from laps.compat.official import load_head_state_dict

    data = torch.load(FIXTURES / file, weights_only=True)
    cfg = data["config"]
    head = LAPSHead(cfg["embed_size"], cfg["num_patches"], cfg["sparse_ratio"], cfg["aggr_ratio"], cfg["has_cls"])
    load_head_state_dict(head, data["state_dict"])
    expl = explain_pair(head.eval(), data["img_embs"], data["cap_embs"], data["cap_lens"])
    assert rel_err(expl["similarity"], data["sims_eval"]) <= REL_TOL
    assert torch.equal(expl["keep"].float(), data["score_mask"].transpose(0, 1).float())
    assert expl["kept_indices"].shape[-1] == cfg["keep_tokens"]
    assert expl["aggregation_weights"].shape[2] == cfg["aggregated_tokens"]


# ---------------------------------------------------------------------------- checkpoint, inference, CLI
def write_checkpoint(cfg, path: Path) -> Path:
    """``{"state_dict", "laps_config"}`` of the composed train config (random weights), as laps-train saves."""
    from laps.training.tasks import build_datamodule, build_module

    module = build_module(cfg, build_datamodule(cfg).vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "laps_config": module.config_snapshot}, path)
    return path


@pytest.fixture
def tiny_ckpt(make_cfg, tmp_path: Path):
    """A random tiny ViT checkpoint (4 x 4 patches, sparse 0.3 -> 5 kept, 2 aggregated) and its config."""
    torch.manual_seed(0)
    cfg = make_cfg([*VIT_AND_BERT, "ratios.sparse_ratio=0.3", "ratios.aggr_ratio=0.5"], name="vis")
    return write_checkpoint(cfg, tmp_path / "tiny.ckpt"), cfg


def _test_image(cfg) -> tuple[Path, list[str]]:
    from laps.data.splits import load_split

    split = load_split(cfg.dataset.root, "test", cfg.dataset.images_dir)
    return split.image_paths[0], split.captions[:2]


def test_load_for_inference_matches_the_model(tiny_ckpt) -> None:
    from laps.data.datasets import open_image
    from laps.data.transforms import build_transform
    from laps.inference import load_for_inference
    from laps.training.tasks import build_module

    ckpt, cfg = tiny_ckpt
    engine = load_for_inference(ckpt, device="cpu")
    assert engine.device == torch.device("cpu") and not engine.model.training
    assert engine.head.num_keep == 5 and engine.head.num_patches == 16
    image_path, captions = _test_image(cfg)

    stored = torch.load(ckpt, weights_only=True)
    module = build_module(cfg, engine.tokenizer.vocab_size)
    module.load_state_dict(stored["state_dict"])
    net = module.net.eval()
    pixels = build_transform(32, train=False)(open_image(image_path))[None]
    ids, lens = engine.tokenize(captions)
    with torch.no_grad():
        expected = net.similarity(net.encode_image(pixels), net.encode_text(ids, lens), lens)
    img = engine.encode_images([image_path])
    cap, cap_lens = engine.encode_captions(captions)
    assert torch.allclose(engine.similarity(img, cap, cap_lens), expected, rtol=1e-5, atol=1e-6)


def test_load_for_inference_refuses_a_plain_state_dict(tmp_path: Path) -> None:
    from laps.inference import load_for_inference

    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="laps-import-official"):
        load_for_inference(tmp_path / "bare.ckpt", device="cpu")


def test_eval_transform_renormalises_exactly() -> None:
    from laps.data.transforms import build_transform
    from laps.inference import eval_transform

    img = Image.new("RGB", (40, 30), (200, 100, 50))
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    out = eval_transform(32, clip_mean, clip_std)(img)
    raw = build_transform(32, train=False)(img) * torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1) + torch.tensor(
        (0.485, 0.456, 0.406)).view(3, 1, 1)
    expected = (raw - torch.tensor(clip_mean).view(3, 1, 1)) / torch.tensor(clip_std).view(3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_visualize_writes_one_png_per_caption(tiny_ckpt, tmp_path: Path) -> None:
    from laps.cli.visualize import DEFAULT_DPI, FIG_SIZE, main
    from laps.inference import load_for_inference

    ckpt, cfg = tiny_ckpt
    image_path, captions = _test_image(cfg)
    captions = [*captions, "a big red circle left of a small blue star"]
    out = tmp_path / "pictures"
    argv = ["--ckpt", str(ckpt), "--image", str(image_path), "--out", str(out), "--device", "cpu"]
    for c in captions:
        argv += ["--caption", c]
    main(argv)

    pngs, jsons = sorted(out.glob("*.png")), sorted(out.glob("*.json"))
    assert len(pngs) == len(jsons) == len(captions)
    engine = load_for_inference(ckpt, device="cpu")
    with torch.no_grad():
        cap, lens = engine.encode_captions(captions)
        sims = engine.similarity(engine.encode_images([image_path]), cap, lens)[0]
    expected_keep = math.ceil(16 * 0.3)
    for t, (png, js) in enumerate(zip(pngs, jsons)):
        record = json.loads(js.read_text())
        assert record["caption"] == captions[t] and Path(record["png"]) == png
        assert len(record["kept"]) == len(set(record["kept"])) == expected_keep == record["num_keep"]
        assert sum(record["keep_mask"]) == expected_keep
        assert sorted(record["kept"]) == [i for i, b in enumerate(record["keep_mask"]) if b]
        assert record["grid"] == [4, 4] and record["num_aggregated"] == 2
        assert sum(record["aggregation_map"]) == pytest.approx(2.0, abs=1e-5)  # summed over 2 tokens
        assert sum(record["fuse_weights"]) == pytest.approx(1.0, abs=1e-5)
        assert record["similarity"] == pytest.approx(float(sims[t]), rel=1e-5, abs=1e-6)
        with Image.open(png) as im:
            assert im.format == "PNG"
            assert im.size == (round(FIG_SIZE[0] * DEFAULT_DPI), round(FIG_SIZE[1] * DEFAULT_DPI))


def test_visualize_one_aggregated_token_and_errors(tiny_ckpt, tmp_path: Path, capsys) -> None:
    from laps.cli.visualize import main, patch_grid

    ckpt, cfg = tiny_ckpt
    image_path, captions = _test_image(cfg)
    base = ["--ckpt", str(ckpt), "--image", str(image_path), "--caption", captions[0], "--device", "cpu"]
    main([*base, "--out", str(tmp_path / "one"), "--token", "1", "--dpi", "50"])
    (js,) = (tmp_path / "one").glob("*.json")
    record = json.loads(js.read_text())
    assert record["aggregation_token"] == 1 and sum(record["aggregation_map"]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(SystemExit) as exc:
        main([*base, "--out", str(tmp_path / "bad"), "--token", "7"])
    assert exc.value.code == 2 and "--token 7" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*base, "--out", str(tmp_path / "bad"), "--image", str(tmp_path / "missing.png")])
    assert exc.value.code == 2 and "missing.png" in capsys.readouterr().err
    with pytest.raises(ValueError, match="square"):
        patch_grid(50)


def test_visualize_help() -> None:
    result = subprocess.run([sys.executable, "-m", "laps.cli.visualize", "--help"], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert "--caption" in result.stdout and "--ckpt" in result.stdout
