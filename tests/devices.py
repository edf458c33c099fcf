"""The devices a numerical test runs on: always the CPU (Triton's interpreter for the kernels), and CUDA where one
is present. A CUDA case carries the `gpu` mark, so `pytest -m gpu` (bench/gpu_check.py's tests section) runs
exactly the CUDA cases: the compiled Triton kernels, the CUDA-graph teacher and the training loop on the GPU,
against the same references and tolerances as on the CPU."""
import pytest
import torch

CUDA = pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]
