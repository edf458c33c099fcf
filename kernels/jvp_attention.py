"""Scaled dot-product attention with a forward-mode rule (spec/mf.md §2.2–2.3), PyTorch reference.

PyTorch's fused attention has no forward-AD formula, so `torch.func.jvp` through a network that uses it fails;
Mean Flow and sCM need exactly that JVP. This op computes the primal with the fused kernel
(`scaled_dot_product_attention`, differentiable as usual) and supplies the tangent itself:

    S = s·QKᵀ, P = softmax_rows(S), O = PV,  s = 1/√d
    Ṡ = s·(Q̇Kᵀ + QK̇ᵀ),  μ_i = Σ_j P_ij Ṡ_ij
    Ȯ = (P∘Ṡ)V − μ∘O + PV̇

evaluated one block of queries at a time, so no more than [block, N] of S lives at once. The C++ extension
(csrc/jvp_attention.cpp, `engine._C.attention_jvp`) computes the same tangent in one pass with an online
softmax on CPU tensors; engine.ops.attention uses it when built (ENGINE_KERNELS=ref forces this file's path);
this file is its reference and the path otherwise. Inputs [batch, heads, seq, head_dim], any head_dim, float64 included.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def attention_tangent_extension(q, k, v, dq, dk, dv, scale: float) -> torch.Tensor:
    """Ȯ from the one-pass online-softmax kernel (CPU)."""
    zeros = lambda t, d: torch.zeros_like(t) if d is None else d.to(t.dtype)
    return torch.ops.engine.attention_jvp_cpu(q, k, v, zeros(q, dq), zeros(k, dk), zeros(v, dv), float(scale))[1]


class JVPAttention(torch.autograd.Function):
    """softmax(s·QKᵀ)V: fused primal and backward, explicit forward-mode rule."""

    @staticmethod
    def forward(q, k, v, scale, tangent_kernel):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, tangent_kernel = inputs
        ctx.scale, ctx.tangent_kernel = scale, tangent_kernel
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
    def jvp(ctx, dq, dk, dv, _dscale, _dkernel):
        q, k, v, out = ctx.saved_tensors
        if ctx.tangent_kernel:
            return attention_tangent_extension(q, k, v, dq, dk, dv, ctx.scale).to(out.dtype)
        return attention_tangent(q, k, v, out, dq, dk, dv, ctx.scale).to(out.dtype)


def attention(q, k, v, scale: float | None = None, tangent_kernel: bool = False) -> torch.Tensor:
    """[B, H, N, d] → [B, H, N, d]; works under autograd and under torch.func.jvp / forward AD. With
    `tangent_kernel` (CPU tensors, extension built; engine.ops decides) the tangent comes from the C++ kernel."""
    if q.ndim != 4 or k.shape != q.shape[:2] + k.shape[2:] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention takes q, k, v as [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return JVPAttention.apply(q, k, v, scale, bool(tangent_kernel))
