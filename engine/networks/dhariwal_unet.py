"""DhariwalUNet: the ADM U-Net of Dhariwal & Nichol in EDM's formulation (EDM's ImageNet-64 network).

Module names, parameter shapes and registration order equal NVlabs/edm's `DhariwalUNet`, and the
constructor takes EDM's keyword arguments and defaults, so EDM checkpoints load by name (docs/spec/cm.md §6.2).
Differences from SongUNet: adaptive (scale/shift) group-norm modulation, kaiming-uniform init scaled by
sqrt(1/3), multi-head attention with 64 channels per head, pure-resampling skips in up/down blocks,
non-endpoint positional embedding without the sin/cos swap, class embedding added after map_layer1, and a
separate output norm/conv.
"""

import math

import torch
import torch.nn.functional as F

from .layers import (Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, constructor_arguments, label_embedding,
                     set_backbone_interface)

__all__ = ['DhariwalUNet']


class DhariwalUNet(torch.nn.Module):
    """Backbone F(x, c_noise, class_labels, augment_labels) -> [B, out_channels, R, R]."""

    def __init__(self,
                 img_resolution,                 # input/output resolution R
                 in_channels,                    # image channels at the input
                 out_channels,                   # image channels at the output
                 label_dim=0,                    # number of classes; 0 = unconditional
                 augment_dim=0,                  # augmentation-label width; 0 = none
                 model_channels=192,             # base width
                 channel_mult=[1, 2, 3, 4],      # width multiplier per resolution level
                 channel_mult_emb=4,             # embedding width = model_channels * channel_mult_emb
                 num_blocks=3,                   # residual blocks per encoder level
                 attn_resolutions=[32, 16, 8],   # resolutions with self-attention
                 dropout=0.10,                   # dropout inside the residual blocks
                 label_dropout=0,                # class-label dropout (classifier-free guidance)
                 ):
        init_kwargs = constructor_arguments(locals())
        super().__init__()
        set_backbone_interface(self, init_kwargs, img_resolution=img_resolution, in_channels=in_channels,
                               out_channels=out_channels, label_dim=label_dim, augment_dim=augment_dim,
                               label_dropout=label_dropout, data_shape=(in_channels, img_resolution, img_resolution))

        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        # Mapping network (registration order = EDM's state_dict order; map_label comes last here).
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skip_channels = [m.out_channels for m in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        """x [B, C, R, R]; noise_labels [B] (c_noise); class_labels [B, label_dim] one-hot or None."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + label_embedding(self.map_label, class_labels, self.label_dropout, self.training, emb)
        emb = F.silu(emb)

        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)

        for layer in self.dec.values():
            if x.shape[1] != layer.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
