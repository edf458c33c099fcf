"""MLPNet: a small backbone for vector data [B, D] (toy 2-D mixtures, unit tests, tiny recipes).

Same call signature and attributes as the U-Nets, so the preconditioning wrappers, losses and samplers
treat it like any other backbone:

    emb = silu(map_layer1(silu(map_layer0(PositionalEmbedding(c_noise) + map_label(labels)))))
    h   = in_layer(x)
    h   = h + fc1(dropout(silu(fc0(silu(h)) + affine(emb))))        for each residual block
          dropout(silu(fc0(h) + affine(emb)))                        for each block when residual=False
    out = out_layer(silu(h))                                         (out_layer initialised ×1e-5)

The noise embedding is EDM's DDPM++ one (positional, endpoint=True, sin/cos swapped), sized for
c_noise = ln(σ)/4. Initialisation follows SongUNet (xavier-uniform, ×1e-5 for the layers that close a
residual branch and for the output), so a fresh network outputs ≈ 0.
"""

import math

import torch
import torch.nn.functional as F

from .dropout import dropout
from .layers import Linear, PositionalEmbedding, constructor_arguments, label_embedding, set_backbone_interface

__all__ = ['MLPNet', 'MLPBlock']


class MLPBlock(torch.nn.Module):
    """One hidden block conditioned additively on the embedding."""

    def __init__(self, width, emb_channels, dropout=0.0, residual=True):
        super().__init__()
        init = dict(init_mode='xavier_uniform')
        self.residual = residual
        self.dropout = dropout
        self.fc0 = Linear(width, width, **init)
        self.affine = Linear(emb_channels, width, **init)
        if residual:
            self.fc1 = Linear(width, width, init_mode='xavier_uniform', init_weight=1e-5)

    def forward(self, h, emb):
        if not self.residual:
            return dropout(F.silu(self.fc0(h) + self.affine(emb)), p=self.dropout, training=self.training)
        t = F.silu(self.fc0(F.silu(h)) + self.affine(emb))
        return h + self.fc1(dropout(t, p=self.dropout, training=self.training))


class MLPNet(torch.nn.Module):
    """Backbone F(x, c_noise, class_labels, augment_labels) -> [B, out_channels] for x of shape [B, D]."""

    def __init__(self,
                 in_channels,                    # data dimension D
                 out_channels=None,              # output dimension; defaults to D
                 label_dim=0,                    # number of classes; 0 = unconditional
                 hidden_channels=256,            # width of the hidden layers
                 num_blocks=4,                   # number of hidden blocks
                 noise_channels=64,              # width of the positional noise embedding
                 emb_channels=256,               # width of the conditioning embedding
                 dropout=0.0,                    # dropout inside residual blocks
                 label_dropout=0,                # class-label dropout (classifier-free guidance)
                 residual=True,                  # residual blocks (True) or a plain SiLU MLP (False)
                 ):
        init_kwargs = constructor_arguments(locals())
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        set_backbone_interface(self, init_kwargs, img_resolution=None,  # vector data: no spatial extent
                               in_channels=in_channels, out_channels=out_channels, label_dim=label_dim, augment_dim=0,
                               label_dropout=label_dropout, data_shape=(in_channels,))

        init = dict(init_mode='xavier_uniform')
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.in_layer = Linear(in_channels, hidden_channels, **init)
        self.blocks = torch.nn.ModuleList(
            MLPBlock(hidden_channels, emb_channels, dropout=dropout, residual=residual)
            for _ in range(num_blocks))
        self.out_layer = Linear(hidden_channels, out_channels, init_mode='xavier_uniform', init_weight=1e-5)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        """x [B, D]; noise_labels [B]; class_labels [B, label_dim] one-hot or None; augment_labels ignored."""
        emb = self.map_noise(noise_labels.to(x.dtype))
        cos, sin = emb.chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)
        if self.map_label is not None:
            emb = emb + label_embedding(self.map_label, class_labels, self.label_dropout, self.training, emb,
                                        scale=math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        h = self.in_layer(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out_layer(F.silu(h))
