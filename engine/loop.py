"""The training loop: one stage = objective + student initialisation + optimizer + LR schedule + EMA.

Everything is counted in images (kimg): `batch_size` student samples (pairs) per step, budgets and intervals in
kimg, so a recipe means the same at any batch size or device count. Each step's randomness comes from generators
seeded by (seed, images seen) — each rank keeping its rows of the global batch's draws, dropout seeded per rank —
and the data order from (seed, data position), so a checkpoint needs only the model, EMA, optimizer, objective
state and counters, and rerunning the same command resumes bit-identically (on CPU; on CUDA up to the
non-determinism of its kernels), at the same or another world size.

Under torchrun (engine/dist.py) the global batch is divided evenly over the ranks, the network is wrapped
(`StageConfig.parallel`: FSDP2 by default, DDP, or none), logs, grids, evaluations and releases are rank 0's, and
checkpoints are sharded torch.distributed.checkpoint directories (either form resumes at any world size).
"""
from __future__ import annotations

import copy
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

from engine import dist
from engine.checkpoints import CheckpointError, TEACHER_ONLY_KEYS, export_safetensors, load_network_state
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
    parallel: str = "auto"                      # under torchrun: 'fsdp' (auto) | 'ddp' | 'none' (engine/dist.py)
    shard_teacher: bool = False                 # under torchrun: FSDP-shard the objective's frozen teacher too

    def fingerprint(self) -> str:
        """Hash of the settings that change the trained weights (intervals, logging and the parallel layout,
        which changes only the sharding, excluded)."""
        d = dataclasses.asdict(self)
        for k in ("log_kimg", "eval_kimg", "keep_checkpoints", "parallel", "shard_teacher"):
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
    (the objective's LossOutput, the mean loss, the gradient norm), the last two on device (no host sync).

    `params` is the list of trained parameters, or a pair (network's, objective's) when the objective owns some:
    under data parallelism the wrapper reduces the network's gradients and the objective's are averaged here; the
    clipping norm is over both."""
    with dropout_generator(rng.seed(), device), autocast:
        out = objective(net, images, labels, rng)
    loss = out.loss.float().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    net_params, obj_params = params if isinstance(params, tuple) else (params, [])
    for p in obj_params:
        if p.grad is not None:
            dist.all_reduce_mean(p.grad)
    grad_norm = clip_gradients(net_params, obj_params, grad_clip)
    opt.step()
    return out, loss, grad_norm


def clip_gradients(net_params, obj_params, max_norm: float | None) -> torch.Tensor:
    """Clip to a global norm over both parameter lists; the norm (a plain tensor, FSDP's DTensor unwrapped)."""
    if not obj_params:
        return dist.to_scalar_tensor(torch.nn.utils.clip_grad_norm_(net_params, max_norm or math.inf))
    norms = [dist.to_scalar_tensor(torch.nn.utils.clip_grad_norm_(g, math.inf)) for g in (net_params, obj_params)]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    if max_norm:  # one host sync, only when an objective with parameters is clipped
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        for g in (net_params, obj_params):
            grads = [p.grad for p in g if p.grad is not None]
            if grads and coef < 1.0:
                torch._foreach_mul_(grads, coef)
    return total


class _Optimizers:
    """The network's optimizer and, when the objective owns parameters, a second one with the same settings
    (so that the network's optimizer state is exactly what a sharded checkpoint of the network describes)."""

    def __init__(self, net_opt, obj_opt=None):
        self.net, self.obj = net_opt, obj_opt

    @property
    def param_groups(self):
        return self.net.param_groups + (self.obj.param_groups if self.obj else [])

    def zero_grad(self, set_to_none: bool = True):
        for o in (self.net, self.obj):
            if o is not None:
                o.zero_grad(set_to_none=set_to_none)

    def step(self):
        for o in (self.net, self.obj):
            if o is not None:
                o.step()


def train_stage(cfg: StageConfig, net: nn.Module, objective: Objective, data, run_dir: str,
                device: torch.device | str = "cpu",
                evaluate: Callable[[nn.Module], dict] | None = None,
                grid: Callable[[nn.Module], torch.Tensor] | None = None) -> StageResult:
    """Train `net` (already initialised, on `device`) with `objective` on `data` (a source with `len` and
    `batch(indices, device)`) until `cfg.total_kimg`; resume from the stage's newest readable checkpoint if any.
    Under torchrun every rank calls this with the same arguments; the returned networks are plain (unsharded)
    modules on every rank."""
    device = torch.device(device)
    rank, world = dist.rank(), dist.world_size()
    lead = rank == 0
    stage_dir = os.path.join(run_dir, cfg.name)
    # the global batch and the images it consumes, divided evenly over the ranks (clear errors otherwise)
    n_images = objective.images_per_step(cfg.batch_size)
    dist.local_share(cfg.batch_size, f"stage {cfg.name!r}: batch_size (pairs per step)")
    per = getattr(objective, "trajectories_per_batch", None)
    dist.local_share(n_images, f"stage {cfg.name!r}: {objective.name} consumes {n_images} "
                               + ("trajectories" if per else "images") + " per step")
    if lead:
        os.makedirs(stage_dir, exist_ok=True)
        with open(os.path.join(stage_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1, default=str)
    dist.barrier()
    total_nimg = round(cfg.total_kimg * 1000)
    ring = CheckpointRing(os.path.join(stage_dir, "checkpoints"), keep=cfg.keep_checkpoints)

    net.train()
    # an objective may own trained parameters too (sCM's adaptive weight w_φ(t)); they get their own optimizer
    objective.to(device)
    ema = EMA(net, beta=cfg.ema_beta, std=cfg.ema_std)
    _warn_if_ema_too_long(cfg, total_nimg)
    strategy = dist.resolve_strategy(cfg.parallel)
    shell = None
    if strategy != "none":  # a plain CPU copy to hold the consolidated weights at the end
        shell = copy.deepcopy(net.cpu())
        net.to(device)
        if cfg.shard_teacher and getattr(objective, "teacher", None) is not None:
            dist.shard_frozen(objective.teacher, device)
    model = dist.wrap(net, strategy, device)
    if strategy == "fsdp":
        dist.wrap(ema.module, "fsdp", device)  # sharded like the model: the update is shard-local
    net_params = [p for p in model.parameters() if p.requires_grad]
    obj_params = list(objective.parameters())
    params = (net_params, obj_params) if obj_params else net_params

    def optimizers() -> _Optimizers:
        return _Optimizers(make_optimizer(cfg, net_params, device),
                           make_optimizer(cfg, obj_params, device) if obj_params else None)
    opt = optimizers()
    sampler = ResumableSampler(len(data), seed=cfg.seed)
    nimg = data_pos = 0
    counters = dict(images=0, pairs=0, teacher_nfe=0, student_forward=0, student_backward=0, steps=0)
    wall, history = 0.0, []

    # ---- resume: the newest checkpoint that loads, in either form, at any world size --------------------------
    found = ring.latest(load=lambda path: _load_checkpoint(path, model, ema.module, opt, device))
    if found is not None:
        extra, path = found
        if extra["fingerprint"] != cfg.fingerprint():
            raise RuntimeError(f"{path} was written by a different configuration of stage {cfg.name!r}; "
                               f"use another --out directory or remove {stage_dir}")
        objective.load_state_dict(extra["objective"])
        nimg, data_pos, wall = extra["nimg"], extra["data_pos"], extra["wall_s"]
        counters, history = dict(extra["counters"]), list(extra["eval_history"])
        if lead:
            print(f"resuming stage {cfg.name!r} from {path} ({nimg / 1000:g} kimg, world size {world})", flush=True)
    elif any(os.path.isdir(path) for _, path in ring.list()):
        # a failed sharded load may have written into the weights: do not train on from them
        raise RuntimeError(f"no checkpoint in {ring.directory} could be read (see the warnings above); move "
                           f"the directory away to train stage {cfg.name!r} from its initialisation")
    elif ring.list():
        opt = optimizers()  # a failed load may have initialised optimizer state

    def save_checkpoint(at: int) -> None:
        extra = dict(fingerprint=cfg.fingerprint(), objective=objective.state_dict(), nimg=nimg,
                     data_pos=data_pos, wall_s=wall, counters=counters, eval_history=history,
                     objective_optimizer=opt.obj.state_dict() if opt.obj else None)
        if dist.is_distributed():
            net_state, opt_state = dist.train_state(model, opt.net)
            ring.save_sharded(dict(net=net_state, optimizer=opt_state, ema=dist.module_state(ema.module)), extra,
                              at)
        else:
            ring.save(dict(extra, net=net.state_dict(), ema=ema.module.state_dict(), optimizer=opt.net.state_dict()),
                      at)

    def full_ema() -> nn.Module:
        """The EMA network as one plain module (rank 0 evaluates it; all ranks take part in gathering it)."""
        if strategy != "fsdp":
            return dist.unwrap(ema.module)
        state = dist.full_state(ema.module)
        return load_network_state(copy.deepcopy(shell), state).to(device).eval()

    log = TrainLog(stage_dir, cfg.total_kimg, nimg / 1000, desc=cfg.name) if lead else _NoLog()
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
            rng = StepRNG.for_step(cfg.seed, rank, nimg, device, world)
            images, labels = data.batch(sampler.indices(data_pos, n_images, rank, world), device)
            out, loss, grad_norm = train_step(model, objective, opt, params, images, labels, rng, autocast,
                                              cfg.grad_clip, device)
            nonfinite |= ~(torch.isfinite(loss) & torch.isfinite(grad_norm))  # on device: no sync here
            ema.update(model, nimg + cfg.batch_size, cfg.batch_size)
            before, nimg, data_pos = nimg, nimg + cfg.batch_size, data_pos + n_images
            for k, v in dict(images=n_images, pairs=out.pairs * world, teacher_nfe=out.teacher_nfe * world,
                             student_forward=out.student_forward * world,
                             student_backward=out.student_backward * world, steps=1).items():
                counters[k] += v  # global counts (every rank does the same work on its share)
            loss_sum += loss.detach()
            steps_since_log += 1
            log.advance(cfg.batch_size / 1000)

            # ---- bookkeeping at image-count boundaries -------------------------------------------------------
            done = nimg >= total_nimg
            if _crossed(before, nimg, cfg.log_kimg) or done:
                if dist.any_rank(nonfinite):
                    raise NonFiniteError(_nonfinite_message(cfg, last_good_kimg, nimg, ring))
                now = time.time()
                wall += now - t_last
                mean_loss = dist.all_reduce_mean(loss_sum / steps_since_log).item()
                record = dict(kimg=nimg / 1000, loss=mean_loss, lr=lr,
                              grad_norm=grad_norm.item(), kimg_per_s=steps_since_log * cfg.batch_size / 1000
                              / max(now - t_last, 1e-9), wall_s=wall, **counters, **objective.log_values())
                for k in ("teacher_nfe", "student_forward", "student_backward"):
                    record[f"{k}_per_pair"] = counters[k] / max(counters["pairs"], 1)
                log.write(record)
                loss_sum.zero_()
                steps_since_log, t_last, last_good_kimg = 0, now, nimg / 1000
            evaluating = evaluate is not None and (_crossed(before, nimg, cfg.eval_kimg) or done)
            drawing = grid is not None and (_crossed(before, nimg, cfg.eval_kimg) or done)
            if evaluating or drawing:
                averaged = full_ema()
                if lead and evaluating:
                    metrics = dict(kimg=nimg / 1000, **evaluate(averaged))
                    history.append(metrics)
                    log.write(dict(metrics, event="eval"))
                if lead and drawing:
                    save_image_grid(grid(averaged), os.path.join(stage_dir, "grids",
                                                                 f"kimg-{nimg // 1000:06d}.png"))
                history = dist.broadcast_object(history)
                dist.barrier()
                t_last = time.time()  # evaluation time is not training time
            if _crossed(before, nimg, cfg.ckpt_kimg) or done:
                if dist.any_rank(nonfinite):  # never save a state that went through a NaN step
                    raise NonFiniteError(_nonfinite_message(cfg, last_good_kimg, nimg, ring))
                wall += time.time() - t_last
                t_last = time.time()
                save_checkpoint(nimg)
                last_good_kimg = nimg / 1000
    finally:
        log.close()

    # The stage's release: EMA weights with the architecture and config as metadata (rewritten atomically).
    final_ema = full_ema()
    if strategy != "none":
        final_net = load_network_state(copy.deepcopy(shell), dist.full_state(model)).to(device)
    else:
        final_net = net
    if lead:
        export_safetensors(final_ema, os.path.join(stage_dir, "ema.safetensors"),
                           metadata=dict(stage=cfg.name, kimg=nimg / 1000, config=dataclasses.asdict(cfg)))
    dist.barrier()
    return StageResult(net=final_net, ema=final_ema.eval(), nimg=nimg, counters=counters, wall_s=wall,
                       eval_history=history)


class _NoLog:
    """What ranks other than 0 log: nothing."""

    def advance(self, kimg: float) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _load_checkpoint(path: str, model: nn.Module, ema_module: nn.Module, opt: _Optimizers,
                     device: torch.device) -> dict:
    """Load a checkpoint of either form into the (possibly sharded) model, EMA and optimizers; its plain values."""
    from engine.checkpoints import load_checkpoint
    if os.path.isdir(path):
        net_state, opt_state = dist.train_state(model, opt.net)
        tensors = dict(net=net_state, optimizer=opt_state, ema=dist.module_state(ema_module))
        extra = dist.load_sharded(path, tensors)
        dist.set_train_state(model, opt.net, tensors["net"], tensors["optimizer"])
        dist.set_module_state(ema_module, tensors["ema"])
    else:
        extra = load_checkpoint(path, map_location=device)
        if dist.is_distributed() and dist.is_sharded(model):
            dist.set_full_train_state(model, opt.net, extra["net"], extra["optimizer"])
            dist.set_full_module_state(ema_module, extra["ema"])
        else:
            load_network_state(dist.unwrap(model), extra["net"])
            load_network_state(dist.unwrap(ema_module), extra["ema"])
            opt.net.load_state_dict(extra["optimizer"])
    if opt.obj is not None:
        if extra.get("objective_optimizer") is None:
            raise CheckpointError(f"{path} has no optimizer state for the objective's parameters")
        opt.obj.load_state_dict(extra["objective_optimizer"])
    return extra


def _nonfinite_message(cfg: StageConfig, good_kimg: float, nimg: int, ring: CheckpointRing) -> str:
    saved = ring.list()
    where = f"the last checkpoint ({saved[-1][1]}) is intact" if saved else "no checkpoint had been written"
    return (f"stage {cfg.name!r}: the loss or gradient became non-finite between {good_kimg:.3f} and "
            f"{nimg / 1000:.3f} kimg; training stopped and {where}. Lower the learning rate or enable "
            f"grad_clip, and check the data and the teacher.")
