"""Consistency Mid-Training (docs/spec/cm.md §3.1) and the paper's two ablations, KD and Slow CMT (docs/spec/cm.md
§8.1).

All three regress the student f(x, σ) onto the endpoint of a frozen teacher's DPM-Solver++ solve (docs/spec/cm.md §2)
on the log-SNR grid σ_0 = σ_max > … > σ_N = σ_min; they differ in which (input, σ) pairs they train on:

    CMT       one solve per trajectory from x_T; every state x_0 … x_{N−1} of it is an input, all with the same
              target x_N: N pairs per trajectory, one teacher call per pair.
    KD        one solve per trajectory; only (x_T, σ_max) → x_N: one pair per trajectory, N teacher calls per pair.
    SlowCMT   one solve per pair: pair i is the forward-noised x = y + σ_j ε at a grid level j = j_i and its
              target is the solve from x over σ_j … σ_N (N − j teacher calls).

The teacher is any denoiser `teacher(x, sigma, labels=None) -> x0`; it is frozen here (eval mode, no gradients)
and its full-grid solve is CUDA-graph captured on GPUs (`graphs=False` to switch that off; engine/teacher/solver.py). It
is
called with the data labels (the reference's teacher is unconditional and gets none; an unconditional
EDMPrecond drops labels itself). The solves run without gradients in the data's dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.checks import finite
from engine.errors import EngineError
from engine.networks.dropout import step_stream
from engine.objectives.base import LossOutput, Objective, StepRNG, phase
from engine.objectives.distances import resolve_distance
from engine.objectives.edm import noise_dtype
from engine.schedules import SIGMA_MAX, SIGMA_MIN, logsnr_sigmas
from engine.solvers import THIRD_ORDER_RULES, dpm_solver_plan, run_dpm_solver
from engine.teacher.solver import TeacherSolver

PRIORS = ("data", "noise")
LABELS = ("data", "uniform")


def freeze(teacher):
    """Eval mode and no parameter gradients for an nn.Module teacher; other callables are returned as they are."""
    if isinstance(teacher, nn.Module):
        teacher.eval().requires_grad_(False)
    return teacher


def freeze_denoiser(teacher, where: str, role: str = "teacher"):
    """`freeze` for a diffusion teacher (or guide): a consistency model in its place is refused. A CMPrecond
    denoises nothing at σ > σ_min the way a diffusion model does (it maps to the trajectory's end), so a solver
    driven by it trains a student on wrong targets without any error. The command lines refuse such files when
    they load them (engine/checkpoints/edm_snapshots.py); this is the same check for objects built in Python.
    Guided teachers are checked network by network."""
    from engine.guidance import GuidedDenoiser
    from engine.precond import CMPrecond
    nets = (teacher.main, teacher.guide) if isinstance(teacher, GuidedDenoiser) else (teacher,)
    for net in nets:
        if isinstance(net, CMPrecond):
            raise EngineError(f"{where}: the {role} is a consistency model (CMPrecond); it must be a diffusion "
                              "denoiser (EDMPrecond, EDM2Precond or an analytic teacher). Load an EDM / ECT / CMT "
                              "file as a teacher with load_edm_pickle(path, mode='teacher')")
    if teacher is not None and not callable(teacher):
        raise EngineError(f"{where}: the {role} must be a denoiser(x, sigma, labels), got {type(teacher).__name__}")
    return freeze(teacher)


def teacher_calls(teacher) -> int:
    """Network evaluations per teacher call: 2 for a guided teacher (engine/guidance.py), else 1."""
    return int(getattr(teacher, "calls", 1))


def tile(labels, n: int):
    """Labels [m] or [m, L] repeated n times along the batch: entry j·m + b = labels[b] (step-major)."""
    if labels is None:
        return None
    return labels.repeat(n, *([1] * (labels.ndim - 1)))


class _TeacherSolve(Objective):
    """Shared knobs and the teacher solve of CMT, KD and Slow CMT."""

    def __init__(self, teacher, nfe: int, order: int, sigma_max: float, sigma_min: float, distance,
                 third_order: str, graphs: bool = True):
        if int(nfe) != nfe or nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order!r}")
        if third_order not in THIRD_ORDER_RULES:
            raise ValueError(f"third_order must be one of {THIRD_ORDER_RULES}, got {third_order!r}")
        self.teacher = freeze_denoiser(teacher, type(self).__name__)
        self.nfe, self.order, self.third_order = int(nfe), int(order), third_order
        where = type(self).__name__
        self.sigma_min = finite("sigma_min", sigma_min, where, low=0.0, strict=True)
        self.sigma_max = finite("sigma_max", sigma_max, where, low=self.sigma_min, strict=True)
        self.sigmas = logsnr_sigmas(self.nfe, self.sigma_max, self.sigma_min)  # float64 [N + 1], docs/spec/cm.md §2.2
        self.distance = resolve_distance(distance)
        # the full-grid solve, CUDA-graph captured on GPUs (engine/teacher/solver.py)
        self.solver = TeacherSolver(self.teacher, self.sigmas, self.order, third_order=third_order, graphs=graphs)

    def solve(self, x: torch.Tensor, sigmas: torch.Tensor, labels) -> torch.Tensor:
        """The teacher trajectory [len(sigmas), *x.shape] from x at sigmas[0] (no gradients).

        The loop's bf16 autocast (CUDA) is switched off here: the reference integrates the teacher in fp32, and
        the targets of every pair come from this one solve."""
        with ops.autocast_off(x.device), phase("teacher"):
            if sigmas is self.sigmas:
                return self.solver(x, labels)
            return run_dpm_solver(self.teacher, x, self._plan(sigmas, x), labels)

    def _plan(self, sigmas: torch.Tensor, x: torch.Tensor):
        """The solver plan of a sub-grid on x's device, made once per grid: making it puts the grid on the device,
        a host-to-device copy on every step if it were not kept (tests/test_host_traffic.py)."""
        cache = self.__dict__.setdefault("_plans", {})
        key = (tuple(sigmas.tolist()), x.device, x.dtype)
        if key not in cache:
            cache[key] = dpm_solver_plan(sigmas, self.order, True, self.third_order, x.device, x.dtype)
        return cache[key]


class _FromPrior(_TeacherSolve):
    """CMT and KD start each trajectory at σ_max from the prior chosen by `prior`, conditioned on the data's labels
    or (`labels='uniform'`, CMT's ImageNet-512 code, docs/spec/edm2_latent.md §7.1) on classes drawn uniformly
    from `num_classes`."""

    def __init__(self, teacher, nfe, order, sigma_max, sigma_min, prior, distance, third_order, graphs=True,
                 labels="data", num_classes=None):
        super().__init__(teacher, nfe, order, sigma_max, sigma_min, distance, third_order, graphs)
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
        if labels == "uniform" and not (isinstance(num_classes, int) and num_classes >= 1):
            raise ValueError(f"labels='uniform' needs num_classes, a positive integer; got {num_classes!r}")
        self.prior, self.labels, self.num_classes = prior, labels, num_classes

    def condition(self, data_labels, m: int, device, rng: StepRNG):
        """The class indices [m] the trajectories are solved for: the data's, or uniform draws (one per
        trajectory, from the step's stream: the same at any world size)."""
        if self.labels == "data":
            return data_labels
        u = rng.rand([m], device, torch.float64)
        return (u * self.num_classes).long().clamp_(max=self.num_classes - 1)

    def start(self, images: torch.Tensor, rng: StepRNG) -> torch.Tensor:
        """x_T = y + σ_max ε ('data', the reference, docs/spec/cm.md §3.1 step 4) or σ_max ε ('noise'); one draw
        of ε [m, ...] either way, as the reference's single `randn_like`."""
        if images.shape[0] < 1:
            raise ValueError("an empty batch: CMT/KD need at least one trajectory per step")
        eps = rng.randn(images.shape, images.device, noise_dtype(images))
        if self.prior == "data":
            return images.to(eps.dtype) + self.sigma_max * eps
        return self.sigma_max * eps


class CMT(_FromPrior):
    """Consistency mid-training, the reference's `DPMSolverLoss` (docs/spec/cm.md §3.1).

    Per step, m = `trajectories_per_batch` images y, one teacher solve each (N = nfe steps), and N·m pairs laid out
    step-major exactly as the reference: entry k = j·m + b has input x_j[b] (j = 0 … N−1; x_0 = x_T), σ = σ_j and
    target x_N[b]. Unit weights. The stage's `batch_size` counts pairs, so it must be trajectories_per_batch × nfe
    (8 × 16 = 128 in the paper); unlike the reference no loaded image is discarded (it keeps only ⌊B/16⌋ of
    each per-GPU batch, docs/spec/cm.md §3.1 step 1).

    `distance` has no default: the reference's is LPIPS, which needs pretrained weights; pass
    `perceptual(lpips_module)` for it, or a name / callable (engine.objectives.distances)."""

    name = "cmt"

    def __init__(self, teacher, nfe: int = 16, order: int = 3, *, trajectories_per_batch: int = 8,
                 sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, prior: str = "data", distance,
                 third_order: str = "upstream", graphs: bool = True, labels: str = "data",
                 num_classes: int | None = None):
        super().__init__(teacher, nfe, order, sigma_max, sigma_min, prior, distance, third_order, graphs, labels,
                         num_classes)
        if int(trajectories_per_batch) != trajectories_per_batch or trajectories_per_batch < 1:
            raise ValueError(f"trajectories_per_batch must be a positive integer, got {trajectories_per_batch!r}")
        self.trajectories_per_batch = int(trajectories_per_batch)

    def images_per_step(self, batch_size: int) -> int:
        pairs = self.trajectories_per_batch * self.nfe
        if batch_size != pairs:
            raise ValueError(f"CMT trains on trajectories_per_batch × nfe = {self.trajectories_per_batch} × "
                             f"{self.nfe} = {pairs} pairs per step, but the stage's batch_size is {batch_size}; "
                             f"set batch_size={pairs} or trajectories_per_batch={batch_size / self.nfe:g}")
        return self.trajectories_per_batch

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        # m is whatever this call was given (per rank, it may be a share of trajectories_per_batch).
        x_T = self.start(images, rng)
        labels = self.condition(labels, x_T.shape[0], x_T.device, rng)
        traj = self.solve(x_T, self.sigmas, labels)                   # [N + 1, m, ...], no grad
        sigmas = grid_on(self, self.sigmas, traj.device, traj.dtype)
        out = trajectory_pairs_loss(net, traj, sigmas, labels, self.distance, rng, teacher_nfe=True)
        out.teacher_nfe *= teacher_calls(self.teacher)
        return out


def grid_on(owner, grid: torch.Tensor, device, dtype) -> torch.Tensor:
    """`grid` (a constant σ grid, float64 on the host) on `device` in `dtype`, copied on the first step and kept by
    `owner` after it: a copy per step would be a host-to-device transfer on every step (tests/test_host_traffic.py)."""
    cache = owner.__dict__.setdefault("_grid_copies", {})
    key = (id(grid), torch.device(device), dtype)
    if key not in cache:
        cache[key] = (grid, grid.to(device=device, dtype=dtype))
    return cache[key][1]


def trajectory_pairs_loss(net, traj: torch.Tensor, sigmas: torch.Tensor, labels, distance, rng: StepRNG,
                          teacher_nfe: bool) -> LossOutput:
    """CMT's pairs from trajectories [N + 1, m, ...] on the grid `sigmas` [N + 1] (docs/spec/cm.md §3.1): entry
    k = j·m + b has input x_j[b], σ = σ_j and target x_N[b] — step-major, as the reference lays them out. A
    distance that draws per pair (E-LatentLPIPS's augmentation) draws from the step's stream in that layout."""
    N, m = traj.shape[0] - 1, traj.shape[1]
    X = traj[:N].reshape(N * m, *traj.shape[2:])                      # entry j·m + b = x_j[b]  (a view)
    Y = traj[N].repeat(N, *([1] * (traj.ndim - 2)))                    # entry j·m + b = x_N[b]
    tau = sigmas[:N].to(device=traj.device, dtype=traj.dtype).repeat_interleave(m)  # σ_j, step-major
    S = net(X, tau, tile(labels, N))
    with step_stream(rng.grouped(N)):
        loss = distance(S, Y)
    return LossOutput(loss=loss, pairs=N * m, teacher_nfe=N * m if teacher_nfe else 0, student_forward=N * m,
                      student_backward=N * m)


class CachedCMT(Objective):
    """CMT on pre-generated trajectories (engine/teacher/trajectory_cache.py, `TrajectorySource`): the source yields
    trajectories [m, N + 1, ...] in place of images, and the pairs, σ's and targets are exactly CMT's — with no
    teacher call, so a step is one back-propagated student evaluation per pair. `spec` is the store's StoreSpec
    (its σ grid is the one the trajectories were solved on). Teacher NFE are counted when the store is written,
    not here."""

    name = "cmt_cached"

    def __init__(self, spec, *, trajectories_per_batch: int = 8, distance):
        if int(trajectories_per_batch) != trajectories_per_batch or trajectories_per_batch < 1:
            raise ValueError(f"trajectories_per_batch must be a positive integer, got {trajectories_per_batch!r}")
        self.trajectories_per_batch = int(trajectories_per_batch)
        self.nfe = int(spec.nfe)
        self.sigmas = spec.sigmas()
        self.distance = resolve_distance(distance)

    images_per_step = CMT.images_per_step

    def __call__(self, net, trajectories: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        if trajectories.ndim < 3 or trajectories.shape[1] != self.nfe + 1:
            raise ValueError(f"CachedCMT takes trajectories [m, {self.nfe + 1}, ...] from a TrajectorySource, got "
                             f"{tuple(trajectories.shape)}")
        sigmas = grid_on(self, self.sigmas, trajectories.device, trajectories.dtype)
        return trajectory_pairs_loss(net, trajectories.transpose(0, 1), sigmas, labels, self.distance, rng,
                                     teacher_nfe=False)


class KD(_FromPrior):
    """Knowledge-distillation initialisation, the paper's "KD-style" ablation (docs/spec/cm.md §8.1): one pair per
    trajectory, (x_T, σ_max) → x_N. Pairs = trajectories = images per step = batch_size; N teacher calls per pair.
    `distance` as in CMT."""

    name = "kd"

    def __init__(self, teacher, nfe: int = 16, order: int = 3, *, sigma_max: float = SIGMA_MAX,
                 sigma_min: float = SIGMA_MIN, prior: str = "data", distance, third_order: str = "upstream",
                 graphs: bool = True, labels: str = "data", num_classes: int | None = None):
        super().__init__(teacher, nfe, order, sigma_max, sigma_min, prior, distance, third_order, graphs, labels,
                         num_classes)

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        m, N = images.shape[0], self.nfe
        x_T = self.start(images, rng)
        labels = self.condition(labels, m, x_T.device, rng)
        target = self.solve(x_T, self.sigmas, labels)[N]
        sigma = torch.full((m,), self.sigma_max, device=x_T.device, dtype=x_T.dtype)
        S = net(x_T, sigma, labels)
        with step_stream(rng):
            loss = self.distance(S, target)
        return LossOutput(loss=loss, pairs=m, teacher_nfe=N * m, student_forward=m, student_backward=m)


class SlowCMT(_TeacherSolve):
    """"Slow CMT" (docs/spec/cm.md §8.1): every pair gets its own teacher solve, so pairs are independent.

    Pair i (one data image y_i each) uses grid level j_i = (i + o) mod N with one random offset o per step
    (stratified: each level gets ⌊B/N⌋ or ⌈B/N⌉ pairs); input x_i = y_i + σ_{j_i} ε_i (forward noising), σ = σ_{j_i};
    target = the endpoint of DPM-Solver++ from x_i over the sub-grid σ_{j_i} … σ_N (same order, with its own
    warm-up and lower-order tail). Solves sharing a level are batched: at most N solver runs per step.
    Teacher NFE = Σ_i (N − j_i)."""

    name = "slow_cmt"

    def __init__(self, teacher, nfe: int = 16, order: int = 3, *, sigma_max: float = SIGMA_MAX,
                 sigma_min: float = SIGMA_MIN, distance, third_order: str = "upstream"):
        super().__init__(teacher, nfe, order, sigma_max, sigma_min, distance, third_order)

    def levels(self, batch: int, rng: StepRNG) -> list[int]:
        """Grid index j_i of each pair (host-side, from rng.cpu; i counted in the global batch)."""
        o = int(torch.randint(0, self.nfe, (1,), generator=rng.cpu).item())
        first, _ = rng.rows(batch)
        return [(first + i + o) % self.nfe for i in range(batch)]

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        B, N, device = images.shape[0], self.nfe, images.device
        if B < 1:
            raise ValueError("an empty batch")
        j = self.levels(B, rng)
        eps = rng.randn(images.shape, device, noise_dtype(images))
        # σ_{j_i} gathered on the device: j is an arithmetic rotation, so its indices and each level's rows are
        # aranges made on the device, not host lists copied there (tests/test_host_traffic.py)
        j_dev = (torch.arange(B, device=device) + (j[0] if B else 0)) % N
        sigma = grid_on(self, self.sigmas, device, eps.dtype)[j_dev]                   # [B]
        x = images.to(eps.dtype) + sigma.reshape(-1, *([1] * (eps.ndim - 1))) * eps
        target = torch.empty_like(x)
        for level in sorted(set(j)):
            idx = torch.arange((level - j[0]) % N, B, N, device=device)                # rows i with j_i = level
            sub_labels = None if labels is None else labels[idx]
            target[idx] = self.solve(x[idx], self.sigmas[level:], sub_labels)[-1]
        S = net(x, sigma, labels)
        with step_stream(rng):
            loss = self.distance(S, target)
        return LossOutput(loss=loss, pairs=B, teacher_nfe=sum(N - level for level in j), student_forward=B,
                          student_backward=B)
