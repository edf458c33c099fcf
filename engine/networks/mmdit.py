"""MM-DiT (Esser et al. 2024) as REPA's MS-COCO text-to-image code builds it, with Mean Flow's second time input
(issue 21; docs/spec/mf.md §4).

Reference: github sihyun-yu/REPA, `models/mmdit.py` at commit 67f714503e3892f993844aab088ffc5791c92613, built by
`train_t2i.py` as `MMDiT(input_size=32, z_dims=[768], encoder_depth=8)` — which, through values that file fixes,
is depth 24, hidden 768 (32·depth), 24 heads of 32 channels, patch 2 on 4×32×32 SD-VAE latents (256 image tokens),
MLP 4·768 with GELU-tanh, qkv bias, no qk-norm, 77 × 768 CLIP text tokens through `context_embedder`
(Linear 768 → 768), a REPA projector 768 → 2048 → 2048 → 768 on the image tokens after block 8. `MMDiT.from_name
("REPA-COCO")` is that configuration; the state-dict names are the reference's, so its checkpoints load.

    net = MMDiT.from_name("REPA-COCO", mean_flow=True)
    u = net(z_t, t, r, context)        # context: CLIP features [B, 77, 768], or None for the null caption

Architecture, as the reference:
  * tokens: patch embedding + a fixed 2-D sin-cos table (a buffer, the DiT convention); text: context_embedder;
  * conditioning c = t_embedder(t) (+ r_embedder(t − r) with mean_flow). No pooled text goes into c: the caption
    enters through the joint attention only;
  * `joint_blocks[i]`: a `context_block` and an `x_block` with separate weights (adaLN modulation from c, LayerNorm
    without affine ε 1e-6, qkv, proj, MLP); one attention over the concatenation [text; image] (77 + 256 tokens, no
    mask, scale 1/√32); each stream adds its own gated attention output and MLP. In the last block the text stream
    only supplies q, k, v (`pre_only`: shift / scale modulation and qkv, no proj, norm2 or MLP);
  * `final_layer` (adaLN shift / scale, linear to p·p·C) on the image tokens, unpatchified (p, q, c) order.
  * Initialisation: PyTorch's defaults throughout, as the reference (it has no initialize_weights: no adaLN-zero).
    The r embedder (absent from the reference) starts as `r_init` says: 'default' (PyTorch's), or 'zero' (its
    output layer zeroed, so the Mean Flow network equals the SiT it is initialised from: docs/spec/mf.md §3.6).

The null caption is `null_context` (a buffer, [77, 768]): U-ViT's and REPA's `empty_context.npy`, the CLIP features
of "", which a caption store provides (engine/data/captions.py; `set_null_context`). `forward(...,
return_features=True)` also returns the REPA projector's output [B, 256, z_dim] (engine/objectives/repa.py).

The JVP (`jvp`) is the dual-stream form of engine/networks/dit_jvp.py through both streams: primal and tangent
stacked through every linear layer, (O, Ȯ) of the joint attention from engine.ops.attention_jvp; the text tokens
have zero tangent on entry and acquire one through attention.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.checks import finite
from engine.errors import EngineError
from engine.networks import dit_jvp as dj
from engine.networks.dit import FinalLayer, Mlp, TimestepEmbedder, _modulate, _PatchEmbed, sincos_pos_embed
from engine.networks.layers import check_backbone_arguments

CONFIGS = {  # depth, hidden, heads, patch, context_dim, projector_dim, z_dim, encoder_depth
    "REPA-COCO": (24, 768, 24, 2, 768, 2048, 768, 8),
}
R_INITS = ("default", "zero")


class _JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, pre_only: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = None if pre_only else nn.Linear(dim, dim)


class StreamBlock(nn.Module):
    """One modality's half of a joint block (the reference's DismantledBlock)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _JointAttention(dim, heads, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))

    def modulation(self, c):
        return self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)

    def qkv(self, x, mod):
        return self.attn.qkv(_modulate(self.norm1(x), mod[0], mod[1]))

    def finish(self, x, attn, mod):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa[:, None] * self.attn.proj(attn)
        return x + gate_mlp[:, None] * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, last: bool):
        super().__init__()
        self.context_block = StreamBlock(dim, heads, mlp_ratio, pre_only=last)
        self.x_block = StreamBlock(dim, heads, mlp_ratio)
        self.heads = heads

    def forward(self, ctx, x, c):
        mc, mx = self.context_block.modulation(c), self.x_block.modulation(c)
        n = ctx.shape[1]
        qkv = torch.cat([self.context_block.qkv(ctx, mc), self.x_block.qkv(x, mx)], dim=1)
        B, N, C3 = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, self.heads, C3 // (3 * self.heads)).permute(2, 0, 3, 1, 4)
        a = ops.attention(q, k, v).transpose(1, 2).reshape(B, N, C3 // 3)
        x = self.x_block.finish(x, a[:, n:], mx)
        ctx = None if self.context_block.pre_only else self.context_block.finish(ctx, a[:, :n], mc)
        return ctx, x


def _projector(dim: int, hidden: int, z_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, z_dim))


