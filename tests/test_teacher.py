"""The CUDA-graph teacher (engine/teacher/solver.py): eager fallback on CPU equal to dpm_solver_pp, and on a GPU the
captured trajectories equal to the eager ones."""
import contextlib
import logging

import pytest
import torch

from engine.data import GaussianMixture
from engine.networks import build_network
from engine.precond import EDMPrecond
from engine.schedules import logsnr_sigmas
from engine.solvers import dpm_solver_pp
from engine.teacher.solver import TeacherSolver

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_unet(label_dim=0):
    torch.manual_seed(0)
    net = build_network("digits-ddpmpp", img_resolution=8, model_channels=8, label_dim=label_dim, dropout=0.1)
    return EDMPrecond(net).eval().requires_grad_(False)


def test_cpu_runs_eagerly_equal_to_dpm_solver_pp(caplog):
    teacher = small_unet()
    sig = logsnr_sigmas(16)
    solver = TeacherSolver(teacher, sig)
    x_T = torch.randn(3, 1, 8, 8) * 80
    with caplog.at_level(logging.INFO, logger="engine.teacher.solver"):
        traj = solver(x_T)
        solver(x_T)
    assert torch.equal(traj, dpm_solver_pp(teacher, x_T, sig))
    assert solver.replays == 0
    reasons = [r.getMessage() for r in caplog.records]
    assert reasons == ["teacher trajectory runs eagerly: CUDA graphs need CUDA tensors; the state is on cpu"]


def test_eager_reasons():
    teacher = small_unet()
    x = torch.zeros(2, 1, 8, 8)
    assert "switched off" in TeacherSolver(teacher, logsnr_sigmas(4), graphs=False).eager_reason(x)
    assert "CUDA tensors" in TeacherSolver(teacher, logsnr_sigmas(4)).eager_reason(x)


def test_class_labels_become_one_hot_outside_the_graph():
    teacher = small_unet(label_dim=10)
    sig = logsnr_sigmas(6)
    x_T = torch.randn(4, 1, 8, 8) * 80
    labels = torch.tensor([0, 3, 9, 3])
    traj = TeacherSolver(teacher, sig)(x_T, labels)
    assert torch.equal(traj, dpm_solver_pp(teacher, x_T, sig, labels=labels))
    with pytest.raises(ValueError, match="class index out of range"):
        TeacherSolver(teacher, sig)(x_T, torch.tensor([0, 1, 2, 10]))


@cuda
@pytest.mark.gpu
def test_graph_replay_equals_eager_on_gpu(caplog):
    teacher = small_unet(label_dim=10).cuda()
    sig = logsnr_sigmas(16)
    solver = TeacherSolver(teacher, sig)
    for batch in (8, 5, 8):                              # a second shape gets its own graph; 8 replays again
        x_T = torch.randn(batch, 1, 8, 8, device="cuda") * 80
        labels = torch.randint(0, 10, (batch,), device="cuda")
        traj = solver(x_T, labels)
        ref = solver.eager(x_T, labels)
        torch.testing.assert_close(traj, ref, rtol=1e-5, atol=1e-5)
    assert solver.replays == 3 and len([g for g in solver._captured.values() if g is not None]) == 2


@cuda
@pytest.mark.gpu
def test_capture_failure_falls_back_with_a_reason(caplog):
    """The analytic teacher computes on the host (a device → host copy): capture fails, eager runs."""
    gm = GaussianMixture.random(4, (1, 8, 8), seed=0)
    solver = TeacherSolver(gm.denoise, logsnr_sigmas(8))
    x_T = torch.randn(3, 1, 8, 8, device="cuda") * 80
    with caplog.at_level(logging.INFO, logger="engine.teacher.solver"):
        traj = solver(x_T)
    assert any("capture of the teacher trajectory failed" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(traj, dpm_solver_pp(gm.denoise, x_T, logsnr_sigmas(8)))


@cuda
@pytest.mark.gpu
def test_graph_of_the_compiled_teacher_equals_eager_on_gpu():
    """The teacher's blocks compiled with inductor (engine/training/compiled.py) and the whole solve captured in a CUDA
    graph: compilation happens in the capture's warm-up, and the replayed trajectory equals the eager one's."""
    import copy

    from engine.training.compiled import compile_regions
    teacher = small_unet(label_dim=10).cuda()
    compiled = copy.deepcopy(teacher)
    compile_regions(compiled, "default")
    sig = logsnr_sigmas(16)
    solver = TeacherSolver(compiled, sig)
    x_T = torch.randn(8, 1, 8, 8, device="cuda") * 80
    labels = torch.randint(0, 10, (8,), device="cuda")
    for _ in range(2):
        traj = solver(x_T, labels)
    assert solver.replays == 2
    torch.testing.assert_close(traj, TeacherSolver(teacher, sig, graphs=False)(x_T, labels), rtol=1e-4, atol=1e-4)


def test_a_failed_capture_is_not_retried_and_leaves_a_clean_allocator(monkeypatch):
    """On CPU, with stand-ins for the CUDA calls: the capture runs in the thread-local error mode (a DataLoader's
    pin-memory thread cannot invalidate it); when it fails, that shape runs eagerly from then on without a second
    capture, the pool that saw the abort is dropped, and the cached blocks are released."""
    calls = {"capture": 0, "empty_cache": 0, "synchronize": 0, "modes": []}

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            raise AssertionError("no graph should be replayed")

    class Capture:
        def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
            calls["modes"].append(capture_error_mode)

        def __enter__(self):
            calls["capture"] += 1
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool",))
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.__setitem__(
        "synchronize", calls["synchronize"] + 1))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.__setitem__("empty_cache", calls["empty_cache"] + 1))
    teacher = GaussianMixture.random(3, (2,), seed=0)
    solver = TeacherSolver(teacher, logsnr_sigmas(4))
    monkeypatch.setattr(solver, "eager_reason", lambda x: None)     # as if the state were on a GPU
    x = torch.randn(5, 2, dtype=torch.float64) * 80
    want = dpm_solver_pp(teacher, x, logsnr_sigmas(4))
    for _ in range(3):
        torch.testing.assert_close(solver(x), want, rtol=0, atol=0)
    assert calls["capture"] == 1 and calls["modes"] == ["thread_local"]
    assert solver.failed_captures == 1 and solver._pool is None
    assert calls["empty_cache"] == 1 and calls["synchronize"] == 1
