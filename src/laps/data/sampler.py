"""The resumable training order.

:class:`SeededShuffleSampler` -- a permutation drawn from ``(seed, epoch)`` alone (``DistributedSampler``'s)
and a seed per item for its augmentation, with an iterator whose state (epoch, position) a
``StatefulDataLoader`` saves, so a restart deals the rest of the interrupted epoch exactly, with the same
augmentation, whatever the number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler

__all__ = ["SeededShuffleSampler"]


class SeededShuffleSampler(DistributedSampler):
    """The training order: a permutation drawn from ``seed + epoch`` alone, this rank's share of it, and
    a seed for each item.

    The order is exactly :class:`torch.utils.data.DistributedSampler`'s with ``shuffle=True`` (what
    Lightning itself would set on several processes: same seed, padding and rank stride; on one process,
    the whole permutation). With ``item_seeds=True`` it yields ``(index, item_seed)`` pairs, the item seeds
    drawn from ``seed + epoch`` too (one per dataset index): :class:`laps.data.datasets.PairDataset` draws an
    item's augmentation from its seed alone, so it is the same in the main process and in DataLoader
    workers, before and after a restart.

    Its iterator is resumable: the state is the epoch and the number of items handed out, so a
    :class:`torchdata.stateful_dataloader.StatefulDataLoader` restored from a checkpoint continues the
    interrupted epoch where it stopped. (Lightning re-creates the training iterator when it resumes
    *before* it calls ``set_epoch``; without the epoch in the state the resumed epoch would be dealt in
    epoch 0's order.) It draws nothing from the global random generators.
    """

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_last: bool = False, item_seeds: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed),
                         drop_last=drop_last)
        self.item_seeds = bool(item_seeds)

    def __iter__(self) -> Iterator[Any]:
        return _EpochOrder(self)

    def _indices(self, epoch: int) -> list[Any]:
        self.set_epoch(epoch)
        order = list(super().__iter__())
        if not self.item_seeds:
            return order
        g = torch.Generator()
        g.manual_seed((self.seed + epoch) ^ _ITEM_SEED_SALT)
        seeds = torch.randint(0, 2**62, (len(self.dataset),), generator=g).tolist()  # type: ignore[arg-type]
        return [(i, seeds[i]) for i in order]


_ITEM_SEED_SALT = 0x5EED_1AB5


class _EpochOrder(Iterator[Any]):
    """One epoch of a :class:`SeededShuffleSampler`; ``state_dict`` = ``{"epoch", "yielded"}``."""

    def __init__(self, sampler: SeededShuffleSampler) -> None:
        self.sampler = sampler
        self.epoch = int(sampler.epoch)
        self.indices = sampler._indices(self.epoch)
        self.yielded = 0

    def __iter__(self) -> _EpochOrder:
        return self

    def __next__(self) -> Any:
        if self.yielded >= len(self.indices):
            raise StopIteration
        self.yielded += 1
        return self.indices[self.yielded - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.indices = self.sampler._indices(self.epoch)
        self.yielded = int(state["yielded"])
