"""A resumable, rank-aware batch order keyed to the step number."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless batches of ``(step, index)`` pairs: step ``k`` is a pure function of ``(seed, k)``.

    Each epoch is a permutation seeded by ``(seed, epoch)``; step ``k`` takes the ``k``-th global batch of
    ``batch_size * world_size`` indices, and this rank takes its ``batch_size`` of them. Starting at
    ``start_step`` (a resumed run) gives exactly the batches an uninterrupted run would have seen.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_step: int = 0,
    ) -> None:
        self.global_batch = batch_size * world_size
        if size < self.global_batch:
            raise ValueError(f"the dataset has {size} items, fewer than one global batch of {self.global_batch}")
        self.size, self.batch_size, self.rank = size, batch_size, rank
        self.seed, self.start_step = seed, start_step
        self.steps_per_epoch = size // self.global_batch

    def batch(self, step: int, perm: torch.Tensor) -> list[tuple[int, int]]:
        j = step % self.steps_per_epoch
        rows = perm[j * self.global_batch : (j + 1) * self.global_batch]
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return [(step, int(i)) for i in mine]

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, epoch, perm = self.start_step, -1, None
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = self.permutation(epoch)
            yield self.batch(step, perm)
            step += 1


class StepIndexed(Dataset):
    """Wraps a dataset so that ``(step, index)`` returns the item with its ``step`` attached."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        step, index = key
        return {**self.dataset[index], "step": step}
