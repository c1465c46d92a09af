"""Converters (Karpathy split files, COCO id mapping) and the data checker (laps-check-data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from laps.cli import prepare_data
from laps.cli.check_data import check_dataset, render_report
from laps.data.prepare import build_coco_mapping, convert_karpathy, karpathy_to_splits
from laps.data.splits import DataError, SplitIndex, load_id_mapping, load_split, read_split

REPO = Path(__file__).resolve().parents[1]


def _sentences(*raws: str) -> list[dict]:
    return [{"raw": r, "tokens": r.lower().strip(" .").split(), "sentid": i} for i, r in enumerate(raws)]


def fake_f30k() -> dict:
    images = []
    for n, split in enumerate(["train", "train", "val", "test", "test", "train"]):
        images.append({
            "filename": f"{1000 + n}.jpg", "imgid": n, "split": split, "sentids": [],
            "sentences": _sentences(*(f"  Image {n} caption {k} ." for k in range(5))),
        })
    images[0]["sentences"][1]["raw"] = "A dog\nruns  fast ."  # newline and double space -> one line
    images[1]["sentences"].append({"raw": "a sixth caption", "tokens": ["a"]})  # kept out: 5 per image
    return {"dataset": "flickr30k", "images": images}


def fake_coco() -> dict:
    images = []
    specs = [("val2014", "test", 391895), ("val2014", "test", 522418), ("train2014", "train", 9),
             ("val2014", "restval", 42), ("val2014", "val", 73), ("val2014", "val", 74),
             ("val2014", "val", 75)]
    for n, (folder, split, cocoid) in enumerate(specs):
        prefix = "COCO_val2014_" if folder == "val2014" else "COCO_train2014_"
        images.append({
            "filepath": folder, "filename": f"{prefix}{cocoid:012d}.jpg", "imgid": n, "cocoid": cocoid,
            "split": split, "sentids": [],
            "sentences": _sentences(*(f"coco {cocoid} sentence {k}. " for k in range(6 if n == 0 else 5))),
        })
    return {"dataset": "coco", "images": images}


# ------------------------------------------------------------------------------------------ karpathy
def test_karpathy_f30k(tmp_path: Path) -> None:
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(fake_f30k()))
    stats = convert_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "f30k")
    out = tmp_path / "f30k"
    assert {s: (v.captions, v.images) for s, v in stats.items()} == {
        "train": (15, 3), "dev": (5, 1), "test": (10, 2)
    }
    caps, ids = read_split(out, "train")
    assert caps[0] == "Image 0 caption 0 ." and caps[1] == "A dog runs fast ."
    assert ids == ["0"] * 5 + ["1"] * 5 + ["5"] * 5
    assert "a sixth caption" not in caps
    assert read_split(out, "test")[1] == ["3"] * 5 + ["4"] * 5
    mapping = load_id_mapping(out / "id_mapping.json")
    assert mapping == {str(n): f"{1000 + n}.jpg" for n in range(6)}
    assert load_split(out, "dev", "flickr30k-images").image_paths == [out / "flickr30k-images" / "1002.jpg"]
    with pytest.raises(DataError, match="--overwrite"):
        convert_karpathy(tmp_path / "dataset_flickr30k.json", out)
    convert_karpathy(tmp_path / "dataset_flickr30k.json", out, overwrite=True, text="tokens")
    assert read_split(out, "train")[0][0] == "image 0 caption 0"


def test_prepared_files_get_the_umask_mode(tmp_path: Path) -> None:
    """Written files are readable by others under a 022 umask (as open() would make them), not 0600."""
    import os

    old = os.umask(0o022)
    try:
        (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(fake_f30k()))
        convert_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "f30k")
        (tmp_path / "coco" / "val2014").mkdir(parents=True)
        (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"")
        build_coco_mapping(tmp_path / "coco")
    finally:
        os.umask(old)
    written = [*(tmp_path / "f30k").iterdir(), tmp_path / "coco" / "id_mapping.json"]
    assert len(written) == 8  # three splits x (captions, ids), the id mapping, the COCO mapping
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o644)}


def test_karpathy_without_any_caption_is_refused(tmp_path: Path) -> None:
    data = fake_f30k()
    for img in data["images"]:
        img["sentences"] = []
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="no image has a caption"):
        convert_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "f30k")
    assert not (tmp_path / "f30k").exists() or not any((tmp_path / "f30k").iterdir())


@pytest.mark.parametrize("content", [b'{"images": [', b'{"images": "\xe9"}'], ids=["truncated", "latin1"])
def test_unreadable_json_is_a_data_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "dataset_flickr30k.json").write_bytes(content)
    (tmp_path / "id_mapping.json").write_bytes(content)
    for read in (lambda: convert_karpathy(tmp_path / "dataset_flickr30k.json", tmp_path / "f30k"),
                 lambda: load_id_mapping(tmp_path / "id_mapping.json")):
        with pytest.raises(DataError, match="not a valid UTF-8 JSON file") as info:
            read()
        assert str(info.value).startswith(str(tmp_path))


def test_karpathy_coco() -> None:
    splits, mapping, _ = karpathy_to_splits(fake_coco(), dev_images=2)
    assert set(splits) == {"train", "dev", "testall"}
    caps, ids = splits["testall"]
    assert len(caps) == 10 and ids[:5] == ["391895"] * 5 and caps[0] == "coco 391895 sentence 0."
    assert splits["train"][1] == ["9"] * 5 + ["42"] * 5  # restval merged into train
    assert splits["dev"][1] == ["73"] * 5 + ["74"] * 5  # the first 2 val images
    assert mapping["391895"] == "val2014/COCO_val2014_000000391895.jpg"
    assert mapping["9"] == "train2014/COCO_train2014_000000000009.jpg" and len(mapping) == 7
    assert karpathy_to_splits(fake_coco())[2]["dev"].images == 3  # auto: up to 1,000
    assert karpathy_to_splits(fake_coco(), dev_images=None)[2]["dev"].images == 3
    assert karpathy_to_splits(fake_coco(), captions_per_image=0)[2]["testall"].captions == 11
    with pytest.raises(DataError, match="images"):
        karpathy_to_splits({"annotations": []})


def test_coco_mapping(tmp_path: Path) -> None:
    for folder, ids in (("train2014", [9, 25]), ("val2014", [391895, 42])):
        (tmp_path / folder).mkdir()
        for i in ids:
            (tmp_path / folder / f"COCO_{folder}_{i:012d}.jpg").write_bytes(b"")
    (tmp_path / "val2014" / "README.txt").write_text("not an image")
    mapping = build_coco_mapping(tmp_path)
    assert mapping == {
        "9": "train2014/COCO_train2014_000000000009.jpg", "25": "train2014/COCO_train2014_000000000025.jpg",
        "42": "val2014/COCO_val2014_000000000042.jpg", "391895": "val2014/COCO_val2014_000000391895.jpg",
    }
    assert list(json.loads((tmp_path / "id_mapping.json").read_text())) == ["9", "25", "42", "391895"]
    (tmp_path / "testall_caps.txt").write_text("a\nb\n")
    (tmp_path / "testall_ids.txt").write_text("391895\n9\n")
    data = load_split(tmp_path, "testall", images_dir=".")
    assert data.image_paths == [tmp_path / mapping["391895"], tmp_path / mapping["9"]]
    with pytest.raises(DataError, match="None of"):
        build_coco_mapping(tmp_path / "empty")


def test_prepare_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "k.json").write_text(json.dumps(fake_coco()))
    assert prepare_data.main(["karpathy", "--json", str(tmp_path / "k.json"), "--out", str(tmp_path / "c"),
                              "--dev-images", "1"]) == 0
    assert read_split(tmp_path / "c", "dev")[1] == ["73"] * 5
    assert "testall" in capsys.readouterr().out
    again = ["karpathy", "--json", str(tmp_path / "k.json"), "--out", str(tmp_path / "c")]
    assert prepare_data.main(again) == 1
    (tmp_path / "c" / "val2014").mkdir()
    (tmp_path / "c" / "val2014" / "COCO_val2014_000000000073.jpg").write_bytes(b"")
    mapping_args = ["coco-mapping", "--root", str(tmp_path / "c"), "--out", str(tmp_path / "m.json")]
    assert prepare_data.main(mapping_args) == 0
    assert load_id_mapping(tmp_path / "m.json") == {"73": "val2014/COCO_val2014_000000000073.jpg"}
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--help"])
    assert e.value.code == 0
    assert "karpathy" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ check_data
def make_checked_folder(root: Path) -> Path:
    """5 images, 2 captions each, in images/: img3 missing, img4 a corrupt JPEG; dev split fine except
    an id (99) absent from the mapping."""
    (root / "images").mkdir(parents=True)
    for i in range(5):
        if i == 3:
            continue
        path = root / "images" / f"img{i}.jpg"
        if i == 4:
            Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
            path.write_bytes(path.read_bytes()[:200])  # truncated: opens, fails to decode
        else:
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(path)
    (root / "id_mapping.json").write_text(json.dumps({str(i): f"img{i}.jpg" for i in range(5)}))
    ids = [str(i) for i in range(5) for _ in range(2)]
    (root / "test_caps.txt").write_text("".join(f"caption {n}\n" for n in range(10)))
    (root / "test_ids.txt").write_text("\n".join(ids) + "\n")
    (root / "dev_caps.txt").write_text("x\ny\nz\n")
    (root / "dev_ids.txt").write_text("0\n0\n99\n")
    return root


def test_check_dataset_report(tmp_path: Path) -> None:
    root = make_checked_folder(tmp_path / "d")
    report = check_dataset(root, ["train", "dev", "test"], images_dir="images")
    assert not report.ok
    train, dev, test = report.splits
    assert not train.present and train.ok
    assert (test.captions, test.images, dict(test.captions_per_image)) == (10, 5, {2: 5})
    assert [(p.image_id, p.line) for p in test.missing] == [("3", 7)]
    assert [(p.image_id, p.line) for p in test.unreadable] == [("4", 9)]
    assert test.missing[0].path.endswith("img3.jpg") and "truncated" in test.unreadable[0].reason.lower()
    assert [(p.image_id, p.line) for p in dev.unmapped] == [("99", 3)]
    problems = report.problems()
    assert len(problems) == 3
    assert any("img3.jpg: missing" in p and "line 7 of" in p and "test_caps.txt" in p for p in problems)
    assert any("img4.jpg: unreadable" in p and "line 9 of" in p for p in problems)
    assert any("image id 99 not in the id mapping" in p and "line 3 of" in p for p in problems)
    assert report.images_checked == 5  # image 0 is used by both splits, checked once
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    assert "img3.jpg" in text and "3 problems found" in text

    # verify() only: the truncated file passes PIL's quick check, the missing one does not
    quick = check_dataset(root, ["test"], images_dir="images", decode=False)
    assert len(quick.splits[0].missing) == 1

    # fixed folder: no problem
    Image.new("RGB", (8, 8)).save(root / "images" / "img3.jpg")
    Image.new("RGB", (8, 8)).save(root / "images" / "img4.jpg")
    fixed = check_dataset(root, ["train", "test"], images_dir="images", progress=True)
    assert fixed.ok and fixed.problems() == []
    assert not check_dataset(root, ["train"], images_dir="images").ok  # no split at all


def test_check_dataset_bad_split_file(tmp_path: Path) -> None:
    root = make_checked_folder(tmp_path / "d")
    (root / "test_ids.txt").write_text("0\n")
    report = check_dataset(root, ["test"], images_dir="images")
    assert not report.ok and "has 10 lines but test_ids.txt has 1" in report.problems()[0]
    (root / "id_mapping.json").unlink()
    report = check_dataset(root, ["dev"], images_dir="images")
    assert not report.ok and "id_mapping.json" in report.problems()[0]


def test_check_data_cli(tmp_path: Path) -> None:
    root = make_checked_folder(tmp_path / "d")
    out = subprocess.run(
        [sys.executable, "-m", "laps.cli.check_data", "dataset=f30k", f"dataset.root={root}",
         "dataset.images_dir=images"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "img3.jpg: missing" in out.stdout and "line 7 of" in out.stdout
    assert "3 problems found" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # Hydra wrote no outputs/ or log file


def test_split_index_of_converted_files(tmp_path: Path) -> None:
    (tmp_path / "k.json").write_text(json.dumps(fake_f30k()))
    convert_karpathy(tmp_path / "k.json", tmp_path / "o")
    index = SplitIndex.from_ids(read_split(tmp_path / "o", "train")[1])
    assert index.is_contiguous() and index.captions_per_image() == {5: 3}
