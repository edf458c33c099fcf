"""State dicts against modules: which keys are missing, unexpected or of the wrong shape, and the strict copy every
loader of the engine goes through. Imports only torch (and engine.checkpoints.files for the error type)."""
from __future__ import annotations

import torch
from torch import nn

from engine.checkpoints.files import CheckpointError, short_list

__all__ = ['state_mismatch', 'mismatch_summary', 'load_network_state']


def state_mismatch(expected: dict, state: dict, ignore=()) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) keys of `state` against `expected` (a module's state_dict);
    keys in `ignore` may be present without being expected."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in ignore]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, wrong


def mismatch_summary(expected: dict, state: dict, limit: int = 4) -> str | None:
    """One line naming the first few missing, unexpected and wrong-shape keys, or None when `state` fits."""
    missing, unexpected, wrong = state_mismatch(expected, state)
    more = lambda names: ", ".join(names[:limit]) + (" …" if len(names) > limit else "")
    parts = [f"missing {more(missing)}" if missing else "",
             f"unexpected {more(unexpected)}" if unexpected else "",
             "wrong shape " + ", ".join(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                                        for k in wrong[:3]) if wrong else ""]
    return "; ".join(p for p in parts if p) or None


def load_network_state(module: nn.Module, state_dict: dict[str, torch.Tensor], *, ignore=()) -> nn.Module:
    """Copy `state_dict` into `module` by name, strictly: every key of the module must be present with the
    same shape, and the source may hold no other key except those in `ignore` (e.g. `TEACHER_ONLY_KEYS` when
    an EDM teacher is loaded into an augment-free student). `resample_filter` buffers are fixed FIR
    filters: they are checked equal rather than trusted. Errors name every offending key."""
    dst = module.state_dict()
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f'state dict entries that are not tensors: {short_list(not_tensors)}')
    missing, unexpected, wrong = state_mismatch(dst, state_dict, ignore)
    shapes = [f'{k}: checkpoint {list(state_dict[k].shape)} vs network {list(dst[k].shape)}' for k in wrong]
    filters = [k for k in dst if k.endswith('resample_filter') and k in state_dict
               and state_dict[k].shape == dst[k].shape
               and not torch.equal(state_dict[k].to(dst[k].dtype).cpu(), dst[k].cpu())]
    problems = []
    if missing:
        problems.append(f'missing from the checkpoint: {short_list(missing)}')
    if unexpected:
        problems.append(f'unexpected in the checkpoint: {short_list(unexpected)}')
    if shapes:
        problems.append(f'shape mismatch: {short_list(shapes)}')
    if filters:
        problems.append(f'resample_filter differs (another resample_filter setting?): {short_list(filters)}')
    if problems:
        raise CheckpointError(f'checkpoint does not fit {type(module).__name__}: ' + '; '.join(problems))
    module.load_state_dict({k: state_dict[k] for k in dst}, strict=True)
    return module
