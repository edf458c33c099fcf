"""SongUNet: the DDPM++ / NCSN++ U-Net of Song et al. in EDM's formulation (docs/spec/cm.md §5).

Module names, parameter shapes and registration order equal NVlabs/edm's `SongUNet`, so EDM, ECT and CMT
checkpoints load by name (docs/spec/cm.md §5.5, §6.2); the constructor takes exactly EDM's keyword arguments
because checkpoint loaders rebuild the network from the `_init_kwargs` stored in the pickles.

DDPM++ (the teacher and student architecture of the paper): embedding_type='positional',
encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1,1].
NCSN++: embedding_type='fourier', encoder_type='residual', decoder_type='standard', channel_mult_noise=2,
resample_filter=[1,3,3,1].
"""

import math

import torch
import torch.nn.functional as F

from .layers import (Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock, constructor_arguments,
                     label_embedding, set_backbone_interface)

__all__ = ['SongUNet']


class SongUNet(torch.nn.Module):
    """Backbone F(x, c_noise, class_labels, augment_labels) -> [B, out_channels, R, R].

    Encoder levels run at resolutions R, R/2, ...; each level after the first starts with a downsampling
    block, then `num_blocks` blocks of width model_channels·channel_mult[level], with attention at the
    resolutions in `attn_resolutions`. Every encoder output is pushed on a skip stack; the decoder mirrors
    the encoder with num_blocks + 1 blocks per level, each consuming one skip by channel concatenation.
    """

    def __init__(self,
                 img_resolution,                 # input/output resolution R
                 in_channels,                    # image channels at the input
                 out_channels,                   # image channels at the output
                 label_dim=0,                    # number of classes; 0 = unconditional
                 augment_dim=0,                  # augmentation-label width; 0 = none (EDM teachers: 9)
                 model_channels=128,             # base width
                 channel_mult=[1, 2, 2, 2],      # width multiplier per resolution level
                 channel_mult_emb=4,             # embedding width = model_channels * channel_mult_emb
                 num_blocks=4,                   # residual blocks per encoder level
                 attn_resolutions=[16],          # resolutions with self-attention
                 dropout=0.10,                   # dropout inside the residual blocks
                 label_dropout=0,                # class-label dropout (classifier-free guidance)
                 embedding_type='positional',    # 'positional' (DDPM++) or 'fourier' (NCSN++)
                 channel_mult_noise=1,           # noise-embedding width multiplier: 1 DDPM++, 2 NCSN++
                 encoder_type='standard',        # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++)
                 decoder_type='standard',        # 'standard' or 'skip'
                 resample_filter=[1, 1],         # FIR filter: [1,1] DDPM++, [1,3,3,1] NCSN++
                 ):
        init_kwargs = constructor_arguments(locals())  # first, before any other local exists
        for name, value, known in [('embedding_type', embedding_type, ('fourier', 'positional')),
                                   ('encoder_type', encoder_type, ('standard', 'skip', 'residual')),
                                   ('decoder_type', decoder_type, ('standard', 'skip'))]:
            if value not in known:
                raise ValueError(f'SongUNet: unknown {name} {value!r}; expected one of {known}')
        super().__init__()
        set_backbone_interface(self, init_kwargs, img_resolution=img_resolution, in_channels=in_channels,
                               out_channels=out_channels, label_dim=label_dim, augment_dim=augment_dim,
                               label_dropout=label_dropout, data_shape=(in_channels, img_resolution, img_resolution))

        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping network (registration order = EDM's state_dict order).
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. `caux` tracks the width of the auxiliary image path of the 'skip'/'residual' encoders.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        # Widths of what the encoder pushes on the skip stack (the aux layers push nothing).
        skip_channels = [m.out_channels for name, m in self.enc.items() if 'aux' not in name]

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
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        """x [B, C, R, R]; noise_labels [B] (c_noise); class_labels [B, label_dim] one-hot or None."""
        # Mapping. EDM feeds [sin, cos] to map_layer0: swap the halves of the embedding.
        emb = self.map_noise(noise_labels)
        cos, sin = emb.chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)
        if self.map_label is not None:
            emb = emb + label_embedding(self.map_label, class_labels, self.label_dropout, self.training, emb,
                                        scale=math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, layer in self.enc.items():
            if 'aux_down' in name:
                aux = layer(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + layer(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
                skips.append(x)

        # Decoder. Blocks whose input width differs from the running width (the `blockN` ones) take a skip.
        aux = None
        tmp = None
        for name, layer in self.dec.items():
            if 'aux_up' in name:
                aux = layer(aux)
            elif 'aux_norm' in name:
                tmp = layer(x)
            elif 'aux_conv' in name:
                tmp = layer(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != layer.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return aux
