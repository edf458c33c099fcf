"""Flow matching, Mean Flow and CMT for Mean Flow (docs/spec/mf.md §1, §4), for networks with the flow-map signature
`net(z, t, r, labels) -> u(z, r, t)` (engine.networks.DiT; t = 1 is noise, docs/spec/mf.md §0).

    FlowMatching  SiT pre-training: z = (1 − t)x + tε, v = ε − x, ‖u(z, t, t) − v‖²
    MeanFlow      u_tgt = ṽ − (t − r)·[J_z u·ṽ + ∂_t u], L = e / sg((e + c)^p), e = Σ(u − sg(u_tgt))²
    CMTMeanFlow   pairs (z_{t_i}, z_{t_j}) of a teacher trajectory with the average-velocity target
                  (z_{t_i} − z_{t_j}) / (t_i − t_j); plain squared L2 (docs/spec/mf.md §4.4)

Mean Flow's JVP is a no-grad JVP of the network along (ṽ, 0, 1) in (z, r, t), taken only on the rows with r ≠ t
(rows with r = t have (t − r)·du/dt = 0): by default the network's own dual-stream `jvp` when it has one (the DiT:
primal and tangent batched through each linear layer, attention (O, Ȯ) in one kernel pass;
engine/networks/dit_jvp.py), `torch.func.jvp` otherwise or with jvp='func', the central difference
(u(z + hṽ, t + h, r) − u(z − hṽ, t − h, r))/2h with jvp='fd' (step h = `fd_step`), all in `jvp_precision`
(engine/jvp.py: float32 by default under bf16 autocast). The prediction is an ordinary forward — docs/spec/mf.md
§1.3 option (b): only the ordinary forward carries gradients, so a DDP/FSDP wrapper sees a normal forward, and the
JVP runs on `dist.jvp_view` of the network (or `jvp_net`). Classifier-free guidance is folded into the target as the
official code does (§1.6); label dropout sends the first rows of the batch to the null class with the unguided v.
"""
from __future__ import annotations

import math

import torch

from engine import dist
from engine import jvp as jvp_ops
from engine.checks import finite, one_of, probability
from engine.errors import EngineError
from engine.objectives.base import LossOutput, Objective, StepRNG, phase
from engine.objectives.cmt import freeze
from engine.objectives.edm import noise_dtype
from engine.solvers import flow_heun_trajectory, mean_flow_trajectory

JVP_MODES = ("auto", "dual", "func", "fd")
PAIR_RULES = ("nonadjacent28", "all36", "drop_start28", "drop_end28", "grid8")


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def logit_normal(n: int, mu: float, sigma: float, rng: StepRNG, device, dtype) -> torch.Tensor:
    return torch.sigmoid(rng.randn([n], device, dtype) * sigma + mu)


def null_labels(net, labels, batch: int, device):
    """The batch's condition: class indices (the null class when unconditional) for a DiT, caption features (the null
    caption when None) for an MMDiT — the network's `condition`; attributes are read through a DDP wrapper."""
    base = dist.unwrap(net)
    if hasattr(base, "condition"):
        return base.condition(labels, batch, device)
    num = int(getattr(base, "num_classes", 0))
    if labels is None:
        return torch.full((batch,), num, dtype=torch.long, device=device)
    return labels.long()


def null_like(net, y: torch.Tensor) -> torch.Tensor:
    """The null condition (null class, or null caption) in the shape of `y`."""
    base = dist.unwrap(net)
    return base.null_like(y) if hasattr(base, "null_like") else torch.full_like(y, int(base.num_classes))


def repeat_rows(y: torch.Tensor, k: int) -> torch.Tensor:
    """`y` repeated k times along the batch: class indices [B] or caption features [B, 77, D]."""
    return y.repeat(k, *([1] * (y.ndim - 1)))


