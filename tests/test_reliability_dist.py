"""Faults around finished stages, world sizes and the command line (docs/runs.md): a finished stage whose final
checkpoint is damaged is its release and is not trained again (in one process, and after a 2-process run resumed at
one), a resume at another world size says so, the progress bar stays within its total, a non-finite loss, a damaged
image read by a data-loading worker and a seed out of range are one-line errors. Each case compares the run
directory's files before and after.

Run as a script under torchrun (`python -m torch.distributed.run --nproc_per_node=2 tests/test_reliability_dist.py
OUT`) it trains the two stages of `run_two_stages` in OUT, which the 2-process test launches."""
import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from test_reliability import cli, recipe, snapshot

from engine.checks import seed_arg
from engine.data import ImageDataset, write_image_dataset
from engine.data.image_dataset import DatasetError
from engine.data.loader import BatchStream
from engine.data.sampler import ImageDatasetSource, ResumableSampler, TensorSource
from engine.networks import build_network
from engine.objectives import ECT, EDMLoss
from engine.objectives.base import Objective
from engine.precond import CMPrecond, EDMPrecond
from engine.training.loop import initialise, train_stage
from engine.training.stage_config import StageConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flip(path, at=None, n=16) -> None:
    """Invert `n` bytes of a file (in its middle unless `at` is given): what the fault probe did to a shard."""
    data = bytearray(open(path, "rb").read())
    at = len(data) // 2 if at is None else at
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    open(path, "wb").write(bytes(data))


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def states_equal(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- a finished stage is its release ------------------------------------------------------------------------------

def _student():
    torch.manual_seed(0)
    return CMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1))


