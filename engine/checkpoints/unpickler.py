"""Reading the reference code's pickles without running any of their code (docs/spec/cm.md §6.1, §6.2;
docs/spec/edm2_latent.md
§2.5): EDM / ECT / CMT / EDM2 snapshots and training states, and NVIDIA's detector pickles.

Their objects are pickled with the source code of the defining module (`module_src`), which the reference
unpickler `exec`s. Here the unpickler resolves only an explicit table of globals (`ALLOWED_GLOBALS`): persistent
objects become passive `PersistentRecord`s (their `module_src` kept as text, never compiled), torch containers
`ContainerRecord`s, tensors are rebuilt from their storages by hand; any other global is refused by name before
anything is called. `flatten` turns a record tree into state-dict names; `plain` turns metadata into plain Python.
Imports only torch, NumPy and the standard library (engine.checkpoints.files for the error type).
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import sys
import zipfile
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from engine.checkpoints.files import CheckpointError

__all__ = ['PersistentRecord', 'ContainerRecord', 'ALLOWED_GLOBALS', 'unpickle_file', 'unpickle_torch_zip',
           'is_module_record', 'flatten', 'plain', 'attributes', 'summary']


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

    Layout (docs/spec/cm.md §6.1): pickled magic number, protocol version and sys-info dict; a pickle of the
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
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:                                 # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar
    return scalar


_np_scalar = _numpy_scalar_fn()


def _numpy_scalar(dtype, data=None):
    """Stands in for `numpy.core.multiarray.scalar`, for numeric dtypes only (e.g. skip_scale = sqrt(0.5))."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or not isinstance(data, bytes):
        raise CheckpointError(f'numpy scalar of dtype {dtype!r} is not allowed; only numeric scalars are')
    return _np_scalar(dtype, data)


class _NdarrayType:
    """What the global `numpy.ndarray` resolves to: a marker that `_reconstruct` accepts as its subtype. Not the
    class itself, whose constructor would allocate whatever shape a file asks for."""


class _CheckedArray(np.ndarray):
    """The empty array `_reconstruct` returns. Its BUILD (`__setstate__`) checks the state before NumPy's own
    `__setstate__` sees it: a numeric dtype, integer dimensions, and raw data of exactly the size they claim. An
    object array's state carries its elements as pickled objects, so refusing the dtype first means none of them
    is built. `plain` hands readers a plain ndarray."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CheckpointError(f'numpy array state {str(state)[:80]!r} is not (version, shape, dtype, is_fortran, '
                                  'data)')
        version, shape, dtype, fortran, data = state
        if version != 1 or not isinstance(fortran, bool):
            raise CheckpointError(f'numpy array state of version {version!r}, is_fortran {fortran!r}; NumPy writes '
                                  'version 1 and a bool')
        _check_array(dtype, shape, data, 'F' if fortran else 'C')
        np.ndarray.__setstate__(self, state)


def _check_array(dtype, shape, data, order) -> None:
    """A numeric numpy array's pieces as a pickle spells them, checked before NumPy builds anything from them."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or dtype.fields is not None:
        raise CheckpointError(f'numpy array of dtype {dtype!r} is not allowed; only numeric arrays are (an object '
                              'array would unpickle its elements as arbitrary objects)')
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise CheckpointError(f'numpy array with shape {shape!r}; expected a tuple of non-negative ints')
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError(f'numpy array data is a {type(data).__name__}, expected bytes')
    if len(data) != math.prod(shape) * dtype.itemsize or order not in ('C', 'F'):
        raise CheckpointError(f'numpy array of shape {shape} {dtype} (order {order!r}) with {len(data)} bytes of '
                              f'data; that shape needs {math.prod(shape) * dtype.itemsize}')


def _ndarray_reconstruct(subtype, shape, typecode):
    """Stands in for `numpy.core.multiarray._reconstruct` (`numpy._core…` when written under NumPy 2): the
    empty array that BUILD then fills (`ndarray.__reduce__` below protocol 5). Only the form NumPy writes:
    `_reconstruct(numpy.ndarray, (0,), b'b')`."""
    if subtype is not _NdarrayType or shape != (0,) or typecode not in (b'b', 'b'):
        raise CheckpointError(f'numpy _reconstruct({subtype!r}, {shape!r}, {typecode!r}) is not the form NumPy '
                              "writes: _reconstruct(numpy.ndarray, (0,), b'b')")
    return _CheckedArray((0,), dtype=np.uint8)


