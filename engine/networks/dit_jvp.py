"""The DiT's forward-mode JVP by explicit tangent propagation, primal and tangent streams batched (docs/spec/mf.md §2.1
option 5, §2.5).

Mean Flow's target needs (u, du/dt) along (ṽ, 0, 1) without gradients (docs/spec/mf.md §1.3 (b)). `torch.func.jvp`
runs every linear layer twice (x·Wᵀ, then ẋ·Wᵀ as a second GEMM) and goes through the dispatcher per op. Here
every module maps (x, ẋ) → (y, ẏ) directly:

    linear / conv    [x; ẋ]·Wᵀ as ONE GEMM over the stacked rows, the bias added to the primal half only
                     (the weights are constants of the JVP, so ẏ = ẋ·Wᵀ): same FLOPs, half the weight reads and
                     kernel launches, and GEMMs twice as tall;
    attention        (O, Ȯ) from one pass of the online-softmax kernel (C++ on CPU, Triton on CUDA: engine.ops);
                     on CPU with the extension built, the whole block qkv → attention → proj is one call into it
                     (`engine._C.attention_block_jvp`);
    LayerNorm (no affine), SiLU, GELU-tanh, adaLN modulation, gates, the sinusoidal time features: their
                     derivatives in closed form (below).

Nothing is recorded for autograd (callers use it under no_grad); the result equals torch.func.jvp of the same
network (tests/test_dit.py checks both against float64 finite differences).

Weights are read directly, so under FSDP each unit's parameters must be gathered around its use. Networks do not
know about data parallelism (STYLE.md): the caller passes `gather`, a function of a module returning a context
manager in which that module's own parameters are whole (Mean Flow passes engine.dist.unsharded).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from engine import ops

_GELU_C = math.sqrt(2 / math.pi)


def linear(x, dx, layer):
    """(x·Wᵀ + b, ẋ·Wᵀ) with one GEMM over [x; ẋ]."""
    n = x.shape[0]
    y = torch.cat([x, dx]) @ layer.weight.t()
    out, dout = y[:n], y[n:]
    if layer.bias is not None:
        out = out + layer.bias
    return out, dout


def silu(x, dx):
    s = torch.sigmoid(x)
    return x * s, dx * (s * (1 + x * (1 - s)))


def gelu_tanh(x, dx):
    th = torch.tanh(_GELU_C * (x + 0.044715 * x ** 3))
    d = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x * x)
    return 0.5 * x * (1 + th), dx * d


def layer_norm(x, dx, eps):
    """LayerNorm without affine over the last dim: y = (x − μ)·rstd, ẏ = rstd·(ẋc − y·mean(y·ẋc))."""
    if x.numel() == 0:  # a rank whose rows all have r = t still takes part (FSDP gathers collectively)
        return x, dx
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    dxc = dx - dx.mean(-1, keepdim=True)
    return y, rstd * (dxc - y * (y * dxc).mean(-1, keepdim=True))


def modulate(x, dx, shift, dshift, scale, dscale):
    """x(1 + s) + h per sample."""
    return (x * (1 + scale[:, None]) + shift[:, None],
            dx * (1 + scale[:, None]) + x * dscale[:, None] + dshift[:, None])


def timestep(emb, t, dt):
    """The TimestepEmbedder's features [cos(tω), sin(tω)] and their derivative along ṫ, then its MLP."""
    half = emb.freq // 2
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    f = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=acc) / half)
    a = t.to(acc)[:, None] * f[None]
    da = dt.to(acc)[:, None] * f[None]
    wdt = emb.mlp[0].weight.dtype
    e = torch.cat([torch.cos(a), torch.sin(a)], dim=-1).to(wdt)
    de = torch.cat([-torch.sin(a) * da, torch.cos(a) * da], dim=-1).to(wdt)
    h, dh = linear(e, de, emb.mlp[0])
    return linear(*silu(h, dh), emb.mlp[2])


