"""Synthetic two-object scenes with fully identifying captions: the built-in dataset that needs no download.

Each image shows two objects, one in the left half and one in the right half; each object has a shape,
a colour and a size. Each of the captions of an image names both objects with all their attributes and
which one is on the left, in varied wording, so every caption identifies its image, while a bag of words
does not (swapping sides or attribute binding changes the match).

The output follows the official LAPS layout::

    {split}_caps.txt  {split}_ids.txt   for split in train, dev, test
    id_mapping.json   images/*.png      vocab.txt  tokenizer_config.json  meta.json

``meta.json`` is written last, so a folder without it is an incomplete generation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEMPLATES",
    "Obj",
    "Scene",
    "SyntheticParams",
    "all_vocab_words",
    "caption_for",
    "captions_for",
    "ensure_synthetic",
    "generate_synthetic",
    "num_possible_scenes",
    "read_meta",
    "render_scene",
    "sample_scenes",
]

log = logging.getLogger(__name__)

GENERATOR = "laps.data.synthetic"  # meta.json["generator"]: the mark of a folder this module may replace
GENERATOR_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "dev", "test")
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 205),
    "orange": (255, 140, 0),
    "cyan": (0, 210, 220),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
# Object radius as a fraction of half the image width, per size.
_RADIUS = {"small": 0.17, "large": 0.34}

# {L}: the left object's noun phrase, {R}: the right one's. Every template names both and their sides.
TEMPLATES: tuple[str, ...] = (
    "a {L} left of a {R}",
    "a {L} to the left of a {R}",
    "a {R} right of a {L}",
    "a {R} to the right of a {L}",
    "there is a {L} on the left and a {R} on the right",
    "there is a {R} on the right and a {L} on the left",
    "a {L} on the left side and a {R} on the right side",
    "the {L} is left of the {R}",
    "the {R} is to the right of the {L}",
    "an image of a {L} next to a {R} on its right",
    "a picture with a {R} next to a {L} on its left",
    "on the left there is a {L} and on the right a {R}",
)


@dataclass(frozen=True)
class SyntheticParams:
    """The parameters that define a synthetic set; equal parameters give identical bytes."""

    seed: int = 0
    n_train: int = 3000
    n_dev: int = 200
    n_test: int = 500
    image_size: int = 64
    captions_per_image: int = 5

    def validate(self) -> None:
        """Raise ``ValueError`` on parameters that cannot be generated."""
        if min(self.n_train, self.n_dev, self.n_test) < 0:
            raise ValueError("split sizes must be >= 0")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.captions_per_image <= len(TEMPLATES):
            raise ValueError(f"captions_per_image must be in [1, {len(TEMPLATES)}]")

    def split_sizes(self) -> dict[str, int]:
        """Number of images per split."""
        return {"train": self.n_train, "dev": self.n_dev, "test": self.n_test}


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour and size names."""

    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    """An image's content: the object in the left half and the one in the right half."""

    left: Obj
    right: Obj


# ----------------------------------------------------------------------------- scenes and captions


def _all_objects() -> list[Obj]:
    return [Obj(s, c, z) for s in SHAPES for c in COLOURS for z in SIZES]


def num_possible_scenes() -> int:
    """Number of distinct scenes (ordered left/right pairs of objects)."""
    return len(_all_objects()) ** 2


