"""The devices a numerical test runs on: always the CPU (Triton's interpreter for the kernels), and CUDA where one
is present. A CUDA case carries the `gpu` mark, so `pytest -m gpu` (bench/gpu_check.py's tests section) runs
exactly the CUDA cases: the compiled Triton kernels, the CUDA-graph teacher and the training loop on the GPU,
against the same references and tolerances as on the CPU."""
import pytest
import torch

CUDA = pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]

# Triton's interpreter runs the attention kernel only where it can loop over a runtime bound (kernels/runtime.py
# interpreter_runs_loops: not Triton 3.6 with NumPy 2.4); the CPU cases of that kernel skip elsewhere, saying why.
def _interpreter_loops() -> bool:
    from engine.kernels import runtime
    return runtime.interpreter_runs_loops()


INTERPRETED_ATTENTION = pytest.mark.skipif(not _interpreter_loops(), reason="this Triton's interpreter cannot run "
                                           "the attention kernel's loop over keys with this NumPy")

