"""The importance of mid-training (the CMT paper's §4.3) on digits: no mid-training, a short one and a long one, at
the same total budget of mid- plus post-training, over seeds — the digits half of recipes/gmm_mid_training.py.

One class-conditional EDM teacher is trained per run (at --seed; the main job's, engine/pipelines/digits.py), and every
arm starts from its weights, as the paper's pipeline does. Per seed (a seed
changes the student's training noise and data order)
  no_mid     ECT post-training for the whole budget from the teacher's weights
  short_mid  CMT (the teacher's 16-step DPM-Solver++ trajectories) for `short_mid_kimg`, then ECT for the rest
  long_mid   CMT for `long_mid_kimg`, then ECT for the rest
with the same post-training settings in every arm. Metrics of each arm's final EMA: FD in the digits classifier's
features of 1,000 1- and 2-step samples (balanced labels). results.json: per arm the per-seed values, mean ± std,
and the 95% t-interval of the paired difference to no_mid (an interval containing 0 is a tie), with the teacher's
own FD and the held-out floor; mid_training.png: the arms per seed.
Sized for: 2 CPU cores, 3 seeds at the defaults (measured time in docs/validation.md).

    python recipes/digits_mid_training.py [--seeds 3] [--out runs/digits_mid_training] [--smoke]
"""
from __future__ import annotations

import dataclasses
import os

import torch

from engine.data import digits_source
from engine.metrics import DigitsMetrics
from engine.objectives import ECT, EDMLoss
from engine.pipelines.digits import DigitsSettings, backbone, cmt, consistency_samples, stage_config, teacher_samples
from engine.pipelines.gmm import bar_plot
from engine.pipelines.recipe import begin
from engine.pipelines.seed_stats import mean_se, paired_interval, sample_std, seed_table, seeds
from engine.precond import CMPrecond, EDMPrecond

ARMS = ("no_mid", "short_mid", "long_mid")
METRICS = ("fd_1step", "fd_2step")


@dataclasses.dataclass
class Config(DigitsSettings):
    # the main job's teacher (320 kimg: 16-step FD 2.26; at 160 kimg it scored 20.2, docs/validation.md §5), so the
    # nine student runs share what is left of the 15 minutes: 24 kimg each
    total_kimg: float = 24.0             # mid + post, every arm
    short_mid_kimg: float = 2.4          # 10 % of the budget
    long_mid_kimg: float = 18.0          # 75 %, the main job's (and the paper's) 3 : 1 split
    default_seeds: int = 3


def smoke(cfg: Config) -> Config:
    return dataclasses.replace(cfg, model_channels=8, pre_kimg=0.512, total_kimg=0.512, short_mid_kimg=0.128,
                               long_mid_kimg=0.384, eval_samples=128, default_seeds=2)


def main(argv=None) -> dict:
    started = begin(__doc__, "digits_mid_training", Config(), smoke, argv)
    if started is None:
        return {}
    args, cfg, run = started
    seed_list = seeds(args, cfg)
    mids = dict(no_mid=0.0, short_mid=cfg.short_mid_kimg, long_mid=cfg.long_mid_kimg)
    pre_cfg = stage_config(cfg, "pre_edm", cfg.pre_kimg, cfg.pre_lr, args.seed)
    mid_cfg = lambda a, seed: stage_config(cfg, "mid_cmt", mids[a], cfg.mid_lr, seed)
    post_cfg = lambda a, seed: stage_config(cfg, "post_ect", cfg.total_kimg - mids[a], cfg.post_lr, seed)
    stages = [pre_cfg]            # in the order they train
    for seed in seed_list:
        for a in ARMS:
            stages += ([mid_cfg(a, seed)] if mids[a] > 0 else []) + [post_cfg(a, seed)]
    run.plan(*stages)             # every stage's budget at this --kimg-scale, before the first one trains
    data, metrics = digits_source(cfg.resolution), DigitsMetrics()
    evaluate = lambda f: {f"fd_{k}step": metrics(consistency_samples(cfg, f, k))["fd"] for k in (1, 2)}
    pre = run.stage("teacher", "pre", pre_cfg,
                    EDMPrecond(backbone(cfg, cfg.teacher_dropout)), EDMLoss(), data,
                    shared_by=tuple(f"s{s}/{a}" for s in seed_list for a in ARMS))
    teacher = pre.ema.eval().requires_grad_(False)
    reference = dict(floor=metrics.heldout_floor(), teacher_16step_fd=metrics(teacher_samples(cfg, teacher))["fd"])
    print(f"[digits_mid_training] teacher (16-step DPM-Solver++) FD {reference['teacher_16step_fd']:.4g}; "
          f"held-out floor {reference['floor']['fd']:.3g}", flush=True)

    values = {a: {k: [] for k in METRICS} for a in ARMS}
    for seed in seed_list:
        torch.manual_seed(seed)
        for a in ARMS:
            start = teacher
            if mids[a] > 0:
                start = run.stage(f"s{seed}/{a}", "mid", mid_cfg(a, seed), CMPrecond(backbone(cfg, cfg.student_dropout)),
                                  cmt(cfg, teacher), data, init=teacher).ema
            post = run.stage(f"s{seed}/{a}", "post", post_cfg(a, seed), CMPrecond(backbone(cfg, cfg.student_dropout)),
                             ECT(q=cfg.q), data, init=start)
            m = evaluate(post.ema)
            for k in METRICS:
                values[a][k].append(m[k])
            run.record_metrics(f"s{seed}/{a}", one_step=dict(fd=m["fd_1step"]), two_step=dict(fd=m["fd_2step"]))
            print(f"[digits_mid_training] seed {seed} {a:9s} fd_1step {m['fd_1step']:.4g}  "
                  f"fd_2step {m['fd_2step']:.4g}", flush=True)

    summary = {a: {k: dict(zip(("mean", "stderr"), mean_se(values[a][k])), per_seed=values[a][k],
                       std=sample_std(values[a][k])) for k in METRICS} for a in ARMS}
    paired = {a: {k: paired_interval(values[a][k], values["no_mid"][k]) for k in METRICS} for a in ARMS[1:]}
    run.results.update(seeds=seed_list, mid_kimg=mids, total_kimg=cfg.total_kimg, reference=reference,
                       summary=summary, paired_vs_no_mid=paired)
    if run.lead:
        print(seed_table(summary, ARMS, dict(fd_1step="1-step FD", fd_2step="2-step FD"), "std",
                         [("vs no_mid (95% CI of the paired difference)", "no_mid", paired)]), flush=True)
        bar_plot(summary, ARMS, METRICS, os.path.join(args.out, "mid_training.png"), spread="std")
    return run.finish(["fd"], [])


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
