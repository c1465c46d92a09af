"""laps-export CKPT --out DIR: a trained checkpoint as a Hugging Face model folder."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="laps-export", description=__doc__)
    parser.add_argument("checkpoint", help="a laps-train or laps-import-official checkpoint")
    parser.add_argument("--out", required=True, help="folder to write (model.safetensors, config.json, ...)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from laps.export import export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
