"""The training recipe as ``laps-train`` runs it, read from the Hydra configs (its one source).

``configs/model/laps.yaml`` gives the loss weights, the optimizer and the head's selection;
the trainer config gives the gradient clipping. The benchmarks take them from here, so a change
of the recipe in the configs reaches them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from laps.losses import contrastive_loss, ratio_loss


@dataclass(frozen=True)
class TrainRecipe:
    """The composed ``model`` and ``trainer`` groups of ``laps-train``'s config."""

    model: DictConfig
    trainer: DictConfig

    @property
    def margin(self) -> float:
        return float(self.model.margin)

    @property
    def ratio_weight(self) -> float:
        return float(self.model.ratio_weight)

    @property
    def pooled_weight(self) -> float:
        return float(self.model.pooled_weight)

    def head_options(self) -> dict[str, Any]:
        """The head's patch selection (``model.selection`` and its options), for ``create_model``."""
        return {key: self.model[key] for key in ("selection", "attention_weight", "gumbel_tau")}

    def module(self, net: torch.nn.Module) -> Any:
        """The training LightningModule of the recipe around ``net``."""
        from hydra.utils import instantiate

        return instantiate(self.model, net=None, _partial_=True)(net=net)

    def optimizer(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimizer ``laps-train`` trains ``net`` with (its parameter groups and learning rates)."""
        configured = self.module(net).configure_optimizers()
        return configured["optimizer"] if isinstance(configured, dict) else configured

    def head_loss(self, sims: Tensor, mask: Tensor, img_ids: Tensor, sparse_ratio: float) -> Tensor:
        """The head's part of the training loss past the warm-ups: hinge on the hardest negatives
        (contrastive term at full weight) plus the weighted ratio loss.

        ``sims`` ``(B, B)``, ``mask`` the head's keep mask, ``img_ids`` ``(B,)``; a scalar.
        """
        return contrastive_loss(sims, img_ids, self.margin, True) + self.ratio_weight * ratio_loss(mask, sparse_ratio)

    def loss(
        self, sims: Tensor, mask: Tensor, img_ids: Tensor, sparse_ratio: float, pooled: Tensor | None = None
    ) -> Tensor:
        """The LightningModule's training loss past the warm-ups: :meth:`head_loss`, plus the hinge on
        ``pooled`` ``(B, B)`` (pooled cosines, needed when ``model.pooled_weight > 0``) at its weight.
        """
        value = self.head_loss(sims, mask, img_ids, sparse_ratio)
        if self.pooled_weight > 0:
            if pooled is None:
                raise ValueError("model.pooled_weight > 0 needs the pooled similarities")
            value = value + self.pooled_weight * contrastive_loss(pooled, img_ids, self.margin, True)
        return value

    def clip_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Clip as the trainer does (``trainer.gradient_clip_val``, ``gradient_clip_algorithm``)."""
        value = self.trainer.get("gradient_clip_val")
        if not value:
            return
        if (self.trainer.get("gradient_clip_algorithm") or "norm") == "value":
            torch.nn.utils.clip_grad_value_(parameters, float(value))
        else:
            torch.nn.utils.clip_grad_norm_(parameters, float(value))


def training_recipe(backbone: str = "vit", overrides: Sequence[str] = ()) -> TrainRecipe:
    """``laps-train``'s recipe for ``backbone`` without an experiment, with Hydra ``overrides``.

    ``overrides`` as on ``laps-train``'s command line, e.g. ``["model.margin=0.3"]``.
    """
    from hydra import compose, initialize_config_dir

    from laps.paths import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["~experiment", f"backbone={backbone}", *overrides])
    return TrainRecipe(model=cfg.model, trainer=cfg.trainer)
