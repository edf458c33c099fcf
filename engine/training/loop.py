"""The training loop: one stage = objective + student initialisation + optimizer + LR schedule + EMA.

Everything is counted in images (kimg): `batch_size` student samples (pairs) per step, budgets and intervals in
kimg, so a recipe means the same at any batch size or device count. Each step's randomness comes from generators
seeded by (seed, images seen) — each rank keeping its rows of the global batch's draws, dropout seeded per rank —
and the data order from (seed, data position), so a checkpoint needs only the model, EMA, optimizer, objective
state and counters, and rerunning the same command resumes bit-identically at the same world size (on CPU; on
CUDA up to the non-determinism of its kernels). At another world size it continues the same computation with the
same data and noise, but not bit-identically (gradients are reduced in another order, dropout masks are drawn per
rank; docs/runs.md gives the measured difference), and says so in a warning.

A stage whose release (`ema.safetensors`, written last) is in place, verifies and records the stage's budget is
finished: a rerun trains nothing, rewrites nothing, and returns the release as the stage's EMA — its checkpoints
are not needed, so a damaged final checkpoint cannot make it train again from an earlier one and change a release
that later stages already started from (docs/runs.md).

Under torchrun (engine/dist.py) the global batch is divided evenly over the ranks, the network is wrapped
(`StageConfig.parallel`: FSDP2 by default, DDP, or none), logs, grids, evaluations and releases are rank 0's, and
checkpoints are sharded torch.distributed.checkpoint directories (either form resumes at any world size).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from typing import Callable

import torch
from torch import nn

from engine import dist
from engine.checkpoints.edm_snapshots import StageStart
from engine.checkpoints.identity import check_or_record, identity_digest, write_identity
from engine.checkpoints.files import CheckpointError, atomic_write
from engine.checkpoints.releases import export_safetensors, read_safetensors_metadata, verify_release
from engine.checkpoints.state_dicts import load_network_state
from engine.data.image_grid import save_image_grid
from engine.data.loader import BatchStream, reads_files
from engine.data.sampler import ResumableSampler
from engine.errors import EngineError
from engine.objectives.base import Objective, StepRNG
from engine.training import host_memory
from engine.training.compiled import compile_regions
from engine.training.ema import EMA, snapshot_name
from engine.training.lr_schedules import learning_rate
from engine.training.run_state import CheckpointRing, TrainingState, after_optimizer_step
from engine.training.stage_config import StageConfig, stage_identity
from engine.training.step_profile import StepProfile, describe, phase
from engine.training.train_log import TrainLog


class NonFiniteError(EngineError, RuntimeError):
    """The loss or the gradient became NaN/inf; the stage stopped and saved nothing after it. A failure of the
    stage's settings (learning rate, clipping), its data or its teacher, not of the engine: command lines print it
    as one line and exit 2 like every EngineError (engine/cli.py); still a RuntimeError for callers that catch
    that."""


@dataclasses.dataclass
class StageResult:
    net: nn.Module | None                       # the trained weights; None when a finished stage's final
                                                # checkpoint is damaged or gone (its release holds the EMA only)
    ema: nn.Module                              # the EMA copy, eval mode (a finished stage's: its release)
    pairs_seen: int                             # student samples trained on (the budget's unit; pairs in CMT)
    counters: dict
    wall_s: float
    eval_history: list


def initialise(net: nn.Module, source, ignore=()) -> nn.Module:
    """Student initialisation: None keeps the constructor's random init; a module (e.g. the teacher) or a state
    dict is copied by name, strictly, ignoring only the keys in `ignore` — from a teacher, its teacher-only keys
    (`engine.checkpoints.edm_snapshots.TEACHER_ONLY_KEYS`; docs/spec/cm.md §3.3 transfer), which the caller names
    because the loop does not know the network families."""
    if source is None:
        return net
    state = source.state_dict() if isinstance(source, nn.Module) else source
    return load_network_state(net, state, ignore=ignore)


def _crossed(before: int, after: int, every_kimg: float | None) -> bool:
    if not every_kimg:
        return False
    every = max(1, round(every_kimg * 1000))
    return after // every > before // every


def _warn_if_ema_too_long(cfg: StageConfig) -> None:
    """A constant-β EMA over a stage shorter than a few 1/(1−β) steps still holds mostly the initial weights at the
    end (0.999 over 250 steps keeps 78% of them), so every metric taken on it measures the init, not the training.
    The power-function EMA (`ema_std`) scales with the stage and has no such failure."""
    if cfg.ema_beta is None:
        return
    steps = cfg.steps()
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

    `params` is the list of trained parameters, or a pair (those whose gradients the wrapper reduces, those averaged
    here): under data parallelism the objective's own parameters (sCM's adaptive weight) and the network's 0-d ones
    that FSDP2 leaves whole are averaged here. The clipping norm is over both."""
    with phase("forward"):          # engine/training/step_profile.py: a no-op unless the step is profiled
        with rng.dropout_pinned(device), autocast:
            out = objective(net, images, labels, rng)
        loss = out.loss.float().mean()
    with phase("backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimizer"):
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
    if max_norm:  # on the device, no host sync: the factor is computed in float64 and applied in the grads' dtype
        coef = (max_norm / (total.double() + 1e-6)).clamp(max=1.0)  # ×1.0 leaves unclipped gradients unchanged
        for g in (net_params, obj_params):
            grads = [p.grad for p in g if p.grad is not None]
            for dtype in {x.dtype for x in grads}:
                torch._foreach_mul_([x for x in grads if x.dtype == dtype], coef.to(dtype))
    return total


