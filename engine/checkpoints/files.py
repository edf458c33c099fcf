"""Files of the engine's own and of pretrained weights, at the lowest level: the one error type, atomic writes,
weights-only state-dict checkpoints, SHA-256 hashes, and the lookup of pretrained-weight files. A leaf: it imports
only torch and the standard library, so detectors, datasets and stores use it without pulling in any network.

* `atomic_write(path, write)`: a temporary file beside `path`, fsync, `os.replace`; readers see the old file or
  the complete new one, never a partial one. A full disk is reported as such ("no space left on device"), with
  the destination untouched.
* `save_checkpoint` / `load_checkpoint`: plain state dicts (STYLE.md "Training state is state dicts only"),
  checked before writing and read with `torch.load(weights_only=True)`. Each checkpoint gets its SHA-256 beside
  it (`<file>.sha256`, sha256sum's format), written before the file itself is put in place, and verified on
  load: flipped or truncated bytes raise `UnreadableCheckpoint` (torch.load does not check the zip CRCs).
* `weights_file`, `read_state_dict_file`: a pretrained file named by argument or environment variable, with one
  clear error naming the file and where to get it.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import io
import os
import pickle
import re
import shutil
import uuid
import warnings
import zipfile
from typing import Callable

import torch
from torch import nn

from engine.errors import EngineError

__all__ = ['CheckpointError', 'UnreadableCheckpoint', 'short_list', 'atomic_write', 'fsync_dir',
           'check_weights_only', 'save_checkpoint', 'load_checkpoint', 'verify_sidecar', 'sidecar_path',
           'file_sha256', 'weights_file', 'read_state_dict_file']


class CheckpointError(EngineError):
    """A checkpoint that cannot be read, or does not fit its destination; the message names the problem."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint whose bytes are damaged (truncated, corrupt, or not what its recorded hash says): a resume
    skips it in favour of the previous one. A checkpoint that reads but does not fit is a CheckpointError, and
    refused."""


def short_list(names, limit=20) -> str:
    """The first `limit` names joined by commas, and how many more there are."""
    names = list(names)
    shown = ', '.join(str(n) for n in names[:limit])
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


class _HashingWriter:
    """A binary file that hashes what is written through it, and remembers an OSError raised by the file: torch's
    zip writer turns such an error into an opaque RuntimeError ("unexpected pos"), so the cause is kept here."""

    def __init__(self, f):
        self.f, self.sha256, self.error = f, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha256.update(memoryview(data)[:n] if n is not None else data)
        return n

    def flush(self):
        self.f.flush()


def sidecar_path(path) -> str:
    """Where the SHA-256 of a checkpoint file is kept: `<file>.sha256`."""
    return os.fspath(path) + '.sha256'


def _disk_full(path: str, error: BaseException) -> OSError:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = f'{shutil.disk_usage(directory).free / 2 ** 20:.1f} MiB free'
    except OSError:
        free = 'free space unknown'
    return OSError(errno.ENOSPC, f'no space left on device while writing {path} ({free} in {directory}); the '
                                 f'previous file, if any, is untouched')


def atomic_write(path, write: Callable[[io.BufferedWriter], None], *, sidecar: bool = False) -> str:
    """Write through `write(file)` to a temporary file beside `path`, fsync it, then `os.replace` it over
    `path`: readers see the old file or the complete new one, never a partial one. On any failure the
    temporary file is removed and `path` is untouched; a full disk raises OSError(ENOSPC) saying so.

    Returns the SHA-256 of the bytes written. With `sidecar`, it is also written to `<path>.sha256` (atomically,
    before `path` itself is replaced), so a checkpoint that exists always has its hash beside it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # umask applies, as for open()
    hashing = None
    try:
        with os.fdopen(fd, 'wb') as f:
            hashing = _HashingWriter(f)
            write(hashing)
            f.flush()
            os.fsync(f.fileno())
        digest = hashing.sha256.hexdigest()
        kept = _recorded_hashes(path) if sidecar and os.path.exists(path) else []
        if sidecar:   # the file being replaced stays valid until the rename: both hashes, for that moment
            _write_sidecar(path, [digest, *kept])
        os.replace(tmp, path)
        if kept:
            _write_sidecar(path, [digest])
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = e if isinstance(e, OSError) else (hashing.error if hashing is not None else None)
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, cause) from None
        raise
    fsync_dir(directory)
    return digest


def save_checkpoint(path, state: dict) -> str:
    """`torch.save(state, path)`, atomically, with its SHA-256 beside it (module docstring); returns the hash.
    `state` must be plain state dicts (checked before writing, so a module or an arbitrary object fails here
    rather than at resume time)."""
    if not isinstance(state, dict):
        raise CheckpointError(f'checkpoint state is a {type(state).__name__}, expected a dict')
    check_weights_only(state, 'state')
    return atomic_write(path, lambda f: torch.save(state, f), sidecar=True)


def _recorded_hashes(path) -> list[str]:
    side = sidecar_path(path)
    if not os.path.exists(side):
        return []
    with open(side, encoding='utf-8', errors='replace') as f:
        return [line.split()[0] for line in f if line.split()]


