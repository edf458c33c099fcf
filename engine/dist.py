"""The one place that talks to torch.distributed: process-group setup from torchrun's environment and the few
collectives the engine needs. Without torchrun (no WORLD_SIZE, or 1) everything is a single-process no-op.

    python -m torch.distributed.run --nproc_per_node=N -m engine.evaluate ...   # or torchrun

Backend: NCCL when CUDA is available, gloo otherwise (CPU runs, CI).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as td


def world_size() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def init() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) if there is one;
    return this rank's device (cuda:LOCAL_RANK, or cpu)."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if n > 1 and not td.is_initialized():
        td.init_process_group(backend="nccl" if cuda else "gloo")
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def shutdown() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        td.barrier()


def gather_objects(obj) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    td.gather_object(obj, out, dst=0)
    return out
