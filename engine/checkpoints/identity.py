"""What a run is: the settings and inputs that determine its result, recorded when it starts and compared on every
rerun, so that resuming means continuing the same computation (docs/runs.md).

A run's identity (`<out>/identity.json`, written by engine/pipelines/recipe.py) holds the recipe's resolved
configuration,
the flags that change the result (seed, `--kimg-scale`, `--smoke`, the device type) and fingerprints of the files
it reads (`--data`, `--teacher`, and whatever a recipe adds); a stage's identity (`<stage>/identity.json`, written
by engine/training/loop.py) holds its StageConfig, the objective's settings, the network's architecture, a hash of its
initial weights and a fingerprint of its data. Settings that do not change the result — logging, evaluation and
checkpoint intervals, how many checkpoints are kept, the number of processes and how the network is sharded —
are left out, so they may change on a rerun.

Comparison is key by key (`compare`): a changed value, a setting the run had and the rerun lacks, or a new
setting away from its default is a mismatch, reported with every key named (old → new). A setting added to the
engine after a run started, at its default, is not: upgrading the engine does not orphan runs. `VERSION` is bumped
by hand when what an identity holds changes meaning (not with the engine's version).

File fingerprints are cheap where files are large and read only in part: a dataset is its size plus a hash of its
index (a zip's central directory — every member's name, size and CRC — or a folder's sorted listing with sizes),
never its pixels; weight files (teacher, guide, initialisation) are hashed whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct

import torch

from engine.checkpoints.files import atomic_write, file_sha256
from engine.errors import EngineError

__all__ = ["VERSION", "IdentityMismatch", "file_fingerprint", "dataset_fingerprint", "tensor_fingerprint",
           "state_fingerprint", "plain", "compare", "check_or_record", "read_identity", "identity_digest"]

VERSION = 1


class IdentityMismatch(EngineError):
    """A rerun whose settings or inputs differ from those of the run in its directory."""


# ---- fingerprints -------------------------------------------------------------------------------------------------

def file_fingerprint(path) -> dict:
    """A weights file: its name, size and SHA-256."""
    path = os.fspath(path)
    return {"file": os.path.basename(path), "size": os.path.getsize(path), "sha256": file_sha256(path)}


def _zip_index(path: str) -> bytes:
    """The central directory of a zip archive (every member's name, sizes, CRC and offset), read from its end
    record; falls back to hashing the member list through zipfile for archives with a comment or zip64."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 22))
        end = f.read(22)
        if len(end) == 22 and end[:4] == b"PK\x05\x06":
            cd_size, cd_offset = struct.unpack("<II", end[12:20])
            if cd_offset + cd_size <= size:
                f.seek(cd_offset)
                return f.read(cd_size)
    import zipfile
    with zipfile.ZipFile(path) as z:
        return json.dumps([(i.filename, i.file_size, i.CRC) for i in z.infolist()]).encode()


def dataset_fingerprint(path) -> dict:
    """A dataset file or folder: size plus the hash of its index (module docstring)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        listing, total = [], 0
        for directory, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                full = os.path.join(directory, name)
                n = os.path.getsize(full)
                listing.append((os.path.relpath(full, path).replace(os.sep, "/"), n))
                total += n
        index = json.dumps(listing).encode()
        labels = os.path.join(path, "dataset.json")
        if os.path.isfile(labels):
            index += open(labels, "rb").read()
        return {"folder": os.path.basename(os.path.normpath(path)), "size": total,
                "index_sha256": hashlib.sha256(index).hexdigest()}
    return {"file": os.path.basename(path), "size": os.path.getsize(path),
            "index_sha256": hashlib.sha256(_zip_index(path)).hexdigest()}


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 over dtypes, shapes and bytes of in-memory tensors (embedded datasets, synthetic data)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and values): what its weights are."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor_fingerprint(t).encode())
    return h.hexdigest()


# ---- plain, comparable values -------------------------------------------------------------------------------------

def plain(value):
    """A JSON-able, comparable form of a setting: dataclasses and dicts as dicts, tuples as lists, non-finite floats
    as strings, torch dtypes and devices by name, modules and functions by their class or qualified name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.nn.Module):
        return type(value).__name__
    if callable(value):
        return getattr(value, "__qualname__", type(value).__name__)
    return repr(value)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare(recorded: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """The differences between two identities, one line each ('key: old → new'); empty when they agree. A key the
    current identity has and the recorded one lacks is no difference when its value is its default (`defaults`,
    in the same dotted names)."""
    a, b, defaults = _flat(recorded), _flat(current), _flat(defaults or {})
    lines = []
    for k in sorted(set(a) | set(b)):
        if k in a and k in b:
            if a[k] != b[k]:
                lines.append(f"{k}: {json.dumps(a[k])} → {json.dumps(b[k])}")
        elif k in a:
            lines.append(f"{k}: {json.dumps(a[k])} → (not set)")
        elif k not in defaults or defaults[k] != b[k]:
            lines.append(f"{k}: (not set) → {json.dumps(b[k])}")
    return lines


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_identity(path) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise IdentityMismatch(f"{path} cannot be read ({e}); it records what the run in this directory is. "
                               f"Restore it, or start the run in another --out directory") from None


def check_or_record(path, identity: dict, what: str, defaults: dict | None = None, *, record: bool = True,
                    hint: str = "") -> dict:
    """Compare `identity` with the one recorded at `path`, raising IdentityMismatch with every difference named; or,
    when none is recorded, write it (unless `record` is False: the caller writes it once its checks are done).
    Returns the identity as recorded (with VERSION)."""
    current = {"version": VERSION, **plain(identity)}
    recorded = read_identity(path)
    if recorded is None:
        if record:
            write_identity(path, current)
        return current
    if recorded.get("version") != VERSION:
        raise IdentityMismatch(f"{path} records a {what} of identity format {recorded.get('version')!r}; this "
                               f"engine writes format {VERSION} and cannot tell whether the run would continue "
                               f"the same computation. Start it in another --out directory")
    diff = compare(recorded, current, {"version": VERSION, **plain(defaults or {})})
    if diff:
        raise IdentityMismatch(f"{what} in {os.path.dirname(os.fspath(path)) or '.'} was started with other "
                               f"settings or inputs; refusing to resume it with: " + "; ".join(diff)
                               + (f". {hint}" if hint else ""))
    return recorded


def write_identity(path, identity: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write((json.dumps(identity, indent=1, sort_keys=True) + "\n").encode()))
