"""``laps-estimate``: a training step's memory on fake tensors, for every backbone and trainer config."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from laps.estimate import estimate, max_batch
from laps.estimate.run import GiB, build_simulator, measure, shape_for, target_of
from laps.models.backbones import BACKBONES, get_backbone
from laps.paths import config_dir

BACKBONE_FILES = sorted(p.stem for p in (Path(config_dir()) / "backbone").glob("*.yaml"))
TRAINER_FILES = sorted(p.stem for p in (Path(config_dir()) / "trainer").glob("*.yaml"))
KEYS = {"peak_gib", "batch_size", "params", "optimizer_gib", "activations_gib", "flops_per_step", "flops_per_pair"}

# widths and depths cut down; image size, patches and windows stay the registry's
_HF_VIT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
_HF_SWIN = {"embed_dim": 16, "depths": "[1,1,1,1]", "num_heads": "[1,1,1,1]"}
_TIMM = {"embed_dim": 32, "depth": 1, "num_heads": 2}
_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def _small_backbone(name: str) -> list[str]:
    spec = get_backbone(name)
    if spec.vision_kind == "timm":
        prefix, fields = "backbone.vision.model_kwargs", _TIMM
    else:
        prefix, fields = "backbone.vision.config_overrides", _HF_SWIN if spec.model_type == "swin" else _HF_VIT
    return ([f"backbone={name}", "backbone.embed_size=32"] + [f"++{prefix}.{k}={v}" for k, v in fields.items()]
            + [f"++backbone.text.config_overrides.{k}={v}" for k, v in _TEXT.items()])


def _cfg(make_cfg, overrides: list[str]):
    return make_cfg(["dataset.batch_size=4", "estimate.caption_length=12", *overrides], config_name="estimate")


def test_peak_tracker_keeps_memtrackers_peak() -> None:
    """``PeakTracker`` drops the per-module peaks only: the same step gives MemTracker's peak, part by part."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from laps.estimate.fake import fake_module_, new_fake_mode
    from laps.estimate.step import PeakTracker

    peaks = []
    for tracker_class in (MemTracker, PeakTracker):
        mode = new_fake_mode()
        model = fake_module_(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)), mode)
        optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
        tracker = tracker_class()
        tracker.track_external(model, optimizer)
        for tracked in (contextlib.nullcontext(), tracker):  # the second step holds the optimizer's states
            with mode, tracked:
                model(torch.empty(512, 64)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        peaks.append(tracker.get_tracker_snapshot("peak"))
    assert peaks[0] == peaks[1]
    assert sum(part["Total"] for part in peaks[1].values()) > 512 * 256 * 4  # the hidden activations at least


def test_max_batch_finds_the_largest_fitting_batch() -> None:
    found = max_batch(lambda b: float(b), limit=37.5, start=8)
    assert found["max_batch"] == 37 and found["monotone"]
    assert found["tried"][37] <= 37.5 < found["tried"][38]


@pytest.mark.parametrize("peak", [
    lambda b: 1.5 + 0.082 * b,                     # the shape measured for ViT-B/16 (docs/benchmarks.md)
    lambda b: 2.0 + 0.1 * b - 2e-5 * b * b,        # concave
    lambda b: 0.5 + 1e-4 * b * b,                  # convex
    lambda b: float(b // 50),                      # steps: the secant is no help, bisection takes over
    lambda b: 3.0 * math.sqrt(b),
])
@pytest.mark.parametrize("limit", [5.0, 20.1, 70.5])
def test_max_batch_is_the_brute_force_answer_in_few_simulations(peak, limit: float) -> None:
    calls: list[int] = []

    def fits(b: int) -> float:
        calls.append(b)
        return peak(b)

    found = max_batch(fits, limit, start=64, ceiling=4096)
    want = max((b for b in range(2, 4097) if peak(b) <= limit), default=0)
    assert found["max_batch"] == want and found["monotone"]
    assert len(calls) == len(set(calls)) <= 16  # never the same batch twice; bisection alone: about 20


def test_max_batch_of_a_nearly_linear_peak_takes_a_few_simulations() -> None:
    calls: list[int] = []

    def peak(b: int) -> float:
        return 3.0 + 0.08 * b + 2e-6 * b * b

    def fits(b: int) -> float:
        calls.append(b)
        return peak(b)

    found = max_batch(fits, 70.5, start=64, known={64: peak(64)})
    assert peak(found["max_batch"]) <= 70.5 < peak(found["max_batch"] + 1)
    assert len(calls) <= 4  # 128, a batch past the limit, then the limit's two sides


def test_max_batch_never_shrinks_with_more_memory() -> None:
    peak = {}

    def fits(b: int) -> float:
        return peak.setdefault(b, 0.3 + 0.01 * b + 1e-5 * b * b)

    batches = [max_batch(fits, limit, start=64)["max_batch"] for limit in (0.2, 0.33, 0.5, 1.0, 3.0, 10.0)]
    assert batches == sorted(batches) and batches[0] == 0 and batches[-1] > batches[1] > 0


def test_max_batch_reports_a_peak_that_does_not_grow() -> None:
    found = max_batch(lambda b: 0.5 if b == 16 else float(b) / 10, limit=4.0, start=8)  # 16 below 8
    assert not found["monotone"]


def test_estimate_has_the_figures_and_cards_give_max_batch(make_cfg) -> None:
    """Tiny backbone: the figures, and the largest batch for two cards (a bigger card, no smaller batch)."""
    cfg = _cfg(make_cfg, ["backbone=tiny", "trainer=gpu", "estimate.max_memory_gib=[1.52,1.54]",
                          "estimate.overhead_gib=1.5", "estimate.fragmentation=0.0"])
    result = estimate(cfg)
    assert KEYS <= set(result) and result["device"] == "cuda" and result["batch_size"] == 4
    assert result["peak_gib"] == max(result["peak_dense_gib"], result["peak_hardest_gib"])
    assert result["peak_gib"] >= result["params_gib"] + result["optimizer_gib"] > 0
    assert result["flops_per_pair"] == result["flops_per_step"] / 4
    tried = {int(b): p for b, p in result["max_batch_tried"].items()}
    small, large = result["max_batch"]["1.52"], result["max_batch"]["1.54"]
    assert 2 <= small <= large and result["max_batch_monotone"]
    for card, found in ((1.52, small), (1.54, large)):
        assert tried[found] <= card - 1.5 < tried[found + 1]


def test_gradient_checkpointing_is_estimated(make_cfg) -> None:
    steps = {}
    for on in (False, True):
        cfg = _cfg(make_cfg, ["backbone=tiny", "trainer=gpu", f"model.gradient_checkpointing={str(on).lower()}"])
        target = target_of(cfg)
        steps[on] = build_simulator(cfg, target).step(shape_for(cfg, target, 8, hardest=False))
    assert steps[True].flops > steps[False].flops  # the encoders' forward runs twice
    # the encoders keep only their blocks' inputs from forward to backward
    assert steps[True].forward_activations < steps[False].forward_activations


def test_ddp_counts_the_gathered_batch_and_the_buckets(make_cfg) -> None:
    cfg = _cfg(make_cfg, ["backbone=tiny", "trainer=ddp", "trainer.devices=4"])
    target = target_of(cfg)
    assert target.world_size == 4
    sim = build_simulator(cfg, target)
    ddp = measure(sim, cfg, target, 4)
    trainable = sum(p.numel() * p.element_size() for p in sim.module.parameters() if p.requires_grad)
    assert ddp["global_batch"] == 16 and ddp["ddp_buckets_gib"] == pytest.approx(trainable / GiB)
    single = measure(sim, cfg, target.__class__(**{**target.__dict__, "world_size": 1}), 4)
    assert ddp["peak_gib"] - ddp["ddp_buckets_gib"] > single["peak_gib"]  # the global batch's pairs


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONE_FILES)
def test_every_backbone_config_estimates(make_cfg, name: str) -> None:
    assert name in BACKBONES
    result = estimate(_cfg(make_cfg, [*_small_backbone(name), "trainer=gpu", "trainer.precision=bf16-mixed"]))
    assert result["backbone"] == name and result["peak_gib"] > 0 and result["flops_per_step"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINER_FILES)
def test_every_trainer_config_estimates(make_cfg, trainer: str) -> None:
    result = estimate(_cfg(make_cfg, ["backbone=tiny", f"trainer={trainer}"]))
    cpu = trainer in ("cpu", "ddp_sim")
    assert result["device"] == ("cpu" if cpu else "cuda")
    assert ("not the process's RSS" in result["memory"]) == cpu
    assert result["peak_gib"] > 0


@pytest.mark.slow
def test_laps_estimate_command_writes_estimate_json(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "laps.cli.estimate", "trainer=gpu", "dataset.batch_size=4",
         "estimate.caption_length=12", f"hydra.run.dir={out}", f"paths.output_dir={out}"],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "estimate.json").read_text())
    assert KEYS <= set(result) and result["device"] == "cuda"
    assert "peak" in proc.stdout and "Not counted" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_estimate_agrees_with_the_measured_peak_on_a_gpu(make_cfg) -> None:
    """The goal: within 10% of ``torch.cuda.max_memory_allocated`` of the same step (ViT-B/16, fp32)."""
    cfg = make_cfg(["experiment=f30k_vit", "dataset.batch_size=32", "estimate.caption_length=20",
                    "estimate.measure=true"], config_name="estimate")
    result = estimate(cfg)
    assert result["peak_gib"] == pytest.approx(result["measured_peak_gib"], rel=0.10)
