"""The importance of mid-training (the CMT paper's §4.3), on the analytic Gaussian mixture: no mid-training, a
short one and a long one, at the same total budget of mid- plus post-training, over seeds.

Per seed (a seed changes the initialisation, data order and noise; the mixture, its training set and the evaluation
draws are fixed):
EDM pre-training of the MLP gives the diffusion weights every arm starts from (as the paper's pipeline), then
  no_mid     ECT post-training for the whole budget from the diffusion weights
  short_mid  CMT (exact teacher, 16-step DPM-Solver++ trajectories) for `short_mid_kimg`, then ECT for the rest
  long_mid   CMT for `long_mid_kimg`, then ECT for the rest
with the same post-training settings in every arm. Metrics of each arm's final EMA: the flow-map error
E‖f − Ψ‖² against the exact PF-ODE flow (mean over a σ grid), and the sliced Wasserstein distance of 1- and 2-step
samples to the mixture. results.json: per arm the per-seed values, mean ± std, and the 95% t-interval of the
paired difference to no_mid (an interval containing 0 is a tie); mid_training.png: the three metrics per arm.
Sized for: 2 CPU cores, about 2 minutes a seed (5 seeds by default: 9 minutes).

    python recipes/gmm_mid_training.py [--seeds 5] [--out runs/gmm_mid_training] [--smoke]
"""
from __future__ import annotations

import dataclasses
import os

from engine.objectives import CMT, ECT, squared_l2
from engine.pipelines.gmm import (METRICS, MixtureSettings, backbone, bar_plot, diffusion_weights, evaluate,
                                  mixture_problem, pre_stage_config, stage_config)
from engine.pipelines.recipe import begin
from engine.pipelines.seed_stats import mean_se, paired_interval, sample_std, seed_table, seeds
from engine.precond import CMPrecond

ARMS = ("no_mid", "short_mid", "long_mid")


@dataclasses.dataclass
class Config(MixtureSettings):
    total_kimg: float = 300.0            # mid + post, every arm
    short_mid_kimg: float = 30.0
    long_mid_kimg: float = 150.0
    post_lr: float = 2e-4                # the same post-training in every arm
    q: float = 256.0                     # ECT's Δt = 1/q, constant stage


def smoke(cfg: Config) -> Config:
    return dataclasses.replace(cfg, train_samples=2000, hidden=32, blocks=1, pre_kimg=0.256, total_kimg=0.768,
                               short_mid_kimg=0.128, long_mid_kimg=0.384, eval_sigmas=(0.1, 2.0), eval_samples=200,
                               default_seeds=2)


def main(argv=None) -> dict:
    started = begin(__doc__, "gmm_mid_training", Config(), smoke, argv)
    if started is None:
        return {}
    args, cfg, run = started
    mids = dict(no_mid=0.0, short_mid=cfg.short_mid_kimg, long_mid=cfg.long_mid_kimg)
    mid_cfg = lambda a, seed: stage_config(cfg, "mid_cmt", mids[a], cfg.mid_lr, seed)
    post_cfg = lambda a, seed: stage_config(cfg, "post_ect", cfg.total_kimg - mids[a], cfg.post_lr, seed)
    seed_list = seeds(args, cfg)
    stages = []                   # in the order they train
    for seed in seed_list:
        stages.append(pre_stage_config(cfg, seed))
        for a in ARMS:
            stages += ([mid_cfg(a, seed)] if mids[a] > 0 else []) + [post_cfg(a, seed)]
    run.plan(*stages)             # every stage's budget at this --kimg-scale, before the first one trains
    gm, data = mixture_problem(cfg)
    values = {a: {m: [] for m in METRICS} for a in ARMS}
    for seed in seed_list:
        arms = {a: f"s{seed}/{a}" for a in ARMS}
        pre = diffusion_weights(run, cfg, data, list(arms.values()), seed)
        for a in ARMS:
            start = pre.ema
            if mids[a] > 0:
                start = run.stage(arms[a], "mid", mid_cfg(a, seed),
                                  CMPrecond(backbone(cfg)), CMT(gm, nfe=cfg.nfe, distance=squared_l2,
                                                             trajectories_per_batch=cfg.trajectories_per_batch),
                                  data, init=start).ema
            post = run.stage(arms[a], "post", post_cfg(a, seed),
                             CMPrecond(backbone(cfg)), ECT(q=cfg.q), data, init=start)
            m = evaluate(gm, cfg, post.ema)
            for k in METRICS:
                values[a][k].append(m[k])
            run.record_metrics(arms[a], one_step=dict(flow_map_error=m["flow_map_error"], swd=m["swd_1step"]),
                               two_step=dict(swd=m["swd_2step"]))
            print(f"[gmm_mid_training] seed {seed} {a:9s} " + "  ".join(f"{k} {m[k]:.4g}" for k in METRICS),
                  flush=True)

    summary = {a: {k: dict(zip(("mean", "stderr"), mean_se(values[a][k])), per_seed=values[a][k],
                       std=sample_std(values[a][k])) for k in METRICS} for a in ARMS}
    paired = {a: {k: paired_interval(values[a][k], values["no_mid"][k]) for k in METRICS} for a in ARMS[1:]}
    run.results.update(seeds=seed_list, mid_kimg=mids, total_kimg=cfg.total_kimg, summary=summary,
                       paired_vs_no_mid=paired)
    if run.lead:
        print(seed_table(summary, ARMS, dict(flow_map_error="flow-map error", swd_1step="1-step SWD",
                                             swd_2step="2-step SWD"), "std",
                         [("vs no_mid (95% CI of the paired difference)", "no_mid", paired)]), flush=True)
        bar_plot(summary, ARMS, METRICS, os.path.join(args.out, "mid_training.png"), spread="std")
    return run.finish(["flow_map_error", "swd"], [])


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
