"""EDM2: the magnitude-preserving U-Net against float64 recomputations of docs/spec/edm2_latent.md §1, the released
layout and sizes, code-free loading of EDM2 pickles and training states, forced weight normalisation in the loop,
the uncertainty loss, post-hoc EMA reconstruction, guidance and EDM2's sampler."""
from __future__ import annotations

import copy
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import edm_pickle_writer as W  # noqa: E402

from engine.checkpoints import load_edm_pickle  # noqa: E402
from engine.checkpoints.files import CheckpointError  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.networks.edm2_unet import (  # noqa: E402
    EDM2Block,
    EDM2UNet,
    MPConv,
    MPFourier,
    force_weight_normalization,
    mp_attention,
    mp_attention_reference,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    resample,
)
from engine.pipelines.edm2_presets import GUIDED, build_edm2_preset, pretraining_stage, with_unit_gains  # noqa: E402
from engine.precond import EDM2Precond, build_edm2  # noqa: E402

# ---- primitives against float64 recomputation (§1.1) -----------------------------------------------------------


def rms_normalise64(x: np.ndarray, axes, eps=1e-4) -> np.ndarray:
    """x / (eps + sqrt(mean(x² over axes))), the unit-RMS normalisation of §1.1, written out in float64."""
    return x / (eps + np.sqrt(np.mean(x ** 2, axis=axes, keepdims=True)))


