"""Network descriptions and the registry that rebuilds networks from them.

A network is described by a plain, JSON-able dict (`describe_network`: wrapper, σ settings, backbone name and every
constructor argument) and rebuilt only through the allow-lists `PRECONDS` / `BACKBONES`
(`build_from_description`): no class is ever looked up from a string found in a file. Releases
(engine/checkpoints/releases.py) store the description beside the weights; reference snapshots
(engine/checkpoints/edm_snapshots.py) are
turned into one.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import torch
from torch import nn

from engine.checkpoints.files import CheckpointError, short_list
from engine.networks import DhariwalUNet, DiT, EDM2UNet, MLPNet, MMDiT, SongUNet
from engine.networks.latent_vgg import LatentVGG
from engine.precond import CMPrecond, EDM2Precond, EDMPrecond

__all__ = ['PRECONDS', 'BACKBONES', 'DESCRIPTION_VERSION', 'describe_network', 'build_from_description', 'precond_default']

# The only classes a checkpoint can make us build. Keys are the names stored in our descriptions.
PRECONDS: dict[str, type[nn.Module]] = {'EDMPrecond': EDMPrecond, 'CMPrecond': CMPrecond, 'EDM2Precond': EDM2Precond}
BACKBONES: dict[str, type[nn.Module]] = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet, 'MLPNet': MLPNet, 'DiT': DiT,
                                         'MMDiT': MMDiT, 'EDM2UNet': EDM2UNet, 'LatentVGG': LatentVGG}

DESCRIPTION_VERSION = 1


def _plain_json(value, where: str):
    """Constructor arguments as JSON-able python (tuples → lists, numpy scalars → numbers)."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_json(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain_json(v, where) for k, v in value.items()}
    raise CheckpointError(f'{where}: value {value!r} of type {type(value).__name__} is not plain data')


def _resolve_kwargs(cls: type, kwargs: dict, where: str) -> dict:
    """All constructor arguments of `cls`, defaults filled in; unknown names are an error."""
    params = inspect.signature(cls).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise CheckpointError(f'{where}: {cls.__name__} has no constructor argument(s) {short_list(unknown)}')
    try:
        bound = inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise CheckpointError(f'{where}: cannot call {cls.__name__} with {sorted(kwargs)}: {e}') from None
    bound.apply_defaults()
    return {k: _plain_json(v, f'{where}.{k}') for k, v in bound.arguments.items()}


def precond_default(name: str, arg: str) -> float:
    return float(inspect.signature(PRECONDS[name]).parameters[arg].default)


def describe_network(module: nn.Module, backbone_kwargs: dict | None = None) -> dict:
    """The architecture of `module` (a wrapper from `PRECONDS` around a backbone, or a bare backbone) as a
    plain, JSON-able dict that `build_from_description` turns back into the same module:

        dict(version=1, precond='EDMPrecond' | 'CMPrecond' | 'EDM2Precond' | None, sigma_data, sigma_min,
             sigma_max, [precond_kwargs={the wrapper's other arguments}, only when it has any: EDM2Precond's
             use_fp16 and logvar_channels], backbone=a BACKBONES name, backbone_kwargs={every constructor argument})

    The backbone's constructor arguments come from `backbone_kwargs`, else from the attribute
    `backbone.init_kwargs` that every backbone records in its constructor."""
    precond = next((name for name, cls in PRECONDS.items() if type(module) is cls), None)
    backbone = module.model if precond is not None else module
    backbone_name = next((name for name, cls in BACKBONES.items() if type(backbone) is cls), None)
    if backbone_name is None:
        raise CheckpointError(
            f'cannot describe a {type(module).__name__}' + (f' around a {type(backbone).__name__}' if precond else '')
            + f'; known wrappers: {short_list(PRECONDS)}; known backbones: {short_list(BACKBONES)} '
            '(pass the bare module, not a DDP / torch.compile wrapper)')
    kwargs = backbone_kwargs if backbone_kwargs is not None else getattr(backbone, 'init_kwargs', None)
    if kwargs is None:
        raise CheckpointError(
            f'{backbone_name} does not record its constructor arguments (attribute `init_kwargs`); build it '
            'with build_from_description, or pass backbone_kwargs= to describe_network')
    desc = dict(version=DESCRIPTION_VERSION, precond=precond, sigma_data=None, sigma_min=None, sigma_max=None,
                backbone=backbone_name,
                backbone_kwargs=_resolve_kwargs(BACKBONES[backbone_name], dict(kwargs), backbone_name))
    if precond is not None:
        desc.update(sigma_data=float(module.sigma_data), sigma_min=float(module.sigma_min),
                    sigma_max=float(module.sigma_max))
        if module.precond_kwargs():
            desc['precond_kwargs'] = _plain_json(module.precond_kwargs(), precond)
    return desc


def build_from_description(desc: dict) -> nn.Module:
    """Construct the module a `describe_network` dict describes (fresh weights, train mode).

    Classes come only from `PRECONDS` / `BACKBONES`. The global RNG is left untouched: construction draws
    initial weights from a forked generator state, so loading a checkpoint does not shift a training run's
    random stream."""
    if not isinstance(desc, dict):
        raise CheckpointError(f'network description is a {type(desc).__name__}, expected a dict')
    if desc.get('version', DESCRIPTION_VERSION) != DESCRIPTION_VERSION:
        raise CheckpointError(f"network description version {desc.get('version')!r}; "
                              f'this engine reads version {DESCRIPTION_VERSION}')
    backbone_name, precond = desc.get('backbone'), desc.get('precond')
    if backbone_name not in BACKBONES:
        raise CheckpointError(f'unknown backbone {backbone_name!r}; supported: {short_list(BACKBONES)}')
    if precond is not None and precond not in PRECONDS:
        raise CheckpointError(f'unknown preconditioning wrapper {precond!r}; supported: {short_list(PRECONDS)}')
    cls = BACKBONES[backbone_name]
    kwargs = _resolve_kwargs(cls, dict(desc.get('backbone_kwargs') or {}), backbone_name)
    with torch.random.fork_rng(devices=[]):
        backbone = cls(**copy.deepcopy(kwargs))
    if precond is None:
        return backbone
    sigmas = {k: float(desc[k]) if desc.get(k) is not None else precond_default(precond, k)
              for k in ('sigma_data', 'sigma_min', 'sigma_max')}
    extra = dict(desc.get('precond_kwargs') or {})
    allowed = set(inspect.signature(PRECONDS[precond]).parameters) - {'model', 'unet', *sigmas}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise CheckpointError(f'{precond} has no constructor argument(s) {short_list(unknown)}')
    with torch.random.fork_rng(devices=[]):
        return PRECONDS[precond](backbone, **sigmas, **extra)
