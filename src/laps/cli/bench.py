"""``laps-bench``: speed and memory of the LAPS head against the official-style reference loop.

Parses the options into :class:`laps.benchmarks.BenchSettings` (the defaults that depend on the
device and on ``--train-step`` filled in), runs :func:`laps.benchmarks.run_benchmarks`, prints a
table and writes the result as JSON (``--out``). What is measured, and how: :mod:`laps.benchmarks`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from laps.benchmarks import BACKBONES, CPU_SCORING, GPU_SCORING, BenchSettings, memory_growth, run_benchmarks
from laps.benchmarks.inputs import applied
from laps.inference import resolve_device

log = logging.getLogger("laps")
DEFAULTS = BenchSettings()


# ---------------------------------------------------------------------------- report
def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt_mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f} MiB"


def print_table(result: dict[str, Any]) -> None:
    """A rich table of the measurements."""
    from rich.console import Console
    from rich.table import Table

    cfg = result["config"]
    table = Table(title=(
        f"laps-bench on {result['device_name']} ({cfg['tokens']} tokens, {cfg['dim']} dims, "
        f"ratios {cfg['sparse_ratio']}/{cfg['aggr_ratio']}, caption lengths {cfg['lengths']} "
        f"{cfg['min_words']}-{cfg['words']}"
        + (f", head's CPU GEMMs: {result['cpu_gemm']}" if result["device"] == "cpu" else "")
        + ")"
    ))
    for col in ("measurement", "shape", "head", "reference", "reference / head"):
        table.add_column(col, justify="left" if col in ("measurement", "shape") else "right")
    res = result["results"]
    if "head_train" in res:
        r = res["head_train"]
        for loss, label in (("hardest", "training step, official loss"), ("dense", "training step, sims.sum()")):
            e = r[loss]
            table.add_row(label, f"batch {r['batch']} ({r['pairs']:,} pairs)", _fmt_s(e["head_s"]),
                          _fmt_s(e.get("reference_s")), f"{e['speedup']:.1f}x" if "speedup" in e else "-")
    if "scoring" in res:
        r = res["scoring"]
        shape = f"{r['images']:,} x {r['captions']:,}"
        if result["device"] == "cpu" and (r["images"], r["captions"]) == CPU_SCORING:
            shape += " (CPU default)"
        if r.get("reference_captions_timed", r["captions"]) < r["captions"]:
            shape += f"; ref. timed on {r['images']:,} x {r['reference_captions_timed']:,}, scaled"
        table.add_row("scoring (eval)", shape, _fmt_s(r["head_s"]), _fmt_s(r.get("reference_s")),
                      f"{r['speedup']:.1f}x" if "speedup" in r else "-")
    if "memory" in res:
        r = res["memory"]
        table.add_row("memory growth, training step", f"batch {r['batch']}", _fmt_mb(r["head_bytes"]),
                      _fmt_mb(r.get("reference_bytes")), f"head = {r['ratio']:.2f}x" if "ratio" in r else "-")
    if "train_step" in res:
        r = res["train_step"]
        table.add_row(f"full training step ({r['backbone']}, amp {r['amp']})", f"batch {r['batch']}",
                      f"{_fmt_s(r['step_s'])}, {r['pairs_per_s']:,.0f} pairs/s", "-", "-")
    Console().print(table)


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="laps-bench",
        description="Speed and memory of the LAPS head against the official-style reference loop "
        "(and optionally of a full training step). Prints a table and writes JSON.",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--batch", type=int, default=None,
                   help="training batch: head training step, and --train-step (default 32; 128 with --train-step)")
    p.add_argument("--tokens", type=int, default=None,
                   help="image tokens incl. [CLS] (default 197, or the --train-step backbone's)")
    p.add_argument("--dim", type=int, default=DEFAULTS.dim, help=f"embedding size (default {DEFAULTS.dim})")
    p.add_argument("--has-cls", dest="has_cls", action="store_true", default=None, help="token 0 is [CLS]")
    p.add_argument("--no-cls", dest="has_cls", action="store_false", help="no [CLS] token (Swin)")
    p.add_argument("--sparse-ratio", type=float, default=None, help="default 0.5 (Swin preset 0.8)")
    p.add_argument("--aggr-ratio", type=float, default=None, help="default 0.4 (Swin preset 0.6)")
    p.add_argument("--words", type=int, default=DEFAULTS.words,
                   help=f"caption tensor length = longest caption (default {DEFAULTS.words})")
    p.add_argument("--min-words", type=int, default=DEFAULTS.min_words,
                   help=f"shortest caption (default {DEFAULTS.min_words})")
    p.add_argument("--lengths", choices=["f30k", "uniform"], default=DEFAULTS.lengths,
                   help="caption lengths: F30K test's distribution (mean 15.5 tokens), or uniform in "
                   f"[--min-words, --words] (default {DEFAULTS.lengths})")
    p.add_argument("--chunk-pairs", type=int, default=None,
                   help="the head's chunk_pairs (default: blocks sized by memory)")
    p.add_argument("--autocast", choices=["off", "bf16"], default=DEFAULTS.autocast,
                   help="bf16 autocast around head and reference in the head and scoring measurements "
                   "(the full training step always uses bf16 on CUDA)")
    p.add_argument("--score-images", type=int, default=None,
                   help=f"images scored (default {GPU_SCORING[0]} on cuda, {CPU_SCORING[0]} on cpu)")
    p.add_argument("--score-captions", type=int, default=None,
                   help=f"captions scored (default {GPU_SCORING[1]} on cuda, {CPU_SCORING[1]} on cpu)")
    p.add_argument("--reference-captions", type=int, default=None,
                   help="captions the reference is timed on, scaled to all (default all on cpu, 500 on cuda)")
    p.add_argument("--image-block", type=int, default=DEFAULTS.image_block,
                   help=f"images per scoring step (default {DEFAULTS.image_block})")
    p.add_argument("--memory-batch", type=int, default=DEFAULTS.memory_batch,
                   help=f"batch of the memory measurement (default {DEFAULTS.memory_batch})")
    p.add_argument("--repeats", type=int, default=DEFAULTS.repeats, help="timed repeats after a warm-up; the best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cpu-gemm", choices=["onednn", "torch"], default=None,
                   help="kernels of the head's float32 CPU products (laps.models.gemm; default onednn on "
                   "AVX-512 CPUs). The reference always uses torch's, like the official code; 'torch' "
                   "times the head with the same kernels")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference loop")
    p.add_argument("--no-head-train", dest="head_train", action="store_false", help="skip the head training step")
    p.add_argument("--no-scoring", dest="scoring", action="store_false", help="skip scoring")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurement")
    p.add_argument("--train-step", choices=sorted(BACKBONES), default=None,
                   help="also time a full training step of this backbone (random weights) at --batch")
    p.add_argument("--train-steps", type=int, default=DEFAULTS.train_steps,
                   help=f"timed full training steps (default {DEFAULTS.train_steps})")
    p.add_argument("--vision-override", action="append", default=[], metavar="KEY=VALUE",
                   help="vision config field for --train-step (repeatable), e.g. num_hidden_layers=2")
    p.add_argument("--text-override", action="append", default=[], metavar="KEY=VALUE",
                   help="text config field for --train-step (repeatable)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--memory-worker", choices=["head", "reference"], default=None, help=argparse.SUPPRESS)
    return p


def resolve_args(args: argparse.Namespace, device: torch.device) -> BenchSettings:
    """The settings of parsed ``args``: defaults that depend on the device and on ``--train-step`` filled
    in, sizes validated."""
    preset = BACKBONES[args.train_step] if args.train_step else BACKBONES["vit"]
    if args.batch is None:
        args.batch = 128 if args.train_step else DEFAULTS.batch
    for key in ("tokens", "has_cls", "sparse_ratio", "aggr_ratio"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    scoring = GPU_SCORING if device.type == "cuda" else CPU_SCORING
    args.score_images = scoring[0] if args.score_images is None else args.score_images
    args.score_captions = scoring[1] if args.score_captions is None else args.score_captions
    if args.reference_captions is None and device.type == "cuda":
        args.reference_captions = min(500, args.score_captions)
    for name in ("batch", "tokens", "dim", "words", "min_words", "score_images", "score_captions",
                 "memory_batch", "chunk_pairs", "image_block"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.min_words > args.words:
        raise ValueError(f"--min-words ({args.min_words}) must not exceed --words ({args.words})")
    if args.tokens - int(args.has_cls) < 1:
        raise ValueError(f"--tokens {args.tokens} leaves no patch token")
    plain = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchSettings) if hasattr(args, f.name)}
    return BenchSettings(**plain, vision_overrides=_overrides(args.vision_override),
                         text_overrides=_overrides(args.text_override))


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> dict, values parsed as JSON where possible (``2`` -> 2)."""
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, measure, print the table, write JSON; returns the result dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    settings = resolve_args(args, device)
    if args.memory_worker:  # one memory measurement in this process, as JSON
        with applied(settings):
            print(json.dumps({"bytes": memory_growth(args.memory_worker, settings, device)}))
        return {}
    result = run_benchmarks(settings, device, "laps-bench " + " ".join(argv))
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        log.info("wrote %s", args.out)
    return result


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``laps-bench``."""
    from laps.cli.common import one_line_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    one_line_errors(run)(argv)


if __name__ == "__main__":
    main()
