"""A stage's optimizers: Adam, RAdam or SGD (PyTorch's fused / foreach kernels on CUDA; NVIDIA apex is not used), one
for the network and, when the objective owns trained parameters (sCM's adaptive weight), a second one with the
same settings — so that the network's optimizer state is exactly what a sharded checkpoint of the network
describes."""
from __future__ import annotations

import torch


def make_optimizer(cfg, params, device: torch.device):
    """`cfg`: a StageConfig (optimizer, lr, betas, eps, weight_decay, momentum)."""
    cuda = device.type == "cuda"
    if cfg.optimizer == "adam":  # fused kernel on CUDA: one launch for the whole update
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                fused=cuda or None)
    if cfg.optimizer == "radam":  # RAdam has no fused kernel; foreach batches the update on CUDA
        return torch.optim.RAdam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 foreach=cuda or None)
    if cfg.optimizer == "sgd":   # PyTorch's SGD: v ← μv + (g + λθ), θ ← θ − lr·v (the latent VGG's, §6.5)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               foreach=cuda or None)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adam', 'radam' or 'sgd'")


class Optimizers:
    """The network's optimizer (`net`) and the objective's (`obj`, or None), stepped and zeroed together."""

    def __init__(self, net_opt, obj_opt=None):
        self.net, self.obj = net_opt, obj_opt

    @classmethod
    def build(cls, cfg, net_params, obj_params, device: torch.device) -> "Optimizers":
        return cls(make_optimizer(cfg, net_params, device),
                   make_optimizer(cfg, obj_params, device) if obj_params else None)

    @property
    def param_groups(self):
        return self.net.param_groups + (self.obj.param_groups if self.obj else [])

    def set_lr(self, lr: float) -> None:
        for g in self.param_groups:
            g["lr"] = lr

    def zero_grad(self, set_to_none: bool = True):
        for o in (self.net, self.obj):
            if o is not None:
                o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in (self.net, self.obj):
            if o is not None:
                o.step()