def train_stage(cfg: StageConfig, net: nn.Module, objective: Objective, data, run_dir: str,
                device: torch.device | str = "cpu",
                evaluate: Callable[[nn.Module], dict] | None = None,
                grid: Callable[[nn.Module], torch.Tensor] | None = None, start: StageStart | None = None,
                profile_steps: int = 0) -> StageResult:
    """Train `net` (already initialised, on `device`) with `objective` on `data` (a source with `len` and
    `batch(indices, device)`) until `cfg.total_kimg`; resume from the stage's newest readable checkpoint if any,
    else from `start` when given (an EDM2 training state: engine/checkpoints/edm_snapshots.py
    `read_edm2_training_state`).
    Everything is checked before anything is written: the budget, the division over ranks, and the stage's
    identity against the one recorded in its directory (docs/runs.md). SIGTERM or Ctrl-C saves a checkpoint at
    the next step boundary and exits with 128 + the signal's number. Under torchrun every rank calls this with the
    same arguments; the returned networks are plain (unsharded) modules on every rank."""
    device = torch.device(device)
    lead = dist.rank() == 0
    stage_dir = os.path.join(run_dir, cfg.name)
    total, n_images = cfg.budget(), objective.images_per_step(cfg.batch_size)
    # the global batch and the images it consumes, divided evenly over the ranks (clear errors otherwise)
    dist.local_share(cfg.batch_size, f"stage {cfg.name!r}: batch_size (pairs per step)")
    per = getattr(objective, "trajectories_per_batch", None)
    dist.local_share(n_images, f"stage {cfg.name!r}: {objective.name} consumes {n_images} "
                               + ("trajectories" if per else "images") + " per step")
    if start is not None:
        start.check(cfg)
    identity_file = os.path.join(stage_dir, "identity.json")
    identity = check_or_record(identity_file, stage_identity(cfg, net, objective, data, start), f"stage {cfg.name!r}",
                               record=False, hint=f"Use another --out directory, or move {stage_dir} away")
    release = os.path.join(stage_dir, "ema.safetensors")
    finished = _finished_release(release, cfg.name, total)
    if lead:
        os.makedirs(stage_dir, exist_ok=True)
    dist.barrier()
    ring = CheckpointRing(os.path.join(stage_dir, "checkpoints"), keep=cfg.keep_checkpoints)

    # freed host memory is reused, not page-faulted in again each step (engine/training/host_memory.py)
    host_memory.apply()
    net.train()
    # an objective may own trained parameters too (sCM's adaptive weight w_φ(t)); they get their own optimizer
    objective.to(device)
    ema = EMA(net, beta=cfg.ema_beta, std=cfg.ema_std)
    tracked = [EMA(net, std=std) for std in cfg.snapshot_emas]
    _warn_if_ema_too_long(cfg)
    frozen = objective.frozen_networks() if cfg.shard_teacher else []
    parallel = dist.Parallel(net, cfg.parallel, device, also=[ema.module, *(e.module for e in tracked)],
                             frozen=frozen, bf16=cfg.bf16)
    if cfg.compile:   # after wrapping: the EMA and the gathering shell stay eager copies; FSDP hooks stay outside
        for module in (dist.unwrap(parallel.model), *objective.frozen_networks()):
            compile_regions(module, cfg.compile)
    state = TrainingState(cfg, parallel.model, ema, objective, ring, device, identity=identity_digest(identity),
                          tracked=tracked)
    # a finished stage needs only its final checkpoint, for the trained (non-EMA) weights and the counters
    resumed = state.load_latest(at_least=total if finished else 0)
    if not resumed and not finished:
        if start is not None:
            state.adopt(start)
        after_optimizer_step(parallel.model)   # networks' post-step work, as the reference's first training forward
    if lead:   # once the checkpoints agree with it: a refused resume leaves the stage's record as it was
        atomic_write(os.path.join(stage_dir, "config.json"),
                     lambda f: f.write(json.dumps(dataclasses.asdict(cfg), indent=1, default=str).encode()))
        write_identity(identity_file, identity)
        if resumed:
            _say_resumed(cfg, state, resumed, total)
    if finished:
        return _finished_result(cfg, state, parallel, release, resumed, stage_dir, lead)

    with StopSignals() as signals:
        run_steps(cfg, state, data, n_images, stage_dir, device, parallel.gathered, evaluate, grid, signals,
                  profile_steps)

    # The stage's release: EMA weights with the architecture and config as metadata (rewritten atomically).
    final_ema = parallel.gathered(ema.module).eval()
    final_net = parallel.gathered(parallel.model)
    if lead:
        export_safetensors(final_ema, release,
                           metadata=dict(stage=cfg.name, kimg=state.pairs_seen / 1000, config=dataclasses.asdict(cfg)))
    dist.barrier()
    return StageResult(net=final_net, ema=final_ema, pairs_seen=state.pairs_seen, counters=state.counters,
                       wall_s=state.wall_s, eval_history=state.history)


