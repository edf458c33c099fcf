"""Fused EDM / consistency preconditioning (docs/spec/cm.md §1.2–1.3) and its PyTorch reference.

A preconditioned denoiser is D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)). Around the backbone F
the reference spends a handful of small kernels on [B]-sized coefficient math and two full passes over the
activations per side. Here each side is one kernel that evaluates its per-sample coefficients from σ in
registers:

    input side   y = c_in·x, c_in = 1/√(σ² + σ_d²), stored in the network's compute dtype (bf16 under autocast:
                 the cast the first layer would make anyway, made while the data is already in registers);
    output side  D = c_skip·x + c_out·F, F read in its own dtype (bf16 from an autocast backbone) and the sum
                 formed and stored in x's dtype (fp32), as the reference casts F before the combination.
                 EDM: c_skip = σ_d²/(σ² + σ_d²), c_out = σσ_d/√(σ² + σ_d²). Consistency models in eval mode
                 (`boundary`): e = σ − σ_min replaces σ in c_skip and in c_out's numerator, so D(x, σ_min) = x.

Both carry autograd (registered with the ops): the training path back-propagates through them. The backward of
each side is again one kernel for the activation gradients (the input side's is the forward kernel itself, with
g in place of x); the σ-gradient, needed only when σ requires grad, is a per-sample reduction done in PyTorch.
Arithmetic is fp32, or fp64 for fp64 inputs (so float64 references and gradcheck run through the kernels too).
"""
from __future__ import annotations

import torch

from engine.kernels import runtime

BLOCK = 1024
NUM_WARPS = 4


# ---- reference ------------------------------------------------------------------------------------------------

