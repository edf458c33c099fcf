"""engine/perceptual/lpips.py against a direct float64 re-implementation of docs/spec/cm.md §3.2 written here, and (when
the lpips
package is installed) against lpips 0.1.4's own LPIPS class run on the same random trunk. No real VGG16 ImageNet
weights are available to the tests: the trunk is random throughout."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine.perceptual.lpips as lp
from engine.perceptual.lpips import LPIPS

BUNDLED = lp.bundled_lin_path()
needs_lpips_pkg = pytest.mark.skipif(BUNDLED is None, reason=f"lpips package not installed ({lp.LIN_INSTALL})")

# conv layer indices of torchvision's vgg16().features per LPIPS slice, written out by hand from the spec
_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))


def reference_lpips(x, y, vgg_sd, lin_sd):
    """docs/spec/cm.md §3.2 step by step, float64: scaling layer, conv3×3+ReLU stacks with a max-pool before slices
    2..5, unit normalisation over channels, squared difference, 1×1 conv head, spatial mean, sum over layers."""
    x, y = x.double(), y.double()
    if x.shape[1] == 1:
        x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(z):
        out, h = [], (z - shift) / scale
        for s, convs in enumerate(_SLICES):
            if s > 0:
                h = F.max_pool2d(h, kernel_size=2, stride=2)
            for i in convs:
                h = F.relu(F.conv2d(h, vgg_sd[f"features.{i}.weight"].double(), vgg_sd[f"features.{i}.bias"].double(),
                                    padding=1))
            out.append(h)
        return out

    total = torch.zeros(x.shape[0], 1, 1, 1, dtype=torch.float64)
    for l, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (torch.sqrt(torch.sum(a ** 2, dim=1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt(torch.sum(b ** 2, dim=1, keepdim=True)) + 1e-10)
        d = F.conv2d((a - b) ** 2, lin_sd[f"lin{l}.model.1.weight"].double())
        total = total + d.mean(dim=(2, 3), keepdim=True)
    return total.view(-1)


def _pair(n=3, c=3, h=32, w=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return x.to(dtype), y.to(dtype)


def _heads(kind):
    return lp.random_lin_state_dict(0) if kind == "random" else lp.load_lin_state_dict()


@pytest.fixture(scope="module")
def vgg_sd():
    return lp.random_vgg16_state_dict(0)


@pytest.fixture(scope="module")
def net(vgg_sd):
    return LPIPS(vgg_state_dict=vgg_sd, lin_state_dict=lp.random_lin_state_dict(0))


@pytest.mark.parametrize("hw, heads", [pytest.param((32, 32), "bundled", marks=needs_lpips_pkg),
                                       ((20, 27), "random")])  # odd sizes: the max-pools floor
def test_matches_direct_float64_reference(vgg_sd, heads, hw):
    lin_sd = _heads(heads)
    m = LPIPS(vgg_state_dict=vgg_sd, lin_state_dict=lin_sd)
    x, y = _pair(n=2, h=hw[0], w=hw[1], dtype=torch.float64)
    ref = reference_lpips(x, y, vgg_sd, lin_sd)
    assert (ref > 0.01).all()
    torch.testing.assert_close(m(x, y), ref, rtol=1e-12, atol=0)  # float64 inputs run in float64
    out32 = m(x.float(), y.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=2e-5, atol=0)


@needs_lpips_pkg
def test_matches_lpips_package_on_random_trunk(vgg_sd, monkeypatch):
    """lpips 0.1.4's own LPIPS(net='vgg') with its bundled heads, its VGG16 trunk supplied through a stub torchvision
    (the real one is not installed) holding our random weights in torchvision's layout."""
    pytest.importorskip("scipy")  # lpips/__init__ imports its trainer, which needs scipy and tqdm
    pytest.importorskip("tqdm")

    def vgg16(pretrained=False, **kwargs):
        assert not pretrained
        layers, c_in = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        features = nn.Sequential(*layers)
        features.load_state_dict({k.removeprefix("features."): t for k, t in vgg_sd.items()})
        return types.SimpleNamespace(features=features)

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.vgg16 = vgg16
    before = set(sys.modules)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    try:
        import lpips
        theirs = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
    assert not theirs.training

    ours = LPIPS(vgg_state_dict=vgg_sd)  # bundled heads
    x, y = _pair(n=2)
    with torch.no_grad():
        ref32 = theirs(x, y)
        ref64 = theirs.double()(x.double(), y.double())
    assert ref32.shape == (2, 1, 1, 1) and (ref32 > 0.01).all()
    torch.testing.assert_close(ours(x, y, keepdim=True), ref32, rtol=1e-5, atol=0)
    # lpips's scaling constants are float32 even in float64 (ours are the spec's decimals): ~1e-8 relative
    torch.testing.assert_close(ours(x.double(), y.double()), ref64.view(-1), rtol=1e-7, atol=0)