def attention_block(attn, x, dx):
    """Attention (qkv → softmax attention → proj) on both streams."""
    B, N, C = x.shape
    H = attn.heads
    scale = 1 / math.sqrt(C // H)
    # the fused C++ block computes in one dtype; under autocast (mixed bf16 / fp32 streams) the per-op path runs
    if ops.attention_backend(x) == "cpp" and x.dtype == dx.dtype != torch.bfloat16 \
            and not torch.is_autocast_enabled(x.device.type):
        from engine import _C
        out, dout = _C.attention_block_jvp(x, dx, attn.qkv.weight, attn.qkv.bias, attn.proj.weight,
                                           attn.proj.bias, H, scale)
        return out, dout
    qkv, dqkv = linear(x, dx, attn.qkv)
    split = lambda t: t.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    (q, k, v), (dq, dk, dv) = split(qkv), split(dqkv)
    o, do = ops.attention_jvp(q, k, v, dq, dk, dv, scale)
    merge = lambda t: t.transpose(1, 2).reshape(B, N, C)
    return linear(merge(o), merge(do), attn.proj)


def block(blk, x, dx, c, dc):
    mod, dmod = linear(*silu(c, dc), blk.adaLN_modulation[1])
    (sh1, sc1, g1, sh2, sc2, g2), (dsh1, dsc1, dg1, dsh2, dsc2, dg2) = mod.chunk(6, 1), dmod.chunk(6, 1)
    h, dh = modulate(*layer_norm(x, dx, blk.norm1.eps), sh1, dsh1, sc1, dsc1)
    a, da = attention_block(blk.attn, h, dh)
    x, dx = x + g1[:, None] * a, dx + dg1[:, None] * a + g1[:, None] * da
    h, dh = modulate(*layer_norm(x, dx, blk.norm2.eps), sh2, dsh2, sc2, dsc2)
    m, dm = linear(*gelu_tanh(*linear(h, dh, blk.mlp.fc1)), blk.mlp.fc2)
    return x + g2[:, None] * m, dx + dg2[:, None] * m + g2[:, None] * dm


def _whole(module):
    return contextlib.nullcontext()


@torch.no_grad()
def dit_jvp(net, x, t, r, labels, dx, dt, dr, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, du) of `net(x, t, r, labels)` (engine.networks.DiT) along (ẋ, ṫ, ṙ); t, r, ṫ, ṙ: [B] or scalars.
    `gather(module)`: the context in which a module's parameters are whole (module docstring); None when they
    always are."""
    gather = gather or _whole
    with gather(net):
        return _dit_jvp(net, x, t, r, labels, dx, dt, dr, gather)


def _dit_jvp(net, x, t, r, labels, dx, dt, dr, gather):
    if any(blk.mlp.approximate != "tanh" for blk in net.blocks):
        raise NotImplementedError("the dual-stream JVP implements the DiT's GELU-tanh MLP only")
    B = x.shape[0]
    as_rows = lambda v: torch.as_tensor(v, device=x.device).to(x.dtype).reshape(-1).expand(B)
    t, dt = as_rows(t), as_rows(dt)
    pe = net.x_embedder.proj
    stacked = F.conv2d(torch.cat([x, dx]), pe.weight, None, stride=pe.stride)
    h, dh = stacked[:B] + pe.bias[:, None, None], stacked[B:]
    flat = lambda v: v.flatten(2).transpose(1, 2)
    h, dh = flat(h) + net.pos_embed.to(x.dtype), flat(dh)
    c, dc = timestep(net.t_embedder, t, dt)
    c = c + net.y_embedder.embedding_table(net.labels_or_null(labels, B, x.device))
    if net.mean_flow:
        r = t if r is None else as_rows(r)
        dr = dt if dr is None else as_rows(dr)
        e, de = timestep(net.r_embedder, t - r, dt - dr)
        c, dc = c + e, dc + de
    for blk in net.blocks:
        with gather(blk):
            h, dh = block(blk, h, dh, c, dc)
    fl = net.final_layer
    mod, dmod = linear(*silu(c, dc), fl.adaLN_modulation[1])
    (shift, scale), (dshift, dscale) = mod.chunk(2, 1), dmod.chunk(2, 1)
    h, dh = modulate(*layer_norm(h, dh, fl.norm_final.eps), shift, dshift, scale, dscale)
    out, dout = linear(h, dh, fl.linear)
    return net.unpatchify(out), net.unpatchify(dout)
