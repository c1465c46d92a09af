"""Two nodes, simulated: ``torchrun --nnodes 2 --nproc-per-node 1`` on localhost (two node ranks over
gloo, ``trainer.num_nodes=2 trainer.devices=1``) runs ``laps-train`` for one step with the gradients
of a single process on the global batch, so the node-rank code path (the launcher's environment,
Lightning's ``TorchElasticEnvironment``, the run folder and lock of node 1) runs somewhere."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.common import TINY_WIDTH32

TESTS = Path(__file__).parent
SYNTHETIC = {"seed": 0, "n_train": 32, "n_dev": 8, "n_test": 8, "image_size": 32}
STEP = [
    *(f"dataset.synthetic.{k}={v}" for k, v in SYNTHETIC.items()),
    "backbone=tiny", *TINY_WIDTH32,  # no dropout: each rank would draw its own masks
    "+backbone.text.config_overrides.hidden_dropout_prob=0.0",
    "+backbone.text.config_overrides.attention_probs_dropout_prob=0.0",
    "model.vse_mean_warmup_epochs=0", "model.embedding_warmup_epochs=-1",  # hardest negatives, full loss at step 0
    "trainer.max_epochs=1", "+trainer.max_steps=1", "+trainer.limit_val_batches=0", "test=false",
    "trainer.deterministic=true", "callbacks.progress_bar.refresh_rate=0", "seed=3",
    "+callbacks.save_grads._target_=helpers.grads.SaveGrads",
]

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    return {**clean, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}


def _overrides(root: Path, data_dir: Path, name: str) -> list[str]:
    return [*STEP, f"paths.root_dir={root}", f"paths.data_dir={data_dir}", f"hydra.run.dir={root / name}",
            f"+callbacks.save_grads.out_dir={root / name / 'grads'}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from laps.data.synthetic import SyntheticParams, ensure_synthetic

    root = tmp_path_factory.mktemp("multinode_data")
    ensure_synthetic(root / "synthetic", SyntheticParams(**SYNTHETIC))
    return root


def _load(folder: Path, rank: int, world: int) -> dict:
    return torch.load(folder / "grads" / f"grads_rank{rank}_of{world}.pt", weights_only=True)


def test_two_node_torchrun_step_has_the_single_process_gradients(data_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    ddp = [*_overrides(tmp_path, data_dir, "two_nodes"), "trainer=ddp", "trainer.accelerator=cpu",
           "trainer.num_nodes=2", "trainer.devices=1", "trainer.precision=32-true", "dataset.batch_size=4"]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "laps.cli.train", *ddp],
        env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    single = subprocess.Popen(
        [sys.executable, "-m", "laps.cli.train", *_overrides(tmp_path, data_dir, "single"), "trainer=cpu",
         "dataset.batch_size=8"], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        outs = [p.communicate(timeout=420)[0] for p in (*nodes, single)]
    finally:
        for p in (*nodes, single):
            p.kill()
    for p, out in zip((*nodes, single), outs, strict=True):
        assert p.returncode == 0, out[-3000:]

    want = _load(tmp_path / "single", 0, 1)["grads"]
    ranks = [_load(tmp_path / "two_nodes", r, 2) for r in range(2)]
    assert [(r["node_rank"], r["num_nodes"]) for r in ranks] == [(0, 2), (1, 2)]  # one rank per node
    scale = max(float(g.norm()) for g in want.values())
    assert scale > 0
    for name, g in want.items():
        for r, got in enumerate(ranks):
            d = got["grads"][name]
            # float32 sums split over two ranks: 1e-5 relative, plus 1e-7 of the largest gradient for
            # small ones whose terms cancel (a bias at 1e-3 of the scale was off by 1.1e-5 on one CPU)
            assert float((d - g).norm()) <= 1e-5 * float(g.norm()) + 1e-7 * scale, (name, r)
    assert set(ranks[0]["grads"]) == set(want)
