"""Image datasets in the EDM format: a .zip or a folder of PNGs plus an optional dataset.json.

The layout is the one NVlabs/edm's `dataset_tool.py` writes and `training/dataset.py`
(`ImageFolderDataset`) reads, so datasets move freely between this engine and EDM/EDM2/ECT/sCM code:

    00000/img00000000.png ... 00000/img00000999.png    1000 images per folder, uncompressed PNG (L or RGB)
    00001/img00001000.png ...
    dataset.json                                       {"labels": [["00000/img00000000.png", 6], ...]}
                                                       or {"labels": null}; optional when reading
    A .zip holds the same members, stored uncompressed (ZIP_STORED).

Reading (`ImageDataset`) follows EDM: images are the files whose extension PIL registers, in sorted
order of their '/'-separated relative paths; an item is (uint8 CHW numpy array, label), the label a
float32 one-hot [label_dim] (label_dim = max class + 1) or a zero-length array without labels; `max_size`
and `xflip` act as in EDM. Where EDM trusts its input, this reader checks it and raises `DatasetError`
naming the offending file:

  Eagerly, in the constructor (validate="headers", the default):
    - the path is a folder or a readable zip (zipfile.BadZipFile -> DatasetError), with no duplicate members;
    - it holds at least one image, and nothing besides images and a root dataset.json (EDM silently skips
      other files; a stray file usually means a wrong path or a half-finished copy, so we stop, unless
      allow_extra_files=True, which skips them as EDM does);
    - every image's header (its first bytes only: size and mode, no pixel decoding) is
      identifiable, 8-bit L/LA/RGB/RGBA, square, and agrees in resolution and channel count with the first;
    - dataset.json, when labels are used: valid JSON, {"labels": list | null}, [name, int >= 0] pairs,
      every image labelled exactly once and no label for a file that is not an image of the dataset.
  validate="full" also decodes every image up front (small datasets, or checking a new archive once);
  validate="first" only decodes the first image, exactly as EDM does (fastest start on huge archives).

  Lazily, in __getitem__: the pixel data itself. A file whose header is fine but whose data is truncated
  or corrupt raises DatasetError naming it when it is first read; so does an image whose decoded shape
  differs from the dataset's (only possible with validate="first").

Latent datasets (EDM2's `dataset_tool.py encode`, docs/spec/edm2_latent.md §3.2): the same container holding `.npy`
members instead of images, `00000/img-mean-std-00000000.npy` …, each a float array [2·C, H, W] with the VAE
posterior mean (first C channels) and std (last C) of one image; the same dataset.json. `ImageDataset` reads them
too (`is_latent`): items are then float32 [2·C, H, W] arrays (headers checked at construction as for images; no
mixing of images and .npy files). engine/data/dataset_writer.py writes both kinds. The training-time posterior sample
and its
scaling are engine/objectives/latent.py's.

Cost at construction, per image, on a 2-core CPU with a warm page cache: listing the zip and reading the
labels ~11 us; the header scan ~20 us more for a PNG (its IHDR chunk is parsed directly) or ~55 us more
for other formats (through PIL); so about 40 s for 1.28M ImageNet PNGs with validate="headers", versus
~130 us per 32x32 image, growing with size, for a full decode. It is paid by each process that constructs
the dataset (each rank); DataLoader workers receive the constructed object and do not rescan.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from collections import Counter
from pathlib import Path
from typing import IO, Sequence

import numpy as np
import PIL.Image
import torch

from engine.checks import positive_int
from engine.errors import EngineError

__all__ = [
    "DatasetError",
    "ImageDataset",
    "edm_image_name",
    "edm_latent_name",
    "uint8_to_float",
    "float_to_uint8",
    "LABELS_FILENAME",
]

LABELS_FILENAME = "dataset.json"
# PIL mode -> channels of np.asarray(image). Other modes decode to the wrong thing for a uint8 CHW image:
# 'P' to palette indices, '1' to bool, 'I;16'/'I'/'F' to 16/32-bit, 'CMYK' to ink coverage.
_MODE_CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_WRITE_MODES = {1: "L", 3: "RGB"}  # what EDM's dataset_tool writes
# PNG IHDR (bit depth, colour type) -> the PIL mode PIL.Image.open reports, for the 8-bit types we accept.
_PNG_MODES = {(8, 0): "L", (8, 2): "RGB", (8, 4): "LA", (8, 6): "RGBA"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_VALIDATE = ("first", "headers", "full")


class DatasetError(EngineError):
    """A dataset on disk (or an array handed to the writer) is malformed; the message names what and where."""


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 tensor in [-1, 1] as x / 127.5 - 1 (EDM's training loop does the same)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"uint8_to_float expects uint8 images, got {x.dtype}")
    return x.to(torch.float32) / 127.5 - 1


def float_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float in [-1, 1] -> uint8 numpy as round((x + 1) * 127.5), clamped; inverts uint8_to_float exactly."""
    x = torch.as_tensor(images).detach().to(torch.float32)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def _image_extensions() -> frozenset[str]:
    """Extensions PIL registers ('.png', '.jpg', ...): EDM's criterion for what counts as an image."""
    PIL.Image.init()  # imports every plugin, which registers its extensions; a no-op after the first call
    return frozenset(PIL.Image.EXTENSION)