def _ndarray_frombuffer(buffer, dtype, shape, order):
    """Stands in for `numpy.core.numeric._frombuffer` (`numpy._core…`), what `ndarray.__reduce_ex__` writes at
    protocol 5: the data in band as bytes or a bytearray, copied into a fresh array."""
    if isinstance(buffer, pickle.PickleBuffer):
        buffer = bytes(buffer.raw())
    _check_array(dtype, tuple(shape) if isinstance(shape, (tuple, list)) else shape, buffer, order)
    return np.frombuffer(buffer, dtype=dtype).reshape(tuple(shape), order=order).copy()


def _encode_latin1(text, encoding='latin1'):
    """Stands in for `_codecs.encode`, which protocol-2 pickles (torch.save's default) use to spell bytes."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise CheckpointError(f'_codecs.encode is allowed only as str → latin1 bytes, not {encoding!r}')
    return text.encode('latin1')


# docs/spec/cm.md §6.2: the complete list of globals a reference checkpoint may name.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
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
    # numeric arrays: EDM2's StabilityVAEEncoder pickles its scale and bias as float32 arrays of 4 values
    # (docs/spec/edm2_latent.md §2.5), in NumPy 1's spelling as NVIDIA wrote them or NumPy 2's when re-saved
    ('numpy', 'ndarray'): _NdarrayType,
    ('numpy.core.multiarray', '_reconstruct'): _ndarray_reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _ndarray_reconstruct,
    ('numpy.core.numeric', '_frombuffer'): _ndarray_frombuffer,
    ('numpy._core.numeric', '_frombuffer'): _ndarray_frombuffer,
    ('dnnlib.util', 'EasyDict'): dict,
    # Protocol <= 3 writers spell sets as a call; torch.save (protocol 2) with python-2 module names.
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('__builtin__', 'set'): set,
    ('__builtin__', 'frozenset'): frozenset,
    ('_codecs', 'encode'): _encode_latin1,  # bytes (numpy scalar data) in protocol-2 pickles
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS`; any other global is refused by name before anything is called."""
    extra_globals: dict = {}

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        key = (module, name)
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        if key in self.extra_globals:
            return self.extra_globals[key]
        raise CheckpointError(
            f"{self.source}: refusing to load global '{module}.{name}'. A reference checkpoint may only name: "
            + ', '.join(f'{m}.{n}' for m, n in ALLOWED_GLOBALS))


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


def unpickle_file(path) -> Any:
    source = os.fspath(path)
    with open(path, 'rb') as f:
        try:
            return _RestrictedUnpickler(f, source).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError, ValueError) as e:
            raise CheckpointError(f'{source}: corrupt or truncated pickle ({type(e).__name__}: {e})') from None


def unpickle_torch_zip(path, extra_globals: dict | None = None) -> Any:
    """The object in a `torch.save` zip archive, unpickled with the restricted table (no torch.load involved).
    `extra_globals` adds passive record classes a caller expects (e.g. the torch.nn modules of a pickled network:
    engine/perceptual/elatentlpips.py), never anything that runs code."""
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
            unpickler = _ZipUnpickler(io.BytesIO(zf.read(pickles[0])), source, load_storage)
            if extra_globals:
                unpickler.extra_globals = {**_STORAGE_GLOBALS, **extra_globals}
            return unpickler.load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError, ValueError,
                zipfile.BadZipFile) as e:
            raise CheckpointError(f'{source}: corrupt archive ({type(e).__name__}: {e})') from None


# ---------------------------------------------------------------------------------------------------------
# Record trees → state dicts and plain metadata

def is_module_record(obj) -> bool:
    return (isinstance(obj, (PersistentRecord, ContainerRecord)) and hasattr(obj, 'state')
            and isinstance(obj.state.get('_modules'), dict))


def flatten(record, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """docs/spec/cm.md §6.2: parameters, then persistent buffers, then children, depth first."""
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
            flatten(child, f'{prefix}{name}.', out)


def plain(obj):
    """Metadata as plain python: numpy scalars → python numbers, records → summaries; tensors and numeric
    arrays kept."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return np.array(obj)              # a plain ndarray, not the checking subclass it was read as
    if isinstance(obj, PersistentRecord):
        return summary(obj)
    if isinstance(obj, ContainerRecord):
        return {'class_name': obj.class_name}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def attributes(state: dict) -> dict:
    return {k: plain(v) for k, v in state.items()
            if not k.startswith('_') and k != 'training'
            and not isinstance(v, (PersistentRecord, ContainerRecord, torch.Tensor))}


def summary(record: PersistentRecord) -> dict:
    state = record.state
    return dict(class_name=record.class_name, init_kwargs=plain(state.get('_init_kwargs') or {}),
                attributes=attributes(state))
