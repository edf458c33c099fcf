"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models"), docs/spec/edm2_latent.md §1.1–§1.3 and §1.6.

Names, registration order and shapes equal NVlabs/edm2's `training/networks_edm2.py`, so the 203-entry state dicts
of its released pickles load by name (`unet.` prefix: engine/precond.py `EDM2Precond`). The constructor takes
every argument a pickle's `_init_kwargs` can carry, with the reference's defaults, plus ECT's `dropout_res`
(locuslab/ect `imgnet` branch: dropout only in blocks at resolution ≤ dropout_res).

Forced weight normalisation. The reference overwrites every MPConv weight with its normalised value inside each
training-mode forward (§1.1 step 2). An in-place write inside forward is lost under FSDP2 (it would hit the
gathered copy, not the shard), breaks CUDA-graph capture and graph-breaks compile, so here forward never writes:
the loop calls `force_weight_normalization` on the trained network after each optimizer step and EMA update
(step → EMA → normalise), which is the state the reference's next forward would have normalised to, and once at
a stage's start. Forward always applies the functional normalisation (§1.1 step 3), so EMA and reconstructed
weights, which are not normalised, evaluate as in the reference.

Precision: normalisation norms and the Fourier features are computed in float32 (float64 for a `.double()`
module, so that it is a float64 reference); weights are cast to the activation's dtype, as the reference does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.checks import finite
from engine.errors import EngineError

from .dropout import dropout
from .layers import constructor_arguments, set_backbone_interface

