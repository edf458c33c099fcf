"""A run directory as the recipes' `Run` (engine/pipelines/recipe.py) finds it: what it holds, a stage's results
checked against what they record before anything is written, and the lock that keeps one process in it.

* `run_contents` / `stage_contents`: the files that show a run or a stage has trained (a stage's identity,
  release, log, checkpoints, snapshots, grids; a run's results.json). A directory holding them but no identity.json
  is not a new run: `Run` checks the command against its config.json, and every stage against its identity.json or,
  without one, the identity its newest checkpoint was written for (`check_stage_directory`); what nothing vouches
  for is refused with a line saying how to go on, never adopted (docs/runs.md "What is refused").
* `lock_run_directory`: an advisory `fcntl.flock` on `<out>/run.lock`, with the holder's pid in the file, held from
  the run's first write to its end — only by rank 0 under torchrun, so the ranks of one run never refuse each
  other. The kernel releases the lock of a process that dies, so a killed run leaves no stale lock; the file stays.
"""
from __future__ import annotations

import fcntl
import os
import re

import torch

from engine.checkpoints.files import short_list
from engine.checkpoints.identity import VERSION as IDENTITY_VERSION
from engine.checkpoints.identity import IdentityMismatch, check_or_record, identity_digest, plain
from engine.errors import EngineError
from engine.training.stage_config import StageConfig, stage_identity

__all__ = ["LOCK_FILE", "stage_contents", "run_contents", "check_stage_directory", "lock_run_directory",
           "unlock_run_directory", "check_not_in_use"]

LOCK_FILE = "run.lock"

# what shows that a stage trained (engine/training/loop.py writes its config.json and an empty checkpoints/ first,
# before it has checked anything, so those alone do not)
_STAGE_FILES = ("identity.json", "ema.safetensors", "log.jsonl")
_STAGE_DIRS = ("checkpoints", "snapshots", "grids")
_CHECKPOINT = re.compile(r"^ckpt-(\d{12})(\.pt)?$")     # engine/training/run_state.py's names


def stage_contents(stage_dir: str) -> list[str]:
    """The files in `stage_dir` that a stage's training left (identity, release, log, checkpoints, snapshots,
    grids), by name; empty for a stage that has not started."""
    if not os.path.isdir(stage_dir):
        return []
    held = [n for n in _STAGE_FILES if os.path.isfile(os.path.join(stage_dir, n))]
    held += [f"{d}/{n}" for d in _STAGE_DIRS if os.path.isdir(os.path.join(stage_dir, d))
             for n in sorted(os.listdir(os.path.join(stage_dir, d))) if not n.startswith(".")]   # not temporaries
    return held


def run_contents(out: str, depth: int = 4) -> list[str]:
    """What in `out` belongs to a run that has trained: results.json and every stage directory holding a stage's
    files, as paths relative to `out`. Stages sit at `<arm>/<stage>`, or deeper where arms are nested
    (`s0/mf/<stage>`, recipes/digits_mf_post_training.py); the search stops `depth` levels down."""
    if not os.path.isdir(out):
        return []
    held = [n for n in ("results.json",) if os.path.isfile(os.path.join(out, n))]
    for directory, subdirs, _ in os.walk(out):
        level = os.path.relpath(directory, out).count(os.sep) + 1 if directory != out else 0
        if level and stage_contents(directory):
            held.append(os.path.relpath(directory, out))
            subdirs.clear()      # a stage's own folders are not stages
        elif level >= depth:
            subdirs.clear()
        else:
            subdirs.sort()
    return held


