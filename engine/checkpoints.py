"""Checkpoints: the reference EDM / ECT / CMT snapshots read without running their code, and our own formats.

Three formats (spec/cm.md §6; STYLE.md "Training state is state dicts only"):

* Reference snapshots (`edm-*.pkl`, `network-snapshot-*.pkl`) and training states (`training-state-*.pt`).
  Their networks are pickled with the source code of the defining module (`module_src`), which the
  reference unpickler `exec`s. We unpickle with an explicit table of allowed globals (spec/cm.md §6.2):
  persistent objects become passive records, the record tree is flattened into state_dict names, and the
  tensors are copied by name, with shape checks, into our own modules (`load_edm_pickle`,
  `read_edm_pickle`, `build_edm_network`, `load_edm_training_state`).
* Our training checkpoints: plain state dicts, written atomically (`save_checkpoint`) and read with
  `torch.load(weights_only=True)` (`load_checkpoint`).
* Releases: EMA weights in safetensors with the network description as JSON metadata
  (`export_safetensors`, `load_safetensors_network`).

A network is described by a plain dict (`describe_network`) and rebuilt only through the allow-lists
`PRECONDS` / `BACKBONES` (`build_from_description`): no class is ever looked up from a string in a file.
"""
from __future__ import annotations

import collections
import copy
import inspect
import io
import json
import os
import pickle
import sys
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from engine.networks import DhariwalUNet, DiT, MLPNet, SongUNet
from engine.precond import CMPrecond, EDMPrecond

