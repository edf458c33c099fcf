"""A stage's training state and its checkpoints on disk.

`TrainingState` is the one owner of what a checkpoint holds — the (possibly sharded) model, its EMA, the
optimizers, the objective's state and the counters — with `save(at)` and `load_latest()` at any world size.
`CheckpointRing` is the directory the checkpoints live in: written atomically, the last K kept, the newest readable
one found on resume. Two forms share one directory and one numbering (pairs seen, 12 digits):

    ckpt-<n>.pt   a single-process run's plain state dict (`engine.checkpoints.files.save_checkpoint`: temporary file,
    fsync,
                  rename);
    ckpt-<n>/     a distributed run's torch.distributed.checkpoint directory (each rank's shards + extra.pt;
                  engine.dist.save_sharded: written under a hidden name, renamed when every rank is done).

Either form resumes at any world size. Every checkpoint carries SHA-256s of its bytes (`ckpt-<n>.pt.sha256`
beside a file, `MANIFEST.sha256` inside a directory), written before it is put in place and checked before it is
read. A checkpoint whose bytes are damaged (truncated, corrupt, flipped) is reported and skipped in favour of the
previous one; it is never deleted, so nothing is lost to a false alarm. A checkpoint that reads but does not fit —
another configuration, another network — is refused, not skipped: nothing would be gained by training the
stage again from scratch over a finished run. Temporaries left by a process killed mid-save are removed at
start-up (by rank 0 under torchrun)."""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil

from torch import nn

from engine import dist
from engine.checkpoints.edm_snapshots import StageStart
from engine.checkpoints.files import (CheckpointError, UnreadableCheckpoint, load_checkpoint, save_checkpoint,
                                      sidecar_path)
from engine.checkpoints.state_dicts import load_network_state
from engine.training.optimizers import Optimizers

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt-(\d{12})(\.pt)?$")


def after_optimizer_step(model: nn.Module) -> None:
    """Run every submodule's `after_optimizer_step()` hook, if it has one: the work a network family needs after
    each optimizer step (EDM2's forced weight normalisation, engine/networks/edm2_unet.py `MPConv`), asked of the
    network instead of imported from its family, so the loop stays generic. Also called once before the first step,
    as the reference normalises at its first training forward."""
    for m in model.modules():
        hook = getattr(m, "after_optimizer_step", None)
        if callable(hook):
            hook()


class CheckpointRing:
    def __init__(self, directory: str, keep: int = 3):
        if keep < 1:
            raise ValueError("keep at least one checkpoint")
        self.directory, self.keep = directory, keep
        if dist.rank() == 0:
            os.makedirs(directory, exist_ok=True)
            for tmp in glob.glob(os.path.join(directory, ".ckpt-*")):
                # a save interrupted by SIGKILL; the rename never happened, so no checkpoint is lost
                shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)
        dist.barrier()

    def path(self, nimg: int, sharded: bool = False) -> str:
        return os.path.join(self.directory, f"ckpt-{nimg:012d}" + ("" if sharded else ".pt"))

    def list(self) -> list[tuple[int, str]]:
        """(images seen, path), oldest first; a directory counts only once complete (its .metadata written)."""
        found = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            path = os.path.join(self.directory, name)
            if m and (m.group(2) or os.path.isfile(os.path.join(path, ".metadata"))):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def save(self, state: dict, nimg: int) -> str:
        path = self.path(nimg)
        save_checkpoint(path, state)
        self.prune()
        return path

    def save_sharded(self, tensors: dict, extra: dict, nimg: int) -> str:
        """Every rank calls this (collective): `tensors` sharded as the run shards them, `extra` plain values."""
        path = self.path(nimg, sharded=True)
        dist.save_sharded(path, tensors, extra)
        if dist.rank() == 0:
            self.prune()
        dist.barrier()
        return path

    def prune(self) -> None:
        """Only after the new checkpoint is in place, and only readable-or-not older ones beyond `keep`."""
        for _, old in self.list()[:-self.keep]:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
            if os.path.exists(sidecar_path(old)):
                os.remove(sidecar_path(old))

    def latest(self, map_location="cpu", load=None, at_least: int = 0):
        """The newest checkpoint numbered `at_least` or more that loads on every rank, as (what `load(path)`
        returned, path), or None. `load` defaults to reading a single-file checkpoint (the loop passes one that
        reads either form into the model).
        A checkpoint whose bytes any rank finds damaged (`UnreadableCheckpoint`, an I/O error) is reported and
        skipped in favour of the previous one, by all ranks together; any other failure to load it — it does not
        fit — is raised on every rank."""
        load = load or (lambda path: load_checkpoint(path, map_location=map_location))
        for nimg, path in reversed(self.list()):
            if nimg < at_least:
                break
            unreadable = refused = None
            try:
                result = load(path)
            except (UnreadableCheckpoint, OSError) as e:
                unreadable = e
            except Exception as e:   # noqa: BLE001 - every rank must learn that one rank refused it
                refused = e
            if dist.any_rank(refused is not None):
                raise refused if refused is not None else CheckpointError(
                    f"{path} was refused by another rank (see its error)")
            if dist.any_rank(unreadable is not None):
                warn_unreadable(path, unreadable or "another rank could not read it")
                continue
            return result, path
        return None


