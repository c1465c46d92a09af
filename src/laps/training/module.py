"""The LightningModule: the official LAPS training recipe around :class:`laps.models.LAPSModel`."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor

from laps.compat.official_results import save_official_results
from laps.data.splits import SplitIndex
from laps.eccv import EccvSplitMismatch, split_eccv_metrics
from laps.evaluation import protocol_metrics, score_matrix
from laps.losses import (
    contrastive_loss,
    gather_no_grad,
    gather_pairs,
    max_across_ranks,
    pad_to,
    ratio_loss,
)
from laps.models import LAPSHead
from laps.models.dual_encoder import DualEncoder
from laps.models.pooling import pooled_similarity
from laps.training.checkpointing import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

# Validation/test metrics come from the whole gathered split, identical on every rank: logging them
# without sync_dist is right, so Lightning's advice to sync them under DDP is only noise.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)[^']*', \.\.\., sync_dist=True\)`")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


class LAPSLitModule(LightningModule):
    """Trains LAPS with the hinge loss on the global batch; validates and tests by full retrieval.

    Args:
        net: the model (encoders and head): a :class:`LAPSModel`, or a :class:`VSEModel` (``model=vse``,
            the global-embedding baseline: no keep mask, so no ratio loss).
        optimizer: a partial optimizer taking parameter groups (``_partial_: true`` in Hydra).
        scheduler: a partial epoch-level scheduler taking the optimizer, or ``None``.
        backbone_lr_mult: learning-rate factor of the vision and text backbones (0.1 officially).
        margin: hinge margin.
        ratio_weight: weight of the ratio loss.
        pooled_weight: weight of a hinge loss (same margin and negatives) on the cosine of pooled
            vectors (:mod:`laps.models.pooling`), beside the LAPS loss; 0 (the official recipe)
            leaves it out. It trains the first stage of ``laps-retrieve --rerank``. A :class:`VSEModel`
            ignores it, with a warning: its similarity is a pooled cosine already.
        vse_mean_warmup_epochs: hardest negatives from this epoch on (sum over negatives before).
        embedding_warmup_epochs: the epoch in which the contrastive term ramps up from 0 to 1.
        max_nonfinite_steps: consecutive skipped steps (NaN/Inf loss or gradient) before stopping.
        eval_image_block: images per scoring step in validation and test.
        save_sims: write the test similarity matrix as ``sims_test.pt`` in the run directory.
        gradient_checkpointing: recompute the encoders' activations in backward (less memory, a
            second forward of their blocks; :meth:`LAPSModel.set_gradient_checkpointing`).
        init_from: an exported model folder (or hub id) whose weights start the fit; recorded with the
            hyper-parameters here, loaded by :func:`laps.training.tasks.train` before fitting.
        selection, attention_weight, gumbel_tau: the head's patch selection (``model.selection``);
            the head is built with them (``net``), they are recorded here and checked to agree
            (a LAPS head only).
        pooling: a :class:`VSEModel`'s pooling (``model.pooling``), recorded and, when given, checked
            to agree with its head's.
    """

    def __init__(
        self,
        net: DualEncoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        backbone_lr_mult: float = 0.1,
        margin: float = 0.2,
        ratio_weight: float = 2.0,
        pooled_weight: float = 0.0,
        vse_mean_warmup_epochs: int = 1,
        embedding_warmup_epochs: int = 0,
        max_nonfinite_steps: int = 10,
        eval_image_block: int = 128,
        save_sims: bool = False,
        gradient_checkpointing: bool = False,
        init_from: str | None = None,
        selection: str = "topk",
        attention_weight: float = 0.8,
        gumbel_tau: float = 1.0,
        pooling: str | None = None,
    ) -> None:
        super().__init__()
        if not pooled_weight >= 0:
            raise ValueError(f"model.pooled_weight must be >= 0, got {pooled_weight}")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        head = net.head
        laps_head = isinstance(head, LAPSHead)
        if laps_head and (head.selection, head.attention_weight, head.gumbel_tau) != (
            selection, attention_weight, gumbel_tau
        ):
            raise ValueError(
                f"model.selection={selection!r} (attention_weight={attention_weight}, gumbel_tau={gumbel_tau}) "
                f"disagrees with the head's {head.selection!r}: set them through model.selection, not model.net"
            )
        if not laps_head and pooling is not None and getattr(head, "pooling", None) != pooling:
            raise ValueError(f"model.pooling={pooling!r} disagrees with the head's {getattr(head, 'pooling', None)!r}: "
                             "set it through model.pooling, not model.net")
        # the weight of the pooled loss in training: a vse model's main loss is that loss already
        self.pooled_weight = float(pooled_weight) if laps_head else 0.0
        if pooled_weight > 0 and not laps_head:
            log.warning("model.pooled_weight=%s is ignored: a %s scores pooled vectors already",
                        pooled_weight, type(net).__name__)
        self.net = net
        if gradient_checkpointing:
            net.set_gradient_checkpointing(True)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.nonfinite_steps = 0
        self._nonfinite_in_a_row = 0
        self.config_snapshot: dict[str, Any] | None = None
        self.output_dir: Path | None = None
        self.test_metrics: dict[str, float] = {}
        self.skipped_images: set[str] = set()  # this epoch's, this process's
        self.truncated_captions = 0  # this epoch's training captions cut to dataset.max_words
        self._steps_span: list[float] = []  # this epoch's first step start and last step end (perf_counter)
        self._eval: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ training
    def max_violation(self) -> bool:
        return self.current_epoch >= self.hparams.vse_mean_warmup_epochs

    def warmup_alpha(self, batch_idx: int) -> float:
        if self.current_epoch != self.hparams.embedding_warmup_epochs:
            return 1.0
        n_batches = self.trainer.num_training_batches if self._trainer is not None else 0
        if not n_batches or math.isinf(n_batches):
            return 1.0
        return batch_idx / n_batches

    def gather_batch(self, img: Tensor, cap: Tensor, lens: Tensor, ids: Tensor) -> tuple[Tensor, ...]:
        """Every rank's embeddings (with gradients), lengths and image indices: the global batch."""
        return gather_pairs(img, cap, lens, ids)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if batch.get("skipped"):
            self.skipped_images.update(batch["skipped"])
        self.truncated_captions += int(batch.get("truncated", 0))
        img = self.net.encode_image(batch["images"])
        cap = self.net.encode_text(batch["input_ids"], batch["lengths"])
        img, cap, lens, ids = self.gather_batch(img, cap, batch["lengths"], batch["image_indices"])
        if img.shape[0] < 2:  # every image of the (global) batch was skipped: nothing to contrast
            return None
        sims, mask = self.net.head.similarity(img, cap, lens, return_mask=True)
        hardest = self.max_violation()
        contrastive = contrastive_loss(sims, ids, self.hparams.margin, hardest)
        alpha = self.warmup_alpha(batch_idx)
        loss = alpha * contrastive
        bs = batch["images"].shape[0]
        if mask is not None:  # a head without patch selection (vse) has no ratio to keep
            ratio = ratio_loss(mask, self.net.head.sparse_ratio)
            loss = loss + self.hparams.ratio_weight * ratio
            self.log("train/ratio_loss", ratio, batch_size=bs)
        if self.pooled_weight > 0:
            pooled = contrastive_loss(pooled_similarity(img, cap, lens), ids, self.hparams.margin, hardest)
            loss = loss + alpha * self.pooled_weight * pooled
            self.log("train/pooled_loss", pooled, batch_size=bs)
        # The bar shows the hinge loss itself: train/loss is scaled by the warm-up factor, so it
        # rises through the warm-up epoch while the model improves.
        self.log("train/loss", loss, batch_size=bs)
        self.log("train/contrastive", contrastive, prog_bar=True, batch_size=bs)
        self.log("train/max_violation", float(hardest), batch_size=bs)
        return loss

    def on_train_epoch_start(self) -> None:
        self.skipped_images = set()
        self.truncated_captions = 0
        self._steps_span = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._steps_span:
            self._steps_span = [time.perf_counter()] * 2

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._steps_span[1] = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        if self.skipped_images:
            log.warning("epoch %d: %d unreadable or missing images skipped (dataset.on_bad_image=skip)",
                        self.current_epoch, len(self.skipped_images))
        if self.truncated_captions:
            max_words = getattr(getattr(self.trainer, "datamodule", None), "max_words", "?")
            log.warning("epoch %d: %d training captions truncated to dataset.max_words=%s word pieces",
                        self.current_epoch, self.truncated_captions, max_words)
        # ranks read disjoint shards of the split: the sum counts every skipped image once
        self.log("train/skipped_images", float(len(self.skipped_images)), sync_dist=True, reduce_fx="sum")
        self.log("train/truncated_captions", float(self.truncated_captions), sync_dist=True, reduce_fx="sum")
        if self._steps_span:  # the training steps' wall time, validation excluded; the slowest rank's
            seconds = self._steps_span[1] - self._steps_span[0]
            self.log("train/epoch_time_s", seconds, sync_dist=True, reduce_fx="max")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Gradients are already averaged across ranks here, so every rank takes the same decision.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # one device-to-host sync per step, not one per parameter
        finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if finite:
            self._nonfinite_in_a_row = 0
            return
        for p in self.parameters():
            p.grad = None  # the optimizer then skips every parameter: no state is touched
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        log.warning("non-finite loss or gradient at step %d: step skipped", self.global_step)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        if self._nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self._nonfinite_in_a_row} steps in a row had a NaN/Inf loss or gradient "
                f"(model.max_nonfinite_steps={self.hparams.max_nonfinite_steps}); lower the learning "
                "rate or check the data"
            )

    def configure_optimizers(self) -> Any:
        backbone, rest = [], []
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            (backbone if name.startswith(("vision.backbone.", "text.backbone.")) else rest).append(p)
        optimizer = self.optimizer_factory([{"params": backbone, "lr_mult": self.hparams.backbone_lr_mult},
                                            {"params": rest, "lr_mult": 1.0}])
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group["lr_mult"]
            group["initial_lr"] = group["lr"]
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["laps_config"] = self.config_snapshot
        checkpoint["laps_state"] = {"nonfinite_steps": self.nonfinite_steps, "nonfinite_in_a_row": self._nonfinite_in_a_row}
        checkpoint["laps_rng"] = capture_rng_state()  # tensors and ints only: loads under weights_only
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank saves (all call this hook); each draws its own dropout masks from its own stream
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, checkpoint["laps_rng"])
            checkpoint["laps_rng_ranks"] = ranks

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("laps_state") or {}
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self._nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        # Resuming a fit continues the global random streams (dropout) where the checkpoint left them;
        # testing a checkpoint does not touch them. (Training items carry their own augmentation seeds.)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            ranks = checkpoint.get("laps_rng_ranks") or []
            same_world = len(ranks) == self.trainer.world_size
            restore_rng_state(ranks[self.trainer.global_rank] if same_world else checkpoint.get("laps_rng"))

    # ------------------------------------------------------------------ evaluation
    def _reset_eval(self) -> None:
        self._eval = {"img": [], "img_idx": [], "cap": [], "cap_len": [], "cap_idx": [], "cap_img": []}

    def _eval_step(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        if dataloader_idx == 0:
            self._eval["img"].append(self.net.encode_image(batch["images"]).float())
            self._eval["img_idx"].append(batch["indices"])
        else:
            cap = self.net.encode_text(batch["input_ids"], batch["lengths"]).float()
            self._eval["cap"].append(cap)
            self._eval["cap_len"].append(batch["lengths"])
            self._eval["cap_idx"].append(batch["indices"])
            self._eval["cap_img"].append(batch["image_indices"])

    def _gathered(self) -> tuple[Tensor, ...]:
        """All ranks' embeddings in dataset order, duplicates from sampler padding dropped."""
        e = self._eval
        if not e["img"] or not e["cap"]:
            raise RuntimeError("evaluation saw no images or no captions")
        width = max(c.shape[1] for c in e["cap"])
        width = max_across_ranks(width, e["cap"][0].device)
        img, img_idx = torch.cat(e["img"]), torch.cat(e["img_idx"])
        cap = torch.cat([pad_to(c, width) for c in e["cap"]])
        cap_len, cap_idx, cap_img = torch.cat(e["cap_len"]), torch.cat(e["cap_idx"]), torch.cat(e["cap_img"])
        img, img_idx = gather_no_grad(img), gather_no_grad(img_idx)
        cap, cap_len = gather_no_grad(cap), gather_no_grad(cap_len)
        cap_idx, cap_img = gather_no_grad(cap_idx), gather_no_grad(cap_img)
        img_order, cap_order = _first_of_each(img_idx), _first_of_each(cap_idx)
        img, img_idx = img[img_order], img_idx[img_order]
        cap, cap_len, cap_img = cap[cap_order], cap_len[cap_order], cap_img[cap_order]
        return _matched(img, img_idx, cap, cap_len, cap_img)

    def _score_split(self, prefix: str, protocol: str) -> dict[str, float]:
        img, cap, cap_len, cap_img = self._gathered()
        self._reset_eval()
        sims = score_matrix(
            self.net.head, img, cap, cap_len, image_block=self.hparams.eval_image_block,
            progress=self.trainer.is_global_zero if self._trainer is not None else True,
        )
        metrics = protocol_metrics(sims, cap_img.cpu(), protocol, prefix)
        if prefix == "test":
            metrics.update(self._eccv_metrics(sims))
        if self.hparams.save_sims and prefix == "test" and self.output_dir is not None and self.global_rank == 0:
            self._save_sims(sims, cap_img.cpu())
        return metrics

    def _test_index(self) -> SplitIndex | None:
        """The test split's image index, when the data module has one and every pair was scored."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return datamodule.split_index("test") if hasattr(datamodule, "split_index") else None

    def _eccv_metrics(self, sims: Tensor) -> dict[str, float]:
        """ECCV Caption and CxC figures (``dataset.eccv``); in ``auto`` mode a split that is not theirs
        (or a partial evaluation) is skipped with a warning."""
        datamodule = self.trainer.datamodule
        mode = datamodule.eccv_mode() if hasattr(datamodule, "eccv_mode") else "off"
        if mode == "off":
            return {}
        index = self._test_index()
        try:
            if tuple(sims.shape) != (index.num_images, index.num_captions):
                raise EccvSplitMismatch(f"only {sims.shape[0]} x {sims.shape[1]} of the split's "
                                        f"{index.num_images} x {index.num_captions} pairs were scored")
            return split_eccv_metrics(sims, index.image_ids, index.caption_image)
        except EccvSplitMismatch as err:
            if mode == "required":
                raise
            log.warning("ECCV Caption and CxC skipped: %s", err)
            return {}

    def _save_sims(self, sims: Tensor, cap_to_img: Tensor) -> None:
        """``sims_test.pt`` (the matrix with the dataset, split and image ids it belongs to) and the
        official ``results_{dataset}.npy`` in the run folder (``laps-eval sims=`` reads both)."""
        datamodule = self.trainer.datamodule
        index = self._test_index()
        complete = index is not None and tuple(sims.shape) == (index.num_images, index.num_captions)
        name = getattr(datamodule, "name", "dataset")
        folder = Path(self.output_dir)
        torch.save({"sims": sims, "cap_to_img": cap_to_img, "dataset": name,
                    "split": datamodule.splits["test"] if complete else None,
                    "image_ids": list(index.image_ids) if complete else None}, folder / "sims_test.pt")
        save_official_results(folder / f"results_{name}.npy", sims.float().numpy())
        log.info("similarity matrix saved to %s (and results_%s.npy, the official format)",
                 folder / "sims_test.pt", name)

    def on_validation_epoch_start(self) -> None:
        self._reset_eval()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._reset_eval()
            return
        metrics = self._score_split("val", "f30k")
        self.log_dict(metrics, sync_dist=False)

    def on_test_epoch_start(self) -> None:
        self._reset_eval()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        protocol = getattr(self.trainer.datamodule, "protocol", "f30k")
        metrics = self._score_split("test", protocol)
        self.test_metrics = metrics
        self.log_dict(metrics, sync_dist=False)


def _matched(img: Tensor, img_idx: Tensor, cap: Tensor, cap_len: Tensor, cap_img: Tensor) -> tuple[Tensor, ...]:
    """Keep the images and captions that can be ranked (partial runs such as ``limit_val_batches``).

    Returns the image embeddings, caption embeddings, lengths, and each caption's row in the images.
    """
    row_of = torch.full((int(max(img_idx.max(), cap_img.max())) + 1,), -1, dtype=torch.long, device=img_idx.device)
    row_of[img_idx] = torch.arange(img_idx.numel(), device=img_idx.device)
    cap_row = row_of[cap_img]
    has_image = cap_row >= 0
    has_caption = torch.zeros(img_idx.numel(), dtype=torch.bool, device=img_idx.device)
    has_caption[cap_row[has_image]] = True
    if bool(has_image.all()) and bool(has_caption.all()):
        return img, cap, cap_len, cap_row
    log.warning(
        "partial evaluation: %d of %d captions and %d of %d images can be ranked (the rest lack their pair)",
        int(has_image.sum()), has_image.numel(), int(has_caption.sum()), has_caption.numel(),
    )
    new_row = torch.cumsum(has_caption.long(), 0) - 1
    return img[has_caption], cap[has_image], cap_len[has_image], new_row[cap_row[has_image]]


def _first_of_each(indices: Tensor) -> Tensor:
    """Positions that sort ``indices`` ascending, keeping the first occurrence of each value."""
    order = torch.argsort(indices, stable=True)
    sorted_idx = indices[order]
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return order[keep]
