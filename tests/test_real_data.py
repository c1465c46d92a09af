"""The real-data evaluation path end to end: the real F30K test split and COCO testall/dev caption and id
files (``/work/shared/data``) with small generated images named as the real files, a WordPiece vocabulary
built from the captions, a tiny-encoder checkpoint, and ``laps-eval`` (``laps.training.tasks.evaluate``) with the
full protocols: F30K 1K (1,000 images x 5,000 captions), COCO 5K and the mean of five folds of 1,000.

The metrics must equal :func:`laps.metrics.retrieval_metrics` / :func:`laps.metrics.coco_1k_metrics` applied
to the similarity matrix that ``save_sims=true`` writes, and a few entries of that matrix must equal the
model's own scores of the image files and caption lines (so the rows and columns are the real files in the
real order).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_train
from helpers.standins import (
    TINY_REAL,
    build_coco_mapping,
    build_wordpiece_vocab,
    coco_file,
    make_coco_standin,
    make_f30k_standin,
    read_lines,
    shared_data,
    write_tiny_checkpoint,
)
from laps.cli.check_data import check_dataset
from laps.compat.official_results import load_official_results
from laps.data.datasets import pad_input_ids
from laps.data.splits import DataError, load_split
from laps.data.tokenization import CaptionTokenizer
from laps.data.transforms import build_transform
from laps.eccv import EccvSplitMismatch, caption_ids_of, eccv_cxc_metrics
from laps.metrics import coco_1k_metrics, retrieval_metrics
from laps.training.tasks import evaluate, train

MAX_WORDS = 12  # word pieces per caption: keeps the 5,000 x 25,000 scoring in minutes on 2 CPU cores
IMAGE_SIZE = 16
METRIC_NAMES = sorted(
    [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    + [f"{d}_{m}" for d in ("i2t", "t2i") for m in ("medr", "meanr")]
    + ["rsum"]
)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Stand-ins (F30K test; COCO dev without id_mapping.json), a vocabulary of the real captions, and a
    tiny-encoder checkpoint trained on nothing (random weights, written as laps-import-official does)."""
    base = tmp_path_factory.mktemp("real")
    f30k = make_f30k_standin(base / "f30k", "test", size=IMAGE_SIZE)
    coco_dev = make_coco_standin(base / "coco_dev", "dev", size=IMAGE_SIZE, mapping=False)
    texts = [
        *read_lines(shared_data("f30k") / "test_caps.txt"),
        *read_lines(shared_data("coco") / "testall_caps.txt"),
    ]
    vocab = build_wordpiece_vocab(texts, base / "vocab", vocab_size=3000)
    cfg = compose_train(
        [*TINY_REAL, "dataset=f30k", f"dataset.root={f30k}", f"dataset.tokenizer={vocab}",
         f"dataset.max_words={MAX_WORDS}", "dataset.num_workers=0", "trainer=cpu"],
        base / "train_run", base,
    )
    ckpt = write_tiny_checkpoint(cfg, base / "tiny.ckpt")
    return SimpleNamespace(base=base, f30k=f30k, coco_dev=coco_dev, vocab=vocab, ckpt=ckpt)