def test_primitives_equal_their_float64_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randn(3, 7, 4, 4, generator=g, dtype=torch.float64)
    xn = x.numpy()
    np.testing.assert_allclose(normalize(x).numpy(), rms_normalise64(xn, (1, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(normalize(x, dim=1).numpy(), rms_normalise64(xn, (1,)), rtol=1e-13)
    # float32 input: the norm in float32, the result float32
    assert normalize(x.float()).dtype == torch.float32
    np.testing.assert_allclose(normalize(x.float()).numpy(), rms_normalise64(xn, (1, 2, 3)), rtol=2e-6)
    np.testing.assert_allclose(mp_silu(x).numpy(), xn / (1 + np.exp(-xn)) / 0.596, rtol=1e-13)
    a, b = x, torch.randn_like(x)
    np.testing.assert_allclose(mp_sum(a, b, 0.3).numpy(), (0.7 * a.numpy() + 0.3 * b.numpy()) / math.sqrt(0.58),
                               rtol=1e-13)
    cat = mp_cat(x, y, t=0.5).numpy()
    Na, Nb = 5, 7
    np.testing.assert_allclose(cat[:, :5], xn * math.sqrt((Na + Nb) / (2 * Na)), rtol=1e-13)   # a first
    np.testing.assert_allclose(cat[:, 5:], y.numpy() * math.sqrt((Na + Nb) / (2 * Nb)), rtol=1e-13)
    # resample with [1, 1]: 2×2 average pooling down, nearest-neighbour up
    np.testing.assert_allclose(resample(x, mode='down').numpy(), F.avg_pool2d(x, 2).numpy(), rtol=1e-13)
    np.testing.assert_allclose(resample(x, mode='up').numpy(), xn.repeat(2, axis=2).repeat(2, axis=3), rtol=1e-13)
    assert resample(x, mode='keep') is x


def test_mp_fourier_uses_its_stored_buffers():
    torch.manual_seed(3)
    f = MPFourier(6).double()
    assert [n for n, _ in f.named_buffers()] == ['freqs', 'phases'] and not list(f.parameters())
    s = torch.tensor([-1.5, 0.0, 0.7], dtype=torch.float64)
    want = np.cos(np.outer(s.numpy(), f.freqs.numpy()) + f.phases.numpy()) * math.sqrt(2)
    np.testing.assert_allclose(f(s).numpy(), want, rtol=1e-13)
    # the buffers are the reference's draws: 2π·N(0,1) then 2π·U(0,1), from the global RNG in that order
    torch.manual_seed(3)
    np.testing.assert_allclose(f.freqs.numpy(), (2 * math.pi * torch.randn(6, dtype=torch.float32)).double().numpy())


@pytest.mark.parametrize('kernel', [[3, 3], [1, 1], []])
def test_mp_conv_is_a_unit_magnitude_weight_and_never_writes_in_forward(kernel):
    torch.manual_seed(1)
    conv = MPConv(5, 4, kernel).double().train()
    w0 = conv.weight.detach().clone()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64) if kernel else torch.randn(2, 5, dtype=torch.float64)
    out = conv(x, gain=1.7)
    assert torch.equal(conv.weight, w0), 'forward must not overwrite the weight (the loop normalises it)'
    fan_in = 5 * int(np.prod(kernel or [1]))
    wn = rms_normalise64(w0.numpy(), tuple(range(1, w0.ndim))) * 1.7 / math.sqrt(fan_in)
    # every output unit's effective weight has L2 norm gain/(1 + eps) up to rounding
    np.testing.assert_allclose(np.linalg.norm(wn.reshape(4, -1), axis=1), 1.7 / (1 + 1e-4 / 1.0), rtol=2e-3)
    if kernel:
        want = F.conv2d(x, torch.from_numpy(wn), padding=kernel[0] // 2)
    else:
        want = x @ torch.from_numpy(wn).t()
    np.testing.assert_allclose(out.detach().numpy(), want.numpy(), rtol=1e-12, atol=1e-14)
    assert force_weight_normalization(conv) == 1
    np.testing.assert_allclose(conv.weight.detach().numpy(), rms_normalise64(w0.numpy(), tuple(range(1, w0.ndim))),
                               rtol=1e-13)


def block_reference64(blk: EDM2Block, x: torch.Tensor, emb: torch.Tensor) -> np.ndarray:
    """One block (§1.2) in float64 numpy from its weights, written out step by step; attention per head with the
    channel index (h·C_h + c)·3 + j for j ∈ {q, k, v}."""
    def W(conv, gain=1.0):
        w = conv.weight.detach().numpy()
        fan_in = int(np.prod(w.shape[1:]))
        return rms_normalise64(w, tuple(range(1, w.ndim))) * gain / math.sqrt(fan_in)

    def conv(conv_mod, v, gain=1.0):
        w = torch.from_numpy(W(conv_mod, gain))
        return F.conv2d(torch.from_numpy(v), w, padding=w.shape[-1] // 2).numpy()

    silu = lambda v: v / (1 + np.exp(-v)) / 0.596
    v = x.numpy()
    if blk.resample_mode == 'down':
        v = v.reshape(v.shape[0], v.shape[1], v.shape[2] // 2, 2, v.shape[3] // 2, 2).mean(axis=(3, 5))
    elif blk.resample_mode == 'up':
        v = v.repeat(2, axis=2).repeat(2, axis=3)
    if blk.flavor == 'enc':
        if blk.conv_skip is not None:
            v = conv(blk.conv_skip, v)
        v = rms_normalise64(v, (1,))
    y = conv(blk.conv_res0, silu(v))
    c = emb.numpy() @ W(blk.emb_linear, float(blk.emb_gain.detach())).T + 1
    y = silu(y * c[:, :, None, None])
    y = conv(blk.conv_res1, y)
    if blk.flavor == 'dec' and blk.conv_skip is not None:
        v = conv(blk.conv_skip, v)
    v = (0.7 * v + 0.3 * y) / math.sqrt(0.58)
    if blk.num_heads:
        N, C, H, Wd = v.shape
        qkv = conv(blk.attn_qkv, v).reshape(N, 3 * C, H * Wd)
        ch = C // blk.num_heads
        out = np.zeros((N, C, H * Wd))
        for h in range(blk.num_heads):
            idx = lambda j: [(h * ch + c) * 3 + j for c in range(ch)]
            q, k, val = (rms_normalise64(qkv[:, idx(j)], (1,)) for j in range(3))
            logits = np.einsum('ncq,nck->nqk', q, k) / math.sqrt(ch)
            w = np.exp(logits - logits.max(axis=2, keepdims=True))
            w /= w.sum(axis=2, keepdims=True)
            out[:, h * ch:(h + 1) * ch] = np.einsum('nqk,nck->ncq', w, val)
        y = conv(blk.attn_proj, out.reshape(N, C, H, Wd))
        v = (0.7 * v + 0.3 * y) / math.sqrt(0.58)
    return np.clip(v, -256, 256)


@pytest.mark.parametrize('flavor,mode,cin,cout,attention', [
    ('enc', 'down', 8, 8, False), ('enc', 'keep', 8, 16, True), ('dec', 'keep', 24, 16, True),
    ('dec', 'up', 16, 16, False)])
def test_one_block_equals_its_float64_recomputation(flavor, mode, cin, cout, attention):
    torch.manual_seed(2)
    blk = EDM2Block(cin, cout, 12, flavor=flavor, resample_mode=mode, attention=attention,
                    channels_per_head=8).double().eval()
    with torch.no_grad():
        blk.emb_gain.fill_(0.8)
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64) * 2
    emb = torch.randn(2, 12, dtype=torch.float64)
    assert (blk.num_heads != 0) == attention and (blk.conv_skip is not None) == (cin != cout)
    np.testing.assert_allclose(blk(x, emb).detach().numpy(), block_reference64(blk, x, emb), rtol=1e-10,
                               atol=1e-12)


def test_naive_qkv_split_would_differ():
    """The q/k/v axis is innermost (§1.2): splitting the 3C channels into contiguous thirds gives another result."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 8, 16).unbind(0)
    qkv = torch.stack([q, k, v], dim=3).reshape(2, 2 * 8 * 3, 16)      # (h, c, j) order
    split = qkv.reshape(2, 3, 2, 8, 16).unbind(1)                     # the naive reading
    assert not torch.allclose(mp_attention_reference(*split), mp_attention_reference(q, k, v))


def test_fused_attention_equals_the_reference_einsum():
    torch.manual_seed(0)
    q, k, v = (normalize(t, dim=2) for t in torch.randn(3, 2, 3, 64, 37).unbind(0))
    torch.testing.assert_close(mp_attention(q, k, v), mp_attention_reference(q, k, v), rtol=1e-5, atol=1e-6)
    q, k, v = (t.double() for t in (q, k, v))
    torch.testing.assert_close(mp_attention(q, k, v), mp_attention_reference(q, k, v), rtol=1e-12, atol=1e-13)
    # the whole network with either kernel (the U-Net's attention_kernel setting)
    torch.manual_seed(0)
    a = build_edm2_preset('edm2-tiny').eval()
    b = build_edm2_preset('edm2-tiny', attention_kernel='einsum').eval()
    b.load_state_dict(a.state_dict())
    with_unit_gains(a), with_unit_gains(b)
    x, s, lab = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 5.0]), torch.tensor([1, 2])
    torch.testing.assert_close(a(x, s, lab), b(x, s, lab), rtol=1e-5, atol=1e-5)
    assert not torch.equal(a(x, s, lab), build_edm2_preset('edm2-tiny').eval()(x, s, lab))


# ---- topology, sizes and the released layout (§1.3, §1.4, §1.6) ------------------------------------------------

# Parameter counts of NVlabs/edm2's Precond (training/networks_edm2.py at 4bf8162, fetched and run locally on the
# meta device; that code is not part of this repository). 512: 4-channel 64×64 latents; 64: RGB pixels.
REFERENCE_PARAMETERS = {
    'edm2-img512-xxs': 31_309_029, 'edm2-img512-xs': 124_713_253, 'edm2-img512-s': 280_212_837,
    'edm2-img512-m': 497_807_781, 'edm2-img512-l': 777_498_085, 'edm2-img512-xl': 1_119_283_749,
    'edm2-img512-xxl': 1_523_164_773,
    'edm2-img64-xs': 124_710_949, 'edm2-img64-s': 280_209_381, 'edm2-img64-m': 497_803_173,
    'edm2-img64-l': 777_492_325, 'edm2-img64-xl': 1_119_276_837,
}
# §1.4's table, in millions
SPEC_MILLIONS = dict(xxs=31.3, xs=124.7, s=280.2, m=497.8, l=777.5, xl=1119.3, xxl=1523.2)

MODULE_ORDER = ('enc.64x64_conv enc.64x64_block0 enc.64x64_block1 enc.64x64_block2 enc.32x32_down enc.32x32_block0 '
                'enc.32x32_block1 enc.32x32_block2 enc.16x16_down enc.16x16_block0 enc.16x16_block1 enc.16x16_block2 '
                'enc.8x8_down enc.8x8_block0 enc.8x8_block1 enc.8x8_block2 dec.8x8_in0 dec.8x8_in1 dec.8x8_block0 '
                'dec.8x8_block1 dec.8x8_block2 dec.8x8_block3 dec.16x16_up dec.16x16_block0 dec.16x16_block1 '
                'dec.16x16_block2 dec.16x16_block3 dec.32x32_up dec.32x32_block0 dec.32x32_block1 dec.32x32_block2 '
                'dec.32x32_block3 dec.64x64_up dec.64x64_block0 dec.64x64_block1 dec.64x64_block2 dec.64x64_block3 '
                'out_conv').split()
WITH_ATTENTION = {'enc.16x16_block0', 'enc.16x16_block1', 'enc.16x16_block2', 'enc.8x8_block0', 'enc.8x8_block1',
                  'enc.8x8_block2', 'dec.8x8_in0', 'dec.8x8_block0', 'dec.8x8_block1', 'dec.8x8_block2',
                  'dec.8x8_block3', 'dec.16x16_block0', 'dec.16x16_block1', 'dec.16x16_block2', 'dec.16x16_block3'}


def meta_preset(name, **kw):
    with torch.device('meta'):
        return build_edm2_preset(name, **kw)


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMETERS))
def test_parameter_counts_equal_the_reference(name):
    net = meta_preset(name)
    n = sum(p.numel() for p in net.parameters())
    assert n == REFERENCE_PARAMETERS[name]
    assert len(net.state_dict()) == 203
    size = name.split('-')[2]
    if name.startswith('edm2-img512'):
        assert round(n / 1e6, 1) == SPEC_MILLIONS[size]


def test_module_order_names_and_shapes_are_the_released_layout():
    net = meta_preset('edm2-img512-xs')
    C = 128
    unet = net.unet
    assert [f'enc.{k}' for k in unet.enc] + [f'dec.{k}' for k in unet.dec] + ['out_conv'] == MODULE_ORDER
    attn = {f'{part}.{k}' for part in ('enc', 'dec') for k, m in getattr(unet, part).items()
            if isinstance(m, EDM2Block) and m.num_heads}
    assert attn == WITH_ATTENTION
    assert unet.enc['16x16_block0'].num_heads == 384 // 64 and unet.dec['8x8_in0'].num_heads == 512 // 64
    sd = net.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert list(sd)[:5] == ['unet.out_gain', 'unet.emb_fourier.freqs', 'unet.emb_fourier.phases',
                            'unet.emb_noise.weight', 'unet.emb_label.weight']
    assert list(sd)[-3:] == ['logvar_fourier.freqs', 'logvar_fourier.phases', 'logvar_linear.weight']
    assert sum(k.startswith('unet.') for k in sd) == 200
    assert shapes['unet.emb_noise.weight'] == (4 * C, C) and shapes['unet.emb_label.weight'] == (4 * C, 1000)
    assert shapes['unet.enc.64x64_conv.weight'] == (C, 5, 3, 3) and shapes['unet.out_conv.weight'] == (4, C, 3, 3)
    assert shapes['unet.enc.32x32_block0.conv_skip.weight'] == (2 * C, C, 1, 1)
    assert 'unet.enc.32x32_block1.conv_skip.weight' not in shapes
    assert shapes['unet.enc.16x16_block0.attn_qkv.weight'] == (9 * C, 3 * C, 1, 1)
    assert shapes['unet.enc.16x16_block0.conv_res0.weight'] == (3 * C, 3 * C, 3, 3)    # encoder: input is `out`
    assert shapes['unet.dec.8x8_block3.conv_res0.weight'] == (4 * C, 7 * C, 3, 3)      # decoder: input is `in`
    assert shapes['logvar_linear.weight'] == (1, 128)
    # decoder input widths (§1.3)
    widths = {k: m.conv_res0.weight.shape[1] for k, m in unet.dec.items()}
    assert [widths[f'8x8_block{i}'] for i in range(4)] == [8 * C, 8 * C, 8 * C, 7 * C]
    assert [widths[f'64x64_block{i}'] for i in range(4)] == [3 * C, 2 * C, 2 * C, 2 * C]
    assert all(type(m).__name__.endswith('Block') for m in [*unet.enc.values(), *unet.dec.values()]
               if not isinstance(m, MPConv))


def released_state_dict(name: str, seed: int = 0) -> dict:
    """What an edm2-img512-*.pkl holds once flattened: the 203 names of §1.6 in float16, random values, written
    here from the spec's layout (shapes from the table, not from our module)."""
    C = {'edm2-img512-xxs': 64}[name]
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).half()
    sd = {'unet.out_gain': r(()), 'unet.emb_fourier.freqs': r(C), 'unet.emb_fourier.phases': r(C),
          'unet.emb_noise.weight': r(4 * C, C), 'unet.emb_label.weight': r(4 * C, 1000),
          'unet.enc.64x64_conv.weight': r(C, 5, 3, 3)}
    widths = {64: C, 32: 2 * C, 16: 3 * C, 8: 4 * C}

    def block(prefix, cin, cout, enc, attention):
        sd[f'{prefix}.emb_gain'] = r(())
        sd[f'{prefix}.conv_res0.weight'] = r(cout, cout if enc else cin, 3, 3)
        sd[f'{prefix}.emb_linear.weight'] = r(cout, 4 * C)
        sd[f'{prefix}.conv_res1.weight'] = r(cout, cout, 3, 3)
        if cin != cout:
            sd[f'{prefix}.conv_skip.weight'] = r(cout, cin, 1, 1)
        if attention:
            sd[f'{prefix}.attn_qkv.weight'] = r(3 * cout, cout, 1, 1)
            sd[f'{prefix}.attn_proj.weight'] = r(cout, cout, 1, 1)

    skips, cur = [C], C
    for res in (64, 32, 16, 8):
        if res != 64:
            block(f'unet.enc.{res}x{res}_down', cur, cur, True, False)
            skips.append(cur)
        for i in range(3):
            block(f'unet.enc.{res}x{res}_block{i}', cur, widths[res], True, res in (16, 8))
            cur = widths[res]
            skips.append(cur)
    for res in (8, 16, 32, 64):
        if res == 8:
            block('unet.dec.8x8_in0', cur, cur, False, True)
            block('unet.dec.8x8_in1', cur, cur, False, False)
        else:
            block(f'unet.dec.{res}x{res}_up', cur, cur, False, False)
        for i in range(4):
            block(f'unet.dec.{res}x{res}_block{i}', cur + skips.pop(), widths[res], False, res in (16, 8))
            cur = widths[res]
    sd['unet.out_conv.weight'] = r(4, C, 3, 3)
    sd.update({'logvar_fourier.freqs': r(128), 'logvar_fourier.phases': r(128), 'logvar_linear.weight': r(1, 128)})
    return sd


def test_a_released_layout_state_dict_loads_strictly_in_float32():
    from engine.checkpoints.state_dicts import load_network_state
    sd = released_state_dict('edm2-img512-xxs')
    assert len(sd) == 203
    net = load_network_state(build_edm2_preset('edm2-img512-xxs'), sd)
    assert all(v.dtype == torch.float32 for v in net.state_dict().values())
    assert all(torch.equal(net.state_dict()[k], v.float()) for k, v in sd.items())    # fp16 values, upcast
    # a student without the uncertainty head takes the teacher's weights (the head is teacher-only)
    from engine.checkpoints.edm_snapshots import TEACHER_ONLY_KEYS
    from engine.training.loop import initialise
    student = initialise(build_edm2_preset('edm2-img512-xxs', logvar_channels=None, use_fp16=False), sd,
                         ignore=TEACHER_ONLY_KEYS)
    assert len(student.state_dict()) == 200
    bad = dict(sd)
    bad['unet.dec.8x8_block3.conv_res0.weight'] = bad['unet.dec.8x8_block3.conv_res0.weight'][:, :-1]
    del bad['unet.enc.8x8_block2.attn_proj.weight']
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: unet\.enc\.8x8_block2\.attn_proj\.weight.*"
                                              r"shape mismatch: unet\.dec\.8x8_block3\.conv_res0\.weight"):
        load_network_state(build_edm2_preset('edm2-img512-xxs'), bad)


def test_precond_equals_the_spec_formulas_and_returns_the_uncertainty():
    torch.manual_seed(0)
    net = build_edm2_preset('edm2-tiny').double().eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    labels = torch.tensor([0, 4, 9])
    D, u = net(x, sigma, labels, return_logvar=True)
    sd, s = 0.5, sigma.reshape(-1, 1, 1, 1)
    onehot = F.one_hot(labels, 10).double()
    F_x = net.unet(x / (sd ** 2 + s ** 2).sqrt(), sigma.log() / 4, onehot)
    torch.testing.assert_close(D, sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2).sqrt() * F_x,
                               rtol=1e-12, atol=1e-12)
    fourier = torch.cos(torch.outer(sigma.log() / 4, net.logvar_fourier.freqs) + net.logvar_fourier.phases) * 2 ** 0.5
    w = net.logvar_linear.weight
    want_u = fourier @ (w / (1e-4 + w.norm() / math.sqrt(128)) / math.sqrt(128)).t()
    torch.testing.assert_close(u.reshape(-1), want_u.reshape(-1), rtol=1e-12, atol=1e-12)
    # labels None → zero labels; the net's signature is the engine's denoiser signature
    torch.testing.assert_close(net(x, sigma), net(x, sigma, torch.zeros(3, 10, dtype=torch.float64)))
    headless = EDM2Precond(net.unet, logvar_channels=None)
    with pytest.raises(EngineError, match='no uncertainty head'):
        headless(x, sigma, labels, return_logvar=True)
    assert not any(k.startswith('logvar') for k in headless.state_dict())


def test_every_reference_constructor_argument_is_accepted_with_its_default():
    # NVlabs/edm2 UNet.__init__ and Block.__init__ (passed through **block_kwargs), ECT's dropout_res
    import inspect
    params = inspect.signature(EDM2UNet).parameters
    want = dict(model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None,
                num_blocks=3, attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5, resample_filter=[1, 1],
                channels_per_head=64, dropout=0, res_balance=0.3, attn_balance=0.3, clip_act=256, dropout_res=None)
    assert {k: params[k].default for k in want} == want
    net = EDM2UNet(16, 3, 10, model_channels=16, channel_mult=[1, 2], channel_mult_noise=2, channel_mult_emb=3,
                   num_blocks=1, attn_resolutions=[8], label_balance=0.3, concat_balance=0.6, channels_per_head=16,
                   dropout=0.5, dropout_res=8, res_balance=0.2, attn_balance=0.4, clip_act=None)
    assert net.emb_fourier.freqs.numel() == 32 and net.emb_noise.weight.shape == (48, 32)
    assert net.enc['16x16_block0'].dropout == 0.0 and net.enc['8x8_block0'].dropout == 0.5   # ECT's dropout_res
    # the reference Precond's signature
    with torch.device('meta'):
        ref_style = build_edm2(img_resolution=64, img_channels=4, label_dim=1000, use_fp16=True, sigma_data=0.5,
                               logvar_channels=128, model_channels=64, dropout=0.0)
    assert sum(p.numel() for p in ref_style.parameters()) == REFERENCE_PARAMETERS['edm2-img512-xxs']
    with pytest.raises(EngineError, match='EDM2UNet: img_resolution 18 is not divisible'):
        EDM2UNet(18, 3, 10, channel_mult=[1, 2, 3])
    with pytest.raises(EngineError, match='200 channels do not split into 3 attention heads'):
        EDM2UNet(16, 3, 10, model_channels=200, channel_mult=[1, 1], attn_resolutions=[8], channels_per_head=64)


# ---- EDM2 pickles and training states, read without running their code (§2.4, §2.5) ------------------------------

def tiny_edm2(seed=0, **kw):
    torch.manual_seed(seed)
    net = build_edm2_preset('edm2-tiny', **kw)
    with torch.no_grad():      # non-zero gains, so that every path contributes
        for p in net.parameters():
            if p.ndim == 0:
                p.copy_(torch.randn(()) * 0.5 + 1)
    return net


def write_edm2_pickle(tmp_path, net, name='edm2-img64-xs-0134217-0.110.pkl'):
    marker = tmp_path / 'module_src_ran'
    path = tmp_path / name
    W.write_pickle(W.edm2_snapshot(W.edm2_network_record(net, module_src=W.canary_source(marker))), path)
    return path, marker


def test_an_edm2_pickle_loads_code_free_and_reproduces_its_network(tmp_path):
    net = tiny_edm2()
    path, marker = write_edm2_pickle(tmp_path, net)
    loaded = load_edm_pickle(path)                                     # key='ema'
    assert not marker.exists()
    assert type(loaded) is EDM2Precond and loaded.use_fp16 and loaded.logvar_channels == 128
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values())
    ref = net.half().float().eval()                                    # what the pickle holds: fp16 values
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.state_dict().items())
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 7.0]), torch.tensor([3, 8])
    assert torch.equal(loaded(x, sigma, labels), ref(x, sigma, labels))
    # the architecture came from the U-Net record's own _init_kwargs
    assert loaded.unet.init_kwargs == net.unet.init_kwargs
    # as a student: no uncertainty head, float32 compute, the same denoiser
    student = load_edm_pickle(path, mode='student')
    assert student.logvar_channels == 0 and not student.use_fp16
    assert torch.equal(student(x, sigma, labels), ref(x, sigma, labels))
    # a headless EDM2 network (a CMT / ECT output) is not taken as a teacher
    p2, _ = write_edm2_pickle(tmp_path, student, 'ect-out.pkl')
    with pytest.raises(CheckpointError, match='no uncertainty head.*a consistency model'):
        load_edm_pickle(p2, mode='teacher')
    assert load_edm_pickle(p2).logvar_channels == 0


