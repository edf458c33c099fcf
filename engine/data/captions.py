"""Caption features (and REPA's encoder features) stored beside a latent dataset: the text conditioning of U-ViT's
MS-COCO setup (github baofff/U-ViT at ce55170, scripts/extract_mscoco_feature.py, datasets.py MSCOCOFeatureDataset),
in one directory instead of U-ViT's file per caption.

    <store>/meta.json             format, counts, shapes, what made each array (the encoders' files and SHA-256)
    <store>/captions.npy          float16 [M, 77, 768]  CLIP ViT-L/14 last hidden states, every caption of every image
    <store>/offsets.npy           int64 [N + 1]          image i's captions are rows offsets[i] … offsets[i+1] − 1
    <store>/empty_context.npy     float32 [77, 768]      the null caption "" (classifier-free guidance)
    <store>/texts.json            the caption strings, a list per image (evaluation prompts, grids)
    <store>/repa_features.npy     float16 [N, T, D]      optional: DINOv2 ViT-B/14 patch tokens of each clean image

Item i of the store belongs to item i of the latent dataset (`CaptionedLatentSource` checks the counts). Arrays are
read memory-mapped. `write_caption_store` writes a store atomically (a hidden sibling renamed into place);
`python -m engine.pipelines.encode_captions` makes one from captions, the CLIP directory and optionally the images.

One caption per image per step, uniformly among its captions as U-ViT draws it, but from the image's position in
the data stream — caption k = H(seed, position) mod (its caption count) — rather than Python's global `random`, so a
step's captions are a function of (seed, position): they do not depend on the world size, and a resumed run
replays them (engine.data.loader passes the positions to `batch_at`).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from engine.data.dataset_writer import publish, remove
from engine.errors import EngineError

FORMAT = "engine-captions-1"
FILES = dict(captions="captions.npy", offsets="offsets.npy", empty="empty_context.npy", texts="texts.json",
             repa="repa_features.npy")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionStoreError(f"{path} is damaged: not JSON ({e})") from None


def _dims(value, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(type(d) is int and d > 0 for d in value)


def _load_array(path, kind: str) -> np.ndarray:
    """A store's .npy, memory-mapped, of an integer (`kind` 'i') or floating ('f') dtype. Never unpickled: an
    object array is refused as NumPy's allow_pickle=False does, with the file named instead of NumPy's advice."""
    try:
        a = np.load(path, mmap_mode="r")
    except ValueError as e:
        pickled = "allow_pickle" in str(e) or "Python objects" in str(e)
        what = "an object array (it would be unpickled)" if pickled else f"not a .npy array ({e})"
        raise CaptionStoreError(f"{path} is {what}; a caption store holds numeric arrays only") from None
    except OSError as e:
        raise CaptionStoreError(f"{path} is not a readable .npy array ({e})") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in ("iu" if kind == "i" else "f"):
        raise CaptionStoreError(f"{path} holds {getattr(a, 'dtype', type(a).__name__)} values; a caption store "
                                f"writes {'integer offsets' if kind == 'i' else 'floating-point features'} there")
    return a


class CaptionStoreError(EngineError):
    """A caption store that is missing, incomplete or inconsistent."""


def write_caption_store(path, captions: np.ndarray, offsets: np.ndarray, empty: np.ndarray, texts: list[list[str]],
                        repa: np.ndarray | None = None, meta: dict | None = None, overwrite: bool = False) -> str:
    """Write a store (module docstring) at `path`, checked as `CaptionStore` reads it, atomically."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise CaptionStoreError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = Path(parent) / f".{name}.{uuid.uuid4().hex[:8]}.tmp"     # same filesystem, so the rename is atomic
    tmp.mkdir()
    try:
        np.save(tmp / FILES["captions"], np.asarray(captions, dtype=np.float16))
        np.save(tmp / FILES["offsets"], np.asarray(offsets, dtype=np.int64))
        np.save(tmp / FILES["empty"], np.asarray(empty, dtype=np.float32))
        with open(tmp / FILES["texts"], "w", encoding="utf-8") as f:
            json.dump(texts, f)
        if repa is not None:
            np.save(tmp / FILES["repa"], np.asarray(repa, dtype=np.float16))
        info = dict(format=FORMAT, images=int(len(offsets) - 1), captions=int(len(captions)),
                    context=list(np.shape(captions)[1:]), repa=None if repa is None else list(np.shape(repa)[1:]),
                    **(meta or {}))
        with open(tmp / "meta.json", "w") as f:
            json.dump(info, f, indent=1)
        CaptionStore(tmp)                               # refuse to publish what would not read back
        publish(tmp, Path(path), overwrite)             # the datasets' publication: never half-old, half-new
    except BaseException:
        remove(tmp)
        raise
    return path


