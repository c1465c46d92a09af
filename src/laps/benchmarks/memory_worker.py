"""``python -m laps.benchmarks.memory_worker SETTINGS_JSON IMPL``: one memory measurement in a fresh process.

Writes ``{"bytes": N}``, the CPU memory growth of ``IMPL``'s (``head`` or ``reference``) training
step (:func:`laps.benchmarks.memory.memory_growth`), as the last line of stdout.
"""

from __future__ import annotations

import json
import sys

import torch

from laps.benchmarks.inputs import BenchSettings, applied
from laps.benchmarks.memory import memory_growth


def main(argv: list[str]) -> None:
    """Measure as ``argv`` (``[SETTINGS_JSON, IMPL]``) says and write the result to stdout."""
    settings = BenchSettings(**json.loads(argv[0]))
    with applied(settings):
        growth = memory_growth(argv[1], settings, torch.device("cpu"))
    sys.stdout.write(json.dumps({"bytes": growth}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
