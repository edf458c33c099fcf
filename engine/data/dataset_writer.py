"""Writing datasets in the EDM format (engine/data/image_dataset.py describes it): images as uncompressed PNGs
(`write_image_dataset`, what NVlabs/edm's `dataset_tool.py` writes) and VAE posterior moments as `.npy` members
(`write_latent_dataset`, EDM2's `dataset_tool.py encode`), each with its dataset.json, into a .zip or a folder.

Writes are atomic: the dataset is built under a temporary name beside the destination and renamed into place,
so a destination that exists is complete; an existing destination is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL.Image

from engine.data.image_dataset import (_WRITE_MODES, LABELS_FILENAME, DatasetError, edm_image_name, edm_latent_name,
                                       exists)

__all__ = ["write_image_dataset", "write_latent_dataset", "write_members"]


def _as_nhwc(images, layout: str) -> np.ndarray:
    """Validate the writer's input and return it as uint8 [N, H, W, C]."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise DatasetError(f"images must be uint8 in 0..255, got {a.dtype}; convert [-1, 1] floats with float_to_uint8")
    if a.ndim == 3:
        a = a[..., None]  # [N, H, W] grayscale
    if a.ndim != 4 or a.shape[0] == 0:
        raise DatasetError(f"images must be a non-empty [N, C, H, W] or [N, H, W, C] array, got shape {a.shape}")
    views = {"NCHW": a.transpose(0, 2, 3, 1), "NHWC": a}
    if layout == "auto":
        # The channel axis is the one holding 1 or 3 (EDM writes only L and RGB); if both do, prefer the
        # reading that makes the image square, and refuse to guess when that does not settle it.
        fits = [k for k, v in views.items() if v.shape[3] in _WRITE_MODES]
        if len(fits) == 2:
            fits = [k for k in fits if views[k].shape[1] == views[k].shape[2]] or fits
        if len(fits) != 1:
            raise DatasetError(f"cannot tell whether images of shape {a.shape} are NCHW or NHWC; pass layout='NCHW' "
                               "or 'NHWC'")
        layout = fits[0]
    if layout not in views:
        raise ValueError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")
    out = views[layout]
    _, h, w, c = out.shape
    if c not in _WRITE_MODES:
        raise DatasetError(f"images must have 1 (grayscale) or 3 (RGB) channels as EDM's PNGs do, got {c} ({layout} "
                           f"shape {a.shape})")
    if h != w:
        raise DatasetError(f"images must be square, got H x W = {h} x {w} ({layout} shape {a.shape})")
    return out


