"""EDM / ECT / CMT reference snapshots (`*.pkl`) and training states (`training-state-*.pt`) as our modules, read
with the restricted unpickler (engine/unpickler.py): `module_src` is never run, the record tree is flattened
into state-dict names, and the tensors are copied by name, with shape checks, into networks rebuilt from a
description (engine/registry.py) — `load_edm_pickle`, `read_edm_pickle`, `build_edm_network`,
`load_edm_training_state`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.files import CheckpointError, short_list
from engine.registry import DESCRIPTION_VERSION, build_from_description, precond_default
from engine.state_dicts import load_network_state
from engine.unpickler import (PersistentRecord, attributes, flatten, is_module_record, plain, unpickle_file,
                              unpickle_torch_zip)

__all__ = ['TEACHER_ONLY_KEYS', 'NetworkRecord', 'ReferenceCheckpoint', 'read_edm_pickle', 'build_edm_network',
           'load_edm_pickle', 'load_edm_training_state']

# Reference wrapper class → ours, and the reference backbones we accept (docs/spec/cm.md §1.2, §1.3, §5).
_REFERENCE_PRECONDS = {'EDMPrecond': 'EDMPrecond', 'ECMPrecond': 'CMPrecond'}
_REFERENCE_BACKBONES = ('SongUNet', 'DhariwalUNet')
# Positional order of the reference wrappers' constructor arguments, to name `_init_args` if any.
_REFERENCE_PRECOND_ARGS = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max',
                           'sigma_data', 'model_type')
# Weights an EDM teacher has and a CMT/ECT student (augment_dim 0) lacks; a transfer ignores them (§3.3).
TEACHER_ONLY_KEYS = frozenset({'model.map_augment.weight'})


@dataclass
class NetworkRecord:
    """A network found in a reference checkpoint, before anything is built from it.

    class_name: the reference wrapper class ('EDMPrecond', 'ECMPrecond', ...).
    init_kwargs: its constructor arguments (`_init_args` named positionally, then `_init_kwargs`).
    attributes: its plain instance attributes (img_resolution, label_dim, use_fp16, sigma_min, ...).
    state_dict: name → tensor in `named_parameters()` + `named_buffers()` order (docs/spec/cm.md §6.2).
    """
    class_name: str
    init_kwargs: dict
    attributes: dict
    state_dict: dict[str, torch.Tensor]
    training: bool = False


@dataclass
class ReferenceCheckpoint:
    """Everything read from a reference `.pkl` snapshot or `training-state-*.pt` archive.

    networks: the entries that are modules ('ema'; 'net' and 'net_ref' in training states).
    entries: everything else as plain values: `dataset_kwargs`, `optimizer_state` (with tensors), and for
    persistent non-module objects (`loss_fn`, `augment_pipe`) a summary dict(class_name, init_kwargs,
    attributes).
    """
    path: str
    networks: dict[str, NetworkRecord] = field(default_factory=dict)
    entries: dict[str, Any] = field(default_factory=dict)


def _network_record(record: PersistentRecord) -> NetworkRecord:
    state = record.state
    init_args = state.get('_init_args') or ()
    init_kwargs = dict(zip(_REFERENCE_PRECOND_ARGS, init_args))
    init_kwargs.update(state.get('_init_kwargs') or {})
    state_dict: dict[str, torch.Tensor] = {}
    flatten(record, '', state_dict)
    return NetworkRecord(class_name=record.class_name, init_kwargs=plain(init_kwargs),
                         attributes=attributes(state), state_dict=state_dict,
                         training=bool(state.get('training', False)))


def _reference_checkpoint(obj, path) -> ReferenceCheckpoint:
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: top-level object is a {type(obj).__name__}, expected a dict')
    result = ReferenceCheckpoint(path=os.fspath(path))
    try:
        for key, value in obj.items():
            if isinstance(value, PersistentRecord) and is_module_record(value):
                result.networks[key] = _network_record(value)
            else:
                result.entries[key] = plain(value)
    except RecursionError:      # a cyclic record tree, which no real snapshot contains
        raise CheckpointError(f'{path}: cyclic or absurdly deep object tree') from None
    return result


def read_edm_pickle(path) -> ReferenceCheckpoint:
    """Read an EDM / ECT / CMT `.pkl` snapshot without executing its embedded `module_src`.

    Only the globals of docs/spec/cm.md §6.2 are resolved; any other raises `CheckpointError` naming it. A
    directory, or a file of another kind (a torch.save archive such as this engine's ckpt-*.pt, a safetensors
    release), is named as what it is."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a directory; expected an EDM / ECT / CMT snapshot file (.pkl)')
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            head = f.read(8)
        if head.startswith(b'PK\x03\x04'):
            raise CheckpointError(
                f'{path} is a torch.save archive (a training checkpoint of this engine, ckpt-*.pt, or an EDM '
                f'training-state-*.pt), not an EDM / ECT / CMT snapshot (.pkl). A stage of this engine releases '
                f'its weights as ema.safetensors beside its checkpoints; training states load with '
                f'load_edm_training_state')
        if path.endswith('.safetensors'):
            raise CheckpointError(f'{path} is a safetensors release; load it with '
                                  f'engine.releases.load_safetensors_network')
    return _reference_checkpoint(unpickle_file(path), path)


def load_edm_training_state(path) -> ReferenceCheckpoint:
    """Read a reference `training-state-*.pt` (a torch.save zip of dict(net=..., [net_ref=...,]
    optimizer_state=...)) with the same restricted table; `torch.load` is not used, so nothing is executed.

    `.networks['net']` / `['net_ref']` carry the state dicts (tensors keep their stored dtype, on CPU);
    `.entries['optimizer_state']` is the optimizer state dict, loadable with `optimizer.load_state_dict`."""
    return _reference_checkpoint(unpickle_torch_zip(path), path)


