"""DataLoaders: a resumable shuffled shard per rank for training, a disjoint unpadded shard for evaluation."""
from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .distributed import DistInfo
from .engine import ResumableSampler

__all__ = ["build_train_loader", "build_eval_loader"]


def build_train_loader(dataset: Dataset, batch_size: int, dist: DistInfo, seed: int, num_workers: int,
                       drop_last: bool, pin_memory: bool) -> Tuple[DataLoader, ResumableSampler, torch.Generator]:
    """The loader draws worker seeds from its own generator (re-seeded each epoch), never from the global
    RNG, so a run resumed mid-epoch sees the same dropout masks as an uninterrupted one."""
    sampler = ResumableSampler(dataset, dist.world_size, dist.rank, seed=seed, drop_last=False)
    generator = torch.Generator()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=drop_last, generator=generator,
                        persistent_workers=False)
    return loader, sampler, generator


def build_eval_loader(dataset: Dataset, batch_size: int, dist: DistInfo, num_workers: int,
                      pin_memory: bool) -> DataLoader:
    shard = dataset if not dist.enabled else Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
