"""Test helper: the FID Inception detector's weight files in their published layouts, with random weights.

* NVIDIA's TorchScript `inception-2015-12-05.pt`: a scripted module whose `layers` / `output` hold the tensors
  under NVIDIA's names and whose own forward is written here after the decompiled forward of NVIDIA's file
  (engine/metrics/inception.py describes it): shifted affine grid, `grid_sample(bilinear, border,
  align_corners=False)`, `sub_(offset).div_(scale)`. The constants are parameters of the writer so that tests
  can write detectors that preprocess differently; the class is generated into a file because TorchScript
  compiles a class from its source.
* NVIDIA's persistent-class pickle `inception-2015-12-05.pkl`: `torch_utils.persistence` records (through
  tests/edm_pickle_writer.py) whose `module_src` carries a forward of the same shape and a canary that leaves a
  file behind if anyone executes it; or a record carrying a TorchScript archive as bytes.
* pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`: torchvision names with a batch-norm scale γ.
"""
from __future__ import annotations

import importlib.util
import io
import os

import torch
from edm_pickle_writer import Persistent, _layer_record, write_pickle

from engine.metrics.inception import InceptionV3
from engine.metrics.inception_files import PYTORCH_FID_NAMES

FORWARD_TEMPLATE = '''
import torch
import torch.nn.functional as F
from torch import nn


class NvidiaLikeDetector(nn.Module):
    def __init__(self, layers, output):
        super().__init__()
        self.layers = layers
        self.output = output

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        batch_size, channels, height, width = img.shape
        x = img.to(torch.float16 if use_fp16 else torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
        grid = F.affine_grid(theta, [batch_size, channels, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="{mode}", padding_mode="{padding}", align_corners=False)
        x = x.sub_({offset}).div_({scale})
        features = self.layers(x).reshape(-1, 2048).to(torch.float32)
        if return_features:
            return features
        return torch.softmax(self.output(features), 1)
'''


def random_inception(seed=0, mean_scale=0.1) -> InceptionV3:
    """He-initialised convolutions, batch-norm variances in [0.5, 1.5), non-zero means and offsets."""
    g = torch.Generator().manual_seed(seed)
    net = InceptionV3()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith(".var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(".weight") and t.ndim == 4:
                t.copy_(torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5)
            elif name.endswith(".mean"):
                t.copy_(torch.randn(t.shape, generator=g) * mean_scale)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return net


def _detector_class(directory, mode, padding, offset, scale):
    tag = f"{mode}_{padding}_{offset}_{scale}".replace(".", "p").replace("-", "m")
    path = os.path.join(directory, f"nvidia_like_{tag}.py")
    with open(path, "w") as f:
        f.write(FORWARD_TEMPLATE.format(mode=mode, padding=padding, offset=offset, scale=scale))
    spec = importlib.util.spec_from_file_location(f"nvidia_like_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NvidiaLikeDetector


def torchscript_bytes(net: InceptionV3, workdir, *, mode="bilinear", padding="border", offset="128",
                      scale="128") -> bytes:
    """NVIDIA's TorchScript layout: scripted forward with the given preprocessing, `layers` traced from `net`."""
    cls = _detector_class(workdir, mode, padding, offset, scale)
    layers = torch.jit.trace(net.layers, torch.zeros(1, 3, 299, 299))
    scripted = torch.jit.script(cls(layers, net.output))
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    return buf.getvalue()


def write_torchscript(net: InceptionV3, path, **preprocessing) -> str:
    with open(path, "wb") as f:
        f.write(torchscript_bytes(net, os.path.dirname(os.fspath(path)), **preprocessing))
    return os.fspath(path)


def module_src(marker_path, offset="128", scale="128") -> str:
    """A defining module's source as NVIDIA's pickle would embed it: the forward's text, and a canary."""
    return (f'with open({str(marker_path)!r}, "w") as f:\n    f.write("module_src was executed")\n'
            'raise RuntimeError("module_src was executed")\n'
            + FORWARD_TEMPLATE.format(mode="bilinear", padding="border", offset=offset, scale=scale))


def write_persistent_pickle(net: InceptionV3, path, src: str) -> str:
    """The detector as a persistent-class record tree with NVIDIA's tensor names."""
    write_pickle(_layer_record(net, src, params_require_grad=False), path)
    return os.fspath(path)


def write_pickle_with_torchscript(net: InceptionV3, path, src: str) -> str:
    """A persistent record that carries the TorchScript archive as bytes (no tensors of its own)."""
    state = dict(training=False, _parameters={}, _buffers={}, _modules={},
                 script=torchscript_bytes(net, os.path.dirname(os.fspath(path))), _init_args=(), _init_kwargs={})
    write_pickle(Persistent("InceptionDetector", state, src), path)
    return os.fspath(path)


def pytorch_fid_state(net: InceptionV3, seed=2, gamma_range=(0.5, 1.5), negative=False) -> dict:
    """pytorch-fid's layout of random weights with a batch-norm scale γ (torchvision: γ(c − m)/√(v + ε) + β).
    The tensors are independent of `net`'s, except their shapes and the classifier; `negative` gives half the
    channels a negative γ."""
    g = torch.Generator().manual_seed(seed)
    ours = net.state_dict()
    lo, hi = gamma_range
    pf = {"fc.weight": ours["output.weight"].clone(), "fc.bias": ours["output.bias"].clone()}
    for unit, tv in PYTORCH_FID_NAMES.items():
        c = ours[f"{unit}.beta"].shape[0]
        gamma = torch.rand(c, generator=g) * (hi - lo) + lo
        if negative:
            gamma[::2] = -gamma[::2]
        pf[f"{tv}.conv.weight"] = ours[f"{unit}.weight"].clone()
        pf[f"{tv}.bn.weight"] = gamma
        pf[f"{tv}.bn.bias"] = torch.randn(c, generator=g) * 0.1
        pf[f"{tv}.bn.running_mean"] = torch.randn(c, generator=g) * 0.5
        pf[f"{tv}.bn.running_var"] = torch.rand(c, generator=g) + 0.5
    return pf
