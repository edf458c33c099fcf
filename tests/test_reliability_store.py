"""The trajectory store's command (engine/teacher/trajectory_cache.py) refuses what would make a wrong or unusable
store, with one line and before anything is written: other teacher weights or other data than the store was made
from (incomplete or complete; stores written before inputs were recorded are checked by recomputation), a
class-conditional teacher without labels, labels outside the teacher's classes, a store larger than its disk, and
a disk that cannot hold its blocks. Each case compares the store's files before and after (docs/runs.md)."""
import errno
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import edm_pickle_writer as W  # noqa: E402
from test_reliability import cli, snapshot  # noqa: E402

from engine.checkpoints.identity import file_fingerprint  # noqa: E402
from engine.cli import run_main  # noqa: E402
from engine.data import write_image_dataset  # noqa: E402
from engine.data.sampler import TensorSource  # noqa: E402
from engine.networks import build_network  # noqa: E402
from engine.precond import EDMPrecond  # noqa: E402
from engine.teacher import trajectory_cache as tc  # noqa: E402

N_IMAGES, T, CHUNK = 8, 12, 4   # 3 chunks; T > N_IMAGES, so every image is used (the second epoch starts in chunk 2)


def _teacher(path, seed, label_dim=0):
    torch.manual_seed(seed)
    kw = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
              attn_resolutions=[], label_dim=label_dim)
    net = EDMPrecond(build_network("digits-ddpmpp", **kw))
    with torch.no_grad():   # EDM zero-initialises output layers: two fresh networks would denoise alike
        for p in net.parameters():
            p.normal_(0, 0.1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    W.write_pickle(W.snapshot(W.network_record(net, W.edm_init_kwargs(net.model.init_kwargs))), path)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Teachers A and B: the same file name and size, other weights; a class-conditional teacher of 3 classes;
    datasets of the same size with other pixels, with labels in range, and with one label out of range."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    images = lambda: rng.integers(0, 256, (N_IMAGES, 3, 8, 8), dtype=np.uint8)
    f = dict(teacher_a=_teacher(d / "a" / "teacher.pkl", 0), teacher_b=_teacher(d / "b" / "teacher.pkl", 1),
             teacher_cond=_teacher(d / "c" / "teacher.pkl", 2, label_dim=3))
    assert os.path.getsize(f["teacher_a"]) == os.path.getsize(f["teacher_b"])
    pixels = images()
    for name, px, labels in (("data_a", pixels, None), ("data_b", images(), None),
                             ("labelled", pixels, np.arange(N_IMAGES) % 3)):
        f[name] = str(write_image_dataset(d / f"{name}.zip", px, labels))
    # the image labelled 3 is the last one the store's first epoch reaches: it is solved only in chunk 1
    late = int(tc.image_indices(0, N_IMAGES, 0, N_IMAGES)[-1])
    assert late not in tc.image_indices(0, N_IMAGES, 0, CHUNK)
    bad = np.arange(N_IMAGES) % 3
    bad[late] = 3
    f["late_image"] = late
    f["bad_labels"] = str(write_image_dataset(d / "bad_labels.zip", pixels, bad))
    return f


def argv(out, teacher, data, trajectories=T):
    return ["--teacher", teacher, "--data", data, "--out", str(out), "--trajectories", str(trajectories),
            "--chunk", str(CHUNK), "--batch", str(CHUNK), "--nfe", "4", "--device", "cpu"]


def interrupted(out, teacher, data, capsys, monkeypatch, after_chunks=1):
    """The command killed after `after_chunks` chunks were written (as a SIGKILL leaves it: progress.json counts
    them, the next chunk's batch never ran)."""
    real, calls = tc.TeacherSolver.__call__, {"n": 0}

    def dies(self, x_T, labels=None):
        calls["n"] += 1
        if calls["n"] > after_chunks:
            raise KeyboardInterrupt
        return real(self, x_T, labels)

    with monkeypatch.context() as m:
        m.setattr(tc.TeacherSolver, "__call__", dies)
        code, err = cli(tc.main, argv(out, teacher, data), capsys)
    assert code == 130 and tc.TrajectoryStore(str(out)).done_chunks() == set(range(after_chunks))


def legacy(out):
    """Rewrite meta.json as the writer before inputs were recorded wrote it (json.dump(indent=1), no "inputs")."""
    p = os.path.join(out, "meta.json")
    with open(p) as f:
        meta = json.load(f)
    del meta["inputs"]
    with open(p, "w") as f:
        json.dump(meta, f, indent=1)


def states(out):
    return np.asarray(tc.TrajectoryStore(str(out)).states)


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "store"
    run_main(tc.main, argv(out, inputs["teacher_a"], inputs["data_a"]))
    return out, np.asarray(tc.TrajectorySource(str(out)).store.states).copy()


# ---- 1. the inputs a store was made from ---------------------------------------------------------------------------

def test_an_interrupted_store_refuses_other_teacher_weights_and_other_data(tmp_path, inputs, uninterrupted, capsys,
                                                                          monkeypatch):
    out = tmp_path / "store"
    interrupted(out, inputs["teacher_a"], inputs["data_a"], capsys, monkeypatch)
    before = snapshot(out)
    code, err = cli(tc.main, argv(out, inputs["teacher_b"], inputs["data_b"]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds trajectories of another teacher or data; refusing to add to it with: " in err
    assert "data.index_sha256: " in err and "teacher.sha256: " in err and "--out" in err
    assert snapshot(out) == before
    # the teacher alone (same name and size, other weights) is refused too
    code, err = cli(tc.main, argv(out, inputs["teacher_b"], inputs["data_a"]), capsys)
    assert code == 2 and "teacher.sha256: " in err and "data.index_sha256" not in err
    assert snapshot(out) == before
    # with its own inputs it resumes to the store an uninterrupted run writes
    run_main(tc.main, argv(out, inputs["teacher_a"], inputs["data_a"]))
    assert np.array_equal(states(out), uninterrupted[1])


def test_a_complete_store_refuses_other_data(inputs, uninterrupted, capsys):
    out = uninterrupted[0]
    before = snapshot(out)
    code, err = cli(tc.main, argv(out, inputs["teacher_a"], inputs["data_b"]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "another teacher or data; refusing to add to it with: data.file: " in err and "data.index_sha256: " in err
    assert "teacher." not in err
    assert snapshot(out) == before
    with open(os.path.join(out, "meta.json")) as f:
        recorded = json.load(f)["inputs"]
    assert recorded["teacher"] == file_fingerprint(inputs["teacher_a"])
    assert tc.TrajectorySource(str(out)).fingerprint()["inputs"] == recorded


def test_a_store_from_before_inputs_were_recorded_resumes_only_with_its_own(tmp_path, inputs, uninterrupted, capsys,
                                                                           monkeypatch):
    out = tmp_path / "store"
    interrupted(out, inputs["teacher_a"], inputs["data_a"], capsys, monkeypatch, after_chunks=2)
    legacy(out)
    before = snapshot(out)
    for teacher, data, problem in ((inputs["teacher_b"], inputs["data_a"], r"its states differ by \d"),
                                   (inputs["teacher_a"], inputs["data_b"], "its start x_T differs")):
        code, err = cli(tc.main, argv(out, teacher, data), capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "was written before stores recorded the hashes of their teacher and data (it names the teacher only " \
               "as 'teacher.pkl (" in err and "trajectory 0 recomputed" in err and re.search(problem, err.split("match: ")[1])
        assert snapshot(out) == before
    run_main(tc.main, argv(out, inputs["teacher_a"], inputs["data_a"]))
    assert np.array_equal(states(out), uninterrupted[1])
    with open(os.path.join(out, "meta.json")) as f:
        assert set(json.load(f)["inputs"]) == {"teacher", "data"}   # recorded from now on


def test_a_complete_store_from_before_inputs_were_recorded_stays_as_it_is(tmp_path, inputs, uninterrupted, capsys):
    out = tmp_path / "store"
    os.makedirs(out)
    for name in os.listdir(uninterrupted[0]):
        with open(os.path.join(uninterrupted[0], name), "rb") as src, open(os.path.join(out, name), "wb") as dst:
            dst.write(src.read())
    legacy(out)
    before = snapshot(out)
    fingerprint = tc.TrajectorySource(str(out)).fingerprint()
    assert "inputs" not in fingerprint   # what training runs on it recorded is unchanged
    code, err = cli(tc.main, argv(out, inputs["teacher_b"], inputs["data_a"]), capsys)
    assert code == 2 and "trajectory 0 recomputed with this teacher and data does not match" in err
    run_main(tc.main, argv(out, inputs["teacher_a"], inputs["data_a"]))
    assert snapshot(out) == before
    assert tc.TrajectorySource(str(out)).fingerprint() == fingerprint


def test_in_memory_teachers_and_data_are_hashed(tmp_path):
    from engine.data import GaussianMixture
    gm_a, gm_b = GaussianMixture.random(4, (2,), seed=0), GaussianMixture.random(4, (2,), seed=1)
    data = TensorSource(gm_a.sample(10, generator=torch.Generator().manual_seed(0)).float())
    spec = tc.StoreSpec(num_trajectories=6, shape=[2], nfe=4, chunk=3, teacher="gmm-4")
    path = str(tmp_path / "s")
    tc.write_store(path, spec, gm_a.denoise, data, progress=False)
    before = snapshot(path)
    with pytest.raises(tc.StoreError, match=r"another teacher or data; .*teacher\.tensors_sha256: "):
        tc.write_store(path, spec, gm_b.denoise, data, progress=False)
    with pytest.raises(tc.StoreError, match=r"another teacher or data; .*data\.sha256: "):
        tc.write_store(path, spec, gm_a.denoise, TensorSource(data.images + 1), progress=False)
    assert snapshot(path) == before


# ---- 2–3. labels -------------------------------------------------------------------------------------------------

def test_a_class_conditional_teacher_needs_labels(tmp_path, inputs, capsys):
    out = tmp_path / "store"
    code, err = cli(tc.main, argv(out, inputs["teacher_cond"], inputs["data_a"]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"the teacher {inputs['teacher_cond']} is class-conditional (3 classes) but --data {inputs['data_a']} " \
           f"has no labels" in err and "all-zero label vector" in err
    assert not out.exists()
    from engine.data import GaussianMixture
    gm = GaussianMixture.random(6, (2,), seed=0, num_classes=3)
    with pytest.raises(tc.StoreError, match=r"the teacher is class-conditional \(3 classes\) but the data has no "
                                            r"labels"):
        tc.write_store(str(out), tc.StoreSpec(num_trajectories=4, shape=[2]), gm.denoise,
                       TensorSource(torch.zeros(5, 2)), progress=False)
    assert not out.exists()


def test_an_unconditional_teacher_ignores_the_datasets_labels(tmp_path, inputs, capsys):
    """As EDM without --cond and engine/pipelines/edm_cm.py: its trajectories do not depend on labels."""
    out = tmp_path / "store"
    run_main(tc.main, argv(out, inputs["teacher_a"], inputs["labelled"], trajectories=4))
    store = tc.TrajectoryStore(str(out))
    assert store.complete() and not store.spec.labelled and store.labels is None


def test_labels_outside_the_teachers_classes_are_refused_before_anything_is_written(tmp_path, inputs, capsys):
    out = tmp_path / "store"
    code, err = cli(tc.main, argv(out, inputs["teacher_cond"], inputs["bad_labels"]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"class labels must be in [0, 3) for this teacher of 3 classes, but image {inputs['late_image']} of the " \
           f"data is labelled 3 (1 of the 8 images the store uses are out of range)" in err
    assert not out.exists()
    # an existing store is not touched either: the labelled store of the conditional teacher, then other labels
    run_main(tc.main, argv(out, inputs["teacher_cond"], inputs["labelled"]))
    assert tc.TrajectoryStore(str(out)).spec.labelled
    before = snapshot(out)
    code, err = cli(tc.main, argv(out, inputs["teacher_cond"], inputs["bad_labels"]), capsys)
    assert code == 2 and "class labels must be in [0, 3)" in err and snapshot(out) == before
    # negative class indices, with a teacher that does not say how many classes it has
    data = TensorSource(torch.zeros(5, 2), torch.tensor([0, 1, -1, 0, 1]))
    with pytest.raises(tc.StoreError, match=r"class labels must be in >= 0, but image 2 of the data is labelled -1"):
        tc.write_store(str(tmp_path / "neg"), tc.StoreSpec(num_trajectories=5, shape=[2]),
                       lambda x, s, labels=None: x * 0, data, progress=False)
    assert not (tmp_path / "neg").exists()


# ---- 4–5. disk space -----------------------------------------------------------------------------------------------

def test_a_store_larger_than_its_disk_is_refused_before_any_file_exists(tmp_path, inputs, capsys):
    out = tmp_path / "new" / "store"
    code, err = cli(tc.main, argv(out, inputs["teacher_a"], inputs["data_a"], trajectories=10 ** 12), capsys)
    needed = 10 ** 12 * 5 * 3 * 8 * 8 * 4 + 2 * (128 + 8 * 10 ** 12)     # states.bin float32, seeds + image_index
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"a store of {10 ** 12} trajectories of 5 states (3, 8, 8) float32 needs {needed} bytes (" in err
    assert "bytes (" in err.split("but ")[1] and "are free on the disk of" in err and "--trajectories" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path, inputs, capsys, monkeypatch):
    """The blocks of states.bin are reserved up front: a full disk is ENOSPC at creation (here, from a stubbed
    posix_fallocate), never SIGBUS from a write through the memory map."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "store"
    with monkeypatch.context() as m:
        m.setattr(tc.os, "posix_fallocate", full)
        code, err = cli(tc.main, argv(out, inputs["teacher_a"], inputs["data_a"]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"no space left on device while reserving {T * 5 * 3 * 8 * 8 * 4} bytes (" in err
    assert "nothing was left behind; free space or choose another --out" in err
    assert not out.exists()
    # an --out the user made is kept, empty
    os.makedirs(out)
    with monkeypatch.context() as m:
        m.setattr(tc.os, "posix_fallocate", full)
        code, err = cli(tc.main, argv(out, inputs["teacher_a"], inputs["data_a"]), capsys)
    assert code == 2 and os.listdir(out) == []
    os.rmdir(out)
    # resuming a store (one written before blocks were reserved is sparse): refused, every file unchanged
    interrupted(out, inputs["teacher_a"], inputs["data_a"], capsys, monkeypatch)
    before = snapshot(out)
    with monkeypatch.context() as m:
        m.setattr(tc.os, "posix_fallocate", full)
        code, err = cli(tc.main, argv(out, inputs["teacher_a"], inputs["data_a"]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no space left on device while reserving" in err and "the store is unchanged; free space and rerun" in err
    assert snapshot(out) == before