__all__ = [
    'CheckpointError', 'PRECONDS', 'BACKBONES', 'TEACHER_ONLY_KEYS',
    'NetworkRecord', 'ReferenceCheckpoint', 'read_edm_pickle', 'build_edm_network', 'load_edm_pickle',
    'load_edm_training_state',
    'describe_network', 'build_from_description', 'load_network_state', 'weights_file', 'read_state_dict_file',
    'save_checkpoint', 'load_checkpoint',
    'export_safetensors', 'load_safetensors_network', 'read_safetensors_metadata',
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit its destination; the message names the problem."""


# The only classes a checkpoint can make us build. Keys are the names stored in our descriptions.
PRECONDS: dict[str, type[nn.Module]] = {'EDMPrecond': EDMPrecond, 'CMPrecond': CMPrecond}
BACKBONES: dict[str, type[nn.Module]] = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet, 'MLPNet': MLPNet, 'DiT': DiT}

# Reference wrapper class → ours, and the reference backbones we accept (spec/cm.md §1.2, §1.3, §5).
_REFERENCE_PRECONDS = {'EDMPrecond': 'EDMPrecond', 'ECMPrecond': 'CMPrecond'}
_REFERENCE_BACKBONES = ('SongUNet', 'DhariwalUNet')
# Positional order of the reference wrappers' constructor arguments, to name `_init_args` if any.
_REFERENCE_PRECOND_ARGS = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max',
                           'sigma_data', 'model_type')
# Weights an EDM teacher has and a CMT/ECT student (augment_dim 0) lacks; a transfer ignores them (§3.3).
TEACHER_ONLY_KEYS = frozenset({'model.map_augment.weight'})

_DESCRIPTION_VERSION = 1


def _names(names, limit=20) -> str:
    names = list(names)
    shown = ', '.join(names[:limit])
    return shown + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')


# ---------------------------------------------------------------------------------------------------------
# Restricted unpickling of the reference formats (spec/cm.md §6.1, §6.2)

class PersistentRecord:
    """A `persistence.persistent_class` object as read here: class name and instance state; no code. The
    defining module's source (`module_src`) is kept as text only — never compiled or executed — for readers
    that check what it says (the FID detector's preprocessing, engine/metrics/inception_files.py)."""

    def __init__(self, class_name: str, state: dict, module_src: str | None = None):
        self.class_name = class_name
        self.state = state
        self.module_src = module_src

    def __repr__(self):
        return f'PersistentRecord({self.class_name!r})'


class ContainerRecord:
    """A pickled torch.nn container (created empty, then given its state by BUILD)."""
    class_name = 'Container'

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointError(f'{self.class_name} state is a {type(state).__name__}, expected a dict')
        self.state = state

    def __repr__(self):
        return f'ContainerRecord({self.class_name!r})'


class _ModuleDictRecord(ContainerRecord):
    class_name = 'ModuleDict'


class _ModuleListRecord(ContainerRecord):
    class_name = 'ModuleList'


class _SequentialRecord(ContainerRecord):
    class_name = 'Sequential'


def _reconstruct_persistent_obj(meta):
    """Stands in for `torch_utils.persistence._reconstruct_persistent_obj`; `module_src` is kept as a string and
    never run."""
    if not isinstance(meta, dict):
        raise CheckpointError(f'persistent object metadata is a {type(meta).__name__}, expected a dict')
    if meta.get('type') != 'class' or meta.get('version') != 6:
        raise CheckpointError(f"unsupported persistent object (type={meta.get('type')!r}, "
                              f"version={meta.get('version')!r}); expected type 'class', version 6")
    class_name, state = meta.get('class_name'), meta.get('state')
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise CheckpointError('persistent object without a class_name string or a state dict')
    module_src = meta.get('module_src')
    return PersistentRecord(class_name, state, module_src if isinstance(module_src, str) else None)


class _Storage(NamedTuple):
    """A decoded storage: its elements as a flat 1-D tensor."""
    flat: torch.Tensor


class _StorageType(NamedTuple):
    """What a global `torch.<X>Storage` resolves to: only its element type."""
    dtype: torch.dtype


_STORAGE_DTYPES = {
    'FloatStorage': torch.float32, 'DoubleStorage': torch.float64, 'HalfStorage': torch.float16,
    'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
    'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
    'BoolStorage': torch.bool, 'UntypedStorage': torch.uint8,
}
_STORAGE_GLOBALS = {('torch', name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()}


def _flat_from_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stands in for `torch._utils._rebuild_tensor_v2`: a view of the decoded storage, requires_grad False.

    Backward hooks and tensor metadata (conj/neg bits) are ignored: neither occurs in weights."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f'tensor record refers to a {type(storage).__name__}, not a storage')
    try:
        return storage.flat.as_strided(tuple(size), tuple(stride), int(storage_offset))
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f'malformed tensor record: {e}') from None


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stands in for `torch._utils._rebuild_parameter[_with_state]`: the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f'parameter record holds a {type(data).__name__}, not a tensor')
    return data


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _LegacyStorageRef(NamedTuple):
    dtype: torch.dtype
    key: str
    view: tuple | None


class _LegacyStorageUnpickler(pickle.Unpickler):
    """Reads the storage pickle inside a legacy `torch.save` blob: only `torch.<X>Storage` globals."""

    def find_class(self, module, name):
        if (module, name) in _STORAGE_GLOBALS:
            return _STORAGE_GLOBALS[module, name]
        raise CheckpointError(f"refusing global '{module}.{name}' inside a tensor storage blob")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage'
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f'unexpected persistent id in a tensor storage blob: {pid!r}'[:200])
        _, stype, key, _location, _numel, view = pid
        return _LegacyStorageRef(stype.dtype, str(key), view)


class _DataOnlyUnpickler(pickle.Unpickler):
    """Ints, strings, lists and dicts only: the header pickles of a legacy `torch.save` blob."""

    def find_class(self, module, name):
        raise CheckpointError(f"refusing global '{module}.{name}' inside a tensor storage blob")


