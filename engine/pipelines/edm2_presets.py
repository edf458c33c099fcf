"""EDM2's published settings and files, as named constants: pre-training presets, the released post-hoc
reconstructions with their metrics, and the guidance pairs (docs/spec/edm2_latent.md §1.4, §2.2, §2.3, §4.2; read
from NVlabs/edm2 `train_edm2.py` and `generate_images.py`), plus ECT's ImageNet-64 presets (locuslab/ect `imgnet`
branch `ct_train.py`, docs/spec/cm.md §4.4, §8.2).

    build_edm2_preset('edm2-img64-xl')              # EDM2Precond + EDM2UNet, fresh weights
    pretraining_stage('edm2-img64-s', 'pretrain')   # the StageConfig of EDM2's own training
    GUIDED['edm2-img512-xxl-autog-fid']             # main file, guide file, w, metric, value
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from engine.checkpoints.files import short_list
from engine.errors import EngineError
from engine.networks.configs import CONFIGS, build_network
from engine.precond import EDM2Precond
from engine.training.stage_config import StageConfig

__all__ = ["PUBLISHED_URL", "Pretraining", "PRETRAINING", "Published", "UNGUIDED", "Guided", "GUIDED",
           "ECT_IMAGENET64", "build_edm2_preset", "pretraining_stage"]

PUBLISHED_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/"
_MI = 1 << 20


class Pretraining(NamedTuple):
    """train_edm2.py's `config_presets` entry: duration and batch in images, ref_lr, ref_batches (decay), dropout,
    P_mean / P_std of the loss."""
    duration: int
    batch: int
    lr: float
    ref_batches: int
    dropout: float
    P_mean: float
    P_std: float


PRETRAINING = {
    'edm2-img512-xxs': Pretraining(2048 * _MI, 2048, 0.0170, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-xs': Pretraining(2048 * _MI, 2048, 0.0120, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-s': Pretraining(2048 * _MI, 2048, 0.0100, 70000, 0.00, -0.4, 1.0),
    'edm2-img512-m': Pretraining(2048 * _MI, 2048, 0.0090, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-l': Pretraining(1792 * _MI, 2048, 0.0080, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-xl': Pretraining(1280 * _MI, 2048, 0.0070, 70000, 0.10, -0.4, 1.0),
    'edm2-img512-xxl': Pretraining(896 * _MI, 2048, 0.0065, 70000, 0.10, -0.4, 1.0),
    'edm2-img64-xs': Pretraining(1024 * _MI, 2048, 0.0120, 35000, 0.00, -0.8, 1.6),
    'edm2-img64-s': Pretraining(1024 * _MI, 2048, 0.0100, 35000, 0.00, -0.8, 1.6),
    'edm2-img64-m': Pretraining(2048 * _MI, 2048, 0.0090, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-l': Pretraining(1024 * _MI, 2048, 0.0080, 35000, 0.10, -0.8, 1.6),
    'edm2-img64-xl': Pretraining(640 * _MI, 2048, 0.0070, 35000, 0.10, -0.8, 1.6),
}


class Published(NamedTuple):
    """A released reconstruction (under PUBLISHED_URL) and the metric EDM2 reports for it (63-NFE Heun sampler)."""
    file: str
    metric: str
    value: float


# The EMA-optimal unguided reconstructions of generate_images.py's presets.
UNGUIDED = {
    'edm2-img512-xs-fid': Published('edm2-img512-xs-2147483-0.135.pkl', 'fid', 3.53),
    'edm2-img512-xs-dino': Published('edm2-img512-xs-2147483-0.200.pkl', 'fd_dinov2', 103.39),
    'edm2-img512-s-fid': Published('edm2-img512-s-2147483-0.130.pkl', 'fid', 2.56),
    'edm2-img512-s-dino': Published('edm2-img512-s-2147483-0.190.pkl', 'fd_dinov2', 68.64),
    'edm2-img512-m-fid': Published('edm2-img512-m-2147483-0.100.pkl', 'fid', 2.25),
    'edm2-img512-m-dino': Published('edm2-img512-m-2147483-0.155.pkl', 'fd_dinov2', 58.44),
    'edm2-img512-l-fid': Published('edm2-img512-l-1879048-0.085.pkl', 'fid', 2.06),
    'edm2-img512-l-dino': Published('edm2-img512-l-1879048-0.155.pkl', 'fd_dinov2', 52.25),
    'edm2-img512-xl-fid': Published('edm2-img512-xl-1342177-0.085.pkl', 'fid', 1.96),
    'edm2-img512-xl-dino': Published('edm2-img512-xl-1342177-0.155.pkl', 'fd_dinov2', 45.96),
    'edm2-img512-xxl-fid': Published('edm2-img512-xxl-0939524-0.070.pkl', 'fid', 1.91),
    'edm2-img512-xxl-dino': Published('edm2-img512-xxl-0939524-0.150.pkl', 'fd_dinov2', 42.84),
    'edm2-img64-s-fid': Published('edm2-img64-s-1073741-0.075.pkl', 'fid', 1.58),
    'edm2-img64-m-fid': Published('edm2-img64-m-2147483-0.060.pkl', 'fid', 1.43),
    'edm2-img64-l-fid': Published('edm2-img64-l-1073741-0.040.pkl', 'fid', 1.33),
    'edm2-img64-xl-fid': Published('edm2-img64-xl-0671088-0.040.pkl', 'fid', 1.33),
}


class Guided(NamedTuple):
    """A published guidance pair: main network, guiding network, w, and the metric EDM2 reports."""
    net: str
    guide: str
    w: float
    metric: str
    value: float


GUIDED = {
    # classifier-free guidance: the guide is an unconditional XS with the main net's EMA length
    'edm2-img512-xs-guid-fid': Guided('edm2-img512-xs-2147483-0.045.pkl', 'edm2-img512-xs-uncond-2147483-0.045.pkl', 1.40, 'fid', 2.91),
    'edm2-img512-xs-guid-dino': Guided('edm2-img512-xs-2147483-0.150.pkl', 'edm2-img512-xs-uncond-2147483-0.150.pkl', 1.70, 'fd_dinov2', 79.94),
    'edm2-img512-s-guid-fid': Guided('edm2-img512-s-2147483-0.025.pkl', 'edm2-img512-xs-uncond-2147483-0.025.pkl', 1.40, 'fid', 2.23),
    'edm2-img512-s-guid-dino': Guided('edm2-img512-s-2147483-0.085.pkl', 'edm2-img512-xs-uncond-2147483-0.085.pkl', 1.90, 'fd_dinov2', 52.32),
    'edm2-img512-m-guid-fid': Guided('edm2-img512-m-2147483-0.030.pkl', 'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.20, 'fid', 2.01),
    'edm2-img512-m-guid-dino': Guided('edm2-img512-m-2147483-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 2.00, 'fd_dinov2', 41.98),
    'edm2-img512-l-guid-fid': Guided('edm2-img512-l-1879048-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.20, 'fid', 1.88),
    'edm2-img512-l-guid-dino': Guided('edm2-img512-l-1879048-0.035.pkl', 'edm2-img512-xs-uncond-2147483-0.035.pkl', 1.70, 'fd_dinov2', 38.20),
    'edm2-img512-xl-guid-fid': Guided('edm2-img512-xl-1342177-0.020.pkl', 'edm2-img512-xs-uncond-2147483-0.020.pkl', 1.20, 'fid', 1.85),
    'edm2-img512-xl-guid-dino': Guided('edm2-img512-xl-1342177-0.030.pkl', 'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.70, 'fd_dinov2', 35.67),
    'edm2-img512-xxl-guid-fid': Guided('edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.20, 'fid', 1.81),
    'edm2-img512-xxl-guid-dino': Guided('edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.70, 'fd_dinov2', 33.09),
    # autoguidance: the guide is a smaller, shorter-trained conditional network with its own EMA length
    'edm2-img512-s-autog-fid': Guided('edm2-img512-s-2147483-0.070.pkl', 'edm2-img512-xs-0134217-0.125.pkl', 2.10, 'fid', 1.34),
    'edm2-img512-s-autog-dino': Guided('edm2-img512-s-2147483-0.120.pkl', 'edm2-img512-xs-0134217-0.165.pkl', 2.45, 'fd_dinov2', 36.67),
    'edm2-img512-xxl-autog-fid': Guided('edm2-img512-xxl-0939524-0.075.pkl', 'edm2-img512-m-0268435-0.155.pkl', 2.05, 'fid', 1.25),
    'edm2-img512-xxl-autog-dino': Guided('edm2-img512-xxl-0939524-0.130.pkl', 'edm2-img512-m-0268435-0.205.pkl', 2.30, 'fd_dinov2', 24.18),
    'edm2-img512-s-uncond-autog-fid': Guided('edm2-img512-s-uncond-2147483-0.070.pkl', 'edm2-img512-xs-uncond-0134217-0.110.pkl', 2.85, 'fid', 3.86),
    'edm2-img512-s-uncond-autog-dino': Guided('edm2-img512-s-uncond-2147483-0.090.pkl', 'edm2-img512-xs-uncond-0134217-0.125.pkl', 2.90, 'fd_dinov2', 90.39),
    'edm2-img64-s-autog-fid': Guided('edm2-img64-s-1073741-0.045.pkl', 'edm2-img64-xs-0134217-0.110.pkl', 1.70, 'fid', 1.01),
    'edm2-img64-s-autog-dino': Guided('edm2-img64-s-1073741-0.105.pkl', 'edm2-img64-xs-0134217-0.175.pkl', 2.20, 'fd_dinov2', 31.85),
}


class ECTImageNet64(NamedTuple):
    """ECT's `imgnet` branch presets: width, lr (Adam, EDM2's inverse-sqrt decay after `decay` iterations — 0:
    constant), betas, dropout at resolutions ≤ dropres, P_mean / P_std of t."""
    channels: int
    lr: float
    betas: tuple
    decay: int
    dropout: float
    dropres: int
    P_mean: float
    P_std: float


ECT_IMAGENET64 = {
    'edm2-img64-s': ECTImageNet64(192, 0.0010, (0.9, 0.99), 2000, 0.40, 16, -0.8, 1.6),
    'edm2-img64-m': ECTImageNet64(256, 0.0009, (0.9, 0.99), 2000, 0.50, 16, -0.8, 1.6),
    'edm2-img64-l': ECTImageNet64(320, 0.0008, (0.9, 0.99), 2000, 0.50, 16, -0.8, 1.6),
    'edm2-img64-xl': ECTImageNet64(384, 0.0007, (0.9, 0.99), 2000, 0.50, 16, -0.8, 1.6),
}


def build_edm2_preset(name: str, *, use_fp16: bool = True, logvar_channels: int | None = 128,
                      **unet_overrides) -> EDM2Precond:
    """EDM2Precond around the EDM2UNet configuration `name` ('edm2-img512-xxs' … 'edm2-img64-xl', 'edm2-tiny'),
    fresh weights; `unet_overrides` replace U-Net arguments (dropout, dropout_res, ...)."""
    if name not in CONFIGS or CONFIGS[name].cls.__name__ != 'EDM2UNet':
        known = [k for k, v in CONFIGS.items() if v.cls.__name__ == 'EDM2UNet']
        raise EngineError(f'unknown EDM2 preset {name!r}; known: {short_list(known)}')
    return EDM2Precond(build_network(name, **unet_overrides), use_fp16=use_fp16, logvar_channels=logvar_channels)


def with_unit_gains(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with its 0-d gains (EDM2's zero-initialised output and skip gains) set to 1, in place: fresh weights
    that behave like a released network's, whose gains are not zero (the smoke runs' random teachers, tests)."""
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    return net