def test_an_edm2_pickle_with_a_mismatched_tensor_or_unknown_argument_is_named(tmp_path):
    net = tiny_edm2()
    rec = W.edm2_network_record(net)
    W.find(rec, 'unet.enc.16x16_conv').state['_parameters']['weight'].tensor = torch.zeros(16, 4, 1, 1).half()
    W.write_pickle(W.edm2_snapshot(rec), tmp_path / 'a.pkl')
    with pytest.raises(CheckpointError, match=r"shape mismatch: unet\.enc\.16x16_conv\.weight: checkpoint \[16, 4, 1, "
                                              r"1\] vs network \[16, 4, 3, 3\]"):
        load_edm_pickle(tmp_path / 'a.pkl')
    rec = W.edm2_network_record(net)
    W.state_of(rec.state['_modules']['unet'])['_init_kwargs']['unknown_knob'] = 3
    W.write_pickle(W.edm2_snapshot(rec), tmp_path / 'b.pkl')
    with pytest.raises(CheckpointError, match="EDM2UNet has no constructor argument.*unknown_knob"):
        load_edm_pickle(tmp_path / 'b.pkl')


def test_a_malicious_edm2_pickle_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / 'payload_ran'
    rec = W.edm2_network_record(tiny_edm2())
    payload = W.Call(W.GlobalRef('os', 'system'), (f'touch {marker}',))
    data = W.edm2_snapshot(rec)
    data['encoder'].state['init_kwargs'] = payload
    W.write_pickle(data, tmp_path / 'evil.pkl')
    with pytest.raises(CheckpointError, match="refusing to load global 'os.system'"):
        load_edm_pickle(tmp_path / 'evil.pkl')
    assert not marker.exists()


