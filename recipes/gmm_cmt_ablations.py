"""CMT against its two ablations, KD and Slow CMT (the CMT paper's §4.3, Table 5), on the analytic Gaussian
mixture: quality after the same post-training, and what each mid-training costs, over seeds.

The paper's claim: Slow CMT (a fresh teacher solve from a forward-noised point for every pair) reaches CMT's
quality at several times its teacher cost, and KD (only (x_T, σ_max) → x_N, one pair per trajectory) is worse.

Per seed (the mixture and its training set are fixed; a seed changes initialisations, data order and noise):
EDM pre-training gives the diffusion weights, then for each of CMT, KD and Slow CMT (docs/spec/cm.md §3.1, §8.1;
engine/objectives/cmt.py; exact teacher, 16-step DPM-Solver++) a mid-training of `mid_kimg` pairs from them, then
the same ECT post-training. Quality: the final EMA's flow-map error against the exact flow and the 1- and 2-step
sliced Wasserstein distances (engine/pipelines/gmm.py). Cost: the mid-training's teacher NFE per pair and
images per pair from the loop's counters, and its wall time. results.json: per method the per-seed values, mean
± std, and the 95% t-interval of the paired difference to CMT (containing 0: a tie); cmt_ablations.png.
Sized for: 2 CPU cores, about 2 minutes a seed (5 seeds by default: 10 minutes).

    python recipes/gmm_cmt_ablations.py [--seeds 5] [--out runs/gmm_cmt_ablations] [--smoke]
"""
from __future__ import annotations

import dataclasses
import os

from engine.objectives import CMT, ECT, KD, SlowCMT, squared_l2
from engine.pipelines.gmm import (METRICS, MixtureSettings, backbone, bar_plot, diffusion_weights, evaluate,
                                  mixture_problem, pre_stage_config, stage_config)
from engine.pipelines.recipe import begin
from engine.pipelines.seed_stats import interval_text, mean_se, paired_interval, seeds
from engine.precond import CMPrecond

METHODS = ("cmt", "kd", "slow_cmt")
COSTS = ("teacher_nfe_per_pair", "images_per_pair", "mid_wall_s")


@dataclasses.dataclass
class Config(MixtureSettings):
    mid_kimg: float = 60.0               # mid-training pairs, every method
    post_kimg: float = 120.0
    post_lr: float = 2e-4
    q: float = 256.0


def smoke(cfg: Config) -> Config:
    return dataclasses.replace(cfg, train_samples=2000, hidden=32, blocks=1, pre_kimg=0.256, mid_kimg=0.256,
                               post_kimg=0.256, eval_sigmas=(0.1, 2.0), eval_samples=200, default_seeds=2)


def objective(name: str, gm, cfg):
    if name == "cmt":
        return CMT(gm, nfe=cfg.nfe, trajectories_per_batch=cfg.trajectories_per_batch, distance=squared_l2)
    if name == "kd":
        return KD(gm, nfe=cfg.nfe, distance=squared_l2)
    return SlowCMT(gm, nfe=cfg.nfe, distance=squared_l2)


def main(argv=None) -> dict:
    started = begin(__doc__, "gmm_cmt_ablations", Config(), smoke, argv)
    if started is None:
        return {}
    args, cfg, run = started
    mid_cfg = lambda m, seed: stage_config(cfg, f"mid_{m}", cfg.mid_kimg, cfg.mid_lr, seed)
    post_cfg = lambda seed: stage_config(cfg, "post_ect", cfg.post_kimg, cfg.post_lr, seed)
    seed_list = seeds(args, cfg)
    stages = []                   # in the order they train
    for seed in seed_list:
        stages += [pre_stage_config(cfg, seed), *(c for m in METHODS for c in (mid_cfg(m, seed), post_cfg(seed)))]
    run.plan(*stages)             # every stage's budget at this --kimg-scale, before the first one trains
    gm, data = mixture_problem(cfg)
    values = {m: {k: [] for k in METRICS + COSTS} for m in METHODS}
    for seed in seed_list:
        arms = {m: f"s{seed}/{m}" for m in METHODS}
        pre = diffusion_weights(run, cfg, data, list(arms.values()), seed)
        for m in METHODS:
            mid = run.stage(arms[m], "mid", mid_cfg(m, seed), CMPrecond(backbone(cfg)), objective(m, gm, cfg), data,
                            init=pre.ema)
            post = run.stage(arms[m], "post", post_cfg(seed), CMPrecond(backbone(cfg)), ECT(q=cfg.q), data,
                             init=mid.ema)
            q = evaluate(gm, cfg, post.ema)
            c = mid.counters
            q.update(teacher_nfe_per_pair=c["teacher_nfe"] / c["pairs"], images_per_pair=c["images"] / c["pairs"],
                     mid_wall_s=mid.wall_s)
            for k in METRICS + COSTS:
                values[m][k].append(q[k])
            run.record_metrics(arms[m], one_step=dict(flow_map_error=q["flow_map_error"], swd=q["swd_1step"]),
                               two_step=dict(swd=q["swd_2step"]))
            print(f"[gmm_cmt_ablations] seed {seed} {m:8s} " + "  ".join(f"{k} {q[k]:.4g}" for k in METRICS + COSTS),
                  flush=True)

    summary = {m: {k: dict(zip(("mean", "stderr"), mean_se(values[m][k])), per_seed=values[m][k])
                   for k in METRICS + COSTS} for m in METHODS}
    paired = {m: {k: paired_interval(values[m][k], values["cmt"][k]) for k in METRICS + ("mid_wall_s",)}
              for m in METHODS[1:]}
    run.results.update(seeds=seed_list, summary=summary, paired_vs_cmt=paired)
    if run.lead:
        print(table(summary, paired), flush=True)
        bar_plot(summary, METHODS, METRICS + ("teacher_nfe_per_pair",), os.path.join(args.out, "cmt_ablations.png"))
    return run.finish(["flow_map_error", "swd"], [])


def table(summary: dict, paired: dict) -> str:
    lines = ["| method | flow-map error | 1-step SWD | 2-step SWD | teacher NFE / pair | mid wall s | vs CMT (95% CI "
             "of the paired difference) |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        cells = [f"{summary[m][k]['mean']:.4g} ± {summary[m][k]['stderr']:.2g}" for k in METRICS]
        cells += [f"{summary[m]['teacher_nfe_per_pair']['mean']:.3g}", f"{summary[m]['mid_wall_s']['mean']:.1f}"]
        vs = "–" if m == "cmt" else "; ".join(f"{k}: {interval_text(p)}" for k, p in paired[m].items())
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {vs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