def _rows(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """σ [B] or [1] → [B or 1, 1, ..., 1] in x's dtype."""
    return sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def input_reference(x: torch.Tensor, sigma: torch.Tensor, sigma_data: float, out_dtype: torch.dtype) -> torch.Tensor:
    s = _rows(sigma, x)
    c_in = 1 / (sigma_data ** 2 + s ** 2).sqrt()
    return (c_in * x).to(out_dtype)


def skip_out_reference(sigma: torch.Tensor, sigma_data: float, sigma_min: float, boundary: bool):
    """(c_skip, c_out) for σ of any shape, in σ's dtype."""
    e = sigma - sigma_min if boundary else sigma
    c_skip = sigma_data ** 2 / (e ** 2 + sigma_data ** 2)
    c_out = e * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def output_reference(x: torch.Tensor, F: torch.Tensor, sigma: torch.Tensor, sigma_data: float, sigma_min: float,
                     boundary: bool) -> torch.Tensor:
    c_skip, c_out = skip_out_reference(_rows(sigma, x), sigma_data, sigma_min, boundary)
    return c_skip * x + c_out * F.to(x.dtype)


# ---- Triton kernels ---------------------------------------------------------------------------------------------

if runtime.triton is not None:
    import triton.language as tl

    from engine.kernels.runtime import join64, store_as

    def skip_out(s, e, sd, FP64: tl.constexpr):
        """(c_skip, c_out) of `skip_out_reference` (e = σ − σ_min on the boundary, else σ) in the kernels'
        arithmetic: fp64 as written, fp32 with IEEE-rounded division and sqrt (Triton's fp32 defaults are
        approximate)."""
        if FP64:
            c_skip = sd * sd / (e * e + sd * sd)
            c_out = e * sd / tl.sqrt(s * s + sd * sd)
        else:
            c_skip = tl.div_rn(sd * sd, e * e + sd * sd)
            c_out = tl.div_rn(e * sd, tl.sqrt_rn(s * s + sd * sd))
        return c_skip, c_out

    def _scale_rows_kernel(x_ptr, sig_ptr, out_ptr, n, row, sig_stride, sd2_hi, sd2_mid, sd2_lo,
                           FP64: tl.constexpr, BF16_OUT: tl.constexpr, BLOCK: tl.constexpr):
        # out = x / √(σ_r² + σ_d²) with r = the sample (row) of each element; σ_d² as runtime.f64_parts.
        sd2 = join64(sd2_hi, sd2_mid, sd2_lo, FP64)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = tl.float64 if FP64 else tl.float32
        s = tl.load(sig_ptr + (offs // row) * sig_stride, mask=mask, other=1.0).to(acc_t)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if FP64:
            y = x / tl.sqrt(s * s + sd2)
        else:  # IEEE-rounded sqrt and division: Triton's fp32 defaults are approximate
            y = tl.div_rn(x, tl.sqrt_rn(s * s + sd2))
        store_as(out_ptr, offs, y, mask, BF16_OUT)

    def _output_kernel(x_ptr, f_ptr, sig_ptr, out_ptr, n, row, sig_stride, sd_hi, sd_mid, sd_lo, smin_hi, smin_mid,
                       smin_lo, BOUNDARY: tl.constexpr, FP64: tl.constexpr, BF16_OUT: tl.constexpr,
                       BLOCK: tl.constexpr):
        sd, smin = join64(sd_hi, sd_mid, sd_lo, FP64), join64(smin_hi, smin_mid, smin_lo, FP64)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = tl.float64 if FP64 else tl.float32
        s = tl.load(sig_ptr + (offs // row) * sig_stride, mask=mask, other=1.0).to(acc_t)
        e = s - smin if BOUNDARY else s
        c_skip, c_out = skip_out(s, e, sd, FP64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(acc_t)
        y = c_skip * x + c_out * f
        store_as(out_ptr, offs, y, mask, BF16_OUT)

    def _output_backward_kernel(g_ptr, sig_ptr, gx_ptr, gf_ptr, n, row, sig_stride, sd_hi, sd_mid, sd_lo, smin_hi,
                                smin_mid, smin_lo, BOUNDARY: tl.constexpr, FP64: tl.constexpr,
                                BF16_X: tl.constexpr, BF16_F: tl.constexpr, BLOCK: tl.constexpr):
        # ∂D/∂x = c_skip, ∂D/∂F = c_out: both activation gradients from one read of g.
        sd, smin = join64(sd_hi, sd_mid, sd_lo, FP64), join64(smin_hi, smin_mid, smin_lo, FP64)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc_t = tl.float64 if FP64 else tl.float32
        s = tl.load(sig_ptr + (offs // row) * sig_stride, mask=mask, other=1.0).to(acc_t)
        e = s - smin if BOUNDARY else s
        c_skip, c_out = skip_out(s, e, sd, FP64)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_t)
        store_as(gx_ptr, offs, c_skip * g, mask, BF16_X)
        store_as(gf_ptr, offs, c_out * g, mask, BF16_F)

    _k_scale_rows = runtime.Kernel(_scale_rows_kernel, helpers=(store_as, join64))
    _k_output = runtime.Kernel(_output_kernel, helpers=(store_as, skip_out, join64))
    _k_output_backward = runtime.Kernel(_output_backward_kernel, helpers=(store_as, skip_out, join64))


def _layout(x: torch.Tensor, sigma: torch.Tensor) -> tuple[int, int, int]:
    """(numel, elements per sample, σ stride) of a contiguous x with per-sample σ [B] (or one σ [1])."""
    if sigma.ndim != 1 or sigma.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"the fused preconditioning takes σ as [B] or [1] for a batch of {x.shape[0]}, "
                         f"got {tuple(sigma.shape)}")
    if sigma.device != x.device:
        raise ValueError(f"σ is on {sigma.device}, x on {x.device}")
    n = x.numel()
    row = max(1, n // max(1, x.shape[0]))
    return n, row, (0 if sigma.shape[0] == 1 else 1)


def _is64(*ts: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in ts)


def scale_rows_triton(x: torch.Tensor, sigma: torch.Tensor, sigma_data: float, out_dtype: torch.dtype):
    runtime.require()
    x = x.contiguous()
    sigma = sigma.contiguous()
    n, row, stride = _layout(x, sigma)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if n:
        _k_scale_rows[(runtime.cdiv(n, BLOCK),)](x, sigma, out, n, row, stride, *runtime.f64_parts(sigma_data ** 2),
                                               FP64=_is64(x, out),
                                                 BF16_OUT=out.dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def output_triton(x, F, sigma, sigma_data, sigma_min, boundary):
    runtime.require()
    x, F, sigma = x.contiguous(), F.contiguous(), sigma.contiguous()
    if F.shape != x.shape:
        raise ValueError(f"backbone output {tuple(F.shape)} does not match the input {tuple(x.shape)}")
    n, row, stride = _layout(x, sigma)
    out = torch.empty_like(x)
    if n:
        _k_output[(runtime.cdiv(n, BLOCK),)](x, F, sigma, out, n, row, stride, *runtime.f64_parts(sigma_data),
                                             *runtime.f64_parts(sigma_min),
                                           BOUNDARY=bool(boundary), FP64=_is64(x),
                                             BF16_OUT=out.dtype == torch.bfloat16, BLOCK=BLOCK,
                                           num_warps=NUM_WARPS)
    return out


def output_backward_triton(g, sigma, sigma_data, sigma_min, boundary, x_dtype, f_dtype):
    g = g.contiguous()
    n, row, stride = _layout(g, sigma)
    gx = torch.empty(g.shape, dtype=x_dtype, device=g.device)
    gf = torch.empty(g.shape, dtype=f_dtype, device=g.device)
    if n:
        _k_output_backward[(runtime.cdiv(n, BLOCK),)](g, sigma, gx, gf, n, row, stride,
                                                      *runtime.f64_parts(sigma_data), *runtime.f64_parts(sigma_min),
                                                      BOUNDARY=bool(boundary),
                                                    FP64=_is64(g, gx),
                                                      BF16_X=gx.dtype == torch.bfloat16,
                                                      BF16_F=gf.dtype == torch.bfloat16,
                                                      BLOCK=BLOCK, num_warps=NUM_WARPS)
    return gx, gf


def specialisations():
    """The dtype combinations the preconditioning launchers send (bench/kernels_aot.py): the network input in its
    compute dtype from an fp32 or fp64 x, the output in x's dtype from a backbone output in any of them, and the
    backward's two gradients, each with and without the consistency boundary."""
    from engine.kernels.runtime import Specialisation, pointer
    f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
    name = lambda *ds: "/".join(str(d)[6:] for d in ds)
    scalars = lambda s: {f"{s}_{part}": "fp32" for part in ("hi", "mid", "lo")}
    out = []
    for x, o in ((f32, f32), (f32, bf16), (f32, f16), (bf16, bf16), (f16, f16), (f64, f64)):
        s = f64 if x == f64 else f32
        sig = dict(x_ptr=pointer(x), sig_ptr=pointer(s), out_ptr=pointer(o), n="i32", row="i32", sig_stride="i32",
                   **scalars("sd2"), FP64="constexpr", BF16_OUT="constexpr", BLOCK="constexpr")
        out.append(Specialisation("precond_input", _k_scale_rows.compiled, sig,
                                  dict(FP64=f64 in (x, o), BF16_OUT=o == bf16, BLOCK=BLOCK),
                                  dict(num_warps=NUM_WARPS), f"x {name(x)} → {name(o)}"))
    for x, f in ((f32, f32), (f32, bf16), (f32, f16), (f64, f64)):
        s = f64 if x == f64 else f32
        for boundary in (False, True):
            sig = dict(x_ptr=pointer(x), f_ptr=pointer(f), sig_ptr=pointer(s), out_ptr=pointer(x), n="i32",
                       row="i32", sig_stride="i32", **scalars("sd"), **scalars("smin"), BOUNDARY="constexpr",
                       FP64="constexpr", BF16_OUT="constexpr", BLOCK="constexpr")
            out.append(Specialisation("precond_output", _k_output.compiled, sig,
                                      dict(BOUNDARY=boundary, FP64=x == f64, BF16_OUT=False, BLOCK=BLOCK),
                                      dict(num_warps=NUM_WARPS), f"x {name(x)}, F {name(f)}, boundary {boundary}"))
            sig = dict(g_ptr=pointer(x), sig_ptr=pointer(s), gx_ptr=pointer(x), gf_ptr=pointer(f), n="i32",
                       row="i32", sig_stride="i32", **scalars("sd"), **scalars("smin"), BOUNDARY="constexpr",
                       FP64="constexpr", BF16_X="constexpr", BF16_F="constexpr", BLOCK="constexpr")
            out.append(Specialisation("precond_output_backward", _k_output_backward.compiled, sig,
                                      dict(BOUNDARY=boundary, FP64=x == f64, BF16_X=False, BF16_F=f == bf16,
                                           BLOCK=BLOCK),
                                      dict(num_warps=NUM_WARPS), f"g {name(x)}, F {name(f)}, boundary {boundary}"))
    return out


# ---- σ-gradients (per-sample reductions; only when σ requires grad) ----------------------------------------------

def _sum_rows(t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    per_sample = t.reshape(t.shape[0], -1).sum(1)
    return per_sample.sum(0, keepdim=True) if sigma.shape[0] == 1 else per_sample


def _input_sigma_grad(g, x, sigma, sigma_data):
    t = torch.promote_types(x.dtype, torch.float32)
    s = sigma.to(t).reshape(-1, *([1] * (x.ndim - 1)))
    dc_in = -s / (s ** 2 + sigma_data ** 2) ** 1.5
    return _sum_rows(g.to(t) * x.to(t) * dc_in, sigma).to(sigma.dtype)


def _output_sigma_grad(g, x, F, sigma, sigma_data, sigma_min, boundary):
    s = _rows(sigma, x)
    e = s - sigma_min if boundary else s
    sd2 = sigma_data ** 2
    dc_skip = -2 * e * sd2 / (e ** 2 + sd2) ** 2
    dc_out = sigma_data / (s ** 2 + sd2).sqrt() - e * s * sigma_data / (s ** 2 + sd2) ** 1.5
    return _sum_rows(g * (x * dc_skip + F.to(x.dtype) * dc_out), sigma).to(sigma.dtype)


# ---- registered ops with autograd ------------------------------------------------------------------------------

@torch.library.custom_op("engine::precond_input", mutates_args=())
def precond_input(x: torch.Tensor, sigma: torch.Tensor, sigma_data: float, out_dtype: torch.dtype) -> torch.Tensor:
    """c_in·x in `out_dtype`, one kernel."""
    return scale_rows_triton(x, sigma, sigma_data, out_dtype)


@precond_input.register_fake
def _(x, sigma, sigma_data, out_dtype):
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


def _input_setup(ctx, inputs, output):
    x, sigma, sigma_data, _ = inputs
    ctx.sigma_data, ctx.x_dtype = sigma_data, x.dtype
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, sigma)


def _input_backward(ctx, g):
    x, sigma = ctx.saved_tensors
    gx = gs = None
    if ctx.needs_input_grad[0]:
        gx = precond_input(g, sigma, ctx.sigma_data, ctx.x_dtype)  # ∂(c_in x)/∂x = c_in: the same kernel
    if ctx.needs_input_grad[1]:
        gs = _input_sigma_grad(g, x, sigma, ctx.sigma_data)
    return gx, gs, None, None


precond_input.register_autograd(_input_backward, setup_context=_input_setup)


@torch.library.custom_op("engine::precond_output", mutates_args=())
def precond_output(x: torch.Tensor, F: torch.Tensor, sigma: torch.Tensor, sigma_data: float, sigma_min: float,
                   boundary: bool) -> torch.Tensor:
    """c_skip·x + c_out·F in x's dtype, one kernel."""
    return output_triton(x, F, sigma, sigma_data, sigma_min, boundary)


@precond_output.register_fake
def _(x, F, sigma, sigma_data, sigma_min, boundary):
    return torch.empty_like(x)


def _output_setup(ctx, inputs, output):
    x, F, sigma, sigma_data, sigma_min, boundary = inputs
    ctx.args = (sigma_data, sigma_min, boundary)
    ctx.dtypes = (x.dtype, F.dtype)
    keep = ctx.needs_input_grad[2]
    ctx.save_for_backward(x if keep else None, F if keep else None, sigma)


@torch.library.custom_op("engine::precond_output_backward", mutates_args=())
def precond_output_backward(g: torch.Tensor, sigma: torch.Tensor, sigma_data: float, sigma_min: float,
                            boundary: bool, x_dtype: torch.dtype, f_dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip·g in x's dtype, c_out·g in F's dtype), one kernel."""
    return output_backward_triton(g, sigma, sigma_data, sigma_min, boundary, x_dtype, f_dtype)


@precond_output_backward.register_fake
def _(g, sigma, sigma_data, sigma_min, boundary, x_dtype, f_dtype):
    return (torch.empty(g.shape, dtype=x_dtype, device=g.device),
            torch.empty(g.shape, dtype=f_dtype, device=g.device))


def _output_backward(ctx, g):
    x, F, sigma = ctx.saved_tensors
    gx, gf = precond_output_backward(g, sigma, *ctx.args, *ctx.dtypes)
    gs = _output_sigma_grad(g, x, F, sigma, *ctx.args) if ctx.needs_input_grad[2] else None
    return (gx if ctx.needs_input_grad[0] else None, gf if ctx.needs_input_grad[1] else None, gs,
            None, None, None)


precond_output.register_autograd(_output_backward, setup_context=_output_setup)