def _say_resumed(cfg: StageConfig, state: TrainingState, resumed: str, total: int) -> None:
    print(f"resuming stage {cfg.name!r} from {resumed} ({state.pairs_seen / 1000:g} kimg, world size "
          f"{dist.world_size()})", flush=True)
    written = state.saved_world_size
    if state.pairs_seen < total and written is not None and written != dist.world_size():
        print(f"warning: stage {cfg.name!r}: {resumed} was written at world size {written} and resumes at world "
              f"size {dist.world_size()}: the stage continues with the same data and noise but not bit-identically "
              f"to an uninterrupted run (another reduction order; dropout masks are drawn per rank); docs/runs.md",
              flush=True)


def _finished_release(path: str, stage: str, total: int) -> bool:
    """Whether the stage is finished: its release is in place, its tensor data match the SHA-256 in its header, and
    it records this stage at its budget (`total` pairs or, after a last step past the budget, more). The release is
    written after the final checkpoint, so it exists only once the stage has finished. A damaged release, or one
    written before releases recorded their hash, is not trusted: the stage is restored from its final checkpoint and
    the release written again. Every rank reads the file and all agree."""
    ok = False
    if os.path.isfile(path):
        try:
            _, meta = read_safetensors_metadata(path)
            ok = verify_release(path) and meta.get("stage") == stage and \
                isinstance(meta.get("kimg"), (int, float)) and round(meta["kimg"] * 1000) >= total
        except (CheckpointError, OSError, ValueError) as e:   # damaged bytes, a malformed header
            if dist.rank() == 0:
                print(f"warning: {path} cannot be used ({e}); it is written again from the stage's final "
                      f"checkpoint", flush=True)
    return not dist.any_rank(not ok)


