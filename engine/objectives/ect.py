"""Easy Consistency Tuning (docs/spec/cm.md §4.1–4.4) and Easy Consistency Distillation (docs/spec/cm.md §4.5).

Both train f(x_t, t) towards a stop-gradient target f(x_r, r) at a slightly smaller noise level r = t_to_r(t):

    t = exp(P_mean + P_std·n), n ~ N(0, 1) per sample (no clipping)
    d = q^−(stage+1)
    r = max(0, t·(1 − d))                               mapping='const'
    r = max(0, t·(1 − d·(1 + k·sigmoid(−b·t))))        mapping='sigmoid' (the reference's default)
    ECT: x_t = y + t ε, x_r = y + r ε (one shared ε)
    ECD: x_t = y + t ε, x_r = one teacher PF-ODE step t → r from x_t (Euler or Heun)
    S_t = f(x_t, t) with gradients; S_r = f(x_r, r) without, with the SAME dropout masks; S_r ← y where r = 0
    L = ‖S_t − S_r‖₂ (c = 0) or sqrt(‖S_t − S_r‖² + c²) − c (c > 0)
    loss = L / (t − r) ('inverse_gap', ECT main)  or  L·(t² + σ_d²)/(t σ_d)² ('snrpk', ECT imgnet, ECD)

Identical masks: the reference saves and restores the CUDA RNG state around the two passes; we run both inside
`dropout_generator(seed)` with one seed drawn from `rng`, which pins every dropout draw of the network to the
same stream on any device.

Stage schedule. `set_progress(nimg)` sets stage = ⌊nimg / (1000·double_kimg)⌋ (stage 0 throughout when
double_kimg is None). The reference counts stages in ticks (docs/spec/cm.md §4.2): its stage 0 lasts one tick longer
than the others (tick 0 is a single iteration and the stage is floor((tick − 1)/double)), and its post-training
scripts pass `--double` twice so that the later value (10000 ticks) wins — a constant stage 0. Neither quirk is
reproduced: stages here are exact image-count intervals, and CMT post-training is simply double_kimg=None.
"""
from __future__ import annotations

import torch

from engine.checks import finite
from engine.guidance import guided
from engine.networks.dropout import dropout_generator, step_stream
from engine.objectives.base import LossOutput, Objective, StepRNG, phase
from engine.objectives.cmt import freeze_denoiser, teacher_calls
from engine.objectives.distances import l2, pseudo_huber, resolve_distance
from engine.objectives.edm import batch_view, noise_dtype
from engine.schedules import SIGMA_DATA

MAPPINGS = ("sigmoid", "const")
WEIGHTINGS = ("inverse_gap", "snrpk")
SOLVERS = ("euler", "heun")