# The three files recipes/imagenet512_cmt_ecd.py reads (engine/pipelines/imagenet512.py Latent512Settings).
RELEASED_LATENT = ('edm2-img512-xxl-0939524-0.070.pkl', 'edm2-img512-xxl-0939524-0.075.pkl',
                   'edm2-img512-m-0268435-0.155.pkl')


@pytest.fixture(scope='module')
def released_latent_layout():
    """An EDM2 ImageNet-512 network in its released layout (4×64² latents, 1000 classes, channel_mult [1, 2, 3, 4],
    3 blocks a level, attention at 16² and 8², uncertainty head) at width 16 instead of 256 / 448, so that it
    writes in a second. The width changes tensor sizes only, never the names: the key set is checked against
    the full-width presets on the meta device."""
    torch.manual_seed(0)
    net = with_unit_gains(build_edm2_preset('edm2-img512-m', model_channels=16, channels_per_head=16))
    return net, W.edm2_network_record(net)


@pytest.mark.parametrize('numpy_spelling', [1, 2])
@pytest.mark.parametrize('name', RELEASED_LATENT)
def test_released_edm2_latent_pickles_load_with_their_encoder_arrays(tmp_path, released_latent_layout, name,
                                                                      numpy_spelling):
    """EDM2's latent snapshots carry StabilityVAEEncoder, whose scale and bias are float32 arrays of 4: pickled
    through numpy.core.multiarray._reconstruct and numpy.ndarray by NumPy 1 (NVIDIA's files) or
    numpy._core.multiarray._reconstruct by NumPy 2 (a re-saved file). f00baca refused all three files for it."""
    from engine.checkpoints.edm_snapshots import latent_affine, read_edm_pickle
    from engine.perceptual.vae import BIAS, SCALE
    from engine.pipelines.imagenet512 import check_latent_affine
    net, record = released_latent_layout
    marker = tmp_path / 'module_src_ran'
    path = tmp_path / name
    W.write_pickle(W.edm2_snapshot(record, module_src=W.canary_source(marker),
                                   encoder=W.stability_vae_encoder(W.canary_source(marker)),
                                   dataset_path='datasets/img512-sd.zip'), path, numpy_spelling=numpy_spelling)
    raw = path.read_bytes()
    spelled = {1: b'numpy.core.multiarray', 2: b'numpy._core.multiarray'}[numpy_spelling]
    assert spelled in raw and b'_reconstruct' in raw and b'ndarray' in raw and b'dnnlib.util' in raw
    teacher = load_edm_pickle(path, mode='teacher')
    assert not marker.exists()
    ref = copy.deepcopy(net).half().float().eval()                        # the file holds float16 values
    x, sigma, labels = torch.randn(1, 4, 64, 64), torch.tensor([1.3]), torch.tensor([417])
    assert torch.equal(teacher(x, sigma, labels), ref(x, sigma, labels))
    with torch.device('meta'):
        for size in ('m', 'xxl'):
            assert set(teacher.state_dict()) == set(build_edm2_preset(f'edm2-img512-{size}').state_dict())
    ckpt = read_edm_pickle(path)
    scale, bias = latent_affine(ckpt)
    assert type(scale) is np.ndarray and scale.dtype == np.float32
    np.testing.assert_array_equal(scale, np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]))
    # engine/perceptual/vae.py's constants are these float32 values to 8 decimals
    np.testing.assert_allclose(np.float64(scale), SCALE, rtol=0, atol=5e-9)
    np.testing.assert_allclose(np.float64(bias), BIAS, rtol=0, atol=5e-9)
    check_latent_affine(ckpt)                                              # the recipe's check passes
    assert ckpt.entries['dataset_kwargs']['path'] == 'datasets/img512-sd.zip'
    assert ckpt.entries['loss_fn']['attributes']['P_std'] == 1.6


