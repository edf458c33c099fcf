"""The embedded default: the CMT pipeline end to end on scikit-learn's digits, against ECT at equal budget.

Reproduces, in miniature: pre-train a class-conditional EDM teacher (DDPM++ U-Net) → CMT mid-training on its 16-NFE
DPM-Solver++ trajectories → ECT post-training from the mid-trained EMA; baseline: ECT initialised from the teacher's
weights with the same mid + post budget (the paper's "vanilla ECT" arm, docs/spec/cm.md §8.1). Metrics: Fréchet distance
in the features of a small digits classifier (trained once, cached) and the class histogram of 1- and 2-step
samples, 1,000 of each with balanced labels. Data: the 1,438 training digits of the 8×8 set bundled with
scikit-learn (no download); the 359 held-out ones give the floor, the FD a perfect model would score. CMT's distance
is pseudo-Huber rather than LPIPS: LPIPS needs ImageNet VGG16 weights, which cannot be shipped.

CMT's trajectories are solved before mid-training into <out>/<arm>/trajectories (Config.trajectories_ahead).
Written to --out: results.json (per arm the final metrics; the floor, the teacher's own 16-step FD; with --seeds N
the per-seed values and the paired 95% interval of CMT → ECT − ECT), grids of every evaluation (upscaled ×4,
nearest), metrics_vs_kimg.png, and comparison.png: real | teacher | CMT→ECT 1- and 2-step | ECT 1- and 2-step,
one class per column. --seeds N repeats the two arms over N seeds from the one teacher (trained at --seed).
Sized for: 2 CPU cores, at most 15 minutes at one seed (measured time in the README).

    python recipes/digits_cmt_ect.py [--out runs/digits_cmt_ect] [--kimg-scale 1] [--seed 0] [--seeds N] [--smoke]
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch

from engine.data import digits, digits_source
from engine.data.image_grid import save_labeled_panels, upscale_nearest
from engine.metrics import DigitsMetrics
from engine.objectives import ECT, EDMLoss
from engine.pipelines.digits import (DigitsSettings, backbone, cmt, cmt_solved_ahead, consistency_samples, stage_config,
                                    teacher_samples)
from engine.pipelines.recipe import begin
from engine.pipelines.seed_stats import mean_se, paired_interval, seeds
from engine.precond import CMPrecond, EDMPrecond

ARMS = ("cmt_ect", "ect")


@dataclasses.dataclass
class Config(DigitsSettings):
    # mid : post = 3 : 1, the paper's split (docs/spec/cm.md §8.1: 300k + 100k iterations); 80 kimg in all, the
    # baseline's budget
    mid_kimg: float = 60.0
    post_kimg: float = 20.0
    eval_kimg: float = 20.0
    grid_scale: int = 4                  # grids and the comparison picture, nearest ×4 (8×8 digits are unreadable)
    # CMT's teacher trajectories solved before mid-training, 256 at a time, into <out>/<arm>/trajectories: the same
    # pairs as solving 8 in every step, the stage 112 s instead of 207 (engine/pipelines/digits.py); False solves
    # them inside each step, as the reference does
    trajectories_ahead: bool = True
    default_seeds: int = 1


def smoke(cfg: Config) -> Config:
    return dataclasses.replace(cfg, model_channels=8, pre_kimg=0.512, mid_kimg=0.256, post_kimg=0.256,
                               eval_kimg=0.256, eval_samples=128)


def main(argv=None) -> dict:
    started = begin(__doc__, "digits_cmt_ect", Config(), smoke, argv)
    if started is None:
        return {}
    args, cfg, run = started
    data, metrics = digits_source(cfg.resolution), DigitsMetrics()
    samples = lambda f, steps, n=None: consistency_samples(cfg, f, steps, n)
    evaluate = lambda ema: metrics.few_step(lambda steps: samples(ema, steps))
    grid = lambda ema: upscale_nearest(samples(ema, 2, 100), cfg.grid_scale)
    stage_cfg = lambda name, kimg, lr, seed: stage_config(cfg, name, kimg, lr, seed, eval_kimg=cfg.eval_kimg)

    seed_list = seeds(args, cfg)
    run.plan(*(stage_cfg(n, kimg, lr, args.seed) for n, kimg, lr in (
        ("pre_edm", cfg.pre_kimg, cfg.pre_lr), ("mid_cmt", cfg.mid_kimg, cfg.mid_lr),
        ("post_ect", cfg.post_kimg, cfg.post_lr), ("ect", cfg.mid_kimg + cfg.post_kimg, cfg.post_lr))))
    arm = lambda a, seed: a if len(seed_list) == 1 else f"s{seed}/{a}"
    # Stage 1: the teacher (EDM denoising loss, docs/spec/cm.md §1.1), once for every seed's arms.
    pre = run.stage("teacher", "pre", stage_cfg("pre_edm", cfg.pre_kimg, cfg.pre_lr, args.seed),
                    EDMPrecond(backbone(cfg, cfg.teacher_dropout)), EDMLoss(), data,
                    shared_by=tuple(arm(a, s) for s in seed_list for a in ARMS))
    teacher = pre.ema.eval().requires_grad_(False)
    x_teacher = teacher_samples(cfg, teacher)
    t, floor = metrics(x_teacher), metrics.heldout_floor()
    # the teacher at the floor's footing too: as many samples, against the training digits
    reference = dict(floor=floor, teacher_16step=dict(fd=t["fd"], class_tv=t["tv_data"],
                                                     fd_vs_train_at_floor_n=metrics.against_training(
                                                         x_teacher[:floor["n"]])))
    print(f"[digits_cmt_ect] floor: FD of the {floor['n']} held-out digits against the training digits "
          f"{floor['fd']:.3g}; teacher (16-step DPM-Solver++) FD {t['fd']:.4g}", flush=True)

    ect = lambda: ECT(q=cfg.q)
    evals = dict(evaluate=evaluate, grid=grid)
    finals, values = {}, {a: {k: [] for k in ("fd_1step", "fd_2step")} for a in ARMS}
    for seed in seed_list:
        torch.manual_seed(seed)
        # Arm 1: CMT mid-training from the teacher's weights, then ECT from the mid-trained EMA.
        mid_cfg, solving = stage_cfg("mid_cmt", cfg.mid_kimg, cfg.mid_lr, seed), time.time()
        if cfg.trajectories_ahead:
            mid_objective, mid_data = cmt_solved_ahead(cfg, run, mid_cfg, teacher, data,
                                                       os.path.join(args.out, arm("cmt_ect", seed), "trajectories"))
        else:
            mid_objective, mid_data = cmt(cfg, teacher), data
        solving = time.time() - solving
        mid = run.stage(arm("cmt_ect", seed), "mid", mid_cfg, CMPrecond(backbone(cfg, cfg.student_dropout)),
                        mid_objective, mid_data, init=teacher, **evals)
        run.results["runs"][arm("cmt_ect", seed)]["wall_s"] += solving     # the arm's time includes its solves
        run.results["runs"][arm("cmt_ect", seed)]["stages"]["mid"]["trajectories_wall_s"] = solving
        post = run.stage(arm("cmt_ect", seed), "post", stage_cfg("post_ect", cfg.post_kimg, cfg.post_lr, seed),
                         CMPrecond(backbone(cfg, cfg.student_dropout)), ect(), data, init=mid.ema, **evals)
        # Arm 2: ECT from the teacher's weights with the same mid + post budget.
        base = run.stage(arm("ect", seed), "post", stage_cfg("ect", cfg.mid_kimg + cfg.post_kimg, cfg.post_lr, seed),
                         CMPrecond(backbone(cfg, cfg.student_dropout)), ect(), data, init=teacher, **evals)
        for a, res in (("cmt_ect", post), ("ect", base)):
            m = res.eval_history[-1]
            run.record_metrics(arm(a, seed), one_step=dict(fd=m["fd_1step"], class_tv=m["class_tv_1step"]),
                               two_step=dict(fd=m["fd_2step"], class_tv=m["class_tv_2step"]))
            for k in values[a]:
                values[a][k].append(m[k])
            finals.setdefault(a, res.ema)       # the first seed's models go into the picture
    run.results.update(reference=reference, seeds=seed_list)
    if len(seed_list) > 1:
        run.results["summary"] = {a: {k: dict(zip(("mean", "stderr"), mean_se(v)), per_seed=v)
                                      for k, v in values[a].items()} for a in ARMS}
        run.results["paired_cmt_ect_minus_ect"] = {k: paired_interval(values["cmt_ect"][k], values["ect"][k])
                                                   for k in values["ect"]}
    if run.lead:
        comparison(cfg, samples, lambda n: teacher_samples(cfg, teacher, n), finals,
                   os.path.join(args.out, "comparison.png"))
    return run.finish(["fd", "class_tv"], ["fd_1step", "fd_2step"])


def comparison(cfg, samples, teacher_samples, finals: dict, path: str) -> None:
    """real | teacher | CMT→ECT 1-, 2-step | ECT 1-, 2-step: 6 rows × 10 columns each, column k the digit k (the
    real panel: the first training digits of each class), upscaled for viewing."""
    real, y = digits(cfg.resolution, split="train")
    real = torch.stack([real[y == k][r] for r in range(6) for k in range(10)])
    n = 60
    panels = [("real (training digits)", real), ("teacher, 16-step DPM-Solver++", teacher_samples(n))]
    for a, name in (("cmt_ect", "CMT->ECT"), ("ect", "ECT")):
        panels += [(f"{name} 1-step", samples(finals[a], 1, n)), (f"{name} 2-step", samples(finals[a], 2, n))]
    save_labeled_panels([(label, upscale_nearest(x, cfg.grid_scale)) for label, x in panels], path, ncols=10,
                        per_row=2)


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
