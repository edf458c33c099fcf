"""The training loop: one stage = objective + student initialisation + optimizer + LR schedule + EMA.

Everything is counted in images (kimg): `batch_size` student samples (pairs) per step, budgets and intervals in
kimg, so a recipe means the same at any batch size or device count. Each step's randomness comes from generators
seeded by (seed, rank, images seen) and the data order from (seed, data position), so a checkpoint needs only the
model, EMA, optimizer, objective state and counters, and rerunning the same command resumes bit-identically
(on CPU; on CUDA up to the non-determinism of its kernels).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from typing import Callable

import torch
from torch import nn

from engine.checkpoints import TEACHER_ONLY_KEYS, export_safetensors, load_network_state
from engine.data.sampler import ResumableSampler
from engine.ema import EMA
from engine.image_grid import save_image_grid
from engine.lr_schedules import learning_rate
from engine.networks.dropout import dropout_generator
from engine.objectives.base import Objective, StepRNG
from engine.run_state import CheckpointRing
from engine.train_log import TrainLog


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN/inf; the stage stopped and saved nothing after it."""


@dataclasses.dataclass
class StageConfig:
    name: str                                   # sub-directory of the run directory
    total_kimg: float                           # budget, in thousands of student samples (pairs)
    batch_size: int                             # student samples (pairs) per optimizer step
    lr: float
    optimizer: str = "radam"                    # 'adam' | 'radam' (spec/cm.md §3.4: RAdam, eps 1e-8, no decay)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: str = "linear"                 # 'constant' | 'linear' | 'inv_sqrt' (engine/lr_schedules.py)
    lr_ref_kimg: float = 0.0                    # inv_sqrt: EDM2's ref_batches × batch, in kimg
    lr_rampup_kimg: float = 0.0
    ema_beta: float | None = 0.999              # constant EMA β, or
    ema_std: float | None = None                # EDM2 power-function EMA σ_rel (set ema_beta=None)
    grad_clip: float | None = None              # max global grad norm; None = no clipping
    log_kimg: float = 1.0
    ckpt_kimg: float = 10.0
    eval_kimg: float | None = None              # evaluate(ema) every this many kimg and at the end
    keep_checkpoints: int = 3
    seed: int = 0
    bf16: bool = True                           # bf16 autocast on CUDA (CPU runs are always fp32)

    def fingerprint(self) -> str:
        """Hash of the settings that change the trained weights (intervals and logging excluded)."""
        d = dataclasses.asdict(self)
        for k in ("log_kimg", "eval_kimg", "keep_checkpoints"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class StageResult:
    net: nn.Module
    ema: nn.Module                              # the EMA copy, eval mode
    nimg: int
    counters: dict
    wall_s: float
    eval_history: list


def initialise(net: nn.Module, source) -> nn.Module:
    """Student initialisation: None keeps the constructor's random init; a module (e.g. the teacher) or a state
    dict is copied by name, strictly, ignoring only the teacher-only keys (spec/cm.md §3.3 transfer)."""
    if source is None:
        return net
    state = source.state_dict() if isinstance(source, nn.Module) else source
    return load_network_state(net, state, ignore=TEACHER_ONLY_KEYS)


def make_optimizer(cfg: StageConfig, params, device: torch.device):
    cuda = device.type == "cuda"
    if cfg.optimizer == "adam":  # fused kernel on CUDA: one launch for the whole update
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                fused=cuda or None)
    if cfg.optimizer == "radam":  # RAdam has no fused kernel; foreach batches the update on CUDA
        return torch.optim.RAdam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 foreach=cuda or None)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adam' or 'radam'")


def _crossed(before: int, after: int, every_kimg: float | None) -> bool:
    if not every_kimg:
        return False
    every = max(1, round(every_kimg * 1000))
    return after // every > before // every


