"""``laps-retrieve``: index a folder of images with a LAPS checkpoint, then search it with text.

``index`` encodes every image under a folder (recursively; ``.jpg``, ``.jpeg``, ``.png``) with the
checkpoint's vision encoder and writes the image tokens, a pooled vector per image and the image
paths into one file (loaded with :func:`laps.compat.serialization.safe_load`). Partial results are
written every ``--save-every`` batches (atomically), so an interrupted run restarted with the same
arguments encodes only the images not in the file yet; new images added to the folder are
appended the same way. ``--fp16`` halves the file.

``search`` scores queries against the index:

* by default with the full LAPS head against every image (in blocks of ``--block`` images);
* with ``--rerank K``, in two stages: every image is first ranked by the cosine similarity of
  pooled embeddings against the mean of the query's valid word tokens (normalised), then only the
  top ``K`` are re-scored with the LAPS head. The image side (``--prerank``): ``mean``, the mean of
  the image tokens (normalised), or ``cls``, the [CLS] token. LAPS aligns tokens, so mean-pooled
  vectors are aligned only in models trained with ``model.pooled_weight > 0``; ``auto`` (the
  default) takes ``mean`` for those, else ``cls`` when the model has a [CLS] token, else ``mean``
  (see ``docs/tools.md``).

It prints, per query, a table of the top ``--top-k`` images with their scores, then the time per
query of each stage and the number of pairs each stage scored. Example::

    laps-retrieve index --ckpt run/checkpoints/last.ckpt --images photos/ --out photos.pt --fp16
    laps-retrieve search --ckpt run/checkpoints/last.ckpt --index photos.pt "a dog on a beach" --rerank 100
"""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

from laps.retrieval import (
    PRERANK,
    QueryResult,
    SearchStats,
    build_index,
    load_index,
    search,
)

log = logging.getLogger(__name__)

def print_results(results: list[QueryResult], stats: SearchStats, root: str = "") -> None:
    """Rich tables: the ranking of each query, then the stage timings and pair counts."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for r in results:
        table = Table(title=f"{r.query!r}", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("LAPS score", justify="right")
        if r.cosine is not None:
            table.add_column("cosine", justify="right")
        table.add_column("image")
        for rank, (score, path) in enumerate(zip(r.scores, r.paths), 1):
            row = [str(rank), f"{score:.4f}"]
            if r.cosine is not None:
                row.append(f"{r.cosine[rank - 1]:.4f}")
            table.add_row(*row, str(Path(root) / path) if root else path)
        console.print(table)
    t = Table(title=f"{stats.queries} queries, {stats.images} images ({stats.mode})", title_justify="left")
    t.add_column("stage")
    t.add_column("pairs scored", justify="right")
    t.add_column("ms / query", justify="right")
    t.add_row("text encoding", str(stats.queries), f"{1e3 * stats.text_seconds_per_query:.1f}")
    if stats.mode == "rerank":
        t.add_row(f"1: cosine of pooled embeddings ({stats.prerank})", str(stats.cosine_pairs),
                  f"{1e3 * stats.stage1_seconds_per_query:.2f}")
        t.add_row(f"2: LAPS head on the top {stats.rerank}", str(stats.laps_pairs),
                  f"{1e3 * stats.stage2_seconds_per_query:.1f}")
    else:
        t.add_row("LAPS head on every image", str(stats.laps_pairs), f"{1e3 * stats.stage2_seconds_per_query:.1f}")
    console.print(t)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="laps-retrieve",
        description="Index a folder of images with a LAPS checkpoint, then search it with text.",
        epilog=textwrap.dedent(__doc__.split("Example::", 1)[1]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{index,search}")

    p = sub.add_parser("index", help="encode a folder of images into an embedding file (resumable)",
                       description="Encode every .jpg/.jpeg/.png under --images (recursively) into --out. "
                       "Rerun the same command after an interruption: images already in --out are skipped.")
    p.add_argument("--ckpt", required=True, help="laps checkpoint (laps-train or laps-import-official) or a laps-export folder")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="embedding file to write (e.g. images.pt)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--fp16", action="store_true", help="store the image tokens as float16 (half the size)")
    p.add_argument("--save-every", type=int, default=20,
                   help="batches between partial writes of --out (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out exists")

    s = sub.add_parser("search", help="rank the indexed images for text queries",
                       description="Print the top images for each query. Full LAPS scoring of every image, "
                       "or with --rerank K a cosine pre-ranking of pooled embeddings and LAPS on its top K.")
    s.add_argument("queries", nargs="+", metavar="QUERY", help="text queries")
    s.add_argument("--ckpt", required=True, help="the checkpoint the index was made with")
    s.add_argument("--index", required=True, help="embedding file from `laps-retrieve index`")
    s.add_argument("--top-k", type=int, default=10, help="images shown per query (default: %(default)s)")
    s.add_argument("--rerank", type=int, default=None, metavar="K",
                   help="pre-rank by pooled-embedding cosine, re-score the top K with LAPS")
    s.add_argument("--prerank", choices=PRERANK, default="auto",
                   help="first stage of --rerank: cosine of the mean image token or of the [CLS] token, against "
                   "the mean of the query's words; auto (default): mean for models trained with "
                   "model.pooled_weight > 0, else cls when there is a [CLS] token, else mean")
    s.add_argument("--block", type=int, default=128, help="images per LAPS scoring step (default: %(default)s)")
    s.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    s.add_argument("--tokenizer", default=None, help="tokenizer folder or hub name, replacing the run's")
    s.add_argument("--json", default=None, help="also write the rankings and statistics to this JSON file")
    return parser


def run(args: argparse.Namespace) -> Any:
    from laps.inference import load_for_inference

    if args.command == "index":
        report = build_index(args.ckpt, args.images, args.out, args.batch_size, args.device, args.fp16,
                             args.save_every, args.workers, args.overwrite)
        print(f"{report.out}: {report.total} images ({report.encoded} encoded now, {report.reused} reused, "
              f"{len(report.failed)} unreadable) in {report.seconds:.1f} s")
        return report
    index = load_index(args.index)
    if not index.get("complete", False):
        log.warning("%s is partial (an interrupted `laps-retrieve index`): searching the %d images it holds",
                    args.index, len(index["paths"]))
    engine = load_for_inference(args.ckpt, device=args.device, tokenizer=args.tokenizer)
    results, stats = search(engine, index, args.queries, args.top_k, args.rerank, args.block,
                            prerank=args.prerank)
    print_results(results, stats, index.get("root", ""))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"results": [asdict(r) for r in results], "stats": asdict(stats)}, indent=1) + "\n")
    return results, stats


def main(argv: list[str] | None = None) -> None:
    from laps.cli.common import one_line_errors

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    one_line_errors(run)(args)


if __name__ == "__main__":
    main()
