"""DiT / SiT backbones with Mean Flow's second time input (docs/spec/mf.md §3).

    net = DiT.from_name("XL/2", input_size=32, in_channels=4, num_classes=1000)
    u = net(z_t, t, r, labels)          # the average velocity u(z_t, r, t); t = 1 is noise (docs/spec/mf.md §0)

Architecture and state_dict as docs/spec/mf.md §3.2–3.3: patch embedding, fixed 2-D sin-cos position table (a
non-trainable parameter, as in the reference state dicts), timestep embedders for t (`t_embedder`) and for
h = t − r (`r_embedder`; other codebases call it `h_embedder` — `load_state_dict` accepts both), a label table
with the null class at index `num_classes`, adaLN-Zero blocks (LayerNorm without affine, ε 1e-6; attention
through `engine.ops.attention`, which has a forward-mode rule, so `torch.func.jvp` works through the whole net;
GELU-tanh MLP), and the adaLN final layer. Initialisation as DiT: the network outputs exactly 0 at init.
`mean_flow=False` gives the plain SiT/flow-matching network (no second embedder; `r` is ignored).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.checks import finite
from engine.errors import EngineError
from engine.networks.dit_jvp import dit_jvp
from engine.networks.layers import check_backbone_arguments

CONFIGS = {  # depth, hidden, heads, patch (docs/spec/mf.md §3.1)
    "B/4": (12, 768, 12, 4), "B/2": (12, 768, 12, 2), "M/2": (16, 1024, 16, 2), "L/2": (24, 1024, 16, 2),
    "XL/2": (28, 1152, 16, 2),
}


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """[grid², dim]: the first dim/2 channels encode the column, the last dim/2 the row (DiT's meshgrid order);
    each half is [sin(pos·ω_k)…, cos(pos·ω_k)…] with ω_k = 10000^(−k/(dim/4))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def enc(pos):
        a = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([enc(cols), enc(rows)], axis=1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq: int = 256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq // 2
        dt = torch.float64 if t.dtype == torch.float64 else torch.float32  # arguments in fp32 at least
        f = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=dt) / half)
        args = t.to(dt)[:, None] * f[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first (docs/spec/mf.md §3.2)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention with timm's tensor names (`qkv`, `proj`), through engine.ops.attention."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(ops.attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 → GELU → fc2 (timm's names); DiT uses the tanh approximation, ViTs the exact GELU."""

    def __init__(self, dim, hidden, approximate: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class _PatchEmbed(nn.Module):
    def __init__(self, in_channels, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # the last row is the null class


class DiT(nn.Module):
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 out_channels: int | None = None, mean_flow: bool = True):
        super().__init__()
        check_backbone_arguments("DiT", dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                                             hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                                             num_classes=num_classes, out_channels=out_channels))
        finite("mlp_ratio", mlp_ratio, "DiT", low=0.0, strict=True)
        if input_size % patch_size:
            raise EngineError(f"DiT: input_size {input_size} is not a multiple of the patch size {patch_size}")
        if hidden_size % num_heads:
            raise EngineError(f"DiT: hidden_size {hidden_size} is not divisible by {num_heads} heads")
        self.init_kwargs = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                                hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                num_classes=num_classes, out_channels=out_channels, mean_flow=mean_flow)
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.patch, self.grid, self.num_classes, self.mean_flow = patch_size, input_size // patch_size, num_classes, \
            mean_flow
        self.img_resolution = input_size
        self.label_dim = num_classes
        self.x_embedder = _PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.r_embedder = TimestepEmbedder(hidden_size) if mean_flow else None
        self.y_embedder = _LabelEmbedder(num_classes, hidden_size)
        # torch.tensor (not from_numpy) so that construction under `torch.device("meta")` stays on meta
        self.pos_embed = nn.Parameter(torch.tensor(sincos_pos_embed(hidden_size, self.grid), dtype=torch.float32)[None],
                                      requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._initialize()

    @classmethod
    def from_name(cls, name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                  **kw) -> "DiT":
        if name not in CONFIGS:
            raise ValueError(f"unknown DiT configuration {name!r}; known: {', '.join(CONFIGS)}")
        depth, hidden, heads, patch = CONFIGS[name]
        return cls(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                   depth=depth, num_heads=heads, num_classes=num_classes, **kw)

    def _initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder, self.r_embedder):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B, g, p, c = x.shape[0], self.grid, self.patch, self.out_channels
        return x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)

    def labels_or_null(self, labels, batch: int, device) -> torch.Tensor:
        if labels is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long()
        if labels.shape != (batch,):
            raise ValueError(f"labels must be class indices [B] = [{batch}], got {tuple(labels.shape)}")
        return labels

    # the conditioning interface the flow-map objectives use (class indices here, captions in engine/networks/mmdit.py)
    def condition(self, labels, batch: int, device) -> torch.Tensor:
        return self.labels_or_null(labels, batch, device)

    def null_like(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.num_classes)

    def drop_condition(self, labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return torch.where(drop, self.null_like(labels), labels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None, labels=None):
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1).expand(B)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder.embedding_table(self.labels_or_null(labels, B, x.device))
        if self.mean_flow:
            r = t if r is None else torch.as_tensor(r, device=x.device).to(x.dtype).reshape(-1).expand(B)
            c = c + self.r_embedder(t - r)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def jvp(self, x, t, r, labels, dx, dt, dr, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, du) along (ẋ, ṫ, ṙ) without autograd, primal and tangent batched through every linear layer
        (engine/networks/dit_jvp.py); equals torch.func.jvp of forward. `gather(module)` gives the context in
        which a sharded module's parameters are whole (the caller's data parallelism; None: they always are)."""
        return dit_jvp(self, x, t, r, labels, dx, dt, dr, gather)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # other Mean Flow codebases name the second time embedder h_embedder (docs/spec/mf.md §3.3)
        state_dict = {k.replace("h_embedder.", "r_embedder.", 1) if k.startswith("h_embedder.") else k: v
                      for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