__all__ = ['normalize', 'mp_silu', 'mp_sum', 'mp_cat', 'resample', 'MPFourier', 'MPConv', 'EDM2Block', 'EDM2UNet',
           'force_weight_normalization', 'mp_attention', 'mp_attention_reference']


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ‖x‖₂·sqrt(k/n)) with the norm over `dim` (default all but dim 0), k the number of norms and n of
    elements: unit RMS over `dim` (§1.1). The norm is taken in float32 and the result keeps x's dtype."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_at_least_fp32(x.dtype))
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit magnitude for unit-variance input (EDM2 Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1−t)a + tb) / sqrt((1−t)² + t²) (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation [wa·a, wb·b] (a first) that preserves magnitude and weights the halves by (1−t) : t
    (EDM2 Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=dim)


def resample_kernel(f=(1, 1)) -> torch.Tensor:
    """The 2-D resampling filter: the normalised outer product of the 1-D filter f (float32, on the host)."""
    f = torch.as_tensor(f, dtype=torch.float32)
    if f.ndim != 1 or len(f) % 2:
        raise ValueError(f'resample filter must be a 1-D list of even length, got {f.tolist()}')
    f = f / f.sum()
    return torch.outer(f, f)


def resample(x: torch.Tensor, f=(1, 1), mode: str = 'keep') -> torch.Tensor:
    """2× down (depthwise stride-2 conv with the normalised outer product of f) or up (the transposed conv with 4×
    that filter), or nothing. With f = [1, 1]: 2×2 average pooling and nearest-neighbour upsampling (§1.1).
    `f` is the 1-D filter, or its 2-D kernel already made by `resample_kernel` (EDM2Block keeps that as a buffer
    on the network's device: building it here from a list on every forward was a host-to-device copy per block,
    which a CUDA graph cannot capture)."""
    if mode == 'keep':
        return x
    if mode not in ('down', 'up'):
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', got {mode!r}")
    k2 = f if isinstance(f, torch.Tensor) and f.ndim == 2 else resample_kernel(f)
    pad = (k2.shape[0] - 1) // 2
    kernel = k2.to(dtype=x.dtype, device=x.device)[None, None].repeat(x.shape[1], 1, 1, 1)
    if mode == 'down':
        return F.conv2d(x, kernel, groups=x.shape[1], stride=2, padding=(pad,))
    return F.conv_transpose2d(x, kernel * 4, groups=x.shape[1], stride=2, padding=(pad,))


class MPFourier(nn.Module):
    """cos(s ⊗ freqs + phases)·√2 for a batch of scalars s; `freqs` = 2π·N(0, 1)·bandwidth and `phases` = 2π·U(0, 1)
    are buffers drawn once (and stored in checkpoints), in that order (EDM2 Eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer('freqs', 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _at_least_fp32(x.dtype)
        y = torch.outer(x.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Weight-only convolution (`kernel` [kh, kw]) or linear layer (`kernel` []) with a unit-magnitude effective
    weight: normalize(w)·gain/sqrt(fan_in) (EDM2 Eq. 47). Weights start N(0, 1). `forced_normalization` marks the
    weight for `force_weight_normalization` (ECT's `force_wn` switch)."""

    def __init__(self, in_channels: int, out_channels: int, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.forced_normalization = True

    def effective_weight(self, dtype: torch.dtype, gain=1) -> torch.Tensor:
        w = normalize(self.weight.to(_at_least_fp32(self.weight.dtype)))
        return (w * (gain / math.sqrt(w[0].numel()))).to(dtype)

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = self.effective_weight(x.dtype, gain)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

    @torch.no_grad()
    def after_optimizer_step(self) -> int:
        """The loop's post-step hook: forced weight normalisation, weight ← normalize(weight) (EDM2 Eq. 66, §1.1
        step 2), where the weight is marked; 1 if it wrote the weight. edm2 does this inside `MPConv.forward` in
        training mode; after the step is equivalent and keeps the forward pure. Under FSDP2 the weight is a DTensor
        sharded by rows (output units); the normalisation is per row, so each rank normalises its own rows and the
        result equals the unsharded one."""
        if not self.forced_normalization:
            return 0
        w = self.weight
        local = w.to_local() if hasattr(w, 'to_local') else w
        placements = getattr(w, 'placements', ())
        if any(not (p.is_replicate() or (p.is_shard() and p.dim == 0)) for p in placements):
            raise RuntimeError(f'forced weight normalisation needs weights whole or sharded by rows; got {placements}')
        if local.shape[0]:
            local.copy_(normalize(local.to(_at_least_fp32(local.dtype))).to(local.dtype))
        return 1


@torch.no_grad()
def force_weight_normalization(module: nn.Module) -> int:
    """Overwrite every marked MPConv weight of `module` with normalize(weight) (EDM2 Eq. 66, §1.1 step 2); the
    number of weights written. The training loop reaches the same work through each MPConv's
    `after_optimizer_step` hook, without knowing the family (engine/training/run_state.py
    `after_optimizer_step`)."""
    return sum(m.after_optimizer_step() for m in module.modules() if isinstance(m, MPConv))


def mp_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference's einsum attention on [N, heads, C, HW] tensors: softmax over keys of qᵀk/sqrt(C)."""
    w = torch.einsum('nhcq,nhck->nhqk', q, k / math.sqrt(q.shape[2])).softmax(dim=3)
    return torch.einsum('nhqk,nhck->nhcq', w, v)


def mp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same through fused scaled-dot-product attention (same scale 1/sqrt(C)); equal to the reference to
    rounding (docs/spec/edm2_latent.md §11 item 11; tests/test_edm2.py checks it)."""
    out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
    return out.transpose(2, 3)


# docs/spec/edm2_latent.md §11 item 11: EDM2's authors did not verify that fused attention reproduces their einsums;
# the choice is the U-Net's `attention_kernel` (tests/test_edm2.py holds the two equal to rounding).
ATTENTION_KERNELS = {'sdpa': mp_attention, 'einsum': mp_attention_reference}


class EDM2Block(nn.Module):
    """Encoder or decoder block with optional self-attention (§1.2, EDM2 Fig. 21). The class name ends in "Block"
    so that FSDP2 shards each block as its own unit (engine/dist.py)."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0, res_balance=0.3,
                 attn_balance=0.3, clip_act=256, attention_kernel='sdpa'):
        super().__init__()
        if flavor not in ('enc', 'dec'):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        if attention_kernel not in ATTENTION_KERNELS:
            raise EngineError(f"attention_kernel must be one of {sorted(ATTENTION_KERNELS)}, got {attention_kernel!r}")
        self.attention_kernel = attention_kernel
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        # the filter as a buffer, so it lives on the network's device (not saved: it is a function of the setting)
        self.register_buffer('resample_kernel', resample_kernel(resample_filter), persistent=False)
        # the reference's rule: ⌊width / channels_per_head⌋ heads (none below one head's width), each of
        # width / heads channels
        self.num_heads = out_channels // channels_per_head if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise EngineError(f'EDM2Block: {out_channels} channels do not split into {self.num_heads} attention heads '
                              f'(channels_per_head {channels_per_head})')
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, f=self.resample_kernel, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)                          # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1     # per-sample, per-channel scale
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = dropout(y, self.dropout, self.training)
        y = self.conv_res1(y)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)                            # the un-normalised input, after the residual used it
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            y = self.attn_qkv(x)
            # channels are ordered (head, channel-in-head, q/k/v): q/k/v is the innermost axis (§1.2 step 6)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)
            y = ATTENTION_KERNELS[self.attention_kernel](q, k, v)
            x = mp_sum(x, self.attn_proj(y.reshape(x.shape)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """Backbone F(x, c_noise, class_labels) -> [B, img_channels, R, R] (§1.3). Arguments and defaults are the
    reference UNet's (its `**block_kwargs` spelled out); `dropout_res` is ECT's, `attention_kernel` ours; an
    `augment_labels` argument is accepted and must be None (EDM2 trains without augmentation labels)."""

    def __init__(self,
                 img_resolution,                 # input/output resolution R
                 img_channels,                   # image (or latent) channels
                 label_dim,                      # number of classes; 0 = unconditional
                 model_channels=192,             # base width C
                 channel_mult=[1, 2, 3, 4],      # width multiplier per resolution level
                 channel_mult_noise=None,        # noise-embedding width / C; None = channel_mult[0]
                 channel_mult_emb=None,          # embedding width / C; None = max(channel_mult)
                 num_blocks=3,                   # blocks per encoder level (decoder: num_blocks + 1)
                 attn_resolutions=[16, 8],       # resolutions with self-attention
                 label_balance=0.5,              # noise (0) vs class (1) embedding
                 concat_balance=0.5,             # skip (0) vs main path (1) at decoder concatenations
                 dropout_res=None,               # dropout only at resolutions ≤ dropout_res (ECT); None = all
                 resample_filter=[1, 1],         # block kwargs from here on
                 channels_per_head=64,
                 dropout=0,
                 res_balance=0.3,
                 attn_balance=0.3,
                 clip_act=256,
                 attention_kernel='sdpa',        # 'sdpa' (fused) or 'einsum' (the reference's; §11 item 11)
                 ):
        init_kwargs = constructor_arguments(locals())
        super().__init__()
        set_backbone_interface(self, init_kwargs, img_resolution=img_resolution, in_channels=img_channels,
                               out_channels=img_channels, label_dim=label_dim, augment_dim=0, label_dropout=0,
                               data_shape=(img_channels, img_resolution, img_resolution))
        if dropout_res is not None:
            finite('dropout_res', dropout_res, 'EDM2UNet', low=0)
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        def block(cin, cout, res, **kw):
            p = dropout if not dropout_res or res <= dropout_res else 0.0   # ECT: falsy = every resolution
            return EDM2Block(cin, cout, cemb, resample_filter=resample_filter, channels_per_head=channels_per_head,
                             dropout=p, res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act,
                             attention_kernel=attention_kernel, **kw)

        self.enc = nn.ModuleDict()
        cout = img_channels + 1                               # the input is concatenated with a channel of ones
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = MPConv(cout, channels, kernel=[3, 3])
                cout = channels
            else:
                self.enc[f'{res}x{res}_down'] = block(cout, cout, res, flavor='enc', resample_mode='down')
            for i in range(num_blocks):
                self.enc[f'{res}x{res}_block{i}'] = block(cout, channels, res, flavor='enc',
                                                          attention=res in attn_resolutions)
                cout = channels

        self.dec = nn.ModuleDict()
        skips = [m.out_channels for m in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = block(cout, cout, res, flavor='dec', attention=True)
                self.dec[f'{res}x{res}_in1'] = block(cout, cout, res, flavor='dec')
            else:
                self.dec[f'{res}x{res}_up'] = block(cout, cout, res, flavor='dec', resample_mode='up')
            for i in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{i}'] = block(cout + skips.pop(), channels, res, flavor='dec',
                                                          attention=res in attn_resolutions)
                cout = channels
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels=None) -> torch.Tensor:
        if augment_labels is not None:
            raise ValueError('EDM2UNet takes no augmentation labels')
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = torch.zeros([1, self.label_dim], device=x.device, dtype=emb.dtype)
            labels = class_labels.to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, m in self.enc.items():
            x = m(x) if name.endswith('_conv') else m(x, emb)
            skips.append(x)
        for name, m in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = m(x, emb)
        return self.out_conv(x, gain=self.out_gain)