def test_zero_on_identical_inputs_and_symmetric(net):
    x, y = _pair(n=3, h=16, w=24)
    assert torch.equal(net(x, x), torch.zeros(3))
    assert torch.equal(net(x.requires_grad_(), x.detach()), torch.zeros(3))  # two-pass path
    d, d_rev = net(x, y), net(y, x)
    assert (d > 0.01).all()
    torch.testing.assert_close(d, d_rev, rtol=1e-6, atol=0)
    torch.testing.assert_close(net(x, y, keepdim=True), d.view(3, 1, 1, 1), rtol=1e-6, atol=0)
    # per-image: the distance of image 0 does not depend on the rest of the batch
    torch.testing.assert_close(net(x[:1], y[:1]), d[:1], rtol=1e-5, atol=0)


def test_gradients_reach_inputs_not_weights(net):
    assert all(not p.requires_grad for p in net.parameters())
    x, y = _pair(n=2, h=16, w=16, dtype=torch.float64)
    x.requires_grad_()
    d = net(x, y)  # target detached: two trunk passes
    d.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    # directional derivative against a central difference (float64)
    v = torch.randn_like(x)
    h = 1e-6
    with torch.no_grad():
        fd = (net(x + h * v, y).sum() - net(x - h * v, y).sum()) / (2 * h)
    torch.testing.assert_close((x.grad * v).sum(), fd, rtol=1e-5, atol=0)
    # both sides need gradients: one pass over the concatenation, same values and opposite-symmetric roles
    x2, y2 = x.detach().clone().requires_grad_(), y.clone().requires_grad_()
    d2 = net(x2, y2)
    torch.testing.assert_close(d2, d.detach(), rtol=1e-12, atol=0)
    d2.sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-9, atol=1e-15)
    assert y2.grad.abs().sum() > 0


def test_dead_pixels_keep_gradients_finite(vgg_sd):
    """All-zero feature vectors (every ReLU of relu1_2 off at a pixel): sqrt's backward at 0 gives NaN there, which
    the ReLU's backward must mask."""
    sd = dict(vgg_sd)
    sd["features.2.bias"] = torch.cat([torch.zeros(3), torch.full((61,), -100.0)])  # 3 channels can be on
    m = LPIPS(vgg_state_dict=sd, lin_state_dict=lp.random_lin_state_dict(0))
    x, y = _pair(n=2, h=16, w=16)
    with torch.no_grad():
        relu1_2 = m._trunk((x - m.shift.float()) / m.scale.float())[0]
    assert (relu1_2.abs().sum(1) == 0).any()  # the situation is reached
    x.requires_grad_()
    d = m(x, y)
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_always_eval_mode(net):
    x, y = _pair(n=2, h=16, w=16)
    before = net(x, y)
    outer = nn.ModuleDict({"lpips": net}).train()
    assert not net.training and not any(m.training for m in net.modules())
    assert outer.training
    assert torch.equal(net(x, y), before)


def test_single_channel_is_repeated(net, vgg_sd):
    g, h = _pair(n=3, c=1, h=16, w=16)
    d = net(g, h)
    assert torch.equal(d, net(g.expand(-1, 3, -1, -1), h.expand(-1, 3, -1, -1)))
    torch.testing.assert_close(d.double(), reference_lpips(g, h, vgg_sd, lp.random_lin_state_dict(0)),
                               rtol=2e-5, atol=0)


