"""Releases: a stage's EMA weights in safetensors, with the network description (engine/checkpoints/registry.py) and the
recipe's metadata as JSON in the header; rebuilt without any code from the file (`load_safetensors_network`).

A release verifies itself: its header records the SHA-256 of its tensor data ('cmt.data_sha256'), checked when
it is loaded, so flipped or truncated bytes in the weights are an error, not a silently different network. A release
without that hash (an older engine's, or one whose hash was removed) loads with a warning, as a checkpoint without
its `.sha256` does (engine/checkpoints/files.py `load_checkpoint`). What the header claims is checked against the
file before anything is allocated: the header's length and every tensor's byte range against the file's size, and
the network it describes (built on the meta device, which allocates nothing) against the tensors it holds, so a
damaged or altered header is a one-line error rather than an attempt to allocate the network it names. The header
is written in a fixed order, so the same weights and metadata give the same file in every process."""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings

import torch
from torch import nn

from engine.checkpoints.files import CheckpointError, UnreadableCheckpoint, atomic_write, short_list
from engine.checkpoints.registry import build_from_description, describe_network
from engine.checkpoints.state_dicts import load_network_state, state_mismatch

__all__ = ['export_safetensors', 'canonical_safetensors', 'read_safetensors_metadata', 'read_safetensors_header',
           'load_safetensors_network', 'verify_release']

_NETWORK_KEY = 'cmt.network'
_DATA_KEY = 'cmt.data_sha256'
# safetensors' own bound on the JSON header (its MAX_HEADER_SIZE); a length field above it is damage, not a header
_MAX_HEADER_BYTES = 100_000_000
# bytes per element of the safetensors dtype names (the format's spec, huggingface/safetensors README "Format")
_DTYPE_BYTES = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E4M3': 1, 'F8_E4M3FNUZ': 1, 'F8_E5M2': 1, 'F8_E5M2FNUZ': 1,
                'F8_E8M0': 1, 'I16': 2, 'U16': 2, 'F16': 2, 'BF16': 2, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8,
                'U64': 8, 'F64': 8, 'C64': 8}


def export_safetensors(module: nn.Module, path, metadata: dict | None = None) -> None:
    """Write `module`'s weights (the EMA network of a release) as safetensors, atomically.

    The header metadata holds `describe_network(module)` as JSON under 'cmt.network', 'format': 'pt', and
    every entry of `metadata` JSON-encoded under its own key (e.g. the recipe's resolved config, kimg)."""
    from safetensors.torch import save as st_save

    header = {'format': 'pt', _NETWORK_KEY: json.dumps(describe_network(module))}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or k in header:
            raise CheckpointError(f'metadata key {k!r} is not a string or is reserved ({short_list(header)})')
        try:
            header[k] = json.dumps(v)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f'metadata[{k!r}] is not JSON-serialisable: {e}') from None
    tensors = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in module.state_dict().items()}
    data = st_save(tensors, metadata=header)
    n = int.from_bytes(data[:8], 'little')
    data = canonical_safetensors(data, {_DATA_KEY: hashlib.sha256(data[8 + n:]).hexdigest()})
    atomic_write(path, lambda f: f.write(data))


