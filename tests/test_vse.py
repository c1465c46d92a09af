"""``model=vse``, the global-embedding baseline: GPO, the pooling head, training and evaluation on every
backbone, the folder format, and what the LAPS-only tools say about it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_SYNTHETIC, compose_train
from helpers.common import TINY_BERT, TINY_VIT
from laps.models import create_model
from laps.models.vse import GPO, PoolingHead, VSEModel
from laps.training.tasks import evaluate, train

TINY_SWIN = [
    "backbone=swin", "backbone.pretrained=false", "backbone.embed_size=32",
    "+backbone.vision.config_overrides.embed_dim=8", "+backbone.vision.config_overrides.depths=[1,1,1,1]",
    "+backbone.vision.config_overrides.num_heads=[1,1,1,1]",
]
CPU_FAST = ["trainer=cpu", "logger=csv"]
BACKBONES = [("tiny", ["backbone=tiny"]), ("vit", TINY_VIT + TINY_BERT), ("swin", TINY_SWIN + TINY_BERT)]
SHORT_FIT = [*CPU_FAST, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "trainer.log_every_n_steps=1",
             "model.vse_mean_warmup_epochs=0", "model.embedding_warmup_epochs=-1"]  # hardest negatives, no ramp


# ------------------------------------------------------------------------------------------ GPO
def test_gpo_weights_sum_to_one_and_padding_has_no_effect() -> None:
    torch.manual_seed(0)
    gpo = GPO()
    lens = torch.tensor([7, 4, 1, 5])
    theta = gpo.weights(lens)
    assert theta.shape == (4, 7)
    assert torch.allclose(theta.sum(1), torch.ones(4))
    assert bool((theta[torch.arange(7)[None, :] >= lens[:, None]] == 0).all())
    x = torch.randn(4, 7, 6)
    pooled = gpo(x, lens)
    noisy = x.clone()
    for b, n in enumerate(lens.tolist()):
        noisy[b, n:] = torch.randn(7 - n, 6) * 1e6  # huge padding: it would win any sort it took part in
    assert torch.equal(gpo(noisy, lens), pooled)
    # each set alone, unpadded: the same vector (the weights depend on its own size only)
    for b, n in enumerate(lens.tolist()):
        assert torch.allclose(gpo(x[b : b + 1, :n]), pooled[b : b + 1], atol=1e-6)


def test_gpo_is_permutation_invariant() -> None:
    torch.manual_seed(1)
    gpo = GPO()
    x = torch.randn(3, 9, 5)
    lens = torch.tensor([9, 6, 3])
    shuffled = x.clone()
    for b, n in enumerate(lens.tolist()):
        shuffled[b, :n] = x[b, torch.randperm(n)]
    assert torch.allclose(gpo(shuffled, lens), gpo(x, lens), atol=1e-6)
    assert not torch.allclose(gpo(x, lens), x.mean(1), atol=1e-3)  # and it is not a plain mean


def _reference_gpo_weights(gpo: GPO, lens: list[int]) -> torch.Tensor:
    """VSE-infinity's recipe, written the plain way: each set's encoding of ranks ``1 .. n`` through
    the bidirectional GRU as a packed sequence, the directions averaged, one score per rank, padding
    masked, softmax at the temperature."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from laps.models.vse import positional_encoding

    n_max = max(lens)
    pe = torch.zeros(len(lens), n_max, gpo.pe_dim)
    for b, n in enumerate(lens):
        pe[b, :n] = positional_encoding(n, gpo.pe_dim)
    packed = pack_padded_sequence(pe, torch.tensor(lens), batch_first=True, enforce_sorted=False)
    out, _ = pad_packed_sequence(gpo.gru(packed)[0], batch_first=True, total_length=n_max)
    h = gpo.hidden
    scores = gpo.linear((out[..., :h] + out[..., h:]) / 2).squeeze(-1)
    scores = scores.masked_fill(torch.arange(n_max)[None, :] >= torch.tensor(lens)[:, None], float("-inf"))
    return torch.softmax(scores / gpo.temperature, dim=1)