def _load_from_bytes(blob):
    """Stands in for `torch.storage._load_from_bytes`: decode a legacy (non-zip) `torch.save` of one storage.

    Layout (spec/cm.md §6.1): pickled magic number, protocol version and sys-info dict; a pickle of the
    storage through a persistent id ('storage', <type>, key, location, numel, view); a pickled key list;
    then per key an int64 element count and the raw little-endian elements. Parsed by hand rather than with
    `torch.load(weights_only=True)`, which would hand back the deprecated TypedStorage."""
    if not isinstance(blob, (bytes, bytearray)):
        raise CheckpointError(f'tensor storage blob is a {type(blob).__name__}, expected bytes')
    f = io.BytesIO(blob)
    try:
        magic = _DataOnlyUnpickler(f).load()
        protocol = _DataOnlyUnpickler(f).load()
        sys_info = _DataOnlyUnpickler(f).load()
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise CheckpointError(f'tensor storage blob has magic {magic!r} / protocol {protocol!r}; expected a '
                                  f'legacy torch.save (magic {_LEGACY_MAGIC:#x}, protocol {_LEGACY_PROTOCOL})')
        if not (isinstance(sys_info, dict) and sys_info.get('little_endian', True)):
            raise CheckpointError('big-endian tensor storage blobs are not supported')
        root = _LegacyStorageUnpickler(f).load()
        keys = _DataOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f'corrupt tensor storage blob: {e}') from None
    if not isinstance(root, _LegacyStorageRef) or not isinstance(keys, list):
        raise CheckpointError('tensor storage blob does not hold a storage')
    storages = {}
    for key in keys:
        count = int.from_bytes(f.read(8), 'little', signed=True)
        # Every storage in a single-storage blob has the root's element type.
        nbytes = count * torch.empty(0, dtype=root.dtype).element_size()
        data = f.read(nbytes)
        if count < 0 or len(data) != nbytes:
            raise CheckpointError(f'truncated tensor storage blob (storage {key!r} of {count} elements)')
        storages[str(key)] = _flat_from_bytes(data, root.dtype)
    if root.key not in storages:
        raise CheckpointError(f'tensor storage blob lacks the data of storage {root.key!r}')
    flat = storages[root.key]
    if root.view is not None:   # (view_key, offset, size): a storage view, in very old writers
        _, offset, size = root.view
        flat = flat[int(offset):int(offset) + int(size)]
    return _Storage(flat)


def _numpy_scalar_fn():
    try:
        from numpy._core.multiarray import scalar       # numpy >= 2
    except ImportError:                                 # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


_np_scalar = _numpy_scalar_fn()


def _numpy_scalar(dtype, data=None):
    """Stands in for `numpy.core.multiarray.scalar`, for numeric dtypes only (e.g. skip_scale = sqrt(0.5))."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or not isinstance(data, bytes):
        raise CheckpointError(f'numpy scalar of dtype {dtype!r} is not allowed; only numeric scalars are')
    return _np_scalar(dtype, data)


def _encode_latin1(text, encoding='latin1'):
    """Stands in for `_codecs.encode`, which protocol-2 pickles (torch.save's default) use to spell bytes."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise CheckpointError(f'_codecs.encode is allowed only as str → latin1 bytes, not {encoding!r}')
    return text.encode('latin1')


# spec/cm.md §6.2: the complete list of globals a reference checkpoint may name.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch.nn.modules.container', 'ModuleDict'): _ModuleDictRecord,
    ('torch.nn.modules.container', 'ModuleList'): _ModuleListRecord,
    ('torch.nn.modules.container', 'Sequential'): _SequentialRecord,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_from_bytes,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy', 'dtype'): np.dtype,
    ('dnnlib.util', 'EasyDict'): dict,
    # Protocol <= 3 writers spell sets as a call; torch.save (protocol 2) with python-2 module names.
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('__builtin__', 'set'): set,
    ('__builtin__', 'frozenset'): frozenset,
    ('_codecs', 'encode'): _encode_latin1,  # bytes (numpy scalar data) in protocol-2 pickles
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; any other global is refused by name before anything is called."""
    extra_globals: dict = {}

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        if key in self.extra_globals:
            return self.extra_globals[key]
        raise CheckpointError(
            f"{self.source}: refusing to load global '{module}.{name}'. A reference checkpoint may only name: "
            + ', '.join(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS))


class _ZipUnpickler(_RestrictedUnpickler):
    """`data.pkl` of a torch.save zip archive: storages come from the archive's `data/<key>` records."""
    extra_globals = _STORAGE_GLOBALS

    def __init__(self, file, source: str, load_storage: Callable[[torch.dtype, str, int], _Storage]):
        super().__init__(file, source)
        self._load_storage = load_storage

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f'{self.source}: unexpected persistent id {pid!r}'[:300])
        _, stype, key, _location, numel = pid
        return self._load_storage(stype.dtype, str(key), int(numel))


def _unpickle_file(path) -> Any:
    source = os.fspath(path)
    with open(path, 'rb') as f:
        try:
            return _RestrictedUnpickler(f, source).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError, ValueError) as e:
            raise CheckpointError(f'{source}: corrupt or truncated pickle ({type(e).__name__}: {e})') from None