def test_a_latent_pickle_whose_encoder_differs_is_refused_by_the_recipe(tmp_path, released_latent_layout):
    from engine.checkpoints.edm_snapshots import read_edm_pickle
    from engine.pipelines.imagenet512 import check_latent_affine
    _, record = released_latent_layout
    W.write_pickle(W.edm2_snapshot(record, encoder=W.stability_vae_encoder(final_std=1.0)), tmp_path / 'a.pkl')
    with pytest.raises(EngineError, match=r"a\.pkl: its encoder maps raw latents with scale \[0\.2398"):
        check_latent_affine(read_edm_pickle(tmp_path / 'a.pkl'))
    W.write_pickle(W.edm2_snapshot(record), tmp_path / 'pixels.pkl')      # StandardRGBEncoder: a pixel model
    with pytest.raises(EngineError, match=r"pixels\.pkl carries no StabilityVAEEncoder \(its encoder: "
                                          r"StandardRGBEncoder\)"):
        check_latent_affine(read_edm_pickle(tmp_path / 'pixels.pkl'))


@pytest.mark.parametrize('numpy_spelling', [1, 2])
def test_an_object_array_in_an_edm2_pickle_is_refused_without_running_anything(tmp_path, released_latent_layout,
                                                                              numpy_spelling):
    """Only numeric arrays are read. An object array's elements are pickled objects: one of plain strings is
    refused by its dtype, one holding a call by the call's global, and nothing runs either way."""
    _, record = released_latent_layout
    marker = tmp_path / 'payload_ran'
    for i, elements in enumerate([['a', 'b'], [W.Call(W.GlobalRef('os', 'system'), (f'touch {marker}',))]]):
        encoder = W.stability_vae_encoder()
        encoder.state['scale'] = np.array(elements if i == 0 else [0, 0], dtype=object)
        data = W.edm2_snapshot(record, encoder=encoder)
        path = tmp_path / f'obj{i}.pkl'
        if i == 0:
            W.write_pickle(data, path, numpy_spelling=numpy_spelling)
            match = r"numpy array of dtype dtype\('O'\) is not allowed; only numeric arrays are"
        else:   # the state NumPy writes for an object array, with the payload as its elements
            encoder.state['scale'] = ObjectArray(elements)
            W.write_pickle(data, path, numpy_spelling=numpy_spelling)
            match = "refusing to load global 'os.system'"
        with pytest.raises(CheckpointError, match=match):
            load_edm_pickle(path)
    assert not marker.exists()


class ObjectArray:
    """Pickles as NumPy writes an object array (_reconstruct, then BUILD with its elements as a list), the
    elements being anything, e.g. a call."""

    def __init__(self, elements):
        self.elements = elements

    def __reduce__(self):
        return (W.NUMPY_RECONSTRUCT[1], (W.NUMPY_NDARRAY, (0,), b'b'),
                (1, (len(self.elements),), np.dtype(object), False, list(self.elements)))


def test_numpy_array_records_are_checked_before_numpy_builds_them(tmp_path):
    """The array globals accept only the forms NumPy writes: a shape that claims more data than the record holds,
    a structured dtype and another subtype are refused; protocol 5's _frombuffer form reads like the others."""
    import pickle
    from engine.checkpoints.unpickler import unpickle_file

    def refused(obj, match):
        (tmp_path / 'x.pkl').write_bytes(W.dumps(obj))
        with pytest.raises(CheckpointError, match=match):
            unpickle_file(tmp_path / 'x.pkl')

    rebuild = lambda state, sub=W.NUMPY_NDARRAY: W.Call(W.NUMPY_RECONSTRUCT[1], (sub, (0,), b'b'))  # noqa: E731
    refused(Built(rebuild(None), (1, (10 ** 6,), np.dtype(np.float32), False, b'\0' * 8)),
            r'shape \(1000000,\) float32 \(order .C.\) with 8 bytes of data; that shape needs 4000000')
    refused(Built(rebuild(None), (1, (1,), np.dtype([('a', '<f4'), ('b', '<f4')]), False, b'\0' * 8)),
            'only numeric arrays are')
    refused(rebuild(None, W.GlobalRef('numpy', 'matrix')), "refusing to load global 'numpy.matrix'")
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    (tmp_path / 'p5.pkl').write_bytes(pickle.dumps(dict(a=a, f=np.asfortranarray(a)), protocol=5))
    got = unpickle_file(tmp_path / 'p5.pkl')
    assert b'_frombuffer' in (tmp_path / 'p5.pkl').read_bytes()
    np.testing.assert_array_equal(got['a'], a)
    np.testing.assert_array_equal(got['f'], a)


class Built:
    """Pickles as `call` followed by BUILD with `state`."""

    def __init__(self, call, state):
        self.call, self.state = call, state

    def __reduce__(self):
        return self.call.func, self.call.args, self.state


def adam_state_after_steps(net, steps=2):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(steps):
        D, u = net(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.tensor([1, 2]), return_logvar=True)
        (D.square().mean() + u.mean()).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_an_edm2_training_state_loads_into_a_stage_and_continues_it(tmp_path):
    from engine.checkpoints import read_edm2_training_state
    from engine.data.sampler import ResumableSampler, TensorSource
    from engine.objectives import EDM2Loss, StepRNG
    from engine.training.ema import EMA
    from engine.training.loop import train_stage, train_step
    from engine.training.stage_config import StageConfig
    net = tiny_edm2().train()
    opt = adam_state_after_steps(net)
    emas = {s: tiny_edm2(seed=i + 5).state_dict() for i, s in enumerate((0.05, 0.10))}
    cur, B = 4096, 4
    W.write_training_state(dict(state=dict(cur_nimg=cur, total_elapsed_time=12.5), net=net.state_dict(),
                                loss_fn=dict(P_mean=-0.8, P_std=1.6, sigma_data=0.5), optimizer=opt.state_dict(),
                                ema=dict(stds=[0.05, 0.10], emas=list(emas.values()))),
                           tmp_path / 'training-state-0004096.pt')
    start = read_edm2_training_state(tmp_path / 'training-state-0004096.pt')
    assert start.pairs_seen == cur and sorted(start.tracked) == [0.05, 0.10]

    g = torch.Generator().manual_seed(0)
    data = TensorSource(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g))
    cfg = StageConfig(name='pretrain', total_kimg=(cur + B) / 1000, batch_size=B, lr=0.01, optimizer='adam',
                      betas=(0.9, 0.99), lr_schedule='inv_sqrt', lr_ref_kimg=2.0, lr_rampup_kimg=10.0, ema_beta=None,
                      ema_std=0.10, snapshot_emas=(0.05, 0.10), snapshot_kimg=1.0, log_kimg=None, ckpt_kimg=None)
    loss = EDM2Loss(P_mean=-0.8, P_std=1.6)
    res = train_stage(cfg, tiny_edm2(seed=9).train(), loss, data, str(tmp_path / 'run'), start=start)
    assert res.pairs_seen == cur + B

    # the one step by hand: the reference's first forward normalises the loaded weights, Adam continues its moments
    ref = tiny_edm2(seed=9).train()
    ref.load_state_dict(net.state_dict())
    force_weight_normalization(ref)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01, betas=(0.9, 0.99))
    ref_opt.load_state_dict(opt.state_dict())
    for group in ref_opt.param_groups:
        group['lr'] = 0.01 / math.sqrt(cur / 2000) * min(cur / 10_000, 1)        # EDM2's schedule at cur_nimg
    idx = ResumableSampler(len(data), seed=0).indices(cur, B, 0, 1)
    images, labels = data.batch(idx, 'cpu')
    train_step(ref, loss, ref_opt, list(ref.parameters()), images, labels, StepRNG.for_step(0, 0, cur),
               torch.autocast('cpu', enabled=False), None, torch.device('cpu'))
    tracked = EMA(ref, std=0.05)
    tracked.module.load_state_dict(emas[0.05])
    tracked.update(ref, cur + B, B)
    force_weight_normalization(ref)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(res.net.state_dict()[k], v, rtol=0, atol=0, msg=k)
    snap = tmp_path / 'run' / 'pretrain' / 'snapshots' / 'pretrain-000000004100-0.050.safetensors'
    from engine.checkpoints.releases import load_safetensors_network
    for k, v in tracked.module.state_dict().items():
        torch.testing.assert_close(load_safetensors_network(snap).state_dict()[k], v, rtol=0, atol=0, msg=k)
    # a start state that lacks a tracked σ_rel is named
    cfg2 = StageConfig(**{**cfg.__dict__, 'name': 'other', 'snapshot_emas': (0.05, 0.2)})
    with pytest.raises(CheckpointError, match=r"stage 'other': the start state tracks EMAs of σ_rel 0\.05, 0\.1, not "
                                              r"0\.2"):
        train_stage(cfg2, tiny_edm2(seed=9).train(), loss, data, str(tmp_path / 'run'), start=start)
    assert not (tmp_path / 'run' / 'other').exists()                 # refused before anything was written


