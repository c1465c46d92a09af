"""Shared fixtures: composed configs on a tiny synthetic dataset, and paths to the shared references."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from laps.cli.common import register_resolvers
from laps.paths import config_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "laps_reference"
# for the tests that read the official golden outputs (the others run without them)
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures missing: {FIXTURES}")
SHARED_DATA = SHARED / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
register_resolvers()

# A tiny synthetic set that every framework test shares (generated once per session).
TINY_SYNTHETIC = [
    "dataset.synthetic.n_train=96",
    "dataset.synthetic.n_dev=12",
    "dataset.synthetic.n_test=12",
    "dataset.synthetic.image_size=64",
    "dataset.batch_size=16",
    "dataset.eval_batch_size=16",
]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def compose_train(overrides: list[str], output_dir: Path, data_dir: Path, config_name: str = "train") -> DictConfig:
    """The ``laps-train`` configuration as Hydra composes it, outputs under ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with read_write(cfg), open_dict(cfg):  # the composed hydra node is read-only
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(data_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]  # as Hydra hands the config to the task: ${hydra:...} resolves from HydraConfig
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path, synthetic_root: Path):
    """``make_cfg(overrides)``: a composed train config on the shared tiny synthetic set."""

    def _make(overrides: list[str] = (), name: str = "run", config_name: str = "train") -> DictConfig:
        extra = TINY_SYNTHETIC if config_name == "train" else []
        return compose_train([*extra, *overrides], tmp_path / name, synthetic_root, config_name)

    yield _make
    GlobalHydra.instance().clear()
