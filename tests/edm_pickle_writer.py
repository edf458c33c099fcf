"""Test helper: write checkpoints in the reference EDM / ECT / CMT formats without the reference code.

What the reference writes (docs/spec/cm.md §6.1; read from NVlabs/edm `torch_utils/persistence.py` and
`training/networks.py`, `training/training_loop.py` — none of their code is used here):

* `pickle.dump(dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...), f)` at the default protocol
  (4). Every object of a `persistent_class` reduces to `(torch_utils.persistence._reconstruct_persistent_obj,
  (meta,), None)` with meta = dict(type='class', version=6, module_src=<source of the defining module>,
  class_name=..., state=<the instance __dict__, i.e. nn.Module.__getstate__()>). The state holds torch's
  bookkeeping (training, _parameters, _buffers, _non_persistent_buffers_set, hook OrderedDicts, _modules),
  the class's plain attributes in assignment order (None-valued ones included: `bias`, `skip`, `map_label`
  ...), then `_init_args` / `_init_kwargs` added by the decorator after `__init__`.
* `torch.nn.ModuleDict` containers pickle natively: NEWOBJ of `torch.nn.modules.container.ModuleDict`, then
  BUILD with their `__getstate__()` dict.
* Parameters: `torch._utils._rebuild_parameter(tensor, requires_grad, OrderedDict())`; tensors:
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`; storages:
  `torch.storage._load_from_bytes(<legacy non-zip torch.save of the storage>)`.
* `torch.save(dict(net=..., [net_ref=...,] optimizer_state=...), 'training-state-*.pt')`: a zip archive
  whose `data.pkl` holds the same persistent records, tensors reduced by torch with storages as persistent
  ids.

How: `Pickler` subclasses the pure-Python `pickle._Pickler` so that a `GlobalRef(module, name)` is written
as that global whether or not the module exists here (`torch_utils` does not), and `reducer_override`
emits the reductions above for our stand-in objects. `module_src` is a canary that writes a marker file
and raises if anyone executes it.
"""
from __future__ import annotations

import collections
import io
import pickle
import types
import warnings

import numpy as np
import torch
from torch import nn