def _write_sidecar(path, hashes: list[str]) -> None:
    name = os.path.basename(path)
    atomic_write(sidecar_path(path), lambda g: g.write(''.join(f'{h}  {name}\n' for h in hashes).encode()))


def verify_sidecar(path) -> bool:
    """Check a file against the SHA-256 recorded beside it: True when it matches, False when none was recorded
    (files written before checkpoints carried one), UnreadableCheckpoint when it differs. (While a file is being
    replaced its sidecar lists the old and the new hash, so a crash between the two renames leaves the old file
    valid.)"""
    side = sidecar_path(path)
    if not os.path.exists(side):
        return False
    recorded = _recorded_hashes(path)
    actual = file_sha256(path)
    if actual not in recorded:
        raise UnreadableCheckpoint(f'{os.fspath(path)}: its bytes do not match the SHA-256 recorded in {side} '
                                   f'(recorded {recorded[0][:16] if recorded else "nothing"}…, found '
                                   f'{actual[:16]}…): flipped or truncated bytes')
    return True


def load_checkpoint(path, map_location='cpu', verify: bool = True) -> dict:
    """Load a checkpoint written by `save_checkpoint` with `torch.load(weights_only=True)`, after checking its
    bytes against the recorded SHA-256 (a checkpoint without one loads with a warning)."""
    path = os.fspath(path)
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise UnreadableCheckpoint(f'{path}: corrupt or truncated checkpoint (not a complete torch.save zip '
                                   'archive)')
    if verify and os.path.isfile(path) and not verify_sidecar(path):
        warnings.warn(f'{path} has no recorded SHA-256 ({os.path.basename(sidecar_path(path))}; written by an older '
                      f'version of the engine): loaded without an integrity check', stacklevel=2)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as e:
        if 'weights only' in str(e).lower():
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f'{path}: refused by the weights-only loader (not a plain state dict): '
                                  f'{first}') from None
        raise UnreadableCheckpoint(f'{path}: corrupt or truncated checkpoint ({e})') from None
    except (RuntimeError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UnreadableCheckpoint(f'{path}: corrupt or truncated checkpoint '
                                   f'({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ""})') \
            from None


def file_sha256(path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Pretrained weights

WEIGHTS_DIR_ENV = 'ENGINE_WEIGHTS_DIR'
_weights_dir: str | None = None


def set_weights_dir(path) -> None:
    """The directory where pretrained files are looked up by their published names (the recipes' `--weights
    DIR`); None unsets it. ENGINE_WEIGHTS_DIR does the same for any process."""
    global _weights_dir
    if path is not None and not os.path.isdir(path):
        raise EngineError(f'--weights {path}: not a directory')
    _weights_dir = None if path is None else os.path.abspath(path)


def weights_dir() -> str | None:
    return _weights_dir or os.environ.get(WEIGHTS_DIR_ENV) or None


def in_weights_dir(*names: str) -> str | None:
    """The first of the published file `names` present in the weights directory, or None."""
    d = weights_dir()
    for name in names if d else ():
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


def weights_file(path, env: str, needs: str, where: str, names=()) -> str:
    """The path of a pretrained-weights file: `path`, else the environment variable `env`, else the first of its
    published file `names` in the weights directory (`--weights DIR`); FileNotFoundError saying what `needs` it,
    the path that was not found, and `where` to get it when none names an existing file."""
    path = path or os.environ.get(env) or in_weights_dir(*names)
    if not path or not os.path.exists(path):
        in_dir = f'; or put {" or ".join(names)} in the --weights directory' if names else ''
        raise FileNotFoundError(f"{needs}{': not found: ' + str(path) if path else ''}; {where}{in_dir}")
    return path


def read_state_dict_file(path, mmap: bool = False) -> dict:
    """A pretrained-weights file that is a plain state dict (`torch.load(weights_only=True)`), or an EngineError
    naming the file and what it holds instead. torch's own message is not passed on: for a pickle naming other
    globals it advises `weights_only=False`, which would run the file's code. `mmap` maps a zip-format file
    instead of reading it (a legacy-format file is read whole)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise EngineError(f'{path} is a directory; expected a weights file')
    try:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and ('mmap' in str(e) or 'zip' in str(e))):
                raise
            state = torch.load(path, map_location='cpu', weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:   # noqa: BLE001 - text, a truncated zip, another format: torch raises many types
        with open(path, 'rb') as f:
            head = f.read(2)
        if not (head.startswith(b'PK') or head[:1] == b'\x80'):
            raise EngineError(f'{path} is not a PyTorch file (neither a torch.save zip archive nor a pickle); '
                              'expected a state dict') from None
        if isinstance(e, pickle.UnpicklingError):
            names = re.findall(r'GLOBAL ([\w.]+)', str(e))
            what = f'it names {names[0]}, which a weights file never holds' if names else 'it is not a weights pickle'
            raise EngineError(f'{path}: refused without running anything: {what}. Expected a PyTorch state dict '
                              '(torch.save of tensors)') from None
        raise EngineError(f'{path}: not a readable PyTorch state dict ({type(e).__name__}: '
                          f'{str(e).splitlines()[0][:160] if str(e) else "no detail"})') from None
    if not isinstance(state, dict):
        raise EngineError(f'{path}: expected a state dict, got {type(state).__name__}')
    return state
