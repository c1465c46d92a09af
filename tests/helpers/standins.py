"""Stand-ins for the real datasets: the real caption and id files of ``/work/shared/data`` with small
generated images named as the real files, and a WordPiece vocabulary built from the captions (the
``bert-base-uncased`` vocabulary cannot be downloaded here).

* :func:`build_wordpiece_vocab`: ``vocab.txt`` in a folder, ``[PAD]`` = 0, ``[UNK]``, ``[CLS]``, ``[SEP]``,
  ``[MASK]`` first, loadable by ``transformers.BertTokenizer`` (``dataset.tokenizer=<folder>``).
* :func:`make_f30k_standin`: ``{split}_caps.txt``, ``{split}_ids.txt``, the shipped ``id_mapping.json`` and
  ``flickr30k-images/<file>`` for every image of the split.
* :func:`make_coco_standin`: ``{split}_caps.txt``, ``{split}_ids.txt`` and ``val2014/COCO_val2014_%012d.jpg``;
  ``id_mapping.json`` built by ``laps-prepare-data coco-mapping`` (or left out: the COCO naming fallback).
* :func:`write_tiny_checkpoint`: a ``laps-eval`` checkpoint (``state_dict`` + ``laps_config``) of a composed
  train configuration, written the way ``laps-import-official`` writes one.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Tiny encoders for scoring the real test splits in seconds: 16 px images, 8 px patches (4 patches and
# [CLS]), width 16, one layer each; all patches kept (1.0), 2 aggregated tokens (0.5); large scoring chunks.
TINY_REAL = [
    "backbone=tiny", "backbone.image_size=16", "backbone.embed_size=16",
    "backbone.vision.config_overrides.hidden_size=16", "backbone.vision.config_overrides.num_hidden_layers=1",
    "backbone.vision.config_overrides.num_attention_heads=2",
    "backbone.vision.config_overrides.intermediate_size=32",
    "backbone.text.config_overrides.hidden_size=16", "backbone.text.config_overrides.num_hidden_layers=1",
    "backbone.text.config_overrides.num_attention_heads=2", "backbone.text.config_overrides.intermediate_size=32",
    "ratios.sparse_ratio=1.0", "ratios.aggr_ratio=0.5",
    "model.net.chunk_pairs=65536", "model.eval_image_block=1000",
]


def shared_data(name: str) -> Path:
    """``/work/shared/data/<name>`` (skips the test when absent)."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not present")
    return path


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def build_wordpiece_vocab(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 3000) -> Path:
    """Train a lower-casing BERT WordPiece vocabulary on ``texts``; writes ``out_dir/vocab.txt``."""
    from tokenizers import BertWordPieceTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.save_model(str(out_dir))
    vocab = read_lines(out_dir / "vocab.txt")
    assert vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS, vocab[:8]
    return out_dir


def write_image(path: Path, seed: int, size: int = 16) -> None:
    """A small deterministic noise image (JPEG or PNG from the suffix)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3)))
    img.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG", quality=90)


def copy_split(src: Path, dst: Path, split: str, out_split: str | None = None, images: slice | None = None) -> list[str]:
    """Copy ``{split}_caps.txt``/``{split}_ids.txt`` as ``{out_split}_*``, keeping the caption lines of the
    images ``images`` (a slice of the split's images in order of appearance); returns the image ids kept."""
    dst.mkdir(parents=True, exist_ok=True)
    caps, ids = read_lines(src / f"{split}_caps.txt"), read_lines(src / f"{split}_ids.txt")
    unique = list(dict.fromkeys(ids))
    kept = set(unique[images] if images is not None else unique)
    lines = [n for n, i in enumerate(ids) if i in kept]
    out = out_split or split
    (dst / f"{out}_caps.txt").write_text("".join(caps[n] + "\n" for n in lines), encoding="utf-8")
    (dst / f"{out}_ids.txt").write_text("".join(ids[n] + "\n" for n in lines), encoding="utf-8")
    return [i for i in unique if i in kept]


def make_f30k_standin(
    dst: str | Path, split: str = "test", size: int = 16, out_split: str | None = None, images: slice | None = None
) -> Path:
    """The real F30K ``split`` (or the images ``images`` of it, as ``out_split``) with generated images at
    ``dst/flickr30k-images/<name from the shipped id_mapping.json>``."""
    src, dst = shared_data("f30k"), Path(dst)
    ids = copy_split(src, dst, split, out_split, images)
    if not (dst / "id_mapping.json").is_file():
        shutil.copyfile(src / "id_mapping.json", dst / "id_mapping.json")
    mapping = json.loads((dst / "id_mapping.json").read_text())
    for image_id in ids:
        write_image(dst / "flickr30k-images" / mapping[image_id], int(image_id), size)
    return dst


def coco_file(image_id: str | int) -> str:
    return f"val2014/COCO_val2014_{int(image_id):012d}.jpg"


def make_coco_standin(dst: str | Path, split: str = "testall", size: int = 16, mapping: bool = True) -> Path:
    """The real COCO ``split`` with generated ``val2014/COCO_val2014_%012d.jpg``; ``mapping``: build
    ``id_mapping.json`` with ``laps-prepare-data coco-mapping`` (else the COCO file-name fallback is used)."""
    src, dst = shared_data("coco"), Path(dst)
    ids = copy_split(src, dst, split)
    for image_id in ids:
        write_image(dst / coco_file(image_id), int(image_id), size)
    if mapping:
        build_coco_mapping(dst)
    return dst


def build_coco_mapping(root: Path) -> Path:
    """``laps-prepare-data coco-mapping --root ROOT`` (in-process); returns ``ROOT/id_mapping.json``."""
    from laps.cli import prepare_data

    assert prepare_data.main(["coco-mapping", "--root", str(root), "--folders", "val2014"]) == 0
    return root / "id_mapping.json"


def write_tiny_checkpoint(cfg, path: str | Path) -> Path:
    """Build the module of the composed train config ``cfg`` (as ``laps-train`` does, random weights) and
    save ``{"state_dict", "laps_config"}`` as ``laps-import-official`` does; ``laps-eval`` reads it."""
    import torch

    from laps.training.tasks import build_datamodule, build_module

    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "laps_config": module.config_snapshot}, path)
    return path
