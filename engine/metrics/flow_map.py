"""Flow-map error of a consistency student against the exact PF-ODE flow of a Gaussian-mixture teacher.

For the analytic `GaussianMixture` the PF-ODE dx/dσ = (x − D(x; σ))/σ has an exact (closed-form) right-hand
side, so its flow Ψ_{σ→σ_end} can be integrated to float64 accuracy (`pf_ode_reference`, RK4 in ln σ). A
consistency function f(x, σ) should equal that flow to the boundary σ_end (docs/spec/cm.md §3: f(x, σ_min) = x with
σ_min = 0.002 in EDM/CMT's ODE, 0.003 in CMPrecond's boundary condition), so

    err(σ) = E_{y ~ p, ε ~ N(0, I)} ‖f(y + σε, σ) − Ψ_{σ→σ_end}(y + σε)‖²     (sum over dimensions)

measures how far the student is from its target at each noise level, with no sampling noise from a second
distribution and no feature extractor in between.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from engine.solvers import pf_ode_reference

__all__ = ["FlowMapError", "flow_map_error", "reference_ode_steps"]


@dataclass(frozen=True)
class FlowMapError:
    """Per-σ mean squared flow-map error and its Monte-Carlo standard error (float64 [S]), and their mean."""
    sigmas: torch.Tensor
    per_sigma: torch.Tensor
    stderr: torch.Tensor
    mean: float

    def as_dict(self) -> dict:
        return {"sigmas": self.sigmas.tolist(), "per_sigma": self.per_sigma.tolist(),
                "stderr": self.stderr.tolist(), "mean": self.mean}


def reference_ode_steps(sigma_from: float, sigma_to: float, steps_per_unit: float = 64.0) -> int:
    """RK4 steps for Ψ_{σ_from→σ_to}: `steps_per_unit` per unit of ln σ (h = 1/64: RK4's O(h⁴) error is far
    below float32 rounding on the mixture teachers; 80 → 0.002 takes 679 steps), at least 8."""
    return max(8, math.ceil(steps_per_unit * math.log(sigma_from / sigma_to)))


@contextlib.contextmanager
def _intra_op_threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def flow_map_error(flow_fn: Callable[..., torch.Tensor], gm, sigmas: Sequence[float], n: int,
                   generator: torch.Generator | None = None, *, sigma_end: float = 0.002,
                   conditional: bool = False, dtype: torch.dtype = torch.float32, device=None,
                   batch_size: int | None = None, ode_steps_per_unit: float = 64.0,
                   num_threads: int | None = 1) -> FlowMapError:
    """E‖flow_fn(x_σ, σ) − Ψ_{σ→σ_end}(x_σ)‖² for each σ in `sigmas`, x_σ = y + σε, y ~ gm (n samples).

    flow_fn: the student with the denoiser signature `f(x, sigma, labels=None)`, in eval mode (a module in
        training mode is refused: CMPrecond's boundary condition holds only in eval mode).
    gm: a `GaussianMixture`; Ψ is integrated in float64 on its exact denoiser.
    sigmas: noise levels ≥ sigma_end. The same n pairs (y, ε) serve every σ (common random numbers), so
        differences between σ's and between students are not masked by sampling noise.
    conditional: draw labels with y and pass them to flow_fn and the teacher (class-conditional flow).
    dtype, device: what flow_fn receives (a float32 network by default). x_σ is rounded to `dtype` before both
        flow_fn and Ψ see it, so an exact flow scores ~0 even when dtype is float32.
    batch_size: flow_fn is called on chunks of this many states (default: all n at once).
    ode_steps_per_unit: RK4 steps of Ψ per unit of ln σ (`reference_ode_steps`).
    num_threads: CPU intra-op threads while the metric runs (restored after). Default 1: the mixture's tensors
        are tiny, and with as many threads as cores, any other load on the machine slows each op ~50× (OpenMP
        barriers). None leaves the setting alone (a large CPU student may want more).
    Draw order (a reproducibility contract): [labels = randint(num_classes, (n,)) if conditional],
    y = gm.sample(n), then ε = randn(y.shape), all from `generator`."""
    with _intra_op_threads(num_threads):
        return _flow_map_error(flow_fn, gm, sigmas, n, generator, sigma_end, conditional, dtype, device,
                               batch_size, ode_steps_per_unit)


def _flow_map_error(flow_fn, gm, sigmas, n, generator, sigma_end, conditional, dtype, device, batch_size,
                    ode_steps_per_unit) -> FlowMapError:
    if isinstance(flow_fn, torch.nn.Module) and flow_fn.training:
        raise ValueError("flow_fn is in training mode; call .eval() first (the consistency boundary "
                         "condition holds only in eval mode)")
    if n < 2:
        raise ValueError(f"need n ≥ 2 samples, got {n}")
    sig = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).tolist()]
    if not sig:
        raise ValueError("sigmas is empty")
    if any(not math.isfinite(s) or s < sigma_end for s in sig):
        raise ValueError(f"every σ must be finite and ≥ sigma_end = {sigma_end}; got {sig}")
    device = torch.device("cpu") if device is None else torch.device(device)
    batch_size = n if batch_size is None else int(batch_size)

    if conditional and gm.num_classes == 0:
        raise ValueError("conditional=True needs a mixture with component classes")
    if conditional:
        y, labels = gm.sample(n, generator=generator, labels=torch.randint(
            gm.num_classes, (n,), generator=generator), return_labels=True)
    else:
        y, labels = gm.sample(n, generator=generator), None
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float64)

    per_sigma, stderr = [], []
    for s in sig:
        x = (y + s * eps).to(dtype)                           # what the student sees …
        x64 = x.to(torch.float64)                             # … and exactly that point for the reference
        if s == sigma_end:
            target = x64                                      # Ψ_{σ→σ} is the identity
        else:
            target = pf_ode_reference(gm, x64, s, sigma_end, reference_ode_steps(s, sigma_end, ode_steps_per_unit),
                                      labels=labels)
        sq = torch.empty(n, dtype=torch.float64)
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(device)
            lb = None if labels is None else labels[i:i + batch_size].to(device)
            out = flow_fn(xb, torch.full((xb.shape[0],), s, dtype=dtype, device=device), lb)
            if out.shape != xb.shape:
                raise ValueError(f"flow_fn returned shape {tuple(out.shape)} for input {tuple(xb.shape)}")
            d = out.detach().to(device="cpu", dtype=torch.float64) - target[i:i + batch_size]
            sq[i:i + batch_size] = d.reshape(d.shape[0], -1).square().sum(dim=1)
        if not torch.isfinite(sq).all():
            raise FloatingPointError(f"flow_fn returned non-finite values at σ = {s}")
        per_sigma.append(sq.mean())
        stderr.append(sq.std() / math.sqrt(n))
    per = torch.stack(per_sigma)
    return FlowMapError(sigmas=torch.tensor(sig, dtype=torch.float64), per_sigma=per,
                        stderr=torch.stack(stderr), mean=float(per.mean()))