class MMDiT(nn.Module):
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 768,
                 depth: int = 24, num_heads: int = 24, mlp_ratio: float = 4.0, context_dim: int = 768,
                 context_tokens: int = 77, projector_dim: int = 2048, z_dim: int | None = 768,
                 encoder_depth: int = 8, mean_flow: bool = True, r_init: str = "default"):
        super().__init__()
        check_backbone_arguments("MMDiT", dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                                               hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                                               context_dim=context_dim, context_tokens=context_tokens))
        finite("mlp_ratio", mlp_ratio, "MMDiT", low=0.0, strict=True)
        if input_size % patch_size or hidden_size % num_heads:
            raise EngineError(f"MMDiT: input_size {input_size} must be a multiple of the patch {patch_size} and "
                              f"hidden_size {hidden_size} of the {num_heads} heads")
        if z_dim is not None and not 1 <= encoder_depth <= depth:
            raise EngineError(f"MMDiT: encoder_depth (the block whose output REPA aligns) must be in 1 … {depth}, "
                              f"got {encoder_depth}")
        if r_init not in R_INITS:
            raise EngineError(f"MMDiT: r_init must be one of {R_INITS}, got {r_init!r}")
        self.init_kwargs = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                                hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                context_dim=context_dim, context_tokens=context_tokens, projector_dim=projector_dim,
                                z_dim=z_dim, encoder_depth=encoder_depth, mean_flow=mean_flow, r_init=r_init)
        self.in_channels = self.out_channels = in_channels
        self.patch, self.grid, self.mean_flow = patch_size, input_size // patch_size, mean_flow
        self.img_resolution, self.encoder_depth = input_size, encoder_depth
        self.context_shape = (context_tokens, context_dim)
        self.x_embedder = _PatchEmbed(in_channels, hidden_size, patch_size)
        self.register_buffer("pos_embed", torch.tensor(sincos_pos_embed(hidden_size, self.grid),
                                                       dtype=torch.float32)[None])
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.r_embedder = TimestepEmbedder(hidden_size) if mean_flow else None
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.joint_blocks = nn.ModuleList(JointBlock(hidden_size, num_heads, mlp_ratio, last=i == depth - 1)
                                          for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)   # the DiT's
        self.projectors = nn.ModuleList([_projector(hidden_size, projector_dim, z_dim)] if z_dim else [])
        self.register_buffer("null_context", torch.zeros(context_tokens, context_dim))
        self.feature_sink: list | None = None     # set by engine/objectives/repa.py around a step
        if mean_flow and r_init == "zero":
            nn.init.zeros_(self.r_embedder.mlp[2].weight)
            nn.init.zeros_(self.r_embedder.mlp[2].bias)

    @classmethod
    def from_name(cls, name: str, **kw) -> "MMDiT":
        if name not in CONFIGS:
            raise ValueError(f"unknown MMDiT configuration {name!r}; known: {', '.join(CONFIGS)}")
        depth, hidden, heads, patch, ctx, proj, z, enc = CONFIGS[name]
        return cls(**dict(dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, context_dim=ctx,
                               projector_dim=proj, z_dim=z, encoder_depth=enc), **kw))

    # ---- conditioning: captions (engine/objectives use these, not class indices) -------------------------------
    def set_null_context(self, features: torch.Tensor) -> None:
        """The null caption's features [77, 768] (a caption store's empty_context)."""
        features = torch.as_tensor(features)
        if tuple(features.shape) != self.context_shape:
            raise EngineError(f"the null caption's features have shape {tuple(features.shape)}; this MMDiT takes "
                              f"{self.context_shape}")
        self.null_context.copy_(features)

    def condition(self, context, batch: int, device) -> torch.Tensor:
        """Caption features [B, 77, 768] for a batch: `context` itself, or the null caption when None."""
        if context is None:
            return self.null_context.to(device).expand(batch, *self.context_shape)
        context = torch.as_tensor(context, device=device)
        if context.shape != (batch, *self.context_shape):
            raise ValueError(f"MMDiT: captions must be features [B, {self.context_shape[0]}, "
                             f"{self.context_shape[1]}] = [{batch}, ...], got {tuple(context.shape)}")
        return context

    def null_like(self, context: torch.Tensor) -> torch.Tensor:
        return self.null_context.to(context.device, context.dtype).expand_as(context)

    def drop_condition(self, context: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """`context` with the rows where `drop` is true replaced by the null caption."""
        return torch.where(drop.reshape(-1, 1, 1), self.null_like(context), context)

    # ---- forward ------------------------------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B, g, p, c = x.shape[0], self.grid, self.patch, self.out_channels
        return x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)

    def embed(self, x, t, r, context):
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1).expand(B)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t)
        if self.mean_flow:
            r = t if r is None else torch.as_tensor(r, device=x.device).to(x.dtype).reshape(-1).expand(B)
            c = c + self.r_embedder(t - r)
        ctx = self.context_embedder(self.condition(context, B, x.device).to(self.context_embedder.weight.dtype))
        return h, ctx, c

    def forward(self, x: torch.Tensor, t, r=None, labels=None, return_features: bool = False):
        h, ctx, c = self.embed(x, t, r, labels)
        # the REPA projector runs when asked for, or for the gradient-carrying forward while an objective collects
        # it (engine/objectives/repa.py `feature_sink`)
        sink = self.feature_sink if torch.is_grad_enabled() else None
        features = None
        for i, block in enumerate(self.joint_blocks):
            ctx, h = block(ctx, h, c)
            if i + 1 == self.encoder_depth and self.projectors and (return_features or sink is not None):
                features = [p(h) for p in self.projectors]
        if sink is not None:
            sink.append(features)
        out = self.unpatchify(self.final_layer(h, c))
        return (out, features) if return_features else out

    def jvp(self, x, t, r, labels, dx, dt, dr, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, du) along (ẋ, ṫ, ṙ) without autograd, both streams' primal and tangent batched through every linear
        layer (module docstring); equals torch.func.jvp of forward (tests/test_mmdit.py)."""
        gather = gather or (lambda m: contextlib.nullcontext())
        with torch.no_grad(), gather(self):
            return _mmdit_jvp(self, x, t, r, labels, dx, dt, dr, gather)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # a reference checkpoint has no null_context (the data's empty_context is set separately) and may have the
        # second time embedder under the name other Mean Flow codebases use
        state_dict = {k.replace("h_embedder.", "r_embedder.", 1) if k.startswith("h_embedder.") else k: v
                      for k, v in state_dict.items()}
        state_dict.setdefault("null_context", self.null_context)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def init_from_sit(net: MMDiT, sit_state: dict) -> MMDiT:
    """A Mean Flow MMDiT initialised from a SiT (flow-matching) MMDiT's weights — the COCO mid-training start and the
    "SiT init." baseline (docs/spec/mf.md §3.6, §4.1): every tensor the two share is copied; the r embedder keeps its
    own initialisation (`r_init`: 'zero' makes the network equal the SiT at r = t … and everywhere)."""
    own = net.state_dict()
    missing = [k for k in own if k not in sit_state and not k.startswith("r_embedder.")]
    if missing:
        raise EngineError(f"the SiT state lacks {len(missing)} of this network's tensors (e.g. {missing[:3]})")
    for k, v in sit_state.items():
        if k in own:
            if own[k].shape != v.shape:
                raise EngineError(f"{k}: the SiT has shape {tuple(v.shape)}, this network {tuple(own[k].shape)}")
            own[k] = v
    net.load_state_dict(own)
    return net


def _stream_qkv(blk: StreamBlock, x, dx, c, dc):
    mod, dmod = dj.linear(*dj.silu(c, dc), blk.adaLN_modulation[1])
    k = 2 if blk.pre_only else 6
    mods, dmods = mod.chunk(k, 1), dmod.chunk(k, 1)
    h, dh = dj.modulate(*dj.layer_norm(x, dx, blk.norm1.eps), mods[0], dmods[0], mods[1], dmods[1])
    qkv, dqkv = dj.linear(h, dh, blk.attn.qkv)
    return qkv, dqkv, mods, dmods


def _stream_finish(blk: StreamBlock, x, dx, a, da, mods, dmods):
    p, dp = dj.linear(a, da, blk.attn.proj)
    g1, dg1 = mods[2][:, None], dmods[2][:, None]
    x, dx = x + g1 * p, dx + dg1 * p + g1 * dp
    h, dh = dj.modulate(*dj.layer_norm(x, dx, blk.norm2.eps), mods[3], dmods[3], mods[4], dmods[4])
    m, dm = dj.linear(*dj.gelu_tanh(*dj.linear(h, dh, blk.mlp.fc1)), blk.mlp.fc2)
    g2, dg2 = mods[5][:, None], dmods[5][:, None]
    return x + g2 * m, dx + dg2 * m + g2 * dm


def _mmdit_jvp(net: MMDiT, x, t, r, labels, dx, dt, dr, gather):
    B = x.shape[0]
    as_rows = lambda v: torch.as_tensor(v, device=x.device).to(x.dtype).reshape(-1).expand(B)
    t, dt = as_rows(t), as_rows(dt)
    pe = net.x_embedder.proj
    stacked = F.conv2d(torch.cat([x, dx]), pe.weight, None, stride=pe.stride)
    flat = lambda v: v.flatten(2).transpose(1, 2)
    h, dh = flat(stacked[:B] + pe.bias[:, None, None]) + net.pos_embed.to(x.dtype), flat(stacked[B:])
    c, dc = dj.timestep(net.t_embedder, t, dt)
    if net.mean_flow:
        r = t if r is None else as_rows(r)
        dr = dt if dr is None else as_rows(dr)
        e, de = dj.timestep(net.r_embedder, t - r, dt - dr)
        c, dc = c + e, dc + de
    ctx_in = net.condition(labels, B, x.device).to(net.context_embedder.weight.dtype)
    ctx = net.context_embedder(ctx_in)
    dctx = torch.zeros_like(ctx)
    for blk in net.joint_blocks:
        with gather(blk):
            cb, xb = blk.context_block, blk.x_block
            qc, dqc, mc, dmc = _stream_qkv(cb, ctx, dctx, c, dc)
            qx, dqx, mx, dmx = _stream_qkv(xb, h, dh, c, dc)
            n = ctx.shape[1]
            qkv, dqkv = torch.cat([qc, qx], 1), torch.cat([dqc, dqx], 1)
            Bq, N, C3 = qkv.shape
            split = lambda v: v.reshape(Bq, N, 3, blk.heads, C3 // (3 * blk.heads)).permute(2, 0, 3, 1, 4)
            (q, k, v), (dq, dk, dv) = split(qkv), split(dqkv)
            o, do = ops.attention_jvp(q, k, v, dq, dk, dv)
            merge = lambda v: v.transpose(1, 2).reshape(Bq, N, C3 // 3)
            o, do = merge(o), merge(do)
            h, dh = _stream_finish(xb, h, dh, o[:, n:], do[:, n:], mx, dmx)
            if not cb.pre_only:
                ctx, dctx = _stream_finish(cb, ctx, dctx, o[:, :n], do[:, :n], mc, dmc)
    fl = net.final_layer
    mod, dmod = dj.linear(*dj.silu(c, dc), fl.adaLN_modulation[1])
    (shift, scale), (dshift, dscale) = mod.chunk(2, 1), dmod.chunk(2, 1)
    h, dh = dj.modulate(*dj.layer_norm(h, dh, fl.norm_final.eps), shift, dshift, scale, dscale)
    out, dout = dj.linear(h, dh, fl.linear)
    return net.unpatchify(out), net.unpatchify(dout)
