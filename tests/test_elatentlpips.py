"""E-LatentLPIPS and its joint augmentation (docs/spec/edm2_latent.md §6): every augmentation op with fixed
parameters against an independent float64 computation of its definition, the same transform on both arguments,
gradients into the first argument only, and the distance against a float64 evaluation of §6.1 / §6.3."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.perceptual.augment import SYM2, SYM6, JointAugment, filter_bank

D = torch.float64


# ---- geometric ops: the resampling pass written out as matrices in numpy ------------------------------------------

def reflect_index(i: int, n: int) -> int:
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def conv_matrix(n_in: int, taps: np.ndarray, pad0: int, pad1: int, flip: bool) -> np.ndarray:
    """The matrix of a 1-D correlation with `taps` (flipped: a convolution) after zero padding (pad0, pad1)."""
    t = taps[::-1] if flip else taps
    n_out = n_in + pad0 + pad1 - len(t) + 1
    M = np.zeros((n_out, n_in))
    for o in range(n_out):
        for k, v in enumerate(t):
            i = o + k - pad0
            if 0 <= i < n_in:
                M[o, i] += v
    return M


def geometric64(x: np.ndarray, G: np.ndarray) -> np.ndarray:
    """§6.4's pass on one [H, W] image: reflect padding by the largest margin (W−1), 2× zero-stuffed upsampling with
    the normalised sym6 low-pass at gain 2 per axis (zero padding 6 / 5, a convolution), bilinear sampling at
    G⁻¹ of the output grid (zeros outside, pixel centres at half-integers), correlation with the filter after a
    crop of 1 and every second sample."""
    H, W = x.shape
    f = np.asarray(SYM6) / np.sum(SYM6)
    padded = np.array([[x[reflect_index(i - (H - 1), H), reflect_index(j - (W - 1), W)] for j in range(3 * W - 2)]
                       for i in range(3 * H - 2)])
    Hp, Wp = padded.shape

    def up(n):
        Z = np.zeros((2 * n, n))
        Z[np.arange(n) * 2, np.arange(n)] = 1
        return conv_matrix(2 * n, f * 2, 6, 5, flip=True) @ Z
    big = up(Hp) @ padded @ up(Wp).T
    hb, wb = big.shape
    oh, ow = (H + 6) * 2, (W + 6) * 2
    # the inverse map in centred output coordinates of the 2× grid, as engine/perceptual/augment.py composes it
    S2, T = np.diag([2.0, 2, 1]), lambda a: np.array([[1, 0, a], [0, 1, a], [0, 0, 1.0]])
    Gu = T(-0.5) @ S2 @ G @ np.linalg.inv(S2) @ T(0.5)
    out = np.zeros((oh, ow))
    for q in range(oh):
        for p in range(ow):
            X, Y = p - (ow - 1) / 2, q - (oh - 1) / 2
            Xi, Yi, _ = Gu @ np.array([X, Y, 1.0])
            u, v = Xi + (wb - 1) / 2, Yi + (hb - 1) / 2          # input pixel coordinates
            u0, v0 = math.floor(u), math.floor(v)
            acc = 0.0
            for dv in (0, 1):
                for du in (0, 1):
                    uu, vv = u0 + du, v0 + dv
                    w = (1 - abs(u - uu)) * (1 - abs(v - vv))
                    if 0 <= uu < wb and 0 <= vv < hb:
                        acc += w * big[vv, uu]
            out[q, p] = acc
    down = lambda n: conv_matrix(n, f, -1, -1, flip=False)[::2]
    return down(oh) @ out @ down(ow).T


def geometric_case(name):
    return dict(
        xflip=dict(xflip=torch.tensor([1.0], dtype=D)),
        rotate90=dict(rotate90=torch.tensor([3.0], dtype=D)),
        xint=dict(xint=torch.tensor([[2.2 / 8, -1.0 / 8]], dtype=D)),
        scale=dict(scale=torch.tensor([1.3], dtype=D)),
        rotate=dict(rotate_pre=torch.tensor([0.7], dtype=D), rotate_post=torch.tensor([-0.3], dtype=D)),
        aniso=dict(aniso=torch.tensor([0.8], dtype=D)),
        xfrac=dict(xfrac=torch.tensor([[0.37 / 8, -0.21 / 8]], dtype=D)),
    )[name]


@pytest.mark.parametrize("name", ["xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac"])
def test_each_geometric_op_equals_its_float64_resampling(name):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8, dtype=D)
    P = geometric_case(name)
    aug = JointAugment(["rotate" if k.startswith("rotate_") else k for k in P])
    out, _ = aug.apply(x, x.clone(), P)
    G = aug.geometric_matrix(P, 1, 8, 8, "cpu", D)[0].numpy()
    np.testing.assert_allclose(out[0, 0].numpy(), geometric64(x[0, 0].numpy(), G), rtol=1e-9, atol=1e-11)


def test_geometric_ops_move_a_smooth_image_as_their_matrices_say():
    """Conventions, independently of the resampling: on a smooth image the output at centred pixel p is the image
    at G⁻¹p (rotation sense, scale direction, translation in pixels); the identity is exact."""
    W = 48
    c = (W - 1) / 2
    ys, xs = torch.meshgrid(torch.arange(W, dtype=D) - c, torch.arange(W, dtype=D) - c, indexing="ij")
    f = lambda X, Y: torch.cos(0.21 * X + 0.13 * Y) + 0.5 * torch.sin(0.17 * Y - 0.09 * X)
    img = f(xs, ys)[None, None]
    cases = dict(none=dict(scale=torch.tensor([1.0], dtype=D)),
                 xint=dict(xint=torch.tensor([[3 / W, -2 / W]], dtype=D)),
                 rotate=dict(rotate_pre=torch.tensor([0.5], dtype=D), rotate_post=torch.tensor([0.0], dtype=D)),
                 scale=dict(scale=torch.tensor([1.3], dtype=D)),
                 xfrac=dict(xfrac=torch.tensor([[0.37 / W, -0.21 / W]], dtype=D)))
    interior = (slice(14, 34), slice(14, 34))
    for name, P in cases.items():
        aug = JointAugment(["rotate" if k.startswith("rotate_") else k for k in P])
        out, _ = aug.apply(img, img, P)
        G = aug.geometric_matrix(P, 1, W, W, "cpu", D)[0]
        want = f(G[0, 0] * xs + G[0, 1] * ys + G[0, 2], G[1, 0] * xs + G[1, 1] * ys + G[1, 2])
        err = (out[0, 0] - want)[interior].abs().max().item()
        assert err < (1e-8 if name in ("none", "xint") else 2e-2), (name, err)
        inverse = f(G[0, 0] * xs - G[0, 1] * ys - G[0, 2], -G[1, 0] * xs + G[1, 1] * ys - G[1, 2])
        if name in ("rotate", "xint"):                     # the opposite sense would be far off
            assert (out[0, 0] - inverse)[interior].abs().max().item() > 0.3, name


# ---- colour, filter, noise, cutout --------------------------------------------------------------------------

def color64(P: dict) -> np.ndarray:
    """The 4×4 colour matrix of §6.4 from its definitions: brightness adds b to R, G, B; contrast scales them; the
    luma flip reflects about v = (1, 1, 1, 0)/√3; the hue rotates about v by θ (right-hand rule); saturation scales
    the part orthogonal to v."""
    v = np.array([1, 1, 1, 0]) / math.sqrt(3)
    Pv = np.outer(v, v)
    b, c, i = float(P["brightness"][0]), float(P["contrast"][0]), float(P["lumaflip"][0])
    th, s = float(P["hue"][0]), float(P["saturation"][0])
    T = np.eye(4)
    T[:3, 3] = b
    S = np.diag([c, c, c, 1.0])
    L = np.eye(4) - 2 * i * Pv
    u = v[:3]
    K = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])       # K a = u × a
    R3 = math.cos(th) * np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * np.outer(u, u)
    R = np.eye(4)
    R[:3, :3] = R3
    Sat = Pv + (np.eye(4) - Pv) * s
    return Sat @ R @ L @ S @ T


COLOR = dict(brightness=torch.tensor([0.3], dtype=D), contrast=torch.tensor([1.4], dtype=D),
             lumaflip=torch.tensor([1.0], dtype=D), hue=torch.tensor([1.1], dtype=D),
             saturation=torch.tensor([0.6], dtype=D))


@pytest.mark.parametrize("color_matrix", ["reference", "affine"])
def test_colour_ops_equal_their_matrix_on_4_and_3_channels(color_matrix):
    torch.manual_seed(1)
    aug = JointAugment(list(COLOR), color_matrix=color_matrix)
    C = color64(COLOR)
    # rotation about v: v is fixed, a vector orthogonal to it turns by θ
    np.testing.assert_allclose(aug.color_matrix_of(COLOR, 1, "cpu", D)[0].numpy(), C, rtol=1e-12, atol=1e-14)
    x4 = torch.randn(1, 4, 5, 5, dtype=D)
    out, _ = aug.apply(x4, x4.clone(), COLOR)
    flat = x4[0].reshape(4, -1).numpy()
    if color_matrix == "reference":    # the SNU / CMT code: the homogeneous matrix on the four latent channels
        want = C @ flat
    else:
        want = np.concatenate([C[:3, :3] @ flat[:3] + C[:3, 3:], flat[3:]])
    np.testing.assert_allclose(out[0].reshape(4, -1).numpy(), want, rtol=1e-12, atol=1e-12)
    x3 = torch.randn(1, 3, 5, 5, dtype=D)
    out3, _ = aug.apply(x3, x3.clone(), COLOR)
    np.testing.assert_allclose(out3[0].reshape(3, -1).numpy(), C[:3, :3] @ x3[0].reshape(3, -1).numpy() + C[:3, 3:],
                               rtol=1e-12, atol=1e-12)


def test_hue_rotation_turns_right_handed_about_the_luma_axis():
    aug = JointAugment(["hue"])
    C = aug.color_matrix_of(dict(hue=torch.tensor([math.pi / 2], dtype=D)), 1, "cpu", D)[0, :3, :3].numpy()
    v = np.ones(3) / math.sqrt(3)
    a = np.array([1.0, -1.0, 0.0]) / math.sqrt(2)
    np.testing.assert_allclose(C @ v, v, atol=1e-12)
    np.testing.assert_allclose(C @ a, np.cross(v, a), atol=1e-12)


def filter_bank64() -> np.ndarray:
    """The bank from its definition: band 0 = the low-pass L₁L₂L₃, band i = H_i at octave i below L_1…L_{i−1}, with
    L(z) = H(z)H(z⁻¹)/2 and H_i the high-pass analogue, filters at octave k zero-stuffed 2^k times."""
    lo = np.asarray(SYM2)
    hi = lo * (-1.0) ** np.arange(4)
    L, Hh = np.convolve(lo, lo[::-1]) / 2, np.convolve(hi, hi[::-1]) / 2

    def stuffed(h, k):
        out = np.zeros((len(h) - 1) * 2 ** k + 1)
        out[:: 2 ** k] = h
        return out
    bands = [np.convolve(np.convolve(stuffed(L, 0), stuffed(L, 1)), stuffed(L, 2))]
    for i in range(1, 4):
        h = stuffed(Hh, 3 - i)
        for k in range(0, 3 - i):
            h = np.convolve(h, stuffed(L, k))
        pad = (43 - len(h)) // 2
        bands.append(np.pad(h, (pad, 43 - len(h) - pad)))
    return np.stack(bands)


def test_filter_bank_and_band_filtering_equal_their_definitions():
    np.testing.assert_allclose(filter_bank(), filter_bank64(), atol=1e-15)
    np.testing.assert_allclose(filter_bank64().sum(axis=0), np.eye(43)[21], atol=1e-12)   # the bands add to a delta
    gains = torch.tensor([[1.7, 0.5, 2.0, 1.0]], dtype=D)
    aug = JointAugment(["imgfilter"])
    taps = aug.band_filters(gains)[0].numpy()
    expected = np.array([10, 1, 1, 1]) / 13
    g = np.ones(4)
    for i in range(4):
        t = np.ones(4)
        t[i] = gains[0, i].item()
        g *= t / math.sqrt((expected * t ** 2).sum())
    np.testing.assert_allclose(taps, g @ filter_bank64(), rtol=1e-12)
    torch.manual_seed(2)
    x = torch.randn(1, 2, 26, 26, dtype=D)
    out, _ = aug.apply(x, x.clone(), dict(imgfilter=gains))
    p = 21
    for ch in range(2):
        img = x[0, ch].numpy()
        padded = np.pad(img, p, mode="reflect")
        rows = np.array([[np.dot(padded[r, j:j + 43], taps) for j in range(26)] for r in range(26 + 2 * p)])
        want = np.array([[np.dot(rows[i:i + 43, j], taps) for j in range(26)] for i in range(26)])
        np.testing.assert_allclose(out[0, ch].numpy(), want, rtol=1e-10, atol=1e-12)


def test_noise_and_cutout_reach_both_arguments_alike():
    aug = JointAugment(["noise", "cutout"])
    x, y = torch.randn(2, 4, 8, 8, dtype=D), torch.randn(2, 4, 8, 8, dtype=D)
    P = aug.draw(2, (4, 8, 8), "cpu", torch.Generator().manual_seed(0), dtype=D)
    a, b = aug.apply(x, y, P)
    cx, cy = P["cutout_center"][0].tolist()
    mask = np.array([[float(abs((j + 0.5) / 8 - cx) >= 0.25 or abs((i + 0.5) / 8 - cy) >= 0.25) for j in range(8)]
                     for i in range(8)])
    np.testing.assert_allclose(a[0].numpy(), (x[0] + P["noise"][0]).numpy() * mask, rtol=1e-12)
    np.testing.assert_allclose(b[0].numpy(), (y[0] + P["noise"][0]).numpy() * mask, rtol=1e-12)
    assert torch.equal(P["noise"], P["noise2"])                                  # shared (the SNU / CMT code)
    assert 0 < mask.mean() < 1
    own = JointAugment(["noise"], shared_noise=False).draw(2, (4, 8, 8), "cpu", torch.Generator().manual_seed(0))
    assert not torch.equal(own["noise"], own["noise2"])                         # the official package's


def test_one_draw_reaches_both_arguments_and_gradients_the_first_only():
    aug = JointAugment("bgcfnc")
    x = torch.randn(3, 4, 32, 32, dtype=D, requires_grad=True)
    a, b = aug(x, x.detach().clone(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-12)     # equal inputs, equal outputs: one transform
    y = torch.randn(3, 4, 32, 32, dtype=D)
    a, b = aug(x, y, torch.Generator().manual_seed(3))
    assert not b.requires_grad and a.requires_grad
    (a.square().sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the same generator state gives the same transform (the step's RNG replays)
    a2, _ = aug(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(a.detach(), a2.detach())


# ---- the distance: §6.1 / §6.3 / §6.2 evaluated in float64 from the layer lists -----------------------------------

from engine.networks.dropout import dropout_generator  # noqa: E402
from engine.networks.latent_vgg import LatentVGG  # noqa: E402
from engine.perceptual.elatentlpips import ELatentLPIPS, _official_trunk, convert_reference_checkpoint  # noqa: E402

# §6.3: the 13 convolutions of VGG16_Latent_GN by their module index, 'M' the two pools; taps after conv 2, 4, 7,
# 10 (after the first pool) and 13 (after the second)
CMT_CONVS = (0, 3, 6, 9, 12, 15, 18, "M", 22, 25, 28, "M", 32, 35, 38)
CMT_TAP_AFTER = (3, 9, 18, 28, 38)
# §6.2: torchvision vgg16_bn indices; pools 6, 13, 23 removed, 33 and 43 kept; taps after relu1_2, relu2_2,
# relu3_3 and after the pools 33 and 43
OFF_CONVS = (0, 3, "-", 7, 10, "-", 14, 17, 20, "-", 24, 27, 30, "M", 34, 37, 40, "M")
OFF_TAP_AFTER = (3, 10, 20, "M33", "M43")


def random_cmt_state(seed=0):
    torch.manual_seed(seed)
    net = LatentVGG()
    for m in net.features:
        if isinstance(m, torch.nn.GroupNorm):     # the affine parameters away from (1, 0), so they matter
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
    return net.state_dict()


def trunk64(state, x, convs, tap_after, norm):
    """The trunk written out from its layer list in float64: conv 3×3 pad 1 → norm → ReLU; 'M' 2×2 max-pool."""
    s = {k: v.double() for k, v in state.items()}
    taps, h, pool_count = [], x.double(), 0
    for item in convs:
        if item == "-":
            continue
        if item == "M":
            b, c, H, W = h.shape
            h = h.reshape(b, c, H // 2, 2, W // 2, 2).amax(dim=(3, 5))
            pool_count += 1
            if f"M{[33, 43][pool_count - 1]}" in tap_after:
                taps.append(h)
            continue
        i = item
        h = torch.nn.functional.conv2d(h, s[f"features.{i}.weight"], s[f"features.{i}.bias"], padding=1)
        g, bta = s[f"features.{i + 1}.weight"], s[f"features.{i + 1}.bias"]
        if norm == "group":
            b, c, H, W = h.shape
            hg = h.reshape(b, 32, c // 32 * H * W)
            mean, var = hg.mean(-1, keepdim=True), hg.var(-1, unbiased=False, keepdim=True)
            h = ((hg - mean) / torch.sqrt(var + 1e-5)).reshape(b, c, H, W)
        else:
            m, v = s[f"features.{i + 1}.running_mean"], s[f"features.{i + 1}.running_var"]
            h = (h - m[:, None, None]) / torch.sqrt(v[:, None, None] + 1e-5)
        h = torch.relu(h * g[:, None, None] + bta[:, None, None])
        if i + 1 in [t + 1 for t in tap_after if isinstance(t, int)]:
            taps.append(h)
    return taps


def distance64(taps_x, taps_y, heads=None):
    d = 0
    for k, (a, b) in enumerate(zip(taps_x, taps_y)):
        na = a / torch.sqrt((a * a).sum(1, keepdim=True) + 1e-8)
        nb = b / torch.sqrt((b * b).sum(1, keepdim=True) + 1e-8)
        w = torch.ones(a.shape[1], dtype=D) if heads is None else heads[k].double()
        d = d + ((na - nb) ** 2 * w[:, None, None]).sum(1).mean(dim=(1, 2))
    return d


def test_cmt_distance_equals_its_definition_in_float64():
    state = random_cmt_state()
    m = ELatentLPIPS(vgg_state_dict=state, augment=None).double()
    x, y = torch.randn(3, 4, 16, 16, dtype=D) * 0.5, torch.randn(3, 4, 16, 16, dtype=D) * 0.5
    ref = distance64(trunk64(state, x, CMT_CONVS, CMT_TAP_AFTER, "group"),
                     trunk64(state, y, CMT_CONVS, CMT_TAP_AFTER, "group"))
    got = m(x, y)
    assert got.shape == (3,)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    assert [t.shape[-1] for t in trunk64(state, x, CMT_CONVS, CMT_TAP_AFTER, "group")] == [16, 16, 16, 8, 4]
    # float32 (the training precision) stays close to it
    m32 = ELatentLPIPS(vgg_state_dict=state, augment=None)
    torch.testing.assert_close(m32(x.float(), y.float()).double(), ref, rtol=1e-4, atol=0)


def test_official_variant_equals_its_definition_in_float64():
    torch.manual_seed(1)
    trunk = _official_trunk(4)
    for mod in trunk:
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            torch.nn.init.normal_(mod.weight, 1.0, 0.3)
            torch.nn.init.normal_(mod.bias, 0.0, 0.3)
    state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    heads = [torch.rand(c) for c in (64, 128, 256, 512, 512)]
    lin = {f"lin{k}.model.1.weight": h.reshape(1, -1, 1, 1) for k, h in enumerate(heads)}
    m = ELatentLPIPS(vgg_state_dict=state, lin_state_dict=lin, variant="official", augment=None).double()
    x, y = torch.randn(2, 4, 16, 16, dtype=D), torch.randn(2, 4, 16, 16, dtype=D)
    tx, ty = (trunk64(state, v, OFF_CONVS, OFF_TAP_AFTER, "batch") for v in (x, y))
    assert [t.shape[-1] for t in tx] == [16, 16, 16, 8, 4]
    ref = distance64(tx, ty, heads) + (x - y).abs().mean(dim=(1, 2, 3))        # + the L1 term (§6.2)
    torch.testing.assert_close(m(x, y), ref, rtol=1e-10, atol=0)
    m.train()
    assert not m.training                                                       # BatchNorm stays in eval mode


def test_augmented_distance_is_the_distance_of_one_transform_on_both_and_grads_the_first_only():
    state = random_cmt_state(2)
    m = ELatentLPIPS(vgg_state_dict=state).double()                             # 'bgcfnc', shared noise
    x = (torch.randn(2, 4, 32, 32, dtype=D) * 0.5).requires_grad_(True)
    y = (torch.randn(2, 4, 32, 32, dtype=D) * 0.5).requires_grad_(True)
    with dropout_generator(11):                                                 # the step's pinned generator
        d = m(x, y)
    P = m.augment.draw(2, (4, 32, 32), "cpu", torch.Generator().manual_seed(11))
    a, b = m.augment.apply(x.detach(), y.detach(), {k: v.double() for k, v in P.items()})
    ref = distance64(trunk64(state, a, CMT_CONVS, CMT_TAP_AFTER, "group"),
                     trunk64(state, b, CMT_CONVS, CMT_TAP_AFTER, "group"))
    torch.testing.assert_close(d.detach(), ref, rtol=1e-9, atol=0)
    with dropout_generator(11):
        assert torch.equal(m(x, y), d)                                          # the step replays
    d.sum().backward()
    assert y.grad is None and x.grad is not None and x.grad.abs().sum() > 0
    # the input gradient against a central difference along a random direction, same transform (a step of 1e-8
    # crosses none of the ~3 M ReLU kinks in expectation; 1e-6 would cross about one)
    v = torch.randn_like(x)
    with dropout_generator(11):
        plus = m(x.detach() + 1e-8 * v, y.detach()).sum()
    with dropout_generator(11):
        minus = m(x.detach() - 1e-8 * v, y.detach()).sum()
    torch.testing.assert_close((x.grad * v).sum(), (plus - minus) / 2e-8, rtol=1e-5, atol=0)


class _ReferenceVGGBase(torch.nn.Module):
    """Stands for the CMT authors' `elatentlpips.models.VGGBase` when the test writes a full-module checkpoint."""

    def __init__(self):
        super().__init__()
        net = LatentVGG()
        self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class _Hostile:
    def __reduce__(self):
        import os
        return (os.system, ("touch hostile-ran",))


