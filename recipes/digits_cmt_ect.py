"""The embedded default: the CMT pipeline end to end on scikit-learn's digits, against ECT at equal budget.

Reproduces, in miniature: pre-train an EDM teacher (DDPM++ U-Net) → CMT mid-training on its 16-NFE
DPM-Solver++ trajectories → ECT post-training from the mid-trained EMA; baseline: ECT initialised from the teacher's
weights with the same mid + post budget (the paper's "vanilla ECT" arm, docs/spec/cm.md §8.1). Metrics: Fréchet distance
in the features of a small digits classifier (trained once, cached) and the class histogram of 1- and 2-step
samples. Data: the 1,797 8×8 digits bundled with scikit-learn (no download). CMT's distance is pseudo-Huber rather
than LPIPS: LPIPS needs ImageNet VGG16 weights, which cannot be shipped.
Sized for: 2 CPU cores, at most 15 minutes (measured time in the README).

    python recipes/digits_cmt_ect.py [--out runs/digits_cmt_ect] [--kimg-scale 1] [--seed 0] [--smoke]
"""
from __future__ import annotations

import dataclasses
import math

import torch

from engine.data import digits_source
from engine.loop import StageConfig
from engine.metrics import DigitsMetrics
from engine.networks import build_network
from engine.objectives import CMT, ECT, EDMLoss, pseudo_huber
from engine.pipeline import begin
from engine.precond import CMPrecond, EDMPrecond
from engine.solvers import consistency_sampler


@dataclasses.dataclass
class Config:
    resolution: int = 8
    model_channels: int = 32             # digits-ddpmpp: DDPM++ with channel_mult [1, 2], attention at 4×4
    teacher_dropout: float = 0.1
    student_dropout: float = 0.1
    batch_size: int = 128
    pre_kimg: float = 160.0              # EDM pre-training of the teacher
    pre_lr: float = 2e-3
    # EDM2 power-function EMA (σ_rel) in every stage, not the paper's constant β: these stages are 250–1250 steps,
    # and β = 0.999 over 250 steps would still be 78% the initial weights at the end (the loop warns about this).
    ema_std: float = 0.05
    nfe: int = 16                        # CMT teacher: 16-step multistep DPM-Solver++ (docs/spec/cm.md §2)
    trajectories_per_batch: int = 8      # 8 trajectories × 16 states = 128 pairs
    # mid : post = 3 : 1, the paper's split (docs/spec/cm.md §8.1: 300k + 100k iterations); 80 kimg in all, the
    # baseline's budget
    mid_kimg: float = 60.0
    mid_lr: float = 2e-4                 # docs/spec/cm.md §8.1: RAdam 2e-4, linear decay
    post_kimg: float = 20.0
    post_lr: float = 1e-4                # docs/spec/cm.md §8.1: RAdam 1e-4, linear decay
    q: float = 256.0                     # ECT Δt = 1/q, constant stage
    mid_t: float = 0.77569               # 2-step sampling point after mid-training (docs/spec/cm.md §3.5)
    eval_samples: int = 1000
    eval_kimg: float = 16.0


def smoke(cfg: Config) -> Config:
    return dataclasses.replace(cfg, model_channels=8, pre_kimg=0.512, mid_kimg=0.256, post_kimg=0.256,
                               eval_kimg=0.256, eval_samples=128)


def main(argv=None) -> dict:
    started = begin(__doc__, "digits_cmt_ect", Config(), smoke, argv)
    if started is None:
        return {}
    args, cfg, run = started
    data, metrics = digits_source(cfg.resolution), DigitsMetrics()
    backbone = lambda dropout: build_network("digits-ddpmpp", img_resolution=cfg.resolution,
                                              model_channels=cfg.model_channels, dropout=dropout)

    def samples(f, steps: int) -> torch.Tensor:
        z = torch.randn(cfg.eval_samples, 1, cfg.resolution, cfg.resolution,
                        generator=torch.Generator().manual_seed(1234))
        mid = (cfg.mid_t,) if steps == 2 else ()
        with torch.no_grad():
            return consistency_sampler(f, z, mid, generator=torch.Generator().manual_seed(99)).clamp(-1, 1)

    evaluate = lambda ema: metrics.few_step(lambda steps: samples(ema, steps))

    grid = lambda ema: samples(ema, 2)[:100]

    def stage_cfg(name, kimg, lr, **kw):
        return StageConfig(name=name, total_kimg=kimg, batch_size=cfg.batch_size, lr=lr, optimizer="radam",
                           lr_schedule="linear", ema_beta=None, ema_std=cfg.ema_std, log_kimg=cfg.eval_kimg / 4, ckpt_kimg=cfg.eval_kimg,
                           seed=args.seed, **kw)

    # Stage 1: the teacher (EDM denoising loss, docs/spec/cm.md §1.1).
    pre = run.stage("teacher", "pre", stage_cfg("pre_edm", cfg.pre_kimg, cfg.pre_lr),
                    EDMPrecond(backbone(cfg.teacher_dropout)), EDMLoss(), data, shared_by=("cmt_ect", "ect"))
    teacher = pre.ema.eval().requires_grad_(False)

    ect = lambda: ECT(q=cfg.q)
    evals = dict(evaluate=evaluate, grid=grid)
    # Arm 1: CMT mid-training from the teacher's weights, then ECT from the mid-trained EMA.
    mid = run.stage("cmt_ect", "mid", stage_cfg("mid_cmt", cfg.mid_kimg, cfg.mid_lr,
                                                eval_kimg=cfg.eval_kimg),
                    CMPrecond(backbone(cfg.student_dropout)),
                    CMT(teacher, nfe=cfg.nfe, trajectories_per_batch=cfg.trajectories_per_batch,
                        distance=pseudo_huber(0.00054 * math.sqrt(cfg.resolution ** 2))),
                    data, init=teacher, **evals)
    post = run.stage("cmt_ect", "post", stage_cfg("post_ect", cfg.post_kimg, cfg.post_lr,
                                                  eval_kimg=cfg.eval_kimg),
                     CMPrecond(backbone(cfg.student_dropout)), ect(), data, init=mid.ema, **evals)
    # Arm 2: ECT from the teacher's weights with the same mid + post budget.
    base = run.stage("ect", "post", stage_cfg("ect", cfg.mid_kimg + cfg.post_kimg, cfg.post_lr,
                                              eval_kimg=cfg.eval_kimg),
                     CMPrecond(backbone(cfg.student_dropout)), ect(), data, init=teacher, **evals)
    for arm, res in (("cmt_ect", post), ("ect", base)):
        m = res.eval_history[-1]
        run.record_metrics(arm, one_step=dict(fd=m["fd_1step"], class_tv=m["class_tv_1step"]),
                           two_step=dict(fd=m["fd_2step"], class_tv=m["class_tv_2step"]))
    return run.finish(["fd", "class_tv"], ["fd_1step", "fd_2step"])


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