def run_two_stages(out: str, mid_only: bool = False):
    """mid: 6 steps of 32 pairs, checkpoints every 2 steps (the last two kept); post: from mid's EMA, 4 steps. The
    same at any world size (32 pairs divide over 2 ranks)."""
    data = TensorSource(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
    base = dict(batch_size=32, lr=1e-3, ema_beta=None, ema_std=0.1, seed=3, log_kimg=0.032, ckpt_kimg=0.064,
                keep_checkpoints=2)
    mid = train_stage(StageConfig(name="mid", total_kimg=0.192, **base), _student(), ECT(q=4), data, out)
    if mid_only:
        return mid, None
    post = train_stage(StageConfig(name="post", total_kimg=0.128, **base), initialise(_student(), mid.ema),
                       ECT(q=4), data, out)
    return mid, post


@pytest.fixture
def ect_calls(monkeypatch):
    calls, real = [], ECT.__call__
    monkeypatch.setattr(ECT, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def test_a_finished_stage_whose_final_checkpoint_is_damaged_is_its_release(tmp_path, ect_calls, capsys):
    """The probe's case in one process: 16 bytes flipped in the finished stage's newest checkpoint. The rerun does
    not train the stage again from the previous checkpoint (which rewrote checkpoints and, at another world size,
    the release): it trains and writes nothing, returns the release as the EMA and the logged counters, and the
    next stage, started from that EMA, resumes instead of being refused for another initialisation."""
    mid, post = run_two_stages(str(tmp_path))
    newest = sorted(glob.glob(str(tmp_path / "mid" / "checkpoints" / "ckpt-*.pt")))[-1]
    assert newest.endswith("ckpt-000000000192.pt")
    flip(newest)
    before = snapshot(tmp_path)
    ect_calls.clear()
    capsys.readouterr()
    mid2, post2 = run_two_stages(str(tmp_path))
    said = capsys.readouterr().out
    assert ect_calls == [] and snapshot(tmp_path) == before
    assert re.search(r"skipping unreadable checkpoint \S+ckpt-000000000192\.pt: .*do not match the SHA-256", said)
    assert re.search(r"stage 'mid' is finished: its release \S+mid/ema\.safetensors verifies and its final "
                     r"checkpoint cannot be read, so the release is the stage's result; nothing is trained", said)
    assert "resuming stage 'post' from" in said and "warning: stage" not in said
    assert mid2.net is None and states_equal(mid2.ema, mid.ema)
    assert (mid2.pairs_seen, mid2.counters, mid2.eval_history) == (mid.pairs_seen, mid.counters, mid.eval_history)
    assert states_equal(post2.ema, post.ema) and states_equal(post2.net, post.net)


def test_a_damaged_release_is_written_again_from_the_final_checkpoint(tmp_path, ect_calls, capsys):
    """The release is the authority only while it verifies: one with flipped tensor bytes is not trusted, and the
    stage, restored from its final checkpoint without a step, writes it again with its original bytes."""
    run_two_stages(str(tmp_path), mid_only=True)
    release = tmp_path / "mid" / "ema.safetensors"
    before = snapshot(tmp_path)
    flip(release, at=os.path.getsize(release) - 24)
    ect_calls.clear()
    capsys.readouterr()
    run_two_stages(str(tmp_path), mid_only=True)
    said = capsys.readouterr().out
    assert ect_calls == [] and snapshot(tmp_path) == before
    assert re.search(r"warning: \S+ema\.safetensors cannot be used \(.*do not match the SHA-256 .*\); it is written "
                     r"again from the stage's final checkpoint", said)


def test_a_two_process_run_with_a_damaged_shard_finishes_at_one_process(tmp_path, ect_calls, capsys):
    """The probe's case across world sizes: two gloo processes finish both stages (DCP checkpoints), 16 bytes of
    the final mid checkpoint's rank-1 shard are flipped, and the same stages rerun in one process train nothing,
    write nothing and are not refused. A resume from a 2-process checkpoint at world size 1 warns with both world
    sizes (docs/runs.md: it continues the same computation, not bit-identically)."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.abspath(__file__), str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-4000:]
    final = out / "mid" / "checkpoints" / "ckpt-000000000192"
    assert os.path.isfile(final / "__1_0.distcp")
    flip(final / "__1_0.distcp")
    before = snapshot(out)
    capsys.readouterr()
    mid, post = run_two_stages(str(out))
    said = capsys.readouterr().out
    assert ect_calls == [] and snapshot(out) == before
    assert re.search(r"__1_0\.distcp does not match its SHA-256", said) and "stage 'mid' is finished" in said
    assert mid.net is None and post.pairs_seen == 128
    # the stage stopped after 4 steps at world size 2 (its release and last checkpoint gone) resumes at world size 1
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "mid" / "checkpoints" / "ckpt-000000000192")
    os.remove(resumed / "mid" / "ema.safetensors")
    run_two_stages(str(resumed), mid_only=True)
    said = capsys.readouterr().out
    assert re.search(r"warning: stage 'mid': \S+ckpt-000000000128 was written at world size 2 and resumes at world "
                     r"size 1: the stage continues with the same data and noise but not bit-identically", said)
    assert len(ect_calls) == 2


# ---- the progress bar --------------------------------------------------------------------------------------------

def test_the_progress_bar_never_passes_its_total(tmp_path, monkeypatch):
    """A budget that is not a whole number of batches (100 pairs, batch 32: the last step reaches 128), first from
    the start and then resumed from a checkpoint at 64: the bar counts whole images, stops at its total and ends
    there, and tqdm has no fraction to clamp (its TqdmWarning, and the negative time left, are gone)."""
    from tqdm import TqdmWarning

    import engine.training.train_log as train_log
    seen = []

    class Recording(train_log.tqdm):
        def update(self, n=1):
            out = super().update(n)
            seen.append((self.n, self.total))
            return out

        def close(self):
            seen.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(train_log, "tqdm", Recording)
    data = TensorSource(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
    cfg = StageConfig(name="s", total_kimg=0.1, batch_size=32, lr=1e-3, ema_beta=0.5, log_kimg=0.032, ckpt_kimg=0.064)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_stage(cfg, _student(), ECT(q=4), data, str(tmp_path))
        first = list(seen)
        for f in glob.glob(str(tmp_path / "s" / "checkpoints" / "ckpt-000000000128*")):
            os.remove(f)
        os.remove(tmp_path / "s" / "ema.safetensors")
        seen.clear()
        train_stage(cfg, _student(), ECT(q=4), data, str(tmp_path))
    assert not [w for w in caught if issubclass(w.category, TqdmWarning)], [str(w.message) for w in caught]
    assert first[-1] == (100, 100) and all(n <= total for n, total in first)
    assert seen[0] == (96, 100) and seen[-1] == (100, 100) and all(n <= total for n, total in seen)


# ---- one-line errors ---------------------------------------------------------------------------------------------

def one_error_line(err: str, pattern: str) -> bool:
    """stderr of a stage stopped by an error: the progress bar's lines, then the error as its one last line."""
    lines = err.replace("\r", "\n").strip().splitlines()
    assert "Traceback" not in err and sum(": error:" in line for line in lines) == 1, err
    assert re.search(pattern, lines[-1]), err
    return True


class NaNFrom(Objective):
    """The EDM loss, NaN from image `start` of the stage on (a function of the image count, so a rerun meets it
    at the same step)."""

    def __init__(self, start: int):
        self.inner, self.start, self._nimg = EDMLoss(), start, 0

    def set_progress(self, nimg: int) -> None:
        self._nimg = nimg

    def __call__(self, net, images, labels, rng):
        out = self.inner(net, images, labels, rng)
        if self._nimg >= self.start:
            out.loss = out.loss * float("nan")
        return out


def test_a_nonfinite_loss_is_one_line_and_keeps_the_saved_checkpoints(tmp_path, capsys):
    """NonFiniteError through the command line: one line, exit status 2 (a failure of the settings, not a bug); the
    checkpoint saved before the NaN step stays as it was, and rerunning the same command stops the same way and
    changes no file."""
    data = TensorSource(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)))
    cfg = StageConfig(name="s", total_kimg=0.16, batch_size=32, lr=1e-3, ema_beta=0.5, log_kimg=0.064,
                      ckpt_kimg=0.064)

    def main(argv):
        torch.manual_seed(0)
        net = EDMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1))
        return train_stage(cfg, net, NaNFrom(64), data, str(tmp_path))

    message = (r"^\S+: error: stage 's': the loss or gradient became non-finite between 0\.064 and 0\.128 kimg; "
               r"training stopped and the last checkpoint \(\S+ckpt-000000000064\.pt\) is intact\. Lower the "
               r"learning rate or enable grad_clip")
    code, err = cli(main, [], capsys)
    assert code == 2 and one_error_line(err, message)
    saved = tmp_path / "s" / "checkpoints" / "ckpt-000000000064.pt"
    assert open(str(saved) + ".sha256").read().split()[0] == sha256(saved)
    assert sorted(os.listdir(saved.parent)) == ["ckpt-000000000064.pt", "ckpt-000000000064.pt.sha256"]
    # (TensorBoard, where installed, starts an events file per run: not part of what a rerun must keep)
    kept = lambda: {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(os.path.join("s", "tensorboard"))}
    before = kept()
    code, err = cli(main, [], capsys)
    assert code == 2 and one_error_line(err, message)
    assert kept() == before


