"""Named backbone configurations for the paper's datasets (docs/spec/cm.md §5.1, §8) and the tiny test setups.

`CONFIGS[name]` is a `NetworkConfig(cls, kwargs)`; `build_network(name, **overrides)` constructs it. The
kwargs are the backbone's own constructor arguments (EDM's names for the U-Nets), so a configuration can
be compared with, or replaced by, the `_init_kwargs` found in an EDM/ECT/CMT checkpoint.

Naming: `<dataset>-<arch>` is the CMT/ECT student (dropout 0.2, no augmentation labels);
`<dataset>-<arch>-teacher` is the EDM pre-trained network as pickled by EDM's `train.py` (augment_dim 9,
the dataset's EDM dropout), which the teacher checkpoints must be loaded into.
"""

from typing import NamedTuple

import torch

from .dhariwal_unet import DhariwalUNet
from .edm2_unet import EDM2UNet
from .mlp import MLPNet
from .song_unet import SongUNet

__all__ = ['NetworkConfig', 'CONFIGS', 'EDM2_WIDTHS', 'build_network']


class NetworkConfig(NamedTuple):
    cls: type
    kwargs: dict


# EDM `train.py --arch=ddpmpp` (docs/spec/cm.md §5.1); channel_mult is [2,2,2] at 32² and [1,2,2,2] at 64².
_DDPMPP = dict(
    in_channels=3, out_channels=3, label_dim=0, augment_dim=0, model_channels=128, channel_mult_emb=4,
    num_blocks=4, attn_resolutions=[16], label_dropout=0, embedding_type='positional', channel_mult_noise=1,
    encoder_type='standard', decoder_type='standard', resample_filter=[1, 1],
)
# EDM `train.py --arch=ncsnpp`.
_NCSNPP = dict(
    _DDPMPP, embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1],
)
_STUDENT_DROPOUT = 0.2          # CMT/ECT students, all datasets (docs/spec/cm.md §5.1)
_EDM_AUGMENT_DIM = 9            # EDM teachers trained with --augment > 0

CONFIGS = {
    # CIFAR-10 32×32, unconditional.
    'cifar10-ddpmpp': NetworkConfig(SongUNet, dict(
        _DDPMPP, img_resolution=32, channel_mult=[2, 2, 2], dropout=_STUDENT_DROPOUT)),
    'cifar10-ddpmpp-teacher': NetworkConfig(SongUNet, dict(
        _DDPMPP, img_resolution=32, channel_mult=[2, 2, 2], dropout=0.13, augment_dim=_EDM_AUGMENT_DIM)),
    'cifar10-ncsnpp': NetworkConfig(SongUNet, dict(
        _NCSNPP, img_resolution=32, channel_mult=[2, 2, 2], dropout=_STUDENT_DROPOUT)),
    'cifar10-ncsnpp-teacher': NetworkConfig(SongUNet, dict(
        _NCSNPP, img_resolution=32, channel_mult=[2, 2, 2], dropout=0.13, augment_dim=_EDM_AUGMENT_DIM)),
    # FFHQ 64×64 and AFHQv2 64×64, unconditional (EDM README: --cres=1,2,2,2, dropout 0.05 / 0.25).
    'ffhq64-ddpmpp': NetworkConfig(SongUNet, dict(
        _DDPMPP, img_resolution=64, channel_mult=[1, 2, 2, 2], dropout=_STUDENT_DROPOUT)),
    'ffhq64-ddpmpp-teacher': NetworkConfig(SongUNet, dict(
        _DDPMPP, img_resolution=64, channel_mult=[1, 2, 2, 2], dropout=0.05, augment_dim=_EDM_AUGMENT_DIM)),
    'afhqv2-64-ddpmpp': NetworkConfig(SongUNet, dict(
        _DDPMPP, img_resolution=64, channel_mult=[1, 2, 2, 2], dropout=_STUDENT_DROPOUT)),
    'afhqv2-64-ddpmpp-teacher': NetworkConfig(SongUNet, dict(
        _DDPMPP, img_resolution=64, channel_mult=[1, 2, 2, 2], dropout=0.25, augment_dim=_EDM_AUGMENT_DIM)),
    # ImageNet 64×64, class-conditional: EDM's ADM network (README: --arch=adm --dropout=0.10 --augment=0). The CMT
    # paper's ImageNet-64 network is EDM2's XL instead: 'edm2-img64-xl' below.
    'imagenet64-adm': NetworkConfig(DhariwalUNet, dict(
        img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, augment_dim=0, model_channels=192,
        channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8],
        dropout=0.10, label_dropout=0)),
    # sklearn-style 8×8 single-channel digits: a DDPM++ small enough for CPU tests and tiny recipes.
    'digits-ddpmpp': NetworkConfig(SongUNet, dict(
        _DDPMPP, img_resolution=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=[1, 2],
        num_blocks=2, attn_resolutions=[4], dropout=0.1)),
    # Vector data (e.g. a 2-D Gaussian mixture).
    'gmm-mlp': NetworkConfig(MLPNet, dict(
        in_channels=2, out_channels=2, label_dim=0, hidden_channels=256, num_blocks=4, noise_channels=64,
        emb_channels=256, dropout=0.0, residual=True)),
}

# EDM2's magnitude-preserving U-Nets (docs/spec/edm2_latent.md §1.4; NVlabs/edm2 train_edm2.py presets): width C per
# size, pre-training dropout 0 up to S and 0.1 from M on (ImageNet-64: XS and S 0, M–XL 0.1). ImageNet-512 nets run on
# 4×64×64 latents, ImageNet-64 nets on 3×64×64 pixels; both class-conditional over 1000 classes.
EDM2_WIDTHS = dict(xxs=64, xs=128, s=192, m=256, l=320, xl=384, xxl=448)
for _size, _c in EDM2_WIDTHS.items():
    CONFIGS[f'edm2-img512-{_size}'] = NetworkConfig(EDM2UNet, dict(
        img_resolution=64, img_channels=4, label_dim=1000, model_channels=_c,
        dropout=0.0 if _size in ('xxs', 'xs', 's') else 0.10))
    if _size not in ('xxs', 'xxl'):
        CONFIGS[f'edm2-img64-{_size}'] = NetworkConfig(EDM2UNet, dict(
            img_resolution=64, img_channels=3, label_dim=1000, model_channels=_c,
            dropout=0.0 if _size in ('xs', 's') else 0.10))
# A tiny MP-UNet for CPU tests and the recipes' --smoke runs (16×16, two levels, attention at 8×8).
CONFIGS['edm2-tiny'] = NetworkConfig(EDM2UNet, dict(
    img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[8], channels_per_head=16, dropout=0.0))


def build_network(name: str, **overrides) -> torch.nn.Module:
    """Construct the backbone `CONFIGS[name]`, with constructor kwargs replaced by `overrides`.

    Construction draws initial weights from the global RNG; build under `torch.device('meta')` to get the
    structure only. The backbone records its constructor arguments as `init_kwargs`.
    """
    if name not in CONFIGS:
        raise KeyError(f'unknown network config {name!r}; known: {", ".join(sorted(CONFIGS))}')
    cls, kwargs = CONFIGS[name]
    kwargs = {**kwargs, **overrides}
    # Lists are shared between configs; hand the network its own copies.
    return cls(**{k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()})
