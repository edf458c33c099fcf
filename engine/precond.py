"""Preconditioning wrappers: the one denoiser signature `denoiser(x, sigma, labels=None) -> x0`.

`EDMPrecond` is the teacher's parameterisation; `CMPrecond` (the reference calls it `ECMPrecond`) is the
consistency student's. Both own their backbone as the attribute `model`, so state_dict keys read
`model.<...>` exactly as in NVlabs/edm and sony/cmt checkpoints (docs/spec/cm.md §5.5).

Arithmetic: inputs are cast to float32 as the reference does (docs/spec/cm.md §1.2), except float64 inputs, which
stay float64 so that a `.double()` module gives a float64 reference denoiser.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engine import ops
from engine.checks import finite
from engine.errors import EngineError
from engine.kernels.precond import skip_out_reference
from engine.networks.edm2_unet import EDM2UNet, MPConv, MPFourier
from engine.schedules import SIGMA_DATA


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_sigma(sigma, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """σ as a python float, a 0-d, [B] or [B,1,...,1] tensor → a [B or 1, 1, ..., 1] tensor broadcastable to x."""
    dtype = dtype or compute_dtype(x)
    if not isinstance(x, torch.Tensor):
        raise EngineError(f"x must be a tensor, got {type(x).__name__}")
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        # a host number is checked here for free; a tensor σ is not, since that would read it back from the
        # device in every forward (docs/runs.md: forwards check shapes and types, not values on the device)
        if not (math.isfinite(sigma) and sigma >= 0):
            raise EngineError(f"sigma must be a finite number >= 0, got {sigma!r}")
    try:
        if isinstance(sigma, (str, bytes)) or sigma is None:
            raise TypeError
        s = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise EngineError(f"sigma must be a number or a tensor, got {type(sigma).__name__} {str(sigma)[:40]!r}") \
            from None
    if s.ndim > 1 and any(d != 1 for d in s.shape[1:]):
        raise EngineError(f"sigma must be a scalar, [B] or [B,1,...,1]; got shape {tuple(s.shape)}")
    s = s.reshape(-1, *([1] * (x.ndim - 1)))
    if s.shape[0] not in (1, x.shape[0]):
        raise EngineError(f"sigma has {s.shape[0]} entries for a batch of {x.shape[0]}")
    return s


def as_class_labels(labels, label_dim: int, batch: int, device, dtype) -> torch.Tensor | None:
    """Labels in any of the accepted forms → one-hot/soft float [B, label_dim], or None when unconditional.

    Accepted: None; integer class indices [B]; float one-hot or soft labels [B, label_dim]. EDM's wrappers drop
    labels when label_dim == 0 whatever was passed (docs/spec/cm.md §1.2), and feed zeros when none are given."""
    if label_dim == 0:
        return None
    if labels is None:
        return torch.zeros(batch, label_dim, device=device, dtype=dtype)
    labels = torch.as_tensor(labels, device=device)
    if labels.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8) and labels.ndim == 1:
        # Range-checked where that costs no device synchronisation (CPU tensors, eager); on a GPU the indices come
        # from a dataset that validated them, and one-hot by comparison needs no host round trip (F.one_hot's
        # range check has one) and leaves a compiled graph whole.
        if labels.device.type == "cpu" and not torch.compiler.is_compiling() and labels.numel() \
                and (labels.min() < 0 or labels.max() >= label_dim):
            raise ValueError(f"class index out of range [0, {label_dim}): {labels.min().item()}..{labels.max().item()}")
        labels = labels.long()[:, None] == torch.arange(label_dim, device=labels.device)
    if labels.ndim != 2 or labels.shape[1] != label_dim:
        raise ValueError(f"labels must be class indices [B] or one-hot [B, {label_dim}]; got {tuple(labels.shape)}")
    if labels.shape[0] not in (1, batch):
        raise ValueError(f"{labels.shape[0]} labels for a batch of {batch}")
    return labels.to(dtype).expand(batch, -1)


class _Precond(nn.Module):
    """Shared machinery: σ/label normalisation and the backbone call. Subclasses define c_skip and c_out. The
    backbone is registered under `backbone_attribute` (state-dict prefix) and reachable as `.model` in every
    wrapper."""

    backbone_attribute = "model"

    def __init__(self, model: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = 0.0,
                 sigma_max: float = math.inf):
        super().__init__()
        where = type(self).__name__
        if not isinstance(model, nn.Module):
            raise EngineError(f"{where}: model must be a network (nn.Module), got {type(model).__name__}")
        self.add_module(self.backbone_attribute, model)
        self.sigma_data = finite("sigma_data", sigma_data, where, low=0.0, strict=True)
        self.sigma_min = finite("sigma_min", sigma_min, where, low=0.0)
        if not (isinstance(sigma_max, (int, float)) and float(sigma_max) > self.sigma_min):
            raise EngineError(f"{where}: sigma_max must be greater than sigma_min ({self.sigma_min:g}), got "
                              f"{sigma_max!r}")
        self.sigma_max = float(sigma_max)

    @property
    def label_dim(self) -> int:
        return int(getattr(self.model, "label_dim", 0))

    def boundary(self) -> bool:
        """Whether the consistency boundary condition D(x, σ_min) = x is in force (engine.ops.precond_output)."""
        return False

    def skip_out(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at σ (any shape), the coefficients the output side applies."""
        return skip_out_reference(sigma, self.sigma_data, self.sigma_min, self.boundary())

    def _inputs(self, x, sigma, labels):
        if not isinstance(x, torch.Tensor):
            raise EngineError(f"{type(self).__name__}: x must be a tensor, got {type(x).__name__}")
        weight = next(self.model.parameters(), None)
        if weight is not None and weight.device.type != x.device.type:   # a host-side comparison: no sync
            raise EngineError(f"{type(self).__name__}: x is on {x.device}, the network on {weight.device}; move one "
                              f"of them (net.to(x.device))")
        dtype = compute_dtype(x)
        x = x.to(dtype)
        sigma = as_sigma(sigma, x, dtype).reshape(-1)  # [B] or [1]
        return x, sigma, as_class_labels(labels, self.label_dim, x.shape[0], x.device, dtype)

    def precond_kwargs(self) -> dict:
        """Constructor arguments beyond the backbone and the σ settings (engine/checkpoints/registry.py describes them)."""
        return {}

    def backbone_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the backbone computes in: x's, or bf16 under CUDA autocast (the cast its first layer makes
        anyway)."""
        if x.dtype == torch.float32 and x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype      # (the meta device, where FLOPs are counted, has no autocast)

    def _backbone(self, x, sigma, class_labels, augment_labels):
        # Input side c_in·x, stored in the backbone's compute dtype.
        x_in = ops.precond_input(x, sigma, self.sigma_data, self.backbone_dtype(x))
        c_noise = (sigma.log() / 4).expand(x.shape[0])
        return self.model(x_in, c_noise, class_labels=class_labels, augment_labels=augment_labels)

    def forward(self, x: torch.Tensor, sigma, labels=None, augment_labels=None, raw: bool = False) -> torch.Tensor:
        """D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise(σ)); with `raw`, F itself (in x's compute dtype): the output
        that sCM trains, −F of TrigFlow's parameterisation for σ = σ_d·tan t and x = x_t/cos t (docs/spec/mf.md
        §5.1). Both go through `forward`, so a DDP or FSDP wrapper sees the call (gradient sync, gathering)."""
        x, sigma, class_labels = self._inputs(x, sigma, labels)
        F_x = self._backbone(x, sigma, class_labels, augment_labels)
        if raw:
            return F_x.to(x.dtype)
        # Output side c_skip·x + c_out·F with F cast to fp32 first, as the reference does (docs/spec/cm.md §1.2): under
        # autocast the backbone returns bf16 and the combination stays fp32.
        return ops.precond_output(x, F_x, sigma, self.sigma_data, self.sigma_min, self.boundary())

    def round_sigma(self, sigma):
        """EDM's round_sigma is the identity for these wrappers."""
        return torch.as_tensor(sigma)


