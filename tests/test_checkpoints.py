"""Checkpoints (docs/spec/cm.md §6): reference snapshots read without their code, our atomic weights-only state
dicts, safetensors releases, and errors that name the problem.

Reference-format files are produced by `edm_pickle_writer` from our own modules, in the layout of
NVlabs/edm's `persistence.persistent_class` (no reference code involved); `module_src` in them is a canary
that would leave a marker file behind if executed.
"""
import hashlib
import json
import math
import os
import pickle
import pickletools
import zipfile

import edm_pickle_writer as W
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import checkpoints as C
from engine.checkpoints import CheckpointError
from engine.checkpoints import unpickler as U
from engine.networks import DhariwalUNet, SongUNet
from engine.precond import CMPrecond, EDMPrecond

TINY = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=0, augment_dim=0, model_channels=16,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13)
TINY_ADM = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=0, augment_dim=0, model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """These nets are tiny: intra-op threads only add overhead (and stall badly on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(precond=EDMPrecond, backbone=SongUNet, seed=0, **overrides):
    kwargs = dict(TINY if backbone is SongUNet else TINY_ADM, **overrides)
    torch.manual_seed(seed)
    net = precond(backbone(**kwargs))
    # Non-trivial values everywhere (fresh nets have zero-ish output layers and unit norms).
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval(), kwargs


def write_snapshot(tmp_path, net, kwargs, model_type='SongUNet', name='snap.pkl', edit=None, **init_extra):
    marker = tmp_path / 'module_src_was_executed'
    src = W.canary_source(marker)
    record = W.network_record(net, W.edm_init_kwargs(kwargs, model_type=model_type) | init_extra, module_src=src)
    if edit is not None:
        edit(record)
    path = tmp_path / name
    W.write_pickle(W.snapshot(record, module_src=src), path)
    return path, marker


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2)
    return x, sigma


def pickle_globals(data: bytes) -> set:
    """Every (module, name) a pickle references, read from its opcodes (nothing is executed).

    Usable on a real snapshot too: protocol >= 4 spells a global as two string pushes (possibly memo gets)
    followed by STACK_GLOBAL; older protocols use GLOBAL 'module name'."""
    found, memo, recent = set(), [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'BINUNICODE8', 'UNICODE'):
            recent.append(arg)
        elif op.name in ('BINGET', 'LONG_BINGET', 'GET'):
            recent.append(memo[int(arg)] if int(arg) < len(memo) else None)
        elif op.name == 'MEMOIZE':
            memo.append(recent[-1] if recent else None)
            continue
        elif op.name == 'STACK_GLOBAL':
            found.add((recent[-2], recent[-1]))
            recent.append(None)
        elif op.name == 'GLOBAL':
            found.add(tuple(arg.split(' ', 1)))
            recent.append(None)
        else:
            recent.append(None)
    return found


# ------------------------------------------------------------------------------------------------------
# Reference snapshots: round trips

@pytest.mark.parametrize('backbone, model_type', [(SongUNet, 'SongUNet'), (DhariwalUNet, 'DhariwalUNet')])
def test_unconditional_round_trip(tmp_path, backbone, model_type):
    net, kwargs = make(backbone=backbone)
    path, marker = write_snapshot(tmp_path, net, kwargs, model_type=model_type)
    loaded = C.load_edm_pickle(path)
    assert type(loaded) is EDMPrecond and type(loaded.model) is backbone
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert list(loaded.state_dict()) == list(net.state_dict())
    x, sigma = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), net(x, sigma))
    assert not marker.exists()
    desc = C.describe_network(loaded)
    assert desc['precond'] == 'EDMPrecond' and desc['backbone'] == model_type
    assert {k: desc['backbone_kwargs'][k] for k in kwargs} == kwargs
    assert (desc['sigma_min'], desc['sigma_max'], desc['sigma_data']) == (0.0, math.inf, 0.5)


def test_conditional_student_round_trip(tmp_path):
    net, kwargs = make(precond=CMPrecond, label_dim=10)
    path, marker = write_snapshot(tmp_path, net, kwargs)
    assert W.network_record(net, W.edm_init_kwargs(kwargs)).class_name == 'ECMPrecond'
    loaded = C.load_edm_pickle(path)
    assert type(loaded) is CMPrecond and loaded.sigma_min == 0.003 and loaded.label_dim == 10
    assert {'model.map_label.weight', 'model.map_label.bias'} <= set(loaded.state_dict())
    x, sigma = inputs()
    labels = torch.tensor([0, 3, 9])
    with torch.no_grad():
        out = loaded(x, sigma, labels)
        assert torch.equal(out, net(x, sigma, labels))
        assert not torch.equal(out, loaded(x, sigma, torch.tensor([1, 1, 1])))   # labels matter
    assert not marker.exists()


def test_teacher_loaded_as_student(tmp_path):
    """An EDM teacher (augment_dim 9, map_augment) into a CMT student: augment-free, CMPrecond, dropout 0.2."""
    teacher, kwargs = make(augment_dim=9)
    path, marker = write_snapshot(tmp_path, teacher, kwargs)
    # Default: the file's architecture exactly, map_augment included.
    exact = C.load_edm_pickle(path)
    assert exact.model.map_augment is not None
    assert torch.equal(exact.state_dict()['model.map_augment.weight'],
                       teacher.state_dict()['model.map_augment.weight'])

    student = C.load_edm_pickle(path, mode='student', drop_augment=True, overrides=dict(dropout=0.2))
    assert type(student) is CMPrecond and student.sigma_min == 0.003 and student.sigma_data == 0.5
    assert student.model.map_augment is None
    assert 'model.map_augment.weight' not in student.state_dict()
    assert C.describe_network(student)['backbone_kwargs']['dropout'] == 0.2
    x, sigma = inputs()
    c_noise = sigma.log() / 4
    with torch.no_grad():
        # Same backbone function (augment labels are never given in sampling), ...
        assert torch.equal(student.model(x, c_noise, None), teacher.model(x, c_noise, None))
        # ... and the student wrapper around the teacher's backbone gives the student's outputs.
        assert torch.equal(student(x, sigma), CMPrecond(teacher.model).eval()(x, sigma))
    assert not marker.exists()


@pytest.mark.parametrize('protocol', [2, 3, 5])
def test_other_pickle_protocols(tmp_path, protocol):
    """Older writers (protocol 2/3: sets and bytes spelled as calls) and protocol 5 load the same."""
    net, kwargs = make(label_dim=2)
    record = W.network_record(net, W.edm_init_kwargs(kwargs))
    path = tmp_path / 'snap.pkl'
    W.write_pickle(W.snapshot(record), path, protocol=protocol)
    if protocol == 2:
        assert {('_codecs', 'encode'), ('__builtin__', 'set')} <= pickle_globals(path.read_bytes())
    loaded = C.load_edm_pickle(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_snapshot_metadata(tmp_path):
    net, kwargs = make(augment_dim=9)
    path, _ = write_snapshot(tmp_path, net, kwargs)
    ckpt = C.read_edm_pickle(path)
    assert set(ckpt.networks) == {'ema'} and set(ckpt.entries) == {'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    rec = ckpt.networks['ema']
    assert rec.class_name == 'EDMPrecond' and rec.init_kwargs['model_type'] == 'SongUNet'
    assert rec.attributes['sigma_max'] == math.inf and rec.attributes['use_fp16'] is False
    assert ckpt.entries['loss_fn']['class_name'] == 'EDMLoss'
    assert ckpt.entries['dataset_kwargs']['path'] == 'datasets/cifar10-32x32.zip'
    # Flattened names = PyTorch's named_parameters() + named_buffers() names (docs/spec/cm.md §6.2).
    assert set(rec.state_dict) == set(net.state_dict())
    assert list(rec.state_dict)[0] == 'model.map_augment.weight'
    # The same record can be built into several modules (net, ema and teacher from one transfer).
    a = C.build_edm_network(rec)
    b = C.build_edm_network(rec, mode='teacher', drop_augment=True)
    assert torch.equal(a.state_dict()['model.map_layer0.weight'], b.state_dict()['model.map_layer0.weight'])


def test_writer_output_is_reference_shaped(tmp_path):
    """The stand-in writer emits exactly the globals a real EDM snapshot uses (docs/spec/cm.md §6.1)."""
    net, kwargs = make(augment_dim=9)
    path, _ = write_snapshot(tmp_path, net, kwargs)
    data = path.read_bytes()
    assert data[:2] == b'\x80\x04'                       # pickle protocol 4, as pickle.dump defaults to
    assert pickle_globals(data) == {
        ('torch_utils.persistence', '_reconstruct_persistent_obj'),
        ('torch.nn.modules.container', 'ModuleDict'),
        ('collections', 'OrderedDict'),
        ('torch._utils', '_rebuild_parameter'),
        ('torch._utils', '_rebuild_tensor_v2'),
        ('torch.storage', '_load_from_bytes'),
        ('numpy.core.multiarray', 'scalar'),
        ('numpy', 'dtype'),
    }
    # The storage blobs are legacy torch.save files: they start with the pickled magic number.
    assert (b'\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.' in data)
    # Sub-layer records carry numpy scalars as the reference's do (skip_scale = np.sqrt(0.5)).
    unet = W.find(W.network_record(net, W.edm_init_kwargs(kwargs)), 'model.enc.8x8_block0')
    assert type(unet.state['skip_scale']) is np.float64 and unet.state['_buffers'] == {}
    conv = W.find(W.network_record(net, W.edm_init_kwargs(kwargs)), 'model.enc.8x8_block0.conv0')
    assert conv.state['_buffers'] == {'resample_filter': None}


def test_full_size_cifar_teacher_keys(tmp_path):
    """docs/spec/cm.md §5.5 totals for the real CIFAR-10 configs, through the whole pickle path."""
    from engine.networks import build_network
    torch.manual_seed(0)
    teacher = EDMPrecond(build_network('cifar10-ddpmpp-teacher')).eval()
    kwargs = C.describe_network(teacher)['backbone_kwargs']     # build_network records init_kwargs
    path, _ = write_snapshot(tmp_path, teacher, kwargs)
    rec = C.read_edm_pickle(path).networks['ema']
    assert len(rec.state_dict) == 425
    assert sum(t.numel() for k, t in rec.state_dict.items() if not k.endswith('resample_filter')) == 55_733_891
    assert sum(k.endswith('resample_filter') for k in rec.state_dict) == 8
    student = C.build_edm_network(rec, mode='student', drop_augment=True, overrides=dict(dropout=0.2))
    assert len(student.state_dict()) == 424
    assert torch.equal(student.state_dict()['model.dec.32x32_aux_conv.weight'],
                       teacher.state_dict()['model.dec.32x32_aux_conv.weight'])


# ------------------------------------------------------------------------------------------------------
# Reference snapshots: nothing runs, and every problem is named

def test_canary_would_fire(tmp_path):
    """The marker test is meaningful: executing module_src does create the marker."""
    marker = tmp_path / 'marker'
    with pytest.raises(RuntimeError, match='module_src was executed'):
        exec(W.canary_source(marker), {})
    assert marker.exists()


@pytest.mark.parametrize('module, name', [('os', 'system'), ('builtins', 'eval'), ('posix', 'system'),
                                          ('subprocess', 'check_call'), ('torch', 'load')])
def test_disallowed_global_rejected(tmp_path, module, name):
    marker = tmp_path / 'pwned'
    net, kwargs = make()
    record = W.network_record(net, W.edm_init_kwargs(kwargs))
    data = W.snapshot(record)
    data['dataset_kwargs'] = W.Call(W.GlobalRef(module, name), (f'touch {marker}',))
    path = tmp_path / 'evil.pkl'
    W.write_pickle(data, path)
    with pytest.raises(CheckpointError, match=rf"refusing to load global '{module}\.{name}'") as e:
        C.read_edm_pickle(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_disallowed_global_inside_network(tmp_path):
    net, kwargs = make()

    def edit(record):
        W.find(record, 'model.map_layer0').state['in_features'] = W.Call(W.GlobalRef('builtins', 'eval'), ('1',))
    path, _ = write_snapshot(tmp_path, net, kwargs, edit=edit)
    with pytest.raises(CheckpointError, match=r"builtins\.eval"):
        C.load_edm_pickle(path)


def test_missing_key(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs,
                             edit=lambda r: W.find(r, 'model.map_layer0').state['_parameters'].pop('bias'))
    with pytest.raises(CheckpointError, match=r'missing from the checkpoint: model\.map_layer0\.bias$') as e:
        C.load_edm_pickle(path)
    assert str(path) in str(e.value)


def test_unexpected_key(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs, edit=lambda r: W.find(r, 'model.map_layer1').state[
        '_parameters'].__setitem__('gain', W.Param(torch.ones(3), False)))
    with pytest.raises(CheckpointError, match=r'unexpected in the checkpoint: model\.map_layer1\.gain$'):
        C.load_edm_pickle(path)


def test_map_augment_is_only_ignorable_for_augment_free_destinations(tmp_path):
    teacher, kwargs = make(augment_dim=9)
    path, _ = write_snapshot(tmp_path, teacher, kwargs)
    rec = C.read_edm_pickle(path).networks['ema']
    C.build_edm_network(rec, overrides=dict(augment_dim=0))                # same as drop_augment=True
    with pytest.raises(CheckpointError, match=r'model\.map_augment\.weight: checkpoint \[16, 9\] vs network '
                                              r'\[16, 4\]'):
        C.build_edm_network(rec, overrides=dict(augment_dim=4))
    with pytest.raises(CheckpointError, match=r'unexpected in the checkpoint: model\.map_augment\.weight'):
        C.load_network_state(make()[0], rec.state_dict)   # strict loads do not ignore it


def test_wrong_shape(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs, edit=lambda r: W.find(r, 'model.map_layer0').state[
        '_parameters'].__setitem__('weight', W.Param(torch.zeros(64, 17), False)))
    with pytest.raises(CheckpointError,
                       match=r'shape mismatch: model\.map_layer0\.weight: checkpoint \[64, 17\] vs network \[64, 16\]'):
        C.load_edm_pickle(path)


def test_resample_filter_checked(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs, edit=lambda r: W.find(r, 'model.enc.4x4_down.conv0').state[
        '_buffers'].__setitem__('resample_filter', torch.full((1, 1, 2, 2), 0.3)))
    with pytest.raises(CheckpointError, match=r'resample_filter differs.*model\.enc\.4x4_down\.conv0\.resample_filter'):
        C.load_edm_pickle(path)


@pytest.mark.parametrize('class_name', ['VPPrecond', 'VEPrecond', 'iDDPMPrecond'])
def test_unknown_precond_class(tmp_path, class_name):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs, edit=lambda r: setattr(r, 'class_name', class_name))
    with pytest.raises(CheckpointError, match=rf"unsupported network class '{class_name}'; supported: "
                                              r'EDMPrecond, ECMPrecond, Precond'):
        C.load_edm_pickle(path)


def test_edm2_class_name_on_an_edm_network_is_named(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs, edit=lambda r: setattr(r, 'class_name', 'Precond'))
    with pytest.raises(CheckpointError, match=r'EDM2 Precond record without its U-Net \(no unet\.\* tensors; modules '
                                              r'model\)'):
        C.load_edm_pickle(path)


def test_unknown_model_type(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs, model_type='NotAUNet')
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'NotAUNet'; supported: SongUNet, DhariwalUNet"):
        C.load_edm_pickle(path)


def test_unknown_backbone_kwarg(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs, frobnicate=3)
    with pytest.raises(CheckpointError, match=r'SongUNet has no constructor argument\(s\) frobnicate'):
        C.load_edm_pickle(path)


def test_use_fp16_warns_and_loads(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs, use_fp16=True)
    with pytest.warns(UserWarning, match='use_fp16=True.*float32'):
        loaded = C.load_edm_pickle(path)
    x, sigma = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), net(x, sigma))


def test_missing_network_key(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs)
    with pytest.raises(CheckpointError, match=r"no network 'net'; networks: ema; other entries: loss_fn"):
        C.load_edm_pickle(path, key='net')


def test_truncated_pickle(tmp_path):
    net, kwargs = make()
    path, _ = write_snapshot(tmp_path, net, kwargs)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='corrupt or truncated') as e:
        C.load_edm_pickle(path)
    assert str(path) in str(e.value)


def test_corrupt_storage_blob():
    good = W.legacy_storage_blob(torch.arange(5.))
    assert torch.equal(U._load_from_bytes(good).flat, torch.arange(5.))
    with pytest.raises(CheckpointError, match='truncated tensor storage blob'):
        U._load_from_bytes(good[:-3])
    evil = W.dumps(W.Call(W.GlobalRef('os', 'system'), ('true',)), protocol=2)
    with pytest.raises(CheckpointError, match=r"os\.system"):
        U._load_from_bytes(evil)


# ------------------------------------------------------------------------------------------------------
# Reference training states (torch.save zip archives)

def test_training_state_round_trip(tmp_path):
    student, kwargs = make(precond=CMPrecond)
    teacher, _ = make(seed=1)
    student.train()
    opt = torch.optim.RAdam(student.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    x, sigma = inputs()
    student(x, sigma).square().mean().backward()
    opt.step()
    marker = tmp_path / 'module_src_was_executed'
    src = W.canary_source(marker)
    init = W.edm_init_kwargs(kwargs)
    path = tmp_path / 'training-state-000100.pt'
    W.write_training_state(dict(net=W.network_record(student, init, module_src=src, params_require_grad=True),
                                net_ref=W.network_record(teacher, init, module_src=src),
                                optimizer_state=opt.state_dict()), path)
    with zipfile.ZipFile(path) as zf:
        pkl = next(n for n in zf.namelist() if n.endswith('/data.pkl'))
        assert ('torch_utils.persistence', '_reconstruct_persistent_obj') in pickle_globals(zf.read(pkl))

    state = C.load_edm_training_state(path)
    assert set(state.networks) == {'net', 'net_ref'} and set(state.entries) == {'optimizer_state'}
    for name, module in [('net', student), ('net_ref', teacher)]:
        sd = state.networks[name].state_dict
        assert list(sd) == list(module.state_dict())
        assert all(torch.equal(sd[k], v) for k, v in module.state_dict().items())
    assert state.networks['net'].class_name == 'ECMPrecond' and state.networks['net'].training

    # Resume: rebuild, load the optimizer state, and take the same next step as the uninterrupted run.
    resumed = C.build_edm_network(state.networks['net']).train().requires_grad_(True)
    opt2 = torch.optim.RAdam(resumed.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    opt2.load_state_dict(state.entries['optimizer_state'])
    for net, o in [(student, opt), (resumed, opt2)]:
        o.zero_grad()
        torch.manual_seed(5)
        net(x, sigma).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), resumed.state_dict().values()))
    assert not marker.exists()


def test_training_state_rejects_disallowed_global(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'training-state-evil.pt'
    W.write_training_state(dict(net=W.Call(W.GlobalRef('os', 'system'), (f'touch {marker}',))), path)
    with pytest.raises(CheckpointError, match=r"refusing to load global 'os\.system'"):
        C.load_edm_training_state(path)
    assert not marker.exists()
    path.write_bytes(b'not a zip')
    with pytest.raises(CheckpointError, match='not a torch.save zip archive'):
        C.load_edm_training_state(path)


# ------------------------------------------------------------------------------------------------------
# Network descriptions

def test_describe_build_round_trip():
    net, kwargs = make(precond=CMPrecond, label_dim=3)
    desc = C.describe_network(net, backbone_kwargs=kwargs)
    rebuilt = C.build_from_description(desc)
    assert type(rebuilt) is CMPrecond and C.describe_network(rebuilt) == desc
    C.load_network_state(rebuilt, net.state_dict())
    x, sigma = inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, sigma, torch.tensor([0, 1, 2])), net(x, sigma, torch.tensor([0, 1, 2])))
    bare = C.describe_network(net.model, backbone_kwargs=kwargs)
    assert bare['precond'] is None and type(C.build_from_description(bare)) is SongUNet


def test_describe_requires_constructor_kwargs():
    net, kwargs = make()
    assert C.describe_network(net)['backbone_kwargs'] == C.describe_network(net, backbone_kwargs=kwargs)['backbone_kwargs']
    del net.model.init_kwargs  # e.g. a backbone class from elsewhere that does not record its arguments
    with pytest.raises(CheckpointError, match='init_kwargs'):
        C.describe_network(net)
    with pytest.raises(CheckpointError, match='cannot describe a Linear'):
        C.describe_network(torch.nn.Linear(2, 2))


def test_build_only_from_allow_list():
    with pytest.raises(CheckpointError, match=r"unknown backbone 'os\.system'"):
        C.build_from_description(dict(precond=None, backbone='os.system', backbone_kwargs={}))
    with pytest.raises(CheckpointError, match=r"unknown preconditioning wrapper 'VPPrecond'"):
        C.build_from_description(dict(precond='VPPrecond', backbone='SongUNet', backbone_kwargs=TINY))


def test_build_leaves_global_rng_alone():
    desc = C.describe_network(make()[0], backbone_kwargs=TINY)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    C.build_from_description(desc)
    assert torch.equal(torch.rand(4), expected)


def test_other_architecture_names_the_keys():
    small, _ = make(model_channels=8)
    big, _ = make()
    with pytest.raises(CheckpointError) as e:
        C.load_network_state(big, small.state_dict())
    msg = str(e.value)
    assert 'shape mismatch' in msg and 'model.map_layer0.weight: checkpoint [32, 8] vs network [64, 16]' in msg
    deeper, _ = make(num_blocks=2)
    with pytest.raises(CheckpointError, match=r'missing from the checkpoint: .*model\.enc\.8x8_block1\.norm0\.weight'):
        C.load_network_state(deeper, big.state_dict())
    with pytest.raises(CheckpointError, match=r'unexpected in the checkpoint: .*model\.enc\.8x8_block1\.norm0\.weight'):
        C.load_network_state(big, deeper.state_dict())


# ------------------------------------------------------------------------------------------------------
# Our checkpoints

def training_state():
    net, kwargs = make()
    return dict(net=net.state_dict(), description=C.describe_network(net, backbone_kwargs=kwargs), kimg=1234,
                stage=2, rng=dict(torch=torch.get_rng_state(), python=(3, (1, 2, 3), None)),
                schedule=[0.1, 0.2], betas=(0.9, 0.999), step=torch.tensor(7), dtype=torch.float32)


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b) and all(assert_same(a[k], b[k]) is None for k in a)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b) and all(assert_same(x, y) is None for x, y in zip(a, b))
    else:
        assert a == b


def test_save_load_weights_only(tmp_path):
    state = training_state()
    path = tmp_path / 'ckpt.pt'
    C.save_checkpoint(path, state)
    loaded = C.load_checkpoint(path)
    assert_same(state, loaded)
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'ckpt.pt.sha256']
    torch.load(path, weights_only=True)     # loadable by anyone with weights_only=True
    rebuilt = C.build_from_description(loaded['description'])
    C.load_network_state(rebuilt, loaded['net'])


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    first = dict(kimg=1, w=torch.arange(10.))
    C.save_checkpoint(path, first)

    def crash(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a zip')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        C.save_checkpoint(path, dict(kimg=2, w=torch.zeros(10)))
    monkeypatch.undo()
    assert_same(C.load_checkpoint(path), first)
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'ckpt.pt.sha256']

    def no_replace(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, 'replace', no_replace)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(path, dict(kimg=3, w=torch.ones(10)))
    monkeypatch.undo()
    assert_same(C.load_checkpoint(path), first)
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'ckpt.pt.sha256']


def test_save_rejects_objects(tmp_path):
    net, _ = make()
    with pytest.raises(CheckpointError, match=r"state\['net'\] is a .*EDMPrecond.*weights_only=True"):
        C.save_checkpoint(tmp_path / 'ckpt.pt', dict(net=net))
    with pytest.raises(CheckpointError, match=r"state\['rng'\]\['numpy'\] is a numpy.ndarray"):
        C.save_checkpoint(tmp_path / 'ckpt.pt', dict(rng=dict(numpy=np.zeros(3))))
    assert os.listdir(tmp_path) == []


def test_load_corrupt_checkpoint(tmp_path):
    path = tmp_path / 'ckpt.pt'
    C.save_checkpoint(path, training_state())
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='corrupt or truncated') as e:
        C.load_checkpoint(path)
    assert str(path) in str(e.value)
    path.write_bytes(b'\x00garbage' * 10)
    with pytest.raises(CheckpointError, match=str(path)):
        C.load_checkpoint(path)
    # A pickle of an arbitrary object is refused by the weights-only loader, with a clear error.
    torch.save(dict(x=pickle.UnpicklingError('not a tensor')), path)
    with pytest.raises(CheckpointError, match='do not match the SHA-256'):   # not what was saved there
        C.load_checkpoint(path)
    os.remove(tmp_path / 'ckpt.pt.sha256')
    with pytest.warns(UserWarning, match='no recorded SHA-256'), pytest.raises(CheckpointError, match='weights-only'):
        C.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        C.load_checkpoint(tmp_path / 'absent.pt')


# ------------------------------------------------------------------------------------------------------
# Releases

def test_safetensors_round_trip(tmp_path):
    net, kwargs = make(precond=CMPrecond, label_dim=4)
    path = tmp_path / 'release.safetensors'
    meta = dict(recipe='cifar10-cmt', total_kimg=12800, ema=0.9999, config=dict(lr=1e-4, betas=[0.9, 0.999]))
    C.export_safetensors(net, path, meta)
    assert os.listdir(tmp_path) == ['release.safetensors']
    loaded = C.load_safetensors_network(path)
    assert type(loaded) is CMPrecond and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x, sigma = inputs()
    labels = torch.tensor([0, 2, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
    desc, user = C.read_safetensors_metadata(path)
    assert desc == C.describe_network(net) and user == meta
    with pytest.raises(CheckpointError, match='reserved'):
        C.export_safetensors(net, path, {'cmt.network': 'x'})


def test_releases_are_byte_reproducible_across_processes(tmp_path):
    """safetensors orders its header from a hash map that changes between processes; the release writer fixes
    the order, so the same weights and metadata give the same file in every process."""
    import subprocess
    import sys
    script = ("import sys, torch; from engine.networks import SongUNet; from engine.precond import CMPrecond; "
              "from engine.checkpoints.releases import export_safetensors; torch.manual_seed(0); "
              "net = CMPrecond(SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, "
              "channel_mult=[1], num_blocks=1, attn_resolutions=[])); "
              "export_safetensors(net, sys.argv[1], dict(stage='s', kimg=1.5, config=dict(a=1, b=[2, 3], c='d')))")
    hashes = set()
    for i in range(3):
        out = tmp_path / f'r{i}.safetensors'
        subprocess.run([sys.executable, '-c', script, str(out)], check=True, timeout=120)
        hashes.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(hashes) == 1
    loaded = C.load_safetensors_network(tmp_path / 'r0.safetensors')
    assert load_file(tmp_path / 'r0.safetensors').keys() == loaded.state_dict().keys()
    assert C.read_safetensors_metadata(tmp_path / 'r0.safetensors')[1]['config'] == dict(a=1, b=[2, 3], c='d')
    data = (tmp_path / 'r0.safetensors').read_bytes()
    n = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + n])
    assert n % 8 == 0 and list(header['__metadata__']) == sorted(header['__metadata__'])
    offsets = [v['data_offsets'] for k, v in header.items() if k != '__metadata__']
    assert offsets == sorted(offsets)


def test_safetensors_of_other_architecture(tmp_path):
    small, small_kw = make(model_channels=8)
    path = tmp_path / 'release.safetensors'
    C.export_safetensors(small, path, {})
    # Tamper with the description: the weights no longer fit and the error names them.
    desc, _ = C.read_safetensors_metadata(path)
    desc['backbone_kwargs']['model_channels'] = 16
    save_file(load_file(path), path, metadata={'format': 'pt', 'cmt.network': json.dumps(desc)})
    with pytest.raises(CheckpointError, match=r'model\.map_layer0\.weight: checkpoint \[32, 8\] vs network \[64, 16\]'):
        C.load_safetensors_network(path)


def test_cyclic_record_tree(tmp_path):
    net, kwargs = make()
    record = W.network_record(net, W.edm_init_kwargs(kwargs))
    W.find(record, 'model.map_layer0').state['_modules']['loop'] = record
    path = tmp_path / 'cyclic.pkl'
    W.write_pickle(W.snapshot(record), path)
    with pytest.raises(CheckpointError, match='cyclic'):
        C.read_edm_pickle(path)


def test_weights_are_looked_up_by_flag_then_variable_then_published_name_in_the_weights_directory(tmp_path,
                                                                                                  monkeypatch):
    from engine.checkpoints.files import set_weights_dir, weights_file
    from engine.errors import EngineError
    d = tmp_path / 'weights'
    d.mkdir()
    (d / 'b.pt').write_bytes(b'1')
    flag, env = tmp_path / 'flag.pt', tmp_path / 'env.pt'
    flag.write_bytes(b'2')
    env.write_bytes(b'3')
    monkeypatch.delenv('ENGINE_WEIGHTS_DIR', raising=False)
    try:
        set_weights_dir(d)
        monkeypatch.setenv('X_WEIGHTS', str(env))
        assert weights_file(str(flag), 'X_WEIGHTS', 'it', 'there', names=('a.pt', 'b.pt')) == str(flag)
        assert weights_file(None, 'X_WEIGHTS', 'it', 'there', names=('a.pt', 'b.pt')) == str(env)
        monkeypatch.delenv('X_WEIGHTS')
        assert weights_file(None, 'X_WEIGHTS', 'it', 'there', names=('a.pt', 'b.pt')) == str(d / 'b.pt')
        with pytest.raises(FileNotFoundError, match=r'it; there; or put c\.pt in the --weights directory'):
            weights_file(None, 'X_WEIGHTS', 'it', 'there', names=('c.pt',))
        set_weights_dir(None)
        monkeypatch.setenv('ENGINE_WEIGHTS_DIR', str(d))            # the variable stands in for the flag
        assert weights_file(None, 'X_WEIGHTS', 'it', 'there', names=('b.pt',)) == str(d / 'b.pt')
        with pytest.raises(EngineError, match='--weights .*: not a directory'):
            set_weights_dir(flag)
    finally:
        set_weights_dir(None)
