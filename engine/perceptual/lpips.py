"""LPIPS distance (VGG16, linear heads v0.1), the mid-training metric of CMT (docs/spec/cm.md §3.1 step 9, §3.2).

Our own implementation of what `lpips.LPIPS(net='vgg', lpips=True, version='0.1')` computes with its defaults
(normalize=False, spatial=False), for inputs x, y of shape [N, C, H, W] in [−1, 1]:

    z      = (x − shift) / scale                      shift = (−0.030, −0.088, −0.188), scale = (0.458, 0.448, 0.450)
    f_l    = VGG16 `features` activations after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3   (l = 0..4)
    f̂_l    = f_l / (sqrt(Σ_c f_l²) + 1e−10)          (unit vector over channels at every pixel)
    d(x,y) = Σ_l mean_{h,w} Σ_c w_{l,c} (f̂_l(x) − f̂_l(y))²

with w_l the 1×1 "linear head" of layer l (64, 128, 256, 512, 512 weights, no bias). The spatial mean is taken
before the channel dot product; both are linear, so this equals lpips's conv-then-mean and skips a 1-channel
feature map. No resizing: 32×32 images go straight into VGG (H, W ≥ 16 so that relu5_3 is not empty).

* Weights. The trunk is torchvision's ImageNet VGG16 (`vgg16-397923af.pth`, keys `features.{i}.weight/bias`,
  `classifier.*` ignored), read from a local file: `vgg_path=`, else $ENGINE_VGG16_WEIGHTS, else where
  torchvision caches it (`torch.hub.get_dir()/checkpoints/`, i.e. ~/.cache/torch/hub/checkpoints/ unless
  $TORCH_HOME is set). The heads come from the `lpips` package's bundled `weights/v0.1/vgg.pth` (keys
  `lin{l}.model.1.weight`, shape [1, C, 1, 1]; every value is positive, 0.0095 to 1.28; lpips does not clamp
  them at inference, nor do we), located without importing lpips (whose import needs torchvision), or
  `lin_path=` / $ENGINE_LPIPS_LIN_WEIGHTS. Only the weights file is needed:
  `pip install --no-deps lpips==0.1.4` (its dependencies would pull another torch).
* Frozen, always in eval mode: every parameter has requires_grad=False and `train()` leaves it in eval mode, so
  gradients reach the inputs only. A pixel whose features are all zero gives a NaN in the backward of the norm
  (as in lpips); the ReLU that zeroed them masks it, so input gradients stay finite (tested). lpips's heads carry a
  Dropout that is inactive in eval mode; we have none. (lpips
  freezes the trunk but leaves its heads trainable; CMT never optimises them, so the gradients are the same.)
* Grey inputs (C = 1, the digits data) are repeated to 3 channels, i.e. treated as the RGB image (g, g, g).
* Precision. Without autocast everything runs in the inputs' dtype (float32 or float64; the weights are cast;
  bf16/fp16 inputs get a float32 tail as below). Under autocast the trunk runs in the autocast dtype (bf16/fp16); the
  normalisation and everything after it runs
  in float32 with autocast off: a 512-channel sum of squares rounds badly in bf16, and in fp16 the 1e−10 of the
  denominator underflows to 0 so that a pixel whose features are all zero (dead ReLUs) would give 0/0. That tail
  is < 1% of the FLOPs. The result is float32 under autocast.
* One trunk pass over cat([x, y]) when both or neither need gradients; two passes when only one does (the CMT
  case: the target is detached), so that the backward pass and saved activations cover only the side that needs
  them (measured on CPU: the two-pass forward+backward takes 0.5–0.7× the time; see `_features`).
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.checkpoints.files import in_weights_dir, read_state_dict_file
from engine.errors import EngineError

__all__ = [
    "LPIPS", "VGG16_FILENAME", "VGG16_ENV", "LIN_ENV", "LIN_INSTALL",
    "default_vgg16_path", "bundled_lin_path", "load_vgg16_state_dict", "load_lin_state_dict",
    "random_vgg16_state_dict", "random_lin_state_dict",
]

VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1
VGG16_ENV = "ENGINE_VGG16_WEIGHTS"
LIN_ENV = "ENGINE_LPIPS_LIN_WEIGHTS"
LIN_INSTALL = "pip install --no-deps lpips==0.1.4"

SHIFT = (-0.030, -0.088, -0.188)  # docs/spec/cm.md §3.2 scaling layer
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10                       # lpips.normalize_tensor

# torchvision's vgg16().features, indices 0..29 (30, the last max-pool, is not used): "M" a 2×2 max-pool,
# an int a 3×3 conv (padding 1) with that many output channels followed by a ReLU.
_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# exclusive ends: after relu1_2 (3), relu2_2 (8), relu3_3 (15), relu4_3 (22), relu5_3 (29)
_SLICE_ENDS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_shapes() -> dict[str, tuple[int, ...]]:
    """Expected `features.*` keys and shapes of torchvision's VGG16, in layer order."""
    shapes, idx, c_in = {}, 0, 3
    for v in _CFG:
        if v == "M":
            idx += 1
            continue
        shapes[f"features.{idx}.weight"] = (v, c_in, 3, 3)
        shapes[f"features.{idx}.bias"] = (v,)
        idx, c_in = idx + 2, v  # conv, relu
    return shapes


