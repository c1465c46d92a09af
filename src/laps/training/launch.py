"""Hydra multirun sweeps with DDP: one run directory, one ``metrics.json`` and one logger run per job.

Three things go wrong when Hydra's multirun meets Lightning's DDP launcher, and :func:`hydra_job`
fixes each of them around every job of ``laps-train``:

* **Duplicated output directories and sweeps run twice.** Lightning starts the other ranks of a
  Lightning-launched DDP job (``trainer=ddp`` on one node, ``trainer=ddp_sim``) by re-running the
  command line with ``hydra.run.dir=<hydra.run.dir>``. In a multirun that command line holds ``-m``
  and every swept value, so each child would run the whole sweep, in ``hydra.run.dir`` (a fresh
  ``runs/<time>`` folder) rather than in the job's folder. During a multirun job the command line
  is rewritten to this job's own overrides (no ``-m``) and ``hydra.run.dir`` to the job's
  directory, so the children run exactly this job, in the same folder.
* **Jobs after the first hanging.** The launcher leaves ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_PORT``... in the environment and the process group open; the next job would then take
  itself for an externally launched rank and wait for peers that have exited. At the end of a job
  whose processes Lightning started, the process group is destroyed and those variables restored.
  (Under ``torchrun`` or SLURM the ranks and the process group belong to the launcher and are
  kept: every rank runs the same jobs in the same order.)
* **wandb runs merging into one.** A ``WandbLogger`` created while a run is still open reuses
  it; the job's wandb run is finished at the end of the job, so the next job starts its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("laps")

# What Lightning's subprocess/spawn launchers put in the parent's environment.
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "RANK")


def launched_externally() -> bool:
    """True in a process whose rank a launcher gave it: torchrun, ``srun``, MPI, or a Lightning child.

    The same test Lightning makes (``ClusterEnvironment.creates_processes_externally``).
    """
    if "LOCAL_RANK" in os.environ:
        return True
    from lightning.fabric.plugins.environments import MPIEnvironment, TorchElasticEnvironment
    from lightning.fabric.plugins.environments.slurm import _is_srun_used

    return bool(TorchElasticEnvironment.detect() or _is_srun_used() or MPIEnvironment.detect())


def global_rank_from_env() -> int:
    """This process's global rank as its launcher set it (0 when there is none)."""
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "LOCAL_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def child_argv(argv: list[str], task_overrides: list[str]) -> list[str]:
    """``argv`` without ``-m``/``--multirun`` and its overrides, followed by one job's overrides.

    Options such as ``--config-name train`` or ``-cd dir`` are kept; every ``key=value`` argument
    (the sweep, with its comma-separated values) is replaced by the job's own ``task_overrides``.
    """
    kept = [argv[0]]
    for arg in argv[1:]:
        if arg in ("-m", "--multirun"):
            continue
        if not arg.startswith("-") and "=" in arg:
            continue
        kept.append(arg)
    return kept + [str(o) for o in task_overrides]


@contextlib.contextmanager
def hydra_job(output_dir: str | None = None) -> Iterator[None]:
    """Wrap one ``laps-train`` job (see the module docstring); harmless outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    external = launched_externally()
    saved_env = {k: os.environ.get(k) for k in DIST_ENV}
    saved_argv = list(sys.argv)
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    saved_run_dir = None
    if _multirun() and not external and hydra_cfg is not None:
        job_dir = output_dir or hydra_cfg.runtime.output_dir
        sys.argv = child_argv(saved_argv, list(hydra_cfg.overrides.task))
        saved_run_dir = hydra_cfg.run.dir
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = str(job_dir)  # Lightning passes it to the other ranks as hydra.run.dir
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        sys.argv = saved_argv
        if saved_run_dir is not None and hydra_cfg is not None:
            with read_write(hydra_cfg):
                hydra_cfg.run.dir = saved_run_dir
        finish_wandb(exit_code=1 if failed else None)  # a run the job left open (it failed midway)
        if not external:
            _close_process_group()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _reset_rank_zero()


def _close_process_group() -> None:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reset_rank_zero() -> None:
    """Lightning's rank-zero helpers read the rank once; the next job in this process is rank 0 again."""
    if "lightning" not in sys.modules:
        return
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only

    for fn in (rank_zero_only, fabric_rank_zero_only):
        fn.rank = 0  # type: ignore[attr-defined]


def finish_wandb(run: Any = None, exit_code: int | None = None) -> str | None:
    """Finish ``run`` (default: the open wandb run, if any); returns where an offline run was saved.

    An offline run says how to upload it later (``wandb sync <dir>``); nothing is uploaded here.
    """
    if run is None:
        if "wandb" not in sys.modules:
            return None
        import wandb

        run = wandb.run
    if run is None:
        return None
    offline = bool(getattr(getattr(run, "settings", None), "_offline", False)) or os.environ.get(
        "WANDB_MODE", ""
    ).lower() in ("offline", "dryrun", "disabled")
    run_dir = None
    with contextlib.suppress(Exception):
        run_dir = os.path.dirname(run.dir)  # .../wandb/offline-run-<time>-<id>
    run.finish(exit_code=exit_code)
    import wandb

    if wandb.run is None:
        with contextlib.suppress(Exception):
            wandb.teardown()  # finish() returns before the run is on disk; teardown waits for it
    if run_dir and offline:
        log.info("wandb run saved offline in %s; upload it with: wandb sync %s", run_dir, run_dir)
    elif run_dir:
        log.info("wandb run finished: %s", getattr(run, "url", None) or run_dir)
    return run_dir if offline else None


# ---------------------------------------------------------------------------- names of a job's logger run


def job_label() -> str:
    """A name unique to the job: the run folder's name, or ``<sweep folder>-<job number>`` in a multirun."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return "run"
    hc = HydraConfig.get()
    if _multirun():
        return f"{Path(str(hc.sweep.dir)).name}-{OmegaConf.select(hc, 'job.num', default=0)}"
    out = OmegaConf.select(hc, "runtime.output_dir", default=None) or OmegaConf.select(hc, "run.dir", default=None)
    return Path(str(out)).name if out else "run"


def run_group(default: str) -> str:
    """``sweep-<sweep folder>`` for the jobs of a multirun (one wandb group per sweep), else ``default``."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    if _multirun():
        return f"sweep-{Path(str(HydraConfig.get().sweep.dir)).name}"
    return str(default)


def run_stamp(default: str) -> str:
    """The run/sweep folder name: ``default`` (the start time) unless a launcher started every rank.

    Ranks started by ``srun`` or ``torchrun`` each run Hydra and would each name a folder after their
    own clock; they share their job's id instead (``slurm-<job id>``, ``torchrun-<rdzv id>``), so all
    of them write to one folder. ``LAPS_RUN_STAMP`` (checked in the config) overrides both.
    """
    env = os.environ
    if env.get("SLURM_JOB_ID") and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        step = env.get("SLURM_STEP_ID", "0")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f".{step}" if step not in ("0", "") else "")
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none" and int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return f"torchrun-{run_id}"
    return str(default)
