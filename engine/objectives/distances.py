"""Per-pair distances d(x, y) -> [N] between student outputs and targets.

The reference selects its CMT distance with `--loss_metric` (docs/spec/cm.md §3.1 step 9); its names are misleading,
so ours say what they compute:

    squared_l2(x, y)   Σ_{non-batch} (x − y)²             the reference's 'MSE' (a sum, not a mean)
    l2(x, y)           sqrt(Σ_{non-batch} (x − y)²)        the reference's 'MAE' (an L2 norm, not an absolute error);
                                                           also ECT's distance with c = 0 (docs/spec/cm.md §4.1 step 6)
    pseudo_huber(c)    sqrt(Σ (x − y)² + c²) − c           ECT's distance with c > 0
    perceptual(module) module(x, y) reshaped to [N]        LPIPS (the reference's default) or any learned metric

`resolve_distance` turns a name or a callable into a distance. LPIPS is not available by name: it needs the
VGG16 ImageNet weights and the v0.1 linear heads, which the caller loads (`engine.perceptual.lpips.LPIPS()`, or the
`lpips`
package's `LPIPS(net='vgg')`) and passes as `perceptual(module)` (or directly: any callable is accepted).
"""
from __future__ import annotations

from typing import Callable

import torch

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.shape != y.shape:
        raise ValueError(f"distance between tensors of different shapes {tuple(x.shape)} and {tuple(y.shape)}")
    return (x - y).flatten(1)


def squared_l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over non-batch dims of (x − y)², shape [N] (the reference's 'MSE')."""
    return _diff(x, y).square().sum(dim=1)


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖x − y‖₂ over non-batch dims, shape [N] (the reference's 'MAE').

    `vector_norm` has the same value as sqrt(Σ d²) but a zero (sub)gradient where x == y, where the reference's
    sqrt(Σ d²) back-propagates 0·∞ = NaN (its loop then zeroes NaN gradients; ours stops on them)."""
    return torch.linalg.vector_norm(_diff(x, y), dim=1)


class pseudo_huber:  # noqa: N801 - used like a function: pseudo_huber(c)(x, y)
    """sqrt(Σ (x − y)² + c²) − c, shape [N] (ECT's `c > 0` branch, docs/spec/cm.md §4.1 step 6). A class rather than
    a closure so that its constant shows in logs and reprs."""

    def __init__(self, c: float):
        if not c > 0:
            raise ValueError(f"pseudo-Huber needs c > 0 (c = 0 is the plain L2 norm, `l2`), got {c!r}")
        self.c = float(c)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(_diff(x, y).square().sum(dim=1) + self.c ** 2) - self.c

    def __repr__(self) -> str:
        return f"pseudo_huber({self.c!r})"


class perceptual:  # noqa: N801 - used like a function: perceptual(lpips_module)(x, y)
    """A learned metric `module(x, y) -> [N]` or `[N, 1, 1, 1]` (LPIPS returns the latter) as a per-pair
    distance [N]. The reference feeds LPIPS the raw [−1, 1] tensors, unclamped and not resized
    (docs/spec/cm.md §3.1 step 9, §3.2): so does this wrapper; do any resizing inside `module`."""

    def __init__(self, module: Callable):
        if not callable(module):
            raise TypeError(f"perceptual() needs a callable module (x, y) -> [N], got {type(module).__name__}")
        self.module = module

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _per_pair(self.module(x, y), x.shape[0], self.module)

    def __repr__(self) -> str:
        return f"perceptual({type(self.module).__name__})"


def _per_pair(d: torch.Tensor, n: int, fn) -> torch.Tensor:
    if d.numel() != n:
        raise ValueError(f"distance {fn!r} returned shape {tuple(d.shape)} for {n} pairs; expected [N] or [N,1,1,1]")
    return d.reshape(n)


class _Checked:
    """A user callable whose output is checked and reshaped to [N]."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _per_pair(self.fn(x, y), x.shape[0], self.fn)

    def __repr__(self) -> str:
        return repr(self.fn)


DISTANCES: dict[str, Distance] = {
    "squared_l2": squared_l2,
    "l2": l2,
    "mse": squared_l2,   # the reference's --loss_metric names (docs/spec/cm.md §3.1 step 9, §9 item 7)
    "mae": l2,
}


def resolve_distance(distance) -> Distance:
    """A distance name (`squared_l2`, `l2`, or the reference's `MSE`/`MAE`, case-insensitive) or any callable
    (x, y) -> [N] / [N,1,1,1] → a distance returning [N]."""
    if isinstance(distance, str):
        key = distance.lower()
        if key in DISTANCES:
            return DISTANCES[key]
        if key == "lpips":
            raise ValueError("LPIPS needs its pretrained weights: build the module (engine.perceptual.lpips.LPIPS()) "
                             "and "
                             "pass distance=perceptual(module)")
        raise ValueError(f"unknown distance {distance!r}; known: {', '.join(sorted(DISTANCES))}, "
                         "pseudo_huber(c), perceptual(module) or any callable (x, y) -> [N]")
    if distance in (squared_l2, l2) or isinstance(distance, (pseudo_huber, perceptual)):
        return distance
    if callable(distance):
        return _Checked(distance)
    raise TypeError(f"distance must be a name or a callable (x, y) -> [N], got {type(distance).__name__}")