class CaptionStore:
    """A caption store on disk, validated on opening: every file present, shapes as meta.json says, offsets
    increasing from 0 to the caption count, every image with at least one caption, texts matching the counts."""

    def __init__(self, path):
        self.path = os.fspath(path)
        meta_file = os.path.join(self.path, "meta.json")
        if not os.path.isfile(meta_file):
            raise CaptionStoreError(f"{self.path} is not a caption store (no meta.json); make one with `python -m "
                                    f"engine.pipelines.encode_captions` (engine/data/captions.py)")
        self.meta = _read_json(meta_file)
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            got = self.meta.get("format") if isinstance(self.meta, dict) else type(self.meta).__name__
            raise CaptionStoreError(f"{meta_file}: format {got!r}, expected {FORMAT!r}")
        counts = [self.meta.get(k) for k in ("images", "captions")]
        context, repa = self.meta.get("context"), self.meta.get("repa")
        if not (all(type(c) is int and c >= 0 for c in counts) and _dims(context, 2) and (not repa or _dims(repa, 2))):
            raise CaptionStoreError(f"{meta_file} is damaged: images and captions must be counts, context and repa "
                                    f"[tokens, channels]; got images={counts[0]!r}, captions={counts[1]!r}, "
                                    f"context={context!r}, repa={repa!r}")
        need = ["captions", "offsets", "empty", "texts"] + (["repa"] if repa else [])
        missing = [FILES[k] for k in need if not os.path.isfile(os.path.join(self.path, FILES[k]))]
        if missing:
            raise CaptionStoreError(f"{self.path} lacks {', '.join(missing)} (meta.json lists them)")
        load = lambda k: _load_array(os.path.join(self.path, FILES[k]), "i" if k == "offsets" else "f")  # noqa: E731
        self.captions, self.offsets, self.empty = load("captions"), np.asarray(load("offsets")), load("empty")
        self.repa = load("repa") if repa else None
        n, m = counts
        problems = []
        if self.captions.ndim != 3 or self.captions.shape[0] != m or list(self.captions.shape[1:]) != \
                list(self.meta["context"]):
            problems.append(f"{FILES['captions']} has shape {self.captions.shape}, meta.json says "
                            f"[{m}, {', '.join(map(str, self.meta['context']))}]")
        if self.offsets.shape != (n + 1,):
            problems.append(f"{FILES['offsets']} has shape {self.offsets.shape}, expected ({n + 1},) for {n} images")
        elif self.offsets[0] != 0 or self.offsets[-1] != m or (np.diff(self.offsets) < 0).any():
            problems.append(f"{FILES['offsets']} must rise from 0 to the caption count {m}")
        else:
            empty_images = np.flatnonzero(np.diff(self.offsets) == 0)
            if len(empty_images):
                problems.append(f"{len(empty_images)} images have no caption (first: item {int(empty_images[0])})")
        if tuple(self.empty.shape) != tuple(self.captions.shape[1:]):
            problems.append(f"{FILES['empty']} has shape {self.empty.shape}, the captions {self.captions.shape[1:]}")
        if self.repa is not None and (self.repa.ndim != 3 or self.repa.shape[0] != n or
                                      list(self.repa.shape[1:]) != list(self.meta["repa"])):
            problems.append(f"{FILES['repa']} has shape {self.repa.shape}, meta.json says [{n}, "
                            f"{', '.join(map(str, self.meta['repa']))}]")
        if problems:
            raise CaptionStoreError(f"{self.path}: " + "; ".join(problems))
        self._texts = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def texts(self) -> list[list[str]]:
        if self._texts is None:
            self._texts = _read_json(os.path.join(self.path, FILES["texts"]))
            if not isinstance(self._texts, list) or len(self._texts) != len(self) or any(len(t) != int(c) for t, c in
                                                     zip(self._texts, np.diff(self.offsets))):
                raise CaptionStoreError(f"{self.path}: {FILES['texts']} does not list each image's captions")
        return self._texts

    def counts(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        return self.offsets[idx + 1] - self.offsets[idx]

    def choose(self, idx, positions, seed: int) -> np.ndarray:
        """The caption row of each image `idx[j]` at stream position `positions[j]` (module docstring)."""
        draws = np.array([int.from_bytes(hashlib.sha256(f"{seed}/caption/{int(p)}".encode()).digest()[:8], "little")
                          for p in positions], dtype=np.uint64)
        return self.offsets[np.asarray(idx)] + (draws % self.counts(idx).astype(np.uint64)).astype(np.int64)

    def null_context(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.empty, dtype=np.float32))

    def fingerprint(self) -> dict:
        """What the store is (engine/checkpoints/identity.py), cheaply: the small files hashed whole, the large feature
        arrays
        (tens of GB for COCO) by size, which with meta.json's record of what made them identifies them."""
        from engine.checkpoints.identity import file_fingerprint
        out = {}
        for k, f in dict(FILES, meta="meta.json").items():
            full = os.path.join(self.path, f)
            if os.path.isfile(full):
                out[k] = {"size": os.path.getsize(full)} if k in ("captions", "repa") else file_fingerprint(full)
        return out