def _unpickle_torch_zip(path) -> Any:
    """The object in a `torch.save` zip archive, unpickled with the restricted table (no torch.load involved)."""
    source = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f'{source}: not a torch.save zip archive, or truncated ({e})') from None
    with zf:
        names = set(zf.namelist())
        pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
        if len(pickles) != 1:
            raise CheckpointError(f'{source}: not a torch.save archive (expected one <name>/data.pkl)')
        prefix = pickles[0][:-len('data.pkl')]
        byteorder = zf.read(prefix + 'byteorder').decode() if prefix + 'byteorder' in names else 'little'
        if byteorder != sys.byteorder:
            raise CheckpointError(f'{source}: written on a {byteorder}-endian machine; not supported here')
        storages: dict[str, _Storage] = {}

        def load_storage(dtype: torch.dtype, key: str, numel: int) -> _Storage:
            if key not in storages:
                record = f'{prefix}data/{key}'
                if record not in names:
                    raise CheckpointError(f'{source}: storage record {record} is missing')
                data = zf.read(record)
                if len(data) != numel * torch.empty(0, dtype=dtype).element_size():
                    raise CheckpointError(f'{source}: storage {record} holds {len(data)} bytes, expected '
                                          f'{numel} elements of {dtype}')
                storages[key] = _Storage(_flat_from_bytes(data, dtype))
            return storages[key]

        try:
            return _ZipUnpickler(io.BytesIO(zf.read(pickles[0])), source, load_storage).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError, ValueError,
                zipfile.BadZipFile) as e:
            raise CheckpointError(f'{source}: corrupt archive ({type(e).__name__}: {e})') from None


# ---------------------------------------------------------------------------------------------------------
# Record trees → state dicts and plain metadata

@dataclass
class NetworkRecord:
    """A network found in a reference checkpoint, before anything is built from it.

    class_name: the reference wrapper class ('EDMPrecond', 'ECMPrecond', ...).
    init_kwargs: its constructor arguments (`_init_args` named positionally, then `_init_kwargs`).
    attributes: its plain instance attributes (img_resolution, label_dim, use_fp16, sigma_min, ...).
    state_dict: name → tensor in `named_parameters()` + `named_buffers()` order (spec/cm.md §6.2).
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


def _is_module_record(obj) -> bool:
    return (isinstance(obj, (PersistentRecord, ContainerRecord)) and hasattr(obj, 'state')
            and isinstance(obj.state.get('_modules'), dict))


def _flatten(record, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """spec/cm.md §6.2: parameters, then persistent buffers, then children, depth first."""
    state = getattr(record, 'state', None)
    where = prefix.rstrip('.') or '<root>'
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict)
                                              for k in ('_parameters', '_buffers', '_modules')):
        raise CheckpointError(f'{where}: {record!r} is not a pickled torch module')
    non_persistent = state.get('_non_persistent_buffers_set') or ()
    for kind in ('_parameters', '_buffers'):
        for name, tensor in state[kind].items():
            if tensor is None or (kind == '_buffers' and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f'{prefix}{name}: expected a tensor, found a {type(tensor).__name__}')
            out[prefix + name] = tensor
    for name, child in state['_modules'].items():
        if child is not None:
            _flatten(child, f'{prefix}{name}.', out)


def _plain(obj):
    """Metadata as plain python: numpy scalars → python numbers, records → summaries; tensors kept."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, PersistentRecord):
        return _summary(obj)
    if isinstance(obj, ContainerRecord):
        return {'class_name': obj.class_name}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _attributes(state: dict) -> dict:
    return {k: _plain(v) for k, v in state.items()
            if not k.startswith('_') and k != 'training'
            and not isinstance(v, (PersistentRecord, ContainerRecord, torch.Tensor))}


def _summary(record: PersistentRecord) -> dict:
    state = record.state
    return dict(class_name=record.class_name, init_kwargs=_plain(state.get('_init_kwargs') or {}),
                attributes=_attributes(state))


def _network_record(record: PersistentRecord) -> NetworkRecord:
    state = record.state
    init_args = state.get('_init_args') or ()
    init_kwargs = dict(zip(_REFERENCE_PRECOND_ARGS, init_args))
    init_kwargs.update(state.get('_init_kwargs') or {})
    state_dict: dict[str, torch.Tensor] = {}
    _flatten(record, '', state_dict)
    return NetworkRecord(class_name=record.class_name, init_kwargs=_plain(init_kwargs),
                         attributes=_attributes(state), state_dict=state_dict,
                         training=bool(state.get('training', False)))


