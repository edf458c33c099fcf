"""Digits dataset and the EDM image-dataset format: exact round trips, one clear error per malformation."""

import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from engine.data import dataset_writer as writer_module
from engine.data import image_dataset as reader_module
from engine.data.dataset_writer import write_image_dataset
from engine.data.digits import DIGITS_COUNT, digits, digits_uint8
from engine.data.image_dataset import DatasetError, ImageDataset, edm_image_name, float_to_uint8, uint8_to_float

# ---------------------------------------------------------------------------------------------------------
# helpers


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(array, mode).save(buf, format="png")
    return buf.getvalue()


def gray(h: int, w: int | None = None, seed: int = 0) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (h, w or h), dtype=np.uint8))


def rgb(h: int, seed: int = 0) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (h, h, 3), dtype=np.uint8))


def make(tmp_path: Path, kind: str, members) -> Path:
    """Build a dataset by hand from {name: bytes | str} (zip also takes [(name, bytes)] to allow duplicates)."""
    if kind == "zip":
        path = tmp_path / "ds.zip"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate member names warn in zipfile
            with zipfile.ZipFile(path, "w") as zf:
                for name, data in members.items() if isinstance(members, dict) else members:
                    zf.writestr(name, data)
        return path
    path = tmp_path / "ds"
    path.mkdir()
    for name, data in members.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def labels_json(pairs) -> str:
    return json.dumps({"labels": pairs})


KINDS = ["zip", "dir"]


# ---------------------------------------------------------------------------------------------------------
# digits


