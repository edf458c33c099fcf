"""MM-DiT (engine/networks/mmdit.py) against REPA's text-to-image MMDiT (sihyun-yu/REPA models/mmdit.py at
67f7145): the released configuration's size and state-dict names, the forward against a functional float64
re-computation from the state dict alone (joint attention over [text; image], per-stream adaLN, the pre-only text
stream of the last block, the REPA tap after block encoder_depth), the dual-stream JVP against float64 central
differences and torch.func.jvp, and the SiT → Mean Flow initialisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.errors import EngineError
from engine.networks.mmdit import MMDiT, init_from_sit


def tiny(mean_flow=True, **kw):
    torch.manual_seed(0)
    net = MMDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4, context_dim=12,
                context_tokens=5, projector_dim=16, z_dim=8, encoder_depth=2, mean_flow=mean_flow, **kw).double()
    net.set_null_context(torch.randn(5, 12, dtype=torch.float64))
    return net


def inputs(B=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    ctx = torch.randn(B, 5, 12, generator=g, dtype=torch.float64)
    return x, t, 0.4 * t, ctx


def test_released_configuration_size_and_names():
    """REPA-COCO: 505,070,608 parameters without the projector, 512,415,504 with it (24 joint blocks at 768);
    the last block's text stream has only qkv and a 2·768 modulation."""
    with torch.device("meta"):
        net = MMDiT.from_name("REPA-COCO", mean_flow=False)
    total = sum(p.numel() for p in net.parameters())
    assert total - sum(p.numel() for p in net.projectors.parameters()) == 505_070_608 and total == 512_415_504
    keys = set(net.state_dict())
    assert {"pos_embed", "context_embedder.weight", "t_embedder.mlp.2.weight", "projectors.0.4.weight",
            "final_layer.linear.weight", "joint_blocks.0.context_block.mlp.fc2.weight",
            "joint_blocks.23.context_block.attn.qkv.weight"} <= keys
    assert not any(k.startswith("joint_blocks.23.context_block.") and ("proj" in k or "mlp" in k) for k in keys)
    assert net.state_dict()["joint_blocks.23.context_block.adaLN_modulation.1.weight"].shape == (2 * 768, 768)
    assert "pos_embed" not in dict(net.named_parameters())            # a buffer, as in the reference


def reference_forward(sd, x, t, r, ctx, heads, depth, patch, enc_depth, mean_flow):
    """The reference's math written out on its state dict (float64)."""
    lin = lambda v, name: F.linear(v, sd[name + ".weight"], sd[name + ".bias"])

    def temb(prefix, s):
        f = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
        a = s[:, None] * f[None]
        return lin(F.silu(lin(torch.cat([torch.cos(a), torch.sin(a)], -1), prefix + ".mlp.0")), prefix + ".mlp.2")
    B = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    c = temb("t_embedder", t) + (temb("r_embedder", t - r) if mean_flow else 0)
    cx = lin(ctx, "context_embedder")
    ln = lambda v: F.layer_norm(v, v.shape[-1:], eps=1e-6)
    mod = lambda v, sh, sc: v * (1 + sc[:, None]) + sh[:, None]
    zs = None
    for i in range(depth):
        pre = f"joint_blocks.{i}."
        last = i == depth - 1
        m_c = lin(F.silu(c), pre + "context_block.adaLN_modulation.1").chunk(2 if last else 6, 1)
        m_x = lin(F.silu(c), pre + "x_block.adaLN_modulation.1").chunk(6, 1)
        q_c = lin(mod(ln(cx), m_c[0], m_c[1]), pre + "context_block.attn.qkv")
        q_x = lin(mod(ln(h), m_x[0], m_x[1]), pre + "x_block.attn.qkv")
        qkv = torch.cat([q_c, q_x], 1)
        N, D = qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1)
        a = (w @ v).transpose(1, 2).reshape(B, N, D)
        n = cx.shape[1]

        def finish(s, att, m, name):
            s = s + m[2][:, None] * lin(att, name + ".attn.proj")
            u = lin(F.gelu(lin(mod(ln(s), m[3], m[4]), name + ".mlp.fc1"), approximate="tanh"), name + ".mlp.fc2")
            return s + m[5][:, None] * u
        h = finish(h, a[:, n:], m_x, pre + "x_block")
        if not last:
            cx = finish(cx, a[:, :n], m_c, pre + "context_block")
        if i + 1 == enc_depth:
            zs = lin(F.silu(lin(F.silu(lin(h, "projectors.0.0")), "projectors.0.2")), "projectors.0.4")
    sh, sc = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    out = lin(mod(ln(h), sh, sc), "final_layer.linear")
    g = x.shape[-1] // patch
    out = out.reshape(B, g, g, patch, patch, 4).permute(0, 5, 1, 3, 2, 4).reshape(B, 4, g * patch, g * patch)
    return out, zs


@pytest.mark.parametrize("mean_flow", [False, True])
def test_forward_equals_the_reference_math(mean_flow):
    net = tiny(mean_flow)
    for p in net.parameters():                   # PyTorch's default init is already non-trivial; perturb anyway
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, r, ctx = inputs()
    out, zs = net(x, t, r, ctx, return_features=True)
    ref, ref_zs = reference_forward(net.state_dict(), x, t, r, ctx, 4, 3, 2, 2, mean_flow)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zs[0], ref_zs, rtol=1e-12, atol=1e-12)
    # no caption: the null caption's features
    torch.testing.assert_close(net(x, t, r, None), net(x, t, r, net.null_context.expand(3, 5, 12)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="captions must be features"):
        net(x, t, r, ctx[:, :4])


def test_dual_stream_jvp_equals_finite_differences_and_forward_ad():
    net = tiny()
    x, t, r, ctx = inputs()
    dx = torch.randn_like(x)
    dt, dr = torch.ones_like(t), torch.zeros_like(r)
    u, du = net.jvp(x, t, r, ctx, dx, dt, dr)
    torch.testing.assert_close(u, net(x, t, r, ctx), rtol=1e-12, atol=1e-12)
    h = 1e-5
    with torch.no_grad():
        fd = (net(x + h * dx, t + h, r, ctx) - net(x - h * dx, t - h, r, ctx)) / (2 * h)
    torch.testing.assert_close(du, fd, rtol=1e-6, atol=1e-8)
    _, ad = torch.func.jvp(lambda a, b: net(a, b, r, ctx), (x, t), (dx, dt))
    torch.testing.assert_close(du, ad, rtol=1e-10, atol=1e-12)
    assert du.abs().max() > 1e-3                 # a non-trivial derivative


def test_sit_to_mean_flow_initialisation():
    """init_from_sit copies every shared tensor; with r_init='zero' the Mean Flow net equals the SiT at any r."""
    sit = tiny(mean_flow=False)
    mf = init_from_sit(tiny(mean_flow=True, r_init="zero"), sit.state_dict())
    x, t, r, ctx = inputs()
    torch.testing.assert_close(mf(x, t, r, ctx), sit(x, t, None, ctx), rtol=1e-12, atol=1e-12)
    with pytest.raises(EngineError, match="r_init must be one of"):
        MMDiT(r_init="normal")
    with pytest.raises(EngineError, match="encoder_depth"):
        MMDiT(depth=4, encoder_depth=5)
    with pytest.raises(EngineError, match="null caption's features have shape"):
        sit.set_null_context(torch.zeros(3, 12))
