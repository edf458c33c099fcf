"""A stage's checkpoints on disk: written atomically, the last K kept, the newest readable one found on resume.

Two forms share one directory and one numbering (images seen, 12 digits):

    ckpt-<nimg>.pt   a single-process run's plain state dict (`engine.checkpoints.save_checkpoint`: temporary
                     file, fsync, rename);
    ckpt-<nimg>/     a distributed run's torch.distributed.checkpoint directory (each rank's shards + extra.pt;
                     engine.dist.save_sharded: written under a hidden name, renamed when every rank is done).

The loop reads either form at any world size (engine/loop.py). A checkpoint that fails to load (truncated by a
crash of the disk or a copy, corrupt) is reported and skipped in favour of the previous one; it is never deleted,
so nothing is lost to a false alarm. Temporaries left by a process killed mid-save are removed at start-up (by rank
0 under torchrun)."""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil

from engine import dist
from engine.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt-(\d{12})(\.pt)?$")


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

    def latest(self, map_location="cpu", load=None):
        """The newest checkpoint that loads on every rank, as (what `load(path)` returned, path), or None. `load`
        defaults to reading a single-file checkpoint (the loop passes one that reads either form into the model).
        A checkpoint any rank cannot read is reported and skipped in favour of the previous one, by all ranks
        together."""
        load = load or (lambda path: load_checkpoint(path, map_location=map_location))
        for _, path in reversed(self.list()):
            error = None
            try:
                result = load(path)
            except (CheckpointError, OSError, RuntimeError, ValueError, KeyError) as e:
                error = e
            if dist.any_rank(error is not None):
                warn_unreadable(path, error or "another rank could not read it")
                continue
            return result, path
        return None


def warn_unreadable(path: str, error: Exception) -> None:
    log.warning("skipping unreadable checkpoint: %s", error)
    if dist.rank() == 0:
        print(f"warning: skipping unreadable checkpoint {path}: {error}", flush=True)