def _png_header(f: IO[bytes]) -> tuple[str, int, int] | None:
    """(PIL mode, width, height) from a PNG's IHDR chunk, or None if `f` is not a plain 8-bit PNG.

    A fast path for the header scan: PIL.Image.open costs ~3x the member open itself, this costs nothing.
    Anything it does not recognise (other formats, palette or 16-bit PNGs, damage) goes to PIL instead.
    """
    head = f.read(26)  # signature (8), IHDR length (4), b"IHDR" (4), width, height (4 + 4), depth, colour type
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour_type = struct.unpack(">IIBB", head[16:26])
    mode = _PNG_MODES.get((depth, colour_type))
    return None if mode is None else (mode, width, height)


def exists(p: Path) -> bool:
    """A path that exists, or a dangling link (which a writer must not silently replace)."""
    return p.exists() or p.is_symlink()


def edm_image_name(idx: int) -> str:
    """Archive name EDM's dataset_tool gives image `idx`: 1234 -> '00001/img00001234.png' (1000 per folder)."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


def edm_latent_name(idx: int) -> str:
    """Archive name EDM2's dataset_tool gives latent `idx`: 1234 -> '00001/img-mean-std-00001234.npy'."""
    return f"{idx // 1000:05d}/img-mean-std-{idx:08d}.npy"


def _npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read(f)
    return tuple(shape), dtype


# ----------------------------------------------------------------------------------------------------------
# Reader


# Labels are one-hot [max class + 1]: a stray 10¹² would ask for terabytes (ImageNet-21k has 21,841 classes).
MAX_CLASSES = 1 << 20


