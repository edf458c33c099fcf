"""What the Gaussian-mixture validation recipes share (recipes/gmm_gradient_bias.py, gmm_mid_training.py,
gmm_cmt_ablations.py; docs/validation.md; `evaluate` serves recipes/gmm_cmt_ect.py too): one fixed mixture and training
set for every seed, the MLP student, the
stage settings, and the evaluation of a trained flow map against the exact flow.

The recipes' configurations extend `MixtureSettings`, the fields read here."""
from __future__ import annotations

import copy
import dataclasses

import torch

from engine.data import GaussianMixture
from engine.data.sampler import TensorSource
from engine.metrics import flow_map_error, sliced_wasserstein
from engine.networks import build_network
from engine.objectives import EDMLoss
from engine.precond import EDMPrecond
from engine.solvers import consistency_sampler
from engine.training.stage_config import StageConfig

METRICS = ("flow_map_error", "swd_1step", "swd_2step")


@dataclasses.dataclass
class MixtureProblem:
    """The mixture problem, the MLP student, CMT's teacher solve and the evaluation: what every mixture recipe
    shares (recipes/gmm_*.py derive their settings from it, or from `MixtureSettings`)."""
    components: int = 8
    component_std: float = 0.1
    train_samples: int = 50_000          # a fixed training set drawn once from the mixture
    hidden: int = 256
    blocks: int = 4
    batch_size: int = 128
    # EDM2 power-function EMA (σ_rel) rather than the paper's constant β: a 1,200-step stage with β = 0.999 would
    # end with 30% of its initial weights still in the average (the loop warns about this). A stage's result is
    # its EMA.
    ema_std: float = 0.05
    nfe: int = 16                        # CMT teacher: 16-step 3rd-order multistep DPM-Solver++ (docs/spec/cm.md §2)
    trajectories_per_batch: int = 8      # 8 trajectories × 16 states = 128 pairs per step
    mid_lr: float = 5e-4
    mid_t: float = 0.77569               # 2-step sampling point (docs/spec/cm.md §3.5)
    eval_sigmas: tuple = (0.01, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)
    eval_samples: int = 2000


@dataclasses.dataclass
class MixtureSettings(MixtureProblem):
    """The validation recipes' settings: the problem above, one mixture for every seed, the pre-training that gives
    the diffusion weights, and the number of seeds (each recipe adds its own fields)."""
    mixture_seed: int = 0                # one problem and training set for every seed (paired comparisons)
    pre_kimg: float = 200.0              # EDM pre-training of the diffusion weights
    pre_lr: float = 1e-3
    default_seeds: int = 5


def mixture_problem(cfg) -> tuple[GaussianMixture, TensorSource]:
    """The mixture and its training set, the same for every seed (so differences between seeds are paired)."""
    gm = GaussianMixture.random(cfg.components, (2,), std=cfg.component_std, seed=cfg.mixture_seed)
    data = gm.sample(cfg.train_samples, generator=torch.Generator().manual_seed(cfg.mixture_seed)).float()
    return gm, TensorSource(data)


def backbone(cfg):
    return build_network("gmm-mlp", hidden_channels=cfg.hidden, num_blocks=cfg.blocks)


def stage_config(cfg, name: str, kimg: float, lr: float, seed: int) -> StageConfig:
    """RAdam with a linear decay and EDM2's power EMA (σ_rel = ema_std), one checkpoint at the end."""
    return StageConfig(name=name, total_kimg=kimg, batch_size=cfg.batch_size, lr=lr, optimizer="radam",
                       lr_schedule="linear", ema_beta=None, ema_std=cfg.ema_std, log_kimg=kimg / 5, ckpt_kimg=kimg,
                       seed=seed)


def pre_stage_config(cfg, seed: int) -> StageConfig:
    """The seed's EDM pre-training stage (`diffusion_weights`), for the recipes' Run.plan too."""
    return stage_config(cfg, "pre_edm", cfg.pre_kimg, cfg.pre_lr, seed)


def diffusion_weights(run, cfg, data, arms: list[str], seed: int):
    """The seed's EDM pre-training of the MLP (the diffusion weights the arms start from), trained under the first
    arm's directory and recorded as the 'pre' stage of every arm in `arms`."""
    torch.manual_seed(seed)
    return run.stage(arms[0], "pre", pre_stage_config(cfg, seed), EDMPrecond(backbone(cfg)), EDMLoss(), data,
                     shared_by=tuple(arms))


def evaluate(gm: GaussianMixture, cfg, net) -> dict:
    """A flow map's quality, in float64 on a copy: the flow-map error E‖f − Ψ‖² (mean over cfg.eval_sigmas, each
    on eval_samples/4 draws) and the sliced Wasserstein distance of 1- and 2-step samples (eval_samples, 2-step
    point cfg.mid_t) to as many mixture samples; fixed generators, so models are compared on the same draws."""
    f = copy.deepcopy(net).double().eval()
    fm = flow_map_error(f, gm, cfg.eval_sigmas, n=cfg.eval_samples // 4, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(7))
    ref = gm.sample(cfg.eval_samples, generator=torch.Generator().manual_seed(4321))

    def swd(steps: int) -> float:
        z = torch.randn(cfg.eval_samples, 2, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
        x = consistency_sampler(f, z, (cfg.mid_t,) if steps == 2 else (), generator=torch.Generator().manual_seed(99))
        return sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(5))
    return dict(flow_map_error=fm.mean, swd_1step=swd(1), swd_2step=swd(2))


def bar_plot(summary: dict, arms, keys, path: str, spread: str = "stderr") -> None:
    """One panel per key: the arms' means with their `spread` ('stderr' or 'std') and each seed as a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        means = [summary[a][k]["mean"] for a in arms]
        bars = [summary[a][k][spread] for a in arms]
        ax.bar(range(len(arms)), means, yerr=[0 if b != b else b for b in bars], capsize=3,
               color=[f"C{i}" for i in range(len(arms))])
        for i, a in enumerate(arms):
            ax.plot([i] * len(summary[a][k]["per_seed"]), summary[a][k]["per_seed"], "k.", ms=4)
        ax.set_xticks(range(len(arms)), arms, rotation=20 if max(map(len, arms)) > 8 else 0, ha="right"
                      if max(map(len, arms)) > 8 else "center", fontsize=8)
        ax.set_title(f"{k.replace('_', ' ')} (mean ± {'s.e.' if spread == 'stderr' else 'std'}, dots: seeds)",
                     fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
