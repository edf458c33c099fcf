"""Scaled dot-product attention with a forward-mode rule (docs/spec/mf.md §2.2–2.3), PyTorch reference.

PyTorch's fused attention has no forward-AD formula, so `torch.func.jvp` through a network that uses it fails;
Mean Flow and sCM need exactly that JVP. This op computes the primal with the fused kernel
(`scaled_dot_product_attention`, differentiable as usual) and supplies the tangent itself:

    S = s·QKᵀ, P = softmax_rows(S), O = PV,  s = 1/√d
    Ṡ = s·(Q̇Kᵀ + QK̇ᵀ),  μ_i = Σ_j P_ij Ṡ_ij
    Ȯ = (P∘Ṡ)V − μ∘O + PV̇

evaluated one block of queries at a time, so no more than [block, N] of S lives at once. The C++ extension
(csrc/jvp_attention.cpp, `engine._C.attention_jvp`) computes (O, Ȯ) in one pass with an online softmax on CPU
tensors; the Triton kernel below does the same on CUDA tensors (and in Triton's interpreter on CPU, which is how CI
checks it). engine.ops.attention chooses the tangent backend ('cpp' | 'triton' | 'ref'); the blockwise PyTorch
tangent here is the reference and the path when neither kernel applies. Inputs [batch, heads, seq, head_dim], any
head_dim (the Triton kernel pads it to a power of two with masked loads: 72, XL/2's, runs as 128), float64 included.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.kernels import runtime

QUERY_BLOCK = 256


def attention_reference(q, k, v, scale: float | None = None) -> torch.Tensor:
    """Explicit attention (softmax in at least fp32): the oracle of the tests, forward-AD capable by itself."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    dt = torch.promote_types(q.dtype, torch.float32)
    p = torch.softmax((q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale, dim=-1)
    return (p @ v.to(dt)).to(q.dtype)


def attention_tangent(q, k, v, out, dq, dk, dv, scale: float) -> torch.Tensor:
    """Ȯ for tangents (Q̇, K̇, V̇) (None = zero), blockwise over queries; computed in at least fp32."""
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v, out = q.to(dt), k.to(dt), v.to(dt), out.to(dt)
    kt = k.transpose(-1, -2)
    res = []
    for lo in range(0, q.shape[-2], QUERY_BLOCK):
        sl = slice(lo, lo + QUERY_BLOCK)
        qb = q[..., sl, :]
        p = torch.softmax((qb @ kt) * scale, dim=-1)
        s_dot = torch.zeros_like(p)
        if dq is not None:
            s_dot = s_dot + (dq[..., sl, :].to(dt) @ kt) * scale
        if dk is not None:
            s_dot = s_dot + (qb @ dk.to(dt).transpose(-1, -2)) * scale
        ps = p * s_dot
        mu = ps.sum(-1, keepdim=True)
        ob = ps @ v - mu * out[..., sl, :]
        if dv is not None:
            ob = ob + p @ dv.to(dt)
        res.append(ob)
    return torch.cat(res, dim=-2)


def extension():
    """The compiled CPU kernel (csrc/jvp_attention.cpp, built by setup.py as engine._C), or None."""
    try:
        from engine import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "attention_jvp") else None