class FlowMatching(Objective):
    """Flow-matching (SiT / REPA convention) pre-training of a flow-map network at r = t: the instantaneous
    velocity. t ~ logit-normal(μ, σ) or, with time='uniform', U[0, 1] (REPA's text-to-image training); label
    dropout to the null condition with probability `label_dropout`; the squared error summed over elements, or
    averaged with reduce='mean' (REPA's mean_flat, the scale its alignment weight 0.5 is set against)."""

    name = "fm"

    def __init__(self, mu: float = -0.4, sigma: float = 1.0, label_dropout: float = 0.1, time: str = "logit_normal",
                 reduce: str = "sum"):
        self.mu, self.sigma = finite("mu", mu, "FlowMatching"), finite("sigma", sigma, "FlowMatching", low=0.0,
                                                                       strict=True)
        self.label_dropout = probability("label_dropout", label_dropout, "FlowMatching")
        self.time = one_of("time", time, ("logit_normal", "uniform"), "FlowMatching")
        self.reduce = one_of("reduce", reduce, ("sum", "mean"), "FlowMatching")

    def identity_omits(self) -> set:
        return {k for k, v in dict(time="logit_normal", reduce="sum").items() if getattr(self, k) == v}

    def __call__(self, net, images, labels, rng: StepRNG) -> LossOutput:
        x = images.to(noise_dtype(images))
        B, device = x.shape[0], x.device
        t = logit_normal(B, self.mu, self.sigma, rng, device, x.dtype) if self.time == "logit_normal" else \
            rng.rand([B], device, x.dtype)
        eps = rng.randn(x.shape, device, x.dtype)
        z = (1 - _view(t, x)) * x + _view(t, x) * eps
        y = null_labels(net, labels, B, device)
        if self.label_dropout > 0 and labels is not None:
            drop = rng.rand([B], device) < self.label_dropout
            y = torch.where(drop.reshape(-1, *([1] * (y.ndim - 1))), null_like(net, y), y)
        u = net(z, t, t, y)
        sq = (u.to(x.dtype) - (eps - x)).square().reshape(B, -1)
        loss = sq.sum(1) if self.reduce == "sum" else sq.mean(1)
        return LossOutput(loss=loss, pairs=B, student_forward=B, student_backward=B)


