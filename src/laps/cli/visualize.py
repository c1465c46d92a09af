"""``laps-visualize``: pictures of what LAPS keeps, fuses and aggregates for an image and its captions.

For each caption one PNG (and a JSON file beside it, with the numbers drawn) is written into ``--out``:

1. the image with the patch grid of the vision encoder;
2. the kept patches (outlined; the dropped ones darkened), ``ceil(num_patches * sparse_ratio)`` of them;
3. the dropped patches' weights in the fusion token (a heat map over the dropped patches);
4. the aggregation weights over the kept patches: summed over the aggregated tokens (``--token sum``,
   the default) or of one aggregated token (``--token 3``).

The figure is titled with the caption and its LAPS similarity. Example::

    laps-visualize --ckpt run/checkpoints/last.ckpt --image dog.jpg \\
        --caption "a dog on the grass" --caption "a cat on a sofa" --out pictures/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("laps")

FIG_SIZE = (16.0, 5.0)  # inches; the PNG is FIG_SIZE * dpi pixels
DEFAULT_DPI = 100
MAX_DISPLAY = 512  # longest side of the image as drawn, in pixels


def patch_grid(num_patches: int) -> int:
    """The side of the square patch grid; ``ValueError`` when ``num_patches`` is not a square."""
    side = math.isqrt(int(num_patches))
    if side * side != int(num_patches):
        raise ValueError(f"the vision encoder's {num_patches} patches do not form a square grid")
    return side


def slug(text: str, length: int = 40) -> str:
    """File-name friendly start of ``text``."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:length].rstrip("-") or "caption"


def pair_summary(expl: dict[str, Any], v: int, t: int, token: str | int = "sum") -> dict[str, Any]:
    """The numbers one picture shows, from :func:`laps.models.explain.explain_pair` output (pair ``(v, t)``),
    as plain lists: ``kept`` indices (score order), ``fuse_weights``, ``aggregation_map``, ``score``, ..."""
    agg = expl["aggregation_weights"][v, t]  # (M, N)
    if token == "sum":
        agg_map = agg.sum(0)
    else:
        m = int(token)
        if not 0 <= m < agg.shape[0]:
            raise ValueError(f"--token {m}: the head has {agg.shape[0]} aggregated tokens (0..{agg.shape[0] - 1})")
        agg_map = agg[m]
    return {
        "similarity": float(expl["similarity"][v, t]),
        "t2i": float(expl["t2i"][v, t]),
        "i2t": float(expl["i2t"][v, t]),
        "kept": [int(i) for i in expl["kept_indices"][v, t].tolist()],
        "keep_mask": [int(b) for b in expl["keep"][v, t].tolist()],
        "fuse_weights": [float(x) for x in expl["fuse_weights"][v, t].tolist()],
        "aggregation_token": token,
        "aggregation_map": [float(x) for x in agg_map.tolist()],
        "score": [float(x) for x in expl["score"][v, t].tolist()],
    }