@torch.library.custom_op("engine::attention_jvp_cpu", mutates_args=(), device_types="cpu")
def attention_jvp_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                      dv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, Ȯ) from the one-pass online-softmax kernel. A registered op, so that it can be called on the
    functorch-wrapped tensors a forward-mode rule receives."""
    out, tangent = extension().attention_jvp(q, k, v, dq, dk, dv, float(scale))
    return out, tangent


@attention_jvp_cpu.register_fake
def _(q, k, v, dq, dk, dv, scale):
    shape = (*q.shape[:3], v.shape[-1])
    return q.new_empty(shape), q.new_empty(shape)


# ---- Triton: the same one-pass (O, Ȯ) on CUDA tensors (interpreter on CPU) ----------------------------------------

BLOCK_M, BLOCK_N = 64, 64
if runtime.triton is not None:
    import triton.language as tl

    from engine.kernels.runtime import join64, store_as

    def _attention_jvp_kernel(q_ptr, k_ptr, v_ptr, dq_ptr, dk_ptr, dv_ptr, o_ptr, do_ptr, n_q, n_k, d, dvd,
                              scale_hi, scale_mid, scale_lo,
                              FP64: tl.constexpr, IEEE: tl.constexpr, BF16_OUT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr):
        scale = join64(scale_hi, scale_mid, scale_lo, FP64)   # runtime.f64_parts: exact in fp64 runs
        # One program: BLOCK_M query rows of one (batch, head); keys streamed in BLOCK_N blocks (docs/spec/mf.md §2.3).
        # Head dims d, dvd are padded to the powers of two D, DV by masked loads (zeros add nothing to the dots).
        # Reductions are tl.reduce with the standard combine functions (what tl.max / tl.sum expand to): the
        # interpreter launched per call (kernels/runtime.py) cannot call the library's jit wrappers.
        bh = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cd, cv = tl.arange(0, D), tl.arange(0, DV)
        acc_t = tl.float64 if FP64 else tl.float32
        # Operands are widened to fp32 on load (fp64 stays fp64): bf16/fp16 values are exact in tf32, so their
        # dots on tensor cores are exact products with fp32 sums, and the interpreter (no bf16 arithmetic) runs
        # the same math; only the probabilities' rounding to tf32 in the P·V dots is GPU-only (≤ 2⁻¹¹ relative,
        # below the bf16 store). fp32 inputs use IEEE dots.
        prec: tl.constexpr = "ieee" if IEEE else "tf32"
        qmask = (rows[:, None] < n_q) & (cd[None, :] < d)
        q_off = bh * n_q * d + rows[:, None] * d + cd[None, :]
        q = tl.load(q_ptr + q_off, mask=qmask, other=0.0).to(acc_t)
        dq = tl.load(dq_ptr + q_off, mask=qmask, other=0.0).to(acc_t)
        m = tl.full([BLOCK_M], float("-inf"), acc_t)
        l = tl.full([BLOCK_M], 0.0, acc_t)
        mass = tl.full([BLOCK_M], 0.0, acc_t)                 # M = Σ e·Ṡ
        a = tl.full([BLOCK_M, DV], 0.0, acc_t)                # A = Σ e·V
        b = tl.full([BLOCK_M, DV], 0.0, acc_t)                # B + C = Σ e·Ṡ·V + Σ e·V̇
        for start in range(0, n_k, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            kmask = (keys[:, None] < n_k) & (cd[None, :] < d)
            k_off = bh * n_k * d + keys[:, None] * d + cd[None, :]
            k = tl.load(k_ptr + k_off, mask=kmask, other=0.0).to(acc_t)
            dk = tl.load(dk_ptr + k_off, mask=kmask, other=0.0).to(acc_t)
            vmask = (keys[:, None] < n_k) & (cv[None, :] < dvd)
            v_off = bh * n_k * dvd + keys[:, None] * dvd + cv[None, :]
            v = tl.load(v_ptr + v_off, mask=vmask, other=0.0).to(acc_t)
            dv = tl.load(dv_ptr + v_off, mask=vmask, other=0.0).to(acc_t)
            s = tl.dot(q, tl.trans(k), out_dtype=acc_t, input_precision=prec) * scale
            ds = (tl.dot(dq, tl.trans(k), out_dtype=acc_t, input_precision=prec)
                  + tl.dot(q, tl.trans(dk), out_dtype=acc_t, input_precision=prec)) * scale
            s = tl.where(keys[None, :] < n_k, s, float("-inf"))
            m_new = tl.maximum(m, tl.reduce(s, 1, tl.standard._elementwise_max))
            alpha = tl.exp(m - m_new)
            e = tl.exp(s - m_new[:, None])
            eds = tl.where(keys[None, :] < n_k, e * ds, 0.0)
            l = l * alpha + tl.reduce(e, 1, tl.standard._sum_combine)
            mass = mass * alpha + tl.reduce(eds, 1, tl.standard._sum_combine)
            a = a * alpha[:, None] + tl.dot(e, v, out_dtype=acc_t, input_precision=prec)
            b = b * alpha[:, None] + tl.dot(eds, v, out_dtype=acc_t, input_precision=prec) \
                + tl.dot(e, dv, out_dtype=acc_t, input_precision=prec)
            m = m_new
        o = a / l[:, None]
        do = b / l[:, None] - (mass / l)[:, None] * o
        omask = (rows[:, None] < n_q) & (cv[None, :] < dvd)
        o_off = bh * n_q * dvd + rows[:, None] * dvd + cv[None, :]
        store_as(o_ptr, o_off, o, omask, BF16_OUT)  # bf16 rounded to nearest even (kernels/runtime.py)
        store_as(do_ptr, o_off, do, omask, BF16_OUT)

    _k_attention_jvp = runtime.Kernel(_attention_jvp_kernel, helpers=(store_as, join64))


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())  # tl.dot needs every dimension ≥ 16


def launch_config(dtype: torch.dtype, d: int, dvd: int) -> dict:
    """Block sizes and launch options of the kernel for q's dtype and head dims: the one place the launcher and the
    ahead-of-time check (bench/kernels_aot.py, tests/test_kernels_aot.py) take them from.

    Chosen so that every head dimension the engine ships (DiT 64 and XL/2's 72, padded to 128; MM-DiT 32) fits
    the shared memory of sm_90 (232,448 B a block) and sm_80 (166,912 B), measured with Triton's compiler:
    bf16/fp16 run the dots on the tensor cores in 64×64 tiles (sm_90 at D = 128: 196,608 B; sm_80: 98,816 B);
    fp32 keeps IEEE dots without tensor cores, and fp64 its own, in 32×32 tiles with one stage (fp32 at D = 128:
    98,304 B; fp64: 147,968 B) — the 64×64 tiles with Triton's default 3 stages needed 360,704 B (fp32, D = 128)
    and 721,408 B (fp64) and could not launch. A launch that still does not fit falls back to the reference."""
    D, DV = _pow2(d), _pow2(dvd)
    if dtype in (torch.float32, torch.float64):
        block_m = block_n = 32
        stages = 1
    else:
        block_m = block_n = 64
        stages = 2
    # 8 warps at D = 128: with 4 the per-thread state of the wide tiles spilled (ptxas's stack frame 7.3–9.1 KB
    # a thread on sm_80, 1.0–1.8 KB on sm_90; with 8, 0.4–1.4 KB and 0.5–1.0 KB), measured by bench/kernels_aot.py
    warps = 8 if max(D, DV) >= 128 else 4
    return dict(FP64=dtype == torch.float64, IEEE=dtype == torch.float32, BF16_OUT=dtype == torch.bfloat16,
                BLOCK_M=block_m, BLOCK_N=block_n, D=D, DV=DV, num_warps=warps, num_stages=stages)


def specialisations(head_dims):
    """Every specialisation the launcher can send to the compiler: each dtype the dispatch gives Triton (fp32,
    bf16, fp16 on CUDA; fp64 under ENGINE_KERNELS=triton) at each head dimension of `head_dims` (the shipped
    networks', which bench/kernels_aot.py reads from their configurations)."""
    from engine.kernels.runtime import Specialisation, pointer
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for d in head_dims:
            cfg = launch_config(dtype, d, d)
            options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
            sig = {name: pointer(dtype) for name in ("q_ptr", "k_ptr", "v_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
                                                       "o_ptr", "do_ptr")}
            sig.update(n_q="i32", n_k="i32", d="i32", dvd="i32", scale_hi="fp32", scale_mid="fp32", scale_lo="fp32")
            sig.update({k: "constexpr" for k in cfg})
            out.append(Specialisation("attention_jvp", _k_attention_jvp.compiled, sig, cfg, options,
                                      f"{str(dtype)[6:]} d={d} (D={cfg['D']})",
                                      tensor_cores=dtype in (torch.bfloat16, torch.float16, torch.float64)))
    return out


@torch.library.custom_op("engine::attention_jvp_triton", mutates_args=())
def attention_jvp_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                         dv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, Ȯ) from the Triton kernel: compiled for CUDA tensors, Triton's interpreter for CPU tensors. A CUDA
    launch the chip cannot hold (shared memory, registers) falls back to the reference, once logged per shape."""
    runtime.require()
    if q.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"attention_jvp_triton: unsupported dtype {q.dtype}")
    for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if t.shape != like.shape:
            raise ValueError(f"attention_jvp_triton: {name} {tuple(t.shape)} must have its primal's shape "
                             f"{tuple(like.shape)}")
    q, k, v, dq, dk, dv = (t.contiguous() for t in (q, k, v, dq, dk, dv))
    B, H, n_q, d = q.shape
    n_k, dvd = k.shape[2], v.shape[3]
    out = q.new_empty(B, H, n_q, dvd)
    tangent = torch.empty_like(out)
    if out.numel() == 0:
        return out, tangent
    if q.device.type == "cpu" and not runtime.interpreter_runs_loops():
        import numpy as np
        import triton
        raise RuntimeError(f"attention_jvp_triton: Triton {triton.__version__}'s interpreter cannot run the kernel's "
                           f"loop over keys with NumPy {np.__version__} (fixed in later Triton); on CPU use "
                           f"ENGINE_KERNELS=auto (the C++ or reference path)")
    cfg = launch_config(q.dtype, d, dvd)
    key = (q.device.type, q.dtype, d, dvd)
    if key not in runtime.UNFIT:
        grid = (runtime.cdiv(n_q, cfg["BLOCK_M"]), B * H)
        try:
            _k_attention_jvp[grid](q, k, v, dq, dk, dv, out, tangent, n_q, n_k, d, dvd, *runtime.f64_parts(scale),
                                   **cfg)
            return out, tangent
        except runtime.OutOfResources as e:
            runtime.unfit(key, f"attention_jvp_triton: {str(q.dtype)[6:]} head dim {d} does not fit "
                               f"{q.device} ({e}); using the PyTorch reference")
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return o, attention_tangent(q, k, v, o, dq, dk, dv, scale).to(q.dtype)


@attention_jvp_triton.register_fake
def _(q, k, v, dq, dk, dv, scale):
    shape = (*q.shape[:3], v.shape[-1])
    return q.new_empty(shape), q.new_empty(shape)


BACKENDS = ("ref", "cpp", "triton")


def attention_jvp(q, k, v, dq, dk, dv, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, Ȯ) together for tangents (Q̇, K̇, V̇) (None = zero), from the chosen backend: 'cpp' (the C++ one-pass
    kernel, CPU), 'triton' (the Triton one-pass kernel) or 'ref' (fused SDPA primal + the blockwise tangent)."""
    zeros = lambda t, d: torch.zeros_like(t) if d is None else d.to(t.dtype)
    if backend == "cpp":
        return torch.ops.engine.attention_jvp_cpu(q, k, v, zeros(q, dq), zeros(k, dk), zeros(v, dv), float(scale))
    if backend == "triton":
        return torch.ops.engine.attention_jvp_triton(q, k, v, zeros(q, dq), zeros(k, dk), zeros(v, dv),
                                                     float(scale))
    if backend == "ref":
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out, attention_tangent(q, k, v, out, dq, dk, dv, scale).to(out.dtype)
    raise ValueError(f"unknown attention tangent backend {backend!r}; expected one of {BACKENDS}")


class JVPAttention(torch.autograd.Function):
    """softmax(s·QKᵀ)V: fused primal and backward, explicit forward-mode rule."""

    @staticmethod
    def forward(q, k, v, scale, backend):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, backend = inputs
        ctx.scale, ctx.backend = scale, backend
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, output)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q_, k_, v_, scale=ctx.scale)
            needed = [t for t in (q_, k_, v_) if t.requires_grad]
            grads = iter(torch.autograd.grad(o, needed, grad)) if needed else iter(())
        return tuple(next(grads) if t.requires_grad else None for t in (q_, k_, v_)) + (None, None)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dscale, _dbackend):
        q, k, v, out = ctx.saved_tensors
        if ctx.backend == "ref":  # reuses the primal already computed
            return attention_tangent(q, k, v, out, dq, dk, dv, ctx.scale).to(out.dtype)
        return attention_jvp(q, k, v, dq, dk, dv, ctx.scale, ctx.backend)[1].to(out.dtype)


def attention(q, k, v, scale: float | None = None, backend: str = "ref") -> torch.Tensor:
    """[B, H, N, d] → [B, H, N, d]; works under autograd and under torch.func.jvp / forward AD. `backend` (engine.ops
    decides) names where the tangent comes from: 'cpp', 'triton' or 'ref' (see attention_jvp)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention tangent backend {backend!r}; expected one of {BACKENDS}")
    if q.ndim != 4 or k.shape != q.shape[:2] + k.shape[2:] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention takes q, k, v as [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return JVPAttention.apply(q, k, v, scale, backend)