class MeanFlow(Objective):
    """Mean Flow (docs/spec/mf.md §1.11, official semantics). Defaults: ImageNet (μ −0.4, σ 1.0, 75% of rows r = t),
    adaptive weight p = 1, c = 0.01, label dropout 0.1; guidance ω, κ on [t_start, t_end] (ω = 1, κ = 0: none).
    `jvp_net`, if given, is the module the JVP runs on (else `dist.jvp_view` of the trained network); `jvp`: 'auto'
    (the network's dual-stream `jvp` method when it has one, else torch.func.jvp), 'dual' (require it), 'func'
    (torch.func.jvp) or 'fd' (central difference with step `fd_step`); `jvp_precision` 'fp32' or 'autocast'
    (engine/jvp.py)."""

    name = "mf"

    def __init__(self, mu: float = -0.4, sigma: float = 1.0, r_equals_t: float = 0.75, p: float = 1.0,
                 c: float = 0.01, label_dropout: float = 0.1, omega: float = 1.0, kappa: float = 0.0,
                 t_start: float = 0.0, t_end: float = 1.0, jvp_net=None, jvp: str = "auto",
                 fd_step: float = jvp_ops.FD_STEP, jvp_precision: str = "fp32"):
        w = "MeanFlow"
        one_of("jvp", jvp, JVP_MODES, w)
        self.r_equals_t = probability("r_equals_t (a fraction of the batch)", r_equals_t, w, below_one=False)
        self.mu, self.sigma = finite("mu", mu, w), finite("sigma", sigma, w, low=0.0, strict=True)
        self.p, self.c = finite("p", p, w, low=0.0), finite("c", c, w, low=0.0, strict=True)
        self.label_dropout = probability("label_dropout", label_dropout, w)
        self.omega, self.kappa = finite("omega", omega, w), finite("kappa", kappa, w)
        self.t_start, self.t_end = finite("t_start", t_start, w, 0.0, 1.0), finite("t_end", t_end, w, 0.0, 1.0)
        if self.t_start > self.t_end:
            raise EngineError(f"{w}: the guidance interval [t_start, t_end] = [{t_start}, {t_end}] is empty")
        self.jvp_net, self.jvp_mode = jvp_net, jvp
        self.fd_step, self.jvp_precision = jvp_ops.check_step(fd_step, w), jvp_ops.check_precision(jvp_precision, w)
        jvp_ops.check_fd_precision(jvp, self.jvp_precision, w)

    def identity_omits(self) -> set:
        """The JVP precision at the value every run had before it existed (float32: those were CPU runs, whose loop
        has no autocast), and the step when no finite difference is taken (Objective.identity_omits)."""
        return ({"jvp_precision"} if self.jvp_precision == "fp32" else set()) | \
            ({"fd_step"} if self.jvp_mode != "fd" else set())

    @property
    def guided(self) -> bool:
        return not (self.omega == 1.0 and self.kappa == 0.0)

    def sample_times(self, B: int, rng: StepRNG, device, dtype):
        a = logit_normal(B, self.mu, self.sigma, rng, device, dtype)
        b = logit_normal(B, self.mu, self.sigma, rng, device, dtype)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        # the first rows of the (global) batch get r = t, a deterministic count; under data parallelism this
        # rank's share of them is what falls in its rows
        first, total = rng.rows(B)
        n_eq = min(max(math.floor(self.r_equals_t * total) - first, 0), B)
        r = torch.cat([t[:n_eq], r[n_eq:]])
        return t, r, n_eq

    def target_velocity(self, net, z, t, v, y, rng: StepRNG, labels_given: bool):
        """ṽ (guided inside the interval) and the number of no-grad network evaluations spent on it."""
        B = z.shape[0]
        evals = 0
        v_tilde = v
        if self.guided:
            with torch.no_grad():
                null = null_like(net, y)
                u_null = net(z, t, t, null).to(z.dtype)
                evals += B
                guided = self.omega * v + (1 - self.omega - self.kappa) * u_null
                if self.kappa != 0:
                    guided = guided + self.kappa * net(z, t, t, y).to(z.dtype)
                    evals += B
            inside = _view((t >= self.t_start) & (t <= self.t_end), z)
            v_tilde = torch.where(inside, guided, v)
        n_drop = 0
        if self.label_dropout > 0 and labels_given:
            # Binomial(B, p) rows, the first ones (the official code's choice: mostly the r = t rows)
            first, total = rng.rows(B)
            n_drop = int(torch.binomial(torch.tensor([float(total)]), torch.tensor([self.label_dropout]),
                                        generator=rng.cpu).item())
            n_drop = min(max(n_drop - first, 0), B)          # this rank's share of the first rows
            y = torch.cat([null_like(net, y[:n_drop]), y[n_drop:]])
            v_tilde = torch.cat([v[:n_drop], v_tilde[n_drop:]])  # dropped rows: the unguided v
        return v_tilde, y, evals

    @torch.no_grad()
    def time_derivative(self, jnet, z, r, t, y, v_tilde) -> torch.Tensor:
        """du/dt = J_z u·ṽ + ∂_t u (docs/spec/mf.md §1.2), no grad, on the JVP view of `jnet` (engine/dist.py), in
        the JVP precision."""
        jnet = dist.jvp_view(jnet)
        dual = getattr(jnet, "jvp", None)
        if self.jvp_mode == "dual" and dual is None:
            raise TypeError(f"jvp='dual' needs a network with a dual-stream jvp method (engine.networks.DiT); "
                            f"{type(jnet).__name__} has none")
        zz, rr, tt, vv = jvp_ops.at_least_fp32(self.jvp_precision, z, r, t, v_tilde)
        with jvp_ops.precision(self.jvp_precision, z.device):
            if self.jvp_mode == "fd":
                d = jvp_ops.central_difference(lambda a, b: jnet(a, b, rr, y), (zz, tt), (vv, torch.ones_like(tt)),
                                           self.fd_step)
            elif self.jvp_mode != "func" and dual is not None:
                d = dual(zz, tt, rr, y, vv, torch.ones_like(tt), torch.zeros_like(rr), gather=dist.unsharded)[1]
            else:
                d = torch.func.jvp(lambda a, b, c: jnet(a, c, b, y), (zz, rr, tt),
                                   (vv, torch.zeros_like(rr), torch.ones_like(tt)))[1]
        return d.to(z.dtype)

    def __call__(self, net, images, labels, rng: StepRNG) -> LossOutput:
        x = images.to(noise_dtype(images))
        B, device = x.shape[0], x.device
        t, r, n_eq = self.sample_times(B, rng, device, x.dtype)
        eps = rng.randn(x.shape, device, x.dtype)
        z = (1 - _view(t, x)) * x + _view(t, x) * eps
        v = eps - x
        y = null_labels(net, labels, B, device)
        v_tilde, y, evals = self.target_velocity(net, z, t, v, y, rng, labels is not None)
        # du/dt along (ṽ, 0, 1) in (z, r, t), no grad, only where r ≠ t
        dudt = torch.zeros_like(x)
        if n_eq < B or dist.is_distributed():  # sharded weights are gathered collectively: every rank takes part
            sl = slice(n_eq, B)
            d = self.time_derivative(self.jvp_net or net, z[sl], r[sl], t[sl], y[sl], v_tilde[sl])
            dudt = torch.cat([dudt[:n_eq], d])
        u_tgt = (v_tilde - _view(t - r, x) * dudt).detach()
        u = net(z, t, r, y).to(x.dtype)
        e = (u - u_tgt).square().reshape(B, -1).sum(1)
        loss = e / (e.detach() + self.c) ** self.p
        passes = 2 if self.jvp_mode == "fd" else 1   # the JVP: one pass, or two forwards
        return LossOutput(loss=loss, pairs=B, student_forward=B + evals + passes * (B - n_eq), student_backward=B)