class GlobalRef:
    """A global written to the pickle as (module, name); calling it here is an error."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f'{self.module}.{self.name} is a stand-in for pickling only')

    def __repr__(self):
        return f'GlobalRef({self.module!r}, {self.name!r})'


RECONSTRUCT_PERSISTENT_OBJ = GlobalRef('torch_utils.persistence', '_reconstruct_persistent_obj')
NUMPY_SCALAR = GlobalRef('numpy.core.multiarray', 'scalar')     # numpy 1.x spelling, as in the 2022 pickles
# ndarray.__reduce__ (below protocol 5): _reconstruct(numpy.ndarray, (0,), b'b') then BUILD with (1, shape, dtype,
# is_fortran, raw bytes). NumPy 1 names the module numpy.core.multiarray (NVIDIA's EDM2 releases); NumPy 2
# numpy._core.multiarray (a release re-saved under NumPy 2).
NUMPY_RECONSTRUCT = {1: GlobalRef('numpy.core.multiarray', '_reconstruct'),
                     2: GlobalRef('numpy._core.multiarray', '_reconstruct')}
NUMPY_SCALARS = {1: NUMPY_SCALAR, 2: GlobalRef('numpy._core.multiarray', 'scalar')}
NUMPY_NDARRAY = GlobalRef('numpy', 'ndarray')
EASYDICT = GlobalRef('dnnlib.util', 'EasyDict')


class EasyDict(dict):
    """Stand-in for `dnnlib.EasyDict`: a dict subclass, which pickle writes as NEWOBJ of its class with no
    arguments, then SETITEMS."""
REBUILD_PARAMETER = GlobalRef('torch._utils', '_rebuild_parameter')
REBUILD_TENSOR_V2 = GlobalRef('torch._utils', '_rebuild_tensor_v2')
LOAD_FROM_BYTES = GlobalRef('torch.storage', '_load_from_bytes')


def canary_source(marker_path) -> str:
    """A `module_src` that leaves `marker_path` behind and raises if it is ever executed."""
    return (f'with open({str(marker_path)!r}, "w") as f:\n    f.write("module_src was executed")\n'
            'raise RuntimeError("module_src was executed")\n')


class Persistent:
    """Stand-in for an instance of a reference `persistent_class` class."""

    def __init__(self, class_name: str, state: dict, module_src: str):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def meta(self) -> dict:
        return dict(type='class', version=6, module_src=self.module_src, class_name=self.class_name,
                    state=self.state)


class Call:
    """Pickles as `func(*args)` for an arbitrary global: how a hostile file would smuggle in a call."""

    def __init__(self, func: GlobalRef, args: tuple):
        self.func, self.args = func, args


class Param:
    """A parameter tensor: pickled through `_rebuild_parameter`."""

    def __init__(self, tensor: torch.Tensor, requires_grad: bool):
        self.tensor, self.requires_grad = tensor, requires_grad


class _StorageBlob:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def legacy_storage_blob(tensor: torch.Tensor) -> bytes:
    """What `TypedStorage.__reduce__` embeds: a legacy (non-zip) `torch.save` of the tensor's storage."""
    storage = torch.storage.TypedStorage(wrap_storage=tensor.untyped_storage(), dtype=tensor.dtype,
                                         _internal=True)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.save(storage, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


class Pickler(pickle._Pickler):
    """Pure-Python pickler writing `GlobalRef`s verbatim and the reference reductions of the stand-ins.

    explicit_tensors: True for `.pkl` snapshots (tensors as `_rebuild_tensor_v2` + `_load_from_bytes`, spelled
    out here so the format does not depend on this torch version's pickling); False under `torch.save`,
    whose own persistent ids then store the data."""
    dispatch = dict(pickle._Pickler.dispatch)
    explicit_tensors = True

    def save_global_ref(self, obj: GlobalRef):
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('utf-8'))
        self.memoize(obj)

    dispatch[GlobalRef] = save_global_ref

    def save_easydict(self, obj: EasyDict):
        # what pickle writes for a dict subclass whose instance __dict__ is empty: the class, (), NEWOBJ, items
        self.save(EASYDICT)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self._batch_setitems(iter(obj.items()))

    dispatch[EasyDict] = save_easydict
    numpy_spelling = 1      # which NumPy wrote the arrays and scalars: 1 (numpy.core) or 2 (numpy._core)

    def reducer_override(self, obj):
        if isinstance(obj, Persistent):
            return RECONSTRUCT_PERSISTENT_OBJ, (obj.meta(),), None
        if isinstance(obj, Call):
            return obj.func, obj.args
        if isinstance(obj, np.generic) and obj.dtype.kind in 'biufc':
            return NUMPY_SCALARS[self.numpy_spelling], (obj.dtype, obj.tobytes())
        if isinstance(obj, np.ndarray):
            _, args, state = obj.__reduce__()          # NumPy's own state tuple, with its dtype and raw bytes
            assert args[1:] == ((0,), b'b')
            return NUMPY_RECONSTRUCT[self.numpy_spelling], (NUMPY_NDARRAY, *args[1:]), state
        if isinstance(obj, Param):
            rebuild = REBUILD_PARAMETER if self.explicit_tensors else torch._utils._rebuild_parameter
            return rebuild, (obj.tensor, obj.requires_grad, collections.OrderedDict())
        if self.explicit_tensors and type(obj) is torch.Tensor:
            return REBUILD_TENSOR_V2, (_StorageBlob(obj), obj.storage_offset(), tuple(obj.size()), obj.stride(),
                                       obj.requires_grad, collections.OrderedDict())
        if isinstance(obj, _StorageBlob):
            return LOAD_FROM_BYTES, (legacy_storage_blob(obj.tensor),)
        return NotImplemented


class _TorchSavePickler(Pickler):
    explicit_tensors = False


# What torch.save needs of a pickle module.
torch_save_pickle_module = types.SimpleNamespace(__name__='edm_pickle_writer', Pickler=_TorchSavePickler)