def pretraining_stage(preset: str, name: str = 'pretrain', **overrides) -> StageConfig:
    """EDM2's own pre-training as a stage (§2.2, §2.3): Adam (0.9, 0.99), ref_lr/sqrt(max(t/(ref_batches·B), 1))
    with a warm-up over the first 10⁷ images, batch 2048, power EMAs 0.050 and 0.100 tracked and snapshotted every
    8 Mi images. One difference is deliberate: EDM2 replaces non-finite gradients by zero, this loop stops on them
    (docs/runs.md). Pair it with EDM2Loss(P_mean, P_std) of the same preset."""
    if preset not in PRETRAINING:
        raise EngineError(f'unknown EDM2 pre-training preset {preset!r}; known: {short_list(PRETRAINING)}')
    p = PRETRAINING[preset]
    cfg = dict(name=name, total_kimg=p.duration / 1000, batch_size=p.batch, lr=p.lr, optimizer='adam',
               betas=(0.9, 0.99), lr_schedule='inv_sqrt', lr_ref_kimg=p.ref_batches * p.batch / 1000,
               lr_rampup_kimg=10_000, ema_beta=None, ema_std=0.10, snapshot_emas=(0.050, 0.100),
               snapshot_kimg=8 * _MI / 1000, ckpt_kimg=128 * _MI / 1000, bf16=False)
    cfg.update(overrides)
    return StageConfig(**cfg)