def canonical_safetensors(data: bytes, extra_metadata: dict | None = None) -> bytes:
    """The same safetensors file with its JSON header in a fixed order — metadata keys sorted, tensor entries in
    the order of their data — so that equal weights and metadata give equal bytes. (safetensors builds the header
    from a hash map whose order changes from process to process: the same release written twice would otherwise
    differ in its header bytes, and no file hash could show that two runs agree.) The data is untouched; the
    header stays padded with spaces to a multiple of 8 bytes, as safetensors writes it."""
    n = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + n])
    ordered = {}
    metadata = {**header.pop('__metadata__', {}), **(extra_metadata or {})}
    if metadata:
        ordered['__metadata__'] = dict(sorted(metadata.items()))
    ordered.update(sorted(header.items(), key=lambda kv: tuple(kv[1]['data_offsets'])))
    text = json.dumps(ordered, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    return len(text).to_bytes(8, 'little') + text + data[8 + n:]


def read_safetensors_metadata(path) -> tuple[dict, dict]:
    """(network description, user metadata) from a file written by `export_safetensors`."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework='pt') as f:
            header = dict(f.metadata() or {})
    except OSError:
        raise
    except Exception as e:     # safetensors raises its own SafetensorError for malformed headers
        raise CheckpointError(f'{os.fspath(path)}: not a readable safetensors file ({e})') from None
    if _NETWORK_KEY not in header:
        raise CheckpointError(f'{os.fspath(path)}: no {_NETWORK_KEY!r} metadata; not written by export_safetensors')
    desc = json.loads(header.pop(_NETWORK_KEY))
    header.pop('format', None)
    header.pop(_DATA_KEY, None)
    user = {}
    for k, v in header.items():
        try:
            user[k] = json.loads(v)
        except ValueError:
            user[k] = v
    return desc, user


def read_safetensors_header(path) -> tuple[dict, int]:
    """(the JSON header, the size of the data section) of a safetensors file, after checking what the header claims
    against the file: its length within the file (and safetensors' limit), and every tensor's dtype, shape and byte
    range — inside the data section, and exactly shape × dtype size. UnreadableCheckpoint, one line, otherwise."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        n = int.from_bytes(head, 'little')
        if len(head) < 8 or n > min(size - 8, _MAX_HEADER_BYTES):
            raise UnreadableCheckpoint(f'{path}: its header length field claims {n if len(head) == 8 else "?"} bytes '
                                       f'of a {size}-byte file (truncated, or not a safetensors file)')
        try:
            header = json.loads(f.read(n))
        except ValueError as e:   # JSONDecodeError and UnicodeDecodeError
            raise UnreadableCheckpoint(f'{path}: its header is not JSON ({e})') from None
    if not isinstance(header, dict):
        raise UnreadableCheckpoint(f'{path}: its header is a JSON {type(header).__name__}, not an object')
    data = size - 8 - n
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype, shape, (begin, end) = entry['dtype'], [int(d) for d in entry['shape']], entry['data_offsets']
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
            fits = min(shape, default=0) >= 0 and 0 <= begin <= end <= data and end - begin == nbytes
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise UnreadableCheckpoint(f'{path}: tensor {name!r} is described as {json.dumps(entry)[:200]}, which '
                                       f'does not fit the file\'s {data} bytes of tensor data (damaged or altered '
                                       f'header)')
    return header, data


def load_safetensors_network(path) -> nn.Module:
    """Rebuild the network of a release written by `export_safetensors`; eval mode, requires_grad False. Its tensor
    data is checked against the SHA-256 in its header (a release without one loads with a warning), and the network
    its header describes against the tensors it holds before that network is allocated (module docstring)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    desc, _ = read_safetensors_metadata(path)
    if not verify_release(path):
        warnings.warn(f'{path} has no recorded SHA-256 of its tensor data ({_DATA_KEY!r} in its header; written by an '
                      f'older version of the engine, or removed): loaded without an integrity check', stacklevel=2)
    _check_description(path, desc)
    module = build_from_description(desc)
    try:
        load_network_state(module, load_file(path))
    except CheckpointError as e:
        raise CheckpointError(f'{path}: {e}') from None
    return module.eval().requires_grad_(False)


def _check_description(path: str, desc: dict) -> None:
    """The network `desc` describes, built on the meta device (no memory), against the tensors the file holds: the
    same names and shapes, or CheckpointError naming what differs (as `load_network_state` names it) and how large
    the described network would be."""
    header, data = read_safetensors_header(path)
    with torch.device('meta'):
        expected = build_from_description(desc).state_dict()
    stored = {k: [int(d) for d in e['shape']] for k, e in header.items() if k != '__metadata__'}
    missing, unexpected, wrong = state_mismatch(expected, {k: torch.empty(v, device='meta') for k, v in stored.items()})
    problems = [f'missing from the checkpoint: {short_list(missing, 4)}' if missing else '',
                f'unexpected in the checkpoint: {short_list(unexpected, 4)}' if unexpected else '',
                'shape mismatch: ' + short_list([f'{k}: checkpoint {stored[k]} vs network {list(expected[k].shape)}'
                                                 for k in wrong], 4) if wrong else '']
    if any(problems):
        claimed = sum(t.numel() * t.element_size() for t in expected.values())
        raise CheckpointError(f'{path}: its header describes a {desc.get("backbone")} of {_bytes(claimed)} that does '
                              f'not fit the {len(stored)} tensors ({_bytes(data)}) the file holds: '
                              + '; '.join(p for p in problems if p)
                              + '; the header was altered or belongs to another file (nothing was allocated)')


def _bytes(n: int) -> str:
    return next(f'{n / 2 ** e:.1f} {u}' for e, u in ((30, 'GiB'), (20, 'MiB'), (10, 'KiB'), (0, 'B')) if n >= 2 ** e
                or e == 0)


def verify_release(path) -> bool:
    """Check a release's tensor data against the SHA-256 in its header: True when it matches, False for a release
    without one (written before releases recorded it, or with it removed), UnreadableCheckpoint when the bytes
    differ or the header does not fit the file (`read_safetensors_header`)."""
    path = os.fspath(path)
    header, _ = read_safetensors_header(path)
    recorded = (header.get('__metadata__') or {}).get(_DATA_KEY)
    if recorded is None:
        return False
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        f.seek(8 + int.from_bytes(f.read(8), 'little'))
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    if h.hexdigest() != recorded:
        raise UnreadableCheckpoint(f'{path}: its tensor data do not match the SHA-256 recorded in its header '
                                   f'(flipped or truncated bytes); write the release again from its stage\'s '
                                   f'checkpoint (rerun the recipe)')
    return True
