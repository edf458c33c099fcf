"""The Inception-v3 feature network of FID: TensorFlow's `inception-2015-12-05` graph as NVIDIA's detector runs
it (spec/cm.md §7, edm2_latent.md §5.1) — 2048-d pool features of uint8 RGB images of any size.

Implemented here, so no pickled or scripted code is executed for the forward pass; weights are read from the
files users already have:

  * `inception-2015-12-05.pt`, NVIDIA's TorchScript detector (EDM / StyleGAN2-ADA / CMT metrics). Only its
    tensors are read: `layers.<unit>.{weight, beta, mean, var}` for each conv + batch-norm unit (TF's batch norm
    has no scale) and `output.{weight, bias}` (1008 classes). Our module uses the same names.
  * `pt_inception-2015-12-05-6726825d.pth`, pytorch-fid's state dict of the same TF weights in torchvision's
    naming (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, …, `fc.weight`), mapped to ours;
    a batch-norm scale other than 1 is folded into the conv weight.

Input handling follows NVIDIA's detector: uint8 [N, 3, H, W] (1 channel is repeated), resized to 299×299 with
`grid_sample` (bilinear, border padding) on the affine grid it builds — identity plus a shift of 1/W − 1/299
(1/H − 1/299) in normalised coordinates, which reproduces TF1's `resize_bilinear` sampling — then scaled as
(x − 127.5)/127.5. Features are the 8×8 average pool of the last mixed block, float32.

    net = InceptionV3.from_file("inception-2015-12-05.pt")   # or the pytorch-fid .pth
    features = net(images_uint8)                              # [N, 2048]
"""
from __future__ import annotations

import os
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoints import mismatch_summary, weights_file
from engine.metrics.detector_input import uint8_rgb

DETECTOR_FILES = ("inception-2015-12-05.pt", "pt_inception-2015-12-05-6726825d.pth")
WHERE = ("pass its path (--inception), or set ENGINE_INCEPTION_WEIGHTS; the TorchScript file is "
         "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt")


