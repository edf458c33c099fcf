"""Building blocks shared by the U-Nets (docs/spec/cm.md §5.2).

Every module here mirrors one layer of NVlabs/edm `training/networks.py`: same attribute names, same
parameter/buffer registration order (hence identical `state_dict` keys), same arithmetic, and the same
consumption of the global RNG during initialisation, so that `torch.manual_seed(s)` followed by
construction yields the same initial weights as EDM. Checkpoints written by EDM/ECT/CMT are loaded by
copying `state_dict` entries by name (docs/spec/cm.md §6.2), which is why the names below must not change.

Dtypes: parameters are cast to the input's dtype inside `forward` (as in EDM), so a module converted with
`.double()` or fed half-precision activations works. The attention softmax is evaluated in at least
float32 (EDM always uses float32; we keep float64 when the input is float64).
"""

import copy
import math

import torch
import torch.nn.functional as F

from engine.errors import EngineError

from .dropout import dropout, uniform

__all__ = [
    'weight_init', 'Linear', 'Conv2d', 'GroupNorm', 'attention_weights', 'PositionalEmbedding',
    'FourierEmbedding', 'UNetBlock',
]


def weight_init(shape, mode, fan_in, fan_out):
    """Random tensor of `shape` from one of EDM's four init schemes (draws from the global RNG).

    Uniform variants draw U(-1, 1) as `rand * 2 - 1`; normal variants draw N(0, 1). The scale depends only
    on the fans: xavier uses fan_in + fan_out, kaiming uses fan_in.
    """
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'unknown init mode {mode!r}')