def _reference_checkpoint(obj, path) -> ReferenceCheckpoint:
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: top-level object is a {type(obj).__name__}, expected a dict')
    result = ReferenceCheckpoint(path=os.fspath(path))
    try:
        for key, value in obj.items():
            if isinstance(value, PersistentRecord) and _is_module_record(value):
                result.networks[key] = _network_record(value)
            else:
                result.entries[key] = _plain(value)
    except RecursionError:      # a cyclic record tree, which no real snapshot contains
        raise CheckpointError(f'{path}: cyclic or absurdly deep object tree') from None
    return result


def read_edm_pickle(path) -> ReferenceCheckpoint:
    """Read an EDM / ECT / CMT `.pkl` snapshot without executing its embedded `module_src`.

    Only the globals of spec/cm.md §6.2 are resolved; any other raises `CheckpointError` naming it."""
    return _reference_checkpoint(_unpickle_file(path), path)


def load_edm_training_state(path) -> ReferenceCheckpoint:
    """Read a reference `training-state-*.pt` (a torch.save zip of dict(net=..., [net_ref=...,]
    optimizer_state=...)) with the same restricted table; `torch.load` is not used, so nothing is executed.

    `.networks['net']` / `['net_ref']` carry the state dicts (tensors keep their stored dtype, on CPU);
    `.entries['optimizer_state']` is the optimizer state dict, loadable with `optimizer.load_state_dict`."""
    return _reference_checkpoint(_unpickle_torch_zip(path), path)


# ---------------------------------------------------------------------------------------------------------
# Network descriptions: plain dicts ↔ modules, through the allow-lists only

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
        raise CheckpointError(f'{where}: {cls.__name__} has no constructor argument(s) {_names(unknown)}')
    try:
        bound = inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise CheckpointError(f'{where}: cannot call {cls.__name__} with {sorted(kwargs)}: {e}') from None
    bound.apply_defaults()
    return {k: _plain_json(v, f'{where}.{k}') for k, v in bound.arguments.items()}


def _precond_default(name: str, arg: str) -> float:
    return float(inspect.signature(PRECONDS[name]).parameters[arg].default)


def describe_network(module: nn.Module, backbone_kwargs: dict | None = None) -> dict:
    """The architecture of `module` (a wrapper from `PRECONDS` around a backbone, or a bare backbone) as a
    plain, JSON-able dict that `build_from_description` turns back into the same module:

        dict(version=1, precond='EDMPrecond' | 'CMPrecond' | None, sigma_data, sigma_min, sigma_max,
             backbone='SongUNet' | 'DhariwalUNet' | 'MLPNet', backbone_kwargs={every constructor argument})

    The backbone's constructor arguments come from `backbone_kwargs`, else from the attribute
    `backbone.init_kwargs` that every backbone records in its constructor."""
    precond = next((name for name, cls in PRECONDS.items() if type(module) is cls), None)
    backbone = module.model if precond is not None else module
    backbone_name = next((name for name, cls in BACKBONES.items() if type(backbone) is cls), None)
    if backbone_name is None:
        raise CheckpointError(
            f'cannot describe a {type(module).__name__}' + (f' around a {type(backbone).__name__}' if precond else '')
            + f'; known wrappers: {_names(PRECONDS)}; known backbones: {_names(BACKBONES)} '
            '(pass the bare module, not a DDP / torch.compile wrapper)')
    kwargs = backbone_kwargs if backbone_kwargs is not None else getattr(backbone, 'init_kwargs', None)
    if kwargs is None:
        raise CheckpointError(
            f'{backbone_name} does not record its constructor arguments (attribute `init_kwargs`); build it '
            'with build_from_description, or pass backbone_kwargs= to describe_network')
    desc = dict(version=_DESCRIPTION_VERSION, precond=precond, sigma_data=None, sigma_min=None, sigma_max=None,
                backbone=backbone_name,
                backbone_kwargs=_resolve_kwargs(BACKBONES[backbone_name], dict(kwargs), backbone_name))
    if precond is not None:
        desc.update(sigma_data=float(module.sigma_data), sigma_min=float(module.sigma_min),
                    sigma_max=float(module.sigma_max))
    return desc


