"""What the latent Mean Flow recipes share (recipes/imagenet256_cmt_mf.py, the paper's Table 4, and
recipes/coco_t2i_cmt_mf.py, its Table 5): the settings common to both pipelines — SD-VAE latents, CMT-MF's pairs
(docs/spec/mf.md §4.5), Mean Flow post-training, EMA and intervals — and their --smoke sizes. Each recipe derives its
own settings from these and is its own pipeline, with its stages visible in the file."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class LatentMeanFlowSettings:
    latent_size: int = 32                # SD-VAE latents of 256² images
    teacher_batch: int = 256
    trajectories_per_batch: int = 4      # × 28 pairs = 112 per iteration (docs/spec/mf.md §4.5)
    pair_rule: str = "nonadjacent28"
    post_batch: int = 64
    t_start: float = 0.0
    lr: float = 1e-4
    ema_beta: float = 0.9999
    log_kimg: float = 100.0
    ckpt_kimg: float = 5_000.0
    grid_kimg: float = 5_000.0
    tiny: bool = False                   # --smoke: tiny networks instead of the paper's


def latent_smoke(cfg, **changes):
    """The --smoke sizes both recipes share (8² latents, two trajectories a step, sub-kimg stages, tiny networks),
    with the recipe's own `changes`."""
    return dataclasses.replace(cfg, latent_size=8, trajectories_per_batch=2, mid_kimg=0.112, post_batch=8,
                               post_kimg=0.032, log_kimg=0.016, ckpt_kimg=0.032, grid_kimg=0.064, ema_beta=0.3,
                               tiny=True, **changes)
