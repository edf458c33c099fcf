"""A stage's checkpoints on disk: written atomically, the last K kept, the newest readable one found on resume.

Files are `<dir>/ckpt-<images seen, 12 digits>.pt`, each a plain state dict (`engine.checkpoints.save_checkpoint`:
temporary file, fsync, rename). A checkpoint that fails to load (truncated by a crash of the disk or a copy,
corrupt) is reported and skipped in favour of the previous one; it is never deleted, so nothing is lost to a
false alarm. Temporary files left by a process killed mid-save are removed at start-up."""
from __future__ import annotations

import glob
import logging
import os
import re

from engine.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


class CheckpointRing:
    def __init__(self, directory: str, keep: int = 3):
        if keep < 1:
            raise ValueError("keep at least one checkpoint")
        self.directory, self.keep = directory, keep
        os.makedirs(directory, exist_ok=True)
        for tmp in glob.glob(os.path.join(directory, ".ckpt-*.tmp")):
            os.remove(tmp)  # a save interrupted by SIGKILL; the rename never happened, so no checkpoint is lost

    def path(self, nimg: int) -> str:
        return os.path.join(self.directory, f"ckpt-{nimg:012d}.pt")

    def list(self) -> list[tuple[int, str]]:
        """(images seen, path), oldest first."""
        found = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.directory, name)))
        return sorted(found)

    def save(self, state: dict, nimg: int) -> str:
        path = self.path(nimg)
        save_checkpoint(path, state)
        # Prune only after the new file is in place, and only readable-or-not older files beyond `keep`.
        for _, old in self.list()[:-self.keep]:
            os.remove(old)
        return path

    def latest(self, map_location="cpu") -> tuple[dict, str] | None:
        """The newest checkpoint that loads, or None when there is none."""
        for nimg, path in reversed(self.list()):
            try:
                return load_checkpoint(path, map_location=map_location), path
            except CheckpointError as e:
                log.warning("skipping unreadable checkpoint: %s", e)
                print(f"warning: skipping unreadable checkpoint {path}: {e}", flush=True)
        return None
