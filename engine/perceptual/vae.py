"""The Stable Diffusion VAE (`stabilityai/sd-vae-ft-mse`, diffusers `AutoencoderKL`) and the two latent
conventions: the decoder for evaluating latent-space networks (final latents → uint8 images), the encoder for
building latent datasets (uint8 images → posterior moments; `python -m engine.pipelines.encode_latents`).

    decode = LatentDecoder.from_file("sd-vae-ft-mse/diffusion_pytorch_model.safetensors")
    images = decode(final_latents)          # uint8 [N, 3, 8H, 8W]
    moments = LatentEncoder.from_file(path, convention="sd")(images)   # [N, 8, H/8, W/8]: mean, std

Two conventions. `edm2` (docs/spec/edm2_latent.md §3.1): model-space ("final") latents are raw VAE latents standardised
per channel,
final = raw·scale_c + bias_c (the table in the spec); decoding inverts that, runs the VAE decoder in float32, and
maps its output — which lives in [0, 1], because EDM2 encodes pixels/255 rather than SD's [−1, 1] — to uint8 as
clamp(x, 0, 1)·255 truncated. `sd` (DiT / SiT / Mean Flow, docs/spec/mf.md §7.1): latents are raw × 0.18215 and the
decoder output is in SD's [−1, 1], mapped as clamp((x + 1)/2, 0, 1)·255. Both halves are implemented here; their weights
are read from the diffusers
safetensors file (`quant_conv.*`, `encoder.*` / `post_quant_conv.*`, `decoder.*`), in either of diffusers'
attention namings (`to_q/to_k/to_v/to_out.0` or the older `query/key/value/proj_attn`, as in sd-vae-ft-mse).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoints.files import weights_file
from engine.checkpoints.state_dicts import mismatch_summary
from engine.errors import EngineError

SCALE = (0.11990407, 0.10822511, 0.13477089, 0.15243903)
BIAS = (-0.69664264, -0.35173160, -0.01617251, 0.32774392)
SD_SCALING = 0.18215  # the SD convention of DiT / SiT / Mean Flow latents (docs/spec/mf.md §7.1)
# as published (stabilityai/sd-vae-ft-mse), also under the repository's name inside the --weights directory
VAE_FILES = ("diffusion_pytorch_model.safetensors", "sd-vae-ft-mse/diffusion_pytorch_model.safetensors")
WHERE = ("pass its path (--vae) or set ENGINE_VAE_WEIGHTS; it is diffusion_pytorch_model.safetensors of the "
         "Hugging Face repository stabilityai/sd-vae-ft-mse")


def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class _Resnet(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _Attention(nn.Module):
    """One-head self-attention over the H·W positions, with diffusers' current names."""

    def __init__(self, c):
        super().__init__()
        self.group_norm = _norm(c)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.group_norm(x).reshape(n, c, h * w).transpose(1, 2)
        a = F.scaled_dot_product_attention(self.to_q(t)[:, None], self.to_k(t)[:, None], self.to_v(t)[:, None])
        return x + self.to_out[0](a[:, 0]).transpose(1, 2).reshape(n, c, h, w)


class _Mid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(c, c), _Resnet(c, c)])
        self.attentions = nn.ModuleList([_Attention(c)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Up(nn.Module):
    def __init__(self, cin, cout, upsample: bool, layers: int = 3):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(cin if i == 0 else cout, cout) for i in range(layers)])
        self.upsamplers = nn.ModuleList([_Upsample(cout)]) if upsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class _Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # diffusers' asymmetric padding (right and bottom only)