def _warn_if_ema_too_long(cfg: StageConfig, total_nimg: int) -> None:
    """A constant-β EMA over a stage shorter than a few 1/(1−β) steps still holds mostly the initial weights at the
    end (0.999 over 250 steps keeps 78% of them), so every metric taken on it measures the init, not the training.
    The power-function EMA (`ema_std`) scales with the stage and has no such failure."""
    if cfg.ema_beta is None:
        return
    steps = math.ceil(total_nimg / cfg.batch_size)
    kept = cfg.ema_beta ** steps
    if kept > 0.1:
        warnings.warn(f"stage {cfg.name!r}: EMA beta={cfg.ema_beta} over {steps} steps keeps {kept:.0%} of the "
                      f"initial weights at the end; use a smaller beta or the power-function EMA (ema_std)",
                      stacklevel=3)


def train_step(net: nn.Module, objective: Objective, opt, params, images, labels, rng: StepRNG, autocast,
               grad_clip: float | None, device: torch.device):
    """One optimisation step, the unit the benchmarks (bench/) time: the objective's forward under the step's
    dropout seed and autocast, backward of the mean per-pair loss, gradient clipping, optimizer step. Returns
    (the objective's LossOutput, the mean loss, the gradient norm), the last two on device (no host sync)."""
    with dropout_generator(rng.seed(), device), autocast:
        out = objective(net, images, labels, rng)
    loss = out.loss.float().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)
    opt.step()
    return out, loss, grad_norm


