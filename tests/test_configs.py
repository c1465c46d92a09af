"""Every config composes, and every group option instantiates what it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from laps.paths import config_dir

CONFIGS = Path(config_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides: list[str], name: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_experiment_composes(experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}"])
    assert 0 < cfg.ratios.sparse_ratio <= 1 and 0 < cfg.ratios.aggr_ratio <= 1
    assert cfg.model.net.vision._target_.startswith("laps.models")
    OmegaConf.to_container(cfg.model, resolve=True)


@pytest.mark.parametrize(
    "group", ["backbone", "dataset", "ratios", "trainer", "logger", "callbacks", "debug", "model"]
)
def test_every_group_option_composes(group: str) -> None:
    from hydra.utils import get_object

    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        assert cfg is not None
        composed = OmegaConf.to_container(cfg, resolve=False)
        composed.pop("hydra", None)
        for target in _targets(composed):  # every class or function the composed config names exists
            assert callable(get_object(target)), (group, option, target)


def _targets(node) -> list[str]:
    """Every ``_target_`` in a config container, nested ones included."""
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [("vit", (0.5, 0.4)), ("swin", (0.8, 0.6)), ("tiny", (0.5, 0.4)), ("vit_384", (0.5, 0.4)), ("swin_384", (0.8, 0.6))],
)
def test_backbone_names_its_ratio_preset(backbone: str, expected: tuple[float, float]) -> None:
    cfg = _compose([f"backbone={backbone}"])
    assert (cfg.ratios.sparse_ratio, cfg.ratios.aggr_ratio) == expected


def test_user_ratio_choice_beats_backbone_preset() -> None:
    cfg = _compose(["backbone=swin", "ratios=vit"])
    assert (cfg.ratios.sparse_ratio, cfg.ratios.aggr_ratio) == (0.5, 0.4)
    cfg = _compose(["backbone=swin", "ratios.sparse_ratio=0.3"])
    assert (cfg.ratios.sparse_ratio, cfg.ratios.aggr_ratio) == (0.3, 0.6)


def test_default_is_the_demo() -> None:
    cfg = _compose([])
    assert cfg.dataset.name == "synthetic" and cfg.backbone.name == "tiny"
    assert cfg.trainer.accelerator == "cpu"


def test_official_recipes_match_the_table() -> None:
    table = {"f30k_vit": ("f30k", "vit"), "f30k_swin": ("f30k", "swin"),
             "coco_vit": ("coco", "vit"), "coco_swin": ("coco", "swin")}
    for name, (dataset, backbone) in table.items():
        cfg = _compose([f"experiment={name}"])
        assert (cfg.dataset.name, cfg.backbone.name) == (dataset, backbone)
        assert cfg.model.optimizer.lr == pytest.approx(2e-4)
        assert cfg.model.backbone_lr_mult == pytest.approx(0.1)
        assert list(cfg.model.scheduler.milestones) == [9, 15, 20, 25]
        assert cfg.model.scheduler.gamma == pytest.approx(0.3)
        assert cfg.trainer.gradient_clip_val == pytest.approx(2.0)
        assert cfg.trainer.max_epochs == 30
        assert cfg.callbacks.model_checkpoint.monitor == "val/rsum"
    assert _compose(["experiment=coco_vit"]).dataset.test_split == "testall"


def test_head_memory_options_reach_the_head() -> None:
    from hydra.utils import instantiate

    net = instantiate(_compose(["model.net.max_saved_mb=0", "model.net.chunk_pairs=16"]).model.net)
    assert (net.head.max_saved_mb, net.head.chunk_pairs) == (0.0, 16)
    assert instantiate(_compose([]).model.net).head.max_saved_mb == 1024.0
