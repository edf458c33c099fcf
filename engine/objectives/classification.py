"""Classification, for the one network this engine trains that is not generative: the latent VGG of
E-LatentLPIPS, an ImageNet classifier on EDM2's final latents (docs/spec/edm2_latent.md §6.5). Wrapped in
LatentPosterior it sees a fresh posterior sample of each stored latent, as the CMT authors' training does."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.objectives.base import LossOutput, Objective, StepRNG


class Classification(Objective):
    """Cross-entropy of `net(images)` (logits [B, classes]) against the class indices: loss [B]."""

    name = "classification"

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:
        if labels is None or labels.ndim != 1:
            raise ValueError("classification needs integer class labels [B] (a dataset with dataset.json labels)")
        logits = net(images)
        if logits.ndim != 2:
            raise ValueError(f"classification needs logits [B, classes], got {tuple(logits.shape)}")
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        return LossOutput(loss=loss, pairs=images.shape[0], student_forward=images.shape[0],
                          student_backward=images.shape[0])


@torch.no_grad()
def top1(net, source, indices, device, batch: int = 256, convention: str = "edm2", seed: int = 0) -> float:
    """Top-1 accuracy of `net` on the items `indices` of a LatentSource, each a posterior sample drawn from a
    generator seeded with `seed` (the same sample every evaluation)."""
    from engine.objectives.latent import posterior_sample
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for lo in range(0, len(indices), batch):
        idx = torch.as_tensor(indices[lo:lo + batch])
        moments, labels = source.batch(idx, device)
        noise = torch.randn((len(idx), moments.shape[1] // 2, *moments.shape[2:]), generator=g).to(device)
        pred = net(posterior_sample(moments.float(), noise, convention)).argmax(dim=1)
        correct += int((pred == labels).sum())
    return correct / max(len(indices), 1)
