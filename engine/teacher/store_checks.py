"""What the trajectory store (trajectory_cache.py) checks before it writes: what its inputs are — the teacher's
weights and classes, the data's fingerprint and labels — and whether its disk can hold it."""
from __future__ import annotations

import errno
import os
import shutil

import numpy as np
import torch

from engine.checkpoints.identity import state_fingerprint, tensor_fingerprint

__all__ = ["teacher_label_dim", "describe_teacher", "describe_data", "labels_of", "existing_parent", "free_bytes",
           "human_bytes", "DiskFull", "disk_full", "reserve_blocks", "remove_file"]


# ---- inputs -------------------------------------------------------------------------------------------------------

def teacher_label_dim(teacher) -> int | None:
    """The number of classes `teacher` is conditioned on (0: unconditional), or None where it does not say: an EDM
    network's `label_dim` (engine/precond.py), a Gaussian mixture's `num_classes` (a bound `denoise` names its
    mixture)."""
    owner = getattr(teacher, "__self__", teacher)
    for obj in (owner, getattr(owner, "model", None)):
        for name in ("label_dim", "num_classes"):
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def describe_teacher(teacher) -> dict:
    """What an in-memory teacher computes: its class and a hash of its weights (a module's state dict, or the tensors
    of the object a bound method belongs to). The command line records its file's SHA-256 instead."""
    owner = getattr(teacher, "__self__", None)
    obj = teacher if owner is None else owner
    out = {"class": type(obj).__qualname__}
    if owner is not None:
        out["method"] = getattr(teacher, "__name__", "")
    if isinstance(obj, torch.nn.Module):
        out["state_sha256"] = state_fingerprint(obj)
    else:
        tensors = sorted((k, v) for k, v in getattr(obj, "__dict__", {}).items() if isinstance(v, torch.Tensor))
        if tensors:
            out["tensors"] = [k for k, _ in tensors]
            out["tensors_sha256"] = tensor_fingerprint(*(v for _, v in tensors))
    return out


def describe_data(data) -> dict:
    """The data as a training stage's identity describes it (engine/training/stage_config.py `stage_identity`)."""
    fingerprint = getattr(data, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else {"class": type(data).__name__, "items": len(data)}


def labels_of(data, idx: np.ndarray) -> np.ndarray:
    """Class indices of the images `idx`, without decoding images where the source allows."""
    labels = getattr(data, "labels", None)
    if isinstance(labels, torch.Tensor):                                      # TensorSource
        return labels[torch.as_tensor(idx)].cpu().numpy()
    dataset = getattr(data, "dataset", None)
    if callable(getattr(dataset, "get_label", None)):                         # ImageDatasetSource: one-hot rows
        return np.array([int(np.argmax(dataset.get_label(int(i)))) for i in idx], dtype=np.int64)
    return np.concatenate([data.batch(torch.as_tensor(idx[i:i + 1024]), "cpu")[1].cpu().numpy()
                           for i in range(0, len(idx), 1024)])


# ---- disk space ---------------------------------------------------------------------------------------------------

def existing_parent(path: str) -> str:
    """`path`, or its nearest ancestor that exists: where a file about to be made will take its space."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(existing_parent(path)).free
    except OSError:
        return None


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"


class DiskFull(OSError):
    """OSError(ENOSPC) whose message says what failed and what is left; engine.cli.run_main prints it as one line."""


def disk_full(path: str, doing: str, outcome: str) -> OSError:
    """As engine/checkpoints/files.py reports a full disk: what was being written, the free space, the outcome."""
    free = free_bytes(path)
    free = "free space unknown" if free is None else f"{human_bytes(free)} free"
    return DiskFull(errno.ENOSPC, f"no space left on device while {doing} for {path} ({free}); {outcome}")


def reserve_blocks(fd: int, nbytes: int, path: str, outcome: str) -> None:
    """Give the file `fd` (a store's states.bin) all its blocks now. A write through the memory map into a hole
    that a full disk cannot fill is SIGBUS ("Bus error", exit 135), which nothing can turn into a message;
    posix_fallocate makes the full disk an ENOSPC here. Where the filesystem cannot reserve (macOS has no
    posix_fallocate; ZFS answers EOPNOTSUPP) the file is sparse, as np.memmap makes it."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None and nbytes:
        try:
            fallocate(fd, 0, nbytes)
            return
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(path, f"reserving {nbytes} bytes ({human_bytes(nbytes)})", outcome) from None
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
    if os.fstat(fd).st_size != nbytes:
        os.ftruncate(fd, nbytes)


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
