"""The DiT / Mean Flow backbone (engine/networks/dit.py) and the forward-AD attention op (engine.ops.attention):
sizes and state_dict as docs/spec/mf.md §3, and the JVP of a whole DiT against float64 finite differences and against
torch.func.jvp through explicit attention."""
import math
import os

import numpy as np
import pytest
import torch
from devices import CUDA, INTERPRETED_ATTENTION

from engine import ops
from engine.kernels import jvp_attention
from engine.kernels.jvp_attention import attention_reference
from engine.networks import DiT
from engine.networks.dit import sincos_pos_embed


def require_extension():
    """The C++ extension is built by the README's install (setup.py); a build that failed must not pass as a
    skip. ENGINE_BUILD_EXT=0 (a deliberate pure-Python install) skips instead."""
    if jvp_attention.extension() is None:
        if os.environ.get("ENGINE_BUILD_EXT") == "0":
            pytest.skip("built without the C++ extension (ENGINE_BUILD_EXT=0)")
        pytest.fail("the C++ extension engine._C is not built; reinstall with "
                    "`pip install --no-build-isolation -e .` (setup.py prints why a build failed)")


@pytest.mark.parametrize("name,params,keys", [("B/4", 131_165_248, 136), ("B/2", 131_091_472, 136),
                                              ("L/2", 459_137_040, 256), ("XL/2", 676_440_592, 296)])
def test_configurations_match_the_spec(name, params, keys):
    with torch.device("meta"):
        net = DiT.from_name(name)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == params
    sd = net.state_dict()
    assert len(sd) == keys and not net.pos_embed.requires_grad
    D = net.pos_embed.shape[-1]
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, D)
    assert sd["r_embedder.mlp.0.weight"].shape == (D, 256)
    assert sd["final_layer.linear.weight"].shape == (net.patch ** 2 * 4, D)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6 * D, D)


def test_unknown_configuration_is_named():
    with pytest.raises(ValueError, match="unknown DiT configuration 'XXL/2'"):
        DiT.from_name("XXL/2")


def test_position_table_and_unpatchify_layout():
    pe = sincos_pos_embed(16, 3)  # D = 16: 8 channels for the column, 8 for the row
    omega = 1 / 10000 ** (np.arange(4) / 4)
    row, col = 1, 2
    tok = pe[row * 3 + col]
    np.testing.assert_allclose(tok[:4], np.sin(col * omega))
    np.testing.assert_allclose(tok[4:8], np.cos(col * omega))
    np.testing.assert_allclose(tok[8:12], np.sin(row * omega))
    net = DiT(input_size=4, patch_size=2, in_channels=3, hidden_size=8, depth=1, num_heads=1, num_classes=2)
    lin = torch.arange(4 * 12, dtype=torch.float32).reshape(1, 4, 12)   # 4 tokens × (p²·C = 12)
    img = net.unpatchify(lin)
    # token (gi, gj), in-patch (pi, qi), channel c ↔ linear index (pi·p + qi)·C + c
    gi, gj, pi, qi, c = 1, 0, 1, 1, 2
    assert img[0, c, gi * 2 + pi, gj * 2 + qi] == lin[0, gi * 2 + gj, (pi * 2 + qi) * 3 + c]


def small(hidden=72, heads=1, size=14, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = DiT(input_size=size, patch_size=2, in_channels=4, hidden_size=hidden, depth=2, num_heads=heads,
              num_classes=10).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3 / math.sqrt(max(1, p.shape[-1])))
    return net


def test_zero_output_at_init_and_null_class():
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(net(x, torch.rand(2), torch.zeros(2)), torch.zeros_like(x))
    net = small().float()
    x = torch.randn(2, 4, 14, 14)
    t = torch.full((2,), 0.5)
    # no labels means the null class (index num_classes); r defaults to t (h = 0)
    assert torch.equal(net(x, t, None, None), net(x, t, t, torch.tensor([10, 10])))
    assert not torch.equal(net(x, t, None, torch.tensor([1, 2])), net(x, t, None, None))
    with pytest.raises(ValueError, match="labels must be class indices"):
        net(x, t, None, torch.zeros(2, 10))