def _as_labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise DatasetError(f"labels must have shape [{n}] (one class index per image), got {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise DatasetError(f"labels must be integer class indices, got dtype {lab.dtype}")
    if lab.min() < 0:
        raise DatasetError(f"labels must be >= 0, got {lab.min()} at index {int(np.argmin(lab))}")
    return lab.astype(np.int64)


def _encode_members(images_nhwc: np.ndarray, labels: np.ndarray | None) -> Iterator[tuple[str, bytes]]:
    """(archive name, bytes) for every member, in EDM's order: images, then dataset.json."""
    mode = _WRITE_MODES[images_nhwc.shape[3]]
    names = []
    for i, img in enumerate(images_nhwc):
        buf = io.BytesIO()
        pixels = img[:, :, 0] if mode == "L" else img
        # compress_level=0 as EDM: uncompressed PNGs decode fastest in the data loader.
        PIL.Image.fromarray(np.ascontiguousarray(pixels), mode).save(buf, format="png", compress_level=0, optimize=False)
        names.append(edm_image_name(i))
        yield names[-1], buf.getvalue()
    meta = {"labels": None if labels is None else [[name, int(y)] for name, y in zip(names, labels)]}
    yield LABELS_FILENAME, json.dumps(meta).encode("utf-8")


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif exists(p):
        p.unlink(missing_ok=True)


def publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move the finished `tmp` (a file or folder beside `dest`) to `dest` so that `dest` is never seen half-written,
    and an old `dest` is either replaced whole or kept (restored if the swap fails). Every dataset writer publishes
    through here (also engine/data/captions.py)."""
    if not overwrite:
        try:
            if tmp.is_dir():
                os.rename(tmp, dest)  # POSIX refuses (ENOTEMPTY/ENOTDIR) unless dest is absent or an empty dir
            else:
                os.link(tmp, dest)  # unlike rename, link fails if dest appeared since our first check
                tmp.unlink()
        except FileExistsError:
            raise FileExistsError(f"{dest} already exists; pass overwrite=True to replace it") from None
        except OSError as e:
            if exists(dest) and not (dest.is_dir() and not any(dest.iterdir())):
                raise FileExistsError(f"{dest} already exists; pass overwrite=True to replace it") from e
            os.rename(tmp, dest)  # filesystem without hard links
        return
    if not exists(dest) or (tmp.is_file() and dest.is_file()):
        os.replace(tmp, dest)  # atomic for file over file
        return
    # A directory cannot be swapped in one step: park the old dest beside it, then drop it. Readers may
    # briefly find no dest, but never a mixture of old and new.
    old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    remove(old)


def write_image_dataset(dest, images, labels=None, *, layout: str = "auto", overwrite: bool = False) -> Path:
    """Write uint8 images (and optional int class labels) as an EDM dataset; returns the dest path.

    dest: a path ending in '.zip' (any case) for an archive, anything else for a folder.
    images: uint8 [N, C, H, W] or [N, H, W, C] (or [N, H, W] grayscale), C in {1, 3}, H == W. `layout`
        resolves the rare shapes where the channel axis is ambiguous.
    labels: None (dataset.json says {"labels": null}) or N non-negative integers.
    overwrite: replace an existing dest; otherwise an existing file or non-empty folder raises
        FileExistsError (an empty folder is filled, as EDM allows).

    Everything is written to a hidden temporary sibling of dest and renamed into place at the end, so an
    interrupted or failed write leaves dest as it was and removes the temporary.
    """
    images_nhwc = _as_nhwc(images, layout)
    labels = _as_labels(labels, len(images_nhwc))
    return write_members(Path(dest), lambda: _encode_members(images_nhwc, labels), overwrite)


def write_latent_dataset(dest, moments, labels=None, *, overwrite: bool = False) -> Path:
    """Write VAE posterior moments float [N, 2·C, H, W] (mean channels, then std channels) and optional class
    labels as an EDM2 latent dataset (`edm_latent_name` members + dataset.json), atomically as
    `write_image_dataset`. Used by tests and smoke runs; real latents come from the SD VAE encoder."""
    m = np.asarray(moments)
    if m.ndim != 4 or m.shape[1] % 2 or m.shape[2] != m.shape[3] or not np.issubdtype(m.dtype, np.floating):
        raise DatasetError(f"moments must be float [N, 2·C, H, W] (mean and std channels, square), got "
                           f"{m.dtype} {m.shape}")
    if not (m[:, m.shape[1] // 2:] >= 0).all():
        raise DatasetError("the std channels (the second half) of the moments must be >= 0")
    labels = _as_labels(labels, len(m))

    def members():
        names = []
        for i, item in enumerate(m):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(item.astype(np.float32)))
            names.append(edm_latent_name(i))
            yield names[-1], buf.getvalue()
        meta = {"labels": None if labels is None else [[n, int(y)] for n, y in zip(names, labels)]}
        yield LABELS_FILENAME, json.dumps(meta).encode("utf-8")
    return write_members(Path(dest), members, overwrite)


ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)   # the earliest date a zip entry can hold, as reproducible builds use


def _member_info(name: str) -> zipfile.ZipInfo:
    """A stored member with a fixed date (not the clock's) and rw-r--r-- permissions when extracted."""
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def write_members(dest: Path, members, overwrite: bool) -> Path:
    """Write the (name, bytes) pairs of `members()` into a zip or folder beside `dest`, then publish it."""
    is_zip = dest.suffix.lower() == ".zip"
    fillable = not is_zip and dest.is_dir() and not any(dest.iterdir())  # an empty folder, as EDM allows
    # Fail before the (possibly long) write if dest is taken; publish checks again atomically.
    if not overwrite and exists(dest) and not fillable:
        raise FileExistsError(f"{dest} already exists; pass overwrite=True to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")  # same filesystem, so rename is atomic
    try:
        if is_zip:
            # open(..., 'xb') rather than mkstemp: the file gets the usual umask permissions, not 0600.
            with open(tmp, "xb") as f:
                with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
                    for name, data in members():
                        # A fixed timestamp: the same members give the same archive bytes at any time of writing,
                        # so a rewritten dataset keeps its fingerprint (engine/checkpoints/identity.py hashes the zip's
                        # index,
                        # which holds each member's date) and a rerun resumes instead of refusing.
                        zf.writestr(_member_info(name), data)
                f.flush()
                os.fsync(f.fileno())  # the archive's bytes reach disk before its name does
        else:
            tmp.mkdir()
            for name, data in members():
                path = tmp / name
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
        publish(tmp, dest, overwrite)
    except BaseException:
        remove(tmp)
        raise
    return dest
