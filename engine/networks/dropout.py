"""Dropout whose random stream can be pinned to an explicit generator.

Consistency training evaluates the student twice per step — at x_t with gradients and at x_r as the
stop-gradient target — and the reference makes both passes draw the *same* dropout masks by saving and restoring
the CUDA RNG state (docs/spec/cm.md §4.1 step 4–5). We do it with an explicit generator on any device:

    with dropout_generator(seed, device):   s_t = net(x_t, t)
    with dropout_generator(seed, device):   s_r = net(x_r, r)     # identical masks

Outside such a block dropout falls back to PyTorch's global RNG (`F.dropout`), as EDM's layers do. Label dropout
(classifier-free guidance) draws from the same generator.

Pinning seeds the process's own generators — the CPU one and the device's — for the duration of the block and
restores them after (torch.random.fork_rng), and dropout inside draws `torch.rand(...)` from them. A fresh
generator seeded with s and the default one seeded with s give the same numbers, so the masks are what an explicit
generator gives; and this form compiles: torch.compile traces the global generator's draws into its graphs, and
cannot trace `ContextVar.get` or a `generator=` argument (both graph breaks). engine/training/compiled.py sets
inductor's
`fallback_random`, so compiled blocks draw exactly the eager numbers. Training is single-threaded; nested blocks
restore the outer state on exit, as the outer generator would have continued."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class _Pinned:
    """Plain attributes the blocks read inside a step (dynamo follows them): whether dropout is pinned, and the
    step's random stream."""
    active: bool = False
    stream = None


@contextlib.contextmanager
def dropout_generator(seed: int, device: torch.device | str = "cpu"):
    """Route every dropout draw inside the block through the process's generators seeded with `seed` (module
    docstring); yields the device's generator."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(int(seed))
        g = torch.default_generator
        if cuda:
            g = torch.cuda.default_generators[index]
            g.manual_seed(int(seed))
        outer, _Pinned.active = _Pinned.active, True
        try:
            yield g
        finally:
            _Pinned.active = outer


@contextlib.contextmanager
def step_stream(rng):
    """Route the per-sample random draws of a distance or network inside the block (the augmentation of
    E-LatentLPIPS, engine/perceptual/elatentlpips.py) through the step's random stream `rng`
    (engine.objectives.base.StepRNG,
    or anything with its `rand(shape, device, dtype)` / `randn(...)`): its draws are those of the global batch,
    sliced for this rank, so they replay on resume and do not depend on the world size."""
    outer = _Pinned.stream
    _Pinned.stream = rng
    try:
        yield rng
    finally:
        _Pinned.stream = outer


def pinned_stream():
    """The stream pinned by `step_stream`, else None."""
    return _Pinned.stream


def uniform(shape, device, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) draws from the process's generator (seeded inside a `dropout_generator` block)."""
    return torch.rand(shape, device=device, dtype=dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout semantics (zero with probability p, scale survivors by 1/(1−p))."""
    if not training or p == 0:
        return x
    if not _Pinned.active:
        return F.dropout(x, p=p, training=True)
    keep = uniform(x.shape, x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)
