"""DataLoaders: a resumable shuffled shard per rank for training, a disjoint unpadded shard for evaluation."""
from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .distributed import DistInfo

__all__ = ["ResumableSampler", "build_train_loader", "build_eval_loader"]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed + epoch, one shard per rank) that can start mid-epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Epoch ``epoch``, skipping its first ``start`` samples of this rank (resume after pre-emption)."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def build_train_loader(dataset: Dataset, batch_size: int, dist: DistInfo, seed: int, num_workers: int,
                       drop_last: bool, pin_memory: bool) -> tuple[DataLoader, ResumableSampler, torch.Generator]:
    """The loader draws worker seeds from its own generator (re-seeded each epoch), never from the global
    RNG, so a run resumed mid-epoch sees the same dropout masks as an uninterrupted one."""
    sampler = ResumableSampler(dataset, dist.world_size, dist.rank, seed=seed, drop_last=False)
    generator = torch.Generator()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=drop_last, generator=generator,
                        persistent_workers=False, worker_init_fn=_ignore_interrupts)
    return loader, sampler, generator


def build_eval_loader(dataset: Dataset, batch_size: int, dist: DistInfo, num_workers: int,
                      pin_memory: bool) -> DataLoader:
    shard = dataset if not dist.enabled else Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=_ignore_interrupts)


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: workers leave it to the main process, which checkpoints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