# Plain attributes each reference class sets in __init__ (NVlabs/edm training/networks.py), in order.
EDM_ATTRIBUTES = {
    'Linear': ('in_features', 'out_features'),
    'Conv2d': ('in_channels', 'out_channels', 'up', 'down', 'fused_resample'),
    'GroupNorm': ('num_groups', 'eps'),
    'UNetBlock': ('in_channels', 'out_channels', 'emb_channels', 'num_heads', 'dropout', 'skip_scale',
                  'adaptive_scale'),
    'PositionalEmbedding': ('num_channels', 'max_positions', 'endpoint'),
    'FourierEmbedding': (),
    'SongUNet': ('label_dropout',),
    'DhariwalUNet': ('label_dropout',),
}
_PRECOND_ATTRIBUTES = ('img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max',
                       'sigma_data')
_TORCH_KEYS = ('_parameters', '_buffers', '_modules')


def _tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().clone()


def _module_state(module: nn.Module, attributes: dict, params_require_grad: bool, children: dict) -> dict:
    """An nn.Module __dict__ in torch's order: bookkeeping, then attributes, then nothing else."""
    state = {}
    for key, value in module.__dict__.items():
        if key == '_parameters':
            state[key] = collections.OrderedDict(
                (n, None if p is None else Param(_tensor(p), params_require_grad)) for n, p in value.items())
        elif key == '_buffers':
            state[key] = collections.OrderedDict((n, None if b is None else _tensor(b)) for n, b in value.items())
        elif key == '_modules':
            state[key] = collections.OrderedDict((n, children[n]) for n in value)
        elif key == 'training' or (key.startswith('_') and key != '_compiled_call_impl'
                                   and isinstance(value, (dict, set, bool, type(None)))):
            state[key] = type(value)(value) if isinstance(value, (dict, set)) else value
    state.update(attributes)
    return state


def _layer_record(module: nn.Module, module_src: str, params_require_grad: bool, name: str = ''):
    children = {n: None if c is None else _layer_record(c, module_src, params_require_grad, n)
                for n, c in module._modules.items()}
    if type(module) is nn.ModuleDict:
        record = nn.ModuleDict.__new__(nn.ModuleDict)       # pickles natively: NEWOBJ + BUILD
        record.__dict__.update(_module_state(module, {}, params_require_grad, children))
        return record
    class_name = type(module).__name__
    if class_name in EDM_ATTRIBUTES:
        attrs = {k: getattr(module, k) for k in EDM_ATTRIBUTES[class_name]}
    else:
        attrs = {k: v for k, v in module.__dict__.items()
                 if not k.startswith('_') and k not in ('training', 'init_kwargs')
                 and isinstance(v, (bool, int, float, str, list, tuple))}
    if 'skip_scale' in attrs:
        attrs['skip_scale'] = np.float64(attrs['skip_scale'])   # EDM: np.sqrt(0.5)
    # Submodule slots that are None are plain attributes (EDM: `self.skip = None`, `self.bias = None`).
    attrs.update({k: None for k, v in module.__dict__.items() if v is None and not k.startswith('_')})
    init_kwargs = {k: v for k, v in attrs.items() if v is not None and k != 'num_groups'}
    if name == 'qkv':
        init_kwargs['init_weight'] = np.sqrt(0.2)               # a numpy scalar inside _init_kwargs too
    attrs.update(_init_args=(), _init_kwargs=init_kwargs)
    return Persistent(class_name, _module_state(module, attrs, params_require_grad, children), module_src)


def edm_init_kwargs(backbone_kwargs: dict, model_type: str = 'SongUNet', use_fp16: bool = False) -> dict:
    """The wrapper's `_init_kwargs` as EDM's train.py passes them: interface kwargs + network kwargs."""
    kw = dict(backbone_kwargs)
    img_channels = kw.pop('in_channels')
    kw.pop('out_channels', None)
    return dict(img_resolution=kw.pop('img_resolution'), img_channels=img_channels,
                label_dim=kw.pop('label_dim', 0), model_type=model_type, use_fp16=use_fp16, **kw)