def test_gpo_weights_and_pooling_match_a_packed_bidirectional_gru() -> None:
    torch.manual_seed(3)
    gpo = GPO()
    with torch.no_grad():
        for p in gpo.parameters():
            p.normal_(0, 0.5)  # far from the init, so every weight of both directions matters
    lens = [9, 3, 9, 1, 6, 4]
    with torch.no_grad():
        ref = _reference_gpo_weights(gpo, lens)
        theta = gpo.weights(lens)
        assert theta.shape == ref.shape
        assert torch.allclose(theta, ref, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(theta[0, :3], ref[1, :3], atol=1e-3)  # the weights do depend on the set size
        x = torch.randn(len(lens), 9, 5)
        ordered = torch.stack([
            F.pad(x[b, :n].sort(dim=0, descending=True).values, (0, 0, 0, 9 - n)) for b, n in enumerate(lens)
        ])
        assert torch.allclose(gpo(x, lens), (ordered * ref[..., None]).sum(1), atol=1e-5)


def _rank_one_gpo() -> GPO:
    """A GPO whose score is largest at rank 1: the GRU's update gate closed (``z`` ~ 0, no memory),
    its candidate ``tanh(cos(k - 1))`` (the encoding's second coordinate, 1 only at rank 1), scaled up."""
    gpo = GPO()
    with torch.no_grad():
        for p in gpo.gru.parameters():
            p.zero_()
        h = gpo.hidden
        for suffix in ("", "_reverse"):
            getattr(gpo.gru, f"bias_ih_l0{suffix}")[h : 2 * h] = -1e4  # update gate z = sigmoid(-1e4) = 0
            getattr(gpo.gru, f"weight_ih_l0{suffix}")[2 * h, 1] = 1.0  # candidate n_0 = tanh(pe[k, 1])
        gpo.linear.weight.zero_()
        gpo.linear.weight[0, 0] = 1e4
        gpo.linear.bias.zero_()
    return gpo


def test_gpo_favouring_rank_one_is_max_pooling_and_uniform_is_mean() -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 8, 5)
    lens = torch.tensor([8, 5, 2])
    valid = (torch.arange(8)[None, :] < lens[:, None])[..., None]
    top = _rank_one_gpo()
    assert torch.allclose(top.weights(lens)[:, 0], torch.ones(3))
    assert torch.allclose(top(x, lens), x.masked_fill(~valid, float("-inf")).amax(1))
    uniform = GPO()
    with torch.no_grad():
        uniform.linear.weight.zero_()  # every rank scores the bias: equal weights
    mean = (x * valid).sum(1) / lens[:, None]
    assert torch.allclose(uniform(x, lens), mean, atol=1e-6)


# ------------------------------------------------------------------------------------------ head
def test_mean_head_is_the_cosine_of_means() -> None:
    torch.manual_seed(3)
    img, cap, lens = torch.randn(4, 17, 8), torch.randn(5, 6, 8), torch.tensor([6, 3, 1, 4, 6])
    head = PoolingHead(8, "mean")
    assert list(head.parameters()) == []
    sims, mask = head.similarity(img, cap, lens, return_mask=True)
    assert mask is None and sims.dtype == torch.float32
    means = torch.stack([cap[t, :n].mean(0) for t, n in enumerate(lens.tolist())])
    expected = F.normalize(img.mean(1), dim=-1) @ F.normalize(means, dim=-1).t()
    assert torch.allclose(sims, expected, atol=1e-6)
    prepared, none = head.score_prepared(head.prepare_images(img), head.prepare_captions(cap, lens))
    assert none is None and torch.allclose(prepared, sims)


def test_score_matrix_with_a_head_without_parameters() -> None:
    from laps.evaluation import score_matrix

    torch.manual_seed(4)
    head = PoolingHead(8, "mean")
    img, cap, lens = torch.randn(5, 3, 8).half(), torch.randn(4, 6, 8), torch.tensor([6, 2, 3, 1])
    sims = score_matrix(head, img, cap, lens, image_block=2, progress=False)
    assert torch.allclose(sims, head.similarity(img.float(), cap, lens)[0], atol=1e-6)


