"""Tests of the synthetic dataset generator and its command line."""

from __future__ import annotations

import filecmp
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from laps.data.synthetic import (
    COLOURS,
    SHAPES,
    SIZE_WORDS,
    SPLITS,
    TEMPLATES,
    SyntheticParams,
    ensure_synthetic,
    generate_synthetic,
    num_possible_scenes,
)

SMALL = {"n_train": 120, "n_dev": 30, "n_test": 50, "image_size": 64}
SIZE_OF = {w: size for size, words in SIZE_WORDS.items() for w in words}
_PHRASE = r"(\w+) (\w+) (\w+)"
_PATTERNS = [
    re.compile(re.escape(t).replace(r"\{L\}", f"(?P<L>{_PHRASE})").replace(r"\{R\}", f"(?P<R>{_PHRASE})"))
    for t in TEMPLATES
]


def parse_caption(caption: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(size, colour, shape) of the left and of the right object named by a caption."""
    for pat in _PATTERNS:
        m = pat.fullmatch(caption)
        if m:
            objs = []
            for side in ("L", "R"):
                size_word, colour, shape = m.group(side).split()
                assert size_word in SIZE_OF and colour in COLOURS and shape in SHAPES, caption
                objs.append((SIZE_OF[size_word], colour, shape))
            return objs[0], objs[1]
    raise AssertionError(f"caption matches no template: {caption!r}")


def read_split(root: Path, split: str) -> tuple[list[str], list[str]]:
    caps = (root / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
    ids = (root / f"{split}_ids.txt").read_text(encoding="utf-8").splitlines()
    return caps, ids


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "set", SyntheticParams(seed=3, **SMALL))


def test_layout_and_counts(synth: Path) -> None:
    for name in ("id_mapping.json", "vocab.txt", "tokenizer_config.json", "meta.json", "images"):
        assert (synth / name).exists(), name
    n_images = {"train": SMALL["n_train"], "dev": SMALL["n_dev"], "test": SMALL["n_test"]}
    for split in SPLITS:
        caps, ids = read_split(synth, split)
        assert len(caps) == len(ids) == 5 * n_images[split]
        assert len(set(ids)) == n_images[split]
    total = sum(n_images.values())
    assert len(json.loads((synth / "id_mapping.json").read_text())) == total
    assert len(list((synth / "images").glob("*.png"))) == total
    meta = json.loads((synth / "meta.json").read_text())
    assert meta["params"] == dict(seed=3, captions_per_image=5, **SMALL)
    assert meta["possible_scenes"] == num_possible_scenes() >= 10_000


def test_ids_repeat_five_times_consecutively_and_unique_across_splits(synth: Path) -> None:
    seen: set[str] = set()
    for split in SPLITS:
        _, ids = read_split(synth, split)
        blocks = [ids[i : i + 5] for i in range(0, len(ids), 5)]
        assert all(len(set(b)) == 1 for b in blocks)
        heads = [b[0] for b in blocks]
        assert len(set(heads)) == len(heads), "an id appears in two separate blocks"
        assert seen.isdisjoint(heads), "an image id is shared between splits"
        seen.update(heads)


def test_every_caption_resolves_to_an_image(synth: Path) -> None:
    mapping = json.loads((synth / "id_mapping.json").read_text())
    for split in SPLITS:
        for image_id in set(read_split(synth, split)[1]):
            path = synth / "images" / mapping[image_id]
            with Image.open(path) as img:
                assert img.size == (64, 64) and img.mode == "RGB"


def test_determinism(tmp_path: Path) -> None:
    params = {"n_train": 20, "n_dev": 5, "n_test": 5, "image_size": 48}
    a = generate_synthetic(tmp_path / "a", SyntheticParams(seed=7, **params))
    b = generate_synthetic(tmp_path / "b", SyntheticParams(seed=7, **params))
    c = generate_synthetic(tmp_path / "c", SyntheticParams(seed=8, **params))
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors
    assert (a / "train_caps.txt").read_bytes() != (c / "train_caps.txt").read_bytes()
    assert (a / "images" / "000000.png").read_bytes() != (c / "images" / "000000.png").read_bytes()
    assert (a / "meta.json").read_bytes() != (c / "meta.json").read_bytes()


def test_captions_name_both_objects_consistently(synth: Path) -> None:
    scenes = []
    for split in SPLITS:
        caps, _ = read_split(synth, split)
        for i in range(0, len(caps), 5):
            parsed = {parse_caption(c) for c in caps[i : i + 5]}
            assert len(parsed) == 1, f"captions of one image disagree: {caps[i : i + 5]}"
            scenes.append(parsed.pop())
    assert len(set(scenes)) == len(scenes), "a scene repeats although far fewer than possible were drawn"


def _colour_masks(half: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels near each palette colour (objects' colours jitter by at most 12 per channel)."""
    px = half.astype(np.int64)
    return {name: np.abs(px - np.array(rgb)).max(axis=-1) <= 20 for name, rgb in COLOURS.items()}


def _extent(mask: np.ndarray) -> int:
    """Larger side of the bounding box of a mask, in pixels."""
    rows, cols = np.nonzero(mask)
    return int(max(rows.max() - rows.min(), cols.max() - cols.min()) + 1)


def test_images_match_their_captions(synth: Path) -> None:
    mapping = json.loads((synth / "id_mapping.json").read_text())
    caps, ids = read_split(synth, "test")
    for i in range(0, len(caps), 5):
        left, right = parse_caption(caps[i])
        arr = np.asarray(Image.open(synth / "images" / mapping[ids[i]]).convert("RGB"))
        for (size, colour, _), half in ((left, arr[:, :32]), (right, arr[:, 32:])):
            masks = _colour_masks(half)
            counts = {name: int(m.sum()) for name, m in masks.items()}
            assert max(counts, key=counts.get) == colour, (caps[i], counts)
            # large objects span about 20 px at 64 px, small ones about 11 px
            extent = _extent(masks[colour])
            assert (extent >= 16) if size == "large" else (extent <= 14), (caps[i], extent)


def test_captions_unique(synth: Path) -> None:
    owner: dict[str, str] = {}
    for split in SPLITS:
        caps, ids = read_split(synth, split)
        for i in range(0, len(caps), 5):
            assert len(set(caps[i : i + 5])) == 5, "the captions of an image should differ in wording"
        for cap, image_id in zip(caps, ids):
            assert owner.setdefault(cap, image_id) == image_id, f"caption shared by two images: {cap!r}"
    words = Counter(w for cap in owner for w in cap.split())
    assert {"left", "right"} <= set(words)


@pytest.mark.parametrize("fast", [False, True])
def test_vocab_loads_with_bert_tokenizer(synth: Path, fast: bool) -> None:
    from transformers import BertTokenizer, BertTokenizerFast

    vocab = (synth / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) == len(set(vocab))
    tok = (BertTokenizerFast if fast else BertTokenizer).from_pretrained(str(synth))
    assert tok.pad_token_id == 0 and tok.unk_token == "[UNK]" and len(tok) == len(vocab)
    caps = [c for split in SPLITS for c in read_split(synth, split)[0]]
    enc = tok(caps)["input_ids"]
    assert all(ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id for ids in enc)
    assert all(tok.unk_token_id not in ids for ids in enc)
    assert tok.tokenize("A Big RED Circle") == ["a", "big", "red", "circle"]


def test_ensure_synthetic_regenerates_only_on_change(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    params = {"n_train": 10, "n_dev": 5, "n_test": 5}
    ensure_synthetic(root, SyntheticParams(**params))
    sentinel = root / "sentinel"
    sentinel.write_text("x")
    ensure_synthetic(root, SyntheticParams(**params))
    assert sentinel.exists(), "regenerated although parameters were unchanged"
    ensure_synthetic(root, SyntheticParams(**{**params, "seed": 1}))
    assert not sentinel.exists(), "not regenerated after a parameter change"
    assert json.loads((root / "meta.json").read_text())["params"]["seed"] == 1
    sentinel.write_text("x")
    ensure_synthetic(root, SyntheticParams(**{**params, "seed": 1}), force=True)  # laps-make-synthetic --force
    assert not sentinel.exists() and (root / "meta.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "ds"], "temporary folders left behind"
    # without its meta.json the folder is no longer known to be a generated set: left alone
    sentinel.write_text("x")
    (root / "meta.json").unlink()
    with pytest.raises(FileExistsError):
        ensure_synthetic(root, SyntheticParams(**params), force=True)
    assert sentinel.exists()


@pytest.mark.parametrize("marker", [None, "vocab.txt", "meta.json"])
def test_ensure_synthetic_refuses_foreign_folder(tmp_path: Path, marker: str | None) -> None:
    """Only a folder whose meta.json names this generator is replaced: not a dataset folder with its
    own vocabulary, nor one with some other meta.json."""
    (tmp_path / "precious.txt").write_text("keep me")
    if marker:
        (tmp_path / marker).write_text('{"version": 1}' if marker == "meta.json" else "[PAD]\n")
    with pytest.raises(FileExistsError):
        ensure_synthetic(tmp_path, SyntheticParams(n_train=2, n_dev=1, n_test=1), force=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    from laps.cli.make_synthetic import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--n-train" in capsys.readouterr().out


def test_cli_generates(tmp_path: Path) -> None:
    from laps.cli.make_synthetic import main

    out = tmp_path / "cli"
    args = ["--out", str(out), "--n-train", "4", "--n-dev", "2", "--n-test", "2", "--seed", "5", "-q"]
    assert main(args) == 0
    assert len(read_split(out, "dev")[0]) == 10
    (out / "sentinel").write_text("x")
    assert main([*args, "--force"]) == 0  # regenerated although current
    assert not (out / "sentinel").exists() and len(read_split(out, "dev")[0]) == 10
    assert main(["--out", str(out), "--captions-per-image", "99", "-q"]) == 2
