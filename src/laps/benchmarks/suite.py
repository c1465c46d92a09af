"""All of ``laps-bench``'s measurements in one run, and the result it records."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from laps.benchmarks.head import bench_head_train, bench_scoring
from laps.benchmarks.inputs import BenchSettings, applied, device_name
from laps.benchmarks.memory import bench_memory
from laps.benchmarks.train_step import bench_train_step
from laps.models.gemm import cpu_backend

log = logging.getLogger("laps")


def run_benchmarks(settings: BenchSettings, device: torch.device, command: str) -> dict[str, Any]:
    """Run the measurements ``settings`` switches on, on ``device``; the result (``docs/tools.md``).

    ``command`` is recorded as the command line that asked for them.
    """
    with applied(settings):
        results = _measurements(settings, device)
        return {
            "device": device.type,
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "cpu_gemm": cpu_backend(),
            "torch": torch.__version__,
            "command": command,
            "config": settings.recorded(),
            "results": results,
        }


def _measurements(settings: BenchSettings, device: torch.device) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if settings.head_train:
        log.info("head training step, batch %d", settings.batch)
        results["head_train"] = bench_head_train(settings, device)
    if settings.scoring:
        log.info("scoring %d x %d pairs", settings.score_images, settings.score_captions)
        results["scoring"] = bench_scoring(settings, device)
    if settings.memory:
        log.info("memory of a training step, batch %d", settings.memory_batch)
        results["memory"] = bench_memory(settings, device)
    if settings.train_step:
        log.info("full training step, %s, batch %d", settings.train_step, settings.batch)
        results["train_step"] = bench_train_step(settings, device)
    return results
