"""``laps-eval ckpt_path=...``: test a checkpoint or an exported model folder on a test split and write
``metrics.json`` (:func:`laps.training.tasks.evaluate`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from laps.cli.common import metrics_table, one_line_errors, register_resolvers
from laps.paths import config_dir
from laps.training.tasks import evaluate


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
@one_line_errors
def _main(cfg: DictConfig) -> float | None:
    return evaluate(cfg, report=metrics_table).get("test/rsum")


def main() -> None:
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
