"""E-LatentLPIPS: an LPIPS-style distance on VAE latents with a VGG-16 trunk trained on latents, ensembled over a
random joint augmentation (docs/spec/edm2_latent.md §6).

    m = ELatentLPIPS(vgg_path="latent_vgg16.safetensors")          # the variant CMT uses at ImageNet-512 (§6.3)
    d = m(student_latents, target_latents)                           # [N], one random transform per sample

Variants (`variant=`):
  * 'cmt' (default; SNU-VGILab/e-latentlpips `ELatentLPIPS2` as sony/cmt `imagenet512/` uses it): the trunk
    `LatentVGG` (engine/networks/latent_vgg.py; VGG16_Latent_GN: 4→64 … 512, GroupNorm(32) after every convolution, only
    two max-pools), taps
    before the pools (relu1_2, relu2_2, relu3_3 at 64², relu4_3 at 32², relu5_3 at 16² for 64² latents), unit
    channel weights, no L1 term, EDM2's final latents as they are; augmentation 'bgcfnc' with one noise tensor
    for both arguments and the reference's 4-channel colour matrix.
  * 'official' (mingukkang/elatentlpips, §6.2): torchvision's vgg16_bn with a 4-channel first convolution and its
    first three pools removed, taps after the remaining pools, linear heads `lin{k}.model.1.weight`, an L1 term
    mean|x − y| added (computed before the augmentation), augmentation 'bg' with independent noise.

d = Σ_k mean_{h,w} Σ_c w_{k,c}(φ̂_k(x) − φ̂_k(y))², φ̂ = φ/sqrt(Σ_c φ² + 1e-8) (§6.1). The trunk is frozen; gradients
reach the first argument through the augmentation and the trunk. The augmentation draws its parameters from the
step's random stream, which the objectives pin around their distance call (engine/networks/dropout.py
`step_stream`): runs replay on resume and a pair's transform does not depend on the world size. Outside one it
draws from the process's generator (seeded inside a `dropout_generator` block).

Weights: `vgg_path` is a plain state dict (`.safetensors` or `.pt`) with `LatentVGG`'s names —
`features.{0,3,…,38}` convolutions, `features.{1,4,…,39}` GroupNorms, `classifier.{0,3,6}` (§6.5), which is what
recipes/imagenet512_latent_vgg.py writes; `convert_reference_checkpoint` turns the reference's
`torch.save({'model': <module>, ...})` file into one with the restricted unpickler, without running it.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from engine.checkpoints.files import CheckpointError, read_state_dict_file, weights_file
from engine.checkpoints.state_dicts import load_network_state
from engine.errors import EngineError
from engine.networks.dropout import pinned_stream
from engine.networks.latent_vgg import LatentVGG, vgg_layers
from engine.perceptual.augment import JointAugment

__all__ = ["ELatentLPIPS", "CMT_TAPS", "read_vgg_state", "convert_reference_checkpoint",
           "LATENT_VGG_FILE"]

LATENT_VGG_FILE = "latent_vgg16.safetensors"
WHERE = ("train it with recipes/imagenet512_latent_vgg.py (its output), or convert the CMT authors' checkpoint with "
         "engine.perceptual.elatentlpips.convert_reference_checkpoint; pass vgg_path=, set ENGINE_LATENT_VGG_WEIGHTS")
CMT_TAPS = ((0, 6), (6, 12), (12, 21), (21, 31), (31, 41))            # slices of `features` (§6.3)
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_OFFICIAL_TAPS = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 44))      # §6.2 (after features[6, 13, 23] → identity)
_OFFICIAL_REMOVED_POOLS = (6, 13, 23)


def _official_trunk(in_channels: int) -> nn.Sequential:
    """torchvision's vgg16_bn features with a latent first convolution and the first three pools removed (§6.2)."""
    f = vgg_layers(_VGG16_CFG, in_channels, "batch")
    for i in _OFFICIAL_REMOVED_POOLS:
        f[i] = nn.Identity()
    return f