# ---- forced weight normalisation in the loop (§1.1 step 2) --------------------------------------------------------

def in_forward_normalisation(net):
    """The reference's forced weight normalisation: every MPConv overwrites its weight with normalize(weight)
    when called in training mode, before using it (NVlabs/edm2 MPConv.forward)."""
    def hook(module, args):
        if module.training:
            with torch.no_grad():
                module.weight.copy_(normalize(module.weight.float()))
    for m in net.modules():
        if isinstance(m, MPConv):
            m.register_forward_pre_hook(hook)
    return net


def test_step_ema_normalise_in_the_loop_equals_the_references_in_forward_order(tmp_path):
    """train_stage (forward never writes; step → EMA → normalise, and once at the start) against the reference's
    order (normalise inside each training forward; step; EMA) for 6 Adam steps of the EDM2 loss: the weights the
    next forward sees and the EMA agree bit for bit."""
    from engine.data.sampler import ResumableSampler, TensorSource
    from engine.objectives import EDM2Loss, StepRNG
    from engine.training.ema import EMA
    from engine.training.loop import train_stage, train_step
    from engine.training.stage_config import StageConfig
    g = torch.Generator().manual_seed(0)
    data = TensorSource(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g))
    B, steps = 4, 6
    cfg = StageConfig(name='s', total_kimg=B * steps / 1000, batch_size=B, lr=3e-3, optimizer='adam',
                      betas=(0.9, 0.99), lr_schedule='constant', ema_beta=None, ema_std=0.1, log_kimg=None,
                      ckpt_kimg=None)
    loss = EDM2Loss(P_mean=-0.8, P_std=1.6)
    res = train_stage(cfg, tiny_edm2(1, dropout=0.2).train(), loss, data, str(tmp_path))

    ref = in_forward_normalisation(tiny_edm2(1, dropout=0.2).train())
    ema = EMA(ref, std=0.1)
    opt = torch.optim.Adam(ref.parameters(), lr=3e-3, betas=(0.9, 0.99))
    sampler = ResumableSampler(len(data), seed=0)
    for k in range(steps):
        images, labels = data.batch(sampler.indices(k * B, B, 0, 1), 'cpu')
        train_step(ref, loss, opt, list(ref.parameters()), images, labels, StepRNG.for_step(0, 0, k * B),
                   torch.autocast('cpu', enabled=False), None, torch.device('cpu'))
        ema.update(ref, (k + 1) * B, B)
    force_weight_normalization(ref)          # what the reference's next forward writes
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(res.net.state_dict()[k], v, rtol=0, atol=0, msg=k)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(res.ema.state_dict()[k], v, rtol=0, atol=0, msg=k)
    # and the trained weights are unit-RMS per output unit
    w = res.net.unet.enc['8x8_block0'].conv_res0.weight
    torch.testing.assert_close(w.flatten(1).square().mean(1).sqrt(), torch.full((32,), 1 / (1 + 1e-4)), rtol=1e-4,
                               atol=0)


def test_a_training_forward_compiles_whole_and_writes_nothing():
    """Forced weight normalisation lives outside forward, so a training-mode forward is one graph for torch.compile
    (and capturable in a CUDA graph): no graph break, no parameter mutated. (Dropout > 0 still breaks the graph
    where it reads its pinned generator, engine/networks/dropout.py.)"""
    net = tiny_edm2(0).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.tensor([1, 2])
    explained = torch._dynamo.explain(net)(x, sigma, labels)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    net(x, sigma, labels).square().mean().backward()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---- pre-training pieces: the uncertainty loss and the learning-rate schedule (§2.1, §2.2) -----------------------

def test_the_uncertainty_loss_equals_a_direct_recomputation():
    from engine.objectives import EDM2Loss, StepRNG
    net = tiny_edm2().double().eval()
    y = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    labels = torch.tensor([1, 5, 9])
    out = EDM2Loss(P_mean=-0.8, P_std=1.6)(net, y, labels, StepRNG.for_step(7, 0, 0))
    rng = StepRNG.for_step(7, 0, 0)                                    # the same draws: ln σ's normal, then n
    sigma = (rng.randn([3], 'cpu', torch.float64) * 1.6 - 0.8).exp()
    n = rng.randn(y.shape, 'cpu', torch.float64)
    want = []
    for i in range(3):
        D, u = net(y[i:i + 1] + sigma[i] * n[i:i + 1], sigma[i:i + 1], labels[i:i + 1], return_logvar=True)
        lam = (sigma[i] ** 2 + 0.25) / (sigma[i] * 0.5) ** 2
        want.append((lam / torch.exp(u) * (D - y[i:i + 1]) ** 2 + u).sum())       # u counted C·H·W times
    torch.testing.assert_close(out.loss, torch.stack(want), rtol=1e-12, atol=1e-12)
    assert out.pairs == 3 and out.student_backward == 3


def test_the_loops_inv_sqrt_schedule_is_edm2s():
    from engine.training.lr_schedules import learning_rate
    cfg = pretraining_stage('edm2-img64-xl')
    assert cfg.lr_ref_kimg == 35000 * 2048 / 1000 and cfg.lr_rampup_kimg == 10_000 and cfg.betas == (0.9, 0.99)
    assert cfg.snapshot_emas == (0.05, 0.1) and cfg.total_kimg == 640 * 2 ** 20 / 1000
    for t in [0, 2048, 5_000_000, 10_000_000, 71_680_000, 300_000_000, 640 << 20]:
        edm2 = 0.0070 / math.sqrt(max(t / (35000 * 2048), 1)) * min(t / 1e7, 1)     # EDM2 learning_rate_schedule
        ours = learning_rate(cfg.lr_schedule, t, lr=cfg.lr, total_nimg=cfg.budget(),
                             ref_nimg=cfg.lr_ref_kimg * 1000, rampup_nimg=cfg.lr_rampup_kimg * 1000)
        assert ours == pytest.approx(edm2, rel=1e-14, abs=0)


# ---- post-hoc EMA reconstruction (§2.3) ------------------------------------------------------------------------

def profile_lstsq64(in_t, in_std, out_t, out_std, n=200_001):
    """The reconstruction as a direct least-squares fit in float64: the profiles p(τ) = (γ+1)/t·(τ/t)^γ on [0, t]
    sampled on a fine grid, the output profile fitted by the inputs under the trapezoid rule, normalised to sum 1."""
    from engine.training.ema import std_to_exp
    tau = np.linspace(0, out_t, n)
    w = np.full(n, out_t / (n - 1))
    w[[0, -1]] /= 2

    def p(t, s):
        g = std_to_exp(s)
        return np.where(tau <= t, (g + 1) / t * (np.minimum(tau, t) / t) ** g, 0.0)
    P = np.stack([p(t, s) for t, s in zip(in_t, in_std)], axis=1) * np.sqrt(w)[:, None]
    x = np.linalg.lstsq(P, p(out_t, out_std) * np.sqrt(w), rcond=None)[0]
    return x / x.sum()