class Linear(torch.nn.Module):
    """y = x Wᵀ + b with weight [out, in] and optional bias [out]."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1,
                 init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        # The bias draw happens even when init_bias is 0 so the RNG stream stays aligned with EDM.
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class Conv2d(torch.nn.Module):
    """Square 2-D convolution with optional 2× resampling by a separable FIR filter.

    `kernel = 0` gives a weightless layer that only resamples. The normalised 2-D filter
    outer(f, f) / sum(f)² lives in the buffer `resample_filter` [1, 1, k, k], registered (and thus present in
    the state_dict) only when `up` or `down`. Upsampling is a stride-2 transposed depthwise convolution with
    4× the filter (for f = [1, 1]: nearest-neighbour), downsampling a stride-2 depthwise convolution (for
    f = [1, 1]: 2×2 average pooling). Without `fused_resample` the resampling precedes the convolution;
    with it, upsampling is folded into the padding of the convolution that follows it and downsampling
    comes after the convolution (EDM's NCSN++ residual encoder uses the fused down path).
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1], fused_resample=False, init_mode='kaiming_normal', init_weight=1,
                 init_bias=0):
        assert not (up and down), 'a layer either upsamples or downsamples'
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        k2 = kernel * kernel
        fans = dict(mode=init_mode, fan_in=in_channels * k2, fan_out=out_channels * k2)
        self.weight = (torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans)
                                          * init_weight) if kernel else None)
        self.bias = (torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer('resample_filter', f if (up or down) else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        c_in, c_out = self.in_channels, self.out_channels

        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, (f * 4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([c_out, 1, 1, 1]), groups=c_out, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2,
                                       padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation with at least `min_channels_per_group` channels per group."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


def attention_weights(q, k):
    """softmax_j(Σ_c q[n,c,i] k[n,c,j] / sqrt(C)) for q, k of shape [N, C, L] -> [N, L, L].

    Evaluated in at least float32 (EDM's AttentionOp runs it in float32 even for fp16 activations) and
    returned in q's dtype; as in EDM, k is divided by sqrt(C) in its own dtype before the upcast. Unlike EDM
    we use plain differentiable ops instead of a custom autograd.Function: forward values are identical,
    gradients are identical whenever sqrt(C) is a power of two (C = 64 or 256 in every named config) and
    otherwise differ by float32 rounding (EDM applies 1/sqrt(C) after the backward matmul), and
    forward-mode AD (torch.func.jvp) and double backward work.
    """
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    k_scaled = k / math.sqrt(k.shape[1])
    logits = torch.einsum('ncq,nck->nqk', q.to(compute_dtype), k_scaled.to(compute_dtype))
    return logits.softmax(dim=2).to(q.dtype)


class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding [cos(x·ω_i), sin(x·ω_i)] of a vector x of shape [B].

    ω_i = max_positions^(-i / (n - 1)) with `endpoint` (the last frequency is exactly 1/max_positions) and
    max_positions^(-i / n) without, for i = 0 .. n-1, n = num_channels / 2. The frequencies are formed in
    float32 as in EDM and then cast to x's dtype, so a float64 run evaluates the very same function.
    """

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** exponent
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2π x f_i), sin(2π x f_i)] with f ~ N(0, scale²) stored in buffer `freqs`.

    EDM's default scale is 16; CMT/ECT's copy of networks.py changed it to 0.02 (docs/spec/cm.md §0). The value
    only matters for fresh initialisation: checkpoints carry `freqs`.
    """

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class UNetBlock(torch.nn.Module):
    """Residual block with optional 2× up/down resampling and multi-head self-attention.

    Covers the DDPM++, NCSN++ and ADM variants (docs/spec/cm.md §5.2):

        h = conv0(silu(norm0(x)))                                   (resampling inside conv0)
        h = silu(norm1(h) * (1 + scale) + shift)   if adaptive_scale  (scale, shift = affine(emb))
            silu(norm1(h + affine(emb)))           otherwise
        h = (conv1(dropout(h)) + skip(x)) * skip_scale              (skip = identity unless needed)
        h = (proj(attention(qkv(norm2(h)))) + h) * skip_scale       (only with attention)

    The qkv projection's output channels are interleaved: for head n, channel c of that head and component
    s ∈ {q, k, v}, the channel index is (n·C_head + c)·3 + s.
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        # Registration order defines the state_dict order; keep it as in EDM.
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A pure resampling skip (kernel 0) unless a channel change or resample_proj asks for a 1×1 conv.
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        residual = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(residual) if self.skip is not None else residual)
        x = x * self.skip_scale

        if self.num_heads:
            B, C, H, W = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(B * self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = qkv.unbind(2)                          # each [B·heads, C_head, H·W]
            w = attention_weights(q, k)                      # [B·heads, H·W (query), H·W (key)]
            a = torch.einsum('nqk,nck->ncq', w, v)
            x = (self.proj(a.reshape(B, C, H, W)) + x) * self.skip_scale
        return x


_POSITIVE = ("img_resolution", "img_channels", "in_channels", "out_channels", "model_channels", "hidden_channels",
             "num_blocks", "channels_per_head", "noise_channels", "emb_channels", "channel_mult_emb",
             "channel_mult_noise", "input_size", "patch_size", "hidden_size", "depth", "num_heads")
_NON_NEGATIVE = ("label_dim", "augment_dim", "num_classes")
_RATES = ("dropout", "label_dropout")


def check_backbone_arguments(where: str, kwargs: dict) -> None:
    """One line per bad constructor argument of a backbone, before any layer is built: sizes positive integers,
    counts non-negative, rates in [0, 1), the per-level lists non-empty lists of positive integers, and the
    resolution divisible by the encoder's downsampling."""
    from engine.checks import nonneg_int, positive_int, probability
    for k, v in kwargs.items():
        if v is None:
            continue
        if k in _POSITIVE:
            positive_int(k, v, where)
        elif k in _NON_NEGATIVE:
            nonneg_int(k, v, where)
        elif k in _RATES:
            probability(k, v, where)
    for k in ("channel_mult", "attn_resolutions", "resample_filter"):
        v = kwargs.get(k)
        if v is not None and (not isinstance(v, (list, tuple)) or (k != "attn_resolutions" and not v)):
            raise EngineError(f"{where}: {k} must be a list of positive integers, got {v!r}")
        for x in v or ():
            positive_int(f"{k} entry", x, where)
    res, mult = kwargs.get("img_resolution"), kwargs.get("channel_mult")
    if res and mult and res % (1 << (len(mult) - 1)):
        raise EngineError(f"{where}: img_resolution {res} is not divisible by 2^{len(mult) - 1}, the downsampling of "
                          f"{len(mult)} levels (channel_mult {list(mult)})")


def set_backbone_interface(module: torch.nn.Module, init_kwargs: dict, *, img_resolution, in_channels: int,
                           out_channels: int, label_dim: int, augment_dim: int, label_dropout: float,
                           data_shape: tuple) -> None:
    """The attributes every backbone exposes to wrappers, samplers and checkpoints (EDM's names: `img_resolution`,
    `img_channels`, `label_dim`, …), and its recorded constructor arguments (`constructor_arguments`), which are
    checked first (`check_backbone_arguments`)."""
    check_backbone_arguments(type(module).__name__, init_kwargs)
    module.init_kwargs = init_kwargs
    module.img_resolution = img_resolution
    module.in_channels = in_channels
    module.img_channels = in_channels
    module.out_channels = out_channels
    module.label_dim = label_dim
    module.augment_dim = augment_dim
    module.label_dropout = label_dropout
    module.data_shape = data_shape


def constructor_arguments(local_vars: dict) -> dict:
    """A backbone's constructor arguments, taken from `locals()` at the top of its __init__, recorded as
    `init_kwargs` so releases can describe and rebuild the architecture (engine/checkpoints/registry.py)."""
    return copy.deepcopy({k: v for k, v in local_vars.items() if k not in ('self', '__class__')})


def label_embedding(map_label, class_labels, label_dropout: float, training: bool, like: torch.Tensor,
                    scale: float = 1.0) -> torch.Tensor:
    """EDM's class-label path, shared by every backbone: `map_label(labels · scale)`, with zeros when no labels are
    given (what EDM's wrappers pass for unconditional evaluation) and, in training, per-sample label dropout for
    classifier-free guidance (one `torch.rand` draw per batch, as EDM does, so random streams stay aligned)."""
    batch = like.shape[0]
    if class_labels is None:
        class_labels = torch.zeros([batch, map_label.in_features], device=like.device)
    labels = class_labels.to(like.dtype)
    if training and label_dropout:
        keep = uniform([batch, 1], like.device) >= label_dropout
        labels = labels * keep.to(labels.dtype)
    return map_label(labels * scale)