def _lin_shapes() -> dict[str, tuple[int, ...]]:
    return {f"lin{l}.model.1.weight": (1, c, 1, 1) for l, c in enumerate(CHANNELS)}


# ---------------------------------------------------------------------------------------------------------------
# Locating and loading weights

def default_vgg16_path() -> str:
    """$ENGINE_VGG16_WEIGHTS, else vgg16-397923af.pth in the --weights directory, else torchvision's cache
    location of that file."""
    return (os.environ.get(VGG16_ENV) or in_weights_dir(VGG16_FILENAME)
            or os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILENAME))


def bundled_lin_path() -> str | None:
    """$ENGINE_LPIPS_LIN_WEIGHTS, else `lpips/weights/v0.1/vgg.pth` inside the installed lpips package (found with
    find_spec, which does not run lpips/__init__.py: that imports torchvision), else None."""
    if os.environ.get(LIN_ENV):
        return os.environ[LIN_ENV]
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "weights", "v0.1", "vgg.pth")
        if os.path.isfile(path):
            return path
    return None


def _check_state_dict(sd: dict, expected: dict[str, tuple[int, ...]], what: str, ignore_prefix: str | None = None):
    """Raise one error listing every missing, unexpected and wrongly shaped key."""
    if not isinstance(sd, dict):
        raise TypeError(f"{what}: expected a state dict (dict of tensors), got {type(sd).__name__}")
    keys = [k for k in sd if not (ignore_prefix and k.startswith(ignore_prefix))]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in keys if k not in expected]
    bad = [f"{k}: {tuple(sd[k].shape) if torch.is_tensor(sd[k]) else type(sd[k]).__name__} "
           f"(expected {expected[k]})"
           for k in expected if k in sd and not (torch.is_tensor(sd[k]) and sd[k].is_floating_point()
                                                and tuple(sd[k].shape) == expected[k])]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if bad:
            parts.append(f"wrong shapes/dtypes {bad}")
        raise EngineError(f"{what}: " + "; ".join(parts))


def _load(path: str) -> dict:
    # mmap avoids reading the 400 MB classifier of the VGG file (engine/checkpoints/files.py read_state_dict_file)
    return read_state_dict_file(path, mmap=True)


def load_vgg16_state_dict(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The 26 `features.*` tensors (float32) of torchvision's ImageNet VGG16, validated; `classifier.*` dropped."""
    path = os.fspath(path) if path is not None else default_vgg16_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VGG16 ImageNet weights for LPIPS not found at {path!r}. LPIPS needs torchvision's {VGG16_FILENAME} "
            f"(https://download.pytorch.org/models/{VGG16_FILENAME}, 528 MB). Put it at "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints', VGG16_FILENAME)!r} (where torchvision caches it), "
            f"or set ${VGG16_ENV} to its path, or pass vgg_path=.")
    sd = _load(path)
    expected = _vgg16_shapes()
    _check_state_dict(sd, expected, f"VGG16 weights {path!r}", ignore_prefix="classifier.")
    return {k: sd[k].to(torch.float32) for k in expected}


