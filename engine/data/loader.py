"""The batches a stage's steps consume, read ahead of the training process.

Step k of a stage that starts at data position p₀ reads this rank's share of the global batch
[p₀ + k·n, p₀ + (k + 1)·n) — `ResumableSampler.indices(p₀ + k·n, n, rank, world)` — through its source's
`batch(indices, 'cpu')`. With `workers = 0` that happens in the training process when the step asks for it (what
the loop always did); with `workers > 0` a `torch.utils.data.DataLoader` runs the same reads in `workers` processes,
`prefetch` batches each ahead, into pinned memory when the device is a GPU, and the loop copies them to the device
without blocking. Either way step k gets the same tensors: the read-ahead changes when a batch is read, never which
one, so runs stay bit-identical and resume exactly (tests/test_data_loader.py).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from engine.data.sampler import ResumableSampler
from engine.errors import EngineError


class _Failed:
    """A worker's read that raised an error about the input (module docstring): the exception, pickled back."""

    def __init__(self, error: BaseException):
        self.error = error


class _StepBatches(Dataset):
    """Item k = step k's (images, labels) on the CPU."""

    def __init__(self, source, sampler: ResumableSampler, start: int, n: int, rank: int, world: int, steps: int):
        self.source, self.sampler, self.start, self.n = source, sampler, start, n
        self.rank, self.world, self.steps = rank, world, steps

    def __len__(self) -> int:
        return self.steps

    def read(self, k: int, device):
        position = self.start + k * self.n
        idx = self.sampler.indices(position, self.n, self.rank, self.world)
        if hasattr(self.source, "batch_at"):   # a source whose draws follow the stream position (captions)
            share = self.n // self.world
            positions = position + self.rank * share + torch.arange(share)
            return self.source.batch_at(idx, positions, device)
        return self.source.batch(idx, device)

    def __getitem__(self, k: int):            # in a worker: CPU tensors, no labels as an empty tensor
        try:
            images, labels = self.read(k, "cpu")
        except (EngineError, OSError) as e:   # pickled as (type, args): no worker frames travel
            return _Failed(e)
        return images, (labels if labels is not None else torch.empty(0))


def reads_files(source) -> bool:
    """Whether a source decodes files per batch (then workers pay), rather than slicing tensors in memory."""
    return hasattr(source, "dataset") or hasattr(getattr(source, "source", None), "dataset")


class BatchStream:
    """`next()` → step k's (images, labels) on `device`, k = 0, 1, … `steps` − 1 (module docstring)."""

    def __init__(self, source, sampler: ResumableSampler, start: int, n: int, rank: int, world: int, steps: int,
                 device: torch.device, workers: int = 0, prefetch: int = 2):
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers must be ≥ 0 and prefetch ≥ 1, got {workers}, {prefetch}")
        self.device, self.workers = torch.device(device), int(workers)
        self._items = _StepBatches(source, sampler, start, n, rank, world, steps)
        self._k, self._it = 0, None
        if self.workers:
            self._loader = DataLoader(self._items, batch_size=None, shuffle=False, num_workers=self.workers,
                                      pin_memory=self.device.type == "cuda", prefetch_factor=prefetch,
                                      persistent_workers=False)
            self._it = iter(self._loader)

    def next(self):
        if self._k >= len(self._items):
            raise StopIteration("the stage's batches are used up")
        if self._it is None:                  # in the training process, straight to the device (as the loop was)
            self._k += 1
            return self._items.read(self._k - 1, self.device)
        item = next(self._it)
        self._k += 1
        if isinstance(item, _Failed):
            raise item.error
        images, labels = item
        blocking = not (self.workers and self.device.type == "cuda")
        images = images.to(self.device, non_blocking=not blocking)
        move = lambda t: t.to(self.device, non_blocking=not blocking)
        if isinstance(labels, (tuple, list)):     # several conditioning tensors (captions and REPA targets)
            return images, tuple(move(t) for t in labels)
        return images, (None if labels.numel() == 0 else move(labels))  # none: empty

    def close(self) -> None:
        """Stop the workers (a stage that ends early — a signal, an error — leaves none behind)."""
        self._it = self._loader = None
