"""Resumable data order: which images a step sees is a pure function of (seed, global image position), so a
resumed run needs to save only the image count (STYLE.md: resume by rerunning the same command).

The stream is an endless sequence of epochs; epoch e is a permutation of the dataset drawn from a generator seeded
with (seed, e). A global batch of B images starting at position p takes stream entries p … p+B−1; with W ranks,
rank r takes the contiguous share p + r·B/W … p + (r+1)·B/W − 1, so that the concatenation over ranks is the same
global batch at any W, row for row — the rows each rank's noise is drawn for (engine.objectives.base.StepRNG)."""
from __future__ import annotations

import hashlib

import torch

from engine.errors import EngineError


class ResumableSampler:
    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_items, self.seed, self.shuffle = int(num_items), int(seed), shuffle
        self._cache: dict[int, torch.Tensor] = {}

    def _epoch(self, e: int) -> torch.Tensor:
        if e not in self._cache:
            if not self.shuffle:
                perm = torch.arange(self.num_items)
            else:
                s = int.from_bytes(hashlib.sha256(f"{self.seed}/epoch/{e}".encode()).digest()[:8], "little") >> 1
                perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(s))
            self._cache = {e: perm}  # keep one epoch: positions only move forward
        return self._cache[e]

    def indices(self, position: int, count: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Dataset indices of this rank's share of the global batch [position, position + count)."""
        if count % world_size:
            raise ValueError(f"a global batch of {count} images cannot be split evenly over {world_size} ranks")
        share = count // world_size
        out = []
        for k in range(position + rank * share, position + (rank + 1) * share):
            e, i = divmod(k, self.num_items)
            out.append(int(self._epoch(e)[i]))
        return torch.tensor(out, dtype=torch.long)


class TensorSource:
    """An in-memory dataset (digits, Gaussian-mixture samples, synthetic latents): images [N, ...] and optional
    integer labels [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> dict:
        """What the data is (engine/checkpoints/identity.py): a hash of the tensors themselves."""
        from engine.checkpoints.identity import tensor_fingerprint
        return {"tensors": list(self.images.shape), "sha256": tensor_fingerprint(self.images, self.labels)}

    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.images[idx]
        y = None if self.labels is None else self.labels[idx]
        if torch.device(device).type == "cuda":  # from pinned memory the copy is asynchronous; from pageable, a sync
            x = x.pin_memory()
            y = None if y is None else y.pin_memory()
        return x.to(device, non_blocking=True), None if y is None else y.to(device, non_blocking=True)


class ImageDatasetSource:
    """An EDM-format dataset on disk (`engine.data.ImageDataset`): uint8 images become floats in [−1, 1], one-hot
    labels become class indices. Reads the batch's files directly (the sampler, not a DataLoader, owns order)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> dict:
        return _dataset_fingerprint(self.dataset)

    def batch(self, idx: torch.Tensor, device):
        from engine.data.image_dataset import uint8_to_float
        items = [self.dataset[int(i)] for i in idx]
        x = uint8_to_float(torch.stack([torch.as_tensor(im) for im, _ in items])).to(device)
        if not self.dataset.has_labels:
            return x, None
        y = torch.stack([torch.as_tensor(lab) for _, lab in items]).argmax(dim=1).to(device)
        return x, y


class LatentSource:
    """A latent dataset on disk (`ImageDataset` over EDM2 `.npy` members): items are the VAE posterior moments
    float32 [2·C, H, W] (mean, then std); the objective draws the posterior sample (engine/objectives/latent.py),
    so each step sees a fresh one from the step's own random stream. One-hot labels become class indices."""

    def __init__(self, dataset):
        if not getattr(dataset, "is_latent", False):
            raise EngineError(f"{dataset.path} holds images, not .npy latents; use ImageDatasetSource")
        if dataset.num_channels % 2:
            raise EngineError(f"{dataset.path}: latents have {dataset.num_channels} channels; the EDM2 format "
                             f"stores mean and std, an even number (8 for the SD VAE)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> dict:
        return _dataset_fingerprint(self.dataset)

    def batch(self, idx: torch.Tensor, device):
        items = [self.dataset[int(i)] for i in idx]
        x = torch.stack([torch.from_numpy(m) for m, _ in items]).to(device)
        if not self.dataset.has_labels:
            return x, None
        y = torch.stack([torch.as_tensor(lab) for _, lab in items]).argmax(dim=1).to(device)
        return x, y


class Subset:
    """The items `indices` of another source, in that order (a held-out split: engine/pipelines/latent_vgg.py)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, torch.as_tensor(indices, dtype=torch.long)
        if self.indices.numel() == 0:
            raise ValueError("an empty subset")

    def __len__(self) -> int:
        return len(self.indices)

    def fingerprint(self) -> dict:
        import hashlib
        return {"of": self.source.fingerprint(), "items": len(self.indices),
                "indices_sha256": hashlib.sha256(self.indices.numpy().tobytes()).hexdigest()}

    def batch(self, idx: torch.Tensor, device):
        return self.source.batch(self.indices[idx.cpu()], device)


def _dataset_fingerprint(dataset) -> dict:
    """A dataset on disk: its file's size and index hash (engine/checkpoints/identity.py) and what of it is used."""
    from engine.checkpoints.identity import dataset_fingerprint
    return {**dataset_fingerprint(dataset.path), "items": len(dataset), "labels": bool(dataset.has_labels),
            "xflip": bool(getattr(dataset, "xflip", False))}
