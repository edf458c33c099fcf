"""Encode an image dataset's captions (and, for REPA, its images' DINOv2 features) into a caption store beside its
latent dataset (engine/data/captions.py) — U-ViT's COCO feature extraction (scripts/extract_mscoco_feature.py and
extract_empty_feature.py) in one command.

    python -m engine.pipelines.encode_captions --captions annotations/captions_train2014.json \\
        --clip weights/clip-vit-large-patch14 --out datasets/coco256-train.captions \\
        [--latents datasets/coco256-train-latents.zip] \\
        [--images datasets/coco256-train.zip --dinov2 dinov2_vitb14_pretrain.pth] [--device cuda] [--batch 256]

--captions: COCO's annotation file (`annotations` with `image_id` and `caption`; the images taken in sorted id
order, as U-ViT's MSCOCODatabase takes them — the image and latent datasets must be in that order too), or a JSON
list with one list of caption strings per dataset item. --clip: a local directory with the Hugging Face files of
openai/clip-vit-large-patch14 (engine/perceptual/clip_text.py names what is missing). Every caption is encoded (77 ×
768,
last hidden state), and "" as the null caption. With --images (the 256² uint8 dataset the latents were encoded
from) and --dinov2 (ViT-B/14 weights), each image's REPA target (engine/metrics/dinov2.py `repa_features`) is
stored too. --latents is checked to have as many items. The store is written under a temporary name and renamed
when complete.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from engine.checkpoints.files import file_sha256
from engine.checks import positive_int_arg
from engine.cli import resolve_device, run_main
from engine.errors import EngineError


def read_captions(path) -> list[list[str]]:
    """Per-item caption lists from a COCO annotation file (sorted image ids) or a JSON list of lists."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not JSON ({e})") from None
    if isinstance(data, dict) and "annotations" in data:
        try:
            by_image: dict[int, list[str]] = {int(im["id"]): [] for im in data.get("images", [])}
            for a in data["annotations"]:
                by_image.setdefault(int(a["image_id"]), []).append(str(a["caption"]))
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{path}: a COCO annotation without an integer id / image_id or a caption "
                              f"({type(e).__name__}: {e})") from None
        return [by_image[i] for i in sorted(by_image)]
    if isinstance(data, list) and all(isinstance(c, list) and all(isinstance(s, str) for s in c) for c in data):
        return data
    raise EngineError(f"{path}: expected COCO's caption annotations ({{'annotations': [{{'image_id', 'caption'}}]}}) "
                      f"or a JSON list with a list of caption strings per item")


def encode_store(captions: list[list[str]], clip, out, images=None, dinov2=None, latents_len: int | None = None,
                 batch: int = 256, device="cpu", overwrite: bool = False, meta: dict | None = None) -> str:
    from engine.data.captions import write_caption_store
    empty = [i for i, c in enumerate(captions) if not c]
    if empty:
        raise EngineError(f"{len(empty)} items have no caption (first: item {empty[0]}); every image needs one")
    if latents_len is not None and latents_len != len(captions):
        raise EngineError(f"{len(captions)} items have captions, the latent dataset has {latents_len}")
    clip = clip.to(device)
    flat = [s for c in captions for s in c]
    feats = np.concatenate([clip.encode(flat[i:i + batch]).numpy().astype(np.float16)
                            for i in range(0, len(flat), batch)])
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in captions])])
    null = clip.encode([""])[0].numpy()
    repa = None
    if images is not None:
        if len(images) != len(captions):
            raise EngineError(f"{images.path} has {len(images)} images for {len(captions)} captioned items")
        dinov2 = dinov2.to(device)
        parts = []
        for i in range(0, len(images), batch):
            x = torch.stack([torch.as_tensor(images[j][0]) for j in range(i, min(i + batch, len(images)))])
            parts.append(dinov2.repa_features(x.to(device)).cpu().numpy().astype(np.float16))
        repa = np.concatenate(parts)
    return write_caption_store(out, feats, offsets, null, captions, repa=repa, meta=meta, overwrite=overwrite)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", required=True)
    p.add_argument("--clip", required=True, help="directory with openai/clip-vit-large-patch14's files")
    p.add_argument("--out", required=True)
    p.add_argument("--latents", default=None, help="the latent dataset the store goes with (its length is checked)")
    p.add_argument("--images", default=None, help="the uint8 image dataset, for REPA's DINOv2 features")
    p.add_argument("--dinov2", default=None, help="dinov2_vitb14_pretrain.pth (with --images)")
    p.add_argument("--batch", type=positive_int_arg, default=256)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    a.device = resolve_device(a.device)          # the common check: a bad or absent device is one line, first
    from engine.data.image_dataset import ImageDataset
    from engine.perceptual.clip_text import CLIPTextEncoder
    captions = read_captions(a.captions)
    clip = CLIPTextEncoder.from_directory(a.clip)
    images = dinov2 = None
    if a.images:
        from engine.metrics.dinov2 import DINOv2
        images, dinov2 = ImageDataset(a.images), DINOv2.from_file(a.dinov2, "vitb14")
    n = len(ImageDataset(a.latents)) if a.latents else None
    meta = dict(captions_file=a.captions, captions_sha256=file_sha256(a.captions), clip=a.clip,
                dinov2=None if dinov2 is None else dinov2.describe())
    out = encode_store(captions, clip, a.out, images, dinov2, n, a.batch, a.device, a.overwrite, meta)
    print(f"wrote {out}: {len(captions)} items, {sum(map(len, captions))} captions")
    return 0


if __name__ == "__main__":
    run_main(main)