class ConvUnit(nn.Module):
    """TF's conv + batch norm (no scale, ε = 0.001) + ReLU, with NVIDIA's tensor names."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        self.weight = nn.Parameter(torch.zeros(cout, cin, *k))
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))
        self.stride, self.padding = stride, padding

    def forward(self, x):
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, training=False, eps=1e-3)
        return F.relu(x)


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Seq(nn.Sequential):
    pass


class BlockA(nn.Module):  # 35×35: TF mixed, mixed_1, mixed_2
    def __init__(self, cin, pool_features):
        super().__init__()
        self.conv = ConvUnit(cin, 64, 1)
        self.tower = _Seq()
        self.tower.add_module("conv", ConvUnit(cin, 48, 1))
        self.tower.add_module("conv_1", ConvUnit(48, 64, 5, padding=2))
        self.tower_1 = _Seq()
        self.tower_1.add_module("conv", ConvUnit(cin, 64, 1))
        self.tower_1.add_module("conv_1", ConvUnit(64, 96, 3, padding=1))
        self.tower_1.add_module("conv_2", ConvUnit(96, 96, 3, padding=1))
        self.tower_2 = _Seq()
        self.tower_2.add_module("conv", ConvUnit(cin, pool_features, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class BlockB(nn.Module):  # 35 → 17: mixed_3
    def __init__(self, cin):
        super().__init__()
        self.conv = ConvUnit(cin, 384, 3, stride=2)
        self.tower = _Seq()
        self.tower.add_module("conv", ConvUnit(cin, 64, 1))
        self.tower.add_module("conv_1", ConvUnit(64, 96, 3, padding=1))
        self.tower.add_module("conv_2", ConvUnit(96, 96, 3, stride=2))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):  # 17×17: mixed_4 … mixed_7
    def __init__(self, cin, c7):
        super().__init__()
        self.conv = ConvUnit(cin, 192, 1)
        self.tower = _Seq()
        self.tower.add_module("conv", ConvUnit(cin, c7, 1))
        self.tower.add_module("conv_1", ConvUnit(c7, c7, (1, 7), padding=(0, 3)))
        self.tower.add_module("conv_2", ConvUnit(c7, 192, (7, 1), padding=(3, 0)))
        self.tower_1 = _Seq()
        self.tower_1.add_module("conv", ConvUnit(cin, c7, 1))
        self.tower_1.add_module("conv_1", ConvUnit(c7, c7, (7, 1), padding=(3, 0)))
        self.tower_1.add_module("conv_2", ConvUnit(c7, c7, (1, 7), padding=(0, 3)))
        self.tower_1.add_module("conv_3", ConvUnit(c7, c7, (7, 1), padding=(3, 0)))
        self.tower_1.add_module("conv_4", ConvUnit(c7, 192, (1, 7), padding=(0, 3)))
        self.tower_2 = _Seq()
        self.tower_2.add_module("conv", ConvUnit(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class BlockD(nn.Module):  # 17 → 8: mixed_8
    def __init__(self, cin):
        super().__init__()
        self.tower = _Seq()
        self.tower.add_module("conv", ConvUnit(cin, 192, 1))
        self.tower.add_module("conv_1", ConvUnit(192, 320, 3, stride=2))
        self.tower_1 = _Seq()
        self.tower_1.add_module("conv", ConvUnit(cin, 192, 1))
        self.tower_1.add_module("conv_1", ConvUnit(192, 192, (1, 7), padding=(0, 3)))
        self.tower_1.add_module("conv_2", ConvUnit(192, 192, (7, 1), padding=(3, 0)))
        self.tower_1.add_module("conv_3", ConvUnit(192, 192, 3, stride=2))

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):  # 8×8: mixed_9 (average-pool branch), mixed_10 (max-pool branch, as TF's graph)
    def __init__(self, cin, pool: str):
        super().__init__()
        self.pool = pool
        self.conv = ConvUnit(cin, 320, 1)
        self.tower_conv = ConvUnit(cin, 384, 1)
        self.tower_mixed_conv = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvUnit(cin, 448, 1)
        self.tower_1_conv_1 = ConvUnit(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = ConvUnit(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)], 1)


class _Stem(nn.Module):
    """NVIDIA's `layers`: the stem and the eleven mixed blocks, named as in its TorchScript."""

    def __init__(self):
        super().__init__()
        self.conv = ConvUnit(3, 32, 3, stride=2)
        self.conv_1 = ConvUnit(32, 32, 3)
        self.conv_2 = ConvUnit(32, 64, 3, padding=1)
        self.conv_3 = ConvUnit(64, 80, 1)
        self.conv_4 = ConvUnit(80, 192, 3)
        self.mixed = BlockA(192, 32)
        self.mixed_1 = BlockA(256, 64)
        self.mixed_2 = BlockA(288, 64)
        self.mixed_3 = BlockB(288)
        self.mixed_4 = BlockC(768, 128)
        self.mixed_5 = BlockC(768, 160)
        self.mixed_6 = BlockC(768, 160)
        self.mixed_7 = BlockC(768, 192)
        self.mixed_8 = BlockD(768)
        self.mixed_9 = BlockE(1280, "avg")
        self.mixed_10 = BlockE(2048, "max")

    def forward(self, x):
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.conv_4(self.conv_3(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7",
                     "mixed_8", "mixed_9", "mixed_10"):
            x = getattr(self, name)(x)
        return F.avg_pool2d(x, 8)  # 8×8 → 1×1: the pool_3 features


class InceptionV3(nn.Module):
    """`net(images_uint8) -> [N, 2048]` pool features (float32); `net.logits(images)` the 1008-way logits."""

    feature_dim = 2048

    def __init__(self):
        super().__init__()
        self.layers = _Stem()
        self.output = nn.Linear(2048, 1008)
        self.eval().requires_grad_(False)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] → float [N, 3, 299, 299] scaled to [−1, 1], resized as NVIDIA's detector does."""
        images = uint8_rgb(images, "FID")
        n, c, h, w = images.shape
        x = images.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return (x - 127.5) / 127.5

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.preprocess(images)).reshape(-1, 2048).to(torch.float32)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.output(self.forward(images))

    # ---- weights ----------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path=None) -> "InceptionV3":
        path = weights_file(path, "ENGINE_INCEPTION_WEIGHTS", f"FID needs the Inception-v3 weights "
                            f"({' or '.join(DETECTOR_FILES)})", WHERE)
        net = cls()
        net.load_state_dict(read_inception_state(path), strict=True)
        return net


