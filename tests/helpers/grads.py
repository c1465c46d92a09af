"""A callback that saves the first step's gradients of every rank, for runs started by a launcher
(``+callbacks.save_grads._target_=helpers.grads.SaveGrads +callbacks.save_grads.out_dir=...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class SaveGrads(Callback):
    """``grads_rank{R}_of{W}.pt``: every parameter's gradient in step 0, after DDP's averaging and
    before the clipping and the optimizer step (both come after ``on_before_optimizer_step``)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save({"grads": grads, "node_rank": trainer.node_rank, "num_nodes": trainer.num_nodes},
                       self.out_dir / f"grads_rank{trainer.global_rank}_of{trainer.world_size}.pt")