class _Down(nn.Module):
    def __init__(self, cin, cout, downsample: bool, layers: int = 2):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(cin if i == 0 else cout, cout) for i in range(layers)])
        self.downsamplers = nn.ModuleList([_Downsample(cout)]) if downsample else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class _Encoder(nn.Module):
    def __init__(self, latent=4, channels=(128, 256, 512, 512), inp=3):
        super().__init__()
        self.conv_in = nn.Conv2d(inp, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [_Down(channels[max(i - 1, 0)], channels[i], downsample=i < len(channels) - 1)
             for i in range(len(channels))])
        self.mid_block = _Mid(channels[-1])
        self.conv_norm_out = _norm(channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class _Decoder(nn.Module):
    def __init__(self, latent=4, channels=(128, 256, 512, 512), out=3):
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        self.mid_block = _Mid(rev[0])
        self.up_blocks = nn.ModuleList(
            [_Up(rev[max(i - 1, 0)], rev[i], upsample=i < len(rev) - 1) for i in range(len(rev))])
        self.conv_norm_out = _norm(rev[-1])
        self.conv_out = nn.Conv2d(rev[-1], out, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class LatentDecoder(nn.Module):
    """EDM2 final latents [N, 4, h, w] → uint8 images [N, 3, 8h, 8w]. `channels` other than SD's serve the tests."""

    def __init__(self, channels=(128, 256, 512, 512), convention: str = "edm2"):
        super().__init__()
        if convention not in ("edm2", "sd"):
            raise EngineError(f"latent convention must be 'edm2' or 'sd', got {convention!r}")
        self.convention = convention
        self.post_quant_conv = nn.Conv2d(4, 4, 1)
        self.decoder = _Decoder(channels=channels)
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 4, 1, 1))
        self.register_buffer("bias", torch.tensor(BIAS).reshape(1, 4, 1, 1))
        self.eval().requires_grad_(False)

    def raw_latents(self, final: torch.Tensor) -> torch.Tensor:
        if self.convention == "sd":
            return final.to(torch.float32) / SD_SCALING
        return (final.to(torch.float32) - self.bias) / self.scale

    @torch.no_grad()
    def forward(self, final: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        outs = []
        for part in self.raw_latents(final).split(chunk):
            x = self.decoder(self.post_quant_conv(part))
            if self.convention == "sd":  # SD's [−1, 1] images, ADM/DiT's conversion (docs/spec/mf.md §7.1)
                x = (x + 1) / 2
            outs.append((x.clamp(0, 1) * 255).to(torch.uint8))  # truncation, as EDM2 (docs/spec/edm2_latent.md §3.1)
        return torch.cat(outs)

    @staticmethod
    def weights_path(path=None) -> str:
        """`path`, ENGINE_VAE_WEIGHTS, or the published file in --weights; FileNotFoundError saying where from."""
        return weights_file(path, "ENGINE_VAE_WEIGHTS", "decoding latents needs the SD VAE "
                            "(diffusion_pytorch_model.safetensors)", WHERE, names=VAE_FILES)

    @classmethod
    def from_file(cls, path=None, convention: str = "edm2") -> "LatentDecoder":
        path = cls.weights_path(path)
        state = read_vae_file(path)
        net = cls(channels=_widths(state, "decoder.up_blocks", reverse=True), convention=convention)
        _load_named(net, state, path)
        return net

    def load_vae_state(self, state: dict) -> "LatentDecoder":
        """Load diffusers' AutoencoderKL tensors (decoder part), either attention naming."""
        ours = _vae_part(state, ("decoder.", "post_quant_conv."))
        expected = {k: v for k, v in self.state_dict().items() if k not in ("scale", "bias")}
        problems = mismatch_summary(expected, ours)
        if problems:
            raise EngineError(f"not the SD VAE (AutoencoderKL, sd-vae-ft-mse) decoder: {problems}")
        self.load_state_dict({**ours, "scale": self.scale, "bias": self.bias})
        return self


class LatentEncoder(nn.Module):
    """uint8 images [N, 3, H, W] → the VAE posterior's moments [N, 8, H/8, W/8] (mean, then std = exp(½·logvar)
    with logvar clamped to [−30, 20] as diffusers does): what latent datasets store (EDM2's `encode` format). The
    input range follows the convention: `sd` feeds SD's [−1, 1] (DiT / SiT / Mean Flow latents, docs/spec/mf.md §7.1),
    `edm2` feeds [0, 1] as EDM2's dataset tool does (docs/spec/edm2_latent.md §3.1). Training draws the posterior sample
    and applies the scaling (engine/objectives/latent.py)."""

    def __init__(self, channels=(128, 256, 512, 512), convention: str = "sd"):
        super().__init__()
        if convention not in ("edm2", "sd"):
            raise EngineError(f"latent convention must be 'edm2' or 'sd', got {convention!r}")
        self.convention = convention
        self.encoder = _Encoder(channels=channels)
        self.quant_conv = nn.Conv2d(8, 8, 1)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise EngineError(f"the encoder takes uint8 RGB images [N, 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if images.shape[2] % 8 or images.shape[3] % 8:
            raise EngineError(f"image sides must be multiples of 8 (the VAE downsamples 8×), got "
                             f"{tuple(images.shape[2:])}")
        x = images.to(self.quant_conv.weight.dtype) / 255  # float32 weights (float64 in the reference test)
        if self.convention == "sd":
            x = x * 2 - 1
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return torch.cat([mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))], dim=1)

    @classmethod
    def from_file(cls, path=None, convention: str = "sd") -> "LatentEncoder":
        path = weights_file(path, "ENGINE_VAE_WEIGHTS", "encoding images needs the SD VAE "
                            "(diffusion_pytorch_model.safetensors)", WHERE, names=VAE_FILES)
        state = read_vae_file(path)
        net = cls(channels=_widths(state, "encoder.down_blocks"), convention=convention)
        _load_named(net, state, path)
        return net

    def load_vae_state(self, state: dict) -> "LatentEncoder":
        """Load diffusers' AutoencoderKL tensors (encoder part), either attention naming."""
        ours = _vae_part(state, ("encoder.", "quant_conv."))
        problems = mismatch_summary(self.state_dict(), ours)
        if problems:
            raise EngineError(f"not the SD VAE (AutoencoderKL, sd-vae-ft-mse) encoder: {problems}")
        self.load_state_dict(ours)
        return self


def _widths(state: dict, blocks: str, reverse: bool = False) -> tuple[int, ...]:
    """The block widths as stored (128, 256, 512, 512 for SD's VAE; the decoder lists them deepest first), so
    that smaller VAEs in the same layout load too (tests, --smoke runs); SD's when the file has none."""
    widths, i = [], 0
    while f"{blocks}.{i}.resnets.0.conv1.weight" in state:
        widths.append(state[f"{blocks}.{i}.resnets.0.conv1.weight"].shape[0])
        i += 1
    return (tuple(reversed(widths)) if reverse else tuple(widths)) or (128, 256, 512, 512)


def _vae_part(state: dict, prefixes: tuple[str, ...]) -> dict:
    """The tensors of one half of an AutoencoderKL file, in float32, with the older attention names
    (query/key/value/proj_attn, stored as 1×1 convolutions in some files) mapped to the current ones."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    ours = {}
    for k, v in state.items():
        if not k.startswith(prefixes):
            continue
        for old, new in renames.items():
            k = k.replace(old, new)
        if ".mid_block.attentions.0.to_" in k and v.ndim == 4:  # old 1×1-conv storage
            v = v[:, :, 0, 0]
        ours[k] = v.float()
    return ours


def _load_named(net, state: dict, path) -> None:
    try:
        net.load_vae_state(state)
    except EngineError as e:
        raise EngineError(f"{path}: {e}") from None


def read_vae_file(path) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(os.fspath(path))
    except Exception as e:
        raise EngineError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
