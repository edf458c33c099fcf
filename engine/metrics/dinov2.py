"""DINOv2 ViT-L/14, the feature network of FD_DINOv2 (docs/spec/edm2_latent.md §5.1): 1024-d final-norm CLS token;
and ViT-B/14 (`DINOv2.from_file(path, "vitb14")`, file dinov2_vitb14_pretrain.pth: the same architecture at width
768, depth 12, 12 heads), whose normalised patch tokens are REPA's alignment target (`repa_features`, below).

Implemented here and loaded from the released weight file `dinov2_vitl14_pretrain.pth` (the state dict the
`facebookresearch/dinov2` hub entry `dinov2_vitl14` loads): `cls_token`, `pos_embed` [1, 1 + 37², 1024] (trained
at 518²), `mask_token`, `patch_embed.proj.*`, `blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma}`, `norm.*`. 24 pre-norm blocks, 16 heads, LayerNorm ε = 1e-6, LayerScale, GELU MLP of 4096.

Preprocessing as EDM2's protocol: uint8 images resized to 224×224 (bicubic, antialiased), /255, normalised with
ImageNet's mean and std. At 224² the 37×37 position grid is resampled to 16×16 as DINOv2 does: bicubic
interpolation with scale factor (16 + 0.1)/37 (its `interpolate_offset`), no antialiasing.

REPA's target (github sihyun-yu/REPA at 67f7145, train.py `preprocess_raw_image`, utils.py `load_encoders`) differs
in each of those steps, and `repa_features` follows it: /255 and the normalisation first, then a bicubic resize to
224·(resolution/256) without antialiasing; the position grid resampled once to the 16·(resolution/256) patch grid
by size (timm's resample_abs_pos_embed: bicubic, antialiased); the output is the final-norm patch tokens
(`x_norm_patchtokens`) [N, 256, 768] at 256².
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoints.files import file_sha256, read_state_dict_file, weights_file
from engine.checkpoints.state_dicts import mismatch_summary
from engine.metrics.detector_input import uint8_rgb
from engine.networks.dit import Attention, Mlp

WEIGHTS_FILE = "dinov2_vitl14_pretrain.pth"
WHERE = ("pass its path (--dinov2), or set ENGINE_DINOV2_WEIGHTS; it is the `dinov2_vitl14` checkpoint of "
         "facebookresearch/dinov2 (https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth)")
VARIANTS = {  # name: (dim, depth, heads, mlp, weight file)
    "vitl14": (1024, 24, 16, 4096, WEIGHTS_FILE),
    "vitb14": (768, 12, 12, 3072, "dinov2_vitb14_pretrain.pth"),
}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class _LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp, approximate="none")
        self.ls2 = _LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DINOv2(nn.Module):
    """`net(images_uint8) -> [N, 1024]`. Defaults are ViT-L/14; smaller widths serve the tests."""

    def __init__(self, dim: int = 1024, depth: int = 24, heads: int = 16, mlp: int = 4096, patch: int = 14,
                 train_size: int = 518, input_size: int = 224):
        super().__init__()
        self.patch, self.input_size = patch, input_size
        grid = train_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used only for masked pre-training; kept for loading
        self.patch_embed = _PatchEmbed(patch, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.feature_dim = dim
        self.source: dict = {}   # set by from_file: file, sha256
        self.eval().requires_grad_(False)

    def describe(self) -> dict:
        """The weight file this detector was read from and its SHA-256 (report.json)."""
        return dict(self.source)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = uint8_rgb(images, "DINOv2")
        x = F.interpolate(images.to(torch.float32), size=(self.input_size, self.input_size), mode="bicubic",
                          antialias=True, align_corners=False) / 255
        mean = torch.tensor(MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(STD, device=x.device).reshape(1, 3, 1, 1)
        return (x - mean) / std

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The trained grid's position embedding resampled to h × w patches (DINOv2's interpolate_pos_encoding)."""
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        m = int(math.isqrt(grid.shape[1]))
        if (h, w) == (m, m):
            return self.pos_embed
        grid = grid.reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
        if grid.shape[-2:] != (h, w):
            raise RuntimeError(f"position grid resampled to {tuple(grid.shape[-2:])}, expected {(h, w)}")
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(cls.dtype)], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding(h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0].float()

    @torch.no_grad()
    def repa_features(self, images: torch.Tensor) -> torch.Tensor:
        """REPA's target: the final-norm patch tokens of uint8 RGB images [N, 3, R, R] with REPA's preprocessing
        (module docstring) — [N, (16·R/256)², dim], float32."""
        images = uint8_rgb(images, "DINOv2")
        size = 224 * (images.shape[-1] // 256) if images.shape[-1] >= 256 else self.input_size
        mean = torch.tensor(MEAN, device=images.device).reshape(1, 3, 1, 1)
        std = torch.tensor(STD, device=images.device).reshape(1, 3, 1, 1)
        x = (images.to(torch.float32) / 255 - mean) / std
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        g = size // self.patch
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        m = int(math.isqrt(grid.shape[1]))
        grid = F.interpolate(grid.reshape(1, m, m, -1).permute(0, 3, 1, 2).float(), size=(g, g), mode="bicubic",
                             antialias=True, align_corners=False)
        pos = torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, g * g, -1).to(cls_pos.dtype)], dim=1)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:].float()

    @classmethod
    def from_file(cls, path=None, variant: str = "vitl14") -> "DINOv2":
        if variant not in VARIANTS:
            raise ValueError(f"unknown DINOv2 variant {variant!r}; known: {', '.join(VARIANTS)}")
        dim, depth, heads, mlp, file = VARIANTS[variant]
        if variant == "vitl14":
            env, where, purpose = "ENGINE_DINOV2_WEIGHTS", WHERE, "FD_DINOv2"
        else:   # REPA's encoder (engine/data/captions.py stores its features beside the latents)
            env, purpose = "ENGINE_REPA_DINOV2_WEIGHTS", "REPA's alignment target"
            where = (f"pass its path (--dinov2), or set {env}; it is the `dinov2_{variant}` checkpoint of "
                     f"facebookresearch/dinov2 (https://dl.fbaipublicfiles.com/dinov2/dinov2_{variant}/{file})")
        path = weights_file(path, env, f"{purpose} needs the DINOv2 {variant} weights ({file})", where, names=(file,))
        net = cls(dim=dim, depth=depth, heads=heads, mlp=mlp)
        net.load_state_dict(read_dinov2_state(path, net, f"DINOv2 {variant} ({file})"), strict=True)
        net.source = {"file": os.fspath(path), "sha256": file_sha256(path)}
        if variant != "vitl14":
            net.source["variant"] = variant
        return net


def read_dinov2_state(path, net: DINOv2, what: str = f"DINOv2 ViT-L/14 ({WEIGHTS_FILE})") -> dict[str, torch.Tensor]:
    state = read_state_dict_file(path)
    expected = net.state_dict()
    problems = mismatch_summary(expected, state)
    if problems:
        raise ValueError(f"{path} is not {what}: {problems}")
    return {k: state[k].float() for k in expected}
