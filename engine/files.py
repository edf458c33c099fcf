"""Files of the engine's own and of pretrained weights, at the lowest level: the one error type, atomic writes,
weights-only state-dict checkpoints, SHA-256 hashes, and the lookup of pretrained-weight files. A leaf: it imports
only torch and the standard library, so detectors, datasets and stores use it without pulling in any network.

* `atomic_write(path, write)`: a temporary file beside `path`, fsync, `os.replace`; readers see the old file or
  the complete new one, never a partial one.
* `save_checkpoint` / `load_checkpoint`: plain state dicts (STYLE.md "Training state is state dicts only"),
  checked before writing and read with `torch.load(weights_only=True)`.
* `weights_file`, `read_state_dict_file`: a pretrained file named by argument or environment variable, with one
  clear error naming the file and where to get it.
"""
from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import uuid
import zipfile
from typing import Callable

import torch
from torch import nn

__all__ = ['CheckpointError', 'short_list', 'atomic_write', 'fsync_dir', 'check_weights_only', 'save_checkpoint',
           'load_checkpoint', 'file_sha256', 'weights_file', 'read_state_dict_file']


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit its destination; the message names the problem."""


def short_list(names, limit=20) -> str:
    """The first `limit` names joined by commas, and how many more there are."""
    names = list(names)
    shown = ', '.join(names[:limit])
    return shown + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')



# ---------------------------------------------------------------------------------------------------------
# Our checkpoints: plain state dicts, written atomically

_WEIGHTS_ONLY_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


def check_weights_only(obj, where: str) -> None:
    """Raise if `obj` holds anything `torch.load(weights_only=True)` would refuse, naming where it is."""
    t = type(obj)
    if t in (dict, collections.OrderedDict):
        for k, v in obj.items():
            check_weights_only(k, f'{where} key {k!r}')
            check_weights_only(v, f'{where}[{k!r}]')
    elif t in (list, tuple, set, torch.Size):
        for i, v in enumerate(obj):
            check_weights_only(v, f'{where}[{i}]')
    elif not (t in (torch.Tensor, nn.Parameter) or isinstance(obj, _WEIGHTS_ONLY_LEAVES)):
        raise CheckpointError(f'{where} is a {t.__module__}.{t.__qualname__}; checkpoints hold only state '
                              'dicts (tensors, numbers, strings, lists, tuples, dicts) so that they load with '
                              'weights_only=True')


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:     # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through `write(file)` to a temporary file beside `path`, fsync it, then `os.replace` it over
    `path`: readers see the old file or the complete new one, never a partial one. On any failure the
    temporary file is removed and `path` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # umask applies, as for open()
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def save_checkpoint(path, state: dict) -> None:
    """`torch.save(state, path)`, atomically. `state` must be plain state dicts (checked before writing, so a
    module or an arbitrary object fails here rather than at resume time)."""
    if not isinstance(state, dict):
        raise CheckpointError(f'checkpoint state is a {type(state).__name__}, expected a dict')
    check_weights_only(state, 'state')
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location='cpu') -> dict:
    """Load a checkpoint written by `save_checkpoint` with `torch.load(weights_only=True)`."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise CheckpointError(f'{os.fspath(path)}: corrupt or truncated checkpoint (not a complete torch.save '
                              'zip archive)')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as e:
        if 'weights only' in str(e).lower():
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f'{os.fspath(path)}: refused by the weights-only loader (not a plain state '
                                  f'dict): {first}') from None
        raise CheckpointError(f'{os.fspath(path)}: corrupt or truncated checkpoint ({e})') from None
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f'{os.fspath(path)}: corrupt or truncated checkpoint '
                              f'({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ""})') from None


def file_sha256(path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Pretrained weights

def weights_file(path, env: str, needs: str, where: str) -> str:
    """The path of a pretrained-weights file: `path`, else the environment variable `env`; FileNotFoundError saying
    what `needs` it, the path that was not found, and `where` to get it when neither names an existing file."""
    path = path or os.environ.get(env)
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{needs}{': not found: ' + str(path) if path else ''}; {where}")
    return path


def read_state_dict_file(path) -> dict:
    """A pretrained-weights file that is a plain state dict (`torch.load(weights_only=True)`), or a ValueError
    naming the file and what it holds instead."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'{path}: not a readable PyTorch state dict ({type(e).__name__}: {e})') from None
    if not isinstance(state, dict):
        raise ValueError(f'{path}: expected a state dict, got {type(state).__name__}')
    return state