class ImageDataset(torch.utils.data.Dataset):
    """EDM-format dataset (zip or folder); items are (uint8 [C, H, W] numpy, float32 one-hot [label_dim]).

    path: folder or .zip.
    resolution: if given, the images must have it (DatasetError otherwise); None accepts what is there.
    max_size: keep a random subset of this many images (chosen by `random_seed`, then sorted), as EDM.
    xflip: double the dataset with horizontally mirrored copies (indices >= the unflipped length).
    use_labels: read dataset.json; when False, or when it is absent or says null, labels are [0]-shaped.
    validate: how much to check at construction, "first" | "headers" | "full" (module docstring).
    allow_extra_files: skip non-image files other than dataset.json instead of raising.
    """

    def __init__(
        self,
        path,
        *,
        resolution: int | None = None,
        max_size: int | None = None,
        xflip: bool = False,
        use_labels: bool = True,
        random_seed: int = 0,
        validate: str = "headers",
        allow_extra_files: bool = False,
    ):
        if resolution is not None:
            positive_int("resolution", resolution, "ImageDataset")
        if max_size is not None:
            positive_int("max_size", max_size, "ImageDataset")
        if validate not in _VALIDATE:
            raise ValueError(f"validate must be one of {_VALIDATE}, got {validate!r}")
        self.path = Path(path)
        self._zipfile: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        if self.path.is_dir():
            self._type = "dir"
        elif self.path.suffix.lower() == ".zip" and self.path.is_file():
            self._type = "zip"
        elif not exists(self.path):
            raise FileNotFoundError(f"dataset path {self.path} does not exist")
        else:
            raise DatasetError(f"{self.path} must be a folder or a .zip archive")
        try:
            all_names = self._list_members()
            self._image_names = self._select_images(all_names, allow_extra_files)
            self._image_shape = self._scan_images(validate)  # [C, H, W]
            self._raw_labels = self._load_labels(all_names) if use_labels else None  # int64 [num_images] or None
        finally:
            # Close what the scan opened: a ZipFile inherited by forked workers shares one OS file offset.
            self.close()
        _, h, w = self._image_shape
        if resolution is not None and (h, w) != (resolution, resolution):
            raise DatasetError(f"{self.path}: images are {h}x{w}, but resolution={resolution} was requested")
        self._label_dim = 0 if self._raw_labels is None else int(self._raw_labels.max()) + 1

        # EDM's max_size / xflip semantics, so the same seed selects the same subset as EDM would.
        n = len(self._image_names)
        self._raw_idx = np.arange(n, dtype=np.int64)
        if max_size is not None and n > max_size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(len(self._raw_idx), dtype=np.uint8)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    # --- file access --------------------------------------------------------------------------------------

    def _where(self, name: str) -> str:
        return f"'{name}' in {self.path}"

    def _get_zipfile(self) -> zipfile.ZipFile:
        # One ZipFile per process, opened on first use: a handle inherited through fork would share its file
        # offset with the parent and sibling workers, and their interleaved seek+read return wrong bytes.
        if self._zipfile is None or self._zip_pid != os.getpid():
            self.close()  # an inherited handle: closing this process's duplicate of the fd is safe for the others
            try:
                self._zipfile = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as e:
                raise DatasetError(f"{self.path} is not a readable zip archive ({e})") from e
            self._zip_pid = os.getpid()
        return self._zipfile

    def _open(self, name: str) -> IO[bytes]:
        if self._type == "zip":
            return self._get_zipfile().open(name, "r")
        return open(self.path / name, "rb")

    def close(self) -> None:
        if self._zipfile is not None:
            self._zipfile.close()
        self._zipfile = None
        self._zip_pid = None

    def __getstate__(self):
        # Spawned workers get a pickled copy; an open ZipFile cannot (and should not) travel with it.
        return dict(self.__dict__, _zipfile=None, _zip_pid=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- construction-time checks ---------------------------------------------------------------------------

    def _list_members(self) -> list[str]:
        """'/'-separated relative paths of every file (not folder) in the dataset."""
        if self._type == "dir":
            return [
                (Path(root) / f).relative_to(self.path).as_posix()
                for root, _dirs, files in os.walk(self.path)
                for f in files
            ]
        names = [info.filename for info in self._get_zipfile().infolist() if not info.is_dir()]
        dupes = sorted(n for n, k in Counter(names).items() if k > 1)
        if dupes:  # zipfile would silently serve the last copy
            raise DatasetError(f"{self._where(dupes[0])} appears more than once in the archive")
        return names

    def _select_images(self, names: Sequence[str], allow_extra_files: bool) -> list[str]:
        exts = _image_extensions()
        images, latents, extra = [], [], []
        for n in names:
            ext = os.path.splitext(n)[1].lower()
            if ext == ".npy":
                latents.append(n)
            elif ext in exts:
                images.append(n)
            elif n != LABELS_FILENAME:
                extra.append(n)
        if images and latents:
            raise DatasetError(f"{self.path} mixes images ('{sorted(images)[0]}') and .npy latents "
                               f"('{sorted(latents)[0]}'); a dataset holds one kind")
        self.is_latent = bool(latents)
        images = images or latents
        if not images:
            raise DatasetError(f"{self.path} contains no image files (files with an extension PIL registers, e.g. "
                               f".png) and no .npy latents")
        extra.sort()
        if extra and not allow_extra_files:
            raise DatasetError(
                f"unexpected non-image file {self._where(extra[0])} ({len(extra)} such file(s)); an EDM dataset holds "
                f"only images and a root {LABELS_FILENAME}. Remove them, or pass allow_extra_files=True to skip them "
                "as EDM does"
            )
        return sorted(images)  # sorted as EDM: the order defines the indices

    def _probe(self, name: str, decode: bool) -> tuple[int, int, int]:
        """(C, H, W) of one image from its header, or from its pixels when `decode`."""
        if self.is_latent:
            return self._probe_latent(name, decode)
        try:
            with self._open(name) as f:
                header = None if decode else _png_header(f)
                if header is not None:
                    mode, w, h = header
                else:
                    f.seek(0)
                    with PIL.Image.open(f) as img:
                        mode, (w, h) = img.mode, img.size
                        if decode:
                            img.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...; zipfile BadZipFile on CRC errors
            raise DatasetError(f"{self._where(name)} cannot be read as an image ({type(e).__name__}: {e})") from e
        if mode not in _MODE_CHANNELS:
            raise DatasetError(
                f"{self._where(name)} has PIL mode {mode!r}; only 8-bit {'/'.join(_MODE_CHANNELS)} images are "
                "supported "
                f"(convert it, e.g. Image.convert('RGB'))"
            )
        if w != h:
            raise DatasetError(f"{self._where(name)} is {w}x{h} (WxH); images must be square")
        return _MODE_CHANNELS[mode], h, w

    def _probe_latent(self, name: str, decode: bool) -> tuple[int, int, int]:
        """(C, H, W) of one .npy latent from its header (EDM2 reshapes to [−1, H, W]), or from its data."""
        try:
            with self._open(name) as f:
                shape, dtype = _npy_header(f)
                if decode:
                    f.seek(0)
                    np.load(io.BytesIO(f.read()), allow_pickle=False)
        except Exception as e:
            raise DatasetError(f"{self._where(name)} cannot be read as a .npy array ({type(e).__name__}: {e})") from e
        if len(shape) < 2 or not np.issubdtype(dtype, np.floating):
            raise DatasetError(f"{self._where(name)} is {dtype} {shape}; a latent is a float array [channels, H, W]")
        h, w = shape[-2:]
        if h != w:
            raise DatasetError(f"{self._where(name)} is {w}x{h} (WxH); latents must be square")
        return int(np.prod(shape[:-2], dtype=np.int64)), h, w

    def _scan_images(self, validate: str) -> list[int]:
        names = self._image_names if validate != "first" else self._image_names[:1]
        first = names[0]
        shape0 = self._probe(first, decode=validate != "headers")
        for name in names[1:]:
            shape = self._probe(name, decode=validate == "full")
            if shape != shape0:
                what = "channel count" if shape[0] != shape0[0] else "resolution"
                raise DatasetError(
                    f"images in {self.path} differ in {what}: '{first}' is {_fmt(shape0)} but '{name}' is "
                    f"{_fmt(shape)} (CxHxW); all images must share one resolution and channel count"
                )
        return list(shape0)

    def _load_labels(self, names: Sequence[str]) -> np.ndarray | None:
        """int64 [num_images] class labels in image order, or None when the dataset has none."""
        if LABELS_FILENAME not in names:
            return None
        where = self._where(LABELS_FILENAME)
        try:
            with self._open(LABELS_FILENAME) as f:
                meta = json.loads(f.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{where} is not valid JSON ({e})") from e
        if not isinstance(meta, dict) or "labels" not in meta:
            raise DatasetError(f'{where} must be a JSON object with a "labels" key, got {_short(meta)}')
        entries = meta["labels"]
        if entries is None:
            return None
        if not isinstance(entries, list):
            raise DatasetError(f'{where}: "labels" must be a list of [file name, class index] pairs or null, got a '
                               f'{type(entries).__name__}')
        labels: dict[str, int] = {}
        for i, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise DatasetError(f'{where}: "labels"[{i}] must be a [file name, class index] pair, got '
                                   f'{_short(entry)}')
            fname, label = entry[0].replace("\\", "/"), entry[1]  # EDM normalises Windows separators too
            if fname in labels:
                raise DatasetError(f"{where} labels '{fname}' more than once")
            if isinstance(label, bool) or not isinstance(label, int):
                vector = " (vector labels are not supported)" if isinstance(label, list) else ""
                raise DatasetError(f"{where}: the label of '{fname}' must be an integer class index, got "
                                   f"{_short(label)}{vector}")
            if label < 0 or label >= MAX_CLASSES:
                raise DatasetError(f"{where}: the label of '{fname}' is {label}; class indices must be in "
                                   f"[0, {MAX_CLASSES:,}) (labels are one-hot vectors of max class + 1 entries)")
            labels[fname] = label
        known = set(self._image_names)
        unknown = [f for f in labels if f not in known]
        if unknown:
            raise DatasetError(f"{where} labels '{unknown[0]}', which is not an image of the dataset ({len(unknown)} "
                               "such label(s))")
        missing = [f for f in self._image_names if f not in labels]
        if missing:
            raise DatasetError(f"{where} has no label for image '{missing[0]}' ({len(missing)} unlabelled image(s))")
        return np.array([labels[f] for f in self._image_names], dtype=np.int64)

    # --- items ------------------------------------------------------------------------------------------------

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        name = self._image_names[raw_idx]
        if self.is_latent:
            try:
                with self._open(name) as f:
                    a = np.load(io.BytesIO(f.read()), allow_pickle=False)
            except Exception as e:
                raise DatasetError(f"{self._where(name)} cannot be read as a .npy array ({type(e).__name__}: {e})") from e
            if a.size != int(np.prod(self._image_shape)) or not np.issubdtype(a.dtype, np.floating):
                raise DatasetError(f"{self._where(name)} holds {a.dtype} {a.shape}, but the dataset's latents are "
                                   f"float {_fmt(self._image_shape)}")
            return a.reshape(self._image_shape).astype(np.float32)
        try:
            with self._open(name) as f, PIL.Image.open(f) as img:
                image = np.asarray(img)  # decodes here; corrupt pixel data surfaces now, not at construction
        except Exception as e:
            raise DatasetError(f"{self._where(name)} cannot be decoded ({type(e).__name__}: {e})") from e
        if image.ndim == 2:
            image = image[:, :, None]  # HW -> HWC
        image = image.transpose(2, 0, 1)  # HWC -> CHW
        if image.dtype != np.uint8 or list(image.shape) != self._image_shape:
            raise DatasetError(
                f"{self._where(name)} decodes to {image.dtype} {_fmt(image.shape)}, but the dataset is uint8 "
                f"{_fmt(self._image_shape)} (CxHxW)"
            )
        return image

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        image = self._load_raw_image(int(self._raw_idx[idx]))
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        # One copy: contiguous, and writable (PIL's array is read-only, which torch warns about in collate).
        return np.array(image, order="C"), self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        """float32 one-hot [label_dim] for item `idx` (zero-length without labels), as EDM."""
        onehot = np.zeros(self._label_dim, dtype=np.float32)
        if self._raw_labels is not None:
            onehot[self._raw_labels[self._raw_idx[idx]]] = 1
        return onehot

    # --- properties -------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def image_names(self) -> tuple[str, ...]:
        """Relative paths of the images in index order (before max_size / xflip)."""
        return tuple(self._image_names)

    @property
    def image_shape(self) -> list[int]:
        return list(self._image_shape)

    @property
    def num_channels(self) -> int:
        return self._image_shape[0]

    @property
    def resolution(self) -> int:
        return self._image_shape[1]

    @property
    def label_dim(self) -> int:
        return self._label_dim

    @property
    def label_shape(self) -> list[int]:
        return [self._label_dim]

    @property
    def has_labels(self) -> bool:
        return self._label_dim != 0


def _fmt(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