class CaptionedLatentSource:
    """A latent dataset with its caption store: `batch_at(indices, positions, device)` → (moments, labels), labels
    the drawn captions' features [B, 77, 768] float32, or (those, REPA features [B, T, D]) with `repa`."""

    def __init__(self, latents, store: CaptionStore, seed: int = 0, repa: bool = False):
        if len(latents) != len(store):
            raise CaptionStoreError(f"{store.path} has captions for {len(store)} images, the latent dataset "
                                    f"{getattr(getattr(latents, 'dataset', None), 'path', '')} has {len(latents)}")
        if repa and store.repa is None:
            raise CaptionStoreError(f"{store.path} holds no REPA encoder features ({FILES['repa']}); encode them "
                                    f"with `python -m engine.pipelines.encode_captions ... --images ... --dinov2 ...`")
        self.latents, self.store, self.seed, self.repa = latents, store, int(seed), bool(repa)
        self.dataset = getattr(latents, "dataset", None)     # file-backed: the loop may read ahead in workers

    def __len__(self) -> int:
        return len(self.latents)

    def fingerprint(self) -> dict:
        return {"latents": self.latents.fingerprint(), "captions": self.store.fingerprint(), "seed": self.seed,
                "repa": self.repa}

    def batch(self, idx, device):
        raise EngineError("a captioned source draws each image's caption from its stream position: read it through "
                          "engine.data.loader (batch_at)")

    def batch_at(self, idx: torch.Tensor, positions: torch.Tensor, device):
        moments, _ = self.latents.batch(idx, device)
        rows = self.store.choose(idx.numpy(), positions.numpy(), self.seed)
        context = torch.from_numpy(np.stack([np.asarray(self.store.captions[r], dtype=np.float32) for r in rows]))
        context = context.to(device)
        if not self.repa:
            return moments, context
        target = torch.from_numpy(np.stack([np.asarray(self.store.repa[int(i)], dtype=np.float32) for i in idx]))
        return moments, (context, target.to(device))