def test_reconstruction_coefficients_equal_the_float64_least_squares_solution():
    from engine.training.phema import power_function_correlation, solve_coefficients
    in_t = np.repeat(np.arange(1, 9) * 4096.0, 2)
    in_std = np.tile([0.05, 0.10], 8)
    X = solve_coefficients(in_t, in_std, 8 * 4096.0, [0.03, 0.07, 0.15])
    for j, s in enumerate([0.03, 0.07, 0.15]):
        np.testing.assert_allclose(X[:, j], profile_lstsq64(in_t, in_std, 8 * 4096.0, s), rtol=5e-5, atol=1e-6)
    np.testing.assert_allclose(X.sum(axis=0), 1, rtol=1e-12)
    # an output profile equal to an input profile is that input
    np.testing.assert_allclose(solve_coefficients(in_t, in_std, 8 * 4096.0, 0.10)[:, 0], np.eye(16)[15], atol=1e-8)
    # the closed-form inner product against quadrature
    from engine.training.ema import std_to_exp
    tau = np.linspace(0, 3000, 300_001)                              # p_a vanishes beyond its t = 3000
    pa = (std_to_exp(0.05) + 1) / 3000 * (tau / 3000) ** std_to_exp(0.05)
    pb = (std_to_exp(0.1) + 1) / 9000 * (tau / 9000) ** std_to_exp(0.1)
    np.testing.assert_allclose(np.trapezoid(pa * pb, tau), power_function_correlation(3000, 0.05, 9000, 0.1),
                               rtol=1e-6)


def test_a_runs_snapshots_reconstruct_new_profiles(tmp_path, capsys):
    """A stage tracking σ_rel 0.05, 0.07 and 0.10 with snapshots every 4 steps; `python -m engine.training.phema` from
    the
    0.05 / 0.10 series: the output is Σ x_i θ_i with the least-squares x, it is close to the 0.07 EMA the run
    tracked directly, and the 0.10 profile at the last snapshot is that snapshot."""
    from engine.checkpoints.releases import load_safetensors_network, read_safetensors_metadata
    from engine.data.sampler import TensorSource
    from engine.networks import build_network
    from engine.objectives import EDMLoss
    from engine.precond import EDMPrecond
    from engine.training.loop import train_stage
    from engine.training.phema import list_snapshots, main
    from engine.training.stage_config import StageConfig
    torch.manual_seed(0)
    net = EDMPrecond(build_network('gmm-mlp', hidden_channels=32, emb_channels=32, num_blocks=2))
    data = TensorSource(torch.randn(256, 2))
    cfg = StageConfig(name='pre', total_kimg=0.32, batch_size=8, lr=2e-3, optimizer='adam', lr_schedule='constant',
                      ema_beta=None, ema_std=0.1, snapshot_emas=(0.05, 0.07, 0.10), snapshot_kimg=0.032,
                      log_kimg=None, ckpt_kimg=None)
    train_stage(cfg, net, EDMLoss(), data, str(tmp_path))
    snaps = tmp_path / 'pre' / 'snapshots'
    assert len(os.listdir(snaps)) == 30 and (snaps / 'pre-000000000000-0.070.safetensors').exists() is False
    assert read_safetensors_metadata(snaps / 'pre-000000000032-0.050.safetensors')[1]['nimg'] == 32
    out = tmp_path / 'ema-0.070.safetensors'
    main(['--in', str(snaps), '--std', '0.07', '--out', str(out), '--in-std', '0.05', '--in-std', '0.1'])
    got = load_safetensors_network(out).state_dict()
    inputs = list_snapshots(str(snaps), stds=(0.05, 0.10))
    assert len(inputs) == 20 and inputs[-1].nimg == 320
    x = profile_lstsq64([s.nimg for s in inputs], [s.std for s in inputs], 320, 0.07)
    states = [load_safetensors_network(s.path).state_dict() for s in inputs]
    direct = load_safetensors_network(snaps / 'pre-000000000320-0.070.safetensors').state_dict()
    a, b = (load_safetensors_network(snaps / f'pre-000000000320-{s}.safetensors').state_dict() for s in ('0.050', '0.100'))
    for k in got:
        if k not in dict(net.named_parameters()):
            continue
        want = sum(xi * st[k].double() for xi, st in zip(x, states))
        torch.testing.assert_close(got[k].double(), want, rtol=1e-4, atol=1e-5, msg=k)
        # much closer to the tracked 0.07 EMA than the two tracked profiles are to each other
        assert (got[k] - direct[k]).norm() < 0.1 * (a[k] - b[k]).norm(), k
    main(['--in', str(snaps), '--std', '0.10', '--std', '0.05', '--out', str(tmp_path / 'dir'), '--in-std', '0.05',
          '--in-std', '0.1'])
    again = load_safetensors_network(tmp_path / 'dir' / 'phema-000000000320-0.100.safetensors').state_dict()
    for k in b:
        torch.testing.assert_close(again[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert 'σ_rel 0.100 at 320 images from 20 snapshots' in capsys.readouterr().out


def test_edm2_named_pickles_are_read_as_snapshots(tmp_path):
    from engine.training.ema import kimg_to_nimg
    from engine.training.phema import list_snapshots, reconstruct
    for i, kimg in enumerate((134217, 268435)):
        write_edm2_pickle(tmp_path, tiny_edm2(i), f'network-snapshot-{kimg:07d}-0.050.pkl')
    snaps = list_snapshots(str(tmp_path))
    assert [s.nimg for s in snaps] == [134217728, 268435456] == [kimg_to_nimg(k) for k in (134217, 268435)]
    (std, net), = reconstruct(snaps, 0.05)
    assert type(net) is EDM2Precond and std == 0.05
    with pytest.raises(EngineError, match='no snapshot was taken at 1000 images'):
        reconstruct(snaps, 0.05, out_nimg=1000)


# ---- guidance and EDM2's sampler (§4) ---------------------------------------------------------------------------

class Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        return self.net(x, sigma, labels)


def test_guidance_at_w_1_is_the_main_net_exactly_and_combines_as_edm2():
    from engine.guidance import GuidedDenoiser
    main_net, guide_net = tiny_edm2(0).eval(), Counting(tiny_edm2(1).eval())
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0]), torch.tensor([1, 2])
    unguided = GuidedDenoiser(main_net, guide_net, 1.0)
    assert torch.equal(unguided(x, sigma, labels), main_net(x, sigma, labels)) and guide_net.calls == 0
    assert unguided.calls == 1
    D1, D0 = main_net(x, sigma, labels).double(), guide_net(x, sigma, labels).double()
    g = GuidedDenoiser(main_net, guide_net, 2.05)
    torch.testing.assert_close(g(x, sigma, labels).double(), D0 + 2.05 * (D1 - D0), rtol=1e-5, atol=1e-5)
    assert g.calls == 2
    # CFG with a network's own unconditional output: the guide sees no labels
    cfg = GuidedDenoiser(main_net, main_net, 1.4, guide_labels='none')
    torch.testing.assert_close(cfg(x, sigma, labels), torch.lerp(main_net(x, sigma, None), main_net(x, sigma, labels),
                                                                 1.4))
    assert GUIDED['edm2-img512-xxl-autog-fid'][:3] == ('edm2-img512-xxl-0939524-0.075.pkl',
                                                       'edm2-img512-m-0268435-0.155.pkl', 2.05)