def _written_world_size(path: str) -> int | None:
    """The world size a checkpoint written before checkpoints recorded it was saved at: one process for a file
    (TrainingState.save writes one only without torchrun); for a DCP directory, how many ranks wrote shards
    (DCP's file system writer names them `__<rank>_<n>.distcp`), None when its files do not say."""
    if not os.path.isdir(path):
        return 1
    ranks = {m.group(1) for m in map(re.compile(r"^__(\d+)_\d+\.distcp$").match, os.listdir(path)) if m}
    return len(ranks) or None


def warn_unreadable(path: str, error: Exception) -> None:
    log.warning("skipping unreadable checkpoint: %s", error)
    if dist.rank() == 0:
        print(f"warning: skipping unreadable checkpoint {path}: {error}", flush=True)


class TrainingState:
    """Everything a stage's checkpoint holds, and the one place that saves and loads it.

    model: the network as the optimizer sees it (plain, DDP or FSDP2: engine.dist.Parallel); ema: its EMA
    (engine.training.ema.EMA, `ema.module` sharded like the model under FSDP); tracked: EDM2's tracked power EMAs, whose
    snapshots post-hoc EMA reconstructs (engine/training/phema.py), sharded likewise; objective: its state (and, when it
    owns
    trained parameters, their optimizer); counters: `pairs_seen` (the budget: student samples trained on, one per
    pair in CMT), `data_pos` (dataset images consumed: the sampler's position), `wall_s`, `counters` (global
    totals of images, pairs, teacher NFE, student forwards / backwards and steps) and `history` (evaluations)."""

    def __init__(self, cfg, model, ema, objective, ring: CheckpointRing, device, identity: str = "", tracked=()):
        self.cfg, self.model, self.ema, self.objective, self.ring, self.device = cfg, model, ema, objective, ring, device
        self.tracked = list(tracked)   # EDM2's tracked power EMAs (cfg.snapshot_emas), sharded like the EMA
        # the SHA-256 of the stage's identity (engine/checkpoints/identity.py), kept in every checkpoint
        self.identity = identity
        net_params = [p for p in model.parameters() if p.requires_grad]
        obj_params = list(objective.parameters())
        # parameters whose gradients the loop averages over the ranks itself: the objective's, and those FSDP leaves
        # whole (engine/dist.py replicated_parameters); all of the network's stay in the network's optimizer
        whole = dist.replicated_parameters(model)
        reduced = [p for p in net_params if not any(p is q for q in whole)]
        self.params = (reduced, whole + obj_params) if whole or obj_params else net_params
        self._optimizers = lambda: Optimizers.build(cfg, net_params, obj_params, device)
        self.optimizers = self._optimizers()
        self.pairs_seen = self.data_pos = 0
        self.saved_world_size: int | None = None   # that of the checkpoint resumed from, when known
        self.wall_s = 0.0
        self.counters = dict(images=0, pairs=0, teacher_nfe=0, student_forward=0, student_backward=0, steps=0)
        self.history: list = []

    def update_averages(self, nimg_after: int) -> None:
        """After the optimizer step: the EMA and the tracked power EMAs take the new weights, then the weights of
        magnitude-preserving layers are renormalised (EDM2's forced weight normalisation, which the reference does
        at the start of the next training forward: engine/networks/edm2_unet.py). No-op for other networks."""
        batch = self.cfg.batch_size
        # ema_continue_kimg: the stage's EMA goes on from an average over that many earlier images (StageConfig)
        self.ema.update(self.model, nimg_after + round(self.cfg.ema_continue_kimg * 1000), batch)
        for ema in self.tracked:
            ema.update(self.model, nimg_after, batch)
        after_optimizer_step(self.model)

    def adopt(self, start: StageStart) -> None:
        """Start from `start` instead of the initialisation: weights, optimizer state (this stage's hyperparameters
        kept), the tracked EMAs (every σ_rel of cfg.snapshot_emas must be there), the EMA (the start's, else its
        tracked EMA of the stage's σ_rel, else the weights), and the image count, which also places the data
        sampler (one image per sample, as in EDM2's training)."""
        stds = start.check(self.cfg)
        ema = start.ema
        if ema is None and self.cfg.ema_std is not None:
            ema = stds.get(round(self.cfg.ema_std, 6))
        modules = dict(ema=ema if ema is not None else start.net,
                       **{f"tracked_{i}": stds[round(s, 6)] for i, s in enumerate(self.cfg.snapshot_emas)})
        opt = self.optimizers.net
        settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        try:
            if dist.is_distributed() and dist.is_sharded(self.model):
                if start.optimizer is not None:
                    dist.set_full_train_state(self.model, opt, start.net, start.optimizer)
                else:
                    dist.set_full_module_state(self.model, start.net)
                for k, m in self._averages().items():
                    dist.set_full_module_state(m, modules[k])
            else:
                load_network_state(dist.unwrap(self.model), start.net)
                for k, m in self._averages().items():
                    load_network_state(dist.unwrap(m), modules[k])
                if start.optimizer is not None:
                    opt.load_state_dict(start.optimizer)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"the start state does not fit this stage: {str(e).splitlines()[0]}") from None
        for group, kept in zip(opt.param_groups, settings):
            group.update(kept)
        self.pairs_seen = self.data_pos = int(start.pairs_seen)

    def _averages(self) -> dict:
        """The EMA modules a checkpoint holds, by key: 'ema', and 'tracked_<i>' for the tracked power EMAs."""
        return dict(ema=self.ema.module, **{f"tracked_{i}": e.module for i, e in enumerate(self.tracked)})

    def advance(self, pairs: int, images: int, out, world: int) -> None:
        """Count one step of `pairs` student samples that consumed `images` dataset images (global numbers); `out`
        is the objective's LossOutput for this rank's share."""
        self.pairs_seen += pairs
        self.data_pos += images
        for k, v in dict(images=images, pairs=out.pairs * world, teacher_nfe=out.teacher_nfe * world,
                         student_forward=out.student_forward * world,
                         student_backward=out.student_backward * world, steps=1).items():
            self.counters[k] += v  # global counts (every rank does the same work on its share)

    def save(self, at: int) -> str:
        """A checkpoint numbered `at` (pairs seen): sharded under torchrun, one file otherwise."""
        opt = self.optimizers
        extra = dict(identity=self.identity, fingerprint=self.cfg.fingerprint(), objective=self.objective.state_dict(),
                     pairs_seen=self.pairs_seen, data_pos=self.data_pos, wall_s=self.wall_s, counters=self.counters,
                     world_size=dist.world_size(),
                     eval_history=self.history, objective_optimizer=opt.obj.state_dict() if opt.obj else None)
        averages = self._averages()
        if dist.is_distributed():
            net_state, opt_state = dist.train_state(self.model, opt.net)
            return self.ring.save_sharded(dict(net=net_state, optimizer=opt_state,
                                               **{k: dist.module_state(m) for k, m in averages.items()}), extra, at)
        return self.ring.save(dict(extra, net=dist.unwrap(self.model).state_dict(),
                                   **{k: m.state_dict() for k, m in averages.items()},
                                   optimizer=opt.net.state_dict()), at)

    def load_latest(self, at_least: int = 0) -> str | None:
        """Resume from the newest checkpoint (numbered `at_least` or more) that loads on every rank, in either form;
        its path, or None when the stage starts from its initialisation. A checkpoint written for another identity,
        or one that does not fit the network or its optimizer, is refused (CheckpointError naming what does not
        fit); a damaged one is skipped for the previous one. A failed sharded load (which may have written into the
        weights) stops the run rather than train on from them; a finished stage (`at_least` its budget: its release
        is its result, engine/training/loop.py) trains nothing from them, so it is not stopped."""
        found = self.ring.latest(load=self._load, at_least=at_least)
        if found is not None:
            extra, path = found
            self.objective.load_state_dict(extra["objective"])
            # "nimg": what checkpoints written before the counters were renamed call pairs_seen
            self.pairs_seen = extra["pairs_seen"] if "pairs_seen" in extra else extra["nimg"]
            self.data_pos, self.wall_s = extra["data_pos"], extra["wall_s"]
            self.counters, self.history = dict(extra["counters"]), list(extra["eval_history"])
            self.saved_world_size = extra.get("world_size", _written_world_size(path))
            return path
        if not at_least and any(os.path.isdir(path) for _, path in self.ring.list()):
            raise CheckpointError(f"no checkpoint in {self.ring.directory} could be read (see the warnings above); "
                                  f"move the directory away to train stage {self.cfg.name!r} from its "
                                  f"initialisation")
        if self.ring.list():
            self.optimizers = self._optimizers()  # a failed load may have initialised optimizer state
        return None

    def _refuse(self, path: str, why: str) -> CheckpointError:
        stage_dir = os.path.dirname(self.ring.directory)
        return CheckpointError(f"{path} {why}; it belongs to another configuration of stage {self.cfg.name!r}, "
                               f"so it is not resumed and nothing is overwritten. Use another --out directory, or "
                               f"move {stage_dir} away to train the stage again")

    def _load(self, path: str) -> dict:
        """Load a checkpoint of either form into the (possibly sharded) model, EMA and optimizers; its plain
        values. Damaged bytes raise UnreadableCheckpoint (the ring skips it); a checkpoint of another identity or
        one that does not fit raises CheckpointError (refused)."""
        model, averages, opt = self.model, self._averages(), self.optimizers
        if os.path.isdir(path):
            net_state, opt_state = dist.train_state(model, opt.net)
            tensors = dict(net=net_state, optimizer=opt_state, **{k: dist.module_state(m) for k, m in averages.items()})
            extra = dist.load_sharded(path, tensors, check=self._check_extra)
            dist.set_train_state(model, opt.net, tensors["net"], tensors["optimizer"])
            for k, m in averages.items():
                dist.set_module_state(m, tensors[k])
        else:
            extra = load_checkpoint(path, map_location=self.device)
            self._check_extra(path, extra)
            try:
                if dist.is_distributed() and dist.is_sharded(model):
                    dist.set_full_train_state(model, opt.net, extra["net"], extra["optimizer"])
                    for k, m in averages.items():
                        dist.set_full_module_state(m, extra[k])
                else:
                    load_network_state(dist.unwrap(model), extra["net"])
                    for k, m in averages.items():
                        load_network_state(dist.unwrap(m), extra[k])
                    opt.net.load_state_dict(extra["optimizer"])
            except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
                raise self._refuse(path, f"does not fit: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                    from None
        if opt.obj is not None:
            if extra.get("objective_optimizer") is None:
                raise self._refuse(path, "has no optimizer state for the objective's parameters")
            opt.obj.load_state_dict(extra["objective_optimizer"])
        return extra

    def _check_extra(self, path: str, extra: dict) -> None:
        """The checkpoint's identity against the stage's: the identity hash, or for checkpoints written before
        identities were recorded, the StageConfig fingerprint they carried."""
        if not isinstance(extra, dict) or "counters" not in extra:
            raise self._refuse(path, "is not a training checkpoint of this engine")
        if extra.get("identity"):
            if self.identity and extra["identity"] != self.identity:
                raise self._refuse(path, f"was written for stage identity {extra['identity'][:12]}…, not "
                                         f"{self.identity[:12]}… (see the stage's identity.json)")
        elif extra.get("fingerprint") != self.cfg.fingerprint():
            raise self._refuse(path, "was written by a different configuration")
