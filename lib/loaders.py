"""DataLoaders: each rank's share of the global training batches (resumable), a disjoint unpadded eval shard."""
from __future__ import annotations

import math
import random
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .distributed import DistInfo

__all__ = ["GlobalBatchSampler", "SeededIndices", "SeededSamples", "sample_seed", "build_train_loader",
           "build_eval_loader"]


class GlobalBatchSampler(Sampler[int]):
    """This rank's share of the global batches one process would draw: the recipe does not depend on N.

    Each epoch's permutation (seeded by ``seed + epoch``) is cut into global batches of ``batch_size``;
    rank r takes the r-th contiguous slice of each. So N processes train on exactly the images, in the
    same optimizer steps, as one process with the same seed and batch. ``drop_last`` drops an incomplete
    last global batch (the official loader's behaviour); otherwise it is split as evenly as possible
    (padded from the epoch's start if it has fewer images than processes). ``set_position`` resumes
    mid-epoch after ``start_step`` steps.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int,
                 drop_last: bool) -> None:
        if batch_size % world_size:
            raise ValueError(f"the global batch {batch_size} does not divide among {world_size} processes")
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.drop_last = seed, drop_last
        self.epoch = self.start_step = 0

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch (the same for every number of processes)."""
        return self.num_samples // self.batch_size if self.drop_last else math.ceil(self.num_samples / self.batch_size)

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def global_batches(self) -> list[list[int]]:
        """Every global batch of the current epoch, in order (from step 0)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, self.steps * self.batch_size, self.batch_size)]
        if batches and len(batches[-1]) < self.world_size:
            batches[-1] += order[:self.world_size - len(batches[-1])]
        return batches

    def _share(self, batch: list[int]) -> list[int]:
        size, extra = divmod(len(batch), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return batch[start:start + size + (self.rank < extra)]

    def __iter__(self) -> Iterator[int]:
        for batch in self.global_batches()[self.start_step:]:
            yield from self._share(batch)

    def __len__(self) -> int:
        return sum(len(self._share(b)) for b in self.global_batches()[self.start_step:])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s random transform in ``epoch``: the same for any process count or worker."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % 2 ** 63


class SeededIndices(Sampler[tuple[int, int]]):
    """A ``GlobalBatchSampler``'s indices, each paired with its ``sample_seed`` (for ``SeededSamples``)."""

    def __init__(self, sampler: GlobalBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.sampler:
            yield index, sample_seed(self.sampler.seed, self.sampler.epoch, index)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(Dataset):
    """``dataset[index]`` with torch's CPU, numpy's and Python's RNG seeded by the sample's own seed and
    restored afterwards: a random augmentation depends on (seed, epoch, image) only, not on which (persistent)
    worker loads it or on what ran before, and the process's own streams (dropout) are left as they were."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        torch.default_generator.manual_seed(seed)  # the CPU generator only: GPU streams are not touched
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


def build_train_loader(dataset: Dataset, batch_size: int, dist: DistInfo, seed: int, num_workers: int,
                       drop_last: bool, pin_memory: bool) -> tuple[DataLoader, GlobalBatchSampler]:
    """Training batches for this rank; ``batch_size`` is the global batch (each of N processes takes 1/N).

    Position the sampler (``set_position``) before each epoch. Workers persist across epochs; every
    sample's random transform is seeded by (seed, epoch, index) (``SeededSamples``), so a run resumed at
    any step sees the same images as an uninterrupted one, and the loader never draws from the global RNG.
    """
    sampler = GlobalBatchSampler(len(dataset), batch_size, dist.world_size, dist.rank, seed, drop_last)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(SeededSamples(dataset), batch_size=batch_size // dist.world_size,
                        sampler=SeededIndices(sampler), num_workers=num_workers, pin_memory=pin_memory,
                        generator=generator, persistent_workers=num_workers > 0, worker_init_fn=_ignore_interrupts)
    return loader, sampler


def build_eval_loader(dataset: Dataset, batch_size: int, dist: DistInfo, num_workers: int,
                      pin_memory: bool) -> DataLoader:
    """This rank's disjoint, unpadded shard of the split, in order (workers persist across evaluations)."""
    shard = dataset if not dist.enabled else Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, worker_init_fn=_ignore_interrupts)


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: workers leave it to the main process, which checkpoints."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