def test_reference_checkpoint_converts_without_running_it(tmp_path, monkeypatch):
    import sys
    import types
    mod = types.ModuleType("elatentlpips.models")
    _ReferenceVGGBase.__module__, _ReferenceVGGBase.__qualname__ = "elatentlpips.models", "VGGBase"
    mod.VGGBase = _ReferenceVGGBase
    monkeypatch.setitem(sys.modules, "elatentlpips", types.ModuleType("elatentlpips"))
    monkeypatch.setitem(sys.modules, "elatentlpips.models", mod)
    torch.manual_seed(3)
    model = _ReferenceVGGBase()
    opt = torch.optim.SGD(model.features.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 4, 32, 32)).sum().backward()
    opt.step()
    torch.save({"model": model, "optimizer_state": opt.state_dict(), "epoch": 3}, tmp_path / "ref.pth")
    torch.save({"model": model.features, "x": _Hostile()}, tmp_path / "bad.pth")
    monkeypatch.delitem(sys.modules, "elatentlpips.models")                    # the class is not importable now
    out = convert_reference_checkpoint(tmp_path / "ref.pth", tmp_path / "latent_vgg16.safetensors")
    from engine.perceptual.elatentlpips import read_vgg_state
    got = read_vgg_state(out)
    want = model.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    x, y = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    a = ELatentLPIPS(out, augment=None)(x, y)
    b = ELatentLPIPS(vgg_state_dict={k: v for k, v in want.items()}, augment=None)(x, y)
    assert torch.equal(a, b)
    # a full-module file is not a state dict: a clear error naming the converter
    with pytest.raises(Exception, match="convert_reference_checkpoint"):
        read_vgg_state(tmp_path / "ref.pth")
    # a pickle that would run code is refused and nothing runs
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="system|posix|not allowed|refus"):
        convert_reference_checkpoint(tmp_path / "bad.pth", tmp_path / "bad.safetensors")
    assert not (tmp_path / "hostile-ran").exists() and not (tmp_path / "bad.safetensors").exists()


def test_missing_or_unfit_trunk_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGINE_LATENT_VGG_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="latent_vgg16.safetensors"):
        ELatentLPIPS()
    state = random_cmt_state()
    state["features.0.weight"] = state["features.0.weight"][:, :3]
    with pytest.raises(Exception, match="features.0.weight"):
        ELatentLPIPS(vgg_state_dict=state)
    with pytest.raises(Exception, match="variant"):
        ELatentLPIPS(vgg_state_dict=random_cmt_state(), variant="lpips")