@torch.no_grad()
def pair_indices(rule: str, steps: int = 8) -> list[tuple[int, int]]:
    """Pairs (i, j) of trajectory states, i the input and j the target end, for the states z_{t_k}, t_k = k/steps
    (index k; k = steps is the noise). docs/spec/mf.md §4.3."""
    if rule not in PAIR_RULES:
        raise ValueError(f"pair rule must be one of {PAIR_RULES}, got {rule!r}")
    ks = range(steps + 1)
    pairs = [(i, j) for i in ks for j in ks if i > j]
    if rule == "nonadjacent28":
        pairs = [(i, j) for i, j in pairs if i - j >= 2]
    elif rule == "drop_start28":
        pairs = [(i, j) for i, j in pairs if i <= steps - 1]
    elif rule == "drop_end28":
        pairs = [(i, j) for i, j in pairs if j >= 1]
    return pairs


class CMTMeanFlow(Objective):
    """CMT mid-training for Mean Flow (docs/spec/mf.md §4). Per step `trajectories_per_batch` teacher trajectories on
    the uniform grid t_k = k/N (N = 8; the 'grid8' rule uses 7 steps), from ε with the data's labels:

      teacher='mf'   one Mean Flow step per interval: z_{k−1} = z_k − (1/N)·u_T(z_k, t_{k−1}, t_k)   (N NFE)
      teacher='fm'   Heun on the flow-matching velocity (Euler predictor, trapezoidal corrector, the last step
                     plain Euler), with CFG weight `guidance` on the velocity (2N − 1 NFE, ×2 with CFG)

    and every pair of the rule gives input (z_{t_i}, r = t_j, t = t_i) and target (z_{t_i} − z_{t_j})/(t_i − t_j),
    loss ‖u_θ − target‖² summed over elements (no weighting). `batch_size` = trajectories × pairs per trajectory.
    `pairs_per_trajectory` (default: all of the rule's) trains on a random subset of that many pairs per trajectory
    instead — more trajectories for the same pairs per step (the paper uses all 28 of 4 trajectories)."""

    name = "cmt_mf"

    def __init__(self, teacher, teacher_kind: str = "mf", pair_rule: str = "nonadjacent28",
                 trajectories_per_batch: int = 4, steps: int = 8, guidance: float | None = None,
                 pairs_per_trajectory: int | None = None):
        if teacher_kind not in ("mf", "fm"):
            raise ValueError(f"teacher_kind must be 'mf' (Mean Flow teacher) or 'fm' (flow matching), got "
                             f"{teacher_kind!r}")
        self.teacher, self.kind = freeze(teacher), teacher_kind
        self.steps = 7 if pair_rule == "grid8" else int(steps)
        self.pairs = pair_indices(pair_rule, self.steps)
        self.rule, self.trajectories_per_batch = pair_rule, int(trajectories_per_batch)
        self.guidance = None if guidance is None else float(guidance)
        k = len(self.pairs) if pairs_per_trajectory is None else int(pairs_per_trajectory)
        if not 1 <= k <= len(self.pairs):
            raise ValueError(f"pairs_per_trajectory must be in 1 … {len(self.pairs)} ({pair_rule}), got "
                             f"{pairs_per_trajectory}")
        self.per_trajectory = k

    def pair_index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs' grid indices (i, j) as tensors on `device`, made on the first step and kept: built from the
        host list on every step they were a host-to-device copy a step (tests/test_host_traffic.py)."""
        cache = self.__dict__.setdefault("_pair_index", {})
        device = torch.device(device)
        if device not in cache:
            cache[device] = (torch.tensor([p[0] for p in self.pairs], device=device),
                             torch.tensor([p[1] for p in self.pairs], device=device))
        return cache[device]

    def images_per_step(self, batch_size: int) -> int:
        n = self.trajectories_per_batch * self.per_trajectory
        if batch_size != n:
            raise ValueError(f"CMT-MF trains on trajectories_per_batch × pairs = {self.trajectories_per_batch} × "
                             f"{self.per_trajectory} ({self.rule}) = {n} pairs per step, but batch_size is "
                             f"{batch_size}")
        return self.trajectories_per_batch

    def velocity(self, z, t: float, y):
        B = z.shape[0]
        tt = torch.full((B,), t, device=z.device, dtype=z.dtype)
        with phase("teacher"):
            v = self.teacher(z, tt, tt, y).to(z.dtype)
            if self.guidance is not None:
                v_null = self.teacher(z, tt, tt, null_like(self.teacher, y)).to(z.dtype)
                v = v_null + self.guidance * (v - v_null)
        return v

    @torch.no_grad()
    def trajectory(self, eps: torch.Tensor, y) -> tuple[torch.Tensor, int]:
        """States [N + 1, m, ...] indexed by k (t_k = k/N; index N is ε) and the teacher NFE per trajectory: the
        teacher ODE solved from t = 1 to 0 by engine/solvers.py (Mean Flow steps, or Heun on the velocity)."""
        N = self.steps
        ts = [k / N for k in range(N, -1, -1)]
        if self.kind == "mf":
            states, nfe = mean_flow_trajectory(self.teacher, eps, ts, y), N
        else:
            states = flow_heun_trajectory(lambda z, t: self.velocity(z, t, y), eps, ts)
            nfe = (2 * N - 1) * (2 if self.guidance is not None else 1)
        return states.flip(0), nfe

    def __call__(self, net, images, labels, rng: StepRNG) -> LossOutput:
        m, device = images.shape[0], images.device
        eps = rng.randn(images.shape, device, noise_dtype(images))
        y = null_labels(self.teacher, labels, m, device)
        traj, nfe = self.trajectory(eps, y)
        N, P = self.steps, len(self.pairs)
        i_all, j_all = self.pair_index(device)
        if self.per_trajectory == P:                                  # every pair of every trajectory
            sel = torch.arange(P, device=device).expand(m, P)
        else:  # a random subset per trajectory, drawn on the device for the global batch (this rank's rows)
            sel = rng.rand((m, P), device).argsort(dim=1)[:, :self.per_trajectory]
        k = sel.shape[1]
        i, j = i_all[sel].t(), j_all[sel].t()                         # [k, m]: pair-major, entry q·m + b
        b = torch.arange(m, device=device).expand(k, m)
        zi, zj = traj[i, b], traj[j, b]                               # [k, m, ...]
        ti, tj = i.to(eps.dtype) / N, j.to(eps.dtype) / N
        target = (zi - zj) / (ti - tj).reshape(k, m, *([1] * (eps.ndim - 1)))
        z_in = zi.reshape(k * m, *eps.shape[1:])
        u = net(z_in, ti.reshape(-1), tj.reshape(-1), repeat_rows(y, k)).to(eps.dtype)
        loss = (u - target.reshape(k * m, *eps.shape[1:])).square().reshape(k * m, -1).sum(1)
        P = k
        return LossOutput(loss=loss, pairs=P * m, teacher_nfe=nfe * m, student_forward=P * m,
                          student_backward=P * m)
