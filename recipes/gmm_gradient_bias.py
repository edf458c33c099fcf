"""Theorem 5.1 of the CMT paper, measured: at the parameters θ₀ post-training starts from, how far is the gradient
of the consistency objective from the oracle's? Four initialisations, on the analytic Gaussian mixture.

Reproduces: the paper's §5 / App. F.4 claim that a CMT-initialised student has squared gradient bias
B(θ₀) = ‖∇L_or(θ₀) − ∇L_CM(θ₀)‖² of order (ε + Δt²)² (ε: how far mid-training left the student from the flow map;
the bias itself O(ε + Δt²)), while a diffusion-initialised one carries an extra term that does not vanish as
Δt → 0. Definitions, estimator and the gap: engine/metrics/gradient_bias.py — squared distance, unit weight, ECT's
log-normal t (P_mean −1.1, P_std 2.0) and ECT's relative gap r = t(1 − Δt(1 + 8 sigmoid(−t))), Δt = 1/q; B is
estimated without the Var/n bias of the plug-in (inner products of independent batch means).

Per seed (a seed changes the initialisations, the data order, the noise and the probe's draws; the mixture and its
training set are fixed):
  diffusion  EDM denoising pre-training (EDMLoss) of the MLP, taken into the consistency wrapper as ECT does
  cmt        CMT mid-training from the diffusion weights with the exact teacher (16-step DPM-Solver++ trajectories)
  cd         consistency distillation (ECD, one Heun step of the exact teacher) from the diffusion weights, the
             same budget as cmt
  random     a fresh initialisation
and for each, B at every Δt, ‖∇L_or‖² (the Δt → 0 limit of B: ∇L_CM vanishes with the gap) and the flow-map error
ε² = E‖f − Ψ‖². results.json: {"gradient_bias": {scheme: [mean over seeds per Δt]}, "dt": [...], "stderr":
{scheme: [...]}, "per_seed", "paired" (95% t-intervals of B_other − B_cmt per Δt), "paired_ratio" (the same on
ln B, as ratios), "excess_over_limit" (B(Δt) − ‖∇L_or‖²) and "slopes" (log-log, of B and of the excess),
"flow_map_error", "oracle_gradient_norm"}; gradient_bias.png plots B against Δt, log-log, with the theorem's
shapes drawn in.
Sized for: 2 CPU cores, about 2 minutes a seed (5 seeds by default: 11 minutes).

    python recipes/gmm_gradient_bias.py [--seeds 5] [--out runs/gmm_gradient_bias] [--smoke]
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os

import torch

from engine.metrics import flow_map_error
from engine.metrics.gradient_bias import BiasProbe
from engine.objectives import CMT, ECD, ECT, squared_l2
from engine.pipelines.gmm import (MixtureSettings, backbone, diffusion_weights, mixture_problem, pre_stage_config,
                                  stage_config)
from engine.pipelines.recipe import begin
from engine.pipelines.seed_stats import mean_se, paired_interval, seeds
from engine.precond import CMPrecond
from engine.training.loop import initialise

SCHEMES = ("cmt", "diffusion", "cd", "random")


@dataclasses.dataclass
class Config(MixtureSettings):
    mid_kimg: float = 100.0              # CMT mid-training, and CD for the same budget
    cd_q: float = 256.0                  # CD's gap while it trains (ECT's mapping, Δt = 1/256)
    dts: tuple = (1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256, 1 / 512, 1 / 1024)
    probe_batches: int = 16              # 8 independent pairs of batch means
    probe_batch_size: int = 512
    P_mean: float = -1.1
    P_std: float = 2.0


def smoke(cfg: Config) -> Config:
    return dataclasses.replace(cfg, train_samples=2000, hidden=32, blocks=1, pre_kimg=0.512, mid_kimg=0.256,
                               dts=(1 / 16, 1 / 64), probe_batches=4, probe_batch_size=64,
                               eval_sigmas=(0.1, 2.0), eval_samples=200, default_seeds=2)


def main(argv=None) -> dict:
    started = begin(__doc__, "gmm_gradient_bias", Config(), smoke, argv)
    if started is None:
        return {}
    args, cfg, run = started
    mid_cfg = lambda name, seed: stage_config(cfg, name, cfg.mid_kimg, cfg.mid_lr, seed)
    # every stage's budget at this --kimg-scale, before the first one trains (in the order they train)
    run.plan(*(c for seed in seeds(args, cfg)
               for c in (pre_stage_config(cfg, seed), mid_cfg("mid_cmt", seed), mid_cfg("mid_cd", seed))))
    gm, data = mixture_problem(cfg)

    per_seed = {k: [] for k in ("bias", "bias_se", "oracle", "flow_map_error")}
    for seed in seeds(args, cfg):
        arms = {s: f"s{seed}/{s}" for s in SCHEMES}
        pre = diffusion_weights(run, cfg, data, [arms["diffusion"], arms["cmt"], arms["cd"]], seed)
        mid = run.stage(arms["cmt"], "mid", mid_cfg("mid_cmt", seed),
                        CMPrecond(backbone(cfg)), CMT(gm, nfe=cfg.nfe, distance=squared_l2,
                                                      trajectories_per_batch=cfg.trajectories_per_batch),
                        data, init=pre.ema)
        cd = run.stage(arms["cd"], "mid", mid_cfg("mid_cd", seed),
                       CMPrecond(backbone(cfg)), ECD(gm, solver="heun", q=cfg.cd_q), data, init=pre.ema)
        torch.manual_seed(10_000 + seed)
        starts = dict(cmt=mid.ema, diffusion=initialise(CMPrecond(backbone(cfg)), pre.ema), cd=cd.ema,
                      random=CMPrecond(backbone(cfg)))
        probe = BiasProbe(gm, cfg.probe_batches, cfg.probe_batch_size, cfg.P_mean, cfg.P_std,
                          generator=torch.Generator().manual_seed(100 + seed))
        row = {k: {} for k in per_seed}
        for scheme, start in starts.items():
            f = copy.deepcopy(start).double().eval().requires_grad_(True)
            fm = flow_map_error(f, gm, cfg.eval_sigmas, n=cfg.eval_samples, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(7 + seed))
            row["flow_map_error"][scheme] = fm.mean
            row["oracle"][scheme] = probe.oracle_gradient_norm(f)[0]
            biases = [probe.bias(f, ECT(q=1 / dt, P_mean=cfg.P_mean, P_std=cfg.P_std).t_to_r) for dt in cfg.dts]
            row["bias"][scheme] = [b for b, _ in biases]
            row["bias_se"][scheme] = [se for _, se in biases]
            print(f"[gmm_gradient_bias] seed {seed} {scheme:9s} ε² = {fm.mean:.3e}  ‖∇L_or‖² = "
                  f"{row['oracle'][scheme]:.3e}  B(Δt) = " + " ".join(f"{b:.2e}" for b, _ in biases), flush=True)
        for k in per_seed:
            per_seed[k].append(row[k])

    out = summarise(cfg, seeds(args, cfg), per_seed)
    run.results.update(out)
    if run.lead:
        plot(out, os.path.join(args.out, "gradient_bias.png"))
        print(verdict_table(out), flush=True)
    return run.finish([], [])


def summarise(cfg: Config, seed_list: list[int], per_seed: dict) -> dict:
    dts = list(cfg.dts)
    bias, stderr, paired, slopes, excess, excess_stderr, excess_slopes, ratios = {}, {}, {}, {}, {}, {}, {}, {}
    for s in SCHEMES:
        cols = [[row[s][i] for row in per_seed["bias"]] for i in range(len(dts))]
        stats = [mean_se(c) for c in cols]
        bias[s] = [m for m, _ in stats]
        # one seed: the standard error over the probe's batch pairs
        stderr[s] = [se if len(seed_list) > 1 else per_seed["bias_se"][0][s][i] for i, (_, se) in enumerate(stats)]
        slopes[s] = _loglog_slope(dts, bias[s])
        # B(Δt) − ‖∇L_or‖²: what the gap adds to the Δt → 0 limit, on the same probe draws (common random numbers)
        ex = [[row[s][i] - o[s] for row, o in zip(per_seed["bias"], per_seed["oracle"])] for i in range(len(dts))]
        excess[s] = [mean_se(c)[0] for c in ex]
        excess_stderr[s] = [mean_se(c)[1] for c in ex]
        excess_slopes[s] = _loglog_slope(dts, [abs(v) for v in excess[s]])
        if s != "cmt":
            paired[f"{s}_minus_cmt"] = [paired_interval([row[s][i] for row in per_seed["bias"]],
                                                        [row["cmt"][i] for row in per_seed["bias"]])
                                        for i in range(len(dts))]
            # B spans orders of magnitude between seeds: the same test on ln B (a ratio; its interval exp'd)
            logs = [paired_interval([_log(row[s][i]) for row in per_seed["bias"]],
                                    [_log(row["cmt"][i]) for row in per_seed["bias"]]) for i in range(len(dts))]
            ratios[f"{s}_over_cmt"] = [dict(p, ratio=math.exp(p["mean"]), low=None if p["low"] is None else
                                            math.exp(p["low"]), high=None if p["high"] is None else math.exp(p["high"]))
                                       for p in logs]
    scalar = lambda key: {s: dict(zip(("mean", "stderr"), mean_se([row[s] for row in per_seed[key]])))  # noqa: E731
                          for s in SCHEMES}
    return dict(dt=dts, seeds=seed_list, gradient_bias=bias, stderr=stderr, paired=paired, paired_ratio=ratios,
                slopes=slopes,
                excess_over_limit=excess, excess_stderr=excess_stderr, excess_slopes=excess_slopes,
                flow_map_error=scalar("flow_map_error"), oracle_gradient_norm=scalar("oracle"),
                per_seed=dict(bias=per_seed["bias"], bias_se=per_seed["bias_se"], oracle=per_seed["oracle"],
                              flow_map_error=per_seed["flow_map_error"]),
                definition=dict(distance="squared L2, unit weight", t="ECT log-normal, clamped to [0.002, 80]",
                                gap="ECT's relative gap r = t(1 - dt(1 + 8 sigmoid(-t))), dt = 1/q",
                                estimator="mean of inner products of paired independent batch means"))


def _log(v: float) -> float:
    """ln of an estimate of B (unbiased, so it may come out ≤ 0 when B is below its noise): floored at 1e-300."""
    return math.log(max(v, 1e-300))


def _loglog_slope(x, y) -> float | None:
    """Least-squares slope of ln y against ln x over the positive y (None with fewer than two)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if b > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def verdict_table(out: dict) -> str:
    lines = ["| Δt | " + " | ".join(f"B {s}" for s in SCHEMES) + " | diffusion − cmt (95% CI) | cd − cmt | "
             "random − cmt | B ratio to cmt (95% CI): diffusion, cd, random |", "|" + "---|" * (len(SCHEMES) + 5)]
    for i, dt in enumerate(out["dt"]):
        cells = [f"{out['gradient_bias'][s][i]:.3g} ± {out['stderr'][s][i]:.2g}" for s in SCHEMES]
        pairs = []
        for k in ("diffusion_minus_cmt", "cd_minus_cmt", "random_minus_cmt"):
            p = out["paired"][k][i]
            said = {"a < b": "cmt higher", "a > b": "cmt lower", "tie": "tie"}.get(p["verdict"], p["verdict"])
            pairs.append(said if p["low"] is None else f"{p['mean']:.3g} [{p['low']:.3g}, {p['high']:.3g}] ({said})")
        ratio = []
        for k in ("diffusion_over_cmt", "cd_over_cmt", "random_over_cmt"):
            p = out["paired_ratio"][k][i]
            ratio.append(f"{p['ratio']:.3g}" if p["low"] is None
                         else f"{p['ratio']:.3g} [{p['low']:.3g}, {p['high']:.3g}]")
        lines.append(f"| 1/{round(1 / dt)} | " + " | ".join(cells + pairs + ["; ".join(ratio)]) + " |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dts = out["dt"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for s in SCHEMES:
        ys, es = out["gradient_bias"][s], out["stderr"][s]
        ok = [i for i, y in enumerate(ys) if y > 0]
        ax.errorbar([dts[i] for i in ok], [ys[i] for i in ok], yerr=[0 if es[i] != es[i] else es[i] for i in ok],
                    marker="o", ms=4, capsize=2, label=f"{s} (slope {out['slopes'][s]:.2f})"
                    if out["slopes"][s] is not None else s)
        g = out["oracle_gradient_norm"][s]["mean"]
        ax.axhline(g, ls=":", lw=0.8, color=ax.lines[-1].get_color())
    # the theorem's shape for CMT: B = (ε + c·Δt²)², anchored at CMT's smallest and largest Δt
    c = out["gradient_bias"]["cmt"]
    if c[0] > 0 and c[-1] > 0:
        eps, big = math.sqrt(c[-1]), math.sqrt(c[0])
        coef = max(big - eps, 0.0) / dts[0] ** 2
        grid = [dts[-1] * (dts[0] / dts[-1]) ** (k / 50) for k in range(51)]
        ax.plot(grid, [(eps + coef * d ** 2) ** 2 for d in grid], "k--", lw=1,
                label="(ε + c·Δt²)², the theorem's shape for CMT")
    for s in SCHEMES:
        ys = [abs(v) for v in out["excess_over_limit"][s]]
        if any(y > 0 for y in ys):
            sl = out["excess_slopes"][s]
            ax2.plot(dts, ys, marker="o", ms=4, label=s + ("" if sl is None else f" (slope {sl:.2f})"))
    ex = [abs(v) for v in out["excess_over_limit"]["cmt"]]
    if ex[0] > 0:
        ax2.plot(dts, [ex[0] * (d / dts[0]) ** 2 for d in dts], "k--", lw=1, label="∝ Δt² (through CMT's largest Δt)")
        ax2.plot(dts, [ex[0] * d / dts[0] for d in dts], "k:", lw=1, label="∝ Δt")
    ax2.set_ylabel("|B(Δt) − ‖∇L_or‖²|: what the gap adds")
    ax2.set_title("Excess over the Δt → 0 limit, same draws", fontsize=9)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("Δt (ECT's relative gap, 1/q)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    ax.set_ylabel("B(θ₀) = ‖∇L_or − ∇L_CM‖²")
    ax.set_title("Gradient bias at the post-training start (dotted: ‖∇L_or‖², the Δt → 0 limit)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
