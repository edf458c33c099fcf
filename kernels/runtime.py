"""Triton, when installed, and one launcher that runs a kernel compiled on CUDA tensors and in Triton's interpreter
on CPU tensors.

Triton picks compiled-or-interpreted once, when a function is decorated (TRITON_INTERPRET=1 makes `triton.jit`
return an interpreter). We keep both forms of every kernel and choose per launch from the tensors' device, so
that one process can run the CPU tests of the kernels (interpreter) and, on a GPU machine, the compiled kernels;
TRITON_INTERPRET=1 still forces the interpreter everywhere, as Triton documents.

bf16 stores. The GPU's fp32 → bf16 conversion rounds to nearest even; Triton's interpreter (3.x) truncates
instead, which would make the CPU check of a kernel measure a different rounding from the one the GPU runs. The
kernels therefore round fp32 → bf16 themselves with the usual integer trick (add 0x7FFF plus the lowest kept
bit, keep the top 16 bits; NaN mapped to the canonical quiet NaN): the same code and the same rounding on both,
at the cost of a few integer operations in a bandwidth-bound kernel.
"""
from __future__ import annotations

import torch

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a CPU-only install without Triton: the dispatch point uses the references
    triton = None
    InterpretedFunction = None


def require() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels were requested (ENGINE_KERNELS=triton) but Triton is not installed; "
                           "`pip install triton` (CPU machines run the kernels in its interpreter), or set "
                           "ENGINE_KERNELS=ref")


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class Kernel:
    """A Triton kernel in both forms; `kernel[grid](*args, **meta)` launches the one the tensors' device needs."""

    def __init__(self, fn):
        require()
        self.fn = fn
        self.compiled = triton.jit(fn)
        self.interpreted = InterpretedFunction(fn)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            if device.type == "cpu":
                meta.pop("num_warps", None)  # a GPU launch parameter; the interpreter runs one program at a time
                return self.interpreted[grid](*args, **meta)
            return self.compiled[grid](*args, **meta)
        return launch
