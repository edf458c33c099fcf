"""Read-ahead input (engine/data/loader.py): with worker processes a stage's steps get exactly the batches the
in-process reads give — the same images in the same order on every rank's share — so training is bit-identical and
a resumed stage continues exactly; workers stop when a stage ends."""
from __future__ import annotations

import numpy as np
import torch

from engine.data import ImageDataset, write_image_dataset
from engine.data.loader import BatchStream
from engine.data.sampler import ImageDatasetSource, ResumableSampler
from engine.objectives import ECT
from engine.training.loop import train_stage
from engine.training.stage_config import StageConfig


def dataset(tmp_path, n=40, r=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, r, r, 3), dtype=np.uint8)
    return ImageDataset(str(write_image_dataset(tmp_path / "d.zip", images, np.arange(n) % 5)), use_labels=True)


def test_workers_read_the_batches_the_training_process_would(tmp_path):
    source = ImageDatasetSource(dataset(tmp_path))
    sampler = ResumableSampler(len(source), seed=3)
    for rank, world in ((0, 1), (1, 2)):
        plain = BatchStream(source, sampler, 17, 12, rank, world, 9, "cpu", workers=0)
        ahead = BatchStream(source, sampler, 17, 12, rank, world, 9, "cpu", workers=2, prefetch=3)
        for k in range(9):            # 9 steps of 12 from position 17: across the epoch boundary at 40
            (a, la), (b, lb) = plain.next(), ahead.next()
            want = source.batch(sampler.indices(17 + 12 * k, 12, rank, world), "cpu")
            assert torch.equal(a, want[0]) and torch.equal(b, want[0]) and torch.equal(la, lb)
        ahead.close()
        try:
            plain.next()
            raise AssertionError("a tenth batch was read")
        except StopIteration:
            pass


def test_training_with_workers_equals_training_without_and_resumes(tmp_path, capsys):
    import glob
    import os

    from engine.pipelines.edm2_presets import build_edm2_preset
    source = ImageDatasetSource(dataset(tmp_path))

    def run(workers, out):
        torch.manual_seed(0)
        net = build_edm2_preset("edm2-tiny", img_resolution=8, use_fp16=False, logvar_channels=None)
        cfg = StageConfig(name="s", total_kimg=0.096, batch_size=8, lr=1e-3, ema_beta=0.9, log_kimg=0.016,
                          ckpt_kimg=0.048, data_workers=workers)
        return train_stage(cfg, net, ECT(q=4), source, str(out), torch.device("cpu"))
    a = run(0, tmp_path / "a")
    b = run(2, tmp_path / "b")
    for (k, x), y in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(x, y), k
    # a run stopped after 48 images (its later checkpoint and its release gone: a stage whose release is in place is
    # finished, engine/training/loop.py) resumes with workers from position 48 exactly
    for f in glob.glob(str(tmp_path / "b" / "s" / "checkpoints" / "ckpt-000000000096*")):
        os.remove(f)
    os.remove(tmp_path / "b" / "s" / "ema.safetensors")
    capsys.readouterr()
    c = run(2, tmp_path / "b")
    assert "ckpt-000000000048" in capsys.readouterr().out and c.pairs_seen == 96
    for (k, x), y in zip(a.net.state_dict().items(), c.net.state_dict().values()):
        assert torch.equal(x, y), k