class EDMPrecond(_Precond):
    """EDM preconditioning (docs/spec/cm.md §1.2): c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²),
    c_in = 1/√(σ²+σ_d²), c_noise = ln(σ)/4."""


class CMPrecond(_Precond):
    """Consistency-model preconditioning (the reference's `ECMPrecond`, docs/spec/cm.md §1.3).

    In eval mode c_skip = σ_d²/((σ−σ_min)²+σ_d²) and c_out = (σ−σ_min)σ_d/√(σ²+σ_d²) (note: σ, not σ−σ_min, in
    the c_out root), so f(x, σ_min) = x exactly. In train mode the reference uses the plain EDM coefficients —
    no boundary condition — so every forward inside a training loss (student pass and stop-gradient target pass)
    is EDM-parameterised, and a student initialised from the teacher equals it at step 0. We keep that switch
    because released numbers depend on it."""

    def __init__(self, model: nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = 0.003,
                 sigma_max: float = math.inf):
        super().__init__(model, sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max)

    def boundary(self) -> bool:
        return not self.training


class EDM2Precond(_Precond):
    """EDM2's preconditioning (docs/spec/edm2_latent.md §1.5): EDM's c_skip, c_out, c_in and c_noise = ln(σ)/4
    around an `EDM2UNet` registered as `unet` (the released state-dict names), with the learned uncertainty head
    u(σ) = logvar_linear(logvar_fourier(c_noise)) of the EDM2 loss (§2.1).

    `logvar_channels` None (or 0) builds no head: the CMT / ECT / ECD students, which ECT's `imgnet` branch builds
    without it; teacher weights still load into them (the head's keys are teacher-only,
    engine/checkpoints/edm_snapshots.py).
    `use_fp16`: the reference runs the U-Net in float16 on CUDA (and float32 elsewhere); so does this wrapper, the
    output side staying float32. There is no consistency boundary condition: CMT / ECD at 512 and ECT's ImageNet
    students use this wrapper unchanged (§1.5).

        net(x, sigma, labels=None) -> D;   net(x, sigma, labels, return_logvar=True) -> (D, u [B,1,1,1])"""

    backbone_attribute = "unet"

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, use_fp16: bool = True,
                 logvar_channels: int | None = 128, sigma_min: float = 0.0, sigma_max: float = math.inf):
        super().__init__(unet, sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max)
        self.use_fp16 = bool(use_fp16)
        self.logvar_channels = int(logvar_channels or 0)
        if self.logvar_channels:
            self.logvar_fourier = MPFourier(self.logvar_channels)
            self.logvar_linear = MPConv(self.logvar_channels, 1, kernel=[])

    @property
    def model(self) -> nn.Module:
        return self.unet

    def precond_kwargs(self) -> dict:
        return dict(use_fp16=self.use_fp16, logvar_channels=self.logvar_channels or None)

    def backbone_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.use_fp16 and x.dtype == torch.float32 and x.device.type == "cuda" \
                and not torch.is_autocast_enabled("cuda"):
            return torch.float16
        return super().backbone_dtype(x)

    def logvar(self, sigma, like: torch.Tensor) -> torch.Tensor:
        """u(σ) per sample, [B, 1, 1, 1] in the compute dtype."""
        if not self.logvar_channels:
            raise EngineError("EDM2Precond: this network has no uncertainty head (logvar_channels=None); build it "
                              "with logvar_channels=128 to train with the EDM2 loss")
        c_noise = as_sigma(sigma, like).reshape(-1).log() / 4
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor, sigma, labels=None, augment_labels=None, return_logvar: bool = False,
                raw: bool = False):
        D = super().forward(x, sigma, labels, augment_labels, raw=raw)
        if not return_logvar:
            return D
        return D, self.logvar(sigma, D).expand(D.shape[0], 1, 1, 1)


def build_edm2(img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool = True,
               sigma_data: float = 0.5, logvar_channels: int | None = 128, **unet_kwargs) -> EDM2Precond:
    """The reference's `Precond(img_resolution, img_channels, label_dim, use_fp16, sigma_data, logvar_channels,
    **unet_kwargs)`: an EDM2Precond around an EDM2UNet (engine/networks/edm2_unet.py)."""
    unet = EDM2UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
    return EDM2Precond(unet, sigma_data=sigma_data, use_fp16=use_fp16, logvar_channels=logvar_channels)
