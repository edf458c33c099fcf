"""Differentiable augmentations applied jointly to two batches: the StyleGAN2-ADA pipeline (Karras et al. 2020) as
E-LatentLPIPS uses it (docs/spec/edm2_latent.md §6.4). The same random transform — per sample — reaches both
arguments, so d(T(x), T(y)) compares like with like; gradients flow through T into either argument.

    aug = JointAugment("bgcfnc")                # blit, geometric, colour, filter, noise, cutout
    params = aug.draw(batch, device, generator) # every random number of one call, per sample
    x2, y2 = aug.apply(x, y, params)            # the same transform on both

Parameters are drawn from the step's random stream (engine/networks/dropout.py `step_stream`) or an explicit
generator, so a run replays exactly. `draw` and `apply` are separate so that each op can be checked with
fixed parameters (tests/test_elatentlpips.py).

Execution follows the reference: blit + geometric ops compose one inverse affine matrix G⁻¹ applied in one
resampling pass (reflect padding, 2× upsampling with the sym6 low-pass, bilinear sampling, 2× downsampling with
the flipped filter, crop); colour ops compose one 4×4 matrix C; the filter bank is the sym2 4-band bank; noise and
cutout last. Two deliberate differences, neither changing the result: the reflect padding is the largest the image
allows instead of the batch's computed margin (that would need a host synchronisation; the samples read are the
same), and `draw` is separate from `apply`. Two reference behaviours are settings:
  * `color_matrix` for 4-channel latents: 'reference' multiplies the 4×4 homogeneous matrix onto the 4 channels (the
    SNU / CMT code: channels 0–2 mixed like RGB, the brightness offset multiplied by channel 3, channel 3
    unchanged); 'affine' applies the RGB affine map to channels 0–2 and leaves channel 3 alone;
  * `shared_noise`: one noise tensor for both arguments (SNU / CMT) or one each (the official package).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import EngineError

__all__ = ["JointAugment", "PIPELINES", "SYM2", "SYM6", "filter_bank"]

# Wavelet low-pass filters (PyWavelets' decomposition coefficients): sym6 for resampling, sym2 for the filter bank.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148)
SYM2 = (-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025)

_GROUPS = dict(b=("xflip", "rotate90", "xint"), g=("scale", "rotate", "aniso", "xfrac"),
               c=("brightness", "contrast", "lumaflip", "hue", "saturation"), f=("imgfilter",), n=("noise",),
               cutout=("cutout",))
# The named pipelines of E-LatentLPIPS (SNU-VGILab/e-latentlpips `ada_augpipe`).
PIPELINES = {
    "bg": _GROUPS["b"] + _GROUPS["g"],
    "bgc": _GROUPS["b"] + _GROUPS["g"] + _GROUPS["c"],
    "bgcf": _GROUPS["b"] + _GROUPS["g"] + _GROUPS["c"] + _GROUPS["f"],
    "bgcfn": _GROUPS["b"] + _GROUPS["g"] + _GROUPS["c"] + _GROUPS["f"] + _GROUPS["n"],
    "bgcfnc": _GROUPS["b"] + _GROUPS["g"] + _GROUPS["c"] + _GROUPS["f"] + _GROUPS["n"] + _GROUPS["cutout"],
    "bg+cutout": _GROUPS["b"] + _GROUPS["g"] + _GROUPS["cutout"],
    "bgc+cutout": _GROUPS["b"] + _GROUPS["g"] + _GROUPS["c"] + _GROUPS["cutout"],
}
_GEOMETRIC = _GROUPS["b"] + _GROUPS["g"]
_COLOR = _GROUPS["c"]


def filter_bank() -> np.ndarray:
    """The 4-band filter bank [4, 43] built from sym2 (H(z) low-pass, H(−z) high-pass): band i is the high-pass
    H(−z)H(−z⁻¹)/2 at scale 2^(i−1) below the low-passes of the finer scales; band 0 the remaining low-pass."""
    lo = np.asarray(SYM2)
    hi = lo * (-1.0) ** np.arange(lo.size)
    lo2, hi2 = np.convolve(lo, lo[::-1]) / 2, np.convolve(hi, hi[::-1]) / 2
    bank = np.eye(4, 1)
    for i in range(1, 4):
        up = np.zeros((4, bank.shape[1] * 2 - 1))
        up[:, ::2] = bank                                   # zero-stuffing: the next band is one octave lower
        bank = np.stack([np.convolve(row, lo2) for row in up])
        start = (bank.shape[1] - hi2.size) // 2
        bank[i, start:start + hi2.size] += hi2
    return bank


def _mat3(rows, batch, device, dtype):
    """[B, 3, 3] from rows of per-sample tensors or numbers."""
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=dtype, device=device).expand(batch) for v in r], -1)
                        for r in rows], -2)


def _translate(tx, ty, b, d, t):
    return _mat3([[1, 0, tx], [0, 1, ty], [0, 0, 1]], b, d, t)


def _scale(sx, sy, b, d, t):
    return _mat3([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], b, d, t)


def _rotate(theta, b, d, t):
    c, s = torch.cos(theta), torch.sin(theta)
    return _mat3([[c, -s, 0], [s, c, 0], [0, 0, 1]], b, d, t)


def _updown_filter(dtype, device) -> torch.Tensor:
    f = torch.tensor(SYM6, dtype=torch.float64)
    return (f / f.sum()).to(dtype=dtype, device=device)


def _separable(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Correlate every channel with f along W, then along H (no padding)."""
    c = x.shape[1]
    x = F.conv2d(x, f.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, f.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def upsample2x(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """StyleGAN's `upsample2d(x, f, up=2)`: zero-stuffing, zero padding ((n+1)//2, (n−2)//2), convolution with
    the (flipped) filter at gain 2 per axis — output 2H × 2W."""
    b, c, h, w = x.shape
    z = x.new_zeros(b, c, 2 * h, 2 * w)
    z[:, :, ::2, ::2] = x
    n = f.numel()
    z = F.pad(z, [(n + 1) // 2, (n - 2) // 2] * 2)
    return _separable(z, f.flip(0) * 2)


def downsample2x_crop(x: torch.Tensor, f: torch.Tensor, crop: int) -> torch.Tensor:
    """StyleGAN's `downsample2d(x, f, down=2, padding=−crop, flip_filter=True)`: crop, correlation with f, every
    second sample."""
    n = f.numel()
    p0, p1 = -crop + (n - 1) // 2, -crop + (n - 2) // 2
    x = F.pad(x, [p0, p1, p0, p1])          # negative: a crop
    return _separable(x, f)[:, :, ::2, ::2]


class JointAugment(torch.nn.Module):
    """The ADA pipeline on two batches (module docstring). `ops`: a PIPELINES name or a list of op names; `p`: the
    overall probability multiplier (1 in E-LatentLPIPS: every op on every sample)."""

    def __init__(self, ops="bgcfnc", p: float = 1.0, color_matrix: str = "reference", shared_noise: bool = True,
                 xint_max=0.125, scale_std=0.2, rotate_max=1.0, aniso_std=0.2, xfrac_std=0.125, brightness_std=0.2,
                 contrast_std=0.5, hue_max=1.0, saturation_std=1.0, imgfilter_std=1.0, noise_std=0.1,
                 cutout_size=0.5):
        super().__init__()
        names = PIPELINES.get(ops, ops) if isinstance(ops, str) else tuple(ops)
        if isinstance(names, str) or not set(names) <= set(sum(_GROUPS.values(), ())):
            raise EngineError(f"JointAugment: ops must be one of {sorted(PIPELINES)} or a list of "
                              f"{sorted(sum(_GROUPS.values(), ()))}; got {ops!r}")
        if color_matrix not in ("reference", "affine"):
            raise EngineError(f"JointAugment: color_matrix must be 'reference' or 'affine', got {color_matrix!r}")
        self.ops, self.p, self.color_matrix, self.shared_noise = frozenset(names), float(p), color_matrix, shared_noise
        self.std = dict(xint_max=xint_max, scale=scale_std, rotate_max=rotate_max, aniso=aniso_std, xfrac=xfrac_std,
                        brightness=brightness_std, contrast=contrast_std, hue_max=hue_max,
                        saturation=saturation_std, imgfilter=imgfilter_std, noise=noise_std, cutout=cutout_size)
        self.register_buffer("fbank", torch.tensor(filter_bank(), dtype=torch.float64), persistent=False)

    @property
    def min_size(self) -> int:
        """The smallest height and width it augments: the band filters pad by reflection by taps // 2 (21 of 43),
        which needs more pixels than that; the geometric pass reflects by size − 1, which any size allows."""
        return self.fbank.shape[-1] // 2 + 1 if "imgfilter" in self.ops else 1

    # ---- parameters ----------------------------------------------------------------------------------------------
    def draw(self, batch: int, shape, device, generator: torch.Generator | None = None, dtype=torch.float32) -> dict:
        """Every random number of one call: per-sample parameters of each enabled op, with an op skipped (identity)
        for a sample with probability 1 − p. `shape` = (C, H, W) of the inputs (for the noise tensors). `generator`:
        a torch.Generator, None (the global RNG) or the step's stream (engine.objectives.base.StepRNG)."""
        if generator is None or isinstance(generator, torch.Generator):
            kw = dict(generator=generator, device=device, dtype=dtype)
            rand = lambda *s: torch.rand(*s, **kw)
            randn = lambda *s: torch.randn(*s, **kw)
        else:                     # the step's stream (engine/networks/dropout.py step_stream): global-batch rows
            rand = lambda *s: generator.rand(s, device, dtype)
            randn = lambda *s: generator.randn(s, device, dtype)
        on = lambda *s: rand(*s) < self.p
        std, out = self.std, {}
        if "xflip" in self.ops:
            out["xflip"] = torch.where(on(batch), torch.floor(rand(batch) * 2), 0.0)
        if "rotate90" in self.ops:
            out["rotate90"] = torch.where(on(batch), torch.floor(rand(batch) * 4), 0.0)
        if "xint" in self.ops:
            out["xint"] = torch.where(on(batch, 1), (rand(batch, 2) * 2 - 1) * std["xint_max"], 0.0)
        if "scale" in self.ops:
            out["scale"] = torch.where(on(batch), torch.exp2(randn(batch) * std["scale"]), 1.0)
        if "rotate" in self.ops:   # before and after the anisotropic scaling, each with P = 1 − √(1 − p)
            p_rot = 1 - math.sqrt(max(0.0, 1 - self.p))
            for k in ("rotate_pre", "rotate_post"):
                theta = (rand(batch) * 2 - 1) * math.pi * std["rotate_max"]
                out[k] = torch.where(rand(batch) < p_rot, theta, 0.0)
        if "aniso" in self.ops:
            out["aniso"] = torch.where(on(batch), torch.exp2(randn(batch) * std["aniso"]), 1.0)
        if "xfrac" in self.ops:
            out["xfrac"] = torch.where(on(batch, 1), randn(batch, 2) * std["xfrac"], 0.0)
        if "brightness" in self.ops:
            out["brightness"] = torch.where(on(batch), randn(batch) * std["brightness"], 0.0)
        if "contrast" in self.ops:
            out["contrast"] = torch.where(on(batch), torch.exp2(randn(batch) * std["contrast"]), 1.0)
        if "lumaflip" in self.ops:
            out["lumaflip"] = torch.where(on(batch), torch.floor(rand(batch) * 2), 0.0)
        if "hue" in self.ops:
            out["hue"] = torch.where(on(batch), (rand(batch) * 2 - 1) * math.pi * std["hue_max"], 0.0)
        if "saturation" in self.ops:
            out["saturation"] = torch.where(on(batch), torch.exp2(randn(batch) * std["saturation"]), 1.0)
        if "imgfilter" in self.ops:
            out["imgfilter"] = torch.where(on(batch, 4), torch.exp2(randn(batch, 4) * std["imgfilter"]), 1.0)
        if "noise" in self.ops:
            sigma = torch.where(on(batch, 1, 1, 1), randn(batch, 1, 1, 1).abs() * std["noise"], 0.0)
            out["noise"] = randn(batch, *shape) * sigma
            out["noise2"] = out["noise"] if self.shared_noise else randn(batch, *shape) * sigma
        if "cutout" in self.ops:
            out["cutout_size"] = torch.where(on(batch, 1), std["cutout"], 0.0)
            out["cutout_center"] = rand(batch, 2)
        return out

    # ---- the transform ---------------------------------------------------------------------------------------------
    def geometric_matrix(self, P: dict, batch: int, width: int, height: int, device, dtype) -> torch.Tensor | None:
        """G⁻¹ [B, 3, 3], pixel_out ↦ pixel_in in centred pixel coordinates, or None when no geometric op is on."""
        if not any(k in P for k in ("xflip", "rotate90", "xint", "scale", "rotate_pre", "aniso", "xfrac")):
            return None
        a = (batch, device, dtype)
        G = torch.eye(3, device=device, dtype=dtype).expand(batch, 3, 3)
        if "xflip" in P:
            G = G @ _scale(1 / (1 - 2 * P["xflip"]), 1, *a)
        if "rotate90" in P:
            G = G @ _rotate(math.pi / 2 * P["rotate90"], *a)
        if "xint" in P:
            G = G @ _translate(-torch.round(P["xint"][:, 0] * width), -torch.round(P["xint"][:, 1] * height), *a)
        if "scale" in P:
            G = G @ _scale(1 / P["scale"], 1 / P["scale"], *a)
        if "rotate_pre" in P:
            G = G @ _rotate(P["rotate_pre"], *a)
        if "aniso" in P:
            G = G @ _scale(1 / P["aniso"], P["aniso"], *a)
        if "rotate_post" in P:
            G = G @ _rotate(P["rotate_post"], *a)
        if "xfrac" in P:
            G = G @ _translate(-P["xfrac"][:, 0] * width, -P["xfrac"][:, 1] * height, *a)
        return G

    def _resample(self, images: list[torch.Tensor], G: torch.Tensor) -> list[torch.Tensor]:
        b, c, h, w = images[0].shape
        dev, dt = images[0].device, images[0].dtype
        f = _updown_filter(dt, dev)
        pad = f.numel() // 4
        mx, my = w - 1, h - 1                                      # the largest reflect padding (module docstring)
        a = (b, dev, dt)
        G = _scale(2, 2, *a) @ G @ _scale(0.5, 0.5, *a)             # to the 2× upsampled grid
        G = _translate(-0.5, -0.5, *a) @ G @ _translate(0.5, 0.5, *a)
        out_h, out_w = (h + pad * 2) * 2, (w + pad * 2) * 2
        in_h, in_w = (h + 2 * my) * 2, (w + 2 * mx) * 2
        G = _scale(2 / in_w, 2 / in_h, *a) @ G @ _scale(out_w / 2, out_h / 2, *a)   # to grid_sample's [−1, 1]
        grid = F.affine_grid(G[:, :2, :], [b, c, out_h, out_w], align_corners=False)
        out = []
        for x in images:
            x = upsample2x(F.pad(x, [mx, mx, my, my], mode="reflect"), f)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out.append(downsample2x_crop(x, f, pad * 2))
        return out

    def color_matrix_of(self, P: dict, batch: int, device, dtype) -> torch.Tensor | None:
        """C [B, 4, 4], homogeneous colour_in ↦ colour_out, or None when no colour op is on."""
        if not any(k in P for k in _COLOR):
            return None
        I4 = torch.eye(4, device=device, dtype=dtype)
        v = torch.tensor([1, 1, 1, 0], device=device, dtype=dtype) / math.sqrt(3)     # the luma axis
        vv = torch.outer(v, v)
        C = I4.expand(batch, 4, 4)
        if "brightness" in P:
            T = I4.repeat(batch, 1, 1)
            T[:, :3, 3] = P["brightness"][:, None]
            C = T @ C
        if "contrast" in P:
            S = I4.repeat(batch, 1, 1)
            S[:, [0, 1, 2], [0, 1, 2]] = P["contrast"][:, None]
            C = S @ C
        if "lumaflip" in P:
            C = (I4 - 2 * vv * P["lumaflip"][:, None, None]) @ C                    # Householder reflection
        if "hue" in P:                                                              # rotation about v (Rodrigues)
            th = P["hue"][:, None, None]
            K = torch.tensor([[0, -v[2], v[1], 0], [v[2], 0, -v[0], 0], [-v[1], v[0], 0, 0], [0, 0, 0, 0]],
                             device=device, dtype=dtype)
            C = (I4 + torch.sin(th) * K + (1 - torch.cos(th)) * (K @ K)) @ C
        if "saturation" in P:
            C = (vv + (I4 - vv) * P["saturation"][:, None, None]) @ C
        return C

    def _recolor(self, x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        if c == 3:
            flat = C[:, :3, :3] @ flat + C[:, :3, 3:]
        elif c == 1:
            row = C[:, :3, :].mean(dim=1, keepdim=True)
            flat = flat * row[:, :, :3].sum(dim=2, keepdim=True) + row[:, :, 3:]
        elif c == 4 and self.color_matrix == "reference":
            flat = C @ flat
        elif c == 4:
            flat = torch.cat([C[:, :3, :3] @ flat[:, :3] + C[:, :3, 3:], flat[:, 3:]], dim=1)
        else:
            raise EngineError(f"JointAugment: colour ops take 1, 3 or 4 channels, got {c}")
        return flat.reshape(b, c, h, w)

    def band_filters(self, gains: torch.Tensor) -> torch.Tensor:
        """Per-sample 1-D filters [B, 43] from band gains [B, 4], each gain's power normalised against the expected
        1/f spectrum (10, 1, 1, 1)/13."""
        expected = torch.tensor([10, 1, 1, 1], dtype=gains.dtype, device=gains.device) / 13
        g = torch.ones_like(gains)
        for i in range(4):
            t = torch.ones_like(gains)
            t[:, i] = gains[:, i]
            g = g * t / (expected * t.square()).sum(dim=-1, keepdim=True).sqrt()
        return g @ self.fbank.to(gains.dtype)

    def _filter(self, x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = taps.repeat_interleave(c, dim=0)[:, None]                  # [B·C, 1, taps]
        p = taps.shape[1] // 2
        y = F.pad(x.reshape(1, b * c, h, w), [p, p, p, p], mode="reflect")
        y = F.conv2d(y, k[:, :, None, :], groups=b * c)
        y = F.conv2d(y, k[:, :, :, None], groups=b * c)
        return y.reshape(b, c, h, w)

    def cutout_mask(self, P: dict, height: int, width: int, dtype) -> torch.Tensor:
        size, centre = P["cutout_size"], P["cutout_center"]
        xs = (torch.arange(width, device=size.device, dtype=dtype) + 0.5) / width
        ys = (torch.arange(height, device=size.device, dtype=dtype) + 0.5) / height
        out_x = (xs[None, :] - centre[:, :1]).abs() >= size / 2         # [B, W]
        out_y = (ys[None, :] - centre[:, 1:]).abs() >= size / 2         # [B, H]
        return (out_x[:, None, None, :] | out_y[:, None, :, None]).to(dtype)

    def apply(self, x: torch.Tensor, y: torch.Tensor, P: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape != y.shape or x.ndim != 4:
            raise EngineError(f"JointAugment: two batches [B, C, H, W] of one shape, got {tuple(x.shape)} and "
                              f"{tuple(y.shape)}")
        b, c, h, w = x.shape
        G = self.geometric_matrix(P, b, w, h, x.device, x.dtype)
        if G is not None:
            x, y = self._resample([x, y], G)
        C = self.color_matrix_of(P, b, x.device, x.dtype)
        if C is not None:
            x, y = self._recolor(x, C), self._recolor(y, C)
        if "imgfilter" in P:
            taps = self.band_filters(P["imgfilter"].to(x.dtype))
            x, y = self._filter(x, taps), self._filter(y, taps)
        if "noise" in P:
            x, y = x + P["noise"].to(x.dtype), y + P["noise2"].to(y.dtype)
        if "cutout_size" in P:
            mask = self.cutout_mask(P, h, w, x.dtype)
            x, y = x * mask, y * mask
        return x, y

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator=None):
        P = self.draw(x.shape[0], x.shape[1:], x.device, generator)
        return self.apply(x, y, {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in P.items()})
