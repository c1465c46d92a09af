"""``laps-bench``: speed and memory of the LAPS head against the official-style reference loop.

Measured on whatever device is there (CUDA if available, else CPU), each against
:func:`laps.models.reference.reference_similarity` in the same run:

* **head training step** at training shapes (``--batch`` images x ``--batch`` captions): forward
  in train mode, loss, backward. Two losses: the official one (hinge with hardest negatives plus
  the ratio loss; from epoch 1 on, only about ``3 x batch`` pairs then carry a gradient) and
  ``sims.sum()`` (every pair carries one, the worst case, like the first epoch);
* **scoring** of ``N_img x N_cap`` pairs from cached embeddings (evaluation). Default 1,000 x 5,000
  (F30K test) on CUDA; on CPU 96 x 96, as the table says. On CUDA the reference is timed on a
  subset of captions (``--reference-captions``) and scaled per pair (it is a loop over captions);
* **memory** of a head training step: CUDA peak allocated minus allocated before; on CPU the peak
  resident memory after the step minus the resident memory before it, each implementation in a
  fresh subprocess;
* optionally (``--train-step vit|swin|vit_384``) a full training step (encoders with random
  weights, head, loss, AdamW) at ``--batch``, bf16 autocast on CUDA, reported in pairs/s.

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from laps.inference import resolve_device, synchronize
from laps.models.backbones import get_backbone
from laps.models.gemm import cpu_backend, set_cpu_backend

log = logging.getLogger("laps")

BACKBONES: dict[str, dict[str, Any]] = {  # --train-step / --backbone presets, from the backbone list
    name: {"vision": spec.vision_id, "tokens": spec.num_tokens, "has_cls": spec.has_cls,
           "sparse_ratio": spec.sparse_ratio, "aggr_ratio": spec.aggr_ratio, "image_size": spec.image_size}
    for name, spec in ((n, get_backbone(n)) for n in ("vit", "swin", "vit_384"))
}
# Caption lengths of the F30K 1K test split (5,000 captions): tokens from BERT's basic tokenizer
# plus [CLS] and [SEP], counts for lengths 4, 5, ..., 32 (longer ones counted at 32). Mean 15.5.
F30K_LENGTHS = (4, [2, 2, 10, 28, 111, 237, 329, 437, 442, 471, 435, 396, 382, 330, 268, 194, 185, 133,
                    91, 87, 80, 71, 41, 34, 34, 24, 26, 29, 91])
CPU_SCORING = (96, 96)
GPU_SCORING = (1000, 5000)
LOSSES = ("hardest", "dense")


# ---------------------------------------------------------------------------- inputs and timing
def make_embeddings(
    n_img: int, n_cap: int, args: argparse.Namespace, device: torch.device, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Random image tokens ``(n_img, tokens, dim)``, caption tokens ``(n_cap, words, dim)`` and lengths.

    Lengths follow F30K's (``--lengths f30k``, clipped to ``[min_words, words]``) or are uniform in
    ``[min_words, words]``; the tensor is ``words`` long.
    """
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, args.tokens, args.dim, generator=gen)
    cap = torch.randn(n_cap, args.words, args.dim, generator=gen)
    return img.to(device), cap.to(device), caption_lengths(n_cap, args, gen).to(device)


def caption_lengths(n: int, args: argparse.Namespace, gen: torch.Generator) -> Tensor:
    """``n`` caption lengths drawn as ``--lengths`` says."""
    if args.lengths == "uniform":
        return torch.randint(args.min_words, args.words + 1, (n,), generator=gen)
    first, counts = F30K_LENGTHS
    draw = torch.multinomial(torch.tensor(counts, dtype=torch.float), n, replacement=True, generator=gen) + first
    return draw.clamp(args.min_words, args.words)


