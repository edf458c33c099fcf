"""The trajectory store (engine/teacher/trajectory_cache.py) on the analytic teacher: contents equal to direct solves,
reproducible from stored seeds, resumable after an interruption, refused when settings differ; and CachedCMT on
it equal to CMT."""
import json
import os

import numpy as np
import pytest
import torch

from engine.data import GaussianMixture
from engine.data.sampler import TensorSource
from engine.networks import build_network
from engine.objectives import CMT, CachedCMT, StepRNG, squared_l2
from engine.precond import CMPrecond
from engine.solvers import dpm_solver_pp
from engine.teacher import trajectory_cache as tc
from engine.training.loop import train_stage
from engine.training.stage_config import StageConfig


@pytest.fixture(scope="module")
def gm():
    return GaussianMixture.random(6, (2, 3, 3), std=0.2, seed=0, num_classes=3)


@pytest.fixture(scope="module")
def data(gm):
    y, labels = gm.sample(50, generator=torch.Generator().manual_seed(1), return_labels=True)
    return TensorSource(y.float(), labels)


def spec(**kw):
    base = dict(num_trajectories=37, shape=[2, 3, 3], nfe=8, chunk=10, seed=5, teacher="gmm-6")
    base.update(kw)
    return tc.StoreSpec(**base)


def test_store_holds_the_teacher_trajectories(tmp_path, gm, data):
    store = tc.write_store(str(tmp_path / "s"), spec(), gm.denoise, data, batch=7, progress=False)
    assert store.complete() and len(store) == 37 and store.states.shape == (37, 9, 2, 3, 3)
    for t in (0, 9, 10, 36):                        # chunk edges and the short last chunk
        seed_t = tc.trajectory_seed(5, t)
        assert store.seeds[t] == seed_t
        i = int(store.image_index[t])
        y, label = data.images[i], data.labels[i]
        assert store.labels[t] == label
        x_T = y + 80.0 * tc.trajectory_noise(seed_t, (2, 3, 3))
        ref = dpm_solver_pp(gm.denoise, x_T[None], spec().sigmas(), labels=label[None])[:, 0]
        assert torch.equal(torch.from_numpy(np.array(store.states[t][0])), x_T)
        torch.testing.assert_close(torch.from_numpy(np.array(store.states[t])), ref, rtol=1e-6, atol=1e-6)
        # and the same trajectory comes back from its stored seed alone
        torch.testing.assert_close(tc.regenerate(store, t, gm.denoise, data), ref, rtol=1e-6, atol=1e-6)
    # every dataset image is used before any repeats (epochs of permutations)
    assert len(set(store.image_index[:37].tolist())) == 37


def test_interrupted_write_resumes_to_the_same_store(tmp_path, gm, data, monkeypatch):
    full = tc.write_store(str(tmp_path / "full"), spec(), gm.denoise, data, batch=4, progress=False)

    calls = {"n": 0}
    real = tc.TeacherSolver.__call__

    def dies_in_third_chunk(self, x_T, labels=None):
        calls["n"] += 1
        if calls["n"] == 7:  # chunk 2, after its first batch was written but before the chunk was marked
            raise KeyboardInterrupt
        return real(self, x_T, labels)

    path = str(tmp_path / "resumed")
    monkeypatch.setattr(tc.TeacherSolver, "__call__", dies_in_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        tc.write_store(path, spec(), gm.denoise, data, batch=4, progress=False)
    monkeypatch.setattr(tc.TeacherSolver, "__call__", real)
    assert tc.TrajectoryStore(path).done_chunks() == {0, 1}
    with pytest.raises(tc.StoreError, match="incomplete \\(2 of 4 chunks unwritten\\)"):
        tc.TrajectorySource(path)
    resumed = tc.write_store(path, spec(), gm.denoise, data, batch=4, progress=False)
    assert np.array_equal(np.asarray(resumed.states), np.asarray(full.states))
    assert np.array_equal(resumed.labels, full.labels)


def test_refuses_other_settings_and_damaged_stores(tmp_path, gm, data):
    path = str(tmp_path / "s")
    tc.write_store(path, spec(), gm.denoise, data, progress=False)
    with pytest.raises(tc.StoreError, match="other settings .*'nfe': \\(8, 4\\)"):
        tc.write_store(path, spec(nfe=4), gm.denoise, data, progress=False)
    with open(os.path.join(path, "states.bin"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(tc.StoreError, match="expected 23976 bytes for \\(37, 9, 2, 3, 3\\) float32, found 100"):
        tc.TrajectoryStore(path)
    with pytest.raises(tc.StoreError, match="not a trajectory store"):
        tc.TrajectoryStore(str(tmp_path))
    with pytest.raises(tc.StoreError, match="the dataset's images are \\(2, 3, 3\\)"):
        tc.write_store(str(tmp_path / "t"), spec(shape=[2, 9]), gm.denoise, data, progress=False)
    with open(os.path.join(path, "meta.json")) as f:
        assert json.load(f)["format"] == tc.FORMAT


def test_cached_cmt_equals_cmt_on_the_same_trajectories(gm, data):
    torch.manual_seed(0)
    net = CMPrecond(build_network("gmm-mlp", in_channels=18, out_channels=18, hidden_channels=32, num_blocks=1))
    flat = lambda f: (lambda x, s, labels=None: f(x.reshape(x.shape[0], -1), s).reshape(x.shape))
    cmt = CMT(gm.denoise, nfe=8, trajectories_per_batch=4, distance=squared_l2)
    images, labels = data.batch(torch.arange(4), "cpu")
    rng = StepRNG.for_step(0, 0, 0)
    expected = cmt(flat(net), images, labels, rng)
    x_T = cmt.start(images, StepRNG.for_step(0, 0, 0))
    traj = dpm_solver_pp(gm.denoise, x_T, cmt.sigmas, labels=labels)     # what a store holds, [N + 1, m, ...]
    cached = CachedCMT(spec(), trajectories_per_batch=4, distance=squared_l2)
    got = cached(flat(net), traj.transpose(0, 1).contiguous(), labels, rng)
    assert torch.equal(got.loss, expected.loss)
    assert (got.pairs, got.teacher_nfe, got.student_backward) == (32, 0, 32) and expected.teacher_nfe == 32
    with pytest.raises(ValueError, match="trajectories \\[m, 9, ...\\]"):
        cached(flat(net), images, labels, rng)


def test_training_from_a_store(tmp_path):
    gm2 = GaussianMixture.random(4, (2,), seed=3)
    source2 = TensorSource(gm2.sample(20, generator=torch.Generator().manual_seed(0)).float())
    path = str(tmp_path / "s")
    tc.write_store(path, spec(num_trajectories=16, chunk=8, shape=[2]), gm2.denoise, source2, progress=False)
    source = tc.TrajectorySource(path)
    torch.manual_seed(0)
    net = CMPrecond(build_network("gmm-mlp", hidden_channels=32, num_blocks=1))
    cfg = StageConfig(name="mid_cached", total_kimg=0.128, batch_size=32, lr=1e-3, ema_beta=None, ema_std=0.1,
                      log_kimg=0.064, ckpt_kimg=0.064, seed=0)
    res = train_stage(cfg, net, CachedCMT(source.spec, trajectories_per_batch=4, distance=squared_l2), source,
                      str(tmp_path / "run"))
    assert res.counters["pairs"] == 128 and res.counters["images"] == 16 and res.counters["teacher_nfe"] == 0


def test_command_line_names_missing_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tc.main(["--teacher", str(tmp_path / "nope.pkl"), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--trajectories", "4"])
    assert e.value.code == 2 and "--teacher " in capsys.readouterr().err
