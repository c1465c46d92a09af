"""``laps-prepare-data``: convert public split files into the official LAPS layout.

Subcommands:
  karpathy      dataset_flickr30k.json / dataset_coco.json
                -> {split}_caps.txt, {split}_ids.txt, id_mapping.json
  coco-mapping  COCO id_mapping.json from the files in train2014/ and val2014/
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from laps.data.prepare import build_coco_mapping, convert_karpathy
from laps.data.splits import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="laps-prepare-data",
        description="Convert public split files into the official LAPS layout "
        "({split}_caps.txt, {split}_ids.txt, id_mapping.json).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    k = sub.add_parser(
        "karpathy",
        help="convert a Karpathy split file (dataset_flickr30k.json, dataset_coco.json)",
        description="F30K -> train/dev/test; COCO -> train (with restval)/dev/testall. Captions: the raw "
        "sentence, stripped, one line. id_mapping.json: F30K imgid -> filename; COCO cocoid -> "
        "filepath/filename.",
    )
    k.add_argument("--json", required=True, help="dataset_flickr30k.json or dataset_coco.json")
    k.add_argument("--out", required=True, help="output dataset folder (dataset.root)")
    k.add_argument(
        "--dataset", choices=("auto", "f30k", "coco"), default="auto", help="default: from the file"
    )
    k.add_argument("--text", choices=("raw", "tokens"), default="raw", help="caption text (default raw)")
    k.add_argument(
        "--captions-per-image",
        type=int,
        default=5,
        help="keep the first K captions of an image (0: all; default 5)",
    )
    k.add_argument(
        "--dev-images",
        default="auto",
        help="images kept in dev: a number, 'all', or 'auto' "
        "(1000 for COCO as the official release, all for F30K)",
    )
    k.add_argument("--overwrite", action="store_true", help="replace existing output files")

    c = sub.add_parser(
        "coco-mapping",
        help="build COCO's id_mapping.json by scanning train2014/ and val2014/",
        description="Writes ROOT/id_mapping.json: COCO image id -> folder/file, relative to ROOT.",
    )
    c.add_argument("--root", required=True, help="the COCO folder holding train2014/ and val2014/")
    c.add_argument("--folders", nargs="+", default=["train2014", "val2014"], help="image folders under ROOT")
    c.add_argument("--out", default=None, help="output file (default ROOT/id_mapping.json)")
    return p


def _dev_images(value: str) -> int | None | str:
    if value in ("auto",):
        return "auto"
    if value in ("all", "0"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise SystemExit(f"--dev-images: expected a number, 'all' or 'auto', got {value!r}") from None
    return n


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console)])
    try:
        if args.command == "karpathy":
            stats = convert_karpathy(
                args.json,
                args.out,
                dataset=args.dataset,
                text=args.text,
                captions_per_image=args.captions_per_image,
                dev_images=_dev_images(args.dev_images),
                overwrite=args.overwrite,
            )
            table = Table(title=f"Written to {args.out}")
            for col in ("split", "captions", "images", "images with < K captions"):
                table.add_column(col, justify="left" if col == "split" else "right")
            for s in stats.values():
                table.add_row(s.split, f"{s.captions:,}", f"{s.images:,}", f"{s.short_images:,}")
            Console().print(table)
        else:
            mapping = build_coco_mapping(args.root, args.folders, args.out)
            Console().print(f"id_mapping.json: {len(mapping):,} images")
    except DataError as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
