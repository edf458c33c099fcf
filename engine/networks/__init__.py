"""Denoiser backbones F(x, c_noise, class_labels, augment_labels) (docs/spec/cm.md §5).

SongUNet and DhariwalUNet reproduce NVlabs/edm's networks with identical state_dict names, so EDM / ECT /
CMT checkpoints load by name; MLPNet is a small backbone for vector data. Named configurations live in
`configs.py`. `EDM2UNet` (edm2_unet.py) is EDM2's magnitude-preserving U-Net (docs/spec/edm2_latent.md §1).
`DiT` (dit.py) is the DiT/SiT/Mean Flow transformer, `net(x, t, r, labels)` (docs/spec/mf.md §3); `MMDiT`
(mmdit.py) its text-conditioned sibling, REPA's MS-COCO MM-DiT, `net(x, t, r, caption_features)`. `LatentVGG`
(latent_vgg.py) is the latent VGG-16 classifier whose trunk E-LatentLPIPS measures with.
"""

from .configs import CONFIGS, NetworkConfig, build_network
from .dhariwal_unet import DhariwalUNet
from .dit import DiT
from .edm2_unet import EDM2UNet
from .latent_vgg import LatentVGG
from .mlp import MLPNet
from .mmdit import MMDiT
from .song_unet import SongUNet

__all__ = ['SongUNet', 'DhariwalUNet', 'DiT', 'MMDiT', 'EDM2UNet', 'MLPNet', 'LatentVGG', 'build_network', 'CONFIGS',
           'NetworkConfig']