def network_record(net: nn.Module, init_kwargs: dict, *, class_name: str | None = None,
                   module_src: str = '', params_require_grad: bool = False) -> Persistent:
    """The record tree of a wrapper around a backbone, as the reference pickles an `EDMPrecond` /
    `ECMPrecond` (class_name defaults to 'EDMPrecond' for our EDMPrecond, 'ECMPrecond' for CMPrecond)."""
    class_name = class_name or {'EDMPrecond': 'EDMPrecond', 'CMPrecond': 'ECMPrecond'}[type(net).__name__]
    attrs = dict(img_resolution=init_kwargs['img_resolution'], img_channels=init_kwargs['img_channels'],
                 label_dim=init_kwargs.get('label_dim', 0), use_fp16=init_kwargs.get('use_fp16', False),
                 sigma_min=net.sigma_min, sigma_max=net.sigma_max, sigma_data=net.sigma_data)
    assert tuple(attrs) == _PRECOND_ATTRIBUTES
    attrs.update(_init_args=(), _init_kwargs=dict(init_kwargs))
    children = {'model': _layer_record(net.model, module_src, params_require_grad)}
    return Persistent(class_name, _module_state(net, attrs, params_require_grad, children), module_src)


def snapshot(ema: Persistent, *, module_src: str = '', dataset_kwargs: dict | None = None,
             with_loss_fn: bool = True) -> dict:
    """The dict an EDM snapshot pickles: ema, loss_fn (EDMLoss), augment_pipe (AugmentPipe), dataset_kwargs."""
    loss_fn = Persistent('EDMLoss', dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, _init_args=(),
                                         _init_kwargs=dict(P_mean=-1.2, P_std=1.2)), module_src)
    augment_pipe = Persistent('AugmentPipe', dict(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=0,
                                                  aniso=1, translate_frac=1, _init_args=(),
                                                  _init_kwargs=dict(p=0.12, xflip=1e8)), module_src)
    data = dict(ema=ema)
    if with_loss_fn:
        data['loss_fn'] = loss_fn
    data['augment_pipe'] = augment_pipe
    data['dataset_kwargs'] = dataset_kwargs if dataset_kwargs is not None else dict(
        class_name='training.dataset.ImageFolderDataset', path='datasets/cifar10-32x32.zip', use_labels=False,
        xflip=False, cache=True, resolution=32, max_size=50000)
    return data


def find(record, dotted: str):
    """The sub-record at a dotted module path ('model.enc.8x8_conv'), for editing in tests."""
    for part in filter(None, dotted.split('.')):
        record = (record.state if isinstance(record, Persistent) else record.__dict__)['_modules'][part]
    return record


def state_of(record) -> dict:
    return record.state if isinstance(record, Persistent) else record.__dict__


def write_pickle(obj, path, protocol: int = 4, numpy_spelling: int = 1) -> None:
    """`pickle.dump(obj, f)` as the reference snapshots do, through the stand-in reductions; NumPy objects
    spelled as NumPy `numpy_spelling` (1 or 2) writes them."""
    with open(path, 'wb') as f:
        pickler = Pickler(f, protocol=protocol)
        pickler.numpy_spelling = numpy_spelling
        pickler.dump(obj)


def dumps(obj, protocol: int = 4) -> bytes:
    buf = io.BytesIO()
    Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def write_training_state(obj, path) -> None:
    """`torch.save(obj, path)` as the reference training loops do (zip archive, torch's storages)."""
    torch.save(obj, path, pickle_module=torch_save_pickle_module)


# ---- EDM2 (docs/spec/edm2_latent.md §2.4; NVlabs/edm2 training/networks_edm2.py, training/training_loop.py) ----
# Plain attributes each reference class sets in __init__, in order, and its positional constructor arguments.
EDM2_ATTRIBUTES = {
    'MPFourier': (),
    'MPConv': ('out_channels',),
    'Block': ('out_channels', 'flavor', 'resample_filter', 'resample_mode', 'num_heads', 'dropout', 'res_balance',
              'attn_balance', 'clip_act'),
    'UNet': ('label_balance', 'concat_balance'),
}
_EDM2_CLASS = {'MPFourier': 'MPFourier', 'MPConv': 'MPConv', 'EDM2Block': 'Block', 'EDM2UNet': 'UNet'}