def _damaged_dataset(tmp_path, member: int = 5):
    """A 16-image zip dataset whose member `member` keeps its PNG signature and header (so opening the dataset,
    which reads headers, accepts it) and has its pixel data replaced by garbage."""
    import zipfile
    rng = np.random.default_rng(0)
    good = write_image_dataset(tmp_path / "good.zip", rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    path = tmp_path / "damaged.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        names = sorted(n for n in src.namelist() if n.endswith(".png"))
        for info in src.infolist():
            data = src.read(info)
            if info.filename == names[member]:
                data = data[:33] + b"\x00" * (len(data) - 33)   # signature + IHDR kept, IDAT gone
            dst.writestr(info, data)
    return path, names[member]


def test_a_worker_reading_a_damaged_image_raises_the_original_one_line_error(tmp_path, capsys):
    """A DatasetError raised inside a DataLoader worker reaches the training process as that DatasetError with its
    own message (not torch's wrapper holding the worker's traceback), so the command line prints one line naming
    the image and exits 2; the dataset is not touched."""
    path, name = _damaged_dataset(tmp_path)
    source = ImageDatasetSource(ImageDataset(str(path), use_labels=False))
    stream = BatchStream(source, ResumableSampler(16, seed=0, shuffle=False), 0, 8, 0, 1, 2, "cpu", workers=2)
    with pytest.raises(DatasetError) as e:
        stream.next()
    stream.close()
    assert type(e.value) is DatasetError and "\n" not in str(e.value)
    assert re.fullmatch(rf"'{re.escape(name)}' in \S+damaged\.zip cannot be decoded \(.*\)", str(e.value))

    digest = sha256(path)
    cfg = StageConfig(name="s", total_kimg=0.032, batch_size=8, lr=1e-3, ema_beta=0.5, data_workers=2)

    def main(argv):
        from engine.pipelines.edm2_presets import build_edm2_preset
        torch.manual_seed(0)
        net = build_edm2_preset("edm2-tiny", img_resolution=8, use_fp16=False, logvar_channels=None)
        return train_stage(cfg, net, ECT(q=4), source, str(tmp_path / "run"))

    code, err = cli(main, [], capsys)
    assert code == 2 and one_error_line(err, rf"^\S+: error: '{re.escape(name)}' in \S+damaged\.zip cannot be decoded")
    assert "DataLoader worker" not in err
    assert sha256(path) == digest


def test_a_seed_beyond_64_bits_is_refused_in_one_line(capsys):
    """torch's generators take 64-bit seeds (torch.manual_seed(2**64) raises a ValueError traceback): --seed names
    the valid range in argparse's one-line usage error; 2**64 − 1 and 0 are accepted."""
    ap = argparse.ArgumentParser(prog="recipe.py")
    ap.add_argument("--seed", type=seed_arg, default=0)
    assert ap.parse_args(["--seed", str(2 ** 64 - 1)]).seed == 2 ** 64 - 1 and ap.parse_args(["--seed", "0"]).seed == 0
    for bad in (str(2 ** 64), "-1", "1.5"):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(["--seed", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and re.fullmatch(r"recipe\.py: error: argument --seed: (the seed must be an integer "
                                                  r"in \[0, 2\*\*64 − 1\] \(a 64-bit seed\), got -?\d+|'1\.5' is not "
                                                  r"an integer)", err[-1]), err


def test_a_recipe_refuses_a_seed_beyond_64_bits_before_writing(tmp_path, capsys):
    out = tmp_path / "R"
    code, err = cli(recipe("gmm_cmt_ect").main, ["--smoke", "--seed", str(2 ** 64), "--out", str(out),
                                                 "--device", "cpu"], capsys)
    last = err.strip().splitlines()[-1]          # argparse's usage, then the one line of the error
    assert code == 2 and "Traceback" not in err, err
    assert re.search(r" error: argument --seed: the seed must be an integer in \[0, 2\*\*64 − 1\]", last), err
    assert not out.exists()


if __name__ == "__main__":   # one rank of the 2-process run (test_a_two_process_run_with_a_damaged_shard_…)
    from engine import dist
    dist.init()
    run_two_stages(sys.argv[1])
    dist.shutdown()
