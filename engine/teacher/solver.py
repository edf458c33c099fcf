"""The frozen teacher's DPM-Solver++ trajectory, captured once into a CUDA graph and replayed every iteration.

In CMT each iteration integrates an N-step teacher trajectory on a small batch (8 trajectories): N network calls
and N solver updates, each a string of small kernels whose launch costs exceed their run time on a GPU. A CUDA
graph records the whole solve — every network call and every fused update (docs/spec/cm.md §2) — once per (batch
shape, dtype, device, labels), with static input and output buffers, and each iteration only copies x_T and the
labels in and replays it.

    solver = TeacherSolver(teacher, logsnr_sigmas(16))
    traj = solver(x_T, labels)      # [N + 1, B, ...], the same as dpm_solver_pp(teacher, x_T, sigmas, ...)

Falls back to eager execution, logging why once per shape, on CPU tensors, with `graphs=False`, when the teacher
is an nn.Module in training mode (dropout would need its random state registered with the graph), or when the
capture itself fails (a host synchronisation inside the teacher, an unsupported op).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine import dist
from engine.precond import as_class_labels
from engine.solvers import DPMSolverPlan, dpm_solver_plan, run_dpm_solver

log = logging.getLogger(__name__)


class _Graph:
    """One captured solve and its static buffers."""

    def __init__(self, graph, x, labels, out):
        self.graph, self.x, self.labels, self.out = graph, x, labels, out


class TeacherSolver:
    """`solver(x_T, labels=None) -> trajectory [N + 1, *x_T.shape]` (a fresh tensor each call), graph-replayed
    on CUDA. `warmup` eager solves on a side stream precede each capture (they compile the Triton kernels and let
    cuDNN pick its algorithms outside the graph). `eager_reason(x)` says why a call would not use a graph."""

    def __init__(self, teacher, sigmas, order: int = 3, lower_order_final: bool = True,
                 third_order: str = "upstream", graphs: bool = True, warmup: int = 2):
        self.teacher = teacher
        self.sigmas = sigmas
        self.order, self.lower_order_final, self.third_order = order, lower_order_final, third_order
        self.graphs, self.warmup = bool(graphs), int(warmup)
        self._plans: dict[tuple, DPMSolverPlan] = {}
        self._captured: dict[tuple, _Graph | None] = {}  # None: capture failed for this key, run eagerly
        self._pool = None                                   # one memory pool shared by every captured shape
        self._logged: set = set()
        self.replays = 0

    @property
    def failed_captures(self) -> int:
        """How many batch keys run eagerly because their capture failed. Derived, not an attribute: a stage's
        identity describes the solver by its attributes (engine/training/stage_config.py describe_object), and a
        counter added there would refuse to resume every run written before it (tests/test_resume.py)."""
        return sum(g is None for g in self._captured.values())

    # -- the two paths ---------------------------------------------------------------------------------------

    def plan(self, x: torch.Tensor) -> DPMSolverPlan:
        key = (x.device, x.dtype)
        if key not in self._plans:
            self._plans[key] = dpm_solver_plan(self.sigmas, self.order, self.lower_order_final, self.third_order,
                                               x.device, x.dtype)
        return self._plans[key]

    def eager(self, x_T: torch.Tensor, labels=None) -> torch.Tensor:
        return run_dpm_solver(self.teacher, x_T, self.plan(x_T), self._labels(labels, x_T))

    def eager_reason(self, x_T: torch.Tensor) -> str | None:
        if not self.graphs:
            return "CUDA graphs are switched off (graphs=False)"
        if x_T.device.type != "cuda":
            return f"CUDA graphs need CUDA tensors; the state is on {x_T.device}"
        if isinstance(self.teacher, nn.Module) and self.teacher.training:
            return "the teacher is in training mode (dropout draws random numbers); call teacher.eval()"
        if isinstance(self.teacher, nn.Module) and dist.is_distributed() and dist.is_sharded(self.teacher):
            return "the teacher is FSDP-sharded (StageConfig.shard_teacher): its parameter gathers are collectives"
        return None

    def __call__(self, x_T: torch.Tensor, labels=None) -> torch.Tensor:
        reason = self.eager_reason(x_T)
        labels = self._labels(labels, x_T)
        key = self._key(x_T, labels)
        if reason is None and self._captured.get(key, True) is not None:
            g = self._captured.get(key) or self._capture(key, x_T, labels)
            if g is not None:
                g.x.copy_(x_T)
                if labels is not None:
                    g.labels.copy_(labels)
                g.graph.replay()
                self.replays += 1
                return g.out.clone()
            reason = "capture failed (logged above)"
        self._log_once(key, f"teacher trajectory runs eagerly: {reason}")
        return run_dpm_solver(self.teacher, x_T, self.plan(x_T), labels)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _labels(self, labels, x: torch.Tensor):
        """Class indices become one-hot rows here, outside any graph: validating indices reads them on the host,
        which a capture cannot do, and a float [B, L] buffer is what the graph copies into."""
        if labels is None:
            return None
        label_dim = int(getattr(getattr(self.teacher, "model", None), "label_dim", 0) or 0)
        labels = torch.as_tensor(labels, device=x.device)
        if label_dim and not labels.is_floating_point():
            return as_class_labels(labels, label_dim, x.shape[0], x.device, torch.float32)
        return labels

    @staticmethod
    def _key(x: torch.Tensor, labels) -> tuple:
        lab = None if labels is None else (tuple(labels.shape), labels.dtype)
        # autocast changes which kernels the network records, so it is part of what a graph was captured for
        autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)
        return tuple(x.shape), x.dtype, x.device, lab, autocast

    def _log_once(self, key, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.info(message)

    def _capture(self, key, x_T: torch.Tensor, labels) -> _Graph | None:
        """Warm up on a side stream, then capture one solve. The capture uses the thread-local error mode: what
        other threads do meanwhile (a DataLoader's pin-memory thread allocating pinned memory) is not part of the
        capture and cannot invalidate it, while anything unsafe this thread does still fails it. A failed capture
        is not retried for its key; its graph and the memory pool that went through the aborted capture are
        dropped and the cached blocks released, so the eager solves that follow start from a clean allocator."""
        plan = self.plan(x_T)
        static_x = x_T.clone()
        static_labels = None if labels is None else labels.clone()
        static_out = torch.empty((plan.num_steps + 1, *x_T.shape), dtype=x_T.dtype, device=x_T.device)
        graph = None
        try:
            side = torch.cuda.Stream(device=x_T.device)
            side.wait_stream(torch.cuda.current_stream(x_T.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    run_dpm_solver(self.teacher, static_x, plan, static_labels, out=static_out)
            torch.cuda.current_stream(x_T.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                run_dpm_solver(self.teacher, static_x, plan, static_labels, out=static_out)
        except Exception as exc:  # any failure: this key runs eagerly from now on, and we say why
            log.warning("CUDA-graph capture of the teacher trajectory failed for batch %s %s (%s: %s); "
                        "running it eagerly", tuple(x_T.shape), x_T.dtype, type(exc).__name__, exc)
            self._captured[key] = None
            del graph, static_x, static_labels, static_out
            self._pool = None            # the next capture (another shape) gets a pool that saw no abort
            torch.cuda.synchronize(x_T.device)
            torch.cuda.empty_cache()
            return None
        log.info("captured the %d-step teacher trajectory for batch %s %s into a CUDA graph", plan.num_steps,
                 tuple(x_T.shape), x_T.dtype)
        g = _Graph(graph, static_x, static_labels, static_out)
        self._captured[key] = g
        return g