def _finished_result(cfg: StageConfig, state: TrainingState, parallel, release: str, resumed: str | None,
                     stage_dir: str, lead: bool) -> StageResult:
    """A finished stage's result without training or writing anything: the EMA is its release (what later stages
    start from, whatever the checkpoints hold); the trained weights and the counters come from the final
    checkpoint when it loaded. When it did not (damaged, pruned, deleted), the stage is not trained again from an
    earlier one — that would rewrite a finished release with other bytes at another world size — and its counters,
    training time and evaluations are read from its log.jsonl."""
    from safetensors.torch import load_file
    ema = parallel.gathered(state.ema.module)
    try:
        load_network_state(ema, load_file(release))
    except CheckpointError as e:
        raise CheckpointError(f"{release}: {e}") from None
    if resumed:   # the final checkpoint (load_latest looked at none before the budget)
        return StageResult(net=parallel.gathered(parallel.model), ema=ema.eval(), pairs_seen=state.pairs_seen,
                           counters=state.counters, wall_s=state.wall_s, eval_history=state.history)
    pairs = round(read_safetensors_metadata(release)[1]["kimg"] * 1000)
    counters, wall_s, history = _logged_result(os.path.join(stage_dir, "log.jsonl"), pairs, state.counters)
    if lead:
        print(f"stage {cfg.name!r} is finished: its release {release} verifies and its final checkpoint cannot be "
              f"read, so the release is the stage's result; nothing is trained or written again", flush=True)
    return StageResult(net=None, ema=ema.eval(), pairs_seen=pairs, counters=counters, wall_s=wall_s,
                       eval_history=history)


def _logged_result(path: str, nimg: int, counters: dict) -> tuple[dict, float, list]:
    """(counters, training wall time, evaluations) as the stage's log recorded them up to `nimg`: the training
    record at `nimg` holds the counters (`_log_record`), the eval records the history. Counters the log lacks stay
    as given (`counters`: zeros)."""
    found, wall_s, history = dict(counters), 0.0, []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return found, wall_s, history
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break   # a line cut by a kill (engine/training/train_log.py)
        if round(rec.get("kimg", 0) * 1000) > nimg:
            continue
        if rec.get("event") == "eval":
            history.append({k: v for k, v in rec.items() if k != "event"})
        elif round(rec.get("kimg", 0) * 1000) == nimg and "wall_s" in rec:
            found.update({k: rec[k] for k in counters if k in rec})
            wall_s = rec["wall_s"]
    return found, wall_s, history


