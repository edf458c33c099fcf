"""CMT for Mean Flow on scikit-learn's digits, against Mean Flow at equal budget (the ImageNet-256 pipeline of
docs/spec/mf.md §4 in miniature).

Reproduces, in miniature: pre-train a small Mean Flow teacher (the paper's MF-B/4) → CMT mid-training of a larger
student from random weights on the teacher's 8-step trajectories (pairs from `nonadjacent28`, 7 random ones per
trajectory, 16 trajectories per step; average-velocity targets) → Mean Flow post-training from the mid-trained EMA,
whose power EMA continues across the stage boundary (`post_ema_continues`); baseline: Mean Flow from random
weights with the same mid + post budget (the paper's "MF from scratch" arm). Class-conditional, label dropout 0.1, no
guidance.
Metrics: Fréchet distance in the features of the cached digits classifier and the class histogram of 1- and
2-step samples (engine.metrics.DigitsMetrics).
Sized for: 2 CPU cores; 7 min 49 s measured (the limit is 15).

    python recipes/digits_cmt_mf.py [--out runs/digits_cmt_mf] [--kimg-scale 1] [--seed 0] [--smoke]
"""
from __future__ import annotations

import dataclasses

import torch

from engine.data import digits_source
from engine.metrics import DigitsMetrics
from engine.networks import DiT
from engine.objectives import CMTMeanFlow, MeanFlow
from engine.pipelines.digits import DigitsMeanFlowSettings, mean_flow_smoke
from engine.pipelines.recipe import begin
from engine.solvers import mean_flow_uniform
from engine.training.stage_config import StageConfig


@dataclasses.dataclass
class Config(DigitsMeanFlowSettings):
    # Post-training's EMA continues over the mid-training's images instead of restarting at the boundary: over 3
    # seeds of recipes/digits_mf_post_training.py the restarted one ended at 1-step FD 12.47 (higher than Mean Flow's
    # 8.94), the continued one at 9.69 (a tie); on this recipe's own draw it changed nothing (12.04 → 12.06).
    # docs/validation.md §4
    post_ema_continues: bool = True
    eval_kimg: float = 35.0


def smoke(cfg: Config) -> Config:
    return dataclasses.replace(mean_flow_smoke(cfg), eval_kimg=0.128)


def main(argv=None) -> dict:
    started = begin(__doc__, "digits_cmt_mf", Config(), smoke, argv)
    if started is None:
        return {}
    args, cfg, run = started

    def stage_cfg(name, kimg, batch=cfg.batch_size, **kw):
        return StageConfig(name=name, total_kimg=kimg, batch_size=batch, lr=cfg.lr, optimizer="adam",
                           betas=(0.9, 0.95), lr_schedule="constant", ema_beta=None, ema_std=cfg.ema_std,
                           log_kimg=cfg.eval_kimg / 3, ckpt_kimg=cfg.eval_kimg, seed=args.seed, **kw)

    cmt_settings = dict(teacher_kind="mf", pair_rule="nonadjacent28", trajectories_per_batch=cfg.trajectories_per_batch,
                        pairs_per_trajectory=cfg.pairs_per_trajectory)
    # CMT trains on trajectories_per_batch × pairs per trajectory a step; the pair rule's count needs no teacher
    pairs = cfg.trajectories_per_batch * CMTMeanFlow(None, **cmt_settings).per_trajectory
    carry = dict(ema_continue_kimg=cfg.mid_kimg) if cfg.post_ema_continues else {}
    stages = dict(pre=stage_cfg("pre_mf", cfg.pre_kimg, eval_kimg=cfg.pre_kimg),
                  mid=stage_cfg("mid_cmt", cfg.mid_kimg, batch=pairs, eval_kimg=cfg.eval_kimg),
                  post=stage_cfg("post_mf", cfg.post_kimg, eval_kimg=cfg.eval_kimg, **carry),
                  mf=stage_cfg("mf", cfg.mid_kimg + cfg.post_kimg, eval_kimg=cfg.eval_kimg))
    run.plan(*stages.values())   # every stage's budget at this --kimg-scale, before the first one trains
    data, metrics = digits_source(cfg.resolution), DigitsMetrics()
    dit = lambda width, depth: DiT(input_size=cfg.resolution, patch_size=cfg.patch, in_channels=1,
                                   hidden_size=width, depth=depth, num_heads=cfg.heads, num_classes=10)

    def samples(net, steps: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1234)
        z = torch.randn(cfg.eval_samples, 1, cfg.resolution, cfg.resolution, generator=g)
        y = torch.arange(cfg.eval_samples) % 10        # balanced classes
        return mean_flow_uniform(net, z, steps, y).clamp(-1, 1)

    evaluate = lambda ema: metrics.few_step(lambda steps: samples(ema, steps))

    grid = lambda ema: samples(ema, 2)[:100]

    mf = lambda: MeanFlow(mu=cfg.mu, sigma=cfg.sigma)
    evals = dict(evaluate=evaluate, grid=grid)
    # Stage 1: the small Mean Flow teacher.
    pre = run.stage("teacher", "pre", stages["pre"], dit(cfg.teacher_width, cfg.teacher_depth), mf(), data,
                    evaluate=evaluate, shared_by=("cmt_mf",))  # only CMT needs a teacher: its cost is CMT's
    teacher = pre.ema.eval().requires_grad_(False)
    # Arm 1: CMT mid-training of the larger student from random weights, then Mean Flow from its EMA.
    mid = run.stage("cmt_mf", "mid", stages["mid"], dit(cfg.student_width, cfg.student_depth),
                    CMTMeanFlow(teacher, **cmt_settings), data, **evals)
    post = run.stage("cmt_mf", "post", stages["post"], dit(cfg.student_width, cfg.student_depth), mf(), data,
                     init=mid.ema, **evals)
    # Arm 2: Mean Flow from random weights, the same mid + post budget.
    base = run.stage("mf", "post", stages["mf"], dit(cfg.student_width, cfg.student_depth), mf(), data, **evals)
    for arm, res in (("cmt_mf", post), ("mf", base)):
        m = res.eval_history[-1]
        run.record_metrics(arm, one_step=dict(fd=m["fd_1step"], class_tv=m["class_tv_1step"]),
                           two_step=dict(fd=m["fd_2step"], class_tv=m["class_tv_2step"]))
    return run.finish(["fd", "class_tv"], ["fd_1step", "fd_2step"])


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