def _description_from_record(rec: NetworkRecord, source: str, mode: str | None, drop_augment: bool,
                             overrides: dict | None) -> dict:
    if rec.class_name not in _REFERENCE_PRECONDS:
        raise CheckpointError(f'{source}: unsupported network class {rec.class_name!r}; supported: '
                              f'{short_list(_REFERENCE_PRECONDS)}')
    if mode not in (None, 'teacher', 'student'):
        raise ValueError(f"mode must be None, 'teacher' or 'student'; got {mode!r}")
    if mode == 'teacher' and rec.class_name != 'EDMPrecond':
        raise CheckpointError(f'{source}: holds a consistency model ({rec.class_name}: ECT / CMT output), not a '
                              f'diffusion model; a teacher is an EDMPrecond snapshot (EDM\'s edm-*.pkl or a '
                              f'pre-training stage of this engine)')
    kw = dict(rec.init_kwargs)
    attrs = rec.attributes
    model_type = kw.pop('model_type', 'DhariwalUNet')       # the reference wrappers' default
    if model_type not in _REFERENCE_BACKBONES:
        raise CheckpointError(f'{source}: unsupported model_type {model_type!r}; supported: '
                              f'{short_list(_REFERENCE_BACKBONES)}')
    interface = {k: kw.pop(k, attrs.get(k)) for k in ('img_resolution', 'img_channels', 'label_dim')}
    img_resolution, img_channels, label_dim = interface['img_resolution'], interface['img_channels'], \
        interface['label_dim'] or 0
    if img_resolution is None or img_channels is None:
        raise CheckpointError(f'{source}: {rec.class_name} record lacks img_resolution / img_channels')
    if kw.pop('use_fp16', attrs.get('use_fp16', False)):
        warnings.warn(f'{source}: the network was saved with use_fp16=True; this engine runs it in float32 '
                      '(weights are stored in float32 either way)', stacklevel=3)
    ours = _REFERENCE_PRECONDS[rec.class_name]
    target = ours if mode is None else {'teacher': 'EDMPrecond', 'student': 'CMPrecond'}[mode]
    sigmas = {}
    for k in ('sigma_data', 'sigma_min', 'sigma_max'):
        value = attrs.get(k, kw.get(k))
        kw.pop(k, None)
        # Changing the wrapper keeps sigma_data but takes the new wrapper's σ range, as CMT does when it
        # builds a fresh ECMPrecond student for an EDMPrecond teacher (docs/spec/cm.md §3.3).
        if value is None or (target != ours and k != 'sigma_data'):
            value = precond_default(target, k)
        sigmas[k] = float(value)
    backbone_kwargs = dict(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                           label_dim=label_dim, **kw)
    if drop_augment:
        backbone_kwargs['augment_dim'] = 0
    backbone_kwargs.update(overrides or {})
    return dict(version=DESCRIPTION_VERSION, precond=target, **sigmas, backbone=model_type,
                backbone_kwargs=backbone_kwargs)


def build_edm_network(record: NetworkRecord, *, mode: str | None = None, drop_augment: bool = False,
                      overrides: dict | None = None, source: str = '<record>') -> nn.Module:
    """Our module for a reference network record, weights copied by name; eval mode, requires_grad False.

    mode: None keeps the wrapper of the file (EDMPrecond → EDMPrecond, ECMPrecond → CMPrecond); 'teacher'
      builds EDMPrecond and 'student' CMPrecond. A changed wrapper keeps sigma_data and takes the new
      wrapper's default sigma_min / sigma_max (CMPrecond: 0.003, inf), as CMT's fresh student does.
    drop_augment: by default the architecture is the file's exactly (an EDM teacher keeps augment_dim 9 and
      `model.map_augment.weight`). With True the backbone gets augment_dim 0 and that weight is ignored —
      a teacher loaded as a CMT/ECT student (docs/spec/cm.md §3.3).
    overrides: backbone constructor arguments to replace, e.g. dict(dropout=0.2) for a student. Any
      override that changes a weight's shape fails the copy with the keys named.
    """
    desc = _description_from_record(record, source, mode, drop_augment, overrides)
    module = build_from_description(desc)
    ignore = TEACHER_ONLY_KEYS if desc['backbone_kwargs'].get('augment_dim', 0) == 0 else ()
    try:
        load_network_state(module, record.state_dict, ignore=ignore)
    except CheckpointError as e:
        raise CheckpointError(f'{source}: {e}') from None
    return module.eval().requires_grad_(False)


def load_edm_pickle(path, key: str = 'ema', *, mode: str | None = None, drop_augment: bool = False,
                    overrides: dict | None = None) -> nn.Module:
    """The network `key` of an EDM / ECT / CMT `.pkl` snapshot as our module (see `build_edm_network` for
    mode / drop_augment / overrides), in eval mode with requires_grad False. `module_src` is never run.
    For the snapshot's other entries and the architecture, use `read_edm_pickle` + `build_edm_network`."""
    ckpt = read_edm_pickle(path)
    if key not in ckpt.networks:
        raise CheckpointError(f'{os.fspath(path)}: no network {key!r}; networks: {short_list(ckpt.networks) or "none"}'
                              f'; other entries: {short_list(ckpt.entries) or "none"}')
    return build_edm_network(ckpt.networks[key], mode=mode, drop_augment=drop_augment, overrides=overrides,
                             source=f'{os.fspath(path)}[{key!r}]')