def run_steps(cfg: StageConfig, state: TrainingState, data, n_images: int, stage_dir: str, device: torch.device,
              gathered: Callable[[nn.Module], nn.Module], evaluate=None, grid=None, signals=None,
              profile_steps: int = 0) -> None:
    """The steps from `state.pairs_seen` to the stage's budget, and what happens at image-count boundaries: logs
    every `log_kimg`, evaluations and grids of the EMA every `eval_kimg`, snapshots of the tracked power EMAs every
    `snapshot_kimg`, checkpoints every `ckpt_kimg` (all at the end too), and a checkpoint and exit when `signals`
    says a stop was asked for. `gathered(module)` is the module with full weights (dist.Parallel). Non-finite
    losses and gradients
    are flagged on the device and looked at only at those boundaries, where the ranks synchronise anyway; no
    state that went through a NaN step is saved."""
    rank, world, lead = dist.rank(), dist.world_size(), dist.rank() == 0
    total = cfg.budget()
    sampler = ResumableSampler(len(data), seed=cfg.seed)
    workers = cfg.data_workers if cfg.data_workers is not None else (4 if reads_files(data) and device.type == "cuda"
                                                                    else 0)
    batches = BatchStream(data, sampler, state.data_pos, n_images, rank, world, -(-(total - state.pairs_seen)
                                                                                   // cfg.batch_size), device, workers)
    log = TrainLog(stage_dir, total, state.pairs_seen, desc=cfg.name) if lead else _NoLog()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.bf16)
    loss_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    steps, last_good_kimg, t_last = 0, state.pairs_seen / 1000, time.time()
    profile = StepProfile(profile_steps, device)
    try:
        while state.pairs_seen < total:
            before = state.pairs_seen
            state.objective.set_progress(before)
            lr = learning_rate(cfg.lr_schedule, before, lr=cfg.lr, total_nimg=total, ref_nimg=cfg.lr_ref_kimg * 1000,
                               rampup_nimg=cfg.lr_rampup_kimg * 1000, step_nimg=round(cfg.lr_step_kimg * 1000),
                               gamma=cfg.lr_step_gamma)
            state.optimizers.set_lr(lr)
            rng = StepRNG.for_step(cfg.seed, rank, before, device, world)
            with profile.step():                    # times its phases when profiled (engine/training/step_profile.py)
                with phase("data"):
                    images, labels = batches.next()  # = data.batch(sampler.indices(data_pos, n_images, ...))
                out, loss, grad_norm = train_step(state.model, state.objective, state.optimizers, state.params,
                                                  images, labels, rng, autocast, cfg.grad_clip, device)
                nonfinite |= ~(torch.isfinite(loss) & torch.isfinite(grad_norm))  # on device: no sync here
                with phase("ema"):
                    state.update_averages(before + cfg.batch_size)
            if profile.done() and lead:
                record = profile.record()
                log.write(dict(record, kimg=state.pairs_seen / 1000))
                print(describe(record, cfg.name), flush=True)
            state.advance(cfg.batch_size, n_images, out, world)
            loss_sum += loss.detach()
            steps += 1
            log.advance(state.pairs_seen)

            done, now = state.pairs_seen >= total, state.pairs_seen
            at_log = _crossed(before, now, cfg.log_kimg) or done
            if at_log:
                if dist.any_rank(nonfinite):
                    raise NonFiniteError(_nonfinite_message(cfg, last_good_kimg, now, state.ring))
                t = time.time()
                state.wall_s += t - t_last
                log.write(_log_record(state, dist.all_reduce_mean(loss_sum / steps).item(), lr,
                                      grad_norm.item(), steps * cfg.batch_size / 1000 / max(t - t_last, 1e-9)))
                loss_sum.zero_()
                steps, t_last, last_good_kimg = 0, t, now / 1000
            if _evaluate_and_draw(state, before, now, done, cfg, stage_dir, gathered, evaluate, grid, log) \
                    | _write_snapshots(state, before, now, done, cfg, stage_dir, gathered):
                t_last = time.time()  # evaluation time is not training time
            stopping = signals is not None and signals.agreed(at_log)
            if _crossed(before, now, cfg.ckpt_kimg) or done or stopping:
                if dist.any_rank(nonfinite):  # never save a state that went through a NaN step
                    raise NonFiniteError(_nonfinite_message(cfg, last_good_kimg, now, state.ring))
                state.wall_s += time.time() - t_last
                t_last = time.time()
                path = state.save(now)
                last_good_kimg = now / 1000
                if stopping:
                    signals.exit(f"stage {cfg.name!r}: stopped by {signals.name} at {now / 1000:g} kimg with a "
                                 f"checkpoint ({path}); rerun the same command to resume", lead)
    finally:
        batches.close()
        log.close()


def _evaluate_and_draw(state, before, now, done, cfg, stage_dir, gathered, evaluate, grid, log) -> bool:
    """Evaluate the EMA and draw its grid when an `eval_kimg` boundary was crossed (rank 0; every rank takes part
    in gathering it). True when anything was done."""
    evaluating = evaluate is not None and (_crossed(before, now, cfg.eval_kimg) or done)
    drawing = grid is not None and (_crossed(before, now, cfg.eval_kimg) or done)
    if not (evaluating or drawing):
        return False
    averaged = gathered(state.ema.module).eval()
    if dist.rank() == 0 and evaluating:
        metrics = dict(kimg=now / 1000, **evaluate(averaged))
        state.history.append(metrics)
        log.write(dict(metrics, event="eval"))
    if dist.rank() == 0 and drawing:
        save_image_grid(grid(averaged), os.path.join(stage_dir, "grids", f"kimg-{now // 1000:06d}.png"))
    state.history = dist.broadcast_object(state.history)
    dist.barrier()
    return True


def _write_snapshots(state, before, now, done, cfg, stage_dir, gathered) -> bool:
    """At a `snapshot_kimg` boundary and at the end: each tracked power EMA as
    `snapshots/<stage>-<images:012d>-<std:.3f>.safetensors` (engine/training/ema.py `snapshot_name`; image count and
    σ_rel
    also in the metadata), the series `python -m engine.training.phema` reconstructs from. True when any was written."""
    if not state.tracked or not (_crossed(before, now, cfg.snapshot_kimg) or done):
        return False
    if dist.rank() == 0:
        os.makedirs(os.path.join(stage_dir, "snapshots"), exist_ok=True)
    for std, ema in zip(cfg.snapshot_emas, state.tracked):
        module = gathered(ema.module).eval()
        if dist.rank() == 0:
            export_safetensors(module, os.path.join(stage_dir, "snapshots", snapshot_name(cfg.name, now, std)),
                               metadata=dict(stage=cfg.name, nimg=now, std=std, kimg=now / 1000))
    dist.barrier()
    return True


class StopSignals:
    """SIGTERM (what cluster schedulers send before a kill) and SIGINT (Ctrl-C) while a stage trains: the handler
    only notes the signal; the loop saves a checkpoint at the next step boundary — under torchrun at the next log
    boundary, where all ranks agree on the step — and exits with 128 + the signal's number, starting no later
    stage. A second Ctrl-C interrupts at once. Installed only in the main thread (signal's rule)."""

    def __init__(self):
        self.signum, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def agreed(self, at_log_boundary: bool) -> bool:
        """Whether to stop at this step: any step in one process; at log boundaries, all ranks together, under
        torchrun."""
        if dist.world_size() == 1:
            return self.signum is not None
        if not at_log_boundary:
            return False
        stop = dist.any_rank(self.signum is not None)
        if stop and self.signum is None:
            self.signum = signal.SIGTERM   # another rank was signalled
        return stop

    def exit(self, message: str, lead: bool):
        if lead:
            print(message, flush=True)
        raise SystemExit(128 + int(self.signum or signal.SIGTERM))


def _log_record(state: TrainingState, mean_loss: float, lr: float, grad_norm: float,
                kimg_per_s: float) -> dict:
    """One line of log.jsonl: the mean loss since the last line, the step's lr and gradient norm, throughput,
    training wall time, the counters and their per-pair ratios, and the objective's own values."""
    record = dict(kimg=state.pairs_seen / 1000, loss=mean_loss, lr=lr, grad_norm=grad_norm, kimg_per_s=kimg_per_s,
                  wall_s=state.wall_s, **state.counters, **state.objective.log_values())
    for k in ("teacher_nfe", "student_forward", "student_backward"):
        record[f"{k}_per_pair"] = state.counters[k] / max(state.counters["pairs"], 1)
    return record


class _NoLog:
    """What ranks other than 0 log: nothing."""

    def advance(self, nimg: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _nonfinite_message(cfg: StageConfig, good_kimg: float, nimg: int, ring: CheckpointRing) -> str:
    saved = ring.list()
    where = f"the last checkpoint ({saved[-1][1]}) is intact" if saved else "no checkpoint had been written"
    return (f"stage {cfg.name!r}: the loss or gradient became non-finite between {good_kimg:.3f} and "
            f"{nimg / 1000:.3f} kimg; training stopped and {where}. Lower the learning rate or enable "
            f"grad_clip, and check the data and the teacher.")
