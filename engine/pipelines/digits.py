"""What the EDM-family digits recipes share (recipes/digits_cmt_ect.py, the main job, and
recipes/digits_mid_training.py): the class-conditional DDPM++ teacher and students, their stage settings, and how
their samples are drawn for the metrics, the grids and the comparison picture.

The recipes' configurations extend `DigitsSettings`, the fields read here. Samples use fixed generators and balanced
labels (sample i is digit i mod 10), so models are compared on the same noise and classes."""
from __future__ import annotations

import dataclasses
import math

import torch

from engine import dist
from engine.networks import build_network
from engine.objectives import CMT, CachedCMT, pseudo_huber
from engine.schedules import logsnr_sigmas
from engine.solvers import consistency_sampler, dpm_solver_pp
from engine.teacher.trajectory_cache import StoreSpec, TrajectorySource, write_store
from engine.training.stage_config import StageConfig


@dataclasses.dataclass
class DigitsSettings:
    resolution: int = 8
    model_channels: int = 32             # digits-ddpmpp: DDPM++ with channel_mult [1, 2], attention at 4×4
    # Class-conditional (ten digits): at the same 160 kimg the unconditional teacher's 16-step samples scored FD
    # 75.6, the conditional one's 26.2 (docs/validation.md §5)
    label_dim: int = 10
    teacher_dropout: float = 0.0
    student_dropout: float = 0.0
    batch_size: int = 128
    pre_kimg: float = 320.0              # EDM pre-training of the teacher
    pre_lr: float = 2e-3                 # 5e-3 diverged (docs/validation.md §5)
    # EDM2 power-function EMA (σ_rel) in every stage, not the paper's constant β: these stages are 250–2500 steps,
    # and β = 0.999 over 250 steps would still be 78% the initial weights at the end (the loop warns about this).
    ema_std: float = 0.05
    nfe: int = 16                        # CMT teacher: 16-step multistep DPM-Solver++ (docs/spec/cm.md §2)
    trajectories_per_batch: int = 8      # 8 trajectories × 16 states = 128 pairs
    mid_lr: float = 2e-4                 # docs/spec/cm.md §8.1: RAdam 2e-4, linear decay
    post_lr: float = 1e-4                # docs/spec/cm.md §8.1: RAdam 1e-4, linear decay
    q: float = 256.0                     # ECT Δt = 1/q, constant stage
    mid_t: float = 0.77569               # 2-step sampling point after mid-training (docs/spec/cm.md §3.5)
    eval_samples: int = 1000



@dataclasses.dataclass
class DigitsMeanFlowSettings:
    """The Mean Flow pipeline on the digits (SiT teacher → CMT-MF → Mean Flow, against Mean Flow alone):
    recipes/digits_cmt_mf.py and its post-training study recipes/digits_mf_post_training.py derive from it."""
    resolution: int = 8
    patch: int = 2                       # 16 tokens
    teacher_width: int = 64              # the small teacher (MF-B/4's role)
    teacher_depth: int = 4
    student_width: int = 96              # the larger student (MF-XL/2's role)
    student_depth: int = 6
    heads: int = 4
    batch_size: int = 128
    pre_kimg: float = 200.0
    lr: float = 1e-3                     # Adam β = (0.9, 0.95), constant rate as Mean Flow (docs/spec/mf.md §1.9)
    # 112 pairs per step as the paper (docs/spec/mf.md §4.5), but 16 trajectories × 7 random pairs of nonadjacent28
    # instead of 4 × 28: this run has only 937 mid-training steps, and 4 trajectories per step (3.7k in all)
    # left the student at 1-step FD 33.9 after mid-training, against 13.3 with 16 × 7 (both measured)
    trajectories_per_batch: int = 16
    pairs_per_trajectory: int = 7
    mid_kimg: float = 105.0              # mid : post = 3 : 1 of the 140 kimg shared budget
    post_kimg: float = 35.0
    ema_std: float = 0.05                # power-function EMA: these stages are short (see digits_cmt_ect.py)
    mu: float = -0.4                     # logit-normal time proposal, 75% of rows with r = t (ImageNet values)
    sigma: float = 1.0
    eval_samples: int = 1000