def build_from_description(desc: dict) -> nn.Module:
    """Construct the module a `describe_network` dict describes (fresh weights, train mode).

    Classes come only from `PRECONDS` / `BACKBONES`. The global RNG is left untouched: construction draws
    initial weights from a forked generator state, so loading a checkpoint does not shift a training run's
    random stream."""
    if not isinstance(desc, dict):
        raise CheckpointError(f'network description is a {type(desc).__name__}, expected a dict')
    if desc.get('version', _DESCRIPTION_VERSION) != _DESCRIPTION_VERSION:
        raise CheckpointError(f"network description version {desc.get('version')!r}; "
                              f'this engine reads version {_DESCRIPTION_VERSION}')
    backbone_name, precond = desc.get('backbone'), desc.get('precond')
    if backbone_name not in BACKBONES:
        raise CheckpointError(f'unknown backbone {backbone_name!r}; supported: {_names(BACKBONES)}')
    if precond is not None and precond not in PRECONDS:
        raise CheckpointError(f'unknown preconditioning wrapper {precond!r}; supported: {_names(PRECONDS)}')
    cls = BACKBONES[backbone_name]
    kwargs = _resolve_kwargs(cls, dict(desc.get('backbone_kwargs') or {}), backbone_name)
    with torch.random.fork_rng(devices=[]):
        backbone = cls(**copy.deepcopy(kwargs))
    if precond is None:
        return backbone
    sigmas = {k: float(desc[k]) if desc.get(k) is not None else _precond_default(precond, k)
              for k in ('sigma_data', 'sigma_min', 'sigma_max')}
    return PRECONDS[precond](backbone, **sigmas)


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
        raise CheckpointError(f'state dict entries that are not tensors: {_names(not_tensors)}')
    missing, unexpected, wrong = state_mismatch(dst, state_dict, ignore)
    shapes = [f'{k}: checkpoint {list(state_dict[k].shape)} vs network {list(dst[k].shape)}' for k in wrong]
    filters = [k for k in dst if k.endswith('resample_filter') and k in state_dict
               and state_dict[k].shape == dst[k].shape
               and not torch.equal(state_dict[k].to(dst[k].dtype).cpu(), dst[k].cpu())]
    problems = []
    if missing:
        problems.append(f'missing from the checkpoint: {_names(missing)}')
    if unexpected:
        problems.append(f'unexpected in the checkpoint: {_names(unexpected)}')
    if shapes:
        problems.append(f'shape mismatch: {_names(shapes)}')
    if filters:
        problems.append(f'resample_filter differs (another resample_filter setting?): {_names(filters)}')
    if problems:
        raise CheckpointError(f'checkpoint does not fit {type(module).__name__}: ' + '; '.join(problems))
    module.load_state_dict({k: state_dict[k] for k in dst}, strict=True)
    return module


def _description_from_record(rec: NetworkRecord, source: str, mode: str | None, drop_augment: bool,
                             overrides: dict | None) -> dict:
    if rec.class_name not in _REFERENCE_PRECONDS:
        raise CheckpointError(f'{source}: unsupported network class {rec.class_name!r}; supported: '
                              f'{_names(_REFERENCE_PRECONDS)}')
    if mode not in (None, 'teacher', 'student'):
        raise ValueError(f"mode must be None, 'teacher' or 'student'; got {mode!r}")
    kw = dict(rec.init_kwargs)
    attrs = rec.attributes
    model_type = kw.pop('model_type', 'DhariwalUNet')       # the reference wrappers' default
    if model_type not in _REFERENCE_BACKBONES:
        raise CheckpointError(f'{source}: unsupported model_type {model_type!r}; supported: '
                              f'{_names(_REFERENCE_BACKBONES)}')
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
        # builds a fresh ECMPrecond student for an EDMPrecond teacher (spec/cm.md §3.3).
        if value is None or (target != ours and k != 'sigma_data'):
            value = _precond_default(target, k)
        sigmas[k] = float(value)
    backbone_kwargs = dict(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                           label_dim=label_dim, **kw)
    if drop_augment:
        backbone_kwargs['augment_dim'] = 0
    backbone_kwargs.update(overrides or {})
    return dict(version=_DESCRIPTION_VERSION, precond=target, **sigmas, backbone=model_type,
                backbone_kwargs=backbone_kwargs)