def _checkpoint_identity(directory: str) -> tuple[str, str, str] | None:
    """(checkpoint path, 'identity' | 'fingerprint', value) that the newest readable checkpoint in `directory` was
    written for — the SHA-256 of its stage's identity, or for checkpoints older than identities the StageConfig
    fingerprint — read without loading its tensors; None when there is none."""
    names = sorted((n for n in os.listdir(directory) if _CHECKPOINT.match(n)), reverse=True) \
        if os.path.isdir(directory) else []
    for name in names:
        path = os.path.join(directory, name)
        try:
            if os.path.isdir(path):   # a sharded checkpoint: its plain values are extra.pt
                extra = torch.load(os.path.join(path, "extra.pt"), map_location="cpu", weights_only=True)
            else:
                extra = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:   # noqa: BLE001 - damaged: the loop skips it for the previous one, so do we
            continue
        if isinstance(extra, dict) and extra.get("identity"):
            return path, "identity", extra["identity"]
        if isinstance(extra, dict) and extra.get("fingerprint"):
            return path, "fingerprint", extra["fingerprint"]
    return None


def check_stage_directory(stage_dir: str, cfg: StageConfig, net, objective, data) -> None:
    """Refuse, before anything is written, a stage whose directory holds results of other settings or inputs:
    compared with its identity.json, or without one with the identity its newest checkpoint was written for
    (engine/training/run_state.py keeps its SHA-256 in every checkpoint); a stage with results and neither is
    refused, saying how to go on. A stage that has not started passes. Reads only."""
    held = stage_contents(stage_dir)
    if not held:
        return
    hint = f"Use another --out directory, or move {stage_dir} away to train the stage again"
    identity = stage_identity(cfg, net, objective, data)
    path = os.path.join(stage_dir, "identity.json")
    if os.path.isfile(path):
        check_or_record(path, identity, f"stage {cfg.name!r}", record=False, hint=hint)
        return
    found = _checkpoint_identity(os.path.join(stage_dir, "checkpoints"))
    if found is None:
        raise IdentityMismatch(f"stage {cfg.name!r} in {stage_dir} holds results ({short_list(held, 3)}) but no "
                               f"identity.json or readable checkpoint recording what it was trained with, so this "
                               f"command cannot be checked against it; restore {path}. " + hint)
    ckpt, kind, recorded = found
    current = identity_digest({"version": IDENTITY_VERSION, **plain(identity)}) if kind == "identity" \
        else cfg.fingerprint()
    if recorded != current:
        raise IdentityMismatch(f"stage {cfg.name!r} in {stage_dir} was started with other settings or inputs: its "
                               f"identity.json is missing and {ckpt} was written for stage {kind} "
                               f"{recorded[:12]}…, this command's is {current[:12]}…; refusing to resume it. " + hint)


_HELD_LOCKS: dict[str, int] = {}   # run directory (real path) → the descriptor of its lock, held by this process


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"process {text}" if text.isdigit() else "another process"


def lock_run_directory(out: str) -> None:
    """Take `<out>/run.lock` (fcntl.flock, exclusive, non-blocking) and write this process's pid into it; held
    until `unlock_run_directory` or the process's end (the kernel releases a dead process's flock, so a killed
    run leaves no stale lock). EngineError naming the holder's pid when another process holds it. Re-entrant within
    a process: a recipe run twice in one interpreter (tests, notebooks) reuses its lock."""
    key = os.path.realpath(out)
    if key in _HELD_LOCKS:
        return
    path = os.path.join(out, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise EngineError(f"--out {out} is in use by {holder}, which holds {path}; wait for it to finish, or use "
                          f"another --out directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[key] = fd


def unlock_run_directory(out: str) -> None:
    fd = _HELD_LOCKS.pop(os.path.realpath(out), None)
    if fd is not None:
        os.close(fd)   # closing the descriptor releases the flock


def check_not_in_use(out: str) -> None:
    """EngineError when another process holds `<out>/run.lock`; creates nothing (a dry run's check)."""
    path = os.path.join(out, LOCK_FILE)
    if os.path.realpath(out) in _HELD_LOCKS or not os.path.isfile(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise EngineError(f"--out {out} is in use by {_holder(fd)}, which holds {path}; wait for it to finish, or "
                          f"use another --out directory") from None
    finally:
        os.close(fd)
