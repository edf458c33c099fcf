"""EDM / ECT / CMT reference snapshots (`*.pkl`) and training states (`training-state-*.pt`) as our modules, read
with the restricted unpickler (engine/checkpoints/unpickler.py): `module_src` is never run, the record tree is flattened
into state-dict names, and the tensors are copied by name, with shape checks, into networks rebuilt from a
description (engine/checkpoints/registry.py) — `load_edm_pickle`, `read_edm_pickle`, `build_edm_network`,
`load_edm_training_state`.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.checkpoints.files import CheckpointError, short_list
from engine.checkpoints.identity import file_fingerprint
from engine.checkpoints.registry import DESCRIPTION_VERSION, build_from_description, precond_default
from engine.checkpoints.state_dicts import load_network_state
from engine.checkpoints.unpickler import (PersistentRecord, attributes, flatten, is_module_record, plain, unpickle_file,
                                          unpickle_torch_zip)

__all__ = ['TEACHER_ONLY_KEYS', 'EDM2_LOGVAR_KEYS', 'NetworkRecord', 'ReferenceCheckpoint', 'read_edm_pickle',
           'build_edm_network', 'load_edm_pickle', 'load_edm_training_state', 'read_edm2_training_state']

# Reference wrapper class → ours, and the reference backbones we accept (docs/spec/cm.md §1.2, §1.3, §5).
_REFERENCE_PRECONDS = {'EDMPrecond': 'EDMPrecond', 'ECMPrecond': 'CMPrecond'}
_REFERENCE_BACKBONES = ('SongUNet', 'DhariwalUNet')
# Positional order of the reference wrappers' constructor arguments, to name `_init_args` if any.
_REFERENCE_PRECOND_ARGS = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max',
                           'sigma_data', 'model_type')
# EDM2's wrapper and U-Net (docs/spec/edm2_latent.md §1.5, §2.4): the snapshot's `Precond` around a `UNet`.
_EDM2_PRECOND, _EDM2_UNET = 'Precond', 'UNet'
_EDM2_PRECOND_ARGS = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_data', 'logvar_channels')
# The EDM2 uncertainty head, which the CMT / ECT / ECD students do not have (docs/spec/edm2_latent.md §1.5).
EDM2_LOGVAR_KEYS = frozenset({'logvar_fourier.freqs', 'logvar_fourier.phases', 'logvar_linear.weight'})
# Weights a teacher has and a CMT/ECT student lacks; a transfer ignores them (docs/spec/cm.md §3.3): EDM's
# augmentation-label embedding (the students have augment_dim 0) and EDM2's uncertainty head.
TEACHER_ONLY_KEYS = frozenset({'model.map_augment.weight'}) | EDM2_LOGVAR_KEYS


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
    backbone_init_kwargs: dict | None = None   # the backbone record's own `_init_kwargs` (EDM2's `unet`)


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

    def network(self, key: str = 'ema', **build) -> nn.Module:
        """The network `key` as our module (`build_edm_network`'s mode / drop_augment / overrides), the file named
        when it holds no such network."""
        if key not in self.networks:
            raise CheckpointError(f'{self.path}: no network {key!r}; networks: {short_list(self.networks) or "none"}'
                                  f'; other entries: {short_list(self.entries) or "none"}')
        return build_edm_network(self.networks[key], source=f'{self.path}[{key!r}]', **build)


def _network_record(record: PersistentRecord) -> NetworkRecord:
    state = record.state
    init_args = state.get('_init_args') or ()
    names = _EDM2_PRECOND_ARGS if record.class_name == _EDM2_PRECOND else _REFERENCE_PRECOND_ARGS
    init_kwargs = dict(zip(names, init_args))
    init_kwargs.update(state.get('_init_kwargs') or {})
    state_dict: dict[str, torch.Tensor] = {}
    flatten(record, '', state_dict)
    child = (state.get('_modules') or {}).get('unet')
    backbone_kwargs = None
    if isinstance(child, PersistentRecord):
        backbone_kwargs = dict(zip(('img_resolution', 'img_channels', 'label_dim'), child.state.get('_init_args') or ()))
        backbone_kwargs.update(child.state.get('_init_kwargs') or {})
    return NetworkRecord(class_name=record.class_name, init_kwargs=plain(init_kwargs),
                         attributes=attributes(state), state_dict=state_dict,
                         training=bool(state.get('training', False)),
                         backbone_init_kwargs=None if backbone_kwargs is None else plain(backbone_kwargs))


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
                                  f'engine.checkpoints.releases.load_safetensors_network')
    return _reference_checkpoint(unpickle_file(path), path)


def latent_affine(ckpt: ReferenceCheckpoint) -> tuple[np.ndarray, np.ndarray] | None:
    """The (scale, bias) float32 arrays of an EDM2 latent snapshot's `StabilityVAEEncoder` (final latents =
    raw · scale + bias, docs/spec/edm2_latent.md §3.1), or None when the snapshot carries another encoder or none
    (pixel models: StandardRGBEncoder; EDM / ECT / CMT snapshots)."""
    enc = ckpt.entries.get('encoder')
    if not (isinstance(enc, dict) and enc.get('class_name') == 'StabilityVAEEncoder'):
        return None
    attrs = enc.get('attributes') or {}
    scale, bias = (np.asarray(attrs.get(k), dtype=np.float32) for k in ('scale', 'bias'))
    if scale.shape != (4,) or bias.shape != (4,):
        raise CheckpointError(f'{ckpt.path}: its StabilityVAEEncoder has scale {scale.shape} and bias {bias.shape}; '
                              'EDM2 writes 4 values each (one per SD-VAE latent channel)')
    return scale, bias


def load_edm_training_state(path) -> ReferenceCheckpoint:
    """Read a reference `training-state-*.pt` (a torch.save zip of dict(net=..., [net_ref=...,]
    optimizer_state=...)) with the same restricted table; `torch.load` is not used, so nothing is executed.

    `.networks['net']` / `['net_ref']` carry the state dicts (tensors keep their stored dtype, on CPU);
    `.entries['optimizer_state']` is the optimizer state dict, loadable with `optimizer.load_state_dict`."""
    return _reference_checkpoint(unpickle_torch_zip(path), path)


def _edm2_description(rec: NetworkRecord, source: str, mode: str | None, overrides: dict | None) -> dict:
    """EDM2's `Precond` record → EDM2Precond around EDM2UNet. The U-Net's arguments are its own record's
    `_init_kwargs` (the wrapper's, less its own arguments, when the record has none). mode 'student' builds the
    network without the uncertainty head and in float32 (use_fp16 False: ECT's ImageNet script passes --fp16=0 and
    CMT's 512 code trains in float32; the stage's bf16 setting applies instead); otherwise the file's."""
    kw, attrs = dict(rec.init_kwargs), rec.attributes
    if not any(k.startswith('unet.') for k in rec.state_dict):
        raise CheckpointError(f'{source}: an EDM2 Precond record without its U-Net (no unet.* tensors; modules '
                              f'{short_list(sorted({k.split(".")[0] for k in rec.state_dict}))})')
    if rec.backbone_init_kwargs is not None:
        unet_kwargs = dict(rec.backbone_init_kwargs)
    else:
        unet_kwargs = {k: v for k, v in kw.items() if k not in _EDM2_PRECOND_ARGS[3:]}
    for k in ('img_resolution', 'img_channels', 'label_dim'):
        if unet_kwargs.get(k) is None:
            unet_kwargs[k] = kw.get(k, attrs.get(k))
    if unet_kwargs['img_resolution'] is None or unet_kwargs['img_channels'] is None:
        raise CheckpointError(f'{source}: {rec.class_name} record lacks img_resolution / img_channels')
    unet_kwargs['label_dim'] = unet_kwargs['label_dim'] or 0
    has_head = 'logvar_linear.weight' in rec.state_dict
    if mode == 'teacher' and not has_head:
        raise CheckpointError(f'{source}: this EDM2 network has no uncertainty head (logvar_*): CMT / ECT / ECD '
                              f'students drop it, so it is a consistency model, not an EDM2 diffusion model; a '
                              f'teacher is an edm2-img*-*.pkl snapshot or reconstruction')
    student = mode == 'student'
    precond_kwargs = dict(
        use_fp16=False if student else bool(kw.get('use_fp16', attrs.get('use_fp16', True))),
        logvar_channels=None if student or not has_head else int(kw.get('logvar_channels', 128)))
    unet_kwargs.update(overrides or {})
    return dict(version=DESCRIPTION_VERSION, precond='EDM2Precond',
                sigma_data=float(attrs.get('sigma_data', kw.get('sigma_data', 0.5))), sigma_min=0.0,
                sigma_max=float('inf'), precond_kwargs=precond_kwargs, backbone='EDM2UNet',
                backbone_kwargs=unet_kwargs)


def _description_from_record(rec: NetworkRecord, source: str, mode: str | None, drop_augment: bool,
                             overrides: dict | None) -> dict:
    if mode not in (None, 'teacher', 'student'):
        raise ValueError(f"mode must be None, 'teacher' or 'student'; got {mode!r}")
    if rec.class_name == _EDM2_PRECOND:
        return _edm2_description(rec, source, mode, overrides)
    if rec.class_name not in _REFERENCE_PRECONDS:
        raise CheckpointError(f'{source}: unsupported network class {rec.class_name!r}; supported: '
                              f'{short_list([*_REFERENCE_PRECONDS, _EDM2_PRECOND])}')
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

    EDM2 snapshots (class `Precond`) become EDM2Precond around EDM2UNet, the float16 weights upcast to float32;
    mode 'student' drops the uncertainty head and sets use_fp16 False (see `_edm2_description`).
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
    if desc['precond'] == 'EDM2Precond':
        ignore = EDM2_LOGVAR_KEYS if not desc['precond_kwargs']['logvar_channels'] else ()
    else:
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
    return read_edm_pickle(path).network(key, mode=mode, drop_augment=drop_augment, overrides=overrides)


@dataclass
class StageStart:
    """A training state from elsewhere to start a stage from — an EDM2 `training-state-*.pt`
    (`read_edm2_training_state` below): the network's and the optimizer's state dicts (the
    optimizer's keyed by parameter index, as `optimizer.state_dict()` writes it), the tracked power EMAs by σ_rel,
    optionally the stage's EMA, and the image count reached. `fingerprint` goes into the stage's identity."""
    net: dict
    optimizer: dict | None
    tracked: dict              # σ_rel → state dict
    pairs_seen: int
    fingerprint: dict
    ema: dict | None = None

    def check(self, cfg) -> dict:
        """The tracked EMAs by rounded σ_rel, once every σ_rel of `cfg.snapshot_emas` is found among them."""
        stds = {round(float(k), 6): v for k, v in self.tracked.items()}
        missing = [s for s in cfg.snapshot_emas if round(s, 6) not in stds]
        if missing:
            raise CheckpointError(f"stage {cfg.name!r}: the start state tracks EMAs of σ_rel "
                                  f"{short_list(f'{s:g}' for s in sorted(stds))}, not "
                                  f"{short_list(f'{s:g}' for s in missing)} (StageConfig.snapshot_emas)")
        return stds


def read_edm2_training_state(path) -> StageStart:
    """An EDM2 `training-state-*.pt` (docs/spec/edm2_latent.md §2.4: torch.save of dict(state=dict(cur_nimg,
    total_elapsed_time), net=state dict, loss_fn=its __dict__, optimizer=Adam state dict, ema=dict(stds, emas)))
    read with the restricted table — nothing in it is executed — as a `StageStart` for `train_stage(start=...)`:
    the stage continues from its image count with its weights, Adam moments and tracked power EMAs. Its network is
    an EDM2Precond with the uncertainty head, in float32 as EDM2 trains it."""
    path = os.fspath(path)
    obj = unpickle_torch_zip(path)
    need = ('state', 'net', 'optimizer', 'ema')
    if not isinstance(obj, dict) or any(k not in obj for k in need):
        have = short_list(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f'{path}: not an EDM2 training state (needs {short_list(need)}; has {have})')
    ema = obj['ema'] or {}
    stds, emas = list(ema.get('stds') or ()), list(ema.get('emas') or ())
    if len(stds) != len(emas):
        raise CheckpointError(f'{path}: {len(stds)} EMA stds but {len(emas)} EMA states')
    tensors = lambda sd: {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return StageStart(net=tensors(obj['net']), optimizer=obj['optimizer'],
                      tracked={float(s): tensors(e) for s, e in zip(stds, emas)},
                      pairs_seen=int(obj['state']['cur_nimg']),
                      fingerprint=dict(kind='edm2-training-state', file=file_fingerprint(path)))