def sample_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """Draw ``n`` scenes, all distinct while ``n`` does not exceed the number of possible scenes."""
    objs = _all_objects()
    total = len(objs) ** 2
    if n > total:
        log.warning("%d images requested but only %d distinct scenes: some scenes repeat", n, total)
    chunks, left = [], n
    while left > 0:
        take = min(left, total)
        chunks.append(rng.choice(total, size=take, replace=False))
        left -= take
    codes = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return [Scene(objs[int(c) // len(objs)], objs[int(c) % len(objs)]) for c in codes]


def _phrase(obj: Obj, rng: np.random.Generator) -> str:
    words = SIZE_WORDS[obj.size]
    return f"{words[int(rng.integers(len(words)))]} {obj.colour} {obj.shape}"


def caption_for(scene: Scene, template: str, rng: np.random.Generator) -> str:
    """Fill one template for a scene, drawing a size synonym for each object."""
    return template.format(L=_phrase(scene.left, rng), R=_phrase(scene.right, rng))


def captions_for(scene: Scene, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` captions of a scene from ``n`` different templates, so they differ in wording."""
    picks = rng.choice(len(TEMPLATES), size=n, replace=False)
    return [caption_for(scene, TEMPLATES[int(i)], rng) for i in picks]


def all_vocab_words() -> list[str]:
    """Every word the templates can produce, lower case, sorted."""
    words: set[str] = set(SHAPES) | set(COLOURS)
    for syn in SIZE_WORDS.values():
        words.update(syn)
    for t in TEMPLATES:
        words.update(w for w in t.split() if not w.startswith("{"))
    return sorted(w.lower() for w in words)


# ----------------------------------------------------------------------------- rendering


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + float(a * np.cos(t)), cy + float(a * np.sin(t))) for a, t in zip(rad, ang)]
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "cross":
        w = 0.33 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(0.38 * r)))
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Dark grey, plain or lightly noisy."""
    level = rng.uniform(10, 70)
    img = np.full((size, size, 3), level, dtype=np.float32)
    if rng.random() < 0.5:
        img += rng.normal(0.0, rng.uniform(2.0, 8.0), size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _object_colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(COLOURS[colour], dtype=np.int64) + rng.integers(-12, 13, size=3)
    return tuple(int(v) for v in np.clip(base, 0, 255))


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene: the left object inside the left half, the right one inside the right half."""
    img = Image.fromarray(_background(image_size, rng))
    draw = ImageDraw.Draw(img)
    half = image_size / 2
    for x0, obj in ((0.0, scene.left), (half, scene.right)):
        r = _RADIUS[obj.size] * half * rng.uniform(0.9, 1.05)
        margin = r + 1.0
        cx = x0 + rng.uniform(margin, half - margin)
        cy = rng.uniform(margin, image_size - margin)
        _draw_object(draw, obj.shape, cx, cy, r, _object_colour(obj.colour, rng))
    return img


# ----------------------------------------------------------------------------- writing


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def vocab_size() -> int:
    """Tokens of the synthetic set's vocabulary (fixed: the special tokens and every word)."""
    return len(SPECIAL_TOKENS) + len(all_vocab_words())


def _write_tokenizer_files(out: Path) -> int:
    vocab = list(SPECIAL_TOKENS) + all_vocab_words()
    _write_lines(out / "vocab.txt", vocab)
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return len(vocab)


def _image_rng(seed: int, image_id: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, image_id]))


def _write_split(out: Path, split: str, scenes: list[Scene], first_id: int, p: SyntheticParams,
                 mapping: dict[str, str]) -> None:
    caps: list[str] = []
    ids: list[str] = []
    for k, scene in enumerate(scenes):
        image_id = first_id + k
        rng = _image_rng(p.seed, image_id)
        name = f"{image_id:06d}.png"
        render_scene(scene, p.image_size, rng).save(out / "images" / name, format="PNG")
        mapping[str(image_id)] = name
        caps.extend(captions_for(scene, p.captions_per_image, rng))
        ids.extend([str(image_id)] * p.captions_per_image)
        if (k + 1) % 1000 == 0:
            log.info("synthetic %s: %d/%d images", split, k + 1, len(scenes))
    _write_lines(out / f"{split}_caps.txt", caps)
    _write_lines(out / f"{split}_ids.txt", ids)


def generate_synthetic(out_dir: str | os.PathLike, params: SyntheticParams | None = None) -> Path:
    """Write the synthetic set of ``params`` (default: :class:`SyntheticParams`'s) into ``out_dir`` in
    the official layout and return its path.

    Image ids are unique across splits, and scenes are distinct across the whole set while the number
    of images does not exceed :func:`num_possible_scenes`. ``meta.json`` is removed first and written
    last, so an interrupted run never looks complete.
    """
    p = params or SyntheticParams()
    p.validate()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    sizes = p.split_sizes()
    log.info("generating synthetic set in %s: %s", out, sizes)

    scenes = sample_scenes(sum(sizes.values()), np.random.default_rng(np.random.SeedSequence([p.seed])))
    mapping: dict[str, str] = {}
    start = 0
    for split in SPLITS:
        _write_split(out, split, scenes[start : start + sizes[split]], start, p, mapping)
        start += sizes[split]
    (out / "id_mapping.json").write_text(json.dumps(mapping, indent=0) + "\n", encoding="utf-8")
    vocab_size = _write_tokenizer_files(out)

    meta = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "params": asdict(p),
        "splits": {s: {"images": n, "captions": n * p.captions_per_image} for s, n in sizes.items()},
        "vocab_size": vocab_size,
        "possible_scenes": num_possible_scenes(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("synthetic set done: %d images, vocabulary of %d", len(mapping), vocab_size)
    return out


def read_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The ``meta.json`` of a synthetic set, or ``None`` if it is missing or unreadable."""
    try:
        return json.loads((Path(root) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_current(root: Path, p: SyntheticParams) -> bool:
    meta = read_meta(root)
    return bool(meta) and meta.get("version") == GENERATOR_VERSION and meta.get("params") == asdict(p)


def _remove_old(root: Path) -> None:
    """Remove a previous synthetic set (or an empty folder); refuse to delete anything else."""
    if not root.exists():
        return
    meta = read_meta(root)
    if any(root.iterdir()) and (meta is None or meta.get("generator") != GENERATOR):
        raise FileExistsError(
            f"{root} exists and is not a synthetic set made by {GENERATOR} (no meta.json from it); "
            "not overwriting it: remove it yourself or choose another dataset.root"
        )
    trash = root.with_name(f".{root.name}.old-{os.getpid()}")
    root.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def ensure_synthetic(root: str | os.PathLike, params: SyntheticParams | None = None, force: bool = False) -> Path:
    """Generate the set of ``params`` (default: :class:`SyntheticParams`'s) at ``root`` unless its
    ``meta.json`` records the same parameters (or ``force``); return ``root``.

    Generation goes into a temporary folder beside ``root`` that is renamed into place when complete.
    """
    root = Path(root)
    p = params or SyntheticParams()
    if not force and _is_current(root, p):
        log.info("synthetic set at %s is up to date", root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate_synthetic(tmp, p)
        if not force and _is_current(root, p):  # another process finished first
            return root
        _remove_old(root)
        tmp.chmod(0o755)
        try:
            tmp.rename(root)
        except OSError:
            if not _is_current(root, p):  # lost a race to a different generation
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
