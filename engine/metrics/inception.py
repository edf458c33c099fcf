"""The Inception-v3 feature network of FID: TensorFlow's `inception-2015-12-05` graph as NVIDIA's detector runs
it (docs/spec/cm.md §7, docs/spec/edm2_latent.md §5.1) — 2048-d pool features of uint8 RGB images of any size.

Implemented here, so no pickled or scripted code is executed for the forward pass; the weights come from the
files users already have, read by `engine/metrics/inception_files.py`: NVIDIA's TorchScript
`inception-2015-12-05.pt` (StyleGAN2-ADA lineage: ECT, CMT), the same network as NVIDIA's persistent-class
pickle `inception-2015-12-05.pkl` (EDM `fid.py`, EDM2), and pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.
All three hold the same TensorFlow weights; our module uses NVIDIA's tensor names
(`layers.<unit>.{weight, beta, mean, var}`, `output.{weight, bias}`).

Preprocessing (the *protocol*) is a setting of the detector, not of the file, so a FID does not depend on which
file the user has:

  * "nvidia" (default; every FID the papers report): NVIDIA's decompiled forward — `grid_sample` (bilinear,
    border padding, align_corners=False) on its own affine grid, the identity plus a shift of 1/W − 1/299
    (1/H − 1/299) in normalised coordinates, which reproduces TF1's `resize_bilinear` (source pixel
    i·W/299) — then (x − 128)/128. Checked against the code inside NVIDIA's files when they carry code.
  * "pytorch-fid": pytorch-fid's `InceptionV3.forward` — x/255, `F.interpolate(bilinear, align_corners=False)`
    to 299×299, then 2x − 1 — for comparing with numbers reported by pytorch-fid users.

Features are the 8×8 average pool of the last mixed block, float32.

    net = InceptionV3.from_file("inception-2015-12-05.pt")          # or the .pkl, or pytorch-fid's .pth
    features = net(images_uint8)                                     # [N, 2048]
    net.describe()   # file, SHA-256, layout, preprocessing: what report.json and statistics files record
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoints.files import weights_file
from engine.checkpoints.state_dicts import mismatch_summary
from engine.metrics.detector_input import uint8_rgb
from engine.metrics.fid_preprocessing import NVIDIA, PYTORCH_FID, Preprocessing, fid_preprocessing
from engine.metrics.inception_files import DETECTOR_FILES, read_inception_file

__all__ = ["InceptionV3", "ConvUnit", "read_inception_state", "checked_state", "Preprocessing", "NVIDIA", "PYTORCH_FID",
           "fid_preprocessing", "DETECTOR_FILES"]

WHERE = ("pass its path (--inception), or set ENGINE_INCEPTION_WEIGHTS; NVIDIA's files are "
         "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt and "
         "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/"
         "inception-2015-12-05.pkl")


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
    """`net(images_uint8) -> [N, 2048]` pool features (float32); `net.logits(images)` the 1008-way logits.

    preprocessing: "nvidia" (default) or "pytorch-fid" (see the module docstring)."""

    feature_dim = 2048

    def __init__(self, preprocessing: str = "nvidia"):
        super().__init__()
        self.layers = _Stem()
        self.output = nn.Linear(2048, 1008)
        self.preprocessing = fid_preprocessing(preprocessing)
        self.source: dict = {}   # set by from_file: file, sha256, layout, what its code was checked against
        self.eval().requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] → float [N, 3, 299, 299] as this detector's protocol prescribes."""
        return self.preprocessing.apply(uint8_rgb(images, "FID"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.preprocess(images)).reshape(-1, 2048).to(torch.float32)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.output(self.forward(images))

    def describe(self) -> dict:
        """What a FID computed with this detector depends on (report.json, statistics files, results.json)."""
        return {**self.source, "preprocessing": self.preprocessing.name, "resize": self.preprocessing.resize,
                "scaling": self.preprocessing.scaling}

    @classmethod
    def from_file(cls, path=None, preprocessing: str = "nvidia") -> "InceptionV3":
        """The detector from NVIDIA's `.pt` / `.pkl` or pytorch-fid's `.pth` (path, else ENGINE_INCEPTION_WEIGHTS).
        A file whose own code preprocesses differently from NVIDIA's is refused (inception_files.py)."""
        path = weights_file(path, "ENGINE_INCEPTION_WEIGHTS", f"FID needs the Inception-v3 weights "
                            f"({' or '.join(DETECTOR_FILES)})", WHERE, names=DETECTOR_FILES)
        found = read_inception_file(path)
        net = cls(preprocessing)
        net.load_state_dict(checked_state(found.file, found.state), strict=True)
        net.source = found.record()
        return net


def checked_state(path, state: dict) -> dict[str, torch.Tensor]:
    """`state` in float32 if its names and shapes are the detector's; ValueError naming the misfits otherwise."""
    expected = InceptionV3().state_dict()
    problems = mismatch_summary(expected, state)
    if problems:
        raise ValueError(f"{path} is not the inception-2015-12-05 detector: {problems}")
    return {k: state[k].float() for k in expected}


def read_inception_state(path) -> dict[str, torch.Tensor]:
    """The detector's tensors in our names from any of its files, checked against the architecture."""
    found = read_inception_file(path)
    return checked_state(found.file, found.state)