def _pytorch_fid_names() -> dict[str, str]:
    """pytorch-fid / torchvision name of each of our conv units (prefix of .conv.weight, .bn.*)."""
    m = {"layers.conv": "Conv2d_1a_3x3", "layers.conv_1": "Conv2d_2a_3x3", "layers.conv_2": "Conv2d_2b_3x3",
         "layers.conv_3": "Conv2d_3b_1x1", "layers.conv_4": "Conv2d_4a_3x3"}
    for ours, tv in (("mixed", "Mixed_5b"), ("mixed_1", "Mixed_5c"), ("mixed_2", "Mixed_5d")):
        m.update({f"layers.{ours}.conv": f"{tv}.branch1x1", f"layers.{ours}.tower.conv": f"{tv}.branch5x5_1",
                  f"layers.{ours}.tower.conv_1": f"{tv}.branch5x5_2",
                  f"layers.{ours}.tower_1.conv": f"{tv}.branch3x3dbl_1",
                  f"layers.{ours}.tower_1.conv_1": f"{tv}.branch3x3dbl_2",
                  f"layers.{ours}.tower_1.conv_2": f"{tv}.branch3x3dbl_3",
                  f"layers.{ours}.tower_2.conv": f"{tv}.branch_pool"})
    m.update({"layers.mixed_3.conv": "Mixed_6a.branch3x3", "layers.mixed_3.tower.conv": "Mixed_6a.branch3x3dbl_1",
              "layers.mixed_3.tower.conv_1": "Mixed_6a.branch3x3dbl_2",
              "layers.mixed_3.tower.conv_2": "Mixed_6a.branch3x3dbl_3"})
    for ours, tv in (("mixed_4", "Mixed_6b"), ("mixed_5", "Mixed_6c"), ("mixed_6", "Mixed_6d"),
                     ("mixed_7", "Mixed_6e")):
        m.update({f"layers.{ours}.conv": f"{tv}.branch1x1", f"layers.{ours}.tower_2.conv": f"{tv}.branch_pool"})
        for i in range(3):
            m[f"layers.{ours}.tower.conv{'' if i == 0 else f'_{i}'}"] = f"{tv}.branch7x7_{i + 1}"
        for i in range(5):
            m[f"layers.{ours}.tower_1.conv{'' if i == 0 else f'_{i}'}"] = f"{tv}.branch7x7dbl_{i + 1}"
    m.update({"layers.mixed_8.tower.conv": "Mixed_7a.branch3x3_1", "layers.mixed_8.tower.conv_1": "Mixed_7a.branch3x3_2",
              "layers.mixed_8.tower_1.conv": "Mixed_7a.branch7x7x3_1",
              "layers.mixed_8.tower_1.conv_1": "Mixed_7a.branch7x7x3_2",
              "layers.mixed_8.tower_1.conv_2": "Mixed_7a.branch7x7x3_3",
              "layers.mixed_8.tower_1.conv_3": "Mixed_7a.branch7x7x3_4"})
    for ours, tv in (("mixed_9", "Mixed_7b"), ("mixed_10", "Mixed_7c")):
        m.update({f"layers.{ours}.conv": f"{tv}.branch1x1", f"layers.{ours}.tower_conv": f"{tv}.branch3x3_1",
                  f"layers.{ours}.tower_mixed_conv": f"{tv}.branch3x3_2a",
                  f"layers.{ours}.tower_mixed_conv_1": f"{tv}.branch3x3_2b",
                  f"layers.{ours}.tower_1_conv": f"{tv}.branch3x3dbl_1",
                  f"layers.{ours}.tower_1_conv_1": f"{tv}.branch3x3dbl_2",
                  f"layers.{ours}.tower_1_mixed_conv": f"{tv}.branch3x3dbl_3a",
                  f"layers.{ours}.tower_1_mixed_conv_1": f"{tv}.branch3x3dbl_3b",
                  f"layers.{ours}.tower_2_conv": f"{tv}.branch_pool"})
    return m


PYTORCH_FID_NAMES = _pytorch_fid_names()


def from_pytorch_fid(state: dict) -> dict[str, torch.Tensor]:
    """pytorch-fid's FID Inception state dict → ours. gamma (bn.weight) is folded into the conv weight."""
    out = {}
    missing = []
    for ours, tv in PYTORCH_FID_NAMES.items():
        try:
            w, gamma = state[f"{tv}.conv.weight"], state.get(f"{tv}.bn.weight")
            out[f"{ours}.weight"] = w if gamma is None else w * gamma.reshape(-1, 1, 1, 1)
            out[f"{ours}.beta"] = state[f"{tv}.bn.bias"]
            out[f"{ours}.mean"] = state[f"{tv}.bn.running_mean"]
            out[f"{ours}.var"] = state[f"{tv}.bn.running_var"]
        except KeyError as e:
            missing.append(str(e))
    if "fc.weight" not in state or "fc.bias" not in state:
        missing.append("fc.weight / fc.bias")
    if missing:
        raise ValueError(f"not pytorch-fid's Inception state dict: missing {', '.join(missing[:5])}"
                         f"{' …' if len(missing) > 5 else ''}")
    out["output.weight"], out["output.bias"] = state["fc.weight"], state["fc.bias"]
    if out["output.weight"].shape != (1008, 2048):
        raise ValueError(f"fc.weight is {tuple(out['output.weight'].shape)}, the FID Inception's is (1008, 2048) "
                         f"(torchvision's ImageNet Inception has 1000 classes and different weights)")
    return out


def read_inception_state(path) -> dict[str, torch.Tensor]:
    """The detector's tensors from NVIDIA's TorchScript `.pt` or pytorch-fid's `.pth`, in our names, checked
    against our architecture (names and shapes)."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a PyTorch file (a zip archive); expected {' or '.join(DETECTOR_FILES)}")
    with zipfile.ZipFile(path) as z:
        scripted = any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    if scripted:
        # A TorchScript archive: read its tensors only (its scripted forward is not used).
        state = {k: v.detach().float() for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        state = from_pytorch_fid(state) if "Conv2d_1a_3x3.conv.weight" in state else state
    expected = InceptionV3().state_dict()
    problems = mismatch_summary(expected, state)
    if problems:
        raise ValueError(f"{path} is not the inception-2015-12-05 detector: {problems}")
    return {k: state[k].float() for k in expected}
