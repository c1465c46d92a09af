"""Memory growth of a head training step: CUDA's allocator peak, or on CPU the peak resident memory
of a fresh process per implementation (:mod:`laps.benchmarks.memory_worker`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from typing import Any

import torch

from laps.benchmarks.head import head_step
from laps.benchmarks.inputs import BenchSettings, build_head, make_embeddings
from laps.inference import synchronize

log = logging.getLogger("laps")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def memory_growth(impl: str, settings: BenchSettings, device: torch.device) -> int:
    """Memory growth of one head training step (dense gradient) of ``impl``, in bytes.

    CUDA: peak allocated during the step minus allocated before. CPU: peak resident memory
    (VmHWM, reset before the step where the kernel allows) minus resident memory before.
    """
    head = build_head(settings, device)
    img, cap, lens = make_embeddings(settings.memory_batch, settings.memory_batch, settings, device, settings.seed)
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


def bench_memory(settings: BenchSettings, device: torch.device) -> dict[str, Any]:
    """Memory growth of a training step at ``memory_batch``, each implementation on its own."""
    impls = ["head"] + (["reference"] if settings.reference else [])
    out: dict[str, Any] = {"batch": settings.memory_batch}
    if device.type == "cuda":
        out["method"] = "cuda max_memory_allocated - memory_allocated, same process"
        for impl in impls:
            out[f"{impl}_bytes"] = memory_growth(impl, settings, device)
            torch.cuda.empty_cache()
    else:
        out["method"] = "peak RSS after the step - RSS before, fresh process per implementation"
        for impl in impls:
            out[f"{impl}_bytes"] = _memory_in_subprocess(impl, settings)
    if settings.reference:
        out["ratio"] = out["head_bytes"] / max(out["reference_bytes"], 1)
    return out


def _memory_in_subprocess(impl: str, settings: BenchSettings) -> int:
    cmd = [sys.executable, "-m", "laps.benchmarks.memory_worker", json.dumps(dataclasses.asdict(settings)), impl]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker for {impl} failed:\n{res.stderr[-2000:]}")
    return int(json.loads(res.stdout.strip().splitlines()[-1])["bytes"])