def test_factory_builds_vse_and_names_wrong_keys() -> None:
    kw = {"backbone": "tiny", "vision_overrides": {"num_hidden_layers": 1}, "text_overrides": {"num_hidden_layers": 1},
          "vocab_size": 64}
    model = create_model(**kw, kind="vse", pooling="gpo", sparse_ratio=0.5, aggr_ratio=0.4)
    assert isinstance(model, VSEModel) and model.head.pooling == "gpo"
    assert model.head.num_patches == 64 and model.head.has_cls
    with pytest.raises(ValueError, match=r"kind must be one of .*model\.net\.kind.*'vs'"):
        create_model(**kw, kind="vs")
    with pytest.raises(ValueError, match=r"pooling must be one of .*model\.pooling.*'max'"):
        create_model(**kw, kind="vse", pooling="max")
    with pytest.raises(ValueError, match="model.selection='gumbel'"):
        create_model(**kw, kind="vse", selection="gumbel")


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("pooling", ["mean", "gpo"])
@pytest.mark.parametrize(("name", "overrides"), BACKBONES, ids=[b[0] for b in BACKBONES])
def test_fast_dev_run(make_cfg, name: str, overrides: list[str], pooling: str) -> None:
    cfg = make_cfg([*overrides, *CPU_FAST, "debug=fdr", "model=vse", f"model.pooling={pooling}"], name=name)
    metrics = train(cfg)
    assert "val/rsum" in metrics
    from hydra.utils import instantiate

    model = instantiate(cfg.model.net, text={"vocab_size": 64})
    assert isinstance(model, VSEModel) and model.head.pooling == pooling


@pytest.fixture(scope="module")
def vse_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    """A short fit of ``model=vse model.pooling=gpo`` (tiny ViT + BERT) with its test metrics."""
    out = tmp_path_factory.mktemp("vse_run")
    cfg = compose_train([*TINY_SYNTHETIC, *TINY_VIT, *TINY_BERT, *SHORT_FIT, "model=vse", "model.pooling=gpo"],
                        out / "train", synthetic_root)
    metrics = train(cfg)
    return cfg, metrics


