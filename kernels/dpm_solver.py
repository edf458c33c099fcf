"""Fused multistep DPM-Solver++ update (docs/spec/cm.md §2.5) and its PyTorch reference.

Every update of order 1, 2 or 3 is a fixed linear combination of the state and the last k denoiser outputs,

    x_next = a·x + b0·M0 + b1·M1 + b2·M2          (M0 newest),

with (a, b0, b1, b2) computed once per σ grid on the host in float64 from h, r0, r1, φ1, φ2, φ3
(`engine.solvers.dpm_solver_pp_coefficients`). The reference runs it as PyTorch's eager sequence (a multiply and
up to three add-multiplies, each a kernel that reads and writes the whole state); the Triton kernel reads x and
the k outputs once and writes the next state once — straight into its slot of the preallocated trajectory buffer
when given one. Arithmetic is in fp32 (fp64 for fp64 storage) whatever the storage, with a single rounding to
the storage dtype at the store; the coefficients reach the kernel as fp32 scalars, as PyTorch's own scalar
arithmetic on fp32/bf16 tensors rounds them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.kernels import runtime

BLOCK = 1024
NUM_WARPS = 4


def update_reference(x: torch.Tensor, history: Sequence[torch.Tensor], coef: Sequence[float],
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's eager sequence: out = x·a, then out += b_j·M_j for each given output (newest first)."""
    a, *b = (float(c) for c in coef)
    acc = x * a
    for bj, m in zip(b, history):
        if bj != 0.0:
            acc = acc + bj * m
    if out is None:
        return acc
    out.copy_(acc)
    return out


def _check(x: torch.Tensor, history: Sequence[torch.Tensor], coef: Sequence[float], out: torch.Tensor) -> None:
    if not 1 <= len(history) <= 3:
        raise ValueError(f"a DPM-Solver++ update takes 1 to 3 denoiser outputs, got {len(history)}")
    if len(coef) != 4:
        raise ValueError(f"coefficients must be (a, b0, b1, b2), got {len(coef)} values")
    for name, t in [("x", x), *[(f"history[{j}]", m) for j, m in enumerate(history)], ("out", out)]:
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype} on {t.device}; every operand of the fused "
                             f"update must match x: {tuple(x.shape)} {x.dtype} on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the fused update")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"the fused update stores fp32, bf16, fp16 or fp64, got {x.dtype}")


if runtime.triton is not None:
    import triton.language as tl

    from engine.kernels.runtime import join64, store_as

    def _update_kernel(x_ptr, m0_ptr, m1_ptr, m2_ptr, out_ptr, a_hi, a_mid, a_lo, b0_hi, b0_mid, b0_lo, b1_hi,
                       b1_mid, b1_lo, b2_hi, b2_mid, b2_lo, n,
                       K: tl.constexpr, FP64: tl.constexpr, BF16_OUT: tl.constexpr, BLOCK: tl.constexpr):
        # K = number of denoiser outputs read (the step's order); the others' pointers are never touched.
        # Coefficients arrive as runtime.f64_parts, so an fp64 update uses them to the last bit.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n  # the tail block of any size
        acc_t = tl.float64 if FP64 else tl.float32
        a = join64(a_hi, a_mid, a_lo, FP64)
        b0 = join64(b0_hi, b0_mid, b0_lo, FP64)
        b1 = join64(b1_hi, b1_mid, b1_lo, FP64)
        b2 = join64(b2_hi, b2_mid, b2_lo, FP64)
        acc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t) * a
        acc += tl.load(m0_ptr + offs, mask=mask, other=0.0).to(acc_t) * b0
        if K >= 2:
            acc += tl.load(m1_ptr + offs, mask=mask, other=0.0).to(acc_t) * b1
        if K >= 3:
            acc += tl.load(m2_ptr + offs, mask=mask, other=0.0).to(acc_t) * b2
        store_as(out_ptr, offs, acc, mask, BF16_OUT)  # bf16 rounded to nearest even (kernels/runtime.py)

    _k_update = runtime.Kernel(_update_kernel, helpers=(store_as, join64))


def update_triton(x: torch.Tensor, history: Sequence[torch.Tensor], coef: Sequence[float],
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel: one read of x and of each M_j, one write of out (allocated when not given)."""
    runtime.require()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _check(x, history, coef, out)
    n = x.numel()
    if n == 0:
        return out
    k = len(history)
    m = list(history) + [history[0]] * (3 - k)  # unused slots: any valid pointer, never read
    scalars = [part for c in coef for part in runtime.f64_parts(c)]
    fp64 = x.dtype == torch.float64
    _k_update[(runtime.cdiv(n, BLOCK),)](x, m[0], m[1], m[2], out, *scalars, n, K=k, FP64=fp64,
                                          BF16_OUT=out.dtype == torch.bfloat16, BLOCK=BLOCK,
                                        num_warps=NUM_WARPS)
    return out


def specialisations():
    """Every specialisation `update_triton` can launch: each stored dtype × each order K (bench/kernels_aot.py)."""
    from engine.kernels.runtime import Specialisation, pointer
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for k in (1, 2, 3):
            sig = {name: pointer(dtype) for name in ("x_ptr", "m0_ptr", "m1_ptr", "m2_ptr", "out_ptr")}
            sig.update({f"{c}_{part}": "fp32" for c in ("a", "b0", "b1", "b2") for part in ("hi", "mid", "lo")})
            sig.update(n="i32", K="constexpr", FP64="constexpr", BF16_OUT="constexpr", BLOCK="constexpr")
            const = dict(K=k, FP64=dtype == torch.float64, BF16_OUT=dtype == torch.bfloat16, BLOCK=BLOCK)
            out.append(Specialisation("dpm_solver_update", _k_update.compiled, sig, const,
                                      dict(num_warps=NUM_WARPS), f"{str(dtype)[6:]} K={k}"))
    return out


# ---- registered op: what torch.compile sees ------------------------------------------------------------------

@torch.library.custom_op("engine::dpm_solver_update", mutates_args=("out",))
def dpm_solver_update_op(x: torch.Tensor, history: list[torch.Tensor], coef: list[float], out: torch.Tensor) -> None:
    """out ← a·x + Σ b_j M_j with the fused kernel (in place into `out`, e.g. a trajectory slot)."""
    update_triton(x, history, coef, out)


@dpm_solver_update_op.register_fake
def _(x, history, coef, out) -> None:
    return None
