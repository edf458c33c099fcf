"""The 8x8 handwritten digits bundled with scikit-learn: the project's embedded image dataset.

1797 grayscale images with integer intensities 0..16 (UCI "Optical Recognition of Handwritten
Digits", as shipped in `sklearn/datasets/data/digits.csv.gz`), so it needs no download and every
test and tiny recipe can train on real images offline.

    images, labels = digits(resolution=16, split="train")   # float32 [N, 1, 16, 16] in [-1, 1], int64 [N]
    u8, labels = digits_uint8(resolution=32)                  # uint8 [N, 1, 32, 32] for write_image_dataset

Scaling is x / 16 * 2 - 1 = x / 8 - 1, exact in float32: 0 -> -1, 16 -> +1, 17 evenly spaced levels.

Upsampling defaults to nearest (each source pixel becomes an s x s block, s = R / 8): the pixels keep
the 17 levels exactly, the uint8 export is a pure function of them, and the network sees no detail the
data never had. Bilinear (align_corners=False) is available for a smoother image; it is a convex
combination of neighbours, so it stays inside [-1, 1], but its values are no longer on the 17 levels.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .image_dataset import float_to_uint8
from .sampler import TensorSource

__all__ = ["DIGITS_COUNT", "DIGITS_NUM_CLASSES", "digits", "digits_uint8", "digits_source"]

DIGITS_COUNT = 1797
DIGITS_NUM_CLASSES = 10
_SOURCE_RESOLUTION = 8
_SOURCE_MAX = 16  # sklearn stores intensities as integers 0..16
_SPLITS = (None, "train", "test")
_INTERPOLATIONS = ("nearest", "bilinear")


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """uint8 [1797, 8, 8] in 0..16 and int64 [1797], read once per process (sklearn parses a csv.gz)."""
    from sklearn.datasets import load_digits  # local import: only this dataset needs scikit-learn

    bunch = load_digits()
    raw = bunch.images
    # Guard the assumptions the exact scaling rests on, in case a future sklearn changes the bundle.
    if raw.shape != (DIGITS_COUNT, _SOURCE_RESOLUTION, _SOURCE_RESOLUTION) or raw.min() != 0 or raw.max() != _SOURCE_MAX:
        raise RuntimeError(f"sklearn load_digits returned an unexpected array: shape {raw.shape}, range "
                           f"[{raw.min()}, {raw.max()}]")
    if not np.array_equal(raw, np.round(raw)):
        raise RuntimeError("sklearn load_digits returned non-integer intensities")
    images = raw.astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _split_indices(labels: np.ndarray, split: str | None, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the requested split; stratified so both splits keep the ~uniform class balance."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if split is None:
        return np.arange(len(labels))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in range(DIGITS_NUM_CLASSES):  # fixed class order keeps the RNG stream, hence the split, deterministic
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: int(round(test_fraction * len(members)))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    # Sorted, so a split lists images in the bundle's order whatever the permutation was.
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def digits(
    resolution: int = 8,
    *,
    split: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    interpolation: str = "nearest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as (images float32 [N, 1, R, R] in [-1, 1], labels int64 [N] in 0..9).

    resolution: a multiple of 8 (8, 16, 32, ...); 8 is the source, larger values are upsampled.
    split: None for all 1797 images, or "train" / "test" of a split stratified by class, fixed by `seed`
        (same seed, same split; the two splits are disjoint and cover the dataset).
    test_fraction: share of each class that goes to "test" (0.2 -> 359 test, 1438 train images).
    interpolation: "nearest" (exact s x s blocks, default) or "bilinear"; see the module docstring.
    """
    if not isinstance(resolution, int) or resolution < _SOURCE_RESOLUTION or resolution % _SOURCE_RESOLUTION:
        raise ValueError(f"resolution must be a multiple of {_SOURCE_RESOLUTION} (8, 16, 32, ...), got {resolution!r}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    raw, all_labels = _load_raw()
    idx = _split_indices(all_labels, split, test_fraction, seed)

    x = torch.from_numpy(raw[idx]).to(torch.float32).unsqueeze(1)  # [N, 1, 8, 8], 0..16
    x = x / _SOURCE_MAX * 2 - 1  # exact: k / 8 - 1 is representable for k in 0..16
    scale = resolution // _SOURCE_RESOLUTION
    if scale > 1:
        if interpolation == "nearest":
            # repeat_interleave is exact by construction, no resampling arithmetic involved.
            x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        else:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
            x = x.clamp_(-1, 1)  # convex weights keep it in range; clamp only absorbs float rounding
    return x.contiguous(), torch.from_numpy(all_labels[idx].copy())


def digits_uint8(resolution: int = 8, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Digits as (uint8 [N, 1, R, R], int64 [N]) numpy arrays, ready for `write_image_dataset`.

    Same arguments as `digits`. Level k in 0..16 maps to round(k * 255 / 16), so 0 -> 0 and 16 -> 255;
    reading back with x / 127.5 - 1 reproduces `digits` to within 0.5 / 127.5.
    """
    images, labels = digits(resolution, **kwargs)
    return float_to_uint8(images), labels.numpy()


def digits_source(resolution: int = 8, split: str | None = "train") -> TensorSource:
    """The digits of `split` as a training source (images in [−1, 1] with their labels): the embedded recipes'
    data."""
    return TensorSource(*digits(resolution=resolution, split=split))
