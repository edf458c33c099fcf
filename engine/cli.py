"""How every command-line entry point ends: errors about the user's input as one line, not a traceback.

    if __name__ == "__main__":
        run_main(main)

`EngineError` (and the I/O errors of named files: not found, a directory, permission, a full disk) print
`<program>: error: <message>` and exit with status 2, as argparse does for a bad flag — a stage stopped by a
non-finite loss too (`NonFiniteError`, engine/training/loop.py: its settings' failure, its saved checkpoints kept),
and a damaged input found by a data-loading worker (engine/data/loader.py hands the worker's error back as it was
raised). Ctrl-C outside a stage (inside one the loop saves and exits itself, engine/training/loop.py) prints
`interrupted` and exits with 130. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys

import torch

from engine.errors import EngineError

__all__ = ["run_main", "USER_ERRORS", "resolve_device", "check_run_directory", "check_writable_under"]

USER_ERRORS = (EngineError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)


def run_main(main, argv=None):
    prog = os.path.basename(sys.argv[0]) or "engine"
    try:
        return main(argv)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            print(f"{prog}: error: {e.strerror if e.filename is None else e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def resolve_device(spec: str | None) -> str:
    """--device: cpu, cuda or cuda:N, checked against what this PyTorch can use (default: cuda if available)."""
    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise EngineError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return spec
    if device.type != "cuda":
        raise EngineError(f"--device {spec!r}: the engine runs on cpu or cuda, not {device.type}")
    if not torch.cuda.is_available():
        raise EngineError(f"--device {spec}: this PyTorch has no usable CUDA device (torch.cuda.is_available() is "
                          f"False; a CPU build, or no driver); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise EngineError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices "
                          f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    return spec


def check_run_directory(path: str) -> None:
    """--out must be a folder, or creatable: not a file, not under a file, and in a writable place."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise EngineError(f"--out {path} is a file; the run directory must be a folder")
    check_writable_under(path, os.path.abspath(path), "the run directory")


def check_writable_under(path: str, start: str, what: str) -> None:
    """The nearest existing folder at or above `start` must be a writable folder: `what` (--out `path`) is created
    there, and a file in its place or no permission is said before any work rather than after it."""
    parent = start
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise EngineError(f"--out {path}: {parent} is a file, so {what} cannot be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EngineError(f"--out {path}: {parent} is not writable")
