"""Reading the official layout: text files, id mapping, index, datasets, collate, bad images, transforms."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from laps.data.datamodule import LAPSDataModule
from laps.data.datasets import (
    CaptionDataset,
    ImageDataset,
    PairDataset,
    collate_pairs,
    open_image,
    pad_input_ids,
)
from laps.data.splits import (
    DataError,
    SplitIndex,
    load_id_mapping,
    load_split,
    load_split_from_config,
    read_split,
)
from laps.data.tokenization import CaptionTokenizer
from laps.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_CANDIDATES = [Path("/work/shared/data"), SHARED]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle", "square", "on",
         "the", "left", "right", "."] + [f"tok{i}" for i in range(100)]
COLOURS = {"0": (255, 0, 0), "1": (0, 0, 255), "2": (0, 255, 0)}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CaptionTokenizer:
    d = tmp_path_factory.mktemp("vocab")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return CaptionTokenizer(d, max_words=8)


def make_dataset(root: Path, bad: dict[str, str] | None = None) -> Path:
    """3 images in images/ (ids 0, 1, 2: 2, 3, 1 captions; id 0 again at the end).

    ``bad``: id -> missing|corrupt."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    mapping = {}
    for image_id, colour in COLOURS.items():
        name = f"img{image_id}.jpg"
        mapping[image_id] = name
        kind = (bad or {}).get(image_id)
        if kind == "missing":
            continue
        if kind == "corrupt":
            (root / "images" / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
            continue
        Image.new("RGB", (40, 30), colour).save(root / "images" / name)
    (root / "id_mapping.json").write_text(json.dumps(mapping))
    caps = ["a red circle .", "a red circle on the left", "a blue square", "blue square .", "the blue square",
            "a green circle on the right", "red circle"]
    ids = ["0", "0", "1", "1", "1", "2", "0"]
    (root / "test_caps.txt").write_text("\n".join(caps) + "\n")
    (root / "test_ids.txt").write_text("\n".join(ids) + "\n")
    return root


# ------------------------------------------------------------------------------------------- read_split
def test_read_split_and_index(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    caps, ids = read_split(tmp_path, "test")
    assert len(caps) == len(ids) == 7 and caps[0] == "a red circle ." and ids[-1] == "0"
    index = SplitIndex.from_ids(ids)
    assert index.image_ids == ["0", "1", "2"]
    assert index.caption_image == [0, 0, 1, 1, 1, 2, 0]
    assert index.first_line == [0, 2, 5]
    assert index.captions_per_image() == {3: 2, 1: 1}
    assert not index.is_contiguous()
    assert SplitIndex.from_ids(["7", "7", "3"]).is_contiguous()
    assert index.caption_image_tensor().tolist() == index.caption_image


def test_read_split_crlf_bom_and_no_final_newline(tmp_path: Path) -> None:
    (tmp_path / "x_caps.txt").write_bytes(b"\xef\xbb\xbfa caf\xc3\xa9\r\nsecond\r\nthird")
    (tmp_path / "x_ids.txt").write_bytes(b"5\r\n5\r\n6\r\n")
    caps, ids = read_split(tmp_path, "x")
    assert caps == ["a caf\u00e9", "second", "third"] and ids == ["5", "5", "6"]


def test_read_split_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        read_split(tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path / "train_caps.txt") in msg
    assert "laps-prepare-data" in msg and "laps-make-synthetic" in msg
    (tmp_path / "train_caps.txt").write_text("a\n")
    with pytest.raises(DataError, match="train_ids.txt"):
        read_split(tmp_path, "train")


def test_read_split_length_mismatch(tmp_path: Path) -> None:
    (tmp_path / "t_caps.txt").write_text("a\nb\nc\n")
    (tmp_path / "t_ids.txt").write_text("1\n1\n")
    with pytest.raises(DataError, match=r"t_caps.txt has 3 lines but t_ids.txt has 2"):
        read_split(tmp_path, "t")


def test_read_split_empty_caption_line(tmp_path: Path) -> None:
    (tmp_path / "t_caps.txt").write_text("a\nb\n   \nd\n")
    (tmp_path / "t_ids.txt").write_text("1\n1\n1\n1\n")
    with pytest.raises(DataError, match=r"t_caps.txt, line 3: empty caption"):
        read_split(tmp_path, "t")
    (tmp_path / "t_caps.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "t_ids.txt").write_text("1\n\n1\n1\n")
    with pytest.raises(DataError, match=r"t_ids.txt, line 2: empty image id"):
        read_split(tmp_path, "t")


def test_read_split_tolerates_empty_lines_at_the_end(tmp_path: Path) -> None:
    """A stray newline after the last caption (or id) is not a line; one in the middle stays an error."""
    (tmp_path / "t_caps.txt").write_text("a\nb\nc\n\n")
    (tmp_path / "t_ids.txt").write_text("1\n1\n2\r\n\r\n \n")
    assert read_split(tmp_path, "t") == (["a", "b", "c"], ["1", "1", "2"])
    (tmp_path / "t_caps.txt").write_text("a\n\nc\n\n")
    with pytest.raises(DataError, match=r"t_caps.txt, line 2: empty caption"):
        read_split(tmp_path, "t")


def test_read_split_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "t_caps.txt").write_bytes(b"fine\nalso fine\ncaf\xe9 latin-1\n")
    (tmp_path / "t_ids.txt").write_text("1\n1\n1\n")
    with pytest.raises(DataError, match=r"t_caps.txt, line 3: not valid UTF-8"):
        read_split(tmp_path, "t")


def test_read_split_empty(tmp_path: Path) -> None:
    (tmp_path / "t_caps.txt").write_text("")
    (tmp_path / "t_ids.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_split(tmp_path, "t")


# ------------------------------------------------------------------------------------------- mapping
def test_id_mapping_errors(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    with pytest.raises(DataError, match="coco-mapping"):
        load_id_mapping(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        load_id_mapping(tmp_path / "bad.json")
    (tmp_path / "id_mapping.json").write_text(json.dumps({"0": "img0.jpg", "2": "img2.jpg"}))
    with pytest.raises(DataError) as e:
        load_split(tmp_path, "test", "images")
    assert "'1'" in str(e.value) and "line 3 of" in str(e.value) and "test_caps.txt" in str(e.value)


def test_load_split_paths_and_config(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    data = load_split(tmp_path, "test", images_dir="images")
    assert data.num_captions == 7 and data.num_images == 3
    assert data.image_paths == [tmp_path / "images" / f"img{i}.jpg" for i in range(3)]
    assert "line 3 of" in data.line_ref(2) and "image id 1" in data.line_ref(2)
    cfg = {"root": str(tmp_path), "images_dir": str(tmp_path / "images"), "id_mapping": "id_mapping.json"}
    assert load_split_from_config(cfg, "test").image_paths == data.image_paths
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nope", "test")


def test_coco_file_names_without_mapping(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "val2014").mkdir()
    (tmp_path / "train2014").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    (tmp_path / "testall_caps.txt").write_text("a\nb\nc\n")
    (tmp_path / "testall_ids.txt").write_text("391895\n9\n12\n")
    with caplog.at_level(logging.WARNING):
        data = load_split(tmp_path, "testall", images_dir=".", id_mapping="id_mapping.json")
    assert "coco-mapping" in caplog.text
    assert data.image_paths[:2] == [
        tmp_path / "val2014" / "COCO_val2014_000000391895.jpg",
        tmp_path / "train2014" / "COCO_train2014_000000000009.jpg",
    ]
    assert data.image_paths[2] == tmp_path / "val2014" / "COCO_val2014_000000000012.jpg"  # reported missing
    assert load_split(tmp_path, "testall", id_mapping=None).image_paths == data.image_paths


# ------------------------------------------------------------------------------------------- datasets
def test_pair_dataset_and_collate(tmp_path: Path, tokenizer: CaptionTokenizer) -> None:
    data = load_split(make_dataset(tmp_path), "test", "images")
    ds = PairDataset(data, tokenizer, image_size=32, augment=False)
    assert len(ds) == 7
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image_index"] == 1 and item["index"] == 3
    assert tokenizer.convert_ids_to_tokens(item["input_ids"]) == ["[CLS]", "blue", "square", ".", "[SEP]"]
    batch = ds.collate([ds[i] for i in range(7)])
    assert batch["images"].shape == (7, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["input_ids"].shape == (7, 8) and batch["input_ids"].dtype == torch.long
    assert batch["lengths"].tolist() == [6, 8, 5, 5, 5, 8, 4]
    assert batch["input_ids"][6, 4:].tolist() == [tokenizer.pad_id] * 4
    assert batch["image_indices"].tolist() == [0, 0, 1, 1, 1, 2, 0]
    assert batch["indices"].tolist() == list(range(7)) and batch["skipped"] == []


def test_pad_input_ids() -> None:
    ids, lengths = pad_input_ids([[2, 5, 3], [2, 3]], pad_id=9)
    assert ids.tolist() == [[2, 5, 3], [2, 3, 9]] and lengths.tolist() == [3, 2]


def test_eval_datasets(tmp_path: Path, tokenizer: CaptionTokenizer) -> None:
    data = load_split(make_dataset(tmp_path), "test", "images")
    images = ImageDataset(data, image_size=16)
    assert len(images) == 3
    batch = images.collate([images[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, 16, 16) and batch["indices"].tolist() == [0, 1, 2]
    # eval transform of a pure red image: channel 0 normalised from 1.0
    red = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert batch["images"][0, 0].mean().item() == pytest.approx(red, abs=0.02)
    caps = CaptionDataset(data, tokenizer)
    assert len(caps) == 7 and caps[6]["image_index"] == 0 and caps[6]["index"] == 6
    cb = caps.collate([caps[i] for i in range(7)])
    assert cb["image_indices"].tolist() == [0, 0, 1, 1, 1, 2, 0] and cb["input_ids"].shape == (7, 8)
    assert cb["lengths"].dtype == torch.long


def test_size_augmentation_rng_per_item(tmp_path: Path, tokenizer: CaptionTokenizer) -> None:
    data = load_split(make_dataset(tmp_path), "test", "images")
    ds = PairDataset(data, tokenizer, image_size=16, augment=True)

    def run() -> list[list[int]]:
        torch.manual_seed(0)
        return [ds[5]["input_ids"] for _ in range(40)]

    a, b = run(), run()
    assert a == b  # reproducible from torch's seed
    assert len({tuple(x) for x in a}) > 1  # and it varies from draw to draw
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ds.collate)
    batches = list(loader)
    assert sum(len(b["indices"]) for b in batches) == 7


def test_size_augmentation_differs_between_workers(tmp_path: Path, tokenizer: CaptionTokenizer) -> None:
    """Plain (unseeded) keys draw their augmentation from torch's generator, which DataLoader seeds per
    worker: the same caption fetched by two workers is augmented differently, and a second loader
    from the same torch seed repeats every draw."""
    data = load_split(make_dataset(tmp_path), "test", "images")
    ds = PairDataset(data, tokenizer, image_size=16, augment=True)

    def run() -> list[list[int]]:
        torch.manual_seed(0)
        loader = DataLoader(ds, batch_size=1, num_workers=2, sampler=[5] * 12, collate_fn=ds.collate)
        return [b["input_ids"][0, : int(b["lengths"][0])].tolist() for b in loader]

    draws = run()
    assert draws == run()
    first, second = draws[0::2], draws[1::2]  # batches are dealt to the workers in turn
    assert first != second


def test_bad_image_error_names_file_and_line(tmp_path: Path, tokenizer: CaptionTokenizer) -> None:
    data = load_split(make_dataset(tmp_path, {"1": "missing", "2": "corrupt"}), "test", "images")
    ds = PairDataset(data, tokenizer, image_size=16)
    ds[0]
    with pytest.raises(DataError) as e:
        ds[4]
    assert "img1.jpg is missing" in str(e.value) and "line 5 of" in str(e.value)
    assert "test_caps.txt" in str(e.value) and "on_bad_image=skip" in str(e.value)
    with pytest.raises(DataError, match=r"img2.jpg is unreadable.*line 6 of"):
        ds[5]
    with pytest.raises(DataError, match=r"img2.jpg is unreadable.*line 6 of"):
        ImageDataset(data, image_size=16)[2]


def test_bad_image_skip(
    tmp_path: Path, tokenizer: CaptionTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    data = load_split(make_dataset(tmp_path, {"1": "missing", "2": "corrupt"}), "test", "images")
    ds = PairDataset(data, tokenizer, image_size=16, on_bad_image="skip")
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(7)]
        items += [ds[i] for i in range(7)]
    assert caplog.text.count("img1.jpg") == 1 and caplog.text.count("img2.jpg") == 1  # once per file
    assert ds.bad_files == {str(tmp_path / "images" / "img1.jpg"), str(tmp_path / "images" / "img2.jpg")}
    batch = ds.collate(items[:7])
    assert batch["indices"].tolist() == [0, 1, 6] and batch["image_indices"].tolist() == [0, 0, 0]
    assert batch["images"].shape == (3, 3, 16, 16) and batch["input_ids"].shape[0] == 3
    assert len(batch["skipped"]) == 4
    empty = ds.collate(items[2:6])
    assert empty["images"].shape == (0, 3, 16, 16) and empty["input_ids"].shape[0] == 0
    images = ImageDataset(data, image_size=16, on_bad_image="skip")
    b = images.collate([images[i] for i in range(3)])
    assert b["indices"].tolist() == [0, 1, 2] and len(b["skipped"]) == 2
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(b["images"][1].mean(dim=(1, 2)), black, atol=1e-4)
    assert images.bad_files == ds.bad_files


@pytest.mark.parametrize("make", [
    lambda tmp: ImageDataset(load_split(make_dataset(tmp), "test", "images"), on_bad_image="ignore"),
    lambda tmp: LAPSDataModule(name="f30k", root=str(tmp), on_bad_image="ignore"),
], ids=["dataset", "datamodule"])
def test_on_bad_image_is_checked_against_the_one_list(tmp_path: Path, make) -> None:
    with pytest.raises(ValueError, match=r"dataset\.on_bad_image must be 'error' or 'skip', got 'ignore'"):
        make(tmp_path)


def test_collate_pairs_module_function() -> None:
    items = [{"image": torch.zeros(3, 4, 4), "input_ids": [2, 3], "image_index": 1, "index": 0}]
    batch = collate_pairs(items, pad_id=0)
    assert batch["images"].shape == (1, 3, 4, 4) and batch["lengths"].tolist() == [2]


def test_open_image_converts_rgb(tmp_path: Path) -> None:
    Image.new("L", (5, 5), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (5, 5)).save(tmp_path / "a.png")
    assert open_image(tmp_path / "g.png").mode == "RGB" and open_image(tmp_path / "a.png").mode == "RGB"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable"):
        open_image(tmp_path / "trunc.jpg")


# ------------------------------------------------------------------------------------------- transforms
def test_transforms() -> None:
    img = Image.new("RGB", (50, 30), (255, 255, 255))
    out = build_transform(24, train=False)(img)
    assert type(out) is torch.Tensor and out.shape == (3, 24, 24)
    assert out[0].mean().item() == pytest.approx((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], abs=1e-3)
    random.seed(0)
    torch.manual_seed(0)
    train = build_transform(24, train=True)
    assert all(train(img).shape == (3, 24, 24) for _ in range(5))
    with pytest.raises(ValueError):
        build_transform(0, train=True)


# ------------------------------------------------------------------------------------------- real files
def _shared(name: str) -> Path:
    for base in SHARED_CANDIDATES:
        if (base / name).is_dir():
            return base / name
    pytest.skip(f"shared data folder {name} not present")


@pytest.mark.parametrize(
    "name, split, lines, images",
    [("f30k", "test", 5000, 1000), ("f30k", "dev", 5070, 1014), ("coco", "testall", 25000, 5000),
     ("coco", "dev", 5000, 1000)],
)
def test_real_official_files(name: str, split: str, lines: int, images: int) -> None:
    root = _shared(name)
    caps, ids = read_split(root, split)
    index = SplitIndex.from_ids(ids)
    assert len(caps) == lines and index.num_images == images
    assert index.captions_per_image() == {5: images} and index.is_contiguous()


def test_real_f30k_mapping() -> None:
    root = _shared("f30k")
    data = load_split(root, "test", images_dir="flickr30k-images")
    assert data.num_images == 1000 and all(p.suffix == ".jpg" for p in data.image_paths)
    assert len(load_id_mapping(root / "id_mapping.json")) == 31014