def read_vgg_state(path) -> dict[str, torch.Tensor]:
    """A trunk state dict from `.safetensors` or a `torch.save` state dict (an official `*.pth.tar` with
    `state_dict` under 'module.' names is unwrapped)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        state = read_state_dict_file(path)
    except EngineError as e:   # a full-module pickle, or not a checkpoint at all
        raise CheckpointError(f"{e}; a CMT full-module checkpoint needs "
                              "engine.perceptual.elatentlpips.convert_reference_checkpoint first") from None
    if "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


class ELatentLPIPS(nn.Module):
    """`m(x, y) -> [N]` (module docstring). `augment`: None, a JointAugment pipeline name ('bgcfnc', 'bg', ...) or
    'default' (the variant's); `color_matrix` / `shared_noise` as JointAugment's (defaults: the variant's)."""

    def __init__(self, vgg_path=None, augment="default", variant: str = "cmt", *, vgg_state_dict: dict | None = None,
                 lin_state_dict: dict | None = None, color_matrix: str | None = None,
                 shared_noise: bool | None = None, l1: bool | None = None, in_channels: int = 4):
        super().__init__()
        if variant not in ("cmt", "official"):
            raise EngineError(f"ELatentLPIPS: variant must be 'cmt' or 'official', got {variant!r}")
        self.variant = variant
        if variant == "cmt":
            trunk, taps, widths = LatentVGG(in_channels).features, CMT_TAPS, (64, 128, 256, 512, 512)
        else:
            trunk, taps, widths = _official_trunk(in_channels), _OFFICIAL_TAPS, (64, 128, 256, 512, 512)
        if vgg_state_dict is None:
            vgg_state_dict = read_vgg_state(self.weights_path(vgg_path))
        holder = nn.Module()
        holder.features = trunk
        feats = {k: v for k, v in vgg_state_dict.items() if k.startswith("features.")}
        try:
            load_network_state(holder, feats)
        except CheckpointError as e:
            raise CheckpointError(f"ELatentLPIPS ({variant}): the trunk weights do not fit: {e}") from None
        self.slices = nn.ModuleList(trunk[a:b] for a, b in taps)
        self.heads = None
        if variant == "official":
            self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
            if lin_state_dict is not None:
                for k, head in enumerate(self.heads):
                    head.weight.data.copy_(lin_state_dict[f"lin{k}.model.1.weight"])
            else:
                for head in self.heads:
                    nn.init.ones_(head.weight)
        self.requires_grad_(False).eval()
        if augment == "default":
            augment = "bgcfnc" if variant == "cmt" else "bg"
        self.augment = None if augment is None else JointAugment(
            augment, color_matrix=color_matrix or ("reference" if variant == "cmt" else "affine"),
            shared_noise=(variant == "cmt") if shared_noise is None else shared_noise)
        self.l1 = (variant == "official") if l1 is None else bool(l1)

    @staticmethod
    def weights_path(vgg_path=None) -> str:
        """The trunk's file: `vgg_path`, ENGINE_LATENT_VGG_WEIGHTS, or latent_vgg16.safetensors in --weights;
        FileNotFoundError saying where it comes from when none exists."""
        return weights_file(vgg_path, "ENGINE_LATENT_VGG_WEIGHTS", f"E-LatentLPIPS needs the latent VGG16 trunk "
                            f"({LATENT_VGG_FILE})", WHERE, names=(LATENT_VGG_FILE,))

    def train(self, mode: bool = True) -> "ELatentLPIPS":
        return super().train(False)   # frozen; GroupNorm has no running statistics, the official BatchNorm does

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        channels = self.slices[0][0].in_channels
        if x.ndim != 4 or x.shape != y.shape or x.shape[1] != channels:
            raise EngineError(f"E-LatentLPIPS compares two [N, {channels}, H, W] latents of one shape, got "
                              f"{tuple(x.shape)} and {tuple(y.shape)}")
        if self.augment is not None and min(x.shape[2:]) < self.augment.min_size:
            raise EngineError(f"E-LatentLPIPS's augmentation needs latents of at least {self.augment.min_size}×"
                              f"{self.augment.min_size}, got {tuple(x.shape[2:])} (its band filters pad by "
                              f"{self.augment.min_size - 1}); pass augment=None for smaller ones")
        y = y.detach()
        l1 = (x - y).abs().flatten(1).mean(dim=1) if self.l1 else None
        if self.augment is not None:
            x, y = self.augment(x, y, pinned_stream())
        d = 0
        for k, (fx, fy) in enumerate(zip(self.features(x), self.features(y))):
            nx = fx / torch.sqrt(fx.square().sum(dim=1, keepdim=True) + 1e-8)
            ny = fy / torch.sqrt(fy.square().sum(dim=1, keepdim=True) + 1e-8)
            diff = (nx - ny).square()
            diff = self.heads[k](diff) if self.heads is not None else diff.sum(dim=1, keepdim=True)
            d = d + diff.mean(dim=(2, 3)).reshape(-1)
        return d if l1 is None else d + l1


def convert_reference_checkpoint(src, dst) -> str:
    """The CMT authors' latent-VGG checkpoint (`torch.save({'model': <VGGBase module>, 'optimizer_state': ...})`)
    as a plain state dict at `dst` (.safetensors), read with the restricted unpickler: the module's pickled class
    is taken as a record of its tensors, never constructed (engine/checkpoints/unpickler.py)."""
    from engine.checkpoints.unpickler import flatten, unpickle_torch_zip
    obj = unpickle_torch_zip(src, extra_globals=_TORCH_MODULE_GLOBALS)
    model = obj.get("model") if isinstance(obj, dict) else None
    if model is None:
        raise CheckpointError(f"{src}: no 'model' entry; keys: {list(obj) if isinstance(obj, dict) else type(obj)}")
    state: dict[str, torch.Tensor] = {}
    flatten(model, "", state)
    with torch.device("meta"):              # the names and shapes §6.5 lists, without building 138 M weights
        want = {k: v.shape for k, v in LatentVGG().state_dict().items()}
    got = {k: v.shape for k, v in state.items()}
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = [f"{k}: {list(got[k])} vs {list(want[k])}" for k in want if k in got and got[k] != want[k]]
        raise CheckpointError(f"{src}: 'model' is not VGG16_Latent_GN: missing {missing[:6]}, unexpected "
                              f"{extra[:6]}, wrong shapes {wrong[:6]}")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, os.fspath(dst))
    return os.fspath(dst)


def _module_record(name: str):
    from engine.checkpoints.unpickler import ContainerRecord

    class _Record(ContainerRecord):
        class_name = name
    _Record.__name__ = name
    return _Record


# The torch.nn classes a pickled VGGBase names; each becomes a passive record of its state (nothing is built).
_TORCH_MODULE_GLOBALS = {
    (mod, cls): _module_record(cls) for mod, cls in (
        ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.conv", "Conv2d"),
        ("torch.nn.modules.normalization", "GroupNorm"), ("torch.nn.modules.activation", "ReLU"),
        ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.pooling", "AdaptiveAvgPool2d"),
        ("torch.nn.modules.linear", "Linear"), ("torch.nn.modules.dropout", "Dropout"),
        ("elatentlpips.models", "VGGBase"), ("training.elatentlpips.models", "VGGBase"))}
