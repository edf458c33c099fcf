"""Random-weight stand-ins for the pretrained files a recipe reads, written in the published layouts so that a
`--smoke` run goes through the same loaders as a real one (nothing here is ever used for a real number).

    write_latent_vgg(dir)   latent_vgg16.safetensors: VGG16_Latent_GN trunk names (engine/perceptual/elatentlpips.py)
    write_sd_vae(dir)       sd-vae-ft-mse/diffusion_pytorch_model.safetensors: diffusers AutoencoderKL names, narrow
                            blocks (engine/perceptual/vae.py reads the widths from the file)
    write_inception(dir)    pt_inception-2015-12-05-6726825d.pth: pytorch-fid's state dict of the FID Inception
                            (engine/metrics/inception_files.py folds it into NVIDIA's names)

Each is deterministic in its seed and written atomically; an existing file is kept (a rerun resumes over the same
files, which the run's identity fingerprints).
"""
from __future__ import annotations

import os

import torch

from engine.checkpoints.files import atomic_write

__all__ = ["write_latent_vgg", "write_sd_vae", "write_inception"]


def _save(path: str, state: dict, kind: str = "safetensors") -> str:
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if kind == "safetensors":
        from safetensors.torch import save as save_bytes
        data = save_bytes(state)
        atomic_write(path, lambda f: f.write(data))
    else:
        import io
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def write_latent_vgg(directory, seed: int = 0) -> str:
    """The trunk (`features.*`) of a randomly initialised VGG16_Latent_GN, GroupNorm affines away from (1, 0)."""
    from engine.networks.latent_vgg import LATENT_VGG_LAYERS, vgg_layers
    from engine.perceptual.elatentlpips import LATENT_VGG_FILE
    g = torch.Generator().manual_seed(seed)
    trunk = vgg_layers(LATENT_VGG_LAYERS, 4, "group")
    state = {}
    for k, v in trunk.state_dict().items():
        fan_in = v[0].numel() if v.ndim == 4 else 1
        if v.ndim == 4:
            state[f"features.{k}"] = torch.randn(v.shape, generator=g) * (2 / fan_in) ** 0.5
        elif k.endswith("weight"):
            state[f"features.{k}"] = 1 + 0.2 * torch.randn(v.shape, generator=g)
        else:
            state[f"features.{k}"] = 0.1 * torch.randn(v.shape, generator=g)
    return _save(os.path.join(os.fspath(directory), LATENT_VGG_FILE), state)


def write_sd_vae(directory, channels=(32, 32, 32, 32), seed: int = 0) -> str:
    """Encoder and decoder of an AutoencoderKL with SD's structure (4 levels, 8× down/up-sampling) at narrow
    widths, under diffusers' names."""
    from engine.perceptual.vae import VAE_FILES, LatentDecoder, LatentEncoder
    torch.manual_seed(seed)
    enc, dec = LatentEncoder(channels=channels), LatentDecoder(channels=channels)
    state = {**enc.state_dict(), **{k: v for k, v in dec.state_dict().items() if k not in ("scale", "bias")}}
    return _save(os.path.join(os.fspath(directory), VAE_FILES[1]), state)


def write_inception(directory, seed: int = 0) -> str:
    """pytorch-fid's layout (torchvision names, batch-norm scale γ) of random weights."""
    from engine.metrics.inception import InceptionV3
    from engine.metrics.inception_files import DETECTOR_FILES, PYTORCH_FID_NAMES
    g = torch.Generator().manual_seed(seed)
    ours = InceptionV3().state_dict()
    state = {"fc.weight": torch.randn(ours["output.weight"].shape, generator=g) * 0.01,
             "fc.bias": torch.zeros(ours["output.bias"].shape)}
    for unit, tv in PYTORCH_FID_NAMES.items():
        w = ours[f"{unit}.weight"]
        c = w.shape[0]
        state[f"{tv}.conv.weight"] = torch.randn(w.shape, generator=g) * (2 / w[0].numel()) ** 0.5
        state[f"{tv}.bn.weight"] = torch.rand(c, generator=g) + 0.5
        state[f"{tv}.bn.bias"] = torch.randn(c, generator=g) * 0.1
        state[f"{tv}.bn.running_mean"] = torch.randn(c, generator=g) * 0.1
        state[f"{tv}.bn.running_var"] = torch.rand(c, generator=g) + 0.5
    return _save(os.path.join(os.fspath(directory), DETECTOR_FILES[2]), state, kind="torch")
