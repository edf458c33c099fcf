"""Dropout whose random stream can be pinned to an explicit generator.

Consistency training evaluates the student twice per step — at x_t with gradients and at x_r as the
stop-gradient target — and the reference makes both passes draw the *same* dropout masks by saving and restoring
the CUDA RNG state (docs/spec/cm.md §4.1 step 4–5). We do it with an explicit generator on any device:

    with dropout_generator(seed, device):   s_t = net(x_t, t)
    with dropout_generator(seed, device):   s_r = net(x_r, r)     # identical masks

Outside such a block dropout falls back to PyTorch's global RNG (`F.dropout`), as EDM's layers do. Label dropout
(classifier-free guidance) draws from the same generator."""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

_GENERATOR: contextvars.ContextVar[torch.Generator | None] = contextvars.ContextVar("dropout_generator",
                                                                                      default=None)


@contextlib.contextmanager
def dropout_generator(seed: int, device: torch.device | str = "cpu"):
    """Route every dropout draw inside the block through a fresh generator seeded with `seed`."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    token = _GENERATOR.set(g)
    try:
        yield g
    finally:
        _GENERATOR.reset(token)


_STREAM: contextvars.ContextVar = contextvars.ContextVar("step_stream", default=None)


@contextlib.contextmanager
def step_stream(rng):
    """Route the per-sample random draws of a distance or network inside the block (the augmentation of
    E-LatentLPIPS, engine/elatentlpips.py) through the step's random stream `rng` (engine.objectives.base.StepRNG,
    or anything with its `rand(shape, device, dtype)` / `randn(...)`): its draws are those of the global batch,
    sliced for this rank, so they replay on resume and do not depend on the world size."""
    token = _STREAM.set(rng)
    try:
        yield rng
    finally:
        _STREAM.reset(token)


def pinned_stream():
    """The stream pinned by `step_stream`, else None."""
    return _STREAM.get()


def pinned_generator(device) -> torch.Generator | None:
    """The generator pinned by `dropout_generator` when it is on `device`'s type, else None (the global RNG): what
    other per-step random draws inside a network or a distance use (the augmentation of E-LatentLPIPS,
    engine/elatentlpips.py), so that they replay with the step."""
    g = _GENERATOR.get()
    return g if g is not None and g.device.type == torch.device(device).type else None


def uniform(shape, device, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) draws from the pinned generator when one is active, else from the global RNG."""
    g = _GENERATOR.get()
    if g is not None and g.device.type != torch.device(device).type:
        raise RuntimeError(f"dropout generator is on {g.device} but the tensor is on {device}")
    return torch.rand(shape, generator=g, device=device, dtype=dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout semantics (zero with probability p, scale survivors by 1/(1−p))."""
    if not training or p == 0:
        return x
    if _GENERATOR.get() is None:
        return F.dropout(x, p=p, training=True)
    keep = uniform(x.shape, x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)
