"""Why CMT → Mean Flow loses to Mean Flow on digits (recipes/digits_cmt_mf.py): the post-training candidates,
measured over seeds against the Mean Flow baseline at the same budget.

The setting is digits_cmt_mf.py's (its Config: the small MF teacher, the larger DiT student, 105 kimg of CMT pairs
then 35 kimg of Mean Flow, against Mean Flow from random weights for 140 kimg). The teacher and the CMT
mid-training are trained once per run, at --seed: they are the given of the question, which is about what follows
them. Per seed (initialisations, data order and training noise of the post-training and the baseline) the arms are
  mf              Mean Flow from random weights for mid + post kimg (the baseline)
  mf_restarted    the control: the baseline's own EMA after mid_kimg, then post_kimg of Mean Flow with a fresh
                  EMA and optimizer — cmt_mf's stage boundary without CMT (the first mid_kimg are the baseline's)
  cmt_mf          digits_cmt_mf.py's arm: CMT, then Mean Flow at the same rate with a fresh EMA and optimizer
  ema_continued   the same mid-training; post-training's power EMA continues over the mid-training's images
                  instead of restarting at the boundary (StageConfig.ema_continue_kimg)
and, with `variants` set to ARMS (heavy: docs/validation.md §4 has them at one seed),
  continued_warmup  the EMA continued and the rate ramped up linearly over `warmup_kimg` (a fresh Adam's first
                  steps are full-size)
  low_lr          post-training at `low_post_lr`, a fine-tuning rate
  linear_decay    post-training's rate decayed linearly to 0
  long_post       CMT for `long_post_mid_kimg`, then Mean Flow for the rest of the budget (its own mid-training)
  all36           CMT on the `all36` pair rule (adjacent pairs too), then cmt_mf's post-training
Besides the arms' final 1- and 2-step FD, results.json holds what bounds a mid-trained student: the teacher's own
1-, 2- and 8-step FD (its 8-step samples are the endpoints the CMT pairs target) and the FD after mid-training.
Each arm is compared with mf and with cmt_mf by the 95% t-interval of the paired difference over seeds (an
interval containing 0 is a tie); post_training.png shows the arms per seed.
Sized for: 2 CPU cores, 3 seeds at the defaults (measured time in docs/validation.md).

    python recipes/digits_mf_post_training.py [--seeds 3] [--out runs/digits_mf_post_training] [--smoke]
"""
from __future__ import annotations

import dataclasses
import os

import torch

from engine.checkpoints.releases import load_safetensors_network
from engine.data import digits_source
from engine.metrics import DigitsMetrics
from engine.networks import DiT
from engine.objectives import CMTMeanFlow, MeanFlow
from engine.pipelines.digits import DigitsMeanFlowSettings, mean_flow_smoke
from engine.pipelines.gmm import bar_plot
from engine.pipelines.recipe import begin
from engine.pipelines.seed_stats import mean_se, paired_interval, seed_table, seeds
from engine.solvers import mean_flow_uniform
from engine.training.ema import parse_snapshot_name
from engine.training.stage_config import StageConfig

ARMS = ("mf", "mf_restarted", "cmt_mf", "ema_continued", "continued_warmup", "low_lr", "linear_decay", "long_post",
        "all36")
METRICS = ("fd_1step", "fd_2step")


@dataclasses.dataclass
class Config(DigitsMeanFlowSettings):
    # the candidates, on digits_cmt_mf.py's settings
    variants: tuple = ("mf", "mf_restarted", "cmt_mf", "ema_continued")
    post_eval_kimg: float | None = None  # also evaluate the post-training stages every this many kimg
    warmup_kimg: float = 10.0            # continued_warmup's linear ramp of the post-training rate
    low_post_lr: float = 1e-4
    long_post_mid_kimg: float = 70.0
    default_seeds: int = 3


def smoke(cfg: Config) -> Config:
    return dataclasses.replace(mean_flow_smoke(cfg), long_post_mid_kimg=0.112, warmup_kimg=0.064, variants=ARMS,
                               default_seeds=2)


