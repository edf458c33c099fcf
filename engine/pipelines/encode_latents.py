"""Encode an image dataset into a latent dataset with the SD VAE: the input of the latent recipes
(recipes/imagenet256_cmt_mf.py; EDM2's format, engine/data/image_dataset.py).

    python -m engine.pipelines.encode_latents --data datasets/imagenet256.zip \\
        --vae sd-vae-ft-mse/diffusion_pytorch_model.safetensors --out datasets/imagenet256-sdvae-latents.zip \\
        [--convention sd|edm2] [--batch 64] [--device cuda]

Each image (uint8, sides multiples of 8) becomes one float32 [8, H/8, W/8] `.npy` member — the posterior mean and
std (engine.perceptual.vae.LatentEncoder) — named as EDM2's `dataset_tool.py encode` names them, with the dataset's
labels
carried over into dataset.json. `--convention sd` (default) feeds the encoder SD's [−1, 1] range, as DiT, SiT and
Mean Flow latents are made (docs/spec/mf.md §7.1); `edm2` feeds [0, 1] as EDM2 does (docs/spec/edm2_latent.md §3.1). The
images
are streamed batch by batch into the archive (nothing but one batch is held in memory), which is written under a
temporary name and renamed when complete; an interrupted run leaves no partial dataset and starts over.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from engine.checks import positive_int_arg
from engine.data.dataset_writer import write_members
from engine.data.image_dataset import LABELS_FILENAME, ImageDataset, edm_latent_name
from engine.errors import EngineError


def encode_dataset(dataset: ImageDataset, encoder, dest, batch: int = 64, device="cpu", overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Write `dataset`'s images encoded by `encoder` (engine.perceptual.vae.LatentEncoder) as a latent dataset at `dest`."""
    if dataset.is_latent:
        raise EngineError(f"{dataset.path} already holds latents; encode_latents reads RGB images")
    if dataset.num_channels != 3:
        raise EngineError(f"{dataset.path} holds {dataset.num_channels}-channel images; the SD VAE encodes RGB "
                          "(3 channels)")
    encoder = encoder.to(device)
    n = len(dataset)
    labels = [int(np.argmax(dataset.get_label(i))) for i in range(n)] if dataset.has_labels else None

    def members():
        from tqdm import tqdm
        names = []
        for start in tqdm(range(0, n, batch), desc="encode", disable=not progress):
            images = torch.stack([torch.from_numpy(dataset[i][0]) for i in range(start, min(start + batch, n))])
            moments = encoder(images.to(device)).float().cpu().numpy()
            for j, m in enumerate(moments):
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(m))
                names.append(edm_latent_name(start + j))
                yield names[-1], buf.getvalue()
        meta = {"labels": None if labels is None else [[nm, y] for nm, y in zip(names, labels)]}
        yield LABELS_FILENAME, json.dumps(meta).encode("utf-8")
    return write_members(Path(dest), members, overwrite)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image dataset (EDM zip/folder)")
    p.add_argument("--vae", default=None, help="diffusion_pytorch_model.safetensors of stabilityai/sd-vae-ft-mse "
                                               "(or ENGINE_VAE_WEIGHTS)")
    p.add_argument("--out", required=True, help="the latent dataset to write (.zip or folder)")
    p.add_argument("--convention", choices=["sd", "edm2"], default="sd")
    p.add_argument("--batch", type=positive_int_arg, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from engine.cli import resolve_device
    from engine.perceptual.vae import LatentEncoder
    device = resolve_device(a.device)
    encoder = LatentEncoder.from_file(a.vae, convention=a.convention)
    dataset = ImageDataset(a.data)
    out = encode_dataset(dataset, encoder, a.out, a.batch, device, a.overwrite)
    print(f"wrote {len(dataset)} latents to {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