def test_train_logs_no_ratio_loss_and_ignores_pooled_weight(vse_run) -> None:
    import csv

    cfg, metrics = vse_run
    assert cfg.model.pooled_weight > 0  # the demo's 0.2: ignored by a vse model
    rows = [r for r in csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    assert len(rows) == 2
    for r in rows:
        assert not r.get("train/ratio_loss") and not r.get("train/pooled_loss")
        assert float(r["train/loss"]) == pytest.approx(float(r["train/contrastive"]), rel=1e-5)
    assert "test/rsum" in metrics


def test_pooled_weight_warns(caplog) -> None:
    from laps.training.module import LAPSLitModule

    net = create_model("tiny", vision_overrides={"num_hidden_layers": 1}, text_overrides={"num_hidden_layers": 1},
                       vocab_size=64, kind="vse")
    with caplog.at_level(logging.WARNING, logger="laps.training.module"):
        module = LAPSLitModule(net, torch.optim.AdamW, pooled_weight=0.2, pooling="mean")
    assert module.pooled_weight == 0.0 and "model.pooled_weight=0.2 is ignored" in caplog.text
    with pytest.raises(ValueError, match="model.pooling='gpo' disagrees"):
        LAPSLitModule(net, torch.optim.AdamW, pooling="gpo")


def test_eval_of_the_checkpoint_gives_the_same_test_metrics(vse_run, make_cfg) -> None:
    cfg, metrics = vse_run
    best = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    again = evaluate(make_cfg(["trainer=cpu", f"ckpt_path={best}"], name="eval", config_name="eval"))
    tests = {k: v for k, v in metrics.items() if k.startswith("test")}
    assert tests and {k: again[k] for k in tests} == pytest.approx(tests, abs=1e-6)


@pytest.fixture(scope="module")
def vse_folder(vse_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from laps.export import export_checkpoint

    cfg, _ = vse_run
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return export_checkpoint(last, tmp_path_factory.mktemp("export") / "vse-gpo")


def test_export_and_eval_of_the_folder(vse_run, vse_folder: Path, make_cfg) -> None:
    config = json.loads((vse_folder / "config.json").read_text())
    assert config["kind"] == "vse" and config["head"] == {"pooling": "gpo"}
    cfg, _ = vse_run
    from_ckpt = evaluate(make_cfg(["trainer=cpu", f"ckpt_path={Path(cfg.paths.output_dir) / 'checkpoints' / 'last.ckpt'}"],
                                  name="eval_last", config_name="eval"))
    from_folder = evaluate(make_cfg(["trainer=cpu", f"ckpt_path={vse_folder}", "dataset=synthetic", *TINY_SYNTHETIC],
                                    name="eval_folder", config_name="eval"))
    assert {k: from_folder[k] for k in from_ckpt} == pytest.approx(from_ckpt, abs=1e-6)


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    from laps.models import LAPSModel

    torch.manual_seed(5)
    net = create_model("tiny", vision_overrides={"num_hidden_layers": 1}, text_overrides={"num_hidden_layers": 1},
                       vocab_size=64, kind="vse", pooling="gpo").eval()
    with torch.no_grad():
        net.head.image_pool.linear.bias.fill_(0.3)  # not the initial value: the weights must travel
    net.save_pretrained(tmp_path / "m")
    images, ids, lens = torch.randn(3, 3, 64, 64), torch.randint(0, 64, (4, 7)), torch.tensor([7, 5, 3, 2])
    for cls in (VSEModel, LAPSModel):  # either class: the folder's model
        loaded = cls.from_pretrained(tmp_path / "m")
        assert isinstance(loaded, VSEModel) and loaded.head.pooling == "gpo"
        with torch.no_grad():
            assert torch.equal(loaded(images, ids, lens), net(images, ids, lens))


# ------------------------------------------------------------------------------------------ tools
def test_retrieve_searches_and_refuses_rerank(vse_folder: Path, vse_run, tmp_path: Path, capsys) -> None:
    from laps.cli.retrieve import main
    from laps.data.splits import load_split

    cfg, _ = vse_run
    images = tmp_path / "images"
    images.mkdir()
    for p in load_split(cfg.dataset.root, "test", cfg.dataset.images_dir).image_paths[:4]:
        (images / Path(p).name).write_bytes(Path(p).read_bytes())
    index = tmp_path / "index.pt"
    main(["index", "--ckpt", str(vse_folder), "--images", str(images), "--out", str(index), "--device", "cpu"])
    out = tmp_path / "found.json"
    main(["search", "a red circle", "--ckpt", str(vse_folder), "--index", str(index), "--top-k", "2",
          "--device", "cpu", "--json", str(out)])
    found = json.loads(out.read_text())
    assert len(found["results"][0]["paths"]) == 2 and found["stats"]["mode"] == "full"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["search", "a red circle", "--ckpt", str(vse_folder), "--index", str(index), "--rerank", "2",
              "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rerank" in err[0] and "model=vse" in err[0] and "without --rerank" in err[0]


@pytest.mark.parametrize("pooling", ["mean", "gpo"])
def test_estimate_counts_a_vse_step(make_cfg, pooling: str) -> None:
    from laps.estimate.run import estimate

    cfg = make_cfg(["dataset.batch_size=4", "estimate.caption_length=12", "backbone=tiny", "model=vse",
                    f"model.pooling={pooling}"], config_name="estimate")
    result = estimate(cfg)
    assert result["peak_gib"] > result["params_gib"] + result["optimizer_gib"] > 0  # activations on top
    assert result["activations_gib"] > 0 and result["flops_per_pair"] > 0
    assert result["batch_size"] == 4 and result["caption_length"] == 12


def test_visualize_refuses(vse_folder: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from laps.cli.visualize import main

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
    with pytest.raises(SystemExit):
        main(["--ckpt", str(vse_folder), "--image", str(image), "--caption", "a red square", "--out",
              str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "laps-visualize" in err[0] and "model=vse" in err[0] and "selects no patches" in err[0]
    assert not (tmp_path / "out").exists()