def build_head(args: argparse.Namespace, device: torch.device, seed: int = 0):
    """A :class:`LAPSHead` at the benchmark's shapes, parameters perturbed from their initial values."""
    from laps.models.head import LAPSHead

    torch.manual_seed(seed)
    head = LAPSHead(
        args.dim, args.tokens - int(args.has_cls), args.sparse_ratio, args.aggr_ratio, args.has_cls,
        chunk_pairs=args.chunk_pairs,
    )
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head.to(device)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Best wall-clock seconds of each function, calls interleaved so that load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def training_loss(sims: Tensor, mask: Tensor, sparse_ratio: float, loss: str) -> Tensor:
    """``hardest``: the official loss from epoch 1 on; ``dense``: ``sims.sum()`` (every pair a gradient)."""
    from laps.losses import contrastive_loss, ratio_loss

    if loss == "dense":
        return sims.sum()
    n = min(sims.shape)
    ids = torch.arange(n, device=sims.device)
    return contrastive_loss(sims[:n, :n], ids, 0.2, max_violation=True) + 2.0 * ratio_loss(mask, sparse_ratio)


def head_step(impl: str, head, img: Tensor, cap: Tensor, lens: Tensor, loss: str, amp: bool = False) -> None:
    """One forward (train mode) + loss + backward of ``head`` or of the reference loop."""
    from laps.models.reference import reference_similarity

    img = img.detach().requires_grad_()
    cap = cap.detach().requires_grad_()
    head.train()
    head.zero_grad(set_to_none=True)
    with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=amp):
        if impl == "head":
            sims, mask = head(img, cap, lens)
        else:
            sims, mask = reference_similarity(head, img, cap, lens, return_mask=True)
        value = training_loss(sims.float(), mask, head.sparse_ratio, loss)
    value.backward()


# ---------------------------------------------------------------------------- measurements
def bench_head_train(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Head forward + backward at ``batch x batch`` pairs, both losses, head and reference."""
    head = build_head(args, device)
    img, cap, lens = make_embeddings(args.batch, args.batch, args, device, args.seed)
    out: dict[str, Any] = {"batch": args.batch, "pairs": args.batch**2}
    amp = args.autocast == "bf16"
    for loss in LOSSES:
        fns = {"head": lambda loss=loss: head_step("head", head, img, cap, lens, loss, amp)}
        if args.reference:
            fns["reference"] = lambda loss=loss: head_step("reference", head, img, cap, lens, loss, amp)
        times = time_interleaved(fns, device, args.repeats)
        entry = {"head_s": times["head"]}
        if args.reference:
            entry["reference_s"] = times["reference"]
            entry["speedup"] = times["reference"] / times["head"]
        out[loss] = entry
    return out


@torch.no_grad()
def _reference_scores(head, img: Tensor, cap: Tensor, lens: Tensor, image_block: int) -> Tensor:
    from laps.models.reference import reference_similarity

    head.eval()
    return torch.cat(
        [reference_similarity(head, img[i : i + image_block], cap, lens) for i in range(0, img.shape[0], image_block)]
    )


def bench_scoring(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Scoring ``score_images x score_captions`` pairs from cached embeddings, as evaluation does."""
    from laps.evaluation import score_matrix

    head = build_head(args, device).eval()
    n_img, n_cap = args.score_images, args.score_captions
    img, cap, lens = make_embeddings(n_img, n_cap, args, device, args.seed + 1)
    amp = args.autocast == "bf16"

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def run_head() -> Tensor:
        with autocast():
            return score_matrix(head, img, cap, lens, image_block=args.image_block, progress=False)

    n_ref = min(n_cap, args.reference_captions or n_cap)

    def run_reference() -> Tensor:
        with autocast():
            return _reference_scores(head, img, cap[:n_ref], lens[:n_ref], args.image_block)

    fns: dict[str, Callable[[], Any]] = {"head": run_head}
    if args.reference:
        fns["reference"] = run_reference
    times = time_interleaved(fns, device, args.repeats)
    out: dict[str, Any] = {
        "images": n_img, "captions": n_cap, "pairs": n_img * n_cap, "head_s": times["head"],
        "head_pairs_per_s": n_img * n_cap / times["head"],
    }
    if args.reference:
        scale = n_cap / n_ref
        out.update({
            "reference_captions_timed": n_ref,
            "reference_s": times["reference"] * scale,
            "speedup": times["reference"] * scale / times["head"],
        })
    return out


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def memory_growth(impl: str, args: argparse.Namespace, device: torch.device) -> int:
    """Memory growth of one head training step (dense gradient) of ``impl``, in bytes.

    CUDA: peak allocated during the step minus allocated before. CPU: peak resident memory
    (VmHWM, reset before the step where the kernel allows) minus resident memory before.
    """
    head = build_head(args, device)
    img, cap, lens = make_embeddings(args.memory_batch, args.memory_batch, args, device, args.seed)
    small = [t[:2] for t in (img, cap, lens)]
    head_step(impl, head, *small, "dense")  # initialise libraries and thread pools, not the big buffers
    head.zero_grad(set_to_none=True)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        head_step(impl, head, img, cap, lens, "dense")
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS watermark to the current RSS
    except OSError:
        log.debug("cannot reset VmHWM; the peak includes the set-up")
    before = _rss_bytes("VmRSS:")
    head_step(impl, head, img, cap, lens, "dense")
    return max(0, _rss_bytes("VmHWM:") - before)


def bench_memory(args: argparse.Namespace, device: torch.device, argv: list[str]) -> dict[str, Any]:
    """Memory growth of a training step at ``memory_batch``, each implementation on its own."""
    impls = ["head"] + (["reference"] if args.reference else [])
    out: dict[str, Any] = {"batch": args.memory_batch}
    if device.type == "cuda":
        out["method"] = "cuda max_memory_allocated - memory_allocated, same process"
        for impl in impls:
            out[f"{impl}_bytes"] = memory_growth(impl, args, device)
            torch.cuda.empty_cache()
    else:
        out["method"] = "peak RSS after the step - RSS before, fresh process per implementation"
        for impl in impls:
            cmd = [sys.executable, "-m", "laps.cli.bench", *argv, "--memory-worker", impl]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"memory worker for {impl} failed:\n{res.stderr[-2000:]}")
            out[f"{impl}_bytes"] = int(json.loads(res.stdout.strip().splitlines()[-1])["bytes"])
    if args.reference:
        out["ratio"] = out["head_bytes"] / max(out["reference_bytes"], 1)
    return out


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