def _edm2_record(module: nn.Module, module_src: str, init_kwargs: dict):
    children = {n: None if c is None else _edm2_record(c, module_src, {}) for n, c in module._modules.items()}
    if type(module) is nn.ModuleDict:
        record = nn.ModuleDict.__new__(nn.ModuleDict)
        record.__dict__.update(_module_state(module, {}, False, children))
        return record
    class_name = _EDM2_CLASS[type(module).__name__]
    attrs = {k: getattr(module, k) for k in EDM2_ATTRIBUTES[class_name]}
    attrs.update({k: None for k, v in module.__dict__.items() if v is None and not k.startswith('_')})
    args = ()
    if class_name == 'MPConv':
        w = module.weight
        args, init_kwargs = (w.shape[1], w.shape[0]), dict(kernel=list(w.shape[2:]))
    elif class_name == 'MPFourier':
        args = (module.freqs.numel(),)
    attrs.update(_init_args=args, _init_kwargs=dict(init_kwargs))
    return Persistent(class_name, _module_state(module, attrs, False, children), module_src)


def edm2_network_record(net: nn.Module, *, module_src: str = '', fp16: bool = True,
                        precond_init_kwargs: dict | None = None) -> Persistent:
    """The record tree EDM2 pickles for a `Precond` (our EDM2Precond): every tensor cast to float16 as the
    reference's snapshots do (`copy.deepcopy(ema).to(torch.float16)`), the U-Net's `_init_kwargs` its own."""
    import copy as _copy
    net = _copy.deepcopy(net).cpu().eval()
    if fp16:
        net = net.to(torch.float16)
    unet_kwargs = dict(net.unet.init_kwargs)
    init = precond_init_kwargs if precond_init_kwargs is not None else dict(
        img_resolution=unet_kwargs['img_resolution'], img_channels=unet_kwargs['img_channels'],
        label_dim=unet_kwargs['label_dim'], model_channels=unet_kwargs['model_channels'],
        dropout=unet_kwargs['dropout'], use_fp16=net.use_fp16)
    children = {'unet': _edm2_record(net.unet, module_src, unet_kwargs)}
    for name in ('logvar_fourier', 'logvar_linear'):
        if name in net._modules:
            children[name] = _edm2_record(net._modules[name], module_src, {})
    attrs = dict(img_resolution=unet_kwargs['img_resolution'], img_channels=unet_kwargs['img_channels'],
                 label_dim=unet_kwargs['label_dim'], use_fp16=net.use_fp16, sigma_data=net.sigma_data,
                 _init_args=(), _init_kwargs=init)
    return Persistent('Precond', _module_state(net, attrs, False, children), module_src)


def stability_vae_encoder(module_src: str = '', raw_mean=(5.81, 3.25, 0.12, -2.15), raw_std=(4.17, 4.62, 3.71, 3.28),
                          final_mean=0.0, final_std=0.5) -> Persistent:
    """EDM2's `training.encoders.StabilityVAEEncoder` as its pickle holds it: the instance __dict__ with `_vae`
    None (its __getstate__), scale and bias float32 arrays of 4 computed as its __init__ does, then the
    decorator's _init_args / _init_kwargs. The defaults are its own."""
    scale = np.float32(final_std) / np.float32(raw_std)
    bias = np.float32(final_mean) - np.float32(raw_mean) * scale
    return Persistent('StabilityVAEEncoder', dict(vae_name='stabilityai/sd-vae-ft-mse', scale=scale, bias=bias,
                                                  batch_size=8, _vae=None, _init_args=(), _init_kwargs={}),
                      module_src)


def edm2_snapshot(ema: Persistent, *, module_src: str = '', P_mean: float = -0.8, P_std: float = 1.6,
                  dataset_path: str = 'datasets/img64.zip', encoder: Persistent | None = None) -> EasyDict:
    """The dict EDM2's training loop pickles per snapshot (training/training_loop.py): dnnlib.EasyDict(encoder,
    dataset_kwargs, loss_fn) with `ema` added, in that order. `encoder` defaults to the pixel models'
    StandardRGBEncoder; latent models carry `stability_vae_encoder()`."""
    if encoder is None:
        encoder = Persistent('StandardRGBEncoder', dict(_init_args=(), _init_kwargs={}), module_src)
    loss_fn = Persistent('EDM2Loss', dict(P_mean=P_mean, P_std=P_std, sigma_data=0.5, _init_args=(),
                                          _init_kwargs=dict(P_mean=P_mean, P_std=P_std)), module_src)
    data = EasyDict(encoder=encoder, dataset_kwargs=EasyDict(class_name='training.dataset.ImageFolderDataset',
                                                             path=dataset_path, use_labels=True),
                    loss_fn=loss_fn)
    data['ema'] = ema
    return data