def load_lin_state_dict(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The five LPIPS v0.1 VGG heads `lin{l}.model.1.weight` [1, C, 1, 1] (float32), validated."""
    path = os.fspath(path) if path is not None else bundled_lin_path()
    if path is None or not os.path.isfile(path):
        where = f"not found at {path!r}" if path is not None else "not found (the lpips package is not installed)"
        raise FileNotFoundError(
            f"LPIPS linear-head weights (lpips/weights/v0.1/vgg.pth) {where}. Install them with "
            f"`{LIN_INSTALL}` (no dependencies: only the bundled weights file is used), or set ${LIN_ENV} to the "
            f"path of vgg.pth, or pass lin_path=.")
    sd = _load(path)
    expected = _lin_shapes()
    _check_state_dict(sd, expected, f"LPIPS linear heads {path!r}")
    return {k: sd[k].to(torch.float32) for k in expected}


def random_vgg16_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random trunk in torchvision's layout, for tests: He-normal weights (fan-in, keeping activations O(1)
    through the 13 ReLU layers) and small random biases."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in _vgg16_shapes().items():
        if k.endswith("weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.1
    return sd


def random_lin_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random non-negative heads (like the trained ones), for tests."""
    g = torch.Generator().manual_seed(seed + 1)
    return {k: torch.rand(shape, generator=g) for k, shape in _lin_shapes().items()}


# ---------------------------------------------------------------------------------------------------------------

class LPIPS(nn.Module):
    """d = LPIPS()(x, y): per-image LPIPS distance [N] (or [N, 1, 1, 1] with keepdim=True) of images in [−1, 1].

    LPIPS()                                  ImageNet VGG16 from a local file + the lpips package's heads
    LPIPS(vgg_path=..., lin_path=...)        explicit files
    LPIPS(vgg_state_dict=sd, lin_state_dict=sd2)   in-memory weights (torchvision / lpips key layouts)
    LPIPS.random(seed)                       random trunk and heads, no file needed (tests)
    """

    def __init__(self, vgg_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None, *,
                 vgg_state_dict: dict | None = None, lin_state_dict: dict | None = None):
        super().__init__()
        if vgg_state_dict is None:
            vgg_state_dict = load_vgg16_state_dict(vgg_path)
        else:
            _check_state_dict(vgg_state_dict, _vgg16_shapes(), "vgg_state_dict", ignore_prefix="classifier.")
        if lin_state_dict is None:
            lin_state_dict = load_lin_state_dict(lin_path)
        else:
            _check_state_dict(lin_state_dict, _lin_shapes(), "lin_state_dict")

        layers, c_in = [], 3
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)  # keys features.{i}.weight/bias as in torchvision
        self.lins = nn.ParameterList([nn.Parameter(torch.empty(c)) for c in CHANNELS])  # head l: [C_l]
        # float64 so that float64 inputs see the spec's decimals (lpips keeps float32 ones: its float64 results
        # differ from ours by ~1e−8 relative); cast to the compute dtype in forward.
        self.register_buffer("shift", torch.tensor(SHIFT, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE, dtype=torch.float64).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            for k, t in vgg_state_dict.items():
                if k.startswith("features."):
                    self.get_parameter(k).copy_(t)
            for l in range(len(CHANNELS)):
                self.lins[l].copy_(lin_state_dict[f"lin{l}.model.1.weight"].reshape(-1))
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def random(cls, seed: int = 0, lin_state_dict: dict | None = None) -> "LPIPS":
        """Random VGG16 trunk (and random non-negative heads unless `lin_state_dict` is given)."""
        return cls(vgg_state_dict=random_vgg16_state_dict(seed),
                   lin_state_dict=lin_state_dict if lin_state_dict is not None else random_lin_state_dict(seed))

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval (docs/spec/cm.md §3.2: lpips is built with eval_mode=True)

    def _trunk(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped activations of scaled images z [B, 3, H, W]."""
        # Under autocast F.conv2d casts the weights itself, except for float64 inputs, which autocast leaves alone.
        cast = z.dtype == torch.float64 or not torch.is_autocast_enabled(z.device.type)
        outs, h, start = [], z, 0
        for end in _SLICE_ENDS:
            for layer in self.features[start:end]:
                if isinstance(layer, nn.Conv2d):
                    w, b = layer.weight, layer.bias
                    if cast:
                        w, b = w.to(h.dtype), b.to(h.dtype)
                    h = F.conv2d(h, w, b, padding=1)
                elif isinstance(layer, nn.ReLU):
                    h = F.relu(h, inplace=True)  # the conv output is not saved for backward
                else:
                    h = F.max_pool2d(h, 2, 2)
            outs.append(h)
            start = end
        return outs

    def _features(self, zx: torch.Tensor, zy: torch.Tensor):
        # One pass over the concatenation is the cheapest when both sides (or neither) need gradients. When only
        # one does (the student output vs a detached target), a single pass would run the input-gradient convs
        # and keep activations for the target half too; two passes skip that. Measured on a shared 2-core CPU,
        # 32×32, batch 32 per side, best of 6: forward+backward with two passes takes 0.5–0.7× the time of one
        # concatenated pass; forward only, the two are within 10%. (Not measured on a GPU.)
        if zx.requires_grad == zy.requires_grad:
            both = self._trunk(torch.cat([zx, zy]))
            n = zx.shape[0]
            return [f[:n] for f in both], [f[n:] for f in both]
        return self._trunk(zx), self._trunk(zy)

    def forward(self, x: torch.Tensor, y: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise EngineError(f"LPIPS expects two [N, 3 or 1, H, W] images of the same shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[2:]) < 16:
            raise EngineError(f"LPIPS (VGG16, 4 max-pools before relu5_3) needs H, W >= 16, got {tuple(x.shape[2:])}")
        if not (x.is_floating_point() and y.is_floating_point()):
            raise TypeError(f"LPIPS expects floating-point images, got {x.dtype} and {y.dtype}")
        dtype = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(dtype), y.to(dtype)
        if x.shape[1] == 1:  # grey images (digits): the RGB image (g, g, g)
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        shift, scale = self.shift.to(dtype), self.scale.to(dtype)
        fx, fy = self._features((x - shift) / scale, (y - shift) / scale)

        # Normalisation and heads in float32 (float64 for float64 inputs), autocast off: see the module docstring.
        out_dtype = torch.promote_types(dtype, torch.float32)
        with ops.autocast_off(x.device):
            total = 0
            for a, b, w in zip(fx, fy, self.lins):
                a, b = a.to(out_dtype), b.to(out_dtype)
                a = a / (a.square().sum(1, keepdim=True).sqrt() + EPS)
                b = b / (b.square().sum(1, keepdim=True).sqrt() + EPS)
                total = total + (a - b).square().mean((2, 3)) @ w.to(out_dtype)  # [N]
        return total.view(-1, 1, 1, 1) if keepdim else total
