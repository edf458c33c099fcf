"""The latent VGG-16 trunk E-LatentLPIPS measures with (docs/spec/edm2_latent.md §6.3, §6.5): VGG16_Latent_GN, a
VGG-16 on 4-channel VAE latents with GroupNorm after every convolution, trained as an ImageNet classifier on
latents (recipes/imagenet512_latent_vgg.py) and then used frozen as the distance's trunk
(engine/perceptual/elatentlpips.py)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["LatentVGG", "LATENT_VGG_LAYERS", "vgg_layers"]

# VGG16_Latent's layer list: widths, 'M' a 2×2 max-pool (the pools after conv2, conv4 and conv13 are removed)
LATENT_VGG_LAYERS = (64, 64, 128, 128, 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def vgg_layers(cfg, in_channels: int, norm: str, num_groups: int = 32) -> nn.Sequential:
    """VGG's convolution stack from a layer list (widths, 'M' a 2×2 max-pool), each convolution followed by
    GroupNorm (`norm='group'`), BatchNorm ('batch') or nothing, then ReLU."""
    layers, c = [], in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        layers.append(nn.Conv2d(c, v, 3, padding=1))
        if norm == "group":
            layers.append(nn.GroupNorm(num_groups, v))
        elif norm == "batch":
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU())
        c = v
    return nn.Sequential(*layers)


class LatentVGG(nn.Module):
    """VGG16_Latent_GN (§6.3, §6.5): the trunk `features` and the ImageNet classifier it is trained with
    (AdaptiveAvgPool(7) → 25088 → 4096 → 4096 → classes, ReLU and dropout between; `hidden` other than 4096 only
    for --smoke runs: the trunk E-LatentLPIPS uses is the same)."""

    def __init__(self, in_channels: int = 4, num_classes: int = 1000, num_groups: int = 32, hidden: int = 4096):
        super().__init__()
        self.init_kwargs = dict(in_channels=in_channels, num_classes=num_classes, num_groups=num_groups, hidden=hidden)
        self.features = vgg_layers(LATENT_VGG_LAYERS, in_channels, "group", num_groups)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, hidden), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
