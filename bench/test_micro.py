"""Micro-benchmarks of the fast paths beside their references (the dispatch point is engine/ops.py): the fused
third-order DPM-Solver++ update, EDM's preconditioning, attention, and the teacher's 16-step solve (a CUDA graph on
a GPU). On CPU the engine's paths are the references themselves (kernels are CUDA-only outside the Triton
interpreter), so the pairs measure the same code there; on a GPU they are the comparison bench/RESULTS.md reports.

    python -m pytest -n0 bench/ --benchmark-only             # results under bench/results/micro/
    python -m pytest -n0 bench/ --benchmark-disable -q       # each once, as a test (what CI runs)

(-n0: one process, since pytest.ini's two xdist workers would make pytest-benchmark disable itself.)
"""
from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.kernels import dpm_solver as dpm_ref
from engine.kernels import precond as pre_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (128, 3, 32, 32)                     # CIFAR-10, the paper's batch


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    def run():
        out = fn()
        _sync()
        return out
    return run


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).to(DEVICE)
    hist = [torch.randn(SHAPE, generator=g).to(DEVICE) for _ in range(3)]
    return x, hist, torch.rand(SHAPE[0], generator=g).to(DEVICE) * 80 + 0.002


@pytest.mark.benchmark(group="dpm_solver_update")
@pytest.mark.parametrize("path", ["engine", "reference"])
def test_dpm_solver_update(benchmark, tensors, path):
    x, hist, _ = tensors
    coef = [0.9, -0.3, 0.2, -0.05]
    out = torch.empty_like(x)
    fn = (lambda: ops.dpm_solver_update(x, hist, coef, out)) if path == "engine" else \
        (lambda: dpm_ref.update_reference(x, hist, coef, out))
    res = benchmark(timed(fn))
    torch.testing.assert_close(res, dpm_ref.update_reference(x, hist, coef, None))


@pytest.mark.benchmark(group="precond")
@pytest.mark.parametrize("path", ["engine", "reference"])
def test_precond_output(benchmark, tensors, path):
    x, hist, sigma = tensors
    fn = (lambda: ops.precond_output(x, hist[0], sigma, 0.5)) if path == "engine" else \
        (lambda: pre_ref.output_reference(x, hist[0], sigma, 0.5, 0.0, False))
    res = benchmark(timed(fn))
    torch.testing.assert_close(res, pre_ref.output_reference(x, hist[0], sigma, 0.5, 0.0, False))


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("path", ["engine", "sdpa"])
def test_attention(benchmark, path):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 16, 256, 72, generator=g).to(DEVICE) for _ in range(3))   # DiT-XL/2 heads
    fn = (lambda: ops.attention(q, k, v)) if path == "engine" else \
        (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    res = benchmark(timed(fn))
    torch.testing.assert_close(res, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.benchmark(group="teacher_solve")
@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "eager"])
def test_teacher_solve(benchmark, graphs):
    from engine.networks.configs import build_network
    from engine.precond import EDMPrecond
    from engine.schedules import logsnr_sigmas
    from engine.teacher.solver import TeacherSolver
    torch.manual_seed(0)
    teacher = EDMPrecond(build_network("digits-ddpmpp"), sigma_data=0.5).to(DEVICE).eval().requires_grad_(False)
    solver = TeacherSolver(teacher, logsnr_sigmas(16, 80.0, 0.002), order=3, graphs=graphs)
    x = torch.randn(8, 1, 8, 8, device=DEVICE) * 80
    with torch.no_grad():
        traj = benchmark(timed(lambda: solver(x)))
    assert traj.shape == (17, 8, 1, 8, 8) and torch.isfinite(traj).all()