@pytest.mark.parametrize("jvp", ["func", "dual"])
@pytest.mark.parametrize("path", ["extension", pytest.param("triton", marks=INTERPRETED_ATTENTION), "ref"])
@pytest.mark.parametrize("hidden,heads", [(72, 1), (128, 2)])  # head dims 72 (as XL/2) and 64
def test_dit_jvp_equals_finite_differences_and_math_attention(hidden, heads, path, jvp, monkeypatch):
    """The JVP along (v, 0, 1) of u(z, r, t) — Mean Flow's tangent — through torch.func.jvp and the op's
    forward-AD rule ('func'), or the DiT's dual-stream jvp (primal and tangent batched through each linear layer,
    'dual'), with the C++ one-pass kernel, the Triton kernel (interpreter) or the PyTorch reference; 49 tokens
    (not a multiple of any block)."""
    if path == "extension":
        require_extension()
    monkeypatch.setenv("ENGINE_KERNELS", {"extension": "auto", "triton": "triton", "ref": "ref"}[path])
    net = small(hidden, heads)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 14, 14, generator=g, dtype=torch.float64)
    v = torch.randn(2, 4, 14, 14, generator=g, dtype=torch.float64)
    t = torch.tensor([0.7, 0.4], dtype=torch.float64)
    r = torch.tensor([0.2, 0.4], dtype=torch.float64)
    labels = torch.tensor([3, 10])
    f = lambda zz, rr, tt: net(zz, tt, rr, labels)
    with torch.no_grad():
        if jvp == "func":
            u, du = torch.func.jvp(f, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        else:
            u, du = net.jvp(z, t, r, labels, v, torch.ones_like(t), torch.zeros_like(r))
        h = 1e-6
        fd = (f(z + h * v, r, t + h) - f(z - h * v, r, t - h)) / (2 * h)
        assert (du - fd).abs().max() <= 1e-6 * fd.abs().max()
        monkeypatch.setattr(ops, "attention", lambda q, k, vv, scale=None: attention_reference(q, k, vv, scale))
        u_ref, du_ref = torch.func.jvp(f, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    assert (u - u_ref).abs().max() <= 1e-12 * u_ref.abs().max()
    assert (du - du_ref).abs().max() <= 1e-6 * du_ref.abs().max()


@pytest.mark.parametrize("jvp", ["func", "dual"])
def test_dit_jvp_fp32_within_dtype_tolerance(jvp):
    net64 = small()
    net32 = small().float()  # the same weights, rounded
    z = torch.randn(2, 4, 14, 14, dtype=torch.float64)
    v = torch.randn_like(z)
    t, r = torch.tensor([0.9, 0.3], dtype=torch.float64), torch.tensor([0.1, 0.3], dtype=torch.float64)
    with torch.no_grad():
        _, d64 = torch.func.jvp(lambda zz, tt: net64(zz, tt, r), (z, t), (v, torch.ones_like(t)))
        if jvp == "func":
            _, d32 = torch.func.jvp(lambda zz, tt: net32(zz, tt, r.float()), (z.float(), t.float()),
                                    (v.float(), torch.ones_like(t.float())))
        else:
            _, d32 = net32.jvp(z.float(), t.float(), r.float(), None, v.float(), torch.ones(2), torch.zeros(2))
    assert (d32.double() - d64).abs().max() <= 1e-4 * d64.abs().max()


def test_attention_op_backward_and_jvp():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 72, generator=g, dtype=torch.float64) for _ in range(3))
    dq, dk, dv = (torch.randn(2, 3, 37, 72, generator=g, dtype=torch.float64) for _ in range(3))
    o, do = torch.func.jvp(ops.attention, (q, k, v), (dq, dk, dv))
    o_ref, do_ref = torch.func.jvp(attention_reference, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(do, do_ref, rtol=1e-10, atol=1e-10)
    small_in = [t[:1, :1, :5, :4].clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(ops.attention, small_in)
    with pytest.raises(ValueError, match="\\[batch, heads, seq, head_dim\\]"):
        ops.attention(q[0], k[0], v[0])


@pytest.mark.parametrize("kernel,device", [("cpp", "cpu"),
                                           pytest.param("triton", "cpu", marks=INTERPRETED_ATTENTION),
                                           pytest.param("triton", "cuda", id="triton-cuda", marks=CUDA.marks)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_tangent_kernels_against_float64(kernel, device, dtype, tol):
    """The one-pass online-softmax (O, Ȯ) kernels against the float64 reference: the C++ one
    (csrc/jvp_attention.cpp) and the Triton one (the CUDA path; here in Triton's interpreter, head dim 72 padded to
    128). Head dims 72, 64 and 16; 61, 1, 37 and 130 keys (130 crosses two 64-key blocks and ends inside a third)."""
    if kernel == "cpp":
        require_extension()
    op = torch.ops.engine.attention_jvp_cpu if kernel == "cpp" else torch.ops.engine.attention_jvp_triton
    for n, d in ((61, 72), (1, 64), (37, 64), (130, 16)):
        g = torch.Generator().manual_seed(n)
        ts = [torch.randn(2, 3, n, d, generator=g, dtype=torch.float64) for _ in range(6)]
        q, k, v, dq, dk, dv = ts
        out = attention_reference(q, k, v)
        ref = jvp_attention.attention_tangent(q, k, v, out, dq, dk, dv, d ** -0.5)
        o, t = op(*[x.to(device, dtype) for x in ts], d ** -0.5)
        assert o.dtype == dtype and t.dtype == dtype
        o, t = o.cpu(), t.cpu()
        assert (o.double() - out).abs().max() <= tol * out.abs().max() + tol
        assert (t.double() - ref).abs().max() <= tol * ref.abs().max() + tol
    with pytest.raises((RuntimeError, ValueError), match="must have its primal's shape"):
        op(*[x.to(device) for x in (q, k, v, dq[:, :, :1], dk, dv)], 0.1)


def test_attention_block_extension_equals_its_pytorch_reference(monkeypatch):
    """engine._C.attention_block_jvp (stacked-stream GEMMs, (O, Ȯ) written in the projection's layout) against
    the same block in PyTorch (dit_jvp.attention_block on the reference backend); bad shapes are named."""
    require_extension()
    from engine import _C
    from engine.networks.dit import Attention
    from engine.networks.dit_jvp import attention_block
    torch.manual_seed(0)
    attn = Attention(144, 2).double()
    x, dx = torch.randn(3, 37, 144, dtype=torch.float64), torch.randn(3, 37, 144, dtype=torch.float64)
    o, do = _C.attention_block_jvp(x, dx, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 2,
                                   72 ** -0.5)
    monkeypatch.setenv("ENGINE_KERNELS", "ref")
    o_ref, do_ref = attention_block(attn, x, dx)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(do, do_ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="not divisible by 5 heads"):
        _C.attention_block_jvp(x, dx, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 5, 0.1)
    with pytest.raises(RuntimeError, match="must be \\[batch, seq, dim\\] of one shape"):
        _C.attention_block_jvp(x, dx[:1], attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 2, 0.1)