def main(argv=None) -> dict:
    started = begin(__doc__, "digits_mf_post_training", Config(), smoke, argv)
    if started is None:
        return {}
    args, cfg, run = started
    unknown = sorted(set(cfg.variants) - set(ARMS))
    if unknown or "mf" not in cfg.variants or "cmt_mf" not in cfg.variants:
        raise ValueError(f"variants must include 'mf' and 'cmt_mf' and be among {ARMS}; got {cfg.variants}")
    arms = [a for a in ARMS if a in cfg.variants]

    def stage_cfg(name, kimg, seed, batch=cfg.batch_size, lr=cfg.lr, **kw):
        settings = dict(optimizer="adam", betas=(0.9, 0.95), lr_schedule="constant", ema_beta=None, ema_std=cfg.ema_std,
                        log_kimg=kimg / 3, ckpt_kimg=kimg, seed=seed)
        return StageConfig(name=name, total_kimg=kimg, batch_size=batch, lr=lr, **{**settings, **kw})

    pairs = cfg.trajectories_per_batch * cfg.pairs_per_trajectory
    total = cfg.mid_kimg + cfg.post_kimg
    seed_list = seeds(args, cfg)
    # the mid-training each CMT arm starts from: (key, pair rule, kimg), trained once (at --seed) and shared by every
    # seed's arms that use it: the seeds repeat the post-training and the baseline, the question here
    mid_of = {a: dict(long_post=("long", "nonadjacent28", cfg.long_post_mid_kimg),
                      all36=("all36", "all36", cfg.mid_kimg)).get(a, ("nonadjacent28", "nonadjacent28", cfg.mid_kimg))
              for a in arms if a not in ("mf", "mf_restarted")}
    mid_cfgs = {key: stage_cfg(f"mid_{key}", kimg, args.seed, batch=pairs)
                for key, _, kimg in sorted(set(mid_of.values()))}
    every = dict(eval_kimg=cfg.post_eval_kimg) if cfg.post_eval_kimg else {}

    def post_cfg(a: str, seed: int) -> StageConfig:
        """Arm `a`'s post-training (for mf: its whole run) at `seed`."""
        if a == "mf":
            # with the control: the baseline's EMA is also written at mid_kimg (a tracked EMA of the same σ_rel, so
            # the same average)
            snap = dict(snapshot_emas=(cfg.ema_std,), snapshot_kimg=cfg.mid_kimg) if "mf_restarted" in arms else {}
            return stage_cfg("mf", total, seed, **snap)
        if a == "mf_restarted":
            return stage_cfg("post_mf_restarted", cfg.post_kimg, seed, **every)
        mid_kimg = mid_of[a][2]
        kw = dict(every)
        if a in ("ema_continued", "continued_warmup"):
            kw["ema_continue_kimg"] = mid_kimg
        if a == "continued_warmup":
            kw["lr_rampup_kimg"] = cfg.warmup_kimg
        if a == "linear_decay":
            kw["lr_schedule"] = "linear"
        lr = cfg.low_post_lr if a == "low_lr" else cfg.lr
        return stage_cfg(f"post_{a}", total - mid_kimg, seed, lr=lr, **kw)

    # every stage's budget at this --kimg-scale, before the first one trains
    pre_cfg = stage_cfg("pre_mf", cfg.pre_kimg, args.seed)
    run.plan(pre_cfg, *mid_cfgs.values(),
             *(post_cfg(a, seed) for seed in seed_list for a in arms))
    data, metrics = digits_source(cfg.resolution), DigitsMetrics()
    dit = lambda width, depth: DiT(input_size=cfg.resolution, patch_size=cfg.patch, in_channels=1,
                                   hidden_size=width, depth=depth, num_heads=cfg.heads, num_classes=10)

    def fd(net, steps: int) -> float:
        g = torch.Generator().manual_seed(1234)
        z = torch.randn(cfg.eval_samples, 1, cfg.resolution, cfg.resolution, generator=g)
        y = torch.arange(cfg.eval_samples) % 10
        with torch.no_grad():
            return metrics(mean_flow_uniform(net, z, steps, y).clamp(-1, 1))["fd"]

    evaluate = lambda net: dict(fd_1step=fd(net, 1), fd_2step=fd(net, 2))

    mf = lambda: MeanFlow(mu=cfg.mu, sigma=cfg.sigma)
    torch.manual_seed(args.seed)
    pre = run.stage("teacher", "pre", pre_cfg, dit(cfg.teacher_width, cfg.teacher_depth), mf(), data)
    teacher = pre.ema.eval().requires_grad_(False)
    teacher_fd = dict(fd_1step=fd(teacher, 1), fd_2step=fd(teacher, 2), fd_8step=fd(teacher, 8))
    print("[digits_mf_post_training] teacher " + "  ".join(f"{k} {v:.3g}" for k, v in teacher_fd.items()),
          flush=True)

    def cmt(rule="nonadjacent28"):
        return CMTMeanFlow(teacher, teacher_kind="mf", pair_rule=rule, trajectories_per_batch=cfg.trajectories_per_batch,
                           pairs_per_trajectory=cfg.pairs_per_trajectory)

    values = {a: {k: [] for k in METRICS} for a in arms}
    after_mid = {}
    post_eval = dict(evaluate=evaluate) if cfg.post_eval_kimg else {}
    mids = {}
    for key, rule, kimg in sorted(set(mid_of.values())):
        users = tuple(f"s{s}/{b}" for s in seed_list for b in arms if b in mid_of and mid_of[b][0] == key)
        torch.manual_seed(args.seed)
        res = run.stage("mid", "mid", mid_cfgs[key], dit(cfg.student_width, cfg.student_depth), cmt(rule), data,
                        shared_by=users)
        mids[key] = res.ema
        after_mid[key] = evaluate(res.ema)
    for seed in seed_list:
        torch.manual_seed(seed)
        student = lambda: dit(cfg.student_width, cfg.student_depth)
        for a in arms:
            if a == "mf":
                final = run.stage(f"s{seed}/mf", "post", post_cfg(a, seed), student(), mf(), data).ema
            elif a == "mf_restarted":
                init = _snapshot_at(args.out, seed, cfg.mid_kimg * args.kimg_scale)
                final = run.stage(f"s{seed}/{a}", "post", post_cfg(a, seed), student(), mf(), data, init=init,
                                  **post_eval).ema
            else:
                final = run.stage(f"s{seed}/{a}", "post", post_cfg(a, seed), student(), mf(), data,
                                  init=mids[mid_of[a][0]], **post_eval).ema
            m = evaluate(final)
            for k in METRICS:
                values[a][k].append(m[k])
            print(f"[digits_mf_post_training] seed {seed} {a:13s} fd_1step {m['fd_1step']:.4g}  "
                  f"fd_2step {m['fd_2step']:.4g}", flush=True)

    summary = {a: {k: dict(zip(("mean", "stderr"), mean_se(values[a][k])), per_seed=values[a][k]) for k in METRICS}
               for a in arms}
    paired = {ref: {a: {k: paired_interval(values[a][k], values[ref][k]) for k in METRICS} for a in arms if a != ref}
              for ref in ("mf", "cmt_mf")}
    run.results.update(seeds=seed_list, teacher=teacher_fd, after_mid=after_mid, summary=summary, paired=paired)
    if run.lead:
        print(seed_table(summary, arms, dict(fd_1step="1-step FD", fd_2step="2-step FD"), "stderr",
                         [("vs mf (95% CI of the paired difference)", "mf", paired["mf"]),
                          ("vs cmt_mf", "cmt_mf", paired["cmt_mf"])]), flush=True)
        bar_plot(summary, arms, METRICS, os.path.join(args.out, "post_training.png"))
    return run.finish([], [])


def _snapshot_at(out: str, seed: int, kimg: float) -> torch.nn.Module:
    """The mf baseline's power EMA as written at its first snapshot at or after `kimg` (engine/training/loop.py)."""
    folder = os.path.join(out, f"s{seed}", "mf", "mf", "snapshots")
    found = sorted((parse_snapshot_name(n)[1], n) for n in os.listdir(folder)
                   if parse_snapshot_name(n) and parse_snapshot_name(n)[1] >= kimg * 1000)
    if not found:
        raise FileNotFoundError(f"{folder}: no snapshot of the mf baseline at {kimg} kimg")
    return load_safetensors_network(os.path.join(folder, found[0][1]))


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
