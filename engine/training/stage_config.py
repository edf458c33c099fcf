"""A stage's settings (`StageConfig`, validated when built) and its identity: what determines the weights it trains
(engine/checkpoints/identity.py; docs/runs.md says which changes a rerun refuses)."""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import types

import torch
from torch import nn

from engine.checkpoints.identity import plain, state_fingerprint, tensor_fingerprint
from engine.checks import finite, nonneg_int, one_of, positive_int, probability
from engine.errors import EngineError

__all__ = ["StageConfig", "RESULT_NEUTRAL", "LR_SCHEDULES", "stage_identity", "describe_object"]

LR_SCHEDULES = ("constant", "linear", "inv_sqrt", "step")
# Settings that do not change the trained weights: they may change when a stage is rerun.
RESULT_NEUTRAL = ("log_kimg", "eval_kimg", "ckpt_kimg", "snapshot_kimg", "keep_checkpoints", "parallel",
                  "shard_teacher", "data_workers", "compile")
# Fields added after checkpoints carried StageConfig fingerprints; left out of the fingerprint at their defaults so
# that those checkpoints still resume.
_LATER_FIELDS = dict(snapshot_emas=(), snapshot_kimg=None, momentum=0.0, lr_step_kimg=0.0, lr_step_gamma=0.1,
                     ema_continue_kimg=0.0)
# Fields added after stage identities were recorded: left out of the identity at their defaults, so that those
# stages still resume.
_LATER_IDENTITY_FIELDS = dict(ema_continue_kimg=0.0)


