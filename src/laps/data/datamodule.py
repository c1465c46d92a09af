"""The LightningDataModule: official-layout datasets (Flickr30K, MS-COCO, synthetic) for training and retrieval."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from laps.data.datasets import CaptionDataset, ImageDataset, PairDataset, check_on_bad_image
from laps.data.sampler import SeededShuffleSampler
from laps.data.splits import SplitIndex, load_split
from laps.data.tokenization import CaptionTokenizer
from laps.data.transforms import build_transform
from laps.eccv import caption_ids_of, line_image_ids
from laps.models.backbones import TEXT_ENCODER

log = logging.getLogger(__name__)


class LAPSDataModule(LightningDataModule):
    """Training pairs and, for validation/test, two loaders: every image once, then every caption.

    Args:
        name: dataset name (``f30k``, ``coco``, ``synthetic``), for logs.
        root: the dataset folder in the official layout.
        images_dir: images folder, relative to ``root`` or absolute.
        id_mapping: ``id_mapping.json`` relative to ``root``.
        train_split, val_split, test_split: split names (``{split}_caps.txt``/``{split}_ids.txt``).
        protocol: ``f30k`` (one matrix) or ``coco`` (5K plus the 5-fold 1K mean) for the test split.
        eccv: ECCV Caption and CxC figures of the test split (``coco`` only, :mod:`laps.eccv`): ``None``
            when the split is ECCV Caption's COCO 5K test set (else a warning, and they are skipped),
            ``True`` required (another split is refused when the test split is set up), ``False`` off.
        image_size: side of the square input images.
        tokenizer: hub name or folder of a BERT WordPiece vocabulary.
        max_words: word pieces kept per caption ([CLS]/[SEP] excluded).
        size_augment: the official word-level size augmentation on training captions.
        batch_size: training batch per device; eval_batch_size: evaluation batch per device.
        on_bad_image: ``error`` or ``skip`` for missing/unreadable images.
        image_mean, image_std: the backbone's image normalisation (default ImageNet's).
        synthetic: generator parameters; when given, the dataset is generated into ``root`` if missing.
        seed: seed of the training order (default: the seed of ``seed_everything``, ``PL_GLOBAL_SEED``).

    The training loader is a :class:`torchdata.stateful_dataloader.StatefulDataLoader`: Lightning stores
    its position in every checkpoint and a resumed run continues the interrupted epoch with the same
    batches. Its order is :class:`laps.data.sampler.SeededShuffleSampler` (a function of
    ``seed`` and the epoch only, this rank's share of it on several processes).
    """

    def __init__(
        self,
        name: str,
        root: str,
        images_dir: str = "images",
        id_mapping: str = "id_mapping.json",
        train_split: str = "train",
        val_split: str = "dev",
        test_split: str = "test",
        protocol: str = "f30k",
        image_size: int = 224,
        tokenizer: str = TEXT_ENCODER,
        max_words: int = 90,
        size_augment: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 128,
        num_workers: int = 4,
        pin_memory: bool = True,
        on_bad_image: str = "error",
        synthetic: dict[str, Any] | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        seed: int | None = None,
        eccv: bool | None = None,
    ) -> None:
        super().__init__()
        check_on_bad_image(on_bad_image)
        if batch_size < 2:
            raise ValueError(f"dataset.batch_size must be at least 2 (the contrastive loss needs negatives), got {batch_size}")
        self.name = name
        self.root = Path(root).expanduser()
        self.images_dir = images_dir
        self.id_mapping = id_mapping
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.protocol = protocol
        self.image_size = image_size
        self.tokenizer_name = tokenizer
        self.max_words = max_words
        self.size_augment = size_augment
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.on_bad_image = on_bad_image
        self.synthetic = dict(synthetic) if synthetic else None
        self.image_mean = list(image_mean) if image_mean is not None else None
        self.image_std = list(image_std) if image_std is not None else None
        self.seed = seed
        self._resume_epoch = 0  # the epoch of the next training batch, from a checkpoint (load_state_dict)
        self.eccv = eccv
        self._tokenizer = None
        self._sets: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from laps.data.synthetic import SyntheticParams, ensure_synthetic

            ensure_synthetic(self.root, SyntheticParams(**self.synthetic))
        elif not self.root.is_dir():
            raise FileNotFoundError(
                f"dataset folder {self.root} does not exist: set dataset.root=/path/to/{self.name} "
                "(the official layout: {split}_caps.txt, {split}_ids.txt, id_mapping.json, images)"
            )

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = CaptionTokenizer(self.tokenizer_name, max_words=self.max_words)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _split(self, stage: str):
        if stage not in self._sets:
            self._sets[stage] = load_split(self.root, self.splits[stage], self.images_dir, self.id_mapping)
        return self._sets[stage]

    def split_index(self, stage: str) -> SplitIndex:
        """The image index of the ``stage`` split (``train``, ``val``, ``test``)."""
        return self._split(stage).index

    def eccv_mode(self) -> str:
        """``off``, ``auto`` (computed when the test split is ECCV Caption's) or ``required``."""
        if self.eccv is False or (self.eccv is None and self.protocol != "coco"):
            return "off"
        return "required" if self.eccv else "auto"

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), None: ("train", "val", "test")}
        for s in wanted.get(stage, ()):
            self._split(s)
        if self.eccv_mode() == "required" and "test" in wanted.get(stage, ()):
            index = self.split_index("test")  # another split: refused before anything is scored
            caption_ids_of(line_image_ids(index.image_ids, index.caption_image))

    # ------------------------------------------------------------------ loaders
    def _worker_options(self) -> dict[str, Any]:
        """The DataLoader options every loader shares: workers and pinned memory."""
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.num_workers > 0}

    def _loader(self, dataset, batch_size: int, collate) -> DataLoader:
        """An evaluation loader: in order, nothing dropped. Its own generator: an iterator of a loader
        without one draws its base seed from the global generator, which would move the training's
        random stream (dropout) by one draw per validation, and differently in a resumed run."""
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                          generator=torch.Generator().manual_seed(0), **self._worker_options())

    def train_dataloader(self) -> DataLoader:
        ds = PairDataset(
            self._split("train"), self.tokenizer, image_size=self.image_size,
            transform=build_transform(self.image_size, True, self.image_mean, self.image_std),
            augment=self.size_augment, on_bad_image=self.on_bad_image,
        )
        if len(ds) < self.batch_size:
            raise ValueError(
                f"the {self.splits['train']} split has {len(ds)} captions, fewer than dataset.batch_size={self.batch_size}"
            )
        import warnings

        from torchdata.stateful_dataloader import StatefulDataLoader

        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata 0.11 on torch 2.9+

        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Lightning's DistributedSampler order (seed + epoch, this rank's share), resumable mid-epoch; as a
        # DistributedSampler it is kept as it is on several processes. Each item comes with its own seed for
        # its augmentation (any number of workers); nothing here draws from the global generators, so a
        # resumed run continues their stream (dropout) exactly.
        sampler = SeededShuffleSampler(ds, num_replicas=world, rank=rank, seed=seed, item_seeds=True)
        # A run resumed at an epoch's end creates its first iterator before Lightning sets the epoch
        # and loads no position: the epoch comes from the checkpoint (state_dict), or the next epoch
        # would be dealt in epoch 0's order.
        sampler.set_epoch(self._resume_epoch)
        return StatefulDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=ds.collate,
            **self._worker_options(),
            generator=torch.Generator().manual_seed(seed),  # worker seeds, not the global generator
        )

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        split = self._split(stage)
        transform = build_transform(self.image_size, False, self.image_mean, self.image_std)
        images = ImageDataset(split, transform=transform, image_size=self.image_size, on_bad_image=self.on_bad_image)
        captions = CaptionDataset(split, self.tokenizer)
        return [
            self._loader(images, self.eval_batch_size, images.collate),
            self._loader(captions, self.eval_batch_size * 4, captions.collate),
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def state_dict(self) -> dict[str, int]:
        """``{"train_epoch": E}``: the epoch the next training batch belongs to (the next one once
        this epoch's last batch is dealt)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        dealt = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        return {"train_epoch": int(trainer.current_epoch) + int(dealt)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_epoch = int(state_dict.get("train_epoch", 0))
