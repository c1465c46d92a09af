"""``laps-make-synthetic``: write the built-in synthetic dataset (two-object scenes), official layout."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from laps.data.synthetic import TEMPLATES, SyntheticParams, ensure_synthetic, num_possible_scenes

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``laps-make-synthetic``."""
    d = SyntheticParams()
    ap = argparse.ArgumentParser(
        prog="laps-make-synthetic",
        description="Generate the synthetic image-text retrieval set: each image has two objects (shape, "
        "colour, size), one left and one right, and each caption names both and their sides. "
        f"{num_possible_scenes()} distinct scenes are possible. Does nothing if OUT already holds a set "
        "with the same parameters.",
    )
    ap.add_argument("--out", required=True, help="output folder (created; replaced if it holds another set)")
    ap.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    ap.add_argument("--n-train", type=int, default=d.n_train, help="training images (default: %(default)s)")
    ap.add_argument("--n-dev", type=int, default=d.n_dev, help="validation images (default: %(default)s)")
    ap.add_argument("--n-test", type=int, default=d.n_test, help="test images (default: %(default)s)")
    ap.add_argument(
        "--image-size", type=int, default=d.image_size, help="image side in px (default: %(default)s)"
    )
    ap.add_argument(
        "--captions-per-image",
        type=int,
        default=d.captions_per_image,
        help=f"captions per image, at most {len(TEMPLATES)} (default: %(default)s, as the official layout)",
    )
    ap.add_argument("--force", action="store_true", help="regenerate even if OUT is up to date")
    ap.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    params = SyntheticParams(
        seed=args.seed,
        n_train=args.n_train,
        n_dev=args.n_dev,
        n_test=args.n_test,
        image_size=args.image_size,
        captions_per_image=args.captions_per_image,
    )
    try:
        params.validate()
    except ValueError as err:
        log.error("%s", err)
        return 2
    root = ensure_synthetic(args.out, params, force=args.force)
    log.info("synthetic set ready at %s", root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