def mean_flow_smoke(cfg: DigitsMeanFlowSettings) -> DigitsMeanFlowSettings:
    """The --smoke sizes of the Mean Flow digits recipes: one-block DiTs and sub-kimg stages."""
    return dataclasses.replace(cfg, teacher_width=16, teacher_depth=1, student_width=16, student_depth=1, heads=2,
                               pre_kimg=0.256, mid_kimg=0.224, post_kimg=0.128, eval_samples=128)

def backbone(cfg, dropout: float):
    return build_network("digits-ddpmpp", img_resolution=cfg.resolution, model_channels=cfg.model_channels,
                         dropout=dropout, label_dim=cfg.label_dim)


def labels(cfg, n: int):
    """Balanced classes: sample i is digit i mod 10 (a grid of 10 columns has one digit per column)."""
    return torch.arange(n) % 10 if cfg.label_dim else None


def _noise(cfg, n: int) -> torch.Tensor:
    return torch.randn(n, 1, cfg.resolution, cfg.resolution, generator=torch.Generator().manual_seed(1234))


def consistency_samples(cfg, f, steps: int, n: int | None = None) -> torch.Tensor:
    """1- or 2-step samples of a consistency model (2-step point cfg.mid_t), clamped to [−1, 1]."""
    n = n or cfg.eval_samples
    with torch.no_grad():
        return consistency_sampler(f, _noise(cfg, n), (cfg.mid_t,) if steps == 2 else (), labels=labels(cfg, n),
                                   generator=torch.Generator().manual_seed(99)).clamp(-1, 1)


def teacher_samples(cfg, teacher, n: int | None = None) -> torch.Tensor:
    """The teacher solved as CMT solves it: cfg.nfe-step DPM-Solver++ on CMT's grid (docs/spec/cm.md §2.2)."""
    n = n or cfg.eval_samples
    sigmas = logsnr_sigmas(cfg.nfe).float()
    with torch.no_grad():
        return dpm_solver_pp(teacher, _noise(cfg, n) * sigmas[0], sigmas, labels=labels(cfg, n))[-1].clamp(-1, 1)


def stage_config(cfg, name: str, kimg: float, lr: float, seed: int, eval_kimg: float | None = None) -> StageConfig:
    """RAdam with a linear decay and EDM2's power EMA (σ_rel = ema_std)."""
    every = eval_kimg or kimg
    return StageConfig(name=name, total_kimg=kimg, batch_size=cfg.batch_size, lr=lr, optimizer="radam",
                       lr_schedule="linear", ema_beta=None, ema_std=cfg.ema_std, log_kimg=every / 4, ckpt_kimg=every,
                       eval_kimg=eval_kimg, seed=seed)


def cmt_distance(cfg):
    """Pseudo-Huber with ECT's constant c = 0.00054·√d for d = 8·8 values (LPIPS needs ImageNet VGG weights)."""
    return pseudo_huber(0.00054 * math.sqrt(cfg.resolution ** 2))


def cmt(cfg, teacher) -> CMT:
    """CMT on the teacher's cfg.nfe-step trajectories, solved cfg.trajectories_per_batch at a time in every step."""
    return CMT(teacher, nfe=cfg.nfe, trajectories_per_batch=cfg.trajectories_per_batch, distance=cmt_distance(cfg))


def cmt_solved_ahead(cfg, run, stage: StageConfig, teacher, data, path: str) -> tuple[CachedCMT, TrajectorySource]:
    """CMT with its trajectories solved before the stage, 256 at a time, into a store at `path`
    (engine/teacher/trajectory_cache.py): one trajectory per trajectory the stage consumes, each used once, as
    the online objective would solve them — the same prior (x_T = y + σ_max ε over seeded epochs of the data),
    grid, solver, pairs and distance — but batched. On 2 CPU cores the main job's mid-training took 88 s plus
    23 s of solving this way, against 207 s solving 8 trajectories in every step (bench/RESULTS.md, "The main
    job and the suite after issue 31"). A rerun resumes the store where it stopped; a store of another teacher
    or other settings is refused (the store's own checks). Returns the objective and its data."""
    spec = StoreSpec(num_trajectories=run.steps(stage) * cfg.trajectories_per_batch,
                     shape=[1, cfg.resolution, cfg.resolution], nfe=cfg.nfe, chunk=1024, seed=stage.seed)
    if run.lead:
        write_store(path, spec, teacher, data, device=run.device)
    dist.barrier()
    source = TrajectorySource(path)
    return CachedCMT(source.spec, trajectories_per_batch=cfg.trajectories_per_batch,
                     distance=cmt_distance(cfg)), source
