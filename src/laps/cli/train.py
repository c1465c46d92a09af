"""``laps-train``: train LAPS, validate on the dev split each epoch, test the best checkpoint
(:func:`laps.training.tasks.train`)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from laps.cli.common import metrics_table, one_line_errors, register_resolvers
from laps.paths import config_dir
from laps.training.launch import hydra_job
from laps.training.preemption import PREEMPTED_EXIT_CODE, Preempted
from laps.training.tasks import train

log = logging.getLogger("laps")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@one_line_errors
def _main(cfg: DictConfig) -> float | None:
    try:
        with hydra_job():  # multirun x DDP: children run this job only, in its folder; clean state after it
            metrics = train(cfg, report=metrics_table)
    except Preempted as err:  # not a success, not a failure: the scheduler resubmits (docs/reliability.md)
        log.warning("%s", err)
        sys.exit(PREEMPTED_EXIT_CODE)
    if cfg.get("optimized_metric"):  # hparams_search: what the sweeper optimizes (never the test split)
        return metrics.get(cfg.optimized_metric)
    return metrics.get("test/rsum", metrics.get("val/rsum"))


def main() -> None:
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
