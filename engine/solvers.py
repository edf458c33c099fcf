"""Every ODE solve and few-step sampler of the engine, in one place, each with its time variable named.

In σ (EDM's PF-ODE dx/dσ = (x − D(x; σ))/σ; denoisers with the one signature `denoiser(x, sigma, labels=None)
-> x0`, docs/spec/cm.md §1):
  * `dpm_solver_pp` — the CMT teacher (docs/spec/cm.md §2): multistep DPM-Solver++ (data prediction) on α = 1,
    σ_t = t, λ = −ln σ, one denoiser call per step, the whole trajectory returned. Its update is written as
    x_next = a·x + b0·M0 + b1·M1 + b2·M2 so that the fused kernel (kernels/dpm_solver.py) and the PyTorch reference
    beside it compute the same sums from the same float64 coefficients; `engine.ops` picks one;
  * `euler`, `heun` — EDM's deterministic samplers; `pf_ode_reference` — a float64 RK4 oracle;
  * `consistency_sampler` — few-step consistency sampling σ_max → σ_mid → … → 0, re-noising between steps
    (CMT/ECT `generator_fn`, docs/spec/cm.md §3.5).
In t ∈ [0, 1] (t = 1 noise, 0 data; flow maps `u(x_t, r, t)` and velocities `v(x_t, t)`, docs/spec/mf.md §1):
  * `mean_flow_trajectory`, `mean_flow_sampler`, `mean_flow_uniform` — Mean Flow steps
    x_r = x_t − (t − r)·u(x_t, r, t) (the CMT-MF teacher's trajectory, and few-step sampling);
  * `flow_heun_trajectory` — Heun on a flow-matching velocity (the CMT-MF flow-matching teacher).
EDM's Heun in σ and the flow-matching Heun in t are one integrator (`heun_ode`) given dx/dσ or dx/dt.

Every solver runs its state in the input's dtype (float32 for training, float64 for references). Step
coefficients are computed on the host in float64 from the grid; only the state arithmetic happens in the state
dtype. Training, evaluation, recipes and objectives call these functions, so the evaluation protocol cannot
drift from what was trained.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from engine import ops
from engine.errors import EngineError
from engine.schedules import karras_sigmas

Denoiser = Callable[..., torch.Tensor]


# ---- DPM-Solver++ (multistep) ------------------------------------------------------------------------------

def _check_grid(sigmas: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
    if s.numel() < 2:
        raise EngineError(f"a σ grid needs at least 2 points, got {s.numel()}")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise EngineError("DPM-Solver++ needs a finite positive σ grid (λ = −ln σ); got " + str(s.tolist()))
    if not (s[1:] < s[:-1]).all():
        raise EngineError("the σ grid must be strictly decreasing; got " + str(s.tolist()))
    return s


def check_state(x: torch.Tensor, what: str) -> None:
    """A solver's starting state: a floating-point tensor with finite entries. One host synchronisation, so only
    the public entry points check it (the training step's solves do not; the loop flags non-finite values)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise EngineError(f"{what}: the state must be a floating-point tensor, got "
                          f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not bool(torch.isfinite(x).all()):
        raise EngineError(f"{what}: the state has non-finite entries (NaN or inf)")


def _check_times(times, what: str, variable: str = "σ", final_zero: bool = True) -> list[float]:
    """A descending list of finite, non-negative times; 0 only as the last entry (where `final_zero`)."""
    t = [float(v) for v in torch.as_tensor(times, dtype=torch.float64).reshape(-1).tolist()]
    if len(t) < 2 or not all(math.isfinite(v) for v in t) or any(v < 0 for v in t) \
            or any(b >= a for a, b in zip(t[:-1], t[1:])) or (not final_zero and t[-1] <= 0):
        raise EngineError(f"{what}: the {variable} grid must be finite, non-negative and strictly decreasing"
                          f"{'' if final_zero else ', and positive'}, with at least 2 points; got {t}")
    return t


def dpm_solver_orders(num_steps: int, order: int = 3, lower_order_final: bool = True) -> list[int]:
    """Per-step orders: warm-up 1, 2, …; then `order`; and, with lower_order_final, …, 2, 1 at the tail.

    CMT removed upstream's `steps < 10` condition on the tail lowering (docs/spec/cm.md §2.4 ★2), so 16 steps of order 3
    give 1, 2, 3×12, 2, 1. Upstream semantics: pass lower_order_final=(num_steps < 10)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ multistep order must be 1, 2 or 3, got {order!r}")
    n = int(num_steps)
    return [min(order, i, n + 1 - i) if lower_order_final else min(order, i) for i in range(1, n + 1)]


THIRD_ORDER_RULES = ("upstream", "taylor")


def dpm_solver_pp_coefficients(sigmas, order: int = 3, lower_order_final: bool = True,
                               third_order: str = "upstream") -> tuple[torch.Tensor, list[int]]:
    """Float64 coefficients [N, 4] = (a, b0, b1, b2) of x_i = a·x_{i−1} + b0·M_{i−1} + b1·M_{i−2} + b2·M_{i−3},
    and the per-step orders. Derived from docs/spec/cm.md §2.5:

        h = λ_t − λ_s0, r0 = h0/h, r1 = h1/h, φ1 = expm1(−h), φ2 = φ1/h + 1, φ3 = φ2/h − 1/2
        order 1: x = (t/s0)x − φ1 M0
        order 2: x = (t/s0)x − φ1 M0 − ½ φ1 (M0 − M1)/r0
        order 3: D1_0 = (M0−M1)/r0, D1_1 = (M1−M2)/r1, D1 = D1_0 + r0/(r0+r1)(D1_0 − D1_1),
                 D2 = (D1_0 − D1_1)/(r0+r1);   x = (t/s0)x − φ1 M0 + φ2 D1 − φ3 D2
    expanded into weights on M0, M1, M2 (all O(h) for small h, so no cancellation is introduced).

    `third_order="upstream"` is the formula above, the same rule as LuChengTHU/dpm-solver, sony/cmt and
    k-diffusion's 3M. Its D2 estimates h²·x''/2 while the φ3 term needs h²·x'' (Taylor: ∫₀ʰ e^{u−h} u²/2 du =
    −h²φ3), so it is only second order: local error O(h³), global O(h²), with a smaller constant than order 2
    (tests/test_solvers.py measures both slopes). CMT's teacher trajectories use it, so it is the default.
    `third_order="taylor"` doubles D2 and is third order (global slope ≈ 3)."""
    if third_order not in THIRD_ORDER_RULES:
        raise ValueError(f"third_order must be one of {THIRD_ORDER_RULES}, got {third_order!r}")
    d2_scale = 1.0 if third_order == "upstream" else 2.0
    s = _check_grid(sigmas)
    lam = -torch.log(s)
    orders = dpm_solver_orders(len(s) - 1, order, lower_order_final)
    coef = torch.zeros(len(orders), 4, dtype=torch.float64)
    for k, p in enumerate(orders):
        i = k + 1  # target index
        h = (lam[i] - lam[i - 1]).item()
        phi1 = math.expm1(-h)
        coef[k, 0] = s[i] / s[i - 1]
        if p == 1:
            coef[k, 1] = -phi1
        elif p == 2:
            r0 = (lam[i - 1] - lam[i - 2]).item() / h
            coef[k, 1] = -phi1 - 0.5 * phi1 / r0
            coef[k, 2] = 0.5 * phi1 / r0
        else:
            r0 = (lam[i - 1] - lam[i - 2]).item() / h
            r1 = (lam[i - 2] - lam[i - 3]).item() / h
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            c0 = phi2 * (1.0 + r0 / (r0 + r1)) - d2_scale * phi3 / (r0 + r1)   # weight on D1_0
            c1 = -phi2 * r0 / (r0 + r1) + d2_scale * phi3 / (r0 + r1)          # weight on D1_1
            coef[k, 1] = -phi1 + c0 / r0
            coef[k, 2] = -c0 / r0 + c1 / r1
            coef[k, 3] = -c1 / r1
    return coef, orders


@dataclasses.dataclass
class DPMSolverPlan:
    """Everything about a DPM-Solver++ solve that does not depend on the state: the σ grid, the per-step orders
    and float64-derived coefficients (host), and the σ of each denoiser call as a device tensor. Built once per
    grid and device, so that a solve touches the host for nothing (CUDA-graph capture needs exactly that)."""
    sigmas: torch.Tensor          # float64, host, [N + 1]
    orders: list[int]             # [N]
    coefs: list[list[float]]      # [N][(a, b0, b1, b2)]
    call_sigmas: torch.Tensor     # [N] σ_0 … σ_{N−1} on the state's device, in the state's dtype

    @property
    def num_steps(self) -> int:
        return len(self.orders)


def dpm_solver_plan(sigmas, order: int = 3, lower_order_final: bool = True, third_order: str = "upstream",
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DPMSolverPlan:
    s = _check_grid(sigmas)
    coef, orders = dpm_solver_pp_coefficients(s, order, lower_order_final, third_order)
    return DPMSolverPlan(sigmas=s, orders=orders, coefs=coef.tolist(),
                         call_sigmas=s[:-1].to(device=device, dtype=dtype))


@torch.no_grad()
def run_dpm_solver(denoiser: Denoiser, x_T: torch.Tensor, plan: DPMSolverPlan, labels=None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The solve itself (see `dpm_solver_pp`): N denoiser calls and N fused updates, nothing on the host."""
    n = plan.num_steps
    shape = (n + 1, *x_T.shape)
    if out is None:
        out = torch.empty(shape, dtype=x_T.dtype, device=x_T.device)
    elif tuple(out.shape) != shape or out.dtype != x_T.dtype or out.device != x_T.device:
        raise ValueError(f"trajectory buffer must be {shape} {x_T.dtype} on {x_T.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if plan.call_sigmas.device != x_T.device or plan.call_sigmas.dtype != x_T.dtype:
        raise ValueError(f"the plan's σ are {plan.call_sigmas.dtype} on {plan.call_sigmas.device}; the state is "
                         f"{x_T.dtype} on {x_T.device}")
    out[0] = x_T
    history: list[torch.Tensor] = []  # denoiser outputs, newest first, at most 3
    for i in range(1, n + 1):
        sigma = plan.call_sigmas[i - 1].expand(x_T.shape[0])
        history.insert(0, denoiser(out[i - 1], sigma, labels).to(x_T.dtype))
        del history[3:]
        # x_i = a·x_{i−1} + Σ b_j M_j, written straight into its trajectory slot (fused kernel on CUDA).
        ops.dpm_solver_update(out[i - 1], history[:plan.orders[i - 1]], plan.coefs[i - 1], out=out[i])
    return out


def dpm_solver_pp(denoiser: Denoiser, x_T: torch.Tensor, sigmas, order: int = 3, labels=None,
                  lower_order_final: bool = True, third_order: str = "upstream",
                  out: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Integrate the PF-ODE over `sigmas` (descending, positive) with multistep DPM-Solver++.

    Returns the trajectory as one tensor [len(sigmas), *x_T.shape]: entry 0 is x_T, entry N the state at the
    last σ; no final denoising step (docs/spec/cm.md §2.6). Exactly one denoiser call per step, at σ_0 … σ_{N−1}
    (docs/spec/cm.md §2.4). `out` may be a preallocated trajectory buffer of that shape and x_T's dtype.
    `third_order` selects the order-3 rule (see `dpm_solver_pp_coefficients`; the default is CMT's).
    `check`: validate x_T (floating point, finite: one host synchronisation); the training step's own solves pass
    False."""
    if check:
        check_state(x_T, "dpm_solver_pp")
    plan = dpm_solver_plan(sigmas, order, lower_order_final, third_order, x_T.device, x_T.dtype)
    return run_dpm_solver(denoiser, x_T, plan, labels, out)


# ---- EDM's Euler and Heun samplers ---------------------------------------------------------------------------

def _sigma_batch(s: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)


@torch.no_grad()
def euler(denoiser: Denoiser, x_T: torch.Tensor, sigmas, labels=None) -> torch.Tensor:
    """First-order (DDIM-equivalent in σ) steps x ← x + (σ_next − σ)(x − D)/σ; one call per step.
    `sigmas` may end at 0. Returns the trajectory [len(sigmas), *x_T.shape]."""
    check_state(x_T, "euler")
    s = _check_times(sigmas, "euler")
    traj = [x_T]
    x = x_T
    for s_cur, s_next in zip(s[:-1], s[1:]):
        d = (x - denoiser(x, _sigma_batch(s_cur, x), labels).to(x.dtype)) / s_cur
        x = x + (s_next - s_cur) * d
        traj.append(x)
    return torch.stack(traj)


@torch.no_grad()
def heun_ode(derivative: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor,
             times: Sequence[float]) -> torch.Tensor:
    """Heun's method (Euler predictor, trapezoidal corrector) for dx/dτ = derivative(x, τ) through `times`; a step
    that ends at τ = 0 stays Euler (EDM's Algorithm 1; REPA's flow-matching sampler). 2N − 1 derivative calls for N
    steps ending at 0. Returns the trajectory [len(times), *x.shape]."""
    traj = [x]
    for cur, nxt in zip(times[:-1], times[1:]):
        d = derivative(x, cur)
        x_next = x + (nxt - cur) * d
        if nxt > 0:
            x_next = x + (nxt - cur) * (0.5 * d + 0.5 * derivative(x_next, nxt))
        x = x_next
        traj.append(x)
    return torch.stack(traj)


@torch.no_grad()
def heun(denoiser: Denoiser, x_T: torch.Tensor, sigmas, labels=None) -> torch.Tensor:
    """EDM's deterministic sampler (Algorithm 1 with S_churn = 0, docs/spec/cm.md §1.1, docs/spec/mf.md §6.3): Heun
    steps in σ on
    dx/dσ = (x − D(x; σ))/σ, the last step into σ = 0 Euler. Returns the trajectory."""
    check_state(x_T, "heun")
    s = _check_times(sigmas, "heun")
    return heun_ode(lambda x, sigma: (x - denoiser(x, _sigma_batch(sigma, x), labels).to(x.dtype)) / sigma, x_T, s)


@torch.no_grad()
def edm2_sampler(denoiser: Denoiser, z: torch.Tensor, labels=None, num_steps: int = 32, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM2's deterministic sampler (docs/spec/edm2_latent.md §4.1): `heun` from x = σ_max·z over the ρ-grid of
    `num_steps` points and 0, in float32: 2·num_steps − 1 = 63 denoiser calls by default (twice as many network
    evaluations with a GuidedDenoiser). Returns the final sample."""
    sigmas = karras_sigmas(num_steps, sigma_max, sigma_min, rho).tolist()
    return heun(denoiser, sigma_max * z.to(torch.float32), sigmas, labels)[-1]


# ---- Few-step consistency sampler ------------------------------------------------------------------------------

@torch.no_grad()
def consistency_sampler(denoiser: Denoiser, z: torch.Tensor, mid_sigmas: Sequence[float] = (),
                        sigma_max: float = 80.0, labels=None, generator: torch.Generator | None = None,
                        noise: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """CMT/ECT `generator_fn` (docs/spec/cm.md §3.5): t = [σ_max, *mid_sigmas, 0]; x = σ_max·z;
    for each (t_cur, t_next): x = f(x, t_cur); if t_next > 0: x += t_next·ε' with fresh ε'.

    1 step: mid_sigmas=(); 2 steps: mid_sigmas=(0.77569,) after mid-training, (0.821,) after ECT. The consistency
    function must be in eval mode (boundary-conditioned CMPrecond). The state runs in z's dtype (the reference
    uses float64). Fresh noise comes from `generator`, or from `noise` (one tensor per intermediate σ) so that
    callers can make samples independent of batch composition."""
    steps = [float(sigma_max), *[float(m) for m in mid_sigmas], 0.0]
    if any(b >= a for a, b in zip(steps[:-1], steps[1:])) or not all(math.isfinite(v) for v in steps):
        raise EngineError(f"consistency sampler σ's must be finite and decrease to 0; got {steps}")
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise EngineError(f"consistency_sampler: z must be a floating-point tensor, got "
                          f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}")
    if noise is not None and len(noise) != len(mid_sigmas):
        raise ValueError(f"need {len(mid_sigmas)} noise tensors, got {len(noise)}")
    x = z * steps[0]
    for k, (t_cur, t_next) in enumerate(zip(steps[:-1], steps[1:])):
        x = denoiser(x, _sigma_batch(t_cur, x), labels).to(z.dtype)
        if t_next > 0:
            eps = noise[k] if noise is not None else torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                                                 device=x.device)
            x = x + t_next * eps.to(x.dtype)
    return x


# ---- In t: Mean Flow and flow matching ----------------------------------------------------------------------

@torch.no_grad()
def mean_flow_trajectory(flow, z: torch.Tensor, ts: Sequence[float], labels=None) -> torch.Tensor:
    """Mean Flow steps in t through the grid `ts` (descending; docs/spec/mf.md §1.8): from each t to the next s,
    x_s = x_t − (t − s)·u(x_t, s, t) with `flow(x, t, r, labels) -> u`, one call per step. Returns the states at
    every t of the grid, [len(ts), *z.shape], z (at ts[0]) first."""
    B, x, states = z.shape[0], z, [z]
    for t, s in zip(ts[:-1], ts[1:]):
        tt = torch.full((B,), t, device=z.device, dtype=z.dtype)
        ss = torch.full((B,), s, device=z.device, dtype=z.dtype)
        x = x - (t - s) * flow(x, tt, ss, labels).to(z.dtype)
        states.append(x)
    return torch.stack(states)


def mean_flow_sampler(flow, z: torch.Tensor, t_steps: Sequence[float] = (1.0,), labels=None) -> torch.Tensor:
    """Few-step Mean Flow sampling: one step from each t of `t_steps` (1 = noise first) to the next, the last to
    t = 0; (1,) is one step, (1, 0.5) two. Returns x at t = 0."""
    ts = [float(t) for t in t_steps] + [0.0]
    if any(b >= a for a, b in zip(ts[:-1], ts[1:])) or ts[0] > 1 or not all(math.isfinite(v) for v in ts):
        raise EngineError(f"Mean Flow sampler t's must be in (0, 1] and decrease to 0; got {ts}")
    return mean_flow_trajectory(flow, z, ts, labels)[-1]


def mean_flow_uniform(flow, noise: torch.Tensor, steps: int = 1, labels=None) -> torch.Tensor:
    """k-step Mean Flow sampling on the uniform grid t_i = 1 − i/k (`mean_flow_sampler`)."""
    return mean_flow_sampler(flow, noise, tuple(1 - i / steps for i in range(steps)), labels)


@torch.no_grad()
def flow_heun_trajectory(velocity: Callable[[torch.Tensor, float], torch.Tensor], z: torch.Tensor,
                         ts: Sequence[float]) -> torch.Tensor:
    """Heun in t on dx/dt = velocity(x, t) (t = 1 noise first, descending; the last step into t = 0 Euler):
    x_s = x_t − (t − s)·(v + v')/2. Returns the states at every t of the grid."""
    return heun_ode(velocity, z, [float(t) for t in ts])


# ---- float64 reference integrator ------------------------------------------------------------------------------

@torch.no_grad()
def pf_ode_reference(denoiser: Denoiser, x_T: torch.Tensor, sigma_from, sigma_to: float,
                     steps: int = 2000, labels=None) -> torch.Tensor:
    """High-accuracy float64 solution of the PF-ODE by classical RK4 in u = ln σ, where dx/du = x − D(x; e^u).

    `sigma_from` is one level, or one per sample (a [B] tensor: each row is integrated over its own interval, in
    `steps` equal steps of ln σ). Used as the oracle for solver convergence tests (error O(steps^-4)) and as the
    exact flow map Ψ_{σ→σ_to} of the Gaussian-mixture teacher (engine/metrics, recipes/gmm_gradient_bias.py)."""
    x = x_T.to(torch.float64)
    if torch.is_tensor(sigma_from) and sigma_from.ndim > 0:
        if sigma_from.shape != (x.shape[0],):
            raise ValueError(f"sigma_from has shape {tuple(sigma_from.shape)} for a batch of {x.shape[0]}")
        u = sigma_from.to(device=x.device, dtype=torch.float64).log()
        h = (math.log(sigma_to) - u) / steps
        hx = h.reshape(-1, *([1] * (x.ndim - 1)))             # the step, broadcast over each row
        level = torch.exp
    else:
        u = math.log(float(sigma_from))
        h = hx = (math.log(sigma_to) - u) / steps
        level = lambda u: _sigma_batch(math.exp(u), x)          # noqa: E731

    def f(x, u):
        return x - denoiser(x, level(u), labels).to(torch.float64)

    for _ in range(steps):
        k1 = f(x, u)
        k2 = f(x + 0.5 * hx * k1, u + 0.5 * h)
        k3 = f(x + 0.5 * hx * k2, u + 0.5 * h)
        k4 = f(x + hx * k3, u + h)
        x = x + (hx / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
        u = u + h
    return x