def run_eval(real: SimpleNamespace, name: str, root: Path, out: Path, *extra: str):
    """``laps-eval ckpt_path=... dataset=<name> dataset.root=<root> save_sims=true``, in-process."""
    cfg = compose_train(
        [f"ckpt_path={real.ckpt}", f"dataset={name}", f"dataset.root={root}", f"dataset.tokenizer={real.vocab}",
         f"dataset.max_words={MAX_WORDS}", "dataset.num_workers=0", "trainer=cpu", "save_sims=true", *extra],
        out, real.base, "eval",
    )
    start = time.perf_counter()
    metrics = evaluate(cfg)
    elapsed = time.perf_counter() - start
    saved = torch.load(out / "sims_test.pt", weights_only=True)
    written = json.loads((out / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    print(f"\nlaps-eval {name} {root.name}: {tuple(saved['sims'].shape)} in {elapsed:.1f} s")
    return metrics, saved, elapsed


def test_eval_keeps_the_checkpoints_tokenizer_when_the_dataset_is_replaced(real: SimpleNamespace, tmp_path: Path) -> None:
    from laps.compat.serialization import safe_load
    from laps.training.tasks import run_config

    checkpoint = safe_load(real.ckpt)
    base = [f"ckpt_path={real.ckpt}", "dataset=coco", f"dataset.root={real.coco_dev}"]
    kept = run_config(compose_train(base, tmp_path / "kept", real.base, "eval"), checkpoint)
    assert kept.dataset.tokenizer == str(real.vocab) and kept.dataset.name == "coco"
    other = tmp_path / "other_vocab"
    given = run_config(compose_train([*base, f"dataset.tokenizer={other}"], tmp_path / "given", real.base, "eval"),
                       checkpoint)
    assert given.dataset.tokenizer == str(other)


def assert_metrics_equal(metrics: dict[str, float], prefix: str, expected: dict[str, float]) -> None:
    got = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.split("/", 1)[0] == prefix}
    assert sorted(got) == METRIC_NAMES
    for key in METRIC_NAMES:  # logged through Lightning as float32
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-4), (prefix, key)


def model_scores(real: SimpleNamespace, image_files: list[Path], captions: list[str]) -> torch.Tensor:
    """The checkpoint's model scoring image files and caption strings directly (no dataset code)."""
    from omegaconf import OmegaConf

    from laps.compat.serialization import safe_load
    from laps.training.tasks import build_module

    ckpt = safe_load(real.ckpt)
    tok = CaptionTokenizer(real.vocab, max_words=MAX_WORDS)
    module = build_module(OmegaConf.create(ckpt["laps_config"]), tok.vocab_size)
    module.load_state_dict(ckpt["state_dict"])
    net = module.net.eval()
    transform = build_transform(IMAGE_SIZE, train=False)
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in image_files])
    ids, lens = pad_input_ids([tok(c) for c in captions], tok.pad_id)
    with torch.no_grad():
        return net.similarity(net.encode_image(images), net.encode_text(ids, lens), lens)


def check_entries(real, sims: torch.Tensor, files: list[Path], caps: list[str], rows: list[int], cols: list[int]):
    ours = model_scores(real, [files[r] for r in rows], [caps[c] for c in cols])
    theirs = sims[rows][:, cols]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours, theirs)
    assert theirs.std() > 0  # not a constant matrix