def draw_pair(image, summary: dict[str, Any], side: int, caption: str, path: Path, dpi: int = DEFAULT_DPI) -> Path:
    """Write the four-panel PNG of one image-caption pair to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img = image.convert("RGB")
    scale = MAX_DISPLAY / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    width, height = img.size
    pixels = np.asarray(img)
    extent = (0, width, height, 0)
    cell_w, cell_h = width / side, height / side
    keep = np.asarray(summary["keep_mask"], dtype=bool).reshape(side, side)
    fuse = np.asarray(summary["fuse_weights"], dtype=float).reshape(side, side)
    agg = np.asarray(summary["aggregation_map"], dtype=float).reshape(side, side)

    fig, axes = plt.subplots(1, 4, figsize=FIG_SIZE, dpi=dpi)
    for ax in axes:
        ax.imshow(pixels, extent=extent)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])

    ax = axes[0]
    for k in range(1, side):
        ax.axvline(k * cell_w, color="white", lw=0.4, alpha=0.5)
        ax.axhline(k * cell_h, color="white", lw=0.4, alpha=0.5)
    ax.set_title(f"input ({side}x{side} patches)")

    ax = axes[1]
    ax.imshow(np.where(keep, np.nan, 1.0), extent=extent, cmap="gray_r", vmin=0, vmax=1, alpha=0.7,
              interpolation="nearest")
    for idx in summary["kept"]:
        r, c = divmod(idx, side)
        ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, ec="lime", lw=1.0))
    ax.set_title(f"kept patches ({len(summary['kept'])} of {side * side})")

    ax = axes[2]
    ax.imshow(np.where(keep, 1.0, np.nan), extent=extent, cmap="gray_r", vmin=0, vmax=1, alpha=0.7,
              interpolation="nearest")
    if keep.all():
        ax.set_title("fused into the extra token (none dropped)")
    else:
        heat = np.ma.masked_where(keep, fuse)
        im = ax.imshow(heat, extent=extent, cmap="magma", alpha=0.75, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title("dropped patches fused into the extra token")

    ax = axes[3]
    ax.imshow(np.where(keep, np.nan, 1.0), extent=extent, cmap="gray_r", vmin=0, vmax=1, alpha=0.7,
              interpolation="nearest")
    im = ax.imshow(np.ma.masked_where(~keep, agg), extent=extent, cmap="viridis", alpha=0.75,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    token = summary["aggregation_token"]
    ax.set_title("aggregation weights, " + ("sum over tokens" if token == "sum" else f"token {token}"))

    title = "\n".join(textwrap.wrap(f'"{caption}"', 140)[:2])
    fig.suptitle(f"{title}\nLAPS similarity {summary['similarity']:.4f}", fontsize=12)
    fig.subplots_adjust(left=0.01, right=0.97, bottom=0.02, top=0.80, wspace=0.18)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def visualize(
    ckpt: str | Path,
    image: str | Path,
    captions: list[str],
    out: str | Path,
    token: str | int = "sum",
    device: str = "auto",
    tokenizer: str | None = None,
    dpi: int = DEFAULT_DPI,
) -> list[dict[str, Any]]:
    """Write a PNG and a JSON file per caption into ``out``; returns the JSON records (with ``png``/``json``)."""
    from laps.data.datasets import open_image
    from laps.inference import load_for_inference
    from laps.models.explain import explain_pair
    from laps.models.head import LAPSHead

    if not captions:
        raise ValueError("give at least one --caption")
    engine = load_for_inference(ckpt, device=device, tokenizer=tokenizer)
    head = engine.head
    selects = isinstance(head, LAPSHead)  # a model=vse head pools: there is no selection to draw
    if not selects:
        raise ValueError(f"laps-visualize draws the LAPS head's patch selection, and this {type(engine.model).__name__} "
                         f"(model=vse, pooling={getattr(head, 'pooling', None)!r}) selects no patches")
    side = patch_grid(head.num_patches)
    picture = open_image(image)
    img_embs = engine.encode_images([picture])
    cap_embs, lens = engine.encode_captions(captions)
    expl = explain_pair(head, img_embs, cap_embs, lens)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for t, caption in enumerate(captions):
        summary = pair_summary(expl, 0, t, token)
        stem = f"{t:02d}_{slug(caption)}"
        png = draw_pair(picture, summary, side, caption, out / f"{stem}.png", dpi=dpi)
        record = {
            "caption": caption,
            "image": str(image),
            "checkpoint": str(ckpt),
            "num_patches": head.num_patches,
            "grid": [side, side],
            "num_keep": head.num_keep,
            "num_aggregated": head.num_aggregated,
            "sparse_ratio": head.sparse_ratio,
            "has_cls": head.has_cls,
            **summary,
            "png": str(png),
            "json": str(out / f"{stem}.json"),
        }
        Path(record["json"]).write_text(json.dumps(record, indent=1) + "\n")
        log.info("%s: similarity %.4f, %d patches kept", png, summary["similarity"], len(summary["kept"]))
        records.append(record)
    return records


def _token(value: str) -> str | int:
    if value == "sum":
        return "sum"
    try:
        return int(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected 'sum' or a token index, got {value!r}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laps-visualize",
        description="Draw the patches LAPS keeps, fuses and aggregates for an image and each caption.",
        epilog=textwrap.dedent(__doc__.split("Example::", 1)[1]) if "Example::" in (__doc__ or "") else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="laps checkpoint (laps-train or laps-import-official) or a laps-export folder")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--caption", action="append", required=True, dest="captions", metavar="TEXT",
                        help="a caption (repeat for several: one PNG each)")
    parser.add_argument("--out", default="laps_pictures", help="output folder (default: %(default)s)")
    parser.add_argument("--token", type=_token, default="sum",
                        help="aggregation weights shown: 'sum' over the aggregated tokens, or one token's index")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or hub name, replacing the run's dataset.tokenizer")
    parser.add_argument("--dpi", type=int, default=DEFAULT_DPI, help="PNG resolution (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    from laps.cli.common import one_line_errors

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    records = one_line_errors(visualize)(args.ckpt, args.image, args.captions, args.out, args.token, args.device,
                                         args.tokenizer, args.dpi)
    for r in records:
        print(f"{r['similarity']:8.4f}  {r['png']}")


if __name__ == "__main__":
    main()