def build_edm_network(record: NetworkRecord, *, mode: str | None = None, drop_augment: bool = False,
                      overrides: dict | None = None, source: str = '<record>') -> nn.Module:
    """Our module for a reference network record, weights copied by name; eval mode, requires_grad False.

    mode: None keeps the wrapper of the file (EDMPrecond → EDMPrecond, ECMPrecond → CMPrecond); 'teacher'
      builds EDMPrecond and 'student' CMPrecond. A changed wrapper keeps sigma_data and takes the new
      wrapper's default sigma_min / sigma_max (CMPrecond: 0.003, inf), as CMT's fresh student does.
    drop_augment: by default the architecture is the file's exactly (an EDM teacher keeps augment_dim 9 and
      `model.map_augment.weight`). With True the backbone gets augment_dim 0 and that weight is ignored —
      a teacher loaded as a CMT/ECT student (spec/cm.md §3.3).
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
        raise CheckpointError(f'{os.fspath(path)}: no network {key!r}; networks: {_names(ckpt.networks) or "none"}'
                              f'; other entries: {_names(ckpt.entries) or "none"}')
    return build_edm_network(ckpt.networks[key], mode=mode, drop_augment=drop_augment, overrides=overrides,
                             source=f'{os.fspath(path)}[{key!r}]')


# ---------------------------------------------------------------------------------------------------------
# Our checkpoints: plain state dicts, written atomically

_WEIGHTS_ONLY_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


def _check_weights_only(obj, where: str) -> None:
    """Raise if `obj` holds anything `torch.load(weights_only=True)` would refuse, naming where it is."""
    t = type(obj)
    if t in (dict, collections.OrderedDict):
        for k, v in obj.items():
            _check_weights_only(k, f'{where} key {k!r}')
            _check_weights_only(v, f'{where}[{k!r}]')
    elif t in (list, tuple, set, torch.Size):
        for i, v in enumerate(obj):
            _check_weights_only(v, f'{where}[{i}]')
    elif not (t in (torch.Tensor, nn.Parameter) or isinstance(obj, _WEIGHTS_ONLY_LEAVES)):
        raise CheckpointError(f'{where} is a {t.__module__}.{t.__qualname__}; checkpoints hold only state '
                              'dicts (tensors, numbers, strings, lists, tuples, dicts) so that they load with '
                              'weights_only=True')


def _fsync_dir(directory: str) -> None:
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


def _atomic_write(path, write: Callable[[io.BufferedWriter], None]) -> None:
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
    _fsync_dir(directory)


def save_checkpoint(path, state: dict) -> None:
    """`torch.save(state, path)`, atomically. `state` must be plain state dicts (checked before writing, so a
    module or an arbitrary object fails here rather than at resume time)."""
    if not isinstance(state, dict):
        raise CheckpointError(f'checkpoint state is a {type(state).__name__}, expected a dict')
    _check_weights_only(state, 'state')
    _atomic_write(path, lambda f: torch.save(state, f))


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


# ---------------------------------------------------------------------------------------------------------
# Releases: safetensors + JSON description

_NETWORK_KEY = 'cmt.network'


def export_safetensors(module: nn.Module, path, metadata: dict | None = None) -> None:
    """Write `module`'s weights (the EMA network of a release) as safetensors, atomically.

    The header metadata holds `describe_network(module)` as JSON under 'cmt.network', 'format': 'pt', and
    every entry of `metadata` JSON-encoded under its own key (e.g. the recipe's resolved config, kimg)."""
    from safetensors.torch import save as st_save

    header = {'format': 'pt', _NETWORK_KEY: json.dumps(describe_network(module))}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or k in header:
            raise CheckpointError(f'metadata key {k!r} is not a string or is reserved ({_names(header)})')
        try:
            header[k] = json.dumps(v)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f'metadata[{k!r}] is not JSON-serialisable: {e}') from None
    tensors = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in module.state_dict().items()}
    data = st_save(tensors, metadata=header)
    _atomic_write(path, lambda f: f.write(data))


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
    module = build_from_description(desc)
    try:
        load_network_state(module, load_file(os.fspath(path)))
    except CheckpointError as e:
        raise CheckpointError(f'{os.fspath(path)}: {e}') from None
    return module.eval().requires_grad_(False)


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