# ------------------------------------------------------------------------------------------------ F30K
def test_f30k_test_split_full_protocol(real: SimpleNamespace, tmp_path: Path) -> None:
    assert check_dataset(real.f30k, ["test"], images_dir="flickr30k-images").ok  # laps-check-data: all fine
    metrics, saved, _ = run_eval(real, "f30k", real.f30k, tmp_path / "eval")
    sims, cap_to_img = saved["sims"], saved["cap_to_img"]
    assert sims.shape == (1000, 5000) and torch.isfinite(sims).all()
    assert torch.equal(cap_to_img, torch.arange(5000) // 5)  # 5 consecutive captions per image
    assert sorted(metrics) == [f"test/{k}" for k in METRIC_NAMES]  # F30K: one 1K matrix, no folds
    assert_metrics_equal(metrics, "test", retrieval_metrics(sims, cap_to_img))

    # Rows are the test images in order of first appearance in test_ids.txt, as named by the shipped
    # id_mapping.json; columns are the caption lines.
    ids = read_lines(shared_data("f30k") / "test_ids.txt")
    caps = read_lines(shared_data("f30k") / "test_caps.txt")
    mapping = json.loads((shared_data("f30k") / "id_mapping.json").read_text())
    files = [real.f30k / "flickr30k-images" / mapping[i] for i in dict.fromkeys(ids)]
    check_entries(real, sims, files, caps, rows=[0, 1, 537, 999], cols=[0, 4, 5, 2687, 4999])


# ------------------------------------------------------------------------------------------------ COCO
def coco_fold_means(sims: torch.Tensor, cap_to_img: torch.Tensor, folds: int = 5) -> dict[str, float]:
    """The COCO 1K protocol written out: fold f is images [f*n, (f+1)*n) and their 5n captions."""
    n = sims.shape[0] // folds
    per_fold = []
    for f in range(folds):
        rows = slice(f * n, (f + 1) * n)
        cols = slice(5 * f * n, 5 * (f + 1) * n)  # the real files list 5 consecutive captions per image
        assert torch.equal(cap_to_img[cols], torch.arange(f * n, (f + 1) * n).repeat_interleave(5))
        per_fold.append(retrieval_metrics(sims[rows, cols]))
    return {k: sum(m[k] for m in per_fold) / folds for k in per_fold[0]}


def test_coco_protocol_on_dev_split(real: SimpleNamespace, tmp_path: Path) -> None:
    """dataset=coco (5K matrix and 5-fold mean) on the real COCO dev split: 1,000 images, so folds of 200.
    The folder has no id_mapping.json: images are found by the COCO naming fallback."""
    assert not (real.coco_dev / "id_mapping.json").exists()
    metrics, saved, _ = run_eval(real, "coco", real.coco_dev, tmp_path / "eval", "dataset.test_split=dev")
    sims, cap_to_img = saved["sims"], saved["cap_to_img"]
    assert sims.shape == (1000, 5000)
    assert sorted(metrics) == sorted([f"test/{k}" for k in METRIC_NAMES] + [f"test_1k/{k}" for k in METRIC_NAMES])
    assert_metrics_equal(metrics, "test", retrieval_metrics(sims, cap_to_img))
    assert_metrics_equal(metrics, "test_1k", coco_1k_metrics(sims, cap_to_img))
    assert_metrics_equal(metrics, "test_1k", coco_fold_means(sims, cap_to_img))
    assert metrics["test_1k/rsum"] != pytest.approx(metrics["test/rsum"])  # folds are really smaller
    # not ECCV Caption's test set: skipped (dataset.eccv=null), refused when asked for before scoring
    with pytest.raises(EccvSplitMismatch, match="5000 caption lines"):
        run_eval(real, "coco", real.coco_dev, tmp_path / "eval_eccv", "dataset.test_split=dev", "dataset.eccv=true")
    assert not (tmp_path / "eval_eccv" / "sims_test.pt").exists()

    ids = read_lines(shared_data("coco") / "dev_ids.txt")
    caps = read_lines(shared_data("coco") / "dev_caps.txt")
    files = [real.coco_dev / coco_file(i) for i in dict.fromkeys(ids)]
    check_entries(real, sims, files, caps, rows=[0, 199, 200, 999], cols=[0, 999, 1000, 4999])

    # laps-prepare-data coco-mapping finds the same files as the naming fallback; laps-check-data agrees.
    fallback = load_split(real.coco_dev, "dev", images_dir=".", id_mapping="id_mapping.json").image_paths
    assert fallback == files
    build_coco_mapping(real.coco_dev)
    try:
        mapped = load_split(real.coco_dev, "dev", images_dir=".", id_mapping="id_mapping.json")
        assert mapped.image_paths == files
        assert check_dataset(real.coco_dev, ["dev"], images_dir=".").ok
    finally:
        (real.coco_dev / "id_mapping.json").unlink()


@pytest.mark.slow
def test_coco_testall_5k_and_5fold_1k(real: SimpleNamespace, tmp_path: Path) -> None:
    """The full COCO protocol on the real testall split: 5,000 images x 25,000 captions (5K) and the mean
    of five folds of 1,000 images x 5,000 captions (1K); the id mapping built by laps-prepare-data."""
    root = make_coco_standin(tmp_path / "coco", "testall", size=IMAGE_SIZE, mapping=True)
    assert len(json.loads((root / "id_mapping.json").read_text())) == 5000
    metrics, saved, elapsed = run_eval(real, "coco", root, tmp_path / "eval")
    sims, cap_to_img = saved["sims"], saved["cap_to_img"]
    assert sims.shape == (5000, 25000) and torch.isfinite(sims).all()
    assert torch.equal(cap_to_img, torch.arange(25000) // 5)
    eccv = sorted(k for k in metrics if k.startswith(("test_eccv/", "test_cxc/")))
    assert len(eccv) == 12  # on by default for testall: ECCV Caption's test set, line for line
    assert sorted(set(metrics) - set(eccv)) == sorted(
        [f"test/{k}" for k in METRIC_NAMES] + [f"test_1k/{k}" for k in METRIC_NAMES])
    assert_metrics_equal(metrics, "test", retrieval_metrics(sims, cap_to_img))
    assert_metrics_equal(metrics, "test_1k", coco_1k_metrics(sims, cap_to_img))
    assert_metrics_equal(metrics, "test_1k", coco_fold_means(sims, cap_to_img))

    ids = read_lines(root / "testall_ids.txt")
    images = list(dict.fromkeys(ids))
    assert {k: metrics[k] for k in eccv} == pytest.approx(
        eccv_cxc_metrics(sims, [int(i) for i in images], caption_ids_of(ids)))
    assert (saved["dataset"], saved["split"], saved["image_ids"]) == ("coco", "testall", images)
    assert np.array_equal(load_official_results(tmp_path / "eval" / "results_coco.npy")[1], sims.numpy())
    caps = read_lines(root / "testall_caps.txt")
    files = [root / coco_file(i) for i in dict.fromkeys(ids)]
    check_entries(real, sims, files, caps, rows=[0, 999, 1000, 4999], cols=[0, 4999, 5000, 24999])
    print(f"COCO testall 5K + 5-fold 1K evaluation: {elapsed:.1f} s")


# ------------------------------------------------------------------------------------------------ bad data
@pytest.fixture
def small_f30k(tmp_path: Path) -> SimpleNamespace:
    """An F30K-layout folder from the real test split: train = its first 2 images (10 caption lines),
    dev = the next 2; a WordPiece vocabulary of those captions."""
    root = make_f30k_standin(tmp_path / "f30k", "test", out_split="train", images=slice(0, 2), size=IMAGE_SIZE)
    make_f30k_standin(root, "test", out_split="dev", images=slice(2, 4), size=IMAGE_SIZE)
    vocab = build_wordpiece_vocab(read_lines(root / "train_caps.txt") + read_lines(root / "dev_caps.txt"),
                                  tmp_path / "vocab", vocab_size=300)
    ids = read_lines(root / "train_ids.txt")
    mapping = json.loads((root / "id_mapping.json").read_text())
    second = ids[5]  # the second training image: caption lines 6-10
    assert ids[5:] == [second] * 5
    return SimpleNamespace(root=root, vocab=vocab, tmp=tmp_path, image_id=second,
                           image=root / "flickr30k-images" / mapping[second])


def small_train_args(small: SimpleNamespace, workers: int = 0) -> list[str]:
    return [*TINY_REAL, "dataset=f30k", f"dataset.root={small.root}", f"dataset.tokenizer={small.vocab}",
            "dataset.batch_size=10", f"dataset.num_workers={workers}", "dataset.on_bad_image=error",
            "trainer=cpu", "logger=csv", "debug=fdr"]


def test_small_folder_trains(small_f30k: SimpleNamespace) -> None:
    """Control for the failures below: the intact folder trains (fast_dev_run) and checks clean."""
    assert check_dataset(small_f30k.root, ["train", "dev"], images_dir="flickr30k-images").ok
    cfg = compose_train(small_train_args(small_f30k), small_f30k.tmp / "run", small_f30k.tmp)
    assert "val/rsum" in train(cfg)


def test_missing_image_stops_laps_train_in_one_line(small_f30k: SimpleNamespace) -> None:
    """A missing image under dataset.on_bad_image=error, read in a DataLoader worker process: laps-train
    stops with one `error:` line naming the file and its caption line; laps-check-data names both too."""
    small_f30k.image.unlink()
    report = check_dataset(small_f30k.root, ["train", "dev"], images_dir="flickr30k-images")
    expected = (f"{small_f30k.image}: missing (image id {small_f30k.image_id}, caption line 6 of "
                f"{small_f30k.root / 'train_caps.txt'})")
    assert [p.describe() for s in report.splits for p in s.missing] == [expected]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-c", "from laps.cli.train import main; main()", *small_train_args(small_f30k, workers=2),
         f"paths.root_dir={small_f30k.tmp}"],
        check=False, capture_output=True, text=True, timeout=300, cwd=small_f30k.tmp, env=env,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    msg = errors[0][errors[0].index("error:"):]
    assert f"{small_f30k.image} is missing" in msg, msg
    line = re.search(r"caption line (\d+) of (\S+)", msg)
    assert line and 6 <= int(line.group(1)) <= 10 and line.group(2) == str(small_f30k.root / "train_caps.txt"), msg
    assert "dataset.on_bad_image=skip" in msg


def _break(small: SimpleNamespace, problem: str) -> None:
    root = small.root
    if problem == "unmapped":
        mapping = json.loads((root / "id_mapping.json").read_text())
        del mapping[small.image_id]
        (root / "id_mapping.json").write_text(json.dumps(mapping))
    elif problem == "lengths":
        (root / "train_caps.txt").write_text((root / "train_caps.txt").read_text() + "one caption too many\n")
    elif problem == "empty":
        caps = read_lines(root / "train_caps.txt")
        caps[2] = "  "
        (root / "train_caps.txt").write_text("\n".join(caps) + "\n")
    elif problem == "unreadable":
        small.image.write_bytes(small.image.read_bytes()[:40])  # a truncated JPEG


@pytest.mark.parametrize(
    ("problem", "in_training", "in_check"),
    [
        ("unmapped", r"'{id}'.*line 6 of .*train_caps\.txt",
         r"image id {id} not in the id mapping \(caption line 6 of .*train_caps\.txt\)"),
        ("lengths", r"train_caps\.txt has 11 lines but train_ids\.txt has 10",
         r"train_caps\.txt has 11 lines but train_ids\.txt has 10"),
        ("empty", r"train_caps\.txt, line 3: empty caption", r"train_caps\.txt, line 3: empty caption"),
        ("unreadable", r"{image} is unreadable.*caption line ([6-9]|10) of .*train_caps\.txt",
         r"{image}: unreadable .*caption line 6 of .*train_caps\.txt"),
    ],
    ids=["unmapped", "lengths", "empty", "unreadable"],
)
def test_data_problem_stops_training_with_its_own_error(small_f30k: SimpleNamespace, problem: str,
                                                        in_training: str, in_check: str) -> None:
    """Through the DataModule and laps-train's train(): each problem stops training before any step with its
    own message (first line), and laps-check-data reports the same problem."""
    _break(small_f30k, problem)
    fill = {"id": small_f30k.image_id, "image": re.escape(str(small_f30k.image))}
    cfg = compose_train(small_train_args(small_f30k), small_f30k.tmp / "run", small_f30k.tmp)
    with pytest.raises(DataError) as err:
        train(cfg)
    first_line = str(err.value).splitlines()[0]
    assert re.search(in_training.format(**fill), first_line), first_line
    assert not list((small_f30k.tmp / "run").rglob("*.ckpt"))

    report = check_dataset(small_f30k.root, ["train", "dev"], images_dir="flickr30k-images")
    assert not report.ok
    assert any(re.search(in_check.format(**fill), p) for p in report.problems()), report.problems()
