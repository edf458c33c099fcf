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
at the cost of a few integer operations in a bandwidth-bound kernel. That is `store_as`, the one store every
kernel's output goes through.

Helpers. A kernel may call helpers (`Kernel(fn, helpers=(...))`): plain Python functions written once with
`triton.language`. The interpreter runs them as they are (it runs the kernel body as Python with the language
patched, and cannot call a `triton.jit` function from there); for the compiled form the kernel is rebound to
`triton.jit` versions of them, which the compiler inlines. One definition, both forms.
"""
from __future__ import annotations

import dataclasses
import logging
import types

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a CPU-only install without Triton: the dispatch point uses the references
    triton = None
    InterpretedFunction = None

    class OutOfResources(Exception):
        pass

log = logging.getLogger(__name__)
# Launch shapes a chip could not hold (key → reason): their callers take the reference path from then on.
UNFIT: dict = {}


def unfit(key, reason: str) -> None:
    """Record that a specialisation does not fit its device, and say so once."""
    if key not in UNFIT:
        UNFIT[key] = reason
        log.warning(reason)


def require() -> None:
    if triton is None:
        raise RuntimeError("the Triton kernels were requested (ENGINE_KERNELS=triton) but Triton is not installed; "
                           "`pip install triton` (CPU machines run the kernels in its interpreter), or set "
                           "ENGINE_KERNELS=ref")


# Shared memory per block a kernel may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability.
SHARED_LIMIT = {90: 232_448, 80: 166_912}


@dataclasses.dataclass
class Specialisation:
    """One compiled form of a kernel, as its launcher sends it: argument types, constexprs, launch options. Each
    kernel module lists its own (`specialisations()`, from the `launch_config` its launcher uses), and
    bench/kernels_aot.py compiles them for real GPU targets without a GPU."""
    kernel: str                 # the kernel's name, e.g. "attention_jvp"
    fn: object                  # the `triton.jit` function (Kernel.compiled)
    signature: dict             # argument name → Triton type ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict            # constexpr name → value
    options: dict               # num_warps, num_stages
    label: str                  # what distinguishes it, for the table (dtype, head dim, variant)
    tensor_cores: bool = False  # whether the path is meant to run on the tensor cores

    def key(self) -> str:
        return f"{self.kernel} {self.label}"


def pointer(dtype: torch.dtype) -> str:
    """Triton's signature type of a pointer to `dtype`."""
    return "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def f64_parts(x: float) -> tuple[float, float, float]:
    """`x` as hi + mid + lo, each exactly a float32. A compiled Triton kernel receives a Python float argument as
    fp32, which would round an fp64 run's scalars (σ, coefficients, scales) to 24 bits; the fp64 kernels take the
    three parts and add them in fp64 (`join64`), which gives x back exactly (53 ≤ 3 × 24 bits) for |x| in fp32's
    normal range. The fp32 kernels use hi alone: the value the compiled kernel always saw."""
    import numpy as np
    x = float(x)
    hi = float(np.float32(x))
    mid = float(np.float32(x - hi))
    lo = float(np.float32(x - hi - mid))
    return hi, mid, lo


def interpreter_runs_loops() -> bool:
    """Whether Triton's interpreter can run a kernel loop over a runtime bound (the attention kernel's loop over
    keys). Triton 3.6's interpreter converts the bound with int() of a one-element array, which NumPy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); later Triton squeezes it first. Compiled
    kernels are not affected."""
    if triton is None:
        return False
    import inspect

    import numpy as np
    from triton.runtime import interpreter
    try:
        int(np.ones(1))
        return True
    except TypeError:
        return "handle.data.squeeze()" in inspect.getsource(interpreter)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _rebound(fn, names: dict):
    """`fn` with `names` replacing globals of the same name (the same code and source lines)."""
    out = types.FunctionType(fn.__code__, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__qualname__, out.__module__, out.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    out.__annotations__, out.__kwdefaults__ = fn.__annotations__, fn.__kwdefaults__
    return out


class Kernel:
    """A Triton kernel in both forms; `kernel[grid](*args, **meta)` launches the one the tensors' device needs.
    `helpers`: the plain functions the kernel calls by their global names (module docstring)."""

    def __init__(self, fn, helpers=()):
        require()
        self.fn = fn
        jitted = {h.__name__: triton.jit(h) for h in helpers}
        self.compiled = triton.jit(_rebound(fn, jitted) if jitted else fn)
        self.interpreted = InterpretedFunction(fn)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            if device.type == "cpu":
                for option in ("num_warps", "num_stages"):  # GPU launch parameters: the interpreter runs one
                    meta.pop(option, None)                  # program at a time
                return self.interpreted[grid](*args, **meta)
            # Triton launches on the current device: without this guard, tensors on cuda:1 in a process whose
            # current device is cuda:0 would be read by a kernel running on the wrong chip.
            with torch.cuda.device(device):
                return self.compiled[grid](*args, **meta)
        return launch


if triton is not None:
    def join64(hi, mid, lo, FP64: tl.constexpr):
        """A scalar passed as `f64_parts`: in fp64 for the fp64 kernels, else its fp32 part."""
        if FP64:
            value = tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
        else:
            value = hi
        return value

    def store_as(ptr, offs, y, mask, BF16: tl.constexpr):
        """tl.store(ptr + offs, y) converted to the pointer's element type; for bf16, rounded to nearest even by
        hand (module docstring), NaN kept as the canonical quiet NaN."""
        if BF16:
            u = y.to(tl.float32).to(tl.uint32, bitcast=True)
            r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.uint16)
            r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r).to(tl.uint16)
            tl.store(ptr + offs, r.to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=mask)