def train_stage(cfg: StageConfig, net: nn.Module, objective: Objective, data, run_dir: str,
                device: torch.device | str = "cpu",
                evaluate: Callable[[nn.Module], dict] | None = None,
                grid: Callable[[nn.Module], torch.Tensor] | None = None,
                rank: int = 0) -> StageResult:
    """Train `net` (already initialised, on `device`) with `objective` on `data` (a source with `len` and
    `batch(indices, device)`) until `cfg.total_kimg`; resume from the stage's newest readable checkpoint if any."""
    device = torch.device(device)
    stage_dir = os.path.join(run_dir, cfg.name)
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1, default=str)
    total_nimg = round(cfg.total_kimg * 1000)
    ring = CheckpointRing(os.path.join(stage_dir, "checkpoints"), keep=cfg.keep_checkpoints)

    net.train()
    # an objective may own trained parameters too (sCM's adaptive weight w_φ(t)); they share the optimizer
    objective.to(device)
    params = [p for p in net.parameters() if p.requires_grad] + list(objective.parameters())
    opt = make_optimizer(cfg, params, device)
    ema = EMA(net, beta=cfg.ema_beta, std=cfg.ema_std)
    _warn_if_ema_too_long(cfg, total_nimg)
    sampler = ResumableSampler(len(data), seed=cfg.seed)
    nimg = data_pos = 0
    counters = dict(images=0, pairs=0, teacher_nfe=0, student_forward=0, student_backward=0, steps=0)
    wall, history = 0.0, []

    found = ring.latest(map_location=device)
    if found is not None:
        state, path = found
        if state["fingerprint"] != cfg.fingerprint():
            raise RuntimeError(f"{path} was written by a different configuration of stage {cfg.name!r}; "
                               f"use another --out directory or remove {stage_dir}")
        load_network_state(net, state["net"])
        load_network_state(ema.module, state["ema"])
        opt.load_state_dict(state["optimizer"])
        objective.load_state_dict(state["objective"])
        nimg, data_pos, wall = state["nimg"], state["data_pos"], state["wall_s"]
        counters, history = dict(state["counters"]), list(state["eval_history"])

    def checkpoint_state() -> dict:
        return dict(fingerprint=cfg.fingerprint(), net=net.state_dict(), ema=ema.module.state_dict(),
                    optimizer=opt.state_dict(), objective=objective.state_dict(), nimg=nimg, data_pos=data_pos,
                    wall_s=wall, counters=counters, eval_history=history)

    log = TrainLog(stage_dir, cfg.total_kimg, nimg / 1000, desc=cfg.name)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    steps_since_log, last_good_kimg, t_last = 0, nimg / 1000, time.time()
    try:
        while nimg < total_nimg:
            # ---- one step -----------------------------------------------------------------------------------
            objective.set_progress(nimg)
            lr = learning_rate(cfg.lr_schedule, nimg, lr=cfg.lr, total_nimg=total_nimg,
                               ref_nimg=cfg.lr_ref_kimg * 1000, rampup_nimg=cfg.lr_rampup_kimg * 1000)
            for g in opt.param_groups:
                g["lr"] = lr
            rng = StepRNG.for_step(cfg.seed, rank, nimg, device)
            n_images = objective.images_per_step(cfg.batch_size)
            images, labels = data.batch(sampler.indices(data_pos, n_images), device)
            out, loss, grad_norm = train_step(net, objective, opt, params, images, labels, rng, autocast,
                                              cfg.grad_clip, device)
            nonfinite |= ~(torch.isfinite(loss) & torch.isfinite(grad_norm))  # on device: no sync here
            ema.update(net, nimg + cfg.batch_size, cfg.batch_size)
            before, nimg, data_pos = nimg, nimg + cfg.batch_size, data_pos + n_images
            for k, v in dict(images=n_images, pairs=out.pairs, teacher_nfe=out.teacher_nfe,
                             student_forward=out.student_forward, student_backward=out.student_backward,
                             steps=1).items():
                counters[k] += v
            loss_sum += loss.detach()
            steps_since_log += 1
            log.advance(cfg.batch_size / 1000)

            # ---- bookkeeping at image-count boundaries -------------------------------------------------------
            done = nimg >= total_nimg
            if _crossed(before, nimg, cfg.log_kimg) or done:
                if nonfinite.item():
                    raise NonFiniteError(_nonfinite_message(cfg, last_good_kimg, nimg, ring))
                now = time.time()
                wall += now - t_last
                record = dict(kimg=nimg / 1000, loss=(loss_sum / steps_since_log).item(), lr=lr,
                              grad_norm=grad_norm.item(), kimg_per_s=steps_since_log * cfg.batch_size / 1000
                              / max(now - t_last, 1e-9), wall_s=wall, **counters, **objective.log_values())
                for k in ("teacher_nfe", "student_forward", "student_backward"):
                    record[f"{k}_per_pair"] = counters[k] / max(counters["pairs"], 1)
                log.write(record)
                loss_sum.zero_()
                steps_since_log, t_last, last_good_kimg = 0, now, nimg / 1000
            if evaluate is not None and (_crossed(before, nimg, cfg.eval_kimg) or done):
                metrics = dict(kimg=nimg / 1000, **evaluate(ema.module))
                history.append(metrics)
                log.write(dict(metrics, event="eval"))
                t_last = time.time()  # evaluation time is not training time
            if grid is not None and (_crossed(before, nimg, cfg.eval_kimg) or done):
                save_image_grid(grid(ema.module), os.path.join(stage_dir, "grids", f"kimg-{nimg // 1000:06d}.png"))
                t_last = time.time()
            if _crossed(before, nimg, cfg.ckpt_kimg) or done:
                if nonfinite.item():  # never save a state that went through a NaN step
                    raise NonFiniteError(_nonfinite_message(cfg, last_good_kimg, nimg, ring))
                wall += time.time() - t_last
                t_last = time.time()
                ring.save(checkpoint_state(), nimg)
                last_good_kimg = nimg / 1000
    finally:
        log.close()

    # The stage's release: EMA weights with the architecture and config as metadata (rewritten atomically).
    export_safetensors(ema.module, os.path.join(stage_dir, "ema.safetensors"),
                       metadata=dict(stage=cfg.name, kimg=nimg / 1000, config=dataclasses.asdict(cfg)))
    return StageResult(net=net, ema=ema.module, nimg=nimg, counters=counters, wall_s=wall, eval_history=history)


def _nonfinite_message(cfg: StageConfig, good_kimg: float, nimg: int, ring: CheckpointRing) -> str:
    saved = ring.list()
    where = f"the last checkpoint ({saved[-1][1]}) is intact" if saved else "no checkpoint had been written"
    return (f"stage {cfg.name!r}: the loss or gradient became non-finite between {good_kimg:.3f} and "
            f"{nimg / 1000:.3f} kimg; training stopped and {where}. Lower the learning rate or enable "
            f"grad_clip, and check the data and the teacher.")