def bench_train_step(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """A full training step (random-weight encoders, head, loss, AdamW) at ``batch``; pairs/s."""
    from laps.losses import contrastive_loss, ratio_loss
    from laps.models import create_model

    preset = BACKBONES[args.train_step]
    model = create_model(args.train_step, embed_size=args.dim, pretrained=False,
                         vision_overrides=_overrides(args.vision_override),
                         text_overrides=_overrides(args.text_override), sparse_ratio=args.sparse_ratio,
                         aggr_ratio=args.aggr_ratio, chunk_pairs=args.chunk_pairs).to(device).train()
    vision, text = model.vision, model.text
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    size = vision.image_size
    images = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
    vocab = int(text.backbone.config.vocab_size)
    ids = torch.randint(1000 % vocab, vocab, (args.batch, args.words), generator=gen)
    lengths = caption_lengths(args.batch, args, gen)
    ids = ids.masked_fill(torch.arange(args.words)[None] >= lengths[:, None], 0).to(device)
    lengths = lengths.to(device)
    img_ids = torch.arange(args.batch, device=device)
    amp = device.type == "cuda"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            sims, mask = model(images, ids, lengths)
            loss = contrastive_loss(sims, img_ids, 0.2, max_violation=True) + 2.0 * ratio_loss(mask, args.sparse_ratio)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, args.train_steps)):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    best = min(times)
    out = {
        "backbone": args.train_step, "vision": preset["vision"], "text": get_backbone(args.train_step).text_id, "batch": args.batch,
        "image_size": size, "num_patches": vision.num_patches, "amp": "bf16" if amp else "off",
        "step_s": best, "mean_step_s": sum(times) / len(times),
        "pairs_per_s": args.batch**2 / best, "images_per_s": args.batch / best,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


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
    p.add_argument("--dim", type=int, default=512, help="embedding size (default 512)")
    p.add_argument("--has-cls", dest="has_cls", action="store_true", default=None, help="token 0 is [CLS]")
    p.add_argument("--no-cls", dest="has_cls", action="store_false", help="no [CLS] token (Swin)")
    p.add_argument("--sparse-ratio", type=float, default=None, help="default 0.5 (Swin preset 0.8)")
    p.add_argument("--aggr-ratio", type=float, default=None, help="default 0.4 (Swin preset 0.6)")
    p.add_argument("--words", type=int, default=32, help="caption tensor length = longest caption (default 32)")
    p.add_argument("--min-words", type=int, default=4, help="shortest caption (default 4)")
    p.add_argument("--lengths", choices=["f30k", "uniform"], default="f30k",
                   help="caption lengths: F30K test's distribution (mean 15.5 tokens), or uniform in "
                   "[--min-words, --words] (default f30k)")
    p.add_argument("--chunk-pairs", type=int, default=None,
                   help="the head's chunk_pairs (default: blocks sized by memory)")
    p.add_argument("--autocast", choices=["off", "bf16"], default="off",
                   help="bf16 autocast around head and reference in the head and scoring measurements "
                   "(the full training step always uses bf16 on CUDA)")
    p.add_argument("--score-images", type=int, default=None,
                   help=f"images scored (default {GPU_SCORING[0]} on cuda, {CPU_SCORING[0]} on cpu)")
    p.add_argument("--score-captions", type=int, default=None,
                   help=f"captions scored (default {GPU_SCORING[1]} on cuda, {CPU_SCORING[1]} on cpu)")
    p.add_argument("--reference-captions", type=int, default=None,
                   help="captions the reference is timed on, scaled to all (default all on cpu, 500 on cuda)")
    p.add_argument("--image-block", type=int, default=128, help="images per scoring step (default 128)")
    p.add_argument("--memory-batch", type=int, default=48, help="batch of the memory measurement (default 48)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up; the best is kept")
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
    p.add_argument("--train-steps", type=int, default=3, help="timed full training steps (default 3)")
    p.add_argument("--vision-override", action="append", default=[], metavar="KEY=VALUE",
                   help="vision config field for --train-step (repeatable), e.g. num_hidden_layers=2")
    p.add_argument("--text-override", action="append", default=[], metavar="KEY=VALUE",
                   help="text config field for --train-step (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--memory-worker", choices=["head", "reference"], default=None, help=argparse.SUPPRESS)
    return p


def resolve_args(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill defaults that depend on the device and on ``--train-step``; validate sizes."""
    preset = BACKBONES[args.train_step] if args.train_step else BACKBONES["vit"]
    if args.batch is None:
        args.batch = 128 if args.train_step else 32
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
    return args


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, measure, print the table, write JSON; returns the result dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    previous = cpu_backend()
    if args.cpu_gemm:
        set_cpu_backend(args.cpu_gemm)
    try:
        return _measure(args, argv)
    finally:
        set_cpu_backend(previous)


def _measure(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    device = resolve_device(args.device)
    args = resolve_args(args, device)
    if args.memory_worker:
        print(json.dumps({"bytes": memory_growth(args.memory_worker, args, device)}))
        return {}
    results: dict[str, Any] = {}
    if args.head_train:
        log.info("head training step, batch %d", args.batch)
        results["head_train"] = bench_head_train(args, device)
    if args.scoring:
        log.info("scoring %d x %d pairs", args.score_images, args.score_captions)
        results["scoring"] = bench_scoring(args, device)
    if args.memory:
        log.info("memory of a training step, batch %d", args.memory_batch)
        results["memory"] = bench_memory(args, device, argv)
    if args.train_step:
        log.info("full training step, %s, batch %d", args.train_step, args.batch)
        results["train_step"] = bench_train_step(args, device)
    result = {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_gemm": cpu_backend(),
        "torch": torch.__version__,
        "command": "laps-bench " + " ".join(argv),
        "config": {k: getattr(args, k) for k in (
            "batch", "tokens", "dim", "has_cls", "sparse_ratio", "aggr_ratio", "words", "min_words", "lengths",
            "autocast",
            "chunk_pairs", "score_images", "score_captions", "reference_captions", "memory_batch",
            "repeats", "train_step", "seed")},
        "results": results,
    }
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