class _ConsistencyGap(Objective):
    """t/r sampling, the stage schedule, the two-pass consistency loss and its weighting, shared by ECT and ECD."""

    def __init__(self, P_mean, P_std, sigma_data, q, c, k, b, mapping, double_kimg, weighting, distance):
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, got {mapping!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not q > 1:
            raise ValueError(f"q must be > 1 (the gap is d = q^-(stage+1)), got {q!r}")
        if c < 0:
            raise ValueError(f"c must be ≥ 0, got {c!r}")
        if double_kimg is not None and not round(double_kimg * 1000) >= 1:
            raise ValueError(f"double_kimg must be at least 0.001 (one image) or None, got {double_kimg!r}")
        if distance is not None and c > 0:
            raise ValueError("give either c (pseudo-Huber constant) or distance, not both")
        w = type(self).__name__
        self.P_mean, self.P_std = finite("P_mean", P_mean, w), finite("P_std", P_std, w, low=0.0, strict=True)
        self.sigma_data = finite("sigma_data", sigma_data, w, low=0.0, strict=True)
        self.q, self.c, self.k, self.b = float(q), float(c), finite("k", k, w), finite("b", b, w)
        self.mapping, self.weighting = mapping, weighting
        self.double_kimg = None if double_kimg is None else float(double_kimg)
        # docs/spec/cm.md §4.1 step 6; `distance` may replace it (e.g. a perceptual metric).
        self.distance = resolve_distance(distance) if distance is not None else (
            pseudo_huber(self.c) if self.c > 0 else l2)
        self.stage = 0

    # ---- schedule ----
    def set_progress(self, nimg: int) -> None:
        # whole images, as the loop's intervals (3.2 kimg · 1000 = 3200.0000000000005 in floating point)
        self.stage = int(nimg) // round(self.double_kimg * 1000) if self.double_kimg else 0

    @property
    def d(self) -> float:
        """The relative gap scale q^−(stage+1)."""
        return self.q ** -(self.stage + 1)

    def log_values(self) -> dict:
        return dict(stage=self.stage, gap_d=self.d)

    def state_dict(self) -> dict:
        return dict(stage=self.stage)

    def load_state_dict(self, state: dict) -> None:
        self.stage = int(state.get("stage", 0))

    # ---- t, r, weights ----
    def sample_t(self, batch: int, device, dtype, rng: StepRNG) -> torch.Tensor:
        return (rng.randn([batch], device, dtype) * self.P_std + self.P_mean).exp()

    def t_to_r(self, t: torch.Tensor) -> torch.Tensor:
        if self.mapping == "const":
            r = t * (1 - self.d)
        else:
            r = t * (1 - self.d * (1 + self.k * torch.sigmoid(-self.b * t)))
        return r.clamp(min=0)

    def weight(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.weighting == "inverse_gap":
            return 1 / (t - r)   # the reference's arithmetic (not the closed-form gap), docs/spec/cm.md §4.1 step 7
        sd = self.sigma_data
        return (t ** 2 + sd ** 2) / (t * sd) ** 2

    # ---- the loss ----
    def target_input(self, x_t, t, r, y, eps, labels) -> tuple[torch.Tensor, int]:
        """x_r and the number of teacher evaluations (per sample) spent on it."""
        raise NotImplementedError

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        y = images
        B, device, dtype = y.shape[0], y.device, noise_dtype(y)
        t = self.sample_t(B, device, dtype, rng)          # draw order as the reference: n, then ε
        r = self.t_to_r(t)
        eps = rng.randn(y.shape, device, dtype)
        seed = rng.seed()
        y = y.to(dtype)
        x_t = y + batch_view(t, y) * eps
        x_r, teacher_nfe = self.target_input(x_t, t, r, y, eps, labels)

        with dropout_generator(seed, device):
            S_t = net(x_t, t, labels)
        # Where r = 0 the target is y itself; evaluate those rows at σ = t instead of 0 (ln 0 = −∞ in c_noise) and
        # discard them, so nothing non-finite is ever computed. The other rows see exactly (x_r, r).
        r_eval = torch.where(r > 0, r, t)
        with torch.no_grad(), dropout_generator(seed, device):
            S_r = net(x_r, r_eval, labels)
        S_r = torch.where(batch_view(r > 0, S_r), S_r, y.to(S_r.dtype))

        with step_stream(rng):
            loss = self.distance(S_t, S_r) * self.weight(t, r).to(S_t.dtype)
        return LossOutput(loss=loss, pairs=B, teacher_nfe=teacher_nfe, student_forward=2 * B,
                          student_backward=B)


class ECT(_ConsistencyGap):
    """Easy Consistency Tuning, the reference's `ECMLoss` (docs/spec/cm.md §4.1). Defaults are its constructor's;
    CMT post-training uses q = 4096 (CIFAR-10) / 1024 (AFHQv2) / 512 (FFHQ) with a constant stage 0
    (double_kimg=None); original ECT uses q = 2 with double_kimg = 3200 (250 ticks of 12.8 kimg).
    weighting='snrpk' with c = 0.06 is the ECT `imgnet` branch. `distance`, if given, replaces the L2/pseudo-Huber
    distance chosen by c."""

    name = "ect"

    def __init__(self, P_mean: float = -1.1, P_std: float = 2.0, sigma_data: float = SIGMA_DATA, q: float = 2,
                 c: float = 0.0, k: float = 8.0, b: float = 1.0, mapping: str = "sigmoid",
                 double_kimg: float | None = None, weighting: str = "inverse_gap", distance=None):
        super().__init__(P_mean, P_std, sigma_data, q, c, k, b, mapping, double_kimg, weighting, distance)

    def target_input(self, x_t, t, r, y, eps, labels):
        return y + batch_view(r, y) * eps, 0


class ECD(_ConsistencyGap):
    """Easy Consistency Distillation, CMT-512's `ECDLoss` / `ECDGuidLoss` (docs/spec/cm.md §4.5): as ECT, but x_r is
    one PF-ODE step t → r of a frozen teacher from x_t (dx/dσ = (x − D(x; σ))/σ):

        Euler: x_r = x_t + (r − t)·(x_t − D(x_t; t))/t
        Heun:  d = (x_t − D(x_t; t))/t, x' = x_t + (r − t)·d, d' = (x' − D(x'; r))/r, x_r = x_t + (r − t)(d + d')/2

    With `guide` and `guidance` = w, the teacher is auto-guided: D = g + w·(D_teacher − g), g = guide(x, σ)
    (engine/guidance.py; the teacher may also be a GuidedDenoiser itself).
    Where r = 0 the target is y (as ECT); there Heun's second evaluation is made at σ = t instead of 0 and x_r is
    the Euler step (= D(x_t; t)), so no division by zero happens; its result is discarded.
    teacher_nfe counts every sample passed through a teacher network: B per evaluation (Euler 1, Heun 2),
    doubled with a guide."""

    name = "ecd"

    def __init__(self, teacher, solver: str = "euler", guidance: float | None = None, guide=None,
                 P_mean: float = -1.1, P_std: float = 2.0, sigma_data: float = SIGMA_DATA, q: float = 4,
                 c: float = 0.0, k: float = 8.0, b: float = 1.0, mapping: str = "sigmoid",
                 double_kimg: float | None = None, weighting: str = "snrpk", distance=None):
        super().__init__(P_mean, P_std, sigma_data, q, c, k, b, mapping, double_kimg, weighting, distance)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if (guide is None) != (guidance is None):
            raise ValueError("auto-guidance needs both guide (the guiding denoiser) and guidance (its weight w)")
        self.teacher = freeze_denoiser(teacher, "ECD")
        self.guide = freeze_denoiser(guide, "ECD", "guide")
        self.solver, self.guidance = solver, None if guidance is None else float(guidance)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
        with phase("teacher"):
            D = self.teacher(x, sigma, labels).to(x.dtype)
            if self.guide is None or self.guidance == 1:
                return D
            return guided(D, self.guide(x, sigma, labels), self.guidance)   # engine/guidance.py

    @torch.no_grad()
    def teacher_step(self, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, labels=None) -> torch.Tensor:
        """One Euler or Heun step of the teacher's PF-ODE from (x_t, t) to r; t, r are [B]."""
        tb, rb = batch_view(t, x_t), batch_view(r, x_t)
        d = (x_t - self.denoise(x_t, t, labels)) / tb
        x_euler = x_t + (rb - tb) * d
        if self.solver == "euler":
            return x_euler
        r_eval = torch.where(r > 0, r, t)
        rb_eval = batch_view(r_eval, x_t)
        d2 = (x_euler - self.denoise(x_euler, r_eval, labels)) / rb_eval
        x_heun = x_t + (rb - tb) * (d + d2) / 2
        return torch.where(rb > 0, x_heun, x_euler)

    def target_input(self, x_t, t, r, y, eps, labels):
        with_guide = self.guide is not None and self.guidance != 1
        calls = (1 if self.solver == "euler" else 2) * (2 if with_guide else teacher_calls(self.teacher))
        return self.teacher_step(x_t, t, r, labels), calls * x_t.shape[0]