def test_bf16_autocast(net):
    x, y = _pair(n=2, h=16, w=16)
    x.requires_grad_()
    d32 = net(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d16 = net(x, y)
    assert d16.dtype == torch.float32  # normalisation and heads in float32
    assert not torch.equal(d16, d32)  # the trunk did run in bf16
    torch.testing.assert_close(d16, d32, rtol=5e-2, atol=0)
    (g16,) = torch.autograd.grad(d16.sum(), x)
    (g32,) = torch.autograd.grad(d32.sum(), x)
    assert torch.isfinite(g16).all()
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.9


def test_rejects_bad_inputs(net):
    x, y = _pair(n=1, h=8, w=8)
    with pytest.raises(ValueError, match="H, W >= 16"):
        net(x, y)
    x, y = _pair(n=1, c=2)
    with pytest.raises(ValueError, match=r"\[N, 3 or 1, H, W\]"):
        net(x, y)
    x, y = _pair(n=1)
    with pytest.raises(ValueError, match="same shape"):
        net(x, y[:, :, :16])


def test_loads_vgg_from_file_and_env(tmp_path, monkeypatch):
    sd = lp.random_vgg16_state_dict(3)
    sd_file = dict(sd, **{"classifier.0.weight": torch.zeros(4, 4), "classifier.0.bias": torch.zeros(4)})
    new, legacy = tmp_path / "new.pth", tmp_path / "legacy.pth"
    torch.save(sd_file, new)
    torch.save(sd_file, legacy, _use_new_zipfile_serialization=False)  # cannot be mmapped
    lin = lp.random_lin_state_dict(3)
    x, y = _pair(n=1, h=16, w=16)
    want = LPIPS(vgg_state_dict=sd, lin_state_dict=lin)(x, y)
    assert torch.equal(LPIPS(vgg_path=new, lin_state_dict=lin)(x, y), want)
    assert torch.equal(LPIPS(vgg_path=legacy, lin_state_dict=lin)(x, y), want)
    monkeypatch.setenv(lp.VGG16_ENV, str(legacy))
    assert torch.equal(LPIPS(lin_state_dict=lin)(x, y), want)
    # default location: torchvision's cache under $TORCH_HOME
    monkeypatch.delenv(lp.VGG16_ENV)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    (tmp_path / "th" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "th" / "hub" / "checkpoints" / lp.VGG16_FILENAME).symlink_to(new)
    assert torch.equal(LPIPS(lin_state_dict=lin)(x, y), want)


def test_missing_vgg_file_error(tmp_path, monkeypatch):
    monkeypatch.delenv(lp.VGG16_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        LPIPS(lin_state_dict=lp.random_lin_state_dict(0))
    msg = str(e.value)
    assert lp.VGG16_FILENAME in msg and lp.VGG16_ENV in msg and str(tmp_path / "hub" / "checkpoints") in msg
    monkeypatch.setenv(lp.VGG16_ENV, str(tmp_path / "elsewhere.pth"))
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        LPIPS(lin_state_dict=lp.random_lin_state_dict(0))


def test_missing_lin_file_error(tmp_path, monkeypatch):
    monkeypatch.setenv(lp.LIN_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError) as e:
        LPIPS(vgg_state_dict=lp.random_vgg16_state_dict(0))
    msg = str(e.value)
    assert "nope.pth" in msg and lp.LIN_ENV in msg and "pip install --no-deps lpips==0.1.4" in msg
    monkeypatch.delenv(lp.LIN_ENV)
    monkeypatch.setattr(lp.importlib.util, "find_spec", lambda name: None)  # as if lpips were not installed
    assert lp.bundled_lin_path() is None
    with pytest.raises(FileNotFoundError, match="not installed.*pip install --no-deps lpips==0.1.4"):
        LPIPS(vgg_state_dict=lp.random_vgg16_state_dict(0))


def test_rejects_wrong_vgg_state_dict(tmp_path):
    lin = lp.random_lin_state_dict(0)
    sd = lp.random_vgg16_state_dict(0)
    bad = dict(sd)
    bad["features.10.weight"] = torch.zeros(256, 64, 3, 3)
    with pytest.raises(ValueError, match=r"features\.10\.weight: \(256, 64, 3, 3\) \(expected \(256, 128, 3, 3\)\)"):
        LPIPS(vgg_state_dict=bad, lin_state_dict=lin)
    bad = dict(sd)
    del bad["features.28.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth.*missing keys \['features\.28\.bias'\]"):
        LPIPS(vgg_path=tmp_path / "bad.pth", lin_state_dict=lin)
    bad = dict(sd, **{"features.30.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \['features\.30\.weight'\]"):
        LPIPS(vgg_state_dict=bad, lin_state_dict=lin)
    bad = {k.removeprefix("features."): t for k, t in sd.items()}  # a bare Sequential's keys
    with pytest.raises(ValueError, match="missing keys"):
        LPIPS(vgg_state_dict=bad, lin_state_dict=lin)
    bad = dict(lin)
    bad["lin2.model.1.weight"] = torch.zeros(1, 384, 1, 1)  # e.g. the alex heads
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight"):
        LPIPS(vgg_state_dict=sd, lin_state_dict=bad)


@needs_lpips_pkg
def test_bundled_linear_heads():
    """lpips's weights/v0.1/vgg.pth: five [1, C, 1, 1] float32 tensors, all strictly positive (trained with a clamp
    at 0 in lpips's trainer; nothing clamps them at inference, so we load them as they are)."""
    raw = torch.load(BUNDLED, map_location="cpu", weights_only=True)
    assert sorted(raw) == [f"lin{l}.model.1.weight" for l in range(5)]
    sd = lp.load_lin_state_dict()
    for l, c in enumerate((64, 128, 256, 512, 512)):
        w = sd[f"lin{l}.model.1.weight"]
        assert w.shape == (1, c, 1, 1) and torch.equal(w, raw[f"lin{l}.model.1.weight"])
        assert (w > 0).all()
    allw = torch.cat([w.flatten() for w in sd.values()])
    assert 0.009 < allw.min() < 0.01 and 1.28 < allw.max() < 1.29
    m = LPIPS.random(0, lin_state_dict=sd)
    torch.testing.assert_close(m.lins[1], sd["lin1.model.1.weight"].flatten(), rtol=0, atol=0)