def test_a_guided_teacher_is_ecds_auto_guided_teacher():
    from engine.guidance import GuidedDenoiser
    from engine.objectives import ECD
    teacher, guide_net = tiny_edm2(0), tiny_edm2(1)
    x, t, r = torch.randn(3, 3, 16, 16), torch.tensor([0.3, 2.0, 10.0]), torch.tensor([0.25, 1.8, 9.0])
    labels = torch.tensor([0, 1, 2])
    a = ECD(teacher, solver='heun', guide=guide_net, guidance=2.05)
    b = ECD(GuidedDenoiser(teacher, guide_net, 2.05), solver='heun')
    assert torch.equal(a.teacher_step(x, t, r, labels), b.teacher_step(x, t, r, labels))
    assert a.target_input(x, t, r, None, None, labels)[1] == b.target_input(x, t, r, None, None, labels)[1] == 12


def test_a_guided_teacher_drives_cmts_trajectories_at_twice_the_evaluations():
    from engine.guidance import GuidedDenoiser
    from engine.objectives import CMT, StepRNG, squared_l2
    from engine.solvers import dpm_solver_pp
    guided = GuidedDenoiser(tiny_edm2(0), tiny_edm2(1), 2.0)
    cmt = CMT(guided, nfe=16, trajectories_per_batch=2, distance=squared_l2, graphs=False)
    x_T, labels = torch.randn(2, 3, 16, 16) * 80, torch.tensor([3, 4])
    assert torch.equal(cmt.solve(x_T, cmt.sigmas, labels), dpm_solver_pp(guided, x_T, cmt.sigmas, labels=labels))
    out = cmt(tiny_edm2(2, logvar_channels=None).train(), torch.randn(2, 3, 16, 16), labels, StepRNG.for_step(0, 0, 0))
    assert out.pairs == 32 and out.teacher_nfe == 2 * 32


def test_edm2_sampler_is_heun_on_the_rho_grid_with_63_calls():
    from engine.schedules import karras_sigmas
    from engine.solvers import edm2_sampler
    net = Counting(tiny_edm2(0).eval())
    z = torch.randn(2, 3, 16, 16)
    out = edm2_sampler(net, z, torch.tensor([1, 2]))
    assert net.calls == 63 and out.dtype == torch.float32
    s = karras_sigmas(32).tolist()
    assert s[0] == 80 and s[-1] == 0 and s[-2] == pytest.approx(0.002) and len(s) == 33
    # step by step (§4.1), written out
    x = 80 * z
    with torch.no_grad():
        for i in range(32):
            d = (x - net.net(x, torch.full((2,), s[i]), torch.tensor([1, 2]))) / s[i]
            x_next = x + (s[i + 1] - s[i]) * d
            if i < 31:
                d2 = (x_next - net.net(x_next, torch.full((2,), s[i + 1]), torch.tensor([1, 2]))) / s[i + 1]
                x_next = x + (s[i + 1] - s[i]) * (d + d2) / 2
            x = x_next
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_the_imagenet64_recipe_reads_its_files_from_the_weights_directory(tmp_path, monkeypatch):
    """The recipe's real path on files in the official layouts with random weights: EDM2 pickles of a teacher and
    a guide found in --weights by their names, a labelled dataset zip, random VGG16 weights for LPIPS. The files
    are fingerprinted into the run's identity, the student starts as the teacher without its head."""
    import json

    from engine.checkpoints.files import file_sha256, set_weights_dir
    from engine.data import write_image_dataset
    from engine.perceptual.lpips import random_vgg16_state_dict
    from engine.pipelines.imagenet64 import EDM2Settings, run_edm2_recipe
    weights = tmp_path / 'weights'
    weights.mkdir()
    write_edm2_pickle(weights, tiny_edm2(0), 'teacher.pkl')
    write_edm2_pickle(weights, tiny_edm2(1), 'guide.pkl')
    torch.save(random_vgg16_state_dict(0), weights / 'vgg16-397923af.pth')
    monkeypatch.delenv('ENGINE_VGG16_WEIGHTS', raising=False)
    g = torch.Generator().manual_seed(0)
    data = write_image_dataset(tmp_path / 'img.zip', torch.randint(0, 256, (16, 3, 16, 16), generator=g,
                                                                   dtype=torch.uint8).numpy(), list(range(10)) + [0] * 6)
    s = EDM2Settings(resolution=16, label_dim=10, dropout_res=8, batch_size=32, trajectories_per_batch=2,
                     mid_kimg=0.032, ect_kimg=0.032, ecd_kimg=0.032, ckpt_kimg=0.032, log_kimg=0.032, grid_kimg=0.032,
                     teacher_file='teacher.pkl', guide_file='guide.pkl', guidance=1.7)
    out = tmp_path / 'run'
    try:
        res = run_edm2_recipe('doc', s, 'imagenet64_test', ['--data', str(data), '--weights', str(weights),
                                                             '--out', str(out), '--device', 'cpu'])
    finally:
        set_weights_dir(None)
    assert set(res['runs']) == {'cmt_ect', 'cmt_ecd'}
    inputs = json.load(open(out / 'identity.json'))['inputs']
    assert inputs['teacher']['sha256'] == file_sha256(weights / 'teacher.pkl')
    assert inputs['guide']['sha256'] == file_sha256(weights / 'guide.pkl')
    student_init = json.load(open(out / 'cmt' / 'mid_cmt' / 'identity.json'))
    assert student_init['network']['precond'] == 'EDM2Precond'
    assert student_init['network']['precond_kwargs'] == dict(use_fp16=False, logvar_channels=None)
    assert student_init['network']['backbone_kwargs']['dropout_res'] == 8


# ---- CUDA (lent GPU only) -------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.gpu
def test_fp16_unet_and_graph_captured_teacher_on_gpu():
    """use_fp16: the U-Net in float16 on CUDA, the output side in float32 (EDM2's evaluation precision), close to
    the float32 CPU network; the EDM2 teacher's 16-step trajectory captured in a CUDA graph equals its eager solve."""
    from engine.schedules import logsnr_sigmas
    from engine.teacher.solver import TeacherSolver
    net = tiny_edm2(0).eval()
    x, sigma, labels = torch.randn(4, 3, 16, 16) * 3, torch.tensor([0.01, 0.5, 3.0, 70.0]), torch.tensor([1, 2, 3, 4])
    ref = net(x, sigma, labels)
    gpu = net.cuda()
    out = gpu(x.cuda(), sigma.cuda(), labels.cuda())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-2, atol=2e-2)
    solver = TeacherSolver(gpu, logsnr_sigmas(16))
    x_T = torch.randn(8, 3, 16, 16, device="cuda") * 80
    lab = torch.randint(0, 10, (8,), device="cuda")
    traj = solver(x_T, lab)
    torch.testing.assert_close(traj, solver.eager(x_T, lab), rtol=1e-3, atol=1e-3)
    assert solver.replays == 1


def test_evaluate_samples_a_diffusion_teacher_with_edm2s_sampler():
    """`python -m engine.evaluate --schedules heun:N`: a teacher's reference samples, seed by seed as EDM2 draws
    them (noise, then a uniform class)."""
    from engine.evaluate import evaluate, parse_schedule, to_uint8
    from engine.solvers import edm2_sampler
    assert parse_schedule('heun') == ('heun', 32) and parse_schedule('heun:4') == ('heun', 4)
    net = tiny_edm2(0).eval()
    res = evaluate(net, (3, 16, 16), [parse_schedule('heun:4')], num=3, batch=2, keep_samples=True, progress=False)
    (key, r), = res.items()
    assert key == 'heun-4 (7 NFE)'
    # evaluate's batches are seeds [0, 1] and [2]; each is drawn here seed by seed and solved as the same batch
    # (a float32 forward's rounding can depend on the batch size, which is not what this test is about)
    for seeds in ([0, 1], [2]):
        zs, labels = [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            zs.append(torch.randn(3, 16, 16, generator=g))
            labels.append(torch.randint(10, (1,), generator=g))
        want = to_uint8(edm2_sampler(net, torch.stack(zs), torch.cat(labels), num_steps=4))
        assert torch.equal(r['samples'][seeds[0]:seeds[-1] + 1], want)