@dataclasses.dataclass
class StageConfig:
    name: str                                   # sub-directory of the run directory
    total_kimg: float                           # budget, in thousands of student samples (pairs)
    batch_size: int                             # student samples (pairs) per optimizer step
    lr: float
    optimizer: str = "radam"                    # 'adam' | 'radam' (docs/spec/cm.md §3.4: RAdam, eps 1e-8, no decay)
                                                # | 'sgd' (with `momentum`; the latent VGG, docs/spec/edm2_latent.md
                                                # §6.5)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0                       # sgd only
    # 'constant' | 'linear' | 'inv_sqrt' | 'step' (engine/training/lr_schedules.py)
    lr_schedule: str = "linear"
    lr_step_kimg: float = 0.0                   # step: × lr_step_gamma every this many kimg
    lr_step_gamma: float = 0.1
    lr_ref_kimg: float = 0.0                    # inv_sqrt: EDM2's ref_batches × batch, in kimg
    lr_rampup_kimg: float = 0.0
    ema_beta: float | None = 0.999              # constant EMA β, or
    ema_std: float | None = None                # EDM2 power-function EMA σ_rel (set ema_beta=None)
    # Power EMA only: continue an average over this many kimg that came before the stage, the initial weights
    # standing for them (β = (1 − batch / (prior + seen))^(γ+1)), instead of restarting at the stage's first step.
    # For a stage initialised from an earlier stage's EMA: mid → post with an EMA that does not restart.
    ema_continue_kimg: float = 0.0
    grad_clip: float | None = None              # max global grad norm; None = no clipping
    log_kimg: float | None = 1.0                # None: log, checkpoint only at the end of the stage
    ckpt_kimg: float | None = 10.0
    eval_kimg: float | None = None              # evaluate(ema) every this many kimg and at the end
    keep_checkpoints: int = 3
    seed: int = 0
    bf16: bool = True                           # bf16 autocast on CUDA (CPU runs are always fp32)
    parallel: str = "auto"                      # under torchrun: 'fsdp' (auto) | 'ddp' | 'none' (engine/dist.py)
    shard_teacher: bool = False                 # under torchrun: FSDP-shard the objective's frozen teacher too
    compile: str | None = None                  # torch.compile each block: 'default' | 'max-autotune-no-cudagraphs'
                                                # | 'aot_eager' (engine/training/compiled.py); the student and frozen
                                                # teachers
    data_workers: int | None = None             # processes reading batches ahead (engine/data/loader.py); None:
                                                # 4 for a file-backed source on CUDA, else 0 (in the training process)
    snapshot_emas: tuple[float, ...] = ()       # σ_rel of tracked power EMAs (EDM2: (0.050, 0.100)), snapshotted
    snapshot_kimg: float | None = None          # every this many kimg and at the end, for engine/training/phema.py

    def __post_init__(self):
        w = f"StageConfig({self.name!r})"
        if not isinstance(self.name, str) or not self.name or os.sep in self.name or self.name in (".", ".."):
            raise EngineError(f"StageConfig: name must be a directory name, got {self.name!r}")
        finite("total_kimg", self.total_kimg, w, low=0.0, strict=True)
        positive_int("batch_size", self.batch_size, w)
        finite("lr", self.lr, w, low=0.0, strict=True)
        one_of("optimizer", self.optimizer, ("adam", "radam", "sgd"), w)
        probability("momentum", self.momentum, w)
        if self.optimizer != "sgd" and self.momentum:
            raise EngineError(f"{w}: momentum is SGD's; {self.optimizer} takes betas")
        if len(self.betas) != 2:
            raise EngineError(f"{w}: betas must be two numbers, got {self.betas!r}")
        for k, b in zip(("betas[0]", "betas[1]"), self.betas):
            probability(k, b, w)
        finite("eps", self.eps, w, low=0.0, strict=True)
        finite("weight_decay", self.weight_decay, w, low=0.0)
        one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES, w)
        finite("lr_ref_kimg", self.lr_ref_kimg, w, low=0.0)
        finite("lr_rampup_kimg", self.lr_rampup_kimg, w, low=0.0)
        if self.lr_schedule == "step" and not finite("lr_step_kimg", self.lr_step_kimg, w, low=0.0) > 0:
            raise EngineError(f"{w}: the step schedule needs lr_step_kimg > 0")
        finite("lr_step_gamma", self.lr_step_gamma, w, low=0.0, strict=True)
        if self.lr_schedule == "inv_sqrt" and self.lr_ref_kimg <= 0:
            raise EngineError(f"{w}: the inv_sqrt schedule needs lr_ref_kimg > 0 (EDM2: ref_batches × batch size)")
        if (self.ema_beta is None) == (self.ema_std is None):
            raise EngineError(f"{w}: give exactly one of ema_beta (constant EMA) and ema_std (EDM2's power EMA)")
        if self.ema_beta is not None:
            probability("ema_beta", self.ema_beta, w)
        if self.ema_std is not None:
            finite("ema_std", self.ema_std, w, low=0.0, high=0.2886, strict=True)
        finite("ema_continue_kimg", self.ema_continue_kimg, w, low=0.0)
        if self.ema_continue_kimg and self.ema_std is None:
            raise EngineError(f"{w}: ema_continue_kimg continues EDM2's power EMA (ema_std); a constant ema_beta has "
                              f"no image count to continue")
        if self.grad_clip is not None:
            finite("grad_clip", self.grad_clip, w, low=0.0, strict=True)
        for k in ("log_kimg", "ckpt_kimg", "eval_kimg"):   # None: only at the end of the stage
            if getattr(self, k) is not None:
                finite(k, getattr(self, k), w, low=0.0, strict=True)
        positive_int("keep_checkpoints", self.keep_checkpoints, w)
        nonneg_int("seed", self.seed, w)
        one_of("parallel", self.parallel, ("auto", "fsdp", "ddp", "none"), w)
        if self.compile is not None:
            from engine.training.compiled import CHOICES
            one_of("compile", self.compile, CHOICES, w)
        if self.data_workers is not None:
            nonneg_int("data_workers", self.data_workers, w)
        if not isinstance(self.snapshot_emas, (tuple, list)) or len(set(self.snapshot_emas)) != len(self.snapshot_emas):
            raise EngineError(f"{w}: snapshot_emas must be a list of distinct σ_rel values, got {self.snapshot_emas!r}")
        self.snapshot_emas = tuple(finite("snapshot_emas entry", s, w, low=0.0, high=0.2886, strict=True)
                                   for s in self.snapshot_emas)
        if self.snapshot_kimg is not None:
            finite("snapshot_kimg", self.snapshot_kimg, w, low=0.0, strict=True)

    def budget(self) -> int:
        """The budget in pairs; EngineError when it is not even one step (a tiny --kimg-scale, say)."""
        total = round(self.total_kimg * 1000)
        if total < self.batch_size:
            raise EngineError(f"stage {self.name!r}: total_kimg {self.total_kimg:g} is {total} pairs, less than one "
                              f"step of {self.batch_size} (a --kimg-scale that small trains nothing)")
        return total

    def steps(self) -> int:
        """The steps the stage trains: its budget over its batch, rounded up (the last step completes the budget)."""
        return -(-self.budget() // self.batch_size)

    def identity(self) -> dict:
        """The settings that determine the trained weights (those in RESULT_NEUTRAL do not)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in RESULT_NEUTRAL and not (k in _LATER_IDENTITY_FIELDS and v == _LATER_IDENTITY_FIELDS[k])}

    def fingerprint(self) -> str:
        """Hash of the settings that change the trained weights (intervals, logging and the parallel layout,
        which changes only the sharding, excluded): what checkpoints carried before stage identities
        (stage_identity) were recorded, still checked for them."""
        d = dataclasses.asdict(self)
        for k in ("log_kimg", "eval_kimg", "keep_checkpoints", "parallel", "shard_teacher", "data_workers",
                  "compile"):
            d.pop(k)
        for k, default in _LATER_FIELDS.items():
            if d[k] == default:
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_object(value, depth: int = 0, memo: dict | None = None):
    """A comparable description of an objective's setting: numbers, strings and containers as they are; modules by
    class and a hash of their state (once per module); tensors by hash; other objects by class and their public
    attributes, two levels deep; functions by qualified name."""
    memo = {} if memo is None else memo
    if isinstance(value, nn.Module):
        if id(value) not in memo:
            memo[id(value)] = {"class": type(value).__name__, "state_sha256": state_fingerprint(value)}
        return memo[id(value)]
    if isinstance(value, torch.Tensor):
        return {"tensor_sha256": tensor_fingerprint(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return plain(value)
    if isinstance(value, (list, tuple)):
        return [describe_object(v, depth + 1, memo) for v in value] if depth < 3 else type(value).__name__
    if isinstance(value, dict):
        return {str(k): describe_object(v, depth + 1, memo) for k, v in value.items()} if depth < 3 else "dict"
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)) or inspect.isclass(value):
        return getattr(value, "__qualname__", type(value).__name__)
    if hasattr(value, "__dict__") and depth < 2:
        # an object may name settings that are not part of what it computes (`identity_omits`: ones added after
        # runs existed, at the value those runs had; ones that do not apply), so that upgrading does not orphan runs
        omit = value.identity_omits() if callable(getattr(value, "identity_omits", None)) else set()
        # a wrapping objective (LatentPosterior, REPA) is described with its inner objective at its own depth, so
        # that stacking wrappers never hides the inner objective's settings behind the depth limit
        from engine.objectives.base import Wrapper
        inner_depth = depth if isinstance(value, Wrapper) else depth + 1
        return {"class": type(value).__name__,
                **{k: describe_object(v, inner_depth if k == "inner" else depth + 1, memo)
                   for k, v in sorted(vars(value).items()) if not k.startswith("_") and k not in omit}}
    return type(value).__name__


def _network(net: nn.Module) -> dict:
    from engine.checkpoints.registry import describe_network
    try:
        return describe_network(net)
    except EngineError:   # not a registered architecture: its class and parameter shapes
        return {"class": type(net).__name__, "shapes": {k: list(v.shape) for k, v in net.state_dict().items()}}


def stage_identity(cfg: StageConfig, net: nn.Module, objective, data, start=None) -> dict:
    """What a stage's result depends on: its settings, the objective (class, settings, teacher weights), the
    network's architecture and initial weights, its data, and the training state it starts from, if any."""
    fingerprint = getattr(data, "fingerprint", None)
    identity = dict(stage=cfg.identity(), objective=describe_object(objective), network=_network(net),
                    init_sha256=state_fingerprint(net),
                    data=fingerprint() if callable(fingerprint) else {"class": type(data).__name__, "items": len(data)})
    if start is not None:
        identity["start"] = start.fingerprint
    return identity