def test_digits_scaling_is_exact():
    from sklearn.datasets import load_digits

    x, y = digits()
    ref = load_digits()
    assert x.shape == (DIGITS_COUNT, 1, 8, 8) == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    expected = torch.from_numpy(ref.images / 16 * 2 - 1).to(torch.float32).unsqueeze(1)
    assert torch.equal(x, expected)
    assert torch.equal(y, torch.from_numpy(ref.target))
    assert torch.equal(torch.unique(x), torch.arange(17, dtype=torch.float32) / 8 - 1)  # 17 levels, none lost


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits_nearest_upsampling_matches_blocks(resolution):
    x8, y8 = digits()
    x, y = digits(resolution)
    assert x.shape == (1797, 1, resolution, resolution)
    assert torch.equal(x, F.interpolate(x8, scale_factor=resolution // 8, mode="nearest"))  # independent oracle
    assert torch.equal(y, y8)
    assert torch.equal(torch.unique(x), torch.unique(x8))


def test_digits_bilinear_is_smooth_and_in_range():
    x8, _ = digits()
    near, _ = digits(32)
    bil, _ = digits(32, interpolation="bilinear")
    assert bil.shape == near.shape and bil.min() >= -1 and bil.max() <= 1
    assert not torch.equal(bil, near) and len(torch.unique(bil)) > 17
    # Still the same digits, just smoother: block means stay near the source pixels (a random image is ~0.8 off).
    assert (F.avg_pool2d(bil, 4) - x8).abs().mean() < 0.2


def test_digits_split_is_deterministic_disjoint_and_stratified():
    _, y = digits()
    train_x, train_y = digits(split="train", seed=3)
    test_x, test_y = digits(split="test", seed=3)
    assert len(train_y) + len(test_y) == 1797 and len(test_y) == 359
    assert torch.equal(digits(split="test", seed=3)[0], test_x)  # same seed, same split
    assert not torch.equal(digits(split="test", seed=4)[0], test_x)
    # Covering, and with the sizes adding up to 1797, disjoint.
    rows = lambda t: {tuple(r) for r in t.flatten(1).tolist()}
    assert rows(train_x) | rows(test_x) == rows(digits()[0])
    assert torch.equal(torch.bincount(train_y) + torch.bincount(test_y), torch.bincount(y))
    frac = torch.bincount(test_y, minlength=10) / torch.bincount(y)
    assert torch.all((frac - 0.2).abs() < 0.01)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(resolution=12), "multiple of 8"),
        (dict(resolution=4), "multiple of 8"),
        (dict(interpolation="bicubic"), "interpolation"),
        (dict(split="val"), "split"),
        (dict(split="test", test_fraction=1.0), "test_fraction"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        digits(**kwargs)


def test_uint8_conversions():
    u8, y = digits_uint8(16)
    x, y_float = digits(16)
    assert u8.dtype == np.uint8 and u8.shape == (1797, 1, 16, 16) and u8.min() == 0 and u8.max() == 255
    assert np.array_equal(y, y_float.numpy())
    assert (uint8_to_float(u8) - x).abs().max() <= 0.5 / 127.5 + 1e-7
    every = np.arange(256, dtype=np.uint8)
    assert np.array_equal(float_to_uint8(uint8_to_float(every)), every)  # exact inverse on all 256 values
    assert uint8_to_float(every).min() == -1 and uint8_to_float(every).max() == 1
    with pytest.raises(TypeError, match="uint8"):
        uint8_to_float(np.zeros(3, np.float32))


# ---------------------------------------------------------------------------------------------------------
# writer + reader round trips


@pytest.fixture(scope="module")
def digits_zip(tmp_path_factory):
    images, labels = digits_uint8()
    path = write_image_dataset(tmp_path_factory.mktemp("digits") / "digits.zip", images, labels)
    return path, images, labels


def read_all(ds):
    items = [ds[i] for i in range(len(ds))]
    return np.stack([im for im, _ in items]), np.stack([lab for _, lab in items])


@pytest.mark.parametrize("kind", KINDS)
def test_digits_round_trip_exact(tmp_path, kind):
    images, labels = digits_uint8()
    dest = tmp_path / ("digits.zip" if kind == "zip" else "digits")
    assert write_image_dataset(dest, images, labels) == dest
    ds = ImageDataset(dest)
    assert len(ds) == 1797 and ds.resolution == 8 and ds.num_channels == 1
    assert ds.label_dim == 10 and ds.has_labels and ds.image_shape == [1, 8, 8]
    got_images, got_labels = read_all(ds)
    assert got_images.dtype == np.uint8 and np.array_equal(got_images, images)
    assert ds[0][0].flags.writeable and ds[0][0].flags.c_contiguous
    assert got_labels.dtype == np.float32 and np.array_equal(got_labels.sum(1), np.ones(1797))
    assert np.array_equal(got_labels.argmax(1), labels)
    # EDM's layout exactly: 1000 images per folder, dataset.json with [name, label] pairs.
    assert ds.image_names == tuple(edm_image_name(i) for i in range(1797))
    assert edm_image_name(999) == "00000/img00000999.png" and edm_image_name(1000) == "00001/img00001000.png"
    if kind == "zip":
        with zipfile.ZipFile(dest) as zf:
            assert zf.namelist() == [edm_image_name(i) for i in range(1797)] + ["dataset.json"]
            assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
            # PNG written with compress_level=0 as EDM does: the zlib header inside IDAT says "stored" (78 01).
            first_png = zf.read(edm_image_name(0))
            assert first_png[first_png.index(b"IDAT") + 4 :][:2] == b"\x78\x01"
            meta = json.loads(zf.read("dataset.json"))
    else:
        assert len(list((dest / "00000").iterdir())) == 1000 and len(list((dest / "00001").iterdir())) == 797
        meta = json.loads((dest / "dataset.json").read_text())
    assert meta == {"labels": [[edm_image_name(i), int(y)] for i, y in enumerate(labels)]}


@pytest.mark.parametrize("kind", KINDS)
def test_rgb_nhwc_without_labels(tmp_path, kind):
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)  # NHWC
    dest = write_image_dataset(tmp_path / ("rgb.zip" if kind == "zip" else "rgb"), images)
    ds = ImageDataset(dest)
    assert ds.num_channels == 3 and not ds.has_labels and ds.label_dim == 0
    got, labels = read_all(ds)
    assert np.array_equal(got, images.transpose(0, 3, 1, 2)) and labels.shape == (5, 0)
    meta_bytes = zipfile.ZipFile(dest).read("dataset.json") if kind == "zip" else (dest / "dataset.json").read_bytes()
    assert json.loads(meta_bytes) == {"labels": None}


def test_xflip_max_size_and_use_labels(digits_zip):
    path, images, labels = digits_zip
    ds = ImageDataset(path, xflip=True, max_size=100, random_seed=1)
    assert len(ds) == 200
    raw = ds._raw_idx[:100]
    assert np.array_equal(raw, np.sort(raw)) and len(set(raw.tolist())) == 100
    im, lab = ds[7]
    flipped, flab = ds[107]
    assert np.array_equal(im, images[raw[7]]) and np.array_equal(flipped, images[raw[7]][:, :, ::-1])
    assert np.array_equal(lab, flab) and lab.argmax() == labels[raw[7]]
    unlabelled = ImageDataset(path, use_labels=False)
    assert not unlabelled.has_labels and unlabelled[0][1].shape == (0,)
    with pytest.raises(DatasetError, match="resolution=32 was requested"):
        ImageDataset(path, resolution=32)


@pytest.mark.parametrize(
    "images, labels, pattern",
    [
        (np.zeros((2, 1, 8, 8), np.float32), None, "must be uint8"),
        (np.zeros((2, 1, 8, 16), np.uint8), None, "must be square"),
        (np.zeros((2, 2, 8, 8), np.uint8), None, "cannot tell whether"),
        (np.zeros((0, 1, 8, 8), np.uint8), None, "non-empty"),
        (np.zeros((2, 1, 8, 8), np.uint8), [0, -1], "must be >= 0"),
        (np.zeros((2, 1, 8, 8), np.uint8), [0.0, 1.0], "integer class indices"),
        (np.zeros((2, 1, 8, 8), np.uint8), [0, 1, 2], r"shape \[2\]"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, images, labels, pattern):
    with pytest.raises(DatasetError, match=pattern):
        write_image_dataset(tmp_path / "x.zip", images, labels)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# atomic writes


@pytest.mark.parametrize("kind", KINDS)
def test_write_does_not_clobber_and_overwrite_replaces(tmp_path, kind):
    a = np.full((3, 1, 8, 8), 10, np.uint8)
    b = np.full((4, 1, 8, 8), 200, np.uint8)
    dest = tmp_path / ("d.zip" if kind == "zip" else "d")
    write_image_dataset(dest, a)
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_image_dataset(dest, b)
    after = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert after == before  # untouched, and no temporary left beside it
    write_image_dataset(dest, b, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]
    assert np.array_equal(read_all(ImageDataset(dest))[0], b)


def test_write_into_existing_empty_folder_is_allowed(tmp_path):
    (tmp_path / "d").mkdir()
    write_image_dataset(tmp_path / "d", np.zeros((2, 8, 8), np.uint8))  # EDM allows an empty dest folder
    assert len(ImageDataset(tmp_path / "d")) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_failed_write_leaves_nothing_behind(tmp_path, kind, monkeypatch):
    real = writer_module._encode_members

    def dies_midway(*args):
        for i, member in enumerate(real(*args)):
            if i == 2:
                raise KeyboardInterrupt  # an interrupt, not just an exception, must also clean up
            yield member

    dest = tmp_path / ("d.zip" if kind == "zip" else "d")
    images = np.zeros((5, 1, 8, 8), np.uint8)
    monkeypatch.setattr(writer_module, "_encode_members", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_image_dataset(dest, images)
    assert list(tmp_path.iterdir()) == []
    # With an existing dest and overwrite=True, a failed write keeps the old dataset.
    monkeypatch.setattr(writer_module, "_encode_members", real)
    write_image_dataset(dest, images + 7)
    monkeypatch.setattr(writer_module, "_encode_members", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_image_dataset(dest, images, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]
    assert np.array_equal(read_all(ImageDataset(dest))[0], images + 7)


# ---------------------------------------------------------------------------------------------------------
# malformed datasets: each rejected with its own message naming the file


def test_corrupt_zip_is_named(tmp_path):
    path = tmp_path / "broken.zip"
    path.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(DatasetError, match=r"broken\.zip is not a readable zip archive"):
        ImageDataset(path)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataset(tmp_path / "missing.zip")
    (tmp_path / "data.tar").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"data\.tar must be a folder or a \.zip"):
        ImageDataset(tmp_path / "data.tar")


@pytest.mark.parametrize("kind", KINDS)
def test_empty_dataset(tmp_path, kind):
    with pytest.raises(DatasetError, match="contains no image files"):
        ImageDataset(make(tmp_path, kind, {}))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "members, pattern",
    [
        ({"a.png": gray(8), "b.png": b"\x89PNG garbage"}, r"'b\.png' in .* cannot be read as an image"),
        ({"a.png": gray(8), "sub/notes.txt": "hi"}, r"unexpected non-image file 'sub/notes\.txt' in .*allow_extra_files"),
        ({"a.png": gray(8), "b.png": gray(16)}, r"differ in resolution: 'a\.png' is 1x8x8 but 'b\.png' is 1x16x16"),
        ({"a.png": gray(8), "b.png": rgb(8)}, r"differ in channel count: 'a\.png' is 1x8x8 but 'b\.png' is 3x8x8"),
        ({"a.png": gray(8), "b.png": gray(8, 16)}, r"'b\.png' in .* is 16x8 \(WxH\); images must be square"),
        ({"a.png": png(np.zeros((8, 8), np.uint8), "P")}, r"'a\.png' in .* has PIL mode 'P'"),
    ],
    ids=["undecodable", "non-image", "resolution", "channels", "non-square", "palette"],
)
def test_malformed_images(tmp_path, kind, members, pattern):
    with pytest.raises(DatasetError, match=pattern):
        ImageDataset(make(tmp_path, kind, members))


@pytest.mark.parametrize("kind", KINDS)
def test_extra_files_can_be_skipped_as_edm_does(tmp_path, kind):
    ds = ImageDataset(make(tmp_path, kind, {"a.png": gray(8), "README.md": "x"}), allow_extra_files=True)
    assert ds.image_names == ("a.png",)


def test_duplicate_zip_member(tmp_path):
    path = make(tmp_path, "zip", [("a.png", gray(8)), ("b.png", gray(8)), ("a.png", gray(8, seed=1))])
    with pytest.raises(DatasetError, match=r"'a\.png' in .* appears more than once"):
        ImageDataset(path)


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_pixels_fail_lazily_by_default_and_eagerly_with_full(tmp_path, kind):
    data = png(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8))
    path = make(tmp_path, kind, {"a.png": gray(32), "b.png": data[: len(data) // 2]})  # header intact
    ds = ImageDataset(path)  # header scan passes
    assert ds[0][0].shape == (1, 32, 32)
    with pytest.raises(DatasetError, match=r"'b\.png' in .* cannot be decoded"):
        ds[1]
    with pytest.raises(DatasetError, match=r"'b\.png' in .* cannot be read as an image"):
        ImageDataset(path, validate="full")


@pytest.mark.parametrize(
    "array, mode",
    [
        (np.zeros((8, 8), np.uint8), "L"),
        (np.zeros((8, 8, 2), np.uint8), "LA"),
        (np.zeros((8, 8, 3), np.uint8), "RGB"),
        (np.zeros((8, 8, 4), np.uint8), "RGBA"),
        (np.zeros((8, 8), np.uint8), "P"),
        (np.zeros((8, 8), np.uint16), "I;16"),
        (np.zeros((8, 8), bool), "1"),
    ],
)
def test_png_header_fast_path_agrees_with_pil(array, mode):
    data = png(array, mode if mode != "I;16" else None)
    pil = PIL.Image.open(io.BytesIO(data))
    fast = reader_module._png_header(io.BytesIO(data))
    # Either the same answer as PIL, or None (then the scan asks PIL): never a different mode.
    assert fast in {(pil.mode, 8, 8), None}
    assert (fast is None) == (mode not in ("L", "LA", "RGB", "RGBA"))


def test_validate_first_checks_shapes_lazily(tmp_path):
    ds = ImageDataset(make(tmp_path, "dir", {"a.png": gray(8), "b.png": gray(16)}), validate="first")
    with pytest.raises(DatasetError, match=r"'b\.png' in .* decodes to uint8 1x16x16, but the dataset is uint8 1x8x8"):
        ds[1]


LABEL_CASES = [
    ("{not json", r"'dataset\.json' in .* is not valid JSON"),
    (json.dumps([["a.png", 0]]), r'must be a JSON object with a "labels" key'),
    (json.dumps({"classes": []}), r'must be a JSON object with a "labels" key'),
    (json.dumps({"labels": {"a.png": 0, "b.png": 1}}), r'"labels" must be a list .* got a dict'),
    (labels_json([["a.png", 0], ["b.png"]]), r'"labels"\[1\] must be a \[file name, class index\] pair'),
    (labels_json([["a.png", 0], ["b.png", 1], ["ghost.png", 2]]), r"labels 'ghost\.png', which is not an image"),
    (labels_json([["a.png", 0]]), r"has no label for image 'b\.png'"),
    (labels_json([["a.png", 0], ["b.png", 1.5]]), r"label of 'b\.png' must be an integer class index, got 1\.5"),
    (labels_json([["a.png", 0], ["b.png", "3"]]), r"label of 'b\.png' must be an integer class index, got '3'"),
    (labels_json([["a.png", 0], ["b.png", True]]), r"label of 'b\.png' must be an integer class index, got True"),
    (labels_json([["a.png", 0], ["b.png", [0.5, 0.5]]]), r"vector labels are not supported"),
    (labels_json([["a.png", 0], ["b.png", -1]]), r"label of 'b\.png' is -1; class indices must be in \[0, 1,048,576\)"),
    (labels_json([["a.png", 0], ["b.png", 1], ["a.png", 2]]), r"labels 'a\.png' more than once"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("meta, pattern", LABEL_CASES, ids=[f"labels{i}" for i in range(len(LABEL_CASES))])
def test_bad_labels(tmp_path, kind, meta, pattern):
    path = make(tmp_path, kind, {"a.png": gray(8), "b.png": gray(8), "dataset.json": meta})
    with pytest.raises(DatasetError, match=pattern):
        ImageDataset(path)
    assert not ImageDataset(path, use_labels=False).has_labels  # labels off: dataset.json is not read


def test_labels_map_by_name_not_order(tmp_path):
    meta = labels_json([["b.png", 4], ["a.png", 2]])
    ds = ImageDataset(make(tmp_path, "zip", {"b.png": gray(8), "a.png": gray(8), "dataset.json": meta}))
    assert ds.image_names == ("a.png", "b.png") and ds.label_dim == 5
    assert ds[0][1].argmax() == 2 and ds[1][1].argmax() == 4


# ---------------------------------------------------------------------------------------------------------
# multiprocess loading


def test_zip_handle_is_per_process_and_not_pickled(digits_zip, monkeypatch):
    path, images, _ = digits_zip
    ds = ImageDataset(path)
    assert ds._zipfile is None  # the constructor's scan does not leave a handle for forked workers to share
    ds[0]
    handle = ds._zipfile
    assert handle is not None and ds._get_zipfile() is handle
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zipfile is None and np.array_equal(clone[5][0], images[5])
    monkeypatch.setattr(reader_module.os, "getpid", lambda: -1)  # as if in a forked child
    assert ds._get_zipfile() is not handle


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_zip(digits_zip, context):
    path, images, labels = digits_zip
    ds = ImageDataset(path)
    ds[0]  # the parent holds an open handle when the workers start
    loader = torch.utils.data.DataLoader(ds, batch_size=128, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    got_images = torch.cat([x for x, _ in batches])
    got_labels = torch.cat([y for _, y in batches])
    assert got_images.dtype == torch.uint8 and torch.equal(got_images, torch.from_numpy(images))
    assert torch.equal(got_labels.argmax(1), torch.from_numpy(labels))
