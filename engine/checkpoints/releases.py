"""Releases: a stage's EMA weights in safetensors, with the network description (engine/checkpoints/registry.py) and the
recipe's metadata as JSON in the header; rebuilt without any code from the file (`load_safetensors_network`).

A release verifies itself: its header records the SHA-256 of its tensor data ('cmt.data_sha256'), checked when
it is loaded, so flipped or truncated bytes in the weights are an error, not a silently different network. The
header is written in a fixed order, so the same weights and metadata give the same file in every process."""
from __future__ import annotations

import hashlib
import json
import os

from torch import nn

from engine.checkpoints.files import CheckpointError, UnreadableCheckpoint, atomic_write, short_list
from engine.checkpoints.registry import build_from_description, describe_network
from engine.checkpoints.state_dicts import load_network_state

__all__ = ['export_safetensors', 'canonical_safetensors', 'read_safetensors_metadata', 'load_safetensors_network',
           'verify_release']

_NETWORK_KEY = 'cmt.network'
_DATA_KEY = 'cmt.data_sha256'


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


def load_safetensors_network(path) -> nn.Module:
    """Rebuild the network of a release written by `export_safetensors`; eval mode, requires_grad False."""
    from safetensors.torch import load_file

    desc, _ = read_safetensors_metadata(path)
    verify_release(path)
    module = build_from_description(desc)
    try:
        load_network_state(module, load_file(os.fspath(path)))
    except CheckpointError as e:
        raise CheckpointError(f'{os.fspath(path)}: {e}') from None
    return module.eval().requires_grad_(False)


def verify_release(path) -> bool:
    """Check a release's tensor data against the SHA-256 in its header: True when it matches, False for a release
    written before releases recorded one, UnreadableCheckpoint when the bytes differ."""
    path = os.fspath(path)
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')
        header = json.loads(f.read(n))
        recorded = (header.get('__metadata__') or {}).get(_DATA_KEY)
        if recorded is None:
            return False
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    if h.hexdigest() != recorded:
        raise UnreadableCheckpoint(f'{path}: its tensor data do not match the SHA-256 recorded in its header '
                                   f'(flipped or truncated bytes); write the release again from its stage\'s '
                                   f'checkpoint (rerun the recipe)')
    return True
